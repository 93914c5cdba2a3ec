//! The Dialer: the only code in the Client that opens outbound TCP connections (P4).
//!
//! A destination arrives as an allow-list entry *name*. The name is looked up in the
//! install-time allow-list and nowhere else; a name that is not there is refused before any
//! socket exists.
//!
//! A DNS entry is dialled at the addresses of its current set ([`Addresses`]), not at
//! whatever the resolver answers at that moment: the set is resolved at start (the same
//! answers the eBPF lock was filled with) and refreshed on the schedule the customer sets
//! (`[dns] refresh_secs`) by [`refresh_once`]. Every answer is checked (no loopback,
//! link-local, metadata, wildcard, multicast or broadcast address unless written literally);
//! a change is an audit record. With the eBPF lock attached, the set stays the one resolved at
//! start — the lock cannot follow (nothing in the process may touch it after start-up) — and
//! the record says that a restart adopts the new answer: the Dialer and the kernel never
//! disagree. A name that had no acceptable address at start is resolved when it is first
//! dialled: one lookup at a time per entry ([`Lookups`]), whose answer every query waiting on
//! it shares, so a burst of queries while the resolver is down costs one lookup, not one each.
//! With the lock attached an acceptable answer is not adopted (the lock holds no address for
//! the name): the query is refused, saying so, and that refusal is given again for 30 s
//! without a lookup (a Hub cannot make one DNS query per `Open`).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use ewii_common::policy::{AllowList, Decision, Host};
use tokio::net::TcpStream;

/// Why a destination was not connected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The name is not in the allow-list; nothing was resolved or dialled. (The name as the
    /// Hub sent it, bounded and escaped: [`ewii_common::text::from_peer`].)
    #[error("destination \"{0}\" is not in the allow-list")]
    NotAllowed(String),
    /// The entry's DNS name did not resolve to an acceptable address.
    #[error("cannot resolve {name}: {why}")]
    Resolve {
        /// Entry name.
        name: String,
        /// Resolver error or rejected addresses.
        why: String,
    },
    /// Every address of the entry refused or timed out.
    #[error("cannot connect to {name}: {why}")]
    Unreachable {
        /// Entry name.
        name: String,
        /// The last address tried.
        addr: SocketAddr,
        /// The last connect error.
        why: String,
    },
}

/// Opens TCP connections to allow-list entries, and only to them.
#[derive(Debug, Clone)]
pub struct Dialer {
    allow: AllowList,
    connect_timeout: Duration,
    addresses: Addresses,
    lookups: Lookups,
}

/// A lookup of a DNS name and port: the system resolver's answers.
pub type Resolver = Arc<
    dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>
        + Send
        + Sync,
>;

/// How long a refusal of an answer the eBPF lock cannot adopt is said again without a lookup.
const PINNED_REFUSAL: Duration = Duration::from_secs(30);

/// The lookups the Dialer makes for entries with no addresses yet: at most one in flight per
/// entry, its outcome (an error too) shared by every dial that asked while it ran. The next
/// dial after it ends starts a new one: a failure is not remembered, but with the eBPF lock an
/// answer it cannot adopt is, for [`PINNED_REFUSAL`] (`pinned_refusals`). (A lookup whose every
/// query was cut goes on in its blocking thread, which cannot be stopped; the next dial starts
/// another beside it.)
#[derive(Clone)]
struct Lookups {
    resolve: Resolver,
    in_flight: Arc<Mutex<BTreeMap<String, Arc<Flight>>>>,
    /// With the eBPF lock attached, the refusal of an entry whose answer cannot be adopted,
    /// and when: said again for [`PINNED_REFUSAL`] without a lookup, so that a Hub sending
    /// `Open` for it in a loop does not make a DNS query of each.
    pinned_refusals: Arc<Mutex<BTreeMap<String, (tokio::time::Instant, DialError)>>>,
    /// Where an entry's first addresses, found by a dial, are recorded (`dns_changed`), and
    /// the Client's ID for the record.
    audit: Option<(crate::audit::Audit, String)>,
}

/// One lookup of one entry, and its outcome once it has one.
type Flight = tokio::sync::OnceCell<Result<Vec<SocketAddr>, DialError>>;

impl std::fmt::Debug for Lookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        f.debug_struct("Lookups")
            .field("in_flight", &names)
            .finish()
    }
}

impl Lookups {
    fn new(resolve: Resolver) -> Self {
        Self {
            resolve,
            in_flight: Arc::default(),
            pinned_refusals: Arc::default(),
            audit: None,
        }
    }

