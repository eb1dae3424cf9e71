//! Errors of the mesh runtime.

/// Errors of servers and clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// Binding or connecting failed.
    #[error("transport: {0}")]
    Transport(String),
    /// A frame could not be queued.
    #[error("send failed: {0}")]
    Send(String),
    /// No response within the timeout.
    #[error("request timed out")]
    Timeout,
    /// The connection ended before the response arrived, or there is none.
    #[error("not connected")]
    Disconnected,
    /// The other side answered with an error (for example code 404, "no route").
    #[error("remote error {code}: {message}")]
    Remote {
        /// Error code (404: no route, 500: handler error, or the handler's own code).
        code: u32,
        /// Message.
        message: String,
    },
    /// The server or client has stopped.
    #[error("stopped")]
    Stopped,
    /// A clone command was refused.
    #[error("clone: {0}")]
    Clone(#[from] crate::core::CoreError),
    /// The handshake failed.
    #[error("handshake: {0}")]
    Handshake(String),
    /// The client is disconnected and its outbox (of this many entries) is
    /// full.
    #[error("disconnected and the outbox ({0} entries) is full")]
    OutboxFull(usize),
    /// A configuration value is unusable.
    #[error("config: {0}")]
    Config(String),
    /// Over a limit (too many groups, a name too long): nothing was done.
    #[error("limit: {0}")]
    Limit(String),
}

/// An error returned by a route handler or middleware; sent back to the
/// requester as the response's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RouteError {
    /// Code (use 400..599 like HTTP if you have no better idea).
    pub code: u32,
    /// Message.
    pub message: String,
}

impl RouteError {
    /// A new error.
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        RouteError {
            code,
            message: message.into(),
        }
    }
}
