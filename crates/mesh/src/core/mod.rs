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

mod dedup;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use transport::Backoff;

use dedup::Window;

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

struct CloneRec {
    url: String,
    incarnation: u64,
    configured: bool,
    link: Option<LinkId>,
    dial: Option<LinkId>,
    next_dial: Duration,
    backoff: Backoff,
    up: bool,
    down_since: Option<Duration>,
}

struct LinkRec {
    peer: String,
    dialed_by_me: bool,
    established: bool,
    /// The peer's full table and full interest have arrived.
    synced: bool,
    interest: HashSet<String>,
    view: HashSet<String>,
}

struct Tomb {
    incarnation: u64,
    until: Option<Duration>,
}

/// A group delete this clone knows: applied once, re-sent until `resend_until`.
struct GroupTomb {
    key: (String, u64, u64),
    group: String,
    resend_until: Duration,
}

struct Group {
    data: Bytes,
    explicit: bool,
    members: BTreeSet<ConnKey>,
}

struct Client {
    id: String,
    groups: BTreeSet<String>,
}

struct OriginWindow {
    incarnation: u64,
    window: Window,
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

    /// Counters.
    pub fn stats(&self) -> CoreStats {
        self.stats
    }

    /// A fresh link id for an accepted connection.
    pub fn new_link_id(&mut self) -> LinkId {
        let id = self.next_link;
        self.next_link += 1;
        id
    }

    // ----- commands -------------------------------------------------------

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

    // ----- links ------------------------------------------------------------

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

    // ----- clients and groups ----------------------------------------------

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

