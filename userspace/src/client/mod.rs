//! The Ewii Client: the customer's side.
//!
//! - [`enrol`]: token + local key → SVID, with the Hub pinned by bundle hash.
//! - [`dialer`]: the only code that opens outbound TCP connections (P4).
//! - [`status`]: the status file behind `ewii-client status` / `health` (no listener, P13).
//! - this module: [`run`], the reconnecting session. It dials the Hub (one QUIC connection,
//!   P5), says `Hello`, then serves the query streams the Hub opens until the connection ends,
//!   and dials again with full-jitter backoff (P14) — for ever, unless revoked or stopped.

pub mod dialer;
pub mod enrol;
pub mod status;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{Destination, Event, Outcome};
use ewii_common::backoff::Backoff;
use ewii_common::frame::{self, Control, QueryHead, RefuseCode};
use ewii_common::session::{Action, Link};
use rand::RngCore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::audit::Audit;
use crate::config::{ClientConfig, OnStop};
use crate::identity::store::{self, Svid};
use crate::identity::verify::{Bundle, Expect, SpiffeVerifier};
use crate::identity::{inspect_leaf, IdentityError, LeafInfo};
use crate::transport::{self, codes, pipe::pipe, FrameReader};
use dialer::{DialError, Dialer};
use status::{State, Status};

/// Marker file written when the Hub revokes this Client; its presence stops every restart.
pub const REVOKED_MARKER: &str = "revoked";
/// How long in-flight queries may drain after a stop.
const DRAIN: Duration = Duration::from_secs(5);
/// How long the Hub has to answer `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the Client could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No usable SVID or bundle in the state directory.
    #[error("not enrolled ({dir}): {source}; run `ewii-client enroll` first")]
    NotEnrolled {
        /// The state directory.
        dir: PathBuf,
        /// What is missing or broken.
        source: IdentityError,
    },
    /// The Hub revoked this Client earlier (the marker file exists).
    #[error("this Client was revoked by the Hub ({0}); it will not connect again")]
    RevokedEarlier(String),
    /// TLS or QUIC configuration.
    #[error(transparent)]
    Transport(#[from] transport::ConfigError),
}

/// How [`run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Stopped by the shutdown future (SIGTERM/SIGINT).
    Stopped,
    /// The Hub revoked this identity.
    Revoked {
        /// The Hub's reason, if it gave one.
        reason: String,
    },
}

/// Everything a session needs, loaded once at start.
struct Ctx {
    config: ClientConfig,
    audit: Audit,
    svid: Svid,
    leaf: LeafInfo,
    bundle: Bundle,
    dialer: Dialer,
}

/// Runs the Client until `shutdown` resolves or the Hub revokes it.
pub async fn run(
    config: ClientConfig,
    audit: Audit,
    shutdown: impl Future<Output = ()>,
) -> Result<Exit, ClientError> {
    let dir = config.state_dir.clone();
    if let Ok(reason) = std::fs::read_to_string(dir.join(REVOKED_MARKER)) {
        return Err(ClientError::RevokedEarlier(reason.trim().to_owned()));
    }
    let not_enrolled = |source| ClientError::NotEnrolled {
        dir: dir.clone(),
        source,
    };
    let svid = Svid::load(&dir, store::SVID_CERT, store::SVID_KEY).map_err(not_enrolled)?;
    let leaf = inspect_leaf(&svid.chain[0]).map_err(not_enrolled)?;
    let anchors = store::read_certs(&dir.join(store::BUNDLE)).map_err(not_enrolled)?;
    let ctx = Arc::new(Ctx {
        dialer: Dialer::new(config.allow.clone(), config.connect_timeout),
        bundle: Bundle::new(anchors),
        config,
        audit,
        svid,
        leaf,
    });
    let mut started = ctx.audit.record(Event::Started);
    started.client = Some(ctx.leaf.id.to_string());
    started.peer = Some(ctx.config.hub.to_string());
    started.reason = Some(format!(
        "allow-list [{}]",
        allow_list_lines(&ctx.config).join(", ")
    ));
    ctx.audit.emit(started);

    let exit = drive(&ctx, shutdown).await;
    let mut stopped = ctx.audit.record(Event::Stopped);
    stopped.client = Some(ctx.leaf.id.to_string());
    stopped.reason = Some(format!("{exit:?}"));
    ctx.audit.emit(stopped);
    ctx.audit.flush();
    Ok(exit)
}

