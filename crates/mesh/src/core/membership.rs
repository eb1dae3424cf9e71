//! Membership: the clone table and the links. Adding, deleting and leaving,
//! the one-link-per-pair rule when a link is accepted or welcomed, link
//! loss, up/down of each clone from direct evidence, forgetting the long
//! dead, and scheduling dials with capped, jittered backoff.

use std::collections::HashSet;
use std::time::Duration;

use transport::Backoff;

use super::{
    Action, CloneEntry, CloneFrame, Core, CoreError, CoreEvent, LinkId, LinkRefusal, PeerInfo,
};

pub(super) struct CloneRec {
    pub(super) url: String,
    pub(super) incarnation: u64,
    pub(super) configured: bool,
    pub(super) link: Option<LinkId>,
    pub(super) dial: Option<LinkId>,
    pub(super) next_dial: Duration,
    pub(super) backoff: Backoff,
    pub(super) up: bool,
    pub(super) down_since: Option<Duration>,
}

pub(super) struct LinkRec {
    pub(super) peer: String,
    pub(super) dialed_by_me: bool,
    pub(super) established: bool,
    /// The peer's full table and full interest have arrived.
    pub(super) synced: bool,
    pub(super) interest: HashSet<String>,
    pub(super) view: HashSet<String>,
}

pub(super) struct Tomb {
    pub(super) incarnation: u64,
    pub(super) until: Option<Duration>,
}

pub(super) fn new_rec(
    url: &str,
    incarnation: u64,
    configured: bool,
    now: Duration,
    backoff: Backoff,
) -> CloneRec {
    CloneRec {
        url: url.to_string(),
        incarnation,
        configured,
        link: None,
        dial: None,
        next_dial: now,
        backoff,
        up: false,
        down_since: Some(now),
    }
}

impl Core {
    /// Adds (or updates) a clone the user knows; it is dialed at once and
    /// never forgotten. Removes a deletion mark left by [`Core::delete_clone`].
    pub fn add_clone(&mut self, id: &str, url: &str, now: Duration) -> Result<(), CoreError> {
        if id.is_empty() {
            return Err(CoreError::EmptyId);
        }
        if id == self.cfg.id {
            return Err(CoreError::AddSelf);
        }
        self.tombs.remove(id);
        let backoff = self.backoff();
        match self.clones.get_mut(id) {
            Some(rec) => {
                rec.configured = true;
                if !url.is_empty() && rec.url != url {
                    rec.url = url.to_string();
                }
                if rec.link.is_none() {
                    rec.next_dial = now;
                    rec.backoff.reset();
                }
            }
            None => {
                self.clones
                    .insert(id.to_string(), new_rec(url, 0, true, now, backoff));
                self.actions
                    .push_back(Action::Event(CoreEvent::CloneLearned(id.to_string())));
            }
        }
        self.drive(now);
        Ok(())
    }

    /// Deletes a clone: its link is closed, it is no longer dialed, and this
    /// incarnation of it is refused and ignored in gossip until it is added
    /// again with [`Core::add_clone`] or shows up with a higher incarnation
    /// (it restarted) through an authenticated neighbour or its own dial.
    pub fn delete_clone(&mut self, id: &str, now: Duration) -> bool {
        let Some(rec) = self.clones.get(id) else {
            return false;
        };
        // never linked: its incarnation is unknown, refuse every incarnation
        let inc = if rec.incarnation == 0 {
            u64::MAX
        } else {
            rec.incarnation
        };
        self.remove_clone(id, now);
        self.tombs.insert(
            id.to_string(),
            Tomb {
                incarnation: inc,
                until: None,
            },
        );
        self.drive(now);
        true
    }

    /// Graceful stop: tells every neighbour that this clone is gone. The
    /// caller closes the links afterwards.
    pub fn leave(&mut self, now: Duration) {
        self.left = true;
        let me = self.self_entry(true);
        let links = self.established();
        if !links.is_empty() {
            self.actions.push_back(Action::Send {
                links,
                frame: CloneFrame::Gossip {
                    entries: vec![me],
                    full: false,
                },
            });
        }
        let _ = now;
    }

