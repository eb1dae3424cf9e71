//! The store handle: the runtime around the sans-IO core.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use proto::frame::Body;
use proto::Frame;
use tokio::sync::{oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::{
    Authority, AuthorityConfig, FollowerId, LogConfig, OpSlots, Origin, Replica, ReplicaConfig,
    ReplicaEvent, SyncMode,
};
use crate::error::{DispatchError, ErrorCode, RemoteError};
use crate::journal::{JournalJob, JournalQueue};
use crate::link::LinkTx;
use crate::persist::{PersistError, Persistence};
use crate::raft::{Proposal, VoterState};
use crate::reducer::{Encoding, Reducer};

/// Budget of one poll of a follower, in payload bytes.
const FOLLOWER_BUDGET: usize = 1 << 20;

/// Settings of a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Sync mode, resync period, backlog and batch limits (authority; a relay
    /// takes mode and resync from its upstream).
    pub log: LogConfig,
    /// Replica: most dispatches waiting to be committed (outbox and in
    /// flight). A dispatch beyond it fails with
    /// [`DispatchError::OutboxFull`]. Default 16,384.
    pub max_pending: usize,
    /// Op ids remembered per client for duplicate detection. Default 32,768 (keep it above the replicas' `max_pending`).
    pub dedup_window: usize,
    /// Clients remembered for duplicate detection. Default 10,000.
    pub dedup_clients: usize,
    /// Client ids remembered per login (authority and relay): past it that
    /// login's least recently seen client id is forgotten (its op ids are
    /// new again: exactly-once no longer holds for that client's resends).
    /// A relay's login carries all its replicas' client ids: raise it for
    /// relays with more replicas. Default 1,024.
    pub dedup_clients_per_login: usize,
    /// Op ids remembered in all, all clients together (authority and relay);
    /// past it the least recently seen client id is forgotten. Default
    /// 1,048,576 (about 32 MiB).
    pub dedup_entries: usize,
    /// Most actions accepted in one `Dispatch` frame (authority and relay);
    /// a larger frame is refused whole with one `StoreError` (`BAD_ACTION`,
    /// naming the range of its op ids). Keep it at least the replicas'
    /// `log.max_batch` (what they send per frame). Default 4,096.
    pub max_dispatch_batch: usize,
    /// Longest `client_id` accepted, in bytes (`StoreHello` and
    /// `Dispatch`); longer ones are refused. Default 128.
    pub max_client_id_len: usize,
    /// Authority with persistence: most committed actions waiting for the
    /// journal thread (written and fsynced outside the store's lock, see
    /// [`Store::authority_with_persistence`]). Past it, connections that
    /// dispatch to this store are not read until the journal has caught up
    /// (push back), [`Store::try_dispatch`] on the authority fails with
    /// [`DispatchError::OutboxFull`] and [`Store::dispatch`] waits. A frame
    /// being handled is committed whole, so the queue may pass the bound by
    /// one dispatch batch per connection. Default 65,536.
    pub journal_queue: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            log: LogConfig::default(),
            max_pending: 16_384,
            dedup_window: 32_768,
            dedup_clients: 10_000,
            dedup_clients_per_login: 1_024,
            dedup_entries: 1 << 20,
            max_dispatch_batch: 4_096,
            max_client_id_len: 128,
            journal_queue: 65_536,
        }
    }
}

impl StoreConfig {
    /// Sets the sync mode.
    pub fn mode(mut self, mode: SyncMode) -> Self {
        self.log.mode = mode;
        self
    }

    /// Sets the snapshot/digest period in actions (0: never).
    pub fn resync(mut self, resync: u64) -> Self {
        self.log.resync = resync;
        self
    }

    /// Sets the backlog limits (count of actions, bytes).
    pub fn backlog(mut self, count: usize, bytes: usize) -> Self {
        self.log.backlog_count = count;
        self.log.backlog_bytes = bytes;
        self
    }

    /// Sets the replica outbox limit.
    pub fn max_pending(mut self, max: usize) -> Self {
        self.max_pending = max;
        self
    }
}

/// The roles a store holds (as redux-cluster's `role` array).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Orders actions (redux-cluster's master/server holding the truth).
    Authority,
    /// Follows an authority.
    Replica,
    /// Serves replicas over a listener.
    Server,
    /// Connected to a server as a client.
    Client,
    /// Spawned worker processes that share this store.
    Master,
    /// Runs in a worker process, connected to its parent.
    Worker,
}

impl Role {
    fn bit(self) -> u8 {
        match self {
            Role::Authority => 1,
            Role::Replica => 2,
            Role::Server => 4,
            Role::Client => 8,
            Role::Master => 16,
            Role::Worker => 32,
        }
    }

    const ALL: [Role; 6] = [
        Role::Authority,
        Role::Replica,
        Role::Server,
        Role::Client,
        Role::Master,
        Role::Worker,
    ];
}

/// The state of a replica's link to its upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkState {
    Down,
    Ready,
    Refused(RemoteError),
}

pub(crate) type Waiter = oneshot::Sender<Result<u64, DispatchError>>;

#[allow(clippy::large_enum_variant)] // One per store; boxing buys nothing.
pub(crate) enum Core<R: Reducer> {
    Authority {
        a: Authority<R>,
        /// The journal thread of a persistent authority.
        journal: Option<Journal>,
        /// The last seq handed to the journal.
        persisted: u64,
        /// Dispatches made on the authority itself, waiting for their seq to
        /// be durable (in seq order).
        durable_waiters: VecDeque<(u64, Waiter)>,
        /// A voter of a replicated authority: its outbox, its own
        /// dispatches and its consensus (see [`crate::raft`]).
        raft: Option<Box<VoterState>>,
    },
    Replica {
        r: Replica<R>,
        waiters: OpSlots<Waiter>,
        up_wake: Arc<Notify>,
        /// The current upstream link (see [`LinkIo`]).
        up_io: Option<LinkIo>,
    },
}

/// A link's sender with its send lock: whoever polls frames out of the core
/// for this link holds the lock until they are queued, so frames polled by
/// the link's task and by a shortcut (sending from the task that caused them,
/// which saves a task switch on a lone dispatch) keep their order.
#[derive(Clone)]
pub(crate) struct LinkIo {
    send: Arc<tokio::sync::Mutex<()>>,
    tx: LinkTx,
    cancel: CancellationToken,
}

