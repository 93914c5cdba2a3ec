//! Renewal on a live session (P7, P8): `Renew` signs a fresh key for the session's own
//! identity; `Rotated` re-binds the session to the renewed serial and retires the older ones.
//! A federated Client, whose SVIDs its own SPIRE issues, sends `Present` instead: the new
//! chain, checked as a handshake's, and its key's proof bound to this connection; the session
//! is re-bound to it the same way.

use std::time::Duration;

use ewii_common::audit::{Event, Outcome, SessionEnd};
use ewii_common::frame::{self, Control, RefuseCode};
use rustls::pki_types::CertificateDer;
use tokio::time::Instant;

use super::super::state::{RenewalRow, SerialStatus, SessionRow};
use super::super::store::Renewal;
use super::{deadline_at, Session};
use crate::identity::ca::Ca;
use crate::identity::{inspect_leaf, present, LeafInfo};
use crate::transport::codes;

/// At most two `Present` in this window on one session (each costs a chain check, a
/// signature check and a synced database write). Two, so that an SVID the agent pushed while
/// the last one was being presented follows it at once; fixed, since a federated Client's
/// certificates (and so their lifetimes) come from its own CA.
const PRESENT_WINDOW: Duration = Duration::from_secs(5);

/// Requests in a row that break the renewal rules (a `Renew` within the pause, a third
/// `Present` within [`PRESENT_WINDOW`], the wrong one of the two for the Client) that end the
/// session. Each is refused cheaply, but each is also an audit record: without an end, one
/// session could write them as fast as it sends, and a lagging sink sheds every Client's
/// queries (P11). An honest Client breaks a rule once at most (a retry early by its clock), and
/// the next request that keeps them starts the count again, whatever its answer (a renewal
/// refused as too early, or a chain refused, is judged on its merits and is no strike).
pub(super) const STRIKES: u32 = 3;

impl Session {
    /// Signs a renewal CSR for the session's own identity (never what the CSR asks for).
    /// Only the newest key in use renews: a connection holding a retired, revoked or
    /// superseded serial (a stolen old key) gets nothing.
    pub(super) async fn renew(&mut self, csr: &[u8]) -> Control {
        let flood = self.renew_flood();
        let federated = self.parts.trust.is_federated(&self.leaf.id);
        self.strike(federated || flood.is_some());
        let mut r = self.rotation_record();
        let parts = &self.parts;
        if federated {
            r.outcome = Some(Outcome::Refused);
            r.reason = Some(
                "a federated Client's SVIDs come from its own SPIRE; this Hub issues none".into(),
            );
            parts.audit.emit(r);
            return Control::Refused {
                code: RefuseCode::BadRequest,
            };
        }
        if let Some(bound) = flood {
            r.outcome = Some(Outcome::Refused);
            r.reason = Some(format!(
                "renewal flood: another Renew within {} ms on this session",
                bound.as_millis()
            ));
            parts.audit.emit(r);
            return Control::Refused {
                code: RefuseCode::BadRequest,
            };
        }
        let now = crate::now_timestamp().unix_secs() as i64;
        let answer = self.decide_renewal(csr, now).await;
        let answer = match answer {
            Ok((row, again)) => {
                self.pending = inspect_leaf(&row.der)
                    .ok()
                    .map(|leaf| (leaf, CertificateDer::from(row.der.clone())));
                r.outcome = Some(Outcome::Ok);
                r.reason = Some(if again {
                    format!(
                        "re-sent serial {} (the renewal of {}): the same key asked again",
                        row.serial, self.leaf.serial
                    )
                } else {
                    format!(
                        "issued serial {} to replace {}",
                        row.serial, self.leaf.serial
                    )
                });
                Control::Renewed {
                    chain: vec![row.der],
                    bundle: parts.trust.bundle_der(),
                }
            }
            Err(reason) => {
                r.outcome = Some(Outcome::Refused);
                r.reason = Some(reason);
                Control::Refused {
                    code: RefuseCode::BadRequest,
                }
            }
        };
        parts.audit.emit(r);
        answer
    }

