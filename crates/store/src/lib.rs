//! Replimesh store: redux-style state replicated from one authority.
//!
//! A store holds a state that only changes through actions, applied by a
//! deterministic [`Reducer`]. One store is the **authority**: it orders every
//! action into a history (a random history id and a `u64` sequence number
//! per action). **Replicas** apply the same history in the same order, catch
//! up after disconnections from a bounded backlog or from a snapshot plus the
//! actions after it, and send their own dispatches to the authority, which
//! applies each exactly once (duplicates are dropped by client id and op id).
//! This replaces the JavaScript library redux-cluster, without its double
//! applies, its divergence under load and its lost dispatches.
//!
//! - [`Store::authority`] / [`Store::replica`]: the handle, with
//!   [`Store::dispatch`] (resolves to the committed sequence number),
//!   [`Store::state`], [`Store::subscribe`], [`Store::connected`] and
//!   [`Store::role`].
//! - [`Store::serve`] / [`Server`]: serve stores over `tcp://`, `tls://`,
//!   `unix://`, `ws://` and `wss://`, with [`Logins`] (Argon2id hashes) and
//!   bans after repeated failures; several stores per server, picked by name.
//!   A replica can serve too: it relays the history to its own replicas and
//!   forwards their dispatches.
//! - [`Gate`] / [`accept_each`]: the server's door (accepting, the `Hello`
//!   within a timeout, logins and bans), for a process that accepts
//!   connections itself and hands their store frames to [`Server::adopt`].
//! - [`Store::connect`] / [`Store::connect_any`] / [`Client`]: a replica's
//!   link to one or several servers, reconnecting by itself (round-robin,
//!   jittered backoff).
//! - [`Server::spawn_worker`] / [`Store::connect_worker`]: redux-cluster's
//!   master/worker scheme over an inherited socket.
//! - [`core`]: the sans-IO state machines under all of it.
//! - [`Persistence`]: where an authority keeps its history (backups).
//!
//! Sync modes ([`SyncMode`]): `Action` (actions plus a snapshot every
//! `resync` actions, default 1000), `Snapshot` (the state after each change)
//! and `Digest` (actions plus a state digest every `resync` actions; a
//! snapshot only on mismatch). Rust peers exchange payloads in a compact
//! binary encoding (`postcard`); browsers may ask for JSON ([`Encoding`]).
//! See `docs/store.md` for the protocol and its guarantees.
//!
//! # Example
//!
//! A counter, as in redux-cluster, with an authority served over a Unix socket and
//! a replica connected to it:
//!
//! ```
//! use replimesh_store::{Logins, Reducer, ServerConfig, Store, StoreConfig};
//! use serde::{Deserialize, Serialize};
//!
//! struct Counter;
//!
//! #[derive(Serialize, Deserialize)]
//! enum Action {
//!     Add(i64),
//!     Reset,
//! }
//!
//! impl Reducer for Counter {
//!     type State = i64;
//!     type Action = Action;
//!     fn name(&self) -> &str {
//!         "counter"
//!     }
//!     fn initial_state(&self) -> i64 {
//!         0
//!     }
//!     fn reduce(&self, state: &mut i64, action: &Action) {
//!         match action {
//!             Action::Add(n) => *state += n,
//!             Action::Reset => *state = 0,
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let url = format!("unix://{}/store.sock", dir.path().display());
//! let authority = Store::authority(Counter, StoreConfig::default());
//! let mut logins = Logins::new();
//! logins.add("test1", "12345")?;
//! let _server = authority.serve(&url, ServerConfig::with_logins(logins)).await?;
//!
//! let replica = Store::replica(Counter, StoreConfig::default());
//! let _client = replica.connect(&url, "test1", "12345").await?;
//!
//! let seq = replica.dispatch(Action::Add(5)).await?; // committed and applied here
//! assert_eq!(*replica.state(), 5);
//! authority.dispatch(Action::Add(2)).await?;
//! replica.wait_for(seq + 1).await;
//! assert_eq!(*replica.state(), 7);
//! assert!(replica.connected());
//! # Ok(())
//! # }
//! ```

mod auth;
mod client;
// The sans-IO core: public only for the simulation tests; hidden, not
// part of the API and not covered by semver.
#[doc(hidden)]
pub mod core;
mod error;
mod gate;
mod journal;
mod link;
mod persist;
pub mod raft;
mod reducer;
mod server;
mod store;
mod worker;

pub use crate::core::{store_of, SyncMode};
pub use auth::{argon2_runs, hash_password, Busy, CheckPool, HashCost, LoginError, Logins};
pub use client::{Client, ClientConfig, ConnectError};
pub use error::{DispatchError, ErrorCode, RemoteError};
pub use gate::{accept_each, Gate, Refusal, DEFAULT_LOGINS_PER_ADDRESS};
pub use persist::{
    BackupPersistence, MemoryPersistence, Origin, PersistError, Persistence, Recovered,
};
pub use raft::{
    MemoryNetwork, NetworkFaults, RaftConfig, RaftEndpoint, RaftError, RaftRole, RaftStatus,
    VoterNetError, VoterNetwork,
};
pub use reducer::{Encoding, PayloadError, Reducer, Rejection};
pub use server::{ServeError, Server, ServerConfig, WORKER_ENV};
pub use store::{Pending, Role, StateRef, Store, StoreConfig, StoreStats, Subscription};