/// Most bytes a shortcut sends (the link's queue is empty then, so it never
/// meets the queue's limit).
const SHORTCUT_BUDGET: usize = 64 * 1024;

/// A follower's task wake-up and link.
pub(crate) struct FollowerIo {
    wake: Arc<Notify>,
    io: LinkIo,
}

pub(crate) struct Shared<R: Reducer> {
    pub(crate) core: Core<R>,
    wakers: HashMap<FollowerId, FollowerIo>,
}

impl<R: Reducer> Shared<R> {
    /// The seq others may see: the durable head of a persistent authority.
    fn head(&self) -> u64 {
        match &self.core {
            Core::Authority { a, .. } => a.durable_seq(),
            Core::Replica { r, .. } => r.seq(),
        }
    }

    fn wake_followers(&self) {
        for w in self.wakers.values() {
            w.wake.notify_one();
        }
    }

    /// Sends follower `fid`'s frames from the calling task when its link is
    /// idle (its task is not sending and its queue is empty); otherwise wakes
    /// its task.
    fn flush_follower(&mut self, fid: FollowerId) {
        let Some(f) = self.wakers.get(&fid) else {
            return;
        };
        let sent = match f.io.send.try_lock() {
            Ok(_guard) if f.io.tx.queued_bytes() == 0 => {
                let frames = match &mut self.core {
                    Core::Authority { a, .. } => a.poll(fid, SHORTCUT_BUDGET),
                    Core::Replica { r, .. } => r.poll_follower(fid, SHORTCUT_BUDGET),
                };
                // One write for the ack and the actions: the follower wakes once.
                if f.io.tx.send_all(&frames).is_err() {
                    f.io.cancel.cancel();
                }
                let more = match &self.core {
                    Core::Authority { a, .. } => a.has_output(fid),
                    Core::Replica { r, .. } => r.has_follower_output(fid),
                };
                !more
            }
            _ => false,
        };
        if !sent {
            f.wake.notify_one();
        }
    }
}

pub(crate) struct Inner<R: Reducer> {
    name: String,
    schema: u32,
    shared: Mutex<Shared<R>>,
    seq_tx: watch::Sender<u64>,
    link_tx: watch::Sender<LinkState>,
    roles: AtomicU8,
    stats: Counters,
    pub(crate) stop: CancellationToken,
    /// The store's own tasks (followers' writers, the upstream writer).
    pub(crate) tasks: TaskTracker,
    /// The tasks of the servers started by [`Store::serve`].
    pub(crate) servers: Mutex<Vec<TaskTracker>>,
    /// Set once [`Store::shutdown`] has finished: later calls return at once.
    stopped: tokio::sync::OnceCell<()>,
}

#[derive(Default)]
struct Counters {
    snapshots_received: AtomicU64,
    actions_received: AtomicU64,
}

/// Counters of what a store received from its upstream (see [`Store::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// `Snapshot` frames received from the upstream (replicas and relays): the
    /// initial sync, catch-ups beyond the backlog, resyncs and the `resync`
    /// period's snapshots. A reconnection served from the backlog adds none.
    pub snapshots_received: u64,
    /// Actions received in `Actions` frames from the upstream (including ones
    /// already applied, which are ignored).
    pub actions_received: u64,
}

/// A replicated store: a cloneable handle over an authority or a replica.
///
/// # Stopping
///
/// [`Store::shutdown`]`.await` stops the store and waits until it has
/// stopped: the servers started by [`Store::serve`] have closed their
/// listeners and connections (replicas get `Close{GOING_AWAY}`), the
/// store's tasks have ended, and a persistent authority has written its
/// final state and dropped its persistence (a backup's lock is released,
/// so the same path can be opened again at once). Dropping the last
/// handle stops it too, in the background and without a final state: the
/// journal thread writes what is queued (every committed action), drops
/// the persistence and ends. Servers ([`crate::Server`]) and clients
/// ([`crate::Client`]) that serve or carry the store do not count as
/// handles. A stopped store refuses dispatches ([`DispatchError::Closed`])
/// and new replicas.
pub struct Store<R: Reducer> {
    pub(crate) inner: Arc<Inner<R>>,
    /// Shared by the user's handles only: its drop stops the store.
    _handle: Arc<Handle<R>>,
}

/// Stops the store when the last user handle goes.
struct Handle<R: Reducer> {
    inner: Arc<Inner<R>>,
}

impl<R: Reducer> Drop for Handle<R> {
    fn drop(&mut self) {
        // No final state: the journal holds every committed action.
        drop(self.inner.begin_stop(false));
    }
}

impl<R: Reducer> Clone for Store<R> {
    fn clone(&self) -> Self {
        Store {
            inner: self.inner.clone(),
            _handle: self._handle.clone(),
        }
    }
}

impl<R: Reducer> std::fmt::Debug for Store<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("name", &self.inner.name)
            .field("roles", &self.role())
            .field("seq", &self.seq())
            .finish()
    }
}

