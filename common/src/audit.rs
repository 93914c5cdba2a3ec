//! Audit records (DESIGN §8): one JSON object per line, on both sides, joined by `query_id`.
//!
//! Rendering goes through `serde_json`, which escapes every control character, so no value —
//! a destination name, a reason, a peer's SPIFFE ID — can end a line early and forge a second
//! record. Fields that do not apply to an event are left out, not written as `null`.

use serde::{Serialize, Serializer};

use crate::frame::QueryId;
use crate::time::Timestamp;

/// Which side wrote the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The Ewii Client, in the customer's network.
    Client,
    /// The Ewii Hub, at the operator.
    Hub,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// One query (one requester connection), written when it ends.
    Query,
    /// A session came up.
    SessionUp,
    /// A session ended (`reason` says why).
    SessionLost,
    /// Client: a dial to the Hub ended without a session (`outcome` `refused` when the Hub,
    /// or this side's check of the Hub, said no; `failed` when the network or a name did).
    SessionFailed,
    /// A TLS handshake was refused by this side (`reason` has the local detail).
    HandshakeRefused,
    /// A Client enrolled (Hub) / this Client enrolled (Client).
    Enrolled,
    /// An enrolment attempt was refused.
    EnrolmentRefused,
    /// The operator created a join token.
    TokenCreated,
    /// The process started (`reason` carries the effective configuration summary).
    Started,
    /// The process stopped.
    Stopped,
    /// An identity was revoked (Hub: recorded; Client: told so by the Hub).
    Revoked,
    /// An SVID was renewed (Hub: issued; Client: now in use).
    SvidRotated,
    /// The trust bundle changed (Hub: published; Client: received).
    BundleUpdated,
    /// A webhook delivery was acknowledged by the customer's endpoint.
    WebhookDelivered,
    /// A webhook delivery attempt failed (it is retried until `max_attempts`).
    WebhookFailed,
    /// The SVID expired without renewal: the Client needs a new enrolment.
    SvidExpired,
    /// Which kernel layers are active and what their self-tests saw.
    Enforcement,
    /// The kernel refused a connection or packet from the Client's cgroup.
    KernelDenied,
    /// A DNS allow-list entry's answers changed at a refresh (adopted, or not: see `outcome`).
    DnsChanged,
    /// New queries were refused while the audit sink lagged too far behind (written once it
    /// caught up; `reason` says how many and since when). Records are never dropped.
    AuditBacklog,
}

/// The largest session id: 2^53 − 1. Audit records carry the id as a JSON integer, and many
/// SIEMs (JavaScript's numbers, and every parser that reads JSON numbers as doubles) hold
/// integers beyond 2^53 inexactly, which would break the join of a customer's records by
/// session. RFC 7493 (I-JSON) §2.2 asks for this bound. The Hub picks ids within it, and the
/// Client refuses a `Welcome` beyond it.
pub const MAX_SESSION_ID: u64 = (1 << 53) - 1;

/// Why a session ended: the first word of a `session_lost` record's `reason` on both sides
/// (`"<code>: <detail>"`), from one documented list (docs/audit.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEnd {
    /// The Client said `Goodbye` (it is stopping).
    Goodbye,
    /// The Hub is shutting down or restarting.
    HubShutdown,
    /// No packet within the idle timeout: the peer went silent (crash, network).
    IdleTimeout,
    /// The identity is revoked.
    Revoked,
    /// The SVID of the session expired.
    SvidExpired,
    /// A connection still holding a retired serial drained and was closed.
    Retired,
    /// The Hub's trust bundle for the session's trust domain no longer vouches for its SVID
    /// (its CA was removed: `ewii-hub ca retire --force`, or a federated bundle file).
    Untrusted,
    /// The Hub could not read its records when the session registered, or when its Client
    /// rotated: whether its serial was revoked or retired could not be told, so the Hub
    /// closed it (fail closed); the Client dials again.
    RecordsUnreadable,
    /// The Hub could not record the session as it opened, or its move to a renewed serial
    /// (`Rotated`), because its database refused the write (a full disk, another writer's lock
    /// past the busy timeout): the serial's use and the retirement of the client's older
    /// serials (P8) would not be on record, so the Hub closed it (fail closed); the Client
    /// dials again.
    RecordsUnwritable,
    /// A peer broke the protocol.
    Protocol,
    /// The Client stopped locally (its drain bound ran out, or it was shut down).
    Stopped,
    /// The peer closed it for another reason.
    ClosedByPeer,
    /// The connection broke (reset, transport error).
    ConnectionLost,
}