    /// Number of groups on this clone (cheap).
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// Number of local clients (cheap).
    pub fn client_count(&self) -> usize {
        self.clients.len()
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

    /// The groups of a local client.
    pub fn client_groups(&self, conn: ConnKey) -> Vec<String> {
        self.clients
            .get(&conn)
            .map(|c| c.groups.iter().cloned().collect())
            .unwrap_or_default()
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

    // ----- introspection --------------------------------------------------

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

    // ----- internals --------------------------------------------------------

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
    fn backoff(&self) -> Backoff {
        Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max)
    }

    fn self_entry(&self, gone: bool) -> CloneEntry {
        CloneEntry {
            id: self.cfg.id.clone(),
            url: self.cfg.url.clone(),
            incarnation: self.cfg.incarnation,
            up: !gone,
            gone,
        }
    }

    fn entry(&self, id: &str) -> Option<CloneEntry> {
        self.clones.get(id).map(|r| CloneEntry {
            id: id.to_string(),
            url: r.url.clone(),
            incarnation: r.incarnation,
            up: r.link.is_some(),
            gone: false,
        })
    }

    fn full_table(&self) -> Vec<CloneEntry> {
        let mut v = vec![self.self_entry(false)];
        v.extend(self.clones.keys().filter_map(|id| self.entry(id)));
        v
    }

    fn established(&self) -> Vec<LinkId> {
        let mut v: Vec<LinkId> = self
            .links
            .iter()
            .filter(|(_, l)| l.established)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    fn tombstoned(&self, id: &str, incarnation: u64) -> bool {
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
    fn refresh(&mut self, id: &str, now: Duration) {
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

    fn remove_clone(&mut self, id: &str, now: Duration) {
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

    fn on_gossip(&mut self, link: LinkId, entries: Vec<CloneEntry>, full: bool, now: Duration) {
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

    fn on_forward(&mut self, link: LinkId, msg: Arc<GroupMsg>, seen: Vec<String>, relay: bool) {
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

    /// Records a group delete (applied here) for re-sending and to apply it once.
    fn remember_delete(&mut self, msg: &GroupDeleteMsg, now: Duration) {
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
    fn resend_deletes(&mut self, links: Vec<LinkId>, now: Duration) {
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

    fn flood_delete(&mut self, msg: GroupDeleteMsg, seen: Vec<String>) {
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

    fn remove_group(&mut self, name: &str, origin: &str) {
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

    /// Pushes table changes, starts due dials, forgets the long dead.
    fn drive(&mut self, now: Duration) {
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

/// Gives memory back once a map is down to a quarter of its capacity (so
/// a client that joined 100,000 groups and left leaves no large table
/// behind); amortised O(1) per removal.
fn shrink<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>) {
    if m.capacity() > 64 && m.len() < m.capacity() / 4 {
        m.shrink_to(m.len() * 2);
    }
}

struct GroupDeleteMsg {
    origin: String,
    origin_incarnation: u64,
    msg_id: u64,
    group: String,
}

fn new_rec(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn info(c: &Core) -> PeerInfo {
        PeerInfo {
            id: c.id().to_string(),
            url: c.url().to_string(),
            incarnation: c.incarnation(),
        }
    }

    fn dial_of(c: &mut Core) -> LinkId {
        loop {
            match c.poll_action() {
                Some(Action::Dial { link, .. }) => return link,
                Some(_) => {}
                None => panic!("no dial"),
            }
        }
    }

    #[test]
    fn simultaneous_dials_keep_the_link_of_the_lower_id() {
        let t = Duration::ZERO;
        let mut a = Core::new(CoreConfig::new("a", "x://a", 1), t);
        let mut b = Core::new(CoreConfig::new("b", "x://b", 1), t);
        a.add_clone("b", "x://b", t).unwrap();
        b.add_clone("a", "x://a", t).unwrap();
        let da = dial_of(&mut a);
        let db = dial_of(&mut b);
        // both hellos arrive before either welcome
        let la = a.new_link_id();
        assert_eq!(a.accept(la, info(&b), t), Err(LinkRefusal::Duplicate));
        let lb = b.new_link_id();
        assert_eq!(b.accept(lb, info(&a), t), Ok(()));
        assert_eq!(a.dial_ok(da, info(&b), t), Ok(()));
        b.link_down(db, t); // refused by a
        assert_eq!(a.link_peer(da), Some("b"));
        assert_eq!(b.link_peer(lb), Some("a"));
        assert_eq!(a.link_count(), 1);
        assert_eq!(b.link_count(), 1);
        assert_eq!(a.add_clone("a", "x://a", t), Err(CoreError::AddSelf));
    }

    /// Links `dialer` to `acceptor`; returns (dialer's link, acceptor's link).
    fn link(dialer: &mut Core, acceptor: &mut Core, t: Duration) -> (LinkId, LinkId) {
        dialer
            .add_clone(acceptor.id(), acceptor.url(), t)
            .expect("add");
        let d = dial_of(dialer);
        let a = acceptor.new_link_id();
        acceptor.accept(a, info(dialer), t).expect("accept");
        dialer.dial_ok(d, info(acceptor), t).expect("dial_ok");
        (d, a)
    }

    /// The frames `c` queued for `link` (other actions are dropped).
    fn sent_on(c: &mut Core, link: LinkId) -> Vec<CloneFrame> {
        let mut v = Vec::new();
        while let Some(a) = c.poll_action() {
            if let Action::Send { links, frame } = a {
                if links.contains(&link) {
                    v.push(frame);
                }
            }
        }
        v
    }

    /// Feeds what `from` sent on `out` into `to` on `inn`.
    fn pump(from: &mut Core, out: LinkId, to: &mut Core, inn: LinkId, t: Duration) {
        for f in sent_on(from, out) {
            to.on_frame(inn, f, t);
        }
    }

    fn group_names(c: &Core) -> Vec<String> {
        c.groups().into_iter().map(|g| g.name).collect()
    }

    #[test]
    fn group_delete_reaches_a_clone_that_was_unreachable_and_applies_once() {
        let t = Duration::ZERO;
        let mut a = Core::new(CoreConfig::new("a", "x://a", 1), t);
        let mut b = Core::new(CoreConfig::new("b", "x://b", 1), t);
        let mut c = Core::new(CoreConfig::new("c", "x://c", 1), t);
        for x in [&mut b, &mut c] {
            x.client_connected(1, "client");
            x.subscribe(1, &["g".to_string()]);
        }
        let (ba, ab) = link(&mut b, &mut a, t);
        let _ = sent_on(&mut b, ba);
        let _ = sent_on(&mut a, ab);
        a.delete_group("g", t);
        pump(&mut a, ab, &mut b, ba, t);
        assert!(group_names(&b).is_empty(), "b was linked: deleted at once");
        assert_eq!(group_names(&c), ["g"], "c was unreachable");
        // c becomes reachable (through b): b re-sends the delete it learned
        let t1 = Duration::from_secs(10);
        let (cb, bc) = link(&mut c, &mut b, t1);
        pump(&mut b, bc, &mut c, cb, t1);
        assert!(group_names(&c).is_empty(), "the delete reached c later");
        // applied once: a group created again is not deleted by re-sends
        c.subscribe(1, &["g".to_string()]);
        let _ = sent_on(&mut c, cb);
        b.tick(t1 + Duration::from_secs(3)); // anti-entropy round re-sends it
        pump(&mut b, bc, &mut c, cb, t1 + Duration::from_secs(3));
        assert_eq!(group_names(&c), ["g"]);
        // re-sending stops after the ttl
        let late = Duration::from_secs(400);
        b.tick(late);
        assert!(sent_on(&mut b, bc)
            .iter()
            .all(|f| !matches!(f, CloneFrame::GroupDelete { .. })));
    }

    #[test]
    fn group_tombstones_are_bounded() {
        let t = Duration::ZERO;
        let mut cfg = CoreConfig::new("a", "x://a", 1);
        cfg.max_group_tombstones = 3;
        let mut a = Core::new(cfg, t);
        for i in 0..10 {
            a.delete_group(&format!("g{i}"), t);
        }
        assert_eq!(a.group_tombstone_count(), 3);
    }

    #[test]
    fn deleted_clone_is_refused_until_it_restarts_or_is_added() {
        let t = Duration::ZERO;
        let mut a = Core::new(CoreConfig::new("a", "x://a", 1), t);
        let b = Core::new(CoreConfig::new("b", "x://b", 5), t);
        let l = a.new_link_id();
        a.accept(l, info(&b), t).unwrap();
        assert!(a.delete_clone("b", t));
        assert!(a.clones().is_empty());
        let l2 = a.new_link_id();
        assert_eq!(a.accept(l2, info(&b), t), Err(LinkRefusal::Deleted));
        let b6 = Core::new(CoreConfig::new("b", "x://b", 6), t);
        let l3 = a.new_link_id();
        assert_eq!(a.accept(l3, info(&b6), t), Ok(()));
        assert_eq!(a.clones().len(), 1);
    }
}
