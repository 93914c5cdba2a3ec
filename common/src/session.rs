//! The Client's session with the Hub as a sans-IO state machine, with time passed in.
//!
//! [`ClientSession`] decides *when* to dial, renew, back off, deliver a revoke, stop and exit;
//! the userspace driver does the I/O. It never reads a
//! clock: `now` is wall-clock time as a [`Duration`] since the Unix epoch, the same scale as an
//! SVID's validity, and tests drive it with a virtual clock.
//!
//! How to drive it (in the manner of quinn-proto's `Connection`):
//! 1. after every event (`handle_*`), drain [`ClientSession::poll_action`] until `None` and
//!    perform each [`Action`];
//! 2. then wait for the next I/O event or for [`ClientSession::poll_timeout`], whichever
//!    comes first; at the timeout call [`ClientSession::handle_timeout`].
//!
//! ```text
//!             ┌──── handle_dial_failed / handle_lost (backoff, full jitter) ─────┐
//!             │  (started over only after a session that lasted STABLE_SESSION)   │
//!             ▼                                                                   │
//!   new ─▶ Dialing ──handle_dialed──▶ Up{session, svid, renewal} ─────────────────┘
//!             ▲                        │  renewal Due(t) ──timeout──▶ SendRenew ──▶ Asked(t)
//!             └──── Waiting(until)     │  Asked(t) ──timeout──▶ SendRenew again
//!                                      │  ──handle_renewed(svid')──▶ Up{same session, svid'}
//!                                      │  ──handle_renew_refused──▶ Due(max(backoff, renew_pause))
//!                                      │  own SVID past not_after ──▶ Close + Exit(Expired)
//!                                      └─handle_stop──▶ Stopping ──drained / deadline──▶ Exit(Stopped)
//!   Waiting|Dialing ──handle_stop (on_stop = revoke)──▶ Revoking ──dialed──▶ Stopping (Goodbye{revoke})
//!                                      └── goodbye_budget over ──▶ RecordPendingRevoke, Exit(Stopped)
//!   new_with_pending_revoke ──▶ Revoking (no deadline) ──dialed──▶ Goodbye{revoke} ──▶ Exit(Revoked)
//!                                      └── own SVID past not_after ──▶ Exit(Expired) (still pending)
//!   Waiting|Dialing ──handle_stop (on_stop = disconnect)──▶ Exit(Stopped)
//!   Waiting past not_after ──▶ Exit(Expired)        any ──handle_revoked──▶ Exit(Revoked)
//!     (but for a retired connection closed by a stop's own revoke: handle_connection_revoked)
//!   Stopping with a revoke: handle_goodbye_acknowledged (or drained) ──▶ RevokedAtStop, or
//!     Exit(Revoked) for a pending one; lost or deadline unacknowledged ──▶ RecordPendingRevoke
//!     (a pending one, no stop asked: Revoking again, after a backoff)
//!
//!   SVID from a SPIFFE Workload API (`external_svid`): no Renew; the agent pushes new SVIDs:
//!   Up{session} ──handle_svid(svid')──▶ Up{session, Presenting} + Present (on the live connection)
//!   Presenting ──handle_presented──▶ Up{same session, svid'}  (a newer SVID meanwhile: Present again)
//!   Presenting ──handle_present_refused / no answer in time──▶ Moving{from: session} + Dial
//!   Moving ──handle_dialed(new)──▶ Up{new} + Retire{from} (the old one drains, then closes)
//!   Moving ──handle_dial_failed──▶ Moving (old one still serves; redial after a backoff)
//!   Moving ──handle_lost(from)──▶ Dialing (the dial in flight) or Waiting
//! ```
//!
//! Renewal: at half of the SVID's remaining life when it came into use (± 10 % jitter,
//! [`renewal_time`]) the machine asks for `SendRenew`; an answer that does not come within
//! `renew_answer_timeout` is asked again; a refusal retries with backoff, and no sooner than
//! the Hub's pause between two `Renew` ([`frame::renew_pause`]). A renewed SVID is
//! adopted *on the same connection*: the Hub re-binds the live session to the new serial once
//! the Client confirms it stored it, so a rotation needs no second connection and cuts no
//! query (see `docs/architecture.md` for the security argument). The next dial, after a loss,
//! uses the newest SVID.
//!
//! An SVID that comes from a SPIFFE Workload API (SPIRE) is renewed by the agent, not by the
//! Hub: the machine never asks for `Renew`. A pushed SVID ([`ClientSession::handle_svid`]) is
//! presented on the live connection ([`Action::Present`]: the new chain and a proof of its key
//! bound to that connection), and the Hub re-binds the session to it, as it does for a
//! renewal: no second connection, no query cut, however long it is open. When the Hub refuses
//! the presentation or does not answer in time, the session moves to a new connection instead,
//! make-before-break: the new connection is dialled while the old one serves, then the old one
//! is retired ([`Action::Retire`]): it says `Goodbye` without a revoke and finishes its
//! in-flight queries (within the drain time the Hub allows).

