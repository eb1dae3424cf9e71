//! Dialing and listening by URL.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use proto::{WS_SUBPROTOCOL, WS_SUBPROTOCOL_JSON};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::conn::{spawn_sock, spawn_stream, spawn_ws, Limit, Meter, Metered};
use crate::sock::{Limits, Over, Slot, Sock, SockIo, Stream};
use crate::{http, Config, Connection, Endpoint, Error, PeerAddr};

fn ws_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(config.max_frame))
        .max_frame_size(Some(config.max_frame))
        .read_buffer_size(config.ws_read_buffer.max(1024))
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(usize::MAX)
}

/// The end of the time a handshake (or a `connect`) may take.
fn deadline(config: &Config) -> tokio::time::Instant {
    tokio::time::Instant::now() + config.handshake_timeout
}

/// Runs one `step` of a handshake that must end by `deadline`; a timeout is
/// [`Error::HandshakeTimeout`] naming the step.
async fn step<T>(
    config: &Config,
    deadline: tokio::time::Instant,
    step: &'static str,
    fut: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout_at(deadline, fut)
        .await
        .map_err(|_| Error::HandshakeTimeout {
            step,
            after: config.handshake_timeout,
        })?
}

fn tls_connector(
    config: &Config,
    host: &str,
) -> Result<(TlsConnector, rustls_pki_types::ServerName<'static>), Error> {
    let client = config.tls.client.clone().ok_or_else(|| {
        Error::Tls("connecting to tls:// or wss:// needs Config::tls.client (trusted roots)".into())
    })?;
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| Error::Tls(format!("invalid server name `{host}`: {e}")))?;
    Ok((TlsConnector::from(client), name))
}

async fn dial_tcp(
    host: &str,
    port: u16,
    config: &Config,
    deadline: tokio::time::Instant,
) -> Result<(TcpStream, PeerAddr), Error> {
    let stream = step(config, deadline, "connect", async {
        Ok(TcpStream::connect((host, port)).await?)
    })
    .await?;
    stream.set_nodelay(true)?;
    let peer = PeerAddr::Tcp(stream.peer_addr()?);
    Ok((stream, peer))
}

/// Connects to `url` (see the crate docs for the schemes).
///
/// TLS (`tls://`, `wss://`) needs [`crate::TlsConfig::client`]. The whole of
/// it (the TCP or Unix connect, the TLS handshake, the WebSocket upgrade) is
/// bounded by [`Config::handshake_timeout`]: past it, the error is
/// [`Error::HandshakeTimeout`] naming the step (`connect`, `tls`,
/// `websocket upgrade`).
pub async fn connect(url: &str, config: &Config) -> Result<Connection, Error> {
    let endpoint = Endpoint::parse(url)?;
    let deadline = deadline(config);
    match endpoint {
        Endpoint::Tcp { host, port } => {
            let (stream, peer) = dial_tcp(&host, port, config, deadline).await?;
            let sock = Sock::new(Stream::Tcp(stream), None);
            Ok(spawn_sock(sock, peer, config, Limit::Full))
        }
        Endpoint::Tls { host, port } => {
            let (connector, name) = tls_connector(config, &host)?;
            let (stream, peer) = dial_tcp(&host, port, config, deadline).await?;
            let tls = step(config, deadline, "tls", async {
                connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| Error::Tls(e.to_string()))
            })
            .await?;
            let (r, w) = tokio::io::split(tls);
            Ok(spawn_stream(r, w, peer, config, None, Limit::Full))
        }
        Endpoint::Unix { path } => {
            let stream = step(config, deadline, "connect", async {
                Ok(UnixStream::connect(&path).await?)
            })
            .await?;
            let sock = Sock::new(Stream::Unix(stream), None);
            Ok(spawn_sock(
                sock,
                PeerAddr::Unix(Some(path)),
                config,
                Limit::Full,
            ))
        }
        Endpoint::Ws {
            secure,
            ref host,
            port,
            ..
        } => {
            let mut request = url
                .into_client_request()
                .map_err(|e| Error::WebSocket(e.to_string()))?;
            let json = config.ws_json;
            let offered = if json {
                WS_SUBPROTOCOL_JSON
            } else {
                WS_SUBPROTOCOL
            };
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(offered));
            let tls = if secure {
                Some(tls_connector(config, host)?)
            } else {
                None
            };
            let (stream, peer) = dial_tcp(host, port, config, deadline).await?;
            let wscfg = ws_config(config);
            let upgrade = "websocket upgrade";
            if let Some((connector, name)) = tls {
                let tls = step(config, deadline, "tls", async {
                    connector
                        .connect(name, stream)
                        .await
                        .map_err(|e| Error::Tls(e.to_string()))
                })
                .await?;
                let ws = step(config, deadline, upgrade, async {
                    let (ws, _resp) =
                        tokio_tungstenite::client_async_with_config(request, tls, Some(wscfg))
                            .await
                            .map_err(|e| Error::WebSocket(e.to_string()))?;
                    Ok(ws)
                })
                .await?;
                Ok(spawn_ws(ws, peer, config, json, Limit::Full, None))
            } else {
                let ws = step(config, deadline, upgrade, async {
                    let (ws, _resp) =
                        tokio_tungstenite::client_async_with_config(request, stream, Some(wscfg))
                            .await
                            .map_err(|e| Error::WebSocket(e.to_string()))?;
                    Ok(ws)
                })
                .await?;
                Ok(spawn_ws(ws, peer, config, json, Limit::Full, None))
            }
        }
    }
}

