//! Gossip: the rows this clone sends about itself and the clones it knows,
//! and merging the rows a neighbour sends (learning clones, gone clones,
//! the neighbour's view of who it is linked to).

use std::time::Duration;

use super::membership::{new_rec, Tomb};
use super::{Action, CloneEntry, Core, CoreEvent, LinkId};

impl Core {
    pub(super) fn self_entry(&self, gone: bool) -> CloneEntry {
        CloneEntry {
            id: self.cfg.id.clone(),
            url: self.cfg.url.clone(),
            incarnation: self.cfg.incarnation,
            up: !gone,
            gone,
        }
    }

    pub(super) fn entry(&self, id: &str) -> Option<CloneEntry> {
        self.clones.get(id).map(|r| CloneEntry {
            id: id.to_string(),
            url: r.url.clone(),
            incarnation: r.incarnation,
            up: r.link.is_some(),
            gone: false,
        })
    }

    pub(super) fn full_table(&self) -> Vec<CloneEntry> {
        let mut v = vec![self.self_entry(false)];
        v.extend(self.clones.keys().filter_map(|id| self.entry(id)));
        v
    }

    pub(super) fn on_gossip(
        &mut self,
        link: LinkId,
        entries: Vec<CloneEntry>,
        full: bool,
        now: Duration,
    ) {
        let mut touched: Vec<String> = Vec::new();
        let old_view = if full {
            self.links
                .get_mut(&link)
                .map(|l| std::mem::take(&mut l.view))
        } else {
            None
        };
        self.direct_cache = None;
        for e in entries {
            if e.id == self.cfg.id || e.id.is_empty() {
                continue;
            }
            if e.gone {
                let known_inc = self.clones.get(&e.id).map(|r| r.incarnation);
                let applies = match known_inc {
                    Some(k) => e.incarnation >= k,
                    None => false,
                };
                if let Some(l) = self.links.get_mut(&link) {
                    l.view.remove(&e.id);
                }
                if applies {
                    let configured = self.clones.get(&e.id).is_some_and(|r| r.configured);
                    if configured {
                        // keep the user's row and keep dialing: a restart
                        // (higher incarnation) is welcome again
                        if let Some(rec) = self.clones.get_mut(&e.id) {
                            rec.incarnation = e.incarnation;
                            rec.next_dial = now + self.cfg.reconnect_max;
                        }
                        touched.push(e.id.clone());
                    } else {
                        self.remove_clone(&e.id, now);
                    }
                    self.tombs.insert(
                        e.id.clone(),
                        Tomb {
                            incarnation: e.incarnation,
                            until: Some(now + self.cfg.forget_after),
                        },
                    );
                    self.gone_push.push(e);
                }
                continue;
            }
            if self.tombstoned(&e.id, e.incarnation) {
                continue;
            }
            let changed = match self.links.get_mut(&link) {
                Some(l) => {
                    let was = match &old_view {
                        Some(v) => v.contains(&e.id),
                        None => l.view.contains(&e.id),
                    };
                    if e.up {
                        l.view.insert(e.id.clone());
                    } else {
                        l.view.remove(&e.id);
                    }
                    was != e.up
                }
                None => false,
            };
            if changed || !self.clones.contains_key(&e.id) {
                touched.push(e.id.clone());
            }
            match self.clones.get_mut(&e.id) {
                None => {
                    if e.up {
                        self.tombs.remove(&e.id);
                        let backoff = self.backoff();
                        self.clones.insert(
                            e.id.clone(),
                            new_rec(&e.url, e.incarnation, false, now, backoff),
                        );
                        self.actions
                            .push_back(Action::Event(CoreEvent::CloneLearned(e.id.clone())));
                    }
                }
                Some(rec) => {
                    if e.incarnation > rec.incarnation || (rec.url.is_empty() && !e.url.is_empty())
                    {
                        if !e.url.is_empty() {
                            rec.url = e.url.clone();
                        }
                        rec.incarnation = rec.incarnation.max(e.incarnation);
                    }
                }
            }
        }
        if let (Some(old), Some(l)) = (old_view, self.links.get(&link)) {
            touched.extend(old.into_iter().filter(|id| !l.view.contains(id)));
        }
        for id in touched {
            self.refresh(&id, now);
        }
    }
}
