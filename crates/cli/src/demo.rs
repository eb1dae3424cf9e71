//! `replimesh demo`: a small mesh with a store on loopback, simulated
//! traffic, progress output, a summary, and the dashboard while it runs.
//!
//! Three nodes (clones) in this process, linked in a chain (they discover
//! each other); node 1 holds the authority of a `counter` store with an
//! encrypted backup in a temporary directory, nodes 2 and 3 relay it.
//! Per node: one publisher and two subscribers of group `demo`, and one store
//! replica dispatching increments. At the end: every subscriber must have
//! every message exactly once, every replica must equal the authority, and
//! the final backup must read back with the authority's seq and state.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use replimesh::backup::{self, KdfParams, KeyRing};
use replimesh::mesh;
use replimesh::store::{Encoding, Store, StoreConfig};
use serde_json::json;

use crate::admin::{AdminServer, AdminSource};
use crate::config::{
    BackupSettings, Journal, Limits, Listen, Mode, NodeConfig, Peer, ReducerKind, StoreSettings,
    Upstream,
};
use crate::metrics::Registry;
use crate::node::{HostedStore, Node};
use crate::reducers::{CounterAction, CounterReducer};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long traffic runs (ignored with `keep_running`).
    pub duration: Duration,
    /// Number of clones (at least 1).
    pub clones: usize,
    /// Run until Ctrl-C instead of `duration`.
    pub keep_running: bool,
    /// Admin/dashboard address (default: a free loopback port).
    pub admin: String,
    /// Messages per second per publisher.
    pub rate: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            duration: Duration::from_secs(5),
            clones: 3,
            keep_running: false,
            admin: "127.0.0.1:0".into(),
            rate: 2000,
        }
    }
}

/// The demo's results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Messages published (counted ones, after warm-up).
    pub published: u64,
    /// Deliveries expected (published × subscribers).
    pub expected: u64,
    /// Distinct deliveries.
    pub delivered: u64,
    /// Expected but never delivered.
    pub lost: u64,
    /// Delivered more than once.
    pub duplicates: u64,
    /// Actions dispatched and committed.
    pub actions: u64,
    /// The authority's final seq.
    pub seq: u64,
    /// Every replica equals the authority.
    pub replicas_equal: bool,
    /// Number of replicas compared.
    pub replicas: usize,
    /// The final backup was written and read back with the authority's seq and state.
    pub backup_ok: bool,
    /// Time from start to the first delivery.
    pub first_traffic: Option<Duration>,
}

impl Summary {
    /// Whether everything checked out.
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.replicas_equal && self.backup_ok
    }
}

#[derive(Default)]
struct Tally {
    /// (subscriber index, publisher id) -> seqs seen
    seen: Mutex<HashMap<(usize, String), HashSet<u64>>>,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    probes: Mutex<HashSet<(usize, String)>>,
    published: AtomicU64,
    actions: AtomicU64,
    first: Mutex<Option<Instant>>,
}

struct DemoSource {
    nodes: Vec<Node>,
    tally: Arc<Tally>,
    groups: Mutex<serde_json::Value>,
}

impl AdminSource for DemoSource {
    fn status(&self) -> serde_json::Value {
        let mut v = self.nodes[0].status();
        let t = &self.tally;
        let delivered = t.delivered.load(Ordering::Relaxed) + t.duplicates.load(Ordering::Relaxed);
        v["id"] = json!(format!("demo ({} clones)", self.nodes.len()));
        v["counters"]["messages_in"] = json!(t.published.load(Ordering::Relaxed));
        v["counters"]["messages_out"] = json!(delivered);
        v["counters"]["dropped"] = json!(0);
        v["counters"]["actions"] = json!(t.actions.load(Ordering::Relaxed));
        let mut links = Vec::new();
        let mut stores = Vec::new();
        for n in &self.nodes {
            let s = n.status();
            if let Some(l) = s["links"].as_array() {
                for x in l {
                    // One line per pair.
                    if x["from"].as_str() < x["to"].as_str() {
                        links.push(x.clone());
                    }
                }
            }
            if let Some(st) = s["stores"].as_array() {
                for x in st {
                    let mut x = x.clone();
                    x["name"] = json!(format!("{} @ {}", x["name"].as_str().unwrap_or(""), n.id()));
                    stores.push(x);
                }
            }
        }
        v["links"] = json!(links);
        v["stores"] = json!(stores);
        v["groups"] = self
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        v
    }
    fn healthy(&self) -> bool {
        true
    }
}

