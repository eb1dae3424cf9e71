//! The replicated authority: a store's history ordered by a group of voters
//! through Raft ([`openraft`]), so that the store goes on when one voter of
//! three (two of five) is lost.
//!
//! Each voter runs the store's ordinary authority core as its Raft state
//! machine: the reducer's state, the duplicate table ((client id, op id))
//! and the history (`history_id`, `seq`). Every committed Raft entry is
//! applied on every voter through the same deterministic code, so all
//! voters hold the same history and serve replicas as an authority does
//! (tail or snapshot + tail, acknowledgements of their dispatches).
//!
//! A dispatch reaching a voter (from one of its replicas or from
//! [`Store::dispatch`](crate::Store::dispatch) on its handle) is queued with
//! its origin (voter, follower, login, client id, op ids) and proposed by
//! the voter's proposer task to the leader, one batch at a time and in
//! order; a batch whose fate is unknown (a timeout, a leader change) is
//! proposed again, and the duplicate table applies it once. It is
//! acknowledged when the voter that received it has applied its committed
//! entry, that is after a quorum of voters has appended it to its log.
//!
//! The consensus messages travel over a [`VoterNetwork`]: opaque byte
//! requests and replies, encoded here, so any transport can carry them;
//! [`MemoryNetwork`] carries them in memory (with seeded drops, delays and
//! partitions for tests). A voter receives them through its
//! [`RaftEndpoint`].

mod network;
mod storage;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::core::{Authority, OpSlots};
use crate::store::{authority_config, random_nonzero, Core, Role, Waiter};
use crate::{Reducer, Store, StoreConfig};

pub(crate) use network::proposer_task;
pub use network::{
    CallFuture, MemoryNetwork, NetworkFaults, RaftEndpoint, VoterNetError, VoterNetwork,
};
pub(crate) use storage::{LogStore, StateMachine};

openraft::declare_raft_types!(
    /// The consensus types of a replicated store.
    pub(crate) TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Vec<u8>,
);

/// The Raft handle of a voter.
pub(crate) type Raft = openraft::Raft<TypeConfig>;

/// One entry of the replicated log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Command {
    /// Starts the history (the first one applied wins; later ones are
    /// no-ops).
    Start {
        /// The history id, random.
        history_id: u64,
    },
    /// Dispatch frames received by voters, in the order they are applied.
    Dispatch(Vec<Proposal>),
}

/// What applying an entry answers (the voters' acknowledgements go to
/// their own replicas, not through this).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct Applied;

/// A dispatch frame with its origin, as a voter proposes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Proposal {
    /// The voter that received it.
    pub(crate) voter: u64,
    /// That voter's incarnation (random per start): its follower ids are
    /// its own and restart with it.
    pub(crate) epoch: u64,
    /// The follower (on that voter) to answer; 0: the voter's own handle.
    pub(crate) follower: u64,
    /// The login of the follower's connection ("" for the voter's own).
    pub(crate) login: String,
    /// The client that dispatched.
    pub(crate) client: String,
    /// Whether the actions are JSON (else binary).
    pub(crate) json: bool,
    /// The op id of the first action; the others follow on.
    pub(crate) first_op: u64,
    /// The encoded actions.
    pub(crate) actions: Vec<Bytes>,
}

/// The follower id of a voter's own handle in [`Proposal::follower`].
pub(crate) const OWN: u64 = 0;

/// Settings of a voter of a replicated store (see
/// [`Store::authority_replicated`](crate::Store::authority_replicated)).
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This voter's id (non-zero, unique in the group).
    pub id: u64,
    /// Every voter of the group, this one included: id -> URL (how the
    /// [`VoterNetwork`] reaches it). The group is formed from this list the
    /// first time; later changes go through the consensus.
    pub voters: BTreeMap<u64, String>,
    /// Leader heartbeat period. Default 50 ms.
    pub heartbeat: Duration,
    /// A follower that hears no leader for a random time between these
    /// starts an election. Default 150..300 ms.
    pub election_timeout: (Duration, Duration),
    /// Longest wait for a proposal (a batch of dispatches) to be committed
    /// before it is proposed again. Default 2 s.
    pub propose_timeout: Duration,
    /// Most actions in one proposal. Default 4,096.
    pub max_batch: usize,
    /// A snapshot of the state machine every this many log entries; the
    /// log before it is purged, but for the last `log_kept` entries.
    /// Default 5,000.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot, for voters a little behind
    /// (further behind, they get the snapshot). Default 1,000.
    pub log_kept: u64,
}