use std::collections::VecDeque;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::frame;

/// The reason of the [`Exit::Revoked`] that ends the delivery of a pending revoke.
pub const PENDING_REVOKE_REASON: &str = "stopped by the customer (revoke delivered at restart)";

/// An SVID's validity, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// First second of validity.
    pub not_before: u64,
    /// Last second of validity.
    pub not_after: u64,
}

impl Validity {
    /// Whether the SVID is past its end at `now`.
    pub fn expired_at(&self, now: Duration) -> bool {
        now >= self.end()
    }

    /// `not_after` as a [`Duration`] since the epoch.
    pub fn end(&self) -> Duration {
        Duration::from_secs(self.not_after)
    }
}

/// The knobs of a [`ClientSession`].
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Ceiling of the first reconnect wait.
    pub reconnect_initial: Duration,
    /// Bound of every reconnect wait.
    pub reconnect_max: Duration,
    /// First retry delay of a refused or unanswered renewal.
    pub renew_retry: Duration,
    /// How long the Hub has to answer `Renew` before it is asked again (and `Present` before
    /// the session moves to a new connection instead).
    pub renew_answer_timeout: Duration,
    /// How long in-flight queries may drain after a stop.
    pub stop_drain: Duration,
    /// Whether a stop asks the Hub to revoke this identity (`on_stop = "revoke"`).
    pub revoke_on_stop: bool,
    /// How long a stop without a live connection may try to reach the Hub to deliver its
    /// revoke before it records the revoke as pending and exits.
    pub goodbye_budget: Duration,
    /// The SVID comes from outside (a SPIFFE Workload API): never ask the Hub to renew it; a
    /// new one arrives through [`ClientSession::handle_svid`].
    pub external_svid: bool,
}

/// How the session ended for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Stopped locally (SIGTERM/SIGINT).
    Stopped,
    /// The Hub revoked this identity.
    Revoked {
        /// The Hub's reason, if it gave one.
        reason: String,
    },
    /// The SVID expired without renewal (the Hub was away for a whole lifetime).
    Expired,
}

/// Why the machine wants a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The SVID of this connection has expired.
    SvidExpired,
    /// The stop's drain time is over.
    StopDeadline,
    /// The Hub broke the protocol (e.g. `Renewed` without a `Renew`).
    Protocol,
}

/// What the driver must do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Dial the Hub with the current SVID and say `Hello`; report [`ClientSession::handle_dialed`]
    /// or [`ClientSession::handle_dial_failed`]. Only one dial is ever in flight.
    Dial,
    /// Make a fresh key, send `Renew` with its CSR on the current connection; report
    /// [`ClientSession::handle_renewed`] (after the new SVID is checked and stored, and the
    /// Hub told so with `Rotated`) or [`ClientSession::handle_renew_refused`].
    SendRenew,
    /// Present the SVID in use (from the Workload API) on connection `session_id`: its chain
    /// and a proof of its key; report [`ClientSession::handle_presented`] or
    /// [`ClientSession::handle_present_refused`].
    Present {
        /// The connection.
        session_id: u64,
    },
    /// Close connection `session_id` now.
    Close {
        /// The connection.
        session_id: u64,
        /// Why.
        reason: CloseReason,
    },
    /// The session moved to a newer connection: connection `session_id` says
    /// `Goodbye { revoke: false }`, serves what the Hub sent before it read that, and closes
    /// once those queries are done (bounded by the driver). Nothing is reported back.
    Retire {
        /// The old connection.
        session_id: u64,
    },
    /// Stop: send `Goodbye { revoke }` on connection `session_id`, take no new queries, and
    /// report [`ClientSession::handle_drained`] when its in-flight queries are done.
    SendGoodbye {
        /// The connection.
        session_id: u64,
        /// Whether the Hub is asked to revoke this identity.
        revoke: bool,
    },
    /// A stop could not deliver its revoke in time: record on disk that a revoke is pending,
    /// so that the next start delivers it before anything else
    /// ([`ClientSession::new_with_pending_revoke`]).
    RecordPendingRevoke,
    /// This stop's revoke was acknowledged by the Hub: record that the identity is revoked
    /// (the process still ends as [`Exit::Stopped`]: it was stopped, as asked).
    RevokedAtStop,
    /// The session is over; close whatever is left and end with this.
    Exit(Exit),
}

/// Where the session stands, for the status file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A dial is in flight and no connection is up.
    Connecting,
    /// A connection is up and serving.
    Connected {
        /// The Hub's id of the current session.
        session_id: u64,
    },
    /// Waiting before the next dial.
    Backoff {
        /// When the next dial starts.
        until: Duration,
    },
    /// Delivering a revoke (a stop without a live connection, or a revoke pending from an
    /// earlier stop): dialling the Hub only to say `Goodbye { revoke: true }`.
    Revoking,
    /// Draining in-flight queries after a stop.
    Stopping,
    /// Ended; see the [`Action::Exit`] that was polled.
    Done,
}

