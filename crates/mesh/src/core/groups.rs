//! Local clients and groups: subscriptions within limits, the interest this
//! clone announces to its neighbours, and group deletes (flooded once each,
//! remembered as bounded tombstones and re-sent to clones that were
//! unreachable).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;

use super::{Action, CloneFrame, ConnKey, Core, CoreEvent, LinkId, SubscribeError};

pub(super) struct Group {
    pub(super) data: Bytes,
    pub(super) explicit: bool,
    pub(super) members: BTreeSet<ConnKey>,
}

pub(super) struct Client {
    pub(super) id: String,
    pub(super) groups: BTreeSet<String>,
}

/// A group delete this clone knows: applied once, re-sent until `resend_until`.
pub(super) struct GroupTomb {
    key: (String, u64, u64),
    group: String,
    resend_until: Duration,
}

pub(super) struct GroupDeleteMsg {
    pub(super) origin: String,
    pub(super) origin_incarnation: u64,
    pub(super) msg_id: u64,
    pub(super) group: String,
}

/// Gives memory back once a map is down to a quarter of its capacity (so
/// a client that joined 100,000 groups and left leaves no large table
/// behind); amortised O(1) per removal.
fn shrink<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>) {
    if m.capacity() > 64 && m.len() < m.capacity() / 4 {
        m.shrink_to(m.len() * 2);
    }
}

impl Core {
    /// A local client connected.
    pub fn client_connected(&mut self, conn: ConnKey, client_id: &str) {
        self.clients.insert(
            conn,
            Client {
                id: client_id.to_string(),
                groups: BTreeSet::new(),
            },
        );
    }

    /// A local client went away; it leaves all its groups.
    pub fn client_gone(&mut self, conn: ConnKey) {
        if let Some(c) = self.clients.remove(&conn) {
            let groups: Vec<String> = c.groups.into_iter().collect();
            self.leave_groups(conn, &groups);
        }
        shrink(&mut self.clients);
    }

    /// Creates a group (or sets its data); it persists until deleted.
    pub fn create_group(&mut self, name: &str, data: Bytes) {
        let g = self
            .groups
            .entry(name.to_string())
            .or_insert_with(|| Group {
                data: Bytes::new(),
                explicit: true,
                members: BTreeSet::new(),
            });
        g.explicit = true;
        g.data = data;
    }

    /// [`Core::subscribe`] within the limits: refused, with nothing applied,
    /// when the client would be in more than
    /// [`CoreConfig::max_groups_per_client`] groups or the clone would have
    /// more than [`CoreConfig::max_groups`] groups. For subscriptions a peer
    /// asks for.
    ///
    /// [`CoreConfig::max_groups_per_client`]: super::CoreConfig::max_groups_per_client
    /// [`CoreConfig::max_groups`]: super::CoreConfig::max_groups
    pub fn try_subscribe(
        &mut self,
        conn: ConnKey,
        groups: &[String],
    ) -> Result<Vec<String>, SubscribeError> {
        let Some(client) = self.clients.get(&conn) else {
            return Ok(Vec::new());
        };
        let new: HashSet<&String> = groups
            .iter()
            .filter(|g| !client.groups.contains(*g))
            .collect();
        let limit = self.cfg.max_groups_per_client;
        if client.groups.len() + new.len() > limit {
            return Err(SubscribeError::TooManyForClient { limit });
        }
        let created = new
            .iter()
            .filter(|g| !self.groups.contains_key(**g))
            .count();
        let limit = self.cfg.max_groups;
        if created > 0 && self.groups.len() + created > limit {
            return Err(SubscribeError::TooManyGroups { limit });
        }
        Ok(self.subscribe(conn, groups))
    }

    /// Adds a local client to groups (created on the fly; such groups vanish
    /// with their last subscriber). Returns the groups it was not yet in.
    /// No limits: see [`Core::try_subscribe`].
    pub fn subscribe(&mut self, conn: ConnKey, groups: &[String]) -> Vec<String> {
        let mut added = Vec::new();
        let mut interest = Vec::new();
        let Some(client) = self.clients.get_mut(&conn) else {
            return added;
        };
        for name in groups {
            if !client.groups.insert(name.clone()) {
                continue;
            }
            added.push(name.clone());
            let g = self.groups.entry(name.clone()).or_insert_with(|| Group {
                data: Bytes::new(),
                explicit: false,
                members: BTreeSet::new(),
            });
            g.members.insert(conn);
            if g.members.len() == 1 {
                interest.push(name.clone());
            }
        }
        if !interest.is_empty() {
            self.send_interest(interest, Vec::new());
        }
        added
    }