/// A listening socket that yields established [`Connection`]s.
///
/// Handshakes (TLS, WebSocket upgrade) run in the background, each bounded by
/// [`Config::handshake_timeout`], so a slow or hostile peer never delays the
/// others. Dropping the listener stops accepting (and removes its Unix socket file).
#[derive(Debug)]
pub struct Listener {
    stats: Arc<Stats>,
    url: String,
    rx: tokio::sync::Mutex<mpsc::Receiver<Result<Connection, Error>>>,
    task: JoinHandle<()>,
    unix_path: Option<PathBuf>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Listener {
    /// Waits for the next established connection.
    ///
    /// Peers whose handshake fails are logged and skipped; an error here means
    /// the listening socket itself failed.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn accept(&self) -> Result<Connection, Error> {
        let mut rx = self.rx.lock().await;
        match rx.recv().await {
            Some(r) => r,
            None => Err(Error::Io(std::io::Error::other("listener stopped"))),
        }
    }

    /// Connections this listener accepted that are open now (their
    /// handshakes included), what [`Config::max_connections`] bounds.
    pub fn open_connections(&self) -> usize {
        self.stats.limits.open()
    }

    /// Connections closed at once since the listener started because they
    /// were over [`Config::max_connections`] or
    /// [`Config::max_connections_per_ip`].
    pub fn refused_connections(&self) -> u64 {
        self.stats.refused.load(Ordering::Relaxed)
    }

    /// The URL this listener is reachable at, with the port the OS picked.
    pub fn local_url(&self) -> String {
        self.url.clone()
    }

    /// Stops listening and waits until the listening socket is closed (and
    /// a Unix socket's file removed): when this returns, a new connection
    /// to the URL is refused. Dropping a `Listener` closes it too, but
    /// shortly after, in the background.
    pub async fn close(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
        // `drop` removes the socket file
    }
}

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum Mode {
    Plain,
    Tls(TlsAcceptor),
    Ws {
        tls: Option<TlsAcceptor>,
        path: String,
    },
}

fn bind_unix(path: &Path) -> Result<UnixListener, Error> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // A stale socket file from a dead process can be replaced; a live one cannot.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::Io(e));
            }
            std::fs::remove_file(path)?;
            Ok(UnixListener::bind(path)?)
        }
        Err(e) => Err(Error::Io(e)),
    }
}

