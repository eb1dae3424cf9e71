//! Replimesh backup: crash-safe, authenticated snapshots of a store plus a journal of the
//! actions committed since, restored at start-up.
//!
//! - **Snapshot files** hold a [`Snapshot`] (store name, schema version, history id, seq,
//!   state) encrypted with AES-256-GCM under a key derived from a passphrase with Argon2id, the
//!   file header being authenticated as associated data; without a key the file is checksummed
//!   (CRC-32). Any flipped bit or truncation is detected. The format is documented byte by byte
//!   in `docs/backup-format.md`.
//! - **Atomic replacement**: a snapshot is written to a temporary file in the same directory,
//!   fsynced, renamed over the old one, and the directory is fsynced: at every instant the path
//!   holds the old or the new complete snapshot.
//! - **Journal**: every committed action is appended to a journal segment in authenticated
//!   records (one per action under [`FsyncPolicy::Always`], one per buffered batch under the
//!   other policies), with the fsync policy of your choice. A restart replays snapshot +
//!   journal; with [`FsyncPolicy::Always`] no committed action is lost. A record torn by a crash
//!   (the incomplete last one) is dropped; damage elsewhere is an error.
//! - **Policies** as in redux-cluster: a snapshot every `count` actions and/or `timeout` after
//!   a change, plus one at shutdown. Snapshot files are written by a background thread.
//! - **Errors** tell apart a missing file, a wrong key, a corrupted file (with where) and a newer
//!   format ([`Error`]). A bad file is never overwritten: start-up fails, or with
//!   [`OnBadFile::MoveAside`] it is renamed aside with an error log line.
//!
//! # Keys
//!
//! The key is derived once per [`Backup::open`], never per write. Each file header stores the
//! Argon2id parameters and the salt; a [`KeyRing`] caches the derived key per salt, and new files
//! reuse the salt (and key) of the snapshot that was loaded when its parameters match the
//! configured ones ([`BackupConfig::kdf`]). Each file and journal segment gets a fresh random
//! nonce.
//!
//! # Life cycle (what a store does)
//!
//! 1. [`Backup::open`] at start-up. It returns the [`Restored`] snapshot plus the journaled
//!    actions after it (apply them in order; check `store` and `schema`), or `None` on a first
//!    start. The history id and seq are restored, so replicas that were connected catch up with
//!    a tail.
//! 2. On a first start, hand the initial (empty) state to [`Backup::snapshot`] before the first
//!    action: that first snapshot is written synchronously so the journal has a base.
//! 3. For each committed action, in seq order: [`Backup::record`]`(seq, action_bytes)`. When it
//!    returns [`Due::Snapshot`], or when [`Backup::deadline`] passes (sleep until it in the event
//!    loop), hand a consistent serialized state to [`Backup::snapshot`] (returns at once; written
//!    in the background) or a closure to [`Backup::snapshot_with`] (serialized in the
//!    background too).
//! 4. At shutdown: [`Backup::shutdown`]`(Some(final_snapshot))`.
//!
//! The [`Persistence`] trait covers steps 3 and 4, so a store can be tested with a fake.
//!
//! An adapter to a store trait of the shape `load() / record(history, first_seq, actions,
//! origins) / snapshot(history, seq, state, origins)` maps: `load` to the [`Restored`] of `open`
//! (history id, the snapshot's `(seq, state)`, the journal's `(seq, action)` pairs); `record` to
//! one [`Backup::record`] per action; `snapshot` to [`Backup::snapshot`] with the store's name and
//! schema. The origins (the store's duplicate table) travel inside the store's own encoding of
//! each action and state, opaque to this crate; the example below leaves them out. A store that
//! cannot produce its initial state at a first start may hand an empty state at seq 0 and map it
//! back to "no snapshot" on load:
//!
//! ```
//! use bytes::Bytes;
//! use replimesh_backup::{Backup, BackupConfig, Error, FsyncPolicy, KdfParams, Restored, Snapshot};
//!
//! /// What the store recovers: history id (0: none), snapshot (seq, state), actions.
//! #[derive(Default)]
//! struct Recovered {
//!     history_id: u64,
//!     snapshot: Option<(u64, Bytes)>,
//!     actions: Vec<(u64, Bytes)>,
//! }
//!
//! struct BackupPersistence {
//!     backup: Backup,
//!     restored: Option<Restored>,
//!     /// A snapshot exists (loaded or handed over), so the journal has a base.
//!     based: bool,
//!     store: String,
//!     schema: u32,
//! }
//!
//! impl BackupPersistence {
//!     fn open(config: BackupConfig, store: &str, schema: u32) -> Result<Self, Error> {
//!         let (backup, restored) = Backup::open(config)?;
//!         let based = restored.is_some();
//!         Ok(Self { backup, restored, based, store: store.into(), schema })
//!     }
//!
//!     fn load(&mut self) -> Recovered {
//!         let Some(r) = self.restored.take() else { return Recovered::default() };
//!         let s = r.snapshot;
//!         Recovered {
//!             history_id: s.history_id,
//!             // The marker written below for a history without a snapshot.
//!             snapshot: (s.seq != 0 || !s.state.is_empty()).then_some((s.seq, s.state)),
//!             actions: r.journal.into_iter().map(|e| (e.seq, e.action)).collect(),
//!         }
//!     }
//!
//!     fn record(&mut self, history_id: u64, first_seq: u64, actions: &[Bytes]) -> Result<(), Error> {
//!         if !self.based {
//!             // First actions of a history whose initial state was not handed over: give the
//!             // journal a base.
//!             self.snapshot(history_id, first_seq - 1, &Bytes::new())?;
//!         }
//!         for (i, a) in actions.iter().enumerate() {
//!             // A `Due::Snapshot` here tells the store's own policy to call `snapshot`.
//!             let _due = self.backup.record(first_seq + i as u64, a)?;
//!         }
//!         Ok(())
//!     }
//!
//!     fn snapshot(&mut self, history_id: u64, seq: u64, state: &Bytes) -> Result<(), Error> {
//!         self.based = true;
//!         self.backup.snapshot(Snapshot {
//!             store: self.store.clone(),
//!             schema: self.schema,
//!             history_id,
//!             seq,
//!             state: state.clone(),
//!         })
//!     }
//! }
//!
//! # fn main() -> Result<(), Error> {
//! # let dir = tempfile::tempdir().unwrap();
//! let config = BackupConfig::new(dir.path().join("s.backup"))
//!     .journal(FsyncPolicy::Always)
//! #   .kdf(KdfParams::insecure_fast())
//!     .key("pw");
//! let mut p = BackupPersistence::open(config.clone(), "s", 1)?;
//! assert_eq!(p.load().history_id, 0);
//! p.record(9, 1, &[Bytes::from_static(b"a"), Bytes::from_static(b"b")])?;
//! drop(p);
//! let mut p = BackupPersistence::open(config, "s", 1)?;
//! let r = p.load();
//! assert_eq!((r.history_id, r.snapshot, r.actions.len()), (9, None, 2));
//! # Ok(())
//! # }
//! ```
//!
//! Blocking: [`Backup::record`] under [`FsyncPolicy::Always`] waits for an fsync and
//! [`Backup::snapshot_now`] / [`Backup::shutdown`] for a snapshot write; everything else
//! returns at once. From async code, call the blocking ones where blocking is allowed.
//!
//! # Example
//!
//! redux-cluster's `store.backup({path, key, count: 1000})`, with a journal that loses nothing:
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use replimesh_backup::{Backup, BackupConfig, Due, FsyncPolicy, KdfParams, Snapshot};
//!
//! # fn main() -> Result<(), replimesh_backup::Error> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("test.backup");
//! // A counter store whose actions are increments.
//! let config = BackupConfig::new(&path)
//!     .key("password-for-encrypter")
//!     .count(1000)
//!     .timeout(Duration::from_secs(5))
//!     .journal(FsyncPolicy::Always)
//! #   .kdf(KdfParams::insecure_fast())
//!     ;
//! let snapshot = |seq: u64, counter: u64| Snapshot {
//!     store: "counter".into(),
//!     schema: 1,
//!     history_id: 42,
//!     seq,
//!     state: Bytes::copy_from_slice(&counter.to_le_bytes()),
//! };
//!
//! let (backup, restored) = Backup::open(config.clone())?;
//! assert!(restored.is_none()); // first start
//! backup.snapshot(snapshot(0, 0))?; // the initial state
//! let mut counter = 0u64;
//! for seq in 1..=10 {
//!     counter += 1; // apply the action, then persist it before acknowledging
//!     if backup.record(seq, &1u64.to_le_bytes())? == Due::Snapshot {
//!         backup.snapshot(snapshot(seq, counter))?;
//!     }
//! }
//! drop(backup); // a crash would do the same: no final snapshot
//!
//! let (backup, restored) = Backup::open(config)?;
//! let restored = restored.expect("a snapshot");
//! let mut counter = u64::from_le_bytes(restored.snapshot.state[..].try_into().unwrap());
//! for entry in &restored.journal {
//!     counter += u64::from_le_bytes(entry.action[..].try_into().unwrap());
//! }
//! assert_eq!((counter, restored.last_seq(), restored.snapshot.history_id), (10, 10, 42));
//! backup.shutdown(Some(snapshot(10, counter)))?;
//! # Ok(())
//! # }
//! ```
//!
//! One process per snapshot path: [`Backup::open`] takes an exclusive lock (`flock` on
//! `<path>.lock`, holding the pid) for as long as the [`Backup`] lives; a second opener fails with
//! [`Error::Locked`] naming the path and the holder's pid.

