//! The clone runtime: listeners, clone links, client connections, one task
//! that owns the sans-IO [`Core`](crate::core::Core).
//!
//! One file a concern: `config` the [`ServerConfig`] and the auth hooks,
//! `events` the [`ServerEvent`] stream, `api` the application's calls on a
//! running [`Server`], `conn` accepting (or adopting) a connection up to
//! its hello, `clone_link` clone links (accepted and dialed),
//! `client_conn` client connections, `task` the core task that owns the
//! [`Core`](crate::core::Core) and executes its actions, `stats` the
//! counters. This file holds the state they share and [`Server::start`].

mod api;
mod client_conn;
mod clone_link;
mod config;
mod conn;
mod events;
mod stats;
mod task;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::access::Access;
use crate::core::{Core, CoreConfig};
use crate::error::MeshError;
use crate::router::Router;

pub use api::{ClientInfo, Groups};
pub use config::{auth_out_async, auth_out_sync, AuthIn, AuthOut, CloneTarget, ServerConfig};
pub use events::{Events, ServerEvent};
pub use stats::ServerStats;

use conn::accept_loop;
use stats::Counters;
use task::{Cmd, CoreTask};

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

pub(crate) fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Runs a handler future here if it completes at once, else in its own task
/// (it may await a response that the caller's read loop must read).
pub(crate) fn run_or_spawn(mut fut: std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>) {
    use futures_util::FutureExt;
    if (&mut fut).now_or_never().is_none() {
        tokio::spawn(fut);
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
}
