//! Deterministic simulation of many clone cores on a simulated clock.
//!
//! Each seed builds 3..=16 clones joined by random `add_clone` links into a
//! connected graph, then runs a chaotic phase (publishes, subscribes,
//! unsubscribes, link cuts, partitions, crashes and restarts, new links), heals
//! everything and runs a quiet phase. Checked:
//!
//! * no subscriber ever gets a message twice;
//! * no subscriber gets a message of a group it is not in (or that excludes it);
//! * every message published while a path existed (links up since `SETTLE`
//!   before and until `WINDOW` after, and no link or clone breaking in that
//!   window) reaches every subscriber on the path's component;
//! * after healing and a quiet period every live clone is linked to every other
//!   live clone, dead clones are forgotten (or, where the user added them,
//!   kept as down), and nobody but those users redials dead addresses;
//! * a group delete reaches every clone, also those that were unreachable
//!   (partitioned, cut off) when it happened: after the quiet period no live
//!   clone that can reach the deleting clone still has a member that joined
//!   the group before the delete.
//!
//! `REPLIMESH_SIM_SEEDS=n` runs n seeds (default 1000);
//! `REPLIMESH_SIM_SEED=s` runs one seed.

mod common;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use replimesh_mesh::core::{
    Action, CloneFrame, ConnKey, Core, CoreConfig, CoreEvent, LinkId, PeerInfo,
};

const SETTLE: Duration = Duration::from_millis(60);
const WINDOW: Duration = Duration::from_millis(250);
const CHAOS: Duration = Duration::from_millis(3000);
const GROUPS: usize = 4;
const CLIENTS: u64 = 3;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

#[derive(Debug)]
enum Ev {
    Hello(usize),
    Welcome(usize),
    Refused(usize),
    Frame(usize, usize, CloneFrame),
    Closed(usize, usize),
    Broken(usize, usize),
    DialFail(usize, u64, LinkId),
}

struct Conn {
    side: [usize; 2],
    inc: [u64; 2],
    link: [Option<LinkId>; 2],
    open: [bool; 2],
    dead: bool,
    last: [Duration; 2],
    up_since: Option<Duration>,
    up_until: Option<Duration>,
}

struct Node {
    core: Option<Core>,
    inc: u64,
    configured: BTreeSet<usize>,
    links: HashMap<LinkId, (usize, usize)>,
    permanent_death: bool,
    restart_at: Option<Duration>,
    /// The core's next deadline, refreshed after every call into it.
    deadline: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
struct SubId {
    node: usize,
    inc: u64,
    conn: ConnKey,
}

/// Subscription intervals of one client: group -> [(from, to)].
type Intervals = BTreeMap<String, Vec<(Duration, Option<Duration>)>>;

struct MsgRec {
    t: Duration,
    origin: usize,
    groups: Vec<String>,
    all: bool,
    excluded: Option<SubId>,
}

/// A group delete: when, where (clone and incarnation), which group.
struct DeleteRec {
    t: Duration,
    origin: usize,
    inc: u64,
    group: String,
}

struct Sim {
    deletes: Vec<DeleteRec>,
    rng: Rng,
    now: Duration,
    seq: u64,
    queue: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    evs: HashMap<u64, Ev>,
    nodes: Vec<Node>,
    conns: Vec<Conn>,
    blocked: HashSet<(usize, usize)>,
    heal_at: Vec<(Duration, usize, usize)>,
    /// Subscription intervals: sub -> group -> [(from, to)].
    subs: BTreeMap<SubId, Intervals>,
    msgs: HashMap<(String, u64, u64), MsgRec>,
    delivered: HashSet<(SubId, (String, u64, u64))>,
    disruptions: Vec<Duration>,
    late_dials: Vec<(usize, usize, Duration)>,
    seed: u64,
}

fn trace() -> bool {
    std::env::var_os("REPLIMESH_SIM_TRACE").is_some()
}

fn url(i: usize) -> String {
    format!("sim://{i}")
}

fn name(i: usize) -> String {
    format!("c{i:02}")
}

impl Sim {
    fn new(seed: u64, n: usize) -> Sim {
        let mut sim = Sim {
            deletes: Vec::new(),
            rng: Rng(seed),
            now: Duration::ZERO,
            seq: 0,
            queue: BinaryHeap::new(),
            evs: HashMap::new(),
            nodes: Vec::new(),
            conns: Vec::new(),
            blocked: HashSet::new(),
            heal_at: Vec::new(),
            subs: BTreeMap::new(),
            msgs: HashMap::new(),
            delivered: HashSet::new(),
            disruptions: Vec::new(),
            late_dials: Vec::new(),
            seed,
        };
        for i in 0..n {
            sim.nodes.push(Node {
                core: None,
                inc: 0,
                configured: BTreeSet::new(),
                links: HashMap::new(),
                permanent_death: false,
                restart_at: None,
                deadline: Duration::MAX,
            });
            sim.start(i);
        }
        sim
    }

