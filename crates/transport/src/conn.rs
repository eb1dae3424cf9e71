//! Connections: the shared outbound queue, the sender and receiver handles,
//! and the reader/writer tasks for byte streams and WebSocket.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Buf;
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use proto::{frame::Body, CloseCode, Frame, FrameCodec, Message as _, LENGTH_PREFIX};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::sock::{Sock, SockIo};
use crate::{CloseReason, Config, RecvError, SendError, SlowConsumerPolicy, QUEUE_FRAME_OVERHEAD};

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

/// Bound on queued control frames (pongs) per connection.
const MAX_URGENT: usize = 256;

#[derive(Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    /// Control frames (pong) that bypass the byte limit and go first.
    urgent: Vec<Bytes>,
    /// What the frames waiting in `frames` (and `partial`) cost: their
    /// lengths plus [`QUEUE_FRAME_OVERHEAD`] each.
    bytes: usize,
    /// The same for the frames the writer task took and has not written
    /// yet: they still count against the bound.
    writing: usize,
    /// How many frames the writer task took and has not written yet.
    writing_frames: usize,
    close: Option<(u32, String)>,
    space_waiters: bool,
    /// Raw bytes the writer sends before anything else: the rest of a
    /// direct write that the socket took only in part.
    partial: Option<Bytes>,
    /// The writer drained frames and has not finished writing them.
    writer_busy: bool,
    /// The socket, for direct writes (plain TCP and Unix sockets only);
    /// dropped when the connection ends.
    direct: Option<Arc<Sock>>,
    /// When the writer task last found the queue empty and went to sleep.
    parked_at: Option<Instant>,
    /// When the last direct write was made.
    last_direct: Option<Instant>,
    /// How many frames the writer task's last drain took: more than one
    /// means frames are arriving together, and coalescing them is worth more
    /// than saving a hand-off.
    last_drain: usize,
    /// Direct writes: (whole, partial), for tests.
    #[cfg(test)]
    direct_writes: (u64, u64),
    /// Frames sent in direct writes, for tests.
    #[cfg(test)]
    direct_frames: u64,
}

/// Frames up to this size (with the length prefix) may be written directly.
const DIRECT_MAX: usize = 4096;

/// A frame is written directly only when the connection has been quiet this
/// long: frames that follow each other closely are queued and coalesced by
/// the writer task (one write for many), a lone frame saves the hand-off.
const DIRECT_QUIET: Duration = Duration::from_micros(20);

/// What a direct write did.
enum Direct {
    /// The socket took nothing: queue the frames.
    NotSent,
    /// The socket took everything.
    Sent,
    /// The socket took part: the rest, to be sent first by the writer task.
    Partial(Bytes),
}

/// Writes `bodies`, each with its length prefix, straight to the socket in
/// one `send`, without blocking, from a buffer on the stack. Their framed
/// size must be at most [`DIRECT_MAX`].
fn write_direct(fd: &impl AsFd, bodies: &[Bytes]) -> Direct {
    let mut buf = [0u8; DIRECT_MAX];
    let mut total = 0;
    for b in bodies {
        buf[total..total + LENGTH_PREFIX].copy_from_slice(&(b.len() as u32).to_be_bytes());
        total += LENGTH_PREFIX;
        buf[total..total + b.len()].copy_from_slice(b);
        total += b.len();
    }
    let framed = &buf[..total];
    let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
    // Tests cut direct writes short at chosen points (sockets rarely do it
    // on demand).
    #[cfg(test)]
    let total = match tests::CUT.load(Ordering::Relaxed) {
        0 => total,
        cut => total.min(cut),
    };
    match rustix::net::send(fd.as_fd(), &framed[..total], flags) {
        Ok(n) if n == framed.len() => Direct::Sent,
        Ok(n) if n > 0 => Direct::Partial(Bytes::copy_from_slice(&framed[n..])),
        _ => Direct::NotSent,
    }
}

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

    /// The writer task wrote frames that cost `cost` (see
    /// [`QUEUE_FRAME_OVERHEAD`]): room for more. `None`: all it had taken.
    fn written(&self, done: Option<(usize, usize)>) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        match done {
            Some((cost, frames)) => {
                q.writing = q.writing.saturating_sub(cost);
                q.writing_frames = q.writing_frames.saturating_sub(frames);
            }
            None => {
                q.writing = 0;
                q.writing_frames = 0;
            }
        }
        let waiters = std::mem::take(&mut q.space_waiters);
        drop(q);
        if waiters {
            self.space.notify_waiters();
        }
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

    fn enqueue_urgent(&self, body: Bytes) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.urgent.len() >= MAX_URGENT {
            // A peer flooding pings without reading our pongs gets no more of
            // them; its own idle timeout or our queue bound deals with it.
            return;
        }
        let was_empty = q.frames.is_empty() && q.urgent.is_empty();
        q.urgent.push(body);
        drop(q);
        if was_empty {
            self.writer_wake.notify_one();
        }
    }

    /// Writes `bodies` from the calling task when the connection is idle: the
    /// queue empty, the writer task asleep after a drain of at most one frame,
    /// no direct write in the last [`DIRECT_QUIET`], and all of them framed
    /// within [`DIRECT_MAX`]. What the socket does not take is left for the
    /// writer task to send first. `false`: nothing was written, queue them.
    fn try_direct(&self, q: &mut Queue, bodies: &[Bytes]) -> bool {
        let framed: usize = bodies.iter().map(|b| LENGTH_PREFIX + b.len()).sum();
        if q.direct.is_none()
            || !q.frames.is_empty()
            || !q.urgent.is_empty()
            || q.writer_busy
            || q.partial.is_some()
            || q.close.is_some()
            || q.last_drain > 1
            || framed > DIRECT_MAX
        {
            return false;
        }
        // The clock is read only here: when the writer is asleep with
        // nothing to do, which a stream of frames rarely lets it be.
        let now = Instant::now();
        let since = q.parked_at.max(q.last_direct);
        if since.is_some_and(|t| now.duration_since(t) < DIRECT_QUIET) {
            return false;
        }
        q.last_direct = Some(now);
        let Some(fd) = q.direct.as_ref() else {
            return false;
        };
        let rest = match write_direct(fd, bodies) {
            Direct::NotSent => return false,
            Direct::Sent => None,
            Direct::Partial(rest) => Some(rest),
        };
        #[cfg(test)]
        {
            q.direct_frames += bodies.len() as u64;
            let c = &mut q.direct_writes;
            *c = if rest.is_some() {
                (c.0, c.1 + 1)
            } else {
                (c.0 + 1, c.1)
            };
        }
        if let Some(rest) = rest {
            // The rest goes first, from the writer task.
            q.bytes += rest.len() + QUEUE_FRAME_OVERHEAD;
            q.partial = Some(rest);
            self.writer_wake.notify_one();
        }
        true
    }

    /// Queues several bodies in order, as `try_enqueue` one by one would,
    /// except that on an idle connection they go out together in one write.
    fn try_enqueue_all(&self, bodies: &[Bytes]) -> Result<(), SendError> {
        if let [one] = bodies {
            return self.try_enqueue(one, false).map(|_| ());
        }
        if bodies.len() > 1
            && bodies.iter().all(|b| b.len() <= self.max_frame)
            && !self.done.is_cancelled()
            && !self.closing.load(Ordering::Relaxed)
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if self.try_direct(&mut q, bodies) {
                return Ok(());
            }
        }
        for b in bodies {
            self.try_enqueue(b, false)?;
        }
        Ok(())
    }

    /// Queues a body. `Ok(true)` when queued; `Ok(false)` when the caller should
    /// wait for space (only when `wait` is set).
    fn try_enqueue(&self, body: &Bytes, wait: bool) -> Result<bool, SendError> {
        if self.done.is_cancelled() || self.closing.load(Ordering::Relaxed) {
            return Err(SendError::Closed);
        }
        let len = body.len();
        if len > self.max_frame {
            return Err(SendError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let cost = len + QUEUE_FRAME_OVERHEAD;
        let held = q.bytes + q.writing;
        let frames = q.frames.len() + q.writing_frames;
        if held > 0 && (held + cost > self.max_queue || frames >= self.max_frames) {
            if wait {
                q.space_waiters = true;
                return Ok(false);
            }
            match self.policy {
                SlowConsumerPolicy::Reject => {
                    return Err(SendError::Full {
                        queued: held,
                        limit: self.max_queue,
                        frames,
                        frame_limit: self.max_frames,
                    })
                }
                SlowConsumerPolicy::Disconnect => {
                    // The memory goes back now, not when the last sender goes.
                    q.frames = VecDeque::new();
                    q.bytes = 0;
                    drop(q);
                    let queued = held + cost;
                    tracing::debug!(conn = self.id, peer = %self.peer, queued, frames, "slow consumer: disconnecting");
                    self.finish(RecvError::Local(CloseReason::SlowConsumer {
                        queued,
                        limit: self.max_queue,
                        frames: frames + 1,
                        frame_limit: self.max_frames,
                    }));
                    return Err(SendError::SlowConsumer);
                }
            }
        }
        let was_empty = q.frames.is_empty() && q.urgent.is_empty();
        if was_empty && self.try_direct(&mut q, std::slice::from_ref(body)) {
            return Ok(true);
        }
        q.bytes += cost;
        q.frames.push_back(body.clone());
        drop(q);
        if was_empty {
            self.writer_wake.notify_one();
        }
        Ok(true)
    }
}

/// The sending half of a connection. Cheap to clone; all clones feed the same queue.
///
/// Frames are queued and written by a background writer task that drains the
/// whole queue into one buffer per write. The queue is bounded by
/// [`Config::max_queue_bytes`].
pub struct Sender {
    shared: Arc<Shared>,
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        release(&self.shared);
    }
}

