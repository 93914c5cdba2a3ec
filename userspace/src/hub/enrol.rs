//! Enrolment (ALPN `ewii-enroll/1`, no client certificate): one `Enrol::Request` with a join
//! token and a CSR in, an SVID out. The token is redeemed and the enrolment recorded through
//! the store; the refusal detail goes to the audit record, the Client gets a generic answer.

use std::net::SocketAddr;
use std::time::Duration;

use ewii_common::audit::{Event, Outcome};
use ewii_common::frame::{Enrol, RefuseCode};
use ewii_common::spiffe::SpiffeId;

use super::state::{IssuedSerial, TokenRefusal};
use super::store::{Store, StoreError};
use super::trust::Trust;
use crate::audit::{Audit, Source};
use crate::identity::ca::Ca;
use crate::identity::IdentityError;
use crate::transport::{self, codes, FrameReader};

/// How long the Hub waits for the Client to read the answer and close first.
const LINGER: Duration = Duration::from_secs(2);

/// Why an enrolment was refused (audited; the Client only hears `EnrolmentRefused`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum EnrolRefusal {
    /// The token was unknown, used or expired.
    #[error(transparent)]
    Token(TokenRefusal),
    /// The token could not be checked (fail closed).
    #[error("token check failed: {0}")]
    TokenCheck(StoreError),
    /// The token record names a client that is not a valid SPIFFE path segment.
    #[error("bad client name in token record: {0}")]
    BadName(String),
    /// The CSR did not parse or its signature was wrong.
    #[error("CSR refused: {0}")]
    Csr(IdentityError),
    /// The enrolment could not be recorded (the SVID is not handed out).
    #[error("could not record enrolment: {0}")]
    Record(StoreError),
    /// The first frame was something else.
    #[error("expected an enrolment request")]
    NotARequest,
    /// The stream failed.
    #[error("{0}")]
    Stream(String),
    /// The request did not arrive within its bound.
    #[error("enrolment timed out")]
    TimedOut,
}

impl EnrolRefusal {
    /// Whether anyone could cause this refusal, with no real token: it is then held to the
    /// per-source burst of the audit. Once a token matched (expired, or spent and refused for
    /// its name, CSR or record), the refusal is the operator's and the customer's business.
    fn a_stranger_could(&self) -> bool {
        match self {
            Self::Token(TokenRefusal::UnknownOrUsed)
            | Self::TokenCheck(_)
            | Self::NotARequest
            | Self::Stream(_)
            | Self::TimedOut => true,
            Self::Token(TokenRefusal::Expired)
            | Self::BadName(_)
            | Self::Csr(_)
            | Self::Record(_) => false,
        }
    }
}

