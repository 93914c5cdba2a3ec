//! Scenarios of the Client session machine on a virtual clock: days pass in milliseconds, no
//! sockets, no tokio, no sleeps. Test names carry the promise ids they touch.

use super::*;

const DAY: u64 = 86_400;
const START: u64 = 1_800_000_000;

fn config() -> SessionConfig {
    SessionConfig {
        reconnect_initial: Duration::from_millis(500),
        reconnect_max: Duration::from_secs(30),
        renew_retry: Duration::from_secs(1),
        renew_answer_timeout: Duration::from_secs(10),
        stop_drain: Duration::from_secs(5),
        revoke_on_stop: true,
        goodbye_budget: Duration::from_secs(5),
        external_svid: false,
    }
}

/// An SVID from a SPIFFE Workload API: the agent renews it and pushes the new one.
fn workload_api() -> SessionConfig {
    SessionConfig {
        external_svid: true,
        ..config()
    }
}

/// A 1 h SVID as a SPIRE agent issues it, from `at` (seconds).
fn spire_svid_at(at: u64) -> Validity {
    Validity {
        not_before: at,
        not_after: at + 3_600,
    }
}

/// What the machine asks for when the SVID of connection `id` ends.
fn expired(id: u64) -> Vec<Action> {
    vec![
        Action::Close {
            session_id: id,
            reason: CloseReason::SvidExpired,
        },
        Action::Exit(Exit::Expired),
    ]
}

fn disconnect_on_stop() -> SessionConfig {
    SessionConfig {
        revoke_on_stop: false,
        ..config()
    }
}

/// A 24 h SVID issued at `at` (seconds), backdated 30 s as the Hub does.
fn svid_at(at: u64) -> Validity {
    Validity {
        not_before: at - 30,
        not_after: at + DAY,
    }
}

/// A deterministic stand-in for the driver's RNG (64-bit LCG).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0.rotate_right(11)
    }
}

/// The machine plus a virtual clock and a record of what it asked for.
struct Sim {
    s: ClientSession,
    now: Duration,
    rng: Rng,
    next_session: u64,
    log: Vec<(Duration, Action)>,
}

impl Sim {
    fn new(config: SessionConfig, svid: Validity) -> Self {
        let now = Duration::from_secs(START);
        Self {
            s: ClientSession::new(config, svid, now, 7),
            now,
            rng: Rng(42),
            next_session: 1,
            log: Vec::new(),
        }
    }

    /// Drains the actions queued by the last event.
    fn actions(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(a) = self.s.poll_action() {
            self.log.push((self.now, a.clone()));
            out.push(a);
        }
        out
    }

    /// Moves the clock to the next timeout and fires it; panics when there is none.
    fn advance(&mut self) -> Vec<Action> {
        let at = self.s.poll_timeout().expect("a timeout is pending");
        assert!(at >= self.now, "timeouts never lie in the past");
        self.now = at;
        self.s.handle_timeout(self.now);
        self.actions()
    }

    /// The next dial comes up, says `Goodbye { revoke: true }` at once, and drains: the
    /// Hub acknowledged it.
    fn revoke_delivered(&mut self) {
        let id = self.dialed();
        assert_eq!(
            self.actions(),
            vec![Action::SendGoodbye {
                session_id: id,
                revoke: true
            }]
        );
        self.s.handle_drained(id);
    }

    fn dialed(&mut self) -> u64 {
        let id = self.next_session;
        self.next_session += 1;
        let r = self.rng.next();
        self.s.handle_dialed(self.now, id, r);
        id
    }

    /// Connected with an SVID from the Workload API, and presenting the next one it pushed
    /// (valid from `START + 10`).
    fn presenting() -> (Self, u64) {
        let (mut sim, id) = Self::connected(workload_api(), spire_svid_at(START));
        assert_eq!(
            sim.push(spire_svid_at(START + 10)),
            vec![Action::Present { session_id: id }]
        );
        (sim, id)
    }

    /// An SVID pushed by the Workload API: what the machine asks for.
    fn push(&mut self, svid: Validity) -> Vec<Action> {
        self.s.handle_svid(self.now, svid);
        self.actions()
    }

    /// An SVID pushed on a live connection, presented, and refused by the Hub: what the
    /// machine asks for then.
    fn push_refused(&mut self, svid: Validity) -> Vec<Action> {
        let acts = self.push(svid);
        let [Action::Present { session_id }] = acts[..] else {
            panic!("presented: {acts:?}")
        };
        self.s.handle_present_refused(session_id);
        self.actions()
    }

    /// Connection `id` is lost `lasted` after now; returns how long the machine waits before
    /// it dials again.
    fn lost_after(&mut self, id: u64, lasted: Duration) -> Duration {
        self.now += lasted;
        let r = self.rng.next();
        self.s.handle_lost(self.now, id, r);
        let Phase::Backoff { until } = self.s.phase() else {
            panic!("a loss backs off");
        };
        until - self.now
    }

    /// The last event broke the protocol: connection `id` is closed for it, and the next dial
    /// backs off.
    fn closed_for_protocol(&mut self, id: u64) {
        assert_eq!(
            self.actions(),
            vec![Action::Close {
                session_id: id,
                reason: CloseReason::Protocol
            }]
        );
        assert!(matches!(self.s.phase(), Phase::Backoff { .. }));
    }

    fn dial_failed(&mut self) {
        let r = self.rng.next();
        self.s.handle_dial_failed(self.now, r);
    }

    /// Up and serving on a first connection.
    fn connected(config: SessionConfig, svid: Validity) -> (Self, u64) {
        let mut sim = Self::new(config, svid);
        assert_eq!(sim.actions(), vec![Action::Dial]);
        let id = sim.dialed();
        assert_eq!(sim.actions(), vec![]);
        assert_eq!(sim.s.phase(), Phase::Connected { session_id: id });
        (sim, id)
    }

    /// A stop while connection `id` is up: it says `Goodbye { revoke }` and drains.
    fn stop_saying_goodbye(&mut self, id: u64, revoke: bool) {
        self.s.handle_stop(self.now);
        assert_eq!(
            self.actions(),
            vec![Action::SendGoodbye {
                session_id: id,
                revoke
            }]
        );
    }

    /// Runs the clock until the machine asks for `SendRenew`.
    fn until_renew(&mut self) {
        loop {
            let acts = self.advance();
            if acts.contains(&Action::SendRenew) {
                return;
            }
            assert!(
                !acts.iter().any(|a| matches!(a, Action::Exit(_))),
                "ended before renewing: {acts:?}"
            );
        }
    }
}

