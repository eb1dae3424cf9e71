//! Persistence of an authority's history (backups plug in here).

use std::time::Instant;

use bytes::Bytes;

use std::collections::VecDeque;

use crate::core::LogConfig;
pub use crate::core::{Origin, Recovered};
use proto::Message;

/// Where an authority keeps its history so that it survives a restart.
///
/// After [`Persistence::load`] (and, for a new history, the first
/// [`Persistence::snapshot`]) the store calls it only from its journal
/// thread, outside the store's lock and off the async runtime (see
/// [`crate::Store::authority_with_persistence`]): blocking there (an fsync)
/// is fine. [`Persistence::record`] gets every action committed since the
/// previous call at once (group commit) and should make them durable before
/// it returns: the store acknowledges them only then. All payloads are the
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
///
/// The final snapshot written at [`crate::Store::shutdown`] also keeps the
/// last committed actions (within [`BackupPersistence::tail_limits`]), which
/// [`Persistence::load`] hands back before the journal's: the restarted
/// authority's backlog starts with them, so a replica that was behind when
/// the authority stopped catches up with the actions it missed instead of a
/// snapshot.
pub struct BackupPersistence {
    backup: backup::Backup,
    restored: Option<backup::Restored>,
    based: bool,
    store: String,
    schema: u32,
    /// The last committed actions, for the final snapshot's tail.
    recent: Recent,
}

/// The last committed actions of one history, contiguous, within limits.
#[derive(Debug, Default)]
struct Recent {
    history_id: u64,
    /// Seq of the last action (0: none).
    last: u64,
    actions: VecDeque<Bytes>,
    bytes: usize,
    max_count: usize,
    max_bytes: usize,
}

impl Recent {
    /// Appends committed actions `first_seq, ...` of `history_id`; a gap or
    /// another history starts again.
    fn push(&mut self, history_id: u64, first_seq: u64, actions: impl IntoIterator<Item = Bytes>) {
        if history_id != self.history_id || first_seq != self.last + 1 {
            self.actions.clear();
            self.bytes = 0;
            self.history_id = history_id;
        }
        for (i, a) in actions.into_iter().enumerate() {
            self.last = first_seq + i as u64;
            self.bytes += a.len();
            self.actions.push_back(a);
        }
        while self.actions.len() > self.max_count || self.bytes > self.max_bytes {
            match self.actions.pop_front() {
                Some(a) => self.bytes -= a.len(),
                None => break,
            }
        }
    }

