//! The outbound queue: bounded in bytes and frames, shared by every
//! `Sender` clone and drained by the writer task.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::Shared;
use crate::sock::Sock;
use crate::{CloseReason, RecvError, SendError, SlowConsumerPolicy, QUEUE_FRAME_OVERHEAD};

/// Bound on queued control frames (pongs) per connection.
pub(super) const MAX_URGENT: usize = 256;

#[derive(Default)]
pub(super) struct Queue {
    pub(super) frames: VecDeque<Bytes>,
    /// Control frames (pong) that bypass the byte limit and go first.
    pub(super) urgent: Vec<Bytes>,
    /// What the frames waiting in `frames` (and `partial`) cost: their
    /// lengths plus [`QUEUE_FRAME_OVERHEAD`] each.
    pub(super) bytes: usize,
    /// The same for the frames the writer task took and has not written
    /// yet: they still count against the bound.
    writing: usize,
    /// How many frames the writer task took and has not written yet.
    writing_frames: usize,
    pub(super) close: Option<(u32, String)>,
    space_waiters: bool,
    /// Raw bytes the writer sends before anything else: the rest of a
    /// direct write that the socket took only in part.
    pub(super) partial: Option<Bytes>,
    /// The writer drained frames and has not finished writing them.
    pub(super) writer_busy: bool,
    /// The socket, for direct writes (plain TCP and Unix sockets only);
    /// dropped when the connection ends.
    pub(super) direct: Option<Arc<Sock>>,
    /// When the writer task last found the queue empty and went to sleep.
    pub(super) parked_at: Option<Instant>,
    /// When the last direct write was made.
    pub(super) last_direct: Option<Instant>,
    /// How many frames the writer task's last drain took: more than one
    /// means frames are arriving together, and coalescing them is worth more
    /// than saving a hand-off.
    pub(super) last_drain: usize,
    /// Direct writes: (whole, partial), for tests.
    #[cfg(test)]
    pub(super) direct_writes: (u64, u64),
    /// Frames sent in direct writes, for tests.
    #[cfg(test)]
    pub(super) direct_frames: u64,
}

impl Shared {
    /// The writer task wrote frames that cost `cost` (see
    /// [`QUEUE_FRAME_OVERHEAD`]): room for more. `None`: all it had taken.
    pub(super) fn written(&self, done: Option<(usize, usize)>) {
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

    pub(super) fn enqueue_urgent(&self, body: Bytes) {
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

    /// Queues several bodies in order, as `try_enqueue` one by one would,
    /// except that on an idle connection they go out together in one write.
    pub(super) fn try_enqueue_all(&self, bodies: &[Bytes]) -> Result<(), SendError> {
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
    pub(super) fn try_enqueue(&self, body: &Bytes, wait: bool) -> Result<bool, SendError> {
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

pub(super) struct Drained {
    pub(super) partial: Option<Bytes>,
    pub(super) urgent: Vec<Bytes>,
    pub(super) frames: VecDeque<Bytes>,
    pub(super) close: Option<(u32, String)>,
}

pub(super) fn drain(shared: &Shared, spare: VecDeque<Bytes>) -> Option<Drained> {
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
pub(super) fn keep_spare(mut frames: VecDeque<Bytes>) -> VecDeque<Bytes> {
    frames.clear();
    if frames.capacity() > SPARE_FRAMES {
        return VecDeque::new();
    }
    frames
}

/// Largest drained queue (in frames) whose memory the writer keeps.
const SPARE_FRAMES: usize = 4096;