#[test]
fn p7_p8_a_week_of_rotations_keeps_one_connection_and_never_lapses() {
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    let end = Duration::from_secs(START + 7 * DAY);
    let mut renewed_at = Vec::new();
    while sim.now < end {
        let acts = sim.advance();
        assert_eq!(acts, vec![Action::SendRenew], "at {:?}", sim.now);
        // The Hub answers with a fresh 24 h SVID; it is adopted on the same connection.
        let at = sim.now.as_secs();
        sim.s.handle_renewed(sim.now, svid_at(at));
        assert_eq!(
            sim.actions(),
            vec![],
            "no second connection, nothing closed"
        );
        assert_eq!(sim.s.phase(), Phase::Connected { session_id: id });
        assert_eq!(sim.s.svid(), svid_at(at));
        renewed_at.push(sim.now);
    }
    // Half of the remaining life ± 10 %: every 9.6 h to 14.4 h.
    assert!(
        (11..=18).contains(&renewed_at.len()),
        "{}",
        renewed_at.len()
    );
    for pair in renewed_at.windows(2) {
        let gap = (pair[1] - pair[0]).as_secs();
        assert!((DAY * 4 / 10..=DAY * 6 / 10).contains(&gap), "{gap}");
    }
    assert_eq!(sim.s.failures(), 0);
}

#[test]
fn p7_renewal_is_due_at_half_of_the_life_left_when_an_svid_comes_into_use() {
    // An SVID that was issued long before the Client started renews soon, not in a loop.
    let svid = svid_at(START - DAY * 7 / 10);
    let (mut sim, _) = Sim::connected(config(), svid);
    let left = svid.end() - sim.now;
    let due = sim.s.poll_timeout().unwrap() - sim.now;
    assert!(
        due >= left * 4 / 10 && due <= left * 6 / 10,
        "{due:?} of {left:?}"
    );
    assert_eq!(sim.advance(), vec![Action::SendRenew]);
    // A short lifetime (the Hub allows a few seconds): renewed every second or two, never
    // at once, although the Hub backdates notBefore by 30 s.
    let short = Validity {
        not_before: START - 30,
        not_after: START + 4,
    };
    let (mut sim, _) = Sim::connected(config(), short);
    for _ in 0..5 {
        let before = sim.now;
        assert_eq!(sim.advance(), vec![Action::SendRenew]);
        assert!(
            sim.now - before >= Duration::from_millis(1000),
            "{:?}",
            sim.now - before
        );
        let at = sim.now.as_secs();
        sim.s.handle_renewed(
            sim.now,
            Validity {
                not_before: at - 30,
                not_after: at + 4,
            },
        );
    }
}

#[test]
fn p7_a_hub_that_never_answers_renew_is_asked_again_until_the_svid_expires() {
    let svid = svid_at(START);
    let (mut sim, id) = Sim::connected(config(), svid);
    let mut asks = Vec::new();
    loop {
        let acts = sim.advance();
        if acts.contains(&Action::SendRenew) {
            asks.push(sim.now);
            continue;
        }
        assert_eq!(acts, expired(id));
        break;
    }
    assert_eq!(sim.now, svid.end(), "ends exactly at not_after");
    let first = asks[0].as_secs();
    assert!((START + DAY * 4 / 10..=START + DAY * 6 / 10).contains(&first));
    // Unanswered asks repeat every answer timeout: thousands, never a tight loop.
    for pair in asks.windows(2) {
        assert_eq!(pair[1] - pair[0], Duration::from_secs(10));
    }
    assert!(asks.len() > 1000, "{}", asks.len());
    assert_eq!(sim.s.phase(), Phase::Done);
    assert_eq!(sim.s.poll_timeout(), None);
}

#[test]
fn p7_a_refused_renewal_retries_with_growing_backoff_and_never_within_the_hubs_pause() {
    // A day's SVID (the Hub's pause is 5 s), and a 12 s one (a quarter of the life left).
    let short = Validity {
        not_before: START - 1,
        not_after: START + 11,
    };
    for (svid, retries) in [(svid_at(START), 6), (short, 2)] {
        let (mut sim, _) = Sim::connected(config(), svid);
        sim.until_renew();
        for i in 0..retries {
            let r = sim.rng.next();
            sim.s.handle_renew_refused(sim.now, r);
            let asked = sim.now;
            let pause = frame::renew_pause(svid.end() - asked);
            sim.until_renew();
            let gap = sim.now - asked;
            // Asked sooner, the Hub would refuse it as a flood.
            assert!(
                gap >= pause,
                "retry {i} after {gap:?}, within the pause {pause:?}"
            );
            // Full jitter under a doubling ceiling (1 s, 2 s, …, capped at 30 s).
            let ceiling = Duration::from_secs(1 << i).min(Duration::from_secs(30));
            assert!(gap <= ceiling.max(pause), "retry {i} after {gap:?}");
        }
    }
}

#[test]
fn p8_a_renewed_svid_carries_the_same_connection_past_the_old_ones_end() {
    let first = svid_at(START);
    let (mut sim, id) = Sim::connected(config(), first);
    sim.until_renew();
    let renewed = svid_at(sim.now.as_secs());
    sim.s.handle_renewed(sim.now, renewed);
    // Past the first SVID's end (the Hub answers no further renewal meanwhile): nothing is
    // closed, only renewals are asked for.
    while sim.now <= first.end() + Duration::from_secs(60) {
        assert_eq!(sim.advance(), vec![Action::SendRenew], "at {:?}", sim.now);
    }
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: id });
    // After a loss the next dial uses the renewed SVID, and its end is what counts.
    let r = sim.rng.next();
    sim.s.handle_lost(sim.now, id, r);
    assert_eq!(sim.s.svid(), renewed);
}

#[test]
fn p14_reconnects_forever_with_growing_full_jitter_backoff() {
    let mut sim = Sim::new(config(), svid_at(START));
    assert_eq!(sim.actions(), vec![Action::Dial]);
    let mut waits = Vec::new();
    for _ in 0..200 {
        sim.dial_failed();
        let Phase::Backoff { until } = sim.s.phase() else {
            panic!("must back off after a failure");
        };
        waits.push(until - sim.now);
        assert_eq!(sim.advance(), vec![Action::Dial], "never gives up");
        assert_eq!(sim.now, until);
    }
    assert_eq!(sim.s.failures(), 200);
    assert!(waits.iter().all(|w| *w <= Duration::from_secs(30)));
    assert!(
        waits.iter().skip(10).any(|w| *w > Duration::from_secs(5)),
        "grows"
    );
    let id = sim.dialed();
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: id });
    // The loss of a session that lasted backs off from the start again.
    assert!(sim.lost_after(id, STABLE_SESSION) <= Duration::from_millis(500));
    assert_eq!(
        sim.s.failures(),
        1,
        "a lasting session started the count over"
    );
}

