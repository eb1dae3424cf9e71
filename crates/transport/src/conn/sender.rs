//! The sending half of a connection.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use proto::{CloseCode, Frame};

use super::{PeerAddr, Shared};
use crate::{CloseReason, RecvError, SendError};

/// The sending half of a connection. Cheap to clone; all clones feed the same queue.
///
/// Frames are queued and written by a background writer task that drains the
/// whole queue into one buffer per write. The queue is bounded by
/// [`Config::max_queue_bytes`](crate::Config::max_queue_bytes).
pub struct Sender {
    pub(super) shared: Arc<Shared>,
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

pub(super) fn release(shared: &Shared) {
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
    /// configured [`SlowConsumerPolicy`](crate::SlowConsumerPolicy) applies.
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
