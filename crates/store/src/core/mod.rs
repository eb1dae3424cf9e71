//! The sans-IO core: plain state machines that take events and return frames.
//!
//! [`Authority`] orders actions into a history; [`Replica`] applies that
//! history and sends dispatches (and, as a relay, serves its own replicas).
//! Neither does IO nor reads a clock, so whole clusters can be simulated
//! deterministically (see the crate's `tests/sim.rs`).

mod authority;
mod dedup;
mod log;
mod replica;

pub use authority::{store_of, Authority, AuthorityConfig, Origin, Recovered};
pub(crate) use dedup::DedupDump;
pub use log::{FollowerId, LogConfig, SyncMode};
pub use replica::{Replica, ReplicaConfig, ReplicaEvent};

/// Values keyed by op ids that are mostly inserted in increasing order and
/// removed near the front (dispatches in flight, waiting futures).
pub(crate) struct OpSlots<T> {
    base: u64,
    slots: std::collections::VecDeque<Option<T>>,
    len: usize,
}

impl<T> Default for OpSlots<T> {
    fn default() -> Self {
        OpSlots {
            base: 0,
            slots: std::collections::VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> OpSlots<T> {
    pub(crate) fn insert(&mut self, op: u64, value: T) {
        if self.slots.is_empty() {
            self.base = op;
        }
        while op < self.base {
            self.slots.push_front(None);
            self.base -= 1;
        }
        let idx = (op - self.base) as usize;
        while self.slots.len() <= idx {
            self.slots.push_back(None);
        }
        if self.slots[idx].replace(value).is_none() {
            self.len += 1;
        }
    }

    pub(crate) fn remove(&mut self, op: u64) -> Option<T> {
        if op < self.base {
            return None;
        }
        let idx = (op - self.base) as usize;
        let v = self.slots.get_mut(idx)?.take()?;
        self.len -= 1;
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 1;
        }
        Some(v)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Removes everything, in op order.
    pub(crate) fn drain(&mut self) -> Vec<(u64, T)> {
        let base = self.base;
        let out = std::mem::take(&mut self.slots)
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (base + i as u64, v)))
            .collect();
        self.len = 0;
        out
    }
}
