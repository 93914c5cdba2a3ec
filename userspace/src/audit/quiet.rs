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
    /// The identity a refused certificate names (or `(none)`), where the address is unknown.
    Claimed(String),
    /// The sources past [`SOURCES`].
    Others,
}

impl Source {
    /// The source of a peer at `ip`.
    pub fn address(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::Address(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self::Address(IpAddr::V6(prefix.into()))
                }
            },
            v4 => Self::Address(v4),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Address(ip @ IpAddr::V6(_)) => format!("{ip}/64"),
            Self::Address(ip) => ip.to_string(),
            Self::Claimed(id) => id.clone(),
            Self::Others => format!("other sources (past {SOURCES} at once)"),
        }
    }
}

/// One source in its window.
#[derive(Debug)]
struct Window {
    ends: Instant,
    written: u32,
    /// Held back in this window, per event, with the first one's time.
    held: Vec<(Event, u64, Timestamp)>,
}

/// The windows of every source, shared by every handle and the writer thread.
#[derive(Debug)]
pub(super) struct Quiet {
    pub(super) side: Side,
    pub(super) format: Format,
    sources: HashMap<Source, Window>,
}

impl Quiet {
    pub(super) fn new(side: Side) -> Self {
        Self {
            side,
            format: Format::Ewii,
            sources: HashMap::new(),
        }
    }

    /// Whether `record` from `source` is written now; counted as held back when not. Also
    /// returns the line of a summary due first (the source's last window ended with records
    /// held back).
    pub(super) fn admit(
        &mut self,
        source: Source,
        record: &AuditRecord,
        now: Instant,
    ) -> (bool, Vec<String>) {
        let source = if self.sources.len() >= SOURCES && !self.sources.contains_key(&source) {
            Source::Others
        } else {
            source
        };
        let mut due = Vec::new();
        let window = self.sources.entry(source.clone()).or_insert(Window {
            ends: now + WINDOW,
            written: 0,
            held: Vec::new(),
        });
        if now >= window.ends {
            due = summaries(self.side, self.format, &source, window);
            *window = Window {
                ends: now + WINDOW,
                written: 0,
                held: Vec::new(),
            };
        }
        if window.written < BURST {
            window.written += 1;
            return (true, due);
        }
        match window.held.iter_mut().find(|(e, _, _)| *e == record.event) {
            Some((_, n, _)) => *n += 1,
            None => window.held.push((record.event, 1, record.time)),
        }
        (false, due)
    }

    /// The summaries of the windows that ended by `now` (every window when `all`); ended
    /// windows are forgotten.
    pub(super) fn due(&mut self, now: Instant, all: bool) -> Vec<String> {
        let (side, format) = (self.side, self.format);
        let mut lines = Vec::new();
        self.sources.retain(|source, window| {
            if all || now >= window.ends {
                lines.extend(summaries(side, format, source, window));
                window.held.clear();
            }
            now < window.ends
        });
        lines
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

/// One summary line per event `window` held back from `source`.
fn summaries(side: Side, format: Format, source: &Source, window: &Window) -> Vec<String> {
    window
        .held
        .iter()
        .map(|&(event, n, since)| {
            let mut r = AuditRecord::new(crate::now_timestamp(), side, event);
            r.outcome = Some(Outcome::Refused);
            match source {
                Source::Address(ip) => r.peer = Some(ip.to_string()),
                Source::Claimed(id) => r.client = Some(id.clone()),
                Source::Others => {}
            }
            r.reason = Some(format!(
                "{n} more records of this event from {} since {since}, not written one by one: at most {BURST} per source every {} s are",
                source.describe(),
                WINDOW.as_secs()
            ));
            r.render(format)
        })
        .collect()
}