impl SessionEnd {
    /// The code as written in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Goodbye => "goodbye",
            Self::HubShutdown => "hub_shutdown",
            Self::IdleTimeout => "idle_timeout",
            Self::Revoked => "revoked",
            Self::SvidExpired => "svid_expired",
            Self::Retired => "retired",
            Self::Untrusted => "untrusted",
            Self::RecordsUnreadable => "records_unreadable",
            Self::RecordsUnwritable => "records_unwritable",
            Self::Protocol => "protocol",
            Self::Stopped => "stopped",
            Self::ClosedByPeer => "closed_by_peer",
            Self::ConnectionLost => "connection_lost",
        }
    }

    /// `"<code>: <detail>"`, the `reason` of a `session_lost` record.
    pub fn reason(self, detail: &str) -> String {
        format!("{}: {detail}", self.as_str())
    }
}

/// How an event ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// It went through.
    Ok,
    /// It was refused by policy or identity checks.
    Refused,
    /// It failed (I/O, timeout, peer gone).
    Failed,
}

/// A destination as audited: the entry name, and on the Client the address it resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Destination {
    /// Allow-list entry name, as the Hub asked for it.
    pub name: String,
    /// Resolved address (Client side only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// One audit record. Build with [`AuditRecord::new`] and the `with_*`-free struct update syntax.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// UTC, RFC 3339, microseconds: when the event ended (a query or session: its end).
    pub time: Timestamp,
    /// When a query or session began (both sides stamp `time` at the end).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started: Option<Timestamp>,
    /// Who wrote it.
    pub side: Side,
    /// What happened.
    pub event: Event,
    /// Hub-chosen session id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<u64>,
    /// Joins the Hub's and the Client's record of one query.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "query_id_hex"
    )]
    pub query_id: Option<QueryId>,
    /// The Client's SPIFFE ID (the source workload SVID of the connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The requester: a caller's SPIFFE ID, or a configured principal with the peer address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Where the query went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    /// Bytes from the requester towards the destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    /// Bytes from the destination back to the requester.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
    /// Wall time of the query or session, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// How it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Local detail: why it was refused or failed. Never sent to the peer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Network peer (address of a requester, a Client, or the Hub).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

impl AuditRecord {
    /// A record with only the mandatory fields set.
    pub fn new(time: Timestamp, side: Side, event: Event) -> Self {
        Self {
            time,
            started: None,
            side,
            event,
            session_id: None,
            query_id: None,
            client: None,
            source: None,
            destination: None,
            bytes_up: None,
            bytes_down: None,
            duration_ms: None,
            outcome: None,
            reason: None,
            peer: None,
        }
    }

    /// The record as one line of JSON, without the trailing newline.
    pub fn to_json_line(&self) -> String {
        // Serialising this struct cannot fail: every field is a string, number or enum.
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"event":"audit_error","reason":{:?}}}"#, e.to_string())
        })
    }
}

/// How records are rendered: Ewii's own schema, or OCSF Network Activity (class 4001).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The schema in `docs/audit.md`.
    #[default]
    Ewii,
    /// OCSF 1.1 Network Activity (class_uid 4001), for SIEMs that ingest OCSF.
    Ocsf,
}

