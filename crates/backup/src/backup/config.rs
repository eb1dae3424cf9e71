//! The configuration of a [`Backup`](super::Backup): where, with which key, and when it writes
//! (fsync policy, snapshot policies, bad files).

use std::path::PathBuf;
use std::time::Duration;

#[cfg(doc)]
use super::Backup;
use crate::key::KdfParams;
use crate::snapshot::DEFAULT_CHUNK_SIZE;

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
