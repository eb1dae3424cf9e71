//! Scenario `transport-unix`: one sender process to one receiver process over
//! `unix://`, payloads of 64 B, 1 KiB and 64 KiB, against a raw socket baseline.
//! Run it with `cargo xtask bench transport-unix`; see `docs/benchmarks.md`.

use replimesh_benches::transport_scenario::{main as scenario_main, Scheme};

fn main() -> anyhow::Result<()> {
    scenario_main("transport-unix", Scheme::Unix)
}