fn release(shared: &Shared) {
    if shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
        // Last handle gone: close politely after what is queued.
        request_close(
            shared,
            CloseCode::GoingAway as u32,
            "connection dropped".into(),
        );
    }
}

fn request_close(shared: &Shared, code: u32, reason: String) {
    if shared.closing.swap(true, Ordering::AcqRel) {
        return;
    }
    *shared.local_close.lock().unwrap_or_else(|e| e.into_inner()) = Some(CloseReason::Requested {
        code,
        reason: reason.clone(),
    });
    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    q.close = Some((code, reason));
    drop(q);
    shared.writer_wake.notify_one();
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("id", &self.shared.id)
            .field("peer", &self.shared.peer)
            .finish()
    }
}

impl Sender {
    /// Encodes and queues a frame. Never waits: when the queue is full the
    /// configured [`SlowConsumerPolicy`] applies.
    pub fn send(&self, frame: &Frame) -> Result<(), SendError> {
        self.send_encoded(frame.encode_to_bytes())
    }

    /// Queues an already encoded frame body (see [`Frame::encode_to_bytes`]).
    /// A broadcast encodes once and hands clones of the same `Bytes` to many senders.
    pub fn send_encoded(&self, body: Bytes) -> Result<(), SendError> {
        self.shared.try_enqueue(&body, false).map(|_| ())
    }

    /// Encodes and queues several frames in order, as [`Sender::send`] on
    /// each would (stopping at the first error). On an idle plain TCP or Unix
    /// connection, frames that fit in 4 KiB together go out in one write, so
    /// the peer wakes once for all of them (an answer and what follows it).
    pub fn send_all(&self, frames: &[Frame]) -> Result<(), SendError> {
        let bodies: Vec<Bytes> = frames.iter().map(|f| f.encode_to_bytes()).collect();
        self.shared.try_enqueue_all(&bodies)
    }

    /// Encodes and queues a frame, waiting for room in the queue when it is full.
    ///
    /// # Cancel safety
    /// Cancelling the future before it resolves leaves the frame unsent.
    pub async fn send_wait(&self, frame: &Frame) -> Result<(), SendError> {
        self.send_encoded_wait(frame.encode_to_bytes()).await
    }

    /// Queues an encoded frame body, waiting for room in the queue when it is full.
    ///
    /// # Cancel safety
    /// Cancelling the future before it resolves leaves the frame unsent.
    pub async fn send_encoded_wait(&self, body: Bytes) -> Result<(), SendError> {
        // Fast path: room in the queue, no waiter registration needed.
        if self.shared.try_enqueue(&body, true)? {
            return Ok(());
        }
        loop {
            let notified = self.shared.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.try_enqueue(&body, true)? {
                return Ok(());
            }
            tokio::select! {
                _ = notified => {}
                _ = self.shared.done.cancelled() => return Err(SendError::Closed),
            }
        }
    }

    /// Closes the connection: what is already queued is sent, then a `Close`
    /// frame with `code` and `reason`, then the stream is shut down.
    pub fn close(&self, code: CloseCode, reason: &str) {
        request_close(&self.shared, code as u32, reason.to_string());
    }

    /// Cuts the connection at once, dropping whatever is queued.
    pub fn abort(&self) {
        self.shared.finish(RecvError::Local(CloseReason::Requested {
            code: CloseCode::GoingAway as u32,
            reason: "aborted".into(),
        }));
    }

    /// True once the connection is closing or over.
    pub fn is_closed(&self) -> bool {
        self.shared.done.is_cancelled() || self.shared.closing.load(Ordering::Relaxed)
    }

    /// Resolves when the connection is over; returns why.
    pub async fn closed(&self) -> RecvError {
        self.shared.done.cancelled().await;
        self.shared.end_reason()
    }

    /// What the frames waiting in the outbound queue cost, in bytes of
    /// memory (lengths plus [`crate::QUEUE_FRAME_OVERHEAD`] each), not
    /// counting those the writer task is writing; 0 when nothing waits.
    pub fn queued_bytes(&self) -> usize {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bytes
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> &PeerAddr {
        &self.shared.peer
    }

    /// A process-unique id of this connection.
    pub fn id(&self) -> u64 {
        self.shared.id
    }
}

/// The receiving half of a connection.
///
/// `Ping`, `Pong` and `Close` frames are handled by the transport and never
/// returned. Dropping the receiver does not close the connection while
/// senders are alive; the reader stops reading (backpressure) once
/// [`Config::recv_batches`] reads are waiting. With [`Config::inline_reads`]
/// the receiver reads the socket itself, only while [`Receiver::recv`] (or
/// [`Receiver::try_recv`]) is called.
pub struct Receiver {
    shared: Arc<Shared>,
    source: Source,
    current: std::vec::IntoIter<Bytes>,
    failed: bool,
}

/// Where a [`Receiver`] gets its frames.
enum Source {
    /// From the connection's reader task.
    Task(mpsc::Receiver<Vec<Bytes>>),
    /// From the socket, read by the receiver itself ([`Config::inline_reads`]).
    /// `None` once the stream has ended.
    Inline(Option<Box<InlineReader>>),
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("id", &self.shared.id)
            .field("peer", &self.shared.peer)
            .finish()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Source::Inline(reader) = &mut self.source {
            if let Some(reader) = reader.take() {
                keep_reading(reader);
            }
        }
        release(&self.shared);
    }
}

/// An inline connection's receiver is gone while its senders live on: a
/// task goes on reading, for the control frames and the end of the stream
/// (data frames are dropped, as the reader task does when nobody receives).
fn keep_reading(mut reader: Box<InlineReader>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        // No runtime left to read on: the connection ends here.
        reader.shared.finish(RecvError::Eof);
        return;
    };
    rt.spawn(async move {
        let reason = loop {
            if let Err(reason) = reader.next_batch().await {
                break reason;
            }
        };
        let shared = reader.shared.clone();
        drop(reader);
        finish_reader(shared, reason).await;
    });
}

