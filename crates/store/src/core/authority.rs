//! The authority: orders actions into a history.

use std::sync::Arc;

use bytes::Bytes;
use proto::frame::Body;
use proto::Frame;

use super::dedup::{digest, Dedup, DedupDump, DedupLimits, Lookup, OpState};
use super::log::{FollowerId, Log, LogConfig};
use crate::error::{DispatchError, ErrorCode, RemoteError};
use crate::reducer::{apply, to_binary, ApplyError, Encoding, Reducer};

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
    /// Client ids remembered per login (the login of the connection that
    /// dispatched); past it, that login's least recently seen client id is
    /// forgotten. A relay's login carries all its replicas' client ids.
    /// Default 1,024.
    pub dedup_clients_per_login: usize,
    /// Op ids remembered in all, all clients together; past it the least
    /// recently seen client is forgotten. Default 1,048,576 (about 32 MiB).
    pub dedup_entries: usize,
    /// Most actions in one `Dispatch` frame (`action` plus `more`); a larger
    /// frame is refused whole with one `StoreError` (`BAD_ACTION`, covering
    /// all its op ids) and nothing of it is committed. Keep it at least the
    /// replicas' `LogConfig::max_batch`. Default 4,096.
    pub max_dispatch_batch: usize,
    /// Longest `client_id` in bytes (in `StoreHello` and `Dispatch`); a
    /// longer one is refused (`BAD_ACTION` for a dispatch, `INTERNAL` for a
    /// hello). Default 128.
    pub max_client_id_len: usize,
}

