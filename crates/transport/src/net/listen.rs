//! Listening: the `Listener`, its accept loop and connection limits.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::handshake::handshake;
use crate::sock::{Limits, Over};
use crate::{Config, Connection, Endpoint, Error, PeerAddr};

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

pub(super) enum Mode {
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

pub(super) enum Accepted {
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