    fn cfg(&self, i: usize, inc: u64) -> CoreConfig {
        let mut c = CoreConfig::new(name(i), url(i), inc);
        c.gossip_interval = Duration::from_millis(1000);
        c.forget_after = Duration::from_millis(1000);
        c.reconnect_min = Duration::from_millis(10);
        c.reconnect_max = Duration::from_millis(400);
        c.dedup_window = 1024;
        c.group_tombstone_ttl = Duration::from_secs(20);
        c.seed = self.seed ^ (i as u64) << 32 ^ inc;
        c
    }

    fn start(&mut self, i: usize) {
        let inc = self.nodes[i].inc + 1;
        let mut core = Core::new(self.cfg(i, inc), self.now);
        for c in 1..=CLIENTS {
            core.client_connected(c, &format!("{}-{c}", name(i)));
        }
        let node = &mut self.nodes[i];
        node.inc = inc;
        node.links.clear();
        node.core = Some(core);
        let configured: Vec<usize> = node.configured.iter().copied().collect();
        for j in configured {
            self.with_core(i, |c, now| c.add_clone(&name(j), &url(j), now).unwrap());
        }
        self.drain(i);
    }

    fn push(&mut self, at: Duration, node: usize, ev: Ev) {
        self.seq += 1;
        self.evs.insert(self.seq, ev);
        self.queue.push(Reverse((at, self.seq, node)));
    }

    fn lat(&mut self) -> Duration {
        self.rng.ms(1, 5)
    }

    /// Time of the next frame on direction `from` of a conn (FIFO).
    fn fifo(&mut self, c: usize, from: usize) -> Duration {
        let l = self.lat();
        let t = (self.now + l).max(self.conns[c].last[from] + Duration::from_micros(1));
        self.conns[c].last[from] = t;
        t
    }

    fn alive(&self, i: usize) -> bool {
        self.nodes[i].core.is_some()
    }

    fn with_core<R>(&mut self, i: usize, f: impl FnOnce(&mut Core, Duration) -> R) -> R {
        let now = self.now;
        let r = f(self.nodes[i].core.as_mut().expect("live node"), now);
        self.drain(i);
        r
    }

    fn drain(&mut self, i: usize) {
        loop {
            let Some(a) = self.nodes[i].core.as_mut().and_then(|c| c.poll_action()) else {
                break;
            };
            self.act(i, a);
        }
        self.nodes[i].deadline = self.nodes[i]
            .core
            .as_ref()
            .map_or(Duration::MAX, |c| c.next_deadline());
    }

