//! The authority: orders actions into a history.

use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::Bytes;
use proto::frame::Body;
use proto::Frame;

use super::dedup::{Dedup, Lookup, OpState};
use super::log::{FollowerId, Log, LogConfig};
use crate::error::{DispatchError, ErrorCode, RemoteError};
use crate::reducer::{to_binary, Encoding, Reducer};

/// Settings of an [`Authority`].
#[derive(Debug, Clone)]
pub struct AuthorityConfig {
    /// History, mode and batch limits.
    pub log: LogConfig,
    /// Op ids remembered per client for duplicate detection. Default 32,768.
    pub dedup_window: usize,
    /// Clients remembered for duplicate detection (least recently seen are
    /// forgotten first). Default 10,000.
    pub dedup_clients: usize,
}

impl Default for AuthorityConfig {
    fn default() -> Self {
        AuthorityConfig {
            log: LogConfig::default(),
            dedup_window: 32_768,
            dedup_clients: 10_000,
        }
    }
}

/// What an authority starts from (a persisted history).
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// The history id (0: start a new random one).
    pub history_id: u64,
    /// A snapshot (seq, binary state), if any.
    pub snapshot: Option<(u64, Bytes)>,
    /// Committed actions, in seq order: (seq, binary action). Those after
    /// the snapshot are applied to it. Those up to and including the
    /// snapshot's seq (a *tail*, such as [`crate::BackupPersistence`] keeps
    /// in its final snapshot) are not applied again: as far as they end at
    /// the snapshot's seq without a gap, the newest of them (within the
    /// backlog limits) start the backlog, so that the restarted authority
    /// catches replicas that were behind up with actions instead of a
    /// snapshot.
    pub actions: Vec<(u64, Bytes)>,
    /// Where recent committed actions came from (any order): the restarted
    /// authority drops dispatches resent to it that are among them.
    pub origins: Vec<Origin>,
}

/// Where a committed action came from: op `op_id` of client `client_id` got
/// sequence number `seq`. Persisted with the history (see
/// [`crate::Persistence::record`]) so that a restarted authority
/// still applies a dispatch resent to it only once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The action's sequence number.
    pub seq: u64,
    /// The client that dispatched it.
    pub client_id: String,
    /// Its op id.
    pub op_id: u64,
}

impl Origin {
    /// As the persistence envelope message.
    pub fn to_proto(&self) -> proto::Origin {
        proto::Origin {
            seq: self.seq,
            client_id: self.client_id.clone(),
            op_id: self.op_id,
        }
    }

    /// From the persistence envelope message.
    pub fn from_proto(o: proto::Origin) -> Self {
        Origin {
            seq: o.seq,
            client_id: o.client_id,
            op_id: o.op_id,
        }
    }
}

/// The sans-IO authority of one store.
///
/// It takes events (a replica attached, a `Dispatch` arrived, a replica
/// left) and produces frames per follower through [`Authority::poll`]. It
/// never does IO and never looks at a clock.
pub struct Authority<R: Reducer> {
    reducer: R,
    log: Log<R>,
    dedup: Dedup,
    /// Origins of commits not yet taken by [`Authority::take_origins`]
    /// (`None`: not tracked).
    origins: Option<Vec<Origin>>,
}

impl<R: Reducer> Authority<R> {
    /// A new authority with a fresh history id taken from `history_id` (use a
    /// random non-zero value).
    pub fn new(reducer: R, config: AuthorityConfig, history_id: u64) -> Self {
        let state = reducer.initial_state();
        let mut log = Log::new(
            reducer.name().to_owned(),
            reducer.schema(),
            state,
            config.log.clone(),
        );
        log.history = history_id.max(1);
        Authority {
            reducer,
            log,
            dedup: Dedup::new(config.dedup_window, config.dedup_clients),
            origins: None,
        }
    }

    /// Starts (or stops) keeping the origins of committed dispatches for
    /// [`Authority::take_origins`] (a store with persistence does).
    pub fn track_origins(&mut self, on: bool) {
        self.origins = on.then(Vec::new);
    }

