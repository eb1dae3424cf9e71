//! Scenario `mesh-request`: request/response round trips per second between
//! a client (this process) and a clone (a child process), with 1 and with
//! 100 requests in flight on one connection. Median of rounds.
//! `BENCH_INFLIGHT=1` runs only the given in-flight counts (for profiling).

#[path = "bench-mesh-common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use mesh::{Client, ClientConfig};
use replimesh_benches::{emit, median, round_time, rounds, watchdog, CHILD_FLAG};
use serde_json::json;

const SCENARIO: &str = "mesh-request";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(CHILD_FLAG) {
        return common::clone_child(&args[1..]);
    }
    watchdog(Duration::from_secs(60), SCENARIO);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> Result<()> {
    let clones = common::start_clones(1).await?;
    let client = Client::connect(ClientConfig::new([clones[0].url.clone()])).await?;
    let payload = Bytes::from(vec![7u8; 64]);
    for _ in 0..1000 {
        client.request("echo", "x", payload.clone()).await?;
    }
    // BENCH_INFLIGHT=1 (or 100, or "1,100") runs only these (for profiling)
    let inflights: Vec<usize> = std::env::var("BENCH_INFLIGHT")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 100]);
    for inflight in inflights {
        let mut rates = Vec::new();
        for _ in 0..rounds(5) {
            let done = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..inflight {
                let (c, d, s, p) = (client.clone(), done.clone(), stop.clone(), payload.clone());
                tasks.push(tokio::spawn(async move {
                    while !s.load(Ordering::Relaxed) {
                        if c.request("echo", "x", p.clone()).await.is_err() {
                            break;
                        }
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            tokio::time::sleep(round_time(500)).await;
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                let _ = t.await;
            }
            let rate = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
            eprintln!("{SCENARIO}: {inflight} in flight: {rate:.0} round trips/s");
            rates.push(rate);
        }
        emit(
            SCENARIO,
            &format!("round_trips_inflight_{inflight}"),
            median(&rates),
            "requests/s",
            json!({"inflight": inflight, "payload": 64, "rounds": rates.len()}),
        );
    }
    Ok(())
}
