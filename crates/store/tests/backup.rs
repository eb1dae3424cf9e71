//! An authority backed by `replimesh-backup` (`BackupPersistence`): restarts
//! keep the history, replicas catch up with a tail (also one that was behind
//! at a clean shutdown), time-based snapshots.

mod common;

use std::path::Path;
use std::time::Duration;

use proto::frame::Body;
use proto::Frame;
use replimesh_store::{Encoding, Reducer, Server, Store, StoreConfig};

use common::{
    backup_config, counter, open, raw_login, server_config, snapshot_reaches, until, Act, Counter,
    T,
};

/// A replica connected over a Unix socket while its authority is stopped and
/// restarted from the same backup: it reconnects by itself and catches up
/// from the backlog (no snapshot), in the same history.
#[testkit::test]
async fn restart_keeps_history_and_a_reconnecting_replica_gets_a_tail() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("store.sock");
    let url = format!("unix://{}", sock.display());
    let config = backup_config(&dir.path().join("counter.backup"));

    let a =
        Store::authority_with_persistence(counter(), StoreConfig::default(), open(&config).await)
            .unwrap();
    let _server = a.serve(&url, server_config()).await.unwrap();
    let r = Store::replica(counter(), StoreConfig::default());
    let client = r.connect(&url, "test1", "12345").await.unwrap();
    for i in 1..=20 {
        r.dispatch(Act::Add(i)).await.unwrap();
        a.dispatch(Act::Add(100 + i)).await.unwrap();
    }
    tokio::time::timeout(T, r.wait_for(40)).await.unwrap();
    let history = a.history_id();
    let before = r.stats();
    // The counter counts: the first sync of a new replica is a snapshot.
    assert!(before.snapshots_received >= 1 && before.actions_received > 0);

    // Stop the authority (final snapshot at seq 40) and its listener.
    a.shutdown().await;
    until("the replica to see the link go down", || {
        !client.connected()
    })
    .await;
    until("the old listener to go away", || !sock.exists()).await;
    drop(a);

    // Dispatched while the authority is down: waits in the outbox.
    let pending = r.try_dispatch(&Act::Add(1000)).unwrap();

    let b =
        Store::authority_with_persistence(counter(), StoreConfig::default(), open(&config).await)
            .unwrap();
    assert_eq!((b.history_id(), b.seq()), (history, 40));
    let _server = b.serve(&url, server_config()).await.unwrap();
    until("the replica to reconnect", || r.connected()).await;
    let seq = tokio::time::timeout(T, pending).await.unwrap().unwrap();
    assert_eq!(seq, 41);
    for i in 1..=10 {
        b.dispatch(Act::Add(-i)).await.unwrap();
    }
    tokio::time::timeout(T, r.wait_for(51)).await.unwrap();
    assert_eq!(*r.state(), *b.state());
    assert_eq!(r.history_id(), history);
    let after = r.stats();
    assert_eq!(
        after.snapshots_received, before.snapshots_received,
        "the replica got a snapshot after the restart instead of a tail"
    );
    assert!(after.actions_received >= before.actions_received + 11);
}

/// The authority of the backup `counter.backup` in `dir`, served on the Unix
/// socket `sock` there: (store, server, URL).
async fn serve_backed(dir: &Path, sock: &str) -> (Store<Counter>, Server, String) {
    let config = backup_config(&dir.join("counter.backup"));
    let a =
        Store::authority_with_persistence(counter(), StoreConfig::default(), open(&config).await)
            .unwrap();
    let url = format!("unix://{}/{sock}", dir.display());
    let server = a.serve(&url, server_config()).await.unwrap();
    (a, server, url)
}

/// A replica that was behind when the authority shut down cleanly: the
/// final snapshot keeps the last actions as a tail, so after the restart the
/// replica catches up with the actions it missed, not with a snapshot.
#[testkit::test]
async fn after_a_clean_shutdown_a_replica_behind_gets_a_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (a, server, url_a) = serve_backed(dir.path(), "a.sock").await;
    let r = Store::replica(counter(), StoreConfig::default());
    let client = r.connect(&url_a, "test1", "12345").await.unwrap();
    for i in 1..=10 {
        a.dispatch(Act::Add(i)).await.unwrap();
    }
    tokio::time::timeout(T, r.wait_for(10)).await.unwrap();
    drop(client);
    until("the replica to go offline", || !r.connected()).await;
    // Committed while the replica is away: it is 20 actions behind.
    for i in 11..=30 {
        a.dispatch(Act::Add(i)).await.unwrap();
    }
    let history = a.history_id();
    a.shutdown().await;
    drop(server);
    drop(a);

    let (b, server, url_b) = serve_backed(dir.path(), "b.sock").await;
    assert_eq!((b.history_id(), b.seq()), (history, 30));
    let before = r.stats();
    let _client = r.connect(&url_b, "test1", "12345").await.unwrap();
    tokio::time::timeout(T, r.wait_for(30)).await.unwrap();
    assert_eq!(*r.state(), *b.state());
    let after = r.stats();
    assert_eq!(
        after.snapshots_received, before.snapshots_received,
        "the replica behind got a snapshot after the clean restart instead of a tail"
    );
    assert_eq!(after.actions_received, before.actions_received + 20);

    // A tail written by one restart survives the next: stopped again at
    // once, restarted, a raw replica at seq 12 gets actions from 13.
    b.shutdown().await;
    drop(server);
    drop(b);
    let (_c, _server, url_c) = serve_backed(dir.path(), "c.sock").await;
    let frames = raw_catch_up(&url_c, history, 12, 30).await;
    assert_tail(&frames, history, 13, 30);
}

