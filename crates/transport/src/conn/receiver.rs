//! The receiving half of a connection.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use proto::{CloseCode, Frame, Message as _};
use tokio::sync::mpsc;

use super::control::{finish_reader, refuse, refused};
use super::reader::InlineReader;
use super::sender::release;
use super::{PeerAddr, Shared};
use crate::RecvError;

/// The receiving half of a connection.
///
/// `Ping`, `Pong` and `Close` frames are handled by the transport and never
/// returned. Dropping the receiver does not close the connection while
/// senders are alive; the reader stops reading (backpressure) once
/// [`Config::recv_batches`](crate::Config::recv_batches) reads are waiting. With [`Config::inline_reads`](crate::Config::inline_reads)
/// the receiver reads the socket itself, only while [`Receiver::recv`] (or
/// [`Receiver::try_recv`]) is called.
pub struct Receiver {
    pub(super) shared: Arc<Shared>,
    pub(super) source: Source,
    pub(super) current: std::vec::IntoIter<Bytes>,
    pub(super) failed: bool,
}

/// Where a [`Receiver`] gets its frames.
pub(super) enum Source {
    /// From the connection's reader task.
    Task(mpsc::Receiver<Vec<Bytes>>),
    /// From the socket, read by the receiver itself ([`Config::inline_reads`](crate::Config::inline_reads)).
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
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if refused(&reason) => {
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
    /// [`Config::max_frame_before_hello`](crate::Config::max_frame_before_hello), so that a peer nobody knows yet
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

    /// [`Receiver::set_max_frame`] with [`Config::max_frame`](crate::Config::max_frame), the limit the
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
