//! Connections usable in both directions ([`Peer`]), route/act routing and
//! middlewares ([`Router`]), shared by servers and clients.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use proto::{frame::Body, CloseCode, Frame};
use tokio::sync::oneshot;

use crate::error::{MeshError, RouteError};
use crate::server::Server;

/// Error code of a response when no route matched.
pub const CODE_NO_ROUTE: u32 = 404;
/// Error code of a response when a handler failed.
pub const CODE_HANDLER: u32 = 500;
/// Error code of a request refused because its connection has
/// [`ServerConfig::max_requests_in_flight`](crate::ServerConfig::max_requests_in_flight)
/// requests being handled already.
pub const CODE_BUSY: u32 = 429;

/// One end of a connection between a client and a server, seen from either
/// side: send to it, request from it (with a timeout), close it.
#[derive(Clone)]
pub struct Peer {
    inner: Arc<PeerInner>,
}

struct PeerInner {
    sender: transport::Sender,
    key: u64,
    id: String,
    data: Bytes,
    timeout: Duration,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Bytes, MeshError>>>>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("key", &self.inner.key)
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl Peer {
    pub(crate) fn new(
        sender: transport::Sender,
        key: u64,
        id: String,
        data: Bytes,
        timeout: Duration,
    ) -> Self {
        Peer {
            inner: Arc::new(PeerInner {
                sender,
                key,
                id,
                data,
                timeout,
                next_id: AtomicU64::new(1),
                pending: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A process-unique key of the connection (what servers use to address clients).
    pub fn key(&self) -> u64 {
        self.inner.key
    }

    /// The id the other side announced (client id or server id).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The user data the other side announced.
    pub fn data(&self) -> &Bytes {
        &self.inner.data
    }

    /// The peer's address.
    pub fn addr(&self) -> &transport::PeerAddr {
        self.inner.sender.peer_addr()
    }

    pub(crate) fn sender(&self) -> &transport::Sender {
        &self.inner.sender
    }

    /// Sends a routed message; no reply.
    pub fn send(&self, route: &str, act: &str, data: impl Into<Bytes>) -> Result<(), MeshError> {
        let f = Frame::new(Body::Send(proto::Send {
            route: route.to_string(),
            act: act.to_string(),
            data: data.into(),
        }));
        self.inner
            .sender
            .send(&f)
            .map_err(|e| MeshError::Send(e.to_string()))
    }

    /// Sends a routed request and waits for its response (at most the
    /// configured response timeout).
    ///
    /// # Cancel safety
    /// Dropping the future forgets the request; a late response is ignored.
    pub async fn request(
        &self,
        route: &str,
        act: &str,
        data: impl Into<Bytes>,
    ) -> Result<Bytes, MeshError> {
        self.request_timeout(route, act, data, self.inner.timeout)
            .await
    }

    /// [`Peer::request`] with an explicit timeout.
    pub async fn request_timeout(
        &self,
        route: &str,
        act: &str,
        data: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Bytes, MeshError> {
        let (id, rx) = self.start_request(route, act, data.into())?;
        let guard = PendingGuard { peer: self, id };
        let r = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(MeshError::Disconnected),
            Err(_) => Err(MeshError::Timeout),
        };
        drop(guard);
        r
    }

    /// Registers a request and sends it; the caller awaits the receiver and
    /// must [`Peer::forget_request`] the id when it stops waiting.
    pub(crate) fn start_request(
        &self,
        route: &str,
        act: &str,
        data: Bytes,
    ) -> Result<(u64, oneshot::Receiver<Result<Bytes, MeshError>>), MeshError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending).insert(id, tx);
        let f = Frame::new(Body::Request(proto::Request {
            id,
            route: route.to_string(),
            act: act.to_string(),
            data,
        }));
        if let Err(e) = self.inner.sender.send(&f) {
            self.forget_request(id);
            return Err(MeshError::Send(e.to_string()));
        }
        Ok((id, rx))
    }

    /// Forgets a pending request (its response, if it comes, is ignored).
    pub(crate) fn forget_request(&self, id: u64) {
        lock(&self.inner.pending).remove(&id);
    }

    /// Closes the connection (orderly).
    pub fn close(&self) {
        self.inner.sender.close(CloseCode::Normal, "closed");
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.inner.sender.is_closed()
    }

    pub(crate) fn resolve(&self, r: proto::Response) {
        if let Some(tx) = lock(&self.inner.pending).remove(&r.id) {
            let res = match r.error {
                Some(e) => Err(MeshError::Remote {
                    code: e.code,
                    message: e.message,
                }),
                None => Ok(r.data),
            };
            let _ = tx.send(res);
        }
    }

    pub(crate) fn fail_all(&self) {
        lock(&self.inner.pending).clear();
    }
}

struct PendingGuard<'a> {
    peer: &'a Peer,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.peer.inner.pending).remove(&self.id);
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a routed handler or middleware sees.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The connection the message came on.
    pub peer: Peer,
    /// Route.
    pub route: String,
    /// Act.
    pub act: String,
    /// Payload.
    pub data: Bytes,
    /// Whether the sender waits for a response.
    pub is_request: bool,
    pub(crate) server: Option<Server>,
}

impl Ctx {
    /// The server, when the handler runs on a server (groups, publish, ...).
    pub fn server(&self) -> Option<&Server> {
        self.server.as_ref()
    }
}

/// What a middleware decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Go on with the next middleware, then the route handler.
    Next,
    /// Stop routing; a request gets an empty response.
    Stop,
    /// Stop routing and answer with this payload.
    Reply(Bytes),
}

type Handler = Arc<dyn Fn(Ctx) -> BoxFuture<'static, Result<Bytes, RouteError>> + Send + Sync>;
type Middleware = Arc<dyn Fn(Ctx) -> BoxFuture<'static, Result<Flow, RouteError>> + Send + Sync>;

/// Route/act handlers and middlewares.
#[derive(Default, Clone)]
pub struct Router {
    inner: Arc<RwLock<RouterInner>>,
}

#[derive(Default)]
struct RouterInner {
    middlewares: Vec<Middleware>,
    /// route -> act -> handler.
    routes: HashMap<String, HashMap<String, Handler>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").finish_non_exhaustive()
    }
}

