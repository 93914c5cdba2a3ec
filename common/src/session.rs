//! The Client's link to the Hub as a state machine, with time passed in.
//!
//! Time is a [`Duration`] since an epoch the driver chooses (its start), so the machine never
//! reads a clock and tests drive it with a virtual one. Feed events with the `handle_*`
//! methods, then ask [`Link::poll_action`] what to do next; poll again after every event.
//!
//! ```text
//!   Idle ──poll──▶ Dialing ──handle_up──▶ Up ──handle_lost──▶ Waiting ──(until)──▶ Dialing …
//!                     └──handle_dial_failed──▶ Waiting
//!   any ──handle_revoked──▶ Revoked (final)      any ──handle_shutdown──▶ Stopped (final)
//! ```

use std::time::Duration;

use crate::backoff::Backoff;

/// Where the link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Nothing tried yet.
    Idle,
    /// A dial is in progress.
    Dialing,
    /// A session is up.
    Up {
        /// Hub-chosen session id.
        session_id: u64,
        /// When it came up.
        since: Duration,
    },
    /// Backing off until the given time.
    Waiting {
        /// When to dial again.
        until: Duration,
    },
    /// The Hub revoked this identity: never dial again.
    Revoked,
    /// Shut down locally.
    Stopped,
}

/// What the driver should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start a dial, then report `handle_up` or `handle_dial_failed`.
    Dial,
    /// Nothing until the given time (or until an event).
    WaitUntil(Duration),
    /// Serve the live session; report `handle_lost` when it ends.
    Serve,
    /// Stop for good.
    Stop,
}

/// The Client's link state machine.
#[derive(Debug, Clone)]
pub struct Link {
    state: LinkState,
    backoff: Backoff,
}

impl Link {
    /// A new link that backs off with `backoff` between failures.
    pub fn new(backoff: Backoff) -> Self {
        Self {
            state: LinkState::Idle,
            backoff,
        }
    }

    /// The current state.
    pub fn state(&self) -> LinkState {
        self.state
    }

    /// Failures in a row since the last session came up.
    pub fn failures(&self) -> u32 {
        self.backoff.attempts()
    }

    /// A session came up.
    pub fn handle_up(&mut self, now: Duration, session_id: u64) {
        if self.is_final() {
            return;
        }
        self.backoff.reset();
        self.state = LinkState::Up {
            session_id,
            since: now,
        };
    }

    /// The dial failed; `random` feeds the jitter.
    pub fn handle_dial_failed(&mut self, now: Duration, random: u64) {
        self.back_off(now, random);
    }

    /// The live session ended without a revocation.
    pub fn handle_lost(&mut self, now: Duration, random: u64) {
        self.back_off(now, random);
    }

    /// The Hub revoked this identity.
    pub fn handle_revoked(&mut self) {
        self.state = LinkState::Revoked;
    }

    /// Local shutdown was requested.
    pub fn handle_shutdown(&mut self) {
        if self.state != LinkState::Revoked {
            self.state = LinkState::Stopped;
        }
    }

    /// What to do at `now`.
    pub fn poll_action(&mut self, now: Duration) -> Action {
        match self.state {
            LinkState::Idle => {
                self.state = LinkState::Dialing;
                Action::Dial
            }
            LinkState::Waiting { until } if now >= until => {
                self.state = LinkState::Dialing;
                Action::Dial
            }
            LinkState::Waiting { until } => Action::WaitUntil(until),
            LinkState::Dialing | LinkState::Up { .. } => Action::Serve,
            LinkState::Revoked | LinkState::Stopped => Action::Stop,
        }
    }

    fn is_final(&self) -> bool {
        matches!(self.state, LinkState::Revoked | LinkState::Stopped)
    }

    fn back_off(&mut self, now: Duration, random: u64) {
        if self.is_final() {
            return;
        }
        let until = now + self.backoff.next_delay(random);
        self.state = LinkState::Waiting { until };
    }
}

/// When to renew an SVID valid from `not_before` to `not_after` (seconds since the epoch):
/// at half-life, moved by up to ±10 % of the lifetime according to `random`.
pub fn renewal_time(not_before: u64, not_after: u64, random: u64) -> u64 {
    let life = not_after.saturating_sub(not_before);
    let tenth = life / 10;
    let jitter = if tenth == 0 {
        0
    } else {
        random % (2 * tenth + 1)
    };
    not_before + life / 2 - tenth + jitter
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Link {
        Link::new(Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(10),
        ))
    }

    #[test]
    fn reconnects_forever_with_growing_backoff() {
        let mut l = link();
        let mut now = Duration::ZERO;
        assert_eq!(l.poll_action(now), Action::Dial);
        let mut waits = Vec::new();
        for _ in 0..50 {
            l.handle_dial_failed(now, u64::MAX);
            let Action::WaitUntil(until) = l.poll_action(now) else {
                panic!("must wait after a failure");
            };
            waits.push(until - now);
            assert_eq!(
                l.poll_action(until - Duration::from_nanos(1)),
                Action::WaitUntil(until)
            );
            now = until;
            assert_eq!(l.poll_action(now), Action::Dial, "never gives up");
        }
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(10)));
        assert_eq!(l.failures(), 50);
        l.handle_up(now, 7);
        assert_eq!(l.failures(), 0);
        assert_eq!(l.poll_action(now), Action::Serve);
        assert_eq!(
            l.state(),
            LinkState::Up {
                session_id: 7,
                since: now
            }
        );
    }

    #[test]
    fn revoked_is_final() {
        let mut l = link();
        l.poll_action(Duration::ZERO);
        l.handle_up(Duration::ZERO, 1);
        l.handle_revoked();
        l.handle_lost(Duration::from_secs(1), 0);
        l.handle_up(Duration::from_secs(2), 2);
        l.handle_shutdown();
        assert_eq!(l.state(), LinkState::Revoked);
        assert_eq!(l.poll_action(Duration::from_secs(3)), Action::Stop);
    }

    #[test]
    fn renewal_lands_around_half_life() {
        let day = 86_400;
        for r in [0, 1, 12345, u64::MAX] {
            let t = renewal_time(1000, 1000 + day, r);
            assert!(
                (1000 + day * 4 / 10..=1000 + day * 6 / 10).contains(&t),
                "{t}"
            );
        }
        assert_eq!(renewal_time(10, 10, 5), 10);
    }
}
