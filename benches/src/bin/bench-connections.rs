//! Scenario `connections`: many idle WebSocket clients on one `replimesh`
//! node; reports the node's resident memory per connection (goal ≤ 16 KiB).
//! Run it with `cargo xtask bench connections`.
//!
//! The node (the same code as `replimesh node`, with one `ws://` mesh
//! listener) runs in a child process (this binary re-executed with `node`);
//! this process opens the clients, each doing the mesh handshake (Hello /
//! Welcome) and then staying idle. RSS is read from `/proc/<pid>/status`
//! before and after. Results go to stdout as JSON lines; progress to stderr.
//! It also reports the CPU the node spends while every connection is idle
//! (`node_idle_cpu`, percent of one core over 10 s): keep-alive pings both
//! ways, timers. Environment: `BENCH_CONNECTIONS` (default 10000),
//! `BENCH_ROUNDS` (default 3; medians are reported), `BENCH_PING_MS` (the
//! ping interval of the node and the clients; default: the node's default).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use proto::frame::Body;
use proto::{Frame, PeerKind};
use serde_json::json;

const SCENARIO: &str = "connections";

fn main() -> Result<()> {
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(170));
        eprintln!("bench-connections: watchdog: still running, exiting");
        std::process::exit(3);
    });
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("node") {
        return node_role();
    }
    let n = env_num("BENCH_CONNECTIONS", 10_000) as usize;
    let rounds = env_num("BENCH_ROUNDS", 3).max(1) as usize;
    let need = (n as u64) + 512;
    if let Some(soft) = nofile_soft() {
        if soft < need {
            raise_nofile_and_reexec(need)?;
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut per_conn = Vec::new();
    let mut totals = Vec::new();
    let mut rates = Vec::new();
    let mut cpus = Vec::new();
    let ping = std::env::var("BENCH_PING_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    for round in 0..rounds {
        let r = rt.block_on(round_once(n, ping))?;
        eprintln!(
            "round {}: {n} idle ws clients: node RSS {:.1} MiB -> {:.1} MiB, \
             {:.2} KiB per connection; {:.0} connections/s; idle CPU {:.2} %",
            round + 1,
            r.base_mib,
            r.total_mib,
            r.kib,
            r.rate,
            r.idle_cpu
        );
        per_conn.push(r.kib);
        totals.push((r.total_mib, r.base_mib));
        rates.push(r.rate);
        cpus.push(r.idle_cpu);
    }
    let ping_ms = match ping {
        Some(ms) => json!(ms),
        None => json!("default"),
    };
    let params = json!({"connections": n, "transport": "ws", "rounds": rounds, "goal_kib": 16, "ping_ms": ping_ms});
    emit("rss_per_connection", median(&per_conn), "KiB", &params);
    let mut t: Vec<f64> = totals.iter().map(|t| t.0).collect();
    emit("node_rss", median(&t), "MiB", &params);
    t = totals.iter().map(|t| t.1).collect();
    emit("node_rss_idle", median(&t), "MiB", &params);
    emit("connect_rate", median(&rates), "connections/s", &params);
    emit("node_idle_cpu", median(&cpus), "%", &params);
    Ok(())
}

/// What one round measured.
struct Round {
    /// Node RSS per connection (KiB).
    kib: f64,
    /// Node RSS with every connection open (MiB).
    total_mib: f64,
    /// Node RSS before the first connection (MiB).
    base_mib: f64,
    /// Handshakes per second.
    rate: f64,
    /// Node CPU while every connection is idle, percent of one core.
    idle_cpu: f64,
}

async fn round_once(n: usize, ping: Option<u64>) -> Result<Round> {
    let exe = std::env::current_exe()?;
    let mut node = Command::new(exe);
    if let Some(ms) = ping {
        node.env("BENCH_PING_MS", ms.to_string());
    }
    let mut child = node
        .arg("node")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the node process")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let url = loop {
        let line = lines.next().context("node exited")??;
        if let Some(u) = line.strip_prefix("url ") {
            break u.to_owned();
        }
    };
    let pid = child.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = rss_kib(pid)?;

    // Open the clients, 100 handshakes at a time.
    let mut config = transport::Config {
        idle_timeout: Some(Duration::from_secs(120)),
        ..transport::Config::default()
    };
    if let Some(ms) = ping {
        config.ping_interval = Some(Duration::from_millis(ms));
    }
    let config = Arc::new(config);
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(100));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let (url, config, sem) = (url.clone(), config.clone(), sem.clone());
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            let mut conn = transport::connect(&url, &config).await?;
            conn.sender().send(&Frame::new(Body::Hello(proto::Hello {
                version: proto::PROTOCOL_VERSION,
                kind: PeerKind::Client as i32,
                id: format!("idle-{i}"),
                ..Default::default()
            })))?;
            match conn.recv().await? {
                Frame {
                    body: Some(Body::Welcome(_)),
                } => Ok::<_, anyhow::Error>(conn),
                f => bail!("expected welcome, got {}", f.kind()),
            }
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for h in handles {
        conns.push(h.await??);
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    // Let the node settle (buffers returned, tasks parked), then read RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut samples = Vec::new();
    for _ in 0..3 {
        samples.push(rss_kib(pid)? as f64);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let after = median(&samples);
    // CPU of the node while nothing but keep-alive happens.
    let window = Duration::from_secs(10);
    let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
    tokio::time::sleep(window).await;
    let ticks = cpu_ticks(pid)? - cpu0;
    let idle_cpu = ticks as f64 / TICKS_PER_SECOND / t0.elapsed().as_secs_f64() * 100.0;
    // Every connection must still be open.
    let closed = conns.iter().filter(|c| c.sender().is_closed()).count();
    if closed > 0 {
        bail!("{closed} of {n} connections were closed by the node");
    }
    drop(conns);
    stop(child, &mut stdin);
    Ok(Round {
        kib: (after - base as f64) / n as f64,
        total_mib: after / 1024.0,
        base_mib: base as f64 / 1024.0,
        rate,
        idle_cpu,
    })
}

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU time of a process in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|r| r.1)
        .context("bad /proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).context("no utime")?;
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).context("no stime")?;
    Ok(utime + stime)
}

