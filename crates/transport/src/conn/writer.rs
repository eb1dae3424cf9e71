//! The writer task, one per connection, over a byte stream or a WebSocket
//! ([`Outbound`]), and the byte-stream writer: the drained queue goes out in
//! as few (vectored) writes as it can.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use proto::{frame::Body, Frame, FrameCodec};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::control::{tick, Timers};
use super::queue::{drain, keep_spare, Drained};
use super::{Shared, LARGE_FRAME};
use crate::{CloseReason, Config, RecvError, QUEUE_FRAME_OVERHEAD};

/// The coalescing buffer is written out whenever it holds this much, so it
/// never grows with the size of the drained queue.
pub(super) const FLUSH_AT: usize = 256 * 1024;

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
        buf.extend_from_slice(&proto::length_prefix(b.len()));
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

/// One drained batch, in the order it goes out: `partial` (the raw rest of
/// a direct write), the `urgent` frames, the queue's `frames`, then `close`
/// (our encoded `Close` frame).
///
/// `frames` count against the queue's bound until written: they are taken
/// off `frames` as they go out, and the writer tells [`Shared`] the room
/// made ([`Shared::written`]). `urgent` frames do not count.
pub(super) struct Batch<'a> {
    pub(super) partial: Option<Bytes>,
    pub(super) urgent: Vec<Bytes>,
    pub(super) frames: &'a mut VecDeque<Bytes>,
    pub(super) close: Option<&'a Bytes>,
}

/// Where a connection's writer task writes: a byte stream ([`StreamOut`])
/// or a WebSocket ([`super::ws::WsOut`]). The task ([`writer_task`]) is the
/// same for both: it drains the queue, sends pings and ends the connection.
pub(super) trait Outbound {
    /// Writes `batch` (telling `shared` the room it makes) and flushes.
    async fn write(&mut self, shared: &Shared, batch: Batch<'_>) -> std::io::Result<()>;

    /// Shuts the stream down after our `Close` frame was written.
    async fn shutdown(&mut self);
}

/// A byte stream's writing half, with the buffer small frames are
/// coalesced in.
pub(super) struct StreamOut<W> {
    writer: W,
    buf: BytesMut,
    codec: FrameCodec,
}

impl<W> StreamOut<W> {
    pub(super) fn new(writer: W, codec: FrameCodec) -> Self {
        StreamOut {
            writer,
            buf: BytesMut::with_capacity(FLUSH_AT + 64 * 1024),
            codec,
        }
    }
}

impl<W: AsyncWrite + Unpin> Outbound for StreamOut<W> {
    async fn write(&mut self, shared: &Shared, batch: Batch<'_>) -> std::io::Result<()> {
        // What a failed or cancelled write left in the buffer is not sent.
        self.buf.clear();
        if let Some(p) = &batch.partial {
            self.writer.write_all(p).await?;
        }
        write_batch(
            &mut self.writer,
            &mut self.buf,
            self.codec,
            &batch.urgent,
            batch.frames,
            batch.close,
            shared,
        )
        .await
    }

    async fn shutdown(&mut self) {
        let _ = self.writer.flush().await;
        let _ = self.writer.shutdown().await;
    }
}

/// The writer task of a connection: drains the queue whenever woken (one
/// write for everything queued meanwhile), sends a ping every
/// [`Config::ping_interval`] while idle, and after our `Close` frame shuts
/// the stream down and waits up to [`Config::linger`] for the peer's end.
pub(super) async fn writer_task<O: Outbound>(mut out: O, shared: Arc<Shared>, config: Config) {
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
            r = out.write(&shared, Batch {
                partial,
                urgent,
                frames: &mut frames,
                close: close_body.as_ref(),
            }) => r.is_ok(),
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
            out.shutdown().await;
            // Wait for the peer to close its side (the reader sees EOF), bounded by linger.
            let _ = tokio::time::timeout(config.linger, shared.done.cancelled()).await;
            shared.finish(RecvError::Local(CloseReason::Requested { code, reason }));
            break;
        }
    }
}
