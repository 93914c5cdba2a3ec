//! The host's wall clock, with its steps and the host's suspends told apart from its steady
//! running. Timers run on tokio's clock, which is monotonic: it ignores a step of the wall
//! clock and, on Linux, stands still while the host is suspended. What is dated by the wall
//! clock (an SVID's validity, a Client's silence at the Hub) then drifts from the timers set
//! for it; [`Clock::read`] says when, by how much and which way, so that its caller can move
//! what it dated. A process held still while its host runs on (`SIGSTOP`, `docker pause`, a
//! frozen cgroup) moves neither clock against the other: [`Stalls`] measures that time, and a
//! clock that counts it tells it as a move ahead, as it tells a suspend.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How far the wall clock may move against the monotonic one, since the last move seen (or
/// the start), before it counts as moved: NTP slews both alike, a step or a suspend moves one
/// alone. Steps under it add up, and count once their sum is over it.
const STEP: Duration = Duration::from_secs(2);

/// How often the [`Stalls`] thread wakes to see whether it was held.
const PULSE: Duration = Duration::from_millis(500);

/// Reads the wall clock and tells when it moved against tokio's.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    /// The wall clock's reading at `at`, when it last moved (or at start).
    wall: Duration,
    at: Instant,
    read_wall: fn() -> Duration,
    /// The process's stalls, when this clock counts them, and their total at `at`.
    stalls: Option<(Stalls, Duration)>,
}

/// The time this process was held still while its host ran: a thread sleeps [`PULSE`] at a
/// time, and a wake-up more than [`STEP`] past its due time means every thread of the process
/// was held that long (stopped, paused, frozen, or starved of CPU for seconds). The host's
/// suspends are not in it: the monotonic clock its sleeps run on stands still then too.
#[derive(Debug, Clone)]
pub(crate) struct Stalls(Arc<Mutex<Meter>>);

#[derive(Debug)]
struct Meter {
    /// The stalls measured so far.
    held: Duration,
    /// When the thread's sleep is due to end.
    due: Instant,
}

impl Stalls {
    /// Starts the thread; it ends with the last handle.
    pub(crate) fn start() -> std::io::Result<Self> {
        let stalls = Self::unmetered(Instant::now() + PULSE);
        let meter = Arc::downgrade(&stalls.0);
        std::thread::Builder::new()
            .name("ewii-stalls".into())
            .spawn(move || loop {
                std::thread::sleep(PULSE);
                let Some(meter) = meter.upgrade() else {
                    return;
                };
                Self(meter).woke();
            })?;
        Ok(stalls)
    }

    /// The thread woke: what its sleep was held is recorded, and the next one is due.
    fn woke(&self) {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let late = held(now, m.due);
        m.held += late;
        m.due = now + PULSE;
    }

    fn unmetered(due: Instant) -> Self {
        Self(Arc::new(Mutex::new(Meter {
            held: Duration::ZERO,
            due,
        })))
    }

    /// The stalls so far, the one in progress included: the thread may not have woken from
    /// it yet when another thread reads.
    fn held(&self) -> Duration {
        let m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        m.held + held(Instant::now(), m.due)
    }
}

/// How long a sleep due at `due` was held, seen at `now`: nothing under [`STEP`] late (a
/// busy host's scheduling), all of it past that.
fn held(now: Instant, due: Instant) -> Duration {
    let late = now.saturating_duration_since(due);
    if late > STEP {
        late
    } else {
        Duration::ZERO
    }
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

    /// A clock that also tells the time this process was held still ([`Stalls`]) as a move
    /// ahead: what it dates counts only the time the process ran.
    pub(crate) fn start_counting_stalls(stalls: Stalls) -> Self {
        Self::with(|| Duration::from_micros(crate::now_timestamp().0)).counting(stalls)
    }

    fn with(read_wall: fn() -> Duration) -> Self {
        Self {
            wall: read_wall(),
            at: Instant::now(),
            read_wall,
            stalls: None,
        }
    }

    fn counting(mut self, stalls: Stalls) -> Self {
        let held = stalls.held();
        self.stalls = Some((stalls, held));
        self
    }

    /// The wall clock now, and whether it moved.
    pub(crate) fn read(&mut self) -> Reading {
        let now = (self.read_wall)();
        let held = self.stalls.as_ref().map(|(s, _)| s.held());
        let stalled = match (&self.stalls, held) {
            (Some((_, before)), Some(held)) => held.saturating_sub(*before),
            _ => Duration::ZERO,
        };
        let expected = self.wall + self.at.elapsed().saturating_sub(stalled);
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
            if let (Some((_, before)), Some(held)) = (&mut self.stalls, held) {
                *before = held;
            }
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

    /// A process held still for 40 s (`SIGSTOP`, `docker pause`) while its host ran: both
    /// clocks ran on, and only a clock that counts the stalls tells the 40 s, as a move
    /// ahead, before the meter's thread has woken from its held sleep as after; once. A sleep
    /// that ends late by less than the step's bound is the host's scheduling, not a stall.
    #[test]
    fn a_process_held_still_is_told_as_a_move_ahead_by_a_clock_counting_stalls() {
        static PAUSED_WALL: AtomicU64 = AtomicU64::new(1_800_000_000);
        fn wall() -> Duration {
            Duration::from_secs(PAUSED_WALL.load(Ordering::SeqCst))
        }
        let stalls = Stalls::unmetered(Instant::now() + PULSE);
        let mut plain = Clock::with(wall);
        let mut counting = Clock::with(wall).counting(stalls.clone());
        // Held 40 s: the wall clock and tokio's ran, and the meter's sleep is 40 s overdue.
        let ran = |clock: &mut Clock, secs: u64| {
            clock.at = clock.at.checked_sub(Duration::from_secs(secs)).unwrap();
        };
        PAUSED_WALL.fetch_add(40, Ordering::SeqCst);
        ran(&mut plain, 40);
        ran(&mut counting, 40);
        stalls.0.lock().unwrap().due = Instant::now() - Duration::from_secs(40);
        assert_eq!(plain.read().moved, None, "the two clocks ran alike");
        let read = counting.read();
        let Some(Moved::Ahead(by)) = read.moved else {
            panic!("{read:?}");
        };
        assert!(by.abs_diff(Duration::from_secs(40)) < STEP, "{by:?}");
        // Told once, also after the meter's thread has woken and recorded it.
        stalls.woke();
        assert!(stalls.held() >= Duration::from_secs(40));
        assert_eq!(counting.read().moved, None);
        // A minute of running after it is no move.
        PAUSED_WALL.fetch_add(60, Ordering::SeqCst);
        ran(&mut counting, 60);
        assert_eq!(counting.read().moved, None);
        // A later hold is told too.
        PAUSED_WALL.fetch_add(10, Ordering::SeqCst);
        ran(&mut counting, 10);
        stalls.0.lock().unwrap().due = Instant::now() - Duration::from_secs(10);
        stalls.woke();
        assert!(matches!(counting.read().moved, Some(Moved::Ahead(_))));
        // Late by less than the bound: not a stall.
        let now = Instant::now();
        assert_eq!(held(now + Duration::from_secs(1), now), Duration::ZERO);
        assert_eq!(
            held(now + Duration::from_secs(3), now),
            Duration::from_secs(3)
        );
    }
}
