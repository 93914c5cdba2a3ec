//! Admission of new connections (issue: bounded peers): what one source address may cost the
//! Hub before it has proven anything, so that a flood from one place does not slow every other
//! Client's handshake. Decided before any TLS work where the address is all there is, and
//! after the handshake for enrolments. The bounds are fixed (docs/config.md, "Hub fixed
//! bounds"):
//!
//! - at most [`Limits::handshakes`] connections in their first moments at once (handshake,
//!   and for an enrolment the whole exchange), and [`Limits::per_address`] from one host (an
//!   IPv4 address; an IPv6 /64, which one host holds whole: [`host`]): beyond, a new one is
//!   refused before any cryptography;
//! - past that bound, a host a session came from before (since this Hub started, or recorded
//!   by the one before it) still gets in, up to [`Limits::returning_reserve`] more at once,
//!   once QUIC has validated its address (a Retry first), and at most
//!   [`Limits::returning_per_host`] in progress from it: a few hosts that hold the bound with
//!   handshakes they never finish (or enrolments that never send) cannot keep every Client
//!   from coming back after a network break or a Hub restart. A spoofed source cannot pass
//!   the Retry; a stranger at a returning host's address is still held to the per-host bound;
//! - above [`Limits::retry_above`] of them, a new connection from an address QUIC has not
//!   validated gets a Retry first (RFC 9000 §8.1): one round trip that proves the address
//!   is real before the Hub spends a handshake on it;
//! - a host with [`Limits::enrol_failures`] refused enrolments (bad tokens, bad CSRs) in
//!   [`Limits::enrol_window`] has its further enrolments refused, unread, until the window
//!   ends. (Enrolments in progress do not count: honest Clients behind one address enrol
//!   at once in a rollout. So up to [`Limits::per_address`] at once pass the check before
//!   the first is refused.) Sessions (Clients that hold an SVID) from that address are not affected;
//! - a Client opens at most [`Limits::sessions_per_minute`] sessions a minute (a burst of that
//!   many, then one every `60 s / n`): each session costs a synced database write and two audit
//!   records, and one that reconnects in a loop would spend the store's time for every Client.
//!   An honest Client redials with backoff; a refused one backs off further.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// The host an address stands for in the bounds: an IPv4 address (also written as an
/// IPv4-mapped IPv6 one), or an IPv6 /64, which one host holds whole (as the audit's flood
/// summaries count it).
pub(crate) fn host(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

/// Past this many hosts with enrolment attempts in their window, the table is swept of
/// ended windows before it grows.
const ENROL_HOSTS: usize = 4096;

/// Hosts remembered as ones sessions came from; past this, the quarter seen longest ago is
/// forgotten ([`remember`]).
const RETURNING_HOSTS: usize = 65_536;

/// The bounds. [`Limits::default`] is what the Hub runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections in their first moments at once, in all.
    pub handshakes: usize,
    /// … and from one IP address.
    pub per_address: usize,
    /// Above this many, unvalidated addresses get a Retry first.
    pub retry_above: usize,
    /// Connections in their first moments at once, beyond `handshakes`, from hosts a
    /// session came from before (their addresses validated).
    pub returning_reserve: usize,
    /// … of which one such host may hold (its ordinary places apart).
    pub returning_per_host: usize,
    /// Refused enrolments from one address before its enrolments are refused unread.
    pub enrol_failures: u32,
    /// The window those are counted in.
    pub enrol_window: Duration,
    /// How long an enrolment's request may take to arrive once its handshake is done.
    pub enrol_request: Duration,
    /// How much of an SVID's life (in percent) must be used before it may renew: earlier asks
    /// are refused (an honest Client renews at about half its life).
    pub renew_after_percent: u8,
    /// Sessions one Client may open a minute (a burst of this many, then one every
    /// `60 s / n`).
    pub sessions_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshakes: 512,
            per_address: 64,
            retry_above: 64,
            returning_reserve: 512,
            returning_per_host: 8,
            enrol_failures: 10,
            enrol_window: Duration::from_secs(60),
            enrol_request: Duration::from_secs(10),
            renew_after_percent: 25,
            // A session lost to the network lives at least the idle timeout (2.5 s): a
            // flapping path redials at most ~24 times a minute, under the refill.
            sessions_per_minute: 30,
        }
    }
}

