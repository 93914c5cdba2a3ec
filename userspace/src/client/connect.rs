//! Reaching the Hub: resolve its name, dial one QUIC connection with the SVID in use, and say
//! `Hello` on the control stream until the Hub answers `Welcome` (DESIGN §4).
//!
//! Enrolment uses the same [`resolve`] and [`transport::client_endpoint`], with its own error type.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{Event, Outcome, MAX_SESSION_ID};
use ewii_common::frame::{self, Control, RefuseCode};

use super::rotation::Identity;
use crate::audit::Audit;
use crate::config::HubAddress;
use crate::identity::verify::{Bundle, Expect, SpiffeVerifier};
use crate::transport::{self, codes, FrameReader, StreamError};

/// How long the Hub has, once the handshake is done, to let the control stream open, take
/// `Hello` and answer it: a Hub that grants no stream, or no credit, cannot hold the one dial
/// in flight (and with it every retry) for ever.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session with the Hub could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The Hub's name did not resolve (or resolved to nothing).
    #[error("cannot resolve the Hub {hub}: {why}")]
    Resolve {
        /// The configured Hub address.
        hub: String,
        /// The resolver's answer.
        why: String,
    },
    /// No local UDP socket to the Hub could be opened (under the eBPF lock, one to an
    /// address outside it is refused: `connect to ADDR: Operation not permitted`).
    #[error("cannot open a UDP socket to the Hub: {0}")]
    Socket(#[source] std::io::Error),
    /// The TLS or QUIC configuration was refused.
    #[error(transparent)]
    Config(#[from] transport::ConfigError),
    /// quinn refused to start the connection (e.g. an invalid server name).
    #[error("cannot start a connection to {addr}: {why}")]
    Start {
        /// The Hub's address.
        addr: SocketAddr,
        /// quinn's reason.
        why: String,
    },
    /// The handshake failed: unreachable, timed out, or a certificate refused by either side.
    #[error("handshake with {addr}: {source}")]
    Handshake {
        /// The Hub's address.
        addr: SocketAddr,
        /// What quinn saw.
        source: quinn::ConnectionError,
    },
    /// The connection was closed with an application code before the Hub proved itself (its
    /// handshake not complete). The Hub closes so only once the handshake is done; quinn
    /// takes such a close even from an Initial packet (RFC 9000 §12.4 forbids it there), which
    /// anyone who sees the dial, or answers for the Hub's name, can send without a key. A
    /// failed dial like any other: never a revocation, nor a refusal by the Hub.
    #[error("handshake with {addr}: closed with code {code} before the Hub proved itself ({said}); not taken as the Hub's word")]
    Unproven {
        /// Where the close came from.
        addr: SocketAddr,
        /// Its application code.
        code: u64,
        /// Its words, bounded and escaped.
        said: String,
    },
    /// The Hub closed the connection with `REVOKED`: this identity is revoked.
    #[error("revoked by the Hub: {0}")]
    Revoked(String),
    /// The control stream failed before `Welcome`.
    #[error("control stream: {0}")]
    Control(#[from] StreamError),
    /// The Hub closed the connection before `Welcome`, saying why (e.g. `reconnecting too
    /// often`).
    #[error("closed by the Hub before Welcome: {said}")]
    ClosedByHub {
        /// Its close code (`transport::codes`).
        code: u64,
        /// Its words and the code's name.
        said: String,
    },
    /// The Hub did not answer `Hello` in time.
    #[error("no Welcome within {0:?}")]
    NoWelcome(Duration),
    /// The Hub refused the session (e.g. an unsupported protocol version).
    #[error("the Hub refused the session: {0}")]
    Refused(RefuseCode),
    /// The Hub answered `Hello` with something else.
    #[error("unexpected answer to Hello")]
    Protocol,
}

/// A session the Hub welcomed: the connection and its open control stream.
#[derive(Debug)]
pub(crate) struct Opened {
    /// The Hub's session id.
    pub(crate) id: u64,
    pub(crate) conn: quinn::Connection,
    /// The connection's endpoint (its own UDP socket): the connection hands its receive
    /// buffer back when its queries have gone quiet.
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) send: quinn::SendStream,
    pub(crate) recv: quinn::RecvStream,
    pub(crate) reader: FrameReader,
}

/// What a dial needs: owned, so that the dial runs as its own future.
#[derive(Debug)]
pub(crate) struct DialPlan {
    pub(crate) hub: HubAddress,
    pub(crate) identity: Arc<Identity>,
    pub(crate) bundle: Bundle,
    /// The Hub must present `spiffe://<this>/hub`.
    pub(crate) hub_trust_domain: String,
    pub(crate) hello: Control,
    pub(crate) audit: Audit,
    /// Queries the Hub may run at once on this connection.
    pub(crate) max_queries: u32,
    /// Bytes of one query this side takes ahead of the destination's reader.
    pub(crate) query_window: u32,
}

impl ConnectError {
    /// Whether the Hub, or this side's check of the Hub, said no by policy (a certificate
    /// refused by either side's TLS, a revoked identity, a Client reconnecting too often or
    /// speaking another version, an untrusted CA), as opposed to a network, a name, a restart,
    /// a load bound or a local step that failed: the `outcome` of a `session_failed` record.
    pub(crate) fn refused(&self) -> bool {
        match self {
            Self::Revoked(_) | Self::Refused(_) => true,
            Self::ClosedByHub { code, .. } => policy_close(*code),
            Self::Handshake { source, .. } => match source {
                // The Hub's TLS alert: a certificate (or an offer) it refused.
                quinn::ConnectionError::ConnectionClosed(c) => tls_refusal(c.error_code.into()),
                quinn::ConnectionError::ApplicationClosed(c) => {
                    policy_close(c.error_code.into_inner())
                }
                // This side's TLS refused the Hub's certificate or offer.
                quinn::ConnectionError::TransportError(e) => tls_refusal(e.code.into()),
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether it was this side's TLS that refused the Hub (its certificate or its offer),
    /// rather than the Hub that refused this Client.
    pub(crate) fn refused_here(&self) -> bool {
        matches!(
            self,
            Self::Handshake {
                source: quinn::ConnectionError::TransportError(_),
                ..
            }
        ) && self.refused()
    }

    /// The error as the Client says it (status `last_error`, logs, the audit `reason`): the
    /// Hub's words in it (a close reason) bounded and escaped.
    pub(crate) fn said(&self) -> String {
        ewii_common::text::from_peer(self.to_string().as_bytes())
    }
}

/// A close code the Hub sends when it refuses the Client by policy (not when it restarts).
fn policy_close(code: u64) -> bool {
    [codes::REVOKED, codes::REFUSED, codes::UNTRUSTED]
        .iter()
        .any(|c| c.into_inner() == code)
}

/// A QUIC error code that carries a TLS alert (0x100 + alert, RFC 9001 §4.8), other than
/// `internal_error` (80), which is a failure and not a refusal.
fn tls_refusal(code: u64) -> bool {
    code >> 8 == 1 && code != 0x100 + 80
}

/// The handshake failed: nothing in its close is the Hub's word yet ([`ConnectError::Unproven`]).
fn unproven(addr: SocketAddr, source: quinn::ConnectionError) -> ConnectError {
    match source {
        quinn::ConnectionError::ApplicationClosed(c) => ConnectError::Unproven {
            addr,
            code: c.error_code.into_inner(),
            said: ewii_common::text::from_peer(&c.reason),
        },
        source => ConnectError::Handshake { addr, source },
    }
}

/// The connection ended after the handshake, the Hub proven (its certificate checked, the
/// close under keys only it holds): a revocation is said as such, anything else is the
/// connection's error as quinn gives it.
fn closed(addr: SocketAddr, source: quinn::ConnectionError) -> ConnectError {
    match source {
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == codes::REVOKED => {
            ConnectError::Revoked(ewii_common::text::from_peer(&c.reason))
        }
        source => ConnectError::Handshake { addr, source },
    }
}

/// Dials the Hub and opens the control stream: `Hello` → `Welcome`. Audits `session_up`, or
/// `session_failed` with why (a revocation has its own record, written by the session).
pub(crate) async fn dial(plan: Arc<DialPlan>) -> Result<Opened, ConnectError> {
    let mut peer = None;
    let dialled = open(&plan, &mut peer).await;
    if let Err(e) = &dialled {
        if !matches!(e, ConnectError::Revoked(_)) {
            let mut r = plan.audit.record(Event::SessionFailed);
            r.client = Some(plan.identity.leaf.id.to_string());
            r.peer = Some(peer.map_or_else(|| plan.hub.to_string(), |a| a.to_string()));
            r.outcome = Some(if e.refused() {
                Outcome::Refused
            } else {
                Outcome::Failed
            });
            r.reason = Some(e.said());
            plan.audit.emit(r);
        }
    }
    dialled
}

/// [`dial`]'s work; `peer` is set once the Hub's name resolved.
async fn open(plan: &DialPlan, peer: &mut Option<SocketAddr>) -> Result<Opened, ConnectError> {
    let leaf = &plan.identity.leaf;
    let verifier = SpiffeVerifier::new(plan.bundle.clone(), &plan.hub_trust_domain, Expect::Hub)
        .with_audit(plan.audit.clone());
    let tls =
        transport::tls_client_config(Some(&plan.identity.svid), Arc::new(verifier), frame::ALPN)?;
    let quic = transport::quic_client_config(tls, plan.max_queries, plan.query_window)?;
    let addr = resolve(&plan.hub).await?;
    *peer = Some(addr);
    let endpoint = transport::client_endpoint(addr).map_err(ConnectError::Socket)?;
    let conn = endpoint
        .connect_with(quic, addr, &plan.hub.host)
        .map_err(|e| ConnectError::Start {
            addr,
            why: e.to_string(),
        })?
        .await
        .map_err(|source| unproven(addr, source))?;
    let deadline = tokio::time::Instant::now() + WELCOME_TIMEOUT;
    let no_welcome = |_| ConnectError::NoWelcome(WELCOME_TIMEOUT);
    let opened = tokio::time::timeout_at(deadline, conn.open_bi())
        .await
        .map_err(no_welcome)?;
    let (mut send, mut recv) = opened.map_err(|source| closed(addr, source))?;
    // A revocation found by the Hub after the handshake, or a refusal (a Client reconnecting
    // too often), closes the connection at once: its close says which. So does the Hub's TLS
    // alert for this Client's certificate, which TLS 1.3 lets arrive after this side's
    // handshake is done.
    let lost = |e: StreamError| match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code != codes::REVOKED => {
            let code = c.error_code.into_inner();
            let name = super::connection::hub_code(code);
            ConnectError::ClosedByHub {
                code,
                said: match ewii_common::text::from_peer(&c.reason) {
                    said if said.is_empty() => name,
                    said => format!("{said} ({name})"),
                },
            }
        }
        Some(source @ quinn::ConnectionError::ConnectionClosed(_))
        | Some(source @ quinn::ConnectionError::ApplicationClosed(_)) => closed(addr, source),
        _ => ConnectError::Control(e),
    };
    tokio::time::timeout_at(deadline, transport::write_frame(&mut send, &plan.hello))
        .await
        .map_err(no_welcome)?
        .map_err(lost)?;
    let mut reader = FrameReader::new();
    let welcome = tokio::time::timeout_at(deadline, reader.read::<Control>(&mut recv))
        .await
        .map_err(no_welcome)?;
    let (id, hub_time_us) = match welcome {
        // An id beyond 2^53 - 1 would be held inexactly by the customer's SIEM, and the
        // Client's records could not be joined with the Hub's: a Hub that sends one breaks
        // the protocol.
        Ok(Some(Control::Welcome {
            session_id,
            hub_time_us,
            ..
        })) if session_id <= MAX_SESSION_ID => (session_id, hub_time_us),
        Ok(Some(Control::Refused { code })) => return Err(ConnectError::Refused(code)),
        Ok(_) => return Err(ConnectError::Protocol),
        Err(e) => return Err(lost(e)),
    };
    let mut r = plan.audit.record(Event::SessionUp);
    r.session_id = Some(id);
    r.client = Some(leaf.id.to_string());
    r.peer = Some(addr.to_string());
    r.outcome = Some(Outcome::Ok);
    let skew = clock_skew(hub_time_us, crate::now_timestamp().0, conn.rtt());
    r.reason = Some(match &skew {
        Some(skew) => format!("serial {}; {skew}", leaf.serial),
        None => format!("serial {}", leaf.serial),
    });
    plan.audit.emit(r);
    tracing::info!(session_id = id, hub = %addr, "session up");
    if let Some(skew) = skew {
        tracing::warn!("{skew}");
    }
    Ok(Opened {
        id,
        conn,
        endpoint,
        send,
        recv,
        reader,
    })
}

/// How far the Hub's clock and this host's may differ before the Client says so.
const SKEW_WORTH_SAYING: Duration = Duration::from_secs(5);

/// What the `Welcome`'s time (`hub_us`, stamped about half a round trip before it arrived at
/// `here_us`) says of the two clocks, when they differ by [`SKEW_WORTH_SAYING`] or more; `None`
/// when they agree, or when the Hub sent no time (0). Said, never acted on: it is the Hub's
/// word, and the certificates' checks are what hold.
fn clock_skew(hub_us: u64, here_us: u64, rtt: Duration) -> Option<String> {
    if hub_us == 0 {
        return None;
    }
    let half_rtt = u64::try_from(rtt.as_micros() / 2).unwrap_or(u64::MAX);
    let hub_now = hub_us.saturating_add(half_rtt);
    let (by, way) = if hub_now >= here_us {
        (hub_now - here_us, "ahead of")
    } else {
        (here_us - hub_now, "behind")
    };
    let by = Duration::from_micros(by);
    (by >= SKEW_WORTH_SAYING).then(|| {
        format!(
            "the Hub's clock is {} s {way} this host's: certificates are checked against both \
             clocks, and one just issued can be refused as not yet valid; set this host's \
             time (NTP)",
            by.as_secs()
        )
    })
}

/// Resolves the Hub address: the first answer the Client may dial
/// ([`HubAddress::reachable`]). Resolved again at every dial, so that a Hub that moves is
/// followed; each answer is checked every time.
pub(crate) async fn resolve(hub: &HubAddress) -> Result<SocketAddr, ConnectError> {
    let answers = super::dialer::system_lookup(hub.host.clone(), hub.port)
        .await
        .map_err(|e| ConnectError::Resolve {
            hub: hub.to_string(),
            why: e.to_string(),
        })?;
    first_reachable(hub, answers)
}

/// The first of `answers` the Client may dial, or why none.
fn first_reachable(
    hub: &HubAddress,
    answers: impl IntoIterator<Item = SocketAddr>,
) -> Result<SocketAddr, ConnectError> {
    let (ok, refused) = hub.reachable(answers);
    ok.first().copied().ok_or_else(|| ConnectError::Resolve {
        hub: hub.to_string(),
        why: match refused.first() {
            None => "no address".into(),
            Some(e) => e.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hubs_clock_is_mentioned_only_when_it_differs_by_5_s_or_more() {
        const S: u64 = 1_000_000;
        let here = 1_700_000_000 * S;
        let rtt = Duration::from_millis(100);
        // Half the round trip is the Welcome's journey, not a difference.
        assert_eq!(clock_skew(here - 50_000, here, rtt), None);
        assert_eq!(clock_skew(here + 4 * S, here, rtt), None);
        let ahead = clock_skew(here + 42 * S, here, rtt).unwrap();
        assert!(
            ahead.starts_with("the Hub's clock is 42 s ahead of this host's"),
            "{ahead}"
        );
        let behind = clock_skew(here - 90 * S, here, rtt).unwrap();
        assert!(
            behind.starts_with("the Hub's clock is 89 s behind this host's"),
            "{behind}"
        );
        // No time sent; and a Hub's absurd ones are said, not overflowed.
        assert_eq!(clock_skew(0, here, rtt), None);
        assert!(clock_skew(u64::MAX, here, Duration::MAX).is_some());
        assert!(clock_skew(1, here, rtt).unwrap().contains("behind"));
    }

    fn hub() -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 7], 443))
    }

    /// Whoever answers for the Hub's name (its DNS, a poisoned cache, `/etc/hosts` in a shared
    /// image) cannot have the Client dial this host or its cloud's metadata service: each
    /// answer is checked as an allow-list entry's is, the first one allowed is dialled, and
    /// when none is the error names what was refused. An address written literally is dialled
    /// as written, and `localhost` may be loopback.
    #[test]
    fn p5_the_hub_is_dialled_only_at_an_answer_its_name_may_reach() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let at = |h: &str| h.parse::<HubAddress>().unwrap();
        let metadata = addr("169.254.169.254:443");
        let public = addr("203.0.113.9:443");
        let named = at("hub.example.net:443");
        let dialled = first_reachable(&named, [metadata, addr("127.0.0.1:443"), public]);
        assert_eq!(dialled.unwrap(), public);
        for refused in [
            vec![metadata],
            vec![addr("127.0.0.1:443")],
            vec![addr("[::1]:443")],
            vec![addr("[fe80::1]:443")],
            vec![addr("0.0.0.0:443")],
            vec![addr("[::ffff:169.254.169.254]:443")],
        ] {
            let e = first_reachable(&named, refused.clone()).unwrap_err();
            let said = e.to_string();
            assert!(
                matches!(e, ConnectError::Resolve { .. })
                    && said.starts_with("cannot resolve the Hub hub.example.net:443: ")
                    && said.contains(&refused[0].ip().to_canonical().to_string()),
                "{refused:?}: {said}"
            );
        }
        let e = first_reachable(&named, []).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot resolve the Hub hub.example.net:443: no address"
        );
        let loopback = addr("127.0.0.1:4433");
        assert_eq!(
            first_reachable(&at("localhost:4433"), [loopback]).unwrap(),
            loopback
        );
        assert_eq!(
            first_reachable(&at("127.0.0.1:4433"), [loopback]).unwrap(),
            loopback
        );
        assert_eq!(
            first_reachable(&at("169.254.169.254"), [metadata]).unwrap(),
            metadata,
            "written literally: meant"
        );
    }

    fn peer_closed(code: quinn::TransportErrorCode, reason: &[u8]) -> ConnectError {
        ConnectError::Handshake {
            addr: hub(),
            source: quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
                error_code: code,
                frame_type: None,
                reason: reason.to_vec().into(),
            }),
        }
    }

    fn app_closed(code: quinn::VarInt) -> ConnectError {
        closed(
            hub(),
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: code,
                reason: b"said".to_vec().into(),
            }),
        )
    }

    /// `refused` is policy (either side's TLS refusing a certificate, a revoked, refused or
    /// untrusted Client); a restart, a load bound, a timeout or a TLS internal error is a
    /// failure, so that a Hub restart does not read as the Hub saying no.
    #[test]
    fn p11_p12_a_dial_is_refused_by_policy_and_failed_otherwise() {
        let alert = |a: u8| quinn::TransportErrorCode::crypto(a);
        let refused = [
            peer_closed(alert(42), b""), // bad_certificate, from the Hub
            peer_closed(alert(40), b""), // handshake_failure (no suite in common)
            ConnectError::Handshake {
                addr: hub(),
                source: quinn::ConnectionError::TransportError(alert(49).into()),
            }, // this side: access_denied (not a Hub identity)
            app_closed(codes::REFUSED),
            app_closed(codes::UNTRUSTED),
            app_closed(codes::REVOKED),
            ConnectError::ClosedByHub {
                code: codes::REFUSED.into_inner(),
                said: "reconnecting too often".into(),
            },
            ConnectError::Refused(RefuseCode::Version),
        ];
        for e in &refused {
            assert!(e.refused(), "{e}");
        }
        // Only this side's TLS refusal is this side's.
        let here: Vec<bool> = refused.iter().map(ConnectError::refused_here).collect();
        assert_eq!(
            here,
            [false, false, true, false, false, false, false, false]
        );
        assert!(matches!(app_closed(codes::REVOKED), ConnectError::Revoked(r) if r == "said"));
        // The same close before the handshake is done: anyone's, a failed dial.
        let forged = unproven(
            hub(),
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: codes::REVOKED,
                reason: b"said".to_vec().into(),
            }),
        );
        assert!(
            matches!(&forged, ConnectError::Unproven { code: 3, said, .. } if said == "said"),
            "{forged:?}"
        );
        assert!(!forged.refused(), "{forged}");
        let failed = [
            peer_closed(alert(80), b""), // internal_error
            peer_closed(quinn::TransportErrorCode::APPLICATION_ERROR, b""), // closed before its handshake: a stop
            peer_closed(quinn::TransportErrorCode::CONNECTION_REFUSED, b""), // a load bound
            app_closed(codes::SHUTDOWN),
            ConnectError::ClosedByHub {
                code: codes::SHUTDOWN.into_inner(),
                said: "shutting down or restarting, code 4".into(),
            },
            ConnectError::Handshake {
                addr: hub(),
                source: quinn::ConnectionError::TimedOut,
            },
            ConnectError::NoWelcome(WELCOME_TIMEOUT),
            ConnectError::Resolve {
                hub: "hub.invalid:443".into(),
                why: "no address".into(),
            },
        ];
        for e in &failed {
            assert!(!e.refused(), "{e}");
        }
    }

    /// The Hub's close reason reaches the status and the audit bounded and escaped: a peer
    /// cannot write a second line, or a record of any length, into them.
    #[test]
    fn the_hubs_words_in_an_error_are_bounded_and_escaped() {
        let long = [b'x'; 4000];
        let said = peer_closed(alert_free(), &long).said();
        assert!(
            said.chars().count() <= ewii_common::text::PEER_TEXT_MAX + 1,
            "{}",
            said.len()
        );
        let said = peer_closed(alert_free(), b"no\nforged: line").said();
        assert!(!said.contains('\n'), "{said}");
    }

    fn alert_free() -> quinn::TransportErrorCode {
        quinn::TransportErrorCode::PROTOCOL_VIOLATION
    }
}
