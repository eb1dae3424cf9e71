//! Opening a backup: the exclusive lock, the last snapshot, the journal replayed after it
//! (setting aside what cannot be used), and the background threads.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{lock, Backup, JState, Job, Shared, WState, NEVER_INTERVAL};
use crate::fsutil;
use crate::journal::{list_segments, read_segment, JournalEntry};
use crate::key::KeyRing;
use crate::snapshot::{read_snapshot, Snapshot};
use crate::{BackupConfig, Error, FsyncPolicy, OnBadFile};

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

        let snapshot = load_snapshot(&path, keys.as_ref(), config.on_bad_file)?;
        let (history_id, journal) = match &snapshot {
            None => {
                set_aside_orphans(&path, config.on_bad_file)?;
                (0, Vec::new())
            }
            Some(s) => (
                s.history_id,
                replay_journal(&path, s, keys.as_ref(), config.on_bad_file)?,
            ),
        };

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

        let (tx, threads) = start_threads(&shared, config.journal, &path)?;
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
}

/// The snapshot file, if there is one (a corrupted one is moved aside under
/// [`OnBadFile::MoveAside`]).
fn load_snapshot(
    path: &Path,
    keys: Option<&KeyRing>,
    on_bad_file: OnBadFile,
) -> Result<Option<Snapshot>, Error> {
    match read_snapshot(path, keys) {
        Ok(s) => Ok(Some(s)),
        Err(Error::NotFound { .. }) => Ok(None),
        Err(e @ Error::Corrupted { .. }) if on_bad_file == OnBadFile::MoveAside => {
            let to = fsutil::move_aside(path, "bad").map_err(|e| Error::io(path, e))?;
            tracing::error!(error = %e, moved_to = %to.display(), "backup snapshot is corrupted: moved aside, starting empty");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Without a snapshot no segment can be replayed (the first snapshot is always written before
/// any journal record): each one is an error, or moved aside.
fn set_aside_orphans(path: &Path, on_bad_file: OnBadFile) -> Result<(), Error> {
    for (_, seg) in &list_segments(path)? {
        if on_bad_file == OnBadFile::Fail {
            return Err(Error::OrphanJournal { path: seg.clone() });
        }
        let to = fsutil::move_aside(seg, "orphan").map_err(|e| Error::io(seg, e))?;
        tracing::error!(moved_to = %to.display(), "journal segment without snapshot moved aside");
    }
    Ok(())
}

/// The journaled actions after snapshot `s`, in seq order. Segments after a gap, of another
/// history or (under [`OnBadFile::MoveAside`]) corrupted are moved aside.
fn replay_journal(
    path: &Path,
    s: &Snapshot,
    keys: Option<&KeyRing>,
    on_bad_file: OnBadFile,
) -> Result<Vec<JournalEntry>, Error> {
    let mut journal = Vec::new();
    let mut cur = s.seq;
    let mut broken = false;
    for (base, seg) in &list_segments(path)? {
        // Segments are read in base order; the actions the snapshot (or an earlier
        // segment) already holds are skipped below. A segment starting after `cur`
        // follows a gap.
        if broken || *base > cur {
            broken = true;
            let to = fsutil::move_aside(seg, "orphan").map_err(|e| Error::io(seg, e))?;
            tracing::warn!(moved_to = %to.display(), last_seq = cur, "journal segment after a gap (actions lost before a crash under a non-`always` fsync policy) moved aside");
            continue;
        }
        let contents = match read_segment(seg, keys) {
            Ok(c) => c,
            Err(e @ Error::Corrupted { .. }) if on_bad_file == OnBadFile::MoveAside => {
                let to = fsutil::move_aside(seg, "bad").map_err(|e| Error::io(seg, e))?;
                tracing::error!(error = %e, moved_to = %to.display(), "journal segment is corrupted: moved aside");
                broken = true;
                continue;
            }
            Err(e) => return Err(e),
        };
        if contents.history_id != s.history_id {
            let to = fsutil::move_aside(seg, "orphan").map_err(|e| Error::io(seg, e))?;
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
    Ok(journal)
}

type Threads = (mpsc::Sender<Job>, Vec<JoinHandle<()>>);

/// Starts the snapshot writer and, under the interval policies, the journal flusher.
fn start_threads(
    shared: &Arc<Shared>,
    policy: Option<FsyncPolicy>,
    path: &Path,
) -> Result<Threads, Error> {
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::new();
    let sh = shared.clone();
    threads.push(
        std::thread::Builder::new()
            .name("backup-snapshot".into())
            .spawn(move || super::snapshots::snapshot_worker(&sh, &rx))
            .map_err(|e| Error::io(path, e))?,
    );
    if let Some(interval) = match policy {
        Some(FsyncPolicy::Every(d)) => Some(d.max(Duration::from_millis(1))),
        Some(FsyncPolicy::Never) => Some(NEVER_INTERVAL),
        _ => None,
    } {
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("backup-journal".into())
                .spawn(move || super::journal_writer::flusher(&sh, interval))
                .map_err(|e| Error::io(path, e))?,
        );
    }
    Ok((tx, threads))
}
