//! What the attacks share: a node process with a config written for the
//! test, raw attacker connections, probe clients timed on their own
//! connections, and a watch on the node's resident memory.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replimesh::mesh;
use replimesh::proto::{self, frame::Body, Frame, PeerKind};
use replimesh::store::{self, Store, StoreConfig};
use replimesh_cli::admin::http_get;
use replimesh_cli::metrics::parse_text;
use replimesh_cli::reducers::{Kv, KvAction};
use testkit::NodeProc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_replimesh");

/// Deadline of one network step of a test (a connect, an answer).
pub(crate) const T: Duration = Duration::from_secs(10);

/// A probe that gets no answer in this long is counted with this latency
/// (far above what the tests allow).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Shortest watch: probes run at least this long.
const MIN_WATCH: Duration = Duration::from_secs(1);

/// Time between two probes.
const PROBE_EVERY: Duration = Duration::from_millis(20);

/// Largest median probe latency allowed (the issue's target).
pub(crate) const PROBE_MEDIAN: Duration = Duration::from_millis(100);

/// Largest single probe latency allowed: generous for a loaded debug build,
/// far below a frozen node (seconds).
pub(crate) const PROBE_MAX: Duration = Duration::from_secs(2);

/// The password of the `app` login of every store.
pub(crate) const PASSWORD: &str = "app-pass";

/// The attacks run one at a time: each measures its own node's memory and
/// latency, and another attack's load would blur them.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the other attacks to end.
pub(crate) async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// A temporary directory on the target's disk (not a tmpfs, so that fsync
/// costs what it costs).
pub(crate) fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// A cheap Argon2id PHC string of [`PASSWORD`] (unoptimized builds pay the
/// production cost at every login).
pub(crate) fn phc() -> String {
    let cost = store::HashCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    store::hash_password(PASSWORD, cost).unwrap()
}

/// A node with one tcp listener, an admin port, a `kv` store (login `app`)
/// and `extra` appended; `limits` go in its `[limits]` table.
pub(crate) fn start_node(dir: &Path, limits: &str, extra: &str) -> NodeProc {
    let toml = format!(
        r#"
id = "target"
admin = "127.0.0.1:0"
[[listen]]
url = "tcp://127.0.0.1:0"
[security]
node_info = "anyone"
[limits]
{limits}
[[store]]
name = "kv"
reducer = "kv"
logins = {{ app = "{phc}" }}
{extra}
"#,
        phc = phc()
    );
    NodeProc::start(BIN, dir, "node", &toml)
}