    /// Closes every link (for example to reconnect with new credentials); the
    /// clones are redialed at once.
    pub fn reset_links(&mut self, now: Duration) {
        let ids: Vec<LinkId> = self.links.keys().copied().collect();
        for l in ids {
            self.drop_link(l, now, true);
            self.actions.push_back(Action::Close {
                link: l,
                reason: LinkRefusal::Unwanted,
            });
        }
        for rec in self.clones.values_mut() {
            rec.next_dial = now;
            rec.backoff.reset();
        }
        self.drive(now);
    }

    /// An authenticated clone says hello on an accepted link. On `Ok` the
    /// caller sends `Welcome`, then the queued actions (which include the full
    /// table and interest for this link).
    pub fn accept(
        &mut self,
        link: LinkId,
        peer: PeerInfo,
        now: Duration,
    ) -> Result<(), LinkRefusal> {
        let r = self.check_new_link(&peer, false, now);
        if let Err(reason) = r {
            self.actions
                .push_back(Action::Event(CoreEvent::LinkRefused {
                    peer: peer.id.clone(),
                    reason,
                }));
            return Err(reason);
        }
        self.establish(link, peer, false, now);
        self.drive(now);
        Ok(())
    }

    /// The clone dialed with `link` welcomed us. On `Err` the core has queued
    /// a [`Action::Close`] for the link.
    pub fn dial_ok(
        &mut self,
        link: LinkId,
        peer: PeerInfo,
        now: Duration,
    ) -> Result<(), LinkRefusal> {
        let expected = match self.links.get(&link) {
            Some(l) if !l.established => l.peer.clone(),
            _ => {
                self.actions.push_back(Action::Close {
                    link,
                    reason: LinkRefusal::Unwanted,
                });
                return Err(LinkRefusal::Unwanted);
            }
        };
        self.links.remove(&link);
        if let Some(rec) = self.clones.get_mut(&expected) {
            if rec.dial == Some(link) {
                rec.dial = None;
            }
        }
        let result = if peer.id != expected {
            if let Some(rec) = self.clones.get_mut(&expected) {
                rec.next_dial = now + self.cfg.reconnect_max;
            }
            Err(LinkRefusal::WrongId)
        } else if !self.clones.contains_key(&expected) {
            Err(LinkRefusal::Unwanted)
        } else {
            self.check_new_link(&peer, true, now)
        };
        match result {
            Ok(()) => {
                self.establish(link, peer, true, now);
                self.drive(now);
                Ok(())
            }
            Err(reason) => {
                self.actions
                    .push_back(Action::Event(CoreEvent::LinkRefused {
                        peer: peer.id,
                        reason,
                    }));
                self.actions.push_back(Action::Close { link, reason });
                self.drive(now);
                Err(reason)
            }
        }
    }