    fn act(&mut self, i: usize, a: Action) {
        if trace() {
            eprintln!("{:?} n{i} ACT {a:?}", self.now);
        }
        match a {
            Action::Dial { link, peer, url: u } => {
                let j: usize = u.trim_start_matches("sim://").parse().expect("sim url");
                assert_eq!(peer, name(j));
                if self.now > CHAOS + Duration::from_millis(2500)
                    && !self.alive(j)
                    && !self.nodes[i].configured.contains(&j)
                {
                    self.late_dials.push((i, j, self.now));
                }
                let inc = self.nodes[i].inc;
                if !self.alive(j) || self.blocked.contains(&(i.min(j), i.max(j))) {
                    let t = self.now + self.rng.ms(1, 3);
                    self.push(t, i, Ev::DialFail(i, inc, link));
                    return;
                }
                let c = self.conns.len();
                self.conns.push(Conn {
                    side: [i, j],
                    inc: [inc, self.nodes[j].inc],
                    link: [Some(link), None],
                    open: [true, true],
                    dead: false,
                    last: [self.now, self.now],
                    up_since: None,
                    up_until: None,
                });
                self.nodes[i].links.insert(link, (c, 0));
                let t = self.fifo(c, 0);
                self.push(t, j, Ev::Hello(c));
            }
            Action::Send { links, frame } => {
                for l in links {
                    let Some(&(c, s)) = self.nodes[i].links.get(&l) else {
                        panic!("seed {}: send on unknown link {l} of {i}", self.seed);
                    };
                    if self.conns[c].dead || !self.conns[c].open[s] {
                        continue;
                    }
                    let t = self.fifo(c, s);
                    let to = self.conns[c].side[1 - s];
                    self.push(t, to, Ev::Frame(c, 1 - s, frame.clone()));
                }
            }
            Action::Close { link, .. } => {
                if let Some((c, s)) = self.nodes[i].links.remove(&link) {
                    self.conns[c].open[s] = false;
                    self.conns[c].up_until.get_or_insert(self.now);
                    if !self.conns[c].dead {
                        let t = self.fifo(c, s);
                        let to = self.conns[c].side[1 - s];
                        self.push(t, to, Ev::Closed(c, 1 - s));
                    }
                }
            }
            Action::Deliver {
                msg,
                targets,
                group_of,
            } => {
                let key = (msg.origin.clone(), msg.origin_incarnation, msg.msg_id);
                for t in targets {
                    let sub = SubId {
                        node: i,
                        inc: self.nodes[i].inc,
                        conn: t.conn,
                    };
                    let g = if msg.all {
                        group_of[t.group].clone()
                    } else {
                        msg.groups[t.group].clone()
                    };
                    let in_group = self
                        .subs
                        .get(&sub)
                        .and_then(|m| m.get(&g))
                        .and_then(|v| v.last())
                        .is_some_and(|(_, to)| to.is_none());
                    assert!(
                        in_group,
                        "seed {}: {sub:?} got a message of {g} it is not in",
                        self.seed
                    );
                    let rec = self.msgs.get(&key).expect("known message");
                    assert!(
                        rec.excluded != Some(sub),
                        "seed {}: excluded client got {key:?}",
                        self.seed
                    );
                    assert!(
                        self.delivered.insert((sub, key.clone())),
                        "seed {}: {sub:?} got {key:?} twice",
                        self.seed
                    );
                }
            }
            Action::Event(CoreEvent::GroupDeleted { group, .. }) => {
                // the core dropped every local member of the group
                let (now, inc) = (self.now, self.nodes[i].inc);
                for (sub, groups) in self.subs.iter_mut() {
                    if sub.node == i && sub.inc == inc {
                        if let Some(last) = groups.get_mut(&group).and_then(|v| v.last_mut()) {
                            if last.1.is_none() {
                                last.1 = Some(now);
                            }
                        }
                    }
                }
            }
            Action::Event(_) => {}
        }
    }

    fn valid(&self, c: usize, s: usize) -> bool {
        let conn = &self.conns[c];
        let n = conn.side[s];
        self.alive(n) && self.nodes[n].inc == conn.inc[s]
    }