/// The link loop: the sans-IO [`Link`] decides, this function does the I/O.
async fn drive(ctx: &Arc<Ctx>, shutdown: impl Future<Output = ()>) -> Exit {
    tokio::pin!(shutdown);
    let epoch = Instant::now();
    let mut link = Link::new(Backoff::new(
        ctx.config.reconnect.initial,
        ctx.config.reconnect.max,
    ));
    let mut last_error: Option<String> = None;
    loop {
        let now = epoch.elapsed();
        match link.poll_action(now) {
            Action::Dial => {
                write_status(ctx, State::Connecting, None, link.failures(), &last_error);
                let dialled = tokio::select! {
                    () = &mut shutdown => { link.handle_shutdown(); continue; }
                    d = dial(ctx) => d,
                };
                match dialled {
                    Ok(session) => {
                        last_error = None;
                        link.handle_up(epoch.elapsed(), session.id);
                        write_status(ctx, State::Connected, Some(session.id), 0, &None);
                        match serve(ctx, session, &mut shutdown).await {
                            End::Lost(reason) => {
                                last_error = Some(reason);
                                link.handle_lost(epoch.elapsed(), rand::rng().next_u64());
                            }
                            End::Revoked(reason) => {
                                link.handle_revoked();
                                let marker = ctx.config.state_dir.join(REVOKED_MARKER);
                                if let Err(e) = store::write_file(&marker, reason.as_bytes(), 0o644)
                                {
                                    tracing::error!(error = %e, "cannot write the revocation marker");
                                }
                                write_status(ctx, State::Revoked, None, 0, &Some(reason.clone()));
                                return Exit::Revoked { reason };
                            }
                            End::Stopped => link.handle_shutdown(),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, attempt = link.failures() + 1, "cannot reach the Hub");
                        last_error = Some(e);
                        link.handle_dial_failed(epoch.elapsed(), rand::rng().next_u64());
                    }
                }
            }
            Action::WaitUntil(until) => {
                write_status(ctx, State::Backoff, None, link.failures(), &last_error);
                tokio::select! {
                    () = &mut shutdown => link.handle_shutdown(),
                    () = tokio::time::sleep_until(epoch + until) => {}
                }
            }
            // `drive` serves inside the Dial arm, so the link is never left Up here.
            Action::Serve => link.handle_lost(epoch.elapsed(), rand::rng().next_u64()),
            Action::Stop => {
                write_status(ctx, State::Stopped, None, 0, &last_error);
                return Exit::Stopped;
            }
        }
    }
}

struct Session {
    id: u64,
    conn: quinn::Connection,
    control: (quinn::SendStream, quinn::RecvStream, FrameReader),
    started: Instant,
}

enum End {
    Lost(String),
    Revoked(String),
    Stopped,
}

