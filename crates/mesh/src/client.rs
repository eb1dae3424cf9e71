//! The client: several server URLs, round-robin reconnect with jittered
//! backoff, subscriptions restored after reconnect, routing both ways.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use proto::{frame::Body, CloseCode, Frame, PeerKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::error::{MeshError, RouteError};
use crate::router::{handle_routed, lock, Ctx, Flow, Peer, Router};
use crate::server::{random_id, Groups};
use crate::shared_str::{NameCache, SharedStr};

/// Client configuration.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Client id; generated when `None`.
    pub id: Option<String>,
    /// Server URLs, tried round-robin.
    pub urls: Vec<String>,
    /// User data sent in the hello.
    pub data: Bytes,
    /// Reconnect after a broken connection (default `true`).
    pub reconnect: bool,
    /// First reconnect delay (default 100 ms); doubles up to `reconnect_max`, jittered.
    pub reconnect_min: Duration,
    /// Largest reconnect delay (default 5 s).
    pub reconnect_max: Duration,
    /// Consecutive failed attempts before giving up; 0 = forever (default).
    pub attempts: u32,
    /// Response timeout of requests (default 10 s).
    pub response_timeout: Duration,
    /// How many `send`s, `publish`es and `request`s may wait while the
    /// client is disconnected and reconnecting (default 1,024); they go out,
    /// in order, right after the next connection is made. More is an
    /// [`MeshError::OutboxFull`]. 0 (or `reconnect == false`) turns queueing
    /// off: calls made while disconnected fail with
    /// [`MeshError::Disconnected`].
    pub outbox: usize,
    /// Groups this client may be in (default 1,000, a server's default
    /// limit): [`Client::subscribe`] past it is [`MeshError::Limit`] and
    /// changes nothing. A server closes a connection that subscribes past
    /// its own limit.
    pub max_groups: usize,
    /// Longest group name [`Client::subscribe`] takes, in bytes (default
    /// 256, a server's default limit); longer is [`MeshError::Limit`].
    pub max_name_len: usize,
    /// Batches of deliveries the inbox ([`Client::deliveries`]) holds
    /// (default 64; at least 1); a batch is what one read of the
    /// connection brought, at most 256 deliveries. When it is full the read
    /// loop waits for room and does not read the connection meanwhile
    /// (responses and requests from the server wait too): the server sees
    /// the client as a slow consumer once its queue for it is full, and
    /// cuts it by its policy. Read the inbox, or do not take it.
    pub inbox: usize,
    /// Transport settings (`inline_reads` is always on: the client's read
    /// loop waits in `recv`).
    pub transport: transport::Config,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            id: None,
            urls: Vec::new(),
            data: Bytes::new(),
            reconnect: true,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            attempts: 0,
            response_timeout: Duration::from_secs(10),
            outbox: 1024,
            max_groups: 1000,
            max_name_len: 256,
            inbox: 64,
            transport: transport::Config::default(),
        }
    }
}

impl ClientConfig {
    /// A config for these URLs.
    pub fn new<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        ClientConfig {
            urls: urls.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// A group message received by a client.
///
/// `group` and `from` are [`SharedStr`]s: the deliveries of one connection
/// share the text of a repeated group name or sender id (they compare with
/// `&str` and have `as_str()` as a `String` does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The group it was delivered for.
    pub group: SharedStr,
    /// The publishing client's id (empty when a server published).
    pub from: SharedStr,
    /// Payload.
    pub data: Bytes,
}

/// The stream of group messages of a client.
///
/// The connection's read loop hands over the deliveries of each read as one
/// batch; this hands them out one by one or in bulk.
#[derive(Debug)]
pub struct Deliveries {
    rx: mpsc::Receiver<Vec<Delivery>>,
    /// What has arrived and was not handed out yet.
    ready: VecDeque<Delivery>,
}

impl Deliveries {
    /// The next delivery; `None` once the client has stopped (closed, or
    /// no longer reconnecting) and everything that arrived was handed out.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv(&mut self) -> Option<Delivery> {
        loop {
            if let Some(d) = self.ready.pop_front() {
                return Some(d);
            }
            self.ready = self.rx.recv().await?.into();
        }
    }

