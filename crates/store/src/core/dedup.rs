//! Duplicate detection by (client id, op id).
//!
//! Each remembered client keeps the op ids it dispatched within its window
//! (the last `window` op ids up to its highest), **sparse**: memory follows
//! the dispatches actually made, not the span of op ids (a client that sends
//! op 1 and op 32,768 costs two entries, not a window of 32,768 slots). Each
//! entry keeps a digest of the action, so that an op id reused for another
//! action (a client that restarted and numbers its ops from 1 again) is told
//! apart from a resend.
//!
//! Bounds: at most `max_clients` client ids, at most `max_per_owner` of them
//! per owner (the login whose connection dispatched them), and at most
//! `max_entries` op ids in all; past a bound the least recently used client
//! id (of that owner, for the per-owner bound) is forgotten whole. A
//! forgotten client's op ids are new again: a resend of a dispatch it made
//! before is applied a second time.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// What is known of one op id of one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum OpState {
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
    /// Seen before, with the digest of its action (0: unknown).
    Known(OpState, u64),
    /// Older than the window: handled before, answer unknown.
    Forgotten,
}

/// A digest of a binary action (FNV-1a, 64 bits; never 0, which means
/// unknown). Stable across builds: it is persisted with the origins.
pub(crate) fn digest(binary: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in binary {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Op {
    op: u64,
    state: OpState,
    digest: u64,
}

pub(crate) struct ClientOps {
    /// Op ids at or below this are forgotten (0: none).
    floor: u64,
    /// Remembered op ids, in increasing order.
    ops: VecDeque<Op>,
    last_used: u64,
    owner: Arc<str>,
    /// Counted in its owner's client ids.
    counted: bool,
}

impl ClientOps {
    pub(crate) fn lookup(&self, op: u64) -> Lookup {
        if op <= self.floor {
            return Lookup::Forgotten;
        }
        match self.find(op) {
            Ok(i) => Lookup::Known(self.ops[i].state, self.ops[i].digest),
            Err(_) => Lookup::New,
        }
    }

    fn find(&self, op: u64) -> Result<usize, usize> {
        match self.ops.back() {
            None => Err(0),
            Some(b) if op > b.op => Err(self.ops.len()),
            _ => self.ops.binary_search_by_key(&op, |o| o.op),
        }
    }

    /// Records `op`; returns the change in remembered entries.
    pub(crate) fn record(&mut self, op: u64, state: OpState, digest: u64, window: usize) -> isize {
        if op <= self.floor {
            return 0;
        }
        let entry = Op { op, state, digest };
        let mut delta = 0isize;
        match self.find(op) {
            Ok(i) => {
                let keep = self.ops[i].digest;
                self.ops[i] = entry;
                if digest == 0 {
                    self.ops[i].digest = keep;
                }
            }
            Err(i) => {
                self.ops.insert(i, entry);
                delta += 1;
            }
        }
        let last = self.ops.back().map_or(0, |o| o.op);
        let floor = last.saturating_sub(window as u64);
        if floor > self.floor {
            self.floor = floor;
            while self.ops.front().is_some_and(|o| o.op <= floor) {
                self.ops.pop_front();
                delta -= 1;
            }
        }
        delta
    }

    fn last(&self) -> u64 {
        self.ops.back().map_or(0, |o| o.op)
    }
}

/// Per-client windows of recent op ids, bounded (see the module docs).
pub(crate) struct Dedup {
    clients: HashMap<String, ClientOps>,
    /// Client ids per owner.
    owners: HashMap<Arc<str>, usize>,
    window: usize,
    max_clients: usize,
    max_per_owner: usize,
    max_entries: usize,
    entries: usize,
    tick: u64,
}

/// A [`Dedup`]'s content (see [`Dedup::export`]).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct DedupDump {
    clients: Vec<ClientDump>,
    tick: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ClientDump {
    id: String,
    floor: u64,
    ops: Vec<Op>,
    last_used: u64,
    owner: String,
    counted: bool,
}

/// Limits of a [`Dedup`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct DedupLimits {
    pub(crate) window: usize,
    pub(crate) max_clients: usize,
    pub(crate) max_per_owner: usize,
    pub(crate) max_entries: usize,
}

impl Dedup {
    pub(crate) fn new(l: DedupLimits) -> Self {
        Dedup {
            clients: HashMap::new(),
            owners: HashMap::new(),
            window: l.window.max(1),
            max_clients: l.max_clients.max(1),
            max_per_owner: l.max_per_owner.max(1),
            max_entries: l.max_entries.max(1),
            entries: 0,
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
        self.clients.get(client).map(|c| c.last()).unwrap_or(0)
    }

    pub(crate) fn record(
        &mut self,
        owner: &str,
        client: &str,
        op: u64,
        state: OpState,
        digest: u64,
    ) {
        let mut c = self.take(owner, client);
        self.record_in(&mut c, op, state, digest);
        self.put(client, c);
    }

    /// Records `op` in a client's window taken out with [`Dedup::take`].
    pub(crate) fn record_in(&mut self, c: &mut ClientOps, op: u64, state: OpState, digest: u64) {
        let d = c.record(op, state, digest, self.window);
        self.entries = self.entries.saturating_add_signed(d);
    }

    /// Takes a client's window out (to work on many ops with one lookup);
    /// give it back with [`Dedup::put`]. A new client belongs to `owner`.
    pub(crate) fn take(&mut self, owner: &str, client: &str) -> ClientOps {
        if let Some(c) = self.clients.remove(client) {
            return c;
        }
        let owner = match self.owners.get_key_value(owner) {
            Some((k, _)) => k.clone(),
            None => Arc::from(owner),
        };
        ClientOps {
            floor: 0,
            ops: VecDeque::new(),
            last_used: 0,
            owner,
            counted: false,
        }
    }

    pub(crate) fn put(&mut self, client: &str, mut c: ClientOps) {
        self.tick += 1;
        c.last_used = self.tick;
        if c.ops.is_empty() && c.floor == 0 {
            // Nothing to remember (a new client whose ops were all refused).
            return;
        }
        let owner = c.owner.clone();
        let new = !c.counted;
        c.counted = true;
        self.clients.insert(client.to_owned(), c);
        if new {
            let n = self.owners.entry(owner.clone()).or_insert(0);
            *n += 1;
            if *n > self.max_per_owner {
                self.evict_lru(client, Some(&owner));
            }
        }
        while self.clients.len() > self.max_clients || self.entries > self.max_entries {
            if !self.evict_lru(client, None) {
                break;
            }
        }
    }

    /// Forgets the least recently used client id (of `owner`, if given),
    /// never `keep`. False when there is none.
    fn evict_lru(&mut self, keep: &str, owner: Option<&Arc<str>>) -> bool {
        let victim = self
            .clients
            .iter()
            .filter(|(k, c)| k.as_str() != keep && owner.is_none_or(|o| *c.owner == **o))
            .min_by_key(|(_, c)| c.last_used)
            .map(|(k, _)| k.clone());
        let Some(v) = victim else { return false };
        if let Some(c) = self.clients.remove(&v) {
            self.entries = self.entries.saturating_sub(c.ops.len());
            if let Some(n) = self.owners.get_mut(&c.owner) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.owners.remove(&c.owner);
                }
            }
        }
        true
    }

    /// Everything it holds, for a replicated authority's snapshot: a
    /// [`Dedup::import`] of it decides every later lookup and eviction as
    /// this one does (client ids in a stable order).
    pub(crate) fn export(&self) -> DedupDump {
        let mut clients: Vec<ClientDump> = self
            .clients
            .iter()
            .map(|(id, c)| ClientDump {
                id: id.clone(),
                floor: c.floor,
                ops: c.ops.iter().copied().collect(),
                last_used: c.last_used,
                owner: c.owner.to_string(),
                counted: c.counted,
            })
            .collect();
        clients.sort_by(|a, b| a.id.cmp(&b.id));
        DedupDump {
            clients,
            tick: self.tick,
        }
    }

    /// Replaces everything with a [`Dedup::export`] (the limits stay).
    pub(crate) fn import(&mut self, dump: DedupDump) {
        self.clients.clear();
        self.owners.clear();
        self.entries = 0;
        self.tick = dump.tick;
        for c in dump.clients {
            let owner: Arc<str> = match self.owners.get_key_value(c.owner.as_str()) {
                Some((k, _)) => k.clone(),
                None => Arc::from(c.owner.as_str()),
            };
            if c.counted {
                *self.owners.entry(owner.clone()).or_insert(0) += 1;
            }
            self.entries += c.ops.len();
            self.clients.insert(
                c.id,
                ClientOps {
                    floor: c.floor,
                    ops: c.ops.into(),
                    last_used: c.last_used,
                    owner,
                    counted: c.counted,
                },
            );
        }
    }

    /// Every committed (client, op id, seq, digest) in the windows.
    pub(crate) fn committed(&self) -> impl Iterator<Item = (&str, u64, u64, u64)> {
        self.clients.iter().flat_map(|(client, c)| {
            c.ops.iter().filter_map(move |o| match o.state {
                OpState::Committed(seq) => Some((client.as_str(), o.op, seq, o.digest)),
                _ => None,
            })
        })
    }

    /// Client ids remembered now.
    pub(crate) fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Op ids remembered now, all clients together.
    pub(crate) fn entries(&self) -> usize {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(window: usize, clients: usize, per_owner: usize, entries: usize) -> DedupLimits {
        DedupLimits {
            window,
            max_clients: clients,
            max_per_owner: per_owner,
            max_entries: entries,
        }
    }

    #[test]
    fn sparse_window_holes_and_digests() {
        let mut d = Dedup::new(limits(4, 2, 2, 100));
        assert_eq!(d.lookup("a", 1), Lookup::New);
        d.record("x", "a", 1, OpState::Committed(10), 77);
        d.record("x", "a", 3, OpState::Rejected, 0);
        assert_eq!(d.lookup("a", 1), Lookup::Known(OpState::Committed(10), 77));
        assert_eq!(d.lookup("a", 2), Lookup::New);
        assert_eq!(d.lookup("a", 3), Lookup::Known(OpState::Rejected, 0));
        assert_eq!(d.last_op("a"), 3);
        for op in 4..=6 {
            d.record("x", "a", op, OpState::Committed(op + 10), op);
        }
        assert_eq!(d.lookup("a", 2), Lookup::Forgotten);
        assert_eq!(d.lookup("a", 6), Lookup::Known(OpState::Committed(16), 6));
        // Entries follow the dispatches, not the span of op ids: "a" keeps
        // 3..=6; "b" keeps 1 and 4, then a jump past the window only the last.
        d.record("x", "b", 1, OpState::Committed(1), 1);
        d.record("x", "b", 4, OpState::Committed(2), 2);
        assert_eq!(d.entries(), 4 + 2);
        d.record("x", "b", 1_000_000, OpState::Committed(3), 3);
        assert_eq!(d.entries(), 4 + 1);
        d.record("y", "c", 1, OpState::Committed(3), 3);
        // Three clients for a bound of two: "a", least recently used, is gone.
        assert_eq!(d.clients(), 2);
        assert_eq!(d.lookup("a", 6), Lookup::New);
        assert_eq!(d.last_op("c"), 1);
    }

    #[test]
    fn per_owner_bound_evicts_only_that_owners_ids() {
        let mut d = Dedup::new(limits(8, 100, 3, 1000));
        d.record("alice", "honest", 1, OpState::Committed(1), 1);
        for i in 0..50 {
            d.record("mallory", &format!("fake-{i}"), 1, OpState::Rejected, 0);
        }
        assert_eq!(d.clients(), 4);
        assert_eq!(
            d.lookup("honest", 1),
            Lookup::Known(OpState::Committed(1), 1)
        );
        assert_eq!(d.lookup("fake-49", 1), Lookup::Known(OpState::Rejected, 0));
        assert_eq!(d.lookup("fake-0", 1), Lookup::New);
    }

    #[test]
    fn an_imported_dump_decides_as_the_original() {
        let mut a = Dedup::new(limits(4, 3, 2, 100));
        for (owner, client, op) in [("x", "a", 1), ("x", "b", 2), ("y", "c", 1), ("x", "a", 9)] {
            a.record(owner, client, op, OpState::Committed(op), op);
        }
        a.record("y", "c", 2, OpState::Rejected, 0);
        let mut b = Dedup::new(limits(4, 3, 2, 100));
        b.import(a.export());
        assert_eq!((b.clients(), b.entries()), (a.clients(), a.entries()));
        // The same evictions follow: "b" is the least recently used.
        for d in [&mut a, &mut b] {
            d.record("z", "e", 1, OpState::Committed(20), 1);
        }
        for (client, op) in [("a", 9), ("a", 1), ("b", 2), ("c", 2), ("e", 1)] {
            assert_eq!(a.lookup(client, op), b.lookup(client, op), "{client} {op}");
        }
        assert_eq!(b.lookup("b", 2), Lookup::New);
        assert_eq!(b.lookup("a", 1), Lookup::Forgotten);
    }

    #[test]
    fn digest_is_stable() {
        assert_eq!(digest(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(digest(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