    /// Removes a local client from groups.
    pub fn unsubscribe(&mut self, conn: ConnKey, groups: &[String]) {
        let mine: Vec<String> = match self.clients.get_mut(&conn) {
            Some(c) => groups
                .iter()
                .filter(|g| c.groups.remove(*g))
                .cloned()
                .collect(),
            None => return,
        };
        self.leave_groups(conn, &mine);
    }

    /// Deletes a group here and on every clone (once each): the delete is
    /// flooded now and re-sent to new links and in anti-entropy rounds for
    /// `group_tombstone_ttl`, so clones unreachable now apply it when they
    /// are reachable again.
    pub fn delete_group(&mut self, name: &str, now: Duration) {
        let me = self.cfg.id.clone();
        self.remove_group(name, &me);
        self.next_msg += 1;
        let msg = GroupDeleteMsg {
            origin: me,
            origin_incarnation: self.cfg.incarnation,
            msg_id: self.next_msg,
            group: name.to_string(),
        };
        self.remember_delete(&msg, now);
        self.flood_delete(msg, Vec::new());
        self.drive(now);
    }

    fn leave_groups(&mut self, conn: ConnKey, groups: &[String]) {
        let mut removed = Vec::new();
        for name in groups {
            if let Some(g) = self.groups.get_mut(name) {
                if g.members.remove(&conn) && g.members.is_empty() {
                    removed.push(name.clone());
                    if !g.explicit {
                        self.groups.remove(name);
                    }
                }
            }
        }
        shrink(&mut self.groups);
        if !removed.is_empty() {
            self.send_interest(Vec::new(), removed);
        }
    }

    pub(super) fn remove_group(&mut self, name: &str, origin: &str) {
        let existed = if let Some(g) = self.groups.remove(name) {
            for c in &g.members {
                if let Some(cl) = self.clients.get_mut(c) {
                    cl.groups.remove(name);
                }
            }
            if !g.members.is_empty() {
                self.send_interest(Vec::new(), vec![name.to_string()]);
            }
            true
        } else {
            false
        };
        if existed || origin == self.cfg.id {
            self.actions
                .push_back(Action::Event(CoreEvent::GroupDeleted {
                    group: name.to_string(),
                    origin: origin.to_string(),
                }));
        }
    }

    fn send_interest(&mut self, add: Vec<String>, remove: Vec<String>) {
        let links = self.established();
        if links.is_empty() {
            return;
        }
        self.actions.push_back(Action::Send {
            links,
            frame: CloneFrame::Interest {
                add,
                remove,
                full: false,
            },
        });
    }

    /// Records a group delete (applied here) for re-sending and to apply it once.
    pub(super) fn remember_delete(&mut self, msg: &GroupDeleteMsg, now: Duration) {
        let key = (msg.origin.clone(), msg.origin_incarnation, msg.msg_id);
        if !self.group_tomb_keys.insert(key.clone()) {
            return;
        }
        self.group_tombs.push_back(GroupTomb {
            key,
            group: msg.group.clone(),
            resend_until: now + self.cfg.group_tombstone_ttl,
        });
        while self.group_tombs.len() > self.cfg.max_group_tombstones.max(1) {
            if let Some(old) = self.group_tombs.pop_front() {
                self.group_tomb_keys.remove(&old.key);
            }
        }
    }

    /// Sends the group deletes still within their re-send time on `links`
    /// (receivers that know them drop them; the others apply and flood them).
    pub(super) fn resend_deletes(&mut self, links: Vec<LinkId>, now: Duration) {
        if links.is_empty() {
            return;
        }
        let me = self.cfg.id.clone();
        for t in self.group_tombs.iter().filter(|t| t.resend_until > now) {
            self.actions.push_back(Action::Send {
                links: links.clone(),
                frame: CloneFrame::GroupDelete {
                    origin: t.key.0.clone(),
                    origin_incarnation: t.key.1,
                    msg_id: t.key.2,
                    group: t.group.clone(),
                    seen: vec![me.clone()],
                },
            });
        }
    }

    pub(super) fn flood_delete(&mut self, msg: GroupDeleteMsg, seen: Vec<String>) {
        let mut targets = Vec::new();
        let mut s = seen.clone();
        s.push(self.cfg.id.clone());
        for (id, l) in &self.links {
            if l.established && !seen.contains(&l.peer) {
                targets.push(*id);
                s.push(l.peer.clone());
            }
        }
        if targets.is_empty() {
            return;
        }
        targets.sort_unstable();
        s.sort();
        s.dedup();
        self.actions.push_back(Action::Send {
            links: targets,
            frame: CloneFrame::GroupDelete {
                origin: msg.origin,
                origin_incarnation: msg.origin_incarnation,
                msg_id: msg.msg_id,
                group: msg.group,
                seen: s,
            },
        });
    }
}