/// Logs in with a raw transport connection and attaches with
/// `(history_id, last_seq)`; returns the frames up to `until_seq` (or the
/// first snapshot).
async fn raw_catch_up(url: &str, history_id: u64, last_seq: u64, until_seq: u64) -> Vec<Frame> {
    let (tx, mut rx) = raw_login(url).await;
    let first = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert!(matches!(first.body, Some(Body::Welcome(_))), "{first:?}");
    tx.send(&Frame::new(Body::StoreHello(proto::StoreHello {
        store: "counter".into(),
        schema: counter().schema(),
        client_id: "raw".into(),
        history_id,
        last_seq,
        ..Default::default()
    })))
    .unwrap();
    let mut frames = Vec::new();
    let mut seq = last_seq;
    while seq < until_seq {
        let f = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        match &f.body {
            Some(Body::Actions(a)) => seq = a.first_seq + a.actions.len() as u64 - 1,
            Some(Body::Snapshot(_)) => {
                frames.push(f);
                break;
            }
            Some(Body::StoreError(e)) => panic!("store error: {e:?}"),
            _ => {}
        }
        frames.push(f);
    }
    tx.close(proto::CloseCode::Normal, "done");
    frames
}

/// Checks that `frames` carry the actions `first..=last` of `history` in
/// order, and no snapshot.
fn assert_tail(frames: &[Frame], history: u64, first: u64, last: u64) {
    let mut next = first;
    for f in frames {
        match &f.body {
            Some(Body::Actions(x)) => {
                assert_eq!((x.history_id, x.first_seq), (history, next));
                next += x.actions.len() as u64;
            }
            Some(Body::Snapshot(s)) => panic!("a snapshot at {} instead of the tail", s.seq),
            _ => {}
        }
    }
    assert_eq!(next, last + 1);
}

/// After a crash (no final snapshot), the restarted authority serves a
/// replica that was behind with the tail from its journal: the first frames
/// after the welcome are `Actions` continuing at `last_seq + 1`.
#[testkit::test]
async fn after_a_crash_a_replica_behind_gets_the_journaled_tail() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}/store.sock", dir.path().display());
    let config = backup_config(&dir.path().join("counter.backup"));

    let a =
        Store::authority_with_persistence(counter(), StoreConfig::default(), open(&config).await)
            .unwrap();
    for i in 1..=50 {
        a.dispatch(Act::Add(i)).await.unwrap();
    }
    let history = a.history_id();
    let state = a.state().clone();
    // A crash: no shutdown, no final snapshot; the journal holds 1..=50.
    drop(a);

    let b =
        Store::authority_with_persistence(counter(), StoreConfig::default(), open(&config).await)
            .unwrap();
    assert_eq!((b.history_id(), b.seq()), (history, 50));
    assert_eq!(*b.state(), state);
    let _server = b.serve(&url, server_config()).await.unwrap();

    let frames = raw_catch_up(&url, history, 30, 50).await;
    match &frames[0].body {
        Some(Body::StoreWelcome(w)) => assert_eq!(w.history_id, history),
        other => panic!("expected a store welcome, got {other:?}"),
    }
    assert_tail(&frames[1..], history, 31, 50);

    // The observation can fail: a replica of another history gets a
    // snapshot (here the stored one at seq 0, the journal's tail follows it).
    let frames = raw_catch_up(&url, history ^ 1, 30, 50).await;
    assert!(
        frames
            .iter()
            .any(|f| matches!(&f.body, Some(Body::Snapshot(s)) if s.history_id == history)),
        "{frames:?}"
    );
}

