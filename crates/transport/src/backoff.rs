//! [`Backoff`]: the delays between attempts to redial a peer.
//!
//! Every reconnecting side of Replimesh (mesh clients, store clients, the
//! mesh core's clone links, a node's upstream links) waits between attempts
//! with the same policy: the first delay is `min`, each failure doubles it up
//! to `max`, a success starts again from `min`, and each wait is jittered to
//! 50–100 % of the delay so that peers cut off together do not redial
//! together. The jitter comes from the caller (a number in `[0, 1)`), so a
//! sans-IO core can draw it from its own seeded generator and stay
//! deterministic.

use std::time::Duration;

/// Capped exponential backoff with jitter.
///
/// ```
/// use std::time::Duration;
/// use replimesh_transport::Backoff;
///
/// let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// assert_eq!(b.next_delay(1.0), Duration::from_millis(100)); // jitter 1.0: the whole delay
/// assert_eq!(b.next_delay(1.0), Duration::from_millis(200));
/// assert_eq!(b.next_delay(0.0), Duration::from_millis(200)); // jitter 0.0: half of 400 ms
/// b.reset();
/// assert_eq!(b.next_delay(1.0), Duration::from_millis(100));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// The delay the next failure waits (before jitter).
    current: Duration,
}

impl Backoff {
    /// A backoff from `min` doubling up to `max` (`max` below `min` counts as `min`).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The wait after one more failure: the current delay scaled to
    /// `50 % + 50 % × jitter` (`jitter` in `[0, 1]`, clamped), after which the
    /// delay doubles, up to `max`.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let delay = self.current;
        self.current = self.current.saturating_mul(2).clamp(self.min, self.max);
        delay.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// [`next_delay`](Backoff::next_delay) with jitter from the thread's random generator.
    pub fn next_random_delay(&mut self) -> Duration {
        self.next_delay(rand::random::<f64>())
    }

    /// The delay the next failure will wait, before jitter.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// A success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The first delay.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The largest delay.
    pub fn max(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let whole: Vec<u64> = (0..5)
            .map(|_| b.next_delay(1.0).as_millis() as u64)
            .collect();
        assert_eq!(whole, [50, 100, 200, 300, 300]);
        b.reset();
        assert_eq!(b.current(), Duration::from_millis(50));
    }

    #[test]
    fn jitter_keeps_half_to_all_of_the_delay() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(100));
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
        assert_eq!(b.next_delay(-3.0), Duration::from_millis(50));
        assert_eq!(b.next_delay(7.0), Duration::from_millis(100));
        for _ in 0..1000 {
            let d = b.next_random_delay();
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(100),
                "{d:?}"
            );
        }
    }

    #[test]
    fn max_below_min_is_min() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.max(), Duration::from_secs(2));
        assert_eq!(b.next_delay(1.0), Duration::from_secs(2));
        assert_eq!(b.next_delay(1.0), Duration::from_secs(2));
    }
}
