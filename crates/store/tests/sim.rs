//! Deterministic sans-IO simulation of an authority, replicas and a relay over
//! links that drop, reconnect and deliver slowly.

use std::collections::{HashMap, HashSet, VecDeque};

use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngSeed};
use proto::frame::Body;
use proto::Frame;
use replimesh_store::core::{
    Authority, AuthorityConfig, FollowerId, LogConfig, Replica, ReplicaConfig, ReplicaEvent,
    SyncMode,
};
use replimesh_store::{ErrorCode, Reducer, Rejection};
use serde::{Deserialize, Serialize};

/// Records every nonce in order: the state tells exactly what was applied.
struct Journal {
    panic_on: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
struct JState {
    applied: Vec<u64>,
    hash: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Add {
    nonce: u64,
}

impl Reducer for Journal {
    type State = JState;
    type Action = Add;
    fn name(&self) -> &str {
        "journal"
    }
    fn initial_state(&self) -> JState {
        JState::default()
    }
    fn reduce(&self, s: &mut JState, a: &Add) {
        s.applied.push(a.nonce);
        if Some(a.nonce) == self.panic_on {
            panic!("test panic (expected)");
        }
        s.hash = s.hash.wrapping_mul(1_000_003) ^ a.nonce;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    Authority,
    Relay(usize),
}

struct Link {
    up: VecDeque<Frame>,
    down: VecDeque<Frame>,
    connected: bool,
    fid: Option<FollowerId>,
    to: Up,
    /// Set once the relayed replica has moved (it may be on the authority).
    moved: bool,
}

struct Cluster {
    auth: Authority<Journal>,
    reps: Vec<Replica<Journal>>,
    links: Vec<Link>,
    /// (replica, op) -> nonce of accepted dispatches.
    ops: HashMap<(usize, u64), u64>,
    accepted: HashSet<u64>,
    /// nonce -> seq of resolved dispatches.
    resolved: HashMap<u64, u64>,
    rejected: HashSet<u64>,
    next_nonce: u64,
}

impl Cluster {
    fn new(k: usize, relay: bool, log: LogConfig, max_pending: usize) -> Cluster {
        let cfg = AuthorityConfig {
            log: log.clone(),
            ..AuthorityConfig::default()
        };
        let auth = Authority::new(Journal { panic_on: None }, cfg, 0x5eed);
        let n = if relay { k + 1 } else { k };
        let mut reps = Vec::new();
        let mut links = Vec::new();
        for i in 0..n {
            let rc = ReplicaConfig {
                client_id: format!("r{i}"),
                max_pending,
                max_dispatch_batch: 7,
                log: LogConfig {
                    backlog_count: log.backlog_count,
                    backlog_bytes: log.backlog_bytes,
                    max_batch: log.max_batch,
                    ..LogConfig::default()
                },
                ..ReplicaConfig::default()
            };
            reps.push(Replica::new(Journal { panic_on: None }, rc));
            links.push(Link {
                up: VecDeque::new(),
                down: VecDeque::new(),
                connected: false,
                fid: None,
                to: if i == k { Up::Relay(0) } else { Up::Authority },
                moved: false,
            });
        }
        let mut c = Cluster {
            auth,
            reps,
            links,
            ops: HashMap::new(),
            accepted: HashSet::new(),
            resolved: HashMap::new(),
            rejected: HashSet::new(),
            next_nonce: 1,
        };
        for i in 0..n {
            c.connect(i);
        }
        c
    }

    fn dispatch(&mut self, i: usize) {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        if let Ok(op) = self.reps[i].dispatch(&Add { nonce }) {
            self.ops.insert((i, op), nonce);
            self.accepted.insert(nonce);
        }
    }

    fn dispatch_local(&mut self) {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        let seq = self.auth.dispatch(&Add { nonce }).expect("local dispatch");
        self.accepted.insert(nonce);
        assert!(self.resolved.insert(nonce, seq).is_none());
    }

    fn connect(&mut self, i: usize) {
        if self.links[i].connected {
            return;
        }
        self.links[i].connected = true;
        self.reps[i].on_connected();
    }

