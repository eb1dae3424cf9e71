//! Issue 12's attacks on a real `replimesh node` process over real sockets,
//! one test per finding (1 to 10), scaled down to run in seconds.
//!
//! Each test starts a node from a `node.toml` of its own (limits set low
//! where that makes the bound reachable quickly), runs its attack from raw
//! sockets while probe clients on other connections ask the node something
//! every 20 ms, and asserts:
//!
//! - the node's resident memory (`VmRSS`) grew by less than the bound the
//!   test names;
//! - every probe was answered, with a median of at most 100 ms and a maximum
//!   of at most 2 s (a frozen node takes many seconds; a hard 100 ms maximum
//!   would flake on a loaded machine running a debug build);
//! - what the fix promises (a connection cut, one error, a refusal).
//!
//! The attacks run one at a time (each measures its own node). The figures
//! are printed: `cargo test -p replimesh-cli --test abuse -- --nocapture`.

mod harness;
mod mesh_limits;
mod store_limits;
mod transport_limits;