    fn handle(&mut self, node: usize, ev: Ev) {
        if trace() {
            eprintln!("{:?} n{node} EV {ev:?}", self.now);
        }
        match ev {
            Ev::DialFail(i, inc, link) => {
                if self.alive(i) && self.nodes[i].inc == inc {
                    self.with_core(i, |c, now| c.link_down(link, now));
                }
            }
            Ev::Hello(c) => {
                if self.conns[c].dead || !self.valid(c, 1) {
                    return self.break_conn(c);
                }
                let d = self.conns[c].side[0];
                let peer = PeerInfo {
                    id: name(d),
                    url: url(d),
                    incarnation: self.conns[c].inc[0],
                };
                let core = self.nodes[node].core.as_mut().expect("alive");
                let link = core.new_link_id();
                let now = self.now;
                match core.accept(link, peer, now) {
                    Ok(()) => {
                        self.conns[c].link[1] = Some(link);
                        self.nodes[node].links.insert(link, (c, 1));
                        let t = self.fifo(c, 1);
                        self.push(t, d, Ev::Welcome(c));
                    }
                    Err(_) => {
                        self.conns[c].open[1] = false;
                        let t = self.fifo(c, 1);
                        self.push(t, d, Ev::Refused(c));
                    }
                }
                self.drain(node);
            }
            Ev::Welcome(c) => {
                if self.conns[c].dead || !self.valid(c, 0) || !self.conns[c].open[0] {
                    return;
                }
                let a = self.conns[c].side[1];
                let peer = PeerInfo {
                    id: name(a),
                    url: url(a),
                    incarnation: self.conns[c].inc[1],
                };
                let link = self.conns[c].link[0].expect("dial link");
                let ok = self.with_core(node, |core, now| core.dial_ok(link, peer, now).is_ok());
                if ok && self.conns[c].open[1] && self.conns[c].open[0] {
                    self.conns[c].up_since = Some(self.now);
                }
            }
            Ev::Refused(c) => {
                if !self.valid(c, 0) {
                    return;
                }
                self.conns[c].dead = true;
                let link = self.conns[c].link[0].expect("dial link");
                if self.nodes[node].links.remove(&link).is_some() {
                    self.with_core(node, |core, now| core.link_down(link, now));
                }
            }
            Ev::Frame(c, s, f) => {
                if self.conns[c].dead || !self.valid(c, s) || !self.conns[c].open[s] {
                    return;
                }
                let link = self.conns[c].link[s].expect("link");
                self.with_core(node, |core, now| core.on_frame(link, f, now));
            }
            Ev::Closed(c, s) | Ev::Broken(c, s) => {
                if !self.valid(c, s) || !self.conns[c].open[s] {
                    return;
                }
                self.conns[c].open[s] = false;
                self.conns[c].up_until.get_or_insert(self.now);
                if let Some(link) = self.conns[c].link[s] {
                    if self.nodes[node].links.remove(&link).is_some() {
                        self.with_core(node, |core, now| core.link_down(link, now));
                    }
                }
            }
        }
    }

    /// Abrupt break: frames in flight are lost, both sides notice soon.
    fn break_conn(&mut self, c: usize) {
        if self.conns[c].dead {
            return;
        }
        self.conns[c].dead = true;
        self.conns[c].up_until.get_or_insert(self.now);
        for s in 0..2 {
            if self.conns[c].open[s] && self.conns[c].link[s].is_some() {
                let t = self.now + self.rng.ms(1, 3);
                let n = self.conns[c].side[s];
                self.push(t, n, Ev::Broken(c, s));
            }
        }
    }

