//! Durable writes off the runtime: a persistent authority's journal runs on
//! its own thread, outside the store's lock, with group commit, and nothing
//! is acknowledged before it is durable.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use replimesh_store::{
    MemoryPersistence, Origin, PersistError, Persistence, Recovered, Server, Store, StoreConfig,
};

use common::{counter, server_config, until, Act, T};

/// How long a closed gate holds a `record` before it gives up (on code that
/// records on the runtime's thread, the test can only go on after that).
const GATE_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Persistence`] whose `record` (the fsync) waits until the test opens
/// its gate, and counts its calls.
#[derive(Clone)]
struct Gated {
    inner: MemoryPersistence,
    gate: Arc<(Mutex<bool>, Condvar)>,
    records: Arc<AtomicUsize>,
    /// Actions handed to `record`, all calls together.
    recorded: Arc<AtomicUsize>,
    /// A `record` gave up waiting for the gate.
    timed_out: Arc<AtomicBool>,
}

impl Gated {
    fn new() -> Self {
        Gated {
            inner: MemoryPersistence::new(),
            gate: Arc::new((Mutex::new(false), Condvar::new())),
            records: Arc::new(AtomicUsize::new(0)),
            recorded: Arc::new(AtomicUsize::new(0)),
            timed_out: Arc::new(AtomicBool::new(false)),
        }
    }

    fn open(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }
}

impl Persistence for Gated {
    fn load(&mut self) -> Result<Recovered, PersistError> {
        self.inner.load()
    }

    fn record(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[Bytes],
        origins: &[Origin],
    ) -> Result<bool, PersistError> {
        self.records.fetch_add(1, Ordering::SeqCst);
        let (open, cv) = &*self.gate;
        let g = open.lock().unwrap();
        let (_g, t) = cv.wait_timeout_while(g, GATE_TIMEOUT, |o| !*o).unwrap();
        if t.timed_out() {
            self.timed_out.store(true, Ordering::SeqCst);
        }
        self.recorded.fetch_add(actions.len(), Ordering::SeqCst);
        self.inner
            .record(history_id, first_seq, actions, origins)
            .map(|_| false)
    }

    fn snapshot(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[Origin],
    ) -> Result<(), PersistError> {
        self.inner.snapshot(history_id, seq, state, origins)
    }
}

/// A slow fsync on one store (its `record` blocked) stops neither another
/// store's dispatches on the same server nor a dispatch on the first store
/// from being committed; dispatches that arrive during the fsync share the
/// next one; nothing is acknowledged before it is recorded. On a
/// single-threaded runtime, as the node's worst case.
#[testkit::test]
async fn a_slow_fsync_stalls_nothing_else_and_dispatches_share_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}", dir.path().join("s.sock").display());
    let gated = Gated::new();
    let slow = Store::authority_with_persistence(
        counter(),
        StoreConfig::default(),
        Box::new(gated.clone()),
    )
    .unwrap();
    let other_name = common::Counter {
        name: "other",
        schema: 1,
    };
    let other = Store::authority(other_name, StoreConfig::default());
    let server = Server::new(server_config());
    server.add(&slow).add(&other);
    let url = server.listen(&url).await.unwrap();

    let r_slow = Store::replica(counter(), StoreConfig::default());
    let _c1 = r_slow.connect(&url, "test1", "12345").await.unwrap();
    let r_other = Store::replica(
        common::Counter {
            name: "other",
            schema: 1,
        },
        StoreConfig::default(),
    );
    let _c2 = r_other.connect(&url, "test1", "12345").await.unwrap();

    // The first dispatch's record blocks (a slow fsync).
    let first = r_slow.try_dispatch(&Act::Add(1)).unwrap();
    until("the journal to start recording", || {
        gated.records.load(Ordering::SeqCst) >= 1
    })
    .await;
    // Meanwhile: 50 more dispatches on the slow store (committed, not
    // acknowledged), one on the authority itself, and one on the other store.
    let more: Vec<_> = (2..=51)
        .map(|i| r_slow.try_dispatch(&Act::Add(i)).unwrap())
        .collect();
    let local = slow.try_dispatch(&Act::Add(100)).unwrap();
    let seq = tokio::time::timeout(T, r_other.dispatch(Act::Add(7)))
        .await
        .expect("the other store answered")
        .unwrap();
    assert_eq!(seq, 1);
    until("the slow store to commit all 52", || {
        slow.state().count == 52
    })
    .await;
    assert!(
        !gated.timed_out.load(Ordering::SeqCst),
        "the other store's dispatch waited for the slow store's fsync"
    );
    // Nothing of the slow store was acknowledged while its fsync waits.
    assert_eq!(slow.seq(), 0, "seq() went past the durable seq");
    assert_eq!(
        r_slow.seq(),
        0,
        "actions were sent before they were durable"
    );
    assert_eq!(gated.records.load(Ordering::SeqCst), 1);

    gated.open();
    assert_eq!(tokio::time::timeout(T, first).await.unwrap().unwrap(), 1);
    for p in more {
        tokio::time::timeout(T, p).await.unwrap().unwrap();
    }
    tokio::time::timeout(T, local).await.unwrap().unwrap();
    tokio::time::timeout(T, r_slow.wait_for(52)).await.unwrap();
    assert_eq!(gated.recorded.load(Ordering::SeqCst), 52);
    // Group commit: the 51 that came during the first fsync shared the next.
    let records = gated.records.load(Ordering::SeqCst);
    assert!(records <= 3, "{records} records (fsyncs) for 52 dispatches");
    assert_eq!(*r_slow.state(), *slow.state());
}

/// A full journal queue pushes back: a dispatch on the authority itself
/// fails at once with `OutboxFull` (`dispatch` waits), and a connection that
/// dispatches is not read until the journal has caught up; everything is
/// then acknowledged.
#[testkit::test]
async fn a_full_journal_queue_pushes_back() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}", dir.path().join("s.sock").display());
    let gated = Gated::new();
    let mut config = StoreConfig::default();
    config.journal_queue = 10;
    let a = Store::authority_with_persistence(counter(), config, Box::new(gated.clone())).unwrap();
    let server = a.serve(&url, server_config()).await.unwrap();
    let url = server.urls()[0].clone();
    let r = Store::replica(counter(), StoreConfig::default());
    let _c = r.connect(&url, "test1", "12345").await.unwrap();
    let first = a.try_dispatch(&Act::Add(1)).unwrap();
    until("the journal to start recording", || {
        gated.records.load(Ordering::SeqCst) >= 1
    })
    .await;
    // The queue counts actions not yet durable: with the one being
    // recorded, 9 more fill it.
    let mut queued = Vec::new();
    for i in 0..9 {
        queued.push(a.try_dispatch(&Act::Add(i)).unwrap());
    }
    match a.try_dispatch(&Act::Add(0)) {
        Err(replimesh_store::DispatchError::OutboxFull { pending, limit }) => {
            assert_eq!((pending, limit), (10, 10));
        }
        other => panic!("expected OutboxFull, got {:?}", other.map(|_| ())),
    }
    // A replica's dispatches are not read while the queue is full.
    let remote: Vec<_> = (0..5)
        .map(|i| r.try_dispatch(&Act::Add(1000 + i)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        a.state().count,
        10,
        "a connection was read past a full journal queue"
    );
    gated.open();
    tokio::time::timeout(T, first).await.unwrap().unwrap();
    for p in queued.into_iter().chain(remote) {
        tokio::time::timeout(T, p).await.unwrap().unwrap();
    }
    tokio::time::timeout(T, a.dispatch(Act::Add(5)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.state().count, 16);
}
