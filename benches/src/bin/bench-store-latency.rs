//! Scenario `store-latency`: see `bench-store-unix.rs`, whose code it runs
//! over `unix://`.
//! Run it with `cargo xtask bench store-latency`; see `docs/store.md`.

#[path = "bench-store-unix.rs"]
#[allow(dead_code)]
mod common;

fn main() -> anyhow::Result<()> {
    common::run("store-latency", "unix")
}
