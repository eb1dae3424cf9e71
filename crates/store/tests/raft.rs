//! The replicated authority in process: three voters over an in-memory
//! network that drops, delays and partitions their messages at random
//! (seeded), clients dispatching through them, and a checker at the end:
//! every acknowledged dispatch applied exactly once, each client's
//! dispatches in its order, every voter with the same history and state.
//!
//! Time is tokio's paused clock: timers fire as soon as nothing else can
//! run, so a seed's seconds of elections and timeouts take milliseconds.
//! `REPLIMESH_RAFT_SEEDS` sets the number of seeds (default 200) and
//! `REPLIMESH_RAFT_SEED` runs one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use replimesh_store::{
    DispatchError, MemoryNetwork, NetworkFaults, RaftConfig, RaftRole, Reducer, Store, StoreConfig,
};

/// Records every action: client -> the numbers it dispatched, in the order
/// they were applied.
struct Record;

impl Reducer for Record {
    type State = BTreeMap<u32, Vec<u32>>;
    type Action = (u32, u32);
    fn name(&self) -> &str {
        "record"
    }
    fn initial_state(&self) -> Self::State {
        BTreeMap::new()
    }
    fn reduce(&self, state: &mut Self::State, action: &(u32, u32)) {
        state.entry(action.0).or_default().push(action.1);
    }
}

const VOTERS: u64 = 3;
const CLIENTS: u32 = 3;
const PER_CLIENT: u32 = 24;
/// Virtual time one seed may take.
const SEED_DEADLINE: Duration = Duration::from_secs(60);

fn raft_config(id: u64) -> RaftConfig {
    let voters = (1..=VOTERS).map(|i| (i, format!("mem://{i}"))).collect();
    let mut c = RaftConfig::new(id, voters);
    c.heartbeat = Duration::from_millis(50);
    c.election_timeout = (Duration::from_millis(150), Duration::from_millis(300));
    c.propose_timeout = Duration::from_millis(400);
    // Small: snapshots and their installation happen in every run.
    c.snapshot_every = 16;
    c.log_kept = 4;
    c
}

async fn start(net: &Arc<MemoryNetwork>) -> Vec<Store<Record>> {
    let mut voters = Vec::new();
    for id in 1..=VOTERS {
        let s = Store::authority_replicated(
            Record,
            StoreConfig::default(),
            raft_config(id),
            net.clone(),
        )
        .await
        .expect("voter starts");
        net.register(id, s.raft_endpoint().expect("a voter has an endpoint"));
        voters.push(s);
    }
    voters
}

/// One client: dispatches its numbers through voter `via`, in bursts
/// (several in flight at once), and returns the seqs it was answered.
async fn client(store: Store<Record>, id: u32) -> Result<Vec<u64>, DispatchError> {
    let mut seqs = Vec::new();
    let mut n = 0;
    while n < PER_CLIENT {
        let burst = (PER_CLIENT - n).min(1 + n % 4);
        let mut pending = Vec::new();
        for _ in 0..burst {
            pending.push(store.try_dispatch(&(id, n))?);
            n += 1;
        }
        for p in pending {
            seqs.push(p.await?);
        }
    }
    Ok(seqs)
}

/// Partitions and heals at random while the clients run.
async fn chaos(net: Arc<MemoryNetwork>) {
    loop {
        tokio::time::sleep(Duration::from_millis(50 + net.random(400))).await;
        match net.random(3) {
            0 => net.isolate(1 + net.random(VOTERS)),
            _ => net.heal(),
        }
    }
}