/// Where a renewal stands while a connection is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    /// Nothing asked; ask at the instant.
    Due(Duration),
    /// `Renew` sent; the answer is due by the instant.
    Asked(Duration),
    /// The SVID source renews (a Workload API): nothing to ask.
    External,
    /// The SVID source renewed and the new SVID is presented on the live connection; the
    /// Hub's answer is due by the instant.
    Presenting(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first dial, or a redial after a backoff, is in flight.
    Dialing,
    /// Backing off.
    Waiting {
        until: Duration,
    },
    /// A connection is up.
    Up {
        session_id: u64,
        renewal: Renewal,
    },
    /// Connection `from` serves while a dial with a newer SVID is in flight (or, with
    /// `retry_at`, waits to be retried).
    Moving {
        from: u64,
        retry_at: Option<Duration>,
    },
    /// Dialling only to deliver a revoke; the dial is in flight unless `retry_at` is set.
    /// `deadline` is `None` for a revoke pending from an earlier stop: it retries until the
    /// SVID ends (no dial can deliver it after that).
    Revoking {
        deadline: Option<Duration>,
        retry_at: Option<Duration>,
    },
    /// `Goodbye` sent on `session_id`; waiting for its queries until `deadline`. `pending` is
    /// set when this delivers a revoke pending from an earlier stop: the end is a revocation.
    /// `revoke`: the `Goodbye` asks for one. `acknowledged`: the Hub said it processed the
    /// `Goodbye` (a revoke is recorded then); without it, a revoke stays pending.
    Stopping {
        session_id: u64,
        deadline: Duration,
        pending: bool,
        revoke: bool,
        acknowledged: bool,
    },
    Done,
}

/// The Client's session state machine. See the module documentation for how to drive it.
#[derive(Debug, Clone)]
pub struct ClientSession {
    config: SessionConfig,
    state: State,
    /// The SVID in use: the current connection's (re-bound on renewal), and the next dial's.
    svid: Validity,
    backoff: Backoff,
    renew_backoff: Backoff,
    actions: VecDeque<Action>,
    /// Jitter source for renewal times, refreshed by every event that carries randomness.
    random: u64,
    /// A newer SVID arrived while the dial in flight used the older one: present it once up.
    stale_dial: bool,
    /// A newer SVID arrived while an older one was being presented: present again once
    /// that is answered.
    stale_present: bool,
    /// A local stop was asked for ([`ClientSession::handle_stop`]).
    stop_asked: bool,
    /// When the current session came up (a move to a new connection keeps it): one lost after
    /// [`STABLE_SESSION`] starts the reconnect backoff over, one lost sooner goes on with it.
    up_since: Option<Duration>,
    /// `Renew`s sent on the current connection that the Hub has not answered yet: an answer
    /// when none is due answers nothing asked ([`RenewAnswer::Unasked`]).
    renews_unanswered: u32,
}

/// What an answer to a `Renew` (`Renewed`, or a `Refused` outside a presentation) answers:
/// [`ClientSession::renew_answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewAnswer {
    /// The `Renew` the machine waits for: handle it ([`ClientSession::handle_renewed`],
    /// [`ClientSession::handle_renew_refused`]).
    Awaited,
    /// An earlier `Renew`, asked again after its timeout and answered since: nothing to do.
    Late,
    /// No `Renew` is unanswered: the Hub broke the protocol ([`ClientSession::handle_unasked`]).
    Unasked,
}

/// The least time from one adopted renewal to the next `Renew`.
pub const MIN_RENEW_GAP: Duration = Duration::from_secs(1);

/// How long a session must last for its loss to start the reconnect backoff over. A Hub (or
/// a path) that ends each session right after `Welcome` would otherwise be dialled again
/// within `reconnect_initial` for ever; with it, the waits grow to `reconnect_max` as for
/// failed dials.
pub const STABLE_SESSION: Duration = Duration::from_secs(10);

impl ClientSession {
    /// A session for an SVID valid over `svid`, starting at `now`: the first action is a
    /// [`Action::Dial`], or [`Action::Exit`] with [`Exit::Expired`] when the SVID is over.
    pub fn new(config: SessionConfig, svid: Validity, now: Duration, random: u64) -> Self {
        let backoff = Backoff::new(config.reconnect_initial, config.reconnect_max);
        let renew_backoff = Backoff::new(
            config.renew_retry,
            config.reconnect_max.max(config.renew_retry),
        );
        let mut s = Self {
            config,
            state: State::Dialing,
            svid,
            backoff,
            renew_backoff,
            actions: VecDeque::new(),
            random,
            stale_dial: false,
            stale_present: false,
            stop_asked: false,
            up_since: None,
            renews_unanswered: 0,
        };
        s.dial_or_expire(now);
        s
    }