impl RaftConfig {
    /// A voter `id` of the group `voters` with the default timers.
    pub fn new(id: u64, voters: BTreeMap<u64, String>) -> Self {
        RaftConfig {
            id,
            voters,
            heartbeat: Duration::from_millis(50),
            election_timeout: (Duration::from_millis(150), Duration::from_millis(300)),
            propose_timeout: Duration::from_secs(2),
            max_batch: 4_096,
            snapshot_every: 5_000,
            log_kept: 1_000,
        }
    }

    /// The openraft settings.
    pub(crate) fn openraft(&self, name: &str) -> Result<openraft::Config, RaftError> {
        let ms = |d: Duration| d.as_millis().max(1) as u64;
        let c = openraft::Config {
            cluster_name: name.to_owned(),
            heartbeat_interval: ms(self.heartbeat),
            election_timeout_min: ms(self.election_timeout.0),
            election_timeout_max: ms(self.election_timeout.1),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: self.log_kept,
            ..Default::default()
        };
        c.validate()
            .map_err(|e| RaftError::Config(format!("raft settings: {e}")))
    }
}

/// A replicated store could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RaftError {
    /// The settings are not usable.
    #[error("{0}")]
    Config(String),
    /// The consensus engine failed.
    #[error("raft: {0}")]
    Raft(String),
}

/// What a voter knows of its group (see
/// [`Store::raft_status`](crate::Store::raft_status)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RaftStatus {
    /// This voter's id.
    pub id: u64,
    /// Its role now.
    pub role: RaftRole,
    /// The current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Index of the last log entry known committed and applied to the
    /// state here (0: none).
    pub last_applied: u64,
    /// Index of the last entry in its log (0: none).
    pub last_log_index: u64,
    /// The voters of the group.
    pub voters: Vec<u64>,
}

/// A voter's role in the consensus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RaftRole {
    /// Orders the history: the store's authority now.
    Leader,
    /// Follows the leader.
    Follower,
    /// Asks for votes.
    Candidate,
    /// Receives the log without a vote.
    Learner,
    /// Stopped.
    Shutdown,
}

/// A voter's own state inside the store (under the store's lock).
pub(crate) struct VoterState {
    /// This voter's id.
    pub(crate) id: u64,
    /// This incarnation (see [`Proposal::epoch`]).
    pub(crate) epoch: u64,
    /// The client id of dispatches made on this voter's handle.
    pub(crate) client_id: String,
    /// The next op id of this voter's handle.
    pub(crate) next_op: u64,
    /// Dispatches of this voter's handle waiting for their entry.
    pub(crate) waiters: OpSlots<Waiter>,
    /// Dispatch frames not yet committed, in arrival order (the proposer
    /// task proposes from the front and removes what is committed).
    pub(crate) outbox: VecDeque<Proposal>,
    /// Actions in `outbox`.
    pub(crate) outbox_actions: usize,
    /// Most actions waiting (outbox and own waiters): past it the voter's
    /// handle fails dispatches with `OutboxFull` and its replicas'
    /// connections are not read until the outbox drains.
    pub(crate) max_pending: usize,
    /// Wakes the proposer task.
    pub(crate) wake: Arc<Notify>,
    /// Batches the leader reported committed at a log index that this
    /// voter has not applied yet (answered from the duplicate table if a
    /// snapshot covers them).
    pub(crate) awaiting: VecDeque<(u64, Vec<Proposal>)>,
    /// The last log index applied here.
    pub(crate) last_applied: u64,
    /// The consensus (set once started).
    pub(crate) raft: Option<Raft>,
    /// The settings it started with.
    pub(crate) cfg: Arc<RaftConfig>,
}

