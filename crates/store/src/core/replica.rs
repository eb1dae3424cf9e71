//! The replica: applies the authority's history in order, sends dispatches.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use proto::frame::Body;
use proto::Frame;

use super::authority::check_hello;
use super::authority::{check_batch, check_client_id};
use super::dedup::{digest as action_digest, Dedup, DedupLimits, Lookup, OpState};
use super::log::{FollowerId, Log, LogConfig, SyncMode};
use super::OpSlots;
use crate::error::{DispatchError, ErrorCode, RemoteError};
use crate::reducer::{apply, digest, to_binary, Encoding, Reducer};

/// Settings of a [`Replica`].
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// The stable client id used for duplicate detection (must be unique per
    /// replica; the runtime picks a random one).
    pub client_id: String,
    /// How payloads are encoded towards the authority. Default binary.
    pub encoding: Encoding,
    /// Most dispatches waiting to be committed (outbox plus in flight).
    /// Default 16,384.
    pub max_pending: usize,
    /// Most actions sent per poll. Default 4,096.
    pub max_dispatch_batch: usize,
    /// Backlog kept for this replica's own replicas (relay); mode and resync
    /// are taken from upstream.
    pub log: LogConfig,
    /// Duplicate window for downstream replicas (relay). Default 32,768.
    pub dedup_window: usize,
    /// Downstream clients remembered (relay). Default 10,000.
    pub dedup_clients: usize,
    /// Downstream client ids remembered per login (relay; see
    /// [`crate::core::AuthorityConfig::dedup_clients_per_login`]). Default 1,024.
    pub dedup_clients_per_login: usize,
    /// Downstream op ids remembered in all (relay). Default 1,048,576.
    pub dedup_entries: usize,
    /// Longest downstream `client_id` in bytes (relay). Default 128.
    pub max_client_id_len: usize,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            client_id: String::new(),
            encoding: Encoding::Binary,
            max_pending: 16_384,
            max_dispatch_batch: 4096,
            log: LogConfig::default(),
            dedup_window: 32_768,
            dedup_clients: 10_000,
            dedup_clients_per_login: 1_024,
            dedup_entries: 1 << 20,
            max_client_id_len: 128,
        }
    }
}

/// What a replica reports to its runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaEvent {
    /// The upstream accepted the replica (`StoreWelcome`).
    Ready,
    /// A dispatch was committed with `seq`, and the replica has applied it.
    Committed {
        /// The op id returned by [`Replica::dispatch`].
        op: u64,
        /// Its sequence number.
        seq: u64,
    },
    /// A dispatch was refused (it is not committed).
    Rejected {
        /// The op id.
        op: u64,
        /// Why.
        error: RemoteError,
    },
    /// The upstream refused the store itself (unknown store, wrong schema).
    Refused(RemoteError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    Hello,
    Ready,
}

/// The sans-IO replica of one store (optionally a relay serving its own
/// replicas).
pub struct Replica<R: Reducer> {
    reducer: R,
    log: Log<R>,
    cfg: ReplicaConfig,
    link: Link,
    next_op: u64,
    outbox: VecDeque<(u64, Bytes)>,
    inflight: OpSlots<Bytes>,
    /// Committed but not applied yet: seq -> op.
    waiting: BTreeMap<u64, u64>,
    waiting_history: u64,
    welcome_history: u64,
    up_out: VecDeque<Frame>,
    events: VecDeque<ReplicaEvent>,
    resync_requested: bool,
    /// Relay: downstream dispatches waiting to be forwarded upstream.
    relay_outbox: VecDeque<Routed>,
    /// Relay: forwarded, not answered yet, by (origin client, its op id).
    relay_inflight: HashMap<(String, u64), Routed>,
    relay_dedup: Dedup,
}

