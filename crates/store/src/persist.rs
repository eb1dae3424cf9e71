//! Persistence of an authority's history (backups plug in here).

use std::time::Instant;

use bytes::Bytes;

pub use crate::core::{Origin, Recovered};
use proto::Message;

/// Where an authority keeps its history so that it survives a restart.
///
/// The store calls it synchronously while committing (keep `record` cheap:
/// buffer and write in the background if needed). All payloads are the
/// binary (`postcard`) encodings of actions and states.
pub trait Persistence: Send + 'static {
    /// What was persisted before (history id 0 when nothing).
    fn load(&mut self) -> Result<Recovered, PersistError>;
    /// Committed actions `first_seq, first_seq + 1, ...` of `history_id`.
    /// Returns true when a snapshot is wanted now: the store then encodes its
    /// state and calls [`Persistence::snapshot`].
    fn record(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[Bytes],
    ) -> Result<bool, PersistError>;
    /// The state after action `seq` of `history_id`; what came before it
    /// may be discarded.
    fn snapshot(&mut self, history_id: u64, seq: u64, state: &Bytes) -> Result<(), PersistError>;
    /// As [`Persistence::record`], with the origins of those actions (in seq
    /// order; actions dispatched on the authority itself have none). Keep
    /// them and give them back in [`Recovered::origins`]: the restarted
    /// authority then still drops a dispatch that a replica resends because
    /// the answer was lost in the restart. By default the origins are
    /// dropped and `record` is called; such a dispatch may then be applied a
    /// second time after a restart.
    fn record_with_origins(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[Bytes],
        origins: &[Origin],
    ) -> Result<bool, PersistError> {
        let _ = origins;
        self.record(history_id, first_seq, actions)
    }
    /// As [`Persistence::snapshot`], with the origins (at most `seq`) still
    /// in the authority's duplicate window, which replace those recorded
    /// before. By default `snapshot`.
    fn snapshot_with_origins(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[Origin],
    ) -> Result<(), PersistError> {
        let _ = origins;
        self.snapshot(history_id, seq, state)
    }
    /// As [`Persistence::shutdown`], with the origins as in
    /// [`Persistence::snapshot_with_origins`]. By default `shutdown`.
    fn shutdown_with_origins(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[Origin],
    ) -> Result<(), PersistError> {
        let _ = origins;
        self.shutdown(history_id, seq, state)
    }
    /// When a time-based snapshot is wanted (`None`: none pending). After
    /// each commit the store asks; once the instant passes, even if no other
    /// action comes, it encodes its state and calls
    /// [`Persistence::snapshot`]. By default `None`.
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// The store is shutting down ([`crate::Store::shutdown`]): the final
    /// state. By default the same as [`Persistence::snapshot`].
    fn shutdown(&mut self, history_id: u64, seq: u64, state: &Bytes) -> Result<(), PersistError> {
        self.snapshot(history_id, seq, state)
    }
}

/// A persistence failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("persistence: {0}")]
pub struct PersistError(pub String);

impl PersistError {
    /// An error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        PersistError(message.into())
    }
}

/// An in-memory [`Persistence`], for tests and examples. Clones share the
/// same storage, so a "restarted" authority can load what the first one kept.
#[derive(Debug, Clone, Default)]
pub struct MemoryPersistence {
    inner: std::sync::Arc<std::sync::Mutex<Recovered>>,
}

impl MemoryPersistence {
    /// Empty storage.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Persistence for MemoryPersistence {
    fn load(&mut self) -> Result<Recovered, PersistError> {
        Ok(self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn record(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[Bytes],
    ) -> Result<bool, PersistError> {
        self.record_with_origins(history_id, first_seq, actions, &[])
    }

    fn record_with_origins(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[Bytes],
        origins: &[Origin],
    ) -> Result<bool, PersistError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.history_id = history_id;
        g.origins.extend_from_slice(origins);
        for (i, a) in actions.iter().enumerate() {
            g.actions.push((first_seq + i as u64, a.clone()));
        }
        // Keep the journal short.
        Ok(g.actions.len() >= 1024)
    }

    fn snapshot(&mut self, history_id: u64, seq: u64, state: &Bytes) -> Result<(), PersistError> {
        self.snapshot_with_origins(history_id, seq, state, &[])
    }

    fn snapshot_with_origins(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[Origin],
    ) -> Result<(), PersistError> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.history_id = history_id;
        g.snapshot = Some((seq, state.clone()));
        g.actions.retain(|(s, _)| *s > seq);
        g.origins.retain(|o| o.seq > seq);
        g.origins.extend_from_slice(origins);
        Ok(())
    }
}

/// [`Persistence`] in encrypted backup files (`replimesh-backup`): a
/// snapshot file plus a journal of the actions since, as redux-cluster's
/// `backup({path, key, count})`. Snapshots are taken when the backup's
/// `count` policy says so, `timeout` after the first change not in a
/// snapshot (a timer thread of the store writes it even when no further
/// action comes), and at [`crate::Store::shutdown`].
///
/// The files hold the store's envelopes (`proto::PersistedState`,
/// `proto::PersistedAction`): with the state and each action, the origins
/// (client id, op id) of recent dispatches, so that a restarted authority
/// still applies a resent dispatch only once.
pub struct BackupPersistence {
    backup: backup::Backup,
    restored: Option<backup::Restored>,
    based: bool,
    store: String,
    schema: u32,
}

