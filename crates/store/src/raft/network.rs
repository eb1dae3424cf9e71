//! The consensus's messages between voters: the network trait, a voter's
//! receiving end, the in-memory network, and the proposer task.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    ClientWriteError, Fatal, RPCError, RaftError as OpenraftError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Snapshot, SnapshotMeta, Vote};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{Command, Proposal, Raft, RaftConfig, TypeConfig};
use crate::reducer::Reducer;
use crate::store::{random_nonzero, Core, Inner};

/// A boxed future of a [`VoterNetwork`] call.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<Bytes, VoterNetError>> + Send + 'static>>;

/// How the voters of a replicated store reach each other: a request, its
/// reply. The bytes are opaque here (encoded and checked by the store);
/// the receiving voter hands them to its [`RaftEndpoint`].
pub trait VoterNetwork: Send + Sync + 'static {
    /// Sends `request` from voter `from` to voter `to` (at `url`, from the
    /// group's list) and returns its reply, or an error once `timeout` has
    /// passed or the voter cannot be reached.
    fn call(&self, from: u64, to: u64, url: &str, request: Bytes, timeout: Duration) -> CallFuture;
}

/// A voter could not be reached, or did not answer in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VoterNetError(pub String);

/// What travels between voters: a request for one store's voter.
#[derive(Serialize, Deserialize)]
pub(crate) struct Envelope {
    store: String,
    schema: u32,
    to: u64,
    request: Request,
}

#[derive(Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
enum Request {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot {
        vote: Vote<u64>,
        meta: SnapshotMeta<u64, BasicNode>,
        data: Vec<u8>,
    },
    Propose(Vec<Proposal>),
}

#[derive(Serialize, Deserialize)]
enum Reply {
    Append(AppendEntriesResponse<u64>),
    Vote(VoteResponse<u64>),
    Snapshot(SnapshotResponse<u64>),
    Proposed(Outcome),
    /// The request was refused (another store, a stopped voter...).
    Refused(String),
}

/// What became of a proposal sent to the leader.
#[derive(Debug, Serialize, Deserialize)]
enum Outcome {
    /// Committed and applied by the leader at this log index.
    Committed(u64),
    /// The voter asked is not the leader (it may know who is).
    NotLeader(Option<u64>),
    /// Not committed in time, or failed: propose again.
    Failed(String),
}

fn encode<T: Serialize>(value: &T) -> Bytes {
    // Encoding these types into a Vec cannot fail (no maps with non-string
    // keys issue in postcard); an empty buffer is refused by the receiver.
    postcard::to_stdvec(value)
        .map(Bytes::from)
        .unwrap_or_default()
}

/// A voter's receiving end: hands it a request that came from another
/// voter, send back the reply (see [`VoterNetwork`]). Get it from
/// [`Store::raft_endpoint`](crate::Store::raft_endpoint).
#[derive(Clone)]
pub struct RaftEndpoint {
    handler: Arc<dyn Handle>,
}

impl std::fmt::Debug for RaftEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftEndpoint").finish_non_exhaustive()
    }
}

type ReplyFuture = Pin<Box<dyn Future<Output = Bytes> + Send + 'static>>;

trait Handle: Send + Sync + 'static {
    fn handle(&self, request: Bytes) -> ReplyFuture;
}

impl RaftEndpoint {
    pub(crate) fn new<R: Reducer>(inner: &Arc<Inner<R>>, raft: Raft, cfg: Arc<RaftConfig>) -> Self {
        RaftEndpoint {
            handler: Arc::new(Handler {
                inner: Arc::downgrade(inner),
                name: inner.name().to_owned(),
                schema: inner.schema(),
                raft,
                cfg,
            }),
        }
    }

    /// Handles one request from another voter; returns the reply to send
    /// back. A request that cannot be decoded, or that is meant for another
    /// store, voter or schema, gets a reply saying so (never a panic).
    pub async fn handle(&self, request: Bytes) -> Bytes {
        self.handler.handle(request).await
    }
}

struct Handler<R: Reducer> {
    inner: Weak<Inner<R>>,
    name: String,
    schema: u32,
    raft: Raft,
    cfg: Arc<RaftConfig>,
}