impl<R: Reducer> Store<R> {
    pub(crate) fn from_core(name: String, schema: u32, core: Core<R>, role: Role) -> Self {
        let shared = Shared {
            core,
            wakers: HashMap::new(),
        };
        let head = shared.head();
        let link = if role == Role::Authority {
            LinkState::Ready
        } else {
            LinkState::Down
        };
        let inner = Arc::new(Inner {
            name,
            schema,
            shared: Mutex::new(shared),
            seq_tx: watch::channel(head).0,
            link_tx: watch::channel(link).0,
            roles: AtomicU8::new(role.bit()),
            stats: Counters::default(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            servers: Mutex::new(Vec::new()),
            stopped: tokio::sync::OnceCell::new(),
        });
        Store {
            _handle: Arc::new(Handle {
                inner: inner.clone(),
            }),
            inner,
        }
    }

    /// A store that is its own authority: it orders every action dispatched
    /// on it or by its replicas. The history id is random.
    pub fn authority(reducer: R, config: StoreConfig) -> Self {
        let name = reducer.name().to_owned();
        let schema = reducer.schema();
        let a = Authority::new(reducer, authority_config(&config), random_nonzero());
        Self::from_core(
            name,
            schema,
            Core::Authority {
                a,
                journal: None,
                persisted: 0,
                durable_waiters: VecDeque::new(),
                raft: None,
            },
            Role::Authority,
        )
    }

    /// An authority that continues the history kept by `persistence` and
    /// records every committed action and snapshot into it.
    ///
    /// The persistence is called from a dedicated thread of this store (the
    /// *journal thread*), never under the store's lock nor on the async
    /// runtime: commits queue their actions for it, and it hands everything
    /// queued to [`Persistence::record`] in one call (group commit: one
    /// fsync for all the dispatches that arrived during the previous one).
    /// **An action is acknowledged only once that call has returned**: the
    /// dispatcher's `Committed`, the `Actions` sent to replicas, snapshots
    /// sent to them, [`Store::seq`] and [`Store::subscribe`] never go past
    /// the durable seq, and [`Store::dispatch`] on the authority resolves
    /// only then. [`Store::state`] shows every committed action at once. If
    /// the persistence fails, nothing after the last durable seq is
    /// acknowledged until a snapshot succeeds. See
    /// [`StoreConfig::journal_queue`] for the queue's bound.
    pub fn authority_with_persistence(
        reducer: R,
        config: StoreConfig,
        mut persistence: Box<dyn Persistence>,
    ) -> Result<Self, PersistError> {
        let name = reducer.name().to_owned();
        let schema = reducer.schema();
        let recovered = persistence.load()?;
        let fresh = recovered.history_id == 0;
        let mut a = Authority::recover(
            reducer,
            authority_config(&config),
            recovered,
            random_nonzero(),
        )
        .map_err(|e| PersistError::new(e.to_string()))?;
        a.track_origins(true);
        if fresh {
            // Record the new history's starting point.
            let (seq, bytes) = a
                .take_snapshot()
                .map_err(|e| PersistError::new(e.to_string()))?;
            persistence.snapshot(a.history_id(), seq, &bytes, &a.known_origins(seq))?;
        }
        let head = a.seq();
        a.set_durable(head);
        let store = Self::from_core(
            name,
            schema,
            Core::Authority {
                a,
                journal: None,
                persisted: head,
                durable_waiters: VecDeque::new(),
                raft: None,
            },
            Role::Authority,
        );
        let journal = Journal::start(
            Arc::downgrade(&store.inner),
            persistence,
            head,
            config.journal_queue,
        )
        .map_err(|e| PersistError::new(format!("cannot start the journal thread: {e}")))?;
        if let Core::Authority { journal: j, .. } = &mut store.inner.lock().core {
            *j = Some(journal);
        }
        Ok(store)
    }

    /// A replica: it applies the history of an upstream (see
    /// [`Store::connect`], [`crate::Client`]) and sends its dispatches there.
    pub fn replica(reducer: R, config: StoreConfig) -> Self {
        let name = reducer.name().to_owned();
        let schema = reducer.schema();
        let rc = ReplicaConfig {
            client_id: format!("{:016x}", random_nonzero()),
            encoding: Encoding::Binary,
            max_pending: config.max_pending,
            max_dispatch_batch: config.log.max_batch,
            log: config.log.clone(),
            dedup_window: config.dedup_window,
            dedup_clients: config.dedup_clients,
            dedup_clients_per_login: config.dedup_clients_per_login,
            dedup_entries: config.dedup_entries,
            max_client_id_len: config.max_client_id_len,
        };
        Self::from_core(
            name,
            schema,
            Core::Replica {
                r: Replica::new(reducer, rc),
                waiters: OpSlots::default(),
                up_wake: Arc::new(Notify::new()),
                up_io: None,
            },
            Role::Replica,
        )
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The store's schema version.
    pub fn schema(&self) -> u32 {
        self.inner.schema
    }

    /// Dispatches an action and waits until it is committed (and, on a
    /// replica, applied locally). Resolves to its sequence number.
    ///
    /// On a replica the action waits in the outbox while disconnected and is
    /// sent after reconnecting; the authority applies it exactly once.
    ///
    /// # Cancel safety
    /// Dropping the future does not withdraw the action: it is still committed.
    pub async fn dispatch(&self, action: R::Action) -> Result<u64, DispatchError> {
        loop {
            match self.try_dispatch(&action) {
                Err(DispatchError::OutboxFull { .. }) => {
                    // A persistent authority whose journal queue is full:
                    // wait for room (a replica's full outbox fails at once).
                    let Some(q) = self.inner.journal_queue() else {
                        return self.try_dispatch(&action)?.await;
                    };
                    q.wait_room(&self.inner.stop).await;
                    if self.inner.stop.is_cancelled() {
                        return Err(DispatchError::Closed);
                    }
                }
                r => return r?.await,
            }
        }
    }

    /// Queues an action without waiting; the returned [`Pending`] resolves
    /// to its sequence number. Fails at once when the outbox is full.
    pub fn try_dispatch(&self, action: &R::Action) -> Result<Pending, DispatchError> {
        let mut g = self.inner.lock();
        // Checked under the lock: the stop takes the journal under it.
        if self.inner.stop.is_cancelled() {
            return Err(DispatchError::Closed);
        }
        // Checked under the lock: `link_failed` sets the state, then fails the
        // waiters under the lock, so no waiter is left behind.
        if let LinkState::Refused(e) = &*self.inner.link_tx.borrow() {
            return Err(DispatchError::Rejected(e.clone()));
        }
        let pending = match &mut g.core {
            Core::Authority {
                a, raft: Some(v), ..
            } => {
                if v.full() {
                    return Err(DispatchError::OutboxFull {
                        pending: v.outbox_actions + v.waiters.len(),
                        limit: v.max_pending,
                    });
                }
                let bytes = Encoding::Binary.encode(action)?;
                let op = v.next_op;
                v.next_op += 1;
                let (tx, rx) = oneshot::channel();
                v.waiters.insert(op, tx);
                let p = Proposal {
                    voter: v.id,
                    epoch: v.epoch,
                    follower: crate::raft::OWN,
                    login: String::new(),
                    client: v.client_id.clone(),
                    json: false,
                    first_op: op,
                    actions: vec![bytes],
                };
                v.queue(p);
                let _ = a;
                return Ok(Pending(PendingInner::Wait(rx)));
            }
            Core::Authority {
                a,
                journal,
                persisted,
                durable_waiters,
                raft: None,
            } => {
                if let Some(j) = journal {
                    if j.queue.is_full() {
                        return Err(DispatchError::OutboxFull {
                            pending: j.queue.queued(),
                            limit: j.queue.limit(),
                        });
                    }
                }
                let seq = a.dispatch(action)?;
                persist_new(a, journal, persisted);
                if journal.is_some() && seq > a.durable_seq() {
                    let (tx, rx) = oneshot::channel();
                    durable_waiters.push_back((seq, tx));
                    Pending(PendingInner::Wait(rx))
                } else {
                    Pending(PendingInner::Ready(Some(Ok(seq))))
                }
            }
            Core::Replica {
                r,
                waiters,
                up_wake,
                up_io,
            } => {
                let op = r.dispatch(action)?;
                let (tx, rx) = oneshot::channel();
                waiters.insert(op, tx);
                // A lone dispatch on an idle link goes out from here (saves
                // waking the link's task); dispatches in quick succession
                // are left to the task, which sends them in batches.
                let lone = r.pending() == 1;
                let sent = lone
                    && match up_io {
                        Some(io) => match io.send.try_lock() {
                            Ok(_guard) if io.tx.queued_bytes() == 0 => {
                                if io.tx.send_all(&r.poll_upstream()).is_err() {
                                    // Resent after the reconnection.
                                    io.cancel.cancel();
                                }
                                true
                            }
                            _ => false,
                        },
                        None => false,
                    };
                if !sent {
                    up_wake.notify_one();
                }
                Pending(PendingInner::Wait(rx))
            }
        };
        if matches!(g.core, Core::Authority { .. }) {
            g.wake_followers();
            // Published under the lock: the journal thread publishes a newer
            // durable head under it too, so `seq()` never moves back.
            let head = g.head();
            self.inner.publish(head);
            drop(g);
        }
        Ok(pending)
    }

    /// Read access to the current state. Cheap: it holds the store's lock, so
    /// keep it short and never across an `.await`.
    pub fn state(&self) -> StateRef<'_, R> {
        StateRef {
            guard: self.inner.lock(),
        }
    }

    /// The last committed (authority) or applied (replica) sequence number.
    pub fn seq(&self) -> u64 {
        *self.inner.seq_tx.borrow()
    }

    /// The history id (0 on a replica that has not synced yet).
    pub fn history_id(&self) -> u64 {
        let g = self.inner.lock();
        match &g.core {
            Core::Authority { a, .. } => a.history_id(),
            Core::Replica { r, .. } => r.history_id(),
        }
    }

    /// Changes of the state: each item is the sequence number of a state that
    /// was current at some moment after the previous item (fast series of
    /// changes are coalesced for slow subscribers).
    pub fn subscribe(&self) -> Subscription {
        let mut rx = self.inner.seq_tx.subscribe();
        rx.mark_unchanged();
        Subscription { rx }
    }

    /// Waits until the store has applied `seq` (or a later one).
    pub async fn wait_for(&self, seq: u64) {
        let mut rx = self.inner.seq_tx.subscribe();
        let _ = rx.wait_for(|s| *s >= seq).await;
    }

    /// An authority is always connected; a replica while its upstream link is
    /// up and has welcomed it.
    pub fn connected(&self) -> bool {
        *self.inner.link_tx.borrow() == LinkState::Ready
    }

    /// The roles this store holds.
    pub fn role(&self) -> Vec<Role> {
        let bits = self.inner.roles.load(Ordering::Relaxed);
        Role::ALL
            .into_iter()
            .filter(|r| bits & r.bit() != 0)
            .collect()
    }

    /// Counters of what this store received from its upstream (zero on an
    /// authority).
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            snapshots_received: self.inner.stats.snapshots_received.load(Ordering::Relaxed),
            actions_received: self.inner.stats.actions_received.load(Ordering::Relaxed),
        }
    }

    /// Whether this store is the authority.
    pub fn is_authority(&self) -> bool {
        self.inner.roles.load(Ordering::Relaxed) & Role::Authority.bit() != 0
    }

    /// Stops the store and waits until it has stopped (see
    /// [Stopping](Store#stopping)): the servers started by [`Store::serve`]
    /// and the store's tasks have ended, and a persistent authority has
    /// handed its final state to its persistence and dropped it (a failure
    /// is logged). Calling it again, or from another handle meanwhile,
    /// waits for the same stop.
    ///
    /// # Cancel safety
    /// Cancel safe: the stop runs in a task of its own and goes on if the
    /// future is dropped; awaiting `shutdown` again waits for it.
    pub async fn shutdown(&self) {
        let inner = self.inner.clone();
        let stop = tokio::spawn(async move {
            inner.stopped.get_or_init(|| inner.stop_and_wait()).await;
        });
        let _ = stop.await;
    }
}

