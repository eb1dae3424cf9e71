//! Helpers shared by the mesh's test binaries.

#![allow(dead_code)]

use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

/// How long one test may run before the watchdog ends the test binary.
pub(crate) const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Ends the whole test binary (exit code 101) with the test's name on
/// stderr if it is still alive after [`TEST_LIMIT`], so a hang fails within
/// a minute instead of eating CI's time limit. A thread, not a Tokio timer:
/// it fires even when the test's runtime is blocked. Dropping the guard (the
/// test ended, passed or panicked) stops it.
#[must_use = "the watchdog stops when the guard is dropped"]
pub(crate) struct Watchdog {
    _stop: mpsc::Sender<()>,
}

/// Starts a [`Watchdog`] for the test `name`.
pub(crate) fn watchdog(name: &'static str) -> Watchdog {
    watchdog_for(name, TEST_LIMIT)
}

/// A [`Watchdog`] with its own limit.
pub(crate) fn watchdog_for(name: &'static str, limit: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            // straight to the descriptor: libtest's capture would be lost
            let _ = writeln!(
                std::io::stderr(),
                "\nWATCHDOG: test `{name}` still running after {limit:?}: it hangs; ending the test binary"
            );
            std::process::exit(101);
        }
    });
    Watchdog { _stop: tx }
}
