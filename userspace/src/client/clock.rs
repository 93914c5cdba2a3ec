//! The session machine's time: the host's wall clock ([`crate::clock`]), read at every event
//! (an SVID's validity is wall time, and the Hub judges it by its own), and the randomness the
//! machine is fed.
//!
//! The driver's timers run on tokio's clock, which is monotonic: it ignores a step of the
//! wall clock and, on Linux, stands still while the host is suspended. So a wait is never
//! longer than [`CHECK_EVERY`]: a clock set ahead past the renewal's time renews within
//! seconds, not after the same time again of running, and a host that slept past the SVID's
//! end ends the Client as expired when it wakes.

use std::time::Duration;

use ewii_common::session::Validity;
use rand::RngCore;
use tokio::time::Instant;

use super::rotation::Identity;

/// The longest the driver waits without reading the wall clock again.
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(10);

/// The tokio instant to wake at for the wall-clock deadline `at`, read `now`: no later than
/// [`CHECK_EVERY`] from now, so that a move of the wall clock is seen.
pub(super) fn wake_at(at: Option<Duration>, now: Duration) -> Instant {
    let wait = at.map_or(CHECK_EVERY, |at| at.saturating_sub(now).min(CHECK_EVERY));
    Instant::now() + wait
}

pub(super) fn validity(identity: &Identity) -> Validity {
    Validity {
        not_before: identity.leaf.not_before.max(0) as u64,
        not_after: identity.leaf.not_after.max(0) as u64,
    }
}

pub(super) fn random() -> u64 {
    rand::rng().next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_never_longer_than_the_check() {
        let now = Duration::from_secs(1_000);
        let wait = |at: Option<Duration>| {
            let before = Instant::now();
            let wake = wake_at(at, now);
            (wake - before, Instant::now() - before)
        };
        let within = |(wait, slack): (Duration, Duration), of: Duration| {
            assert!(wait >= of && wait <= of + slack, "{wait:?} for {of:?}");
        };
        within(wait(None), CHECK_EVERY);
        within(
            wait(Some(now + Duration::from_secs(12 * 3_600))),
            CHECK_EVERY,
        );
        within(
            wait(Some(now + Duration::from_secs(3))),
            Duration::from_secs(3),
        );
        within(wait(Some(now - Duration::from_secs(3))), Duration::ZERO);
    }
}
