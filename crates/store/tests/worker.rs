//! The worker-process scheme with real child processes: the test binary
//! re-executes itself as the workers.

mod common;

use std::process::Command;
use std::time::Duration;

use replimesh_store::{Role, Server, ServerConfig, Store, StoreConfig, WORKER_ENV};

use common::Tally;

const PER_WORKER: u64 = 200;
const WORKERS: u64 = 2;

/// The worker's side: runs only in a child spawned by the test below.
#[test]
fn worker_child() {
    let Some(rt) = child_runtime() else { return };
    rt.block_on(child_deadline(async {
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
    }));
}

#[testkit::test]
async fn workers_share_the_parents_store() {
    let authority = Store::authority(Tally, StoreConfig::default());
    let server = Server::new(ServerConfig::default());
    server.add(&authority);
    let children: Vec<_> = (0..WORKERS)
        .map(|_| spawn_child(&server, "worker_child"))
        .collect();
    assert!(authority.role().contains(&Role::Master));
    let total = PER_WORKER * WORKERS;
    tokio::time::timeout(Duration::from_secs(60), authority.wait_for(total))
        .await
        .expect("workers' actions committed");
    for c in children {
        wait_success(c).await;
    }
    let s = authority.state().clone();
    assert_eq!(s.count, total);
    assert_eq!(s.sum, WORKERS * PER_WORKER * (PER_WORKER + 1) / 2);
}

/// Runs `name` (a child test below) as a worker of `server`.
fn spawn_child(server: &Server, name: &str) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([name, "--exact", "--test-threads=1"]);
    cmd.stdout(std::process::Stdio::null());
    server.spawn_worker(&mut cmd).unwrap()
}

/// Waits (at most a minute) for `child` to exit successfully; kills it
/// past the deadline.
async fn wait_success(mut child: std::process::Child) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the worker did not exit within 60 s (killed)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "worker failed: {status}");
}

/// A worker's body, failing (the child exits non-zero) if it has not ended
/// within a minute: its network waits are bounded.
async fn child_deadline(body: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(60), body)
        .await
        .expect("the worker did not end within 60 s");
}

fn child_runtime() -> Option<tokio::runtime::Runtime> {
    std::env::var(WORKER_ENV).ok()?;
    Some(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    )
}

const RECOVER_ACTIONS: u64 = 100;

/// Worker side: blocks its runtime long enough for the parent to drop the
/// link (idle timeout), then keeps dispatching: the link must come back.
#[test]
fn worker_child_recovers() {
    let Some(rt) = child_runtime() else { return };
    rt.block_on(child_deadline(async {
        let store = Store::replica(Tally, StoreConfig::default());
        let client = store.connect_worker().await.expect("worker link");
        for i in 1..=RECOVER_ACTIONS / 2 {
            store.dispatch(i).await.unwrap();
        }
        assert_eq!(client.reconnects(), 0);
        // The parent hears nothing for longer than its idle timeout.
        std::thread::sleep(Duration::from_millis(1500));
        let pending: Vec<_> = (RECOVER_ACTIONS / 2 + 1..=RECOVER_ACTIONS)
            .map(|i| store.try_dispatch(&i).unwrap())
            .collect();
        for p in pending {
            tokio::time::timeout(Duration::from_secs(30), p)
                .await
                .expect("dispatch committed after the link came back")
                .unwrap();
        }
        assert!(client.reconnects() >= 1, "the link was never dropped");
        assert!(client.connected());
        assert_eq!(store.state().count, RECOVER_ACTIONS);
    }));
}

#[testkit::test]
async fn a_broken_worker_link_is_re_established() {
    let authority = Store::authority(Tally, StoreConfig::default());
    let mut config = ServerConfig::default();
    config.transport.ping_interval = Some(Duration::from_millis(50));
    config.transport.idle_timeout = Some(Duration::from_millis(300));
    let server = Server::new(config);
    server.add(&authority);
    let child = spawn_child(&server, "worker_child_recovers");
    wait_success(child).await;
    // Each dispatch applied exactly once across the two links.
    let s = authority.state().clone();
    assert_eq!(s.count, RECOVER_ACTIONS);
    assert_eq!(s.sum, RECOVER_ACTIONS * (RECOVER_ACTIONS + 1) / 2);
}

/// Worker side: after the parent stops serving workers, the client says so
/// and dispatches fail at once with a clear error.
#[test]
fn worker_child_orphan() {
    let Some(rt) = child_runtime() else { return };
    rt.block_on(child_deadline(async {
        let store = Store::replica(Tally, StoreConfig::default());
        let client = store.connect_worker().await.expect("worker link");
        store.dispatch(1).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(30), client.closed())
            .await
            .expect("the client noticed the parent is gone");
        assert!(
            matches!(&end, replimesh_store::ConnectError::ParentGone(r) if r.contains("parent")),
            "{end}"
        );
        assert!(!client.connected());
        let err = store.dispatch(2).await.unwrap_err();
        assert!(err.to_string().contains("parent"), "{err}");
        assert!(matches!(
            store.connect_worker().await,
            Err(replimesh_store::ConnectError::ParentGone(_))
        ));
    }));
}

#[testkit::test]
async fn a_worker_whose_parent_is_gone_fails_clearly() {
    let authority = Store::authority(Tally, StoreConfig::default());
    let server = Server::new(ServerConfig::default());
    server.add(&authority);
    let child = spawn_child(&server, "worker_child_orphan");
    tokio::time::timeout(Duration::from_secs(60), authority.wait_for(1))
        .await
        .expect("the worker's first dispatch");
    drop(server);
    wait_success(child).await;
    assert_eq!(authority.seq(), 1);
}
