//! Servers: listeners with logins and bans, and worker processes.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use proto::frame::Body;
use proto::{CloseCode, Frame, PROTOCOL_VERSION};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::Logins;
use crate::core::{store_of, FollowerId};
use crate::error::{ErrorCode, RemoteError};
use crate::gate::{accept_each, Gate};
use crate::journal::JournalQueue;
use crate::link::{LinkRx, LinkTx};
use crate::store::{random_nonzero, AnyStore, Role, Store};
use crate::{worker, Reducer};

/// The environment variable that tells a worker process its store socket is
/// its standard input.
pub const WORKER_ENV: &str = "REPLIMESH_STORE_FD";

/// Acks waiting for one replica beyond which its reader pauses.
const ACK_BACKLOG: usize = 1 << 18;

/// Settings of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Transport settings (TLS certificates for `tls://` and `wss://`).
    /// The default bounds each connection's outbound queue to 1 MiB and
    /// reads inline (`inline_reads`: no reader task per connection).
    pub transport: transport::Config,
    /// Who may connect.
    pub logins: Logins,
    /// Failed logins from one address before it is banned. Default 5.
    pub max_failures: u32,
    /// How long a ban lasts. Default 3 hours.
    pub ban_duration: Duration,
    /// A connection that has not logged in within this time is closed.
    /// Default 10 s.
    pub auth_timeout: Duration,
    /// Accept any login, even with no login table. For tests and trusted
    /// local sockets only.
    pub danger_allow_anonymous: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            transport: queue_limited(transport::Config::default()),
            logins: Logins::new(),
            max_failures: 5,
            ban_duration: Duration::from_secs(3 * 3600),
            auth_timeout: Duration::from_secs(10),
            danger_allow_anonymous: false,
        }
    }
}

impl ServerConfig {
    /// A configuration with these logins.
    pub fn with_logins(logins: Logins) -> Self {
        ServerConfig {
            logins,
            ..ServerConfig::default()
        }
    }
}

/// Default bound of a store connection's outbound queue: followers are fed
/// from the backlog as the queue drains, so a deep queue only costs memory.
pub(crate) const STORE_QUEUE_BYTES: usize = 1 << 20;

pub(crate) fn queue_limited(mut c: transport::Config) -> transport::Config {
    c.max_queue_bytes = STORE_QUEUE_BYTES;
    // Received batches waiting for the store: a few keep the socket busy;
    // more only hold decoded dispatches in memory.
    c.recv_batches = 16;
    // The store's tasks always wait in `recv`: frames reach them without a
    // hand-off from a reader task (see `store-latency` in docs/store.md).
    c.inline_reads = true;
    c
}

/// Errors of [`Server::listen`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The transport could not listen.
    #[error(transparent)]
    Transport(#[from] transport::Error),
}

struct ServerShared {
    id: String,
    config: ServerConfig,
    stores: RwLock<HashMap<String, Arc<dyn AnyStore>>>,
    gate: Gate,
    urls: Mutex<Vec<String>>,
    /// The login table, shared with the password checks.
    logins: Arc<Logins>,
    stop: CancellationToken,
    /// The accepting tasks, the connections' tasks and the workers' control
    /// sockets.
    tasks: TaskTracker,
}

/// Serves stores to replicas: over listeners ([`Server::listen`]) and to
/// worker processes ([`Server::spawn_worker`]). Several stores share one
/// server and one connection; a replica picks a store by name.
///
/// # Stopping
///
/// [`Server::shutdown`]`.await` stops the server and waits until it has
/// stopped: its listeners are closed (a new connection is refused, a Unix
/// socket's file is gone), every connection got `Close{GOING_AWAY}` and its
/// task has ended, and the workers' control sockets are closed. Dropping
/// the server does the same without waiting. A server started by
/// [`Store::serve`] also stops with that store (and
/// [`Store::shutdown`] waits for it).
pub struct Server {
    shared: Arc<ServerShared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        self.shared.tasks.close();
    }
}

impl Server {
    /// A server with no store and no listener yet.
    pub fn new(config: ServerConfig) -> Self {
        Self::with_stop(config, CancellationToken::new())
    }