impl<R: Reducer> Handle for Handler<R> {
    fn handle(&self, request: Bytes) -> ReplyFuture {
        let raft = self.raft.clone();
        let inner = self.inner.clone();
        let cfg = self.cfg.clone();
        let env: Result<Envelope, _> = postcard::from_bytes(&request);
        let checked = match env {
            Err(e) => Err(format!("undecodable raft request: {e}")),
            Ok(env) if env.store != self.name => Err(format!(
                "voter {} serves store {:?}, not {:?}",
                cfg.id, self.name, env.store
            )),
            Ok(env) if env.schema != self.schema => Err(format!(
                "store {:?}: voter {} has schema {}, the request schema {}",
                self.name, cfg.id, self.schema, env.schema
            )),
            Ok(env) if env.to != cfg.id => Err(format!(
                "this is voter {} of store {:?}, not voter {}",
                cfg.id, self.name, env.to
            )),
            Ok(env) => Ok(env.request),
        };
        Box::pin(async move {
            let reply = match checked {
                Err(e) => Reply::Refused(e),
                Ok(request) => serve(request, raft, inner, &cfg).await,
            };
            encode(&reply)
        })
    }
}

async fn serve<R: Reducer>(
    request: Request,
    raft: Raft,
    inner: Weak<Inner<R>>,
    cfg: &RaftConfig,
) -> Reply {
    match request {
        Request::Append(rpc) => match raft.append_entries(rpc).await {
            Ok(r) => Reply::Append(r),
            Err(e) => Reply::Refused(e.to_string()),
        },
        Request::Vote(rpc) => match raft.vote(rpc).await {
            Ok(r) => Reply::Vote(r),
            Err(e) => Reply::Refused(e.to_string()),
        },
        Request::Snapshot { vote, meta, data } => {
            let snapshot = Snapshot {
                meta,
                snapshot: Box::new(data),
            };
            match raft.install_full_snapshot(vote, snapshot).await {
                Ok(r) => Reply::Snapshot(r),
                Err(e) => Reply::Refused(e.to_string()),
            }
        }
        Request::Propose(batch) => match inner.upgrade() {
            None => Reply::Refused("the store has stopped".into()),
            Some(inner) => {
                Reply::Proposed(propose_here(&inner, &raft, batch, cfg.propose_timeout).await)
            }
        },
    }
}

/// The history id of a voter's store (0: not started).
fn history_of<R: Reducer>(inner: &Inner<R>) -> u64 {
    match &inner.lock().core {
        Core::Authority { a, .. } => a.history_id(),
        Core::Replica { r, .. } => r.history_id(),
    }
}

/// Commits a command through this voter, if it is the leader.
async fn write(raft: &Raft, cmd: Command, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, raft.client_write(cmd)).await {
        Ok(Ok(r)) => Outcome::Committed(r.log_id.index),
        Ok(Err(OpenraftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            Outcome::NotLeader(f.leader_id)
        }
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Err(_) => Outcome::Failed("not committed in time".into()),
    }
}

/// Proposes a batch on this voter as the leader: the history is started
/// first if it has none.
async fn propose_here<R: Reducer>(
    inner: &Inner<R>,
    raft: &Raft,
    batch: Vec<Proposal>,
    timeout: Duration,
) -> Outcome {
    if history_of(inner) == 0 {
        let start = Command::Start {
            history_id: random_nonzero(),
        };
        if let o @ (Outcome::NotLeader(_) | Outcome::Failed(_)) = write(raft, start, timeout).await
        {
            return o;
        }
    }
    write(raft, Command::Dispatch(batch), timeout).await
}

/// The factory of openraft's connections to the other voters.
pub(crate) struct Factory {
    pub(crate) net: Arc<dyn VoterNetwork>,
    pub(crate) name: String,
    pub(crate) schema: u32,
    pub(crate) me: u64,
}

impl RaftNetworkFactory<TypeConfig> for Factory {
    type Network = Conn;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Conn {
        Conn {
            net: self.net.clone(),
            name: self.name.clone(),
            schema: self.schema,
            me: self.me,
            target,
            url: node.addr.clone(),
        }
    }
}

/// openraft's connection to one voter.
pub(crate) struct Conn {
    net: Arc<dyn VoterNetwork>,
    name: String,
    schema: u32,
    me: u64,
    target: u64,
    url: String,
}

impl Conn {
    async fn call(&self, request: Request, timeout: Duration) -> Result<Reply, VoterNetError> {
        let env = Envelope {
            store: self.name.clone(),
            schema: self.schema,
            to: self.target,
            request,
        };
        let reply = self
            .net
            .call(self.me, self.target, &self.url, encode(&env), timeout)
            .await?;
        postcard::from_bytes(&reply)
            .map_err(|e| VoterNetError(format!("undecodable raft reply: {e}")))
    }
}