fn lock_unpoisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read access to a store's state (see [`Store::state`]).
pub struct StateRef<'a, R: Reducer> {
    guard: MutexGuard<'a, Shared<R>>,
}

impl<R: Reducer> std::ops::Deref for StateRef<'_, R> {
    type Target = R::State;
    fn deref(&self) -> &R::State {
        match &self.guard.core {
            Core::Authority { a, .. } => a.state(),
            Core::Replica { r, .. } => r.state(),
        }
    }
}

/// A stream of state changes (see [`Store::subscribe`]).
pub struct Subscription {
    rx: watch::Receiver<u64>,
}

impl Subscription {
    /// The sequence number of the next change; `None` once the store is gone.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn next(&mut self) -> Option<u64> {
        self.rx.changed().await.ok()?;
        Some(*self.rx.borrow_and_update())
    }
}

/// A dispatch waiting to be committed; resolves to its sequence number.
pub struct Pending(PendingInner);

enum PendingInner {
    Ready(Option<Result<u64, DispatchError>>),
    Wait(oneshot::Receiver<Result<u64, DispatchError>>),
}

impl Future for Pending {
    type Output = Result<u64, DispatchError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            PendingInner::Ready(r) => Poll::Ready(r.take().unwrap_or(Err(DispatchError::Closed))),
            PendingInner::Wait(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(DispatchError::Closed))),
        }
    }
}

pub(crate) fn authority_config(c: &StoreConfig) -> AuthorityConfig {
    AuthorityConfig {
        log: c.log.clone(),
        dedup_window: c.dedup_window,
        dedup_clients: c.dedup_clients,
        dedup_clients_per_login: c.dedup_clients_per_login,
        dedup_entries: c.dedup_entries,
        max_dispatch_batch: c.max_dispatch_batch,
        max_client_id_len: c.max_client_id_len,
    }
}