mod backup;
mod format;
mod fsutil;
pub mod journal;
mod key;
pub mod snapshot;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::backup::{Backup, BackupConfig, Due, FsyncPolicy, OnBadFile, Persistence, Restored};
pub use crate::format::{FileHeader, FileKind, FORMAT_VERSION, HEADER_LEN};
pub use crate::journal::JournalEntry;
pub use crate::key::{KdfParams, Key, KeyRing, SALT_LEN};
pub use crate::snapshot::Snapshot;

/// Errors of the backup crate.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file does not exist.
    #[error("no backup file at {}", path.display())]
    NotFound {
        /// The missing file.
        path: PathBuf,
    },
    /// The passphrase does not match the one the file was written with.
    #[error("wrong key for backup file {}", path.display())]
    WrongKey {
        /// The file.
        path: PathBuf,
    },
    /// The file is encrypted and no key is configured.
    #[error("backup file {} is encrypted and no key is configured", path.display())]
    KeyRequired {
        /// The file.
        path: PathBuf,
    },
    /// A key is configured but the file is not encrypted (refused: it could be a substitute).
    #[error("backup file {} is not encrypted but a key is configured", path.display())]
    NotEncrypted {
        /// The file.
        path: PathBuf,
    },
    /// The file is damaged (or was tampered with).
    #[error("backup file {} is corrupted at {location}: {detail}", path.display())]
    Corrupted {
        /// The file.
        path: PathBuf,
        /// Where the damage was found.
        location: Location,
        /// What check failed.
        detail: &'static str,
    },
    /// The file was written by a newer build with a format this one cannot read.
    #[error("backup file {} has format version {found}; this build reads up to {supported}", path.display())]
    NewerFormat {
        /// The file.
        path: PathBuf,
        /// The file's format version.
        found: u16,
        /// The newest version this build reads.
        supported: u16,
    },
    /// A journal segment exists without the snapshot it follows.
    #[error("journal segment {} has no snapshot to follow (set OnBadFile::MoveAside to start without it)", path.display())]
    OrphanJournal {
        /// The segment.
        path: PathBuf,
    },
    /// Another process (or another open [`Backup`] in this one) holds the backup at this
    /// path: one process per backup path. The lock is an advisory `flock` on
    /// `<path>.lock`, which holds the holder's pid.
    #[error("backup {} is in use by another process{}: one process per backup path (lock file {})",
        path.display(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        crate::fsutil::lock_path(path).display())]
    Locked {
        /// The backup's snapshot path.
        path: PathBuf,
        /// The holder's process id, when its lock file says.
        pid: Option<u32>,
    },
    /// An I/O error.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Argon2id refused the parameters.
    #[error("invalid key derivation parameters: {0}")]
    InvalidKdfParams(String),
    /// An action's seq is not after the last recorded one, or a snapshot's seq is before the
    /// previous snapshot's.
    #[error("sequence number {got} is out of order (after {last})")]
    SeqOutOfOrder {
        /// The last recorded seq (actions) or the previous snapshot's seq (snapshots).
        last: u64,
        /// The offending seq.
        got: u64,
    },
    /// An action is too large for a journal record (4 GiB).
    #[error("action of {len} bytes is too large for the journal")]
    ActionTooLarge {
        /// The action's length.
        len: usize,
    },
    /// [`Backup::record`] was called before any snapshot exists (first start): hand the
    /// initial state to [`Backup::snapshot`] first.
    #[error("no snapshot yet: write the initial snapshot before recording actions")]
    NotStarted,
    /// The backup was shut down.
    #[error("the backup is shut down")]
    Closed,
    /// An earlier journal write or fsync failed; the journal can no longer be trusted.
    #[error("the backup journal failed earlier: {0}")]
    Failed(String),
}