impl Receiver {
    /// The next frame. An error means the connection is over and says why.
    ///
    /// # Cancel safety
    /// Cancel safe: a frame is never lost when the future is dropped.
    pub async fn recv(&mut self) -> Result<Frame, RecvError> {
        let body = self.recv_encoded().await?;
        self.decode(body)
    }

    /// The next frame's protobuf body, not decoded (for relaying a frame as is).
    /// Control frames are handled by the transport as with [`Receiver::recv`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv_encoded(&mut self) -> Result<Bytes, RecvError> {
        loop {
            if self.failed {
                return Err(self.shared.end_reason());
            }
            if let Some(b) = self.current.next() {
                return Ok(b);
            }
            match &mut self.source {
                Source::Task(rx) => match rx.recv().await {
                    Some(batch) => self.current = batch.into_iter(),
                    None => return Err(self.shared.end_reason()),
                },
                Source::Inline(reader) => {
                    let Some(r) = reader else {
                        return Err(self.shared.end_reason());
                    };
                    match r.next_batch().await {
                        Ok(batch) => self.current = batch.into_iter(),
                        Err(reason) => return Err(self.end_inline(reason)),
                    }
                }
            }
        }
    }

    /// The inline reader stopped for `reason`: the connection ends (after a
    /// moment for our `Close` frame when we refused the peer's input), and
    /// the reason every later call returns is the connection's.
    fn end_inline(&mut self, reason: RecvError) -> RecvError {
        if let Source::Inline(reader) = &mut self.source {
            *reader = None;
        }
        let refused = matches!(
            reason,
            RecvError::FrameTooLarge { .. } | RecvError::Malformed(_)
        );
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if refused => {
                self.shared.set_end(reason.clone());
                rt.spawn(finish_reader(self.shared.clone(), reason));
            }
            _ => self.shared.finish(reason),
        }
        self.shared.end_reason()
    }

    /// The next frame if one has already arrived, without waiting.
    /// `None` when nothing is waiting; `Some(Err(..))` when the connection is over.
    pub fn try_recv(&mut self) -> Option<Result<Frame, RecvError>> {
        if self.failed {
            return Some(Err(self.shared.end_reason()));
        }
        if let Some(b) = self.current.next() {
            return Some(self.decode(b));
        }
        let batch = match &mut self.source {
            Source::Task(rx) => match rx.try_recv() {
                Ok(batch) => batch,
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return Some(Err(self.shared.end_reason()))
                }
            },
            Source::Inline(reader) => {
                let Some(r) = reader else {
                    return Some(Err(self.shared.end_reason()));
                };
                // A read that is not ready is dropped (reading is cancel safe).
                match r.next_batch().now_or_never()? {
                    Ok(batch) => batch,
                    Err(reason) => return Some(Err(self.end_inline(reason))),
                }
            }
        };
        self.current = batch.into_iter();
        self.current.next().map(|b| self.decode(b))
    }

    /// Frames are decoded here, in the consumer's task, so the reader task
    /// only splits bodies off the stream (fewer copies of large frame structs).
    fn decode(&mut self, body: Bytes) -> Result<Frame, RecvError> {
        match Frame::decode(body) {
            Ok(f) => Ok(f),
            Err(e) => {
                let why = format!("malformed frame: {e}");
                self.shared.set_end(RecvError::Malformed(why.clone()));
                refuse(&self.shared, CloseCode::ProtocolError, &why);
                self.failed = true;
                Err(self.shared.end_reason())
            }
        }
    }

    /// The largest frame body accepted from the peer now.
    pub fn max_frame(&self) -> usize {
        self.shared.recv_max.load(Ordering::Relaxed)
    }

    /// Accepts frames of up to `max` bytes from the peer from now on (at
    /// most 4 GiB − 1, what a length prefix can say).
    ///
    /// A connection accepted by a [`crate::Listener`] starts with
    /// [`Config::max_frame_before_hello`], so that a peer nobody knows yet
    /// cannot make this process buffer a large frame; call this (or
    /// [`Receiver::raise_max_frame`]) once its `Hello` was accepted, before
    /// answering it: the protocol has the peer wait for the answer before
    /// it sends anything else. A frame larger than the limit in force when it
    /// arrives ends the connection with [`RecvError::FrameTooLarge`].
    pub fn set_max_frame(&self, max: usize) {
        let max = max.min(u32::MAX as usize);
        self.shared.recv_max.store(max, Ordering::Relaxed);
        if let Some(m) = self.shared.meter.get() {
            m.limit.store(max, Ordering::Relaxed);
        }
        self.shared.limited.store(false, Ordering::Release);
    }

    /// [`Receiver::set_max_frame`] with [`Config::max_frame`], the limit the
    /// connection was configured with.
    pub fn raise_max_frame(&self) {
        self.set_max_frame(self.shared.max_frame);
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> &PeerAddr {
        &self.shared.peer
    }

    /// A process-unique id of this connection (the same as its sender's).
    pub fn id(&self) -> u64 {
        self.shared.id
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

/// What the reader does with one frame body.
enum Incoming {
    Deliver(Bytes),
    Handled,
    End(RecvError),
    Malformed(String),
}

/// Protobuf tags (field number << 3 | length-delimited) of the control frames
/// `Frame.ping` (3), `Frame.pong` (4) and `Frame.close` (5). A frame has one
/// field, so its first byte tells its kind without decoding it.
const TAG_PING: u8 = (3 << 3) | 2;
const TAG_PONG: u8 = (4 << 3) | 2;
const TAG_CLOSE: u8 = (5 << 3) | 2;

fn handle_body(shared: &Shared, body: Bytes) -> Incoming {
    match body.first() {
        Some(&(TAG_PING | TAG_PONG | TAG_CLOSE)) => match Frame::decode(body.clone()) {
            Ok(frame) => handle_control(shared, frame, || body),
            Err(e) => Incoming::Malformed(format!("malformed frame: {e}")),
        },
        _ => Incoming::Deliver(body),
    }
}

fn handle_control(shared: &Shared, frame: Frame, body: impl FnOnce() -> Bytes) -> Incoming {
    match frame.body {
        Some(Body::Ping(p)) => {
            shared.enqueue_urgent(Frame::pong(p.nonce).encode_to_bytes());
            Incoming::Handled
        }
        Some(Body::Pong(_)) => Incoming::Handled,
        Some(Body::Close(c)) => Incoming::End(RecvError::Closed {
            code: c.code as u32,
            reason: c.reason,
        }),
        _ => Incoming::Deliver(body()),
    }
}

struct Drained {
    partial: Option<Bytes>,
    urgent: Vec<Bytes>,
    frames: VecDeque<Bytes>,
    close: Option<(u32, String)>,
}

fn drain(shared: &Shared, spare: VecDeque<Bytes>) -> Option<Drained> {
    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    if q.frames.is_empty() && q.urgent.is_empty() && q.close.is_none() && q.partial.is_none() {
        if q.writer_busy {
            q.writer_busy = false;
            q.parked_at = Some(Instant::now());
        }
        return None;
    }
    // Until the writer comes back for more, nothing is written directly.
    q.writer_busy = true;
    let partial = q.partial.take();
    let frames = std::mem::replace(&mut q.frames, spare);
    q.last_drain = frames.len();
    let urgent = std::mem::take(&mut q.urgent);
    // The taken frames count until they are written (`Shared::written`).
    q.writing += std::mem::take(&mut q.bytes);
    q.writing_frames += frames.len();
    let close = q.close.take();
    drop(q);
    Some(Drained {
        partial,
        urgent,
        frames,
        close,
    })
}

/// The writer keeps the queue it drained for the next swap, unless a burst
/// made it large: then its memory goes back.
fn keep_spare(mut frames: VecDeque<Bytes>) -> VecDeque<Bytes> {
    frames.clear();
    if frames.capacity() > SPARE_FRAMES {
        return VecDeque::new();
    }
    frames
}

/// Largest drained queue (in frames) whose memory the writer keeps.
const SPARE_FRAMES: usize = 4096;

/// Keep-alive and idle timers shared by both kinds of tasks.
struct Timers {
    ping: Option<tokio::time::Interval>,
    idle: Option<(tokio::time::Interval, Duration)>,
}

impl Timers {
    fn new(config: &Config) -> Self {
        let mk = |d: Duration| {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        };
        Timers {
            ping: config.ping_interval.map(mk),
            idle: config
                .idle_timeout
                .map(|d| (mk((d / 4).max(Duration::from_millis(10))), d)),
        }
    }
}

async fn tick(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn tick_idle(i: &mut Option<(tokio::time::Interval, Duration)>) -> Duration {
    match i {
        Some((i, d)) => {
            i.tick().await;
            *d
        }
        None => std::future::pending().await,
    }
}

/// Starts reader and writer tasks over a plain TCP or Unix socket, which
/// they share with the senders' direct writes: lone small frames are written
/// from the sending task (see [`DIRECT_QUIET`]). One descriptor per
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
/// the sending task (see [`DIRECT_QUIET`]).
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
        stream_writer(writer, shared, codec, config.clone()),
        span,
    ));
    conn
}

