//! xtask (in progress).
fn main() {}
