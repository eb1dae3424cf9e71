//! The clone runtime: listeners, clone links, client connections, one task
//! that owns the sans-IO [`Core`](crate::core::Core).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use proto::{frame::Body, CloseCode, Frame, PeerKind};
use tokio::sync::{broadcast, mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::access::Access;
use crate::core::{
    Action, CloneFrame, CloneInfo, ConnKey, Core, CoreConfig, CoreEvent, GroupInfo, LinkId,
    PeerInfo,
};
use crate::error::MeshError;
use crate::router::{handle_routed, Flow, Peer, Router, CODE_BUSY};
use crate::wire;

/// Decides whether a dialing clone may join, from the auth value it presents
/// and what it says about itself (sync or async; see [`ServerConfig::auth_in`]).
pub type AuthIn = Arc<dyn Fn(Bytes, PeerInfo) -> BoxFuture<'static, bool> + Send + Sync>;

/// Gives the auth value to present to a clone being dialed (sync or async;
/// see [`ServerConfig::auth_out`]).
pub type AuthOut = Arc<dyn Fn(CloneTarget) -> BoxFuture<'static, Bytes> + Send + Sync>;

/// The clone being dialed, as given to [`AuthOut`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneTarget {
    /// Its id.
    pub id: String,
    /// The url dialed.
    pub url: String,
}

/// Server configuration.
#[derive(Clone)]
pub struct ServerConfig {
    /// Clone id; generated when `None`.
    pub id: Option<String>,
    /// URLs to listen on (`tcp://127.0.0.1:0`, `unix:///...`, `ws://...`).
    pub listen: Vec<String>,
    /// The url announced to other clones; defaults to the first listener's actual url.
    pub url: Option<String>,
    /// User data sent in handshakes.
    pub data: Bytes,
    /// Checks dialing clones; `None` accepts every clone (as jrf-ws-3 does).
    pub auth_in: Option<AuthIn>,
    /// Auth value for outgoing clone links; `None` sends an empty value.
    pub auth_out: Option<AuthOut>,
    /// Anti-entropy period (default 2 s).
    pub gossip_interval: Duration,
    /// How long an unreachable learned clone is kept as down (default 30 s).
    pub forget_after: Duration,
    /// Timeout of requests to clients (default 10 s).
    pub response_timeout: Duration,
    /// Time a new connection has to say `Hello` (default 10 s).
    pub hello_timeout: Duration,
    /// Commands from connections (subscribe, unsubscribe, publish, batches
    /// of clone frames, connects and disconnects) waiting for the task that
    /// owns the core (default 1,024; at least 1). When it is full, each
    /// connection that has a command to queue waits for room and is not
    /// read meanwhile (push back on its socket: its peer's sends stall, and
    /// the transport's keep-alive still runs). A stop never waits behind
    /// it. Calls of the application (`Server::publish` and the others) go
    /// through a queue of their own that is not bounded.
    pub command_queue: usize,
    /// Groups one client may be in (default 1,000). A `Subscribe` that
    /// would take a client past it is refused whole and the client's
    /// connection is closed as a protocol error whose reason says so; a
    /// `Publish` naming more groups than this is refused the same way.
    /// [`Server::subscribe`] (the application's) is not limited.
    pub max_groups_per_client: usize,
    /// Groups this clone may have (default 100,000). A client's `Subscribe`
    /// that would create groups past it is refused whole and its connection
    /// closed, as above. [`Server::create_group`] is not limited.
    pub max_groups: usize,
    /// Longest client id and group name a client may send, in bytes (default
    /// 256). A longer one in the `Hello`, a `Subscribe`, `Unsubscribe` or
    /// `Publish` closes the connection as a protocol error naming the limit.
    pub max_name_len: usize,
    /// A client's `Publish` frames waiting for the task that owns the core,
    /// per connection (default 8; at least 1). A connection with this many
    /// is not read until the core has taken one (push back on its socket,
    /// as with a full [`ServerConfig::command_queue`]), so one flooding
    /// publisher holds at most this many places in the shared queue and
    /// the other connections' commands get through.
    pub max_publishes_in_flight: usize,
    /// Routed `Request` and `Send` frames of one client connection being
    /// handled at once (default 64; at least 1). Handlers run in tasks of
    /// their own (one may wait for a response from the same client), so
    /// this bounds the tasks and memory one connection can hold. Past it a
    /// `Request` is answered at once with an error ([`CODE_BUSY`], the
    /// message names the limit) and a `Send` is dropped and reported as
    /// [`ServerEvent::Error`]; the connection stays open.
    pub max_requests_in_flight: usize,
    /// Frames of unknown kinds (a newer peer's, which decode with no
    /// `body`) a client connection or clone link may send (default 1,024).
    /// They are ignored and counted ([`ServerStats::unknown_frames`]); the
    /// one past the limit closes the connection as a protocol error.
    pub max_unknown_frames: u64,
    /// Who may connect as a client and which groups each may subscribe and
    /// publish to (default: everybody, everything). A client on this
    /// server's own listeners is anonymous; one handed over with
    /// [`Server::adopt_client`] is logged in as its `Hello.login`. See
    /// [`Access`] for client ids and duplicates.
    pub access: Access,
    /// Transport settings for listeners and dials (`inline_reads` is always
    /// on: every connection is read by a loop that waits in `recv`).
    pub transport: transport::Config,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("id", &self.id)
            .field("listen", &self.listen)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            id: None,
            listen: Vec::new(),
            url: None,
            data: Bytes::new(),
            auth_in: None,
            auth_out: None,
            gossip_interval: Duration::from_secs(2),
            forget_after: Duration::from_secs(30),
            response_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(10),
            command_queue: 1024,
            max_groups_per_client: 1000,
            max_groups: 100_000,
            max_name_len: 256,
            max_publishes_in_flight: 8,
            max_requests_in_flight: 64,
            max_unknown_frames: 1024,
            access: Access::default(),
            transport: transport::Config::default(),
        }
    }
}

impl ServerConfig {
    /// A config with this id listening on `listen`.
    pub fn new(id: impl Into<String>, listen: impl Into<String>) -> Self {
        ServerConfig {
            id: Some(id.into()),
            listen: vec![listen.into()],
            ..Default::default()
        }
    }

    /// Sets a synchronous `auth_in`.
    pub fn auth_in(mut self, f: impl Fn(&[u8]) -> bool + Send + Sync + 'static) -> Self {
        self.auth_in = Some(Arc::new(move |v: Bytes, _| {
            let ok = f(&v);
            Box::pin(async move { ok })
        }));
        self
    }

    /// Sets an asynchronous `auth_in`.
    pub fn auth_in_async<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(Bytes, PeerInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        self.auth_in = Some(Arc::new(move |v, p| Box::pin(f(v, p))));
        self
    }

    /// Sets a synchronous `auth_out`.
    pub fn auth_out(mut self, f: impl Fn(&CloneTarget) -> Bytes + Send + Sync + 'static) -> Self {
        self.auth_out = Some(auth_out_sync(f));
        self
    }
}

/// Wraps a synchronous function as an [`AuthOut`].
pub fn auth_out_sync(f: impl Fn(&CloneTarget) -> Bytes + Send + Sync + 'static) -> AuthOut {
    Arc::new(move |t: CloneTarget| {
        let v = f(&t);
        Box::pin(async move { v })
    })
}