/// Notes `ip` as returning at `now`, within [`RETURNING_HOSTS`]: when full, the quarter seen
/// longest ago is forgotten at once (one pass for a quarter of the table's inserts, not one
/// per insert, under the admission's lock).
fn remember(returning: &mut HashMap<IpAddr, Instant>, ip: IpAddr, now: Instant) {
    if returning.len() >= RETURNING_HOSTS && !returning.contains_key(&ip) {
        let mut by_age: Vec<(Instant, IpAddr)> =
            returning.iter().map(|(ip, at)| (*at, *ip)).collect();
        let cut = by_age.len() / 4;
        by_age.select_nth_unstable_by_key(cut, |(at, _)| *at);
        for (_, old) in &by_age[..cut] {
            returning.remove(old);
        }
    }
    returning.insert(ip, now);
}

/// Client names whose session rate is remembered before the full ones are forgotten.
const SESSION_NAMES: usize = 4096;

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Go on (the returned slot is released when dropped).
    Accept,
    /// Ask the peer to prove its address first.
    Retry,
    /// Refuse it: the Hub or this address is at its bound.
    Refuse(&'static str),
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    /// Of those past the `handshakes` bound, from returning hosts: in all, and by host.
    reserved: usize,
    reserved_by_host: HashMap<IpAddr, usize>,
    /// Hosts sessions came from, and when one last did.
    returning: HashMap<IpAddr, Instant>,
    per_address: HashMap<IpAddr, usize>,
    /// Refused enrolments per address: count and the start of its window.
    enrol_failures: HashMap<IpAddr, (u32, Instant)>,
    /// Sessions each Client may still open now (a token bucket), and when that was counted.
    sessions: HashMap<String, (f64, Instant)>,
}

/// The Hub's admission state, shared by every new connection.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    limits: Limits,
    state: Arc<Mutex<State>>,
    retries: Arc<std::sync::atomic::AtomicU64>,
    /// New connections refused before their handshake: the Hub at its bound (or its state
    /// unusable), one address at its bound.
    refused: Arc<[std::sync::atomic::AtomicU64; 2]>,
}

/// The metric labels of [`Admission::refused`]'s counts, in order.
pub(crate) const REFUSAL_REASONS: [&str; 2] = ["hub_bound", "address_bound"];

