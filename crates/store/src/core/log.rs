//! The ordered history that authorities and relays serve to their followers.

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;

use bytes::Bytes;
use proto::frame::Body;
use proto::Frame;

use crate::error::{ErrorCode, RemoteError};
use crate::reducer::{digest, transcode, Encoding, Reducer};

/// How an authority sends changes to its replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Committed actions, plus a full snapshot every `resync` actions (the
    /// default of redux-cluster).
    #[default]
    Action,
    /// The whole state after each change (batches of actions are coalesced).
    Snapshot,
    /// Committed actions, plus a digest of the state every `resync` actions;
    /// a replica whose digest differs asks for a snapshot.
    Digest,
}

impl SyncMode {
    pub(crate) fn to_proto(self) -> proto::SyncMode {
        match self {
            SyncMode::Action => proto::SyncMode::Action,
            SyncMode::Snapshot => proto::SyncMode::Snapshot,
            SyncMode::Digest => proto::SyncMode::Digest,
        }
    }

    pub(crate) fn from_proto(v: i32) -> SyncMode {
        match proto::SyncMode::try_from(v) {
            Ok(proto::SyncMode::Snapshot) => SyncMode::Snapshot,
            Ok(proto::SyncMode::Digest) => SyncMode::Digest,
            _ => SyncMode::Action,
        }
    }
}

/// Limits of the history kept for catching followers up, and of batches.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Sync mode.
    pub mode: SyncMode,
    /// Snapshot (action mode) or digest (digest mode) period, in actions. Default 1000.
    pub resync: u64,
    /// Most committed actions kept for catch-up. Default 16,384.
    pub backlog_count: usize,
    /// Most bytes of committed actions kept for catch-up. Default 8 MiB.
    pub backlog_bytes: usize,
    /// Most actions in one `Actions` frame. Default 4,096.
    pub max_batch: usize,
    /// Target size of one `Actions` frame in bytes. Default 256 KiB.
    pub max_batch_bytes: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            mode: SyncMode::Action,
            resync: 1000,
            backlog_count: 16_384,
            backlog_bytes: 8 << 20,
            max_batch: 4096,
            max_batch_bytes: 256 << 10,
        }
    }
}

/// Identifies a follower (a downstream replica attached over one connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FollowerId(pub u64);

pub(crate) struct Follower {
    pub(crate) client_id: String,
    /// The login of the follower's connection ("" when unknown).
    pub(crate) login: String,
    pub(crate) encoding: Encoding,
    /// History the follower has (0: none).
    history: u64,
    /// Next sequence number to send.
    next: u64,
    welcome: Option<proto::StoreWelcome>,
    need_snapshot: bool,
    /// (op id, seq) acknowledgements to send; seq 0 = answered by an error.
    acks: Vec<(u64, u64)>,
    /// Acknowledgements of op ids of other clients (this follower is a relay
    /// that forwarded them): (client id, op id, seq).
    relayed: Vec<(String, u64, u64)>,
    control: VecDeque<Frame>,
}

impl Follower {
    pub(crate) fn pending_control(&self) -> usize {
        self.acks.len() + self.relayed.len() + self.control.len()
    }
}

/// The state plus the tail of its history, and the followers it feeds.
pub(crate) struct Log<R: Reducer> {
    pub(crate) name: String,
    pub(crate) schema: u32,
    pub(crate) state: R::State,
    pub(crate) history: u64,
    /// Last committed (or applied) sequence number; 0 before the first action.
    pub(crate) head: u64,
    /// Highest seq that may leave the log (acks, actions, snapshots): the
    /// last durable one of an authority with persistence, `u64::MAX` else.
    durable: u64,
    backlog: VecDeque<Bytes>,
    backlog_bytes: usize,
    /// The latest encoded snapshot (seq, binary state).
    snap: Option<(u64, Bytes)>,
    digests: VecDeque<(u64, Bytes)>,
    pub(crate) followers: HashMap<FollowerId, Follower>,
    by_client: HashMap<String, FollowerId>,
    next_follower: u64,
    pub(crate) cfg: LogConfig,
    _r: PhantomData<fn() -> R>,
}