fn node_config(
    i: usize,
    dir: &Path,
    key_file: &Path,
    login_hash: &str,
    prev: Option<(String, String)>,
    upstream: Option<String>,
) -> NodeConfig {
    let name = "counter".to_string();
    let store = StoreSettings {
        name,
        reducer: ReducerKind::Counter,
        mode: Mode::Action,
        resync: 1000,
        logins: [("demo".to_string(), login_hash.to_string())].into(),
        backup: upstream.is_none().then(|| BackupSettings {
            path: dir.join("counter.backup"),
            key_file: Some(key_file.to_path_buf()),
            every: 5000,
            after: Some(Duration::from_secs(2)),
            journal: Journal::Interval,
            // A throwaway key in a temporary directory: a cheap derivation keeps start-up fast.
            kdf: Some((1024, 1)),
        }),
        upstream: upstream.map(|url| Upstream {
            url,
            login: "demo".into(),
            password: "demo-password".into(),
        }),
    };
    let listen = |url: &str| Listen {
        url: url.into(),
        cert: None,
        key: None,
    };
    NodeConfig {
        id: format!("clone-{}", i + 1),
        url: None,
        data: String::new(),
        admin: None,
        listen: vec![listen("tcp://127.0.0.1:0"), listen("ws://127.0.0.1:0/")],
        peers: prev.into_iter().map(|(id, url)| Peer { id, url }).collect(),
        token: Some("demo-clone-token".into()),
        security: crate::config::Security {
            clone_auth: crate::config::CloneAuth::Token,
            ..Default::default()
        },
        limits: Limits::default(),
        access: Default::default(),
        stores: vec![store],
        tls_ca: None,
    }
}

fn out(line: String) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