    fn crash(&mut self, i: usize) {
        self.disruptions.push(self.now);
        self.nodes[i].core = None;
        for c in 0..self.conns.len() {
            if self.conns[c].side.contains(&i) && !self.conns[c].dead {
                self.break_conn(c);
            }
        }
        let now = self.now;
        for (sub, groups) in self.subs.iter_mut() {
            if sub.node == i {
                for v in groups.values_mut() {
                    if let Some(last) = v.last_mut() {
                        if last.1.is_none() {
                            last.1 = Some(now);
                        }
                    }
                }
            }
        }
    }

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.alive(i)).collect()
    }

    fn random_op(&mut self, calm: bool) {
        let live = self.live();
        if live.is_empty() {
            return;
        }
        let i = live[self.rng.below(live.len() as u64) as usize];
        let roll = self.rng.below(100);
        let n = self.nodes.len();
        match roll {
            0..=44 => self.publish(i),
            45..=64 => {
                let conn = 1 + self.rng.below(CLIENTS);
                let g = format!("g{}", self.rng.below(GROUPS as u64));
                let sub = SubId {
                    node: i,
                    inc: self.nodes[i].inc,
                    conn,
                };
                let added = self.with_core(i, |c, _| c.subscribe(conn, std::slice::from_ref(&g)));
                if !added.is_empty() {
                    let now = self.now;
                    self.subs
                        .entry(sub)
                        .or_default()
                        .entry(g)
                        .or_default()
                        .push((now, None));
                }
            }
            65..=74 => {
                let conn = 1 + self.rng.below(CLIENTS);
                let g = format!("g{}", self.rng.below(GROUPS as u64));
                let sub = SubId {
                    node: i,
                    inc: self.nodes[i].inc,
                    conn,
                };
                self.with_core(i, |c, _| c.unsubscribe(conn, std::slice::from_ref(&g)));
                let now = self.now;
                if let Some(v) = self.subs.get_mut(&sub).and_then(|m| m.get_mut(&g)) {
                    if let Some(last) = v.last_mut() {
                        if last.1.is_none() {
                            last.1 = Some(now);
                        }
                    }
                }
            }
            75..=79 if !calm => {
                let up: Vec<usize> = (0..self.conns.len())
                    .filter(|&c| {
                        !self.conns[c].dead
                            && self.conns[c].up_since.is_some()
                            && self.conns[c].up_until.is_none()
                    })
                    .collect();
                if !up.is_empty() {
                    let c = up[self.rng.below(up.len() as u64) as usize];
                    self.disruptions.push(self.now);
                    self.break_conn(c);
                }
            }
            80..=83 if !calm => {
                let j = self.rng.below(n as u64) as usize;
                if j != i {
                    let key = (i.min(j), i.max(j));
                    self.disruptions.push(self.now);
                    self.blocked.insert(key);
                    for c in 0..self.conns.len() {
                        let s = self.conns[c].side;
                        if (s[0].min(s[1]), s[0].max(s[1])) == key {
                            self.break_conn(c);
                        }
                    }
                    let until = self.now + self.rng.ms(100, 1500);
                    self.heal_at.push((until, key.0, key.1));
                }
            }
            84..=86 if !calm && live.len() * 3 > n * 2 => {
                self.crash(i);
                if self.rng.chance(75) {
                    self.nodes[i].restart_at = Some(self.now + self.rng.ms(50, 1500));
                } else {
                    self.nodes[i].permanent_death = true;
                }
            }
            87..=91 => {
                let j = self.rng.below(n as u64) as usize;
                if j != i && !self.nodes[i].configured.contains(&j) {
                    self.nodes[i].configured.insert(j);
                    self.with_core(i, |c, now| c.add_clone(&name(j), &url(j), now).unwrap());
                }
            }
            92..=93 if !calm => {
                let group = format!("g{}", self.rng.below(GROUPS as u64));
                self.deletes.push(DeleteRec {
                    t: self.now,
                    origin: i,
                    inc: self.nodes[i].inc,
                    group: group.clone(),
                });
                self.with_core(i, |c, now| c.delete_group(&group, now));
            }
            _ => {}
        }
    }

    fn publish(&mut self, i: usize) {
        let all = self.rng.chance(10);
        let k = 1 + self.rng.below(2);
        let mut groups: Vec<String> = (0..k)
            .map(|_| format!("g{}", self.rng.below(GROUPS as u64)))
            .collect();
        groups.dedup();
        let from = if self.rng.chance(70) {
            Some(1 + self.rng.below(CLIENTS))
        } else {
            None
        };
        let not_to_me = from.is_some() && self.rng.chance(30);
        let inc = self.nodes[i].inc;
        let core = self.nodes[i].core.as_mut().expect("alive");
        let id = core.publish(
            from,
            groups.clone(),
            all,
            not_to_me,
            Bytes::from_static(b"x"),
        );
        let excluded = if not_to_me {
            from.map(|conn| SubId { node: i, inc, conn })
        } else {
            None
        };
        self.msgs.insert(
            (name(i), inc, id),
            MsgRec {
                t: self.now,
                origin: i,
                groups,
                all,
                excluded,
            },
        );
        self.drain(i);
    }

    fn step_until(&mut self, end: Duration, chaos: bool, calm_ops: bool) {
        let mut next_op = self.now;
        loop {
            let mut t = end;
            if let Some(Reverse((et, _, _))) = self.queue.peek() {
                t = t.min(*et);
            }
            for n in &self.nodes {
                if n.core.is_some() {
                    t = t.min(n.deadline);
                }
                if let Some(r) = n.restart_at {
                    t = t.min(r);
                }
            }
            for h in &self.heal_at {
                t = t.min(h.0);
            }
            if calm_ops || chaos {
                t = t.min(next_op);
            }
            if t >= end {
                self.now = end;
                return;
            }
            self.now = self.now.max(t);
            let now = self.now;
            // heals and restarts
            let heals: Vec<(Duration, usize, usize)> = self
                .heal_at
                .iter()
                .copied()
                .filter(|h| h.0 <= now)
                .collect();
            self.heal_at.retain(|h| h.0 > now);
            for (_, a, b) in heals {
                self.blocked.remove(&(a, b));
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i].restart_at.is_some_and(|r| r <= now) {
                    self.nodes[i].restart_at = None;
                    self.start(i);
                }
            }
            while let Some(Reverse((et, seq, node))) = self.queue.peek().copied() {
                if et > now {
                    break;
                }
                self.queue.pop();
                let ev = self.evs.remove(&seq).expect("event");
                self.handle(node, ev);
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i].core.is_some() && self.nodes[i].deadline <= now {
                    self.with_core(i, |c, now| c.tick(now));
                }
            }
            if (calm_ops || chaos) && next_op <= now {
                self.random_op(!chaos);
                next_op = now + self.rng.ms(5, 40);
            }
        }
    }

    fn check_membership(&mut self) {
        let live = self.live();
        // components of the user's add_clone links among live clones: only
        // those are bound to find each other again after everything else died
        let mut comp: Vec<usize> = (0..self.nodes.len()).collect();
        fn root(c: &mut [usize], x: usize) -> usize {
            let mut r = x;
            while c[r] != r {
                r = c[r];
            }
            c[x] = r;
            r
        }
        for &i in &live {
            for &j in &self.nodes[i].configured {
                if self.alive(j) {
                    let (a, b) = (root(&mut comp, i), root(&mut comp, j));
                    comp[a] = b;
                }
            }
        }
        for &i in &live {
            let core = self.nodes[i].core.as_ref().expect("alive");
            let table: HashMap<String, _> = core
                .clones()
                .into_iter()
                .map(|c| (c.id.clone(), c))
                .collect();
            for j in 0..self.nodes.len() {
                if j == i {
                    continue;
                }
                let row = table.get(&name(j));
                if self.alive(j) {
                    if root(&mut comp, i) != root(&mut comp, j) {
                        continue;
                    }
                    let row = row.unwrap_or_else(|| {
                        panic!("seed {}: {i} does not know live {j}", self.seed)
                    });
                    assert!(
                        row.up && row.linked,
                        "seed {}: {i} not linked to live {j}: {row:?}",
                        self.seed
                    );
                } else if let Some(row) = row {
                    assert!(
                        row.configured && !row.up,
                        "seed {}: {i} still has dead {j} as {row:?}",
                        self.seed
                    );
                }
            }
        }
        // one link per pair
        let mut pairs: HashMap<(usize, usize), usize> = HashMap::new();
        for c in &self.conns {
            if !c.dead && c.up_since.is_some() && c.up_until.is_none() {
                let k = (c.side[0].min(c.side[1]), c.side[0].max(c.side[1]));
                *pairs.entry(k).or_default() += 1;
            }
        }
        assert!(
            pairs.values().all(|&n| n == 1),
            "seed {}: duplicate links {pairs:?}",
            self.seed
        );
        assert!(
            self.late_dials.is_empty(),
            "seed {}: dead addresses redialed: {:?}",
            self.seed,
            self.late_dials
        );
    }

    /// Every delete whose clone is still alive (same incarnation) reached
    /// every live clone that is connected to it through the users' links:
    /// none of them has a member that joined the group before the delete.
    fn check_deletes(&self) {
        let mut comp: Vec<usize> = (0..self.nodes.len()).collect();
        fn root(c: &mut [usize], x: usize) -> usize {
            let mut r = x;
            while c[r] != r {
                r = c[r];
            }
            c[x] = r;
            r
        }
        for i in self.live() {
            for &j in &self.nodes[i].configured {
                if self.alive(j) {
                    let (a, b) = (root(&mut comp, i), root(&mut comp, j));
                    comp[a] = b;
                }
            }
        }
        for d in &self.deletes {
            if !self.alive(d.origin) || self.nodes[d.origin].inc != d.inc {
                continue;
            }
            for (sub, groups) in &self.subs {
                if !self.alive(sub.node)
                    || self.nodes[sub.node].inc != sub.inc
                    || root(&mut comp, sub.node) != root(&mut comp, d.origin)
                {
                    continue;
                }
                let kept = groups
                    .get(&d.group)
                    .into_iter()
                    .flatten()
                    .any(|(from, to)| *from <= d.t && to.is_none());
                assert!(
                    !kept,
                    "seed {}: delete of {} by {} at {:?} did not reach {sub:?}",
                    self.seed, d.group, d.origin, d.t
                );
            }
        }
    }

    fn check_liveness(&self, end: Duration) {
        for (key, m) in &self.msgs {
            let (lo, hi) = (m.t.saturating_sub(SETTLE), m.t + WINDOW);
            if hi > end || m.t < SETTLE || self.disruptions.iter().any(|&d| d >= lo && d <= hi) {
                continue;
            }
            // component of the origin over links up during the whole window
            let mut adj: HashMap<usize, Vec<usize>> = HashMap::new();
            for c in &self.conns {
                if c.up_since.is_some_and(|s| s <= lo) && c.up_until.is_none_or(|u| u >= hi) {
                    adj.entry(c.side[0]).or_default().push(c.side[1]);
                    adj.entry(c.side[1]).or_default().push(c.side[0]);
                }
            }
            let mut comp = HashSet::from([m.origin]);
            let mut stack = vec![m.origin];
            while let Some(x) = stack.pop() {
                for &y in adj.get(&x).into_iter().flatten() {
                    if comp.insert(y) {
                        stack.push(y);
                    }
                }
            }
            for (sub, groups) in &self.subs {
                if !comp.contains(&sub.node) || Some(*sub) == m.excluded {
                    continue;
                }
                let covered = groups.iter().any(|(g, v)| {
                    (m.all || m.groups.contains(g))
                        && v.iter().any(|(f, t)| *f <= lo && t.is_none_or(|t| t >= hi))
                });
                if covered {
                    assert!(
                        self.delivered.contains(&(*sub, key.clone())),
                        "seed {}: {sub:?} missed {key:?} published at {:?} (component {comp:?})",
                        self.seed,
                        m.t
                    );
                }
            }
        }
    }
}