/// A Hub (or a path) that ends every session right after `Welcome` is dialled ever less
/// often, as if each dial had failed: the backoff starts over only after a session that
/// lasted [`STABLE_SESSION`]. Before, each `Welcome` reset it, and such a Hub had the Client
/// redial within `reconnect_initial` (0.5 s) for ever, each session with its records and
/// whatever the Hub pushed on it.
#[test]
fn p14_sessions_that_end_at_once_back_off_as_failed_dials_do() {
    let mut sim = Sim::new(config(), svid_at(START));
    assert_eq!(sim.actions(), vec![Action::Dial]);
    let mut waits = Vec::new();
    for _ in 0..20 {
        let id = sim.dialed();
        waits.push(sim.lost_after(id, Duration::from_millis(50)));
        assert_eq!(sim.advance(), vec![Action::Dial]);
    }
    assert_eq!(sim.s.failures(), 20);
    let waited: Duration = waits.iter().sum();
    assert!(
        waited > Duration::from_secs(60),
        "20 sessions that ended at once took {waited:?} of waits: they must grow"
    );
    // One that lasts starts the waits over.
    let id = sim.dialed();
    assert!(sim.lost_after(id, STABLE_SESSION) <= Duration::from_millis(500));
}

/// Ten failed dials, then up on a first connection.
fn connected_after_ten_failures(config: SessionConfig, svid: Validity) -> (Sim, u64) {
    let mut sim = Sim::new(config, svid);
    assert_eq!(sim.actions(), vec![Action::Dial]);
    for _ in 0..10 {
        sim.dial_failed();
        assert_eq!(sim.advance(), vec![Action::Dial]);
    }
    assert_eq!(sim.s.failures(), 10);
    let id = sim.dialed();
    (sim, id)
}

/// A move to a new connection (an SVID from SPIRE the Hub did not take live) does not make a
/// session that lasted an hour a new one: its loss right after the move starts the waits over.
#[test]
fn p14_a_session_that_lasted_still_has_after_a_move() {
    let (mut sim, old) = connected_after_ten_failures(workload_api(), spire_svid_at(START));
    sim.now += Duration::from_secs(3_000);
    assert_eq!(
        sim.push_refused(spire_svid_at(START + 3_000)),
        vec![Action::Dial]
    );
    let new = sim.dialed();
    assert_eq!(sim.actions(), vec![Action::Retire { session_id: old }]);
    assert!(sim.lost_after(new, Duration::from_secs(1)) <= Duration::from_millis(500));
    assert_eq!(sim.s.failures(), 1);
}

/// A stop that revokes has 5 s to reach the Hub: its dials start from the first wait, however
/// long the reconnects before it had grown.
#[test]
fn p9_a_stop_after_many_reconnects_dials_from_the_first_wait() {
    let (mut sim, id) = connected_after_ten_failures(config(), svid_at(START));
    sim.lost_after(id, Duration::from_millis(50));
    sim.s.handle_stop(sim.now);
    assert_eq!(sim.actions(), vec![Action::Dial]);
    sim.dial_failed();
    assert_eq!(sim.s.failures(), 1, "the stop started the count over");
    let retry = sim.s.poll_timeout().expect("a retry");
    assert!(retry - sim.now <= Duration::from_millis(500));
}

/// A `Refused` that answers nothing asked breaks the protocol, as an unasked `Renewed` does:
/// the connection is closed and the next dial backs off. One from an older connection changes
/// nothing.
#[test]
fn p14_an_unasked_refusal_is_a_protocol_error() {
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    assert!(!sim.s.handle_unasked(sim.now, id + 1));
    assert_eq!(sim.actions(), vec![], "another connection's");
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: id });
    assert!(sim.s.handle_unasked(sim.now, id));
    sim.closed_for_protocol(id);
}

/// A Hub that issues SVIDs about to end cannot drive renewals in a loop: the next `Renew` comes
/// at least [`MIN_RENEW_GAP`] after one is adopted, however little life the SVID has. One
/// issued with less life than that ends unrenewed (the Hub chose to end it), and the shortest
/// lifetime a Hub issues (4 s) renews before its end.
#[test]
fn p7_a_renewed_svid_about_to_end_is_renewed_no_sooner_than_a_second_later() {
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    sim.until_renew();
    // Four seconds of life, the shortest a Hub issues: renewed at half of it.
    let shortest = Validity {
        not_before: sim.now.as_secs() - 1,
        not_after: sim.now.as_secs() + 4,
    };
    sim.s.handle_renewed(sim.now, shortest);
    assert_eq!(sim.actions(), vec![]);
    let adopted = sim.now;
    assert_eq!(sim.advance(), vec![Action::SendRenew]);
    assert_eq!(sim.now, adopted + Duration::from_secs(2));
    // One second of life: its half-life is now, and the loop is one renewal a second at
    // most; here it ends first.
    let nearly_over = Validity {
        not_before: sim.now.as_secs() - 30,
        not_after: sim.now.as_secs() + 1,
    };
    sim.s.handle_renewed(sim.now, nearly_over);
    assert_eq!(sim.actions(), vec![]);
    let adopted = sim.now;
    assert_eq!(sim.s.poll_timeout(), Some(adopted + MIN_RENEW_GAP));
    assert_eq!(sim.advance(), expired(id));
}

/// The Hub answers each `Renew` once, in order; a `Renew` asked again after its timeout gets
/// two answers. The first is the awaited one, the second is late and changes nothing (an
/// honest Hub whose store stalled past the timeout must not be taken for a hostile one); an
/// answer with none due is unasked.
#[test]
fn p7_p14_a_renewal_asked_twice_takes_one_answer_and_lets_the_second_go() {
    let (mut sim, _id) = Sim::connected(config(), svid_at(START));
    assert_eq!(
        sim.s.renew_answer(),
        RenewAnswer::Unasked,
        "nothing asked yet"
    );
    sim.until_renew();
    // Asked for, not sent (the driver was still storing the key): no answer is due.
    assert_eq!(sim.s.renew_answer(), RenewAnswer::Unasked);
    sim.s.renew_sent();
    // No answer within the timeout: asked again.
    assert_eq!(sim.advance(), vec![Action::SendRenew]);
    sim.s.renew_sent();
    assert_eq!(sim.s.renew_answer(), RenewAnswer::Awaited);
    let r = sim.rng.next();
    sim.s.handle_renew_refused(sim.now, r);
    assert_eq!(sim.s.renew_answer(), RenewAnswer::Late);
    assert_eq!(sim.s.renew_answer(), RenewAnswer::Unasked);
}

#[test]
fn p7_p14_expiry_while_disconnected_ends_at_not_after_and_dials_no_more() {
    let svid = svid_at(START);
    let mut sim = Sim::new(config(), svid);
    assert_eq!(sim.actions(), vec![Action::Dial]);
    loop {
        sim.dial_failed();
        let acts = sim.advance();
        if acts == vec![Action::Exit(Exit::Expired)] {
            break;
        }
        assert_eq!(acts, vec![Action::Dial]);
        assert!(sim.now < svid.end(), "no dial with an expired SVID");
    }
    assert_eq!(sim.now, svid.end());
    assert_eq!(sim.s.poll_timeout(), None);
    // An SVID already over at start never dials.
    let mut late = ClientSession::new(config(), svid, svid.end(), 1);
    assert_eq!(late.poll_action(), Some(Action::Exit(Exit::Expired)));
    assert_eq!(late.poll_action(), None);
}

