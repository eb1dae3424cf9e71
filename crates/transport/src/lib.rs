//! Replimesh transports: framed connections over TCP, TLS, Unix sockets and WebSocket.
//!
//! [`connect`] and [`listen`] take a URL:
//!
//! | URL | transport | framing |
//! |---|---|---|
//! | `tcp://host:port` | TCP | 4-byte big-endian length + protobuf |
//! | `tls://host:port` | TLS over TCP (rustls) | same |
//! | `unix:///path/to.sock` | Unix stream socket | same |
//! | `ws://host:port/path` | WebSocket, subprotocol `replimesh.v1` | one binary message per frame |
//! | `wss://host:port/path` | WebSocket over TLS | same |
//!
//! [`from_unix_stream`] wraps an already-connected Unix stream (a socket pair
//! shared with a child process) the same way.
//!
//! A [`Connection`] has a cloneable [`Sender`] and a [`Receiver`]. Each
//! connection runs a reader task and a writer task (or, with
//! [`Config::inline_reads`], the receiver reads the socket itself inside
//! [`Receiver::recv`], which saves a task hand-off per read). The writer drains
//! everything queued into one buffer per write (write coalescing); on plain
//! TCP and Unix sockets a lone small frame (the connection quiet for 20 µs)
//! is written by the sending task itself, which saves a task hand-off on
//! request/response latency. Senders
//! accept pre-encoded frames (`Bytes`), so a broadcast is encoded once and
//! shared by every connection. The outbound queue is bounded in bytes; a peer
//! that does not keep up is a *slow consumer* and, by default, is
//! disconnected without affecting anyone else ([`SlowConsumerPolicy`]).
//! Keep-alive pings, an idle timeout and a handshake timeout detect dead and
//! half-open peers; frames larger than [`Config::max_frame`] are refused
//! before anything of their size is allocated. A connection a [`Listener`]
//! accepted takes frames of at most [`Config::max_frame_before_hello`]
//! (64 KiB) until its consumer accepts the peer's hello and calls
//! [`Receiver::raise_max_frame`], so a peer nobody knows yet cannot make a
//! server buffer large frames.
//!
//! # Example
//!
//! ```
//! use replimesh_transport::{connect, listen, Config};
//! use replimesh_transport::proto::Frame;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config::default();
//! let listener = listen("tcp://127.0.0.1:0", &config).await?;
//! let url = listener.local_url();
//! let server = tokio::spawn(async move {
//!     let mut conn = listener.accept().await?;
//!     let frame = conn.recv().await?;          // echo one frame back
//!     conn.send(&frame)?;
//!     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(conn)
//! });
//! let mut client = connect(&url, &config).await?;
//! client.send(&Frame::data(&b"hello"[..]))?;
//! assert_eq!(client.recv().await?, Frame::data(&b"hello"[..]));
//! # drop(server.await?);
//! # Ok(())
//! # }
//! ```

mod backoff;
mod config;
mod conn;
mod endpoint;
mod error;
mod http;
mod net;
mod sock;

pub use backoff::Backoff;
pub use config::{Config, SlowConsumerPolicy, TlsConfig, QUEUE_FRAME_OVERHEAD};
pub use conn::{Connection, PeerAddr, Receiver, Sender};
pub use endpoint::Endpoint;
pub use error::{CloseReason, Error, RecvError, SendError};
pub use http::HttpFile;
pub use net::{connect, from_std_unix_stream, from_unix_stream, listen, pair, Listener};
pub use proto;

/// Entry points for fuzz targets (not part of the API).
#[doc(hidden)]
pub mod fuzz {
    use bytes::Bytes;

    use crate::RecvError;

    /// Splits a byte stream, handed over in `chunks` (one per read), into
    /// frames as a connection's reader does (frames of at most `max_frame`
    /// bytes; pings, pongs and closes handled, not returned). Returns the
    /// frame bodies delivered and how the stream ended: [`RecvError::Eof`]
    /// when the bytes ran out, else why the reader refused them. Never
    /// panics, whatever the bytes.
    pub fn split_stream(chunks: &[&[u8]], max_frame: usize) -> (Vec<Bytes>, RecvError) {
        crate::conn::split_chunks(chunks, max_frame)
    }
}