/// The address of a `tcp://host:port` URL.
pub(crate) fn addr(url: &str) -> SocketAddr {
    url.trim_start_matches("tcp://")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// A frame as it goes on the wire: a 4-byte big-endian length, the body.
pub(crate) fn wire(f: &Frame) -> Vec<u8> {
    let body = f.encode_to_bytes();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A client `Hello`, with a login when `login` is not empty.
pub(crate) fn hello(id: &str, login: &str) -> Frame {
    Frame::new(Body::Hello(proto::Hello {
        version: proto::PROTOCOL_VERSION,
        kind: PeerKind::Client as i32,
        id: id.into(),
        login: login.into(),
        password: if login.is_empty() { "" } else { PASSWORD }.into(),
        ..Default::default()
    }))
}

/// What a [`Raw`] connection received, by frame kind, and how it ended.
#[derive(Debug, Default, Clone)]
pub(crate) struct Received {
    /// Frames by kind (`Frame::kind`).
    pub(crate) kinds: BTreeMap<&'static str, u64>,
    /// Every `StoreError` and `Close` message (the first 16).
    pub(crate) errors: Vec<String>,
    /// The connection ended (EOF, reset or a `Close`).
    pub(crate) ended: bool,
}

impl Received {
    /// Frames of this kind.
    pub(crate) fn count(&self, kind: &str) -> u64 {
        self.kinds.get(kind).copied().unwrap_or(0)
    }
}

/// An attacker's connection over a plain socket: frames are written as
/// they are (no client-side queue or limit), and read only when asked.
pub(crate) struct Raw {
    r: Option<OwnedReadHalf>,
    w: OwnedWriteHalf,
    received: Arc<Mutex<Received>>,
}

impl Raw {
    /// Connects to a `tcp://` URL.
    pub(crate) async fn connect(url: &str) -> Raw {
        let s = tokio::time::timeout(T, TcpStream::connect(addr(url)))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        Raw::from(s)
    }

    /// Connects from `source` (another loopback address), with a receive
    /// buffer of `rcvbuf` bytes when given (a peer that stops reading then
    /// fills up after a few KiB instead of megabytes).
    pub(crate) async fn connect_with(
        url: &str,
        source: Option<IpAddr>,
        rcvbuf: Option<u32>,
    ) -> Raw {
        let s = TcpSocket::new_v4().unwrap();
        if let Some(ip) = source {
            s.bind(SocketAddr::new(ip, 0)).unwrap();
        }
        if let Some(n) = rcvbuf {
            s.set_recv_buffer_size(n).unwrap();
        }
        let s = tokio::time::timeout(T, s.connect(addr(url)))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        Raw::from(s)
    }

    fn from(s: TcpStream) -> Raw {
        let _ = s.set_nodelay(true);
        let (r, w) = s.into_split();
        Raw {
            r: Some(r),
            w,
            received: Default::default(),
        }
    }

    /// Connects, says `hello` and waits for the `Welcome`.
    pub(crate) async fn client(url: &str, id: &str, login: &str) -> Raw {
        let mut c = Raw::connect(url).await;
        c.send(&hello(id, login)).await.unwrap();
        match c.recv().await {
            Ok(Frame {
                body: Some(Body::Welcome(_)),
            }) => c,
            other => panic!("no welcome: {other:?}"),
        }
    }

    /// A client with a login, attached to `store` as `client_id`.
    pub(crate) async fn replica(url: &str, store: &str, schema: u32, client_id: &str) -> Raw {
        let mut c = Raw::client(url, client_id, "app").await;
        c.send(&Frame::new(Body::StoreHello(proto::StoreHello {
            store: store.into(),
            schema,
            client_id: client_id.into(),
            ..Default::default()
        })))
        .await
        .unwrap();
        loop {
            match c.recv().await {
                Ok(Frame {
                    body: Some(Body::StoreWelcome(_)),
                }) => return c,
                Ok(Frame {
                    body: Some(Body::StoreError(e)),
                }) => panic!("store hello refused: {e:?}"),
                Ok(_) => continue,
                Err(e) => panic!("no store welcome: {e}"),
            }
        }
    }

    /// Writes one frame (waits while the socket is full: push back).
    pub(crate) async fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        self.w.write_all(&wire(f)).await
    }

    /// Writes bytes as they are.
    pub(crate) async fn send_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.w.write_all(b).await
    }

    /// The next frame other than pings (at most [`T`]).
    pub(crate) async fn recv(&mut self) -> Result<Frame, String> {
        let r = self.r.as_mut().ok_or("being drained")?;
        loop {
            let f = tokio::time::timeout(T, read_frame(r))
                .await
                .map_err(|_| "timed out".to_string())??;
            if !matches!(f.body, Some(Body::Ping(_))) {
                return Ok(f);
            }
        }
    }

    /// Reads everything from now on in a task of its own, counting it
    /// (see [`Raw::received`]).
    pub(crate) fn drain(&mut self) {
        let Some(mut r) = self.r.take() else { return };
        let received = self.received.clone();
        tokio::spawn(async move {
            loop {
                let f = read_frame(&mut r).await;
                let mut got = received.lock().unwrap();
                match f {
                    Ok(f) => {
                        *got.kinds.entry(f.kind()).or_default() += 1;
                        let msg = match &f.body {
                            Some(Body::StoreError(e)) => {
                                e.error.as_ref().map(|e| e.message.clone())
                            }
                            Some(Body::Close(c)) => Some(format!("close {}: {}", c.code, c.reason)),
                            _ => None,
                        };
                        if let Some(m) = msg.filter(|_| got.errors.len() < 16) {
                            got.errors.push(m);
                        }
                        if matches!(f.body, Some(Body::Close(_))) {
                            got.ended = true;
                            return;
                        }
                    }
                    Err(_) => {
                        got.ended = true;
                        return;
                    }
                }
            }
        });
    }

    /// What the drain task has counted so far.
    pub(crate) fn received(&self) -> Received {
        self.received.lock().unwrap().clone()
    }
}

async fn read_frame(r: &mut OwnedReadHalf) -> Result<Frame, String> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    <Frame as proto::Message>::decode(&body[..]).map_err(|e| e.to_string())
}

/// A metric of the node (the first sample with this name and label).
pub(crate) async fn metric(node: &NodeProc, name: &str, label: Option<(&str, &str)>) -> f64 {
    let (code, body) = tokio::time::timeout(T, http_get(node.admin, "/metrics"))
        .await
        .expect("metrics timed out")
        .unwrap();
    assert_eq!(code, 200);
    let samples = parse_text(&body).unwrap();
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v))
        })
        .map(|s| s.2)
        .unwrap_or_else(|| panic!("no metric {name} {label:?}"))
}

/// A client on its own connection that asks the node something every
/// 20 ms and times each answer.
pub(crate) struct Probe {
    name: &'static str,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Duration>>,
}

