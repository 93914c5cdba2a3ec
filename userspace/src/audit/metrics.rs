//! Counters derived from the audit stream: every record [`Audit::emit`](super::Audit::emit)
//! writes is also counted here, so a metric never says something the audit log does not.
//!
//! The Client publishes them in `status.json` and, optionally, as a Prometheus textfile for
//! node-exporter (it has no listener, P13); the Hub serves them on `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use ewii_common::audit::{AuditRecord, Event, Outcome, Side};
use serde::{Deserialize, Serialize};

/// The live counters (atomics: one add per record, from any thread).
#[derive(Debug, Default)]
pub struct Metrics {
    queries: [AtomicU64; 3],
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    sessions_up: AtomicU64,
    sessions_lost: AtomicU64,
    handshakes_refused: AtomicU64,
    rotations: [AtomicU64; 3],
    last_rotation: AtomicI64,
    bundle_updates: AtomicU64,
    enrolments: AtomicU64,
    enrolments_refused: AtomicU64,
    revocations: AtomicU64,
    kernel_denied: AtomicU64,
    webhooks_delivered: AtomicU64,
    webhooks_failed: AtomicU64,
    dns_changed: AtomicU64,
    queries_shed: AtomicU64,
    /// Not published: see [`Metrics::count_quiet_spell`].
    quiet_spells: AtomicU64,
}

/// Counters by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByOutcome {
    /// It went through.
    pub ok: u64,
    /// Refused by policy or identity checks.
    pub refused: u64,
    /// Failed (I/O, timeout, peer gone).
    pub failed: u64,
}

/// A copy of the counters at one moment: what `status.json` and the textfile carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    /// Queries (one per requester connection), by outcome.
    pub queries: ByOutcome,
    /// Bytes from requester to destination, over all queries.
    pub bytes_up: u64,
    /// Bytes from destination to requester, over all queries.
    pub bytes_down: u64,
    /// Sessions that came up. On the Client, every one after the first is a reconnection.
    pub sessions_up: u64,
    /// Sessions that ended.
    pub sessions_lost: u64,
    /// TLS handshakes this side refused.
    pub handshakes_refused: u64,
    /// SVID renewals, by outcome.
    pub rotations: ByOutcome,
    /// When the last renewal succeeded, seconds since the epoch (0: none yet).
    pub last_rotation_unix: i64,
    /// Trust-bundle changes.
    pub bundle_updates: u64,
    /// Enrolments made.
    pub enrolments: u64,
    /// Enrolments refused.
    pub enrolments_refused: u64,
    /// Revocations (Hub: recorded; Client: told so).
    pub revocations: u64,
    /// Kernel refusals of the Client's cgroup (the eBPF lock).
    pub kernel_denied: u64,
    /// Webhook deliveries acknowledged.
    pub webhooks_delivered: u64,
    /// Webhook delivery attempts that failed (each is retried).
    pub webhooks_failed: u64,
    /// DNS allow-list answers that changed at a refresh.
    pub dns_changed: u64,
    /// Queries refused because the audit sink lagged (`audit_backlog` records sum them up).
    pub queries_shed: u64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

fn by_outcome(c: &[AtomicU64; 3], outcome: Option<Outcome>) {
    let i = match outcome {
        Some(Outcome::Ok) | None => 0,
        Some(Outcome::Refused) => 1,
        // Failed, and whatever a later version adds.
        Some(_) => 2,
    };
    add(&c[i], 1);
}

fn read3(c: &[AtomicU64; 3]) -> ByOutcome {
    ByOutcome {
        ok: c[0].load(Relaxed),
        refused: c[1].load(Relaxed),
        failed: c[2].load(Relaxed),
    }
}

