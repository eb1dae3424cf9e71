//! The consensus's storage: the log (in memory) and the state machine (the
//! store's authority core).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership,
    Vote,
};
use serde::{Deserialize, Serialize};

use super::{Applied, Command, TypeConfig, OWN};
use crate::core::{DedupDump, FollowerId};
use crate::error::DispatchError;
use crate::reducer::{Encoding, Reducer};
use crate::store::{Core, Inner};

type Membership = StoredMembership<u64, openraft::BasicNode>;
type Meta = SnapshotMeta<u64, openraft::BasicNode>;
/// The latest snapshot built or installed, shared with the builders.
type Current = Arc<Mutex<Option<(Meta, Vec<u8>)>>>;

fn storage_error(what: &str) -> StorageError<u64> {
    StorageIOError::write_state_machine(AnyError::error(what)).into()
}

/// The log of a voter, kept in memory.
#[derive(Clone, Default)]
pub(crate) struct LogStore {
    inner: Arc<Mutex<LogData>>,
}

#[derive(Default)]
struct LogData {
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    last_purged: Option<LogId<u64>>,
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
}

impl LogStore {
    fn data(&self) -> std::sync::MutexGuard<'_, LogData> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<u64>> {
        Ok(self
            .data()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let d = self.data();
        let last = d.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: d.last_purged,
            last_log_id: last.or(d.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        self.data().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(self.data().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        self.data().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(self.data().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut d = self.data();
            for e in entries {
                d.entries.insert(e.log_id.index, e);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.data().entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut d = self.data();
        let keep = d.entries.split_off(&(log_id.index + 1));
        d.entries = keep;
        d.last_purged = Some(log_id);
        Ok(())
    }
}

/// The content of a snapshot: the authority's replicated state.
#[derive(Serialize, Deserialize)]
struct SnapData {
    history_id: u64,
    seq: u64,
    state: Bytes,
    dedup: DedupDump,
}

/// The state machine of a voter: its store's authority core.
pub(crate) struct StateMachine<R: Reducer> {
    inner: Weak<Inner<R>>,
    me: u64,
    epoch: u64,
    applied: Option<LogId<u64>>,
    membership: Membership,
    current: Current,
    snapshots: u64,
}

impl<R: Reducer> StateMachine<R> {
    pub(crate) fn new(inner: Weak<Inner<R>>, me: u64, epoch: u64) -> Self {
        StateMachine {
            inner,
            me,
            epoch,
            applied: None,
            membership: Membership::default(),
            current: Arc::new(Mutex::new(None)),
            snapshots: 0,
        }
    }

    fn inner(&self) -> Option<Arc<Inner<R>>> {
        self.inner.upgrade()
    }
}

/// Builds a snapshot from what was captured when it was asked for.
pub(crate) struct SnapshotBuilder {
    snapshot: Option<(Meta, Vec<u8>)>,
    current: Current,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let (meta, data) = self
            .snapshot
            .take()
            .ok_or_else(|| storage_error("snapshot already built"))?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data),
        })
    }
}

impl<R: Reducer> RaftStateMachine<TypeConfig> for StateMachine<R> {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, Membership), StorageError<u64>> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let inner = self
            .inner()
            .ok_or_else(|| storage_error("the store is gone"))?;
        let mut out = Vec::new();
        let mut g = inner.lock();
        for e in entries {
            self.applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(m) => {
                    self.membership = Membership::new(Some(e.log_id), m);
                }
                EntryPayload::Normal(cmd) => apply_command(&mut g.core, cmd, self.me, self.epoch),
            }
            out.push(Applied);
        }
        if let Core::Authority { raft: Some(v), .. } = &mut g.core {
            v.applied(self.applied.map_or(0, |l| l.index));
        }
        inner.after_apply(g);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Captured now, between applies: the state matches `applied`.
        let snapshot = self.inner().and_then(|inner| {
            let mut g = inner.lock();
            let Core::Authority { a, .. } = &mut g.core else {
                return None;
            };
            let (history_id, seq, state, dedup) = a.export().ok()?;
            let data = SnapData {
                history_id,
                seq,
                state,
                dedup,
            };
            postcard::to_stdvec(&data).ok()
        });
        self.snapshots += 1;
        let meta = Meta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!(
                "{}-{}-{}",
                self.applied.map_or(0, |l| l.index),
                self.epoch,
                self.snapshots
            ),
        };
        SnapshotBuilder {
            snapshot: snapshot.map(|d| (meta, d)),
            current: self.current.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Vec<u8>>, StorageError<u64>> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Vec<u8>>,
    ) -> Result<(), StorageError<u64>> {
        let data: SnapData = postcard::from_bytes(&snapshot)
            .map_err(|e| storage_error(&format!("bad snapshot: {e}")))?;
        let inner = self
            .inner()
            .ok_or_else(|| storage_error("the store is gone"))?;
        let mut g = inner.lock();
        let Core::Authority { a, raft, .. } = &mut g.core else {
            return Err(storage_error("not an authority"));
        };
        a.restore(data.history_id, data.seq, data.state, data.dedup)
            .map_err(|e| storage_error(&e.to_string()))?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        if let Some(v) = raft {
            // Dispatches of this voter committed in the snapshot: their
            // entries will not be applied here, answer them from the
            // duplicate table.
            v.answer_installed(a, self.applied.map_or(0, |l| l.index));
        }
        inner.after_apply(g);
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((meta.clone(), *snapshot));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        Ok(cur.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(data.clone()),
        }))
    }
}

/// Applies one committed command to the store's core (on every voter).
fn apply_command<R: Reducer>(core: &mut Core<R>, cmd: Command, me: u64, epoch: u64) {
    let Core::Authority { a, raft, .. } = core else {
        return;
    };
    match cmd {
        Command::Start { history_id } => {
            a.start(history_id);
        }
        Command::Dispatch(proposals) => {
            for p in proposals {
                let n = p.actions.len() as u64;
                if p.first_op == 0 || p.first_op.checked_add(n).is_none() {
                    // Checked by the voter that proposed it; never applied.
                    continue;
                }
                let mine = p.voter == me && p.epoch == epoch;
                // Follower 0 is never attached: the answers go nowhere.
                let to = if mine && p.follower != OWN {
                    FollowerId(p.follower)
                } else {
                    FollowerId(0)
                };
                let enc = if p.json {
                    Encoding::Json
                } else {
                    Encoding::Binary
                };
                let own = mine && p.follower == OWN;
                let mut report = Vec::new();
                a.apply_dispatch(
                    to,
                    &p.login,
                    &p.client,
                    enc,
                    p.first_op,
                    p.actions,
                    own.then_some(&mut report),
                );
                if let Some(v) = raft {
                    for (op, r) in report {
                        if let Some(w) = v.waiters.remove(op) {
                            let _ = w.send(r.map_err(DispatchError::Rejected));
                        }
                    }
                }
            }
        }
    }
}