impl Default for AuthorityConfig {
    fn default() -> Self {
        AuthorityConfig {
            log: LogConfig::default(),
            dedup_window: 32_768,
            dedup_clients: 10_000,
            dedup_clients_per_login: 1_024,
            dedup_entries: 1 << 20,
            max_dispatch_batch: 4_096,
            max_client_id_len: 128,
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
    /// The client that dispatched it (shared by the origins of one
    /// client's dispatch frame: no copy per action).
    pub client_id: Arc<str>,
    /// Its op id.
    pub op_id: u64,
    /// A digest of the binary action (FNV-1a 64; 0: unknown, as in files
    /// written before digests existed), so that the restarted authority
    /// still refuses that op id for another action.
    pub digest: u64,
}

impl Origin {
    /// As the persistence envelope message.
    pub fn to_proto(&self) -> proto::Origin {
        proto::Origin {
            seq: self.seq,
            client_id: self.client_id.to_string(),
            op_id: self.op_id,
            digest: self.digest,
        }
    }

    /// From the persistence envelope message.
    pub fn from_proto(o: proto::Origin) -> Self {
        Origin {
            seq: o.seq,
            client_id: o.client_id.into(),
            op_id: o.op_id,
            digest: o.digest,
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
    max_dispatch_batch: usize,
    max_client_id_len: usize,
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
            dedup: Dedup::new(DedupLimits {
                window: config.dedup_window,
                max_clients: config.dedup_clients,
                max_per_owner: config.dedup_clients_per_login,
                max_entries: config.dedup_entries,
            }),
            max_dispatch_batch: config.max_dispatch_batch.max(1),
            max_client_id_len: config.max_client_id_len,
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
        // One shared client id per client (the entries come client by client).
        let mut last: Option<Arc<str>> = None;
        let mut v: Vec<Origin> = self
            .dedup
            .committed()
            .filter(|(_, _, s, _)| *s <= seq)
            .map(|(c, op, s, digest)| {
                let client_id = match &last {
                    Some(l) if **l == *c => l.clone(),
                    _ => last.insert(Arc::from(c)).clone(),
                };
                Origin {
                    seq: s,
                    client_id,
                    op_id: op,
                    digest,
                }
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
            if apply(r, st, &action).is_err() {
                break;
            }
            a.log.append(bytes);
            a.log.trim(true);
        }
        let mut origins = recovered.origins;
        origins.retain(|o| o.seq >= 1 && o.seq <= a.log.head && !o.client_id.is_empty());
        origins.sort_by(|x, y| (&x.client_id, x.op_id).cmp(&(&y.client_id, y.op_id)));
        for o in origins {
            // Restored origins count for no login (they are not held
            // against any login's bound).
            a.dedup.record(
                "",
                &o.client_id,
                o.op_id,
                OpState::Committed(o.seq),
                o.digest,
            );
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
        self.on_hello_as(hello, "")
    }

    /// As [`Authority::on_hello`], for a connection logged in as `login`:
    /// the client ids it dispatches for count against that login's bound
    /// ([`AuthorityConfig::dedup_clients_per_login`]).
    pub fn on_hello_as(
        &mut self,
        hello: &proto::StoreHello,
        login: &str,
    ) -> Result<FollowerId, RemoteError> {
        check_hello(&self.log.name, self.log.schema, hello)?;
        check_client_id(&hello.client_id, self.max_client_id_len)?;
        let welcome = proto::StoreWelcome {
            store: self.log.name.clone(),
            schema: self.log.schema,
            history_id: self.log.history,
            mode: self.log.cfg.mode.to_proto() as i32,
            resync: self.log.cfg.resync,
            last_op_id: self.dedup.last_op(&hello.client_id),
        };
        Ok(self.log.add_follower(hello, welcome, login))
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
    ///
    /// Refused whole, with one error for all its op ids and nothing
    /// committed: more actions than `max_dispatch_batch`, a `client_id`
    /// longer than `max_client_id_len`, op id 0, or op ids that would pass
    /// 2^64 - 1 (op ids do not wrap). An op id already committed with
    /// another action (a client that restarted and numbers its ops from 1
    /// again under the same client id) is refused with `OP_ID_REUSED`;
    /// consecutive op ids refused for the same reason share one error frame.
    pub fn on_dispatch(&mut self, id: FollowerId, mut d: proto::Dispatch) -> usize {
        let Some((client, login, enc)) = self.check_dispatch(id, &d) else {
            return 0;
        };
        let more = std::mem::take(&mut d.more);
        let actions = std::iter::once(d.action).chain(more);
        self.apply_dispatch(id, &login, &client, enc, d.op_id, actions, None)
    }

    /// Checks a `Dispatch` frame of follower `id` as [`Authority::on_dispatch`]
    /// does before committing anything: on success its client id (the
    /// follower's when the frame names none), the connection's login and
    /// the follower's encoding; on failure the follower is answered and
    /// `None` returned.
    pub(crate) fn check_dispatch(
        &mut self,
        id: FollowerId,
        d: &proto::Dispatch,
    ) -> Option<(String, String, Encoding)> {
        let f = self.log.followers.get(&id)?;
        // A relay forwards its clients' dispatches under their own client
        // ids, so a dispatch resent through another relay is recognised.
        let client = if d.client_id.is_empty() {
            f.client_id.clone()
        } else {
            d.client_id.clone()
        };
        let login = f.login.clone();
        let enc = f.encoding;
        let n = 1 + d.more.len();
        if let Err(e) = check_batch(d, n, self.max_dispatch_batch, self.max_client_id_len) {
            // A client id too long to keep is not echoed back either.
            let client = if client.len() > self.max_client_id_len {
                String::new()
            } else {
                client
            };
            self.log.error_range(id, &client, d.op_id, n as u64, &e);
            return None;
        }
        Some((client, login, enc))
    }

    /// Commits the actions of one checked dispatch frame of `client`
    /// (op ids from `first_op`), dispatched over a connection logged in as
    /// `login`, answering follower `to` (no one if it is not attached) and,
    /// if given, `report` with each op id's seq or error. Deterministic: a
    /// replicated authority applies every committed frame through it on
    /// each voter. Returns how many actions were committed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_dispatch(
        &mut self,
        to: FollowerId,
        login: &str,
        client: &str,
        enc: Encoding,
        first_op: u64,
        actions: impl IntoIterator<Item = Bytes>,
        mut report: Option<&mut Vec<(u64, Result<u64, RemoteError>)>>,
    ) -> usize {
        let mut committed = 0;
        let mut ops = self.dedup.take(login, client);
        let mut errors = ErrorRuns::default();
        // The origins of this frame share one copy of the client id.
        let mut shared_client: Option<Arc<str>> = None;
        for (i, bytes) in actions.into_iter().enumerate() {
            let op = first_op + i as u64;
            let result = match ops.lookup(op) {
                Lookup::Known(OpState::Committed(seq), known) => {
                    let same = known == 0
                        || to_binary::<R::Action>(&bytes, enc)
                            .is_ok_and(|(_, b)| digest(&b) == known);
                    if same {
                        Ok(seq)
                    } else {
                        Err(reused_error(op, seq))
                    }
                }
                Lookup::Known(..) => Err(RemoteError::new(ErrorCode::BadAction, "rejected before")),
                Lookup::Forgotten => Err(RemoteError::new(
                    ErrorCode::Forgotten,
                    "op id older than the duplicate window; it was handled before",
                )),
                Lookup::New => match self.commit_digest(&bytes, enc) {
                    Ok((seq, dg)) => {
                        committed += 1;
                        self.dedup
                            .record_in(&mut ops, op, OpState::Committed(seq), dg);
                        if let Some(o) = &mut self.origins {
                            let client_id = shared_client
                                .get_or_insert_with(|| Arc::from(client))
                                .clone();
                            o.push(Origin {
                                seq,
                                client_id,
                                op_id: op,
                                digest: dg,
                            });
                        }
                        Ok(seq)
                    }
                    Err(e) => {
                        self.dedup.record_in(&mut ops, op, OpState::Rejected, 0);
                        Err(e)
                    }
                },
            };
            if let Some(r) = &mut report {
                r.push((op, result.clone()));
            }
            match result {
                Ok(seq) => self.log.ack_for(to, client, op, seq),
                Err(e) => errors.push(op, e),
            }
        }
        self.dedup.put(client, ops);
        for (op, count, e) in errors.runs {
            self.log.error_range(to, client, op, count, &e);
        }
        committed
    }

    /// What became of op `op` of `client`, if the duplicate table knows.
    pub(crate) fn op_result(&self, client: &str, op: u64) -> Option<Result<u64, RemoteError>> {
        match self.dedup.lookup(client, op) {
            Lookup::Known(OpState::Committed(seq), _) => Some(Ok(seq)),
            Lookup::Known(..) => Some(Err(RemoteError::new(
                ErrorCode::BadAction,
                "rejected before",
            ))),
            Lookup::Forgotten => Some(Err(RemoteError::new(
                ErrorCode::Forgotten,
                "op id older than the duplicate window; it was handled before",
            ))),
            Lookup::New => None,
        }
    }

    /// Answers op `op` of `client` to follower `to` (an ack or an error).
    pub(crate) fn answer(
        &mut self,
        to: FollowerId,
        client: &str,
        op: u64,
        result: Result<u64, RemoteError>,
    ) {
        match result {
            Ok(seq) => self.log.ack_for(to, client, op, seq),
            Err(e) => self.log.error_range(to, client, op, 1, &e),
        }
    }

    /// A replicated authority that has no history yet: the first committed
    /// entry of its log starts one ([`Authority::start`]). Its followers get
    /// nothing until then.
    pub(crate) fn unstarted(reducer: R, config: AuthorityConfig) -> Self {
        let mut a = Authority::new(reducer, config, 1);
        a.log.history = 0;
        a
    }

    /// Starts the history of an [`Authority::unstarted`] one; false (and
    /// nothing changes) if it has one already.
    pub(crate) fn start(&mut self, history_id: u64) -> bool {
        if self.log.history != 0 {
            return false;
        }
        self.log.history = history_id.max(1);
        true
    }

    /// The whole replicated state: history id, seq, the binary state and
    /// the duplicate table (what [`Authority::restore`] takes).
    pub(crate) fn export(&mut self) -> Result<(u64, u64, Bytes, DedupDump), RemoteError> {
        let (seq, state) = self.log.take_snapshot()?;
        Ok((self.log.history, seq, state, self.dedup.export()))
    }

    /// Replaces the state with an [`Authority::export`] of another voter's
    /// (a snapshot installed by the consensus). Followers stay attached and
    /// catch up from it.
    pub(crate) fn restore(
        &mut self,
        history_id: u64,
        seq: u64,
        state: Bytes,
        dedup: DedupDump,
    ) -> Result<(), RemoteError> {
        let decoded: R::State = Encoding::Binary
            .decode(&state)
            .map_err(|e| RemoteError::new(ErrorCode::Internal, format!("snapshot: {e}")))?;
        self.log.reset(history_id, seq, decoded, state);
        self.dedup.import(dedup);
        Ok(())
    }

    /// Client ids remembered for duplicate detection, and their op ids.
    pub fn dedup_size(&self) -> (usize, usize) {
        (self.dedup.clients(), self.dedup.entries())
    }

    /// Commits an action dispatched on the authority itself.
    pub fn dispatch(&mut self, action: &R::Action) -> Result<u64, DispatchError> {
        let bytes = Encoding::Binary.encode(action)?;
        self.apply(action, bytes).map_err(DispatchError::Rejected)
    }

    /// Commits an encoded action; returns its seq.
    pub fn commit_bytes(&mut self, bytes: &Bytes, enc: Encoding) -> Result<u64, RemoteError> {
        self.commit_digest(bytes, enc).map(|(seq, _)| seq)
    }

    /// Commits an encoded action; returns its seq and its digest.
    fn commit_digest(&mut self, bytes: &Bytes, enc: Encoding) -> Result<(u64, u64), RemoteError> {
        let (action, binary) = to_binary::<R::Action>(bytes, enc)
            .map_err(|e| RemoteError::new(ErrorCode::BadAction, e.0))?;
        let dg = digest(&binary);
        self.apply(&action, binary).map(|seq| (seq, dg))
    }

    fn apply(&mut self, action: &R::Action, binary: Bytes) -> Result<u64, RemoteError> {
        let r = &self.reducer;
        let st = &mut self.log.state;
        match apply(r, st, action) {
            Ok(()) => {}
            Err(ApplyError::Panicked) => {
                self.rebuild();
                return Err(RemoteError::new(
                    ErrorCode::ReducerPanic,
                    "the reducer panicked; the action was not committed",
                ));
            }
            Err(ApplyError::Refused(why)) => {
                return Err(RemoteError::new(
                    ErrorCode::ReducerPanic,
                    format!("the reducer refused the action: {why}; it was not committed"),
                ));
            }
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
                if apply(r, st, &a).is_err() {
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

/// Runs of consecutive op ids refused with the same error: one frame each.
#[derive(Default)]
struct ErrorRuns {
    runs: Vec<(u64, u64, RemoteError)>,
}

impl ErrorRuns {
    fn push(&mut self, op: u64, e: RemoteError) {
        if let Some((first, count, last)) = self.runs.last_mut() {
            if *first + *count == op && last.code == e.code && same_reason(last, &e) {
                *count += 1;
                return;
            }
        }
        self.runs.push((op, 1, e));
    }
}

/// Whether two errors of one run say the same (reused op ids name their own
/// seqs, so only their code counts).
fn same_reason(a: &RemoteError, b: &RemoteError) -> bool {
    a.code == ErrorCode::OpIdReused || a.message == b.message
}

fn reused_error(op: u64, seq: u64) -> RemoteError {
    RemoteError::new(
        ErrorCode::OpIdReused,
        format!(
            "op id {op} of this client id was already committed (seq {seq}) with another action; \
             nothing was committed: a client id must not be reused with op ids starting again \
             (use a new random client id per client instance)"
        ),
    )
}

/// Checks a `Dispatch` frame's size and op ids before anything of it is
/// handled.
pub(crate) fn check_batch(
    d: &proto::Dispatch,
    n: usize,
    max_batch: usize,
    max_client_id: usize,
) -> Result<(), RemoteError> {
    if n > max_batch {
        return Err(RemoteError::new(
            ErrorCode::BadAction,
            format!("dispatch of {n} actions refused: at most {max_batch} per frame"),
        ));
    }
    check_client_id(&d.client_id, max_client_id)?;
    if d.op_id == 0 {
        return Err(RemoteError::new(
            ErrorCode::BadAction,
            "op id 0 refused: op ids start at 1",
        ));
    }
    if d.op_id.checked_add(n as u64 - 1).is_none() {
        return Err(RemoteError::new(
            ErrorCode::BadAction,
            format!(
                "op ids {} + {} refused: op ids do not wrap past 2^64 - 1",
                d.op_id,
                n - 1
            ),
        ));
    }
    Ok(())
}

/// Refuses a client id longer than `max` bytes.
pub(crate) fn check_client_id(client_id: &str, max: usize) -> Result<(), RemoteError> {
    if client_id.len() > max {
        return Err(RemoteError::new(
            ErrorCode::BadAction,
            format!(
                "client id of {} bytes refused: at most {max}",
                client_id.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a `StoreHello` against a store's name and schema, and its encoding.
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
    if proto::Encoding::try_from(hello.encoding).is_err() {
        return Err(RemoteError::new(
            ErrorCode::BadFrame,
            format!(
                "store {name:?}: unknown encoding {} (ENCODING_BINARY = 0, ENCODING_JSON = 1)",
                hello.encoding
            ),
        ));
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
