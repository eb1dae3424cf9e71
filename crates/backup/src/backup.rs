//! The [`Backup`] handle: restore at start-up, journal on each commit, snapshots off the hot path.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::fsutil;
use crate::journal::{
    list_segments, push_entry, read_segment, segment_path, JournalEntry, SegmentEncoder,
    MAX_ACTION_LEN,
};
use crate::key::{KdfParams, Key, KeyRing};
use crate::snapshot::{read_snapshot, write_snapshot, Snapshot, DEFAULT_CHUNK_SIZE};
use crate::Error;

/// When journal records reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// [`Backup::record`] returns after the record is written and fsynced: no committed action
    /// is ever lost, at the price of one fsync per action.
    Always,
    /// Actions are buffered; a background thread seals them into one record, writes and fsyncs
    /// it at this interval: a crash of the machine loses at most the last interval's actions,
    /// a SIGKILL of the process alone loses only what was still buffered.
    Every(Duration),
    /// Actions are buffered and written (not fsynced) every 50 ms or 256 KiB; the operating
    /// system decides when they reach the disk (the journal is fsynced only at
    /// [`Backup::flush`], shutdown and drop).
    Never,
}

/// What to do when the snapshot file or a journal segment is corrupted at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBadFile {
    /// Fail [`Backup::open`] with the error (default). Nothing is modified.
    #[default]
    Fail,
    /// Rename the bad file to `<name>.bad-<unix seconds>`, log it at `error` level, and go on
    /// without it (with no snapshot: start empty).
    MoveAside,
}

/// Configuration of a [`Backup`]: redux-cluster's `path`, `key`, `count` and `timeout`, plus the
/// journal and the handling of bad files.
#[derive(Clone)]
#[non_exhaustive]
pub struct BackupConfig {
    /// The snapshot file. Journal segments and temporary files live next to it.
    pub path: PathBuf,
    /// Passphrase to encrypt with (AES-256-GCM, Argon2id key). `None`: checksummed only.
    pub key: Option<String>,
    /// Take a snapshot every `count` recorded actions.
    pub count: Option<u64>,
    /// Take a snapshot this long after the first action not yet in a snapshot.
    pub timeout: Option<Duration>,
    /// Journal committed actions between snapshots with this fsync policy (`None`: no journal,
    /// a crash loses the actions since the last snapshot).
    pub journal: Option<FsyncPolicy>,
    /// Argon2id parameters for new keys.
    pub kdf: KdfParams,
    /// Handling of corrupted files at start-up.
    pub on_bad_file: OnBadFile,
    /// Plaintext bytes per authenticated chunk of a snapshot file.
    pub chunk_size: usize,
}

impl std::fmt::Debug for BackupConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupConfig")
            .field("path", &self.path)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("count", &self.count)
            .field("timeout", &self.timeout)
            .field("journal", &self.journal)
            .field("kdf", &self.kdf)
            .field("on_bad_file", &self.on_bad_file)
            .field("chunk_size", &self.chunk_size)
            .finish()
    }
}

impl BackupConfig {
    /// A configuration for the snapshot file `path`: no key, no journal, snapshots only at
    /// shutdown until [`count`](Self::count) or [`timeout`](Self::timeout) is set.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            key: None,
            count: None,
            timeout: None,
            journal: None,
            kdf: KdfParams::default(),
            on_bad_file: OnBadFile::Fail,
            chunk_size: DEFAULT_CHUNK_SIZE,
        }
    }

    /// Encrypts with a key derived from `passphrase`.
    pub fn key(mut self, passphrase: impl Into<String>) -> Self {
        self.key = Some(passphrase.into());
        self
    }

    /// Snapshot every `count` actions (at least 1).
    pub fn count(mut self, count: u64) -> Self {
        self.count = Some(count.max(1));
        self
    }

    /// Snapshot `timeout` after a change.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Journals committed actions with this fsync policy.
    pub fn journal(mut self, policy: FsyncPolicy) -> Self {
        self.journal = Some(policy);
        self
    }

    /// Argon2id parameters for new keys.
    pub fn kdf(mut self, params: KdfParams) -> Self {
        self.kdf = params;
        self
    }

    /// Handling of corrupted files at start-up.
    pub fn on_bad_file(mut self, on_bad_file: OnBadFile) -> Self {
        self.on_bad_file = on_bad_file;
        self
    }
}

