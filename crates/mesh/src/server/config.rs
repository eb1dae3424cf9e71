//! The server's configuration ([`ServerConfig`]) and the hooks that
//! authenticate clone links ([`AuthIn`], [`AuthOut`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::access::Access;
use crate::core::PeerInfo;

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
    /// [`Server::subscribe`](crate::Server::subscribe) (the application's) is not limited.
    pub max_groups_per_client: usize,
    /// Groups this clone may have (default 100,000). A client's `Subscribe`
    /// that would create groups past it is refused whole and its connection
    /// closed, as above. [`Server::create_group`](crate::Server::create_group) is not limited.
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
    /// `Request` is answered at once with an error ([`CODE_BUSY`](crate::CODE_BUSY), the
    /// message names the limit) and a `Send` is dropped and reported as
    /// [`ServerEvent::Error`](crate::ServerEvent::Error); the connection stays open.
    pub max_requests_in_flight: usize,
    /// Frames of unknown kinds (a newer peer's, which decode with no
    /// `body`) a client connection or clone link may send (default 1,024).
    /// They are ignored and counted
    /// ([`ServerStats::unknown_frames`](crate::ServerStats::unknown_frames));
    /// the one past the limit closes the connection as a protocol error.
    pub max_unknown_frames: u64,
    /// Who may connect as a client and which groups each may subscribe and
    /// publish to (default: everybody, everything). A client on this
    /// server's own listeners is anonymous; one handed over with
    /// [`Server::adopt_client_encoded`](crate::Server::adopt_client_encoded) is logged in as its `Hello.login`. See
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
