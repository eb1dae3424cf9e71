//! The journal of a persistent authority: a dedicated thread per store that
//! writes committed actions and snapshots to its [`Persistence`] outside the
//! store's lock, with group commit.
//!
//! Commits happen under the store's lock, on whatever thread dispatched
//! them; each commit only queues its actions here ([`JournalJob::Record`]).
//! The thread takes everything queued at once and hands it to
//! [`Persistence::record`] in one call (one journal record and one fsync
//! under `always`), so the dispatches that arrive during one fsync share the
//! next. Only then does it tell the store that these actions are durable:
//! the store sends nothing after its durable seq (no `Committed`, no
//! `Actions`, no snapshot), and a dispatch on the authority itself resolves
//! only then.
//!
//! The queue is bounded in actions ([`crate::StoreConfig::journal_queue`]):
//! past it, the connections that dispatch are not read until the thread has
//! caught up, and [`crate::Store::try_dispatch`] on the authority fails with
//! [`crate::DispatchError::OutboxFull`] ([`crate::Store::dispatch`] waits).

use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{oneshot, Notify};

use crate::core::Origin;
use crate::persist::PersistError;

/// A job for the journal thread.
pub(crate) enum JournalJob {
    /// Committed actions `first_seq, ...` with their origins.
    Record {
        history_id: u64,
        first_seq: u64,
        actions: Vec<Bytes>,
        origins: Vec<Origin>,
    },
    /// A snapshot taken under the store's lock (the backlog no longer held
    /// every action since the last record).
    Snapshot {
        history_id: u64,
        seq: u64,
        state: Bytes,
        origins: Vec<Origin>,
    },
    /// The final state ([`crate::Store::shutdown`], or the last handle
    /// dropped); the thread ends after it. `done` is answered once the
    /// persistence is dropped (a backup's lock released).
    Shutdown {
        history_id: u64,
        seq: u64,
        state: Bytes,
        origins: Vec<Origin>,
        done: oneshot::Sender<Result<(), PersistError>>,
    },
}

/// The count of queued actions and its bound, shared by the store and its
/// journal thread.
#[derive(Debug)]
pub(crate) struct JournalQueue {
    queued: AtomicUsize,
    limit: usize,
    /// Woken when the thread took actions off the queue.
    room: Notify,
}

impl JournalQueue {
    pub(crate) fn new(limit: usize) -> Self {
        JournalQueue {
            queued: AtomicUsize::new(0),
            limit: limit.max(1),
            room: Notify::new(),
        }
    }

    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn is_full(&self) -> bool {
        self.queued() >= self.limit
    }

    pub(crate) fn add(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::AcqRel);
    }

    pub(crate) fn taken(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::AcqRel);
        }
        self.room.notify_waiters();
    }

    /// Waits until the queue is below its bound (or `stop` is cancelled).
    pub(crate) async fn wait_room(&self, stop: &tokio_util::sync::CancellationToken) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.is_full() || stop.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = notified => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}