/// Dials the Hub and opens the control stream: `Hello` → `Welcome`.
async fn dial(ctx: &Ctx) -> Result<Session, String> {
    let verifier = SpiffeVerifier::new(ctx.bundle.clone(), ctx.leaf.id.trust_domain(), Expect::Hub)
        .with_audit(ctx.audit.clone());
    let tls = transport::tls_client_config(Some(&ctx.svid), Arc::new(verifier), frame::ALPN)
        .map_err(|e| e.to_string())?;
    let quic = transport::quic_client_config(tls).map_err(|e| e.to_string())?;
    let addr = enrol::resolve(&ctx.config.hub)
        .await
        .map_err(|e| e.to_string())?;
    let endpoint = enrol::client_endpoint(addr).map_err(|e| e.to_string())?;
    let conn = endpoint
        .connect_with(quic, addr, &ctx.config.hub.host)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("handshake with {addr}: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = Control::Hello {
        version: frame::PROTOCOL_VERSION,
        allow_list: ctx.config.allow.names(),
        allow_list_digest: ctx.config.allow.digest().to_vec(),
        build: crate::BUILD.to_owned(),
    };
    transport::write_frame(&mut send, &hello)
        .await
        .map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new();
    let welcome = tokio::time::timeout(WELCOME_TIMEOUT, reader.read::<Control>(&mut recv))
        .await
        .map_err(|_| "no Welcome in time".to_string())?
        .map_err(|e| e.to_string())?;
    let id = match welcome {
        Some(Control::Welcome { session_id, .. }) => session_id,
        Some(Control::Refused { code }) => return Err(format!("Hub refused the session: {code}")),
        other => return Err(format!("unexpected answer to Hello: {other:?}")),
    };
    let mut r = ctx.audit.record(Event::SessionUp);
    r.session_id = Some(id);
    r.client = Some(ctx.leaf.id.to_string());
    r.peer = Some(addr.to_string());
    r.outcome = Some(Outcome::Ok);
    ctx.audit.emit(r);
    tracing::info!(session_id = id, hub = %addr, "session up");
    Ok(Session {
        id,
        conn,
        control: (send, recv, reader),
        started: Instant::now(),
    })
}

/// Serves one session until it ends.
async fn serve(
    ctx: &Arc<Ctx>,
    session: Session,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> End {
    let Session {
        id,
        conn,
        control: (mut send, mut recv, mut reader),
        started,
    } = session;
    let mut queries = JoinSet::new();
    let mut heartbeat = tokio::time::interval(status::HEARTBEAT);
    heartbeat.tick().await;
    let end = loop {
        tokio::select! {
            () = &mut *shutdown => {
                let revoke = ctx.config.on_stop == OnStop::Revoke;
                let _ = transport::write_frame(&mut send, &Control::Goodbye { revoke }).await;
                let _ = send.finish();
                // Drain: no new queries, in-flight ones get a bounded time.
                let _ = tokio::time::timeout(DRAIN, async {
                    while queries.join_next().await.is_some() {}
                }).await;
                // The Hub closes once it has read the goodbye; closing first could discard it.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                conn.close(codes::DONE, b"");
                break End::Stopped;
            }
            stream = conn.accept_bi() => match stream {
                Ok((qsend, qrecv)) => {
                    queries.spawn(query(ctx.clone(), id, qsend, qrecv));
                }
                Err(e) => break closed(&e),
            },
            msg = reader.read::<Control>(&mut recv) => match msg {
                Ok(Some(Control::Revoked { reason })) => break End::Revoked(reason),
                Ok(Some(Control::Pong { .. } | Control::BundleUpdate { .. })) => {}
                Ok(Some(other)) => {
                    conn.close(codes::PROTOCOL, b"");
                    break End::Lost(format!("unexpected control message {other:?}"));
                }
                Ok(None) => break End::Lost("the Hub closed the control stream".into()),
                Err(_) => break closed(&conn.closed().await),
            },
            Some(_) = queries.join_next() => {}
            _ = heartbeat.tick() => write_status(ctx, State::Connected, Some(id), 0, &None),
        }
    };
    let mut r = ctx.audit.record(Event::SessionLost);
    r.session_id = Some(id);
    r.client = Some(ctx.leaf.id.to_string());
    r.duration_ms = Some(started.elapsed().as_millis() as u64);
    r.reason = Some(match &end {
        End::Lost(reason) => reason.clone(),
        End::Revoked(reason) => format!("revoked: {reason}"),
        End::Stopped => "stopped".into(),
    });
    ctx.audit.emit(r);
    end
}

fn closed(e: &quinn::ConnectionError) -> End {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) if close.error_code == codes::REVOKED => {
            End::Revoked(String::from_utf8_lossy(&close.reason).into_owned())
        }
        quinn::ConnectionError::TimedOut => End::Lost("idle timeout: the Hub went silent".into()),
        other => End::Lost(other.to_string()),
    }
}

