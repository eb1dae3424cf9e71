//! Scenario `store-durable`: `store-unix` (see `bench-store-unix.rs`, whose
//! code it runs) with a persistent authority: `BackupPersistence` with the
//! journal at `always`, so every acknowledged action was fsynced first (group
//! commit: one fsync for the dispatches that arrived during the previous
//! one). Reports actions/s applied everywhere, fsyncs/s and actions per fsync.
//! Run it with `cargo xtask bench store-durable`; see `docs/store.md`.

#[path = "bench-store-unix.rs"]
#[allow(dead_code)]
mod common;

fn main() -> anyhow::Result<()> {
    common::run("store-durable", "unix")
}
