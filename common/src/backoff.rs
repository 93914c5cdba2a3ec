//! Full-jitter exponential backoff ("Exponential Backoff And Jitter", AWS Architecture Blog,
//! 2015): the n-th wait is uniform in `[0, min(cap, base * 2^n)]`.
//!
//! The randomness is an argument, so tests can pin it and the core stays free of a RNG.

use std::time::Duration;

/// Backoff state for one reconnecting link. It never gives up: that is the caller's decision
/// (only a revocation stops the Client).
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// `base` is the ceiling of the first wait; `cap` bounds every wait.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The ceiling for the next wait, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next wait, given a uniformly random `u64`; advances the attempt count.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = ceiling.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(random % nanos.saturating_add(1))
    }

    /// The wait before retry number `attempt` (0-based), given a uniformly random `u64`,
    /// without touching this state: for callers that persist the attempt count themselves
    /// (the Hub's webhook outbox keeps it in its database row).
    pub fn delay_for(&self, attempt: u32, random: u64) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        let ceiling = self.base.saturating_mul(factor).min(self.cap);
        let nanos = ceiling.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(random % nanos.saturating_add(1))
    }

    /// Number of waits handed out since the last [`reset`](Self::reset).
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Call after a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_cap_and_never_overflows() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut ceilings = Vec::new();
        for _ in 0..100 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay(0);
        }
        assert_eq!(&ceilings[..7], &[100, 200, 400, 800, 1600, 3200, 5000]);
        assert!(ceilings.iter().all(|&c| c <= 5000));
        assert_eq!(b.attempts(), 100);
    }

    #[test]
    fn jitter_spans_zero_to_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        assert_eq!(b.next_delay(0), Duration::ZERO);
        b.reset();
        assert_eq!(b.next_delay(100_000_000), Duration::from_millis(100));
        assert!(b.next_delay(u64::MAX) <= Duration::from_millis(200));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn delay_for_matches_next_delay_and_keeps_no_state() {
        let b = Backoff::new(Duration::from_millis(300), Duration::from_millis(600));
        let mut stepped = b.clone();
        for (attempt, random) in [(0u32, 7u64), (1, 123_456_789), (2, u64::MAX), (40, 42)] {
            while stepped.attempts() < attempt {
                stepped.next_delay(0);
            }
            assert_eq!(
                b.delay_for(attempt, random),
                stepped.clone().next_delay(random)
            );
        }
        assert_eq!(b.attempts(), 0, "delay_for leaves the state alone");
        assert_eq!(b.delay_for(0, 0), Duration::ZERO);
        assert_eq!(b.delay_for(0, 300_000_000), Duration::from_millis(300));
        assert!(b.delay_for(5, u64::MAX) <= Duration::from_millis(600));
    }
}