    fn with_stop(config: ServerConfig, stop: CancellationToken) -> Self {
        let gate = Gate::new(
            config.max_failures,
            config.ban_duration,
            config.auth_timeout,
            stop.clone(),
        );
        let logins = Arc::new(config.logins.clone());
        Server {
            shared: Arc::new(ServerShared {
                id: format!("{:016x}", random_nonzero()),
                config,
                stores: RwLock::new(HashMap::new()),
                gate,
                urls: Mutex::new(Vec::new()),
                logins,
                stop,
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Adds a store (authority or replica: a replica serves as a relay).
    pub fn add<R: Reducer>(&self, store: &Store<R>) -> &Self {
        let any = store.any();
        any.add_role(Role::Server);
        self.shared
            .stores
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(store.name().to_owned(), any);
        self
    }

    /// Listens on `url` (`tcp://`, `tls://`, `unix://`, `ws://`, `wss://`);
    /// returns the URL actually bound (port 0 picks one).
    pub async fn listen(&self, url: &str) -> Result<String, ServeError> {
        let listener = transport::listen(url, &self.shared.config.transport).await?;
        let local = listener.local_url();
        self.shared
            .urls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(local.clone());
        let shared = self.shared.clone();
        accept_each(
            listener,
            shared.stop.clone(),
            &self.shared.tasks,
            move |conn| {
                let span = tracing::debug_span!("store-conn", peer = %conn.peer_addr());
                handle(shared.clone(), conn, false).instrument(span)
            },
        );
        Ok(local)
    }

    /// Spawns a worker process that shares this server's stores over an
    /// inherited socket: the child's standard input is one end of a Unix
    /// socket pair (the *control socket*), and [`WORKER_ENV`] is set so that
    /// [`crate::Client::worker`] finds it. No address or password is
    /// involved. Over the control socket the worker asks for store links and
    /// this server answers each request with a fresh socket (passed as a file
    /// descriptor) that it serves as a trusted connection, so a worker whose
    /// link broke gets a new one while both processes live. When this server
    /// stops (or the parent exits) the control socket closes and the worker's
    /// [`crate::Client::closed`] says the parent is gone. Must be called
    /// inside a Tokio runtime.
    pub fn spawn_worker(&self, cmd: &mut Command) -> std::io::Result<Child> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        cmd.stdin(Stdio::from(OwnedFd::from(theirs)));
        cmd.env(WORKER_ENV, "0");
        let child = cmd.spawn();
        // Drop our copy of the child's end, so that its exit is seen as EOF.
        cmd.stdin(Stdio::null());
        let child = child?;
        ours.set_nonblocking(true)?;
        let ctrl = tokio::net::UnixStream::from_std(ours)?;
        for s in self
            .shared
            .stores
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            s.add_role(Role::Master);
        }
        let shared = self.shared.clone();
        let span = tracing::debug_span!("store-worker", pid = child.id());
        self.shared
            .tasks
            .spawn(serve_worker(shared, ctrl).instrument(span));
        Ok(child)
    }

    /// Serves the store frames of a connection that the caller accepted and
    /// authenticated itself: no hello, login or welcome happens here. This
    /// is how one listener serves both a mesh clone and stores (the
    /// `replimesh` node reads each connection, answers its hello, and passes
    /// the store frames on).
    ///
    /// `frames` carries the connection's store frames (`StoreHello`,
    /// `Dispatch`, `Resync`) in order; answers are queued on `sender`, which
    /// may be shared with other services (store followers wait for room in
    /// its queue). Serving ends when `frames` is closed, when the connection
    /// ends, or at [`Server::shutdown`] (which closes the connection with
    /// "going away"). Must be called inside a Tokio runtime.
    pub fn adopt(&self, sender: transport::Sender, frames: tokio::sync::mpsc::Receiver<Frame>) {
        self.adopt_as("", sender, frames);
    }

    /// As [`Server::adopt`], for a connection logged in as `login`: the
    /// client ids its dispatches name count against that login's bound
    /// ([`crate::StoreConfig::dedup_clients_per_login`]), so one login
    /// cannot make the stores forget the client ids of another.
    pub fn adopt_as(
        &self,
        login: &str,
        sender: transport::Sender,
        frames: tokio::sync::mpsc::Receiver<Frame>,
    ) {
        let shared = self.shared.clone();
        let span = tracing::debug_span!("store-conn", peer = %sender.peer_addr());
        let login = login.to_owned();
        self.shared.tasks.spawn(
            serve_frames(
                shared,
                login,
                LinkTx::Transport(sender),
                Inbound::Frames(frames),
            )
            .instrument(span),
        );
    }

    /// The URLs this server listens on (with the ports actually bound).
    pub fn urls(&self) -> Vec<String> {
        self.shared
            .urls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops the server and waits until it has stopped (see
    /// [Stopping](Server#stopping)): listeners closed, connections closed
    /// with "going away" and their tasks ended. Calling it again returns
    /// once the server has stopped.
    ///
    /// # Cancel safety
    /// Cancel safe: the stop goes on if the future is dropped.
    pub async fn shutdown(&self) {
        self.shared.stop.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

impl<R: Reducer> Store<R> {
    /// Serves this store on `url` with `config` (a shortcut for a [`Server`]
    /// with one store). [`Server::add`] adds more stores to it;
    /// [`Server::listen`] more listeners. Dropping the server stops it, and
    /// so does stopping this store ([`Store::shutdown`] waits for it).
    pub async fn serve(&self, url: &str, config: ServerConfig) -> Result<Server, ServeError> {
        let server = Server::with_stop(config, self.inner.stop.child_token());
        {
            let mut servers = self.inner.servers.lock().unwrap_or_else(|e| e.into_inner());
            // Those that stopped already need no waiting for.
            servers.retain(|t| !(t.is_closed() && t.is_empty()));
            servers.push(server.shared.tasks.clone());
        }
        server.add(self);
        server.listen(url).await?;
        Ok(server)
    }
}

/// A worker's control socket: each request gets a new link, served as a
/// trusted connection. Ends when the worker closes it or the server stops
/// (dropping the socket tells the worker).
async fn serve_worker(shared: Arc<ServerShared>, ctrl: tokio::net::UnixStream) {
    loop {
        let request = tokio::select! {
            r = worker::next_request(&ctrl) => r,
            _ = shared.stop.cancelled() => return,
        };
        match request {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!("worker closed its control socket");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "worker control socket failed; closing it");
                return;
            }
        }
        let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot create a worker link; closing the worker's control socket");
                return;
            }
        };
        let conn = match transport::from_std_unix_stream(ours, &shared.config.transport) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up a worker link; closing the worker's control socket");
                return;
            }
        };
        if let Err(e) = worker::grant(&ctrl, &OwnedFd::from(theirs)).await {
            tracing::warn!(error = %e, "cannot hand a link to the worker; closing its control socket");
            return;
        }
        tracing::debug!("new worker link");
        let span = tracing::debug_span!("store-worker-conn");
        shared
            .tasks
            .spawn(handle(shared.clone(), conn, true).instrument(span));
    }
}