/// Listens on `url` (see the crate docs for the schemes). Port 0 lets the OS
/// pick; [`Listener::local_url`] tells the result.
///
/// TLS (`tls://`, `wss://`) needs [`crate::TlsConfig::server`].
pub async fn listen(url: &str, config: &Config) -> Result<Listener, Error> {
    let endpoint = Endpoint::parse(url)?;
    let tls_acceptor = || -> Result<TlsAcceptor, Error> {
        let server = config.tls.server.clone().ok_or_else(|| {
            Error::Tls(
                "listening on tls:// or wss:// needs Config::tls.server (certificate and key)"
                    .into(),
            )
        })?;
        Ok(TlsAcceptor::from(server))
    };
    let is_tls = matches!(endpoint, Endpoint::Tls { .. });
    let (socket, mode, local, unix_path) = match endpoint {
        Endpoint::Tcp { host, port } | Endpoint::Tls { host, port } => {
            let mode = if is_tls {
                Mode::Tls(tls_acceptor()?)
            } else {
                Mode::Plain
            };
            let l = TcpListener::bind((host.as_str(), port)).await?;
            let addr = l.local_addr()?;
            let local = if is_tls {
                Endpoint::Tls {
                    host,
                    port: addr.port(),
                }
            } else {
                Endpoint::Tcp {
                    host,
                    port: addr.port(),
                }
            };
            (Socket::Tcp(l), mode, local, None)
        }
        Endpoint::Unix { path } => {
            let l = bind_unix(&path)?;
            (
                Socket::Unix(l),
                Mode::Plain,
                Endpoint::Unix { path: path.clone() },
                Some(path),
            )
        }
        Endpoint::Ws {
            secure,
            host,
            port,
            path,
        } => {
            let tls = if secure { Some(tls_acceptor()?) } else { None };
            let l = TcpListener::bind((host.as_str(), port)).await?;
            let addr = l.local_addr()?;
            (
                Socket::Tcp(l),
                Mode::Ws {
                    tls,
                    path: path.clone(),
                },
                Endpoint::Ws {
                    secure,
                    host,
                    port: addr.port(),
                    path,
                },
                None,
            )
        }
    };
    let (tx, rx) = mpsc::channel(64);
    let config = config.clone();
    let mode = Arc::new(mode);
    let stats = Arc::new(Stats {
        limits: Limits::new(
            config.max_connections.max(1),
            config.max_connections_per_ip.max(1),
        ),
        refused: AtomicU64::new(0),
    });
    let task = tokio::spawn(accept_loop(socket, mode, config, tx, stats.clone()));
    Ok(Listener {
        stats,
        url: local.to_string(),
        rx: tokio::sync::Mutex::new(rx),
        task,
        unix_path,
    })
}

/// How long the accept loop waits after a failed `accept` (for example
/// `EMFILE`/`ENFILE`: too many open files) before it tries again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A listener's counters, shared with its accept loop.
#[derive(Debug)]
struct Stats {
    limits: Arc<Limits>,
    refused: AtomicU64,
}

/// Logs at most once per second, with how many events it left unlogged.
#[derive(Default)]
struct RateLog {
    last: Option<std::time::Instant>,
    unlogged: u64,
}

