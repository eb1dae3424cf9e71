//! The sans-IO core of a clone: clone table, gossip merge, link dedup, group
//! interest, exactly-once fan-out and group delete propagation.
//!
//! [`Core`] holds no sockets, spawns no tasks and never reads a clock: every
//! method takes `now` (a [`Duration`] since an arbitrary epoch chosen by the
//! caller) and queues [`Action`]s that the caller takes with
//! [`Core::poll_action`]. The runtime ([`crate::Server`]) moves the bytes; the
//! deterministic simulation in `tests/sim.rs` drives many cores on a simulated
//! clock.
//!
//! # Rules implemented here
//!
//! * **Membership.** Each clone is known by id, url and incarnation. A clone is
//!   *up* when this clone has an established link to it, or when a linked
//!   neighbour's latest gossip says that *it* is linked to it (direct evidence
//!   only, so dead clones cannot be kept alive by rumours going round in
//!   circles). A clone that is down for `forget_after` is forgotten, unless the
//!   user added it with [`Core::add_clone`] (configured clones are kept and
//!   redialed with capped backoff). New clones are learned only from entries
//!   marked up.
//! * **Gossip.** On link establishment both sides send their full table; every
//!   change of a direct link is pushed at once to all neighbours; every
//!   `gossip_interval` a full table goes to every neighbour (anti-entropy).
//! * **One link per pair.** When two clones dial each other at once, the link
//!   dialed by the lower id wins; the other is refused during the handshake,
//!   before any frame is exchanged on it.
//! * **Fan-out.** Each message carries origin, origin incarnation and message
//!   id; every clone keeps a bounded window per origin and drops what it has
//!   seen. When every neighbour's links are a subset of ours (the mesh is a
//!   full mesh as far as we know) a message goes only to neighbours with
//!   interest in its groups and is not relayed; otherwise it is flooded to all
//!   neighbours not yet covered, with the list of covered clones, and relayed.
//!
//! # Layout
//!
//! One concern per file, each with its own `impl Core` block over the one
//! state struct: this file holds [`Core`], [`CoreConfig`], the types the core
//! takes and hands out, frame dispatch ([`Core::on_frame`]) and timers
//! ([`Core::tick`]); `membership.rs` the clone table and links (add, delete,
//! leave, one link per pair, up/down, forgetting, dial scheduling);
//! `gossip.rs` table rows and their merge; `fanout.rs` publish, forward,
//! relay and local delivery; `dedup.rs` the window per origin; `groups.rs`
//! clients, subscriptions, interest and group deletes with their
//! tombstones; `introspection.rs` counters and read-only views.

mod dedup;
mod fanout;
mod gossip;
mod groups;
mod introspection;
mod membership;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fanout::OriginWindow;
use groups::{Client, Group, GroupDeleteMsg, GroupTomb};
use membership::{CloneRec, LinkRec, Tomb};

/// Identifies one link (clone-to-clone connection) inside a [`Core`].
pub type LinkId = u64;

/// Identifies one local client connection inside a [`Core`] (chosen by the caller).
pub type ConnKey = u64;

/// Configuration of a [`Core`].
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// This clone's id.
    pub id: String,
    /// The url this clone announces (empty: peers cannot dial back).
    pub url: String,
    /// This clone's incarnation; must grow across restarts.
    pub incarnation: u64,
    /// Period of full anti-entropy gossip rounds.
    pub gossip_interval: Duration,
    /// How long a clone may stay down before it is forgotten (learned clones only).
    pub forget_after: Duration,
    /// First redial delay after a failure.
    pub reconnect_min: Duration,
    /// Largest redial delay.
    pub reconnect_max: Duration,
    /// Size of the duplicate window per origin (message ids).
    pub dedup_window: u64,
    /// How long a group delete is re-sent (to every new link and in every
    /// anti-entropy round) after this clone learned it, so that clones that
    /// were unreachable when it happened still apply it.
    pub group_tombstone_ttl: Duration,
    /// How many group deletes a clone remembers (applied once each; the
    /// oldest are dropped first).
    pub max_group_tombstones: usize,
    /// Seed of the jitter generator.
    pub seed: u64,
    /// Groups one local client may be in ([`Core::try_subscribe`]).
    pub max_groups_per_client: usize,
    /// Groups this clone may have ([`Core::try_subscribe`] does not create
    /// more; [`Core::create_group`] and [`Core::subscribe`], the
    /// application's, may).
    pub max_groups: usize,
}