    /// The actions up to and including `seq` of `history_id`, oldest first,
    /// when they end there (else none).
    fn tail(&self, history_id: u64, seq: u64) -> Vec<Bytes> {
        if history_id != self.history_id || seq != self.last {
            return Vec::new();
        }
        self.actions.iter().cloned().collect()
    }
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
        let log = LogConfig::default();
        Ok(BackupPersistence {
            backup,
            restored,
            based,
            store: store.to_owned(),
            schema,
            recent: Recent {
                max_count: log.backlog_count,
                max_bytes: log.backlog_bytes,
                ..Recent::default()
            },
        })
    }

    /// Bounds the actions kept for the final snapshot's tail: at most
    /// `count` actions and `bytes` bytes. Default: the store's default
    /// backlog limits (16,384 actions, 8 MiB); a store with smaller
    /// `backlog_count`/`backlog_bytes` keeps no more than those of them after
    /// a restart, so set the same limits to write no more. 0 writes no tail.
    pub fn tail_limits(mut self, count: usize, bytes: usize) -> Self {
        self.recent.max_count = count;
        self.recent.max_bytes = bytes;
        self
    }

    fn snap(
        &self,
        history_id: u64,
        seq: u64,
        state: &Bytes,
        origins: &[Origin],
        tail: Vec<Bytes>,
    ) -> backup::Snapshot {
        let mut payload = Vec::new();
        envelope::state(&mut payload, state, origins, &tail);
        backup::Snapshot {
            store: self.store.clone(),
            schema: self.schema,
            history_id,
            seq,
            state: payload.into(),
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
        let mut actions = Vec::new();
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
            // The tail ends at the snapshot's seq. Copies: slices would keep
            // the whole snapshot's buffer alive.
            let first = (s.seq + 1).saturating_sub(p.tail.len() as u64);
            for (i, a) in p.tail.iter().enumerate() {
                let seq = first + i as u64;
                if seq >= 1 {
                    actions.push((seq, Bytes::copy_from_slice(a)));
                }
            }
            Some((s.seq, p.state))
        };
        actions.reserve(r.journal.len());
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
        // Kept for the next final snapshot (as far as they follow on).
        for (seq, a) in &actions {
            self.recent.push(s.history_id, *seq, [a.clone()]);
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
            let origin = origins.next_if(|o| o.seq == seq);
            entry.clear();
            envelope::action(&mut entry, a, origin);
            let d = self
                .backup
                .append(seq, &entry)
                .map_err(|e| PersistError::new(e.to_string()))?;
            due |= d == backup::Due::Snapshot;
        }
        // Group commit: one journal record and one fsync (under `always`) for
        // every action of this call.
        self.backup
            .commit()
            .map_err(|e| PersistError::new(e.to_string()))?;
        self.recent
            .push(history_id, first_seq, actions.iter().cloned());
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
        let snap = self.snap(history_id, seq, state, origins, Vec::new());
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
        let tail = self.recent.tail(history_id, seq);
        let snap = self.snap(history_id, seq, state, origins, tail);
        self.backup
            .shutdown(Some(snap))
            .map_err(|e| PersistError::new(e.to_string()))
    }
}

