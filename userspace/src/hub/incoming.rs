//! The first moments of a connection: the handshake completes (the TLS verifier has checked
//! the certificate, if any, and audited a refusal), then the ALPN and the presence of a client
//! certificate decide whether it is an enrolment or a session.

use ewii_common::audit::{Event, Outcome};
use ewii_common::frame;
use quinn::crypto::rustls::HandshakeData;
use rustls::pki_types::CertificateDer;

use std::time::Duration;

use super::admission::Slot;
use super::enrol;
use super::session::{Parts, Session};
use crate::audit::Source;
use crate::transport::codes;

/// How long a QUIC handshake may take. quinn bounds none: a peer that keeps sending
/// packets (a PING a second) without finishing its TLS handshake resets the idle timeout for
/// ever, and would hold its admission slot (64 per host, 512 in all) as long as it liked.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS alerts for a certificate the verifier refused: the verifier audited those, with
/// their detail (RFC 8446 §6: bad_certificate … certificate_unknown, unknown_ca,
/// access_denied, certificate_required).
const CERTIFICATE_ALERTS: [u8; 8] = [42, 43, 44, 45, 46, 48, 49, 116];

/// Completes the handshake and hands the connection to an enrolment or a session. `slot` is
/// its place among the connections in their first moments: released once a session is open,
/// or when an enrolment ends.
pub(crate) async fn handle(parts: Parts, incoming: quinn::Incoming, slot: Slot) {
    let peer = incoming.remote_address();
    // Read before the verifier runs: a bundle that changes meanwhile is checked again once
    // the session is registered.
    let generation = parts.trust.generation();
    let refused = |reason: String| {
        let mut r = parts.audit.record(Event::HandshakeRefused);
        r.peer = Some(peer.to_string());
        r.outcome = Some(Outcome::Refused);
        r.reason = Some(reason);
        parts.audit.emit_from(Source::address(peer.ip()), r);
    };
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "handshake failed");
            // Certificate refusals were audited by the verifier with their detail; a TLS
            // refusal of another kind (no common ALPN, cipher suite or version) is audited
            // here, or it would leave no trace.
            if let Some(alert) = local_tls_alert(&e) {
                if !CERTIFICATE_ALERTS.contains(&alert) {
                    refused(format!("TLS handshake refused: {e}"));
                }
            }
            return;
        }
        // Dropped, the handshake ends (quinn closes a connection no handle holds).
        Err(_) => {
            refused(format!(
                "the handshake did not complete within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            ));
            return;
        }
    };
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .and_then(|d| d.protocol);
    let certs = conn
        .peer_identity()
        .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok());
    match (alpn.as_deref(), certs) {
        (Some(frame::ENROLL_ALPN), None) => {
            if let Some(failures) = parts.admission.enrolment_throttled(peer.ip()) {
                // Refused unread: no token lookup, no signature.
                let mut r = parts.audit.record(Event::EnrolmentRefused);
                r.peer = Some(peer.to_string());
                r.outcome = Some(Outcome::Refused);
                r.reason = Some(format!(
                    "throttled: {failures} refused enrolments from {} in the last minute",
                    peer.ip()
                ));
                parts.audit.emit_from(Source::throttled(peer.ip()), r);
                enrol::refuse_unread(conn, parts.admission.limits().enrol_request).await;
                return;
            }
            let bound = parts.admission.limits().enrol_request;
            let enrolled =
                enrol::enrol(&parts.trust, &parts.store, &parts.audit, conn, peer, bound).await;
            if !enrolled {
                parts.admission.enrolment_refused(peer.ip());
            }
            drop(slot);
        }
        (Some(frame::ALPN), Some(certs)) => {
            let session = Session::open(parts, conn, peer, &certs, generation).await;
            drop(slot);
            if let Some(session) = session {
                session.run().await;
            }
        }
        (alpn, certs) => {
            refused(format!(
                "ALPN {} with{} a client certificate",
                alpn.map_or_else(|| "none".into(), String::from_utf8_lossy),
                if certs.is_some() { "" } else { "out" }
            ));
            conn.close(codes::REFUSED, b"");
        }
    }
}

/// The TLS alert this side's handshake failed with, if it failed on a TLS alert it raised.
fn local_tls_alert(e: &quinn::ConnectionError) -> Option<u8> {
    match e {
        quinn::ConnectionError::TransportError(t) => {
            let code = u64::from(t.code);
            (0x100..=0x1ff)
                .contains(&code)
                .then(|| (code - 0x100) as u8)
        }
        _ => None,
    }
}