impl CoreConfig {
    /// A configuration with the defaults: gossip every 2 s, forget after 30 s,
    /// redial between 50 ms and 5 s, a window of 65,536 message ids, group
    /// deletes re-sent for 5 minutes and 4,096 of them remembered, 1,000
    /// groups per client and 100,000 groups per clone.
    pub fn new(id: impl Into<String>, url: impl Into<String>, incarnation: u64) -> Self {
        CoreConfig {
            id: id.into(),
            url: url.into(),
            incarnation,
            gossip_interval: Duration::from_secs(2),
            forget_after: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(5),
            dedup_window: 1 << 16,
            group_tombstone_ttl: Duration::from_secs(300),
            max_group_tombstones: 4096,
            seed: incarnation ^ 0x9e37_79b9_7f4a_7c15,
            max_groups_per_client: 1000,
            max_groups: 100_000,
        }
    }
}

/// What a peer said about itself in its `Hello` or `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's clone id.
    pub id: String,
    /// The url the peer announces (may be empty).
    pub url: String,
    /// The peer's incarnation.
    pub incarnation: u64,
}

/// Why a core refused a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkRefusal {
    /// The peer claims this clone's own id.
    #[error("the peer uses this clone's own id")]
    SelfLink,
    /// The peer was deleted with `delete_clone` (or has left) and has not restarted since.
    #[error("the peer was deleted on this clone")]
    Deleted,
    /// A link with this peer exists or is being dialed and wins.
    #[error("a link with this peer already exists")]
    Duplicate,
    /// The dialed url answered with another id than expected.
    #[error("the dialed url belongs to another clone id")]
    WrongId,
    /// The dial is no longer wanted (the clone was deleted or forgotten meanwhile).
    #[error("the dial is no longer wanted")]
    Unwanted,
}

/// Why [`Core::try_subscribe`] refused a subscription (nothing of it was
/// applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The client would be in more groups than it may be.
    #[error("a client may be in at most {limit} groups")]
    TooManyForClient {
        /// [`CoreConfig::max_groups_per_client`].
        limit: usize,
    },
    /// The clone would have more groups than it may have.
    #[error("this clone has its maximum of {limit} groups")]
    TooManyGroups {
        /// [`CoreConfig::max_groups`].
        limit: usize,
    },
}

/// Errors of core commands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// `add_clone` with this clone's own id.
    #[error("a clone cannot add itself")]
    AddSelf,
    /// An empty clone id.
    #[error("clone id must not be empty")]
    EmptyId,
}

/// One row of gossip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneEntry {
    /// Clone id.
    pub id: String,
    /// Its url.
    pub url: String,
    /// Its incarnation.
    pub incarnation: u64,
    /// The sender is linked to it (or it is the sender).
    pub up: bool,
    /// The clone has left (graceful stop).
    pub gone: bool,
}

/// A group message as it travels through the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMsg {
    /// Clone where the message entered the mesh.
    pub origin: String,
    /// Incarnation of the origin.
    pub origin_incarnation: u64,
    /// Message id at the origin (1, 2, 3, ...).
    pub msg_id: u64,
    /// Target groups (ignored when `all`).
    pub groups: Vec<String>,
    /// Deliver to every client that is in at least one group.
    pub all: bool,
    /// Client id that must not receive it (empty: none).
    pub exclude_client: String,
    /// Publishing client id (empty: the server).
    pub from: String,
    /// Payload.
    pub data: Bytes,
}

