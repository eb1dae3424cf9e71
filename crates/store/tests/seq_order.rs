//! `Store::seq()` of a persistent authority never moves back and ends at the
//! last acknowledged action, while dispatches from followers and from the
//! authority itself race with its journal thread.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use replimesh_store::{MemoryPersistence, Server, Store, StoreConfig};

use common::{counter, server_config, Act, T};

#[testkit::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_authoritys_seq_never_moves_back() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}", dir.path().join("s.sock").display());
    let authority = Store::authority_with_persistence(
        counter(),
        StoreConfig::default(),
        Box::new(MemoryPersistence::new()),
    )
    .unwrap();
    let server = Server::new(server_config());
    server.add(&authority);
    let url = server.listen(&url).await.unwrap();

    // A watcher that samples seq() as fast as it can.
    let stop = Arc::new(AtomicBool::new(false));
    let went_back = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (a, stop, went_back) = (authority.clone(), stop.clone(), went_back.clone());
        tokio::spawn(async move {
            let mut last = 0;
            while !stop.load(Ordering::Relaxed) {
                let s = a.seq();
                if s < last {
                    went_back.fetch_add(1, Ordering::Relaxed);
                }
                last = s;
                tokio::task::yield_now().await;
            }
        })
    };
    const EACH: u64 = 1_500;
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let r = Store::replica(counter(), StoreConfig::default());
        let c = r.connect(&url, "test1", "12345").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for _ in 0..EACH {
                last = tokio::time::timeout(T, r.dispatch(Act::Add(1)))
                    .await
                    .expect("dispatch timed out")
                    .unwrap();
            }
            drop(c);
            last
        }));
    }
    let a = authority.clone();
    tasks.push(tokio::spawn(async move {
        let mut last = 0;
        for _ in 0..EACH {
            last = tokio::time::timeout(T, a.dispatch(Act::Add(1)))
                .await
                .expect("local dispatch timed out")
                .unwrap();
        }
        last
    }));
    let mut highest = 0;
    for t in tasks {
        highest = highest.max(t.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    assert_eq!(highest, 3 * EACH);
    assert_eq!(went_back.load(Ordering::Relaxed), 0, "seq() moved back");
    // Every acknowledged action is counted by seq() (published before the ack).
    assert_eq!(
        authority.seq(),
        3 * EACH,
        "seq() lags the last acknowledged action"
    );
    assert_eq!(authority.state().count, 3 * EACH);
}