/// Wraps an asynchronous function as an [`AuthOut`].
pub fn auth_out_async<F, Fut>(f: F) -> AuthOut
where
    F: Fn(CloneTarget) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Bytes> + Send + 'static,
{
    Arc::new(move |t| Box::pin(f(t)))
}

/// Something that happened on a server.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// The server started (listening).
    Start,
    /// The server stopped.
    Stop,
    /// A client connected.
    Connection {
        /// Its key.
        key: u64,
        /// Its id.
        id: String,
    },
    /// A client's connection closed.
    ClientClosed {
        /// Its key.
        key: u64,
        /// Its id.
        id: String,
    },
    /// A clone link was established.
    CloneLinked(String),
    /// A clone link closed.
    Close(String),
    /// A dialing clone passed `auth_in`.
    Auth(String),
    /// A dialing clone failed `auth_in` (its link was closed).
    AuthError {
        /// The id it claimed.
        id: String,
        /// Its address.
        addr: String,
    },
    /// A connection broke the protocol, sent garbage, or something failed.
    Error(String),
    /// A message for a route/act without handler.
    NoRoute {
        /// Route.
        route: String,
        /// Act.
        act: String,
    },
    /// Membership and group changes from the core.
    Mesh(CoreEvent),
}

/// A local client, for introspection.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Key.
    pub key: u64,
    /// Announced id.
    pub id: String,
    /// Announced data.
    pub data: Bytes,
    /// Address.
    pub addr: String,
    /// Groups.
    pub groups: Vec<String>,
}

/// Where a publish goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Groups {
    /// One or several groups.
    Some(Vec<String>),
    /// Every group.
    All,
}

impl Groups {
    /// One group.
    pub fn one(g: impl Into<String>) -> Self {
        Groups::Some(vec![g.into()])
    }
}

enum Query {
    Clones(oneshot::Sender<Vec<CloneInfo>>),
    Groups(oneshot::Sender<Vec<GroupInfo>>),
    Clients(oneshot::Sender<Vec<ClientInfo>>),
    ClientGroups(u64, oneshot::Sender<Vec<String>>),
    Counts(oneshot::Sender<(usize, usize)>),
    SomeGroups(usize, oneshot::Sender<Vec<GroupInfo>>),
}

enum Cmd {
    Accept {
        info: PeerInfo,
        sender: transport::Sender,
        reply: oneshot::Sender<Option<LinkId>>,
    },
    DialDone {
        link: LinkId,
        result: Result<(PeerInfo, transport::Connection), String>,
    },
    LinkFrames(LinkId, Vec<CloneFrame>),
    LinkDown(LinkId),
    ClientUp(Peer),
    ClientDown(u64),
    /// A client's (`true`: within the limits) or the application's subscription.
    Subscribe(u64, Vec<String>, bool),
    Unsubscribe(u64, Vec<String>),
    Publish {
        from: Option<u64>,
        groups: Groups,
        not_to_me: bool,
        data: Bytes,
        /// A client's place among its publishes in flight (see
        /// [`ServerConfig::max_publishes_in_flight`]), given back when the
        /// core task has handled the command; `None` for the application's.
        _permit: Option<OwnedSemaphorePermit>,
    },
    CreateGroup(String, Bytes),
    DeleteGroup(String),
    AddClone {
        id: String,
        url: String,
        auth_out: Option<AuthOut>,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    DeleteClone(String, oneshot::Sender<bool>),
    UpdateAuthOut(Option<AuthOut>),
    Query(Query),
}

struct Shared {
    id: String,
    url: String,
    incarnation: u64,
    data: Bytes,
    /// Commands from connections (bounded: readers wait for room).
    cmd: mpsc::Sender<Cmd>,
    /// Commands of the application, through the `Server` API.
    ctl: mpsc::UnboundedSender<Cmd>,
    events: broadcast::Sender<ServerEvent>,
    router: Router,
    /// Set once a stop is asked for (by [`Server::stop`] or the last
    /// handle's drop); the core task looks at it before every command, so a
    /// stop never waits behind queued commands.
    shutdown: watch::Sender<bool>,
    /// Set by the core task when it is over: links and clients closed,
    /// listeners closed, [`ServerEvent::Stop`] sent.
    stopped: watch::Sender<bool>,
    auth_in: Option<AuthIn>,
    hello_timeout: Duration,
    response_timeout: Duration,
    max_groups_per_client: usize,
    max_name_len: usize,
    max_publishes_in_flight: usize,
    max_requests_in_flight: usize,
    max_unknown_frames: u64,
    access: Arc<Access>,
    transport: transport::Config,
    listen_urls: Vec<String>,
    acceptors: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    stats: Counters,
}

/// A running clone. Cheap to clone.
///
/// # Stopping
///
/// [`Server::shutdown`]`.await` (also [`Server::stop`]) stops the clone
/// gracefully and waits until it has stopped: other clones are told it
/// left, clients and links are closed (`Close{GOING_AWAY}`), the listeners
/// are closed, then [`ServerEvent::Stop`] is sent. Dropping the last
/// `Server` handle does the same in the background, without waiting.
///
/// Handlers reach the server through [`Ctx::server`](crate::Ctx::server);
/// a closure given to [`Server::route`] that owns a `Server` keeps it running
/// until [`Server::shutdown`] — hold a [`WeakServer`] there instead.
#[derive(Clone)]
pub struct Server {
    shared: Arc<Shared>,
    /// One per running server, shared by the user's handles; internal tasks
    /// hold it weakly ([`Srv`]), so dropping the last handle stops the server.
    handle: Arc<Handle>,
}

/// Stops the server when the last user handle goes.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

/// A handle that does not keep a server running (see [`Server::downgrade`]).
#[derive(Clone)]
pub struct WeakServer {
    shared: std::sync::Weak<Shared>,
    handle: std::sync::Weak<Handle>,
}

impl std::fmt::Debug for WeakServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakServer").finish_non_exhaustive()
    }
}

impl WeakServer {
    /// The server, unless every `Server` handle has been dropped.
    pub fn upgrade(&self) -> Option<Server> {
        Some(Server {
            handle: self.handle.upgrade()?,
            shared: self.shared.upgrade()?,
        })
    }
}

/// What the server's own tasks hold: everything but the user's handle.
#[derive(Clone)]
struct Srv {
    shared: Arc<Shared>,
    handle: std::sync::Weak<Handle>,
}

impl Srv {
    fn upgrade(&self) -> Option<Server> {
        self.handle.upgrade().map(|handle| Server {
            shared: self.shared.clone(),
            handle,
        })
    }

    /// Queues a command from a connection, waiting for room in the bounded
    /// queue (see [`ServerConfig::command_queue`]): a connection whose
    /// commands do not fit is not read meanwhile.
    async fn cmd(&self, c: Cmd) -> Result<(), MeshError> {
        self.shared
            .cmd
            .send(c)
            .await
            .map_err(|_| MeshError::Stopped)
    }