/// A connection's place among those in their first moments; released on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    ip: IpAddr,
    state: Arc<Mutex<State>>,
    /// Taken from [`Limits::returning_reserve`].
    reserved: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.state.lock() {
            if self.reserved {
                s.reserved = s.reserved.saturating_sub(1);
                if let Some(n) = s.reserved_by_host.get_mut(&self.ip) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        s.reserved_by_host.remove(&self.ip);
                    }
                }
            } else {
                s.in_flight = s.in_flight.saturating_sub(1);
            }
            if let Some(n) = s.per_address.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.per_address.remove(&self.ip);
                }
            }
        }
    }
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: Arc::default(),
            retries: Arc::default(),
            refused: Arc::default(),
        }
    }

    /// The bounds.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// Counts a Retry sent.
    pub(crate) fn retried(&self) {
        self.retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Retries sent so far.
    pub(crate) fn retries_sent(&self) -> u64 {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// New connections refused before their handshake, by [`REFUSAL_REASONS`].
    pub(crate) fn refused(&self) -> [u64; 2] {
        self.refused
            .each_ref()
            .map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn refuse(&self, reason: usize, why: &'static str) -> (Verdict, Option<Slot>) {
        self.refused[reason].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (Verdict::Refuse(why), None)
    }

    /// Decides on a new connection from `ip` (`validated`: QUIC has proven the address, e.g.
    /// by a Retry). `Accept` comes with the slot it holds.
    pub(crate) fn admit(&self, ip: IpAddr, validated: bool) -> (Verdict, Option<Slot>) {
        let ip = host(ip);
        let Ok(mut s) = self.state.lock() else {
            return self.refuse(0, "admission state poisoned");
        };
        let full = s.in_flight >= self.limits.handshakes;
        let returning = s.returning.contains_key(&ip);
        if full && !(returning && s.reserved < self.limits.returning_reserve) {
            return self.refuse(0, "too many handshakes in progress");
        }
        // Of the reserve, one host (a Client's own, or a stranger behind the same NAT) holds at
        // most its share, whatever it holds of the ordinary places.
        let reserved_here = s.reserved_by_host.get(&ip).copied().unwrap_or(0);
        if full && reserved_here >= self.limits.returning_per_host {
            return self.refuse(1, "too many handshakes in progress from this address");
        }
        if s.per_address.get(&ip).copied().unwrap_or(0) >= self.limits.per_address {
            return self.refuse(1, "too many handshakes in progress from this address");
        }
        // Past the bound, the reserve is for an address proven real, never a spoofed one.
        if !validated && (full || s.in_flight >= self.limits.retry_above) {
            return (Verdict::Retry, None);
        }
        if full {
            s.reserved += 1;
            *s.reserved_by_host.entry(ip).or_default() += 1;
        } else {
            s.in_flight += 1;
        }
        *s.per_address.entry(ip).or_default() += 1;
        let slot = Slot {
            ip,
            state: self.state.clone(),
            reserved: full,
        };
        (Verdict::Accept, Some(slot))
    }

    /// A session's checks passed for a connection from `ip`: its host is a returning one
    /// ([`Limits::returning_reserve`]).
    pub(crate) fn session_from(&self, ip: IpAddr) {
        if let Ok(mut s) = self.state.lock() {
            remember(&mut s.returning, host(ip), Instant::now());
        }
    }

    /// Where the clients not revoked had their last sessions from, as the Hub before this one
    /// recorded them (read at its start): returning hosts from the start, so that a flood that
    /// holds the bound while the Hub restarts does not keep its Clients from coming back.
    pub(crate) fn with_returning(self, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        if let Ok(mut s) = self.state.lock() {
            let now = Instant::now();
            for ip in ips {
                remember(&mut s.returning, host(ip), now);
            }
        }
        self
    }

    /// Whether enrolments from `ip`'s host are refused for now; `Some(failures)` when they are.
    pub(crate) fn enrolment_throttled(&self, ip: IpAddr) -> Option<u32> {
        let ip = host(ip);
        let mut s = self.state.lock().ok()?;
        let window = self.limits.enrol_window;
        match s.enrol_failures.get(&ip).copied() {
            Some((_, since)) if since.elapsed() >= window => {
                s.enrol_failures.remove(&ip);
                None
            }
            Some((n, _)) if n >= self.limits.enrol_failures => Some(n),
            _ => None,
        }
    }

    /// Whether Client `client` (authenticated: one entry per enrolled name) may open one more
    /// session now ([`Limits::sessions_per_minute`]); counts it when it may.
    pub(crate) fn session_allowed(&self, client: &str) -> bool {
        self.session_allowed_at(client, Instant::now())
    }

    fn session_allowed_at(&self, client: &str, now: Instant) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        let burst = f64::from(self.limits.sessions_per_minute.max(1));
        let per_sec = burst / 60.0;
        // Enrolled names only, but revoked and removed ones stay: past a bound, the names whose
        // bucket is full again (nothing to remember) are forgotten.
        if s.sessions.len() > SESSION_NAMES {
            s.sessions.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec < burst
            });
        }
        let (tokens, at) = s.sessions.entry(client.to_owned()).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * per_sec).min(burst);
        *at = (*at).max(now);
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }

    /// Counts a refused enrolment from `ip`'s host.
    pub(crate) fn enrolment_refused(&self, ip: IpAddr) {
        let ip = host(ip);
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        let window = self.limits.enrol_window;
        let now = Instant::now();
        if s.enrol_failures.len() >= ENROL_HOSTS && !s.enrol_failures.contains_key(&ip) {
            make_room(&mut s.enrol_failures, window, now);
        }
        let e = s.enrol_failures.entry(ip).or_insert((0, now));
        if e.1.elapsed() >= window {
            *e = (0, now);
        }
        e.0 = e.0.saturating_add(1);
    }
}