/// One connection on the server side: login, then store frames.
async fn handle(shared: Arc<ServerShared>, conn: transport::Connection, trusted: bool) {
    let (tx, mut rx) = conn.split();
    // A banned address is closed before it may send anything.
    if !trusted && shared.gate.refuse_banned(&tx) {
        return;
    }
    let Some(hello) = shared.gate.hello(&tx, &mut rx).await else {
        return;
    };
    if !trusted && !shared.config.danger_allow_anonymous {
        let (logins, user, password) = (
            shared.logins.clone(),
            hello.login.clone(),
            hello.password.clone(),
        );
        let check = move || logins.verify(&user, &password).then_some(());
        if shared.gate.login(&tx, &hello.login, check).await.is_err() {
            return;
        }
    }
    let welcome = Frame::new(Body::Welcome(proto::Welcome {
        version: PROTOCOL_VERSION,
        id: shared.id.clone(),
        ..Default::default()
    }));
    if tx.send(&welcome).is_err() {
        return;
    }
    let (tx, rx) = (LinkTx::Transport(tx), LinkRx::Transport(rx));
    let login = if trusted {
        "(worker)".to_owned()
    } else {
        hello.login
    };
    serve_frames(shared, login, tx, Inbound::Link(rx)).await;
}

/// Where a served connection's frames come from.
enum Inbound {
    /// The connection itself.
    Link(LinkRx),
    /// Frames passed on by whoever reads the connection ([`Server::adopt`]).
    Frames(tokio::sync::mpsc::Receiver<Frame>),
}