async fn run_seed(seed: u64) {
    let net = MemoryNetwork::new(seed);
    net.set_faults(NetworkFaults {
        drop_request: 0.05,
        drop_reply: 0.05,
        max_delay: Duration::from_millis(8),
    });
    let voters = start(&net).await;
    let chaos = tokio::spawn(chaos(net.clone()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let via = voters[(c as usize) % voters.len()].clone();
            tokio::spawn(client(via, c))
        })
        .collect();
    let mut answered = BTreeMap::new();
    for (c, h) in clients.into_iter().enumerate() {
        let Ok(seqs) = tokio::time::timeout(SEED_DEADLINE / 2, h).await else {
            let st: Vec<_> = voters.iter().map(|v| (v.seq(), v.raft_status())).collect();
            panic!("seed {seed}: client {c} not done; voters {st:#?}");
        };
        let seqs = seqs.expect("client task").expect("dispatches acknowledged");
        answered.insert(c as u32, seqs);
    }
    chaos.abort();
    net.heal();
    net.set_faults(NetworkFaults::default());

    // Every voter gets to the same head.
    let top = answered.values().flatten().copied().max().unwrap_or(0);
    for v in &voters {
        v.wait_for(top).await;
    }
    let expected: Vec<u32> = (0..PER_CLIENT).collect();
    let first = voters[0].state().clone();
    for (i, v) in voters.iter().enumerate() {
        assert_eq!(v.seq(), top, "seed {seed}: voter {} seq", i + 1);
        assert_ne!(v.history_id(), 0, "seed {seed}");
        assert_eq!(v.history_id(), voters[0].history_id(), "seed {seed}");
        assert_eq!(*v.state(), first, "seed {seed}: voter {} state", i + 1);
    }
    // Exactly once, in each client's order: nothing else was dispatched.
    let total: usize = first.values().map(Vec::len).sum();
    assert_eq!(total as u64, top, "seed {seed}: one seq per applied action");
    for c in 0..CLIENTS {
        assert_eq!(first.get(&c), Some(&expected), "seed {seed}: client {c}");
        let seqs = &answered[&c];
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "seed {seed}: client {c} seqs {seqs:?}"
        );
    }
    // Election safety: at most one leader per term (a cut-off leader of
    // an older term may not know yet that it was replaced).
    let mut leader_terms: Vec<u64> = voters
        .iter()
        .filter_map(|v| v.raft_status())
        .filter(|s| s.role == RaftRole::Leader)
        .map(|s| s.term)
        .collect();
    leader_terms.sort_unstable();
    let n = leader_terms.len();
    leader_terms.dedup();
    assert_eq!(
        leader_terms.len(),
        n,
        "seed {seed}: two leaders of one term"
    );
    for v in &voters {
        v.shutdown().await;
    }
}

fn seeds() -> Vec<u64> {
    if let Some(one) = std::env::var("REPLIMESH_RAFT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return vec![one];
    }
    let n = std::env::var("REPLIMESH_RAFT_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    (0..n).collect()
}

// The deadline is virtual time here (paused clock): each seed is bounded by
// `SEED_DEADLINE`, the whole run by this.
#[testkit::test(start_paused = true, deadline = 1_000_000)]
async fn voters_agree_under_drops_delays_and_partitions() {
    for seed in seeds() {
        if std::env::var_os("REPLIMESH_RAFT_VERBOSE").is_some() {
            eprintln!("seed {seed}");
        }
        tokio::time::timeout(SEED_DEADLINE, run_seed(seed))
            .await
            .unwrap_or_else(|_| {
                panic!("seed {seed} did not end within {SEED_DEADLINE:?} (virtual)")
            });
    }
}

/// Bytes that are no request of this store get a reply, never a panic, and
/// the voter goes on.
#[testkit::test(start_paused = true)]
async fn a_voter_answers_garbage_and_goes_on() {
    let net = MemoryNetwork::new(7);
    let voters = start(&net).await;
    let endpoint = voters[0].raft_endpoint().expect("endpoint");
    for junk in [
        &b""[..],
        b"\x00",
        b"\xff\xff\xff\xff\xff",
        b"not a raft request at all",
    ] {
        let reply = endpoint.handle(bytes::Bytes::copy_from_slice(junk)).await;
        assert!(!reply.is_empty());
    }
    let seq = voters[0].dispatch((9, 1)).await.expect("committed");
    for v in &voters {
        v.wait_for(seq).await;
        assert_eq!(v.state().get(&9), Some(&vec![1]));
    }
    for v in &voters {
        v.shutdown().await;
    }
}