#[test]
fn p9_stop_while_connected_says_goodbye_drains_and_exits() {
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    sim.stop_saying_goodbye(id, true);
    assert_eq!(sim.s.phase(), Phase::Stopping);
    // Drained: no query left, and the Hub acknowledged the `Goodbye`, so the revoke is done.
    sim.s.handle_drained(id);
    assert_eq!(
        sim.actions(),
        vec![Action::RevokedAtStop, Action::Exit(Exit::Stopped)]
    );

    // `on_stop = "disconnect"` asks for no revocation, and records none.
    let (mut sim, id) = Sim::connected(disconnect_on_stop(), svid_at(START));
    sim.stop_saying_goodbye(id, false);
    sim.s.handle_drained(id);
    assert_eq!(sim.actions(), vec![Action::Exit(Exit::Stopped)]);
}

/// Connected with the default configuration (`on_stop = "revoke"`), stopped: `Goodbye`
/// sent and taken.
fn stopping_connected() -> (Sim, u64) {
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    sim.s.handle_stop(sim.now);
    sim.actions();
    (sim, id)
}

/// A start with a pending revoke whose dial came up: `Goodbye { revoke }` sent and taken.
fn delivering_pending_revoke() -> (Sim, u64) {
    let mut sim = pending_revoke_sim();
    sim.actions();
    let id = sim.dialed();
    sim.actions();
    (sim, id)
}

/// "Stopping the container revokes it" is only said once the Hub has said so: a stop whose
/// connection is lost, or whose drain runs out, before the Hub acknowledged the `Goodbye`
/// keeps the revoke pending for the next start.
#[test]
fn p9_a_stop_the_hub_did_not_acknowledge_keeps_the_revoke_pending() {
    // Lost before the acknowledgement (the link died just before the stop).
    let (mut sim, id) = stopping_connected();
    sim.s.handle_lost(sim.now, id, 7);
    assert_eq!(
        sim.actions(),
        vec![Action::RecordPendingRevoke, Action::Exit(Exit::Stopped)]
    );

    // Acknowledged, then lost while a query still ran: the revoke is done.
    let (mut sim, id) = stopping_connected();
    sim.s.handle_goodbye_acknowledged(id);
    assert_eq!(sim.actions(), vec![]);
    sim.s.handle_lost(sim.now, id, 7);
    assert_eq!(
        sim.actions(),
        vec![Action::RevokedAtStop, Action::Exit(Exit::Stopped)]
    );

    // An acknowledgement on another connection is not this one's.
    let (mut sim, id) = stopping_connected();
    sim.s.handle_goodbye_acknowledged(id + 1);
    sim.s.handle_lost(sim.now, id, 7);
    assert_eq!(
        sim.actions(),
        vec![Action::RecordPendingRevoke, Action::Exit(Exit::Stopped)]
    );

    // Delivering a revoke pending from an earlier stop: lost before the acknowledgement,
    // it is not over; it is dialled again after a backoff, and ends once acknowledged.
    let (mut sim, id) = delivering_pending_revoke();
    sim.s.handle_lost(sim.now, id, 7);
    assert_eq!(sim.actions(), vec![]);
    assert_eq!(sim.s.phase(), Phase::Revoking);
    assert_eq!(sim.advance(), vec![Action::Dial]);
    sim.revoke_delivered();
    assert_eq!(sim.actions(), pending_revoke_done());
    // The same, its drain running out unacknowledged: dialled again too.
    let (mut sim, id) = delivering_pending_revoke();
    assert_eq!(
        sim.advance(),
        vec![Action::Close {
            session_id: id,
            reason: CloseReason::StopDeadline
        }]
    );
    assert_eq!(sim.s.phase(), Phase::Revoking);
    // A stop asked for meanwhile ends it, the revoke still pending (on disk already).
    let (mut sim, id) = delivering_pending_revoke();
    sim.s.handle_stop(sim.now);
    sim.s.handle_lost(sim.now, id, 7);
    assert_eq!(sim.actions(), vec![Action::Exit(Exit::Stopped)]);
    // Acknowledged, then lost: revoked.
    let (mut sim, id) = delivering_pending_revoke();
    sim.s.handle_goodbye_acknowledged(id);
    sim.s.handle_lost(sim.now, id, 7);
    assert_eq!(sim.actions(), pending_revoke_done());
}

#[test]
fn p9_a_stop_whose_queries_do_not_finish_ends_at_the_drain_bound() {
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    let stopped_at = sim.now;
    sim.s.handle_stop(sim.now);
    sim.actions();
    sim.s.handle_goodbye_acknowledged(id);
    assert_eq!(
        sim.advance(),
        vec![
            Action::Close {
                session_id: id,
                reason: CloseReason::StopDeadline
            },
            Action::RevokedAtStop,
            Action::Exit(Exit::Stopped)
        ]
    );
    assert_eq!(
        sim.now - stopped_at,
        Duration::from_secs(5),
        "bounded by stop_drain"
    );
    // The same bound without the Hub's acknowledgement: the revoke stays pending.
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    sim.s.handle_stop(sim.now);
    sim.actions();
    assert_eq!(
        sim.advance(),
        vec![
            Action::Close {
                session_id: id,
                reason: CloseReason::StopDeadline
            },
            Action::RecordPendingRevoke,
            Action::Exit(Exit::Stopped)
        ]
    );
    // A stop during a renewal is a stop: an answer that comes late changes nothing.
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    sim.until_renew();
    sim.s.handle_stop(sim.now);
    sim.actions();
    sim.s.handle_renewed(sim.now, svid_at(sim.now.as_secs()));
    sim.s.handle_drained(id);
    assert_eq!(
        sim.actions(),
        vec![Action::RevokedAtStop, Action::Exit(Exit::Stopped)]
    );
}

#[test]
fn p9_stop_without_a_revoke_while_disconnected_exits_at_once() {
    let mut sim = Sim::new(disconnect_on_stop(), svid_at(START));
    sim.actions();
    sim.dial_failed();
    sim.s.handle_stop(sim.now);
    assert_eq!(sim.actions(), vec![Action::Exit(Exit::Stopped)]);
    // A dial that completes after the stop is closed, not served.
    let mut sim = Sim::new(disconnect_on_stop(), svid_at(START));
    sim.actions();
    sim.s.handle_stop(sim.now);
    assert_eq!(sim.actions(), vec![Action::Exit(Exit::Stopped)]);
    let late = sim.dialed();
    assert_eq!(
        sim.actions(),
        vec![Action::Close {
            session_id: late,
            reason: CloseReason::StopDeadline
        }]
    );
}