/// Makes room in a full table of refused enrolments: one entry per host, forgotten when its
/// window ends, swept only when the table is full (not on every attempt). When every host is
/// still in its window (failures from more hosts than the bound: IPv6 /64s are cheap), the
/// quarter with the fewest failures is forgotten, the oldest first among equals: the hosts
/// nearest their throttle stay, and the next sweep is a quarter of the bound away, so the
/// table stays bounded and its sweeps cost O(1) per new host on average.
fn make_room(table: &mut HashMap<IpAddr, (u32, Instant)>, window: Duration, now: Instant) {
    table.retain(|_, (_, since)| now.saturating_duration_since(*since) < window);
    if table.len() < ENROL_HOSTS {
        return;
    }
    let mut all: Vec<(u32, Instant, IpAddr)> = table
        .iter()
        .map(|(ip, (n, since))| (*n, *since, *ip))
        .collect();
    let cut = ENROL_HOSTS / 4;
    all.select_nth_unstable_by_key(cut, |(n, since, _)| (*n, *since));
    for (_, _, ip) in &all[..cut] {
        table.remove(ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p14_a_client_that_reconnects_in_a_loop_is_held_to_its_rate_and_no_other_is() {
        let a = Admission::new(Limits {
            sessions_per_minute: 6,
            ..Limits::default()
        });
        let t0 = Instant::now();
        let allowed =
            |n: usize, at: Instant| (0..n).filter(|_| a.session_allowed_at("acme", at)).count();
        assert_eq!(allowed(10, t0), 6, "a burst of six, then no more");
        assert!(
            a.session_allowed_at("beta", t0),
            "another Client is not held"
        );
        // One every ten seconds after that.
        assert_eq!(allowed(1, t0 + Duration::from_secs(9)), 0);
        assert_eq!(allowed(3, t0 + Duration::from_millis(10_500)), 1);
        // A long quiet gives the whole burst back, and no more.
        assert_eq!(allowed(10, t0 + Duration::from_secs(600)), 6);
    }

    #[test]
    fn the_session_rates_remembered_are_bounded() {
        let a = Admission::new(Limits::default());
        let t0 = Instant::now();
        for n in 0..=SESSION_NAMES {
            assert!(a.session_allowed_at(&format!("client-{n}"), t0));
        }
        // A minute on, every bucket is full again: nothing to remember but the newest.
        assert!(a.session_allowed_at("late", t0 + Duration::from_secs(61)));
        assert_eq!(a.state.lock().unwrap().sessions.len(), 1);
    }

    #[test]
    fn p8_refused_enrolments_from_more_hosts_than_the_bound_keep_the_table_bounded() {
        let a = Admission::new(Limits {
            enrol_failures: 3,
            enrol_window: Duration::from_secs(600),
            ..Limits::default()
        });
        // A host at its throttle, then failures from three times the bound of other hosts
        // (IPv6 /64s), all inside the window.
        for _ in 0..3 {
            a.enrolment_refused(ip(1));
        }
        for n in 0..3 * ENROL_HOSTS as u64 {
            let v6 = std::net::Ipv6Addr::from((0x2001_0db8_u128 << 96) | (u128::from(n) << 64));
            a.enrolment_refused(IpAddr::V6(v6));
            assert!(a.state.lock().unwrap().enrol_failures.len() <= ENROL_HOSTS);
        }
        assert_eq!(
            a.enrolment_throttled(ip(1)),
            Some(3),
            "the host with the most failures is kept"
        );
        // The newest host is counted.
        a.enrolment_refused(ip(2));
        a.enrolment_refused(ip(2));
        a.enrolment_refused(ip(2));
        assert_eq!(a.enrolment_throttled(ip(2)), Some(3));
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn p8_one_address_is_bounded_and_others_still_get_in() {
        let a = Admission::new(Limits {
            handshakes: 4,
            per_address: 2,
            retry_above: 3,
            ..Limits::default()
        });
        let (v1, s1) = a.admit(ip(1), false);
        let (v2, _s2) = a.admit(ip(1), false);
        assert_eq!((v1, v2), (Verdict::Accept, Verdict::Accept));
        assert!(matches!(a.admit(ip(1), false).0, Verdict::Refuse(_)));
        assert_eq!(a.refused(), [0, 1], "counted as the address's bound");
        // Another address still gets in; above `retry_above`, unvalidated ones must retry.
        let (v, _s3) = a.admit(ip(2), false);
        assert_eq!(v, Verdict::Accept);
        assert_eq!(a.admit(ip(3), false).0, Verdict::Retry);
        let (v, _s4) = a.admit(ip(3), true);
        assert_eq!(v, Verdict::Accept);
        // The whole Hub's bound.
        assert!(matches!(a.admit(ip(4), true).0, Verdict::Refuse(_)));
        assert_eq!(a.refused(), [1, 1], "counted as the Hub's bound");
        // A finished handshake gives its slot back.
        drop(s1);
        assert_eq!(a.admit(ip(1), true).0, Verdict::Accept);
    }

    /// Strangers that hold the whole bound (handshakes never finished, enrolments that never
    /// send) keep out other strangers, not the hosts sessions came from: those get in from a
    /// reserve of their own, once their address is validated (a Retry, though the Hub is
    /// below `retry_above`), and one host holds at most `returning_per_host` of it. The hosts
    /// the Hub before this one recorded count from its start.
    #[test]
    fn p8_p14_hosts_sessions_came_from_get_in_past_a_bound_strangers_hold() {
        let limits = Limits {
            handshakes: 4,
            per_address: 4,
            retry_above: 64,
            returning_reserve: 3,
            returning_per_host: 2,
            ..Limits::default()
        };
        let a = Admission::new(limits).with_returning([ip(7)]);
        a.session_from(IpAddr::from([0, 0, 0, 0, 0, 0xffff, 0xc000, 0x0209])); // 192.0.2.9, mapped
        let mut held: Vec<Slot> = [1, 1, 1, 2]
            .into_iter()
            .map(|n| a.admit(ip(n), true).1.expect("a stranger's slot"))
            .collect();
        // The bound is held: another stranger is refused, validated or not.
        assert!(matches!(a.admit(ip(3), true).0, Verdict::Refuse(_)));
        assert!(matches!(a.admit(ip(3), false).0, Verdict::Refuse(_)));
        // A returning host proves its address first, then gets in.
        assert_eq!(a.admit(ip(9), false).0, Verdict::Retry);
        let (v, r1) = a.admit(ip(9), true);
        assert_eq!(v, Verdict::Accept);
        let (v, _r2) = a.admit(ip(9), true);
        assert_eq!(v, Verdict::Accept);
        // Held to the reserve's share for one host, below the per-host bound, and counted as
        // the address's bound.
        let [hub_bound, address_bound] = a.refused();
        assert!(matches!(a.admit(ip(9), true).0, Verdict::Refuse(_)));
        assert_eq!(a.refused(), [hub_bound, address_bound + 1]);
        // One recorded at the start gets the reserve's last place; then it is used up.
        let (v, _r3) = a.admit(ip(7), true);
        assert_eq!(v, Verdict::Accept);
        assert!(matches!(a.admit(ip(7), true).0, Verdict::Refuse(_)));
        // A reserved slot given back is the reserve's again, not the strangers'.
        drop(r1);
        assert!(matches!(a.admit(ip(3), true).0, Verdict::Refuse(_)));
        let (v, _r4) = a.admit(ip(7), true);
        assert_eq!(v, Verdict::Accept);
        // A stranger's slot given back is the strangers' again.
        held.pop();
        let (v, _s) = a.admit(ip(3), true);
        assert_eq!(v, Verdict::Accept);

        // A host's ordinary places do not count against its share of the reserve: a stranger
        // behind a Client's NAT that holds some cannot keep the Client out.
        let b = Admission::new(limits);
        b.session_from(ip(5));
        let _ordinary: Vec<Slot> = [5, 5, 5, 6]
            .into_iter()
            .map(|n| b.admit(ip(n), true).1.expect("an ordinary place"))
            .collect();
        let (v, _r) = b.admit(ip(5), true);
        assert_eq!(v, Verdict::Accept);
    }

    #[test]
    fn p8_returning_hosts_are_bounded_forgetting_the_longest_seen_first() {
        let a = Admission::new(Limits::default());
        let t0 = Instant::now();
        let mut s = a.state.lock().unwrap();
        let at = |secs| t0 + Duration::from_secs(secs);
        for n in 0..RETURNING_HOSTS as u32 {
            let when = if n == 5 { at(0) } else { at(1) };
            remember(&mut s.returning, IpAddr::from(n.to_be_bytes()), when);
        }
        remember(&mut s.returning, ip(1), at(2));
        assert_eq!(s.returning.len(), RETURNING_HOSTS - RETURNING_HOSTS / 4 + 1);
        assert!(s.returning.contains_key(&ip(1)));
        assert!(
            !s.returning.contains_key(&IpAddr::from(5u32.to_be_bytes())),
            "the one seen longest ago is forgotten"
        );
        // Seen again: remembered anew, nothing forgotten.
        remember(&mut s.returning, ip(1), at(3));
        assert_eq!(s.returning.len(), RETURNING_HOSTS - RETURNING_HOSTS / 4 + 1);
    }

    #[test]
    fn p8_refused_enrolments_throttle_that_address_for_the_window() {
        let limits = |window| Limits {
            enrol_failures: 3,
            enrol_window: window,
            ..Limits::default()
        };
        // A window no stall of a loaded machine outlasts, for what holds inside it.
        let a = Admission::new(limits(Duration::from_secs(60)));
        for _ in 0..2 {
            a.enrolment_refused(ip(1));
        }
        assert_eq!(a.enrolment_throttled(ip(1)), None);
        a.enrolment_refused(ip(1));
        assert_eq!(a.enrolment_throttled(ip(1)), Some(3));
        assert_eq!(a.enrolment_throttled(ip(2)), None, "only that address");
        // A short one, for its end: the failures before it no longer count, so two more are
        // below the bound again (five would be above it).
        let a = Admission::new(limits(Duration::from_millis(300)));
        for _ in 0..3 {
            a.enrolment_refused(ip(1));
        }
        std::thread::sleep(Duration::from_millis(350));
        assert_eq!(a.enrolment_throttled(ip(1)), None, "the window ended");
        for _ in 0..2 {
            a.enrolment_refused(ip(1));
        }
        assert_eq!(a.enrolment_throttled(ip(1)), None, "a new window");
    }

    #[test]
    fn p8_an_ipv6_host_is_its_64_and_a_mapped_ipv4_is_its_ipv4() {
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert_eq!(host(v6("2001:db8:1:2:aaaa::1")), v6("2001:db8:1:2::"));
        assert_eq!(host(v6("::ffff:192.0.2.7")), ip(7));
        assert_eq!(host(ip(7)), ip(7));
        let a = Admission::new(Limits {
            per_address: 2,
            enrol_failures: 2,
            ..Limits::default()
        });
        let (_s1, _s2) = (
            a.admit(v6("2001:db8::1"), true).1,
            a.admit(v6("2001:db8::ffff:2"), true).1,
        );
        assert!(
            matches!(a.admit(v6("2001:db8::3"), true).0, Verdict::Refuse(_)),
            "three addresses of one /64 are one host"
        );
        assert_eq!(a.admit(v6("2001:db8:0:1::1"), true).0, Verdict::Accept);
        a.enrolment_refused(v6("2001:db8::10"));
        a.enrolment_refused(v6("2001:db8::20"));
        assert_eq!(a.enrolment_throttled(v6("2001:db8::30")), Some(2));
        assert_eq!(a.enrolment_throttled(v6("2001:db8:0:1::30")), None);
    }
}
