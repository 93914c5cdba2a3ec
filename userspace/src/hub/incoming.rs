//! The first moments of a connection: the handshake completes (the TLS verifier has checked
//! the certificate, if any, and audited a refusal), then the ALPN and the presence of a client
//! certificate decide whether it is an enrolment or a session.

use ewii_common::audit::{Event, Outcome};
use ewii_common::frame;
use quinn::crypto::rustls::HandshakeData;
use rustls::pki_types::CertificateDer;

use super::admission::Slot;
use super::enrol;
use super::session::{Parts, Session};
use crate::audit::Source;
use crate::transport::codes;

/// Completes the handshake and hands the connection to an enrolment or a session. `slot` is
/// its place among the connections in their first moments: released once a session is open,
/// or when an enrolment ends.
pub(crate) async fn handle(parts: Parts, incoming: quinn::Incoming, slot: Slot) {
    let peer = incoming.remote_address();
    // Read before the verifier runs: a bundle that changes meanwhile is checked again once
    // the session is registered.
    let generation = parts.trust.generation();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            // Certificate refusals were audited by the verifier with their detail.
            tracing::debug!(%peer, error = %e, "handshake failed");
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
                parts.audit.emit_from(Source::address(peer.ip()), r);
                enrol::refuse_unread(conn).await;
                return;
            }
            let enrolled = enrol::enrol(&parts.trust, &parts.store, &parts.audit, conn, peer).await;
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
            let mut r = parts.audit.record(Event::HandshakeRefused);
            r.peer = Some(peer.to_string());
            r.outcome = Some(Outcome::Refused);
            r.reason = Some(format!(
                "ALPN {} with{} a client certificate",
                alpn.map_or_else(|| "none".into(), String::from_utf8_lossy),
                if certs.is_some() { "" } else { "out" }
            ));
            parts.audit.emit_from(Source::address(peer.ip()), r);
            conn.close(codes::REFUSED, b"");
        }
    }
}
