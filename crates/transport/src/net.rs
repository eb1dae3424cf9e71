//! Dialing and listening by URL.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, Ordering};

use proto::{WS_SUBPROTOCOL, WS_SUBPROTOCOL_JSON};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::conn::{spawn_stream, spawn_ws, Limit, Meter, Metered};
use crate::{Config, Connection, Endpoint, Error, PeerAddr};

fn ws_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(config.max_frame))
        .max_frame_size(Some(config.max_frame))
        .read_buffer_size(config.ws_read_buffer.max(1024))
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(usize::MAX)
}

async fn with_timeout<T>(
    config: &Config,
    fut: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(config.handshake_timeout, fut)
        .await
        .map_err(|_| Error::HandshakeTimeout)?
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

async fn dial_tcp(host: &str, port: u16) -> Result<(TcpStream, PeerAddr), Error> {
    let stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    let peer = PeerAddr::Tcp(stream.peer_addr()?);
    Ok((stream, peer))
}

/// A duplicate of a plain socket's descriptor, for the sender's direct
/// writes (`None` if the system refuses one: everything goes through the
/// writer task then).
fn dup_fd(s: &impl std::os::fd::AsFd) -> Option<std::os::fd::OwnedFd> {
    s.as_fd().try_clone_to_owned().ok()
}

/// Connects to `url` (see the crate docs for the schemes).
///
/// TLS (`tls://`, `wss://`) needs [`crate::TlsConfig::client`]. The TLS and
/// WebSocket handshakes are bounded by [`Config::handshake_timeout`].
pub async fn connect(url: &str, config: &Config) -> Result<Connection, Error> {
    let endpoint = Endpoint::parse(url)?;
    match endpoint {
        Endpoint::Tcp { host, port } => {
            let (stream, peer) = dial_tcp(&host, port).await?;
            let direct = dup_fd(&stream);
            let (r, w) = stream.into_split();
            Ok(spawn_stream(r, w, peer, config, direct, Limit::Full))
        }
        Endpoint::Tls { host, port } => {
            let (connector, name) = tls_connector(config, &host)?;
            let (stream, peer) = dial_tcp(&host, port).await?;
            let tls = with_timeout(config, async {
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
            let stream = UnixStream::connect(&path).await?;
            let direct = dup_fd(&stream);
            let (r, w) = stream.into_split();
            Ok(spawn_stream(
                r,
                w,
                PeerAddr::Unix(Some(path)),
                config,
                direct,
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
            let (stream, peer) = dial_tcp(host, port).await?;
            let wscfg = ws_config(config);
            if secure {
                let (connector, name) = tls_connector(config, host)?;
                let ws = with_timeout(config, async {
                    let tls = connector
                        .connect(name, stream)
                        .await
                        .map_err(|e| Error::Tls(e.to_string()))?;
                    let (ws, _resp) =
                        tokio_tungstenite::client_async_with_config(request, tls, Some(wscfg))
                            .await
                            .map_err(|e| Error::WebSocket(e.to_string()))?;
                    Ok(ws)
                })
                .await?;
                Ok(spawn_ws(ws, peer, config, json, Limit::Full, None))
            } else {
                let ws = with_timeout(config, async {
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
    let task = tokio::spawn(accept_loop(socket, mode, config, tx));
    Ok(Listener {
        url: local.to_string(),
        rx: tokio::sync::Mutex::new(rx),
        task,
        unix_path,
    })
}

async fn accept_loop(
    socket: Socket,
    mode: Arc<Mode>,
    config: Config,
    tx: mpsc::Sender<Result<Connection, Error>>,
) {
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
                // Transient errors (e.g. too many open files) must not kill the listener.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let mode = mode.clone();
        let config = config.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            match with_timeout(&config, handshake(accepted, &mode, &config)).await {
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

async fn handshake(accepted: Accepted, mode: &Mode, config: &Config) -> Result<Connection, Error> {
    match (accepted, mode) {
        (Accepted::Unix(s, peer), _) => {
            let direct = dup_fd(&s);
            let (r, w) = s.into_split();
            Ok(spawn_stream(r, w, peer, config, direct, Limit::BeforeHello))
        }
        (Accepted::Tcp(s, peer), Mode::Plain) => {
            let direct = dup_fd(&s);
            let (r, w) = s.into_split();
            Ok(spawn_stream(r, w, peer, config, direct, Limit::BeforeHello))
        }
        (Accepted::Tcp(s, peer), Mode::Tls(acceptor)) => {
            let tls = acceptor
                .accept(s)
                .await
                .map_err(|e| Error::Tls(e.to_string()))?;
            let (r, w) = tokio::io::split(tls);
            Ok(spawn_stream(r, w, peer, config, None, Limit::BeforeHello))
        }
        (Accepted::Tcp(s, peer), Mode::Ws { tls, path }) => {
            let wscfg = ws_config(config);
            let json = Arc::new(AtomicBool::new(false));
            let callback = ws_callback(path.clone(), json.clone());
            let meter = Meter::new(config);
            match tls {
                Some(acceptor) => {
                    let tls = acceptor
                        .accept(s)
                        .await
                        .map_err(|e| Error::Tls(e.to_string()))?;
                    let tls = Metered::new(tls, meter.clone());
                    let ws =
                        tokio_tungstenite::accept_hdr_async_with_config(tls, callback, Some(wscfg))
                            .await
                            .map_err(|e| Error::WebSocket(e.to_string()))?;
                    Ok(spawn_ws(
                        ws,
                        peer,
                        config,
                        json.load(Ordering::Relaxed),
                        Limit::BeforeHello,
                        Some(meter),
                    ))
                }
                None => {
                    let s = Metered::new(s, meter.clone());
                    let ws =
                        tokio_tungstenite::accept_hdr_async_with_config(s, callback, Some(wscfg))
                            .await
                            .map_err(|e| Error::WebSocket(e.to_string()))?;
                    Ok(spawn_ws(
                        ws,
                        peer,
                        config,
                        json.load(Ordering::Relaxed),
                        Limit::BeforeHello,
                        Some(meter),
                    ))
                }
            }
        }
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
    let direct = dup_fd(&stream);
    let (r, w) = stream.into_split();
    spawn_stream(r, w, PeerAddr::Unix(path), config, direct, Limit::Full)
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