/// Runs the demo; prints progress and the summary to stdout.
pub async fn run(opts: DemoOptions) -> anyhow::Result<Summary> {
    let t0 = Instant::now();
    let clones = opts.clones.max(1);
    let dir = tempfile::Builder::new()
        .prefix("replimesh-demo-")
        .tempdir()
        .context("creating the demo's temporary directory")?;
    let key_file = dir.path().join("backup.key");
    let passphrase = format!("demo-{:016x}", rand::random::<u64>());
    std::fs::write(&key_file, format!("{passphrase}\n"))?;

    // A cheap Argon2id hash for the demo login (loopback only; real configs
    // use `replimesh hash-password` with the default cost).
    let login_hash = replimesh::store::hash_password(
        "demo-password",
        replimesh::store::HashCost {
            memory_kib: 1024,
            iterations: 1,
            parallelism: 1,
        },
    )?;
    // Nodes: 1 holds the authority, the others relay it; linked in a chain.
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..clones {
        let prev = nodes
            .last()
            .map(|n| (n.id().to_owned(), n.urls()[0].clone()));
        let upstream = nodes.first().map(|n| n.urls()[0].clone());
        let cfg = node_config(i, dir.path(), &key_file, &login_hash, prev, upstream);
        nodes.push(
            Node::start(cfg)
                .await
                .with_context(|| format!("starting clone {}", i + 1))?,
        );
    }
    let tally = Arc::new(Tally::default());
    let source = Arc::new(DemoSource {
        nodes: nodes.clone(),
        tally: tally.clone(),
        groups: Mutex::new(json!([])),
    });
    let admin = AdminServer::start(&opts.admin, Registry::new(), source.clone())
        .await
        .with_context(|| format!("admin listener {}", opts.admin))?;
    out(format!(
        "replimesh demo: {clones} clones on loopback, store `counter` with an encrypted backup in {}",
        dir.path().display()
    ));
    for n in &nodes {
        out(format!("  {}  {}", n.id(), n.urls().join(" ")));
    }
    out(format!("dashboard: {}  (browser client example: {}example.html?login=demo&password=demo-password&group=demo)", admin.dashboard_url(), admin.dashboard_url()));

    // Subscribers: two per clone.
    let mut subs = Vec::new();
    for (ni, n) in nodes.iter().enumerate() {
        for k in 0..2 {
            let idx = subs.len();
            let mut cc = mesh::ClientConfig::new([n.urls()[0].clone()]);
            cc.id = Some(format!("sub-{}-{}", ni + 1, k + 1));
            let c = mesh::Client::connect(cc).await?;
            let mut inbox = c.deliveries().context("deliveries")?;
            c.subscribe(&["demo"])?;
            let t = tally.clone();
            tokio::spawn(async move {
                while let Some(d) = inbox.recv().await {
                    let text = String::from_utf8_lossy(&d.data);
                    let Some((publisher, seq)) = text.split_once(':') else {
                        continue;
                    };
                    if seq == "probe" {
                        t.probes
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert((idx, publisher.to_owned()));
                        continue;
                    }
                    let Ok(seq) = seq.parse::<u64>() else {
                        continue;
                    };
                    let fresh = t
                        .seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry((idx, publisher.to_owned()))
                        .or_default()
                        .insert(seq);
                    if fresh {
                        t.delivered.fetch_add(1, Ordering::Relaxed);
                    } else {
                        t.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    t.first
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert_with(Instant::now);
                }
            });
            subs.push(c);
        }
    }
    // Publishers: one per clone.
    let mut pubs = Vec::new();
    for (ni, n) in nodes.iter().enumerate() {
        let mut cc = mesh::ClientConfig::new([n.urls()[0].clone()]);
        cc.id = Some(format!("pub-{}", ni + 1));
        pubs.push((format!("pub-{}", ni + 1), mesh::Client::connect(cc).await?));
    }
    // Warm-up: probes until every subscriber hears every publisher (the
    // subscriptions have reached every clone).
    let want = subs.len() * pubs.len();
    let warm_deadline = Instant::now() + Duration::from_secs(10);
    while tally.probes.lock().unwrap_or_else(|e| e.into_inner()).len() < want {
        if Instant::now() > warm_deadline {
            anyhow::bail!("the mesh did not converge within 10 s");
        }
        for (id, p) in &pubs {
            let _ = p.publish(
                mesh::Groups::one("demo"),
                format!("{id}:probe").into_bytes(),
                false,
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Store replicas: one per clone, dispatching increments.
    let mut replicas = Vec::new();
    for (ni, n) in nodes.iter().enumerate() {
        let r = Store::replica(
            CounterReducer {
                name: "counter".into(),
            },
            StoreConfig::default(),
        );
        let url = n.urls()[0].clone();
        let mut tries = 0;
        let client = loop {
            match r.connect(&url, "demo", "demo-password").await {
                Ok(c) => break c,
                // A relay attaches to its authority in the background.
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(clone = ni + 1, error = %e, "replica not attached yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(anyhow::anyhow!("replica on clone {}: {e}", ni + 1)),
            }
        };
        replicas.push((r, client));
    }

    let running = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    for (id, p) in &pubs {
        let (id, p, t, running) = (id.clone(), p.clone(), tally.clone(), running.clone());
        let per_tick = (opts.rate / 100).max(1);
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                for _ in 0..per_tick {
                    seq += 1;
                    let msg = format!("{id}:{seq}").into_bytes();
                    if p.publish_wait(mesh::Groups::one("demo"), msg, false)
                        .await
                        .is_ok()
                    {
                        t.published.fetch_add(1, Ordering::Relaxed);
                    } else {
                        seq -= 1;
                    }
                }
            }
        }));
    }
    for (r, _) in &replicas {
        let (r, t, running) = (r.clone(), tally.clone(), running.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while running.load(Ordering::Relaxed) {
                if r.dispatch(CounterAction::Add(1)).await.is_ok() {
                    t.actions.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
                if n % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }

    // Progress until the duration is over (or Ctrl-C).
    let start = Instant::now();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.tick().await;
    let authority = nodes[0].store("counter").context("the counter store")?;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => break,
        }
        // Groups for the dashboard (summed over clones).
        let mut groups: HashMap<String, usize> = HashMap::new();
        for n in &nodes {
            if let Ok(gs) = n.mesh().groups().await {
                for g in gs {
                    *groups.entry(g.name).or_default() += g.subscribers;
                }
            }
        }
        *source.groups.lock().unwrap_or_else(|e| e.into_inner()) = json!(groups
            .iter()
            .map(|(k, v)| json!({"name": k, "subscribers": v}))
            .collect::<Vec<_>>());
        out(format!(
            "[{:5.1}s] published {:>8}  delivered {:>9}  duplicates {}  actions {:>7}  seq {:>7}",
            t0.elapsed().as_secs_f64(),
            tally.published.load(Ordering::Relaxed),
            tally.delivered.load(Ordering::Relaxed),
            tally.duplicates.load(Ordering::Relaxed),
            tally.actions.load(Ordering::Relaxed),
            authority.seq(),
        ));
        if !opts.keep_running && start.elapsed() >= opts.duration {
            break;
        }
    }

    // Stop traffic, let everything drain.
    running.store(false, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let published = tally.published.load(Ordering::Relaxed);
    let expected = published * subs.len() as u64;
    let drain = Instant::now() + Duration::from_secs(5);
    while tally.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The authority's state may be ahead of its seq by the actions its journal
    // thread has not yet made durable (seq() counts durable actions only): read
    // both once the seq has stopped moving, so they describe the same state.
    let (seq, value) = {
        let settle = Instant::now() + Duration::from_secs(5);
        loop {
            let before = authority.seq();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let value = authority.state_json();
            let after = authority.seq();
            if (before == after && value == json!(after)) || Instant::now() >= settle {
                break (after, value);
            }
        }
    };
    let mut all: Vec<HostedStore> = nodes
        .iter()
        .skip(1)
        .filter_map(|n| n.store("counter"))
        .collect();
    all.extend(
        replicas
            .iter()
            .map(|(r, _)| HostedStore::Counter(r.clone())),
    );
    let sync = Instant::now() + Duration::from_secs(5);
    while all.iter().any(|r| r.seq() < seq) && Instant::now() < sync {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let replicas_equal = all
        .iter()
        .all(|r| r.seq() == seq && r.state_json() == value)
        && value == json!(tally.actions.load(Ordering::Relaxed));

    // Shut down: clients, relays, then the authority (final backup).
    for c in subs.iter().chain(pubs.iter().map(|(_, p)| p)) {
        c.close();
    }
    for (r, c) in &replicas {
        c.shutdown().await;
        r.shutdown().await;
    }
    for n in nodes.iter().rev() {
        n.shutdown().await?;
    }
    let backup_ok = check_backup(&dir.path().join("counter.backup"), &passphrase, seq, &value);
    let delivered = tally.delivered.load(Ordering::Relaxed);
    let first_traffic = tally
        .first
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .map(|t| t.duration_since(t0));
    let summary = Summary {
        published,
        expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        duplicates: tally.duplicates.load(Ordering::Relaxed),
        actions: tally.actions.load(Ordering::Relaxed),
        seq,
        replicas_equal,
        replicas: all.len(),
        backup_ok: backup_ok.is_ok(),
        first_traffic,
    };
    print_summary(&summary, &backup_ok);
    drop(admin);
    Ok(summary)
}

fn check_backup(
    path: &Path,
    passphrase: &str,
    seq: u64,
    value: &serde_json::Value,
) -> anyhow::Result<u64> {
    let keys = KeyRing::new(passphrase, KdfParams::default());
    let snap = backup::snapshot::read_snapshot(path, Some(&keys))?;
    // The store's backups wrap the state with the commits' origins.
    let envelope = <replimesh::proto::PersistedState as replimesh::proto::Message>::decode(
        snap.state.clone(),
    )?;
    let state: i64 = Encoding::Binary.decode(&envelope.state)?;
    if snap.seq != seq || json!(state) != *value {
        anyhow::bail!(
            "backup has seq {} state {state}, authority seq {seq} state {value}",
            snap.seq
        );
    }
    Ok(snap.seq)
}

fn print_summary(s: &Summary, backup: &anyhow::Result<u64>) {
    let yes = |b: bool| if b { "yes" } else { "NO" };
    out(String::new());
    out("+--------------------------------+----------------------+".into());
    let row = |k: &str, v: String| out(format!("| {k:<30} | {v:>20} |"));
    row("messages published", s.published.to_string());
    row("deliveries expected", s.expected.to_string());
    row("messages delivered", s.delivered.to_string());
    row("lost", s.lost.to_string());
    row("duplicates", s.duplicates.to_string());
    row("actions committed", s.actions.to_string());
    row("authority seq", s.seq.to_string());
    row(
        &format!("replicas equal ({})", s.replicas),
        yes(s.replicas_equal).into(),
    );
    row("backup written and re-read", yes(s.backup_ok).into());
    if let Some(t) = s.first_traffic {
        row("first delivery after", format!("{} ms", t.as_millis()));
    }
    out("+--------------------------------+----------------------+".into());
    if let Err(e) = backup {
        out(format!("backup check: {e:#}"));
    }
    out(if s.ok() {
        "demo: OK".into()
    } else {
        "demo: FAILED".into()
    });
}
