//! Records that strangers can cause at will (a refused handshake, a throttled enrolment) are
//! written one by one only up to [`BURST`] per source and [`WINDOW`]; the rest are counted,
//! and one summary record per source and window says how many were held back, from when, and
//! why. Without it a flood of bad handshakes writes a line each, as fast as the Hub can refuse
//! them: the sink (a disk, a SIEM billed by the gigabyte) fills, and a sink that lags sheds
//! every Client's queries ([`Audit::admit_query`](super::Audit::admit_query)).
//!
//! Nothing is lost: the metrics count every record, the summaries give the count of the rest,
//! and a flush (or the writer's end) writes the summaries of windows still open. The sources
//! tracked at once are bounded ([`SOURCES`]); beyond, the rest share one entry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{AuditRecord, Event, Format, Outcome, Side};
use ewii_common::time::Timestamp;
use tokio::time::Instant;

/// Records written one by one per source and window.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Sources tracked at once; the others share one entry.
const SOURCES: usize = 1024;

/// Where a record that strangers can cause comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A peer's address (an IPv6 one by its /64: one host holds a whole prefix).
    Address(IpAddr),
    /// A peer's address (as [`Address`](Self::Address)), for its refused enrolments: apart
    /// from its other records, so that the record of its enrolments being throttled, which
    /// follows ten of them, is not held back behind them.
    Enrolling(IpAddr),
    /// A peer's address, for the records of its enrolments refused unread (throttled): apart
    /// from its refused handshakes and enrolments, which come before them.
    Throttled(IpAddr),
    /// The identity a refused certificate names, proven by its chain (refused for its serial,
    /// its role, …), where the address is unknown.
    Claimed(String),
    /// Proven certificates naming IDs of this federated trust domain that its `[[federation]]`
    /// entry does not list: the customer's CA can mint as many such IDs as it likes, so they
    /// share one source rather than each getting a share of its own.
    Unlisted(String),
    /// Certificates whose chain did not verify: what they name proves nothing, so they share
    /// one source (one stranger could otherwise name a new identity each time, or use up a real
    /// Client's share).
    Unverified,
    /// The sources past [`SOURCES`].
    Others,
}

impl Source {
    /// The source of a peer at `ip`.
    pub fn address(ip: IpAddr) -> Self {
        Self::Address(host(ip))
    }

    /// The source of the refused enrolments of a peer at `ip`.
    pub fn enrolling(ip: IpAddr) -> Self {
        Self::Enrolling(host(ip))
    }

    /// The source of the throttled enrolments of a peer at `ip`.
    pub fn throttled(ip: IpAddr) -> Self {
        Self::Throttled(host(ip))
    }

    fn describe(&self) -> String {
        match self {
            Self::Address(ip) => host_text(ip),
            Self::Enrolling(ip) => format!("{} (its enrolments)", host_text(ip)),
            Self::Throttled(ip) => format!("{} (its throttled enrolments)", host_text(ip)),
            Self::Claimed(id) => id.clone(),
            Self::Unlisted(td) => {
                format!("the IDs of trust domain {td} that [[federation]] does not list")
            }
            Self::Unverified => "certificates whose chain did not verify".to_owned(),
            Self::Others => format!("other sources (past {SOURCES} at once)"),
        }
    }
}

/// The host a peer at `ip` is: an IPv4 address (also v4-mapped), or an IPv6 /64.
fn host(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
        v4 => v4,
    }
}

/// A host as [`host`] made it: an IPv6 one with its prefix length.
fn host_text(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V6(_) => format!("{ip}/64"),
        IpAddr::V4(_) => ip.to_string(),
    }
}

/// One source in its window.
#[derive(Debug)]
struct Window {
    ends: Instant,
    written: u32,
    /// Held back in this window, per event and outcome, with the first one's time.
    held: Vec<(Event, Option<Outcome>, u64, Timestamp)>,
}

/// What [`Quiet::admit`] decided.
#[derive(Debug)]
pub(super) struct Admitted {
    /// Whether the record is written now (else it was counted).
    pub(super) write: bool,
    /// Summaries due first: the source's last window ended with records held back.
    pub(super) due: Vec<AuditRecord>,
    /// The first record held back in its window: the writer must learn when that window ends.
    pub(super) first_held: bool,
}

