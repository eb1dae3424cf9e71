//! The `replimesh` binary (in progress).
fn main() {}