impl<R: Reducer> Log<R> {
    pub(crate) fn new(name: String, schema: u32, state: R::State, cfg: LogConfig) -> Self {
        Log {
            name,
            schema,
            state,
            history: 0,
            head: 0,
            durable: u64::MAX,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            snap: None,
            digests: VecDeque::new(),
            followers: HashMap::new(),
            by_client: HashMap::new(),
            next_follower: 1,
            cfg,
            _r: PhantomData,
        }
    }

    /// Holds back everything after `seq` (acks, actions, snapshots) until
    /// [`Log::set_durable`] moves past it; `u64::MAX`: nothing is held.
    pub(crate) fn set_durable(&mut self, seq: u64) {
        self.durable = seq;
    }

    /// The last seq that may be sent (the durable head).
    pub(crate) fn sendable(&self) -> u64 {
        self.head.min(self.durable)
    }

    /// Sequence number of the first action in the backlog (head + 1 when empty).
    pub(crate) fn first_seq(&self) -> u64 {
        self.head + 1 - self.backlog.len() as u64
    }

    /// The committed actions after `seq` that are still in the backlog.
    pub(crate) fn entries_after(&self, seq: u64) -> impl Iterator<Item = (u64, &Bytes)> {
        let first = self.first_seq();
        let skip = seq.saturating_add(1).saturating_sub(first) as usize;
        self.backlog
            .iter()
            .enumerate()
            .skip(skip)
            .map(move |(i, b)| (first + i as u64, b))
    }

    pub(crate) fn snapshot(&self) -> Option<&(u64, Bytes)> {
        self.snap.as_ref()
    }

    /// Appends an action that has been applied to `state`.
    pub(crate) fn append(&mut self, binary: Bytes) {
        self.head += 1;
        // A copy: the argument is often a slice of a whole received buffer,
        // which the backlog must not keep alive.
        let binary = Bytes::copy_from_slice(&binary);
        self.backlog_bytes += binary.len();
        self.backlog.push_back(binary);
    }

    /// Advances past an applied action without keeping it (nobody to serve).
    pub(crate) fn advance(&mut self) {
        self.head += 1;
        if !self.backlog.is_empty() {
            self.backlog.clear();
            self.backlog_bytes = 0;
        }
    }

    /// Drops the oldest actions beyond the limits. With `keep_covered`, first
    /// takes a fresh snapshot if trimming would leave the latest snapshot
    /// without the actions that follow it.
    pub(crate) fn trim(&mut self, keep_covered: bool) {
        let over = |l: &Self| {
            l.backlog.len() > l.cfg.backlog_count || l.backlog_bytes > l.cfg.backlog_bytes
        };
        if !over(self) {
            return;
        }
        if keep_covered {
            let mut first = self.first_seq();
            let mut count = self.backlog.len();
            let mut bytes = self.backlog_bytes;
            let mut i = 0;
            while count > self.cfg.backlog_count || bytes > self.cfg.backlog_bytes {
                bytes -= self.backlog[i].len();
                count -= 1;
                i += 1;
                first += 1;
            }
            let covered = matches!(self.snap, Some((s, _)) if s + 1 >= first);
            if !covered {
                // Errors leave the old snapshot; recovery then relies on what is left.
                let _ = self.take_snapshot();
            }
        }
        while over(self) {
            if let Some(b) = self.backlog.pop_front() {
                self.backlog_bytes -= b.len();
            } else {
                break;
            }
        }
    }

    /// Encodes the current state as the latest snapshot.
    pub(crate) fn take_snapshot(&mut self) -> Result<(u64, Bytes), RemoteError> {
        if let Some((s, b)) = &self.snap {
            if *s == self.head {
                return Ok((*s, b.clone()));
            }
        }
        let bytes = Encoding::Binary
            .encode(&self.state)
            .map_err(|e| RemoteError::new(ErrorCode::Internal, format!("state: {e}")))?;
        self.snap = Some((self.head, bytes.clone()));
        Ok((self.head, bytes))
    }

    /// Records a snapshot received from upstream (binary).
    pub(crate) fn set_snapshot(&mut self, seq: u64, bytes: Bytes) {
        self.snap = Some((seq, bytes));
    }

    /// Records the digest of the state at `seq`.
    pub(crate) fn push_digest(&mut self, seq: u64, d: Bytes) {
        self.digests.push_back((seq, d));
        while self.digests.len() > 16 {
            self.digests.pop_front();
        }
    }