    /// A flood of `Renew` from one session (a hostile or broken peer) is refused cheaply,
    /// before any signature or database work: `Some(bound)` when this one comes within
    /// `bound` ([`frame::renew_pause`]) of the last one served. Each served one costs a
    /// signature and a synced database write; an honest Client renews twice a day, and asks
    /// again after a refusal no sooner than the pause. A refused one does not restart the
    /// pause: the costly work stays bounded to one per pause either way, and a Client whose
    /// retry came early is not held off by its own refusals.
    fn renew_flood(&mut self) -> Option<Duration> {
        // The life left to the microsecond, as the Client counts it: in whole seconds the
        // pause could come out up to a quarter second above the Client's, and an honest retry
        // in an SVID's last seconds would be refused.
        let end_us = u64::try_from(self.leaf.not_after)
            .unwrap_or(0)
            .saturating_mul(1_000_000);
        let left = Duration::from_micros(end_us.saturating_sub(crate::now_timestamp().0));
        let bound = frame::renew_pause(left);
        if self.last_renew.is_some_and(|at| at.elapsed() < bound) {
            return Some(bound);
        }
        self.last_renew = Some(Instant::now());
        None
    }

    /// An `svid_rotated` record of this session, its outcome and reason left to the caller.
    pub(super) fn rotation_record(&self) -> ewii_common::audit::AuditRecord {
        let mut r = self.parts.audit.record(Event::SvidRotated);
        r.session_id = Some(self.id);
        r.client = Some(self.leaf.id.to_string());
        r
    }

    /// Emits an `svid_rotated` record of this session.
    pub(super) fn audit_rotation(&self, outcome: Outcome, reason: String) {
        let mut r = self.rotation_record();
        r.outcome = Some(outcome);
        r.reason = Some(reason);
        self.parts.audit.emit(r);
    }

    /// Counts a request that broke the renewal rules, or starts the count again after one that
    /// kept them ([`STRIKES`]).
    fn strike(&mut self, broke_a_rule: bool) {
        self.strikes = if broke_a_rule { self.strikes + 1 } else { 0 };
    }

    /// After a `Renew` or `Present`: the session's end when [`STRIKES`] requests in a row broke
    /// the renewal rules (its connection closed as a protocol violation).
    pub(super) fn struck_out(&self) -> Option<String> {
        if self.strikes < STRIKES {
            return None;
        }
        self.conn.close(codes::PROTOCOL, b"");
        Some(SessionEnd::Protocol.reason(&format!(
            "{STRIKES} renewal requests in a row broke the renewal rules (too soon after the last one served, or the wrong kind for this Client)"
        )))
    }

    /// Whether this `Present` is a third within [`PRESENT_WINDOW`] (refused cheaply, before
    /// any signature or database work).
    fn present_flood(&mut self) -> bool {
        let [older, last] = self.last_presents;
        let flood = older.is_some_and(|at| at.elapsed() < PRESENT_WINDOW);
        self.last_presents = [last, Some(Instant::now())];
        flood
    }

    /// A federated Client presents the SVID its SPIRE delivered: re-bound to it when the chain
    /// passes the handshake's checks, names this session's SPIFFE ID, and its key signed this
    /// connection's proof. Anything else is refused (and audited); the session goes on with the
    /// SVID it has, and the Client moves to a new connection made with the new one.
    ///
    /// A re-binding the database refuses to record is refused too (`Busy`): the session stays
    /// on the SVID it has (a federated serial retires nothing, so no older serial of the Hub's
    /// stays current meanwhile), and the Client moves to a new connection, whose opening
    /// records it.
    pub(super) async fn present(
        &mut self,
        chain: Vec<Vec<u8>>,
        scheme: u16,
        proof: &[u8],
    ) -> Control {
        match self.check_presented(chain, scheme, proof) {
            Ok((leaf, chain)) => {
                let serial = leaf.serial.clone();
                match self
                    .rebind(leaf, chain, "presented from the Client's SPIRE")
                    .await
                {
                    Ok(()) => Control::Presented { serial },
                    Err(why) => {
                        tracing::warn!(client = %self.name, session_id = self.id, "refusing a presented SVID: {why}");
                        self.audit_rotation(
                            Outcome::Failed,
                            format!("{why}; the session stays on serial {}", self.leaf.serial),
                        );
                        Control::Refused {
                            code: RefuseCode::Busy,
                        }
                    }
                }
            }
            Err(reason) => {
                self.audit_rotation(
                    Outcome::Refused,
                    format!("presented SVID refused: {reason}"),
                );
                Control::Refused {
                    code: RefuseCode::BadRequest,
                }
            }
        }
    }