impl AuditRecord {
    /// The record in `format`, one line.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Ewii => self.to_json_line(),
            Format::Ocsf => self.to_ocsf_line(),
        }
    }

    /// OCSF 1.1 Network Activity (class_uid 4001). Fields without an OCSF home go to
    /// `unmapped`; nothing is dropped.
    pub fn to_ocsf_line(&self) -> String {
        // OCSF Network Activity activity_id: 1 Open, 2 Close, 4 Fail, 5 Refuse, 6 Traffic, 99 Other.
        let (activity_id, activity_name) = match (self.event, self.outcome) {
            (Event::Query, Some(Outcome::Ok)) => (6, "Traffic"),
            (
                Event::Query
                | Event::KernelDenied
                | Event::HandshakeRefused
                | Event::AuditBacklog
                | Event::SessionFailed,
                Some(Outcome::Refused),
            ) => (5, "Refuse"),
            (Event::Query | Event::SessionFailed, _) => (4, "Fail"),
            (Event::SessionUp, _) => (1, "Open"),
            (Event::SessionLost, _) => (2, "Close"),
            _ => (99, "Other"),
        };
        // OCSF severity: 1 Informational, 2 Low, 3 Medium, 4 High. Something in the Client's
        // container tried a connection the kernel lock forbids: high. A revocation, or a
        // refusal (policy said no to someone): medium. A failure (the network, load): low.
        let severity_id = match (self.event, self.outcome) {
            (Event::KernelDenied, _) => 4,
            (Event::Revoked, _) | (_, Some(Outcome::Refused)) => 3,
            (_, Some(Outcome::Failed)) => 2,
            _ => 1,
        };
        let (status_id, status) = match self.outcome {
            Some(Outcome::Ok) => (1, "Success"),
            Some(Outcome::Refused | Outcome::Failed) => (2, "Failure"),
            None => (0, "Unknown"),
        };
        let event = serde_json::to_value(self.event).unwrap_or_default();
        let side = serde_json::to_value(self.side).unwrap_or_default();
        let mut v = serde_json::json!({
            "class_uid": 4001,
            "class_name": "Network Activity",
            "category_uid": 4,
            "category_name": "Network Activity",
            "activity_id": activity_id,
            "activity_name": activity_name,
            "type_uid": 4001 * 100 + activity_id,
            "severity_id": severity_id,
            "time": self.time.0 / 1000,
            "status_id": status_id,
            "status": status,
            "metadata": {
                "version": "1.1.0",
                "product": { "name": "Ewii", "vendor_name": "Ewii", "feature": { "name": side } },
            },
            "unmapped": { "event": event, "time_rfc3339": self.time.to_string() },
        });
        if let Some(reason) = &self.reason {
            v["status_detail"] = reason.clone().into();
        }
        // What joins records: a query's two records (Hub and Client) share its id, a session's
        // records their session id. Neither goes in `metadata.uid`, which OCSF means unique to
        // one event: a SIEM that drops duplicates by it would keep one side of each query.
        if let Some(q) = self.query_id {
            v["metadata"]["correlation_uid"] = q.to_string().into();
            v["unmapped"]["query_id"] = q.to_string().into();
        }
        if let Some(s) = self.session_id {
            if self.query_id.is_none() {
                v["metadata"]["correlation_uid"] = s.to_string().into();
            }
            v["unmapped"]["session_id"] = s.to_string().into();
        }
        if let Some(source) = &self.source {
            v["src_endpoint"] = serde_json::json!({ "name": source });
        }
        if let Some(d) = &self.destination {
            let mut dst = serde_json::json!({ "name": d.name });
            if let Some(addr) = d
                .address
                .as_deref()
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            {
                dst["ip"] = addr.ip().to_string().into();
                dst["port"] = addr.port().into();
            }
            v["dst_endpoint"] = dst;
        }
        if self.bytes_up.is_some() || self.bytes_down.is_some() {
            let up = self.bytes_up.unwrap_or(0);
            let down = self.bytes_down.unwrap_or(0);
            v["traffic"] =
                serde_json::json!({ "bytes_out": up, "bytes_in": down, "bytes": up + down });
        }
        if let Some(ms) = self.duration_ms {
            v["duration"] = ms.into();
        }
        if let Some(started) = self.started {
            v["start_time"] = (started.0 / 1000).into();
            v["end_time"] = (self.time.0 / 1000).into();
        }
        if let Some(client) = &self.client {
            v["actor"] =
                serde_json::json!({ "app_name": "ewii-client", "user": { "uid": client } });
        }
        if let Some(peer) = &self.peer {
            v["unmapped"]["peer"] = peer.clone().into();
        }
        v.to_string()
    }
}