    fn disconnect(&mut self, i: usize) {
        let l = &mut self.links[i];
        if !l.connected {
            return;
        }
        l.connected = false;
        l.up.clear();
        l.down.clear();
        if let Some(fid) = l.fid.take() {
            match l.to {
                Up::Authority => self.auth.on_leave(fid),
                Up::Relay(r) => self.reps[r].serve_leave(fid),
            }
        }
        self.reps[i].on_disconnected();
    }

    /// The replica behind the relay (if any) disconnects and attaches to the
    /// next upstream: relay 0, relay 1, the authority, relay 0, ... Its
    /// dispatches in flight are resent there (and must not apply twice).
    fn move_relayed(&mut self) {
        let Some(i) = self
            .links
            .iter()
            .position(|l| l.to != Up::Authority || l.moved)
        else {
            return;
        };
        self.disconnect(i);
        let l = &mut self.links[i];
        l.moved = true;
        l.to = match l.to {
            Up::Relay(0) => Up::Relay(1),
            Up::Relay(_) => Up::Authority,
            Up::Authority => Up::Relay(0),
        };
        self.connect(i);
    }

    /// Moves frames; returns how many moved.
    fn out(&mut self, i: usize) -> usize {
        if !self.links[i].connected {
            return 0;
        }
        let frames = self.reps[i].poll_upstream();
        let n = frames.len();
        self.links[i].up.extend(frames);
        n
    }

    fn poll_down(&mut self, i: usize, budget: usize) -> usize {
        let l = &self.links[i];
        let Some(fid) = l.fid else { return 0 };
        let frames = match l.to {
            Up::Authority => self.auth.poll(fid, budget),
            Up::Relay(r) => self.reps[r].poll_follower(fid, budget),
        };
        let n = frames.len();
        self.links[i].down.extend(frames);
        n
    }

    fn pump_up(&mut self, i: usize, k: usize) -> usize {
        let mut n = 0;
        while n < k {
            let Some(f) = self.links[i].up.pop_front() else {
                break;
            };
            n += 1;
            let to = self.links[i].to;
            let fid = self.links[i].fid;
            match f.body {
                Some(Body::StoreHello(h)) => {
                    let r = match to {
                        Up::Authority => self.auth.on_hello(&h),
                        Up::Relay(r) => self.reps[r].serve_hello(&h),
                    };
                    match r {
                        Ok(fid) => self.links[i].fid = Some(fid),
                        Err(e) => self.links[i].down.push_back(e.to_frame(&h.store, 0)),
                    }
                }
                Some(Body::Dispatch(d)) => {
                    let fid = fid.expect("dispatch before hello");
                    match to {
                        Up::Authority => {
                            self.auth.on_dispatch(fid, d);
                        }
                        Up::Relay(r) => self.reps[r].serve_dispatch(fid, d),
                    }
                }
                Some(Body::Resync(_)) => {
                    let fid = fid.expect("resync before hello");
                    match to {
                        Up::Authority => self.auth.on_resync(fid),
                        Up::Relay(r) => self.reps[r].serve_resync(fid),
                    }
                }
                other => panic!("unexpected upstream frame {other:?}"),
            }
        }
        n
    }

    fn pump_down(&mut self, i: usize, k: usize) -> usize {
        let mut n = 0;
        while n < k {
            let Some(f) = self.links[i].down.pop_front() else {
                break;
            };
            n += 1;
            self.reps[i].on_frame(f);
        }
        while let Some(ev) = self.reps[i].poll_event() {
            match ev {
                ReplicaEvent::Committed { op, seq } => {
                    let nonce = self.ops[&(i, op)];
                    assert!(
                        self.resolved.insert(nonce, seq).is_none(),
                        "nonce {nonce} resolved twice"
                    );
                    assert!(self.reps[i].seq() >= seq, "resolved before applied");
                }
                ReplicaEvent::Rejected { op, error } => {
                    let nonce = self.ops[&(i, op)];
                    // A relay whose own outbox is full refuses (not queued, never applied).
                    assert_eq!(
                        error.code,
                        ErrorCode::OutboxFull,
                        "rejection of {nonce}: {error}"
                    );
                    assert!(self.rejected.insert(nonce), "rejected twice");
                    self.accepted.remove(&nonce);
                }
                ReplicaEvent::Ready => {}
                ReplicaEvent::Refused(e) => panic!("refused: {e}"),
            }
        }
        n
    }

