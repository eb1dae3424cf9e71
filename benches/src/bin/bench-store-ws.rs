//! Scenario `store-ws`: see `bench-store-unix.rs`, whose code it runs
//! over `ws://`.
//! Run it with `cargo xtask bench store-ws`; see `docs/store.md`.

#[path = "bench-store-unix.rs"]
#[allow(dead_code)]
mod common;

fn main() -> anyhow::Result<()> {
    common::run("store-ws", "ws")
}
