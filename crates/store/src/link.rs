//! A connection as the store runtime sees it: a transport connection, or a
//! framed Unix socket inherited by a worker process.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use proto::{CloseCode, Frame, FrameCodec};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

/// Frames queued on a pipe link before `send_wait` waits.
const PIPE_QUEUE: usize = 4096;

/// The sending half of a link. Cheap to clone.
#[derive(Clone)]
pub(crate) enum LinkTx {
    Transport(transport::Sender),
    Pipe(Arc<PipeTx>),
}

pub(crate) struct PipeTx {
    tx: mpsc::Sender<Bytes>,
    done: CancellationToken,
}

/// The receiving half of a link.
pub(crate) enum LinkRx {
    Transport(transport::Receiver),
    Pipe(
        FramedRead<tokio::net::unix::OwnedReadHalf, FrameCodec>,
        CancellationToken,
    ),
}

impl LinkTx {
    /// Queues a frame, waiting for room. Err: the link is over.
    pub(crate) async fn send_wait(&self, frame: &Frame) -> Result<(), ()> {
        match self {
            LinkTx::Transport(s) => s.send_wait(frame).await.map_err(|_| ()),
            LinkTx::Pipe(p) => {
                if p.done.is_cancelled() {
                    return Err(());
                }
                p.tx.send(frame.encode_to_bytes()).await.map_err(|_| ())
            }
        }
    }

    /// Queues a frame without waiting (small control frames).
    pub(crate) fn send(&self, frame: &Frame) -> Result<(), ()> {
        match self {
            LinkTx::Transport(s) => s.send(frame).map_err(|_| ()),
            LinkTx::Pipe(p) => p.tx.try_send(frame.encode_to_bytes()).map_err(|_| ()),
        }
    }

    /// Closes the link after what is queued.
    pub(crate) fn close(&self, code: CloseCode, reason: &str) {
        match self {
            LinkTx::Transport(s) => s.close(code, reason),
            LinkTx::Pipe(p) => {
                let _ = p.tx.try_send(Frame::close(code, reason).encode_to_bytes());
                p.done.cancel();
            }
        }
    }

    /// A printable peer address.
    pub(crate) fn peer(&self) -> String {
        match self {
            LinkTx::Transport(s) => s.peer_addr().to_string(),
            LinkTx::Pipe(_) => "worker-pipe".to_owned(),
        }
    }

    /// The key bans are counted under (the IP for TCP peers).
    pub(crate) fn ban_key(&self) -> String {
        match self {
            LinkTx::Transport(s) => match s.peer_addr().ip() {
                Some(ip) => ip.to_string(),
                None => "unix".to_owned(),
            },
            LinkTx::Pipe(_) => "worker-pipe".to_owned(),
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
            LinkRx::Pipe(r, done) => loop {
                let next = tokio::select! {
                    n = r.next() => n,
                    _ = done.cancelled() => return Err(LinkEnd::Other("closed locally".into())),
                };
                match next {
                    Some(Ok(f)) => match &f.body {
                        Some(proto::frame::Body::Close(c)) => {
                            done.cancel();
                            return Err(LinkEnd::Closed {
                                code: c.code,
                                reason: c.reason.clone(),
                            });
                        }
                        Some(proto::frame::Body::Ping(p)) => {
                            let _ = p;
                            continue;
                        }
                        Some(proto::frame::Body::Pong(_)) => continue,
                        _ => return Ok(f),
                    },
                    Some(Err(e)) => {
                        done.cancel();
                        return Err(LinkEnd::Other(e.to_string()));
                    }
                    None => {
                        done.cancel();
                        return Err(LinkEnd::Other("pipe closed".into()));
                    }
                }
            },
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

/// Frames a Unix stream (worker pipes): length-prefixed protobuf, as on any
/// byte stream. The writer coalesces queued frames into one write.
pub(crate) fn from_unix(stream: UnixStream, max_frame: usize) -> (LinkTx, LinkRx) {
    let (r, mut w) = stream.into_split();
    let done = CancellationToken::new();
    let (tx, mut rx) = mpsc::channel::<Bytes>(PIPE_QUEUE);
    let codec = FrameCodec::new(max_frame);
    let wdone = done.clone();
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let wcodec = FrameCodec::new(max_frame);
        loop {
            let first = tokio::select! {
                f = rx.recv() => f,
                _ = wdone.cancelled() => {
                    // Flush what is queued (e.g. a Close), then stop.
                    rx.close();
                    rx.recv().await
                }
            };
            let Some(first) = first else { break };
            buf.clear();
            if wcodec.put_encoded(&first, &mut buf).is_err() {
                break;
            }
            while buf.len() < (1 << 20) {
                match rx.try_recv() {
                    Ok(b) => {
                        if wcodec.put_encoded(&b, &mut buf).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            if w.write_all(&buf).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
        wdone.cancel();
    });
    let tx = LinkTx::Pipe(Arc::new(PipeTx {
        tx,
        done: done.clone(),
    }));
    (tx, LinkRx::Pipe(FramedRead::new(r, codec), done))
}