    /// Reconnects everything and runs until nothing moves.
    fn settle(&mut self) {
        for i in 0..self.reps.len() {
            self.connect(i);
        }
        for _ in 0..100_000 {
            let mut moved = 0;
            for i in 0..self.reps.len() {
                moved += self.out(i);
                moved += self.pump_up(i, usize::MAX);
                moved += self.poll_down(i, 1 << 20);
                moved += self.pump_down(i, usize::MAX);
            }
            if moved == 0 {
                return;
            }
        }
        panic!("did not settle");
    }

    fn check(&self) {
        let a = self.auth.state();
        for (i, r) in self.reps.iter().enumerate() {
            assert_eq!(r.seq(), self.auth.seq(), "replica {i} seq");
            assert_eq!(
                r.history_id(),
                self.auth.history_id(),
                "replica {i} history"
            );
            assert_eq!(r.state(), a, "replica {i} state");
            assert_eq!(r.pending(), 0, "replica {i} still has pending dispatches");
        }
        assert_eq!(a.applied.len() as u64, self.auth.seq());
        let mut seen = HashSet::new();
        for n in &a.applied {
            assert!(seen.insert(*n), "nonce {n} applied twice");
        }
        assert_eq!(
            seen, self.accepted,
            "applied set differs from accepted dispatches"
        );
        for (nonce, seq) in &self.resolved {
            assert_eq!(
                a.applied[(*seq - 1) as usize],
                *nonce,
                "resolved seq mismatch"
            );
        }
        assert_eq!(
            self.resolved.len(),
            self.accepted.len(),
            "unresolved dispatches"
        );
        for n in &self.rejected {
            assert!(!seen.contains(n), "rejected nonce {n} was applied");
        }
    }
}

#[derive(Debug, Clone)]
enum Step {
    Dispatch(usize, u8),
    Local,
    Out(usize),
    Up(usize, usize),
    Poll(usize, usize),
    Down(usize, usize),
    Disconnect(usize),
    Connect(usize),
    /// The relayed replica fails over: relay 0 -> relay 1 -> authority -> ...
    Move,
}

fn step() -> impl Strategy<Value = Step> {
    let i = 0usize..5;
    prop_oneof![
        4 => (i.clone(), 1u8..6).prop_map(|(i, n)| Step::Dispatch(i, n)),
        1 => Just(Step::Local),
        4 => i.clone().prop_map(Step::Out),
        4 => (i.clone(), 1usize..5).prop_map(|(i, k)| Step::Up(i, k)),
        4 => (i.clone(), prop_oneof![Just(1usize), Just(40), Just(1 << 20)]).prop_map(|(i, b)| Step::Poll(i, b)),
        4 => (i.clone(), 1usize..5).prop_map(|(i, k)| Step::Down(i, k)),
        1 => i.clone().prop_map(Step::Disconnect),
        1 => i.prop_map(Step::Connect),
        1 => Just(Step::Move),
    ]
}

fn mode() -> impl Strategy<Value = SyncMode> {
    prop_oneof![
        Just(SyncMode::Action),
        Just(SyncMode::Snapshot),
        Just(SyncMode::Digest)
    ]
}

fn run(steps: &[Step], mode: SyncMode, backlog: usize, resync: u64, relay: bool) {
    let log = LogConfig {
        mode,
        resync,
        backlog_count: backlog,
        backlog_bytes: 200,
        max_batch: 5,
        max_batch_bytes: 64,
    };
    let mut c = Cluster::new(4, relay, log, 12);
    let n = c.reps.len();
    for s in steps {
        match *s {
            Step::Dispatch(i, k) => {
                for _ in 0..k {
                    c.dispatch(i % n);
                }
            }
            Step::Local => c.dispatch_local(),
            Step::Out(i) => {
                c.out(i % n);
            }
            Step::Up(i, k) => {
                c.pump_up(i % n, k);
            }
            Step::Poll(i, b) => {
                c.poll_down(i % n, b);
            }
            Step::Down(i, k) => {
                c.pump_down(i % n, k);
            }
            Step::Disconnect(i) => c.disconnect(i % n),
            Step::Connect(i) => c.connect(i % n),
            Step::Move => c.move_relayed(),
        }
    }
    c.settle();
    c.check();
}

proptest! {
    #![proptest_config(PtConfig {
        cases: 96,
        rng_seed: RngSeed::Fixed(0x5709e),
        failure_persistence: None,
        ..PtConfig::default()
    })]

