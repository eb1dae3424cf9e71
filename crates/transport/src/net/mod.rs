//! Dialing and listening by URL, and wrapping streams that are already
//! connected.

mod connect;
mod handshake;
mod listen;

pub use connect::connect;
pub use listen::{listen, Listener};

use std::path::Path;

use tokio::net::UnixStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::conn::{spawn_sock, spawn_stream, Limit};
use crate::sock::{Sock, Stream};
use crate::{Config, Connection, Error, PeerAddr};

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

/// The `tls` step of a handshake: `handshake` (a rustls connect or accept)
/// bounded by `deadline`, its failure an [`Error::Tls`].
async fn tls_step<T>(
    config: &Config,
    deadline: tokio::time::Instant,
    handshake: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, Error> {
    step(config, deadline, "tls", async {
        handshake.await.map_err(|e| Error::Tls(e.to_string()))
    })
    .await
}

/// Wraps an already-connected Unix stream (for example one end of a socket
/// pair inherited by a child process, or received over `SCM_RIGHTS`) into a
/// [`Connection`] with the same framing, queues and keep-alive as
/// [`connect()`]'s `unix://` connections. Both ends must speak this framing.
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