    /// Called by the authority after each commit: periodic snapshot or digest.
    pub(crate) fn checkpoint(&mut self) {
        if self.cfg.resync == 0 || self.head % self.cfg.resync != 0 {
            return;
        }
        match self.cfg.mode {
            SyncMode::Action => {
                let _ = self.take_snapshot();
            }
            SyncMode::Digest => {
                if let Ok((seq, b)) = self.take_snapshot() {
                    let d = digest(&b);
                    self.push_digest(seq, d);
                }
            }
            SyncMode::Snapshot => {}
        }
    }

    /// Starts a new history at `seq` with `state` (a relay following upstream).
    pub(crate) fn reset(&mut self, history: u64, seq: u64, state: R::State, bytes: Bytes) {
        self.history = history;
        self.head = seq;
        self.state = state;
        self.backlog.clear();
        self.backlog_bytes = 0;
        self.digests.clear();
        self.snap = Some((seq, bytes));
    }

    /// Puts committed actions back into the empty backlog of a restarted
    /// history whose state is at `head` already (they are not applied): the
    /// newest of `tail` (in seq order) as far as they end at `head` without a
    /// gap, decode, and fit the backlog limits.
    pub(crate) fn restore_tail(&mut self, tail: Vec<(u64, Bytes)>) {
        if !self.backlog.is_empty() {
            return;
        }
        let mut expect = self.head;
        for (seq, b) in tail.into_iter().rev() {
            if expect == 0
                || seq != expect
                || self.backlog.len() >= self.cfg.backlog_count
                || self.backlog_bytes + b.len() > self.cfg.backlog_bytes
                || Encoding::Binary.decode::<R::Action>(&b).is_err()
            {
                break;
            }
            self.backlog_bytes += b.len();
            self.backlog.push_front(b);
            expect -= 1;
        }
    }

    // ---- followers ----

    pub(crate) fn add_follower(
        &mut self,
        hello: &proto::StoreHello,
        welcome: proto::StoreWelcome,
        login: &str,
    ) -> FollowerId {
        let id = FollowerId(self.next_follower);
        self.next_follower += 1;
        let f = Follower {
            client_id: hello.client_id.clone(),
            login: login.to_owned(),
            encoding: Encoding::from_proto(hello.encoding),
            history: hello.history_id,
            next: hello.last_seq.saturating_add(1),
            welcome: Some(welcome),
            need_snapshot: false,
            acks: Vec::new(),
            relayed: Vec::new(),
            control: VecDeque::new(),
        };
        self.by_client.insert(f.client_id.clone(), id);
        self.followers.insert(id, f);
        id
    }

    pub(crate) fn remove_follower(&mut self, id: FollowerId) {
        if let Some(f) = self.followers.remove(&id) {
            if self.by_client.get(&f.client_id) == Some(&id) {
                self.by_client.remove(&f.client_id);
            }
        }
    }

    pub(crate) fn follower_of(&self, client: &str) -> Option<FollowerId> {
        self.by_client.get(client).copied()
    }

    /// Acknowledges op `op` of `client`, which may be the follower itself or
    /// a client behind it (the follower is a relay).
    pub(crate) fn ack_for(&mut self, id: FollowerId, client: &str, op: u64, seq: u64) {
        if let Some(f) = self.followers.get_mut(&id) {
            if f.client_id == client {
                f.acks.push((op, seq));
            } else {
                f.relayed.push((client.to_owned(), op, seq));
            }
        }
    }

    /// As [`Log::error`], for op `op` of `client` (see [`Log::ack_for`]).
    pub(crate) fn error_for(&mut self, id: FollowerId, client: &str, op: u64, err: &RemoteError) {
        let Some(f) = self.followers.get_mut(&id) else {
            return;
        };
        if f.client_id == client {
            return self.error(id, op, err);
        }
        f.relayed.push((client.to_owned(), op, 0));
        f.control
            .push_back(err.to_frame_for(&self.name, op, client));
    }

    /// One error frame for op ids `op .. op + count` of `client` (no
    /// per-op acks: the frame names the range).
    pub(crate) fn error_range(
        &mut self,
        id: FollowerId,
        client: &str,
        op: u64,
        count: u64,
        err: &RemoteError,
    ) {
        let Some(f) = self.followers.get_mut(&id) else {
            return;
        };
        let to = if f.client_id == client { "" } else { client };
        f.control
            .push_back(err.to_frame_range(&self.name, op, count, to));
    }