impl VoterState {
    /// Queues a dispatch frame for the proposer.
    pub(crate) fn queue(&mut self, p: Proposal) {
        self.outbox_actions += p.actions.len();
        self.outbox.push_back(p);
        self.wake.notify_one();
    }

    /// Whether the voter has as many actions waiting as it takes.
    pub(crate) fn full(&self) -> bool {
        self.outbox_actions + self.waiters.len() >= self.max_pending
    }

    /// The first proposals of the outbox, about `max` actions (at least one
    /// proposal).
    pub(crate) fn next_batch(&self, max: usize) -> Vec<Proposal> {
        let mut n = 0;
        let mut out = Vec::new();
        for p in &self.outbox {
            if !out.is_empty() && n + p.actions.len() > max {
                break;
            }
            n += p.actions.len();
            out.push(p.clone());
        }
        out
    }

    /// The first `count` proposals are committed, at log index `index`.
    pub(crate) fn committed(&mut self, count: usize, index: u64) {
        let mut batch = Vec::with_capacity(count);
        for _ in 0..count {
            if let Some(p) = self.outbox.pop_front() {
                self.outbox_actions -= p.actions.len();
                batch.push(p);
            }
        }
        if index > self.last_applied {
            self.awaiting.push_back((index, batch));
        }
    }

    /// The log is applied up to `index` here.
    pub(crate) fn applied(&mut self, index: u64) {
        self.last_applied = self.last_applied.max(index);
        while self
            .awaiting
            .front()
            .is_some_and(|(i, _)| *i <= self.last_applied)
        {
            self.awaiting.pop_front();
        }
    }

    /// A snapshot up to log index `index` was installed: the batches of
    /// this voter it covers are answered from the duplicate table.
    pub(crate) fn answer_installed<R: crate::Reducer>(
        &mut self,
        a: &mut crate::core::Authority<R>,
        index: u64,
    ) {
        while let Some((i, batch)) = self.awaiting.pop_front() {
            if i > index {
                self.awaiting.push_front((i, batch));
                break;
            }
            for p in batch {
                if p.voter != self.id || p.epoch != self.epoch {
                    continue;
                }
                for op in (p.first_op..).take(p.actions.len()) {
                    let Some(r) = a.op_result(&p.client, op) else {
                        continue;
                    };
                    if p.follower == OWN {
                        if let Some(w) = self.waiters.remove(op) {
                            let _ = w.send(r.map_err(crate::DispatchError::Rejected));
                        }
                    } else {
                        a.answer(crate::core::FollowerId(p.follower), &p.client, op, r);
                    }
                }
            }
        }
        self.applied(index);
    }
}

