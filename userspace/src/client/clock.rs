//! The session machine's time: the host's wall clock, read at every event (an SVID's
//! validity is wall time, and the Hub judges it by its own), with steps of that clock and
//! suspends told apart from its steady running; and the randomness the machine is fed.
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

/// How far the wall clock may move against the monotonic one, since the last move seen (or
/// the start), before it counts as moved: NTP slews both alike, a step or a suspend moves one
/// alone. Steps under it add up, and count once their sum is over it.
const STEP: Duration = Duration::from_secs(2);

/// Reads the wall clock and tells when it moved against tokio's.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    /// The wall clock's reading at `at`, when it last moved (or at start).
    wall: Duration,
    at: Instant,
    read_wall: fn() -> Duration,
}

/// A reading of the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reading {
    /// Wall-clock time since the Unix epoch.
    pub(super) now: Duration,
    /// Set when the wall clock moved against the monotonic one since the last reading that
    /// did: by how much, and which way.
    pub(super) moved: Option<Moved>,
}

/// Which way the wall clock moved, and by how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Moved {
    /// Ahead: a step forward, or a suspend.
    Ahead(Duration),
    /// Back: a step back (a clock that ran ahead, set right).
    Back(Duration),
}

impl Clock {
    pub(super) fn start() -> Self {
        Self::with(|| Duration::from_micros(crate::now_timestamp().0))
    }

    fn with(read_wall: fn() -> Duration) -> Self {
        Self {
            wall: read_wall(),
            at: Instant::now(),
            read_wall,
        }
    }

    /// The wall clock now, and whether it moved.
    pub(super) fn read(&mut self) -> Reading {
        let now = (self.read_wall)();
        let expected = self.wall + self.at.elapsed();
        let moved = if now > expected + STEP {
            Some(Moved::Ahead(now - expected))
        } else if now + STEP < expected {
            Some(Moved::Back(expected - now))
        } else {
            None
        };
        if moved.is_some() {
            self.wall = now;
            self.at = Instant::now();
        }
        Reading { now, moved }
    }

    /// The tokio instant to wake at for the wall-clock deadline `at`, read `now`: no later
    /// than [`CHECK_EVERY`] from now, so that a move of the wall clock is seen.
    pub(super) fn wake_at(at: Option<Duration>, now: Duration) -> Instant {
        let wait = at.map_or(CHECK_EVERY, |at| at.saturating_sub(now).min(CHECK_EVERY));
        Instant::now() + wait
    }
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
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// The wall clock of this test, in seconds: moved by hand. The monotonic clock runs for
    /// real, the few milliseconds of a test.
    static WALL: AtomicU64 = AtomicU64::new(1_800_000_000);

    fn wall() -> Duration {
        Duration::from_secs(WALL.load(Ordering::SeqCst))
    }

    #[test]
    fn a_step_or_a_suspend_is_told_from_the_clock_s_running() {
        let mut clock = Clock::with(wall);
        assert_eq!(
            clock.read(),
            Reading {
                now: wall(),
                moved: None
            }
        );
        // A suspend of 13 h: the wall clock ran, the monotonic one did not.
        WALL.fetch_add(13 * 3_600, Ordering::SeqCst);
        let read = clock.read();
        assert_eq!(read.now, wall());
        let Some(Moved::Ahead(by)) = read.moved else {
            panic!("{read:?}");
        };
        assert!(
            by.abs_diff(Duration::from_secs(13 * 3_600)) < STEP,
            "{by:?}"
        );
        // Told once: the next reading starts from it.
        assert_eq!(clock.read().moved, None);
        // A step back of 2 h.
        WALL.fetch_sub(2 * 3_600, Ordering::SeqCst);
        let read = clock.read();
        let Some(Moved::Back(by)) = read.moved else {
            panic!("{read:?}");
        };
        assert!(by.abs_diff(Duration::from_secs(2 * 3_600)) < STEP, "{by:?}");
        // Less than the step's bound either way is the clocks' drift, not a move.
        WALL.fetch_sub(1, Ordering::SeqCst);
        assert_eq!(clock.read().moved, None);
        WALL.fetch_add(2, Ordering::SeqCst);
        assert_eq!(clock.read().moved, None);
    }

    #[test]
    fn a_wait_is_never_longer_than_the_check() {
        let now = Duration::from_secs(1_000);
        let wait = |at: Option<Duration>| {
            let before = Instant::now();
            let wake = Clock::wake_at(at, now);
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