pub(crate) fn random_nonzero() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

/// Hands the actions committed since the last call to the journal thread
/// (under the store's lock: the jobs are queued in seq order).
fn persist_new<R: Reducer>(
    a: &mut Authority<R>,
    journal: &mut Option<Journal>,
    persisted: &mut u64,
) {
    let Some(j) = journal else {
        *persisted = a.seq();
        return;
    };
    let history_id = a.history_id();
    let head = a.seq();
    if head <= *persisted {
        return;
    }
    let mut first = None;
    let mut actions: Vec<Bytes> = Vec::with_capacity((head - *persisted) as usize);
    for (seq, b) in a.entries_after(*persisted) {
        first.get_or_insert(seq);
        actions.push(b.clone());
    }
    let origins = a.take_origins();
    let first_seq = *persisted + 1;
    *persisted = head;
    if first == Some(first_seq) {
        let n = actions.len();
        j.send(
            JournalJob::Record {
                history_id,
                first_seq,
                actions,
                origins,
            },
            n,
        );
        return;
    }
    // The backlog no longer holds everything since the last record: a
    // snapshot covers it.
    match a.take_snapshot() {
        Ok((seq, state)) => {
            let origins = a.known_origins(seq);
            j.send(
                JournalJob::Snapshot {
                    history_id,
                    seq,
                    state,
                    origins,
                },
                0,
            );
        }
        Err(e) => tracing::error!(error = %e, "encoding a snapshot failed"),
    }
}

/// The journal thread of a persistent authority (see [`crate::journal`]).
pub(crate) struct Journal {
    tx: Option<mpsc::Sender<JournalJob>>,
    queue: Arc<JournalQueue>,
    thread: Option<JoinHandle<()>>,
}

impl Journal {
    fn start<R: Reducer>(
        store: Weak<Inner<R>>,
        persistence: Box<dyn Persistence>,
        recorded: u64,
        limit: usize,
    ) -> std::io::Result<Journal> {
        let (tx, rx) = mpsc::channel();
        let queue = Arc::new(JournalQueue::new(limit));
        let q = queue.clone();
        let thread = std::thread::Builder::new()
            .name("store-journal".into())
            .spawn(move || journal_thread(store, persistence, rx, &q, recorded))?;
        Ok(Journal {
            tx: Some(tx),
            queue,
            thread: Some(thread),
        })
    }

    /// Queues a job of `actions` actions; false when the thread is gone.
    fn send(&self, job: JournalJob, actions: usize) -> bool {
        let Some(tx) = &self.tx else { return false };
        self.queue.add(actions);
        if tx.send(job).is_err() {
            self.queue.taken(actions);
            tracing::error!("the journal thread is gone; committed actions are not persisted");
            return false;
        }
        true
    }
}

impl Journal {
    /// Queues the last job (if any) and lets the thread end by itself once
    /// it has written everything queued, without waiting for it. False when
    /// the thread is gone.
    fn finish(mut self, last: Option<JournalJob>) -> bool {
        let sent = last.is_some_and(|job| self.send(job, 0));
        self.tx.take();
        // Detached: whoever waits, waits for the job's answer.
        self.thread.take();
        sent
    }
}

impl Drop for Journal {
    /// Lets the thread write what is queued and waits for it (unless the
    /// store is dropped on that very thread).
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// A run of contiguous actions to record in one call.
struct Group {
    history_id: u64,
    first_seq: u64,
    actions: Vec<Bytes>,
    origins: Vec<Origin>,
}

fn journal_thread<R: Reducer>(
    store: Weak<Inner<R>>,
    mut p: Box<dyn Persistence>,
    rx: mpsc::Receiver<JournalJob>,
    queue: &JournalQueue,
    mut recorded: u64,
) {
    // A journal replayed at start-up is a change not in a snapshot.
    let mut deadline = p.deadline();
    let mut jobs = Vec::new();
    loop {
        let first = match deadline {
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(j) => Some(j),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
            None => match rx.recv() {
                Ok(j) => Some(j),
                Err(_) => return,
            },
        };
        jobs.extend(first);
        while let Ok(j) = rx.try_recv() {
            jobs.push(j);
        }
        let mut taken = 0;
        let mut want = false;
        let mut group: Option<Group> = None;
        let mut finished = None;
        for job in jobs.drain(..) {
            match job {
                JournalJob::Record {
                    history_id,
                    first_seq,
                    mut actions,
                    mut origins,
                } => {
                    taken += actions.len();
                    // What a snapshot already covers is not recorded.
                    let skip = (recorded + 1).saturating_sub(first_seq) as usize;
                    if skip >= actions.len() {
                        continue;
                    }
                    let first_seq = first_seq + skip as u64;
                    actions.drain(..skip);
                    origins.retain(|o| o.seq >= first_seq);
                    match &mut group {
                        Some(g)
                            if g.history_id == history_id
                                && g.first_seq + g.actions.len() as u64 == first_seq =>
                        {
                            g.actions.append(&mut actions);
                            g.origins.append(&mut origins);
                        }
                        _ => {
                            want |= record(&mut *p, group.take(), &mut recorded);
                            group = Some(Group {
                                history_id,
                                first_seq,
                                actions,
                                origins,
                            });
                        }
                    }
                }
                JournalJob::Snapshot {
                    history_id,
                    seq,
                    state,
                    origins,
                } => {
                    want |= record(&mut *p, group.take(), &mut recorded);
                    match p.snapshot(history_id, seq, &state, &origins) {
                        Ok(()) => recorded = recorded.max(seq),
                        Err(e) => tracing::error!(error = %e, "persisting a snapshot failed"),
                    }
                }
                JournalJob::Shutdown {
                    history_id,
                    seq,
                    state,
                    origins,
                    done,
                } => {
                    record(&mut *p, group.take(), &mut recorded);
                    let r = p.shutdown(history_id, seq, &state, &origins);
                    if r.is_ok() {
                        recorded = recorded.max(seq);
                    }
                    finished = Some((done, r));
                }
            }
        }
        want |= record(&mut *p, group.take(), &mut recorded);
        if finished.is_none() && (want || p.deadline().is_some_and(|d| d <= Instant::now())) {
            // A snapshot of the state now (ahead of what is recorded: the
            // queued actions it covers are skipped).
            if let Some(inner) = store.upgrade() {
                let snap = {
                    let mut g = inner.lock();
                    match &mut g.core {
                        Core::Authority { a, .. } => Some(a.take_snapshot().map(|(seq, state)| {
                            (a.history_id(), seq, state, a.known_origins(seq))
                        })),
                        Core::Replica { .. } => None,
                    }
                };
                match snap {
                    Some(Ok((history_id, seq, state, origins))) => {
                        match p.snapshot(history_id, seq, &state, &origins) {
                            Ok(()) => recorded = recorded.max(seq),
                            Err(e) => tracing::error!(error = %e, "persisting a snapshot failed"),
                        }
                    }
                    Some(Err(e)) => tracing::error!(error = %e, "encoding a snapshot failed"),
                    None => {}
                }
            }
        }
        // Acknowledge what is durable now.
        if let Some(inner) = store.upgrade() {
            inner.durable(recorded);
        }
        queue.taken(taken);
        if let Some((done, r)) = finished {
            // Dropped first: a backup's lock is released before the answer.
            drop(p);
            let _ = done.send(r);
            return;
        }
        // A persistence that still wants a snapshot (it failed) retries at
        // its next deadline, but not in a busy loop.
        deadline = p
            .deadline()
            .map(|d| d.max(Instant::now() + std::time::Duration::from_millis(100)));
    }
}

/// Records a group; returns whether the persistence wants a snapshot.
fn record(p: &mut dyn Persistence, group: Option<Group>, recorded: &mut u64) -> bool {
    let Some(g) = group else { return false };
    match p.record(g.history_id, g.first_seq, &g.actions, &g.origins) {
        Ok(want) => {
            *recorded = g.first_seq + g.actions.len() as u64 - 1;
            want
        }
        Err(e) => {
            // Not acknowledged; a snapshot covers them if it can.
            tracing::error!(error = %e, "persisting actions failed");
            true
        }
    }
}

impl<R: Reducer> Inner<R> {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared<R>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The journal queue of a persistent authority.
    pub(crate) fn journal_queue(&self) -> Option<Arc<JournalQueue>> {
        match &self.lock().core {
            Core::Authority {
                journal: Some(j), ..
            } => Some(j.queue.clone()),
            _ => None,
        }
    }

