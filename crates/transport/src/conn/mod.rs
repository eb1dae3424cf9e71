//! Connections: the shared outbound queue, the sender and receiver handles,
//! and the reader/writer tasks for byte streams and WebSocket.
//!
//! Every connection has one state, [`Shared`], that the files of this module
//! each own a part of: `queue.rs` (the outbound queue), `direct.rs` (direct
//! writes), `sender.rs` and `receiver.rs` (the handles), `control.rs`
//! (ping/pong/close, timers, refusing input), `reader.rs` and `bigbuf.rs`
//! (the stream reader and its large-frame buffers), `writer.rs` (the writer
//! task, and the stream side of it), `ws.rs` and `meter.rs` (WebSocket).
//!
//! # Buffer tactics
//!
//! **Outbound.** A byte-bounded queue is shared by all `Sender` clones.
//! The writer task yields once after a wake-up (so concurrent senders land
//! in the same batch), drains the whole queue and writes it with as few
//! syscalls as it can: small frames are copied into one reused buffer,
//! large frames (≥ 16 KiB) go out from their own memory, all in vectored
//! writes of about 256 KiB (several large frames per write). Pre-encoded
//! `Bytes` let a broadcast encode once. The same task drives a WebSocket,
//! one message per frame.
//!
//! **Direct writes** (plain TCP and Unix sockets). A frame of at most 4 KiB
//! sent when the queue is empty, the writer idle (its last drain took at
//! most one frame) and the connection quiet for 20 µs is written by the
//! sending task itself (a non-blocking `send` on the connection's one
//! socket, shared through an `Arc` by the reader, the writer and the queue,
//! under the queue lock), saving the hand-off to the writer task; what the
//! socket does not take goes to the writer as raw bytes to send first.
//! Frames that follow closely are queued and coalesced as above.
//! `Sender::send_all` writes several frames (up to 4 KiB together) in one
//! direct write on an idle connection, so the peer wakes once for an answer
//! and what follows it (the store sends a follower's ack and actions this
//! way). One descriptor per connection: the socket closes when the reader,
//! the writer and the queue have all let go of it.
//!
//! **Inbound.** The reader splits frame bodies off the stream and hands
//! batches of bodies to the `Receiver`, which decodes them in the
//! consumer's task. While large frames follow each other they are read,
//! several per read when they are waiting, into a 512 KiB buffer and split
//! off it (no copy); a read stops where the next frame, if as large as the
//! last one, would not fit, so frames are rarely cut at a buffer's end (what
//! is, is copied to the next buffer). The reader alternates between two
//! such buffers, each used again from its start once the consumer has
//! dropped every frame in it, so a stream of large frames does not fault in
//! fresh memory per frame; back to small frames, both are released. A lone
//! large frame gets a buffer of its own size. A frame the consumer keeps
//! pins the buffer it is in. Ping/Pong/Close are recognised by their first
//! byte and handled in the reader.

mod bigbuf;
mod control;
mod direct;
mod meter;
mod queue;
mod reader;
mod receiver;
mod sender;
#[cfg(test)]
mod tests;
mod writer;
mod ws;

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use proto::{Frame, FrameCodec};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::sock::{Sock, SockIo};
use crate::{CloseReason, Config, RecvError, SendError, SlowConsumerPolicy};
use queue::Queue;
use reader::{stream_reader, StreamReader};
use receiver::Source;
use writer::{writer_task, StreamOut};

pub(crate) use meter::{Meter, Metered};
pub(crate) use reader::split_chunks;
pub use receiver::Receiver;
pub use sender::Sender;
pub(crate) use ws::spawn_ws;

/// The address of the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PeerAddr {
    /// A TCP peer (also for TLS and WebSocket).
    Tcp(SocketAddr),
    /// A Unix socket peer; the path is known only for bound client sockets.
    Unix(Option<PathBuf>),
    /// The other end of an in-memory [`crate::pair`].
    Memory,
}