/// The persistence envelopes (`proto::PersistedAction`,
/// `proto::PersistedState`) encoded straight from the store's types, as
/// prost encodes them (a test checks the bytes against the generated code),
/// without building the messages: no copy of a client id or an action per
/// journal entry.
mod envelope {
    use super::Origin;

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn varint_len(v: u64) -> usize {
        (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
    }

    /// Field `field` of wire type 2 (length-delimited) holding `bytes`.
    fn put_bytes(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
        out.push(field << 3 | 2);
        put_varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }

    fn origin_len(o: &Origin) -> usize {
        let mut n = 0;
        if o.seq != 0 {
            n += 1 + varint_len(o.seq);
        }
        if !o.client_id.is_empty() {
            n += 1 + varint_len(o.client_id.len() as u64) + o.client_id.len();
        }
        if o.op_id != 0 {
            n += 1 + varint_len(o.op_id);
        }
        if o.digest != 0 {
            n += 9;
        }
        n
    }

    /// Field `field` holding the message `proto::Origin` of `o`.
    fn put_origin(out: &mut Vec<u8>, field: u8, o: &Origin) {
        out.push(field << 3 | 2);
        put_varint(out, origin_len(o) as u64);
        if o.seq != 0 {
            out.push(1 << 3);
            put_varint(out, o.seq);
        }
        if !o.client_id.is_empty() {
            put_bytes(out, 2, o.client_id.as_bytes());
        }
        if o.op_id != 0 {
            out.push(3 << 3);
            put_varint(out, o.op_id);
        }
        if o.digest != 0 {
            out.push(4 << 3 | 1);
            out.extend_from_slice(&o.digest.to_le_bytes());
        }
    }

    /// Appends `proto::PersistedAction { action, origin }`.
    pub(super) fn action(out: &mut Vec<u8>, action: &[u8], origin: Option<&Origin>) {
        if !action.is_empty() {
            put_bytes(out, 1, action);
        }
        if let Some(o) = origin {
            put_origin(out, 2, o);
        }
    }

    /// Appends `proto::PersistedState { state, origins, tail }`.
    pub(super) fn state(
        out: &mut Vec<u8>,
        state: &[u8],
        origins: &[Origin],
        tail: &[bytes::Bytes],
    ) {
        if !state.is_empty() {
            put_bytes(out, 1, state);
        }
        for o in origins {
            put_origin(out, 2, o);
        }
        for a in tail {
            put_bytes(out, 3, a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The envelopes are byte for byte what prost makes of the messages,
    /// defaults (zeros, empty strings and bytes) included.
    #[test]
    fn envelopes_encode_as_prost_does() {
        let origins = [
            Origin {
                seq: 1,
                client_id: "c".into(),
                op_id: 1,
                digest: 0,
            },
            Origin {
                seq: u64::MAX,
                client_id: "x".repeat(200).into(),
                op_id: 300,
                digest: u64::MAX,
            },
            Origin {
                seq: 0,
                client_id: "".into(),
                op_id: 0,
                digest: 7,
            },
        ];
        let actions = [
            Bytes::new(),
            Bytes::from_static(b"a"),
            Bytes::from(vec![9; 300]),
        ];
        for a in &actions {
            for o in origins.iter().map(Some).chain([None]) {
                let mut ours = Vec::new();
                envelope::action(&mut ours, a, o);
                let theirs = proto::PersistedAction {
                    action: a.clone(),
                    origin: o.map(Origin::to_proto),
                }
                .encode_to_vec();
                assert_eq!(ours, theirs, "action {a:?} origin {o:?}");
            }
            for n in [0, 1, 3] {
                let tail = actions[..n].to_vec();
                let mut ours = Vec::new();
                envelope::state(&mut ours, a, &origins[..n], &tail);
                let theirs = proto::PersistedState {
                    state: a.clone(),
                    origins: origins[..n].iter().map(Origin::to_proto).collect(),
                    tail,
                }
                .encode_to_vec();
                assert_eq!(ours, theirs, "state {a:?}, {n} origins and tail");
            }
        }
    }

    fn origin(seq: u64, op_id: u64) -> Origin {
        Origin {
            seq,
            client_id: "c".into(),
            op_id,
            digest: 0,
        }
    }

    /// The final snapshot keeps the last recorded actions within the tail
    /// limits; `load` hands them back before the journal's, and keeps them
    /// for the next final snapshot. Without a tail (as files written before
    /// there was one) only the snapshot loads.
    #[test]
    fn backup_final_snapshot_keeps_a_bounded_tail() {
        let dir = tempfile::tempdir().unwrap();
        let config = backup::BackupConfig::new(dir.path().join("s.backup"))
            .journal(backup::FsyncPolicy::Always);
        let open = |count| {
            BackupPersistence::open(config.clone(), "s", 1)
                .unwrap()
                .tail_limits(count, 1 << 20)
        };
        let act = |n: u8| Bytes::from(vec![n]);
        let seqs = |r: &Recovered| r.actions.iter().map(|(s, _)| *s).collect::<Vec<_>>();
        let mut p = open(3);
        assert_eq!(p.load().unwrap().history_id, 0);
        p.record(7, 1, &[act(1), act(2)], &[]).unwrap();
        p.record(7, 3, &[act(3), act(4), act(5)], &[]).unwrap();
        p.shutdown(7, 5, &Bytes::from_static(b"s5"), &[]).unwrap();
        drop(p);
        let mut p = open(3);
        let r = p.load().unwrap();
        assert_eq!(r.snapshot, Some((5, Bytes::from_static(b"s5"))));
        assert_eq!(seqs(&r), [3, 4, 5]);
        assert_eq!(r.actions[0].1, act(3));
        // One more action, stopped again: the tail slides on.
        p.record(7, 6, &[act(6)], &[]).unwrap();
        p.shutdown(7, 6, &Bytes::from_static(b"s6"), &[]).unwrap();
        drop(p);
        let mut p = open(0);
        assert_eq!(seqs(&p.load().unwrap()), [4, 5, 6]);
        // No tail kept: the final snapshot alone.
        p.shutdown(7, 6, &Bytes::from_static(b"s6"), &[]).unwrap();
        drop(p);
        let r = open(3).load().unwrap();
        assert_eq!(r.snapshot, Some((6, Bytes::from_static(b"s6"))));
        assert!(r.actions.is_empty());
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