/// The reading side of a byte-stream connection: reads the socket, splits
/// frames off it, answers control frames. Driven by its own task
/// ([`stream_reader`]), or by the [`Receiver`] itself when the connection
/// reads inline ([`Config::inline_reads`]).
struct StreamReader<R> {
    reader: R,
    shared: Arc<Shared>,
    /// Reads go here while frames are small,
    buf: BytesMut,
    /// and here while large frames follow each other (see `BigBuf`).
    big: Option<BigBuf>,
    /// The length of the incomplete frame at the end of what was read, if known.
    next: Option<usize>,
    timers: Timers,
    last: Instant,
    /// The end met after frames that were returned first.
    end: Option<RecvError>,
}

/// A reader whose stream type is erased, for the [`Receiver`] of an inline
/// connection.
type InlineReader = StreamReader<Box<dyn AsyncRead + Send + Unpin>>;

const READ_CHUNK: usize = 128 * 1024;

impl<R: AsyncRead + Unpin> StreamReader<R> {
    fn new(reader: R, shared: Arc<Shared>, config: &Config) -> Self {
        StreamReader {
            reader,
            shared,
            buf: BytesMut::new(),
            big: None,
            next: None,
            timers: Timers::new(config),
            last: Instant::now(),
            end: None,
        }
    }

    /// The next non-empty batch of data frames, or why the stream ended.
    /// After an error the connection is being refused or is over; the
    /// caller ends it with [`finish_reader`].
    ///
    /// Cancel safe: what was read is kept for the next call.
    async fn next_batch(&mut self) -> Result<Vec<Bytes>, RecvError> {
        loop {
            if let Some(end) = self.end.take() {
                return Err(end);
            }
            let shared = &self.shared;
            if self.big.is_none() && self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let read = async {
                match &mut self.big {
                    Some(b) => {
                        let want = b.want(self.next);
                        (&mut self.reader)
                            .take(want as u64)
                            .read_buf(&mut b.cur.buf)
                            .await
                    }
                    None => self.reader.read_buf(&mut self.buf).await,
                }
            };
            // A connection ended locally stops reading even under a flood.
            if shared.done.is_cancelled() {
                return Err(shared.end_reason());
            }
            // The socket first: the idle timer counts only when nothing is
            // waiting to be read (a consumer that was away longer than the
            // timeout finds its frames, not a timeout), and a ready read
            // costs no registration with the other two.
            tokio::select! {
                biased;
                r = read => match r {
                    Ok(0) => return Err(RecvError::Eof),
                    Ok(_) => {}
                    Err(e) => return Err(io_reason(e)),
                },
                _ = shared.done.cancelled() => return Err(shared.end_reason()),
                limit = tick_idle(&mut self.timers.idle) => {
                    let quiet = self.last.elapsed();
                    if quiet >= limit {
                        return Err(RecvError::TimedOut);
                    }
                    // Quiet between two frames for a quarter of the idle
                    // timeout: the large-frame buffers go back (the next
                    // large frame gets fresh ones).
                    if quiet >= limit / 4 && self.big.as_ref().is_some_and(|b| b.cur.buf.is_empty()) {
                        self.big = None;
                        self.buf = BytesMut::new();
                    }
                    continue;
                }
            }
            self.last = Instant::now();
            let mut bodies = Vec::new();
            let from = match &mut self.big {
                Some(b) => &mut b.cur.buf,
                None => &mut self.buf,
            };
            // The frames before an oversized one are still delivered.
            let mut end = None;
            let max = self.shared.recv_max.load(Ordering::Relaxed);
            match split_frames(from, max, &mut bodies) {
                Ok(next) => {
                    self.next = next;
                    self.place_next(&bodies);
                }
                Err(len) => {
                    refuse(
                        &self.shared,
                        CloseCode::FrameTooLarge,
                        &format!("frame of {len} bytes exceeds {max}"),
                    );
                    end = Some(RecvError::FrameTooLarge { len, max });
                }
            }
            let shared = &self.shared;
            let mut batch = Vec::with_capacity(bodies.len());
            for body in bodies {
                match handle_body(shared, body) {
                    Incoming::Deliver(b) => batch.push(b),
                    Incoming::Handled => {}
                    Incoming::End(r) => {
                        end = Some(r);
                        break;
                    }
                    Incoming::Malformed(why) => {
                        refuse(shared, CloseCode::ProtocolError, &why);
                        end = Some(RecvError::Malformed(why));
                        break;
                    }
                }
            }
            match (batch.is_empty(), end) {
                (true, Some(end)) => return Err(end),
                (false, end) => {
                    self.end = end;
                    return Ok(batch);
                }
                (true, None) => {}
            }
        }
    }

    /// Picks the buffer the next read goes to. Large frames are read into
    /// `big` while they follow each other: the next frame is large, or not
    /// known yet and the last one was.
    fn place_next(&mut self, bodies: &[Bytes]) {
        let last_big = bodies.last().map(|b| b.len()).filter(|&n| n >= LARGE_FRAME);
        let big_next = match self.next {
            Some(len) => len >= LARGE_FRAME,
            None => last_big.is_some() || self.big.is_some() && bodies.is_empty(),
        };
        match (&mut self.big, big_next) {
            (None, false) => {
                if let Some(len) = self.next {
                    self.buf.reserve(LENGTH_PREFIX + len - self.buf.len());
                }
            }
            (None, true) => {
                let mut b = BigBuf::new(last_big.or(self.next).unwrap_or(LARGE_FRAME), self.next);
                b.cur.buf.extend_from_slice(&self.buf);
                self.buf.clear();
                self.big = Some(b);
            }
            (Some(b), true) => {
                if let Some(n) = last_big {
                    b.last = n;
                }
                b.make_room(self.next);
            }
            (Some(b), false) => {
                self.buf.extend_from_slice(&b.cur.buf);
                // Back to small frames: the large-frame memory is freed once
                // the consumer is done with it.
                self.big = None;
            }
        }
        #[cfg(test)]
        if let Some(b) = &mut self.big {
            let n = std::mem::take(&mut b.allocs);
            self.shared.big_buffers.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// A byte stream handed over in chunks, one chunk per read (what a socket
/// that delivers bytes as they come does), then its end.
struct Chunks<'a> {
    chunks: std::slice::Iter<'a, &'a [u8]>,
    cur: &'a [u8],
}

impl AsyncRead for Chunks<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while self.cur.is_empty() {
            match self.chunks.next() {
                Some(c) => self.cur = c,
                None => return std::task::Poll::Ready(Ok(())),
            }
        }
        let n = self.cur.len().min(buf.remaining());
        buf.put_slice(&self.cur[..n]);
        self.cur = &self.cur[n..];
        std::task::Poll::Ready(Ok(()))
    }
}

