//! Error types.

use std::sync::Arc;

/// Errors of [`crate::connect`], [`crate::listen`] and [`crate::Listener::accept`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL could not be parsed.
    #[error("invalid URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A socket operation failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// TLS is misconfigured or its handshake failed.
    #[error("tls: {0}")]
    Tls(String),
    /// The WebSocket handshake failed.
    #[error("websocket: {0}")]
    WebSocket(String),
    /// An accepted connection was a plain HTTP `GET` of one of
    /// [`crate::Config::http_files`]: the file was sent and the connection
    /// closed (no [`crate::Connection`]).
    #[error("answered a plain HTTP GET of {0}")]
    HttpServed(String),
    /// A `connect` or an incoming handshake did not finish within
    /// [`crate::Config::handshake_timeout`].
    #[error("{step} timed out after {after:?} (the handshake timeout)")]
    HandshakeTimeout {
        /// The step that was still running: `connect` (the TCP or Unix
        /// connect), `tls`, `http request` (reading the request head, on
        /// listeners with [`crate::Config::http_files`]) or `websocket upgrade`.
        step: &'static str,
        /// The handshake timeout.
        after: std::time::Duration,
    },
}

/// Why a connection ended, from the point of view of [`crate::Receiver::recv`].
///
/// Once `recv` has returned an error, every later call returns the same one.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The peer closed the connection with a `Close` frame.
    #[error("closed by peer (code {code}): {reason}")]
    Closed {
        /// The peer's close code (see [`proto::CloseCode`]).
        code: u32,
        /// The peer's reason.
        reason: String,
    },
    /// This side closed the connection.
    #[error("closed locally: {0}")]
    Local(CloseReason),
    /// The stream ended without a `Close` frame (the peer vanished).
    #[error("connection lost: peer closed the stream without a close frame")]
    Eof,
    /// Nothing arrived within [`crate::Config::idle_timeout`].
    #[error("connection timed out: nothing received for the idle timeout")]
    TimedOut,
    /// The peer announced a frame larger than [`crate::Config::max_frame`].
    #[error("peer sent a frame of {len} bytes, more than the maximum of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The peer sent bytes that are not a valid frame.
    #[error("malformed frame from peer: {0}")]
    Malformed(String),
    /// A socket error.
    #[error("i/o error: {0}")]
    Io(Arc<std::io::Error>),
}

/// Why this side closed a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// [`crate::Sender::close`] was called.
    #[error("close requested (code {code}): {reason}")]
    Requested {
        /// The code sent to the peer.
        code: u32,
        /// The reason sent to the peer.
        reason: String,
    },
    /// The peer did not read fast enough (see [`crate::SlowConsumerPolicy`]).
    #[error(
        "slow consumer: {frames} frames ({queued} bytes) queued, limits {frame_limit} frames, {limit} bytes"
    )]
    SlowConsumer {
        /// What the queue held including the refused frame, in bytes of
        /// memory (see [`crate::QUEUE_FRAME_OVERHEAD`]).
        queued: usize,
        /// [`crate::Config::max_queue_bytes`].
        limit: usize,
        /// Frames queued including the refused one.
        frames: usize,
        /// [`crate::Config::max_queue_frames`].
        frame_limit: usize,
    },
    /// Every handle to the connection was dropped.
    #[error("connection dropped")]
    Dropped,
}

/// Errors of [`crate::Sender`] methods.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The connection is closed; nothing was queued.
    #[error("connection closed")]
    Closed,
    /// The queue is full and the policy is [`crate::SlowConsumerPolicy::Reject`].
    #[error("outbound queue full ({frames} of {frame_limit} frames, {queued} of {limit} bytes)")]
    Full {
        /// What the queue holds now, in bytes of memory (see
        /// [`crate::QUEUE_FRAME_OVERHEAD`]).
        queued: usize,
        /// [`crate::Config::max_queue_bytes`].
        limit: usize,
        /// Frames queued now.
        frames: usize,
        /// [`crate::Config::max_queue_frames`].
        frame_limit: usize,
    },
    /// The queue overflowed and the connection was cut as a slow consumer.
    #[error("peer is a slow consumer and was disconnected")]
    SlowConsumer,
    /// The frame is larger than [`crate::Config::max_frame`]; nothing was queued.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The frame's length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
}