fn query_id_hex<S: Serializer>(id: &Option<QueryId>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.collect_str(id),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_line_with_exact_fields() {
        let mut r = AuditRecord::new(Timestamp(1_000_000), Side::Hub, Event::Query);
        r.query_id = Some(QueryId(0xab));
        r.destination = Some(Destination {
            name: "db".into(),
            address: None,
        });
        r.bytes_up = Some(3);
        r.outcome = Some(Outcome::Ok);
        assert_eq!(
            r.to_json_line(),
            r#"{"time":"1970-01-01T00:00:01.000000Z","side":"hub","event":"query","query_id":"000000000000000000000000000000ab","destination":{"name":"db"},"bytes_up":3,"outcome":"ok"}"#
        );
    }

    #[test]
    fn p12_ocsf_rendering_maps_a_query_to_network_activity_traffic() {
        let mut r = AuditRecord::new(Timestamp(1_795_502_502_123_456), Side::Client, Event::Query);
        r.query_id = Some(QueryId(0xab));
        r.session_id = Some(9);
        r.client = Some("spiffe://example.org/client/acme".into());
        r.source = Some("spiffe://example.org/workload/billing".into());
        r.destination = Some(Destination {
            name: "db".into(),
            address: Some("10.0.0.5:5432".into()),
        });
        r.bytes_up = Some(10);
        r.bytes_down = Some(32);
        r.duration_ms = Some(4);
        r.outcome = Some(Outcome::Ok);
        let line = r.render(Format::Ocsf);
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["class_uid"], 4001);
        assert_eq!(v["type_uid"], 400106);
        assert_eq!(v["activity_name"], "Traffic");
        assert_eq!(v["time"], 1_795_502_502_123u64);
        assert_eq!(v["dst_endpoint"]["ip"], "10.0.0.5");
        assert_eq!(v["dst_endpoint"]["port"], 5432);
        assert_eq!(v["traffic"]["bytes"], 42);
        assert_eq!(
            v["metadata"]["uid"],
            serde_json::Value::Null,
            "not unique to one event"
        );
        assert_eq!(
            v["metadata"]["correlation_uid"],
            "000000000000000000000000000000ab"
        );
        assert_eq!(
            v["unmapped"]["query_id"],
            "000000000000000000000000000000ab"
        );
        assert_eq!(v["severity_id"], 1);
        assert_eq!(
            v["src_endpoint"]["name"],
            "spiffe://example.org/workload/billing"
        );
        assert_eq!(
            v["actor"]["user"]["uid"],
            "spiffe://example.org/client/acme"
        );
        assert_eq!(v["unmapped"]["event"], "query");
        let mut refused = AuditRecord::new(Timestamp(0), Side::Hub, Event::Query);
        refused.outcome = Some(Outcome::Refused);
        let v: serde_json::Value = serde_json::from_str(&refused.render(Format::Ocsf)).unwrap();
        assert_eq!(v["activity_id"], 5);
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["severity_id"], 3);
        let denied = AuditRecord::new(Timestamp(0), Side::Client, Event::KernelDenied);
        let v: serde_json::Value = serde_json::from_str(&denied.render(Format::Ocsf)).unwrap();
        assert_eq!(v["severity_id"], 4);
        let mut lost = AuditRecord::new(Timestamp(0), Side::Hub, Event::SessionLost);
        lost.session_id = Some(7);
        let v: serde_json::Value = serde_json::from_str(&lost.render(Format::Ocsf)).unwrap();
        assert_eq!(v["metadata"]["correlation_uid"], "7");
        assert_eq!(v["unmapped"]["session_id"], "7");
        // A Client's dial that got no session: refused by the Hub, or failed on the way.
        for (outcome, activity) in [(Outcome::Refused, 5), (Outcome::Failed, 4)] {
            let mut r = AuditRecord::new(Timestamp(0), Side::Client, Event::SessionFailed);
            r.outcome = Some(outcome);
            let v: serde_json::Value = serde_json::from_str(&r.render(Format::Ocsf)).unwrap();
            assert_eq!(v["activity_id"], activity, "{outcome:?}");
            assert_eq!(v["type_uid"], 400100 + activity, "{outcome:?}");
            assert_eq!(v["unmapped"]["event"], "session_failed");
        }
    }

    #[test]
    fn no_value_can_forge_a_second_record() {
        let mut r = AuditRecord::new(Timestamp(0), Side::Client, Event::Query);
        r.reason = Some("x\"}\n{\"event\":\"forged\"\r\u{2028}\u{0}".into());
        r.source = Some("\n".into());
        let line = r.to_json_line();
        assert!(!line.contains('\n') && !line.contains('\r') && !line.contains('\0'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "query");
        assert_eq!(v["reason"], "x\"}\n{\"event\":\"forged\"\r\u{2028}\u{0}");
    }
}