impl Inbound {
    /// The next frame; `None` once the connection (or the feeder) is over.
    async fn recv(&mut self) -> Option<Frame> {
        match self {
            Inbound::Link(rx) => rx.recv().await.ok(),
            Inbound::Frames(rx) => rx.recv().await,
        }
    }
}

/// A store attached on a connection: the store, the follower, and the
/// store's journal queue (a persistent authority).
type Attached = (Arc<dyn AnyStore>, FollowerId, Option<Arc<JournalQueue>>);

/// A logged-in connection: store frames until it ends.
async fn serve_frames(shared: Arc<ServerShared>, login: String, tx: LinkTx, mut rx: Inbound) {
    let cancel = shared.stop.child_token();
    let mut attached: HashMap<String, Attached> = HashMap::new();
    loop {
        let frame = tokio::select! {
            f = rx.recv() => f,
            _ = cancel.cancelled() => {
                tx.close(CloseCode::GoingAway, "server shutting down");
                break;
            }
        };
        let Some(frame) = frame else { break };
        let Some(name) = store_of(&frame).map(str::to_owned) else {
            continue;
        };
        if let Some(Body::StoreError(e)) = frame.body {
            // Replicas send no errors: this is a store frame the transport
            // could not decode (`Frame::from_json_or_store_error`), answered
            // for its store; the connection goes on.
            let _ = tx.send(&bad_frame_answer(e));
            continue;
        }
        if let Some(Body::StoreHello(h)) = &frame.body {
            if let Some((s, fid, _)) = attached.remove(&name) {
                s.detach(fid);
            }
            let store = shared
                .stores
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&name)
                .cloned();
            let result = match store {
                None => Err(RemoteError::new(
                    ErrorCode::UnknownStore,
                    format!("unknown store {name:?}"),
                )),
                Some(s) => s
                    .clone()
                    .attach(h, &login, tx.clone(), cancel.child_token())
                    .map(|fid| {
                        let q = s.journal_queue();
                        (s, fid, q)
                    }),
            };
            match result {
                Ok(x) => {
                    attached.insert(name, x);
                }
                Err(e) => {
                    let _ = tx.send(&e.to_frame(&name, 0));
                }
            }
            continue;
        }
        match attached.get(&name) {
            Some((s, fid, journal)) => {
                // A persistent authority whose journal is behind: this
                // connection is not read until it has caught up.
                if let (Some(q), Some(Body::Dispatch(_))) = (journal, &frame.body) {
                    q.wait_room(&cancel).await;
                }
                let mut backlog = s.follower_frame(*fid, frame);
                // A replica that dispatches without reading its acks waits here.
                while backlog > ACK_BACKLOG && !cancel.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    backlog = s.follower_frame(*fid, Frame::default());
                }
            }
            None => {
                let e = RemoteError::new(
                    ErrorCode::NotAttached,
                    format!("store {name:?} is not attached on this connection"),
                );
                let _ = tx.send(&e.to_frame(&name, 0));
            }
        }
    }
    cancel.cancel();
    for (_, (s, fid, _)) in attached {
        s.detach(fid);
    }
}

/// The answer to a `StoreError` a replica sent: the same error (store, op
/// ids, client id) with the code `BAD_FRAME`.
fn bad_frame_answer(mut e: proto::StoreError) -> Frame {
    let message = e.error.take().map(|i| i.message).unwrap_or_default();
    e.error = Some(proto::ErrorInfo {
        code: ErrorCode::BadFrame.as_u32(),
        message: if message.is_empty() {
            "a replica does not send store errors".to_owned()
        } else {
            message
        },
    });
    Frame::new(Body::StoreError(e))
}