/// A refused request or a reply of the wrong kind counts as an unreachable
/// voter: openraft backs off before the next try instead of retrying at
/// once.
fn unexpected(reply: Reply) -> VoterNetError {
    match reply {
        Reply::Refused(e) => VoterNetError(e),
        _ => VoterNetError("unexpected raft reply".into()),
    }
}

type RpcResult<T> = Result<T, RPCError<u64, BasicNode, OpenraftError<u64>>>;

impl Conn {
    /// Sends `request` and takes the reply `pick` expects; anything else is
    /// an unreachable voter (see [`unexpected`]).
    async fn rpc<T>(
        &self,
        request: Request,
        option: RPCOption,
        pick: fn(Reply) -> Result<T, Reply>,
    ) -> RpcResult<T> {
        let reply = self
            .call(request, option.hard_ttl())
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        pick(reply).map_err(|other| RPCError::Unreachable(Unreachable::new(&unexpected(other))))
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        self.rpc(Request::Append(rpc), option, |r| match r {
            Reply::Append(r) => Ok(r),
            other => Err(other),
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>> {
        self.rpc(Request::Vote(rpc), option, |r| match r {
            Reply::Vote(r) => Ok(r),
            other => Err(other),
        })
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<u64>,
        snapshot: Snapshot<TypeConfig>,
        _cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let request = Request::Snapshot {
            vote,
            meta: snapshot.meta,
            data: *snapshot.snapshot,
        };
        match self.call(request, option.hard_ttl()).await {
            Ok(Reply::Snapshot(r)) => Ok(r),
            Ok(other) => Err(StreamingError::Unreachable(Unreachable::new(&unexpected(
                other,
            )))),
            Err(e) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
        }
    }
}

/// The proposer task of a voter: proposes the voter's outbox to the
/// leader, one batch at a time, in order, until each is committed. The
/// leader (once known) starts the history when it has none.
pub(crate) async fn proposer_task<R: Reducer>(
    inner: Arc<Inner<R>>,
    raft: Raft,
    factory_net: Arc<dyn VoterNetwork>,
    cfg: Arc<RaftConfig>,
    wake: Arc<Notify>,
) {
    let me = cfg.id;
    loop {
        if inner.stop.is_cancelled() {
            return;
        }
        let batch = {
            let g = inner.lock();
            match &g.core {
                Core::Authority { raft: Some(v), .. } => v.next_batch(cfg.max_batch),
                _ => return,
            }
        };
        let leader = raft.metrics().borrow().current_leader;
        if batch.is_empty() {
            if leader == Some(me) && history_of(&inner) == 0 {
                let start = Command::Start {
                    history_id: random_nonzero(),
                };
                write(&raft, start, cfg.propose_timeout).await;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(cfg.heartbeat) => {}
                _ = inner.stop.cancelled() => return,
            }
            continue;
        }
        let n = batch.len();
        let outcome = match leader {
            Some(l) if l == me => propose_here(&inner, &raft, batch, cfg.propose_timeout).await,
            Some(l) => {
                let url = raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.addr.clone());
                match url {
                    None => Outcome::Failed(format!("leader {l} is not a voter")),
                    Some(url) => forward(&factory_net, &inner, &cfg, l, url, batch).await,
                }
            }
            None => Outcome::NotLeader(None),
        };
        match outcome {
            Outcome::Committed(index) => {
                let mut g = inner.lock();
                if let Core::Authority { raft: Some(v), .. } = &mut g.core {
                    v.committed(n, index);
                }
            }
            other => {
                tracing::debug!(voter = me, outcome = ?other, "proposal not committed; proposing again");
                tokio::select! {
                    _ = tokio::time::sleep(cfg.heartbeat) => {}
                    _ = inner.stop.cancelled() => return,
                }
            }
        }
    }
}

/// Sends a batch to the leader `to`.
async fn forward<R: Reducer>(
    net: &Arc<dyn VoterNetwork>,
    inner: &Inner<R>,
    cfg: &RaftConfig,
    to: u64,
    url: String,
    batch: Vec<Proposal>,
) -> Outcome {
    let env = Envelope {
        store: inner.name().to_owned(),
        schema: inner.schema(),
        to,
        request: Request::Propose(batch),
    };
    // The leader waits up to `propose_timeout` for the commit; the network
    // gets a little more.
    let timeout = cfg.propose_timeout + cfg.heartbeat;
    match net.call(cfg.id, to, &url, encode(&env), timeout).await {
        Err(e) => Outcome::Failed(e.0),
        Ok(reply) => match postcard::from_bytes(&reply) {
            Ok(Reply::Proposed(o)) => o,
            Ok(Reply::Refused(e)) => Outcome::Failed(e),
            Ok(_) => Outcome::Failed("unexpected raft reply".into()),
            Err(e) => Outcome::Failed(format!("undecodable raft reply: {e}")),
        },
    }
}

/// Faults a [`MemoryNetwork`] injects, drawn from its seeded generator.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NetworkFaults {
    /// Probability that a request is lost (its caller waits for its
    /// timeout).
    pub drop_request: f64,
    /// Probability that a reply is lost after the request was handled.
    pub drop_reply: f64,
    /// Each request and each reply is delayed by up to this.
    pub max_delay: Duration,
}

/// A [`VoterNetwork`] in memory, for tests: voters register their
/// [`RaftEndpoint`]; requests can be dropped, delayed (seeded) and voters
/// cut off from the others.
pub struct MemoryNetwork {
    state: Mutex<MemState>,
}

struct MemState {
    endpoints: HashMap<u64, RaftEndpoint>,
    faults: NetworkFaults,
    rng: StdRng,
    isolated: HashSet<u64>,
}

impl std::fmt::Debug for MemoryNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryNetwork").finish_non_exhaustive()
    }
}