/// The windows of every source, shared by every handle and the writer thread.
pub(super) struct Quiet {
    pub(super) side: Side,
    pub(super) format: Format,
    /// The tap of the handles, if any: summaries are records too.
    pub(super) tap: Option<Arc<super::Tap>>,
    /// [`WINDOW`] (shorter in tests).
    pub(super) window: Duration,
    sources: HashMap<Source, Window>,
}

impl std::fmt::Debug for Quiet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quiet")
            .field("sources", &self.sources.len())
            .finish_non_exhaustive()
    }
}

impl Quiet {
    pub(super) fn new(side: Side) -> Self {
        Self {
            side,
            format: Format::Ewii,
            tap: None,
            window: WINDOW,
            sources: HashMap::new(),
        }
    }

    /// The lines of `records` (summaries), which also go to the tap.
    pub(super) fn lines(&self, records: Vec<AuditRecord>) -> Vec<String> {
        records
            .into_iter()
            .map(|r| {
                let line = r.render(self.format);
                if let Some(tap) = &self.tap {
                    tap.push(r);
                }
                line
            })
            .collect()
    }

    /// Whether `record` from `source` is written now; counted as held back when not.
    pub(super) fn admit(&mut self, source: Source, record: &AuditRecord, now: Instant) -> Admitted {
        let source = if self.sources.len() >= SOURCES && !self.sources.contains_key(&source) {
            Source::Others
        } else {
            source
        };
        let mut due = Vec::new();
        let length = self.window;
        let window = self.sources.entry(source.clone()).or_insert(Window {
            ends: now + length,
            written: 0,
            held: Vec::new(),
        });
        if now >= window.ends {
            due = summaries(self.side, &source, window, length);
            *window = Window {
                ends: now + length,
                written: 0,
                held: Vec::new(),
            };
        }
        if window.written < BURST {
            window.written += 1;
            return Admitted {
                write: true,
                due,
                first_held: false,
            };
        }
        let first_held = window.held.is_empty();
        let held = window
            .held
            .iter_mut()
            .find(|(e, o, _, _)| *e == record.event && *o == record.outcome);
        match held {
            Some((_, _, n, _)) => *n += 1,
            None => {
                let (event, outcome) = (record.event, record.outcome);
                window.held.push((event, outcome, 1, record.time));
            }
        }
        Admitted {
            write: false,
            due,
            first_held,
        }
    }

    /// The summaries of the windows that ended by `now` (every window when `all`); ended
    /// windows are forgotten.
    pub(super) fn due(&mut self, now: Instant, all: bool) -> Vec<AuditRecord> {
        let (side, length) = (self.side, self.window);
        let mut records = Vec::new();
        self.sources.retain(|source, window| {
            if all || now >= window.ends {
                records.extend(summaries(side, source, window, length));
                window.held.clear();
            }
            now < window.ends
        });
        records
    }

    /// When the writer must look again: the end of the first window holding records back.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.sources
            .values()
            .filter(|w| !w.held.is_empty())
            .map(|w| w.ends)
            .min()
    }
}

/// One summary record per event and outcome `window` (of `length`) held back from `source`.
fn summaries(side: Side, source: &Source, window: &Window, length: Duration) -> Vec<AuditRecord> {
    window
        .held
        .iter()
        .map(|&(event, outcome, n, since)| {
            let mut r = AuditRecord::new(crate::now_timestamp(), side, event);
            r.outcome = outcome;
            match source {
                // An IPv6 host by its prefix: the records held back came from all of it.
                Source::Address(ip) | Source::Enrolling(ip) | Source::Throttled(ip) => {
                    r.peer = Some(host_text(ip))
                }
                Source::Claimed(id) => r.client = Some(id.clone()),
                // The trust domain's own SPIFFE ID: every ID the summary holds begins with it.
                Source::Unlisted(td) => r.client = Some(format!("spiffe://{td}")),
                Source::Unverified | Source::Others => {}
            }
            r.reason = Some(format!(
                "{n} more records of this event from {} since {since}, not written one by one: at most {BURST} per source every {} s are",
                source.describe(),
                length.as_secs_f64()
            ));
            r
        })
        .collect()
}
