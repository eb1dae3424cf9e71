//! Scenario `transport-tcp`: one sender process to one receiver process over
//! `tcp://`, payloads of 64 B, 1 KiB and 64 KiB, against a raw socket baseline.
//! Run it with `cargo xtask bench transport-tcp`; see `docs/benchmarks.md`.

use replimesh_benches::transport_scenario::{main as scenario_main, Scheme};

fn main() -> anyhow::Result<()> {
    scenario_main("transport-tcp", Scheme::Tcp)
}
