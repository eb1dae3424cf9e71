//! Replimesh backup: crash-safe encrypted snapshots.
//!
//! This crate will hold the snapshot file format (AES-256-GCM with an
//! Argon2id-derived key), atomic replacement, the journal of committed
//! actions, and backup policies. It is being built under issue 5.
