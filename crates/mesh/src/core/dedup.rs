//! Bounded duplicate detection for message ids of one origin.

/// A sliding window over the message ids of one origin incarnation.
///
/// Ids are expected to grow (each clone numbers its messages 1, 2, 3, ...);
/// they may arrive out of order by up to `size` positions. An id older than the
/// window is treated as already seen (it is dropped, never delivered twice).
#[derive(Debug, Clone)]
pub(crate) struct Window {
    /// Highest id seen so far.
    hi: u64,
    /// Bit `i` of the ring is set when id `j` with `j % size == i` and `hi - size < j <= hi` was seen.
    bits: Vec<u64>,
    size: u64,
}

impl Window {
    pub(crate) fn new(size: u64) -> Self {
        let size = size.clamp(64, 1 << 20).next_power_of_two();
        Window {
            hi: 0,
            bits: vec![0; (size / 64) as usize],
            size,
        }
    }

    fn bit(&self, id: u64) -> (usize, u64) {
        let pos = id % self.size;
        ((pos / 64) as usize, 1u64 << (pos % 64))
    }

    /// Records `id`; returns `true` when it is new (deliver it) and `false` when
    /// it was seen before or is too old to tell.
    pub(crate) fn insert(&mut self, id: u64) -> bool {
        if id == 0 {
            return false;
        }
        if id > self.hi {
            let gap = id - self.hi;
            if gap >= self.size {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for j in self.hi + 1..=id {
                    let (w, m) = self.bit(j);
                    self.bits[w] &= !m;
                }
            }
            self.hi = id;
            let (w, m) = self.bit(id);
            self.bits[w] |= m;
            return true;
        }
        if self.hi - id >= self.size {
            return false;
        }
        let (w, m) = self.bit(id);
        if self.bits[w] & m != 0 {
            false
        } else {
            self.bits[w] |= m;
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Window;

    #[test]
    fn in_order_out_of_order_and_too_old() {
        let mut w = Window::new(64);
        assert!(w.insert(1));
        assert!(!w.insert(1));
        assert!(w.insert(3));
        assert!(w.insert(2));
        assert!(!w.insert(2));
        assert!(w.insert(200));
        assert!(!w.insert(3), "too old counts as seen");
        assert!(w.insert(150));
        assert!(!w.insert(150));
        assert!(!w.insert(0));
        for i in 201..1000 {
            assert!(w.insert(i));
        }
        assert!(!w.insert(999));
    }
}
