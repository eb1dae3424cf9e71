//! The [`Backup`] handle: restore at start-up, journal on each commit, snapshots off the hot path.
//!
//! One file a concern: `config` the [`BackupConfig`] and its policies, `open` restoring the
//! snapshot and the journal and starting the background threads, `journal_writer` writing and
//! fsyncing journal segments, `snapshots` handing snapshots to the background writer. This
//! file holds the handle, the state its threads share, and the calls of a store.

mod config;
mod journal_writer;
mod open;
mod snapshots;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::journal::{SegmentEncoder, MAX_ACTION_LEN};
use crate::key::Key;
use crate::snapshot::Snapshot;
use crate::Error;

pub use config::{BackupConfig, FsyncPolicy, OnBadFile};
pub use open::Restored;

/// Whether a snapshot is due after a [`Backup::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Due {
    /// No snapshot needed yet.
    No,
    /// The `count` policy fired: hand a snapshot to [`Backup::snapshot`].
    Snapshot,
}

/// The operations a store needs from its backup, as a trait so a store can be tested with a
/// fake. [`Backup`] implements it.
pub trait Persistence: Send + Sync {
    /// See [`Backup::record`].
    fn record(&self, seq: u64, action: &[u8]) -> Result<Due, Error>;
    /// See [`Backup::snapshot`].
    fn snapshot(&self, snapshot: Snapshot) -> Result<(), Error>;
    /// See [`Backup::deadline`].
    fn deadline(&self) -> Option<Instant>;
    /// See [`Backup::shutdown`].
    fn shutdown(&self, last: Option<Snapshot>) -> Result<(), Error>;
}

/// A running backup: see the [crate docs](crate) for the life cycle and an example.
///
/// All methods take `&self`; the handle is `Send + Sync` (wrap it in an `Arc` to share it).
/// Dropping it without [`shutdown`](Self::shutdown) flushes the journal and waits for queued
/// snapshot writes, but writes no final snapshot.
pub struct Backup {
    shared: Arc<Shared>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Backup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backup")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

struct Shared {
    path: PathBuf,
    dir: PathBuf,
    policy: Option<FsyncPolicy>,
    count: Option<u64>,
    timeout: Option<Duration>,
    chunk_size: usize,
    write_key: Option<Arc<Key>>,
    /// The journal's writing side: segment, encoder, file (lock order: `w` before `j`).
    w: Mutex<WState>,
    j: Mutex<JState>,
    /// Set when a background fsync or write failed: the journal can no longer be trusted.
    failed: Mutex<Option<String>>,
    stop: Mutex<bool>,
    stop_cv: Condvar,
    /// The backup's lock file (its `flock` is held while it is open).
    _lock: std::fs::File,
}

struct WState {
    /// The segment being appended to.
    seg: Option<OpenSegment>,
    /// Plaintext batch taken from `JState::batch` (swapped, to keep both allocations).
    batch: Vec<u8>,
    /// Encoded record bytes.
    out: Vec<u8>,
    /// The current segment has bytes written but not fsynced.
    unsynced: bool,
    /// Segments closed at a switch that must still be fsynced.
    to_sync: Vec<File>,
    /// A segment was created and the directory not fsynced since.
    dir_dirty: bool,
}

struct JState {
    started: bool,
    closed: bool,
    history_id: u64,
    last_seq: u64,
    /// Seq of the last snapshot handed over (or loaded).
    snap_seq: u64,
    /// Actions recorded but not yet written (policies other than `Always`), as
    /// `journal::push_entry` plaintext.
    batch: Vec<u8>,
    since_snapshot: u64,
    first_change: Option<Instant>,
}

struct OpenSegment {
    enc: SegmentEncoder,
    file: File,
}

enum Job {
    Snapshot(
        Box<dyn FnOnce() -> Snapshot + Send>,
        u64,
        Option<mpsc::Sender<Result<(), Error>>>,
    ),
}

/// Buffered journal bytes that make `record` write inline (without fsync).
const FLUSH_THRESHOLD: usize = 256 * 1024;
/// Write-out interval of [`FsyncPolicy::Never`].
const NEVER_INTERVAL: Duration = Duration::from_millis(50);

impl Backup {
    /// Records the committed action `seq` (call it for every commit, in seq order, before
    /// acknowledging the commit). With [`FsyncPolicy::Always`] the action is sealed in its own
    /// journal record, written and fsynced before this returns; with the other policies it is
    /// appended to an in-memory batch (a copy, no encryption: cheap) that the background thread
    /// writes.
    ///
    /// Returns [`Due::Snapshot`] when the `count` policy wants a snapshot.
    ///
    /// This call blocks for an fsync under [`FsyncPolicy::Always`]: from async code run it
    /// where blocking is allowed (e.g. `tokio::task::block_in_place`).
    pub fn record(&self, seq: u64, action: &[u8]) -> Result<Due, Error> {
        let sh = &*self.shared;
        sh.check_failed()?;
        if action.len() > MAX_ACTION_LEN {
            return Err(Error::ActionTooLarge { len: action.len() });
        }
        if sh.policy == Some(FsyncPolicy::Always) {
            // Actions appended before (`append`) go first.
            if !lock(&sh.j).batch.is_empty() {
                sh.flush_journal(false)?;
            }
            // Encode, write and fsync under `w`: records reach the file in seq order.
            let mut w = lock(&sh.w);
            let due = sh.account(seq, None, action)?;
            let w = &mut *w;
            let seg = w.seg.as_mut().ok_or(Error::NotStarted)?;
            w.out.clear();
            seg.enc.encode(seq, action, &mut w.out)?;
            let mut file = &seg.file;
            file.write_all(&w.out)
                .and_then(|()| seg.file.sync_data())
                .map_err(|e| sh.fail(Error::io(&sh.path, e)))?;
            return Ok(due);
        }
        let mut inline_flush = false;
        let due = sh.account(seq, Some(&mut inline_flush), action)?;
        if inline_flush {
            sh.flush_journal(false)?;
        }
        Ok(due)
    }