/// The outcome of routing one message.
pub(crate) enum Routed {
    Reply(Bytes),
    Error(u32, String),
    NoRoute,
}

impl Router {
    /// Adds a middleware; middlewares run in the order they were added,
    /// before the route handler.
    pub fn use_middleware<F, Fut>(&self, f: F)
    where
        F: Fn(Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Flow, RouteError>> + Send + 'static,
    {
        let m: Middleware = Arc::new(move |c| Box::pin(f(c)));
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .middlewares
            .push(m);
    }

    /// Sets the handler of `route`/`act`; an empty `act` matches any act of
    /// the route that has no handler of its own.
    pub fn route<F, Fut>(&self, route: &str, act: &str, f: F)
    where
        F: Fn(Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, RouteError>> + Send + 'static,
    {
        let h: Handler = Arc::new(move |c| Box::pin(f(c)));
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .routes
            .entry(route.to_string())
            .or_default()
            .insert(act.to_string(), h);
    }

    pub(crate) async fn dispatch(&self, ctx: Ctx) -> Routed {
        let (mws, handler) = {
            let r = self.inner.read().unwrap_or_else(|e| e.into_inner());
            let h = r
                .routes
                .get(ctx.route.as_str())
                .and_then(|acts| acts.get(ctx.act.as_str()).or_else(|| acts.get("")))
                .cloned();
            let mws = if r.middlewares.is_empty() {
                Vec::new()
            } else {
                r.middlewares.clone()
            };
            (mws, h)
        };
        for m in mws {
            match m(ctx.clone()).await {
                Ok(Flow::Next) => {}
                Ok(Flow::Stop) => return Routed::Reply(Bytes::new()),
                Ok(Flow::Reply(b)) => return Routed::Reply(b),
                Err(e) => return Routed::Error(e.code, e.message),
            }
        }
        match handler {
            None => Routed::NoRoute,
            Some(h) => match h(ctx).await {
                Ok(b) => Routed::Reply(b),
                Err(e) => Routed::Error(e.code, e.message),
            },
        }
    }
}

/// Routes a `Request` or `Send` and answers requests. Returns true when no
/// route matched.
pub(crate) async fn handle_routed(
    router: &Router,
    peer: &Peer,
    server: Option<Server>,
    body: Body,
) -> bool {
    let (id, route, act, data, is_request) = match body {
        Body::Request(r) => (r.id, r.route, r.act, r.data, true),
        Body::Send(s) => (0, s.route, s.act, s.data, false),
        _ => return false,
    };
    let ctx = Ctx {
        peer: peer.clone(),
        route,
        act,
        data,
        is_request,
        server,
    };
    let routed = router.dispatch(ctx).await;
    let no_route = matches!(routed, Routed::NoRoute);
    if is_request {
        let resp = match routed {
            Routed::Reply(data) => proto::Response {
                id,
                error: None,
                data,
            },
            Routed::Error(code, message) => proto::Response {
                id,
                error: Some(proto::ErrorInfo { code, message }),
                data: Bytes::new(),
            },
            Routed::NoRoute => proto::Response {
                id,
                error: Some(proto::ErrorInfo {
                    code: CODE_NO_ROUTE,
                    message: "no route".into(),
                }),
                data: Bytes::new(),
            },
        };
        let _ = peer.sender().send(&Frame::new(Body::Response(resp)));
    }
    no_route
}