#[test]
fn p9_stop_while_disconnected_still_delivers_the_revoke() {
    // Backing off when the stop comes: dial at once, only to say Goodbye.
    let mut sim = Sim::new(config(), svid_at(START));
    sim.actions();
    sim.dial_failed();
    sim.s.handle_stop(sim.now);
    assert_eq!(sim.actions(), vec![Action::Dial]);
    assert_eq!(sim.s.phase(), Phase::Revoking);
    sim.revoke_delivered();
    assert_eq!(
        sim.actions(),
        vec![Action::RevokedAtStop, Action::Exit(Exit::Stopped)]
    );

    // A dial in flight when the stop comes is used for the Goodbye; no second dial.
    let mut sim = Sim::new(config(), svid_at(START));
    sim.actions();
    sim.s.handle_stop(sim.now);
    assert_eq!(sim.actions(), vec![]);
    let id = sim.dialed();
    assert_eq!(
        sim.actions(),
        vec![Action::SendGoodbye {
            session_id: id,
            revoke: true
        }]
    );
}

#[test]
fn p9_a_stop_that_cannot_reach_the_hub_records_a_pending_revoke_within_its_budget() {
    let mut sim = Sim::new(config(), svid_at(START));
    sim.actions();
    sim.dial_failed();
    let stopped_at = sim.now;
    sim.s.handle_stop(sim.now);
    assert_eq!(sim.actions(), vec![Action::Dial]);
    let acts = loop {
        sim.dial_failed();
        let acts = sim.advance();
        if acts != vec![Action::Dial] {
            break acts;
        }
    };
    assert_eq!(
        acts,
        vec![Action::RecordPendingRevoke, Action::Exit(Exit::Stopped)]
    );
    assert_eq!(
        sim.now - stopped_at,
        Duration::from_secs(5),
        "goodbye_budget"
    );
}

/// What ends the delivery of a pending revoke the Hub acknowledged.
fn pending_revoke_done() -> Vec<Action> {
    vec![Action::Exit(Exit::Revoked {
        reason: PENDING_REVOKE_REASON.into(),
    })]
}

/// A fresh start with a revoke pending from an earlier stop.
fn pending_revoke_sim() -> Sim {
    Sim {
        s: ClientSession::new_with_pending_revoke(
            config(),
            svid_at(START),
            Duration::from_secs(START),
            3,
        ),
        ..Sim::new(config(), svid_at(START))
    }
}

/// P9, P14: a revoke pending from an earlier stop is tried until the SVID ends, and no longer:
/// the Hub refuses every handshake made with an ended SVID, so the Client used to dial every
/// 30 s for ever, a `session_failed` record each time, `health` saying it was stopping. It
/// ends as expired (the marker stays: the revoke was not delivered), even with a retry or a
/// dial in flight.
#[test]
fn p9_p14_a_pending_revoke_ends_with_its_svid() {
    let mut sim = pending_revoke_sim();
    assert_eq!(sim.actions(), vec![Action::Dial]);
    let end = sim.s.svid.end();
    while sim.now < end {
        sim.dial_failed();
        assert!(
            sim.s.poll_timeout().is_some_and(|t| t <= end),
            "woken by the end at the latest"
        );
        let next = sim.advance();
        if sim.now < end {
            assert_eq!(next, vec![Action::Dial]);
        } else {
            assert_eq!(next, vec![Action::Exit(Exit::Expired)]);
        }
    }
    assert_eq!(sim.s.phase(), Phase::Done);

    // A dial in flight at the end: the end still comes.
    let mut sim = pending_revoke_sim();
    sim.actions();
    assert_eq!(sim.s.poll_timeout(), Some(sim.s.svid.end()));
    sim.now = sim.s.svid.end();
    sim.s.handle_timeout(sim.now);
    assert_eq!(sim.actions(), vec![Action::Exit(Exit::Expired)]);
}

#[test]
fn p9_a_pending_revoke_is_delivered_before_anything_else_at_the_next_start() {
    let mut sim = pending_revoke_sim();
    assert_eq!(sim.actions(), vec![Action::Dial]);
    assert_eq!(sim.s.phase(), Phase::Revoking);
    // The Hub stays away for a long time: retry for ever, never give up, never serve.
    for _ in 0..100 {
        sim.dial_failed();
        assert_eq!(sim.advance(), vec![Action::Dial]);
    }
    let id = sim.dialed();
    assert_eq!(
        sim.actions(),
        vec![Action::SendGoodbye {
            session_id: id,
            revoke: true
        }]
    );
    assert_eq!(sim.s.phase(), Phase::Stopping, "no query is served");
    sim.s.handle_drained(id);
    assert_eq!(sim.actions(), pending_revoke_done());

    // A stop while it is still trying leaves the revoke pending (nothing new to record).
    let mut sim = pending_revoke_sim();
    sim.actions();
    sim.dial_failed();
    sim.s.handle_stop(sim.now);
    assert_eq!(sim.actions(), vec![Action::Exit(Exit::Stopped)]);

    // The Hub answers the handshake with REVOKED (it revoked meanwhile): that is the end.
    let mut sim = pending_revoke_sim();
    sim.actions();
    sim.s.handle_revoked("grace over".into());
    assert_eq!(
        sim.actions(),
        vec![Action::Exit(Exit::Revoked {
            reason: "grace over".into()
        })]
    );
}

/// Drives a fresh machine into each state a revocation can meet.
fn in_every_state() -> Vec<(&'static str, Sim)> {
    let mut out = Vec::new();
    let mut sim = Sim::new(config(), svid_at(START));
    sim.actions();
    out.push(("dialing", sim));

    let mut sim = Sim::new(config(), svid_at(START));
    sim.actions();
    sim.dial_failed();
    out.push(("backing off", sim));

    let (sim, _) = Sim::connected(config(), svid_at(START));
    out.push(("up", sim));

    let (mut sim, _) = Sim::connected(config(), svid_at(START));
    sim.until_renew();
    out.push(("renewal asked", sim));

    let (mut sim, _) = Sim::connected(config(), svid_at(START));
    sim.until_renew();
    sim.s.handle_renewed(sim.now, svid_at(sim.now.as_secs()));
    sim.actions();
    out.push(("up after a rotation", sim));

    let (mut sim, _) = Sim::connected(config(), svid_at(START));
    sim.s.handle_stop(sim.now);
    sim.actions();
    out.push(("stopping", sim));

    let mut sim = Sim::new(config(), svid_at(START));
    sim.actions();
    sim.dial_failed();
    sim.s.handle_stop(sim.now);
    sim.actions();
    out.push(("delivering a stop's revoke", sim));

    let mut sim = Sim::new(config(), svid_at(START));
    sim.s = ClientSession::new_with_pending_revoke(config(), svid_at(START), sim.now, 1);
    sim.actions();
    sim.dial_failed();
    out.push(("delivering a pending revoke", sim));

    let (mut sim, _) = Sim::connected(workload_api(), spire_svid_at(START));
    sim.s.handle_svid(sim.now, spire_svid_at(START + 1));
    sim.actions();
    out.push(("presenting a new SVID", sim));

    let (mut sim, _) = Sim::connected(workload_api(), spire_svid_at(START));
    sim.push_refused(spire_svid_at(START + 1));
    out.push(("moving to a new SVID's connection", sim));
    out
}