    /// Records the committed action `seq` without waiting for the disk (group commit): the
    /// action is appended to an in-memory batch, as under the policies other than `Always`.
    /// Under [`FsyncPolicy::Always`] the batch is written as one record and fsynced by the next
    /// [`commit`](Self::commit) (call it once for a group of appended actions, before
    /// acknowledging any of them); under the other policies the background thread writes it as
    /// for [`record`](Self::record). Seqs must increase, as for [`record`](Self::record).
    ///
    /// Returns [`Due::Snapshot`] when the `count` policy wants a snapshot.
    pub fn append(&self, seq: u64, action: &[u8]) -> Result<Due, Error> {
        let sh = &*self.shared;
        sh.check_failed()?;
        if action.len() > MAX_ACTION_LEN {
            return Err(Error::ActionTooLarge { len: action.len() });
        }
        let mut inline_flush = false;
        let due = sh.account(seq, Some(&mut inline_flush), action)?;
        if inline_flush {
            sh.flush_journal(false)?;
        }
        Ok(due)
    }

    /// Makes the actions given to [`append`](Self::append) since the last call as durable as
    /// the fsync policy promises: under [`FsyncPolicy::Always`] they are sealed into one
    /// journal record, written and fsynced (one fsync for the whole group) before this
    /// returns; under the other policies this returns at once (the background thread writes
    /// them on its schedule). Blocks for the fsync: call it where blocking is allowed.
    pub fn commit(&self) -> Result<(), Error> {
        let sh = &*self.shared;
        sh.check_failed()?;
        if sh.policy == Some(FsyncPolicy::Always) {
            sh.flush_journal(true)?;
        }
        Ok(())
    }

