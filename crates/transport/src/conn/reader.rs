//! The stream reader: reads a byte stream, splits frames off it and
//! hands them to the `Receiver`, from its own task or inline.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use proto::{CloseCode, Split, LENGTH_PREFIX};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;

use super::bigbuf::BigBuf;
use super::control::{finish_reader, handle_body, refuse, tick_idle, Incoming, Timers};
use super::{new_connection, Limit, PeerAddr, Shared, LARGE_FRAME};
use crate::{Config, RecvError};

/// The reading side of a byte-stream connection: reads the socket, splits
/// frames off it, answers control frames. Driven by its own task
/// ([`stream_reader`]), or by the [`Receiver`](crate::Receiver) itself when the connection
/// reads inline ([`Config::inline_reads`]).
pub(super) struct StreamReader<R> {
    reader: R,
    pub(super) shared: Arc<Shared>,
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

/// A reader whose stream type is erased, for the [`Receiver`](crate::Receiver) of an inline
/// connection.
pub(super) type InlineReader = StreamReader<Box<dyn AsyncRead + Send + Unpin>>;

pub(super) const READ_CHUNK: usize = 128 * 1024;

impl<R: AsyncRead + Unpin> StreamReader<R> {
    pub(super) fn new(reader: R, shared: Arc<Shared>, config: &Config) -> Self {
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
    pub(super) async fn next_batch(&mut self) -> Result<Vec<Bytes>, RecvError> {
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

/// The reader task of a connection that does not read inline: hands the
/// batches to the [`Receiver`](crate::Receiver) through `tx`.
pub(super) async fn stream_reader<R: AsyncRead + Unpin>(
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
pub(super) async fn wait_while_limited(
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
    loop {
        match proto::split_frame(buf, max) {
            Split::Frame(body) => bodies.push(body),
            Split::Partial(next) => return Ok(next),
            Split::TooLarge(len) => return Err(len),
        }
    }
}

pub(super) fn io_reason(e: std::io::Error) -> RecvError {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
            RecvError::Eof
        }
        _ => RecvError::Io(Arc::new(e)),
    }
}
