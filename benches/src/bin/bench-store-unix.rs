//! Scenario `store-unix`: 1 authority (this process) and 4 replica processes
//! over `unix://`, all replicas dispatching increments; measures the time
//! until every replica has applied every action (actions/s), and the
//! authority's RSS at the end. The same code runs `store-tcp` and `store-ws`
//! (they include this file), `store-latency`, and `store-durable` (over
//! `unix://` with a persistent authority: `BackupPersistence`, journal
//! `always`, in the bench's temporary directory; every acknowledged action
//! is fsynced first; it also reports fsyncs/s, actions per fsync, and the
//! floor: fsyncs/s of a bare write+fdatasync loop in the same directory,
//! alternated with the rounds).
//! Run it with `cargo xtask bench store-unix`; see `docs/store.md`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use replimesh_benches::{
    allowed_cpus, emit, exit_when_parent_goes, median, percentile, pin_process, rounds,
    tell_parent, watchdog, ChildRole, TempDir, CHILD_FLAG,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use store::{Logins, Reducer, ServerConfig, Store, StoreConfig};

const REPLICAS: usize = 4;
const LOGIN: &str = "bench";
const PASSWORD: &str = "bench-password";

/// The benchmark's store: a counter and a round marker.
pub(crate) struct Bench;

/// State of [`Bench`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct BenchState {
    round: u32,
    count: u64,
}

/// Actions of [`Bench`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum BenchAction {
    /// Start of a round (dispatched by the authority).
    Start(u32),
    /// An increment.
    Inc,
}