/// Runs the stream reader (the frame splitter, the large-frame buffers,
/// the control frames) over `chunks`, read one at a time, with frames of
/// at most `max_frame` bytes: the frame bodies it delivers, and how the
/// stream ended (`Eof` when the bytes ran out).
pub(crate) fn split_chunks(chunks: &[&[u8]], max_frame: usize) -> (Vec<Bytes>, RecvError) {
    let config = Config {
        max_frame,
        ping_interval: None,
        idle_timeout: None,
        ..Config::default()
    };
    let (conn, shared, _tx) = new_connection(PeerAddr::Memory, &config, Limit::Full);
    let mut reader = StreamReader::new(
        Chunks {
            chunks: chunks.iter(),
            cur: &[],
        },
        shared,
        &config,
    );
    let mut frames = Vec::new();
    let end = loop {
        // The chunks are always ready: nothing here ever waits.
        match reader.next_batch().now_or_never() {
            Some(Ok(batch)) => frames.extend(batch),
            Some(Err(end)) => break end,
            None => break RecvError::Eof,
        }
    };
    drop(conn);
    (frames, end)
}

/// Ends a connection whose reader stopped for `reason`.
async fn finish_reader(shared: Arc<Shared>, reason: RecvError) {
    tracing::debug!(conn = shared.id, reason = %reason, "reader finished");
    // After an error we still give the writer a moment to send our Close frame.
    if matches!(
        reason,
        RecvError::FrameTooLarge { .. } | RecvError::Malformed(_)
    ) {
        let _ = tokio::time::timeout(Duration::from_millis(200), shared.done.cancelled()).await;
    }
    shared.finish(reason);
}

/// The reader task of a connection that does not read inline: hands the
/// batches to the [`Receiver`] through `tx`.
async fn stream_reader<R: AsyncRead + Unpin>(
    mut reader: StreamReader<R>,
    tx: mpsc::Sender<Vec<Bytes>>,
) {
    let shared = reader.shared.clone();
    let reason = loop {
        if let Err(reason) = wait_while_limited(&shared, &tx).await {
            break reason;
        }
        match reader.next_batch().await {
            Ok(batch) => {
                tokio::select! {
                    r = tx.send(batch) => { if r.is_err() { /* receiver gone: keep draining for control frames */ } }
                    _ = shared.done.cancelled() => break shared.end_reason(),
                }
            }
            Err(reason) => break reason,
        }
    };
    drop(reader);
    finish_reader(shared, reason).await;
}

/// Before the hello (a connection accepted by a listener whose limit was not
/// raised yet) a reader task reads ahead one batch at most: it waits until
/// the consumer has taken every batch handed to it, so what a peer nobody
/// knows yet can make us buffer stays at about two reads.
async fn wait_while_limited(
    shared: &Shared,
    tx: &mpsc::Sender<Vec<Bytes>>,
) -> Result<(), RecvError> {
    if !shared.limited.load(Ordering::Acquire) {
        return Ok(());
    }
    tokio::select! {
        // A closed channel (the receiver is gone) waits for nothing.
        _ = tx.reserve_many(tx.max_capacity()) => Ok(()),
        _ = shared.done.cancelled() => Err(shared.end_reason()),
    }
}

/// Splits the complete length-prefixed frames at the start of `buf` off it
/// (without copying) into `bodies`. Returns the length of the incomplete
/// frame left at the end, if its length prefix is there (`None`: fewer bytes
/// than a length prefix are left), or `Err(len)` for a frame longer than `max`.
fn split_frames(
    buf: &mut BytesMut,
    max: usize,
    bodies: &mut Vec<Bytes>,
) -> Result<Option<usize>, usize> {
    while buf.len() >= LENGTH_PREFIX {
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > max {
            return Err(len);
        }
        if buf.len() < LENGTH_PREFIX + len {
            return Ok(Some(len));
        }
        buf.advance(LENGTH_PREFIX);
        bodies.push(buf.split_to(len).freeze());
    }
    Ok(None)
}

/// Size of each of the reader's buffers for large frames (or of one frame,
/// if larger).
const BIG_BUF: usize = 512 * 1024;

/// Memory that large frames are read into and split off.
#[derive(Default)]
struct Arena {
    buf: BytesMut,
    /// The capacity `buf` was allocated with.
    size: usize,
}

impl Arena {
    fn new(size: usize) -> Arena {
        Arena {
            buf: BytesMut::with_capacity(size),
            size,
        }
    }

    /// Moves what `buf` holds to the start of its memory, if no frame split
    /// off it is alive any more (and the two do not overlap).
    fn reclaim(&mut self) -> bool {
        self.size > 0 && self.buf.try_reclaim(self.size - self.buf.len())
    }
}

/// The reader's buffers while large frames follow each other.
///
/// Reads fill the current buffer (several frames at once when they are
/// waiting) and frames are split off it, so the consumer gets them without a
/// copy. A read stops where the next frame, if it is as large as the last
/// one, would not fit, so frames are rarely cut at the end of a buffer (what
/// is, is copied to the next one). The next buffer is the current one again
/// from its start, or the previous one, once the consumer has dropped every
/// frame split off it: a stream of large frames does not allocate (and fault
/// in) fresh memory for every frame. Frames the consumer keeps pin at most
/// one buffer each. The reader drops both buffers when small frames follow.
struct BigBuf {
    cur: Arena,
    /// The previous buffer, used again once its frames are gone.
    old: Arena,
    /// The length of the last large frame.
    last: usize,
    /// Buffers allocated and not yet counted, for tests.
    #[cfg(test)]
    allocs: u64,
}

impl BigBuf {
    /// Buffers for a first large frame, of length `next` if known (else
    /// `last`): its own size at first (large frames between small ones cost
    /// no more), `BIG_BUF` once another one follows.
    fn new(last: usize, next: Option<usize>) -> BigBuf {
        let mut b = BigBuf {
            cur: Arena::default(),
            old: Arena::default(),
            last,
            #[cfg(test)]
            allocs: 1,
        };
        b.cur = Arena::new(b.frame_end(next));
        b
    }

    /// Where the incomplete frame at the start of `cur` ends (counted from
    /// that start): its length is `next` if known, else taken to be the last one's.
    fn frame_end(&self, next: Option<usize>) -> usize {
        LENGTH_PREFIX + next.unwrap_or(self.last)
    }

    /// Makes room in `cur` for the incomplete frame it starts with.
    fn make_room(&mut self, next: Option<usize>) {
        let need = self.frame_end(next);
        let len = self.cur.buf.len();
        let fits = self.cur.buf.capacity() >= need;
        // Moving a length prefix or less is free.
        if fits && len > LENGTH_PREFIX {
            return;
        }
        if self.cur.size >= need && self.cur.reclaim() {
            return;
        }
        if fits {
            return;
        }
        let mut to = std::mem::take(&mut self.old);
        if !(to.size >= need && to.reclaim()) {
            to = Arena::new(need.max(BIG_BUF));
            #[cfg(test)]
            {
                self.allocs += 1;
            }
        }
        to.buf.extend_from_slice(&self.cur.buf);
        self.cur.buf.clear();
        self.old = std::mem::replace(&mut self.cur, to);
    }

    /// How many bytes the next read may take: to the end of the incomplete
    /// frame, then whole frames as large as the last one while they fit in
    /// `cur`, then the next length prefix.
    fn want(&self, next: Option<usize>) -> usize {
        let (len, cap) = (self.cur.buf.len(), self.cur.buf.capacity());
        let end = self.frame_end(next);
        let frames = cap.saturating_sub(end) / (LENGTH_PREFIX + self.last);
        let stop = end + frames * (LENGTH_PREFIX + self.last) + LENGTH_PREFIX;
        stop.min(cap) - len
    }
}

fn io_reason(e: std::io::Error) -> RecvError {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
            RecvError::Eof
        }
        _ => RecvError::Io(Arc::new(e)),
    }
}

/// Tells the peer why we are closing, then lets the writer finish.
fn refuse(shared: &Shared, code: CloseCode, reason: &str) {
    // Unlike a local close request, the connection ends with the reader's error.
    if shared.closing.swap(true, Ordering::AcqRel) {
        return;
    }
    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    q.close = Some((code as u32, reason.to_string()));
    drop(q);
    shared.writer_wake.notify_one();
}