    /// The system resolver (`getaddrinfo`, on tokio's blocking threads), bounded.
    fn system() -> Self {
        Self::new(Arc::new(|host, port| Box::pin(system_lookup(host, port))))
    }

    /// Resolves entry `name` (`host`:`port`): joins the lookup in flight for it, or starts
    /// one. A successful answer's acceptable addresses become the entry's set in `addresses`.
    async fn resolve(
        &self,
        name: &str,
        host: &str,
        port: u16,
        addresses: &Addresses,
    ) -> Result<Vec<SocketAddr>, DialError> {
        if addresses.pinned {
            let refusals = self
                .pinned_refusals
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((_, refused)) = refusals
                .get(name)
                .filter(|(at, _)| at.elapsed() < PINNED_REFUSAL)
            {
                return Err(refused.clone());
            }
        }
        let flight = {
            // Nothing is left half-done while the map is held: a poisoned one is still right.
            let mut m = self
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // A lookup that ended since this dial looked has left its addresses (it sets them
            // before it leaves the map).
            let known = addresses.get(name);
            if !known.is_empty() {
                return Ok(known);
            }
            let flight = m.entry(name.to_owned()).or_default();
            // One that failed and has not left yet: its failure is not this dial's answer.
            if flight.get().is_some_and(Result::is_err) {
                *flight = Arc::default();
            }
            Arc::clone(flight)
        };
        let outcome = flight
            .get_or_init(|| async {
                let answers = (self.resolve)(host.to_owned(), port).await.map_err(|e| {
                    DialError::Resolve {
                        name: name.to_owned(),
                        why: e.to_string(),
                    }
                })?;
                let (ok, refused) = check_answers(host, answers.into_iter());
                if ok.is_empty() {
                    return Err(DialError::Resolve {
                        name: name.to_owned(),
                        why: refused
                            .into_iter()
                            .next()
                            .unwrap_or_else(|| "no address".into()),
                    });
                }
                if addresses.pinned {
                    // The eBPF lock was filled at start and cannot change: a connect to this
                    // answer would be refused by the kernel, with a less useful error.
                    let refused = DialError::Resolve {
                        name: name.to_owned(),
                        why: format!(
                            "{host} resolves to {} now, but had no acceptable address at start, and the eBPF lock holds none for it: restart the Client to adopt it",
                            ok.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                        ),
                    };
                    self.pinned_refusals
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(name.to_owned(), (tokio::time::Instant::now(), refused.clone()));
                    return Err(refused);
                }
                // A refresh may have given the entry its addresses while this lookup ran:
                // those stand, and the refresh has recorded them.
                if !addresses.replace_if(name, &[], ok.clone()) {
                    return Ok(addresses.get(name));
                }
                // Its first addresses: the customer's SIEM sees where the entry points, and
                // any answer refused, as it does for a refresh's change.
                if let Some((audit, client_id)) = &self.audit {
                    let change = AddressChange {
                        entry: name.to_owned(),
                        host: host.to_owned(),
                        before: Vec::new(),
                        after: ok.clone(),
                        refused,
                        adopted: true,
                    };
                    audit.emit(change_record(audit, client_id, &change));
                }
                Ok(ok)
            })
            .await
            .clone();
        // The lookup has ended: the next dial that finds no addresses starts another.
        let mut m = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if m.get(name).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            m.remove(name);
        }
        outcome
    }
}

/// The current addresses of each DNS entry, shared by the Dialer and the refresher.
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    sets: Arc<RwLock<BTreeMap<String, Vec<SocketAddr>>>>,
    /// The eBPF lock holds the set resolved at start: refreshes are recorded, not adopted.
    pinned: bool,
}

impl Addresses {
    /// Starts from `sets` (entry name → addresses resolved at start); `pinned` when the eBPF
    /// lock was filled with exactly these.
    pub fn new(sets: BTreeMap<String, Vec<SocketAddr>>, pinned: bool) -> Self {
        Self {
            sets: Arc::new(RwLock::new(sets)),
            pinned,
        }
    }