impl PeerAddr {
    /// The IP address for TCP peers (what bans are keyed by).
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            PeerAddr::Tcp(a) => Some(a.ip()),
            PeerAddr::Unix(_) | PeerAddr::Memory => None,
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Tcp(a) => write!(f, "{a}"),
            PeerAddr::Unix(Some(p)) => write!(f, "unix:{}", p.display()),
            PeerAddr::Unix(None) => write!(f, "unix:(unnamed)"),
            PeerAddr::Memory => write!(f, "memory"),
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Shared {
    id: u64,
    peer: PeerAddr,
    max_frame: usize,
    /// The largest frame accepted from the peer now: `max_frame`, or
    /// [`Config::max_frame_before_hello`] on an accepted connection until its
    /// consumer raises it.
    recv_max: AtomicUsize,
    /// The pre-hello limit still applies (nobody called `set_max_frame`):
    /// a reader task then reads ahead at most one batch.
    limited: AtomicBool,
    /// WebSocket connections accepted by a listener: counts the bytes of
    /// the message being read against `recv_max`.
    meter: std::sync::OnceLock<Arc<Meter>>,
    max_queue: usize,
    max_frames: usize,
    policy: SlowConsumerPolicy,
    queue: Mutex<Queue>,
    writer_wake: Notify,
    space: Notify,
    closing: AtomicBool,
    /// Set by a local close request: the reason the connection ends with.
    local_close: Mutex<Option<CloseReason>>,
    /// Cancelled when the connection is over (both tasks stop).
    done: CancellationToken,
    end: Mutex<Option<RecvError>>,
    /// Number of live `Sender` handles (the `Receiver` counts as one too).
    handles: AtomicU64,
    /// Buffers the reader allocated for large frames, for tests.
    #[cfg(test)]
    big_buffers: AtomicU64,
}

impl Shared {
    fn finish(&self, reason: RecvError) {
        // Once we asked to close, the stream ending is the expected outcome.
        let reason = match reason {
            RecvError::Eof
            | RecvError::Io(_)
            | RecvError::Malformed(_)
            | RecvError::Closed { .. } => {
                match self
                    .local_close
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                {
                    Some(local) => RecvError::Local(local),
                    None => reason,
                }
            }
            other => other,
        };
        {
            let mut end = self.end.lock().unwrap_or_else(|e| e.into_inner());
            if end.is_none() {
                *end = Some(reason);
            }
        }
        // Ended: later close requests are moot.
        self.closing.store(true, Ordering::Release);
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            // The duplicate descriptor must not keep the socket open.
            q.direct = None;
            // Nothing more is written: the queued frames' memory goes back
            // now, not when the last sender is dropped.
            q.frames = VecDeque::new();
            q.urgent = Vec::new();
            q.partial = None;
            q.bytes = 0;
        }
        self.done.cancel();
        self.space.notify_waiters();
        self.writer_wake.notify_one();
    }

    /// Records why the connection ends without stopping it yet (the writer
    /// still sends our `Close` frame).
    fn set_end(&self, reason: RecvError) {
        let mut end = self.end.lock().unwrap_or_else(|e| e.into_inner());
        if end.is_none() {
            *end = Some(reason);
        }
    }

    fn end_reason(&self) -> RecvError {
        self.end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or(RecvError::Eof)
    }
}

/// An established connection: a [`Sender`] and a [`Receiver`].
#[derive(Debug)]
pub struct Connection {
    sender: Sender,
    receiver: Receiver,
}

impl Connection {
    /// Splits the connection into its halves.
    pub fn split(self) -> (Sender, Receiver) {
        (self.sender, self.receiver)
    }

    /// The sending half.
    pub fn sender(&self) -> &Sender {
        &self.sender
    }

    /// The next frame (see [`Receiver::recv`]).
    pub async fn recv(&mut self) -> Result<Frame, RecvError> {
        self.receiver.recv().await
    }

    /// Encodes and queues a frame (see [`Sender::send`]).
    pub fn send(&self, frame: &Frame) -> Result<(), SendError> {
        self.sender.send(frame)
    }

    /// The receiving half.
    pub fn receiver(&self) -> &Receiver {
        &self.receiver
    }