impl RateLog {
    /// `Some(events since the last log)` when it is time to log again.
    fn due(&mut self) -> Option<u64> {
        self.unlogged += 1;
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

async fn accept_loop(
    socket: Socket,
    mode: Arc<Mode>,
    config: Config,
    tx: mpsc::Sender<Result<Connection, Error>>,
    stats: Arc<Stats>,
) {
    let mut refused_log = RateLog::default();
    let mut error_log = RateLog::default();
    loop {
        let accepted = match &socket {
            Socket::Tcp(l) => l.accept().await.map(|(s, a)| {
                let _ = s.set_nodelay(true);
                Accepted::Tcp(s, PeerAddr::Tcp(a))
            }),
            Socket::Unix(l) => l.accept().await.map(|(s, a)| {
                let path = a.as_pathname().map(Path::to_path_buf);
                Accepted::Unix(s, PeerAddr::Unix(path))
            }),
        };
        let accepted = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Transient errors (too many open files, a connection reset
                // before it was accepted) must not kill the listener, nor
                // make it spin.
                if let Some(n) = error_log.due() {
                    tracing::warn!(error = %e, failures = n, "accept failed; backing off");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let ip = accepted.peer().ip();
        let slot = match stats.limits.acquire(ip) {
            Ok(slot) => slot,
            Err(over) => {
                // Closed at once: the socket is dropped here.
                drop(accepted);
                stats.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = refused_log.due() {
                    let (what, max) = match over {
                        Over::Total => ("connections in total", config.max_connections),
                        Over::PerIp => (
                            "connections from one address",
                            config.max_connections_per_ip,
                        ),
                    };
                    tracing::warn!(
                        peer = ?ip,
                        refused = n,
                        "connection refused: more than {max} {what}"
                    );
                }
                continue;
            }
        };
        let mode = mode.clone();
        let config = config.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            match handshake(accepted, slot, &mode, &config).await {
                Ok(conn) => {
                    let _ = tx.send(Ok(conn)).await;
                }
                Err(e) => tracing::debug!(error = %e, "incoming handshake failed"),
            }
        });
    }
}

enum Accepted {
    Tcp(TcpStream, PeerAddr),
    Unix(UnixStream, PeerAddr),
}

impl Accepted {
    fn peer(&self) -> &PeerAddr {
        match self {
            Accepted::Tcp(_, p) | Accepted::Unix(_, p) => p,
        }
    }
}

/// The TLS and WebSocket handshakes of an accepted connection, together
/// bounded by [`Config::handshake_timeout`]. The connection keeps `slot`
/// (its place in the listener's limits) while its socket is open.
async fn handshake(
    accepted: Accepted,
    slot: Slot,
    mode: &Mode,
    config: &Config,
) -> Result<Connection, Error> {
    let deadline = deadline(config);
    let limit = Limit::BeforeHello;
    match (accepted, mode) {
        (Accepted::Unix(s, peer), _) => {
            let sock = Sock::new(Stream::Unix(s), Some(slot));
            Ok(spawn_sock(sock, peer, config, limit))
        }
        (Accepted::Tcp(s, peer), Mode::Plain) => {
            let sock = Sock::new(Stream::Tcp(s), Some(slot));
            Ok(spawn_sock(sock, peer, config, limit))
        }
        (Accepted::Tcp(s, peer), Mode::Tls(acceptor)) => {
            let io = SockIo::whole(&Sock::new(Stream::Tcp(s), Some(slot)));
            let tls = step(config, deadline, "tls", async {
                acceptor
                    .accept(io)
                    .await
                    .map_err(|e| Error::Tls(e.to_string()))
            })
            .await?;
            let (r, w) = tokio::io::split(tls);
            Ok(spawn_stream(r, w, peer, config, None, limit))
        }
        (Accepted::Tcp(s, peer), Mode::Ws { tls, path }) => {
            let io = SockIo::whole(&Sock::new(Stream::Tcp(s), Some(slot)));
            let wscfg = ws_config(config);
            let json = Arc::new(AtomicBool::new(false));
            let callback = ws_callback(path.clone(), json.clone());
            let meter = Meter::new(config);
            let upgrade = "websocket upgrade";
            match tls {
                Some(acceptor) => {
                    let tls = step(config, deadline, "tls", async {
                        acceptor
                            .accept(io)
                            .await
                            .map_err(|e| Error::Tls(e.to_string()))
                    })
                    .await?;
                    let tls = Metered::new(tls, meter.clone());
                    let tls = http_or_upgrade(tls, config, deadline).await?;
                    let ws = step(config, deadline, upgrade, async {
                        tokio_tungstenite::accept_hdr_async_with_config(tls, callback, Some(wscfg))
                            .await
                            .map_err(|e| Error::WebSocket(e.to_string()))
                    })
                    .await?;
                    let json = json.load(Ordering::Relaxed);
                    Ok(spawn_ws(ws, peer, config, json, limit, Some(meter)))
                }
                None => {
                    let io = Metered::new(io, meter.clone());
                    let io = http_or_upgrade(io, config, deadline).await?;
                    let ws = step(config, deadline, upgrade, async {
                        tokio_tungstenite::accept_hdr_async_with_config(io, callback, Some(wscfg))
                            .await
                            .map_err(|e| Error::WebSocket(e.to_string()))
                    })
                    .await?;
                    let json = json.load(Ordering::Relaxed);
                    Ok(spawn_ws(ws, peer, config, json, limit, Some(meter)))
                }
            }
        }
    }
}

/// The stream to upgrade, or [`Error::HttpServed`] when the connection was
/// a plain `GET` of one of [`Config::http_files`] (answered and closed).
async fn http_or_upgrade<S>(
    s: S,
    config: &Config,
    deadline: tokio::time::Instant,
) -> Result<http::Prefixed<S>, Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let head = step(config, deadline, "http request", async {
        http::serve_or_upgrade(s, &config.http_files)
            .await
            .map_err(Error::Io)
    })
    .await?;
    match head {
        http::Head::Upgrade(s) => Ok(s),
        http::Head::Served(path) => Err(Error::HttpServed(path)),
    }
}

#[allow(clippy::result_large_err)]
fn reject(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(why.to_string()));
    *r.status_mut() = status;
    r
}

