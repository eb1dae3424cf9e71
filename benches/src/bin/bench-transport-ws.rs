//! Scenario `transport-ws`: one sender process to one receiver process over
//! `ws://`, payloads of 64 B, 1 KiB and 64 KiB, against a raw socket baseline.
//! Run it with `cargo xtask bench transport-ws`; see `docs/benchmarks.md`.

use replimesh_benches::transport_scenario::{main as scenario_main, Scheme};

fn main() -> anyhow::Result<()> {
    scenario_main("transport-ws", Scheme::Ws)
}