    /// The journal made everything up to `seq` durable: acknowledge it.
    fn durable(&self, seq: u64) {
        let mut g = self.lock();
        let Core::Authority {
            a, durable_waiters, ..
        } = &mut g.core
        else {
            return;
        };
        if seq <= a.durable_seq() && durable_waiters.is_empty() {
            return;
        }
        a.set_durable(seq);
        let top = a.durable_seq();
        // Published before anyone is answered: whoever gets an ack or a
        // resolved dispatch sees `seq()` at least at its seq.
        self.publish(top);
        while durable_waiters.front().is_some_and(|(s, _)| *s <= top) {
            if let Some((s, w)) = durable_waiters.pop_front() {
                let _ = w.send(Ok(s));
            }
        }
        g.wake_followers();
    }

    pub(crate) fn add_role(&self, role: Role) {
        self.roles.fetch_or(role.bit(), Ordering::Relaxed);
    }

    /// Starts the stop without waiting: cancels the store's tasks and the
    /// servers started from it, fails a replica's waiting dispatches, and
    /// lets the journal thread of a persistent authority end once it has
    /// written what is queued, and the final state if `last_state`. Returns
    /// what the thread answers once it has dropped the persistence (`None`:
    /// no journal or no final state, or the stop had started already).
    fn begin_stop(&self, last_state: bool) -> Option<oneshot::Receiver<Result<(), PersistError>>> {
        self.stop.cancel();
        let mut g = self.lock();
        let (a, journal) = match &mut g.core {
            Core::Authority {
                a, journal, raft, ..
            } => {
                if let Some(v) = raft {
                    for (_, w) in v.waiters.drain() {
                        let _ = w.send(Err(DispatchError::Closed));
                    }
                    if let Some(r) = v.raft.take() {
                        // Stopped in the store's tasks (awaited by `shutdown`).
                        if tokio::runtime::Handle::try_current().is_ok() {
                            self.tasks.spawn(async move {
                                let _ = r.shutdown().await;
                            });
                        }
                    }
                }
                (a, journal)
            }
            Core::Replica { waiters, .. } => {
                // Their answers would never come: the link is closing.
                for (_, w) in waiters.drain() {
                    let _ = w.send(Err(DispatchError::Closed));
                }
                return None;
            }
        };
        // Taken out: nothing is queued behind the final state.
        let j = journal.take()?;
        if !last_state {
            j.finish(None);
            return None;
        }
        let (done, rx) = oneshot::channel();
        match a.take_snapshot() {
            Ok((seq, state)) => {
                let job = JournalJob::Shutdown {
                    history_id: a.history_id(),
                    seq,
                    origins: a.known_origins(seq),
                    state,
                    done,
                };
                j.finish(Some(job)).then_some(rx)
            }
            Err(e) => {
                tracing::error!(error = %e, "encoding the final state failed");
                j.finish(None);
                None
            }
        }
    }

    /// [`Store::shutdown`]'s work: the stop, then waiting for the final
    /// state, the store's tasks and its servers' tasks.
    async fn stop_and_wait(&self) {
        if let Some(done) = self.begin_stop(true) {
            match done.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "persisting the final state failed"),
                Err(_) => tracing::error!("the journal thread ended before the final state"),
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
        let servers = std::mem::take(&mut *lock_unpoisoned(&self.servers));
        for t in servers {
            t.close();
            t.wait().await;
        }
    }

    /// The store's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The store's schema.
    pub(crate) fn schema(&self) -> u32 {
        self.schema
    }

    /// After a voter applied committed entries under the lock `g`: the new
    /// head is published and the followers are woken.
    pub(crate) fn after_apply(&self, g: MutexGuard<'_, Shared<R>>) {
        g.wake_followers();
        let head = g.head();
        self.publish(head);
        drop(g);
    }

    fn publish(&self, head: u64) {
        self.seq_tx.send_if_modified(|s| {
            if *s != head {
                *s = head;
                true
            } else {
                false
            }
        });
    }

    // ---- serving followers (authority or relay) ----