/// Frames at least this large are written without copying them into the batch buffer.
const LARGE_FRAME: usize = 16 * 1024;

/// The coalescing buffer is written out whenever it holds this much, so it
/// never grows with the size of the drained queue.
const FLUSH_AT: usize = 256 * 1024;

/// Most slices in one vectored write.
const MAX_SLICES: usize = 64;

/// A piece of the next write: bytes of the batch buffer (small frames and
/// the length prefixes of large ones) or a large frame in its own memory.
enum Piece {
    Buf(std::ops::Range<usize>),
    Frame(Bytes),
}

/// Writes one drained batch: small frames are copied into `buf`, large frames
/// go out from their own memory, all of it in vectored writes of about
/// `FLUSH_AT` bytes (several large frames per write).
///
/// `frames` (the queue's) count against the queue's bound until written:
/// they are taken off `frames` as they go into a write, and each write tells
/// `shared` the room it made ([`Shared::written`]). `urgent` frames do not
/// count.
async fn write_batch<W: AsyncWrite + Unpin>(
    writer: &mut W,
    buf: &mut BytesMut,
    codec: FrameCodec,
    urgent: &[Bytes],
    frames: &mut VecDeque<Bytes>,
    close: Option<&Bytes>,
    shared: &Shared,
) -> std::io::Result<()> {
    let mut pieces: Vec<Piece> = Vec::new();
    let mut pending = 0;
    let mut freed = (0, 0);
    let mut urgent = urgent.iter();
    loop {
        let b = match urgent.next() {
            Some(b) => b.clone(),
            None => match frames.pop_front() {
                Some(b) => {
                    freed.0 += b.len() + QUEUE_FRAME_OVERHEAD;
                    freed.1 += 1;
                    b
                }
                None => break,
            },
        };
        put_piece(buf, codec, b, &mut pieces, &mut pending);
        if pending >= FLUSH_AT || pieces.len() >= MAX_SLICES - 1 {
            write_pieces(writer, buf, &pieces).await?;
            pieces.clear();
            buf.clear();
            pending = 0;
            shared.written(Some(std::mem::take(&mut freed)));
        }
    }
    if let Some(b) = close {
        let b = b.clone();
        put_piece(buf, codec, b, &mut pieces, &mut pending);
    }
    if !pieces.is_empty() {
        write_pieces(writer, buf, &pieces).await?;
        buf.clear();
    }
    Ok(())
}

/// Adds frame `b` to the next write: its length prefix (and the frame
/// itself, if small) copied into `buf`, a large frame as a piece of its own.
fn put_piece(
    buf: &mut BytesMut,
    codec: FrameCodec,
    b: Bytes,
    pieces: &mut Vec<Piece>,
    pending: &mut usize,
) {
    let at = buf.len();
    if b.len() >= LARGE_FRAME {
        buf.extend_from_slice(&(b.len() as u32).to_be_bytes());
    } else {
        // Sizes were checked when queued.
        let _ = codec.put_encoded(&b, buf);
    }
    match pieces.last_mut() {
        Some(Piece::Buf(r)) if r.end == at => r.end = buf.len(),
        _ => pieces.push(Piece::Buf(at..buf.len())),
    }
    *pending += buf.len() - at;
    if b.len() >= LARGE_FRAME {
        *pending += b.len();
        pieces.push(Piece::Frame(b));
    }
}

/// Writes `pieces` whole, with vectored writes when the stream supports them.
async fn write_pieces<'b, W: AsyncWrite + Unpin>(
    writer: &mut W,
    buf: &'b [u8],
    pieces: &'b [Piece],
) -> std::io::Result<()> {
    let bytes = |p: &'b Piece| -> &'b [u8] {
        match p {
            Piece::Buf(r) => &buf[r.clone()],
            Piece::Frame(f) => f,
        }
    };
    if pieces.len() == 1 || !writer.is_write_vectored() {
        for p in pieces {
            writer.write_all(bytes(p)).await?;
        }
        return Ok(());
    }
    let mut slices = [std::io::IoSlice::new(&[]); MAX_SLICES];
    for (s, p) in slices.iter_mut().zip(pieces) {
        *s = std::io::IoSlice::new(bytes(p));
    }
    let mut left = &mut slices[..pieces.len().min(MAX_SLICES)];
    while !left.is_empty() {
        let n = writer.write_vectored(left).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut left, n);
    }
    Ok(())
}

async fn stream_writer<W: AsyncWrite + Unpin>(
    mut writer: W,
    shared: Arc<Shared>,
    codec: FrameCodec,
    config: Config,
) {
    let mut buf = BytesMut::with_capacity(FLUSH_AT + 64 * 1024);
    let mut timers = Timers::new(&config);
    let mut spare = VecDeque::new();
    let mut nonce = 0u64;
    loop {
        // A connection that ended (a slow consumer cut, the peer gone) writes
        // nothing more, not even a close frame requested afterwards.
        if shared.done.is_cancelled() {
            break;
        }
        let drained = match drain(&shared, std::mem::take(&mut spare)) {
            Some(d) => d,
            None => {
                tokio::select! {
                    _ = shared.writer_wake.notified() => {
                        // Let the tasks that are ready to send run first, so
                        // one write carries all their frames (coalescing).
                        tokio::task::yield_now().await;
                        continue;
                    }
                    _ = tick(&mut timers.ping) => {
                        nonce += 1;
                        shared.enqueue_urgent(Frame::ping(nonce).encode_to_bytes());
                        continue;
                    }
                    _ = shared.done.cancelled() => break,
                }
            }
        };
        let Drained {
            partial,
            urgent,
            mut frames,
            close,
        } = drained;
        let close_body = close.as_ref().map(|(code, reason)| {
            Frame::new(Body::Close(proto::Close {
                // Codes come from `CloseCode`: they fit an `i32`.
                code: *code as i32,
                reason: reason.clone(),
            }))
            .encode_to_bytes()
        });
        let ok = tokio::select! {
            r = async {
                if let Some(p) = &partial {
                    writer.write_all(p).await?;
                }
                write_batch(
                    &mut writer,
                    &mut buf,
                    codec,
                    &urgent,
                    &mut frames,
                    close_body.as_ref(),
                    &shared,
                )
                .await
            } => r.is_ok(),
            _ = shared.done.cancelled() => false,
        };
        frames.clear();
        shared.written(None);
        spare = keep_spare(frames);
        buf.clear();
        if !ok {
            if !shared.done.is_cancelled() {
                shared.finish(RecvError::Eof);
            }
            break;
        }
        if let Some((code, reason)) = close {
            let _ = writer.flush().await;
            let _ = writer.shutdown().await;
            // Wait for the peer to close its side (the reader sees EOF), bounded by linger.
            let _ = tokio::time::timeout(config.linger, shared.done.cancelled()).await;
            shared.finish(RecvError::Local(CloseReason::Requested { code, reason }));
            break;
        }
    }
}

/// Starts reader and writer tasks over an established WebSocket.
///
/// With `json`, frames travel as canonical proto3 JSON in text messages (the
/// `replimesh.v1.json` subprotocol); senders still hand protobuf bodies, which
/// the writer transcodes.
pub(crate) fn spawn_ws<S>(
    ws: WebSocketStream<S>,
    peer: PeerAddr,
    config: &Config,
    json: bool,
    limit: Limit,
    meter: Option<Arc<Meter>>,
) -> Connection
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (conn, shared, tx) = new_connection(peer, config, limit);
    if let Some(m) = meter {
        m.message_done();
        m.limit
            .store(shared.recv_max.load(Ordering::Relaxed), Ordering::Relaxed);
        let _ = shared.meter.set(m);
    }
    let span = tracing::debug_span!("conn", id = shared.id, peer = %shared.peer, json);
    let (sink, stream) = ws.split();
    tokio::spawn(tracing::Instrument::instrument(
        ws_reader(stream, shared.clone(), tx, config.clone(), json),
        span.clone(),
    ));
    tokio::spawn(tracing::Instrument::instrument(
        ws_writer(sink, shared, config.clone(), json),
        span,
    ));
    conn
}

