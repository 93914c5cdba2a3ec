//! Reaching the Hub: resolve its name, dial one QUIC connection with the SVID in use, and say
//! `Hello` on the control stream until the Hub answers `Welcome` (DESIGN §4).
//!
//! Enrolment uses the same [`resolve`] and [`client_endpoint`], with its own error type.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{Event, Outcome};
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
    /// No local UDP socket could be opened.
    #[error("cannot open a UDP socket: {0}")]
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
    /// The Hub closed the connection with `REVOKED`: this identity is revoked.
    #[error("revoked by the Hub: {0}")]
    Revoked(String),
    /// The control stream failed before `Welcome`.
    #[error("control stream: {0}")]
    Control(#[from] StreamError),
    /// The Hub closed the connection before `Welcome`, saying why (e.g. `reconnecting too
    /// often`).
    #[error("closed by the Hub before Welcome: {0}")]
    ClosedByHub(String),
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
    /// Whether the Hub (or this side's check of the Hub) said no, as opposed to a network,
    /// a name or a local resource that failed: the `outcome` of a `session_failed` record.
    pub(crate) fn refused(&self) -> bool {
        match self {
            Self::Revoked(_) | Self::ClosedByHub(_) | Self::Refused(_) => true,
            Self::Handshake { source, .. } => match source {
                // The Hub closed it: its TLS alert (a certificate it refused) or its words.
                quinn::ConnectionError::ConnectionClosed(_)
                | quinn::ConnectionError::ApplicationClosed(_) => true,
                // This side's TLS refused the Hub's certificate or offer (a TLS alert's QUIC
                // code, 0x100 + alert: RFC 9001 §4.8).
                quinn::ConnectionError::TransportError(e) => u64::from(e.code) >> 8 == 1,
                _ => false,
            },
            _ => false,
        }
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
            r.reason = Some(ewii_common::text::printable(&e.to_string()).into_owned());
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
    let endpoint = client_endpoint(addr).map_err(ConnectError::Socket)?;
    let conn = endpoint
        .connect_with(quic, addr, &plan.hub.host)
        .map_err(|e| ConnectError::Start {
            addr,
            why: e.to_string(),
        })?
        .await
        .map_err(|source| match source {
            quinn::ConnectionError::ApplicationClosed(c) if c.error_code == codes::REVOKED => {
                ConnectError::Revoked(ewii_common::text::from_peer(&c.reason))
            }
            source => ConnectError::Handshake { addr, source },
        })?;
    let deadline = tokio::time::Instant::now() + WELCOME_TIMEOUT;
    let no_welcome = |_| ConnectError::NoWelcome(WELCOME_TIMEOUT);
    let opened = tokio::time::timeout_at(deadline, conn.open_bi())
        .await
        .map_err(no_welcome)?;
    let (mut send, mut recv) = opened.map_err(|source| match source {
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == codes::REVOKED => {
            ConnectError::Revoked(ewii_common::text::from_peer(&c.reason))
        }
        source => ConnectError::Handshake { addr, source },
    })?;
    // A revocation found by the Hub after the handshake, or a refusal (a Client reconnecting
    // too often), closes the connection at once: its close says which.
    let lost = |e: StreamError| match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == codes::REVOKED => {
            ConnectError::Revoked(ewii_common::text::from_peer(&c.reason))
        }
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            let code = super::connection::hub_code(c.error_code.into_inner());
            ConnectError::ClosedByHub(match ewii_common::text::from_peer(&c.reason) {
                said if said.is_empty() => code,
                said => format!("{said} ({code})"),
            })
        }
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
    let id = match welcome {
        Ok(Some(Control::Welcome { session_id, .. })) => session_id,
        Ok(Some(Control::Refused { code })) => return Err(ConnectError::Refused(code)),
        Ok(_) => return Err(ConnectError::Protocol),
        Err(e) => return Err(lost(e)),
    };
    let mut r = plan.audit.record(Event::SessionUp);
    r.session_id = Some(id);
    r.client = Some(leaf.id.to_string());
    r.peer = Some(addr.to_string());
    r.outcome = Some(Outcome::Ok);
    r.reason = Some(format!("serial {}", leaf.serial));
    plan.audit.emit(r);
    tracing::info!(session_id = id, hub = %addr, "session up");
    Ok(Opened {
        id,
        conn,
        endpoint,
        send,
        recv,
        reader,
    })
}

/// Resolves the Hub address (first result).
pub(crate) async fn resolve(hub: &HubAddress) -> Result<SocketAddr, ConnectError> {
    let resolve = |why: String| ConnectError::Resolve {
        hub: hub.to_string(),
        why,
    };
    tokio::net::lookup_host((hub.host.as_str(), hub.port))
        .await
        .map_err(|e| resolve(e.to_string()))?
        .next()
        .ok_or_else(|| resolve("no address".into()))
}

/// A client-only QUIC endpoint on an ephemeral port of the right family.
pub(crate) fn client_endpoint(hub: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if hub.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    transport::endpoint(bind, None)
}