impl std::fmt::Debug for BackupPersistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupPersistence")
            .field("store", &self.store)
            .finish()
    }
}

impl BackupPersistence {
    /// Opens (or creates) the backup of store `store` with schema `schema`.
    /// A backup of another store or schema is refused.
    pub fn open(
        config: backup::BackupConfig,
        store: &str,
        schema: u32,
    ) -> Result<Self, PersistError> {
        let (backup, restored) =
            backup::Backup::open(config).map_err(|e| PersistError::new(e.to_string()))?;
        if let Some(r) = &restored {
            if r.snapshot.store != store || r.snapshot.schema != schema {
                return Err(PersistError::new(format!(
                    "backup holds store {:?} schema {}, not store {:?} schema {}",
                    r.snapshot.store, r.snapshot.schema, store, schema
                )));
            }
        }
        let based = restored.is_some();
        Ok(BackupPersistence {
            backup,
            restored,
            based,
            store: store.to_owned(),
            schema,
        })
    }

    fn snap(
        &self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[Origin],
    ) -> backup::Snapshot {
        let envelope = proto::PersistedState {
            state: state.clone(),
            origins: origins.iter().map(Origin::to_proto).collect(),
        };
        backup::Snapshot {
            store: self.store.clone(),
            schema: self.schema,
            history_id,
            seq,
            state: envelope.encode_to_vec().into(),
        }
    }
}

impl Persistence for BackupPersistence {
    fn load(&mut self) -> Result<Recovered, PersistError> {
        let Some(r) = self.restored.take() else {
            return Ok(Recovered::default());
        };
        let s = r.snapshot;
        let mut origins = Vec::new();
        // An empty payload marks a history without a snapshot (its base).
        let snapshot = if s.state.is_empty() {
            None
        } else {
            let p = proto::PersistedState::decode(s.state.clone()).map_err(|e| {
                PersistError::new(format!(
                    "snapshot at seq {} is not a store snapshot: {e}",
                    s.seq
                ))
            })?;
            origins.extend(p.origins.into_iter().map(Origin::from_proto));
            Some((s.seq, p.state))
        };
        let mut actions = Vec::with_capacity(r.journal.len());
        for e in r.journal {
            let p = proto::PersistedAction::decode(e.action).map_err(|err| {
                PersistError::new(format!(
                    "journal entry at seq {} is not a store action: {err}",
                    e.seq
                ))
            })?;
            origins.extend(p.origin.map(Origin::from_proto));
            actions.push((e.seq, p.action));
        }
        Ok(Recovered {
            history_id: s.history_id,
            snapshot,
            actions,
            origins,
        })
    }

    fn record(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[Bytes],
    ) -> Result<bool, PersistError> {
        self.record_with_origins(history_id, first_seq, actions, &[])
    }

    fn record_with_origins(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[Bytes],
        origins: &[Origin],
    ) -> Result<bool, PersistError> {
        if !self.based {
            // The history's base: an empty payload (no snapshot yet).
            self.based = true;
            let base = backup::Snapshot {
                store: self.store.clone(),
                schema: self.schema,
                history_id,
                seq: first_seq - 1,
                state: Bytes::new(),
            };
            self.backup
                .snapshot(base)
                .map_err(|e| PersistError::new(e.to_string()))?;
        }
        let mut due = false;
        let mut origins = origins.iter().peekable();
        let mut entry = Vec::new();
        for (i, a) in actions.iter().enumerate() {
            let seq = first_seq + i as u64;
            while origins.next_if(|o| o.seq < seq).is_some() {}
            let origin = origins.next_if(|o| o.seq == seq).map(Origin::to_proto);
            entry.clear();
            proto::PersistedAction {
                action: a.clone(),
                origin,
            }
            .encode(&mut entry)
            .map_err(|e| PersistError::new(e.to_string()))?;
            let d = self
                .backup
                .record(seq, &entry)
                .map_err(|e| PersistError::new(e.to_string()))?;
            due |= d == backup::Due::Snapshot;
        }
        // The `timeout` policy: a deadline already passed is honoured here;
        // otherwise the store's timer calls `snapshot` at `deadline()`, even if
        // no further action comes.
        due |= self.backup.is_due();
        Ok(due)
    }

    fn snapshot(&mut self, history_id: u64, seq: u64, state: &Bytes) -> Result<(), PersistError> {
        self.snapshot_with_origins(history_id, seq, state, &[])
    }

    fn snapshot_with_origins(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[Origin],
    ) -> Result<(), PersistError> {
        self.based = true;
        let snap = self.snap(history_id, seq, state, origins);
        self.backup
            .snapshot(snap)
            .map_err(|e| PersistError::new(e.to_string()))
    }

    fn deadline(&self) -> Option<Instant> {
        self.backup.deadline()
    }

    fn shutdown(&mut self, history_id: u64, seq: u64, state: &Bytes) -> Result<(), PersistError> {
        self.shutdown_with_origins(history_id, seq, state, &[])
    }

    fn shutdown_with_origins(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[Origin],
    ) -> Result<(), PersistError> {
        let snap = self.snap(history_id, seq, state, origins);
        self.backup
            .shutdown(Some(snap))
            .map_err(|e| PersistError::new(e.to_string()))
    }
}