impl<R: Reducer> Store<R> {
    /// A voter of a replicated authority: the store's history is ordered by
    /// the group of voters `raft.voters` through Raft, and goes on while a
    /// majority of them is up and can reach each other (see the module
    /// [`crate::raft`] and `docs/store.md`).
    ///
    /// The voter serves replicas as an authority does ([`Store::serve`]),
    /// whether it leads or follows: they get the committed history, and
    /// their dispatches are proposed to the leader with their origin, so a
    /// resend through another voter after a leader change is applied once.
    /// [`Store::dispatch`] on the voter's handle resolves once its action is
    /// committed by a quorum and applied here. Its history starts empty
    /// (history id 0, no follower is welcomed) until the first leader
    /// starts it.
    ///
    /// The consensus messages go over `network`; hand the requests that
    /// reach this voter to [`Store::raft_endpoint`]. The log is kept in
    /// memory: a voter that restarts comes back empty and catches up from
    /// the others.
    pub async fn authority_replicated(
        reducer: R,
        config: StoreConfig,
        raft: RaftConfig,
        network: Arc<dyn VoterNetwork>,
    ) -> Result<Self, RaftError> {
        let id = raft.id;
        if id == 0 || !raft.voters.contains_key(&id) {
            return Err(RaftError::Config(format!(
                "voter id {id} must be non-zero and among the voters {:?}",
                raft.voters.keys().collect::<Vec<_>>()
            )));
        }
        let name = reducer.name().to_owned();
        let schema = reducer.schema();
        let openraft_config = Arc::new(raft.openraft(&name)?);
        let cfg = Arc::new(raft);
        let a = Authority::unstarted(reducer, authority_config(&config));
        let epoch = random_nonzero();
        let wake = Arc::new(Notify::new());
        let voter = VoterState {
            id,
            epoch,
            client_id: format!("voter-{id}-{epoch:016x}"),
            next_op: 1,
            waiters: OpSlots::default(),
            outbox: VecDeque::new(),
            outbox_actions: 0,
            max_pending: config.max_pending,
            wake: wake.clone(),
            awaiting: VecDeque::new(),
            last_applied: 0,
            raft: None,
            cfg: cfg.clone(),
        };
        let store = Store::from_core(
            name.clone(),
            schema,
            Core::Authority {
                a,
                journal: None,
                persisted: 0,
                durable_waiters: VecDeque::new(),
                raft: Some(Box::new(voter)),
            },
            Role::Authority,
        );
        let factory = network::Factory {
            net: network.clone(),
            name,
            schema,
            me: id,
        };
        let sm = StateMachine::new(Arc::downgrade(&store.inner), id, epoch);
        let r = openraft::Raft::new(id, openraft_config, factory, LogStore::default(), sm)
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        let initialized = r
            .is_initialized()
            .await
            .map_err(|e| RaftError::Raft(e.to_string()))?;
        if !initialized {
            // Every voter forms the group from the same list: the same
            // first membership entry everywhere.
            let members: BTreeMap<u64, openraft::BasicNode> = cfg
                .voters
                .iter()
                .map(|(id, url)| (*id, openraft::BasicNode { addr: url.clone() }))
                .collect();
            if let Err(e) = r.initialize(members).await {
                use openraft::error::{InitializeError, RaftError as E};
                if !matches!(e, E::APIError(InitializeError::NotAllowed(_))) {
                    return Err(RaftError::Raft(e.to_string()));
                }
            }
        }
        if let Core::Authority { raft: Some(v), .. } = &mut store.inner.lock().core {
            v.raft = Some(r.clone());
        }
        let inner = store.inner.clone();
        store
            .inner
            .tasks
            .spawn(proposer_task(inner, r, network, cfg, wake));
        Ok(store)
    }

    /// A voter's receiving end for the requests of the other voters
    /// (`None`: not a voter, or stopped).
    pub fn raft_endpoint(&self) -> Option<RaftEndpoint> {
        let (raft, cfg) = self.voter_raft()?;
        Some(RaftEndpoint::new(&self.inner, raft, cfg))
    }

    /// What a voter knows of its group now (`None`: not a voter, or
    /// stopped).
    pub fn raft_status(&self) -> Option<RaftStatus> {
        let (raft, _) = self.voter_raft()?;
        let m = raft.metrics().borrow().clone();
        let role = match m.state {
            openraft::ServerState::Leader => RaftRole::Leader,
            openraft::ServerState::Follower => RaftRole::Follower,
            openraft::ServerState::Candidate => RaftRole::Candidate,
            openraft::ServerState::Learner => RaftRole::Learner,
            openraft::ServerState::Shutdown => RaftRole::Shutdown,
        };
        Some(RaftStatus {
            id: m.id,
            role,
            term: m.current_term,
            leader: m.current_leader,
            last_applied: m.last_applied.map_or(0, |l| l.index),
            last_log_index: m.last_log_index.unwrap_or(0),
            voters: m.membership_config.voter_ids().collect(),
        })
    }

    fn voter_raft(&self) -> Option<(Raft, Arc<RaftConfig>)> {
        match &self.inner.lock().core {
            Core::Authority { raft: Some(v), .. } => Some((v.raft.clone()?, v.cfg.clone())),
            _ => None,
        }
    }
}
