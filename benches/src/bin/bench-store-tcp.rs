//! Scenario `store-tcp`: see `bench-store-unix.rs`, whose code it runs
//! over `tcp://`.
//! Run it with `cargo xtask bench store-tcp`; see `docs/store.md`.

#[path = "bench-store-unix.rs"]
#[allow(dead_code)]
mod common;

fn main() -> anyhow::Result<()> {
    common::run("store-tcp", "tcp")
}
