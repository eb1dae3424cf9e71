//! Duplicate detection by (client id, op id).

use std::collections::{HashMap, VecDeque};

/// What is known of one op id of one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpState {
    /// Never seen (a hole between seen op ids).
    Unseen,
    /// Committed with this sequence number.
    Committed(u64),
    /// Answered with an error (not committed).
    Rejected,
    /// A relay passed it upstream as its own op id; no answer yet.
    Pending(u64),
}

/// The result of a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Not seen: handle it.
    New,
    /// Seen before.
    Known(OpState),
    /// Older than the window: handled before, answer unknown.
    Forgotten,
}

struct ClientOps {
    /// Op id of `entries[0]`.
    first: u64,
    entries: VecDeque<OpState>,
    last_used: u64,
}

impl ClientOps {
    fn last(&self) -> u64 {
        self.first + self.entries.len() as u64 - 1
    }
}

/// Per-client windows of recent op ids.
pub(crate) struct Dedup {
    clients: HashMap<String, ClientOps>,
    window: usize,
    max_clients: usize,
    tick: u64,
}

impl Dedup {
    pub(crate) fn new(window: usize, max_clients: usize) -> Self {
        Dedup {
            clients: HashMap::new(),
            window: window.max(1),
            max_clients: max_clients.max(1),
            tick: 0,
        }
    }

    pub(crate) fn lookup(&self, client: &str, op: u64) -> Lookup {
        let Some(c) = self.clients.get(client) else {
            return Lookup::New;
        };
        if c.entries.is_empty() || op > c.last() {
            return Lookup::New;
        }
        if op < c.first {
            return Lookup::Forgotten;
        }
        match c.entries[(op - c.first) as usize] {
            OpState::Unseen => Lookup::New,
            s => Lookup::Known(s),
        }
    }

    /// The highest op id seen from `client` (0: none).
    pub(crate) fn last_op(&self, client: &str) -> u64 {
        self.clients
            .get(client)
            .filter(|c| !c.entries.is_empty())
            .map(|c| c.last())
            .unwrap_or(0)
    }

    pub(crate) fn record(&mut self, client: &str, op: u64, state: OpState) {
        self.tick += 1;
        let tick = self.tick;
        if !self.clients.contains_key(client) {
            self.evict();
            self.clients.insert(
                client.to_owned(),
                ClientOps {
                    first: op,
                    entries: VecDeque::new(),
                    last_used: tick,
                },
            );
        }
        let window = self.window;
        let Some(c) = self.clients.get_mut(client) else {
            return;
        };
        c.last_used = tick;
        if c.entries.is_empty() {
            c.first = op;
        }
        if op < c.first {
            return;
        }
        let last = c.first + c.entries.len() as u64;
        if op >= last {
            let gap = op - last;
            if gap as usize >= window {
                c.entries.clear();
                c.first = op;
            } else {
                for _ in 0..gap {
                    c.entries.push_back(OpState::Unseen);
                }
            }
            c.entries.push_back(state);
        } else {
            c.entries[(op - c.first) as usize] = state;
        }
        while c.entries.len() > window {
            c.entries.pop_front();
            c.first += 1;
        }
    }

    fn evict(&mut self) {
        if self.clients.len() < self.max_clients {
            return;
        }
        if let Some(oldest) = self
            .clients
            .iter()
            .min_by_key(|(_, c)| c.last_used)
            .map(|(k, _)| k.clone())
        {
            self.clients.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_and_holes() {
        let mut d = Dedup::new(4, 2);
        assert_eq!(d.lookup("a", 1), Lookup::New);
        d.record("a", 1, OpState::Committed(10));
        d.record("a", 3, OpState::Rejected);
        assert_eq!(d.lookup("a", 1), Lookup::Known(OpState::Committed(10)));
        assert_eq!(d.lookup("a", 2), Lookup::New);
        assert_eq!(d.lookup("a", 3), Lookup::Known(OpState::Rejected));
        assert_eq!(d.last_op("a"), 3);
        for op in 4..=6 {
            d.record("a", op, OpState::Committed(op + 10));
        }
        assert_eq!(d.lookup("a", 2), Lookup::Forgotten);
        assert_eq!(d.lookup("a", 6), Lookup::Known(OpState::Committed(16)));
        d.record("b", 1, OpState::Committed(1));
        d.record("c", 1, OpState::Committed(2));
        // "a" was the least recently used: evicted.
        assert_eq!(d.lookup("a", 6), Lookup::New);
        assert_eq!(d.last_op("c"), 1);
    }
}
