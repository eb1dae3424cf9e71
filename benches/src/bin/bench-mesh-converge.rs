//! Scenario `mesh-converge`: time until every clone is linked to every other.
//! `seed`: the jrf-ws-3 example (4 clones; clone1 adds clone2 and clone4,
//! clone3 adds clone4); `chain16`: 16 clones, clone i adds clone i-1. Clones
//! run in separate processes; the clock starts with the first `add_clone`.
//! Median of rounds (fresh processes each round).

#[path = "bench-mesh-common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use replimesh_benches::{emit, median, rounds, watchdog, CHILD_FLAG};
use serde_json::json;

const SCENARIO: &str = "mesh-converge";

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
    let mut seed = Vec::new();
    for _ in 0..rounds(3) {
        let c = common::start_clones(4).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = Instant::now();
        c[0].add(&c[1]).await?;
        c[0].add(&c[3]).await?;
        c[2].add(&c[3]).await?;
        common::wait_full_mesh(&c, Duration::from_secs(10)).await?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        eprintln!("{SCENARIO}: seed scenario converged in {ms:.2} ms");
        seed.push(ms);
    }
    emit(
        SCENARIO,
        "seed_4_clones",
        median(&seed),
        "ms",
        json!({"clones": 4, "rounds": seed.len()}),
    );
    let mut chain = Vec::new();
    for _ in 0..rounds(3) {
        let c = common::start_clones(16).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = Instant::now();
        for i in 1..c.len() {
            c[i].add(&c[i - 1]).await?;
        }
        common::wait_full_mesh(&c, Duration::from_secs(20)).await?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        eprintln!("{SCENARIO}: 16-clone chain converged in {ms:.2} ms");
        chain.push(ms);
    }
    emit(
        SCENARIO,
        "chain_16_clones",
        median(&chain),
        "ms",
        json!({"clones": 16, "rounds": chain.len()}),
    );
    Ok(())
}