    /// The current set of entry `name` (empty when it has none yet).
    pub fn get(&self, name: &str) -> Vec<SocketAddr> {
        self.sets
            .read()
            .map(|s| s.get(name).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Makes `addrs` entry `name`'s set if it still is `expected`, under one lock: a lookup
    /// and a refresh that race cannot both adopt (and record) a change from the same set.
    /// Returns whether it did.
    fn replace_if(&self, name: &str, expected: &[SocketAddr], addrs: Vec<SocketAddr>) -> bool {
        // Nothing is left half-done while it is held: a poisoned one is still right.
        let mut s = self.sets.write().unwrap_or_else(PoisonError::into_inner);
        if s.get(name).map_or(&[][..], Vec::as_slice) != expected {
            return false;
        }
        s.insert(name.to_owned(), addrs);
        true
    }
}

/// A change a refresh found in one entry's answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressChange {
    /// Entry name.
    pub entry: String,
    /// The DNS name.
    pub host: String,
    /// The set before.
    pub before: Vec<SocketAddr>,
    /// The answers now (checked; refused ones are in `refused`).
    pub after: Vec<SocketAddr>,
    /// Answers refused as loopback, link-local, metadata or not unicast.
    pub refused: Vec<String>,
    /// Whether the Dialer now uses `after` (false: pinned by the eBPF lock, or no acceptable
    /// answer at all).
    pub adopted: bool,
}

/// Checks `answers` for `host`: the acceptable addresses (sorted, unique) and the refusals.
fn check_answers(
    host: &str,
    answers: impl Iterator<Item = SocketAddr>,
) -> (Vec<SocketAddr>, Vec<String>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for a in answers {
        match AllowList::check_resolved(host, a) {
            Ok(a) => ok.push(a),
            Err(e) => refused.push(e.to_string()),
        }
    }
    ok.sort_unstable();
    ok.dedup();
    (ok, refused)
}

/// Re-resolves every DNS entry of `dialer` with `resolve` and returns what changed. An entry
/// whose lookup fails keeps its set (a resolver outage does not cut a working destination).
pub async fn refresh_once<F, Fut>(dialer: &Dialer, resolve: F) -> Vec<AddressChange>
where
    F: Fn(String, u16) -> Fut,
    Fut: Future<Output = std::io::Result<Vec<SocketAddr>>>,
{
    let mut changes = Vec::new();
    for entry in dialer.allow.entries() {
        let Host::Dns(host) = &entry.endpoint.host else {
            continue;
        };
        let name = entry.name.to_string();
        let Ok(answers) = resolve(host.clone(), entry.endpoint.port).await else {
            continue;
        };
        let (after, refused) = check_answers(host, answers.into_iter());
        let before = dialer.addresses.get(&name);
        if after == before && refused.is_empty() {
            continue;
        }
        let adopted = !dialer.addresses.pinned && !after.is_empty() && after != before;
        // A query's first lookup may have set the entry since `before` was read: its set
        // stands, and it has its record.
        if adopted && !dialer.addresses.replace_if(&name, &before, after.clone()) {
            continue;
        }
        changes.push(AddressChange {
            entry: name,
            host: host.clone(),
            before,
            after,
            refused,
            adopted,
        });
    }
    changes
}

/// The DNS entries some of whose answers were refused when the Client planned its layers at
/// start, as changes from no addresses to those it took: each is recorded (`dns_changed`), as
/// a refresh's refusals are. Nothing is looked up here.
pub fn refused_at_start(
    allow: &AllowList,
    enforcement: &crate::enforce::Report,
) -> Vec<AddressChange> {
    allow
        .entries()
        .filter_map(|entry| {
            let Host::Dns(host) = &entry.endpoint.host else {
                return None;
            };
            let name = entry.name.to_string();
            let refused = enforcement.refused_answers.get(&name)?.clone();
            let after = enforcement
                .addresses
                .get(&name)
                .cloned()
                .unwrap_or_default();
            Some(AddressChange {
                entry: name,
                host: host.clone(),
                before: Vec::new(),
                adopted: !after.is_empty(),
                after,
                refused,
            })
        })
        .collect()
}

/// The `dns_changed` audit record of `change`.
pub fn change_record(
    audit: &crate::audit::Audit,
    client_id: &str,
    change: &AddressChange,
) -> ewii_common::audit::AuditRecord {
    use ewii_common::audit::{Destination, Event, Outcome};
    let list = |a: &[SocketAddr]| {
        if a.is_empty() {
            "none".to_owned()
        } else {
            a.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mut r = audit.record(Event::DnsChanged);
    r.client = Some(client_id.to_owned());
    r.destination = Some(Destination {
        name: change.entry.clone(),
        address: change.after.first().map(ToString::to_string),
    });
    r.outcome = Some(if change.adopted {
        Outcome::Ok
    } else {
        Outcome::Refused
    });
    let mut reason = format!(
        "{} resolved to {} (was {})",
        change.host,
        list(&change.after),
        list(&change.before)
    );
    if !change.refused.is_empty() {
        reason.push_str(&format!("; refused answers: {}", change.refused.join("; ")));
    }
    reason.push_str(if change.adopted {
        "; adopted"
    } else if change.after.is_empty() || change.after == change.before {
        "; kept the addresses it had"
    } else {
        "; not adopted: the eBPF lock holds the addresses resolved at start (restart the Client to adopt the new ones)"
    });
    r.reason = Some(reason);
    r
}

/// How long a lookup of the system resolver may take: `getaddrinfo` follows `resolv.conf`'s
/// own timeouts (5 s, two attempts, up to three servers by default: 30 s), which a resolver or
/// an NSS module that hangs stretches without end; past this the dial fails (or the refresh
/// keeps its addresses) and says why. No lookup glibc's defaults would finish is cut.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// `host`:`port` by the system resolver, at most [`LOOKUP_TIMEOUT`].
pub(crate) async fn system_lookup(host: String, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    match tokio::time::timeout(
        LOOKUP_TIMEOUT,
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    {
        Ok(answers) => answers.map(Iterator::collect),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer from the resolver within {} s",
                LOOKUP_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Re-resolves the DNS entries every `every` and records each change; runs until aborted.
pub async fn refresh_every(
    dialer: Dialer,
    audit: crate::audit::Audit,
    client_id: String,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let changes = refresh_once(&dialer, system_lookup).await;
        for c in &changes {
            audit.emit(change_record(&audit, &client_id, c));
        }
    }
}

impl DialError {
    /// The address the dial tried last, when it got as far as a connect.
    pub fn address(&self) -> Option<SocketAddr> {
        match self {
            Self::Unreachable { addr, .. } => Some(*addr),
            _ => None,
        }
    }
}

impl Dialer {
    /// A dialer for `allow` that resolves its DNS entries when first dialled.
    pub fn new(allow: AllowList, connect_timeout: Duration) -> Self {
        Self::with_addresses(allow, connect_timeout, Addresses::default())
    }

    /// A dialer for `allow` starting from the address sets resolved at start.
    pub fn with_addresses(
        allow: AllowList,
        connect_timeout: Duration,
        addresses: Addresses,
    ) -> Self {
        Self {
            allow,
            connect_timeout,
            addresses,
            lookups: Lookups::system(),
        }
    }

    /// The same dialer, looking names up with `resolve` instead of the system resolver.
    pub fn with_resolver(mut self, resolve: Resolver) -> Self {
        self.lookups = Lookups {
            audit: self.lookups.audit.take(),
            ..Lookups::new(resolve)
        };
        self
    }

    /// The same dialer, recording in `audit` (as Client `client_id`) the addresses it finds for
    /// an entry that had none at start (`dns_changed`).
    pub fn audited(mut self, audit: crate::audit::Audit, client_id: String) -> Self {
        self.lookups.audit = Some((audit, client_id));
        self
    }

    /// The allow-list it enforces.
    pub fn allow_list(&self) -> &AllowList {
        &self.allow
    }

    /// Connects to entry `destination`; returns the stream and the address it reached.
    pub async fn dial(&self, destination: &str) -> Result<(TcpStream, SocketAddr), DialError> {
        let entry = match self.allow.decide(destination) {
            Decision::Allow(entry) => entry,
            // The Hub's text, in a record and a log: bounded and escaped as the record's own
            // copy of it is.
            Decision::Deny => {
                return Err(DialError::NotAllowed(ewii_common::text::from_peer(
                    destination.as_bytes(),
                )))
            }
        };
        let name = entry.name.to_string();
        let addrs: Vec<SocketAddr> = match &entry.endpoint.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, entry.endpoint.port)],
            Host::Dns(host) => {
                let known = self.addresses.get(&name);
                if known.is_empty() {
                    // Not resolved at start (DNS was down): resolve now, and keep the answer.
                    self.lookups
                        .resolve(&name, host, entry.endpoint.port, &self.addresses)
                        .await?
                } else {
                    known
                }
            }
        };
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => {
                    crate::transport::tune_tcp(&stream);
                    return Ok((stream, addr));
                }
                Ok(Err(e)) => last = Some((addr, format!("{addr}: {e}"))),
                Err(_) => last = Some((addr, format!("{addr}: connect timed out"))),
            }
        }
        // `addrs` is never empty here (an IP entry has one; a name with none returned above).
        let (addr, why) = last.unwrap_or_else(|| {
            (
                SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0),
                "no address".into(),
            )
        });
        Err(DialError::Unreachable { name, addr, why })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn p4_dials_only_allow_listed_names() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let allow = AllowList::from_pairs([("db", addr.as_str())]).unwrap();
        let dialer = Dialer::new(allow, Duration::from_secs(2));
        let (_s, reached) = dialer.dial("db").await.unwrap();
        assert_eq!(reached.to_string(), addr);
        assert!(listener.accept().await.is_ok());
        for other in ["DB", "db2", "", &addr, "127.0.0.1"] {
            assert_eq!(
                dialer.dial(other).await.unwrap_err(),
                DialError::NotAllowed(other.to_string())
            );
        }
        // No further connection reached the listener.
        let none = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(none.is_err(), "a refused name must not connect anywhere");
    }

    fn discard() -> crate::audit::Audit {
        crate::audit::Audit::open_with_tap(
            ewii_common::audit::Side::Client,
            &crate::audit::AuditOutput::Discard,
        )
        .unwrap()
    }

    /// A resolver seam for the refresh tests (a mock: the real one is the system's, exercised
    /// by the binary tests): always answers `addrs`.
    fn answer(
        addrs: Vec<SocketAddr>,
    ) -> impl Fn(String, u16) -> std::future::Ready<std::io::Result<Vec<SocketAddr>>> {
        move |_, _| std::future::ready(Ok(addrs.clone()))
    }

    /// Two listeners on one port, at 127.0.0.1 and 127.0.0.2, and an entry `db` naming
    /// `localhost` (the one name allowed to answer loopback) that starts at the first.
    async fn two_hosts(
        pinned: bool,
    ) -> (Dialer, SocketAddr, SocketAddr, [tokio::net::TcpListener; 2]) {
        let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = first.local_addr().unwrap();
        let second = tokio::net::TcpListener::bind(("127.0.0.2", a.port()))
            .await
            .unwrap();
        let b = second.local_addr().unwrap();
        let allow =
            AllowList::from_pairs([("db", format!("localhost:{}", a.port()).as_str())]).unwrap();
        let start = BTreeMap::from([("db".to_owned(), vec![a])]);
        let dialer =
            Dialer::with_addresses(allow, Duration::from_secs(2), Addresses::new(start, pinned));
        (dialer, a, b, [first, second])
    }

    #[tokio::test]
    async fn p4_a_refresh_moves_the_dialer_to_new_answers_and_never_to_refused_ones() {
        let (dialer, a, b, _listeners) = two_hosts(false).await;
        assert_eq!(dialer.dial("db").await.unwrap().1, a);
        // The same answer: nothing to record.
        assert!(refresh_once(&dialer, answer(vec![a])).await.is_empty());
        // Another answer: adopted, recorded, dialled.
        let changes = refresh_once(&dialer, answer(vec![b])).await;
        assert_eq!(
            changes,
            [AddressChange {
                entry: "db".into(),
                host: "localhost".into(),
                before: vec![a],
                after: vec![b],
                refused: vec![],
                adopted: true,
            }]
        );
        assert_eq!(dialer.dial("db").await.unwrap().1, b);
        // A resolver outage keeps the set.
        let down = |_: String, _: u16| {
            std::future::ready(Err::<Vec<SocketAddr>, _>(std::io::Error::other("down")))
        };
        assert!(refresh_once(&dialer, down).await.is_empty());
        assert_eq!(dialer.dial("db").await.unwrap().1, b);
        // An answer moved onto the metadata address: refused, recorded, not adopted.
        let metadata: SocketAddr = format!("169.254.169.254:{}", a.port()).parse().unwrap();
        let changes = refresh_once(&dialer, answer(vec![metadata])).await;
        assert_eq!(changes.len(), 1);
        assert!(!changes[0].adopted);
        assert!(changes[0].after.is_empty());
        assert!(
            changes[0].refused[0].contains("169.254.169.254"),
            "{changes:?}"
        );
        assert_eq!(dialer.dial("db").await.unwrap().1, b);
        let audit = discard();
        let r = change_record(&audit, "spiffe://x/client/acme", &changes[0]);
        assert_eq!(r.outcome, Some(ewii_common::audit::Outcome::Refused));
        let reason = r.reason.unwrap();
        assert!(
            reason.contains("refused answers:") && reason.contains("kept the addresses it had"),
            "{reason}"
        );
    }

    /// With the eBPF lock attached the Dialer keeps the addresses the lock holds: a new answer
    /// is recorded as not adopted, and dials still go to the start-up address.
    #[tokio::test]
    async fn p4_p16_with_the_lock_a_new_answer_is_recorded_and_not_adopted() {
        let (dialer, a, b, _listeners) = two_hosts(true).await;
        let changes = refresh_once(&dialer, answer(vec![b])).await;
        assert_eq!(changes.len(), 1);
        assert!(!changes[0].adopted);
        assert_eq!(changes[0].after, vec![b]);
        assert_eq!(dialer.dial("db").await.unwrap().1, a);
        let audit = discard();
        let r = change_record(&audit, "spiffe://x/client/acme", &changes[0]);
        assert_eq!(r.event, ewii_common::audit::Event::DnsChanged);
        assert_eq!(r.outcome, Some(ewii_common::audit::Outcome::Refused));
        assert!(
            r.reason
                .as_deref()
                .unwrap()
                .contains("restart the Client to adopt"),
            "{:?}",
            r.reason
        );
        assert_eq!(r.destination.unwrap().name, "db");
    }

    /// Answers refused when the layers were planned at start are recorded once the Client
    /// runs, with the addresses it took; an entry with none refused, or given as an address,
    /// is not.
    #[test]
    fn p4_p11_answers_refused_at_start_are_on_record() {
        let allow = AllowList::from_pairs([
            ("db", "db.example:5432"),
            ("cache", "cache.example:6379"),
            ("ip", "10.0.0.9:80"),
        ])
        .unwrap();
        let taken: SocketAddr = "10.0.0.5:5432".parse().unwrap();
        let report = crate::enforce::Report {
            addresses: BTreeMap::from([
                ("db".to_owned(), vec![taken]),
                ("cache".to_owned(), vec!["10.0.0.6:6379".parse().unwrap()]),
            ]),
            // An entry given as an address is never looked up: whatever the report says of
            // it, it has no record.
            refused_answers: BTreeMap::from([
                (
                    "db".to_owned(),
                    vec!["169.254.169.254:5432 is link-local".to_owned()],
                ),
                ("ip".to_owned(), vec!["stale".to_owned()]),
            ]),
            ..crate::enforce::Report::default()
        };
        let changes = refused_at_start(&allow, &report);
        assert_eq!(
            changes,
            [AddressChange {
                entry: "db".into(),
                host: "db.example".into(),
                before: vec![],
                after: vec![taken],
                refused: vec!["169.254.169.254:5432 is link-local".into()],
                adopted: true,
            }]
        );
        let r = change_record(&discard(), "spiffe://x/client/acme", &changes[0]);
        assert_eq!(
            r.reason.as_deref(),
            Some("db.example resolved to 10.0.0.5:5432 (was none); refused answers: 169.254.169.254:5432 is link-local; adopted")
        );
    }

    /// A stand-in for the system resolver (a mock: the system's cannot be made slow or down
    /// here): counts its lookups, holds each until `gate` gives it a permit, then fails the
    /// first and answers `addr` after.
    fn held_resolver(
        addr: SocketAddr,
        calls: &Arc<std::sync::atomic::AtomicUsize>,
        gate: &Arc<tokio::sync::Semaphore>,
    ) -> Resolver {
        let (calls, gate) = (Arc::clone(calls), Arc::clone(gate));
        Arc::new(move |_, _| {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let gate = Arc::clone(&gate);
            Box::pin(async move {
                gate.acquire()
                    .await
                    .map_err(std::io::Error::other)?
                    .forget();
                if n == 0 {
                    Err(std::io::Error::other("resolver down"))
                } else {
                    Ok(vec![addr])
                }
            })
        })
    }

    /// A listener, and a dialer whose entry `db` names `localhost` at its port with no
    /// addresses yet, looking up through [`held_resolver`] (its count and gate returned).
    async fn unresolved() -> (
        Dialer,
        SocketAddr,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<tokio::sync::Semaphore>,
        tokio::net::TcpListener,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let allow =
            AllowList::from_pairs([("db", format!("localhost:{}", addr.port()).as_str())]).unwrap();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let dialer = Dialer::new(allow, Duration::from_secs(2))
            .with_resolver(held_resolver(addr, &calls, &gate));
        (dialer, addr, calls, gate, listener)
    }

    /// Waits (bounded) until `n` dials hold the lookup in flight for `name` (each holds a
    /// handle to it from before its lookup starts until it has the answer; on the test's one
    /// thread, a dial that holds one is waiting inside it).
    async fn waiting_on(dialer: &Dialer, name: &str, n: usize) {
        let joined = || {
            let m = dialer.lookups.in_flight.lock().unwrap();
            m.get(name).map_or(0, |f| Arc::strong_count(f) - 1)
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while joined() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} of {n} dials joined the lookup", joined()));
    }

    /// A burst of queries for an entry that did not resolve at start costs one lookup, whose
    /// failure they all get; the next query looks up again, and its answer becomes the set.
    #[tokio::test]
    async fn p4_queries_for_an_unresolved_name_share_one_lookup() {
        use std::sync::atomic::Ordering::SeqCst;
        let (dialer, addr, calls, gate, _listener) = unresolved().await;
        let burst: Vec<_> = (0..50)
            .map(|_| {
                let d = dialer.clone();
                tokio::spawn(async move { d.dial("db").await })
            })
            .collect();
        waiting_on(&dialer, "db", 50).await;
        assert_eq!(calls.load(SeqCst), 1, "one lookup for the whole burst");
        gate.add_permits(1);
        for q in burst {
            let err = tokio::time::timeout(Duration::from_secs(10), q)
                .await
                .expect("every query of the burst has its answer")
                .unwrap()
                .unwrap_err();
            assert!(
                matches!(&err, DialError::Resolve { name, why } if name == "db" && why.contains("resolver down")),
                "{err:?}"
            );
        }
        assert_eq!(calls.load(SeqCst), 1);
        // The failure is not remembered: the next queries look up again (one lookup for them
        // all), and keep the answer, which is on record once as the entry's first addresses.
        let audit = discard();
        let dialer = dialer.audited(audit.clone(), "spiffe://x/client/acme".into());
        let burst: Vec<_> = (0..5)
            .map(|_| {
                let d = dialer.clone();
                tokio::spawn(async move { d.dial("db").await })
            })
            .collect();
        waiting_on(&dialer, "db", 5).await;
        gate.add_permits(1);
        for q in burst {
            assert_eq!(q.await.unwrap().unwrap().1, addr);
        }
        assert_eq!(calls.load(SeqCst), 2);
        assert_eq!(dialer.addresses.get("db"), vec![addr]);
        let found: Vec<_> = audit
            .records()
            .into_iter()
            .filter(|r| r.event == ewii_common::audit::Event::DnsChanged)
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].outcome, Some(ewii_common::audit::Outcome::Ok));
        assert_eq!(
            found[0].reason.as_deref(),
            Some(format!("localhost resolved to {addr} (was none); adopted").as_str())
        );
        assert_eq!(dialer.dial("db").await.unwrap().1, addr);
        assert_eq!(
            calls.load(SeqCst),
            2,
            "a name with addresses is not looked up"
        );
        assert!(dialer.lookups.in_flight.lock().unwrap().is_empty());
    }

    /// A refresh that gives an entry its addresses while a dial's lookup for it runs stands:
    /// the lookup then takes them, and does not record a second "first" set.
    #[tokio::test]
    async fn p4_p11_a_refresh_during_a_dials_lookup_is_not_recorded_twice() {
        let (dialer, addr, _calls, gate, _listener) = unresolved().await;
        // The refresh answers another address than the held lookup will.
        let second = tokio::net::TcpListener::bind(("127.0.0.2", addr.port()))
            .await
            .unwrap();
        let refreshed = second.local_addr().unwrap();
        let audit = discard();
        let dialer = dialer.audited(audit.clone(), "spiffe://x/client/acme".into());
        // The first lookup fails: let it, then hold the next one.
        gate.add_permits(1);
        assert!(dialer.dial("db").await.is_err());
        let d = dialer.clone();
        let dial = tokio::spawn(async move { d.dial("db").await });
        waiting_on(&dialer, "db", 1).await;
        let changes = refresh_once(&dialer, answer(vec![refreshed])).await;
        assert_eq!(changes.len(), 1);
        assert!(changes[0].adopted);
        gate.add_permits(1);
        assert_eq!(
            dial.await.unwrap().unwrap().1,
            refreshed,
            "the refresh's set stands"
        );
        assert_eq!(dialer.addresses.get("db"), vec![refreshed]);
        let recorded = audit
            .records()
            .into_iter()
            .filter(|r| r.event == ewii_common::audit::Event::DnsChanged)
            .count();
        assert_eq!(
            recorded, 0,
            "the refresh's change is its caller's to record"
        );
    }

    /// A dial that comes as a lookup ends takes what the lookup left: the addresses it set,
    /// never a failure that has not left the map yet.
    #[tokio::test]
    async fn p4_a_dial_at_a_lookups_end_takes_its_addresses_and_never_its_stale_failure() {
        use std::sync::atomic::Ordering::SeqCst;
        let (dialer, addr, calls, gate, _listener) = unresolved().await;
        let failed = DialError::Resolve {
            name: "db".into(),
            why: "resolver down".into(),
        };
        let stale = Arc::new(Flight::new_with(Some(Err(failed))));
        dialer
            .lookups
            .in_flight
            .lock()
            .unwrap()
            .insert("db".into(), stale);
        gate.add_permits(2);
        // The resolver's first answer fails, its second answers: a fresh lookup, not the
        // stale failure, and then a third with the addresses it set.
        let err = dialer.dial("db").await.unwrap_err();
        assert!(
            matches!(&err, DialError::Resolve { why, .. } if why.contains("resolver down")),
            "{err:?}"
        );
        assert_eq!(
            calls.load(SeqCst),
            1,
            "the stale failure was not the answer"
        );
        assert_eq!(dialer.dial("db").await.unwrap().1, addr);
        assert_eq!(calls.load(SeqCst), 2);
        // Addresses that arrive while a dial is on its way to the lookup are taken as they are.
        let other: SocketAddr = "127.0.0.3:1".parse().unwrap();
        assert!(dialer.addresses.replace_if("db", &[addr], vec![other]));
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            dialer
                .lookups
                .resolve("db", "localhost", addr.port(), &dialer.addresses),
        )
        .await
        .expect("no lookup: the addresses are there")
        .unwrap();
        assert_eq!(got, vec![other]);
        assert_eq!(calls.load(SeqCst), 2);
    }

    /// With the eBPF lock attached, a name that had no acceptable address at start is refused
    /// saying why, and its answer now is not adopted: the lock holds no address for it.
    #[tokio::test]
    async fn p4_p16_with_the_lock_a_name_unresolved_at_start_is_refused_saying_why() {
        use std::sync::atomic::Ordering::SeqCst;
        let (dialer, addr, calls, gate, _listener) = unresolved().await;
        let dialer = Dialer {
            addresses: Addresses::new(BTreeMap::new(), true),
            ..dialer
        };
        gate.add_permits(2);
        // The stand-in resolver fails first: that is the error.
        let err = dialer.dial("db").await.unwrap_err();
        assert_eq!(err.to_string(), "cannot resolve db: resolver down");
        // Then it answers: said, not adopted, nothing dialled.
        let err = dialer.dial("db").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot resolve db: localhost resolves to {addr} now, but had no acceptable \
                 address at start, and the eBPF lock holds none for it: restart the Client to \
                 adopt it"
            )
        );
        assert_eq!(calls.load(SeqCst), 2);
        assert!(dialer.addresses.get("db").is_empty());
        // Asked again at once (a Hub sending `Open` in a loop): the same refusal, no lookup
        // (one would wait for the stand-in resolver's next permit).
        let again = tokio::time::timeout(Duration::from_secs(5), dialer.dial("db"))
            .await
            .expect("answered without a lookup")
            .unwrap_err();
        assert_eq!(again.to_string(), err.to_string());
        assert_eq!(calls.load(SeqCst), 2);
    }

    /// A query cut while its lookup runs (its task dropped: the connection ended) does not
    /// strand the queries that joined it: one of them looks up in its place.
    #[tokio::test]
    async fn p4_a_lookup_whose_query_is_cut_is_taken_over() {
        use std::sync::atomic::Ordering::SeqCst;
        let (dialer, addr, calls, gate, _listener) = unresolved().await;
        let first = {
            let d = dialer.clone();
            tokio::spawn(async move { d.dial("db").await })
        };
        waiting_on(&dialer, "db", 1).await;
        let second = {
            let d = dialer.clone();
            tokio::spawn(async move { d.dial("db").await })
        };
        waiting_on(&dialer, "db", 2).await;
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        // The second dial's lookup (the resolver's second call) answers.
        gate.add_permits(1);
        let reached = tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("the joined query must not hang")
            .unwrap()
            .unwrap()
            .1;
        assert_eq!(reached, addr);
        assert_eq!(calls.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn closed_port_is_unreachable_not_a_panic() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let allow = AllowList::from_pairs([("db", addr.as_str())]).unwrap();
        let dialer = Dialer::new(allow, Duration::from_secs(2));
        assert!(matches!(
            dialer.dial("db").await,
            Err(DialError::Unreachable { .. })
        ));
    }
}
