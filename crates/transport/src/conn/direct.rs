//! Direct writes: a lone small frame written by the sending task itself
//! on a plain TCP or Unix socket.

use std::os::fd::AsFd;
#[cfg(test)]
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::LENGTH_PREFIX;

use super::queue::Queue;
use super::Shared;
use crate::QUEUE_FRAME_OVERHEAD;

/// Frames up to this size (with the length prefix) may be written directly.
const DIRECT_MAX: usize = 4096;

/// A frame is written directly only when the connection has been quiet this
/// long: frames that follow each other closely are queued and coalesced by
/// the writer task (one write for many), a lone frame saves the hand-off.
pub(super) const DIRECT_QUIET: Duration = Duration::from_micros(20);

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
        buf[total..total + LENGTH_PREFIX].copy_from_slice(&proto::length_prefix(b.len()));
        total += LENGTH_PREFIX;
        buf[total..total + b.len()].copy_from_slice(b);
        total += b.len();
    }
    let framed = &buf[..total];
    let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
    // Tests cut direct writes short at chosen points (sockets rarely do it
    // on demand).
    #[cfg(test)]
    let total = match super::tests::CUT.load(Ordering::Relaxed) {
        0 => total,
        cut => total.min(cut),
    };
    match rustix::net::send(fd.as_fd(), &framed[..total], flags) {
        Ok(n) if n == framed.len() => Direct::Sent,
        Ok(n) if n > 0 => Direct::Partial(Bytes::copy_from_slice(&framed[n..])),
        _ => Direct::NotSent,
    }
}

impl Shared {
    /// Writes `bodies` from the calling task when the connection is idle: the
    /// queue empty, the writer task asleep after a drain of at most one frame,
    /// no direct write in the last [`DIRECT_QUIET`], and all of them framed
    /// within [`DIRECT_MAX`]. What the socket does not take is left for the
    /// writer task to send first. `false`: nothing was written, queue them.
    pub(super) fn try_direct(&self, q: &mut Queue, bodies: &[Bytes]) -> bool {
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
}
