//! The host's wall clock, with its steps and the host's suspends told apart from its steady
//! running. Timers run on tokio's clock, which is monotonic: it ignores a step of the wall
//! clock and, on Linux, stands still while the host is suspended. What is dated by the wall
//! clock (an SVID's validity, a Client's silence at the Hub) then drifts from the timers set
//! for it; [`Clock::read`] says when, by how much and which way, so that its caller can move
//! what it dated.

use std::time::Duration;

use tokio::time::Instant;

/// How far the wall clock may move against the monotonic one, since the last move seen (or
/// the start), before it counts as moved: NTP slews both alike, a step or a suspend moves one
/// alone. Steps under it add up, and count once their sum is over it.
const STEP: Duration = Duration::from_secs(2);

/// Reads the wall clock and tells when it moved against tokio's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    /// The wall clock's reading at `at`, when it last moved (or at start).
    wall: Duration,
    at: Instant,
    read_wall: fn() -> Duration,
}

/// A reading of the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reading {
    /// Wall-clock time since the Unix epoch.
    pub(crate) now: Duration,
    /// Set when the wall clock moved against the monotonic one since the last reading that
    /// did: by how much, and which way.
    pub(crate) moved: Option<Moved>,
}

/// Which way the wall clock moved, and by how much.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Moved {
    /// Ahead: a step forward, or a suspend.
    Ahead(Duration),
    /// Back: a step back (a clock that ran ahead, set right).
    Back(Duration),
}

impl Moved {
    /// `ahead` or `back`, for a log line.
    pub(crate) fn way(self) -> &'static str {
        match self {
            Self::Ahead(_) => "ahead",
            Self::Back(_) => "back",
        }
    }

    /// How far.
    pub(crate) fn by(self) -> Duration {
        match self {
            Self::Ahead(by) | Self::Back(by) => by,
        }
    }
}

impl Clock {
    pub(crate) fn start() -> Self {
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
    pub(crate) fn read(&mut self) -> Reading {
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
}