    pub(crate) fn error(&mut self, id: FollowerId, op: u64, err: &RemoteError) {
        let frame = err.to_frame(&self.name, op);
        if let Some(f) = self.followers.get_mut(&id) {
            if op != 0 {
                f.acks.push((op, 0));
            }
            f.control.push_back(frame);
        }
    }

    pub(crate) fn request_snapshot(&mut self, id: FollowerId) {
        if let Some(f) = self.followers.get_mut(&id) {
            f.need_snapshot = true;
        }
    }

    /// Whether `poll` would return something for this follower.
    pub(crate) fn has_output(&self, id: FollowerId) -> bool {
        match self.followers.get(&id) {
            None => false,
            Some(f) => {
                let top = self.sendable();
                self.history != 0
                    && (f.welcome.is_some()
                        || f.acks.first().is_some_and(|a| a.1 <= top)
                        || f.relayed.first().is_some_and(|a| a.2 <= top)
                        || !f.control.is_empty()
                        || f.need_snapshot
                        || f.next <= top
                        || f.history != self.history)
            }
        }
    }

    /// The next frames for a follower, about `budget` bytes at most (at least
    /// one frame when anything is due).
    pub(crate) fn poll(&mut self, id: FollowerId, budget: usize) -> Vec<Frame> {
        let mut out = Vec::new();
        if self.history == 0 {
            // A relay that has not synced yet: nothing to say.
            return out;
        }
        let Some(mut f) = self.followers.remove(&id) else {
            return out;
        };
        if let Some(w) = f.welcome.take() {
            let mut w = w;
            w.history_id = self.history;
            w.mode = self.cfg.mode.to_proto() as i32;
            w.resync = self.cfg.resync;
            out.push(Frame::new(Body::StoreWelcome(w)));
        }
        out.extend(f.control.drain(..));
        // Acks of actions not durable yet wait (errors, seq 0, do not).
        let top = self.sendable();
        let n = f.acks.iter().take_while(|a| a.1 <= top).count();
        if n > 0 {
            pack_acks(&self.name, &f.acks[..n], &mut out);
            f.acks.drain(..n);
        }
        let n = f.relayed.iter().take_while(|a| a.2 <= top).count();
        if n > 0 {
            pack_relayed(&self.name, &f.relayed[..n], &mut out);
            f.relayed.drain(..n);
        }
        let mut used = 0usize;
        while used < budget {
            let first = self.first_seq();
            let behind = f.next <= self.head && f.next < first;
            if f.need_snapshot || f.history != self.history || behind {
                let Some(snap) = self.catchup_snapshot() else {
                    // Wait until a snapshot is durable.
                    break;
                };
                match snap {
                    Ok((seq, bytes)) => {
                        used += bytes.len();
                        out.push(self.snapshot_frame(seq, &bytes, f.encoding));
                        f.next = seq + 1;
                        f.history = self.history;
                        f.need_snapshot = false;
                    }
                    Err(e) => {
                        out.push(e.to_frame(&self.name, 0));
                        f.need_snapshot = false;
                        f.history = self.history;
                        f.next = self.head + 1;
                    }
                }
                continue;
            }
            if f.next > top {
                break;
            }
            if self.cfg.mode == SyncMode::Snapshot {
                // The latest snapshot once it is durable; a newer one is
                // taken when it is older than what the follower has.
                let snap = match &self.snap {
                    Some((s, b)) if *s >= f.next => Ok((*s, b.clone())),
                    _ => self.take_snapshot(),
                };
                match snap {
                    Ok((seq, _)) if seq > top => {}
                    Ok((seq, bytes)) => {
                        out.push(self.snapshot_frame(seq, &bytes, f.encoding));
                        f.next = seq + 1;
                    }
                    Err(e) => {
                        out.push(e.to_frame(&self.name, 0));
                        f.next = self.head + 1;
                    }
                }
                break;
            }
            // A batch of actions, cut at the next multiple of `resync`.
            let mut end = top.min(f.next + self.cfg.max_batch as u64 - 1);
            if self.cfg.resync > 0 {
                let boundary = f.next.div_ceil(self.cfg.resync) * self.cfg.resync;
                end = end.min(boundary);
            }
            let start_idx = (f.next - first) as usize;
            let mut actions = Vec::with_capacity((end - f.next + 1) as usize);
            let mut bytes = 0usize;
            let mut seq = f.next;
            while seq <= end {
                let b = &self.backlog[start_idx + (seq - f.next) as usize];
                let item = match f.encoding {
                    Encoding::Binary => b.clone(),
                    enc => match transcode::<R::Action>(b, enc) {
                        Ok(x) => x,
                        Err(_) => Bytes::new(),
                    },
                };
                bytes += item.len() + 2;
                actions.push(item);
                seq += 1;
                if bytes >= self.cfg.max_batch_bytes {
                    break;
                }
            }
            let last = seq - 1;
            out.push(Frame::new(Body::Actions(proto::Actions {
                store: self.name.clone(),
                history_id: self.history,
                first_seq: f.next,
                actions,
            })));
            used += bytes;
            f.next = last + 1;
            if self.cfg.resync > 0 && last % self.cfg.resync == 0 {
                match self.cfg.mode {
                    SyncMode::Action => {
                        if let Some((s, b)) = &self.snap {
                            if *s == last {
                                let b = b.clone();
                                used += b.len();
                                out.push(self.snapshot_frame(last, &b, f.encoding));
                            }
                        }
                    }
                    SyncMode::Digest => {
                        if let Some((_, d)) = self.digests.iter().find(|(s, _)| *s == last) {
                            out.push(Frame::new(Body::Digest(proto::Digest {
                                store: self.name.clone(),
                                history_id: self.history,
                                seq: last,
                                digest: d.clone(),
                            })));
                        }
                    }
                    SyncMode::Snapshot => {}
                }
            }
        }
        self.followers.insert(id, f);
        out
    }