/// A clone-level frame, in domain terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloneFrame {
    /// Clone table rows.
    Gossip {
        /// Rows.
        entries: Vec<CloneEntry>,
        /// The rows are the sender's whole table.
        full: bool,
    },
    /// A group message.
    Forward {
        /// The message.
        msg: Arc<GroupMsg>,
        /// Clones already covered (relayed messages only).
        seen: Vec<String>,
        /// The receiver should pass it on to its neighbours not in `seen`.
        relay: bool,
    },
    /// Delete a group everywhere.
    GroupDelete {
        /// Origin clone.
        origin: String,
        /// Origin incarnation.
        origin_incarnation: u64,
        /// Message id at the origin (same id space as group messages).
        msg_id: u64,
        /// The group.
        group: String,
        /// Clones already covered.
        seen: Vec<String>,
    },
    /// Groups the sender has local subscribers for.
    Interest {
        /// Groups added.
        add: Vec<String>,
        /// Groups removed.
        remove: Vec<String>,
        /// `add` is the whole set.
        full: bool,
    },
}

/// Something that happened in the core, for the event stream and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoreEvent {
    /// A clone became known.
    CloneLearned(String),
    /// A clone became reachable.
    CloneUp(String),
    /// A clone became unreachable.
    CloneDown(String),
    /// A clone was forgotten (down too long, deleted or gone).
    CloneForgotten(String),
    /// A link was refused or dropped by the core's rules.
    LinkRefused {
        /// The peer.
        peer: String,
        /// Why.
        reason: LinkRefusal,
    },
    /// A group was deleted (locally or by a remote clone).
    GroupDeleted {
        /// The group.
        group: String,
        /// The clone that deleted it.
        origin: String,
    },
}

/// Where a local delivery goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The local client connection.
    pub conn: ConnKey,
    /// Index into the message's `groups` of the group the client gets it for
    /// (for `all` messages, the group is [`Action::Deliver::group_of`]).
    pub group: usize,
}

/// What the caller must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Dial `url`, expecting clone `peer`; report with [`Core::dial_ok`] /
    /// [`Core::link_down`] using `link`.
    Dial {
        /// The link id to use.
        link: LinkId,
        /// Expected clone id.
        peer: String,
        /// Where.
        url: String,
    },
    /// Send a frame on each of these links.
    Send {
        /// The links.
        links: Vec<LinkId>,
        /// The frame.
        frame: CloneFrame,
    },
    /// Close a link (orderly: what is queued is still sent). The core has
    /// already forgotten it; no `link_down` is needed.
    Close {
        /// The link.
        link: LinkId,
        /// Why.
        reason: LinkRefusal,
    },
    /// Deliver a group message to local clients.
    Deliver {
        /// The message.
        msg: Arc<GroupMsg>,
        /// Recipients. Each client appears at most once.
        targets: Vec<Target>,
        /// For `all` messages: the group names referred to by `Target::group`.
        group_of: Vec<String>,
    },
    /// Report an event.
    Event(CoreEvent),
}

/// Introspection of one clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneInfo {
    /// Id.
    pub id: String,
    /// Url.
    pub url: String,
    /// Incarnation (0 until known).
    pub incarnation: u64,
    /// Reachable (directly or through a neighbour).
    pub up: bool,
    /// This clone has an established link to it.
    pub linked: bool,
    /// Added by the user (never forgotten).
    pub configured: bool,
}

/// Introspection of one local group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// Name.
    pub name: String,
    /// User data given at creation.
    pub data: Bytes,
    /// Local subscribers.
    pub subscribers: usize,
}

/// Counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// Group messages published here.
    pub published: u64,
    /// Forwarded messages received and accepted.
    pub forwarded_in: u64,
    /// Forwarded messages dropped as duplicates.
    pub duplicates: u64,
    /// Local deliveries.
    pub delivered: u64,
}