#[test]
fn p10_a_revocation_in_every_state_ends_the_session_for_good() {
    for (state, mut sim) in in_every_state() {
        sim.s.handle_revoked("contract ended".into());
        assert_eq!(
            sim.actions(),
            vec![Action::Exit(Exit::Revoked {
                reason: "contract ended".into()
            })],
            "in state {state}"
        );
        assert_eq!(sim.s.phase(), Phase::Done, "{state}");
        assert_eq!(
            sim.s.poll_timeout(),
            None,
            "{state}: nothing left to wake for"
        );
        // Nothing brings it back: no dial, no renewal, no second exit.
        sim.dial_failed();
        sim.s.handle_lost(sim.now, 1, 0);
        sim.s.handle_timeout(sim.now + Duration::from_secs(DAY));
        sim.s.handle_stop(sim.now);
        sim.s.handle_revoked("again".into());
        sim.s.handle_svid(sim.now, spire_svid_at(START + 30));
        sim.s.handle_presented(sim.now, 1);
        sim.s.handle_present_refused(1);
        assert_eq!(sim.actions(), vec![], "{state}");
    }
}

#[test]
fn p7_renewed_without_renew_is_a_protocol_error() {
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    let old = sim.s.svid();
    sim.s.handle_renewed(sim.now, svid_at(START + 10));
    sim.closed_for_protocol(id);
    assert_eq!(sim.s.svid(), old, "an unasked SVID is not adopted");
}

#[test]
fn renewal_lands_around_half_life() {
    for r in [0, 1, 12345, u64::MAX] {
        let t = renewal_time(1000, 1000 + DAY, r);
        assert!(
            (1000 + DAY * 4 / 10..=1000 + DAY * 6 / 10).contains(&t),
            "{t}"
        );
    }
    assert_eq!(renewal_time(10, 10, 5), 10);
}

#[test]
fn p7_an_svid_from_the_workload_api_is_never_renewed_through_the_hub() {
    let (mut sim, id) = Sim::connected(workload_api(), spire_svid_at(START));
    assert_eq!(sim.s.renewal_due(), None, "nothing to ask the Hub");
    // Nothing happens until the SVID's end, if the agent never pushes a new one.
    let acts = sim.advance();
    assert_eq!(sim.now, Duration::from_secs(START + 3_600));
    assert_eq!(acts, expired(id));
    assert!(!sim.log.iter().any(|(_, a)| *a == Action::SendRenew));
}

#[test]
fn p5_p7_a_pushed_svid_is_presented_on_the_live_connection_and_nothing_is_dialled() {
    let (mut sim, id) = Sim::connected(workload_api(), spire_svid_at(START));
    sim.now += Duration::from_secs(1_800);
    assert_eq!(
        sim.push(spire_svid_at(START + 1_800)),
        vec![Action::Present { session_id: id }]
    );
    assert!(sim.s.awaiting_presentation());
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: id });
    sim.s.handle_presented(sim.now, id);
    assert_eq!(sim.actions(), vec![], "the same connection goes on");
    assert!(!sim.s.awaiting_presentation());
    assert_eq!(sim.s.svid(), spire_svid_at(START + 1_800));
    // It lives until the new SVID's end, not the old one's.
    let acts = sim.advance();
    assert_eq!(sim.now, Duration::from_secs(START + 1_800 + 3_600));
    assert_eq!(acts, expired(id));
    assert!(
        !sim.log.iter().skip(1).any(|(_, a)| *a == Action::Dial),
        "one connection throughout: {:?}",
        sim.log
    );
}

#[test]
fn p7_a_presentation_the_hub_does_not_answer_moves_to_a_new_connection_in_time() {
    let (mut sim, old) = Sim::presenting();
    let asked = sim.now;
    assert_eq!(sim.advance(), vec![Action::Dial]);
    assert_eq!(
        sim.now,
        asked + Duration::from_secs(10),
        "the answer timeout"
    );
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: old });
    // A late answer changes nothing: the move is under way.
    sim.s.handle_presented(sim.now, old);
    assert_eq!(sim.actions(), vec![]);
    let new = sim.dialed();
    assert_eq!(sim.actions(), vec![Action::Retire { session_id: old }]);
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: new });
    // The old connection's answers, arriving late, leave the new one alone.
    sim.s.handle_presented(sim.now, old);
    sim.s.handle_present_refused(old);
    assert_eq!(sim.actions(), vec![]);
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: new });
}

#[test]
fn p7_a_late_answer_from_the_old_connection_is_not_taken_for_the_new_ones_presentation() {
    let (mut sim, old) = Sim::presenting();
    assert_eq!(sim.advance(), vec![Action::Dial], "no answer in time");
    // A newer SVID while that dial (made with the older one) is in flight.
    sim.s.handle_svid(sim.now, spire_svid_at(START + 20));
    let new = sim.dialed();
    assert_eq!(
        sim.actions(),
        vec![
            Action::Retire { session_id: old },
            Action::Present { session_id: new }
        ]
    );
    sim.s.handle_presented(sim.now, old);
    assert_eq!(sim.actions(), vec![]);
    assert!(
        sim.s.awaiting_presentation(),
        "still waiting for the new connection's answer"
    );
    sim.s.handle_presented(sim.now, new);
    assert!(!sim.s.awaiting_presentation());
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: new });
}

#[test]
fn p9_a_stop_while_presenting_says_goodbye_and_a_late_answer_changes_nothing() {
    let (mut sim, id) = Sim::presenting();
    sim.stop_saying_goodbye(id, true);
    sim.s.handle_presented(sim.now, id);
    sim.s.handle_present_refused(id);
    assert_eq!(sim.actions(), vec![]);
    assert_eq!(sim.s.phase(), Phase::Stopping);
}

#[test]
fn p14_a_connection_lost_while_presenting_redials_with_the_newest_svid_and_presents_nothing() {
    let (mut sim, id) = Sim::presenting();
    // A newer one is waiting to be presented when the connection goes.
    sim.s.handle_svid(sim.now, spire_svid_at(START + 20));
    let r = sim.rng.next();
    sim.s.handle_lost(sim.now, id, r);
    assert_eq!(sim.actions(), vec![]);
    assert_eq!(sim.advance(), vec![Action::Dial]);
    assert_eq!(
        sim.s.svid(),
        spire_svid_at(START + 20),
        "the dial uses the newest"
    );
    let new = sim.dialed();
    assert_eq!(
        sim.actions(),
        vec![],
        "the dial presented the newest already"
    );
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: new });
}

#[test]
fn p7_a_refused_presentation_with_a_newer_svid_waiting_moves_with_the_newest() {
    let (mut sim, old) = Sim::presenting();
    sim.s.handle_svid(sim.now, spire_svid_at(START + 20));
    sim.s.handle_present_refused(old);
    assert_eq!(sim.actions(), vec![Action::Dial]);
    assert_eq!(sim.s.svid(), spire_svid_at(START + 20));
    let new = sim.dialed();
    assert_eq!(
        sim.actions(),
        vec![Action::Retire { session_id: old }],
        "nothing left to present"
    );
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: new });
}