/// The `timeout` policy writes a snapshot after the deadline even when no
/// further action comes (the store's timer), also for a journal replayed at
/// start-up.
#[testkit::test]
async fn timeout_policy_snapshots_without_a_further_action() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counter.backup");
    let config = |timeout: Duration| {
        backup::BackupConfig::new(&path)
            .journal(backup::FsyncPolicy::Always)
            .timeout(timeout)
    };

    let a = Store::authority_with_persistence(
        counter(),
        StoreConfig::default(),
        open(&config(Duration::from_millis(100))).await,
    )
    .unwrap();
    for i in 1..=3 {
        a.dispatch(Act::Add(i)).await.unwrap();
    }
    // No further action: only the timer can write seq 3.
    let seq = snapshot_reaches(&path, 3).await;
    assert_eq!(seq, 3, "no snapshot after the timeout");
    // A second change arms it again.
    a.dispatch(Act::Add(4)).await.unwrap();
    assert_eq!(snapshot_reaches(&path, 4).await, 4);

    drop(a);

    // Actions journaled, then a crash before the (long) deadline.
    let b = Store::authority_with_persistence(
        counter(),
        StoreConfig::default(),
        open(&config(Duration::from_secs(3600))).await,
    )
    .unwrap();
    for i in 5..=6 {
        b.dispatch(Act::Add(i)).await.unwrap();
    }
    drop(b);
    assert_eq!(backup::snapshot::read_snapshot(&path, None).unwrap().seq, 4);
    // Restarted with a short timeout: the replayed journal is snapshotted
    // without any new action.
    let c = Store::authority_with_persistence(
        counter(),
        StoreConfig::default(),
        open(&config(Duration::from_millis(100))).await,
    )
    .unwrap();
    assert_eq!(c.seq(), 6);
    assert_eq!(snapshot_reaches(&path, 6).await, 6);
}

// ---- Exactly once across a restart ----
//
// A replica that did not get the answers to its dispatches before the
// authority went down resends them to the restarted authority, which
// recognises them by (client id, op id) because `BackupPersistence` keeps the
// origins of recent commits (in the journal, and in snapshots).

/// Logs in as client `client_id`, dispatches ops `first..=last` (op `n`
/// adds `n`) and returns the seq of each op from the `Committed` answers.
async fn raw_dispatch(url: &str, client_id: &str, first: u64, last: u64) -> Vec<(u64, u64)> {
    let (tx, mut rx) = raw_login(url).await;
    tx.send(&Frame::new(Body::StoreHello(proto::StoreHello {
        store: "counter".into(),
        schema: counter().schema(),
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

async fn resend_after_restart(graceful: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (a, server, url_a) = serve_backed(dir.path(), "a.sock").await;
    // Ops 1..=3 of "r1" are committed; a dispatch on the authority follows.
    let got = raw_dispatch(&url_a, "r1", 1, 3).await;
    assert_eq!(got, vec![(1, 1), (2, 2), (3, 3)]);
    a.dispatch(Act::Add(100)).await.unwrap();
    if graceful {
        // A final snapshot at seq 4: the journal is emptied, the origins
        // travel in the snapshot.
        a.shutdown().await;
    }
    drop(server);
    drop(a);

    let (b, _server, url_b) = serve_backed(dir.path(), "b.sock").await;
    assert_eq!(b.seq(), 4);
    // "r1" never saw the answers: it resends ops 1..=3 and sends op 4.
    let got = raw_dispatch(&url_b, "r1", 1, 4).await;
    assert_eq!(
        got,
        vec![(1, 1), (2, 2), (3, 3), (4, 5)],
        "resent ops must be answered with their first seq"
    );
    assert_eq!(b.seq(), 5, "a resent dispatch was applied again");
    {
        let st = b.state();
        assert_eq!((st.total, st.count), (1 + 2 + 3 + 100 + 4, 5));
    }
    // Another client with the same op ids is not a duplicate.
    let got = raw_dispatch(&url_b, "r2", 1, 1).await;
    assert_eq!(got, vec![(1, 6)]);
}

#[testkit::test]
async fn resent_after_a_crash_applies_once() {
    resend_after_restart(false).await;
}

#[testkit::test]
async fn resent_after_a_graceful_restart_applies_once() {
    resend_after_restart(true).await;
}

/// Two authorities on the same backup path: the second fails at start-up
/// with an error naming the path and the holder's pid (before, both ran and
/// one's acknowledged dispatches were lost at the next restart).
#[testkit::test]
async fn a_second_authority_on_the_same_backup_fails_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counter.backup");
    let config = common::backup_config(&path);
    let a =
        Store::authority_with_persistence(counter(), StoreConfig::default(), open(&config).await)
            .unwrap();
    a.dispatch(Act::Add(1)).await.unwrap();
    let second = replimesh_store::BackupPersistence::open(config.clone(), "counter", 1);
    let e = second
        .map(|_| ())
        .expect_err("a second opener was accepted");
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string())
            && msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    a.dispatch(Act::Add(2)).await.unwrap();
    assert_eq!(a.seq(), 2);
}
