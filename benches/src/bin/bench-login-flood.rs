//! Scenario `login-flood`: how long a legitimate store login takes on a
//! `replimesh` node while wrong logins flood it from rotating addresses
//! (issue #13, finding 2; target: p99 ≤ 200 ms). Run it with
//! `cargo xtask bench login-flood`.
//!
//! One node (in this process, the same code as `replimesh node`; one
//! `tcp://127.0.0.1` listener, one store with one login hashed at the
//! production Argon2id cost, default limits). `BENCH_ATTACKERS` tasks
//! (default 30) each send wrong logins for the real user name, 4 from each
//! source address and then the next one (127.10.0.1, 127.10.0.2, ...; all
//! of 127.0.0.0/8 is loopback on Linux, and the client socket is bound to
//! the address), so no address is ever banned. Meanwhile legitimate logins
//! are timed (connect to `Welcome`), one after the other, alternating
//! between an address that logged in before (127.0.0.1) and a new one each
//! time (127.200.x.y). Reported: p50 and p99 of each kind under the flood,
//! the p50 without flood, and the wrong logins checked per second.
//! Environment: `BENCH_ATTACKERS`, `BENCH_LOGINS` (legitimate logins of
//! each kind, default 50).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use proto::frame::Body;
use proto::{Frame, Message, PeerKind};
use replimesh_benches::{emit, percentile, watchdog};
use replimesh_cli::config::NodeConfig;
use replimesh_cli::node::Node;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

const SCENARIO: &str = "login-flood";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    watchdog(Duration::from_secs(170), "bench-login-flood");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run())
}

/// One login from `from`: `Ok(true)` when welcomed, `Ok(false)` when
/// refused (closed), and how long it took.
async fn login(node: SocketAddr, from: Ipv4Addr, password: &str) -> Result<(bool, Duration)> {
    let start = Instant::now();
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from.into(), 0))?;
    let mut s = socket.connect(node).await?;
    let hello = Frame::new(Body::Hello(proto::Hello {
        version: proto::PROTOCOL_VERSION,
        kind: PeerKind::Client as i32,
        login: "app".into(),
        password: password.into(),
        ..Default::default()
    }));
    let body = hello.encode_to_vec();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    s.write_all(&out).await?;
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).await.is_err() {
        return Ok((false, start.elapsed()));
    }
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await?;
    let f = Frame::decode(&body[..])?;
    Ok((matches!(f.body, Some(Body::Welcome(_))), start.elapsed()))
}

async fn timed_login(node: SocketAddr, from: Ipv4Addr) -> Result<f64> {
    let (ok, took) = tokio::time::timeout(Duration::from_secs(30), login(node, from, "right"))
        .await
        .context("a legitimate login took over 30 s")??;
    if !ok {
        bail!("the legitimate login from {from} was refused");
    }
    Ok(took.as_secs_f64() * 1000.0)
}

fn p(sorted: &mut [f64], q: f64) -> f64 {
    sorted.sort_by(f64::total_cmp);
    percentile(sorted, q * 100.0)
}

async fn run() -> Result<()> {
    let attackers = env_num("BENCH_ATTACKERS", 30) as u8;
    let logins = env_num("BENCH_LOGINS", 50) as usize;
    let phc = store::hash_password("right", store::HashCost::default())?;
    let config = NodeConfig::parse(
        &format!(
            "id = \"target\"\n[[listen]]\nurl = \"tcp://127.0.0.1:0\"\n\
             [[store]]\nname = \"kv\"\nreducer = \"kv\"\nlogins = {{ app = \"{phc}\" }}\n"
        ),
        Path::new("."),
    )?;
    let node = Node::start(config).await?;
    let url = node.urls()[0].clone();
    let addr: SocketAddr = url
        .trim_start_matches("tcp://")
        .trim_end_matches('/')
        .parse()
        .context("node address")?;
    let known = Ipv4Addr::new(127, 0, 0, 1);
    let mut fresh =
        (0..).map(|i: u32| Ipv4Addr::new(127, 200, (i / 250) as u8, (i % 250 + 1) as u8));
    // Without flood; 127.0.0.1 becomes an address that logged in.
    let mut quiet = Vec::new();
    for _ in 0..10 {
        quiet.push(timed_login(addr, known).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..attackers {
        let (stop, wrong) = (stop.clone(), wrong.clone());
        tasks.push(tokio::spawn(async move {
            let mut i: u32 = 0;
            while !stop.load(Ordering::Relaxed) {
                let k = i / 4;
                let from = Ipv4Addr::new(127, 10 + t, (k / 250) as u8, (k % 250 + 1) as u8);
                i += 1;
                let r = tokio::time::timeout(Duration::from_secs(30), login(addr, from, "wrong"));
                if let Ok(Ok((false, _))) = r.await {
                    wrong.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (w0, t0) = (wrong.load(Ordering::Relaxed), Instant::now());
    let (mut old, mut new) = (Vec::new(), Vec::new());
    for _ in 0..logins {
        old.push(timed_login(addr, known).await?);
        let from = fresh.next().context("addresses")?;
        new.push(timed_login(addr, from).await?);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rate = (wrong.load(Ordering::Relaxed) - w0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    node.shutdown().await?;
    let params = json!({"attackers": attackers, "logins": logins, "tries_per_address": 4, "goal_p99_ms": 200});
    eprintln!(
        "quiet p50 {:.1} ms; under flood ({rate:.0} wrong logins/s): known address p50 {:.1} p99 {:.1} ms, new address p50 {:.1} p99 {:.1} ms",
        p(&mut quiet, 0.5),
        p(&mut old, 0.5),
        p(&mut old, 0.99),
        p(&mut new, 0.5),
        p(&mut new, 0.99)
    );
    emit(
        SCENARIO,
        "quiet_login_p50",
        p(&mut quiet, 0.5),
        "ms",
        params.clone(),
    );
    emit(
        SCENARIO,
        "known_address_login_p50",
        p(&mut old, 0.5),
        "ms",
        params.clone(),
    );
    emit(
        SCENARIO,
        "known_address_login_p99",
        p(&mut old, 0.99),
        "ms",
        params.clone(),
    );
    emit(
        SCENARIO,
        "new_address_login_p50",
        p(&mut new, 0.5),
        "ms",
        params.clone(),
    );
    emit(
        SCENARIO,
        "new_address_login_p99",
        p(&mut new, 0.99),
        "ms",
        params.clone(),
    );
    emit(SCENARIO, "wrong_logins_refused", rate, "logins/s", params);
    Ok(())
}