fn stop(mut child: Child, stdin: &mut ChildStdin) {
    let _ = stdin.write_all(b"quit\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The child: a node with one ws mesh listener; quits on stdin EOF or a line.
fn node_role() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut toml = String::from(
            "id = \"bench-node\"\n[[listen]]\nurl = \"ws://127.0.0.1:0/\"\n[limits]\nidle_timeout_ms = 120000\nmax_connections = 1000000\nmax_connections_per_ip = 1000000\n",
        );
        if let Ok(ms) = std::env::var("BENCH_PING_MS") {
            toml.push_str(&format!("ping_interval_ms = {ms}\n"));
        }
        let config = replimesh_cli::config::NodeConfig::parse(&toml, std::path::Path::new("."))?;
        let node = replimesh_cli::node::Node::start(config).await?;
        println!("url {}", node.urls()[0]);
        std::io::stdout().flush()?;
        let _ = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await;
        node.shutdown().await?;
        Ok(())
    })
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

fn nofile_soft() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Raises RLIMIT_NOFILE through the shell's `ulimit` (no unsafe code here)
/// and runs this binary again.
fn raise_nofile_and_reexec(need: u64) -> Result<()> {
    if std::env::var_os("BENCH_NOFILE_RAISED").is_some() {
        bail!("could not raise the open-files limit to {need}: raise `ulimit -n` and retry");
    }
    let exe = std::env::current_exe()?;
    eprintln!("bench-connections: raising the open-files limit to {need}");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {need} 2>/dev/null || ulimit -n $(ulimit -Hn); exec \"$0\" \"$@\""
        ))
        .arg(exe)
        .args(std::env::args().skip(1))
        .env("BENCH_NOFILE_RAISED", "1")
        .status()?;
    std::process::exit(status.code().unwrap_or(1));
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn emit(metric: &str, value: f64, unit: &str, params: &serde_json::Value) {
    println!(
        "{}",
        json!({"scenario": SCENARIO, "metric": metric, "value": (value * 100.0).round() / 100.0, "unit": unit, "params": params})
    );
}