/// The state machine of one clone. See the [module docs](self).
pub struct Core {
    cfg: CoreConfig,
    clones: BTreeMap<String, CloneRec>,
    tombs: HashMap<String, Tomb>,
    /// Group deletes, oldest first (bounded by `max_group_tombstones`).
    group_tombs: VecDeque<GroupTomb>,
    /// Keys (origin, incarnation, id) of `group_tombs`.
    group_tomb_keys: HashSet<(String, u64, u64)>,
    links: HashMap<LinkId, LinkRec>,
    next_link: LinkId,
    groups: HashMap<String, Group>,
    clients: HashMap<ConnKey, Client>,
    origins: HashMap<String, OriginWindow>,
    next_msg: u64,
    next_gossip: Duration,
    pushed: BTreeSet<String>,
    gone_push: Vec<CloneEntry>,
    direct_cache: Option<bool>,
    actions: VecDeque<Action>,
    rng: u64,
    stats: CoreStats,
    left: bool,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("id", &self.cfg.id)
            .field("clones", &self.clones.len())
            .field("links", &self.links.len())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// A core for one clone, starting at `now`.
    pub fn new(cfg: CoreConfig, now: Duration) -> Self {
        let rng = cfg.seed | 1;
        Core {
            next_gossip: now + cfg.gossip_interval,
            cfg,
            clones: BTreeMap::new(),
            tombs: HashMap::new(),
            group_tombs: VecDeque::new(),
            group_tomb_keys: HashSet::new(),
            links: HashMap::new(),
            next_link: 1,
            groups: HashMap::new(),
            clients: HashMap::new(),
            origins: HashMap::new(),
            next_msg: 0,
            pushed: BTreeSet::new(),
            gone_push: Vec::new(),
            direct_cache: None,
            actions: VecDeque::new(),
            rng,
            stats: CoreStats::default(),
            left: false,
        }
    }

    /// This clone's id.
    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// This clone's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.cfg.incarnation
    }

    /// This clone's announced url.
    pub fn url(&self) -> &str {
        &self.cfg.url
    }

    /// The next queued action.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// A fresh link id for an accepted connection.
    pub fn new_link_id(&mut self) -> LinkId {
        let id = self.next_link;
        self.next_link += 1;
        id
    }

    /// A clone-level frame arrived on an established link.
    pub fn on_frame(&mut self, link: LinkId, frame: CloneFrame, now: Duration) {
        match self.links.get(&link) {
            Some(l) if l.established => {}
            _ => return,
        }
        match frame {
            CloneFrame::Gossip { entries, full } => self.on_gossip(link, entries, full, now),
            CloneFrame::Interest { add, remove, full } => {
                if let Some(l) = self.links.get_mut(&link) {
                    if full {
                        l.interest.clear();
                        if !l.synced {
                            l.synced = true;
                            self.direct_cache = None;
                        }
                    }
                    for g in remove {
                        l.interest.remove(&g);
                    }
                    l.interest.extend(add);
                }
            }
            CloneFrame::Forward { msg, seen, relay } => self.on_forward(link, msg, seen, relay),
            CloneFrame::GroupDelete {
                origin,
                origin_incarnation,
                msg_id,
                group,
                seen,
            } => {
                let key = (origin, origin_incarnation, msg_id);
                if key.0 == self.cfg.id || self.group_tomb_keys.contains(&key) {
                    return;
                }
                self.remove_group(&group, &key.0);
                let msg = GroupDeleteMsg {
                    origin: key.0,
                    origin_incarnation,
                    msg_id,
                    group,
                };
                self.remember_delete(&msg, now);
                self.flood_delete(msg, seen);
            }
        }
        self.drive(now);
    }

    /// Timers: anti-entropy rounds, redials, forgetting. Call at
    /// [`Core::next_deadline`] (calling more often is harmless).
    pub fn tick(&mut self, now: Duration) {
        if now >= self.next_gossip {
            self.next_gossip = now + self.cfg.gossip_interval;
            let links = self.established();
            if !links.is_empty() && !self.left {
                let entries = self.full_table();
                self.actions.push_back(Action::Send {
                    links: links.clone(),
                    frame: CloneFrame::Gossip {
                        entries,
                        full: true,
                    },
                });
                self.resend_deletes(links, now);
            }
        }
        self.drive(now);
    }

    /// When [`Core::tick`] should be called next.
    pub fn next_deadline(&self) -> Duration {
        let mut t = self.next_gossip;
        for rec in self.clones.values() {
            if rec.link.is_none() && rec.dial.is_none() && !rec.url.is_empty() {
                t = t.min(rec.next_dial);
            }
            if let (Some(since), false) = (rec.down_since, rec.configured) {
                t = t.min(since + self.cfg.forget_after);
            }
        }
        for tomb in self.tombs.values() {
            if let Some(u) = tomb.until {
                t = t.min(u);
            }
        }
        t
    }
}