    fn check_presented(
        &mut self,
        chain: Vec<Vec<u8>>,
        scheme: u16,
        proof: &[u8],
    ) -> Result<(LeafInfo, Vec<CertificateDer<'static>>), String> {
        let flood = self.present_flood();
        let federated = self.parts.trust.is_federated(&self.leaf.id);
        self.strike(!federated || flood);
        if !federated {
            return Err(format!(
                "{} takes its SVIDs from this Hub (Renew); only a federated Client presents one",
                self.leaf.id
            ));
        }
        if flood {
            return Err(format!(
                "flood: a third Present within {} s on this session",
                PRESENT_WINDOW.as_secs()
            ));
        }
        let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(Into::into).collect();
        let leaf = self.parts.trust.verify_client_chain(&chain)?;
        if leaf.id != self.leaf.id {
            return Err(format!(
                "it names {}, but this session is {}",
                leaf.id, self.leaf.id
            ));
        }
        let mut exporter = [0u8; frame::PRESENT_EXPORTER_LEN];
        self.conn
            .export_keying_material(&mut exporter, present::PRESENT_EXPORTER_LABEL, b"")
            .map_err(|_| "the connection exports no keying material".to_owned())?;
        present::verify(&chain[0], &exporter, scheme, proof)?;
        Ok((leaf, chain))
    }