/// What [`Backup::open`] found on disk: the last snapshot and the journaled actions after it,
/// to be applied in order.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The last complete snapshot.
    pub snapshot: Snapshot,
    /// Actions committed after the snapshot, in seq order.
    pub journal: Vec<JournalEntry>,
}

impl Restored {
    /// The seq of the last restored action (the snapshot's seq without journal).
    pub fn last_seq(&self) -> u64 {
        self.journal.last().map_or(self.snapshot.seq, |e| e.seq)
    }
}

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
    /// Opens the backup at `config.path`: derives the key (once), loads and verifies the
    /// snapshot and the journal after it, and starts the background threads.
    ///
    /// Returns `None` when there is no snapshot file (first start): the store then starts empty
    /// and must hand its initial snapshot to [`snapshot`](Self::snapshot) (or
    /// [`snapshot_now`](Self::snapshot_now)) before the first [`record`](Self::record).
    ///
    /// Takes an exclusive lock on the backup (`<path>.lock`, an advisory `flock` holding this
    /// process's pid) for as long as the handle and its threads live: a second opener of the
    /// same path, in this process or another, fails with [`Error::Locked`].
    ///
    /// Errors: [`Error::Locked`], [`Error::WrongKey`], [`Error::KeyRequired`], [`Error::NotEncrypted`],
    /// [`Error::NewerFormat`] always fail; [`Error::Corrupted`] fails unless
    /// [`OnBadFile::MoveAside`] is configured.
    pub fn open(config: BackupConfig) -> Result<(Backup, Option<Restored>), Error> {
        let path = config.path.clone();
        let dir = fsutil::parent_dir(&path);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // One process per backup path: taken before anything is read or removed.
        let lock_file = match fsutil::lock_backup(&path) {
            Ok(Ok(f)) => f,
            Ok(Err(pid)) => return Err(Error::Locked { path, pid }),
            Err(e) => return Err(Error::io(&fsutil::lock_path(&path), e)),
        };
        fsutil::remove_stale_temps(&path).map_err(|e| Error::io(&dir, e))?;
        let keys = config.key.as_ref().map(|k| KeyRing::new(k, config.kdf));

        let snapshot = match read_snapshot(&path, keys.as_ref()) {
            Ok(s) => Some(s),
            Err(Error::NotFound { .. }) => None,
            Err(e @ Error::Corrupted { .. }) if config.on_bad_file == OnBadFile::MoveAside => {
                let to = fsutil::move_aside(&path, "bad").map_err(|e| Error::io(&path, e))?;
                tracing::error!(error = %e, moved_to = %to.display(), "backup snapshot is corrupted: moved aside, starting empty");
                None
            }
            Err(e) => return Err(e),
        };

        let segments = list_segments(&path)?;
        let mut journal = Vec::new();
        let mut history_id = 0;
        match &snapshot {
            None => {
                // Without a snapshot no segment can be replayed (the first snapshot is always
                // written before any journal record).
                for (_, seg) in &segments {
                    if config.on_bad_file == OnBadFile::Fail {
                        return Err(Error::OrphanJournal { path: seg.clone() });
                    }
                    let to = fsutil::move_aside(seg, "orphan").map_err(|e| Error::io(seg, e))?;
                    tracing::error!(moved_to = %to.display(), "journal segment without snapshot moved aside");
                }
            }
            Some(s) => {
                history_id = s.history_id;
                let mut cur = s.seq;
                let mut broken = false;
                for (base, seg) in &segments {
                    // Segments are read in base order; the actions the snapshot (or an earlier
                    // segment) already holds are skipped below. A segment starting after `cur`
                    // follows a gap.
                    if broken || *base > cur {
                        broken = true;
                        let to =
                            fsutil::move_aside(seg, "orphan").map_err(|e| Error::io(seg, e))?;
                        tracing::warn!(moved_to = %to.display(), last_seq = cur, "journal segment after a gap (actions lost before a crash under a non-`always` fsync policy) moved aside");
                        continue;
                    }
                    let contents = match read_segment(seg, keys.as_ref()) {
                        Ok(c) => c,
                        Err(e @ Error::Corrupted { .. })
                            if config.on_bad_file == OnBadFile::MoveAside =>
                        {
                            let to =
                                fsutil::move_aside(seg, "bad").map_err(|e| Error::io(seg, e))?;
                            tracing::error!(error = %e, moved_to = %to.display(), "journal segment is corrupted: moved aside");
                            broken = true;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if contents.history_id != s.history_id {
                        let to =
                            fsutil::move_aside(seg, "orphan").map_err(|e| Error::io(seg, e))?;
                        tracing::warn!(moved_to = %to.display(), "journal segment of another history moved aside");
                        continue;
                    }
                    if let Some(at) = contents.torn_at {
                        tracing::info!(segment = %seg.display(), offset = at, "dropped a torn journal record at the end of a segment");
                    }
                    for e in contents.entries {
                        if e.seq > cur {
                            cur = e.seq;
                            journal.push(e);
                        }
                    }
                }
            }
        }

        let write_key = match &keys {
            Some(k) => Some(k.write_key()?),
            None => None,
        };
        let last_seq = snapshot.as_ref().map_or(0, |s| s.seq);
        let last_seq = journal.last().map_or(last_seq, |e| e.seq);
        let shared = Arc::new(Shared {
            path: path.clone(),
            dir,
            policy: config.journal,
            count: config.count,
            timeout: config.timeout,
            chunk_size: config.chunk_size,
            write_key,
            w: Mutex::new(WState {
                seg: None,
                batch: Vec::new(),
                out: Vec::new(),
                unsynced: false,
                to_sync: Vec::new(),
                dir_dirty: false,
            }),
            j: Mutex::new(JState {
                started: snapshot.is_some(),
                closed: false,
                history_id,
                last_seq,
                snap_seq: snapshot.as_ref().map_or(0, |s| s.seq),
                batch: Vec::new(),
                since_snapshot: journal.len() as u64,
                first_change: (!journal.is_empty()).then(Instant::now),
            }),
            failed: Mutex::new(None),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
            _lock: lock_file,
        });
        if snapshot.is_some() {
            // Never append to an old segment (its torn tail would reuse nonces): start a new one.
            let mut w = lock(&shared.w);
            let mut j = lock(&shared.j);
            shared.switch_segment(&mut w, &mut j, last_seq)?;
        }

        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::new();
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("backup-snapshot".into())
                .spawn(move || snapshot_worker(&sh, &rx))
                .map_err(|e| Error::io(&path, e))?,
        );
        if let Some(interval) = match config.journal {
            Some(FsyncPolicy::Every(d)) => Some(d.max(Duration::from_millis(1))),
            Some(FsyncPolicy::Never) => Some(NEVER_INTERVAL),
            _ => None,
        } {
            let sh = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("backup-journal".into())
                    .spawn(move || flusher(&sh, interval))
                    .map_err(|e| Error::io(&path, e))?,
            );
        }
        let restored = snapshot.map(|snapshot| Restored { snapshot, journal });
        Ok((
            Backup {
                shared,
                jobs: Mutex::new(Some(tx)),
                threads: Mutex::new(threads),
            },
            restored,
        ))
    }

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

    fn submit(
        &self,
        seq: u64,
        history_id: Option<u64>,
        make: Box<dyn FnOnce() -> Snapshot + Send>,
        wait: bool,
    ) -> Result<(), Error> {
        let sh = &*self.shared;
        sh.check_failed()?;
        let mut make = Some(make);
        let mut wait = wait;
        let mut old_history_segments = Vec::new();
        let first = {
            let mut w = lock(&sh.w);
            let mut j = lock(&sh.j);
            if j.closed {
                return Err(Error::Closed);
            }
            if j.started && history_id.is_some_and(|h| h != j.history_id) {
                // A new history starts over: its snapshot replaces everything (written before
                // this returns; the old history's segments are deleted after it).
                wait = true;
                j.last_seq = seq;
                j.snap_seq = seq;
                old_history_segments = list_segments(&sh.path)?
                    .into_iter()
                    .filter(|(base, _)| *base != seq)
                    .collect();
            }
            if seq < j.snap_seq {
                return Err(Error::SeqOutOfOrder {
                    last: j.snap_seq,
                    got: seq,
                });
            }
            if !j.started {
                // First snapshot: write it synchronously, then start the journal.
                drop(j);
                let snap = make.take().ok_or(Error::Closed)?();
                write_snapshot(&sh.path, &snap, sh.write_key.as_deref(), sh.chunk_size)?;
                let mut j = lock(&sh.j);
                j.history_id = snap.history_id;
                j.last_seq = snap.seq;
                j.snap_seq = snap.seq;
                j.started = true;
                j.since_snapshot = 0;
                j.first_change = None;
                sh.switch_segment(&mut w, &mut j, snap.seq)?;
                true
            } else {
                if let Some(h) = history_id {
                    j.history_id = h;
                }
                if seq > j.last_seq && sh.policy == Some(FsyncPolicy::Always) {
                    // The snapshot holds actions the journal does not: make it durable now.
                    wait = true;
                }
                // The new segment starts after the last recorded action; the old one (up to
                // that action) stays until a snapshot covers all of it.
                let base = seq.max(j.last_seq);
                j.last_seq = base;
                j.snap_seq = seq;
                j.since_snapshot = 0;
                j.first_change = None;
                sh.switch_segment(&mut w, &mut j, base)?;
                false
            }
        };
        let make = match make {
            Some(m) if !first => m,
            _ => return Ok(()),
        };
        let (tx, rx) = if wait {
            let (tx, rx) = mpsc::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        {
            let jobs = lock(&self.jobs);
            let sender = jobs.as_ref().ok_or(Error::Closed)?;
            sender
                .send(Job::Snapshot(make, seq, tx))
                .map_err(|_| Error::Closed)?;
        }
        match rx {
            Some(rx) => rx.recv().map_err(|_| Error::Closed)??,
            None => return Ok(()),
        }
        for (_, p) in old_history_segments {
            fsutil::remove_if_exists(&p).map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
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

impl Shared {
    fn check_failed(&self) -> Result<(), Error> {
        match &*lock(&self.failed) {
            Some(msg) => Err(Error::Failed(msg.clone())),
            None => Ok(()),
        }
    }

    fn fail(&self, e: Error) -> Error {
        tracing::error!(error = %e, "backup journal failed");
        lock(&self.failed).get_or_insert_with(|| e.to_string());
        e
    }

    /// Checks and accounts a recorded action; for policies other than `Always` also appends it
    /// to the batch (and sets `inline_flush` when the batch is large). Returns whether a
    /// snapshot is due.
    fn account(
        &self,
        seq: u64,
        inline_flush: Option<&mut bool>,
        action: &[u8],
    ) -> Result<Due, Error> {
        let mut j = lock(&self.j);
        if j.closed {
            return Err(Error::Closed);
        }
        if !j.started {
            return Err(Error::NotStarted);
        }
        if seq <= j.last_seq {
            return Err(Error::SeqOutOfOrder {
                last: j.last_seq,
                got: seq,
            });
        }
        if let Some(flag) = inline_flush {
            if self.policy.is_some() {
                push_entry(&mut j.batch, seq, action)?;
                *flag = j.batch.len() >= FLUSH_THRESHOLD;
            }
        }
        j.last_seq = seq;
        j.since_snapshot += 1;
        if self.timeout.is_some() && j.first_change.is_none() {
            j.first_change = Some(Instant::now());
        }
        Ok(if self.count.is_some_and(|c| j.since_snapshot >= c) {
            Due::Snapshot
        } else {
            Due::No
        })
    }

    /// Closes the current segment (writing out the pending batch) and starts a new one after
    /// `base`.
    fn switch_segment(&self, w: &mut WState, j: &mut JState, base: u64) -> Result<(), Error> {
        let Some(policy) = self.policy else {
            return Ok(());
        };
        if let Some(mut old) = w.seg.take() {
            w.out.clear();
            let r = old.enc.encode_batch(&j.batch, &mut w.out);
            j.batch.clear();
            r?;
            let wrote = !w.out.is_empty();
            if wrote {
                let mut file = &old.file;
                file.write_all(&w.out)
                    .map_err(|e| self.fail(Error::io(&self.path, e)))?;
            }
            // Under `Always`, a batch of appended actions (`Backup::append`) written here is
            // fsynced by the next `commit`.
            if policy != FsyncPolicy::Always || wrote || w.unsynced {
                w.to_sync.push(old.file);
            }
        }
        let path = segment_path(&self.path, base);
        let enc = SegmentEncoder::new(base, j.history_id, self.write_key.clone())?;
        let tmp = fsutil::temp_path(&self.path);
        let file = (|| {
            let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(enc.header())?;
            if policy == FsyncPolicy::Always {
                f.sync_data()?;
            }
            std::fs::rename(&tmp, &path)?;
            if policy == FsyncPolicy::Always {
                fsutil::sync_dir(&self.dir)?;
            }
            Ok(f)
        })()
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(&path, e)
        })?;
        if policy != FsyncPolicy::Always {
            w.dir_dirty = true;
            w.unsynced = true;
        }
        w.seg = Some(OpenSegment { enc, file });
        Ok(())
    }

    /// Writes the pending batch as one record; with `sync`, fsyncs closed segments, the
    /// directory and the current segment.
    fn flush_journal(&self, sync: bool) -> Result<(), Error> {
        if self.policy.is_none() {
            return Ok(());
        }
        let mut guard = lock(&self.w);
        let w = &mut *guard;
        std::mem::swap(&mut w.batch, &mut lock(&self.j).batch);
        let Some(seg) = w.seg.as_mut() else {
            w.batch.clear();
            return Ok(());
        };
        w.out.clear();
        let r = seg.enc.encode_batch(&w.batch, &mut w.out);
        w.batch.clear();
        r?;
        let r = (|| {
            if !w.out.is_empty() {
                let mut file = &seg.file;
                file.write_all(&w.out)?;
                w.unsynced = true;
            }
            if sync {
                for f in w.to_sync.drain(..) {
                    f.sync_data()?;
                }
                if w.dir_dirty {
                    fsutil::sync_dir(&self.dir)?;
                    w.dir_dirty = false;
                }
                if w.unsynced {
                    seg.file.sync_data()?;
                    w.unsynced = false;
                }
            }
            Ok(())
        })();
        if w.out.capacity() > 4 * FLUSH_THRESHOLD {
            w.out = Vec::new();
        }
        r.map_err(|e| self.fail(Error::io(&self.path, e)))
    }

    fn wait_stop(&self, timeout: Duration) -> bool {
        let stop = lock(&self.stop);
        if *stop {
            return true;
        }
        let (stop, _) = self
            .stop_cv
            .wait_timeout(stop, timeout)
            .unwrap_or_else(|e| e.into_inner());
        *stop
    }

    /// Deletes the journal segments covered by a durable snapshot at `seq`.
    ///
    /// A segment holds the actions after its base up to the next segment's base, so it is
    /// covered when the next segment's base is at most `seq`. The last segment is never
    /// deleted.
    fn delete_covered(&self, seq: u64) -> Result<(), Error> {
        let segments = list_segments(&self.path)?;
        for pair in segments.windows(2) {
            let ((_, p), (next_base, _)) = (&pair[0], &pair[1]);
            if *next_base <= seq {
                fsutil::remove_if_exists(p).map_err(|e| Error::io(p, e))?;
            }
        }
        Ok(())
    }
}

fn flusher(sh: &Shared, interval: Duration) {
    let sync = matches!(sh.policy, Some(FsyncPolicy::Every(_)));
    loop {
        let stop = sh.wait_stop(interval);
        if let Err(e) = sh.flush_journal(sync || stop) {
            tracing::error!(error = %e, "journal flush failed");
            return;
        }
        if stop {
            return;
        }
    }
}

fn snapshot_worker(sh: &Shared, rx: &mpsc::Receiver<Job>) {
    while let Ok(Job::Snapshot(mut make, mut seq, waiter)) = rx.recv() {
        let mut waiters: Vec<_> = waiter.into_iter().collect();
        // Coalesce: only the newest queued snapshot is worth writing.
        while let Ok(Job::Snapshot(m, s, w)) = rx.try_recv() {
            make = m;
            seq = s;
            waiters.extend(w);
        }
        let snap = make();
        let result = if snap.seq != seq {
            Err(Error::SeqOutOfOrder {
                last: seq,
                got: snap.seq,
            })
        } else {
            write_snapshot(&sh.path, &snap, sh.write_key.as_deref(), sh.chunk_size)
                .and_then(|_| sh.delete_covered(seq))
        };
        drop(snap);
        if let Err(e) = &result {
            tracing::error!(error = %e, seq, "writing the backup snapshot failed (the journal keeps the actions)");
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