impl Error {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source: Arc::new(e),
        }
    }

    pub(crate) fn read(path: &Path, e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            Error::io(path, e)
        }
    }

    pub(crate) fn corrupted(path: &Path, location: Location, detail: &'static str) -> Self {
        Error::Corrupted {
            path: path.to_path_buf(),
            location,
            detail,
        }
    }
}

/// Where in a file damage was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Location {
    /// The file header (magic, version, parameters, header checksum).
    Header,
    /// The snapshot body: the chunk starting at this file offset failed its check.
    Body {
        /// File offset of the chunk.
        offset: u64,
    },
    /// The file is shorter than its header says.
    Truncated {
        /// Expected length.
        expected: u64,
        /// Actual length.
        actual: u64,
    },
    /// The file has bytes after its declared end.
    TrailingData {
        /// Offset of the first unexpected byte.
        offset: u64,
    },
    /// A journal record (not the torn last one) failed its check.
    Record {
        /// Index of the record in its segment.
        index: u64,
        /// File offset of the record.
        offset: u64,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Header => write!(f, "header"),
            Location::Body { offset } => write!(f, "body chunk at offset {offset}"),
            Location::Truncated { expected, actual } => {
                write!(f, "end (truncated: {actual} of {expected} bytes)")
            }
            Location::TrailingData { offset } => write!(f, "trailing data at offset {offset}"),
            Location::Record { index, offset } => {
                write!(f, "journal record {index} at offset {offset}")
            }
        }
    }
}
