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
    /// A relay forwarded it upstream; no answer yet.
    Pending,
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

pub(crate) struct ClientOps {
    /// Op id of `entries[0]`.
    first: u64,
    entries: VecDeque<OpState>,
    last_used: u64,
}

impl ClientOps {
    fn last(&self) -> u64 {
        self.first + self.entries.len() as u64 - 1
    }

    pub(crate) fn lookup(&self, op: u64) -> Lookup {
        if self.entries.is_empty() || op > self.last() {
            return Lookup::New;
        }
        if op < self.first {
            return Lookup::Forgotten;
        }
        match self.entries[(op - self.first) as usize] {
            OpState::Unseen => Lookup::New,
            s => Lookup::Known(s),
        }
    }

    pub(crate) fn record(&mut self, op: u64, state: OpState, window: usize) {
        if self.entries.is_empty() {
            self.first = op;
        }
        if op < self.first {
            return;
        }
        let end = self.first + self.entries.len() as u64;
        if op >= end {
            let gap = op - end;
            if gap as usize >= window {
                self.entries.clear();
                self.first = op;
            } else {
                for _ in 0..gap {
                    self.entries.push_back(OpState::Unseen);
                }
            }
            self.entries.push_back(state);
        } else {
            self.entries[(op - self.first) as usize] = state;
        }
        while self.entries.len() > window {
            self.entries.pop_front();
            self.first += 1;
        }
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
        match self.clients.get(client) {
            Some(c) => c.lookup(op),
            None => Lookup::New,
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
        let mut c = self.take(client);
        c.record(op, state, self.window);
        self.put(client, c);
    }

    /// Takes a client's window out (to work on many ops with one lookup);
    /// give it back with [`Dedup::put`].
    pub(crate) fn take(&mut self, client: &str) -> ClientOps {
        self.clients.remove(client).unwrap_or(ClientOps {
            first: 0,
            entries: VecDeque::new(),
            last_used: 0,
        })
    }

    pub(crate) fn put(&mut self, client: &str, mut c: ClientOps) {
        self.tick += 1;
        c.last_used = self.tick;
        if c.entries.is_empty() {
            return;
        }
        self.evict();
        self.clients.insert(client.to_owned(), c);
    }

    /// Every committed (client, op id, seq) in the windows.
    pub(crate) fn committed(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.clients.iter().flat_map(|(client, c)| {
            c.entries
                .iter()
                .enumerate()
                .filter_map(move |(i, s)| match s {
                    OpState::Committed(seq) => Some((client.as_str(), c.first + i as u64, *seq)),
                    _ => None,
                })
        })
    }

    pub(crate) fn window(&self) -> usize {
        self.window
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
