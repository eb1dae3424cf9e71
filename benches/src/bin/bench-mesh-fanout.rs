//! Scenario `mesh-fanout`: 4 clones in separate processes (full mesh), 4
//! subscribers on each, one publisher on clone 1, 64-byte payloads, the
//! publisher at most a window of messages ahead of the slowest subscriber.
//! Reports deliveries/s (median of rounds), lost and duplicated deliveries
//! (counted per subscriber from sequence numbers) and clone RSS at the end.

#[path = "bench-mesh-common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use mesh::{Client, ClientConfig, Groups};
use replimesh_benches::{emit, median, rounds, watchdog, CHILD_FLAG};
use serde_json::json;

const SCENARIO: &str = "mesh-fanout";
const SUBS_PER_CLONE: usize = 4;
const PAYLOAD: usize = 64;
const WINDOW: u64 = 20_000;
const WARMUP: u64 = u64::MAX;

#[derive(Default)]
struct Counter {
    received: AtomicU64,
    lost: AtomicU64,
    dup: AtomicU64,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(CHILD_FLAG) {
        return common::clone_child(&args[1..]);
    }
    watchdog(Duration::from_secs(60), SCENARIO);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> Result<()> {
    let clones = common::start_clones(4).await?;
    for other in &clones[1..] {
        clones[0].add(other).await?;
    }
    common::wait_full_mesh(&clones, Duration::from_secs(10)).await?;
    let mut counters = Vec::new();
    let mut subs = Vec::new();
    for c in &clones {
        for _ in 0..SUBS_PER_CLONE {
            let cl = Client::connect(ClientConfig::new([c.url.clone()])).await?;
            let mut inbox = cl.deliveries().expect("inbox");
            cl.subscribe(&["bench"])?;
            let counter = Arc::new(Counter::default());
            let k = counter.clone();
            tokio::spawn(async move {
                let mut next = 0u64;
                let mut buf = Vec::with_capacity(1024);
                while inbox.recv_many(&mut buf, 1024).await > 0 {
                    for d in buf.drain(..) {
                        let seq = u64::from_le_bytes(d.data[..8].try_into().unwrap_or([0; 8]));
                        if seq == WARMUP {
                            k.received.fetch_max(1, Ordering::Relaxed);
                            continue;
                        }
                        if seq < next {
                            k.dup.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if seq > next {
                            k.lost.fetch_add(seq - next, Ordering::Relaxed);
                        }
                        next = seq + 1;
                    }
                    k.received.store(next + 1, Ordering::Relaxed);
                }
            });
            counters.push(counter);
            subs.push(cl);
        }
    }
    let publisher = Client::connect(ClientConfig::new([clones[0].url.clone()])).await?;
    // warm up until every subscriber's interest has reached clone 1
    let mut payload = vec![0u8; PAYLOAD];
    payload[..8].copy_from_slice(&WARMUP.to_le_bytes());
    let start = Instant::now();
    while counters
        .iter()
        .any(|c| c.received.load(Ordering::Relaxed) == 0)
    {
        publisher.publish(Groups::one("bench"), payload.clone(), false)?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "subscribers never got the warm-up"
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let total_subs = counters.len() as u64;
    let min_received = |counters: &[Arc<Counter>]| -> u64 {
        counters
            .iter()
            .map(|c| c.received.load(Ordering::Relaxed).saturating_sub(1))
            .min()
            .unwrap_or(0)
    };
    let mut seq = 0u64;
    let mut rates = Vec::new();
    let round_time = replimesh_benches::round_time(1000);
    for _ in 0..rounds(3) {
        let first = seq;
        let t0 = Instant::now();
        while t0.elapsed() < round_time {
            let done = min_received(&counters);
            if seq - done >= WINDOW {
                // do not spin: the cores are shared with the clones
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            for _ in 0..64 {
                payload[..8].copy_from_slice(&seq.to_le_bytes());
                publisher
                    .publish_wait(Groups::one("bench"), payload.clone(), false)
                    .await?;
                seq += 1;
            }
        }
        while min_received(&counters) < seq {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(20), "deliveries stalled");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let secs = t0.elapsed().as_secs_f64();
        let rate = (seq - first) as f64 * total_subs as f64 / secs;
        eprintln!(
            "{SCENARIO}: {} messages in {secs:.3} s: {rate:.0} deliveries/s",
            seq - first
        );
        rates.push(rate);
    }
    let lost: u64 = counters
        .iter()
        .map(|c| c.lost.load(Ordering::Relaxed))
        .sum();
    let dup: u64 = counters.iter().map(|c| c.dup.load(Ordering::Relaxed)).sum();
    let params = json!({"clones": 4, "subscribers": total_subs, "payload": PAYLOAD, "window": WINDOW, "rounds": rates.len()});
    emit(
        SCENARIO,
        "deliveries",
        median(&rates),
        "deliveries/s",
        params.clone(),
    );
    emit(SCENARIO, "lost", lost as f64, "deliveries", params.clone());
    emit(
        SCENARIO,
        "duplicated",
        dup as f64,
        "deliveries",
        params.clone(),
    );
    let mut rss = Vec::new();
    for c in &clones {
        rss.push(c.rss().await? as f64 / (1024.0 * 1024.0));
    }
    let max = rss.iter().cloned().fold(0.0, f64::max);
    emit(SCENARIO, "clone_rss_max", max, "MiB", params);
    drop(subs);
    Ok(())
}