    /// The origins of dispatches committed since the last call (in seq
    /// order; actions dispatched on the authority itself have none).
    pub fn take_origins(&mut self) -> Vec<Origin> {
        self.origins
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Every committed origin still in the duplicate window, at most `seq`
    /// (what a snapshot at `seq` must keep).
    pub fn known_origins(&self, seq: u64) -> Vec<Origin> {
        let mut v: Vec<Origin> = self
            .dedup
            .committed()
            .filter(|(_, _, s)| *s <= seq)
            .map(|(c, op, s)| Origin {
                seq: s,
                client_id: c.to_owned(),
                op_id: op,
            })
            .collect();
        v.sort_by_key(|o| o.seq);
        v
    }

    /// An authority that continues a persisted history. Actions that do not
    /// follow on (gaps, undecodable) end the recovery at the last good one;
    /// a tail before the snapshot (see [`Recovered::actions`]) is kept back
    /// to its first gap or undecodable action.
    pub fn recover(
        reducer: R,
        config: AuthorityConfig,
        recovered: Recovered,
        fresh_history_id: u64,
    ) -> Result<Self, RemoteError> {
        let mut a = Authority::new(reducer, config, fresh_history_id);
        if recovered.history_id == 0 {
            return Ok(a);
        }
        a.log.history = recovered.history_id;
        let mut actions = recovered.actions.into_iter().peekable();
        if let Some((seq, bytes)) = recovered.snapshot {
            let state: R::State = Encoding::Binary
                .decode(&bytes)
                .map_err(|e| RemoteError::new(ErrorCode::Internal, format!("snapshot: {e}")))?;
            a.log.reset(recovered.history_id, seq, state, bytes);
            let mut tail = Vec::new();
            while let Some(t) = actions.next_if(|(s, _)| *s <= seq) {
                tail.push(t);
            }
            a.log.restore_tail(tail);
        }
        for (seq, bytes) in actions {
            if seq <= a.log.head {
                continue;
            }
            if seq != a.log.head + 1 {
                break;
            }
            let Ok(action) = Encoding::Binary.decode::<R::Action>(&bytes) else {
                break;
            };
            let r = &a.reducer;
            let st = &mut a.log.state;
            if catch_unwind(AssertUnwindSafe(|| r.reduce(st, &action))).is_err() {
                break;
            }
            a.log.append(bytes);
            a.log.trim(true);
        }
        let mut origins = recovered.origins;
        origins.retain(|o| o.seq >= 1 && o.seq <= a.log.head && !o.client_id.is_empty());
        origins.sort_by(|x, y| (&x.client_id, x.op_id).cmp(&(&y.client_id, y.op_id)));
        for o in origins {
            a.dedup
                .record(&o.client_id, o.op_id, OpState::Committed(o.seq));
        }
        Ok(a)
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.log.name
    }

    /// The current state.
    pub fn state(&self) -> &R::State {
        &self.log.state
    }

    /// The history id.
    pub fn history_id(&self) -> u64 {
        self.log.history
    }

    /// The last committed sequence number.
    pub fn seq(&self) -> u64 {
        self.log.head
    }

    /// Holds back everything after `seq` (acks, actions and snapshots for
    /// followers) until a later call moves past it: a persistent store sets
    /// the last durable seq here. `u64::MAX` (the default) holds nothing.
    pub fn set_durable(&mut self, seq: u64) {
        self.log.set_durable(seq);
    }

    /// The last seq that followers may see (the durable head).
    pub fn durable_seq(&self) -> u64 {
        self.log.sendable()
    }

    /// The reducer.
    pub fn reducer(&self) -> &R {
        &self.reducer
    }

    /// Committed actions after `seq` still in the backlog (for persistence).
    pub fn entries_after(&self, seq: u64) -> impl Iterator<Item = (u64, &Bytes)> {
        self.log.entries_after(seq)
    }

    /// The latest snapshot (seq, binary state), if one was taken.
    pub fn latest_snapshot(&self) -> Option<(u64, Bytes)> {
        self.log.snapshot().cloned()
    }

    /// Takes a snapshot of the current state now.
    pub fn take_snapshot(&mut self) -> Result<(u64, Bytes), RemoteError> {
        self.log.take_snapshot()
    }

    /// A replica attaches. On success it becomes a follower; the
    /// `StoreWelcome` and the catch-up frames come out of [`Authority::poll`].
    /// On failure the error goes to the caller as a `StoreError`
    /// ([`RemoteError::to_frame`]).
    pub fn on_hello(&mut self, hello: &proto::StoreHello) -> Result<FollowerId, RemoteError> {
        check_hello(&self.log.name, self.log.schema, hello)?;
        let welcome = proto::StoreWelcome {
            store: self.log.name.clone(),
            schema: self.log.schema,
            history_id: self.log.history,
            mode: self.log.cfg.mode.to_proto() as i32,
            resync: self.log.cfg.resync,
            last_op_id: self.dedup.last_op(&hello.client_id),
        };
        Ok(self.log.add_follower(hello, welcome))
    }

    /// A follower's connection is gone.
    pub fn on_leave(&mut self, id: FollowerId) {
        self.log.remove_follower(id);
    }

    /// A follower asks for a snapshot (gap or digest mismatch).
    pub fn on_resync(&mut self, id: FollowerId) {
        self.log.request_snapshot(id);
    }

    /// Acks and errors waiting for a follower (to bound what a client that
    /// dispatches without reading can pile up).
    pub fn pending_control(&self, id: FollowerId) -> usize {
        self.log
            .followers
            .get(&id)
            .map(|f| f.pending_control())
            .unwrap_or(0)
    }

    /// A `Dispatch` frame from a follower: commits its new actions, answers
    /// duplicates with their original seq. Returns how many were committed.
    pub fn on_dispatch(&mut self, id: FollowerId, d: proto::Dispatch) -> usize {
        let Some(f) = self.log.followers.get(&id) else {
            return 0;
        };
        // A relay forwards its clients' dispatches under their own client
        // ids, so a dispatch resent through another relay is recognised.
        let client = if d.client_id.is_empty() {
            f.client_id.clone()
        } else {
            d.client_id.clone()
        };
        let enc = f.encoding;
        let mut committed = 0;
        let first_op = d.op_id;
        let window = self.dedup.window();
        let mut ops = self.dedup.take(&client);
        let all = std::iter::once(d.action).chain(d.more);
        for (i, bytes) in all.enumerate() {
            let op = first_op + i as u64;
            match ops.lookup(op) {
                Lookup::Known(OpState::Committed(seq)) => self.log.ack_for(id, &client, op, seq),
                Lookup::Known(_) => {
                    let e = RemoteError::new(ErrorCode::BadAction, "rejected before");
                    self.log.error_for(id, &client, op, &e);
                }
                Lookup::Forgotten => {
                    let e = RemoteError::new(
                        ErrorCode::Forgotten,
                        "op id older than the duplicate window; it was handled before",
                    );
                    self.log.error_for(id, &client, op, &e);
                }
                Lookup::New => match self.commit_bytes(&bytes, enc) {
                    Ok(seq) => {
                        committed += 1;
                        ops.record(op, OpState::Committed(seq), window);
                        if let Some(o) = &mut self.origins {
                            o.push(Origin {
                                seq,
                                client_id: client.clone(),
                                op_id: op,
                            });
                        }
                        self.log.ack_for(id, &client, op, seq);
                    }
                    Err(e) => {
                        ops.record(op, OpState::Rejected, window);
                        self.log.error_for(id, &client, op, &e);
                    }
                },
            }
        }
        self.dedup.put(&client, ops);
        committed
    }

    /// Commits an action dispatched on the authority itself.
    pub fn dispatch(&mut self, action: &R::Action) -> Result<u64, DispatchError> {
        let bytes = Encoding::Binary.encode(action)?;
        self.apply(action, bytes).map_err(DispatchError::Rejected)
    }

    /// Commits an encoded action; returns its seq.
    pub fn commit_bytes(&mut self, bytes: &Bytes, enc: Encoding) -> Result<u64, RemoteError> {
        let (action, binary) = to_binary::<R::Action>(bytes, enc)
            .map_err(|e| RemoteError::new(ErrorCode::BadAction, e.0))?;
        self.apply(&action, binary)
    }

    fn apply(&mut self, action: &R::Action, binary: Bytes) -> Result<u64, RemoteError> {
        let r = &self.reducer;
        let st = &mut self.log.state;
        if catch_unwind(AssertUnwindSafe(|| r.reduce(st, action))).is_err() {
            self.rebuild();
            return Err(RemoteError::new(
                ErrorCode::ReducerPanic,
                "the reducer panicked; the action was not committed",
            ));
        }
        self.log.append(binary);
        self.log.checkpoint();
        self.log.trim(true);
        Ok(self.log.head)
    }

    /// After a reducer panic: state = latest snapshot + backlog after it.
    fn rebuild(&mut self) {
        let base = match self.log.snapshot() {
            Some((seq, bytes)) => match Encoding::Binary.decode::<R::State>(bytes) {
                Ok(s) => Some((*seq, s)),
                Err(_) => None,
            },
            None if self.log.first_seq() == 1 => Some((0, self.reducer.initial_state())),
            None => None,
        };
        let Some((seq, mut state)) = base else {
            tracing::error!(store = %self.log.name, "reducer panicked and no snapshot to rebuild from");
            return;
        };
        for (_, bytes) in self.log.entries_after(seq) {
            if let Ok(a) = Encoding::Binary.decode::<R::Action>(bytes) {
                let r = &self.reducer;
                let st = &mut state;
                if catch_unwind(AssertUnwindSafe(|| r.reduce(st, &a))).is_err() {
                    tracing::error!(store = %self.log.name, "reducer panicked on replay");
                }
            }
        }
        self.log.state = state;
    }

    /// Whether [`Authority::poll`] has frames for this follower.
    pub fn has_output(&self, id: FollowerId) -> bool {
        self.log.has_output(id)
    }

    /// The next frames for a follower (about `budget` bytes of payload).
    pub fn poll(&mut self, id: FollowerId, budget: usize) -> Vec<Frame> {
        self.log.poll(id, budget)
    }

    /// Followers attached now.
    pub fn followers(&self) -> Vec<FollowerId> {
        self.log.followers.keys().copied().collect()
    }
}

/// Checks a `StoreHello` against a store's name and schema.
pub(crate) fn check_hello(
    name: &str,
    schema: u32,
    hello: &proto::StoreHello,
) -> Result<(), RemoteError> {
    if hello.store != name {
        let e = RemoteError::new(
            ErrorCode::UnknownStore,
            format!("unknown store {:?}", hello.store),
        );
        return Err(e);
    }
    if hello.schema != schema {
        let e = RemoteError::new(
            ErrorCode::SchemaMismatch,
            format!(
                "store {:?}: replica schema {} differs from authority schema {}",
                name, hello.schema, schema
            ),
        );
        return Err(e);
    }
    Ok(())
}

/// The store a store-layer frame names (`None` for other frames).
pub fn store_of(frame: &Frame) -> Option<&str> {
    Some(match frame.body.as_ref()? {
        Body::StoreHello(x) => &x.store,
        Body::StoreWelcome(x) => &x.store,
        Body::Dispatch(x) => &x.store,
        Body::Committed(x) => &x.store,
        Body::Actions(x) => &x.store,
        Body::Snapshot(x) => &x.store,
        Body::Digest(x) => &x.store,
        Body::Resync(x) => &x.store,
        Body::StoreError(x) => &x.store,
        _ => return None,
    })
}