    /// Attaches a downstream replica; spawns its writer task.
    pub(crate) fn attach(
        self: &Arc<Self>,
        hello: &proto::StoreHello,
        login: &str,
        tx: LinkTx,
        cancel: CancellationToken,
    ) -> Result<FollowerId, RemoteError> {
        let wake = Arc::new(Notify::new());
        let io = LinkIo {
            send: Arc::new(tokio::sync::Mutex::new(())),
            tx,
            cancel,
        };
        let fid = {
            let mut g = self.lock();
            if self.stop.is_cancelled() {
                return Err(RemoteError::new(
                    ErrorCode::UnknownStore,
                    format!("store {:?} has stopped", self.name),
                ));
            }
            let fid = match &mut g.core {
                Core::Authority { a, .. } => a.on_hello_as(hello, login)?,
                Core::Replica { r, .. } => r.serve_hello_as(hello, login)?,
            };
            g.wakers.insert(
                fid,
                FollowerIo {
                    wake: wake.clone(),
                    io: io.clone(),
                },
            );
            fid
        };
        let inner = self.clone();
        self.tasks.spawn(async move {
            inner.follower_task(fid, wake, io).await;
        });
        Ok(fid)
    }

    async fn follower_task(self: Arc<Self>, fid: FollowerId, wake: Arc<Notify>, io: LinkIo) {
        let LinkIo { send, tx, cancel } = io;
        loop {
            let guard = send.lock().await;
            let frames = {
                let mut g = self.lock();
                match &mut g.core {
                    Core::Authority { a, .. } => a.poll(fid, FOLLOWER_BUDGET),
                    Core::Replica { r, .. } => r.poll_follower(fid, FOLLOWER_BUDGET),
                }
            };
            if frames.is_empty() {
                drop(guard);
                tokio::select! {
                    _ = wake.notified() => continue,
                    _ = cancel.cancelled() => break,
                    _ = self.stop.cancelled() => break,
                }
            }
            for f in &frames {
                if tx.send_wait(f).await.is_err() {
                    cancel.cancel();
                    break;
                }
            }
            drop(guard);
            if cancel.is_cancelled() {
                break;
            }
        }
        self.detach(fid);
    }

    pub(crate) fn detach(&self, fid: FollowerId) {
        let mut g = self.lock();
        g.wakers.remove(&fid);
        match &mut g.core {
            Core::Authority { a, .. } => a.on_leave(fid),
            Core::Replica { r, .. } => r.serve_leave(fid),
        }
    }

    /// A frame from a downstream replica (Dispatch or Resync). Returns the
    /// number of acks and errors waiting for it (for backpressure).
    pub(crate) fn follower_frame(&self, fid: FollowerId, frame: Frame) -> usize {
        let mut g = self.lock();
        if self.stop.is_cancelled() {
            // Stopping: nothing more is committed (its connection closes).
            return 0;
        }
        let mut committed = false;
        let backlog = match &mut g.core {
            Core::Authority {
                a, raft: Some(v), ..
            } => {
                match frame.body {
                    Some(Body::Dispatch(mut d)) => {
                        if let Some((client, login, enc)) = a.check_dispatch(fid, &d) {
                            let more = std::mem::take(&mut d.more);
                            let actions = std::iter::once(d.action).chain(more).collect();
                            v.queue(Proposal {
                                voter: v.id,
                                epoch: v.epoch,
                                follower: fid.0,
                                login,
                                client,
                                json: enc == Encoding::Json,
                                first_op: d.op_id,
                                actions,
                            });
                        }
                    }
                    Some(Body::Resync(_)) => a.on_resync(fid),
                    _ => {}
                }
                // A full outbox holds the connection's reading back.
                if v.full() {
                    usize::MAX
                } else {
                    a.pending_control(fid)
                }
            }
            Core::Authority {
                a,
                journal,
                persisted,
                ..
            } => {
                match frame.body {
                    Some(Body::Dispatch(d)) => {
                        committed = a.on_dispatch(fid, d) > 0;
                        if committed {
                            persist_new(a, journal, persisted);
                        }
                    }
                    Some(Body::Resync(_)) => a.on_resync(fid),
                    _ => {}
                }
                a.pending_control(fid)
            }
            Core::Replica { r, up_wake, .. } => {
                match frame.body {
                    Some(Body::Dispatch(d)) => {
                        r.serve_dispatch(fid, d);
                        up_wake.notify_one();
                    }
                    Some(Body::Resync(_)) => r.serve_resync(fid),
                    _ => {}
                }
                r.pending_control(fid)
            }
        };
        if committed {
            // The dispatching follower's acks and actions go out from here,
            // before the other followers' tasks are woken (on a multi-thread
            // runtime they would otherwise write to their sockets first, and
            // their processes compete with the dispatcher's for the CPU).
            g.flush_follower(fid);
            for (id, w) in &g.wakers {
                if *id != fid {
                    w.wake.notify_one();
                }
            }
            // Published under the lock (see `dispatch`): `seq()` never moves back.
            let head = g.head();
            self.publish(head);
            drop(g);
        } else {
            g.flush_follower(fid);
        }
        backlog
    }

    // ---- the upstream link of a replica ----

    /// The link to upstream is up: hello, then the writer task.
    pub(crate) fn link_up(self: &Arc<Self>, tx: LinkTx, cancel: CancellationToken) -> bool {
        if self.stop.is_cancelled() {
            return false;
        }
        let send = Arc::new(tokio::sync::Mutex::new(()));
        let wake = {
            let mut g = self.lock();
            let Core::Replica {
                r, up_wake, up_io, ..
            } = &mut g.core
            else {
                return false;
            };
            r.on_connected();
            *up_io = Some(LinkIo {
                send: send.clone(),
                tx: tx.clone(),
                cancel: cancel.clone(),
            });
            up_wake.clone()
        };
        self.link_tx.send_replace(LinkState::Down);
        wake.notify_one();
        let inner = self.clone();
        self.tasks.spawn(async move {
            loop {
                let guard = send.lock().await;
                let frames = {
                    let mut g = inner.lock();
                    match &mut g.core {
                        Core::Replica { r, .. } => r.poll_upstream(),
                        Core::Authority { .. } => Vec::new(),
                    }
                };
                if frames.is_empty() {
                    drop(guard);
                    tokio::select! {
                        _ = wake.notified() => continue,
                        _ = cancel.cancelled() => break,
                        _ = inner.stop.cancelled() => break,
                    }
                }
                for f in &frames {
                    if tx.send_wait(f).await.is_err() {
                        cancel.cancel();
                        break;
                    }
                }
                drop(guard);
                if cancel.is_cancelled() {
                    break;
                }
            }
        });
        true
    }