impl Metrics {
    /// Counts one emitted record.
    pub fn count(&self, r: &AuditRecord) {
        match r.event {
            Event::Query => {
                by_outcome(&self.queries, r.outcome);
                add(&self.bytes_up, r.bytes_up.unwrap_or(0));
                add(&self.bytes_down, r.bytes_down.unwrap_or(0));
            }
            Event::SessionUp => add(&self.sessions_up, 1),
            Event::SessionLost => add(&self.sessions_lost, 1),
            Event::HandshakeRefused => add(&self.handshakes_refused, 1),
            Event::SvidRotated => {
                by_outcome(&self.rotations, r.outcome);
                if matches!(r.outcome, Some(Outcome::Ok) | None) {
                    let secs = (r.time.0 / 1_000_000) as i64;
                    self.last_rotation.fetch_max(secs, Relaxed);
                }
            }
            Event::BundleUpdated if r.outcome != Some(Outcome::Refused) => {
                add(&self.bundle_updates, 1);
            }
            Event::Enrolled => add(&self.enrolments, 1),
            Event::EnrolmentRefused => add(&self.enrolments_refused, 1),
            Event::Revoked if r.outcome != Some(Outcome::Failed) => add(&self.revocations, 1),
            // A record of refusals the kernel could not report one by one counts them all
            // (`enforce::lost_record`: no destination, its reason starts with the count).
            Event::KernelDenied => add(
                &self.kernel_denied,
                match &r.destination {
                    Some(_) => 1,
                    None => r
                        .reason
                        .as_deref()
                        .and_then(|x| x.split(' ').next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(1),
                },
            ),
            Event::WebhookDelivered => add(&self.webhooks_delivered, 1),
            Event::WebhookFailed => add(&self.webhooks_failed, 1),
            Event::DnsChanged => add(&self.dns_changed, 1),
            _ => {}
        }
    }

    /// Queries ended so far, whatever their outcome (a cheap measure of work done).
    pub fn queries_ended(&self) -> u64 {
        self.queries.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Sessions that came up so far.
    pub fn sessions_up(&self) -> u64 {
        self.sessions_up.load(Relaxed)
    }

    /// Counts one spell of quiet on a connection whose queries stay open after moving data (a
    /// pooled database connection after a large result): no query ended, yet the work has
    /// stopped. Not published; the heap thread reads it beside [`Metrics::queries_ended`].
    pub fn count_quiet_spell(&self) {
        add(&self.quiet_spells, 1);
    }

    /// Spells counted by [`Metrics::count_quiet_spell`].
    pub fn quiet_spells(&self) -> u64 {
        self.quiet_spells.load(Relaxed)
    }

    /// Counts one query refused because the audit sink lagged.
    pub fn count_shed(&self) {
        add(&self.queries_shed, 1);
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Relaxed);
        Snapshot {
            queries: read3(&self.queries),
            bytes_up: get(&self.bytes_up),
            bytes_down: get(&self.bytes_down),
            sessions_up: get(&self.sessions_up),
            sessions_lost: get(&self.sessions_lost),
            handshakes_refused: get(&self.handshakes_refused),
            rotations: read3(&self.rotations),
            last_rotation_unix: self.last_rotation.load(Relaxed),
            bundle_updates: get(&self.bundle_updates),
            enrolments: get(&self.enrolments),
            enrolments_refused: get(&self.enrolments_refused),
            revocations: get(&self.revocations),
            kernel_denied: get(&self.kernel_denied),
            webhooks_delivered: get(&self.webhooks_delivered),
            webhooks_failed: get(&self.webhooks_failed),
            dns_changed: get(&self.dns_changed),
            queries_shed: get(&self.queries_shed),
        }
    }
}

/// Prometheus text exposition (format 0.0.4), one family at a time.
#[derive(Debug, Default)]
pub struct Exposition(String);

impl Exposition {
    /// Adds a family with one unlabelled sample.
    pub fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help, &[("", value.to_string())]);
    }

    /// Adds a family; each sample is `(labels, value)` with labels already rendered
    /// (`outcome="ok"`) or empty.
    pub fn family(&mut self, name: &str, kind: &str, help: &str, samples: &[(&str, String)]) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(self.0, "{name} {value}");
            } else {
                let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
            }
        }
    }

    /// The text.
    pub fn finish(self) -> String {
        self.0
    }
}