/// A downstream dispatch a relay forwards upstream under its origin's client
/// id and op id (so the authority recognises it if it comes back through
/// another relay).
struct Routed {
    /// The client that made the dispatch.
    origin: String,
    /// Its op id.
    op: u64,
    /// The client id of the follower it came from (the origin itself, or a
    /// relay below this one).
    direct: String,
    /// The action, in this replica's upstream encoding.
    action: Bytes,
}

impl<R: Reducer> Replica<R> {
    /// A replica starting from the reducer's initial state, with no history.
    pub fn new(reducer: R, cfg: ReplicaConfig) -> Self {
        let state = reducer.initial_state();
        let log = Log::new(
            reducer.name().to_owned(),
            reducer.schema(),
            state,
            cfg.log.clone(),
        );
        let relay_dedup = Dedup::new(DedupLimits {
            window: cfg.dedup_window,
            max_clients: cfg.dedup_clients,
            max_per_owner: cfg.dedup_clients_per_login,
            max_entries: cfg.dedup_entries,
        });
        Replica {
            reducer,
            log,
            cfg,
            link: Link::Down,
            next_op: 1,
            outbox: VecDeque::new(),
            inflight: OpSlots::default(),
            waiting: BTreeMap::new(),
            waiting_history: 0,
            welcome_history: 0,
            up_out: VecDeque::new(),
            events: VecDeque::new(),
            resync_requested: false,
            relay_outbox: VecDeque::new(),
            relay_inflight: HashMap::new(),
            relay_dedup,
        }
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.log.name
    }

    /// The current state.
    pub fn state(&self) -> &R::State {
        &self.log.state
    }

    /// The last applied sequence number.
    pub fn seq(&self) -> u64 {
        self.log.head
    }

    /// The history id (0 before the first snapshot).
    pub fn history_id(&self) -> u64 {
        self.log.history
    }

