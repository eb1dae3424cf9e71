//! Benchmark support (in progress).
