//! What the workspace's tests share (this crate is not published).
//!
//! - [`test`]: `#[tokio::test]` with a deadline, so a test that waits for the
//!   network forever fails with its name instead of hanging the run (every
//!   async test in the workspace uses it).
//! - [`eventually`]: poll a condition until it holds or a deadline passes.
//! - [`NodeProc`]: a `replimesh node` process started from a config text,
//!   with its URLs, its resident memory and its descriptors.
//!
//! ```
//! use std::time::Duration;
//!
//! #[replimesh_testkit::test]
//! async fn sums() {
//!     let ok = replimesh_testkit::eventually(Duration::from_secs(1), || async { 1 + 1 == 2 }).await;
//!     assert!(ok);
//! }
//! # fn main() {}
//! ```

use std::future::Future;
use std::time::Duration;

pub use node::{rss_kib, NodeProc};
pub use replimesh_testkit_macros::test;

mod node;

/// Polls `check` every 10 ms until it returns `true` (then `true`) or
/// `within` has passed (then `false`).
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[crate::test]
    async fn a_bounded_test_runs_its_body() {
        let mut n = 0;
        let ok = crate::eventually(Duration::from_secs(5), || {
            n += 1;
            let done = n >= 3;
            async move { done }
        })
        .await;
        assert!(ok);
        assert_eq!(n, 3);
    }

    #[crate::test(deadline = 1)]
    #[should_panic(
        expected = "test a_test_past_its_deadline_fails_with_its_name did not end within 1 s"
    )]
    async fn a_test_past_its_deadline_fails_with_its_name() {
        std::future::pending::<()>().await
    }

    #[crate::test(flavor = "multi_thread", worker_threads = 2, deadline = 5)]
    async fn tokio_arguments_are_passed_on() {
        let handle = tokio::runtime::Handle::current();
        assert_eq!(handle.metrics().num_workers(), 2);
    }
}