    fn event(&self, e: ServerEvent) {
        let _ = self.shared.events.send(e);
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

pub(crate) fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

type EventFuture = std::pin::Pin<
    Box<
        dyn Future<
                Output = (
                    Result<ServerEvent, broadcast::error::RecvError>,
                    broadcast::Receiver<ServerEvent>,
                ),
            > + Send,
    >,
>;

async fn next_event(
    mut rx: broadcast::Receiver<ServerEvent>,
) -> (
    Result<ServerEvent, broadcast::error::RecvError>,
    broadcast::Receiver<ServerEvent>,
) {
    let r = rx.recv().await;
    (r, rx)
}

/// Events of a server, in order: a [`futures_util::Stream`] of
/// [`ServerEvent`]s that ends after [`ServerEvent::Stop`]. A reader more than 4,096 events behind misses the oldest
/// ones (they are skipped, not an error).
pub struct Events {
    next: EventFuture,
    /// `Stop` was returned: the stream is over.
    done: bool,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl futures_util::Stream for Events {
    type Item = ServerEvent;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<ServerEvent>> {
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            let (r, rx) = match self.next.as_mut().poll(cx) {
                Poll::Ready(x) => x,
                Poll::Pending => return Poll::Pending,
            };
            self.next = Box::pin(next_event(rx));
            match r {
                Ok(e) => {
                    self.done = e == ServerEvent::Stop;
                    return Poll::Ready(Some(e));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return Poll::Ready(None),
            }
        }
    }
}

impl Events {
    fn new(rx: broadcast::Receiver<ServerEvent>) -> Self {
        Events {
            next: Box::pin(next_event(rx)),
            done: false,
        }
    }

    /// The next event; `None` after [`ServerEvent::Stop`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv(&mut self) -> Option<ServerEvent> {
        futures_util::StreamExt::next(self).await
    }

    /// Waits for the first event matching `f` (at most `timeout`).
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&ServerEvent) -> bool,
    ) -> Option<ServerEvent> {
        tokio::time::timeout(timeout, async {
            while let Some(e) = self.recv().await {
                if f(&e) {
                    return Some(e);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }
}

impl Server {
    /// Binds the listeners and starts the clone.
    pub async fn start(mut config: ServerConfig) -> Result<Server, MeshError> {
        // Every connection's loop always waits in `recv`: frames reach it
        // without a hand-off from a reader task.
        config.transport.inline_reads = true;
        let id = config.id.clone().unwrap_or_else(|| random_id("clone"));
        let mut listeners = Vec::new();
        for u in &config.listen {
            let l = transport::listen(u, &config.transport)
                .await
                .map_err(|e| MeshError::Transport(format!("{u}: {e}")))?;
            listeners.push(Arc::new(l));
        }
        let listen_urls: Vec<String> = listeners.iter().map(|l| l.local_url()).collect();
        let url = config
            .url
            .clone()
            .or_else(|| listen_urls.first().cloned())
            .unwrap_or_default();
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1)
            .max(1);
        let mut ccfg = CoreConfig::new(id.clone(), url.clone(), incarnation);
        ccfg.gossip_interval = config.gossip_interval;
        ccfg.forget_after = config.forget_after;
        ccfg.seed = rand::random();
        ccfg.max_groups_per_client = config.max_groups_per_client;
        ccfg.max_groups = config.max_groups;
        if config.command_queue == 0 {
            return Err(MeshError::Config("command_queue must be at least 1".into()));
        }
        if config.max_publishes_in_flight == 0 || config.max_requests_in_flight == 0 {
            return Err(MeshError::Config(
                "max_publishes_in_flight and max_requests_in_flight must be at least 1".into(),
            ));
        }
        let (cmd_tx, cmd_rx) = mpsc::channel(config.command_queue);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(4096);
        let (shutdown, _) = watch::channel(false);
        let (stopped, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            id: id.clone(),
            url,
            incarnation,
            data: config.data.clone(),
            cmd: cmd_tx,
            ctl: ctl_tx,
            events,
            router: Router::default(),
            shutdown,
            stopped,
            auth_in: config.auth_in.clone(),
            hello_timeout: config.hello_timeout,
            response_timeout: config.response_timeout,
            max_groups_per_client: config.max_groups_per_client,
            max_name_len: config.max_name_len,
            max_publishes_in_flight: config.max_publishes_in_flight,
            max_requests_in_flight: config.max_requests_in_flight,
            max_unknown_frames: config.max_unknown_frames,
            access: Arc::new(config.access.clone()),
            transport: config.transport.clone(),
            listen_urls,
            acceptors: std::sync::Mutex::new(Vec::new()),
            stats: Counters::default(),
        });
        let handle = Arc::new(Handle {
            shared: shared.clone(),
        });
        let srv = Srv {
            shared: shared.clone(),
            handle: Arc::downgrade(&handle),
        };
        let server = Server { shared, handle };
        let epoch = Instant::now();
        let core = Core::new(ccfg, Duration::ZERO);
        let task = CoreTask {
            core,
            epoch,
            server: srv.clone(),
            links: HashMap::new(),
            link_peers: HashMap::new(),
            clients: HashMap::new(),
            ids: HashMap::new(),
            auth_out: config.auth_out.clone(),
            clone_auth: HashMap::new(),
            encoded: Vec::new(),
        };
        // the accept loops are registered before the core task can stop
        // (and wait for them)
        for l in listeners {
            let h = tokio::spawn(accept_loop(srv.clone(), l));
            crate::router::lock(&server.shared.acceptors).push(h);
        }
        tokio::spawn(task.run(cmd_rx, ctl_rx));
        let _ = server.shared.events.send(ServerEvent::Start);
        Ok(server)
    }

    /// This clone's id.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The url announced to other clones.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// The actual urls of the listeners (ports filled in).
    pub fn listen_urls(&self) -> &[String] {
        &self.shared.listen_urls
    }

    /// This clone's incarnation (microseconds since the epoch at start).
    pub fn incarnation(&self) -> u64 {
        self.shared.incarnation
    }

    /// The events from now on: an [`Events`], which is a
    /// [`futures_util::Stream`] of [`ServerEvent`]s and has [`Events::recv`].
    pub fn events(&self) -> Events {
        Events::new(self.shared.events.subscribe())
    }

    /// A handle that does not keep the server running (for closures the
    /// server owns, such as route handlers).
    pub fn downgrade(&self) -> WeakServer {
        WeakServer {
            shared: Arc::downgrade(&self.shared),
            handle: Arc::downgrade(&self.handle),
        }
    }

    /// The router: add middlewares and route handlers.
    pub fn router(&self) -> &Router {
        &self.shared.router
    }

    /// Adds a middleware (see [`Router::use_middleware`]).
    pub fn use_middleware<F, Fut>(&self, f: F)
    where
        F: Fn(crate::Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Flow, crate::RouteError>> + Send + 'static,
    {
        self.shared.router.use_middleware(f)
    }

    /// Sets a route handler (see [`Router::route`]).
    pub fn route<F, Fut>(&self, route: &str, act: &str, f: F)
    where
        F: Fn(crate::Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, crate::RouteError>> + Send + 'static,
    {
        self.shared.router.route(route, act, f)
    }

    /// Queues a command of the application (not bounded: see
    /// [`ServerConfig::command_queue`]).
    fn cmd(&self, c: Cmd) -> Result<(), MeshError> {
        self.shared.ctl.send(c).map_err(|_| MeshError::Stopped)
    }

    async fn ask<T>(&self, f: impl FnOnce(oneshot::Sender<T>) -> Query) -> Result<T, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.cmd(Cmd::Query(f(tx)))?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// Adds a clone (dials it and tells it every clone we know). Adding
    /// yourself is an error; adding a known id with a new url updates it.
    /// `auth_out` overrides the server's function for this clone.
    pub async fn add_clone(
        &self,
        id: &str,
        url: &str,
        auth_out: Option<AuthOut>,
    ) -> Result<(), MeshError> {
        let (reply, rx) = oneshot::channel();
        self.cmd(Cmd::AddClone {
            id: id.to_string(),
            url: url.to_string(),
            auth_out,
            reply,
        })?;
        rx.await.map_err(|_| MeshError::Stopped)?
    }

    /// Deletes a clone: drops its link and stops dialing it. This incarnation
    /// of it stays refused (gossip about it is ignored) until it is added
    /// again or restarts; see the crate docs.
    pub async fn delete_clone(&self, id: &str) -> Result<bool, MeshError> {
        let (tx, rx) = oneshot::channel();
        self.cmd(Cmd::DeleteClone(id.to_string(), tx))?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// Closes every clone link, swaps `auth_out` and dials again.
    pub fn update_auth_out(&self, f: Option<AuthOut>) -> Result<(), MeshError> {
        self.cmd(Cmd::UpdateAuthOut(f))
    }

    /// Creates a group with user data (it persists until deleted).
    pub fn create_group(&self, name: &str, data: impl Into<Bytes>) -> Result<(), MeshError> {
        self.cmd(Cmd::CreateGroup(name.to_string(), data.into()))
    }

    /// Deletes a group here and on every clone (once).
    pub fn delete_group(&self, name: &str) -> Result<(), MeshError> {
        self.cmd(Cmd::DeleteGroup(name.to_string()))
    }

    /// Adds a local client to groups.
    pub fn subscribe(&self, client: u64, groups: &[&str]) -> Result<(), MeshError> {
        self.cmd(Cmd::Subscribe(
            client,
            groups.iter().map(|s| s.to_string()).collect(),
            false,
        ))
    }

    /// Removes a local client from groups.
    pub fn unsubscribe(&self, client: u64, groups: &[&str]) -> Result<(), MeshError> {
        self.cmd(Cmd::Unsubscribe(
            client,
            groups.iter().map(|s| s.to_string()).collect(),
        ))
    }

    /// Publishes to groups on every clone. `not_to` excludes one local client
    /// (by key) from the delivery, everywhere.
    pub fn publish(
        &self,
        groups: Groups,
        data: impl Into<Bytes>,
        not_to: Option<u64>,
    ) -> Result<(), MeshError> {
        self.cmd(Cmd::Publish {
            from: not_to,
            groups,
            not_to_me: not_to.is_some(),
            data: data.into(),
            _permit: None,
        })
    }

    /// Known clones.
    pub async fn clones(&self) -> Result<Vec<CloneInfo>, MeshError> {
        self.ask(Query::Clones).await
    }

    /// Local groups with subscriber counts.
    pub async fn groups(&self) -> Result<Vec<GroupInfo>, MeshError> {
        self.ask(Query::Groups).await
    }

    /// Local clients.
    pub async fn clients(&self) -> Result<Vec<ClientInfo>, MeshError> {
        self.ask(Query::Clients).await
    }

    /// How many local groups and local clients there are (cheap, unlike
    /// [`Server::groups`] and [`Server::clients`], which list them all).
    pub async fn counts(&self) -> Result<(usize, usize), MeshError> {
        self.ask(Query::Counts).await
    }

    /// Up to `limit` local groups (any of them, sorted by name), for status
    /// pages: O(limit) work, not O(groups).
    pub async fn some_groups(&self, limit: usize) -> Result<Vec<GroupInfo>, MeshError> {
        self.ask(|tx| Query::SomeGroups(limit, tx)).await
    }

    /// The groups of a local client.
    pub async fn client_groups(&self, client: u64) -> Result<Vec<String>, MeshError> {
        self.ask(|tx| Query::ClientGroups(client, tx)).await
    }

    /// Stops the server gracefully and waits until it has stopped: other
    /// clones are told this clone is gone, clients and links are closed, the
    /// listeners are closed (a new connection is refused), then
    /// [`ServerEvent::Stop`] is sent. Queued commands do not delay it. Other
    /// handles see [`MeshError::Stopped`] from then on. Calling it again, or
    /// on a stopped server, returns at once.
    pub async fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        let mut done = self.shared.stopped.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }

    /// The same as [`Server::shutdown`] (its older name).
    pub async fn stop(&self) {
        self.shutdown().await
    }
}

async fn accept_loop(server: Srv, listener: Arc<transport::Listener>) {
    let mut stop = server.shared.shutdown.subscribe();
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            // `wait_for` looks at the current value first: a stop asked for
            // before this task started is not missed
            _ = stop.wait_for(|s| *s) => break,
        };
        match conn {
            Ok(c) => {
                tokio::spawn(serve_conn(server.clone(), c));
            }
            Err(e) => {
                server.event(ServerEvent::Error(format!("accept: {e}")));
                break;
            }
        }
    }
    // the core task waits for this before it reports `Stop`
    if let Ok(l) = Arc::try_unwrap(listener) {
        l.close().await;
    }
}

fn protocol_error(server: &Srv, sender: &transport::Sender, why: String) {
    sender.close(CloseCode::ProtocolError, &why);
    server.event(ServerEvent::Error(why));
}

fn welcome(shared: &Shared) -> Frame {
    Frame::new(Body::Welcome(proto::Welcome {
        version: proto::PROTOCOL_VERSION,
        id: shared.id.clone(),
        url: shared.url.clone(),
        incarnation: shared.incarnation,
        data: shared.data.clone(),
    }))
}

/// One accepted connection: handshake, then a clone link or a client.
async fn serve_conn(server: Srv, conn: transport::Connection) {
    let (sender, mut rx) = conn.split();
    let addr = format!("{:?}", sender.peer_addr());
    let first = tokio::time::timeout(server.shared.hello_timeout, rx.recv()).await;
    let hello = match first {
        Ok(Ok(Frame {
            body: Some(Body::Hello(h)),
        })) => h,
        Ok(Ok(f)) => {
            return protocol_error(
                &server,
                &sender,
                format!("{addr}: expected hello, got {}", f.kind()),
            );
        }
        Ok(Err(e)) => {
            server.event(ServerEvent::Error(format!("{addr}: {e}")));
            return;
        }
        Err(_) => {
            sender.close(CloseCode::Timeout, "no hello");
            server.event(ServerEvent::Error(format!("{addr}: no hello in time")));
            return;
        }
    };
    if hello.version != proto::PROTOCOL_VERSION {
        sender.close(CloseCode::UnsupportedVersion, "unsupported version");
        server.event(ServerEvent::Error(format!(
            "{addr}: version {}",
            hello.version
        )));
        return;
    }
    // A hello was accepted: frames up to the configured maximum from now on.
    rx.raise_max_frame();
    if hello.kind == PeerKind::Clone as i32 {
        serve_clone(server, sender, rx, hello, addr).await
    } else {
        // Nobody checked a login here: the client is anonymous.
        let hello = proto::Hello {
            login: String::new(),
            ..hello
        };
        serve_client(server, sender, ClientRx::Conn(rx), hello).await
    }
}

async fn serve_clone(
    server: Srv,
    sender: transport::Sender,
    rx: transport::Receiver,
    hello: proto::Hello,
    addr: String,
) {
    let info = PeerInfo {
        id: hello.id.clone(),
        url: hello.url.clone(),
        incarnation: hello.incarnation,
    };
    if let Some(auth) = &server.shared.auth_in {
        let ok = tokio::time::timeout(
            server.shared.hello_timeout,
            auth(hello.auth.clone(), info.clone()),
        )
        .await
        .unwrap_or(false);
        if !ok {
            sender.close(CloseCode::AuthFailed, "auth failed");
            server.event(ServerEvent::AuthError {
                id: hello.id.clone(),
                addr,
            });
            return;
        }
    }
    server.event(ServerEvent::Auth(hello.id.clone()));
    let (reply, answer) = oneshot::channel();
    if server
        .cmd(Cmd::Accept {
            info,
            sender: sender.clone(),
            reply,
        })
        .await
        .is_err()
    {
        sender.close(CloseCode::GoingAway, "stopping");
        return;
    }
    match answer.await {
        Ok(Some(link)) => link_reader(server, link, rx).await,
        _ => sender.close(CloseCode::Normal, "link refused"),
    }
}

/// Reads an established clone link and feeds the core task in batches.
async fn link_reader(server: Srv, link: LinkId, mut rx: transport::Receiver) {
    let mut unknown = Unknown::default();
    loop {
        let first = match rx.recv().await {
            Ok(f) => f,
            Err(_) => break,
        };
        let mut batch = Vec::with_capacity(8);
        let mut bad = None;
        let mut ended = false;
        let more = std::iter::from_fn(|| match rx.try_recv() {
            Some(Ok(f)) => Some(f),
            Some(Err(_)) => {
                ended = true;
                None
            }
            None => None,
        });
        for f in std::iter::once(first).chain(more.take(255)) {
            match f.body.map(wire::decode_clone) {
                Some(Ok(cf)) => batch.push(cf),
                Some(Err(other)) => {
                    bad = Some(other);
                    break;
                }
                None if unknown.ignore(&server.shared) => {}
                None => {
                    bad = Some("unknown (past the limit)");
                    break;
                }
            }
        }
        if !batch.is_empty() && server.cmd(Cmd::LinkFrames(link, batch)).await.is_err() {
            break;
        }
        if let Some(kind) = bad {
            server.event(ServerEvent::Error(format!(
                "clone link {link}: unexpected {kind} frame"
            )));
            break;
        }
        if ended {
            break;
        }
    }
    let _ = server.cmd(Cmd::LinkDown(link)).await;
}

async fn serve_client(
    server: Srv,
    sender: transport::Sender,
    mut rx: ClientRx,
    hello: proto::Hello,
) {
    if hello.id.len() > server.shared.max_name_len {
        let why = format!(
            "limit: client id of {} bytes, at most {} allowed",
            hello.id.len(),
            server.shared.max_name_len
        );
        return protocol_error(&server, &sender, why);
    }
    let access = server.shared.access.clone();
    let refused = |why: String| {
        sender.close(CloseCode::AuthFailed, &why);
        server.event(ServerEvent::Error(why));
    };
    if access.permissions(&hello.login).is_none() {
        return refused("this server takes no clients without a login".into());
    }
    let id = match access.client_id(&hello.id, &hello.login) {
        Ok(Some(id)) => id,
        Ok(None) => random_id("client"),
        Err(why) => return refused(why),
    };
    let login = hello.login;
    let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    let peer = Peer::new(
        sender.clone(),
        key,
        id.clone(),
        hello.data.clone(),
        server.shared.response_timeout,
    );
    if sender.send(&welcome(&server.shared)).is_err() {
        return;
    }
    if server.cmd(Cmd::ClientUp(peer.clone())).await.is_err() {
        return;
    }
    server.event(ServerEvent::Connection {
        key,
        id: id.clone(),
    });
    let publishes = Arc::new(Semaphore::new(server.shared.max_publishes_in_flight));
    let requests = Arc::new(Semaphore::new(server.shared.max_requests_in_flight));
    let mut unknown = Unknown::default();
    loop {
        let f = match rx.recv().await {
            Ok(f) => f,
            Err(e) => {
                if !matches!(
                    e,
                    transport::RecvError::Closed { .. } | transport::RecvError::Eof
                ) {
                    server.event(ServerEvent::Error(format!("client {id}: {e}")));
                }
                break;
            }
        };
        let Some(body) = f.body else {
            if unknown.ignore(&server.shared) {
                continue;
            }
            let why = format!(
                "client {id}: more than {} frames of unknown kinds",
                server.shared.max_unknown_frames
            );
            protocol_error(&server, &sender, why);
            break;
        };
        if wire::is_clone_level(&body) {
            let kind = Frame::new(body).kind();
            protocol_error(
                &server,
                &sender,
                format!("client {id}: {kind} is for clone links only"),
            );
            break;
        }
        let named = match &body {
            Body::Subscribe(s) => Some(&s.groups),
            Body::Unsubscribe(s) => Some(&s.groups),
            Body::Publish(p) => Some(&p.groups),
            _ => None,
        };
        if let Some(Err(why)) = named.map(|g| check_groups(&server.shared, g)) {
            protocol_error(&server, &sender, format!("client {id}: {why}"));
            break;
        }
        if let Some(refusal) = access.permissions(&login).and_then(|p| refuse(p, &body)) {
            let _ = sender.send(&refusal);
            continue;
        }
        let ok = match body {
            Body::Subscribe(s) => server
                .cmd(Cmd::Subscribe(key, s.groups, true))
                .await
                .is_ok(),
            Body::Unsubscribe(s) => server.cmd(Cmd::Unsubscribe(key, s.groups)).await.is_ok(),
            Body::Publish(p) => {
                // Not read further while this connection has its most
                // publishes waiting for the core (push back).
                let Ok(permit) = publishes.clone().acquire_owned().await else {
                    break;
                };
                server
                    .cmd(Cmd::Publish {
                        from: Some(key),
                        groups: if p.all {
                            Groups::All
                        } else {
                            Groups::Some(p.groups)
                        },
                        not_to_me: p.not_to_me,
                        data: p.data,
                        _permit: Some(permit),
                    })
                    .await
                    .is_ok()
            }
            Body::Response(r) => {
                peer.resolve(r);
                true
            }
            b @ (Body::Request(_) | Body::Send(_)) => {
                let (route, act) = match &b {
                    Body::Request(r) => (r.route.clone(), r.act.clone()),
                    Body::Send(s) => (s.route.clone(), s.act.clone()),
                    _ => (String::new(), String::new()),
                };
                let Ok(permit) = requests.clone().try_acquire_owned() else {
                    busy(&server, &sender, &id, b);
                    continue;
                };
                // handlers run in their own task: one may await a response
                // from this very client, which this loop must read
                let (srv, p) = (server.clone(), peer.clone());
                let fut = Box::pin(async move {
                    if handle_routed(&srv.shared.router, &p, srv.upgrade(), b).await {
                        srv.event(ServerEvent::NoRoute { route, act });
                    }
                    drop(permit);
                });
                run_or_spawn(fut);
                true
            }
            Body::Hello(_) | Body::Welcome(_) => {
                protocol_error(&server, &sender, format!("client {id}: second handshake"));
                false
            }
            _ => true, // store frames and others are not the mesh's business
        };
        if !ok {
            break;
        }
    }
    peer.fail_all();
    let _ = server.cmd(Cmd::ClientDown(key)).await;
    server.event(ServerEvent::ClientClosed { key, id });
}

/// Answers a routed frame that came when its connection had
/// [`ServerConfig::max_requests_in_flight`] being handled: a `Request` gets
/// an error response, a `Send` is dropped; both are reported.
fn busy(server: &Srv, sender: &transport::Sender, client: &str, b: Body) {
    let limit = server.shared.max_requests_in_flight;
    let why = format!("limit: {limit} requests in flight on this connection");
    if let Body::Request(r) = &b {
        let _ = sender.send(&Frame::new(Body::Response(proto::Response {
            id: r.id,
            error: Some(proto::ErrorInfo {
                code: CODE_BUSY,
                message: why.clone(),
            }),
            ..Default::default()
        })));
    }
    server.event(ServerEvent::Error(format!("client {client}: {why}")));
}

/// The [`proto::Refused`] answer to a client's `Subscribe` or `Publish` that
/// names a group it may not use; `None` when it may.
fn refuse(perms: &crate::Permissions, body: &Body) -> Option<Frame> {
    let (kind, group, message) = match body {
        Body::Subscribe(s) => {
            let g = perms.denied_subscribe(&s.groups)?;
            (
                13,
                g,
                format!("this client may not subscribe to group {g:?}"),
            )
        }
        Body::Publish(p) if p.all => {
            let g = perms.denied_publish(&[], true)?;
            (
                15,
                g,
                "this client may not publish to all groups".to_owned(),
            )
        }
        Body::Publish(p) => {
            let g = perms.denied_publish(&p.groups, false)?;
            (15, g, format!("this client may not publish to group {g:?}"))
        }
        _ => return None,
    };
    Some(Frame::new(Body::Refused(proto::Refused {
        kind,
        group: group.to_owned(),
        error: Some(proto::ErrorInfo { code: 403, message }),
    })))
}

/// Frames of unknown kinds seen on one connection.
#[derive(Default)]
struct Unknown(u64);

impl Unknown {
    /// Counts one; `false` when it is past
    /// [`ServerConfig::max_unknown_frames`] (the connection is closed).
    fn ignore(&mut self, shared: &Shared) -> bool {
        self.0 += 1;
        shared.stats.unknown_frames.fetch_add(1, Ordering::Relaxed);
        self.0 <= shared.max_unknown_frames
    }
}

/// The group names of a client's `Subscribe`, `Unsubscribe` or `Publish`
/// within the limits ([`ServerConfig::max_groups_per_client`] names,
/// each at most [`ServerConfig::max_name_len`] bytes).
fn check_groups(shared: &Shared, groups: &[String]) -> Result<(), String> {
    if groups.len() > shared.max_groups_per_client {
        return Err(format!(
            "limit: {} groups in one frame, at most {} allowed",
            groups.len(),
            shared.max_groups_per_client
        ));
    }
    match groups.iter().find(|g| g.len() > shared.max_name_len) {
        Some(g) => Err(format!(
            "limit: group name of {} bytes, at most {} allowed",
            g.len(),
            shared.max_name_len
        )),
        None => Ok(()),
    }
}

/// Runs a handler future here if it completes at once, else in its own task
/// (it may await a response that the caller's read loop must read).
pub(crate) fn run_or_spawn(mut fut: std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>) {
    use futures_util::FutureExt;
    if (&mut fut).now_or_never().is_none() {
        tokio::spawn(fut);
    }
}

/// Dials a clone: connect, hello with the auth value, wait for welcome.
async fn dial(
    server: Srv,
    link: LinkId,
    peer: String,
    url: String,
    auth_out: Option<AuthOut>,
    incarnation: u64,
) {
    let result = async {
        let mut conn = tokio::time::timeout(
            server.shared.hello_timeout,
            transport::connect(&url, &server.shared.transport),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let auth = match auth_out {
            Some(f) => {
                f(CloneTarget {
                    id: peer.clone(),
                    url: url.clone(),
                })
                .await
            }
            None => Bytes::new(),
        };
        let hello = Frame::new(Body::Hello(proto::Hello {
            version: proto::PROTOCOL_VERSION,
            kind: PeerKind::Clone as i32,
            id: server.shared.id.clone(),
            url: server.shared.url.clone(),
            incarnation,
            auth,
            data: server.shared.data.clone(),
            login: String::new(),
            password: String::new(),
        }));
        conn.send(&hello).map_err(|e| e.to_string())?;
        let f = tokio::time::timeout(server.shared.hello_timeout, conn.recv())
            .await
            .map_err(|_| "no welcome in time".to_string())?
            .map_err(|e| e.to_string())?;
        match f.body {
            Some(Body::Welcome(w)) => Ok((
                PeerInfo {
                    id: w.id,
                    url: w.url,
                    incarnation: w.incarnation,
                },
                conn,
            )),
            _ => Err(format!("expected welcome, got {}", f.kind())),
        }
    }
    .await;
    let _ = server.cmd(Cmd::DialDone { link, result }).await;
}

struct CoreTask {
    core: Core,
    epoch: Instant,
    server: Srv,
    links: HashMap<LinkId, transport::Sender>,
    link_peers: HashMap<LinkId, String>,
    clients: HashMap<ConnKey, Peer>,
    /// The connection of each client id: a newer one replaces it.
    ids: HashMap<String, ConnKey>,
    auth_out: Option<AuthOut>,
    clone_auth: HashMap<String, AuthOut>,
    /// Scratch space of [`Action::Deliver`]: the encoded frame per group.
    encoded: Vec<Option<Bytes>>,
}

impl CoreTask {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, mut ctl: mpsc::UnboundedReceiver<Cmd>) {
        let mut stop = self.server.shared.shutdown.subscribe();
        loop {
            // a stop goes before everything queued
            if *stop.borrow_and_update() {
                break;
            }
            let deadline = self.epoch + self.core.next_deadline();
            let cmd = tokio::select! {
                biased;
                _ = stop.changed() => continue,
                c = ctl.recv() => c,
                c = rx.recv() => c,
                _ = tokio::time::sleep_until(deadline) => {
                    let now = self.now();
                    self.core.tick(now);
                    self.drain();
                    continue;
                }
            };
            let Some(cmd) = cmd else { break };
            self.handle(cmd);
            // take what else is queued before sleeping again
            for _ in 0..256 {
                if *stop.borrow() {
                    break;
                }
                match ctl.try_recv().or_else(|_| rx.try_recv()) {
                    Ok(c) => self.handle(c),
                    Err(_) => break,
                }
            }
        }
        self.stop_now();
        // whoever waits to queue a command sees the server stopped
        drop(rx);
        drop(ctl);
        // the accept loops end on `shutdown` and close their listeners
        self.server.shared.shutdown.send_replace(true);
        let acceptors: Vec<_> = crate::router::lock(&self.server.shared.acceptors)
            .drain(..)
            .collect();
        for h in acceptors {
            let _ = h.await;
        }
        let _ = self.server.shared.events.send(ServerEvent::Stop);
        self.server.shared.stopped.send_replace(true);
    }

    /// Leaves the mesh and closes every link and client.
    fn stop_now(&mut self) {
        let now = self.now();
        self.core.leave(now);
        self.drain();
        for s in self.links.values() {
            s.close(CloseCode::GoingAway, "server stopping");
        }
        for p in self.clients.values() {
            p.sender().close(CloseCode::GoingAway, "server stopping");
        }
        self.links.clear();
        self.clients.clear();
        self.ids.clear();
    }

    fn handle(&mut self, cmd: Cmd) {
        let now = self.now();
        match cmd {
            Cmd::Accept {
                info,
                sender,
                reply,
            } => {
                let link = self.core.new_link_id();
                let peer_id = info.id.clone();
                match self.core.accept(link, info, now) {
                    Ok(()) => {
                        // Welcome goes before anything the core queued for the link
                        let _ = sender.send(&welcome(&self.server.shared));
                        self.links.insert(link, sender);
                        self.link_peers.insert(link, peer_id.clone());
                        let _ = reply.send(Some(link));
                        self.server.event(ServerEvent::CloneLinked(peer_id));
                    }
                    Err(_) => {
                        let _ = reply.send(None);
                    }
                }
            }
            Cmd::DialDone { link, result } => match result {
                Ok((info, conn)) => {
                    let (sender, receiver) = conn.split();
                    self.links.insert(link, sender);
                    let peer_id = info.id.clone();
                    if self.core.dial_ok(link, info, now).is_ok() {
                        self.link_peers.insert(link, peer_id.clone());
                        tokio::spawn(link_reader(self.server.clone(), link, receiver));
                        self.server.event(ServerEvent::CloneLinked(peer_id));
                    }
                }
                Err(e) => {
                    self.server.event(ServerEvent::Error(format!("dial: {e}")));
                    self.core.link_down(link, now);
                }
            },
            Cmd::LinkFrames(link, frames) => {
                count(&self.server.shared.stats.clone_frames_in, frames.len());
                for f in frames {
                    self.core.on_frame(link, f, now);
                    self.drain();
                }
            }
            Cmd::LinkDown(link) => {
                self.links.remove(&link);
                if let Some(p) = self.link_peers.remove(&link) {
                    self.server.event(ServerEvent::Close(p));
                }
                self.core.link_down(link, now);
            }
            Cmd::ClientUp(peer) => {
                if let Some(old) = self.ids.insert(peer.id().to_owned(), peer.key()) {
                    if let Some(p) = self.clients.get(&old) {
                        p.sender().close(
                            CloseCode::GoingAway,
                            "replaced by a newer connection with the same client id",
                        );
                    }
                }
                self.core.client_connected(peer.key(), peer.id());
                self.clients.insert(peer.key(), peer);
            }
            Cmd::ClientDown(key) => {
                if let Some(p) = self.clients.remove(&key) {
                    if self.ids.get(p.id()) == Some(&key) {
                        self.ids.remove(p.id());
                    }
                }
                if self.clients.capacity() > 64 && self.clients.len() < self.clients.capacity() / 4
                {
                    self.clients.shrink_to(self.clients.len() * 2);
                    self.ids.shrink_to(self.ids.len() * 2);
                }
                self.core.client_gone(key);
            }
            Cmd::Subscribe(key, groups, false) => {
                self.core.subscribe(key, &groups);
            }
            Cmd::Subscribe(key, groups, true) => {
                if let Err(e) = self.core.try_subscribe(key, &groups) {
                    if let Some(p) = self.clients.get(&key) {
                        let why = format!("limit: subscribe refused: {e}");
                        p.sender().close(CloseCode::ProtocolError, &why);
                        self.server
                            .event(ServerEvent::Error(format!("client {}: {why}", p.id())));
                    }
                }
            }
            Cmd::Unsubscribe(key, groups) => self.core.unsubscribe(key, &groups),
            Cmd::Publish {
                from,
                groups,
                not_to_me,
                data,
                _permit,
            } => {
                let (groups, all) = match groups {
                    Groups::All => (Vec::new(), true),
                    Groups::Some(g) => (g, false),
                };
                count(&self.server.shared.stats.published, 1);
                self.core.publish(from, groups, all, not_to_me, data);
            }
            Cmd::CreateGroup(name, data) => self.core.create_group(&name, data),
            Cmd::DeleteGroup(name) => self.core.delete_group(&name, now),
            Cmd::AddClone {
                id,
                url,
                auth_out,
                reply,
            } => {
                if let Some(f) = auth_out {
                    self.clone_auth.insert(id.clone(), f);
                }
                let r = self.core.add_clone(&id, &url, now).map_err(MeshError::from);
                let _ = reply.send(r);
            }
            Cmd::DeleteClone(id, reply) => {
                self.clone_auth.remove(&id);
                let _ = reply.send(self.core.delete_clone(&id, now));
            }
            Cmd::UpdateAuthOut(f) => {
                self.auth_out = f;
                self.core.reset_links(now);
            }
            Cmd::Query(q) => match q {
                Query::Clones(tx) => {
                    let _ = tx.send(self.core.clones());
                }
                Query::Groups(tx) => {
                    let _ = tx.send(self.core.groups());
                }
                Query::Clients(tx) => {
                    let mut v: Vec<ClientInfo> = self
                        .clients
                        .values()
                        .map(|p| ClientInfo {
                            key: p.key(),
                            id: p.id().to_string(),
                            data: p.data().clone(),
                            addr: format!("{:?}", p.addr()),
                            groups: self.core.client_groups(p.key()),
                        })
                        .collect();
                    v.sort_by_key(|c| c.key);
                    let _ = tx.send(v);
                }
                Query::ClientGroups(key, tx) => {
                    let _ = tx.send(self.core.client_groups(key));
                }
                Query::Counts(tx) => {
                    let _ = tx.send((self.core.group_count(), self.core.client_count()));
                }
                Query::SomeGroups(limit, tx) => {
                    let _ = tx.send(self.core.some_groups(limit));
                }
            },
        }
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(a) = self.core.poll_action() {
            match a {
                Action::Dial { link, peer, url } => {
                    let auth = self
                        .clone_auth
                        .get(&peer)
                        .cloned()
                        .or_else(|| self.auth_out.clone());
                    let inc = self.core.incarnation();
                    tokio::spawn(dial(self.server.clone(), link, peer, url, auth, inc));
                }
                Action::Send { links, frame } => {
                    let bytes = wire::encode_clone(&frame);
                    let mut sent = 0;
                    for l in links {
                        if let Some(s) = self.links.get(&l) {
                            sent += s.send_encoded(bytes.clone()).is_ok() as usize;
                        }
                    }
                    count(&self.server.shared.stats.clone_frames_out, sent);
                }
                Action::Close { link, reason } => {
                    if let Some(s) = self.links.remove(&link) {
                        s.close(CloseCode::Normal, &reason.to_string());
                    }
                    if let Some(p) = self.link_peers.remove(&link) {
                        self.server.event(ServerEvent::Close(p));
                    }
                }
                Action::Deliver {
                    msg,
                    targets,
                    group_of,
                } => {
                    let names: &[String] = if msg.all { &group_of } else { &msg.groups };
                    // the encoded frame per group, made on first use
                    let cache = &mut self.encoded;
                    cache.clear();
                    cache.resize(names.len(), None);
                    let (mut delivered, mut dropped, mut slow) = (0, 0, 0);
                    for t in targets {
                        let Some(p) = self.clients.get(&t.conn) else {
                            continue;
                        };
                        let Some(name) = names.get(t.group) else {
                            continue;
                        };
                        let bytes = cache[t.group]
                            .get_or_insert_with(|| {
                                proto::wire::encode_deliver(name, &msg.from, &msg.data)
                            })
                            .clone();
                        match p.sender().send_encoded(bytes) {
                            Ok(()) => delivered += 1,
                            Err(transport::SendError::SlowConsumer) => {
                                dropped += 1;
                                slow += 1;
                            }
                            Err(_) => dropped += 1,
                        }
                    }
                    let st = &self.server.shared.stats;
                    count(&st.delivered, delivered);
                    count(&st.dropped, dropped);
                    count(&st.slow_consumers, slow);
                    self.encoded.clear();
                }
                Action::Event(e) => self.server.event(ServerEvent::Mesh(e)),
            }
        }
    }
}

// ---- connections accepted by someone else (a node sharing its listeners) ----

/// Where a client connection's frames come from.
enum ClientRx {
    /// The connection itself.
    Conn(transport::Receiver),
    /// Frames passed on by whoever reads the connection ([`Server::adopt_client`]).
    Frames(mpsc::Receiver<Frame>),
    /// Frame bodies, not decoded yet ([`Server::adopt_client_encoded`]).
    Encoded(mpsc::Receiver<Bytes>, transport::Sender),
}

impl ClientRx {
    async fn recv(&mut self) -> Result<Frame, transport::RecvError> {
        match self {
            ClientRx::Conn(rx) => rx.recv().await,
            ClientRx::Frames(rx) => rx.recv().await.ok_or(transport::RecvError::Eof),
            ClientRx::Encoded(rx, sender) => {
                let body = rx.recv().await.ok_or(transport::RecvError::Eof)?;
                <Frame as proto::Message>::decode(body).map_err(|e| {
                    let why = format!("malformed frame: {e}");
                    sender.close(CloseCode::ProtocolError, &why);
                    transport::RecvError::Malformed(why)
                })
            }
        }
    }
}

impl Server {
    fn srv(&self) -> Srv {
        Srv {
            shared: self.shared.clone(),
            handle: Arc::downgrade(&self.handle),
        }
    }

    /// Serves a connection that the caller accepted and whose first frame,
    /// `hello`, it has read: a clone link or a client, as if this server
    /// had accepted it on one of its listeners (auth, welcome, everything
    /// after). For programs whose listeners serve more than the mesh, such
    /// as the `replimesh` node. Must be called inside a Tokio runtime.
    pub fn adopt(
        &self,
        sender: transport::Sender,
        receiver: transport::Receiver,
        hello: proto::Hello,
    ) {
        let server = self.srv();
        tokio::spawn(async move {
            if hello.version != proto::PROTOCOL_VERSION {
                sender.close(CloseCode::UnsupportedVersion, "unsupported version");
                return;
            }
            receiver.raise_max_frame();
            if hello.kind == PeerKind::Clone as i32 {
                let addr = format!("{:?}", sender.peer_addr());
                serve_clone(server, sender, receiver, hello, addr).await
            } else {
                // Nobody checked a login here: the client is anonymous.
                let hello = proto::Hello {
                    login: String::new(),
                    ..hello
                };
                serve_client(server, sender, ClientRx::Conn(receiver), hello).await
            }
        });
    }

    /// Serves a client whose connection the caller reads: `hello` is its
    /// first frame, `frames` the mesh frames that follow (the caller passes
    /// on the others, such as store frames, elsewhere). The client is
    /// welcomed and answered on `sender`, which the caller may share. It is
    /// gone when `frames` closes or the connection ends. Must be called
    /// inside a Tokio runtime.
    pub fn adopt_client(
        &self,
        sender: transport::Sender,
        hello: proto::Hello,
        frames: mpsc::Receiver<Frame>,
    ) {
        let server = self.srv();
        tokio::spawn(serve_client(
            server,
            sender,
            ClientRx::Frames(frames),
            hello,
        ));
    }

    /// As [`Server::adopt_client`], with the frames' protobuf bodies not
    /// decoded yet (as `transport::Receiver::recv_encoded` gives them): they
    /// are decoded in the client's task, and a channel of `Bytes` costs an
    /// idle connection less memory than one of `Frame`s. A body that does
    /// not decode closes the connection as a protocol error.
    pub fn adopt_client_encoded(
        &self,
        sender: transport::Sender,
        hello: proto::Hello,
        bodies: mpsc::Receiver<Bytes>,
    ) {
        let server = self.srv();
        let rx = ClientRx::Encoded(bodies, sender.clone());
        tokio::spawn(serve_client(server, sender, rx, hello));
    }
}

// ---- statistics ----

/// Counters of a running clone, since it started (see [`Server::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Group messages published on this clone (by its clients or the server).
    pub published: u64,
    /// Group messages queued to this clone's subscribers.
    pub delivered: u64,
    /// Group messages for this clone's subscribers that could not be queued
    /// (the connection was full or closing).
    pub dropped: u64,
    /// Client connections cut as slow consumers while delivering.
    pub slow_consumer_disconnects: u64,
    /// Frames received on clone links.
    pub clone_frames_in: u64,
    /// Frames queued on clone links.
    pub clone_frames_out: u64,
    /// Commands from connections waiting for the core task now (at most
    /// [`ServerConfig::command_queue`]).
    pub queued_commands: u64,
    /// Frames of unknown kinds received from clients and clones (ignored;
    /// see [`ServerConfig::max_unknown_frames`]).
    pub unknown_frames: u64,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    slow_consumers: AtomicU64,
    clone_frames_in: AtomicU64,
    clone_frames_out: AtomicU64,
    unknown_frames: AtomicU64,
}

fn count(c: &AtomicU64, n: usize) {
    if n > 0 {
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Server {
    /// The clone's counters (cheap: atomic loads; for metrics).
    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.stats;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStats {
            published: get(&c.published),
            delivered: get(&c.delivered),
            dropped: get(&c.dropped),
            slow_consumer_disconnects: get(&c.slow_consumers),
            clone_frames_in: get(&c.clone_frames_in),
            clone_frames_out: get(&c.clone_frames_out),
            queued_commands: (self.shared.cmd.max_capacity() - self.shared.cmd.capacity()) as u64,
            unknown_frames: get(&c.unknown_frames),
        }
    }
}
