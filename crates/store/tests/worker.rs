//! The worker-process scheme with real child processes: the test binary
//! re-executes itself as the workers.

use std::process::Command;
use std::time::Duration;

use replimesh_store::{Reducer, Role, Server, ServerConfig, Store, StoreConfig, WORKER_ENV};
use serde::{Deserialize, Serialize};

struct Tally;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
struct TState {
    count: u64,
    sum: u64,
}

impl Reducer for Tally {
    type State = TState;
    type Action = u64;
    fn name(&self) -> &str {
        "tally"
    }
    fn initial_state(&self) -> TState {
        TState::default()
    }
    fn reduce(&self, s: &mut TState, a: &u64) {
        s.count += 1;
        s.sum += a;
    }
}

const PER_WORKER: u64 = 200;
const WORKERS: u64 = 2;

/// The worker's side: runs only in a child spawned by the test below.
#[test]
fn worker_child() {
    if std::env::var(WORKER_ENV).is_err() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Store::replica(Tally, StoreConfig::default());
        let _client = store.connect_worker().await.expect("worker link");
        assert!(store.role().contains(&Role::Worker));
        let mut pending = Vec::new();
        for i in 1..=PER_WORKER {
            pending.push(store.try_dispatch(&i).unwrap());
        }
        for p in pending {
            p.await.unwrap();
        }
        // Wait until every worker's actions are applied here too.
        let total = PER_WORKER * WORKERS;
        tokio::time::timeout(Duration::from_secs(30), store.wait_for(total))
            .await
            .expect("all actions applied");
        assert_eq!(store.state().count, total);
    });
}

#[tokio::test]
async fn workers_share_the_parents_store() {
    let authority = Store::authority(Tally, StoreConfig::default());
    let server = Server::new(ServerConfig::default());
    server.add(&authority);
    let exe = std::env::current_exe().unwrap();
    let mut children = Vec::new();
    for _ in 0..WORKERS {
        let mut cmd = Command::new(&exe);
        cmd.args(["worker_child", "--exact", "--test-threads=1"]);
        cmd.stdout(std::process::Stdio::null());
        children.push(server.spawn_worker(&mut cmd).unwrap());
    }
    assert!(authority.role().contains(&Role::Master));
    let total = PER_WORKER * WORKERS;
    tokio::time::timeout(Duration::from_secs(60), authority.wait_for(total))
        .await
        .expect("workers' actions committed");
    for mut c in children {
        let status = tokio::task::spawn_blocking(move || c.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "worker failed: {status}");
    }
    let s = authority.state().clone();
    assert_eq!(s.count, total);
    assert_eq!(s.sum, WORKERS * PER_WORKER * (PER_WORKER + 1) / 2);
}