#[test]
fn p7_the_svid_in_use_ending_while_presenting_ends_the_session() {
    let (mut sim, id) = Sim::connected(workload_api(), spire_svid_at(START));
    sim.now = Duration::from_secs(START + 3_595);
    // Delivered with only 2 s left, and the Hub never answers.
    sim.s.handle_svid(
        sim.now,
        Validity {
            not_before: START,
            not_after: START + 3_597,
        },
    );
    assert_eq!(sim.actions(), vec![Action::Present { session_id: id }]);
    assert_eq!(sim.advance(), expired(id));
    assert_eq!(sim.now, Duration::from_secs(START + 3_597));
}

#[test]
fn p7_an_svid_pushed_while_another_is_presented_is_presented_next() {
    let (mut sim, id) = Sim::presenting();
    sim.s.handle_svid(sim.now, spire_svid_at(START + 20));
    assert_eq!(sim.actions(), vec![], "one presentation at a time");
    sim.s.handle_presented(sim.now, id);
    assert_eq!(sim.actions(), vec![Action::Present { session_id: id }]);
    sim.s.handle_presented(sim.now, id);
    assert_eq!(sim.actions(), vec![]);
    assert_eq!(sim.s.svid(), spire_svid_at(START + 20));
    assert!(!sim.s.awaiting_presentation());
}

#[test]
fn p7_presented_without_present_is_a_protocol_error() {
    let (mut sim, id) = Sim::connected(workload_api(), spire_svid_at(START));
    sim.s.handle_presented(sim.now, id);
    sim.closed_for_protocol(id);
}

#[test]
fn p7_p8_a_pushed_svid_the_hub_does_not_take_moves_to_a_new_connection_before_the_old_one_goes() {
    let (mut sim, old) = Sim::connected(workload_api(), spire_svid_at(START));
    sim.now += Duration::from_secs(1_800);
    assert_eq!(
        sim.push(spire_svid_at(START + 1_800)),
        vec![Action::Present { session_id: old }]
    );
    sim.s.handle_present_refused(old);
    // Make: the old connection still serves while the new one is dialled.
    assert_eq!(sim.actions(), vec![Action::Dial]);
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: old });
    let new = sim.dialed();
    // Break: only now is the old one retired.
    assert_eq!(sim.actions(), vec![Action::Retire { session_id: old }]);
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: new });
    assert_eq!(sim.s.svid(), spire_svid_at(START + 1_800));
    // The old connection's end is no loss of the session.
    let r = sim.rng.next();
    sim.s.handle_lost(sim.now, old, r);
    assert_eq!(sim.actions(), vec![]);
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: new });
}

/// A stop that revokes, within the Hub's drain of a connection a move retired: the Hub's
/// revocation closes that connection as revoked. That is the stop's own revoke, recorded (the
/// Hub closes the others only once it is), not an operator's: the stop ends as a stop. An
/// operator's revocation of the stopping connection itself still ends it as a revocation.
#[test]
fn p9_p10_a_stop_soon_after_a_move_is_not_taken_for_a_revocation_by_its_own_revoke() {
    let moved = |config: SessionConfig| {
        let revoke = config.revoke_on_stop;
        let (mut sim, old) = Sim::connected(config, spire_svid_at(START));
        sim.now += Duration::from_secs(1_800);
        sim.push(spire_svid_at(START + 1_800));
        sim.s.handle_present_refused(old);
        sim.actions();
        let new = sim.dialed();
        assert_eq!(sim.actions(), vec![Action::Retire { session_id: old }]);
        sim.s.handle_stop(sim.now);
        assert_eq!(
            sim.actions(),
            vec![Action::SendGoodbye {
                session_id: new,
                revoke
            }]
        );
        (sim, old, new)
    };
    let (mut sim, old, new) = moved(workload_api());
    sim.s
        .handle_connection_revoked(old, "stopped by the customer".into());
    assert_eq!(sim.actions(), vec![]);
    assert_eq!(sim.s.phase(), Phase::Stopping);
    // Its connection lost before the acknowledgement: the closed old connection showed the
    // revoke recorded, so nothing stays pending.
    let r = sim.rng.next();
    sim.s.handle_lost(sim.now, new, r);
    assert_eq!(
        sim.actions(),
        vec![Action::RevokedAtStop, Action::Exit(Exit::Stopped)]
    );

    let (mut sim, _, new) = moved(workload_api());
    sim.s
        .handle_connection_revoked(new, "contract ended".into());
    assert_eq!(
        sim.actions(),
        vec![Action::Exit(Exit::Revoked {
            reason: "contract ended".into()
        })]
    );

    // A stop that does not revoke: a revoked connection is the operator's revocation.
    let (mut sim, old, _) = moved(SessionConfig {
        revoke_on_stop: false,
        ..workload_api()
    });
    sim.s
        .handle_connection_revoked(old, "contract ended".into());
    assert_eq!(
        sim.actions(),
        vec![Action::Exit(Exit::Revoked {
            reason: "contract ended".into()
        })]
    );
}

#[test]
fn p14_a_move_whose_dial_fails_keeps_serving_on_the_old_connection_and_retries() {
    let (mut sim, old) = Sim::connected(workload_api(), spire_svid_at(START));
    assert_eq!(
        sim.push_refused(spire_svid_at(START + 10)),
        vec![Action::Dial]
    );
    sim.dial_failed();
    assert_eq!(sim.actions(), vec![]);
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: old });
    let before = sim.now;
    assert_eq!(sim.advance(), vec![Action::Dial], "retried after a backoff");
    assert!(sim.now > before && sim.now <= before + Duration::from_millis(500));
    let new = sim.dialed();
    assert_eq!(sim.actions(), vec![Action::Retire { session_id: old }]);
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: new });
}

#[test]
fn p14_the_old_connection_lost_during_a_move_leaves_the_dial_in_flight_as_the_reconnect() {
    let (mut sim, old) = Sim::connected(workload_api(), spire_svid_at(START));
    assert_eq!(
        sim.push_refused(spire_svid_at(START + 10)),
        vec![Action::Dial]
    );
    let r = sim.rng.next();
    sim.s.handle_lost(sim.now, old, r);
    assert_eq!(
        sim.actions(),
        vec![],
        "no second dial while one is in flight"
    );
    assert_eq!(sim.s.phase(), Phase::Connecting);
    let new = sim.dialed();
    assert_eq!(sim.actions(), vec![], "nothing left to retire");
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: new });
}

#[test]
fn p7_an_svid_pushed_during_a_dial_is_presented_once_that_dial_is_up() {
    let mut sim = Sim::new(workload_api(), spire_svid_at(START));
    assert_eq!(sim.actions(), vec![Action::Dial]);
    sim.s.handle_svid(sim.now, spire_svid_at(START + 5));
    assert_eq!(sim.actions(), vec![], "one dial in flight at a time");
    let first = sim.dialed();
    // That dial presented the older SVID: present the newer on it.
    assert_eq!(sim.actions(), vec![Action::Present { session_id: first }]);
    sim.s.handle_presented(sim.now, first);
    assert_eq!(sim.actions(), vec![]);
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: first });
}

