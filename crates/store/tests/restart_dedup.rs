//! Exactly once across an authority restart: a replica that did not get the
//! answers to its dispatches before the authority went down resends them to
//! the restarted authority, which recognises them by (client id, op id)
//! because `BackupPersistence` keeps the origins of recent commits (in the
//! journal, and in snapshots).

use std::path::Path;
use std::time::Duration;

use proto::frame::Body;
use proto::Frame;
use replimesh_store::{
    BackupPersistence, Encoding, HashCost, Logins, Persistence, Reducer, ServerConfig, Store,
    StoreConfig,
};
use serde::{Deserialize, Serialize};

const T: Duration = Duration::from_secs(20);

struct Counter;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
struct CState {
    total: i64,
    count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Act {
    Add(i64),
}

impl Reducer for Counter {
    type State = CState;
    type Action = Act;
    fn name(&self) -> &str {
        "counter"
    }
    fn initial_state(&self) -> CState {
        CState::default()
    }
    fn reduce(&self, s: &mut CState, a: &Act) {
        let Act::Add(n) = a;
        s.total += n;
        s.count += 1;
    }
}

fn server_config() -> ServerConfig {
    let mut l = Logins::new();
    let cheap = HashCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    l.add_with_cost("u", "p", cheap).unwrap();
    ServerConfig::with_logins(l)
}

fn open(path: &Path) -> Box<dyn Persistence> {
    let config = backup::BackupConfig::new(path)
        .journal(backup::FsyncPolicy::Always)
        .kdf(backup::KdfParams::insecure_fast())
        .key("k");
    Box::new(BackupPersistence::open(config, "counter", Counter.schema()).unwrap())
}

/// Logs in as client `client_id`, dispatches ops `first..=last` (op `n`
/// adds `n`) and returns the seq of each op from the `Committed` answers.
async fn raw_dispatch(url: &str, client_id: &str, first: u64, last: u64) -> Vec<(u64, u64)> {
    let conn = transport::connect(url, &transport::Config::default())
        .await
        .unwrap();
    let (tx, mut rx) = conn.split();
    tx.send(&Frame::new(Body::Hello(proto::Hello {
        version: proto::PROTOCOL_VERSION,
        login: "u".into(),
        password: "p".into(),
        ..Default::default()
    })))
    .unwrap();
    tx.send(&Frame::new(Body::StoreHello(proto::StoreHello {
        store: "counter".into(),
        schema: Counter.schema(),
        client_id: client_id.into(),
        ..Default::default()
    })))
    .unwrap();
    for op in first..=last {
        let action = Encoding::Binary.encode(&Act::Add(op as i64)).unwrap();
        tx.send(&Frame::new(Body::Dispatch(proto::Dispatch {
            store: "counter".into(),
            op_id: op,
            action,
            ..Default::default()
        })))
        .unwrap();
    }
    let mut seqs = Vec::new();
    while seqs.len() < (last - first + 1) as usize {
        let f = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        match f.body {
            Some(Body::Committed(c)) => {
                for (i, seq) in std::iter::once(c.seq).chain(c.more_seqs).enumerate() {
                    seqs.push((c.op_id + i as u64, seq));
                }
            }
            Some(Body::StoreError(e)) => panic!("store error: {e:?}"),
            _ => {}
        }
    }
    tx.close(proto::CloseCode::Normal, "done");
    seqs.sort();
    seqs
}

async fn run(graceful: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counter.backup");
    let url_a = format!("unix://{}/a.sock", dir.path().display());
    let url_b = format!("unix://{}/b.sock", dir.path().display());

    let a =
        Store::authority_with_persistence(Counter, StoreConfig::default(), open(&path)).unwrap();
    let server = a.serve(&url_a, server_config()).await.unwrap();
    // Ops 1..=3 of "r1" are committed; a dispatch on the authority follows.
    let got = raw_dispatch(&url_a, "r1", 1, 3).await;
    assert_eq!(got, vec![(1, 1), (2, 2), (3, 3)]);
    a.dispatch(Act::Add(100)).await.unwrap();
    if graceful {
        // A final snapshot at seq 4: the journal is emptied, the origins
        // travel in the snapshot.
        a.shutdown();
    }
    drop(server);
    drop(a);

    let b =
        Store::authority_with_persistence(Counter, StoreConfig::default(), open(&path)).unwrap();
    assert_eq!(b.seq(), 4);
    let _server = b.serve(&url_b, server_config()).await.unwrap();
    // "r1" never saw the answers: it resends ops 1..=3 and sends op 4.
    let got = raw_dispatch(&url_b, "r1", 1, 4).await;
    assert_eq!(
        got,
        vec![(1, 1), (2, 2), (3, 3), (4, 5)],
        "resent ops must be answered with their first seq"
    );
    assert_eq!(b.seq(), 5, "a resent dispatch was applied again");
    assert_eq!(
        *b.state(),
        CState {
            total: 1 + 2 + 3 + 100 + 4,
            count: 5
        }
    );
    // Another client with the same op ids is not a duplicate.
    let got = raw_dispatch(&url_b, "r2", 1, 1).await;
    assert_eq!(got, vec![(1, 6)]);
}

#[tokio::test]
async fn resent_after_a_crash_applies_once() {
    run(false).await;
}

#[tokio::test]
async fn resent_after_a_graceful_restart_applies_once() {
    run(true).await;
}