    /// A delivery that has already arrived, without waiting.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        loop {
            if let Some(d) = self.ready.pop_front() {
                return Some(d);
            }
            self.ready = self.rx.try_recv().ok()?.into();
        }
    }

    /// Waits for at least one delivery and appends up to `limit` to `buf`;
    /// returns how many (0 once the client has stopped and everything that
    /// arrived was handed out, or when `limit` is 0).
    /// Cheaper than [`Deliveries::recv`] under load.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv_many(&mut self, buf: &mut Vec<Delivery>, limit: usize) -> usize {
        if limit == 0 {
            return 0;
        }
        while self.ready.is_empty() {
            match self.rx.recv().await {
                Some(batch) => self.ready = batch.into(),
                None => return 0,
            }
        }
        let mut n = 0;
        loop {
            let take = (limit - n).min(self.ready.len());
            buf.extend(self.ready.drain(..take));
            n += take;
            if n == limit {
                return n;
            }
            match self.rx.try_recv() {
                Ok(batch) => self.ready = batch.into(),
                Err(_) => return n,
            }
        }
    }
}

/// What [`Client::info`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientStatus {
    /// Client id.
    pub id: String,
    /// The URL of the current connection, if connected.
    pub connected_to: Option<String>,
    /// Configured URLs.
    pub urls: Vec<String>,
    /// Subscribed groups.
    pub groups: Vec<String>,
}

struct State {
    urls: Vec<String>,
    next: usize,
    groups: BTreeSet<String>,
    peer: Option<Peer>,
    connected_to: Option<String>,
    /// What waits for the next connection (see [`ClientConfig::outbox`]).
    outbox: VecDeque<Outgoing>,
    /// The client stopped for good: nothing is queued any more.
    over: bool,
}

/// Something queued while disconnected.
enum Outgoing {
    /// A `Send` or `Publish` frame.
    Frame(Frame),
    /// A request whose caller waits on `reply` until `deadline`.
    Request {
        route: String,
        act: String,
        data: Bytes,
        deadline: Instant,
        reply: oneshot::Sender<Result<Bytes, MeshError>>,
    },
}

impl Outgoing {
    /// The caller no longer waits for it.
    fn abandoned(&self) -> bool {
        match self {
            Outgoing::Frame(_) => false,
            Outgoing::Request { reply, .. } => reply.is_closed(),
        }
    }
}

/// Sends what was queued while disconnected on a fresh connection.
fn flush_outbox(peer: &Peer, outbox: &mut VecDeque<Outgoing>) {
    for o in outbox.drain(..) {
        match o {
            Outgoing::Frame(f) => {
                let _ = peer.sender().send(&f);
            }
            Outgoing::Request {
                route,
                act,
                data,
                deadline,
                reply,
            } => {
                if reply.is_closed() {
                    continue;
                }
                let started = peer.start_request(&route, &act, data);
                let peer = peer.clone();
                tokio::spawn(async move {
                    let (id, rx) = match started {
                        Ok(x) => x,
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return;
                        }
                    };
                    let mut reply = reply;
                    let r = tokio::select! {
                        r = tokio::time::timeout_at(deadline, rx) => match r {
                            Ok(Ok(r)) => r,
                            Ok(Err(_)) => Err(MeshError::Disconnected),
                            Err(_) => Err(MeshError::Timeout),
                        },
                        _ = reply.closed() => {
                            peer.forget_request(id);
                            return;
                        }
                    };
                    peer.forget_request(id);
                    let _ = reply.send(r);
                });
            }
        }
    }
}

struct Inner {
    id: String,
    config: ClientConfig,
    router: Router,
    state: Mutex<State>,
    deliveries_rx: Mutex<Option<mpsc::Receiver<Vec<Delivery>>>>,
    connected: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    /// Set when the client's task has ended.
    done: watch::Sender<bool>,
    /// [`Client::deliveries`] was called: until then deliveries are
    /// dropped (nobody could read them).
    inbox_taken: std::sync::atomic::AtomicBool,
}