    /// Hands a snapshot to the background writer and returns at once. `snapshot.seq` is the
    /// seq of the last action included in the state: usually the last recorded one, but it may
    /// lag behind (a state captured a few actions ago), never behind an earlier snapshot. The
    /// journal switches to a new segment; segments whose actions the snapshot covers are
    /// deleted once it is durable. If several snapshots queue up, only the newest is written.
    ///
    /// Written before this returns: the first snapshot after a fresh start (when
    /// [`open`](Self::open) returned `None`), so that the journal always has a base; and, under
    /// [`FsyncPolicy::Always`], a snapshot ahead of the recorded actions (it holds actions the
    /// journal does not).
    pub fn snapshot(&self, snapshot: Snapshot) -> Result<(), Error> {
        let seq = snapshot.seq;
        let history_id = snapshot.history_id;
        self.submit(seq, Some(history_id), Box::new(move || snapshot), false)
    }

    /// Like [`snapshot`](Self::snapshot), but the state is produced by `make` on the background
    /// thread (e.g. serializing an immutable `Arc` of the state), so even serialization stays
    /// off the caller's path. `make` must return a snapshot with seq `seq`.
    pub fn snapshot_with(
        &self,
        seq: u64,
        make: impl FnOnce() -> Snapshot + Send + 'static,
    ) -> Result<(), Error> {
        self.submit(seq, None, Box::new(make), false)
    }

    /// Like [`snapshot`](Self::snapshot) but waits until the snapshot file is durable.
    pub fn snapshot_now(&self, snapshot: Snapshot) -> Result<(), Error> {
        let seq = snapshot.seq;
        let history_id = snapshot.history_id;
        self.submit(seq, Some(history_id), Box::new(move || snapshot), true)
    }

    /// Whether a snapshot is due now (by `count`, or because `timeout` has passed since the
    /// first action not in a snapshot).
    pub fn is_due(&self) -> bool {
        let j = lock(&self.shared.j);
        self.shared.count.is_some_and(|c| j.since_snapshot >= c)
            || self
                .deadline_locked(&j)
                .is_some_and(|d| d <= Instant::now())
    }

    /// When the `timeout` policy wants a snapshot (`None`: no change pending or no timeout).
    /// A store's event loop sleeps until this instant, then calls [`snapshot`](Self::snapshot).
    pub fn deadline(&self) -> Option<Instant> {
        let j = lock(&self.shared.j);
        self.deadline_locked(&j)
    }

    /// The seq of the last recorded action (or of the last snapshot).
    pub fn last_seq(&self) -> u64 {
        lock(&self.shared.j).last_seq
    }

    /// Writes and fsyncs the buffered journal records now.
    pub fn flush(&self) -> Result<(), Error> {
        self.shared.check_failed()?;
        self.shared.flush_journal(true)
    }

    /// Stops the backup: writes `last` as the final snapshot (if given, and waits for it),
    /// flushes and fsyncs the journal, and stops the background threads. Further calls return
    /// [`Error::Closed`].
    pub fn shutdown(&self, last: Option<Snapshot>) -> Result<(), Error> {
        if lock(&self.shared.j).closed {
            return Err(Error::Closed);
        }
        let mut result = match last {
            Some(s) => self.snapshot_now(s),
            None => Ok(()),
        };
        if let Err(e) = self.shared.flush_journal(true) {
            result = result.and(Err(e));
        }
        lock(&self.shared.j).closed = true;
        self.stop_threads();
        result
    }

    fn deadline_locked(&self, j: &JState) -> Option<Instant> {
        let t = self.shared.timeout?;
        j.first_change.map(|f| f + t)
    }

    fn stop_threads(&self) {
        *lock(&self.shared.stop) = true;
        self.shared.stop_cv.notify_all();
        lock(&self.jobs).take();
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Backup {
    fn drop(&mut self) {
        if let Err(e) = self.shared.flush_journal(true) {
            tracing::error!(error = %e, "flushing the journal on drop failed");
        }
        self.stop_threads();
    }
}

impl Persistence for Backup {
    fn record(&self, seq: u64, action: &[u8]) -> Result<Due, Error> {
        Backup::record(self, seq, action)
    }
    fn snapshot(&self, snapshot: Snapshot) -> Result<(), Error> {
        Backup::snapshot(self, snapshot)
    }
    fn deadline(&self) -> Option<Instant> {
        Backup::deadline(self)
    }
    fn shutdown(&self, last: Option<Snapshot>) -> Result<(), Error> {
        Backup::shutdown(self, last)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
