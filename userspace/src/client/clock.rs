//! The session machine's time: wall-clock time since the Unix epoch, read once at start and
//! then advanced by tokio's clock (so tests can pause it), and the randomness it is fed.

use std::time::Duration;

use ewii_common::session::Validity;
use rand::RngCore;
use tokio::time::Instant;

use super::rotation::Identity;

/// Maps the machine's wall-clock time onto tokio's clock: one reading of each at start, then
/// tokio time only, so tests can pause and advance it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    wall: Duration,
    start: Instant,
}

impl Clock {
    pub(super) fn start() -> Self {
        Self {
            wall: Duration::from_micros(crate::now_timestamp().0),
            start: Instant::now(),
        }
    }

    pub(super) fn now(&self) -> Duration {
        self.wall + self.start.elapsed()
    }

    pub(super) fn instant(&self, at: Duration) -> Instant {
        self.start + at.saturating_sub(self.wall)
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