    /// See [`Receiver::set_max_frame`].
    pub fn set_max_frame(&self, max: usize) {
        self.receiver.set_max_frame(max);
    }

    /// See [`Receiver::raise_max_frame`].
    pub fn raise_max_frame(&self) {
        self.receiver.raise_max_frame();
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> &PeerAddr {
        self.sender.peer_addr()
    }
}

/// How large the peer's frames may be at first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// [`Config::max_frame`].
    Full,
    /// [`Config::max_frame_before_hello`] until the consumer raises it
    /// (connections accepted by a listener).
    BeforeHello,
}

fn new_connection(
    peer: PeerAddr,
    config: &Config,
    limit: Limit,
) -> (Connection, Arc<Shared>, mpsc::Sender<Vec<Bytes>>) {
    let max_frame = config.max_frame.min(u32::MAX as usize);
    let recv_max = match limit {
        Limit::Full => max_frame,
        Limit::BeforeHello => config.max_frame_before_hello.min(max_frame),
    };
    let shared = Arc::new(Shared {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        peer,
        max_frame: config.max_frame,
        recv_max: AtomicUsize::new(recv_max),
        limited: AtomicBool::new(limit == Limit::BeforeHello),
        meter: std::sync::OnceLock::new(),
        max_queue: config.max_queue_bytes.max(1),
        max_frames: config.max_queue_frames.max(1),
        policy: config.slow_consumer,
        queue: Mutex::new(Queue::default()),
        writer_wake: Notify::new(),
        space: Notify::new(),
        closing: AtomicBool::new(false),
        local_close: Mutex::new(None),
        done: CancellationToken::new(),
        end: Mutex::new(None),
        handles: AtomicU64::new(2),
        #[cfg(test)]
        big_buffers: AtomicU64::new(0),
    });
    let (tx, rx) = mpsc::channel(config.recv_batches.max(1));
    let conn = Connection {
        sender: Sender {
            shared: shared.clone(),
        },
        receiver: Receiver {
            shared: shared.clone(),
            source: Source::Task(rx),
            current: Vec::new().into_iter(),
            failed: false,
        },
    };
    (conn, shared, tx)
}

/// Starts reader and writer tasks over a plain TCP or Unix socket, which
/// they share with the senders' direct writes: lone small frames are written
/// from the sending task (see [`DIRECT_QUIET`](direct::DIRECT_QUIET)). One descriptor per
/// connection, closed when all three are done with it.
pub(crate) fn spawn_sock(
    sock: Arc<Sock>,
    peer: PeerAddr,
    config: &Config,
    limit: Limit,
) -> Connection {
    let (r, w) = SockIo::split(&sock);
    spawn_stream(r, w, peer, config, Some(sock), limit)
}

/// Starts reader and writer tasks over a byte stream. `direct` is the plain
/// socket under it, if it is one: lone small frames are then written from
/// the sending task (see [`DIRECT_QUIET`](direct::DIRECT_QUIET)).
pub(crate) fn spawn_stream<R, W>(
    reader: R,
    writer: W,
    peer: PeerAddr,
    config: &Config,
    direct: Option<Arc<Sock>>,
    limit: Limit,
) -> Connection
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (mut conn, shared, tx) = new_connection(peer, config, limit);
    shared
        .queue
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .direct = direct;
    let span = tracing::debug_span!("conn", id = shared.id, peer = %shared.peer);
    let codec = FrameCodec::new(config.max_frame);
    if config.inline_reads {
        let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(reader);
        let reader = StreamReader::new(reader, shared.clone(), config);
        conn.receiver.source = Source::Inline(Some(Box::new(reader)));
    } else {
        let reader = StreamReader::new(reader, shared.clone(), config);
        tokio::spawn(tracing::Instrument::instrument(
            stream_reader(reader, tx),
            span.clone(),
        ));
    }
    tokio::spawn(tracing::Instrument::instrument(
        writer_task(StreamOut::new(writer, codec), shared, config.clone()),
        span,
    ));
    conn
}

/// Frames at least this large are written without copying them into the batch buffer.
const LARGE_FRAME: usize = 16 * 1024;