    /// A session that starts by delivering a revoke an earlier stop could not deliver: it
    /// dials (with backoff, until its SVID ends), says `Goodbye { revoke: true }`, and ends
    /// with [`Exit::Revoked`] once the Hub acknowledged the `Goodbye`; a connection lost
    /// before that is dialled again. It never serves a query. A stop meanwhile ends it with
    /// the revoke still pending; so does the SVID's end ([`Exit::Expired`]): the Hub refuses
    /// every handshake with it, and the Client would dial for ever, delivering nothing.
    pub fn new_with_pending_revoke(
        config: SessionConfig,
        svid: Validity,
        now: Duration,
        random: u64,
    ) -> Self {
        let mut s = Self::new(config, svid, now, random);
        if s.state == State::Dialing {
            s.state = State::Revoking {
                deadline: None,
                retry_at: None,
            };
        }
        s
    }

    /// The next thing to do, if any. Drain this after every event.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next instant (since the epoch) at which [`handle_timeout`](Self::handle_timeout)
    /// must be called, if any.
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.state {
            State::Dialing | State::Done => None,
            State::Waiting { until } => Some(until.min(self.svid.end())),
            State::Up {
                renewal: Renewal::Due(at) | Renewal::Asked(at) | Renewal::Presenting(at),
                ..
            } => Some(at.min(self.svid.end())),
            State::Up {
                renewal: Renewal::External,
                ..
            }
            | State::Moving { retry_at: None, .. } => Some(self.svid.end()),
            State::Moving {
                retry_at: Some(at), ..
            } => Some(at.min(self.svid.end())),
            // A pending revoke has no deadline of its own: the SVID's end is one.
            State::Revoking { deadline, retry_at } => {
                let deadline = deadline.unwrap_or_else(|| self.svid.end());
                Some(retry_at.map_or(deadline, |at| at.min(deadline)))
            }
            State::Stopping { deadline, .. } => Some(deadline),
        }
    }

    /// Where the session stands.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::Dialing => Phase::Connecting,
            State::Waiting { until } => Phase::Backoff { until },
            State::Up { session_id, .. }
            | State::Moving {
                from: session_id, ..
            } => Phase::Connected { session_id },
            State::Revoking { .. } => Phase::Revoking,
            State::Stopping { .. } => Phase::Stopping,
            State::Done => Phase::Done,
        }
    }

    /// When the next renewal will be asked for (wall time), while a connection is up and
    /// nothing is asked yet.
    pub fn renewal_due(&self) -> Option<Duration> {
        match self.state {
            State::Up {
                renewal: Renewal::Due(at),
                ..
            } => Some(at),
            _ => None,
        }
    }

    /// Reconnects in a row since the last session that lasted ([`STABLE_SESSION`]): failed
    /// dials, and sessions that ended sooner.
    pub fn failures(&self) -> u32 {
        self.backoff.attempts()
    }

    /// The validity of the SVID in use.
    pub fn svid(&self) -> Validity {
        self.svid
    }

    /// Whether a `Renew` is waiting for its answer (what answers a `Renew` at any other time is
    /// late or unasked: [`renew_answer`](Self::renew_answer)).
    pub fn awaiting_renewal(&self) -> bool {
        matches!(
            self.state,
            State::Up {
                renewal: Renewal::Asked(_),
                ..
            }
        )
    }

    /// Whether a `Present` is waiting for its answer (a `Presented` at any other time is a
    /// protocol violation by the Hub, and a `Refused` answers something else).
    pub fn awaiting_presentation(&self) -> bool {
        matches!(
            self.state,
            State::Up {
                renewal: Renewal::Presenting(_),
                ..
            }
        )
    }

    /// The dial asked for by [`Action::Dial`] brought session `session_id` up.
    pub fn handle_dialed(&mut self, now: Duration, session_id: u64, random: u64) {
        self.random = random;
        match self.state {
            State::Dialing | State::Waiting { .. } => {
                self.up_since = Some(now);
                self.renews_unanswered = 0;
                self.up(now, session_id);
                self.present_if_stale(now);
            }
            // The newer SVID is in use: the old connection drains and goes. The session goes
            // on: how long it has lasted stays.
            State::Moving { from, .. } => {
                self.up_since.get_or_insert(now);
                self.renews_unanswered = 0;
                self.actions.push_back(Action::Retire { session_id: from });
                self.up(now, session_id);
                self.present_if_stale(now);
            }
            // Reached only to deliver the revoke.
            State::Revoking { deadline, .. } => {
                self.actions.push_back(Action::SendGoodbye {
                    session_id,
                    revoke: true,
                });
                self.state = State::Stopping {
                    session_id,
                    deadline: now + self.config.stop_drain,
                    pending: deadline.is_none(),
                    revoke: true,
                    acknowledged: false,
                };
            }
            // A dial that finished when it was no longer wanted is not used.
            State::Up { .. } | State::Stopping { .. } | State::Done => {
                self.actions.push_back(Action::Close {
                    session_id,
                    reason: CloseReason::StopDeadline,
                });
            }
        }
    }

    /// The dial asked for by [`Action::Dial`] failed (not a revocation: that is
    /// [`handle_revoked`](Self::handle_revoked)).
    pub fn handle_dial_failed(&mut self, now: Duration, random: u64) {
        self.random = random;
        // The next dial presents the newest SVID anyway.
        self.stale_dial = false;
        match &mut self.state {
            State::Dialing => self.back_off(now, random),
            State::Revoking { deadline, retry_at } => {
                let mut at = now + self.backoff.next_delay(random);
                if let Some(d) = deadline {
                    at = at.min(*d);
                }
                *retry_at = Some(at);
            }
            // The old connection still serves: try again later.
            State::Moving { retry_at, .. } => {
                *retry_at = Some(now + self.backoff.next_delay(random));
            }
            _ => {}
        }
    }

    /// Connection `session_id` ended without a revocation (closed, timed out, reset).
    pub fn handle_lost(&mut self, now: Duration, session_id: u64, random: u64) {
        self.random = random;
        match self.state {
            State::Up {
                session_id: current,
                ..
            } if current == session_id => self.back_off(now, random),
            // The old connection went before the new one came: the dial in flight (if any)
            // becomes the plain reconnect.
            State::Moving {
                from,
                retry_at: None,
            } if from == session_id => self.state = State::Dialing,
            State::Moving { from, .. } if from == session_id => self.back_off(now, random),
            State::Stopping {
                session_id: current,
                ..
            } if current == session_id => self.finish_stop(Some(now)),
            _ => {}
        }
    }

    /// The Hub processed the `Goodbye` sent on `session_id` (it finished its side of the
    /// control stream): a revoke it asked for is recorded. Queries may still be running.
    pub fn handle_goodbye_acknowledged(&mut self, session_id: u64) {
        if let State::Stopping {
            session_id: current,
            acknowledged,
            ..
        } = &mut self.state
        {
            if *current == session_id {
                *acknowledged = true;
            }
        }
    }

    /// A stopping connection has no query left, and the Hub acknowledged its `Goodbye`.
    pub fn handle_drained(&mut self, session_id: u64) {
        self.handle_goodbye_acknowledged(session_id);
        if let State::Stopping {
            session_id: current,
            ..
        } = self.state
        {
            if current == session_id {
                // Drained implies acknowledged: no retry can be due, so no time is needed.
                self.finish_stop(None);
            }
        }
    }

    /// The Hub issued a renewed SVID valid over `svid`, and the driver adopted it (checked,
    /// stored, and confirmed to the Hub with `Rotated`). The connection goes on with it.
    pub fn handle_renewed(&mut self, now: Duration, svid: Validity) {
        match self.state {
            State::Up {
                session_id,
                renewal: Renewal::Asked(_),
            } => {
                self.renew_backoff.reset();
                self.svid = svid;
                self.up(now, session_id);
                // An SVID with (almost) no life left cannot make the next renewal due at
                // once: a Hub cannot drive renewals (a key, fsyncs and a record each) in a
                // loop. The shortest lifetime a Hub issues, 4 s, renews every 2 s; an SVID
                // issued with less than this gap left ends before it is renewed.
                if let State::Up {
                    renewal: Renewal::Due(at),
                    ..
                } = &mut self.state
                {
                    *at = (*at).max(now + MIN_RENEW_GAP);
                }
            }
            // Not asked: the Hub broke the protocol.
            State::Up { session_id, .. } => self.protocol_broken(now, session_id),
            _ => {}
        }
    }

    /// The SVID source (a Workload API) delivered a new SVID valid over `svid`: the next dial
    /// uses it, and a live connection presents it (it moves to a new connection made with it
    /// if the Hub does not take it). Ignored unless the session was built with
    /// `external_svid`.
    pub fn handle_svid(&mut self, now: Duration, svid: Validity) {
        if !self.config.external_svid {
            return;
        }
        self.svid = svid;
        match self.state {
            // The answer to the older one decides; then the newest is presented.
            State::Up {
                renewal: Renewal::Presenting(_),
                ..
            } => self.stale_present = true,
            State::Up { session_id, .. } => self.present(now, session_id),
            // The dial in flight presents the older SVID: present the newer once it is up.
            State::Dialing | State::Moving { retry_at: None, .. } => self.stale_dial = true,
            // The next dial uses the new SVID anyway.
            State::Moving { .. }
            | State::Waiting { .. }
            | State::Revoking { .. }
            | State::Stopping { .. }
            | State::Done => {}
        }
    }

    /// The driver sent a `Renew` on the current connection (for [`Action::SendRenew`]; it may
    /// send none, while the key is still being stored, or when no key could be made): one more
    /// answer is due.
    pub fn renew_sent(&mut self) {
        self.renews_unanswered += 1;
    }

    /// The Hub answered a `Renew` on the current connection (`Renewed`, or `Refused` outside a
    /// presentation): which one it answers. The Hub answers each `Renew` once, in order, so a
    /// `Renew` asked again after its timeout gets two answers: the first is awaited, the
    /// second late. An answer with none due is unasked.
    pub fn renew_answer(&mut self) -> RenewAnswer {
        if self.renews_unanswered == 0 {
            return RenewAnswer::Unasked;
        }
        self.renews_unanswered -= 1;
        if self.awaiting_renewal() {
            RenewAnswer::Awaited
        } else {
            RenewAnswer::Late
        }
    }

    /// The Hub sent, on connection `session_id`, an answer to nothing this Client asked (a
    /// `Renewed` or `Refused` with no `Renew` unanswered, a `Presented` with no presentation in
    /// flight): it broke the protocol, and the connection is closed. Another connection's
    /// changes nothing.
    ///
    /// Returns whether it closed the connection: not while a session moves to a new connection
    /// (an SVID from SPIRE the Hub did not take live), where a `Refused` on the old connection
    /// may be the late answer to the presentation that timed out.
    pub fn handle_unasked(&mut self, now: Duration, session_id: u64) -> bool {
        match self.state {
            State::Up {
                session_id: current,
                ..
            } if current == session_id => {
                self.protocol_broken(now, session_id);
                true
            }
            _ => false,
        }
    }

    /// The Hub re-bound connection `session_id`'s session to the presented SVID. An SVID
    /// delivered meanwhile is presented next. An answer from another connection (one retired
    /// after its presentation timed out) changes nothing.
    pub fn handle_presented(&mut self, now: Duration, session_id: u64) {
        match self.state {
            State::Up {
                session_id: current,
                ..
            } if current != session_id => {}
            State::Up {
                session_id,
                renewal: Renewal::Presenting(_),
            } => {
                if std::mem::take(&mut self.stale_present) {
                    self.present(now, session_id);
                } else {
                    self.up(now, session_id);
                }
            }
            // Not asked: the Hub broke the protocol.
            State::Up { session_id, .. } => self.protocol_broken(now, session_id),
            _ => {}
        }
    }

    /// The Hub did not take the SVID presented on connection `session_id` (or the proof could
    /// not be made): move to a new connection made with the newest SVID, make-before-break.
    pub fn handle_present_refused(&mut self, session_id: u64) {
        if let State::Up {
            session_id: current,
            renewal: Renewal::Presenting(_),
        } = self.state
        {
            if current == session_id {
                self.start_move(current);
            }
        }
    }

    /// The Hub refused the renewal, or its answer did not check out: retry with backoff, and
    /// no sooner than the Hub's pause between two `Renew` ([`frame::renew_pause`]): asked
    /// sooner, an honest Client would be refused, and audited, as a renewal flood.
    pub fn handle_renew_refused(&mut self, now: Duration, random: u64) {
        self.random = random;
        let pause = frame::renew_pause(self.svid.end().saturating_sub(now));
        if let State::Up { renewal, .. } = &mut self.state {
            if matches!(renewal, Renewal::Asked(_)) {
                *renewal = Renewal::Due(now + self.renew_backoff.next_delay(random).max(pause));
            }
        }
    }

    /// Connection `session_id` was closed because the identity is revoked. While a stop that
    /// revokes drains another connection, this is that stop's own revoke reaching a connection
    /// a move retired (the Hub closes every other connection of an identity once it has
    /// recorded its revocation): the revoke is recorded, and the stop goes on. Otherwise as
    /// [`handle_revoked`](Self::handle_revoked).
    pub fn handle_connection_revoked(&mut self, session_id: u64, reason: String) {
        if let State::Stopping {
            session_id: stopping,
            revoke: true,
            acknowledged,
            ..
        } = &mut self.state
        {
            if *stopping != session_id {
                *acknowledged = true;
                return;
            }
        }
        self.handle_revoked(reason);
    }

    /// The Hub revoked this identity (on a connection, or in a refused handshake).
    pub fn handle_revoked(&mut self, reason: String) {
        if self.state != State::Done {
            self.finish(Exit::Revoked { reason });
        }
    }

    /// A local stop (SIGTERM/SIGINT). A connection that is up says `Goodbye` and drains for
    /// at most `stop_drain`; without one, a stop that revokes tries to reach the Hub for
    /// `goodbye_budget`, and one that does not ends at once.
    pub fn handle_stop(&mut self, now: Duration) {
        self.stop_asked = true;
        match self.state {
            // A dial in flight for a move is closed when it completes (it is not wanted).
            State::Up { session_id, .. }
            | State::Moving {
                from: session_id, ..
            } => {
                self.actions.push_back(Action::SendGoodbye {
                    session_id,
                    revoke: self.config.revoke_on_stop,
                });
                self.state = State::Stopping {
                    session_id,
                    deadline: now + self.config.stop_drain,
                    pending: false,
                    revoke: self.config.revoke_on_stop,
                    acknowledged: false,
                };
            }
            // "Stopping the container revokes it" must hold when the network is bad too.
            State::Dialing | State::Waiting { .. } if self.config.revoke_on_stop => {
                // The stop's budget is short: its dials start from the first wait, whatever
                // the reconnects before it had grown to.
                self.backoff.reset();
                let in_flight = self.state == State::Dialing;
                self.state = State::Revoking {
                    deadline: Some(now + self.config.goodbye_budget),
                    retry_at: None,
                };
                if !in_flight {
                    self.actions.push_back(Action::Dial);
                }
            }
            State::Dialing | State::Waiting { .. } => self.finish(Exit::Stopped),
            // A revoke pending from an earlier stop stays pending.
            State::Revoking { deadline: None, .. } => self.finish(Exit::Stopped),
            State::Revoking { .. } | State::Stopping { .. } | State::Done => {}
        }
    }

    /// The wall clock moved against the monotonic one (a step of the host's clock, or a
    /// suspend the monotonic clock did not count), and reads `now`. Every deadline here is a
    /// wall-clock instant: after a step back, one set for "within 30 s" would lie as far away
    /// as the step, and a reconnect or a stop's drain would wait for it. Each is brought back
    /// to at most the span it was set with, from `now`; the renewal to no later than the top of
    /// the window a renewal set at `now` is drawn from (half of the SVID's life left, + 10 %),
    /// or than the retry span of a refused one, whichever is later. A move ahead changes none
    /// of them: what they waited for comes sooner, and the SVID's end is judged on the new
    /// reading at the next timeout.
    pub fn handle_clock_moved(&mut self, now: Duration) {
        let cap = |at: &mut Duration, span: Duration| *at = (*at).min(now + span);
        let reconnect = self.config.reconnect_max.max(self.config.reconnect_initial);
        if let Some(since) = &mut self.up_since {
            *since = (*since).min(now);
        }
        match &mut self.state {
            State::Waiting { until } => cap(until, reconnect),
            State::Up { renewal, .. } => match renewal {
                Renewal::Due(at) => {
                    // No earlier than the top of the jitter of a renewal set at `now` (60 % of
                    // the life left, rounded up, so that it never decreases as `now` grows):
                    // one set before a move ahead is never later, so it stays as drawn.
                    let from = self.svid.not_before.max(now.as_secs());
                    let life = self.svid.not_after.saturating_sub(from);
                    let latest = Duration::from_secs(self.svid.not_after - 2 * life / 5);
                    let retry = self
                        .config
                        .reconnect_max
                        .max(self.config.renew_retry)
                        .max(frame::renew_pause(self.svid.end().saturating_sub(now)));
                    cap(at, latest.saturating_sub(now).max(retry));
                }
                Renewal::Asked(at) | Renewal::Presenting(at) => {
                    cap(at, self.config.renew_answer_timeout);
                }
                Renewal::External => {}
            },
            State::Moving { retry_at, .. } => {
                if let Some(at) = retry_at {
                    cap(at, reconnect);
                }
            }
            State::Revoking { deadline, retry_at } => {
                if let Some(at) = deadline {
                    cap(at, self.config.goodbye_budget);
                }
                if let Some(at) = retry_at {
                    cap(at, reconnect);
                }
            }
            State::Stopping { deadline, .. } => cap(deadline, self.config.stop_drain),
            State::Dialing | State::Done => {}
        }
    }

    /// Time passed: fire every deadline at or before `now`.
    pub fn handle_timeout(&mut self, now: Duration) {
        match self.state {
            State::Waiting { .. } if self.svid.expired_at(now) => self.finish(Exit::Expired),
            State::Waiting { until } if now >= until => self.dial_or_expire(now),
            State::Up { session_id, .. }
            | State::Moving {
                from: session_id, ..
            } if self.svid.expired_at(now) => {
                self.actions.push_back(Action::Close {
                    session_id,
                    reason: CloseReason::SvidExpired,
                });
                self.finish(Exit::Expired);
            }
            // No answer to the presentation: the old connection serves while a new one is
            // dialled with the new SVID.
            State::Up {
                session_id,
                renewal: Renewal::Presenting(at),
            } if now >= at => self.start_move(session_id),
            State::Up {
                renewal: Renewal::Due(at) | Renewal::Asked(at),
                ..
            } if now >= at => {
                // Due, or asked and unanswered: ask (again) with a fresh key.
                if let State::Up { renewal, .. } = &mut self.state {
                    *renewal = Renewal::Asked(now + self.config.renew_answer_timeout);
                }
                self.actions.push_back(Action::SendRenew);
            }
            State::Moving {
                from,
                retry_at: Some(at),
            } if now >= at => {
                self.start_move(from);
            }
            State::Revoking {
                deadline: Some(deadline),
                ..
            } if now >= deadline => {
                self.actions.push_back(Action::RecordPendingRevoke);
                self.finish(Exit::Stopped);
            }
            // A pending revoke (recorded already) that its SVID outlived no longer.
            State::Revoking { deadline: None, .. } if self.svid.expired_at(now) => {
                self.finish(Exit::Expired);
            }
            State::Revoking {
                deadline,
                retry_at: Some(at),
            } if now >= at => {
                self.state = State::Revoking {
                    deadline,
                    retry_at: None,
                };
                self.actions.push_back(Action::Dial);
            }
            State::Stopping {
                session_id,
                deadline,
                ..
            } if now >= deadline => {
                self.actions.push_back(Action::Close {
                    session_id,
                    reason: CloseReason::StopDeadline,
                });
                self.finish_stop(Some(now));
            }
            _ => {}
        }
    }

    /// Serving on `session_id` with the SVID in use; its renewal is due at half of the life
    /// it has left from `now` (an SVID that came into use late renews soon, never in a loop).
    fn up(&mut self, now: Duration, session_id: u64) {
        let renewal = if self.config.external_svid {
            Renewal::External
        } else {
            let from = self.svid.not_before.max(now.as_secs());
            let at = renewal_time(from, self.svid.not_after, self.random);
            Renewal::Due(Duration::from_secs(at).max(now))
        };
        self.state = State::Up {
            session_id,
            renewal,
        };
    }

    /// Just up with a dial that used an SVID older than the newest: present the newest on it
    /// at once.
    fn present_if_stale(&mut self, now: Duration) {
        if std::mem::take(&mut self.stale_dial) {
            if let State::Up { session_id, .. } = self.state {
                self.present(now, session_id);
            }
        }
    }

    /// The Hub answered what was not asked: the current connection is closed, and the next
    /// dial comes after a backoff.
    fn protocol_broken(&mut self, now: Duration, session_id: u64) {
        self.actions.push_back(Action::Close {
            session_id,
            reason: CloseReason::Protocol,
        });
        self.back_off(now, self.random);
    }

    fn present(&mut self, now: Duration, session_id: u64) {
        self.state = State::Up {
            session_id,
            renewal: Renewal::Presenting(now + self.config.renew_answer_timeout),
        };
        self.actions.push_back(Action::Present { session_id });
    }

    fn start_move(&mut self, from: u64) {
        self.stale_dial = false;
        self.stale_present = false;
        self.state = State::Moving {
            from,
            retry_at: None,
        };
        self.actions.push_back(Action::Dial);
    }

    fn dial_or_expire(&mut self, now: Duration) {
        if self.svid.expired_at(now) {
            self.finish(Exit::Expired);
        } else {
            self.state = State::Dialing;
            self.stale_dial = false;
            self.stale_present = false;
            self.actions.push_back(Action::Dial);
        }
    }

    fn back_off(&mut self, now: Duration, random: u64) {
        self.renews_unanswered = 0;
        // A session that lasted starts the waits over; a dial that failed, or a session that
        // ended soon after it came up, goes on with them.
        if self
            .up_since
            .take()
            .is_some_and(|since| now.saturating_sub(since) >= STABLE_SESSION)
        {
            self.backoff.reset();
        }
        let until = now + self.backoff.next_delay(random);
        self.stale_present = false;
        self.state = State::Waiting { until };
    }

    /// A stop is over. A revoke the Hub acknowledged is done: one pending from an earlier stop
    /// ends as a revocation, one asked by this stop is recorded ([`Action::RevokedAtStop`]).
    /// A revoke the Hub did not acknowledge (the connection was lost, or the drain ran out
    /// first) may not have reached it: it stays pending for the next start.
    /// A revoke pending from an earlier stop that was not acknowledged, with no stop asked
    /// for, is dialled again after a backoff (at `now`): it is not over until delivered.
    fn finish_stop(&mut self, now: Option<Duration>) {
        let State::Stopping {
            pending,
            revoke,
            acknowledged,
            ..
        } = self.state
        else {
            return;
        };
        if let (true, false, false, Some(now)) = (pending, acknowledged, self.stop_asked, now) {
            self.state = State::Revoking {
                deadline: None,
                retry_at: Some(now + self.backoff.next_delay(self.random)),
            };
            return;
        }
        match (revoke, acknowledged) {
            // A pending one is on disk already: nothing new to record.
            _ if pending => {}
            (true, false) => self.actions.push_back(Action::RecordPendingRevoke),
            (true, true) => self.actions.push_back(Action::RevokedAtStop),
            (false, _) => {}
        }
        if pending && acknowledged {
            self.finish(Exit::Revoked {
                reason: PENDING_REVOKE_REASON.into(),
            });
        } else {
            self.finish(Exit::Stopped);
        }
    }

    fn finish(&mut self, exit: Exit) {
        self.state = State::Done;
        self.actions.push_back(Action::Exit(exit));
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
mod tests;
