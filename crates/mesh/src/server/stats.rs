//! The server's counters ([`ServerStats`]).

use std::sync::atomic::{AtomicU64, Ordering};

use super::Server;

/// Counters of a running clone, since it started (see [`Server::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Group messages published on this clone (by its clients or the server).
    pub published: u64,
    /// Group messages queued to this clone's subscribers.
    pub delivered: u64,
    /// Group messages for this clone's subscribers that could not be queued
    /// (the connection was full or closing).
    pub dropped: u64,
    /// Client connections cut as slow consumers while delivering.
    pub slow_consumer_disconnects: u64,
    /// Frames received on clone links.
    pub clone_frames_in: u64,
    /// Frames queued on clone links.
    pub clone_frames_out: u64,
    /// Commands from connections waiting for the core task now (at most
    /// [`ServerConfig::command_queue`](crate::ServerConfig::command_queue)).
    pub queued_commands: u64,
    /// Frames of unknown kinds received from clients and clones (ignored;
    /// see [`ServerConfig::max_unknown_frames`](crate::ServerConfig::max_unknown_frames)).
    pub unknown_frames: u64,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) published: AtomicU64,
    pub(super) delivered: AtomicU64,
    pub(super) dropped: AtomicU64,
    pub(super) slow_consumers: AtomicU64,
    pub(super) clone_frames_in: AtomicU64,
    pub(super) clone_frames_out: AtomicU64,
    pub(super) unknown_frames: AtomicU64,
}

pub(super) fn count(c: &AtomicU64, n: usize) {
    if n > 0 {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Server {
    /// The clone's counters (cheap: atomic loads; for metrics).
    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStats {
            published: get(&c.published),
            delivered: get(&c.delivered),
            dropped: get(&c.dropped),
            slow_consumer_disconnects: get(&c.slow_consumers),
            clone_frames_in: get(&c.clone_frames_in),
            clone_frames_out: get(&c.clone_frames_out),
            queued_commands: (self.shared.cmd.max_capacity() - self.shared.cmd.capacity()) as u64,
            unknown_frames: get(&c.unknown_frames),
        }
    }
}