/// Counts the bytes an accepted WebSocket connection reads for the message
/// being received, so that one larger than the connection's current limit
/// ([`Receiver::set_max_frame`]) is refused while it arrives:
/// tungstenite's own limit is fixed at the handshake, at
/// [`Config::max_frame`]. What is counted is bytes on the wire (WebSocket
/// framing included); `slack` allows for the next message's start that a
/// read takes along.
#[derive(Debug)]
pub(crate) struct Meter {
    since: AtomicUsize,
    limit: AtomicUsize,
    slack: usize,
    over: AtomicBool,
}

impl Meter {
    /// A meter for a connection accepted with `config`: the pre-hello limit
    /// applies from the first byte (the upgrade request included).
    pub(crate) fn new(config: &Config) -> Arc<Meter> {
        Arc::new(Meter {
            since: AtomicUsize::new(0),
            limit: AtomicUsize::new(config.max_frame_before_hello.min(config.max_frame)),
            slack: config.ws_read_buffer.max(1024) + 1024,
            over: AtomicBool::new(false),
        })
    }

    fn message_done(&self) {
        self.since.store(0, Ordering::Relaxed);
    }

    fn over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Bytes counted for the refused message, and the limit.
    fn seen(&self) -> (usize, usize) {
        (
            self.since.load(Ordering::Relaxed),
            self.limit.load(Ordering::Relaxed),
        )
    }

    fn count(&self, n: usize) -> std::io::Result<()> {
        let since = self.since.fetch_add(n, Ordering::Relaxed) + n;
        if since
            > self
                .limit
                .load(Ordering::Relaxed)
                .saturating_add(self.slack)
        {
            self.over.store(true, Ordering::Relaxed);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "WebSocket message larger than the connection's frame limit",
            ));
        }
        Ok(())
    }
}

/// A stream whose reads are counted by a [`Meter`].
pub(crate) struct Metered<S> {
    inner: S,
    meter: Arc<Meter>,
}

impl<S> Metered<S> {
    pub(crate) fn new(inner: S, meter: Arc<Meter>) -> Self {
        Metered { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                std::task::Poll::Ready(this.meter.count(n))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn ws_message(body: Bytes, json: bool) -> WsMessage {
    if json {
        match Frame::decode(body) {
            Ok(f) => WsMessage::Text(f.to_json().into()),
            // Bodies are produced in this process; an undecodable one is a
            // caller bug: send an empty frame rather than garbage.
            Err(_) => WsMessage::Text("{}".into()),
        }
    } else {
        WsMessage::Binary(body)
    }
}

async fn ws_reader<S>(
    mut stream: futures_util::stream::SplitStream<WebSocketStream<S>>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<Bytes>>,
    config: Config,
    json: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut timers = Timers::new(&config);
    let mut last = Instant::now();
    let meter = shared.meter.get().cloned();
    let reason = 'outer: loop {
        if let Err(reason) = wait_while_limited(&shared, &tx).await {
            break reason;
        }
        let first = tokio::select! {
            m = stream.next() => m,
            limit = tick_idle(&mut timers.idle) => {
                if last.elapsed() >= limit {
                    break RecvError::TimedOut;
                }
                continue;
            }
            _ = shared.done.cancelled() => break shared.end_reason(),
        };
        last = Instant::now();
        let mut batch = Vec::new();
        let mut next = first;
        let mut taken = 0;
        let mut batch_bytes = 0;
        loop {
            if let (Some(m), Some(Ok(_))) = (&meter, &next) {
                m.message_done();
            }
            match next {
                None => break 'outer RecvError::Eof,
                Some(Err(e)) => {
                    use tokio_tungstenite::tungstenite::error::{
                        CapacityError, Error as WsError, ProtocolError,
                    };
                    let r = match e {
                        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
                            refuse(&shared, CloseCode::FrameTooLarge, "message too large");
                            RecvError::FrameTooLarge {
                                len: size,
                                max: max_size,
                            }
                        }
                        WsError::ConnectionClosed
                        | WsError::AlreadyClosed
                        | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                            RecvError::Eof
                        }
                        WsError::Io(_) if meter.as_ref().is_some_and(|m| m.over()) => {
                            let (len, max) = meter.as_ref().map(|m| m.seen()).unwrap_or_default();
                            refuse(&shared, CloseCode::FrameTooLarge, "message too large");
                            RecvError::FrameTooLarge { len, max }
                        }
                        WsError::Io(e) => io_reason(e),
                        WsError::Protocol(p) => RecvError::Malformed(p.to_string()),
                        other => RecvError::Malformed(other.to_string()),
                    };
                    if !batch.is_empty() {
                        let _ = tx.send(std::mem::take(&mut batch)).await;
                    }
                    break 'outer r;
                }
                Some(Ok(msg @ (WsMessage::Binary(_) | WsMessage::Text(_)))) => {
                    let incoming = match msg {
                        WsMessage::Binary(data) => handle_body(&shared, data),
                        // A store frame with a bad value comes up as a
                        // `StoreError` for its store: the store answers it,
                        // the connection goes on.
                        WsMessage::Text(text) if json => {
                            match Frame::from_json_or_store_error(text.as_str()) {
                                Ok(frame) => {
                                    let body = frame.encode_to_bytes();
                                    handle_control(&shared, frame, || body)
                                }
                                Err(e) => Incoming::Malformed(format!("malformed JSON frame: {e}")),
                            }
                        }
                        _ => Incoming::Malformed(
                            "text message on the binary subprotocol replimesh.v1".to_string(),
                        ),
                    };
                    match incoming {
                        Incoming::Deliver(b) => {
                            batch_bytes += b.len();
                            batch.push(b);
                        }
                        Incoming::Handled => {}
                        Incoming::End(r) => {
                            if !batch.is_empty() {
                                let _ = tx.send(std::mem::take(&mut batch)).await;
                            }
                            break 'outer r;
                        }
                        Incoming::Malformed(why) => {
                            refuse(&shared, CloseCode::ProtocolError, &why);
                            break 'outer RecvError::Malformed(why);
                        }
                    }
                }
                Some(Ok(WsMessage::Close(c))) => {
                    break 'outer match c {
                        Some(c) => RecvError::Closed {
                            code: u16::from(c.code) as u32,
                            reason: c.reason.to_string(),
                        },
                        None => RecvError::Eof,
                    }
                }
                Some(Ok(_)) => {} // WebSocket-level ping/pong: answered by tungstenite.
            }
            taken += 1;
            // Before the hello one message at a time; after it, batches of
            // at most 1024 messages or about one read's worth of bytes.
            if taken >= 1024 || batch_bytes >= READ_CHUNK || shared.limited.load(Ordering::Relaxed)
            {
                break;
            }
            match stream.next().now_or_never() {
                Some(m) => next = m,
                None => break,
            }
        }
        if !batch.is_empty() {
            tokio::select! {
                _ = tx.send(batch) => {}
                _ = shared.done.cancelled() => break shared.end_reason(),
            }
        }
    };
    if matches!(
        reason,
        RecvError::FrameTooLarge { .. } | RecvError::Malformed(_)
    ) {
        let _ = tokio::time::timeout(Duration::from_millis(200), shared.done.cancelled()).await;
    }
    shared.finish(reason);
}