#[allow(clippy::result_large_err)] // the error type is tungstenite's
fn ws_callback(
    path: String,
    json: Arc<AtomicBool>,
) -> impl FnOnce(&Request, Response) -> Result<Response, ErrorResponse> {
    move |req: &Request, mut resp: Response| {
        if path != "/" && req.uri().path() != path {
            return Err(reject(
                StatusCode::NOT_FOUND,
                "no WebSocket endpoint at this path",
            ));
        }
        if let Some(offered) = req.headers().get("Sec-WebSocket-Protocol") {
            let offered = offered.to_str().unwrap_or("");
            let has = |name: &str| offered.split(',').any(|p| p.trim() == name);
            // Binary is preferred when a client offers both.
            let chosen = if has(WS_SUBPROTOCOL) {
                WS_SUBPROTOCOL
            } else if has(WS_SUBPROTOCOL_JSON) {
                json.store(true, Ordering::Relaxed);
                WS_SUBPROTOCOL_JSON
            } else {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    "unsupported WebSocket subprotocol (this server speaks replimesh.v1 and replimesh.v1.json)",
                ));
            };
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(chosen));
        }
        Ok(resp)
    }
}

/// Wraps an already-connected Unix stream (for example one end of a socket
/// pair inherited by a child process, or received over `SCM_RIGHTS`) into a
/// [`Connection`] with the same framing, queues and keep-alive as
/// [`connect`]'s `unix://` connections. Both ends must speak this framing.
/// Must be called inside a Tokio runtime.
pub fn from_unix_stream(stream: UnixStream, config: &Config) -> Connection {
    let path = stream
        .peer_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let sock = Sock::new(Stream::Unix(stream), None);
    spawn_sock(sock, PeerAddr::Unix(path), config, Limit::Full)
}

/// [`from_unix_stream`] for a standard-library stream (it is switched to
/// non-blocking mode). Must be called inside a Tokio runtime.
pub fn from_std_unix_stream(
    stream: std::os::unix::net::UnixStream,
    config: &Config,
) -> Result<Connection, Error> {
    stream.set_nonblocking(true)?;
    Ok(from_unix_stream(UnixStream::from_std(stream)?, config))
}

/// Two connected in-memory connections, with the same framing, queues and
/// keep-alive as socket connections.
///
/// Useful to plug two components of one process together (for example a node
/// that routes one client connection to both the mesh and the store) and in
/// tests. `buffer` is the in-memory pipe's capacity in bytes.
pub fn pair(config: &Config, buffer: usize) -> (Connection, Connection) {
    let (a, b) = tokio::io::duplex(buffer.max(1024));
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    (
        spawn_stream(ar, aw, PeerAddr::Memory, config, None, Limit::Full),
        spawn_stream(br, bw, PeerAddr::Memory, config, None, Limit::Full),
    )
}