    /// At quiescence every replica equals the authority, each accepted
    /// dispatch is applied exactly once, and every resolved seq is right.
    #[test]
    fn replicas_converge_exactly_once(
        steps in prop::collection::vec(step(), 1..300),
        mode in mode(),
        backlog in 1usize..20,
        resync in 0u64..7,
        relay in any::<bool>(),
    ) {
        run(&steps, mode, backlog, resync, relay);
    }
}

/// The seed's divergence: 4 replicas, 20,900 actions, action mode, resync 1000.
#[test]
fn regression_20900_actions_action_mode() {
    let log = LogConfig {
        mode: SyncMode::Action,
        resync: 1000,
        ..LogConfig::default()
    };
    let mut c = Cluster::new(4, false, log, 100_000);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    while c.next_nonce <= 20_900 {
        let i = (next() % 4) as usize;
        c.dispatch(i);
        // Interleave delivery at random points, as a loaded machine would.
        match next() % 8 {
            0 => {
                c.out(i);
            }
            1 => {
                c.pump_up(i, 3);
            }
            2 => {
                c.poll_down(i, 300);
            }
            3 => {
                c.pump_down(i, 2);
            }
            _ => {}
        }
    }
    c.settle();
    c.check();
    assert_eq!(c.auth.seq(), 20_900);
}

/// A reducer panic on the authority rejects that action only; state is rebuilt.
#[test]
fn authority_survives_reducer_panic() {
    let cfg = AuthorityConfig {
        log: LogConfig {
            resync: 3,
            ..LogConfig::default()
        },
        ..AuthorityConfig::default()
    };
    let mut a = Authority::new(Journal { panic_on: Some(5) }, cfg, 7);
    for n in 1..=4 {
        a.dispatch(&Add { nonce: n }).unwrap();
    }
    let err = a.dispatch(&Add { nonce: 5 }).unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    assert_eq!(a.seq(), 4);
    assert_eq!(a.state().applied, vec![1, 2, 3, 4]);
    assert_eq!(a.dispatch(&Add { nonce: 6 }).unwrap(), 5);
    assert_eq!(a.state().applied, vec![1, 2, 3, 4, 6]);
}

/// An action the reducer refuses (`try_reduce` returns `Err`) is rejected
/// with the reducer's reason; the state and the history stay as they were.
#[test]
fn authority_reports_a_refused_action() {
    struct Picky;
    impl Reducer for Picky {
        type State = u64;
        type Action = u64;
        fn name(&self) -> &str {
            "picky"
        }
        fn initial_state(&self) -> u64 {
            0
        }
        fn reduce(&self, s: &mut u64, a: &u64) {
            *s += a;
        }
        fn try_reduce(&self, s: &mut u64, a: &u64) -> Result<(), Rejection> {
            if *a == 0 {
                return Err(Rejection("zero is not allowed".into()));
            }
            self.reduce(s, a);
            Ok(())
        }
    }
    let mut a = Authority::new(Picky, AuthorityConfig::default(), 7);
    assert_eq!(a.dispatch(&2).unwrap(), 1);
    let err = a.dispatch(&0).unwrap_err();
    assert!(
        err.to_string()
            .contains("the reducer refused the action: zero is not allowed"),
        "{err}"
    );
    assert_eq!((a.seq(), *a.state()), (1, 2));
    assert_eq!(a.dispatch(&3).unwrap(), 2);
    assert_eq!(*a.state(), 5);
}