async fn ws_writer<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, WsMessage>,
    shared: Arc<Shared>,
    config: Config,
    json: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut timers = Timers::new(&config);
    let mut spare = VecDeque::new();
    let mut nonce = 0u64;
    loop {
        // A connection that ended (a slow consumer cut, the peer gone) writes
        // nothing more, not even a close frame requested afterwards.
        if shared.done.is_cancelled() {
            break;
        }
        let drained = match drain(&shared, std::mem::take(&mut spare)) {
            Some(d) => d,
            None => {
                tokio::select! {
                    _ = shared.writer_wake.notified() => {
                        // Let the tasks that are ready to send run first, so
                        // one write carries all their frames (coalescing).
                        tokio::task::yield_now().await;
                        continue;
                    }
                    _ = tick(&mut timers.ping) => {
                        nonce += 1;
                        shared.enqueue_urgent(Frame::ping(nonce).encode_to_bytes());
                        continue;
                    }
                    _ = shared.done.cancelled() => break,
                }
            }
        };
        let Drained {
            partial: _,
            urgent,
            mut frames,
            close,
        } = drained;
        let counted = urgent.len();
        let write = async {
            let mut freed = (0, 0);
            for (i, b) in urgent.into_iter().chain(frames.drain(..)).enumerate() {
                if i >= counted {
                    freed.0 += b.len() + QUEUE_FRAME_OVERHEAD;
                    freed.1 += 1;
                }
                sink.feed(ws_message(b, json)).await?;
                if freed.0 >= FLUSH_AT {
                    shared.written(Some(std::mem::take(&mut freed)));
                }
            }
            if let Some((code, reason)) = &close {
                let f = Frame::new(Body::Close(proto::Close {
                    code: *code as i32,
                    reason: reason.clone(),
                }));
                sink.feed(ws_message(f.encode_to_bytes(), json)).await?;
            }
            sink.flush().await
        };
        let ok = tokio::select! {
            r = write => r.is_ok(),
            _ = shared.done.cancelled() => false,
        };
        shared.written(None);
        spare = keep_spare(frames);
        if !ok {
            if !shared.done.is_cancelled() {
                shared.finish(RecvError::Eof);
            }
            break;
        }
        if let Some((code, reason)) = close {
            let _ = sink.close().await;
            let _ = tokio::time::timeout(config.linger, shared.done.cancelled()).await;
            shared.finish(RecvError::Local(CloseReason::Requested { code, reason }));
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urgent_queue_is_bounded() {
        let (conn, shared, _tx) = new_connection(PeerAddr::Memory, &Config::default(), Limit::Full);
        for i in 0..10_000 {
            shared.enqueue_urgent(Frame::pong(i).encode_to_bytes());
        }
        let q = shared.queue.lock().unwrap();
        assert_eq!(q.urgent.len(), MAX_URGENT);
        drop(q);
        drop(conn);
    }

    /// The payload of the next frame, `i`th of a test, which must be data.
    async fn recv_payload(rx: &mut Receiver, i: u32) -> Bytes {
        let f = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("frame in time")
            .unwrap();
        match f.body {
            Some(Body::Data(d)) => d.payload,
            _ => panic!("frame {i} is not data"),
        }
    }

    /// Where a direct write stops (in bytes; 0: nowhere), for the test below.
    pub(super) static CUT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// A connection over a Unix socket pair whose sending side makes direct
    /// writes: its sender, the sender's shared state, the other end's
    /// receiver, and what must stay alive meanwhile.
    fn direct_pair() -> (Sender, Arc<Shared>, Receiver, (Receiver, Sender)) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let config = Config::default();
        let sock = Sock::new(crate::sock::Stream::Unix(a), None);
        let sender = spawn_sock(sock, PeerAddr::Memory, &config, Limit::Full);
        let shared = sender.sender.shared.clone();
        let (tx, rx_a) = sender.split();
        let (tx_b, rx) = crate::from_unix_stream(b, &config).split();
        (tx, shared, rx, (rx_a, tx_b))
    }

    /// Direct writes cut short (inside the length prefix, inside the body)
    /// are completed by the writer task before anything else, so every frame
    /// arrives whole and in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partial_direct_writes_are_completed_by_the_writer() {
        let (tx, shared, mut rx, _keep) = direct_pair();
        let n = 300u32;
        let body = |i: u32| {
            let mut p = vec![(i % 251) as u8; 100 + (i as usize * 13) % 3900];
            p[..4].copy_from_slice(&i.to_be_bytes());
            p
        };
        let writer = tokio::task::spawn_blocking(move || {
            for i in 0..n {
                // Whole, cut in the prefix, cut in the body.
                CUT.store([0, 2, 50][i as usize % 3], Ordering::Relaxed);
                tx.send(&Frame::data(body(i))).unwrap();
                let t = Instant::now();
                while t.elapsed() < DIRECT_QUIET * 2 {
                    std::hint::spin_loop();
                }
            }
            tx
        });
        for i in 0..n {
            let payload = recv_payload(&mut rx, i).await;
            assert!(payload[..] == body(i)[..], "frame {i} torn or out of order");
        }
        let _tx = writer.await.unwrap();
        CUT.store(0, Ordering::Relaxed);
        let (whole, partial) = shared.queue.lock().unwrap().direct_writes;
        assert!(
            whole > 0 && partial > 0,
            "direct writes {whole} whole, {partial} partial"
        );
    }

    #[tokio::test]
    async fn send_all_on_an_idle_connection_is_one_write() {
        let (tx, shared, mut rx, _keep) = direct_pair();
        let frames: Vec<Frame> = (0..3u8).map(|i| Frame::data(vec![i; 100])).collect();
        tokio::time::sleep(DIRECT_QUIET * 2).await;
        tx.send_all(&frames).unwrap();
        for (i, want) in frames.iter().enumerate() {
            assert_eq!(Frame::data(recv_payload(&mut rx, i as u32).await), *want);
        }
        // Another test may cut direct writes short: whole or partial, one write.
        let ((whole, partial), frames) = {
            let q = shared.queue.lock().unwrap();
            (q.direct_writes, q.direct_frames)
        };
        assert_eq!(
            (whole + partial, frames),
            (1, 3),
            "direct writes {whole} whole, {partial} partial, of {frames} frames"
        );
        // Too big together for a direct write: queued, still in order.
        let big: Vec<Frame> = (0..3u8).map(|i| Frame::data(vec![i; 3000])).collect();
        tokio::time::sleep(DIRECT_QUIET * 2).await;
        tx.send_all(&big).unwrap();
        for (i, want) in big.iter().enumerate() {
            assert_eq!(Frame::data(recv_payload(&mut rx, i as u32).await), *want);
        }
    }

    /// A stream of large frames that the consumer drops as it goes is read
    /// into the same few buffers (no fresh memory per frame), and every frame
    /// arrives whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_frames_reuse_the_readers_buffers() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let config = Config::default();
        let (tx, _arx) = crate::from_unix_stream(a, &config).split();
        let receiver = crate::from_unix_stream(b, &config);
        let shared = receiver.receiver.shared.clone();
        let (_btx, mut rx) = receiver.split();
        let n = 200u32;
        let body = |i: u32| {
            let mut p = vec![(i % 251) as u8; 64 * 1024];
            p[..4].copy_from_slice(&i.to_be_bytes());
            p
        };
        // One frame in flight at a time: the consumer has dropped the frames
        // before when the reader needs room for the next one.
        for i in 0..n {
            tx.send(&Frame::data(body(i))).unwrap();
            let payload = recv_payload(&mut rx, i).await;
            assert!(payload[..] == body(i)[..], "frame {i} torn");
        }
        let buffers = shared.big_buffers.load(Ordering::Relaxed);
        assert!(
            (1..=3).contains(&buffers),
            "{buffers} buffers for {n} large frames"
        );
    }

    #[test]
    fn control_tags_match_the_schema() {
        assert_eq!(Frame::ping(1).encode_to_bytes()[0], TAG_PING);
        assert_eq!(Frame::pong(1).encode_to_bytes()[0], TAG_PONG);
        assert_eq!(
            Frame::close(CloseCode::Normal, "x").encode_to_bytes()[0],
            TAG_CLOSE
        );
        assert_ne!(Frame::data(&b"x"[..]).encode_to_bytes()[0], TAG_PING);
    }
}
