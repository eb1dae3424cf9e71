//! Clients: a replica's link to a server (with reconnection) or to the
//! parent process of a worker.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use proto::frame::Body;
use proto::{CloseCode, Frame, PROTOCOL_VERSION};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::core::store_of;
use crate::error::{ErrorCode, RemoteError};
use crate::link::{self, LinkEnd, LinkRx, LinkTx};
use crate::server::WORKER_ENV;
use crate::store::{random_nonzero, AnyStore, Role, Store};
use crate::{worker, Reducer};

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Transport settings (trusted roots for `tls://` and `wss://`). The
    /// default bounds the outbound queue to 1 MiB and reads inline.
    pub transport: transport::Config,
    /// Login name.
    pub login: String,
    /// Password (sent inside the connection: use TLS across machines).
    pub password: String,
    /// First delay before reconnecting; doubles up to `reconnect_max` with
    /// each failed attempt, and each delay is jittered (50 to 100 % of it) so
    /// that many replicas do not reconnect in step. Default 50 ms.
    pub reconnect_min: Duration,
    /// Longest delay between reconnection attempts. Default 5 s.
    pub reconnect_max: Duration,
    /// How long to wait for the server's welcome. Default 10 s.
    pub handshake_timeout: Duration,
}

impl ClientConfig {
    /// A configuration with a login and a password.
    pub fn new(login: &str, password: &str) -> Self {
        ClientConfig {
            transport: crate::server::queue_limited(transport::Config::default()),
            login: login.to_owned(),
            password: password.to_owned(),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Errors of [`Client::connect`], [`Client::attach`] and [`Store::connect`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The transport could not connect.
    #[error(transparent)]
    Transport(#[from] transport::Error),
    /// The server refused the login.
    #[error("login refused: {0}")]
    AuthFailed(String),
    /// The server has banned this address.
    #[error("banned: {0}")]
    Banned(String),
    /// The connection ended during the handshake.
    #[error("connection closed during the handshake: {0}")]
    Closed(String),
    /// The server refused the store (unknown store, wrong schema).
    #[error("store refused: {0}")]
    Refused(#[from] RemoteError),
    /// This process is not a worker, or its socket was already taken.
    #[error("no worker socket: {0}")]
    NoWorkerSocket(String),
    /// The store is an authority: it cannot follow another one.
    #[error("an authority store cannot connect to an upstream")]
    NotAReplica,
    /// An I/O error (worker socket).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The client was shut down.
    #[error("client shut down")]
    Shutdown,
    /// [`Client::connect_any`] was given no URL.
    #[error("no server URL given")]
    NoUrl,
    /// A worker's parent process is gone (it exited, or stopped the server
    /// that spawned this worker): no link can be had any more. Exit, so that
    /// whatever supervises the worker can start it again.
    #[error("worker link lost for good: {0}")]
    ParentGone(String),
}

/// What a worker link's end says when the parent closed the control socket.
const PARENT_GONE: &str = "the parent process closed the worker's control socket (it exited or stopped serving workers); dispatches not yet acknowledged may or may not have been committed";

enum Target {
    /// Servers of the same history, tried round-robin.
    Urls(Vec<String>, Box<ClientConfig>),
    /// The control socket inherited from the parent.
    Worker(tokio::net::UnixStream),
}

struct ClientCore {
    target: Target,
    stores: Mutex<HashMap<String, Arc<dyn AnyStore>>>,
    /// The current link and its cancel token.
    current: Mutex<Option<(LinkTx, CancellationToken)>>,
    up: watch::Sender<bool>,
    /// Set when the client cannot link any more (worker whose parent is gone).
    ended: watch::Sender<Option<String>>,
    /// Links established so far.
    links: AtomicU64,
    /// Index in `Target::Urls` of the current (or last) server.
    url_index: AtomicUsize,
    stop: CancellationToken,
    /// The client's task (reading the link, reconnecting).
    tasks: TaskTracker,
}

impl ClientCore {
    fn new(target: Target) -> Arc<ClientCore> {
        Arc::new(ClientCore {
            target,
            stores: Mutex::new(HashMap::new()),
            current: Mutex::new(None),
            up: watch::channel(false).0,
            ended: watch::channel(None).0,
            links: AtomicU64::new(0),
            url_index: AtomicUsize::new(0),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// No link can be had any more: every attached store fails its waiting
    /// and future dispatches with `reason`.
    fn give_up(&self, reason: &str) {
        tracing::error!(reason, "store link lost for good");
        let e = RemoteError::new(ErrorCode::Internal, format!("worker link lost: {reason}"));
        self.ended.send_replace(Some(reason.to_owned()));
        for s in self
            .stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            s.link_failed(e.clone());
        }
    }
}

struct Guard {
    core: Arc<ClientCore>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.core.stop.cancel();
        self.core.tasks.close();
    }
}

/// A connection to a server (or to the parent process) carrying one or more
/// replica stores. It reconnects by itself with exponential backoff; stores
/// catch up and resend their unacknowledged dispatches after each
/// reconnection. Cheap to clone.
///
/// # Stopping
///
/// [`Client::shutdown`]`.await` stops the client and waits until it has
/// stopped: the link is closed (`Close{NORMAL}`), no more reconnection is
/// tried and the client's task has ended. Dropping the last clone does the
/// same without waiting. The stores it carries stay usable (their
/// dispatches wait for another link); the client's own tasks do not count
/// as handles. The client of a worker ([`Client::worker`]) is kept for the
/// whole process.
#[derive(Clone)]
pub struct Client {
    guard: Arc<Guard>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connected", &self.connected())
            .finish()
    }
}

static WORKER: OnceLock<Client> = OnceLock::new();

/// Backoff between a worker's requests for a new link.
const WORKER_RECONNECT_MIN: Duration = Duration::from_millis(10);
const WORKER_RECONNECT_MAX: Duration = Duration::from_secs(1);
/// How long a worker waits for the parent to answer a request for a link.
const WORKER_GRANT_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// Connects and logs in to `url`. Fails if the first attempt fails
    /// (wrong login, ban, unreachable); later disconnections are retried.
    pub async fn connect(url: &str, config: ClientConfig) -> Result<Client, ConnectError> {
        Client::connect_any(&[url], config).await
    }

    /// Connects and logs in to the first of `urls` that accepts: servers of
    /// the same history (an authority's listeners, its relays). After a
    /// disconnection the client tries the next URL, round-robin, with the
    /// jittered exponential backoff of [`ClientConfig`]; the stores catch up
    /// and resend their unacknowledged dispatches wherever they land, and
    /// the authority applies each once.
    ///
    /// Fails if every URL fails on the first pass, with the most telling
    /// error (a refused login or a ban rather than an unreachable server).
    pub async fn connect_any<S: AsRef<str>>(
        urls: &[S],
        config: ClientConfig,
    ) -> Result<Client, ConnectError> {
        let urls: Vec<String> = urls.iter().map(|u| u.as_ref().to_owned()).collect();
        let mut best: Option<ConnectError> = None;
        for (i, url) in urls.iter().enumerate() {
            match dial(url, &config).await {
                Ok((tx, rx)) => {
                    let core = ClientCore::new(Target::Urls(urls.clone(), Box::new(config)));
                    core.url_index.store(i, Ordering::Relaxed);
                    return Ok(Client::start(core, tx, rx));
                }
                Err(e) => {
                    tracing::debug!(url, error = %e, "connect failed");
                    let telling = !matches!(
                        e,
                        ConnectError::Transport(_) | ConnectError::Io(_) | ConnectError::Closed(_)
                    );
                    if best.is_none() || telling {
                        best = Some(e);
                    }
                }
            }
        }
        Err(best.unwrap_or(ConnectError::NoUrl))
    }

    /// In a worker process spawned by [`crate::Server::spawn_worker`]: the
    /// link to the parent, asked for over the inherited control socket.
    /// Every call returns the same client.
    ///
    /// If the link breaks while the parent lives (for example the parent
    /// dropped it after its idle timeout because this process was blocked),
    /// the client asks for a new one, with backoff, and the stores catch up
    /// and resend their unacknowledged dispatches, as after any reconnection.
    /// If the parent is gone (the control socket is closed), the client gives
    /// up: waiting and later dispatches fail with
    /// [`crate::DispatchError::Rejected`], and [`Client::closed`] resolves to
    /// [`ConnectError::ParentGone`]; the worker should then exit.
    pub async fn worker() -> Result<Client, ConnectError> {
        if let Some(c) = WORKER.get() {
            return Ok(c.clone());
        }
        if std::env::var(WORKER_ENV).as_deref() != Ok("0") {
            return Err(ConnectError::NoWorkerSocket(format!(
                "{WORKER_ENV} is not set: this process was not spawned as a worker"
            )));
        }
        let fd = std::io::stdin().as_fd().try_clone_to_owned()?;
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        if let Err(e) = std_stream.local_addr() {
            return Err(ConnectError::NoWorkerSocket(format!(
                "standard input is not a Unix socket ({e})"
            )));
        }
        std_stream.set_nonblocking(true)?;
        let ctrl = tokio::net::UnixStream::from_std(std_stream)?;
        let (tx, rx) = dial_worker(&ctrl).await?;
        let core = ClientCore::new(Target::Worker(ctrl));
        let client = Client::start(core, tx, rx);
        Ok(WORKER.get_or_init(|| client).clone())
    }

    fn start(core: Arc<ClientCore>, tx: LinkTx, rx: LinkRx) -> Client {
        let c = core.clone();
        core.tasks.spawn(
            async move { run(c, tx, rx).await }.instrument(tracing::debug_span!("store-client")),
        );
        Client {
            guard: Arc::new(Guard { core }),
        }
    }

    /// Attaches a replica store to this connection and waits until the
    /// server has welcomed it (or refused it: unknown store, wrong schema).
    pub async fn attach<R: Reducer>(&self, store: &Store<R>) -> Result<(), ConnectError> {
        let any = store.any();
        if !any.is_replica() {
            return Err(ConnectError::NotAReplica);
        }
        let core = &self.guard.core;
        any.add_role(match core.target {
            Target::Urls(..) => Role::Client,
            Target::Worker(_) => Role::Worker,
        });
        if let Some(reason) = core.ended.borrow().clone() {
            return Err(ConnectError::ParentGone(reason));
        }
        {
            let cur = core.current.lock().unwrap_or_else(|e| e.into_inner());
            core.stores
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(store.name().to_owned(), any.clone());
            if let Some((tx, cancel)) = cur.as_ref() {
                any.clone().link_up(tx.clone(), cancel.child_token());
            }
        }
        tokio::select! {
            r = any.wait_ready() => r.map_err(ConnectError::Refused),
            _ = core.stop.cancelled() => Err(ConnectError::Shutdown),
        }
    }

    /// Whether the link is up now.
    pub fn connected(&self) -> bool {
        *self.guard.core.up.borrow()
    }

    /// The URL of the server this client is connected to now (`None` while
    /// disconnected, and for a worker's link).
    pub fn connected_url(&self) -> Option<String> {
        let core = &self.guard.core;
        match &core.target {
            Target::Urls(urls, _) if self.connected() => {
                urls.get(core.url_index.load(Ordering::Relaxed)).cloned()
            }
            _ => None,
        }
    }

    /// How many times the link was re-established after the first one.
    pub fn reconnects(&self) -> u64 {
        self.guard
            .core
            .links
            .load(Ordering::Relaxed)
            .saturating_sub(1)
    }

    /// Resolves when this client stops for good: [`ConnectError::Shutdown`]
    /// after [`Client::shutdown`], or [`ConnectError::ParentGone`] for a
    /// worker whose parent is gone. A worker typically awaits it and exits,
    /// so that its supervisor (the parent, through the `Child` of
    /// [`crate::Server::spawn_worker`]) can start it again.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn closed(&self) -> ConnectError {
        let core = &self.guard.core;
        let mut ended = core.ended.subscribe();
        tokio::select! {
            r = ended.wait_for(Option::is_some) => match r {
                Ok(reason) => ConnectError::ParentGone(reason.clone().unwrap_or_default()),
                Err(_) => ConnectError::Shutdown,
            },
            _ = core.stop.cancelled() => ConnectError::Shutdown,
        }
    }

    /// Stops the client and waits until it has stopped (see
    /// [Stopping](Client#stopping)): the link closed, no more reconnection,
    /// the client's task ended.
    ///
    /// # Cancel safety
    /// Cancel safe: the stop goes on if the future is dropped.
    pub async fn shutdown(&self) {
        let core = &self.guard.core;
        core.stop.cancel();
        core.tasks.close();
        core.tasks.wait().await;
    }
}

impl<R: Reducer> Store<R> {
    /// Connects this replica to a server at `url` with a login (a shortcut
    /// for [`Client::connect`] plus [`Client::attach`]). Keep the returned
    /// client: dropping it disconnects.
    pub async fn connect(
        &self,
        url: &str,
        login: &str,
        password: &str,
    ) -> Result<Client, ConnectError> {
        self.connect_with(url, ClientConfig::new(login, password))
            .await
    }

    /// [`Store::connect`] with full client settings.
    pub async fn connect_with(
        &self,
        url: &str,
        config: ClientConfig,
    ) -> Result<Client, ConnectError> {
        let client = Client::connect(url, config).await?;
        client.attach(self).await?;
        Ok(client)
    }

    /// Connects this replica to the first of several servers of the same
    /// history that accepts, failing over round-robin when the link breaks
    /// (see [`Client::connect_any`]). Keep the returned client.
    pub async fn connect_any<S: AsRef<str>>(
        &self,
        urls: &[S],
        login: &str,
        password: &str,
    ) -> Result<Client, ConnectError> {
        self.connect_any_with(urls, ClientConfig::new(login, password))
            .await
    }

    /// [`Store::connect_any`] with full client settings.
    pub async fn connect_any_with<S: AsRef<str>>(
        &self,
        urls: &[S],
        config: ClientConfig,
    ) -> Result<Client, ConnectError> {
        let client = Client::connect_any(urls, config).await?;
        client.attach(self).await?;
        Ok(client)
    }

    /// In a worker process: attaches this replica to the parent's store of
    /// the same name (see [`crate::Server::spawn_worker`]).
    pub async fn connect_worker(&self) -> Result<Client, ConnectError> {
        let client = Client::worker().await?;
        client.attach(self).await?;
        Ok(client)
    }
}

async fn dial(url: &str, config: &ClientConfig) -> Result<(LinkTx, LinkRx), ConnectError> {
    let conn = transport::connect(url, &config.transport).await?;
    let (tx, mut rx) = link::from_transport(conn);
    handshake(
        &tx,
        &mut rx,
        &config.login,
        &config.password,
        config.handshake_timeout,
    )
    .await?;
    Ok((tx, rx))
}

/// A worker's link: asked for over the control socket, then the
/// (password-less) handshake.
async fn dial_worker(ctrl: &tokio::net::UnixStream) -> Result<(LinkTx, LinkRx), ConnectError> {
    let fd = tokio::time::timeout(WORKER_GRANT_TIMEOUT, worker::request(ctrl))
        .await
        .map_err(|_| {
            ConnectError::Closed("the parent did not answer the request for a link".into())
        })?
        .map_err(|e| ConnectError::ParentGone(format!("worker control socket failed: {e}")))?
        .ok_or_else(|| ConnectError::ParentGone(PARENT_GONE.to_owned()))?;
    let config = crate::server::queue_limited(transport::Config::default());
    let conn = transport::from_std_unix_stream(std::os::unix::net::UnixStream::from(fd), &config)?;
    let (tx, mut rx) = link::from_transport(conn);
    handshake(&tx, &mut rx, "", "", Duration::from_secs(10)).await?;
    Ok((tx, rx))
}

async fn handshake(
    tx: &LinkTx,
    rx: &mut LinkRx,
    login: &str,
    password: &str,
    timeout: Duration,
) -> Result<(), ConnectError> {
    let hello = Frame::new(Body::Hello(proto::Hello {
        version: PROTOCOL_VERSION,
        kind: proto::PeerKind::Client as i32,
        id: format!("{:016x}", random_nonzero()),
        login: login.to_owned(),
        password: password.to_owned(),
        ..Default::default()
    }));
    tx.send(&hello)
        .map_err(|_| ConnectError::Closed("could not send hello".into()))?;
    match tokio::time::timeout(timeout, rx.recv()).await {
        Err(_) => {
            tx.close(CloseCode::Timeout, "no welcome");
            Err(ConnectError::Closed("no welcome within the timeout".into()))
        }
        Ok(Ok(Frame {
            body: Some(Body::Welcome(_)),
        })) => Ok(()),
        Ok(Ok(_)) => {
            tx.close(CloseCode::ProtocolError, "expected welcome");
            Err(ConnectError::Closed(
                "unexpected frame instead of welcome".into(),
            ))
        }
        Ok(Err(LinkEnd::Closed { code, reason })) => Err(match CloseCode::from_u32(code) {
            Some(CloseCode::AuthFailed) => ConnectError::AuthFailed(reason),
            Some(CloseCode::Banned) => ConnectError::Banned(reason),
            _ => ConnectError::Closed(reason),
        }),
        Ok(Err(e)) => Err(ConnectError::Closed(e.to_string())),
    }
}

async fn run(core: Arc<ClientCore>, mut tx: LinkTx, mut rx: LinkRx) {
    let (min, max) = match &core.target {
        Target::Urls(_, config) => (config.reconnect_min, config.reconnect_max),
        Target::Worker(_) => (WORKER_RECONNECT_MIN, WORKER_RECONNECT_MAX),
    };
    let mut backoff = transport::Backoff::new(min, max);
    loop {
        let cancel = core.stop.child_token();
        {
            let mut cur = core.current.lock().unwrap_or_else(|e| e.into_inner());
            *cur = Some((tx.clone(), cancel.clone()));
            for s in core
                .stores
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
            {
                s.clone().link_up(tx.clone(), cancel.child_token());
            }
        }
        core.up.send_replace(true);
        core.links.fetch_add(1, Ordering::Relaxed);
        let mut routes: HashMap<String, Arc<dyn AnyStore>> = HashMap::new();
        loop {
            let frame = tokio::select! {
                f = rx.recv() => f,
                _ = cancel.cancelled() => {
                    tx.close(CloseCode::Normal, "client shut down");
                    break;
                }
            };
            let frame = match frame {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(error = %e, "store link lost");
                    break;
                }
            };
            let Some(name) = store_of(&frame) else {
                continue;
            };
            let store = match routes.get(name) {
                Some(s) => Some(s.clone()),
                None => {
                    let s = core
                        .stores
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(name)
                        .cloned();
                    if let Some(s) = &s {
                        routes.insert(name.to_owned(), s.clone());
                    }
                    s
                }
            };
            if let Some(s) = store {
                s.upstream_frame(frame);
            }
        }
        cancel.cancel();
        {
            let mut cur = core.current.lock().unwrap_or_else(|e| e.into_inner());
            *cur = None;
            for s in core
                .stores
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
            {
                s.link_down();
            }
        }
        core.up.send_replace(false);
        // Reconnect with jittered exponential backoff, to the next URL each time.
        loop {
            if core.stop.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_random_delay()) => {}
                _ = core.stop.cancelled() => return,
            }
            let dialed = tokio::select! {
                d = async {
                    match &core.target {
                        Target::Urls(urls, config) => {
                            let i = (core.url_index.load(Ordering::Relaxed) + 1) % urls.len();
                            core.url_index.store(i, Ordering::Relaxed);
                            dial(&urls[i], config).await
                        }
                        Target::Worker(ctrl) => dial_worker(ctrl).await,
                    }
                } => d,
                _ = core.stop.cancelled() => return,
            };
            match dialed {
                Ok((t, r)) => {
                    tx = t;
                    rx = r;
                    backoff.reset();
                    break;
                }
                Err(ConnectError::ParentGone(reason)) => {
                    core.give_up(&reason);
                    return;
                }
                Err(e) => tracing::debug!(error = %e, "reconnect failed"),
            }
        }
    }
}