/// A recovered tail (actions up to the snapshot's seq) is not applied again
/// and starts the backlog: back to its first gap or undecodable action,
/// within the backlog limits, and only when it ends at the snapshot.
#[test]
fn recovered_tail_starts_the_backlog() {
    use replimesh_store::core::Recovered;
    use replimesh_store::Encoding;
    let action = |n: u64| Encoding::Binary.encode(&Add { nonce: n }).unwrap();
    let mut state = JState::default();
    for n in 1..=10 {
        Journal { panic_on: None }.reduce(&mut state, &Add { nonce: n });
    }
    let snapshot = Some((10, Encoding::Binary.encode(&state).unwrap()));
    let recover = |tail: Vec<(u64, bytes::Bytes)>, backlog_count: usize| {
        let cfg = AuthorityConfig {
            log: LogConfig {
                backlog_count,
                ..LogConfig::default()
            },
            ..AuthorityConfig::default()
        };
        let mut actions = tail;
        actions.extend([(11, action(11)), (12, action(12))]);
        let recovered = Recovered {
            history_id: 7,
            snapshot: snapshot.clone(),
            actions,
            origins: Vec::new(),
        };
        let a = Authority::recover(Journal { panic_on: None }, cfg, recovered, 9).unwrap();
        assert_eq!(a.seq(), 12);
        assert_eq!(
            a.state().applied,
            (1..=12).collect::<Vec<_>>(),
            "applied twice"
        );
        a.entries_after(0).map(|(s, _)| s).collect::<Vec<_>>()
    };
    let whole: Vec<_> = (1..=10).map(|n| (n, action(n))).collect();
    assert_eq!(recover(whole.clone(), 100), (1..=12).collect::<Vec<_>>());
    // The backlog limits keep the newest.
    assert_eq!(recover(whole.clone(), 5), (8..=12).collect::<Vec<_>>());
    // Back to a gap, or to an undecodable action.
    let mut gap = whole.clone();
    gap.remove(6); // seq 7
    assert_eq!(recover(gap, 100), (8..=12).collect::<Vec<_>>());
    let mut bad = whole.clone();
    bad[5].1 = bytes::Bytes::from_static(&[0xff; 12]); // seq 6
    assert_eq!(recover(bad, 100), (7..=12).collect::<Vec<_>>());
    // A tail that does not end at the snapshot is not kept.
    assert_eq!(recover(whole[..9].to_vec(), 100), vec![11, 12]);
}

/// A replica with another schema is refused with an error naming both.
#[test]
fn schema_mismatch_is_refused() {
    let mut a = Authority::new(Journal { panic_on: None }, AuthorityConfig::default(), 7);
    let hello = proto::StoreHello {
        store: "journal".into(),
        schema: 9,
        client_id: "x".into(),
        ..Default::default()
    };
    let Err(e) = a.on_hello(&hello) else {
        panic!("accepted a wrong schema")
    };
    assert_eq!(e.code, ErrorCode::SchemaMismatch);
    let msg = e.message;
    assert!(msg.contains('9') && msg.contains('1'), "{msg}");
    let unknown = proto::StoreHello {
        store: "nope".into(),
        schema: 1,
        ..Default::default()
    };
    assert!(a.on_hello(&unknown).is_err());
}

/// The `cli` end-to-end case in miniature: dispatches reach the authority
/// through relay 0, which then loses its link before the answers come back;
/// the replica fails over to relay 1 and then to the authority itself,
/// resending its outbox each time. Each dispatch applies exactly once.
#[test]
fn relay_fail_over_applies_once() {
    let log = LogConfig::default();
    let mut c = Cluster::new(4, true, log, 100);
    c.settle();
    let r = 4;
    for _ in 0..5 {
        c.dispatch(r);
    }
    // Replica -> relay 0 -> authority: committed there, answers not delivered.
    c.out(r);
    c.pump_up(r, usize::MAX);
    c.out(0);
    c.pump_up(0, usize::MAX);
    assert_eq!(c.auth.seq(), 5);
    c.disconnect(0);
    // Fail over to relay 1: the resends reach the authority again.
    c.move_relayed();
    c.out(r);
    c.pump_up(r, usize::MAX);
    c.out(1);
    c.pump_up(1, usize::MAX);
    assert_eq!(c.auth.seq(), 5, "resent through relay 1: applied again");
    c.disconnect(1);
    // Then straight to the authority.
    c.move_relayed();
    c.out(r);
    c.pump_up(r, usize::MAX);
    assert_eq!(c.auth.seq(), 5, "resent to the authority: applied again");
    c.settle();
    c.check();
}