impl Probe {
    /// Runs `ask` every 20 ms until [`Watch::finish`]; an error fails the
    /// test, no answer within 10 s counts as 10 s.
    pub(crate) fn start<F, Fut>(name: &'static str, mut ask: F) -> Probe
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let task = tokio::spawn(async move {
            let mut took = Vec::new();
            let start = Instant::now();
            while !halt.load(Ordering::Relaxed) {
                let t = Instant::now();
                let d = match tokio::time::timeout(PROBE_TIMEOUT, ask()).await {
                    Ok(Ok(())) => t.elapsed(),
                    Ok(Err(e)) => panic!("probe {name} failed: {e}"),
                    Err(_) => PROBE_TIMEOUT,
                };
                if d > PROBE_MEDIAN {
                    println!(
                        "probe {name}: {:.1} ms at {:.2} s",
                        ms(d),
                        (t - start).as_secs_f64()
                    );
                }
                took.push(d);
                tokio::time::sleep(PROBE_EVERY).await;
            }
            took
        });
        Probe { name, stop, task }
    }

    /// A mesh client that sends `echo` requests.
    pub(crate) async fn echo(url: &str) -> Probe {
        let c = tokio::time::timeout(
            T,
            mesh::Client::connect(mesh::ClientConfig::new([url.to_owned()])),
        )
        .await
        .expect("probe connect timed out")
        .expect("probe connect failed");
        Probe::start("echo", move || {
            let c = c.clone();
            async move {
                let got = c.request("echo", "", &b"ping"[..]).await;
                match got {
                    Ok(b) if &b[..] == b"ping" => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
    }

    /// A mesh client subscribed to a group of its own that publishes to it
    /// and waits for its message to come back through the node's mesh core
    /// (other messages it receives are skipped).
    pub(crate) async fn round_trip(url: &str) -> Probe {
        let c = tokio::time::timeout(
            T,
            mesh::Client::connect(mesh::ClientConfig::new([url.to_owned()])),
        )
        .await
        .expect("probe connect timed out")
        .expect("probe connect failed");
        let inbox = Arc::new(tokio::sync::Mutex::new(c.deliveries().unwrap()));
        c.subscribe(&["probe"]).unwrap();
        let nonce = Arc::new(AtomicU64::new(0));
        let ask = move || {
            let (c, inbox, nonce) = (c.clone(), inbox.clone(), nonce.clone());
            async move {
                let mut inbox = inbox.lock().await;
                // An answer that came too late for the last round.
                while inbox.try_recv().is_some() {}
                let n = nonce.fetch_add(1, Ordering::Relaxed).to_string();
                c.publish(mesh::Groups::one("probe"), n.clone().into_bytes(), false)
                    .map_err(|e| e.to_string())?;
                loop {
                    let d = inbox.recv().await.ok_or("probe inbox closed")?;
                    if d.group == "probe" && d.data[..] == *n.as_bytes() {
                        return Ok(());
                    }
                }
            }
        };
        // The subscription is in once a message comes back.
        let warm = ask.clone();
        let ok = testkit::eventually(T, || {
            let f = warm();
            async move {
                tokio::time::timeout(Duration::from_millis(200), f)
                    .await
                    .is_ok_and(|r| r.is_ok())
            }
        })
        .await;
        assert!(ok, "the round-trip probe's subscription never took");
        Probe::start("round trip", ask)
    }

    /// A `kv` replica that dispatches a `Set` and waits until it is
    /// committed (the store's path through the node).
    pub(crate) async fn dispatch(url: &str) -> Probe {
        let replica = Store::replica(Kv { name: "kv".into() }, StoreConfig::default());
        let link = tokio::time::timeout(
            T,
            replica.connect_with(url, store::ClientConfig::new("app", PASSWORD)),
        )
        .await
        .expect("probe replica connect timed out")
        .expect("probe replica connect failed");
        let link = Arc::new(link);
        let n = Arc::new(AtomicU64::new(0));
        Probe::start("dispatch kv", move || {
            let (replica, n, _link) = (replica.clone(), n.clone(), link.clone());
            async move {
                let i = n.fetch_add(1, Ordering::Relaxed);
                replica
                    .dispatch(KvAction::Set {
                        key: "probe".into(),
                        value: i.to_string(),
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        })
    }
}

/// Samples a node's resident memory every 10 ms (from its idle figure at
/// the start) while probes run.
pub(crate) struct Watch {
    name: &'static str,
    idle_kib: u64,
    peak: Arc<AtomicU64>,
    pid: u32,
    started: Instant,
    cpu: (Duration, Duration),
    stop: Arc<AtomicBool>,
    sampler: std::thread::JoinHandle<()>,
    probes: Vec<Probe>,
}

/// What a [`Watch`] saw.
#[derive(Debug)]
pub(crate) struct Report {
    /// The test.
    pub(crate) name: &'static str,
    /// Resident memory when the watch started (before the attack), KiB.
    pub(crate) idle_kib: u64,
    /// Highest resident memory sampled, KiB.
    pub(crate) peak_kib: u64,
    /// Per probe: name, answers, median, max.
    pub(crate) probes: Vec<(&'static str, usize, Duration, Duration)>,
    /// CPU time the node used meanwhile (user and system).
    pub(crate) node_cpu: Duration,
    /// CPU time this test process used meanwhile (attackers, probes).
    pub(crate) test_cpu: Duration,
    /// How long the watch ran.
    pub(crate) wall: Duration,
}

impl Watch {
    /// Starts watching `node` (its idle memory is taken now) with `probes`
    /// running.
    pub(crate) fn start(name: &'static str, node: &NodeProc, probes: Vec<Probe>) -> Watch {
        let pid = node.pid();
        let idle_kib = node.rss_kib();
        let peak = Arc::new(AtomicU64::new(idle_kib));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let sampler = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(testkit::rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Watch {
            name,
            idle_kib,
            peak,
            pid,
            started: Instant::now(),
            cpu: (cpu_time(pid), cpu_time(std::process::id())),
            stop,
            sampler,
            probes,
        }
    }

    /// Stops the probes and the sampling; prints and returns the figures.
    pub(crate) async fn finish(self) -> Report {
        // Enough probes to say something, however short the attack.
        tokio::time::sleep_until((self.started + MIN_WATCH).into()).await;
        let wall = self.started.elapsed();
        let node_cpu = cpu_time(self.pid).saturating_sub(self.cpu.0);
        let test_cpu = cpu_time(std::process::id()).saturating_sub(self.cpu.1);
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.sampler.join();
        let mut probes = Vec::new();
        for p in self.probes {
            p.stop.store(true, Ordering::Relaxed);
            let mut took = tokio::time::timeout(PROBE_TIMEOUT + T, p.task)
                .await
                .expect("a probe did not stop")
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            took.sort();
            let median = took.get(took.len() / 2).copied().unwrap_or_default();
            let max = took.last().copied().unwrap_or_default();
            probes.push((p.name, took.len(), median, max));
        }
        let r = Report {
            name: self.name,
            idle_kib: self.idle_kib,
            peak_kib: self.peak.load(Ordering::Relaxed),
            probes,
            node_cpu,
            test_cpu,
            wall,
        };
        println!(
            "{}: RSS idle {:.1} MiB, peak {:.1} MiB; {:.1} s: node CPU {:.1} s, test CPU {:.1} s",
            r.name,
            mib(r.idle_kib),
            mib(r.peak_kib),
            r.wall.as_secs_f64(),
            r.node_cpu.as_secs_f64(),
            r.test_cpu.as_secs_f64()
        );
        for (name, n, median, max) in &r.probes {
            println!(
                "{}: probe {name}: {n} answers, median {:.1} ms, max {:.1} ms",
                r.name,
                ms(*median),
                ms(*max)
            );
        }
        r
    }
}

impl Report {
    /// Asserts the peak stayed under `bound_mib` above the idle figure and
    /// every probe was answered often and fast enough.
    pub(crate) fn check(&self, bound_mib: u64) {
        let grew = self.peak_kib.saturating_sub(self.idle_kib);
        assert!(
            grew <= bound_mib * 1024,
            "{}: RSS grew by {:.1} MiB (idle {:.1}, peak {:.1}), bound {bound_mib} MiB",
            self.name,
            mib(grew),
            mib(self.idle_kib),
            mib(self.peak_kib)
        );
        for (name, n, median, max) in &self.probes {
            assert!(
                *n >= 5,
                "{}: probe {name} answered only {n} times",
                self.name
            );
            assert!(
                *median <= PROBE_MEDIAN && *max <= PROBE_MAX,
                "{}: probe {name}: median {:.1} ms (at most {} ms), max {:.1} ms (at most {} ms)",
                self.name,
                ms(*median),
                PROBE_MEDIAN.as_millis(),
                ms(*max),
                PROBE_MAX.as_millis()
            );
        }
    }
}

/// Resident memory of `node` after waiting `after` (the attacker gone),
/// printed with the idle and peak figures of `r`.
pub(crate) async fn rss_after(node: &NodeProc, r: &Report, after: Duration) -> u64 {
    tokio::time::sleep(after).await;
    let kib = node.rss_kib();
    println!(
        "{}: RSS idle {:.1} MiB, peak {:.1} MiB, {:.1} MiB {} s after the attacker left",
        r.name,
        mib(r.idle_kib),
        mib(r.peak_kib),
        mib(kib),
        after.as_secs()
    );
    kib
}

/// User and system CPU time of process `pid` so far (`/proc/PID/stat`, in
/// clock ticks of 10 ms).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
