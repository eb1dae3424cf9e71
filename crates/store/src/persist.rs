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
    /// Committed actions `first_seq, first_seq + 1, ...` of `history_id`,
    /// with their origins.
    ///
    /// `origins` are the entries of the authority's duplicate table for
    /// these actions, in seq order: which (client id, op id) got which seq.
    /// Actions dispatched on the authority itself have none, so there may be
    /// fewer origins than actions. Keep them and give them back in
    /// [`Recovered::origins`]: the restarted authority then still answers a
    /// dispatch that a replica resends (because the answer was lost in the
    /// restart) with its first seq instead of applying it again. An
    /// implementation that does not persist the origins loses exactly-once
    /// across restarts: such a dispatch may be applied a second time.
    ///
    /// Returns true when a snapshot is wanted now: the store then encodes its
    /// state and calls [`Persistence::snapshot`].
    fn record(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[Bytes],
        origins: &[Origin],
    ) -> Result<bool, PersistError>;
    /// The state after action `seq` of `history_id`; what came before it
    /// may be discarded.
    ///
    /// `origins` are the entries (seq at most `seq`, in seq order) still in
    /// the authority's duplicate window; they replace the origins recorded
    /// before up to `seq` (those of later actions stay). As for
    /// [`Persistence::record`], an implementation that does not persist them
    /// loses exactly-once across restarts.
    fn snapshot(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[Origin],
    ) -> Result<(), PersistError>;
    /// When a time-based snapshot is wanted (`None`: none pending). After
    /// each commit the store asks; once the instant passes, even if no other
    /// action comes, it encodes its state and calls
    /// [`Persistence::snapshot`]. By default `None`.
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// The store is shutting down ([`crate::Store::shutdown`]): the final
    /// state, with the origins still in the duplicate window as for
    /// [`Persistence::snapshot`] (an implementation that does not persist
    /// them loses exactly-once across the restart). By default the same as
    /// [`Persistence::snapshot`].
    fn shutdown(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[Origin],
    ) -> Result<(), PersistError> {
        self.snapshot(history_id, seq, state, origins)
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

    fn snapshot(
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

    fn snapshot(
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

    fn shutdown(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(seq: u64, op_id: u64) -> Origin {
        Origin {
            seq,
            client_id: "c".into(),
            op_id,
        }
    }

    #[test]
    fn memory_persistence_keeps_the_origins_it_is_given() {
        let mut p = MemoryPersistence::new();
        let acts = [Bytes::from_static(b"a"), Bytes::from_static(b"b")];
        // Action 2 was dispatched on the authority itself: no origin.
        assert!(!p.record(7, 1, &acts, &[origin(1, 10)]).unwrap());
        assert!(!p.record(7, 3, &acts[..1], &[origin(3, 11)]).unwrap());
        assert_eq!(p.load().unwrap().origins, [origin(1, 10), origin(3, 11)]);
        // A snapshot at 2 replaces the origins up to 2 and keeps later ones.
        p.snapshot(7, 2, &Bytes::from_static(b"s2"), &[origin(2, 12)])
            .unwrap();
        let r = p.load().unwrap();
        assert_eq!(r.origins, [origin(3, 11), origin(2, 12)]);
        assert_eq!(r.actions.len(), 1);
        // The final state at shutdown keeps the origins handed with it.
        p.shutdown(
            7,
            3,
            &Bytes::from_static(b"s3"),
            &[origin(1, 10), origin(3, 11)],
        )
        .unwrap();
        let r = p.load().unwrap();
        assert_eq!(r.snapshot, Some((3, Bytes::from_static(b"s3"))));
        assert_eq!(r.origins, [origin(1, 10), origin(3, 11)]);
        assert!(r.actions.is_empty());
    }
}
