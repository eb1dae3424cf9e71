//! What the store's integration tests share: the reducers, a server config
//! with a cheap login, a bounded polling helper and a few raw-protocol and
//! backup helpers. Each test binary declares `mod common;`.

// Each test binary uses only part of this module.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use proto::frame::Body;
use proto::Frame;
use replimesh_store::{
    BackupPersistence, HashCost, Logins, Persistence, Reducer, ServerConfig, Store,
};
use serde::{Deserialize, Serialize};

/// How long any single wait in a test may take.
pub(crate) const T: Duration = Duration::from_secs(20);

/// Cheap hashes: tests run in debug mode.
pub(crate) const CHEAP: HashCost = HashCost {
    memory_kib: 64,
    iterations: 1,
    parallelism: 1,
};

/// Adds numbers; its state tells the order they were applied in.
pub(crate) struct Counter {
    pub(crate) name: &'static str,
    pub(crate) schema: u32,
}

/// [`Counter`]'s state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub(crate) struct CState {
    pub(crate) total: i64,
    pub(crate) count: u64,
    /// Order-sensitive: equal only if applied in the same order.
    pub(crate) mix: u64,
}

/// [`Counter`]'s action.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Act {
    Add(i64),
}

impl Reducer for Counter {
    type State = CState;
    type Action = Act;
    fn name(&self) -> &str {
        self.name
    }
    fn schema(&self) -> u32 {
        self.schema
    }
    fn initial_state(&self) -> CState {
        CState::default()
    }
    fn reduce(&self, s: &mut CState, a: &Act) {
        let Act::Add(n) = a;
        s.total += n;
        s.count += 1;
        s.mix = s.mix.wrapping_mul(31).wrapping_add(*n as u64);
    }
}

/// The store "counter", schema 1.
pub(crate) fn counter() -> Counter {
    Counter {
        name: "counter",
        schema: 1,
    }
}

/// Counts and sums `u64` actions (order-insensitive).
pub(crate) struct Tally;

/// [`Tally`]'s state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub(crate) struct TState {
    pub(crate) count: u64,
    pub(crate) sum: u64,
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

/// The login `test1` / `12345` (cheap hash).
pub(crate) fn logins() -> Logins {
    let mut l = Logins::new();
    l.add_with_cost("test1", "12345", CHEAP).unwrap();
    l
}

/// A server that knows [`logins`].
pub(crate) fn server_config() -> ServerConfig {
    ServerConfig::with_logins(logins())
}

/// Polls `cond` every 5 ms until it holds; panics naming `what` after [`T`].
pub(crate) async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(T, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

/// A raw transport connection that sent the login hello of `test1` (not yet
/// answered).
pub(crate) async fn raw_login(url: &str) -> (transport::Sender, transport::Receiver) {
    let conn = transport::connect(url, &transport::Config::default())
        .await
        .unwrap();
    let (tx, rx) = conn.split();
    tx.send(&Frame::new(Body::Hello(proto::Hello {
        version: proto::PROTOCOL_VERSION,
        login: "test1".into(),
        password: "12345".into(),
        ..Default::default()
    })))
    .unwrap();
    (tx, rx)
}

/// An encrypted backup at `path`, journal fsynced on every action.
pub(crate) fn backup_config(path: &Path) -> backup::BackupConfig {
    backup::BackupConfig::new(path)
        .journal(backup::FsyncPolicy::Always)
        .kdf(backup::KdfParams::insecure_fast())
        .key("password-for-encrypter")
}

/// The persistence of the [`counter`] store in the backup `config`. A test
/// that "restarts" an authority in the same process may find the backup
/// still locked by the old one while its tasks wind down: it waits for the
/// lock (bounded by [`T`]).
pub(crate) async fn open(config: &backup::BackupConfig) -> Box<dyn Persistence> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match BackupPersistence::open(config.clone(), "counter", counter().schema()) {
            Ok(p) => return Box::new(p),
            Err(e)
                if e.0.contains("in use by another") && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("opening the backup: {e}"),
        }
    }
}

/// Waits (bounded by [`T`]) until the snapshot file at `path` holds `seq`;
/// returns the last seq seen in it (0: none readable).
pub(crate) async fn snapshot_reaches(path: &Path, seq: u64) -> u64 {
    let mut last = 0;
    let _ = tokio::time::timeout(T, async {
        loop {
            if let Ok(s) = backup::snapshot::read_snapshot(path, None) {
                last = s.seq;
                if last >= seq {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    last
}

/// Waits (bounded by [`T`]) until each of `stores` has applied everything
/// `authority` has committed.
pub(crate) async fn settle<R: Reducer>(stores: &[&Store<R>], authority: &Store<R>) {
    let target = authority.seq();
    for s in stores {
        tokio::time::timeout(T, s.wait_for(target))
            .await
            .expect("replica caught up");
    }
}
