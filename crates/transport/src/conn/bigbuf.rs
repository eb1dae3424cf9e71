//! The stream reader's buffers for large frames.

use bytes::BytesMut;
use proto::LENGTH_PREFIX;

/// Size of each of the reader's buffers for large frames (or of one frame,
/// if larger).
const BIG_BUF: usize = 512 * 1024;

/// Memory that large frames are read into and split off.
#[derive(Default)]
pub(super) struct Arena {
    pub(super) buf: BytesMut,
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
pub(super) struct BigBuf {
    pub(super) cur: Arena,
    /// The previous buffer, used again once its frames are gone.
    old: Arena,
    /// The length of the last large frame.
    pub(super) last: usize,
    /// Buffers allocated and not yet counted, for tests.
    #[cfg(test)]
    pub(super) allocs: u64,
}

impl BigBuf {
    /// Buffers for a first large frame, of length `next` if known (else
    /// `last`): its own size at first (large frames between small ones cost
    /// no more), `BIG_BUF` once another one follows.
    pub(super) fn new(last: usize, next: Option<usize>) -> BigBuf {
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
    pub(super) fn make_room(&mut self, next: Option<usize>) {
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
    pub(super) fn want(&self, next: Option<usize>) -> usize {
        let (len, cap) = (self.cur.buf.len(), self.cur.buf.capacity());
        let end = self.frame_end(next);
        let frames = cap.saturating_sub(end) / (LENGTH_PREFIX + self.last);
        let stop = end + frames * (LENGTH_PREFIX + self.last) + LENGTH_PREFIX;
        stop.min(cap) - len
    }
}