#[test]
fn p9_a_stop_during_a_move_says_goodbye_on_the_serving_connection_and_drops_the_new_one() {
    let (mut sim, old) = Sim::connected(workload_api(), spire_svid_at(START));
    assert_eq!(
        sim.push_refused(spire_svid_at(START + 10)),
        vec![Action::Dial]
    );
    sim.s.handle_stop(sim.now);
    assert_eq!(
        sim.actions(),
        vec![Action::SendGoodbye {
            session_id: old,
            revoke: true
        }]
    );
    let late = sim.dialed();
    assert_eq!(
        sim.actions(),
        vec![Action::Close {
            session_id: late,
            reason: CloseReason::StopDeadline
        }]
    );
    sim.s.handle_drained(old);
    assert_eq!(
        sim.actions(),
        vec![Action::RevokedAtStop, Action::Exit(Exit::Stopped)]
    );
}

#[test]
fn p7_a_pushed_svid_is_ignored_by_a_session_the_hub_renews() {
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    sim.s.handle_svid(sim.now, svid_at(START + 10));
    assert_eq!(sim.actions(), vec![]);
    assert_eq!(sim.s.phase(), Phase::Connected { session_id: id });
    assert_eq!(sim.s.svid(), svid_at(START));
}

impl Sim {
    /// The host's wall clock now reads `to` (a step, either way, or a suspend).
    fn clock_moved(&mut self, to: Duration) {
        self.now = to;
        self.s.handle_clock_moved(to);
        assert_eq!(
            self.actions(),
            vec![],
            "a clock's move alone asks for nothing"
        );
    }

    /// How long from now until the machine's next timeout.
    fn wait(&self) -> Duration {
        self.s
            .poll_timeout()
            .expect("a timeout is pending")
            .saturating_sub(self.now)
    }
}

const HOURS_2: Duration = Duration::from_secs(2 * 3_600);

#[test]
fn p14_a_clock_stepped_back_does_not_postpone_the_next_dial() {
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    sim.lost_after(id, Duration::from_secs(60));
    let back = sim.now - HOURS_2;
    sim.clock_moved(back);
    assert!(sim.wait() <= config().reconnect_max, "{:?}", sim.wait());
    assert_eq!(sim.advance(), vec![Action::Dial]);
    // A move to a new connection waiting for its retry, likewise.
    let (mut sim, id) = Sim::presenting();
    sim.s.handle_present_refused(id);
    assert_eq!(sim.actions(), vec![Action::Dial]);
    sim.dial_failed();
    sim.clock_moved(sim.now - HOURS_2);
    assert!(sim.wait() <= config().reconnect_max, "{:?}", sim.wait());
    assert_eq!(sim.advance(), vec![Action::Dial]);
}

#[test]
fn p9_a_clock_stepped_back_does_not_stretch_a_stop_or_its_revoke() {
    // Draining after `Goodbye`: at most the drain time from the step.
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    sim.stop_saying_goodbye(id, true);
    sim.clock_moved(sim.now - HOURS_2);
    assert!(sim.wait() <= config().stop_drain, "{:?}", sim.wait());
    // Without a connection: the revoke's budget, and its redial, likewise.
    let mut sim = Sim::new(config(), svid_at(START));
    assert_eq!(sim.actions(), vec![Action::Dial]);
    sim.s.handle_stop(sim.now);
    sim.dial_failed();
    sim.clock_moved(sim.now - HOURS_2);
    assert!(sim.wait() <= config().reconnect_max, "{:?}", sim.wait());
    let State::Revoking {
        deadline: Some(deadline),
        ..
    } = sim.s.state
    else {
        panic!("revoking: {:?}", sim.s.state);
    };
    assert!(deadline - sim.now <= config().goodbye_budget);
}

#[test]
fn p7_a_clock_stepped_back_renews_on_the_svid_s_own_schedule() {
    // The host's clock was 20 h ahead when the Client started (so its renewal was set near
    // the SVID's end), then set right: the renewal is due by the SVID's own half-life.
    let svid = svid_at(START);
    let mut sim = Sim::new(config(), svid);
    sim.now = Duration::from_secs(START + 20 * 3_600);
    sim.s = ClientSession::new(config(), svid, sim.now, 7);
    assert_eq!(sim.actions(), vec![Action::Dial]);
    sim.dialed();
    let due = sim.s.renewal_due().unwrap();
    assert!(due > Duration::from_secs(START + 20 * 3_600), "{due:?}");
    sim.clock_moved(Duration::from_secs(START));
    let due = sim.s.renewal_due().unwrap().as_secs() - START;
    assert!(due <= DAY * 6 / 10, "{due} s after the SVID was issued");
    // A `Renew` asked before the step waits for its answer no longer than it would have.
    sim.until_renew();
    sim.clock_moved(sim.now - HOURS_2);
    assert!(
        sim.wait() <= config().renew_answer_timeout,
        "{:?}",
        sim.wait()
    );
    assert_eq!(sim.advance(), vec![Action::SendRenew]);
}

#[test]
fn p7_a_clock_moved_ahead_past_half_life_renews_at_once_and_past_the_end_expires() {
    // A suspend of 15 h (past half-life ± 10 %): the renewal is due at the first timeout,
    // not after the same time again of running.
    let (mut sim, id) = Sim::connected(config(), svid_at(START));
    sim.clock_moved(sim.now + Duration::from_secs(15 * 3_600));
    assert_eq!(sim.wait(), Duration::ZERO);
    sim.s.handle_timeout(sim.now);
    assert_eq!(sim.actions(), vec![Action::SendRenew]);
    // One of 30 h: the SVID is over, and the session ends as expired.
    sim.clock_moved(sim.now + Duration::from_secs(15 * 3_600));
    assert_eq!(sim.wait(), Duration::ZERO);
    sim.s.handle_timeout(sim.now);
    assert_eq!(sim.actions(), expired(id));
}

#[test]
fn p7_a_clock_moved_ahead_short_of_the_renewal_leaves_it_as_drawn() {
    // A short suspend, or a small step ahead, an hour into a 24 h SVID: the renewal drawn at
    // the session's start stays, whatever its jitter (drawn again, it would come earlier by
    // up to 4 h in two cases of five, and its spread would shrink with every move).
    for seed in 0..200 {
        let mut sim = Sim::new(config(), svid_at(START));
        assert_eq!(sim.actions(), vec![Action::Dial]);
        sim.rng = Rng(seed);
        sim.dialed();
        let drawn = sim.s.renewal_due().unwrap();
        sim.clock_moved(sim.now + Duration::from_secs(3_600 + 3));
        assert_eq!(sim.s.renewal_due(), Some(drawn), "seed {seed}");
    }
}