impl Reducer for Bench {
    type State = BenchState;
    type Action = BenchAction;
    fn name(&self) -> &str {
        "bench"
    }
    fn initial_state(&self) -> BenchState {
        BenchState::default()
    }
    fn reduce(&self, s: &mut BenchState, a: &BenchAction) {
        match a {
            BenchAction::Start(r) => s.round = *r,
            BenchAction::Inc => s.count += 1,
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Entry point shared by the `store-*` scenarios.
pub(crate) fn run(scenario: &str, scheme: &str) -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(CHILD_FLAG) {
        exit_when_parent_goes(Duration::from_secs(120));
        return runtime()?.block_on(child(&args[2..]));
    }
    watchdog(Duration::from_secs(150), "store bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(parent(scenario, scheme))
}

/// Counts the journal's `record` calls and their actions: under the
/// `always` policy each call is one journal record and one fsync.
#[derive(Default)]
struct Fsyncs {
    calls: AtomicU64,
    actions: AtomicU64,
}

struct Counted {
    inner: store::BackupPersistence,
    fsyncs: Arc<Fsyncs>,
}

impl store::Persistence for Counted {
    fn load(&mut self) -> Result<store::Recovered, store::PersistError> {
        self.inner.load()
    }
    fn record(
        &mut self,
        history_id: u64,
        first_seq: u64,
        actions: &[bytes::Bytes],
        origins: &[store::Origin],
    ) -> Result<bool, store::PersistError> {
        self.fsyncs.calls.fetch_add(1, Ordering::Relaxed);
        self.fsyncs
            .actions
            .fetch_add(actions.len() as u64, Ordering::Relaxed);
        self.inner.record(history_id, first_seq, actions, origins)
    }
    fn snapshot(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &bytes::Bytes,
        origins: &[store::Origin],
    ) -> Result<(), store::PersistError> {
        self.inner.snapshot(history_id, seq, state, origins)
    }
    fn deadline(&self) -> Option<std::time::Instant> {
        self.inner.deadline()
    }
    fn shutdown(
        &mut self,
        history_id: u64,
        seq: u64,
        state: &bytes::Bytes,
        origins: &[store::Origin],
    ) -> Result<(), store::PersistError> {
        self.inner.shutdown(history_id, seq, state, origins)
    }
}

/// The authority: in memory, or (`store-durable`) with a backup whose
/// journal is fsynced before each acknowledgement.
fn authority(dir: &TempDir, durable: Option<Arc<Fsyncs>>) -> Result<Store<Bench>> {
    let Some(fsyncs) = durable else {
        return Ok(Store::authority(Bench, StoreConfig::default()));
    };
    let config = backup::BackupConfig::new(dir.path().join("bench.backup"))
        .journal(backup::FsyncPolicy::Always)
        .count(100_000);
    let inner = store::BackupPersistence::open(config, "bench", Bench.schema())?;
    let p = Box::new(Counted { inner, fsyncs });
    Ok(Store::authority_with_persistence(
        Bench,
        StoreConfig::default(),
        p,
    )?)
}

async fn serve(
    scheme: &str,
    dir: &TempDir,
    durable: Option<Arc<Fsyncs>>,
) -> Result<(Store<Bench>, store::Server, String)> {
    let authority = authority(dir, durable)?;
    let mut logins = Logins::new();
    if std::env::var("STORE_BENCH_CHEAP_LOGIN").is_ok() {
        let cheap = store::HashCost {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        logins.add_with_cost(LOGIN, PASSWORD, cheap)?;
    } else {
        logins.add(LOGIN, PASSWORD)?;
    }
    let url = match scheme {
        "unix" => format!("unix://{}/store.sock", dir.path().display()),
        "tcp" => "tcp://127.0.0.1:0".to_owned(),
        "ws" => "ws://127.0.0.1:0/store".to_owned(),
        other => bail!("unknown scheme {other}"),
    };
    let server = authority
        .serve(&url, ServerConfig::with_logins(logins))
        .await?;
    let url = server.urls().first().cloned().context("no url")?;
    Ok((authority, server, url))
}

async fn parent(scenario: &str, scheme: &str) -> Result<()> {
    let dir = TempDir::new(scenario)?;
    eprintln!("{scenario}: authority RSS at start: {:.1} MiB", rss_mib());
    let fsyncs = (scenario == "store-durable").then(|| Arc::new(Fsyncs::default()));
    let (authority, _server, url) = serve(scheme, &dir, fsyncs.clone()).await?;
    eprintln!(
        "{scenario}: authority RSS after serve: {:.1} MiB",
        rss_mib()
    );
    let latency = scenario == "store-latency";
    let per_replica = env_u64("STORE_BENCH_ACTIONS", 250_000);
    let nrounds = if latency { 1 } else { rounds(3) } as u32;
    let rate = 200u64;
    let samples = env_u64("STORE_BENCH_SAMPLES", 1000);
    let mut children = Vec::new();
    for i in 0..REPLICAS {
        let role = if latency {
            if i == 0 {
                "probe"
            } else {
                "idle"
            }
        } else {
            "load"
        };
        let args = [
            "replica".to_owned(),
            url.clone(),
            role.to_owned(),
            per_replica.to_string(),
            nrounds.to_string(),
            samples.to_string(),
            rate.to_string(),
        ];
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        children.push(Arc::new(Mutex::new(ChildRole::spawn(&refs)?)));
    }
    for c in &mut children {
        let line = read_line(c).await?;
        if line != "ready" {
            bail!("child said {line:?}");
        }
    }
    // After the logins (Argon2id's working memory stays with the allocator).
    let rss_before = rss_mib();
    eprintln!("{scenario}: authority RSS before the rounds: {rss_before:.1} MiB");
    let params =
        json!({"replicas": REPLICAS, "transport": scheme, "mode": "action", "resync": 1000});
    if latency {
        authority.dispatch(BenchAction::Start(1)).await?;
        let (p50, p99) = read_latency(&mut children[0]).await?;
        let mut p = params.clone();
        p["rate_per_s"] = json!(rate);
        p["samples"] = json!(samples);
        emit(scenario, "dispatch_to_committed_p50", p50, "ms", p.clone());
        emit(scenario, "dispatch_to_committed_p99", p99, "ms", p.clone());
        // The floor: the same rate of bare round trips between two processes.
        let raw_dir = TempDir::new("store-latency-raw")?;
        let (raw50, raw99) = tokio::task::spawn_blocking(move || {
            let r = raw_round_trips(&raw_dir, samples, rate);
            drop(raw_dir);
            r
        })
        .await??;
        emit(scenario, "raw_round_trip_p50", raw50, "ms", p.clone());
        emit(scenario, "raw_round_trip_p99", raw99, "ms", p.clone());
        // Again with the authority and the probe on one CPU (the other
        // replicas on the others): their wake-ups no longer cross vCPUs.
        let (one, _) = cpu_split()?;
        if let Some(one) = one {
            pin_process(&[one])?;
            authority.dispatch(BenchAction::Start(2)).await?;
            let (p50, p99) = read_latency(&mut children[0]).await?;
            p["pinned"] = json!("authority and probe on one CPU");
            emit(
                scenario,
                "pinned_dispatch_to_committed_p50",
                p50,
                "ms",
                p.clone(),
            );
            emit(scenario, "pinned_dispatch_to_committed_p99", p99, "ms", p);
        }
    } else {
        let mut rates = Vec::new();
        let mut fsync_rates = Vec::new();
        let mut per_fsync = Vec::new();
        let mut raw_rates = Vec::new();
        for r in 1..=nrounds {
            if fsyncs.is_some() {
                // The floor, alternated with the rounds (same background load).
                let path = dir.path().join(format!("raw-fsync-{r}"));
                let raw = tokio::task::spawn_blocking(move || raw_fsyncs(&path)).await??;
                eprintln!("{scenario}: round {r}: raw write+fdatasync: {raw:.0}/s");
                raw_rates.push(raw);
            }
            let start = Instant::now();
            let calls0 = fsyncs
                .as_ref()
                .map_or(0, |f| f.calls.load(Ordering::Relaxed));
            let acts0 = fsyncs
                .as_ref()
                .map_or(0, |f| f.actions.load(Ordering::Relaxed));
            authority.dispatch(BenchAction::Start(r)).await?;
            for c in &mut children {
                let line = read_line(c).await?;
                if line != format!("done {r}") {
                    bail!("child said {line:?}");
                }
            }
            let secs = start.elapsed().as_secs_f64();
            let total = per_replica * REPLICAS as u64;
            let rate = total as f64 / secs;
            eprintln!("{scenario}: round {r}: {total} actions applied everywhere in {secs:.3} s = {rate:.0}/s");
            rates.push(rate);
            if let Some(f) = &fsyncs {
                let calls = f.calls.load(Ordering::Relaxed) - calls0;
                let acts = f.actions.load(Ordering::Relaxed) - acts0;
                let per = acts as f64 / calls.max(1) as f64;
                eprintln!(
                    "{scenario}: round {r}: {calls} fsyncs ({:.0}/s), {per:.0} actions per fsync",
                    calls as f64 / secs
                );
                fsync_rates.push(calls as f64 / secs);
                per_fsync.push(per);
            }
        }
        let mut p = params.clone();
        p["actions_per_round"] = json!(per_replica * REPLICAS as u64);
        p["rounds"] = json!(nrounds);
        if fsyncs.is_some() {
            p["journal"] = json!("always");
            emit(
                scenario,
                "fsyncs",
                median(&fsync_rates),
                "fsyncs/s",
                p.clone(),
            );
            emit(
                scenario,
                "actions_per_fsync",
                median(&per_fsync),
                "actions",
                p.clone(),
            );
            let raw = median(&raw_rates);
            emit(scenario, "raw_fsyncs", raw, "fsyncs/s", p.clone());
            emit(
                scenario,
                "fsyncs_vs_raw",
                median(&fsync_rates) / raw,
                "x",
                p.clone(),
            );
        }
        emit(
            scenario,
            "actions_applied_everywhere",
            median(&rates),
            "actions/s",
            p.clone(),
        );
        let state_bytes = std::mem::size_of::<BenchState>();
        p["state_bytes"] = json!(state_bytes);
        let rss = rss_mib();
        emit(scenario, "authority_rss", rss, "MiB", p.clone());
        emit(
            scenario,
            "authority_rss_growth_during_rounds",
            rss - rss_before,
            "MiB",
            p,
        );
    }
    for c in children {
        let c = Arc::try_unwrap(c)
            .map_err(|_| anyhow::anyhow!("child still in use"))?
            .into_inner()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        c.finish()?;
    }
    Ok(())
}

type Child = Arc<Mutex<ChildRole>>;

/// The probe's answer: `lat <p50> <p99>`.
async fn read_latency(probe: &mut Child) -> Result<(f64, f64)> {
    let line = read_line(probe).await?;
    let mut it = line.split_whitespace();
    let (Some("lat"), Some(p50), Some(p99)) = (it.next(), it.next(), it.next()) else {
        bail!("probe said {line:?}");
    };
    Ok((p50.parse()?, p99.parse()?))
}

/// For the pinned round of `store-latency`: the CPU of the authority and the
/// probe (`None` with fewer than 2 CPUs), and the CPUs of the others.
fn cpu_split() -> Result<(Option<usize>, Vec<usize>)> {
    let mut cpus = allowed_cpus()?;
    if cpus.len() < 2 {
        return Ok((None, cpus));
    }
    let one = cpus.pop();
    Ok((one, cpus))
}

/// Waits until the authority has started round `round`.
async fn wait_round(store: &Store<Bench>, round: u32) {
    while store.state().round < round {
        store.wait_for(store.seq() + 1).await;
    }
}

/// The probe's measurement: `samples` dispatches at `rate` per second.
async fn probe(store: &Store<Bench>, samples: u64, rate: u64) -> Result<()> {
    // In a task, as an application's code runs: waking the runtime's
    // `block_on` future instead costs an extra eventfd write and read per
    // dispatch.
    let probe = store.clone();
    let mut lat = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(samples as usize);
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        for _ in 0..samples {
            tick.tick().await;
            let t = Instant::now();
            probe.dispatch(BenchAction::Inc).await?;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        anyhow::Ok(lat)
    })
    .await??;
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
    tell_parent(&format!("lat {p50} {p99}"));
    Ok(())
}

/// Reads a child's line on the blocking pool (the runtime has one thread).
async fn read_line(c: &mut Child) -> Result<String> {
    let c = c.clone();
    tokio::task::spawn_blocking(move || {
        c.lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .read_line()
    })
    .await?
}

async fn child(args: &[String]) -> Result<()> {
    if let [kind, path] = args {
        if kind == "raw-echo" {
            return tokio::task::spawn_blocking({
                let path = path.clone();
                move || raw_echo(&path)
            })
            .await?;
        }
    }
    let [kind, url, role, per, nrounds, samples, rate] = args else {
        bail!("bad child arguments {args:?}");
    };
    if kind != "replica" {
        bail!("unknown child role {kind}");
    }
    let per: u64 = per.parse()?;
    let nrounds: u64 = nrounds.parse()?;
    let samples: u64 = samples.parse()?;
    let rate: u64 = rate.parse()?;
    let store = Store::replica(Bench, StoreConfig::default());
    let _client = store.connect(url, LOGIN, PASSWORD).await?;
    tell_parent("ready");
    match role.as_str() {
        "load" => {
            for r in 1..=nrounds {
                // The round starts with the authority's marker.
                let start_seq = (r - 1) * (per * REPLICAS as u64 + 1) + 1;
                store.wait_for(start_seq).await;
                let mut sent = 0;
                while sent < per {
                    match store.try_dispatch(&BenchAction::Inc) {
                        Ok(_) => sent += 1,
                        Err(store::DispatchError::OutboxFull { .. }) => {
                            // Room comes back as actions are applied.
                            store.wait_for(store.seq() + 1).await
                        }
                        Err(e) => return Err(e.into()),
                    }
                    if sent % 4096 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                store.wait_for(r * (per * REPLICAS as u64 + 1)).await;
                tell_parent(&format!("done {r}"));
            }
        }
        "probe" => {
            store.wait_for(1).await;
            probe(&store, samples, rate).await?;
            let (one, _) = cpu_split()?;
            if let Some(one) = one {
                wait_round(&store, 2).await;
                pin_process(&[one])?;
                probe(&store, samples, rate).await?;
            }
        }
        "idle" => {
            let (one, others) = cpu_split()?;
            if one.is_some() {
                wait_round(&store, 2).await;
                pin_process(&others)?;
            }
        }
        _ => {}
    }
    // Stay connected until the parent closes our stdin.
    std::future::pending::<()>().await;
    Ok(())
}

/// Bytes of one write of the raw fsync floor (about a group commit's record).
const RAW_FSYNC_WRITE: usize = 4096;

/// The platform's floor for `store-durable`: appends of 4 KiB to a new file
/// in the bench's directory, each followed by `fdatasync`, for about 0.5 s,
/// on one thread. Returns fsyncs/s.
fn raw_fsyncs(path: &std::path::Path) -> Result<f64> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let buf = [7u8; RAW_FSYNC_WRITE];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_millis(500) {
        f.write_all(&buf)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(path)?;
    Ok(rate)
}

/// Bytes of one raw round trip (about a dispatch's size).
const RAW_MSG: usize = 32;

/// The raw baseline's child: echoes what it reads on a Unix socket until EOF.
fn raw_echo(path: &str) -> Result<()> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    tell_parent("ready");
    let mut buf = [0u8; RAW_MSG];
    loop {
        match s.read_exact(&mut buf) {
            Ok(()) => s.write_all(&buf)?,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The platform's floor for `store-latency`: round trips of 32 bytes between
/// this process and a child over a Unix socket, with blocking reads, at the
/// same rate as the probe's dispatches (both processes sleep in between, as
/// the authority and the probe do). Returns (p50, p99) in ms.
fn raw_round_trips(dir: &TempDir, samples: u64, rate: u64) -> Result<(f64, f64)> {
    use std::io::{Read, Write};
    let path = dir.path().join("raw.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    let path = path.to_str().context("socket path")?.to_owned();
    let mut child = ChildRole::spawn(&["raw-echo", &path])?;
    let (mut s, _) = listener.accept()?;
    if child.read_line()? != "ready" {
        bail!("raw echo child did not start");
    }
    let period = Duration::from_micros(1_000_000 / rate);
    let mut buf = [7u8; RAW_MSG];
    let mut lat = Vec::with_capacity(samples as usize);
    let mut next = Instant::now();
    for _ in 0..samples {
        next += period;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let t = Instant::now();
        s.write_all(&buf)?;
        s.read_exact(&mut buf)?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(s);
    child.finish()?;
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
    Ok((p50, p99))
}

#[allow(dead_code)]
fn main() -> Result<()> {
    run("store-unix", "unix")
}
