//! Introspection: counters and read-only views of clones, groups and links
//! for status pages, the event stream and tests.

use super::{CloneInfo, ConnKey, Core, CoreStats, GroupInfo, LinkId};

impl Core {
    /// Counters.
    pub fn stats(&self) -> CoreStats {
        self.stats
    }

    /// Every known clone (not this one).
    pub fn clones(&self) -> Vec<CloneInfo> {
        self.clones
            .iter()
            .map(|(id, r)| CloneInfo {
                id: id.clone(),
                url: r.url.clone(),
                incarnation: r.incarnation,
                up: r.up,
                linked: r.link.is_some(),
                configured: r.configured,
            })
            .collect()
    }

    /// Local groups.
    pub fn groups(&self) -> Vec<GroupInfo> {
        let mut v: Vec<GroupInfo> = self
            .groups
            .iter()
            .map(|(n, g)| GroupInfo {
                name: n.clone(),
                data: g.data.clone(),
                subscribers: g.members.len(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Local members of a group.
    pub fn group_members(&self, name: &str) -> Vec<ConnKey> {
        self.groups
            .get(name)
            .map(|g| g.members.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Up to `limit` local groups (any of them; sorted by name), for a
    /// status page: O(limit), not O(groups).
    pub fn some_groups(&self, limit: usize) -> Vec<GroupInfo> {
        let mut v: Vec<GroupInfo> = self
            .groups
            .iter()
            .take(limit)
            .map(|(n, g)| GroupInfo {
                name: n.clone(),
                data: g.data.clone(),
                subscribers: g.members.len(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Number of groups on this clone (cheap).
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// Number of local clients (cheap).
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// The groups of a local client.
    pub fn client_groups(&self, conn: ConnKey) -> Vec<String> {
        self.clients
            .get(&conn)
            .map(|c| c.groups.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The peer clone of an established link.
    pub fn link_peer(&self, link: LinkId) -> Option<&str> {
        self.links
            .get(&link)
            .filter(|l| l.established)
            .map(|l| l.peer.as_str())
    }

    /// Number of links (established and dialing).
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Number of group deletes remembered (bounded by `max_group_tombstones`).
    pub fn group_tombstone_count(&self) -> usize {
        self.group_tombs.len()
    }

    /// Number of origins with a duplicate window (bounded by known clones).
    pub fn origin_count(&self) -> usize {
        self.origins.len()
    }
}