    /// A snapshot from which the backlog continues: the latest one if the
    /// backlog still covers what follows it, else a fresh one. `None`: the
    /// snapshot is not durable yet (wait for [`Log::set_durable`]).
    fn catchup_snapshot(&mut self) -> Option<Result<(u64, Bytes), RemoteError>> {
        let top = self.sendable();
        if let Some((s, b)) = &self.snap {
            if *s + 1 >= self.first_seq() && *s <= top {
                return Some(Ok((*s, b.clone())));
            }
            if *s + 1 >= self.first_seq() && *s <= self.head {
                return None;
            }
        }
        match self.take_snapshot() {
            Ok((s, _)) if s > top => None,
            r => Some(r),
        }
    }

    fn snapshot_frame(&self, seq: u64, binary: &Bytes, enc: Encoding) -> Frame {
        let state = match enc {
            Encoding::Binary => binary.clone(),
            enc => transcode::<R::State>(binary, enc).unwrap_or_default(),
        };
        Frame::new(Body::Snapshot(proto::Snapshot {
            store: self.name.clone(),
            history_id: self.history,
            seq,
            state,
        }))
    }
}

/// Packs (op, seq) pairs into `Committed` frames, one per run of consecutive op ids.
fn pack_acks(store: &str, acks: &[(u64, u64)], out: &mut Vec<Frame>) {
    let mut i = 0;
    while i < acks.len() {
        let (op, seq) = acks[i];
        let mut more = Vec::new();
        let mut j = i + 1;
        while j < acks.len() && acks[j].0 == op + (j - i) as u64 {
            more.push(acks[j].1);
            j += 1;
        }
        out.push(Frame::new(Body::Committed(proto::Committed {
            store: store.to_owned(),
            op_id: op,
            seq,
            more_seqs: more,
            client_id: String::new(),
        })));
        i = j;
    }
}

/// Packs (client, op, seq) triples into `Committed` frames carrying the
/// client id, one per run of consecutive op ids of one client.
fn pack_relayed(store: &str, acks: &[(String, u64, u64)], out: &mut Vec<Frame>) {
    let mut i = 0;
    while i < acks.len() {
        let (client, op, seq) = &acks[i];
        let mut more = Vec::new();
        let mut j = i + 1;
        while j < acks.len() && acks[j].0 == *client && acks[j].1 == op + (j - i) as u64 {
            more.push(acks[j].2);
            j += 1;
        }
        out.push(Frame::new(Body::Committed(proto::Committed {
            store: store.to_owned(),
            op_id: *op,
            seq: *seq,
            more_seqs: more,
            client_id: client.clone(),
        })));
        i = j;
    }
}