impl MemoryNetwork {
    /// A network without faults whose random choices come from `seed`.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(MemoryNetwork {
            state: Mutex::new(MemState {
                endpoints: HashMap::new(),
                faults: NetworkFaults::default(),
                rng: StdRng::seed_from_u64(seed),
                isolated: HashSet::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Voter `id` is reached through `endpoint` (replaces an earlier one).
    pub fn register(&self, id: u64, endpoint: RaftEndpoint) {
        self.state().endpoints.insert(id, endpoint);
    }

    /// Voter `id` can no longer be reached (a stopped process).
    pub fn unregister(&self, id: u64) {
        self.state().endpoints.remove(&id);
    }

    /// Sets the faults injected from now on.
    pub fn set_faults(&self, faults: NetworkFaults) {
        self.state().faults = faults;
    }

    /// Cuts voter `id` off: nothing goes to or from it until [`MemoryNetwork::heal`].
    pub fn isolate(&self, id: u64) {
        self.state().isolated.insert(id);
    }

    /// Ends every isolation.
    pub fn heal(&self) {
        self.state().isolated.clear();
    }

    /// A random number from the network's generator (for tests that draw
    /// their own choices from the same seed).
    pub fn random(&self, below: u64) -> u64 {
        self.state().rng.gen_range(0..below.max(1))
    }
}

impl VoterNetwork for MemoryNetwork {
    fn call(
        &self,
        from: u64,
        to: u64,
        _url: &str,
        request: Bytes,
        timeout: Duration,
    ) -> CallFuture {
        let (endpoint, lost_request, lost_reply, d1, d2) = {
            let mut s = self.state();
            let f = s.faults;
            let cut = s.isolated.contains(&from) || s.isolated.contains(&to);
            let lost_request = cut || (f.drop_request > 0.0 && s.rng.gen_bool(f.drop_request));
            let lost_reply = f.drop_reply > 0.0 && s.rng.gen_bool(f.drop_reply);
            let max = f.max_delay.as_micros() as u64;
            let d1 = Duration::from_micros(if max > 0 { s.rng.gen_range(0..=max) } else { 0 });
            let d2 = Duration::from_micros(if max > 0 { s.rng.gen_range(0..=max) } else { 0 });
            (
                s.endpoints.get(&to).cloned(),
                lost_request,
                lost_reply,
                d1,
                d2,
            )
        };
        Box::pin(async move {
            let exchange = async {
                let Some(endpoint) = endpoint else {
                    return Err(VoterNetError(format!("voter {to} is not reachable")));
                };
                tokio::time::sleep(d1).await;
                if lost_request {
                    std::future::pending::<()>().await;
                }
                // The voter handles it whatever the caller does meanwhile.
                let reply = tokio::spawn(async move { endpoint.handle(request).await })
                    .await
                    .map_err(|e| VoterNetError(format!("voter {to} failed: {e}")))?;
                tokio::time::sleep(d2).await;
                if lost_reply {
                    std::future::pending::<()>().await;
                }
                Ok(reply)
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(r) => r,
                Err(_) => Err(VoterNetError(format!("voter {to} did not answer in time"))),
            }
        })
    }
}