    /// A link (established or still dialing) is over: closed by the peer,
    /// broken, refused, or the dial failed.
    pub fn link_down(&mut self, link: LinkId, now: Duration) {
        self.drop_link(link, now, false);
        self.drive(now);
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `[0, 1)` from the seeded generator: the jitter of a
    /// redial delay.
    fn unit(&mut self) -> f64 {
        (self.rand() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A fresh redial policy for one clone.
    pub(super) fn backoff(&self) -> Backoff {
        Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max)
    }

    pub(super) fn established(&self) -> Vec<LinkId> {
        let mut v: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.established)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    pub(super) fn tombstoned(&self, id: &str, incarnation: u64) -> bool {
        self.tombs
            .get(id)
            .is_some_and(|t| incarnation <= t.incarnation)
    }

    /// Decides whether a new link with `peer` (dialed by me or not) may be
    /// established; closes an existing link it replaces.
    fn check_new_link(
        &mut self,
        peer: &PeerInfo,
        dialed_by_me: bool,
        now: Duration,
    ) -> Result<(), LinkRefusal> {
        if peer.id == self.cfg.id {
            return Err(LinkRefusal::SelfLink);
        }
        if peer.id.is_empty() {
            return Err(LinkRefusal::WrongId);
        }
        if self.tombstoned(&peer.id, peer.incarnation) {
            return Err(LinkRefusal::Deleted);
        }
        if self.left {
            return Err(LinkRefusal::Unwanted);
        }
        let me_lower = self.cfg.id < peer.id;
        let Some(rec) = self.clones.get(&peer.id) else {
            return Ok(());
        };
        let newer = peer.incarnation > rec.incarnation && rec.incarnation != 0;
        if let Some(existing) = rec.link {
            let ex_by_me = self.links.get(&existing).is_some_and(|l| l.dialed_by_me);
            let keep_existing = if newer || ex_by_me == dialed_by_me {
                false
            } else {
                // the link dialed by the lower id wins
                ex_by_me == me_lower
            };
            if keep_existing {
                return Err(LinkRefusal::Duplicate);
            }
            self.drop_link(existing, now, true);
            self.actions.push_back(Action::Close {
                link: existing,
                reason: LinkRefusal::Duplicate,
            });
        }
        if !dialed_by_me {
            if let Some(dial) = self.clones.get(&peer.id).and_then(|r| r.dial) {
                if me_lower && !newer {
                    // my dial wins; the peer will accept it
                    return Err(LinkRefusal::Duplicate);
                }
                // the peer's dial wins: forget mine (if it is welcomed anyway,
                // dial_ok sees the established link and refuses it)
                if let Some(rec) = self.clones.get_mut(&peer.id) {
                    rec.dial = None;
                }
                let _ = dial;
            }
        }
        Ok(())
    }

    fn establish(&mut self, link: LinkId, peer: PeerInfo, dialed_by_me: bool, now: Duration) {
        let backoff = self.backoff();
        self.tombs.remove(&peer.id);
        let learned = !self.clones.contains_key(&peer.id);
        let rec = self
            .clones
            .entry(peer.id.clone())
            .or_insert_with(|| new_rec(&peer.url, peer.incarnation, false, now, backoff));
        if !peer.url.is_empty() {
            rec.url = peer.url.clone();
        }
        rec.incarnation = peer.incarnation;
        rec.link = Some(link);
        rec.backoff.reset();
        self.links.insert(
            link,
            LinkRec {
                peer: peer.id.clone(),
                dialed_by_me,
                established: true,
                synced: false,
                interest: HashSet::new(),
                view: HashSet::new(),
            },
        );
        self.direct_cache = None;
        if learned {
            self.actions
                .push_back(Action::Event(CoreEvent::CloneLearned(peer.id.clone())));
        }
        // the newcomer gets our whole table and our interest
        let entries = self.full_table();
        self.actions.push_back(Action::Send {
            links: vec![link],
            frame: CloneFrame::Gossip {
                entries,
                full: true,
            },
        });
        let add: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| !g.members.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        self.actions.push_back(Action::Send {
            links: vec![link],
            frame: CloneFrame::Interest {
                add,
                remove: Vec::new(),
                full: true,
            },
        });
        // group deletes it may have missed while unreachable
        self.resend_deletes(vec![link], now);
        self.pushed.insert(peer.id.clone());
        self.refresh(&peer.id, now);
    }

    /// Forgets a link. `quiet`: no redial scheduling (replaced or reset).
    fn drop_link(&mut self, link: LinkId, now: Duration, quiet: bool) {
        let Some(l) = self.links.remove(&link) else {
            return;
        };
        self.direct_cache = None;
        let jitter = self.unit();
        if let Some(rec) = self.clones.get_mut(&l.peer) {
            if rec.link == Some(link) {
                rec.link = None;
                if !quiet {
                    rec.next_dial = now + rec.backoff.next_delay(jitter);
                }
                self.pushed.insert(l.peer.clone());
            } else if rec.dial == Some(link) {
                rec.dial = None;
                rec.next_dial = now + rec.backoff.next_delay(jitter);
            }
        }
        if l.established {
            let peer = l.peer.clone();
            for id in l.view {
                self.refresh(&id, now);
            }
            self.refresh(&peer, now);
        }
    }

    /// Recomputes up/down of a clone and emits events.
    pub(super) fn refresh(&mut self, id: &str, now: Duration) {
        let Some(rec) = self.clones.get(id) else {
            return;
        };
        let up = rec.link.is_some()
            || self
                .links
                .values()
                .any(|l| l.established && l.view.contains(id));
        let rec = match self.clones.get_mut(id) {
            Some(r) => r,
            None => return,
        };
        if up == rec.up {
            return;
        }
        rec.up = up;
        if up {
            rec.down_since = None;
            self.actions
                .push_back(Action::Event(CoreEvent::CloneUp(id.to_string())));
        } else {
            rec.down_since = Some(now);
            self.actions
                .push_back(Action::Event(CoreEvent::CloneDown(id.to_string())));
        }
    }

    pub(super) fn remove_clone(&mut self, id: &str, now: Duration) {
        let Some(rec) = self.clones.remove(id) else {
            return;
        };
        for l in [rec.link, rec.dial].into_iter().flatten() {
            if self.links.remove(&l).is_some() {
                self.actions.push_back(Action::Close {
                    link: l,
                    reason: LinkRefusal::Unwanted,
                });
            }
        }
        self.direct_cache = None;
        self.origins.remove(id);
        for l in self.links.values_mut() {
            l.view.remove(id);
        }
        if rec.link.is_some() {
            self.pushed.insert(id.to_string());
        }
        self.actions
            .push_back(Action::Event(CoreEvent::CloneForgotten(id.to_string())));
        let _ = now;
    }

    /// Pushes table changes, starts due dials, forgets the long dead.
    pub(super) fn drive(&mut self, now: Duration) {
        // forget learned clones that stayed down too long
        let forget: Vec<String> = self
            .clones
            .iter()
            .filter(|(_, r)| {
                !r.configured
                    && r.down_since
                        .is_some_and(|s| now >= s + self.cfg.forget_after)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for id in forget {
            // rows marked up (direct evidence) may bring it back later
            self.remove_clone(&id, now);
        }
        self.tombs.retain(|_, t| t.until.is_none_or(|u| u > now));
        // push changes of our direct links (and gone rows) at once
        if !self.left && (!self.pushed.is_empty() || !self.gone_push.is_empty()) {
            let ids: Vec<String> = std::mem::take(&mut self.pushed).into_iter().collect();
            let mut entries: Vec<CloneEntry> = ids
                .iter()
                .map(|id| {
                    self.entry(id).unwrap_or_else(|| CloneEntry {
                        id: id.clone(),
                        url: String::new(),
                        incarnation: 0,
                        up: false,
                        gone: false,
                    })
                })
                .collect();
            entries.append(&mut self.gone_push);
            let links = self.established();
            if !links.is_empty() {
                self.actions.push_back(Action::Send {
                    links,
                    frame: CloneFrame::Gossip {
                        entries,
                        full: false,
                    },
                });
            }
        }
        // dials
        if self.left {
            return;
        }
        let due: Vec<String> = self
            .clones
            .iter()
            .filter(|(_, r)| {
                r.link.is_none() && r.dial.is_none() && !r.url.is_empty() && r.next_dial <= now
            })
            .map(|(k, _)| k.clone())
            .collect();
        for id in due {
            let link = self.new_link_id();
            let Some(rec) = self.clones.get_mut(&id) else {
                continue;
            };
            rec.dial = Some(link);
            let url = rec.url.clone();
            self.links.insert(
                link,
                LinkRec {
                    peer: id.clone(),
                    dialed_by_me: true,
                    established: false,
                    synced: false,
                    interest: HashSet::new(),
                    view: HashSet::new(),
                },
            );
            self.actions.push_back(Action::Dial {
                link,
                peer: id,
                url,
            });
        }
    }
}