    /// The link to upstream is down.
    pub(crate) fn link_down(&self) {
        {
            let mut g = self.lock();
            if let Core::Replica { r, up_io, .. } = &mut g.core {
                r.on_disconnected();
                *up_io = None;
            }
        }
        self.link_tx.send_if_modified(|s| {
            if *s == LinkState::Ready {
                *s = LinkState::Down;
                true
            } else {
                false
            }
        });
    }

    /// The upstream link is gone for good (a worker whose parent is gone):
    /// waiting dispatches fail with `error`, and so do later ones.
    pub(crate) fn link_failed(&self, error: RemoteError) {
        self.link_tx.send_replace(LinkState::Refused(error.clone()));
        let mut g = self.lock();
        if let Core::Replica { waiters, .. } = &mut g.core {
            for (_, w) in waiters.drain() {
                let _ = w.send(Err(DispatchError::Rejected(error.clone())));
            }
        }
    }

    /// A frame from upstream.
    pub(crate) fn upstream_frame(&self, frame: Frame) {
        match &frame.body {
            Some(Body::Snapshot(_)) => {
                self.stats
                    .snapshots_received
                    .fetch_add(1, Ordering::Relaxed);
            }
            Some(Body::Actions(a)) => {
                self.stats
                    .actions_received
                    .fetch_add(a.actions.len() as u64, Ordering::Relaxed);
            }
            _ => {}
        }
        let mut g = self.lock();
        let mut link_event = None;
        let head = {
            let Core::Replica {
                r,
                waiters,
                up_wake,
                ..
            } = &mut g.core
            else {
                return;
            };
            r.on_frame(frame);
            while let Some(ev) = r.poll_event() {
                match ev {
                    ReplicaEvent::Ready => link_event = Some(LinkState::Ready),
                    ReplicaEvent::Refused(e) => link_event = Some(LinkState::Refused(e)),
                    ReplicaEvent::Committed { op, seq } => {
                        if let Some(w) = waiters.remove(op) {
                            let _ = w.send(Ok(seq));
                        }
                    }
                    ReplicaEvent::Rejected { op, error } => {
                        if let Some(w) = waiters.remove(op) {
                            let _ = w.send(Err(DispatchError::Rejected(error)));
                        }
                    }
                }
            }
            if r.has_upstream_output() {
                up_wake.notify_one();
            }
            r.seq()
        };
        if let Some(LinkState::Refused(e)) = &link_event {
            // Dispatches cannot go anywhere: fail them.
            if let Core::Replica { waiters, .. } = &mut g.core {
                for (_, w) in waiters.drain() {
                    let _ = w.send(Err(DispatchError::Rejected(e.clone())));
                }
            }
        }
        g.wake_followers();
        drop(g);
        self.publish(head);
        if let Some(s) = link_event {
            self.link_tx.send_replace(s);
        }
    }

    /// Waits for the welcome (Ok) or a refusal (Err) on the current link.
    pub(crate) async fn wait_ready(&self) -> Result<(), RemoteError> {
        let mut rx = self.link_tx.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                LinkState::Ready => return Ok(()),
                LinkState::Refused(e) => return Err(e.clone()),
                LinkState::Down => {}
            }
            if rx.changed().await.is_err() {
                return Err(RemoteError::new(
                    crate::ErrorCode::Internal,
                    "store dropped",
                ));
            }
        }
    }

    pub(crate) fn is_replica(&self) -> bool {
        matches!(self.lock().core, Core::Replica { .. })
    }
}

/// A store of any reducer, as servers and clients see it.
pub(crate) trait AnyStore: Send + Sync + 'static {
    fn attach(
        self: Arc<Self>,
        hello: &proto::StoreHello,
        login: &str,
        tx: LinkTx,
        cancel: CancellationToken,
    ) -> Result<FollowerId, RemoteError>;
    fn follower_frame(&self, fid: FollowerId, frame: Frame) -> usize;
    fn detach(&self, fid: FollowerId);
    fn link_up(self: Arc<Self>, tx: LinkTx, cancel: CancellationToken) -> bool;
    fn link_down(&self);
    fn link_failed(&self, error: RemoteError);
    fn upstream_frame(&self, frame: Frame);
    fn add_role(&self, role: Role);
    fn is_replica(&self) -> bool;
    fn journal_queue(&self) -> Option<Arc<JournalQueue>>;
    fn wait_ready(&self) -> Pin<Box<dyn Future<Output = Result<(), RemoteError>> + Send + '_>>;
}

impl<R: Reducer> AnyStore for Inner<R> {
    fn attach(
        self: Arc<Self>,
        hello: &proto::StoreHello,
        login: &str,
        tx: LinkTx,
        cancel: CancellationToken,
    ) -> Result<FollowerId, RemoteError> {
        Inner::attach(&self, hello, login, tx, cancel)
    }
    fn follower_frame(&self, fid: FollowerId, frame: Frame) -> usize {
        Inner::follower_frame(self, fid, frame)
    }
    fn detach(&self, fid: FollowerId) {
        Inner::detach(self, fid)
    }
    fn link_up(self: Arc<Self>, tx: LinkTx, cancel: CancellationToken) -> bool {
        Inner::link_up(&self, tx, cancel)
    }
    fn link_down(&self) {
        Inner::link_down(self)
    }
    fn link_failed(&self, error: RemoteError) {
        Inner::link_failed(self, error)
    }
    fn upstream_frame(&self, frame: Frame) {
        Inner::upstream_frame(self, frame)
    }
    fn add_role(&self, role: Role) {
        Inner::add_role(self, role)
    }
    fn is_replica(&self) -> bool {
        Inner::is_replica(self)
    }
    fn journal_queue(&self) -> Option<Arc<JournalQueue>> {
        Inner::journal_queue(self)
    }
    fn wait_ready(&self) -> Pin<Box<dyn Future<Output = Result<(), RemoteError>> + Send + '_>> {
        Box::pin(Inner::wait_ready(self))
    }
}

impl<R: Reducer> Store<R> {
    pub(crate) fn any(&self) -> Arc<dyn AnyStore> {
        self.inner.clone()
    }
}
