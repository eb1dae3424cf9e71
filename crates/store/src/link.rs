//! A connection as the store runtime sees it: a transport connection (over
//! a listener, or a worker's link handed over its control socket).

use proto::{CloseCode, Frame};

/// The sending half of a link. Cheap to clone.
#[derive(Clone)]
pub(crate) enum LinkTx {
    Transport(transport::Sender),
}

/// The receiving half of a link.
pub(crate) enum LinkRx {
    Transport(transport::Receiver),
}

impl LinkTx {
    /// Queues a frame, waiting for room. Err: the link is over.
    pub(crate) async fn send_wait(&self, frame: &Frame) -> Result<(), ()> {
        match self {
            LinkTx::Transport(s) => s.send_wait(frame).await.map_err(|_| ()),
        }
    }

    /// Queues a frame without waiting (small control frames).
    pub(crate) fn send(&self, frame: &Frame) -> Result<(), ()> {
        match self {
            LinkTx::Transport(s) => s.send(frame).map_err(|_| ()),
        }
    }

    /// Queues frames in order without waiting; on an idle link they go out
    /// in one write.
    pub(crate) fn send_all(&self, frames: &[Frame]) -> Result<(), ()> {
        match self {
            LinkTx::Transport(s) => s.send_all(frames).map_err(|_| ()),
        }
    }

    /// Bytes queued and not yet written.
    pub(crate) fn queued_bytes(&self) -> usize {
        match self {
            LinkTx::Transport(s) => s.queued_bytes(),
        }
    }

    /// Closes the link after what is queued.
    pub(crate) fn close(&self, code: CloseCode, reason: &str) {
        match self {
            LinkTx::Transport(s) => s.close(code, reason),
        }
    }
}

impl LinkRx {
    /// The next frame; Err(reason) when the link is over. Close frames from
    /// the peer end the link with their reason.
    pub(crate) async fn recv(&mut self) -> Result<Frame, LinkEnd> {
        match self {
            LinkRx::Transport(r) => r.recv().await.map_err(|e| match e {
                transport::RecvError::Closed { code, reason } => LinkEnd::Closed { code, reason },
                other => LinkEnd::Other(other.to_string()),
            }),
        }
    }
}

/// Why a link ended.
#[derive(Debug, Clone)]
pub(crate) enum LinkEnd {
    Closed { code: u32, reason: String },
    Other(String),
}

impl std::fmt::Display for LinkEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkEnd::Closed { code, reason } => write!(f, "closed by peer (code {code}): {reason}"),
            LinkEnd::Other(s) => f.write_str(s),
        }
    }
}

pub(crate) fn from_transport(conn: transport::Connection) -> (LinkTx, LinkRx) {
    let (tx, rx) = conn.split();
    (LinkTx::Transport(tx), LinkRx::Transport(rx))
}
