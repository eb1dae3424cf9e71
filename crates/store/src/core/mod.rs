//! The sans-IO core: plain state machines that take events and return frames.
//!
//! [`Authority`] orders actions into a history; [`Replica`] applies that
//! history and sends dispatches (and, as a relay, serves its own replicas).
//! Neither does IO nor reads a clock, so whole clusters can be simulated
//! deterministically (see the crate's `tests/sim.rs`).

mod authority;
mod dedup;
mod log;
mod replica;

pub use authority::{store_of, Authority, AuthorityConfig, Recovered};
pub use log::{FollowerId, LogConfig, SyncMode};
pub use replica::{Replica, ReplicaConfig, ReplicaEvent};