fn outcomes(b: ByOutcome) -> [(&'static str, String); 3] {
    [
        ("outcome=\"ok\"", b.ok.to_string()),
        ("outcome=\"refused\"", b.refused.to_string()),
        ("outcome=\"failed\"", b.failed.to_string()),
    ]
}

impl Snapshot {
    /// The counters as Prometheus families named `ewii_<side>_…`.
    pub fn expose(&self, side: Side, out: &mut Exposition) {
        let p = match side {
            Side::Client => "ewii_client",
            Side::Hub => "ewii_hub",
        };
        let n = |s: &str| format!("{p}_{s}");
        out.family(
            &n("queries_total"),
            "counter",
            "Queries (requester connections) by outcome.",
            &outcomes(self.queries),
        );
        out.family(
            &n("query_bytes_total"),
            "counter",
            "Bytes carried by queries; up is requester to destination.",
            &[
                ("direction=\"up\"", self.bytes_up.to_string()),
                ("direction=\"down\"", self.bytes_down.to_string()),
            ],
        );
        out.one(
            &n("queries_shed_total"),
            "counter",
            "Queries refused because the audit sink lagged (no record is ever dropped).",
            self.queries_shed,
        );
        out.one(
            &n("sessions_up_total"),
            "counter",
            "Sessions that came up.",
            self.sessions_up,
        );
        out.one(
            &n("sessions_lost_total"),
            "counter",
            "Sessions that ended.",
            self.sessions_lost,
        );
        out.one(
            &n("handshakes_refused_total"),
            "counter",
            "TLS handshakes refused by this side.",
            self.handshakes_refused,
        );
        out.family(
            &n("svid_rotations_total"),
            "counter",
            "SVID renewals by outcome.",
            &outcomes(self.rotations),
        );
        out.one(
            &n("svid_last_rotation_timestamp_seconds"),
            "gauge",
            "When the last renewal succeeded (0: none since start).",
            self.last_rotation_unix,
        );
        out.one(
            &n("bundle_updates_total"),
            "counter",
            "Trust-bundle changes.",
            self.bundle_updates,
        );
        out.one(
            &n("revocations_total"),
            "counter",
            "Revocations.",
            self.revocations,
        );
        match side {
            Side::Client => {
                out.one(
                    &n("kernel_denied_total"),
                    "counter",
                    "Connections and packets of the Client's cgroup refused by the eBPF lock.",
                    self.kernel_denied,
                );
                out.one(
                    &n("dns_changes_total"),
                    "counter",
                    "DNS allow-list answers that changed at a refresh.",
                    self.dns_changed,
                );
            }
            Side::Hub => {
                out.family(
                    &n("enrolments_total"),
                    "counter",
                    "Enrolments by outcome.",
                    &[
                        ("outcome=\"ok\"", self.enrolments.to_string()),
                        ("outcome=\"refused\"", self.enrolments_refused.to_string()),
                    ],
                );
                out.family(
                    &n("webhooks_total"),
                    "counter",
                    "Webhook delivery attempts by outcome (failed ones are retried).",
                    &[
                        ("outcome=\"delivered\"", self.webhooks_delivered.to_string()),
                        ("outcome=\"failed\"", self.webhooks_failed.to_string()),
                    ],
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ewii_common::time::Timestamp;

    use super::*;

    fn record(event: Event, outcome: Option<Outcome>) -> AuditRecord {
        let mut r = AuditRecord::new(Timestamp(5_000_000), Side::Client, event);
        r.outcome = outcome;
        r
    }

    #[test]
    fn p11_counters_follow_the_records() {
        let m = Metrics::default();
        let mut q = record(Event::Query, Some(Outcome::Ok));
        q.bytes_up = Some(10);
        q.bytes_down = Some(32);
        m.count(&q);
        m.count(&q);
        m.count(&record(Event::Query, Some(Outcome::Refused)));
        m.count(&record(Event::SvidRotated, Some(Outcome::Ok)));
        m.count(&record(Event::SvidRotated, Some(Outcome::Refused)));
        m.count(&record(Event::Revoked, Some(Outcome::Failed)));
        m.count(&record(Event::SessionUp, None));
        // A refusal reported by itself, and 7 the kernel could only count.
        let mut denied = record(Event::KernelDenied, Some(Outcome::Refused));
        denied.destination = Some(ewii_common::audit::Destination {
            name: "udp".into(),
            address: Some("127.0.0.1:9".into()),
        });
        m.count(&denied);
        let audit =
            crate::audit::Audit::open_with_tap(Side::Client, &crate::audit::AuditOutput::Discard)
                .unwrap();
        m.count(&crate::enforce::lost_record(&audit, 7));
        let s = m.snapshot();
        assert_eq!(s.kernel_denied, 8);
        assert_eq!(
            s.queries,
            ByOutcome {
                ok: 2,
                refused: 1,
                failed: 0
            }
        );
        assert_eq!((s.bytes_up, s.bytes_down), (20, 64));
        assert_eq!((s.rotations.ok, s.rotations.refused), (1, 1));
        assert_eq!(s.last_rotation_unix, 5);
        assert_eq!(s.revocations, 0, "a revoke that could not be delivered");
        assert_eq!(s.sessions_up, 1);

        let mut out = Exposition::default();
        s.expose(Side::Client, &mut out);
        let text = out.finish();
        assert!(text.contains("ewii_client_queries_total{outcome=\"ok\"} 2\n"));
        assert!(text.contains("ewii_client_query_bytes_total{direction=\"down\"} 64\n"));
        assert!(text.contains("# TYPE ewii_client_kernel_denied_total counter\n"));
        assert!(!text.contains("ewii_hub_"));
    }
}
