//! Scenario `connections`: many idle WebSocket clients on one `replimesh`
//! node; reports the node's resident memory per connection (goal ≤ 16 KiB).
//! Run it with `cargo xtask bench connections`.
//!
//! The node (the same code as `replimesh node`, with one `ws://` mesh
//! listener) runs in a child process (this binary re-executed with `node`);
//! this process opens the clients, each doing the mesh handshake (Hello /
//! Welcome) and then staying idle. RSS is read from `/proc/<pid>/status`
//! before and after. Results go to stdout as JSON lines; progress to stderr.
//! Environment: `BENCH_CONNECTIONS` (default 10000), `BENCH_ROUNDS`
//! (default 3; medians are reported).

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
    for round in 0..rounds {
        let (kib, total_mib, base_mib, rate) = rt.block_on(round_once(n))?;
        eprintln!(
            "round {}: {n} idle ws clients: node RSS {base_mib:.1} MiB -> {total_mib:.1} MiB, \
             {kib:.2} KiB per connection; {rate:.0} connections/s",
            round + 1
        );
        per_conn.push(kib);
        totals.push((total_mib, base_mib));
        rates.push(rate);
    }
    let params = json!({"connections": n, "transport": "ws", "rounds": rounds, "goal_kib": 16});
    emit("rss_per_connection", median(&per_conn), "KiB", &params);
    let mut t: Vec<f64> = totals.iter().map(|t| t.0).collect();
    emit("node_rss", median(&t), "MiB", &params);
    t = totals.iter().map(|t| t.1).collect();
    emit("node_rss_idle", median(&t), "MiB", &params);
    emit("connect_rate", median(&rates), "connections/s", &params);
    Ok(())
}

async fn round_once(n: usize) -> Result<(f64, f64, f64, f64)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
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
    let config = Arc::new(transport::Config {
        idle_timeout: Some(Duration::from_secs(120)),
        ..transport::Config::default()
    });
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
    // Every connection must still be open.
    let closed = conns.iter().filter(|c| c.sender().is_closed()).count();
    if closed > 0 {
        bail!("{closed} of {n} connections were closed by the node");
    }
    drop(conns);
    stop(child, &mut stdin);
    let per = (after - base as f64) / n as f64;
    Ok((per, after / 1024.0, base as f64 / 1024.0, rate))
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
        let config = replimesh_cli::config::NodeConfig::parse(
            "id = \"bench-node\"\n[[listen]]\nurl = \"ws://127.0.0.1:0/\"\n[limits]\nidle_timeout_ms = 120000\nmax_connections = 1000000\nmax_connections_per_ip = 1000000\n",
            std::path::Path::new("."),
        )?;
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