    /// Whether the upstream has welcomed this replica on the current link.
    pub fn is_ready(&self) -> bool {
        self.link == Link::Ready
    }

    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.cfg.client_id
    }

    /// The reducer.
    pub fn reducer(&self) -> &R {
        &self.reducer
    }

    /// Dispatches waiting to be committed (outbox, in flight, and committed
    /// but not yet applied), including those forwarded for downstream
    /// replicas (relay).
    pub fn pending(&self) -> usize {
        self.outbox.len()
            + self.inflight.len()
            + self.waiting.len()
            + self.relay_outbox.len()
            + self.relay_inflight.len()
    }

    /// Queues an action; returns its op id. The action is sent when the link is
    /// ready ([`Replica::poll_upstream`]); the op resolves with a
    /// [`ReplicaEvent::Committed`] or [`ReplicaEvent::Rejected`].
    pub fn dispatch(&mut self, action: &R::Action) -> Result<u64, DispatchError> {
        let bytes = self.cfg.encoding.encode(action)?;
        self.enqueue(bytes)
    }

    fn enqueue(&mut self, bytes: Bytes) -> Result<u64, DispatchError> {
        let pending = self.pending();
        if pending >= self.cfg.max_pending {
            return Err(DispatchError::OutboxFull {
                pending,
                limit: self.cfg.max_pending,
            });
        }
        let op = self.next_op;
        self.next_op += 1;
        self.outbox.push_back((op, bytes));
        Ok(op)
    }

    /// The link to upstream is up: queues the `StoreHello`; dispatches not yet
    /// committed will be sent (once more) after the welcome.
    pub fn on_connected(&mut self) {
        self.link = Link::Hello;
        self.up_out.clear();
        self.resync_requested = false;
        let mut resend: VecDeque<(u64, Bytes)> = self.inflight.drain().into_iter().collect();
        resend.extend(self.outbox.drain(..));
        self.outbox = resend;
        let mut relayed: Vec<Routed> = self.relay_inflight.drain().map(|(_, r)| r).collect();
        relayed.sort_by(|a, b| (&a.origin, a.op).cmp(&(&b.origin, b.op)));
        relayed.extend(self.relay_outbox.drain(..));
        self.relay_outbox = relayed.into();
        self.up_out
            .push_back(Frame::new(Body::StoreHello(proto::StoreHello {
                store: self.log.name.clone(),
                schema: self.log.schema,
                client_id: self.cfg.client_id.clone(),
                history_id: self.log.history,
                last_seq: self.log.head,
                encoding: self.cfg.encoding.to_proto() as i32,
            })));
    }

    /// The link to upstream is gone.
    pub fn on_disconnected(&mut self) {
        self.link = Link::Down;
        self.up_out.clear();
    }

    /// Frames to send upstream now (hello, resync requests, dispatch batches).
    pub fn poll_upstream(&mut self) -> Vec<Frame> {
        let mut out: Vec<Frame> = Vec::new();
        if self.link == Link::Down {
            return out;
        }
        out.extend(self.up_out.drain(..));
        if self.link != Link::Ready {
            return out;
        }
        let mut budget = self.cfg.max_dispatch_batch.max(1);
        while budget > 0 {
            let Some((op, action)) = self.outbox.pop_front() else {
                break;
            };
            budget -= 1;
            self.inflight.insert(op, action.clone());
            let mut more = Vec::new();
            while budget > 0 {
                match self.outbox.front() {
                    Some((next, _)) if *next == op + 1 + more.len() as u64 => {
                        if let Some((n, b)) = self.outbox.pop_front() {
                            self.inflight.insert(n, b.clone());
                            more.push(b);
                            budget -= 1;
                        }
                    }
                    _ => break,
                }
            }
            out.push(Frame::new(Body::Dispatch(proto::Dispatch {
                store: self.log.name.clone(),
                op_id: op,
                action,
                more,
                client_id: String::new(),
            })));
        }
        while budget > 0 {
            let Some(first) = self.relay_outbox.pop_front() else {
                break;
            };
            budget -= 1;
            let (origin, op_id, action) = (first.origin.clone(), first.op, first.action.clone());
            self.relay_inflight
                .insert((first.origin.clone(), first.op), first);
            let mut more = Vec::new();
            while budget > 0 {
                match self.relay_outbox.front() {
                    Some(r) if r.origin == origin && r.op == op_id + 1 + more.len() as u64 => {
                        if let Some(r) = self.relay_outbox.pop_front() {
                            more.push(r.action.clone());
                            self.relay_inflight.insert((r.origin.clone(), r.op), r);
                            budget -= 1;
                        }
                    }
                    _ => break,
                }
            }
            out.push(Frame::new(Body::Dispatch(proto::Dispatch {
                store: self.log.name.clone(),
                op_id,
                action,
                more,
                client_id: origin,
            })));
        }
        out
    }

    /// Whether [`Replica::poll_upstream`] has something to send.
    pub fn has_upstream_output(&self) -> bool {
        match self.link {
            Link::Down => false,
            Link::Hello => !self.up_out.is_empty(),
            Link::Ready => {
                !self.up_out.is_empty() || !self.outbox.is_empty() || !self.relay_outbox.is_empty()
            }
        }
    }

    /// The next event for the runtime.
    pub fn poll_event(&mut self) -> Option<ReplicaEvent> {
        self.events.pop_front()
    }

    /// A frame from upstream.
    pub fn on_frame(&mut self, frame: Frame) {
        let Some(body) = frame.body else { return };
        match body {
            Body::StoreWelcome(w) => {
                self.link = Link::Ready;
                self.welcome_history = w.history_id;
                self.log.cfg.mode = SyncMode::from_proto(w.mode);
                self.log.cfg.resync = w.resync;
                self.events.push_back(ReplicaEvent::Ready);
            }
            Body::StoreError(e) => {
                let err = RemoteError::from_frame(&e);
                if e.op_id == 0 {
                    if matches!(
                        err.code,
                        ErrorCode::UnknownStore | ErrorCode::SchemaMismatch
                    ) {
                        self.events.push_back(ReplicaEvent::Refused(err));
                    } else {
                        tracing::warn!(store = %self.log.name, error = %err, "store error from upstream");
                    }
                } else {
                    // A range: at most as many op ids as can be in flight.
                    let limit = (self.cfg.max_pending as u64).saturating_mul(2).max(1);
                    let count = e.count.clamp(1, limit);
                    let relayed = self.is_relayed(&e.client_id);
                    for k in 0..count {
                        let Some(op) = e.op_id.checked_add(k) else {
                            break;
                        };
                        if relayed {
                            self.relayed_answer(&e.client_id, op, Err(err.clone()));
                        } else {
                            self.rejected(op, err.clone());
                        }
                    }
                }
            }
            Body::Committed(c) => {
                let relayed = self.is_relayed(&c.client_id);
                let all = std::iter::once(c.seq).chain(c.more_seqs);
                for (i, seq) in all.enumerate() {
                    if seq == 0 {
                        continue;
                    }
                    let op = c.op_id + i as u64;
                    if relayed {
                        self.relayed_answer(&c.client_id, op, Ok(seq));
                    } else {
                        self.committed(op, seq);
                    }
                }
            }
            Body::Actions(a) => self.on_actions(a),
            Body::Snapshot(s) => self.on_snapshot(s),
            Body::Digest(d) => self.on_digest(d),
            _ => {}
        }
    }

    /// Whether an answer's client id names a downstream client (relay).
    fn is_relayed(&self, client_id: &str) -> bool {
        !client_id.is_empty() && client_id != self.cfg.client_id
    }

    /// Upstream answered a dispatch this relay forwarded for `origin`.
    fn relayed_answer(&mut self, origin: &str, op: u64, answer: Result<u64, RemoteError>) {
        let Some(r) = self.relay_inflight.remove(&(origin.to_owned(), op)) else {
            return; // Duplicate answer, or not forwarded by this relay.
        };
        let state = match answer {
            Ok(seq) => OpState::Committed(seq),
            Err(_) => OpState::Rejected,
        };
        self.relay_dedup.record("", origin, op, state, 0);
        if let Some(fid) = self.log.follower_of(&r.direct) {
            match answer {
                Ok(seq) => self.log.ack_for(fid, origin, op, seq),
                Err(e) => self.log.error_for(fid, origin, op, &e),
            }
        }
    }

    fn committed(&mut self, op: u64, seq: u64) {
        if self.inflight.remove(op).is_none() {
            return; // Duplicate answer.
        }
        if self.waiting_history != self.welcome_history {
            self.fail_waiting();
            self.waiting_history = self.welcome_history;
        }
        self.waiting.insert(seq, op);
        self.resolve_waiting();
    }

    fn rejected(&mut self, op: u64, err: RemoteError) {
        if self.inflight.remove(op).is_none() {
            return;
        }
        self.events
            .push_back(ReplicaEvent::Rejected { op, error: err });
    }

    fn fail_waiting(&mut self) {
        for (_, op) in std::mem::take(&mut self.waiting) {
            self.events.push_back(ReplicaEvent::Rejected {
                op,
                error: RemoteError::new(
                    ErrorCode::HistoryLost,
                    "committed in a history the authority no longer has",
                ),
            });
        }
    }

    fn resolve_waiting(&mut self) {
        if self.log.history != self.waiting_history {
            return;
        }
        while let Some((&seq, &op)) = self.waiting.first_key_value() {
            if seq > self.log.head {
                break;
            }
            self.waiting.pop_first();
            self.events.push_back(ReplicaEvent::Committed { op, seq });
        }
    }

    fn request_resync(&mut self) {
        if self.resync_requested || self.link == Link::Down {
            return;
        }
        self.resync_requested = true;
        self.up_out
            .push_back(Frame::new(Body::Resync(proto::Resync {
                store: self.log.name.clone(),
                history_id: self.log.history,
                last_seq: self.log.head,
            })));
    }

    fn on_actions(&mut self, a: proto::Actions) {
        if a.history_id != self.log.history {
            self.request_resync();
            return;
        }
        let mut seq = a.first_seq;
        for bytes in a.actions {
            if seq <= self.log.head {
                seq += 1;
                continue;
            }
            if seq > self.log.head + 1 {
                self.request_resync();
                break;
            }
            let Ok((action, binary)) = to_binary::<R::Action>(&bytes, self.cfg.encoding) else {
                self.request_resync();
                break;
            };
            let r = &self.reducer;
            let st = &mut self.log.state;
            if apply(r, st, &action).is_err() {
                tracing::error!(store = %self.log.name, seq, "reducer failed on a committed action");
                self.request_resync();
                break;
            }
            if self.log.followers.is_empty() {
                self.log.advance();
            } else {
                self.log.append(binary);
            }
            seq += 1;
        }
        self.log.trim(false);
        self.resolve_waiting();
    }

    fn on_snapshot(&mut self, s: proto::Snapshot) {
        let Ok((state, binary)) = to_binary::<R::State>(&s.state, self.cfg.encoding) else {
            tracing::error!(store = %self.log.name, "undecodable snapshot");
            return;
        };
        if s.history_id != self.log.history {
            if self.waiting_history != s.history_id {
                self.fail_waiting();
                self.waiting_history = s.history_id;
            }
            self.log.reset(s.history_id, s.seq, state, binary);
        } else if s.seq > self.log.head {
            self.log.reset(s.history_id, s.seq, state, binary);
        } else if s.seq == self.log.head {
            self.log.state = state;
            self.log.set_snapshot(s.seq, binary);
        } else {
            return;
        }
        self.resync_requested = false;
        self.resolve_waiting();
    }

    fn on_digest(&mut self, d: proto::Digest) {
        if d.history_id != self.log.history || d.seq != self.log.head {
            return;
        }
        let ours = match Encoding::Binary.encode(&self.log.state) {
            Ok(b) => digest(&b),
            Err(_) => Bytes::new(),
        };
        if ours != d.digest {
            tracing::warn!(store = %self.log.name, seq = d.seq, "state digest mismatch; asking for a snapshot");
            self.request_resync();
        } else {
            self.log.push_digest(d.seq, d.digest);
        }
    }

    // ---- relay: serving this replica's own replicas ----

    /// A downstream replica attaches to this relay.
    pub fn serve_hello(&mut self, hello: &proto::StoreHello) -> Result<FollowerId, RemoteError> {
        self.serve_hello_as(hello, "")
    }

    /// As [`Replica::serve_hello`], for a connection logged in as `login`
    /// (the client ids it dispatches for count against that login).
    pub fn serve_hello_as(
        &mut self,
        hello: &proto::StoreHello,
        login: &str,
    ) -> Result<FollowerId, RemoteError> {
        check_hello(&self.log.name, self.log.schema, hello)?;
        check_client_id(&hello.client_id, self.cfg.max_client_id_len)?;
        let welcome = proto::StoreWelcome {
            store: self.log.name.clone(),
            schema: self.log.schema,
            history_id: self.log.history,
            mode: self.log.cfg.mode.to_proto() as i32,
            resync: self.log.cfg.resync,
            last_op_id: self.relay_dedup.last_op(&hello.client_id),
        };
        Ok(self.log.add_follower(hello, welcome, login))
    }

    /// A downstream replica left.
    pub fn serve_leave(&mut self, id: FollowerId) {
        self.log.remove_follower(id);
    }

    /// A downstream replica asks for a snapshot.
    pub fn serve_resync(&mut self, id: FollowerId) {
        self.log.request_snapshot(id);
    }

    /// Acks and errors waiting for a downstream replica.
    pub fn pending_control(&self, id: FollowerId) -> usize {
        self.log
            .followers
            .get(&id)
            .map(|f| f.pending_control())
            .unwrap_or(0)
    }

    /// A downstream `Dispatch`: forwarded upstream under the client id and
    /// op ids of the replica that made it (exactly once per (client, op id)
    /// while this relay lives; the authority drops duplicates that come back
    /// through another relay).
    pub fn serve_dispatch(&mut self, id: FollowerId, d: proto::Dispatch) {
        let Some(f) = self.log.followers.get(&id) else {
            return;
        };
        let n = 1 + d.more.len();
        let checked = check_batch(
            &d,
            n,
            self.cfg.max_dispatch_batch.max(self.cfg.log.max_batch),
            self.cfg.max_client_id_len,
        );
        let direct = f.client_id.clone();
        let origin = if d.client_id.is_empty() {
            direct.clone()
        } else {
            d.client_id
        };
        let enc = f.encoding;
        let login = f.login.clone();
        let first = d.op_id;
        if let Err(e) = checked {
            let origin = if origin.len() > self.cfg.max_client_id_len {
                String::new()
            } else {
                origin
            };
            self.log.error_range(id, &origin, first, n as u64, &e);
            return;
        }
        for (i, bytes) in std::iter::once(d.action).chain(d.more).enumerate() {
            let op = first + i as u64;
            let lookup = self.relay_dedup.lookup(&origin, op);
            if let Lookup::Known(OpState::Committed(_) | OpState::Pending, known) = lookup {
                let same = known == 0
                    || to_binary::<R::Action>(&bytes, enc)
                        .is_ok_and(|(_, b)| action_digest(&b) == known);
                if !same {
                    let e = RemoteError::new(
                        ErrorCode::OpIdReused,
                        format!(
                            "op id {op} of this client id was already dispatched with another \
                             action; nothing was committed (use a new random client id per \
                             client instance)"
                        ),
                    );
                    self.log.error_for(id, &origin, op, &e);
                    continue;
                }
            }
            match lookup {
                Lookup::Known(OpState::Committed(seq), _) => self.log.ack_for(id, &origin, op, seq),
                Lookup::Known(OpState::Pending, _) => {}
                Lookup::Known(..) => {
                    let e = RemoteError::new(ErrorCode::BadAction, "rejected before");
                    self.log.error_for(id, &origin, op, &e);
                }
                Lookup::Forgotten => {
                    let e = RemoteError::new(ErrorCode::Forgotten, "op id older than the window");
                    self.log.error_for(id, &origin, op, &e);
                }
                Lookup::New => {
                    let mut dg = 0;
                    let upstream = to_binary::<R::Action>(&bytes, enc).and_then(|(_, binary)| {
                        dg = action_digest(&binary);
                        match self.cfg.encoding {
                            Encoding::Binary => Ok(binary),
                            enc => crate::reducer::transcode::<R::Action>(&binary, enc),
                        }
                    });
                    let action = match upstream {
                        Ok(b) => b,
                        Err(e) => {
                            self.relay_dedup
                                .record(&login, &origin, op, OpState::Rejected, 0);
                            let e = RemoteError::new(ErrorCode::BadAction, e.0);
                            self.log.error_for(id, &origin, op, &e);
                            continue;
                        }
                    };
                    let pending = self.pending();
                    if pending >= self.cfg.max_pending {
                        let e = DispatchError::OutboxFull {
                            pending,
                            limit: self.cfg.max_pending,
                        };
                        let e = RemoteError::new(ErrorCode::OutboxFull, e.to_string());
                        self.log.error_for(id, &origin, op, &e);
                        continue;
                    }
                    self.relay_dedup
                        .record(&login, &origin, op, OpState::Pending, dg);
                    self.relay_outbox.push_back(Routed {
                        origin: origin.clone(),
                        op,
                        direct: direct.clone(),
                        action,
                    });
                }
            }
        }
    }

    /// Whether [`Replica::poll_follower`] has frames for a downstream replica.
    pub fn has_follower_output(&self, id: FollowerId) -> bool {
        self.log.has_output(id)
    }

    /// The next frames for a downstream replica.
    pub fn poll_follower(&mut self, id: FollowerId, budget: usize) -> Vec<Frame> {
        self.log.poll(id, budget)
    }
}
