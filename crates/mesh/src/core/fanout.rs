//! Fan-out of group messages: publishing, the duplicate window per origin,
//! choosing between direct sends to interested neighbours and relayed
//! flooding, and delivery to local clients.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;

use super::dedup::Window;
use super::groups::Client;
use super::{Action, CloneFrame, ConnKey, Core, GroupMsg, LinkId, Target};

pub(super) struct OriginWindow {
    incarnation: u64,
    window: Window,
}

impl Core {
    /// Publishes a message: delivered to local subscribers (except `exclude`,
    /// a local client, when given) and sent into the mesh. `groups` is ignored
    /// when `all`. Returns the message id.
    pub fn publish(
        &mut self,
        from: Option<ConnKey>,
        groups: Vec<String>,
        all: bool,
        not_to_me: bool,
        data: Bytes,
    ) -> u64 {
        self.next_msg += 1;
        self.stats.published += 1;
        let from_id = from
            .and_then(|c| self.clients.get(&c))
            .map(|c| c.id.clone())
            .unwrap_or_default();
        let exclude = if not_to_me { from } else { None };
        let msg = Arc::new(GroupMsg {
            origin: self.cfg.id.clone(),
            origin_incarnation: self.cfg.incarnation,
            msg_id: self.next_msg,
            groups,
            all,
            exclude_client: if not_to_me {
                from_id.clone()
            } else {
                String::new()
            },
            from: from_id,
            data,
        });
        self.deliver_local(&msg, exclude);
        self.forward(msg, Vec::new(), None);
        self.next_msg
    }

    fn fresh(&mut self, origin: &str, incarnation: u64, msg_id: u64) -> bool {
        let size = self.cfg.dedup_window;
        match self.origins.get_mut(origin) {
            Some(o) if o.incarnation == incarnation => o.window.insert(msg_id),
            Some(o) if o.incarnation > incarnation => false,
            _ => {
                let mut window = Window::new(size);
                window.insert(msg_id);
                self.origins.insert(
                    origin.to_string(),
                    OriginWindow {
                        incarnation,
                        window,
                    },
                );
                true
            }
        }
    }

    pub(super) fn on_forward(
        &mut self,
        link: LinkId,
        msg: Arc<GroupMsg>,
        seen: Vec<String>,
        relay: bool,
    ) {
        if msg.origin == self.cfg.id || !self.fresh(&msg.origin, msg.origin_incarnation, msg.msg_id)
        {
            self.stats.duplicates += 1;
            return;
        }
        self.stats.forwarded_in += 1;
        self.deliver_local(&msg, None);
        if relay {
            self.forward(msg, seen, Some(link));
        }
    }

    /// Whether every neighbour's links are a subset of ours.
    fn direct_ok(&mut self) -> bool {
        if let Some(d) = self.direct_cache {
            return d;
        }
        let me = &self.cfg.id;
        let ok = self.links.values().filter(|l| l.established).all(|l| {
            l.synced
                && l.view
                    .iter()
                    .all(|x| x == me || self.clones.get(x).is_some_and(|r| r.link.is_some()))
        });
        self.direct_cache = Some(ok);
        ok
    }

    fn forward(&mut self, msg: Arc<GroupMsg>, seen: Vec<String>, from: Option<LinkId>) {
        if self.links.is_empty() {
            return;
        }
        let direct = self.direct_ok();
        let mut targets: Vec<LinkId> = Vec::new();
        let mut covered: Vec<String> = Vec::new();
        for (id, l) in &self.links {
            if !l.established || Some(*id) == from || seen.contains(&l.peer) {
                continue;
            }
            if !direct {
                covered.push(l.peer.clone());
                targets.push(*id);
                continue;
            }
            let wanted = if msg.all {
                !l.interest.is_empty()
            } else {
                msg.groups.iter().any(|g| l.interest.contains(g))
            };
            if wanted {
                targets.push(*id);
            }
        }
        if targets.is_empty() {
            return;
        }
        targets.sort_unstable();
        let frame = if direct {
            CloneFrame::Forward {
                msg,
                seen: Vec::new(),
                relay: false,
            }
        } else {
            let mut s = seen;
            s.push(self.cfg.id.clone());
            s.extend(covered);
            if let Some(l) = from.and_then(|f| self.links.get(&f)) {
                s.push(l.peer.clone());
            }
            s.sort();
            s.dedup();
            CloneFrame::Forward {
                msg,
                seen: s,
                relay: true,
            }
        };
        self.actions.push_back(Action::Send {
            links: targets,
            frame,
        });
    }

    fn deliver_local(&mut self, msg: &Arc<GroupMsg>, exclude: Option<ConnKey>) {
        let mut targets = Vec::new();
        let mut group_of = Vec::new();
        let excluded = |c: ConnKey, clients: &HashMap<ConnKey, Client>| -> bool {
            if exclude == Some(c) {
                return true;
            }
            !msg.exclude_client.is_empty()
                && exclude.is_none()
                && clients
                    .get(&c)
                    .is_some_and(|cl| cl.id == msg.exclude_client)
        };
        if msg.all {
            // each subscribed client once, for its first group: O(clients),
            // with the group's index found in a map (a search of `group_of`
            // made it O(clients × groups))
            let mut keys: Vec<&ConnKey> = self.clients.keys().collect();
            keys.sort_unstable();
            let mut index: HashMap<&str, usize> = HashMap::new();
            for c in keys {
                let cl = &self.clients[c];
                if let Some(first) = cl.groups.iter().next() {
                    if excluded(*c, &self.clients) {
                        continue;
                    }
                    let idx = *index.entry(first.as_str()).or_insert_with(|| {
                        group_of.push(first.clone());
                        group_of.len() - 1
                    });
                    targets.push(Target {
                        conn: *c,
                        group: idx,
                    });
                }
            }
        } else if msg.groups.len() == 1 {
            if let Some(g) = self.groups.get(&msg.groups[0]) {
                for c in &g.members {
                    if !excluded(*c, &self.clients) {
                        targets.push(Target { conn: *c, group: 0 });
                    }
                }
            }
        } else {
            let mut done: HashSet<ConnKey> = HashSet::new();
            for (i, name) in msg.groups.iter().enumerate() {
                if let Some(g) = self.groups.get(name) {
                    for c in &g.members {
                        if !excluded(*c, &self.clients) && done.insert(*c) {
                            targets.push(Target { conn: *c, group: i });
                        }
                    }
                }
            }
        }
        if targets.is_empty() {
            return;
        }
        self.stats.delivered += targets.len() as u64;
        self.actions.push_back(Action::Deliver {
            msg: msg.clone(),
            targets,
            group_of,
        });
    }
}