/// One query stream: `Open` → dial the entry → `Opened` and pipe, or `Refused`.
async fn query(
    ctx: Arc<Ctx>,
    session_id: u64,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let started = Instant::now();
    let mut reader = FrameReader::new();
    let head = tokio::time::timeout(WELCOME_TIMEOUT, reader.read::<QueryHead>(&mut recv)).await;
    let Ok(Ok(Some(QueryHead::Open {
        query_id,
        destination,
        source,
    }))) = head
    else {
        let _ = send.reset(codes::PROTOCOL);
        let _ = recv.stop(codes::PROTOCOL);
        return;
    };
    let mut r = ctx.audit.record(Event::Query);
    r.session_id = Some(session_id);
    r.query_id = Some(query_id);
    r.client = Some(ctx.leaf.id.to_string());
    r.source = Some(source);
    r.destination = Some(Destination {
        name: destination.clone(),
        address: None,
    });
    match ctx.dialer.dial(&destination).await {
        Ok((tcp, addr)) => {
            if let Some(d) = &mut r.destination {
                d.address = Some(addr.to_string());
            }
            r.peer = tcp.local_addr().ok().map(|a| a.to_string());
            if transport::write_frame(&mut send, &QueryHead::Opened)
                .await
                .is_err()
            {
                r.outcome = Some(Outcome::Failed);
                r.reason = Some("the Hub went away before Opened".into());
            } else {
                let report = pipe(tcp, send, recv, reader.into_leftover()).await;
                r.bytes_up = Some(report.stream_to_tcp);
                r.bytes_down = Some(report.tcp_to_stream);
                r.outcome = Some(if report.error.is_none() {
                    Outcome::Ok
                } else {
                    Outcome::Failed
                });
                r.reason = report.error;
            }
        }
        Err(e) => {
            let (code, outcome) = match e {
                DialError::NotAllowed(_) => (RefuseCode::NotAllowed, Outcome::Refused),
                _ => (RefuseCode::Unreachable, Outcome::Failed),
            };
            let _ = transport::write_frame(&mut send, &QueryHead::Refused { code }).await;
            let _ = send.finish();
            r.outcome = Some(outcome);
            r.reason = Some(e.to_string());
        }
    }
    r.duration_ms = Some(started.elapsed().as_millis() as u64);
    ctx.audit.emit(r);
}

fn allow_list_lines(config: &ClientConfig) -> Vec<String> {
    config
        .allow
        .entries()
        .map(|e| format!("{}={}", e.name, e.endpoint))
        .collect()
}

fn write_status(
    ctx: &Ctx,
    state: State,
    session_id: Option<u64>,
    failures: u32,
    last_error: &Option<String>,
) {
    Status {
        state,
        pid: std::process::id(),
        updated_us: crate::now_timestamp().0,
        hub: ctx.config.hub.to_string(),
        spiffe_id: ctx.leaf.id.to_string(),
        svid_not_after: ctx.leaf.not_after,
        session_id,
        allow_list: allow_list_lines(&ctx.config),
        failures,
        last_error: last_error.clone(),
    }
    .write(&ctx.config.state_dir);
}

/// The effective allow-list as printed at start (`name=endpoint` lines).
pub fn describe_allow_list(config: &ClientConfig) -> Vec<String> {
    allow_list_lines(config)
}

/// Where `ewii-client` keeps its state by default.
pub fn default_state_dir() -> &'static Path {
    Path::new("/var/lib/ewii")
}