    /// Whether and how this session's serial renews for `csr`: refused in the first quarter
    /// of its life or once it has ended ([`renewal_window`]), refused when retired, revoked or superseded, refused when it was renewed
    /// already for another key (a serial renews once), the same certificate again for the
    /// same key (an answer lost on the way), else a new signature. `Ok((row, again))`.
    async fn decide_renewal(&self, csr: &[u8], now: i64) -> Result<(RenewalRow, bool), String> {
        let parts = &self.parts;
        renewal_window(
            &self.leaf,
            now,
            i64::from(parts.admission.limits().renew_after_percent),
        )?;
        let key = Ca::csr_key_sha256(csr).map_err(|e| format!("renewal CSR refused: {e}"))?;
        // A renewal is for a fresh key (DESIGN §5, P8): a Client that kept its key through
        // every rotation would keep a stolen copy of it working too.
        if self.chain.first().and_then(|c| key_sha256(c)) == Some(key.clone()) {
            return Err(format!(
                "renewal CSR refused: its key is the one serial {} already certifies; a renewal is for a fresh key",
                self.leaf.serial
            ));
        }
        let renewal = parts
            .store
            .may_renew(&self.name, &self.leaf.id, &self.leaf.serial, &key)
            .await
            .map_err(|e| e.to_string())?;
        match renewal {
            Renewal::Again(row) => Ok((row, true)),
            Renewal::Fresh => {
                let issued = parts
                    .trust
                    .issue(csr, &self.leaf.id)
                    .map_err(|e| format!("renewal CSR refused: {e}"))?;
                let row = RenewalRow {
                    client: self.name.clone(),
                    from: self.leaf.serial.clone(),
                    serial: issued.serial,
                    key_sha256: key,
                    der: issued.der.to_vec(),
                    not_after: issued.not_after,
                };
                // Decided again with the write: a copy of this serial's key asking at the
                // same moment, or a re-enrolment, may have been recorded since.
                match parts
                    .store
                    .record_renewal(row.clone(), &self.leaf.id, now)
                    .await
                {
                    Ok(Ok(Renewal::Fresh)) => Ok((row, false)),
                    Ok(Ok(Renewal::Again(recorded))) => Ok((recorded, true)),
                    Ok(Err(refusal)) => Err(refusal.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }

    /// The Client stored the SVID of the last `Renewed` and uses it: this live session is
    /// re-bound to the new serial (its expiry moves with it), and every older serial of the
    /// client is retired (P8), so a stolen older key opens nothing any more. The connection
    /// stays: a rotation cuts no query (unless it cannot be recorded, see [`Self::rebind`]).
    /// `Some(reason)` ends the session.
    pub(super) async fn rotated(&mut self, serial: String) -> Option<String> {
        let Some((leaf, cert)) = self.pending.take().filter(|(l, _)| l.serial == serial) else {
            self.conn.close(codes::PROTOCOL, b"");
            // The Client's words: bounded and escaped, as every peer text in a record.
            return Some(SessionEnd::Protocol.reason(&format!(
                "Rotated for serial {}, which this session was not issued",
                ewii_common::text::from_peer(serial.as_bytes())
            )));
        };
        // Still current? A re-enrolment (or a revocation) since the `Renewed` retired it: a
        // session must not be re-bound, nor the client's recorded session moved, to a serial
        // that opens nothing any more.
        let status = self.parts.store.view().status(&leaf.id, &leaf.serial);
        if status.is_none() {
            // Cannot be told: not re-bound, and not left on the old serial either (the
            // Client has stored the new SVID and would renew the old serial again). Closed:
            // the Client dials again with its new SVID once the records can be read.
            let why = format!(
                "the Hub's records could not be read as the Client said Rotated for serial {serial}"
            );
            self.conn.close(codes::REFUSED, why.as_bytes());
            return Some(SessionEnd::RecordsUnreadable.reason(&why));
        }
        if status != Some(SerialStatus::Current) {
            let why = match status {
                Some(SerialStatus::Retired) => "retired since it was issued",
                Some(SerialStatus::Revoked) => "revoked since it was issued",
                _ => "not this client's",
            };
            self.audit_rotation(
                Outcome::Refused,
                format!(
                    "Rotated for serial {serial}: {why}; the session stays on serial {}",
                    self.leaf.serial
                ),
            );
            return None;
        }
        let why = self
            .rebind(leaf, vec![cert], "renewed by this Hub")
            .await
            .err()?;
        // Not left on the old serial either: the Client has stored the new SVID and would
        // renew the old serial again. Closed, fail closed, as a session that cannot be recorded
        // as it opens is refused: kept on the new serial, it would run on a serial whose use
        // is not on record, every older serial of the client still current (a stolen copy of
        // an older key would still open sessions). The Client dials again with the SVID it has
        // stored, and that session's record retires the older serials.
        self.audit_rotation(Outcome::Failed, format!("{why}; the session is closed"));
        tracing::warn!(client = %self.name, session_id = self.id, "closing a session: {why}");
        self.conn
            .close(codes::REFUSED, b"the Hub could not record this session");
        Some(SessionEnd::RecordsUnwritable.reason(&why))
    }

    /// Re-binds this live session to `leaf`, the head of `chain` (its expiry moves with it),
    /// and retires every older serial of the client (P8). The connection stays: no query is
    /// cut.
    ///
    /// Unless the database refuses the write (a full disk, another writer's lock past the busy
    /// timeout): then nothing changes (the registry holds the old serial again), and `Err(why)`
    /// leaves it to the caller to refuse or close, and to audit. A session kept on its old
    /// serial so must hold one nothing retires: a retirement of that serial while the write
    /// waited found the registry on the new one, and drains nothing later. Both callers keep
    /// to it: `rotated` closes the session, and `present` is for federated serials, which the
    /// Hub never retires.
    async fn rebind(
        &mut self,
        leaf: LeafInfo,
        chain: Vec<CertificateDer<'static>>,
        how: &str,
    ) -> Result<(), String> {
        // Re-bound in the registry first, so that the retirement below does not drain us.
        self.parts
            .registry
            .rebind(&self.name, self.id, &leaf.serial);
        let row = SessionRow {
            session_id: self.id,
            serial: leaf.serial.clone(),
            peer: self.peer.to_string(),
            since: crate::now_timestamp().unix_secs() as i64,
        };
        let retired = match self.parts.store.session_up(&self.name, row).await {
            Ok(n) => n,
            Err(e) => {
                self.parts
                    .registry
                    .rebind(&self.name, self.id, &self.leaf.serial);
                return Err(format!(
                    "the Hub could not record the session's move to serial {}: {e}",
                    leaf.serial
                ));
            }
        };
        self.audit_rotation(
            Outcome::Ok,
            format!(
                "session re-bound from serial {} to {} ({how}); {retired} older serial(s) retired",
                self.leaf.serial, leaf.serial
            ),
        );
        self.expiry = deadline_at(leaf.not_after);
        self.leaf = leaf;
        self.chain = chain;
        Ok(())
    }
}

/// The SHA-256 of a certificate's public key bits, as [`Ca::csr_key_sha256`] hashes a CSR's.
fn key_sha256(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    use sha2::Digest;
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(sha2::Sha256::digest(&cert.public_key().subject_public_key.data).to_vec())
}

/// Whether `leaf` may renew at `now` (Unix seconds): not before `percent` of its life is used,
/// and not once it has ended. The session ends with its SVID, but its expiry is waited for on
/// the monotonic clock and read against the wall clock again at most every 30 s
/// (`EXPIRY_CHECK_US`): after a forward step of the Hub's clock a session may outlive
/// its SVID that long, and an ended SVID must not buy a new one (a stolen key past its end
/// would live on).
fn renewal_window(leaf: &LeafInfo, now: i64, percent: i64) -> Result<(), String> {
    if now >= leaf.not_after {
        return Err(format!(
            "renewal refused: serial {} ended {} s ago; an ended SVID renews nothing",
            leaf.serial,
            now - leaf.not_after
        ));
    }
    let life = (leaf.not_after - leaf.not_before).max(1);
    let used = now - leaf.not_before;
    if used * 100 < life * percent {
        return Err(format!(
            "renewal too early: {used} s of serial {}'s {life} s life used; renewal is refused before {percent} %",
            leaf.serial
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(not_before: i64, not_after: i64) -> LeafInfo {
        LeafInfo {
            id: "spiffe://customer.example/client/acme".parse().unwrap(),
            serial: "0a".into(),
            not_before,
            not_after,
        }
    }

    /// P8: the session's expiry is checked against the wall clock at most every 30 s, so after
    /// a forward step of the Hub's clock a session may still run on an SVID that has ended: its
    /// `Renew` is refused, whatever share of the life the step says was used.
    #[test]
    fn p8_an_ended_svid_renews_nothing() {
        let l = leaf(1_000, 1_000 + 86_400);
        let err = renewal_window(&l, l.not_after, 25).unwrap_err();
        assert!(err.contains("serial 0a ended 0 s ago"), "{err}");
        let err = renewal_window(&l, l.not_after + 29, 25).unwrap_err();
        assert!(err.contains("ended 29 s ago"), "{err}");
        // The last second of its life still renews; the first quarter does not.
        assert_eq!(renewal_window(&l, l.not_after - 1, 25), Ok(()));
        let err = renewal_window(&l, l.not_before + 86_400 / 4 - 1, 25).unwrap_err();
        assert!(err.starts_with("renewal too early"), "{err}");
        assert_eq!(renewal_window(&l, l.not_before + 86_400 / 4, 25), Ok(()));
    }
}
