//! Scenario `mesh-latency`: publish -> deliver latency at 200 messages/s over
//! 4 clones in separate processes; one subscriber on the publisher's clone
//! (local) and one on another clone (remote), reported apart (p50, p99).

#[path = "bench-mesh-common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use mesh::{Client, ClientConfig, Groups};
use replimesh_benches::{emit, watchdog, CHILD_FLAG};
use serde_json::json;

const SCENARIO: &str = "mesh-latency";
const RATE: u64 = 200;

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
    let epoch = Instant::now();
    let mut handles = Vec::new();
    let mut keep = Vec::new();
    for (name, idx) in [("local", 0usize), ("remote", 1)] {
        let cl = Client::connect(ClientConfig::new([clones[idx].url.clone()])).await?;
        let mut inbox = cl.deliveries().expect("inbox");
        cl.subscribe(&["lat"])?;
        keep.push(cl);
        handles.push((
            name,
            tokio::spawn(async move {
                let mut v = Vec::new();
                while let Some(d) = inbox.recv().await {
                    let sent = u64::from_le_bytes(d.data[..8].try_into().unwrap_or([0; 8]));
                    if sent == u64::MAX {
                        break;
                    }
                    let now = epoch.elapsed().as_nanos() as u64;
                    v.push(now.saturating_sub(sent) as f64 / 1e6);
                }
                v
            }),
        ));
    }
    let publisher = Client::connect(ClientConfig::new([clones[0].url.clone()])).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let count = replimesh_benches::rounds(1) as u64 * RATE * 5;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    for i in 0..count {
        tick.tick().await;
        let mut p = vec![0u8; 64];
        let t = if i < RATE / 2 {
            0
        } else {
            epoch.elapsed().as_nanos() as u64
        }; // first half second: warm-up
        p[..8].copy_from_slice(&t.to_le_bytes());
        publisher.publish(Groups::one("lat"), p, false)?;
    }
    let mut end = vec![0u8; 64];
    end[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    publisher.publish(Groups::one("lat"), end, false)?;
    for (name, h) in handles {
        let all = h.await?;
        let mut v: Vec<f64> = all.into_iter().skip((RATE / 2) as usize).collect();
        v.sort_by(f64::total_cmp);
        let params = json!({"subscriber": name, "rate": RATE, "samples": v.len(), "clones": 4, "payload": 64});
        emit(
            SCENARIO,
            &format!("{name}_p50"),
            replimesh_benches::percentile(&v, 50.0),
            "ms",
            params.clone(),
        );
        emit(
            SCENARIO,
            &format!("{name}_p99"),
            replimesh_benches::percentile(&v, 99.0),
            "ms",
            params,
        );
    }
    Ok(())
}