/// One enrolment connection, from the first stream to the audit record; its request must
/// arrive within `bound` ([`Limits::enrol_request`](super::admission::Limits)). Returns
/// whether it enrolled.
pub(crate) async fn enrol(
    trust: &Trust,
    store: &Store,
    audit: &Audit,
    conn: quinn::Connection,
    peer: SocketAddr,
    bound: Duration,
) -> bool {
    // The peer's words (a close reason) in it: bounded and escaped.
    let stream = |e: &dyn std::error::Error| EnrolRefusal::Stream(transport::pipe::peer_said(e));
    // Bounded: the request's arrival. Not what follows: once a token is redeemed, the record
    // says so however the answer's delivery ends (a caller that breaks off then, or takes its
    // time, must not leave an SVID issued with only a refusal on record).
    let request = tokio::time::timeout(bound, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| stream(&e))?;
        let mut reader = FrameReader::new();
        let request: Option<Enrol> = reader.read(&mut recv).await.map_err(|e| stream(&e))?;
        match request {
            Some(Enrol::Request { token, csr }) => Ok((send, token, csr)),
            _ => Err(EnrolRefusal::NotARequest),
        }
    })
    .await
    .unwrap_or(Err(EnrolRefusal::TimedOut));
    let mut undelivered = None;
    let outcome = match request {
        Err(e) => Err(e),
        Ok((mut send, token, csr)) => {
            let result = issue_for_token(trust, store, &token, &csr).await;
            let answer = match &result {
                Ok((_, _, der)) => Enrol::Issued {
                    chain: vec![der.clone()],
                    bundle: trust.bundle_der(),
                },
                Err(_) => Enrol::Refused {
                    code: RefuseCode::EnrolmentRefused,
                },
            };
            // Bounded by the linger: an unauthenticated caller holds its admission slot about
            // as long as before the request bound moved.
            let written =
                tokio::time::timeout(LINGER, transport::write_frame(&mut send, &answer)).await;
            match written {
                Ok(Ok(())) => {
                    let _ = send.finish();
                    let _ = tokio::time::timeout(LINGER, conn.closed()).await;
                }
                Ok(Err(e)) => undelivered = Some(stream(&e).to_string()),
                Err(_) => {
                    undelivered = Some(format!(
                        "the caller did not take it within {} s",
                        LINGER.as_secs()
                    ))
                }
            }
            result.map(|(id, serial, _)| (id, serial))
        }
    };
    let mut r = audit.record(match &outcome {
        Ok(_) => Event::Enrolled,
        Err(_) => Event::EnrolmentRefused,
    });
    r.peer = Some(peer.to_string());
    let enrolled = outcome.is_ok();
    let a_stranger_could = outcome.as_ref().is_err_and(EnrolRefusal::a_stranger_could);
    match outcome {
        Ok((id, serial)) => {
            r.client = Some(id.to_string());
            r.outcome = Some(Outcome::Ok);
            r.reason = Some(match &undelivered {
                None => format!("serial {serial}"),
                Some(why) => format!(
                    "serial {serial}; the token is spent and the SVID issued, but the answer did not reach the caller: {why}"
                ),
            });
        }
        Err(reason) => {
            // `refused` is a decision; a stream that broke or a peer that never finished is
            // `failed`, as on the Client (and as the Hub's own store failing is: fail closed).
            r.outcome = Some(match reason {
                EnrolRefusal::Stream(_) | EnrolRefusal::TimedOut => Outcome::Failed,
                _ => Outcome::Refused,
            });
            r.reason = Some(reason.to_string());
        }
    }
    if a_stranger_could {
        // A stranger can cause these at will, from as many addresses as it holds: held to the
        // per-source burst, the rest summed up, as refused handshakes are.
        audit.emit_from(Source::enrolling(peer.ip()), r);
    } else {
        // An enrolment, or a refusal once a real token matched (spent, or expired): each on
        // record one by one, whatever strangers do beside it.
        audit.emit(r);
    }
    conn.close(codes::DONE, b"");
    enrolled
}

/// Answers an enrolment with the one generic refusal without reading its request (no token
/// lookup, no CSR parsing, no signature): for an address whose enrolments are throttled.
/// Bounded as a request is (`bound`), the answer and the linger included.
pub(crate) async fn refuse_unread(conn: quinn::Connection, bound: Duration) {
    let _ = tokio::time::timeout(bound, async {
        let (mut send, _recv) = conn.accept_bi().await.ok()?;
        let answer = Enrol::Refused {
            code: RefuseCode::EnrolmentRefused,
        };
        transport::write_frame(&mut send, &answer).await.ok()?;
        let _ = send.finish();
        let _ = tokio::time::timeout(LINGER, conn.closed()).await;
        Some(())
    })
    .await;
    conn.close(codes::DONE, b"");
}

/// Decides an enrolment: the identity, its serial and the certificate, or why not.
async fn issue_for_token(
    trust: &Trust,
    store: &Store,
    token: &str,
    csr: &[u8],
) -> Result<(SpiffeId, String, Vec<u8>), EnrolRefusal> {
    let now = crate::now_timestamp().unix_secs() as i64;
    let grant = store
        .redeem_token(token, now)
        .await
        .map_err(EnrolRefusal::TokenCheck)?
        .map_err(EnrolRefusal::Token)?;
    let id = SpiffeId::client(trust.trust_domain(), &grant.client)
        .map_err(|e| EnrolRefusal::BadName(e.to_string()))?;
    let issued = trust.issue(csr, &id).map_err(EnrolRefusal::Csr)?;
    // Kept so that no renewal brings this key back later (P8); a CSR that was signed parses.
    let key_sha256 = Ca::csr_key_sha256(csr).ok();
    store
        .record_enrolment(
            grant,
            id.clone(),
            IssuedSerial {
                serial: issued.serial.clone(),
                key_sha256,
            },
            issued.not_after,
            now,
        )
        .await
        .map_err(EnrolRefusal::Record)?;
    Ok((id, issued.serial, issued.der.to_vec()))
}