/// A client of a mesh. Cheap to clone.
///
/// # Stopping
///
/// [`Client::shutdown`]`.await` stops the client and waits until it has
/// stopped: the connection is closed (`Close{NORMAL}`), no more dialling,
/// the client's task has ended (the inbox ends once read out). Dropping the
/// last `Client` handle does the same without waiting (its own tasks do not
/// count as handles), and so does [`Client::close`].
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// Shared by the user's handles only: its drop stops the client.
    _handle: Arc<Handle>,
}

/// Stops the client when the last user handle goes.
struct Handle {
    inner: Arc<Inner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        stop_client(&self.inner);
    }
}

/// Closes the connection and stops reconnecting; what waits in the outbox
/// is dropped.
fn stop_client(inner: &Inner) {
    inner.shutdown.send_replace(true);
    let mut st = lock(&inner.state);
    st.over = true;
    st.outbox.clear();
    if let Some(p) = st.peer.take() {
        p.sender().close(CloseCode::Normal, "client closed");
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts a client and waits for its first connection (or for its
    /// attempts to run out).
    pub async fn connect(config: ClientConfig) -> Result<Client, MeshError> {
        let c = Client::start(config)?;
        let mut rx = c.inner.connected.subscribe();
        let mut stop = c.inner.shutdown.subscribe();
        loop {
            if *rx.borrow_and_update() > 0 {
                return Ok(c);
            }
            // The client's task may have given up before `stop` was
            // subscribed: `changed` would then wait for a change that
            // already happened, for ever. Look at the value first.
            if *stop.borrow_and_update() {
                return Err(MeshError::Disconnected);
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(MeshError::Disconnected) },
                _ = stop.changed() => return Err(MeshError::Disconnected),
            }
        }
    }

    /// Starts a client in the background without waiting for a connection.
    pub fn start(mut config: ClientConfig) -> Result<Client, MeshError> {
        // The read loop always waits in `recv`: frames reach it without a
        // hand-off from a reader task.
        config.transport.inline_reads = true;
        if config.urls.is_empty() {
            return Err(MeshError::Config("no server url".into()));
        }
        if config.inbox == 0 {
            return Err(MeshError::Config("inbox must be at least 1".into()));
        }
        let (tx, rx) = mpsc::channel(config.inbox);
        let (connected, _) = watch::channel(0);
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            id: config.id.clone().unwrap_or_else(|| random_id("client")),
            state: Mutex::new(State {
                urls: config.urls.clone(),
                next: 0,
                groups: BTreeSet::new(),
                peer: None,
                connected_to: None,
                outbox: VecDeque::new(),
                over: false,
            }),
            config,
            router: Router::default(),
            deliveries_rx: Mutex::new(Some(rx)),
            connected,
            shutdown,
            done: watch::channel(false).0,
            inbox_taken: std::sync::atomic::AtomicBool::new(false),
        });
        let c = Client {
            _handle: Arc::new(Handle {
                inner: inner.clone(),
            }),
            inner,
        };
        // the inbox's sender lives in the task: the inbox ends when it does
        tokio::spawn(run(c.inner.clone(), tx));
        Ok(c)
    }

    /// The client id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The stream of group messages (can be taken once). Until it is taken,
    /// and once it is dropped, deliveries are dropped as they arrive; while
    /// it is held, read it: see [`ClientConfig::inbox`].
    pub fn deliveries(&self) -> Option<Deliveries> {
        let rx = lock(&self.inner.deliveries_rx).take();
        self.inner
            .inbox_taken
            .store(rx.is_some(), std::sync::atomic::Ordering::Release);
        rx.map(|rx| Deliveries {
            rx,
            ready: VecDeque::new(),
        })
    }

    /// The router: middlewares and handlers for messages from the server.
    pub fn router(&self) -> &Router {
        &self.inner.router
    }

    /// Adds a middleware (see [`Router::use_middleware`]).
    pub fn use_middleware<F, Fut>(&self, f: F)
    where
        F: Fn(Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Flow, RouteError>> + Send + 'static,
    {
        self.inner.router.use_middleware(f)
    }

    /// Sets a route handler (see [`Router::route`]).
    pub fn route<F, Fut>(&self, route: &str, act: &str, f: F)
    where
        F: Fn(Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, RouteError>> + Send + 'static,
    {
        self.inner.router.route(route, act, f)
    }

    /// Sends `f` now, or queues it while disconnected (see [`ClientConfig::outbox`]).
    fn send_or_queue(&self, f: Frame) -> Result<(), MeshError> {
        let mut st = lock(&self.inner.state);
        if let Some(p) = &st.peer {
            match p.sender().send(&f) {
                Err(transport::SendError::Closed) => {} // broken just now: queue it
                r => return r.map_err(|e| MeshError::Send(e.to_string())),
            }
        }
        self.queue(&mut st, Outgoing::Frame(f))
    }

    fn queue(&self, st: &mut State, o: Outgoing) -> Result<(), MeshError> {
        let cfg = &self.inner.config;
        if st.over || !cfg.reconnect || cfg.outbox == 0 {
            return Err(MeshError::Disconnected);
        }
        if st.outbox.len() >= cfg.outbox {
            st.outbox.retain(|o| !o.abandoned());
            if st.outbox.len() >= cfg.outbox {
                return Err(MeshError::OutboxFull(cfg.outbox));
            }
        }
        st.outbox.push_back(o);
        Ok(())
    }

    /// Sends a routed message (no reply). While the client is disconnected
    /// and reconnecting, the message waits in the outbox.
    pub fn send(&self, route: &str, act: &str, data: impl Into<Bytes>) -> Result<(), MeshError> {
        self.send_or_queue(Frame::new(Body::Send(proto::Send {
            route: route.to_string(),
            act: act.to_string(),
            data: data.into(),
        })))
    }

    /// Sends a routed request and waits for the response (errors after the
    /// response timeout, counted from this call). While the client is
    /// disconnected and reconnecting, the request waits in the outbox.
    pub async fn request(
        &self,
        route: &str,
        act: &str,
        data: impl Into<Bytes>,
    ) -> Result<Bytes, MeshError> {
        let data = data.into();
        let timeout = self.inner.config.response_timeout;
        let queued = {
            let mut st = lock(&self.inner.state);
            match &st.peer {
                Some(p) if !p.is_closed() => Err((p.clone(), data)),
                _ => {
                    let (reply, rx) = oneshot::channel();
                    self.queue(
                        &mut st,
                        Outgoing::Request {
                            route: route.to_string(),
                            act: act.to_string(),
                            data,
                            deadline: Instant::now() + timeout,
                            reply,
                        },
                    )?;
                    Ok(rx)
                }
            }
        };
        let rx = match queued {
            Ok(rx) => rx,
            Err((peer, data)) => return peer.request(route, act, data).await,
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(MeshError::Disconnected),
            Err(_) => Err(MeshError::Timeout),
        }
    }

    /// Joins groups (remembered and restored after reconnect). Past
    /// [`ClientConfig::max_groups`] or with a name longer than
    /// [`ClientConfig::max_name_len`]: [`MeshError::Limit`], nothing joined.
    pub fn subscribe(&self, groups: &[&str]) -> Result<(), MeshError> {
        let cfg = &self.inner.config;
        if let Some(g) = groups.iter().find(|g| g.len() > cfg.max_name_len) {
            return Err(MeshError::Limit(format!(
                "group name of {} bytes, at most {} allowed",
                g.len(),
                cfg.max_name_len
            )));
        }
        let peer = {
            let mut st = lock(&self.inner.state);
            let new: BTreeSet<&str> = groups
                .iter()
                .copied()
                .filter(|g| !st.groups.contains(*g))
                .collect();
            if st.groups.len() + new.len() > cfg.max_groups {
                return Err(MeshError::Limit(format!(
                    "a client may be in at most {} groups",
                    cfg.max_groups
                )));
            }
            for g in groups {
                st.groups.insert(g.to_string());
            }
            st.peer.clone()
        };
        if let Some(p) = peer {
            let f = Frame::new(Body::Subscribe(proto::Subscribe {
                groups: groups.iter().map(|s| s.to_string()).collect(),
            }));
            p.sender()
                .send(&f)
                .map_err(|e| MeshError::Send(e.to_string()))?;
        }
        Ok(())
    }

    /// Leaves groups.
    pub fn unsubscribe(&self, groups: &[&str]) -> Result<(), MeshError> {
        let peer = {
            let mut st = lock(&self.inner.state);
            for g in groups {
                st.groups.remove(*g);
            }
            st.peer.clone()
        };
        if let Some(p) = peer {
            let f = Frame::new(Body::Unsubscribe(proto::Unsubscribe {
                groups: groups.iter().map(|s| s.to_string()).collect(),
            }));
            p.sender()
                .send(&f)
                .map_err(|e| MeshError::Send(e.to_string()))?;
        }
        Ok(())
    }

    /// The groups this client is in.
    pub fn my_groups(&self) -> Vec<String> {
        lock(&self.inner.state).groups.iter().cloned().collect()
    }

    /// Publishes to groups (or all groups) on every clone; `not_to_me`
    /// excludes this client. While the client is disconnected and
    /// reconnecting, the message waits in the outbox.
    pub fn publish(
        &self,
        groups: Groups,
        data: impl Into<Bytes>,
        not_to_me: bool,
    ) -> Result<(), MeshError> {
        let (groups, all) = match groups {
            Groups::All => (Vec::new(), true),
            Groups::Some(g) => (g, false),
        };
        let f = Frame::new(Body::Publish(proto::Publish {
            groups,
            all,
            not_to_me,
            data: data.into(),
        }));
        self.send_or_queue(f)
    }

    /// Publishes, waiting for room in the connection's queue (backpressure);
    /// queued in the outbox while disconnected.
    pub async fn publish_wait(
        &self,
        groups: Groups,
        data: impl Into<Bytes>,
        not_to_me: bool,
    ) -> Result<(), MeshError> {
        let (groups, all) = match groups {
            Groups::All => (Vec::new(), true),
            Groups::Some(g) => (g, false),
        };
        let f = Frame::new(Body::Publish(proto::Publish {
            groups,
            all,
            not_to_me,
            data: data.into(),
        }));
        let peer = lock(&self.inner.state).peer.clone();
        match peer {
            Some(p) => match p.sender().send_wait(&f).await {
                Err(transport::SendError::Closed) => self.send_or_queue(f),
                r => r.map_err(|e| MeshError::Send(e.to_string())),
            },
            None => self.send_or_queue(f),
        }
    }

    /// Adds a server URL to the rotation.
    pub fn add_url(&self, url: &str) {
        let mut st = lock(&self.inner.state);
        if !st.urls.iter().any(|u| u == url) {
            st.urls.push(url.to_string());
        }
    }

    /// Removes a server URL from the rotation (the current connection stays).
    pub fn delete_url(&self, url: &str) {
        lock(&self.inner.state).urls.retain(|u| u != url);
    }

    /// Drops the current connection and moves to the next URL.
    pub fn next_url(&self) {
        if let Some(p) = lock(&self.inner.state).peer.clone() {
            p.sender().close(CloseCode::Normal, "next url");
        }
    }

    /// Id, current URL, URLs and groups.
    pub fn info(&self) -> ClientStatus {
        let st = lock(&self.inner.state);
        ClientStatus {
            id: self.inner.id.clone(),
            connected_to: st.connected_to.clone(),
            urls: st.urls.clone(),
            groups: st.groups.iter().cloned().collect(),
        }
    }

    /// Whether the client is connected now.
    pub fn is_connected(&self) -> bool {
        lock(&self.inner.state).peer.is_some()
    }

    /// Waits until the client has connected more than `count` times in
    /// total (for example after a reconnect), at most `timeout`.
    pub async fn wait_connections(&self, count: u64, timeout: Duration) -> bool {
        let mut rx = self.inner.connected.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                if *rx.borrow_and_update() > count && self.is_connected() {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Number of connections made so far.
    pub fn connections(&self) -> u64 {
        *self.inner.connected.borrow()
    }

    /// Closes the connection and stops reconnecting, without waiting; what
    /// waits in the outbox is dropped (waiting requests fail with
    /// `Disconnected`). See [`Client::shutdown`] to wait for the end.
    pub fn close(&self) {
        stop_client(&self.inner);
    }

    /// [`Client::close`], then waits until the client's task has ended (no
    /// more connection attempts; the inbox ends once read out).
    pub async fn shutdown(&self) {
        stop_client(&self.inner);
        let mut done = self.inner.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }
}

async fn handshake(c: &Inner, url: &str) -> Result<(Peer, transport::Receiver), MeshError> {
    let cfg = &c.config;
    let conn = tokio::time::timeout(
        cfg.response_timeout,
        transport::connect(url, &cfg.transport),
    )
    .await
    .map_err(|_| MeshError::Timeout)?
    .map_err(|e| MeshError::Transport(e.to_string()))?;
    let (sender, mut rx) = conn.split();
    let hello = Frame::new(Body::Hello(proto::Hello {
        version: proto::PROTOCOL_VERSION,
        kind: PeerKind::Client as i32,
        id: c.id.clone(),
        url: String::new(),
        incarnation: 0,
        auth: Bytes::new(),
        data: cfg.data.clone(),
        login: String::new(),
        password: String::new(),
    }));
    sender
        .send(&hello)
        .map_err(|e| MeshError::Send(e.to_string()))?;
    let f = tokio::time::timeout(cfg.response_timeout, rx.recv())
        .await
        .map_err(|_| MeshError::Timeout)?
        .map_err(|e| MeshError::Handshake(e.to_string()))?;
    let Some(Body::Welcome(w)) = f.body else {
        return Err(MeshError::Handshake(format!(
            "expected welcome, got {}",
            f.kind()
        )));
    };
    let key = sender.id();
    Ok((
        Peer::new(sender, key, w.id, w.data, cfg.response_timeout),
        rx,
    ))
}

/// Batches of deliveries, one per read of the connection.
type Inbox = mpsc::Sender<Vec<Delivery>>;

/// Hands a batch to the inbox, waiting for room (the connection is not
/// read meanwhile); dropped when nobody took or still holds the inbox.
async fn hand_over(c: &Inner, inbox: &Inbox, batch: Vec<Delivery>) {
    if c.inbox_taken.load(std::sync::atomic::Ordering::Acquire) {
        let _ = inbox.send(batch).await;
    }
}

async fn run(c: Arc<Inner>, inbox: Inbox) {
    let mut stop = c.shutdown.subscribe();
    let mut failures: u32 = 0;
    let mut backoff = transport::Backoff::new(c.config.reconnect_min, c.config.reconnect_max);
    loop {
        if *stop.borrow() {
            break;
        }
        let url = {
            let mut st = lock(&c.state);
            if st.urls.is_empty() {
                None
            } else {
                let i = st.next % st.urls.len();
                st.next = i + 1;
                Some(st.urls[i].clone())
            }
        };
        let mut connected = false;
        if let Some(url) = url {
            let attempt = tokio::select! {
                r = handshake(&c, &url) => r,
                _ = stop.changed() => break,
            };
            if let Ok((peer, rx)) = attempt {
                connected = true;
                failures = 0;
                backoff.reset();
                {
                    let mut st = lock(&c.state);
                    st.peer = Some(peer.clone());
                    st.connected_to = Some(url.clone());
                    let groups: Vec<String> = st.groups.iter().cloned().collect();
                    if !groups.is_empty() {
                        let _ = peer
                            .sender()
                            .send(&Frame::new(Body::Subscribe(proto::Subscribe { groups })));
                    }
                    // what was sent while disconnected, in order, after the
                    // subscriptions and before anything sent from now on
                    flush_outbox(&peer, &mut st.outbox);
                }
                c.connected.send_modify(|n| *n += 1);
                tokio::select! {
                    _ = read_loop(&c, &peer, rx, &inbox) => {}
                    _ = stop.changed() => {}
                }
                peer.fail_all();
                let mut st = lock(&c.state);
                st.peer = None;
                st.connected_to = None;
            }
        }
        if *stop.borrow() || !c.config.reconnect {
            break;
        }
        if !connected {
            failures += 1;
            if c.config.attempts > 0 && failures >= c.config.attempts {
                break;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_random_delay()) => {}
            _ = stop.changed() => break,
        }
    }
    c.shutdown.send_replace(true);
    // no more connections: what waits in the outbox fails (requests get
    // `Disconnected`)
    let mut st = lock(&c.state);
    st.over = true;
    st.outbox.clear();
    drop(st);
    c.done.send_replace(true);
}

/// How many frames the read loop takes from the connection before it hands
/// over what it has (the deliveries of one batch).
const READ_BATCH: usize = 256;

/// Reads the connection: deliveries go to the inbox in batches (whatever has
/// arrived, up to [`READ_BATCH`] frames, without waiting for more);
/// responses resolve requests; requests and sends go to the router.
async fn read_loop(c: &Inner, peer: &Peer, mut rx: transport::Receiver, inbox: &Inbox) {
    use futures_util::FutureExt;
    let mut names = NameCache::default();
    let mut batch = Vec::new();
    let mut open = true;
    while open {
        let Ok(body) = rx.recv_encoded().await else {
            break;
        };
        let mut next = Some(body);
        let mut taken = 0;
        while let Some(body) = next.take() {
            if !on_frame(c, peer, inbox, &mut names, &mut batch, body).await {
                open = false;
                break;
            }
            taken += 1;
            if taken == READ_BATCH {
                break;
            }
            // what has already arrived (cancel safe: nothing is lost)
            next = match rx.recv_encoded().now_or_never() {
                Some(Ok(b)) => Some(b),
                Some(Err(_)) => {
                    open = false;
                    None
                }
                None => None,
            };
        }
        if !batch.is_empty() {
            hand_over(c, inbox, std::mem::take(&mut batch)).await;
        }
    }
}

/// Handles one frame body; `false` when it was malformed (the connection is
/// closed as a protocol error).
async fn on_frame(
    c: &Inner,
    peer: &Peer,
    inbox: &Inbox,
    names: &mut NameCache,
    batch: &mut Vec<Delivery>,
    body: Bytes,
) -> bool {
    // the common case, a plain `Deliver`: no decoding, no copies
    if let Some(p) = proto::wire::deliver_parts(&body) {
        if let (Some(group), Some(from)) = (names.get(&body[p.group]), names.get(&body[p.from])) {
            let mut data = body;
            data.truncate(p.data.end);
            data.advance(p.data.start);
            batch.push(Delivery { group, from, data });
            return true;
        }
    }
    let f = match <Frame as proto::Message>::decode(body) {
        Ok(f) => f,
        Err(e) => {
            peer.sender()
                .close(CloseCode::ProtocolError, &format!("malformed frame: {e}"));
            return false;
        }
    };
    if let Some(Body::Deliver(d)) = f.body {
        batch.push(Delivery {
            group: d.group.into(),
            from: d.from.into(),
            data: d.data,
        });
        return true;
    }
    // what arrived before a response or a request is in the inbox before
    // the caller or the handler runs
    if !batch.is_empty() {
        hand_over(c, inbox, std::mem::take(batch)).await;
    }
    match f.body {
        Some(Body::Response(r)) => peer.resolve(r),
        Some(b @ (Body::Request(_) | Body::Send(_))) => {
            let (router, p) = (c.router.clone(), peer.clone());
            crate::server::run_or_spawn(Box::pin(async move {
                handle_routed(&router, &p, None, b).await;
            }));
        }
        _ => {}
    }
    true
}