fn run_seed(seed: u64) {
    let mut rng = Rng(seed ^ 0xabcdef);
    let n = 3 + rng.below(14) as usize;
    let mut sim = Sim::new(seed, n);
    // a random spanning tree of add_clone links plus a few extra ones,
    // introduced during the first 200 ms while traffic already flows
    let mut plan = Vec::new();
    for j in 1..n {
        let i = rng.below(j as u64) as usize;
        plan.push(if rng.chance(50) { (i, j) } else { (j, i) });
    }
    for _ in 0..rng.below(3) {
        let (a, b) = (rng.below(n as u64) as usize, rng.below(n as u64) as usize);
        if a != b {
            plan.push((a, b));
        }
    }
    let mut t = Duration::ZERO;
    for (a, b) in plan {
        t += rng.ms(0, 200 / n as u64 + 1);
        sim.step_until(t, false, true);
        if sim.nodes[a].configured.insert(b) {
            sim.with_core(a, |c, now| c.add_clone(&name(b), &url(b), now).unwrap());
        }
    }
    sim.step_until(CHAOS, true, true);
    // heal: unblock everything, restart what is not meant to stay dead
    sim.heal_at.clear();
    sim.blocked.clear();
    for i in 0..n {
        if !sim.alive(i) && !sim.nodes[i].permanent_death {
            sim.nodes[i].restart_at = None;
            sim.start(i);
        }
    }
    let quiet_end = CHAOS + Duration::from_millis(3500);
    sim.step_until(quiet_end, false, true);
    sim.check_membership();
    sim.check_deletes();
    sim.check_liveness(quiet_end);
    assert!(!sim.msgs.is_empty());
}

#[test]
fn simulation_many_seeds() {
    // CPU only, no network: 1,000 seeds take about a minute in a debug
    // build on a loaded machine, so a longer limit; many seeds on request
    // may take longer still
    let _watchdog = (std::env::var_os("REPLIMESH_SIM_SEEDS").is_none())
        .then(|| common::watchdog_for("simulation_many_seeds", Duration::from_secs(600)));
    if let Ok(s) = std::env::var("REPLIMESH_SIM_SEED") {
        run_seed(s.parse().expect("REPLIMESH_SIM_SEED"));
        return;
    }
    let seeds: u64 = std::env::var("REPLIMESH_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let threads = 2u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut s = t;
                while s < seeds {
                    run_seed(s);
                    s += threads;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("simulation thread panicked");
    }
}
