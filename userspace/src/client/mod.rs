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
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ewii_common::audit::{Destination, Event, Outcome};
use ewii_common::backoff::Backoff;
use ewii_common::frame::{self, Control, QueryHead, RefuseCode};
use ewii_common::session::{self, Action, Link};
use rand::RngCore;
use rustls::pki_types::CertificateDer;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::audit::Audit;
use crate::config::{ClientConfig, OnStop};
use crate::enforce::{DenySource, Report};
use crate::identity::ca::new_key_and_csr;
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
/// How long a connection retired by a rotation may keep serving its in-flight queries.
const DRAIN_AFTER_ROTATION: Duration = Duration::from_secs(600);
/// After a rotation, how long the old connection still accepts streams the Hub opened just
/// before it switched to the new session.
const ROTATION_GRACE: Duration = Duration::from_secs(1);
/// First retry delay of a failed renewal.
const RENEW_RETRY: Duration = Duration::from_secs(1);
/// How long the Hub has to answer `Renew`.
const RENEW_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// The SVID expired without being renewed.
    #[error("the SVID expired at {0} without renewal; enrol again with a new token")]
    SvidExpired(ewii_common::time::Timestamp),
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
    /// The SVID expired without renewal (the Hub was away for a whole lifetime).
    Expired,
}

/// The SVID in use and what was read from it.
struct Identity {
    svid: Svid,
    leaf: LeafInfo,
}

/// Everything a session needs.
struct Ctx {
    config: ClientConfig,
    audit: Audit,
    identity: RwLock<Arc<Identity>>,
    bundle: Bundle,
    dialer: Dialer,
    enforcement: Report,
    /// Latest per-hook kernel refusal counts.
    denied: std::sync::Mutex<Vec<(String, u64)>>,
}

/// How often the eBPF ring buffer is read.
const DENY_POLL: Duration = Duration::from_millis(200);

/// Turns kernel refusals into `kernel_denied` audit records, and keeps the counters current.
async fn watch_denies(ctx: Arc<Ctx>, mut src: Box<dyn DenySource>) {
    let mut tick = tokio::time::interval(DENY_POLL);
    loop {
        tick.tick().await;
        for e in src.drain() {
            let mut r = crate::enforce::deny_record(&ctx.audit, &e);
            r.client = Some(ctx.client_id());
            ctx.audit.emit(r);
        }
        if let Ok(mut d) = ctx.denied.lock() {
            *d = src
                .counters()
                .into_iter()
                .map(|(h, n)| (h.to_owned(), n))
                .collect();
        }
    }
}

impl Ctx {
    fn identity(&self) -> Arc<Identity> {
        // A poisoned lock still holds the last identity written whole.
        match self.identity.read() {
            Ok(i) => i.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn client_id(&self) -> String {
        self.identity().leaf.id.to_string()
    }
}

/// Runs the Client until `shutdown` resolves, the Hub revokes it, or its SVID expires. No
/// kernel layer is installed (that is the binary's job, before its runtime starts).
pub async fn run(
    config: ClientConfig,
    audit: Audit,
    shutdown: impl Future<Output = ()>,
) -> Result<Exit, ClientError> {
    run_enforced(config, audit, Report::library(), None, shutdown).await
}

/// [`run`], with the kernel layers already installed: `report` goes to the status file and
/// the audit, and `denies` (the eBPF ring buffer) becomes `kernel_denied` audit records.
pub async fn run_enforced(
    config: ClientConfig,
    audit: Audit,
    report: Report,
    denies: Option<Box<dyn DenySource>>,
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
    if leaf.not_after <= crate::now_timestamp().unix_secs() as i64 {
        let at = ewii_common::time::Timestamp(leaf.not_after.max(0) as u64 * 1_000_000);
        let mut r = audit.record(Event::SvidExpired);
        r.client = Some(leaf.id.to_string());
        r.reason = Some(format!("expired at {at}; enrol again"));
        audit.emit(r);
        audit.flush();
        return Err(ClientError::SvidExpired(at));
    }
    let ctx = Arc::new(Ctx {
        dialer: Dialer::new(config.allow.clone(), config.connect_timeout),
        bundle: Bundle::new(anchors),
        config,
        audit,
        identity: RwLock::new(Arc::new(Identity { svid, leaf })),
        enforcement: report,
        denied: std::sync::Mutex::new(Vec::new()),
    });
    let watcher = denies.map(|src| tokio::spawn(watch_denies(ctx.clone(), src)));
    let mut started = ctx.audit.record(Event::Started);
    started.client = Some(ctx.client_id());
    started.peer = Some(ctx.config.hub.to_string());
    started.reason = Some(format!(
        "allow-list [{}]",
        allow_list_lines(&ctx.config).join(", ")
    ));
    ctx.audit.emit(started);

    ctx.enforcement.audit(&ctx.audit);
    let exit = drive(&ctx, shutdown).await;
    if let Some(w) = watcher {
        w.abort();
    }
    let mut stopped = ctx.audit.record(Event::Stopped);
    stopped.client = Some(ctx.client_id());
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
    let mut drains = JoinSet::new();
    let exit = loop {
        let now = epoch.elapsed();
        match link.poll_action(now) {
            Action::Dial => {
                if expired(ctx) {
                    break expire(ctx);
                }
                write_status(ctx, State::Connecting, None, link.failures(), &last_error);
                let dialled = tokio::select! {
                    () = &mut shutdown => { link.handle_shutdown(); continue; }
                    d = dial(ctx) => d,
                };
                let mut session = match dialled {
                    Ok(session) => session,
                    Err(e) => {
                        tracing::warn!(error = %e, attempt = link.failures() + 1, "cannot reach the Hub");
                        last_error = Some(e);
                        link.handle_dial_failed(epoch.elapsed(), rand::rng().next_u64());
                        continue;
                    }
                };
                last_error = None;
                // Serve, and keep serving across rotations (make-before-break).
                let end = loop {
                    link.handle_up(epoch.elapsed(), session.id);
                    write_status(ctx, State::Connected, Some(session.id), 0, &None);
                    match serve(ctx, session, &mut shutdown).await {
                        End::Rotated { next, old } => {
                            drains.spawn(drain(*old));
                            session = *next;
                        }
                        other => break other,
                    }
                };
                match end {
                    End::Lost(reason) => {
                        last_error = Some(reason);
                        link.handle_lost(epoch.elapsed(), rand::rng().next_u64());
                    }
                    End::Revoked(reason) => {
                        link.handle_revoked();
                        let marker = ctx.config.state_dir.join(REVOKED_MARKER);
                        if let Err(e) = store::write_file(&marker, reason.as_bytes(), 0o644) {
                            tracing::error!(error = %e, "cannot write the revocation marker");
                        }
                        let mut r = ctx.audit.record(Event::Revoked);
                        r.client = Some(ctx.client_id());
                        r.reason = Some(reason.clone());
                        ctx.audit.emit(r);
                        write_status(ctx, State::Revoked, None, 0, &Some(reason.clone()));
                        break Exit::Revoked { reason };
                    }
                    // The session's SVID ran out; a renewed one (whose session could not be
                    // brought up yet) may still be valid: then this is a loss, not the end.
                    End::Expired if !expired(ctx) => {
                        last_error =
                            Some("the old SVID expired; dialling with the renewed one".into());
                        link.handle_lost(epoch.elapsed(), rand::rng().next_u64());
                    }
                    End::Expired => break expire(ctx),
                    End::Stopped => link.handle_shutdown(),
                    End::Rotated { .. } => unreachable_rotation(),
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
                break Exit::Stopped;
            }
        }
    };
    // Connections left behind by rotations finish their queries (bounded) before we return.
    let _ =
        tokio::time::timeout(DRAIN, async { while drains.join_next().await.is_some() {} }).await;
    exit
}

/// `serve` never returns `Rotated` to this point: the inner loop consumes it.
fn unreachable_rotation() {
    tracing::error!("rotation end escaped the serve loop");
}

fn expired(ctx: &Ctx) -> bool {
    ctx.identity().leaf.not_after <= crate::now_timestamp().unix_secs() as i64
}

fn expire(ctx: &Ctx) -> Exit {
    let leaf = ctx.identity().leaf.clone();
    let at = ewii_common::time::Timestamp(leaf.not_after.max(0) as u64 * 1_000_000);
    let reason = format!("SVID expired at {at} without renewal; enrol again");
    let mut r = ctx.audit.record(Event::SvidExpired);
    r.client = Some(leaf.id.to_string());
    r.reason = Some(reason.clone());
    ctx.audit.emit(r);
    write_status(ctx, State::Expired, None, 0, &Some(reason));
    Exit::Expired
}

struct Session {
    id: u64,
    conn: quinn::Connection,
    control: (quinn::SendStream, quinn::RecvStream, FrameReader),
    started: Instant,
}

/// A connection being retired after a rotation, with its in-flight queries.
struct Retiring {
    session: Session,
    queries: JoinSet<()>,
    ctx: Arc<Ctx>,
}

enum End {
    Lost(String),
    Revoked(String),
    Expired,
    Stopped,
    /// A renewed SVID has its own session up: serve `next`, drain `old`.
    Rotated {
        next: Box<Session>,
        old: Box<Retiring>,
    },
}

/// Dials the Hub with the current SVID and opens the control stream: `Hello` → `Welcome`.
async fn dial(ctx: &Ctx) -> Result<Session, String> {
    let identity = ctx.identity();
    let verifier = SpiffeVerifier::new(
        ctx.bundle.clone(),
        identity.leaf.id.trust_domain(),
        Expect::Hub,
    )
    .with_audit(ctx.audit.clone());
    let tls = transport::tls_client_config(Some(&identity.svid), Arc::new(verifier), frame::ALPN)
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
        .map_err(|e| match &e {
            quinn::ConnectionError::ApplicationClosed(c) if c.error_code == codes::REVOKED => {
                format!("revoked: {}", String::from_utf8_lossy(&c.reason))
            }
            _ => format!("handshake with {addr}: {e}"),
        })?;
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
    r.client = Some(identity.leaf.id.to_string());
    r.peer = Some(addr.to_string());
    r.outcome = Some(Outcome::Ok);
    r.reason = Some(format!("serial {}", identity.leaf.serial));
    ctx.audit.emit(r);
    tracing::info!(session_id = id, hub = %addr, "session up");
    Ok(Session {
        id,
        conn,
        control: (send, recv, reader),
        started: Instant::now(),
    })
}

/// Where a renewal stands inside one session.
enum Renewal {
    /// Nothing asked; renew at the instant.
    Idle(Instant),
    /// `Renew` sent with this key; the answer is due by the instant.
    Asked(Box<rcgen::KeyPair>, Instant),
    /// New SVID in hand; a session with it is being dialled.
    Dialling,
    /// New SVID in hand; the last dial failed, dial again at the instant.
    RedialAt(Instant),
}

/// When to start renewing the current SVID (half-life ± 10 %, in tokio time).
fn renewal_instant(leaf: &LeafInfo) -> Instant {
    let at = session::renewal_time(
        leaf.not_before.max(0) as u64,
        leaf.not_after.max(0) as u64,
        rand::rng().next_u64(),
    );
    let now = crate::now_timestamp().unix_secs();
    Instant::now() + Duration::from_secs(at.saturating_sub(now))
}

/// Serves one session until it ends or hands over to a rotated one.
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
    let mut renewal = Renewal::Idle(renewal_instant(&ctx.identity().leaf));
    let mut renew_backoff = Backoff::new(RENEW_RETRY, ctx.config.reconnect.max.max(RENEW_RETRY));
    let mut next_dial: Option<PendingDial<'_>> = None;
    let expiry = Instant::now()
        + Duration::from_secs(
            (ctx.identity().leaf.not_after - crate::now_timestamp().unix_secs() as i64).max(0)
                as u64,
        );
    let end = loop {
        let renew_due = match &renewal {
            Renewal::Idle(at) | Renewal::Asked(_, at) | Renewal::RedialAt(at) => Some(*at),
            Renewal::Dialling => None,
        };
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
                Ok(Some(Control::Renewed { chain, bundle })) => {
                    let Renewal::Asked(key, _) = std::mem::replace(&mut renewal, Renewal::Dialling) else {
                        conn.close(codes::PROTOCOL, b"");
                        break End::Lost("Renewed without a Renew".into());
                    };
                    match adopt_renewal(ctx, &key, chain, bundle) {
                        Ok(()) => {
                            renew_backoff.reset();
                            next_dial = Some(Box::pin(dial(ctx)));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "renewal answer refused");
                            renewal = Renewal::Idle(Instant::now() + renew_backoff.next_delay(rand::rng().next_u64()));
                        }
                    }
                }
                Ok(Some(Control::Refused { code })) => {
                    tracing::warn!(%code, "the Hub refused the renewal");
                    let mut r = ctx.audit.record(Event::SvidRotated);
                    r.client = Some(ctx.client_id());
                    r.outcome = Some(Outcome::Refused);
                    r.reason = Some(format!("renewal refused by the Hub: {code}"));
                    ctx.audit.emit(r);
                    renewal = Renewal::Idle(Instant::now() + renew_backoff.next_delay(rand::rng().next_u64()));
                }
                Ok(Some(Control::BundleUpdate { bundle })) => adopt_bundle(ctx, bundle),
                Ok(Some(Control::Pong { .. })) => {}
                Ok(Some(other)) => {
                    conn.close(codes::PROTOCOL, b"");
                    break End::Lost(format!("unexpected control message {other:?}"));
                }
                Ok(None) => break End::Lost("the Hub closed the control stream".into()),
                Err(_) => break closed(&conn.closed().await),
            },
            () = sleep_until_opt(renew_due) => {
                match renewal {
                    Renewal::RedialAt(_) => {
                        renewal = Renewal::Dialling;
                        next_dial = Some(Box::pin(dial(ctx)));
                        continue;
                    }
                    Renewal::Asked(..) => tracing::warn!("no answer to Renew in time; asking again"),
                    Renewal::Idle(_) | Renewal::Dialling => {}
                }
                match new_key_and_csr() {
                    Ok((key, csr)) => {
                        if transport::write_frame(&mut send, &Control::Renew { csr }).await.is_err() {
                            break closed(&conn.closed().await);
                        }
                        renewal = Renewal::Asked(Box::new(key), Instant::now() + RENEW_ANSWER_TIMEOUT);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot make a renewal key");
                        renewal = Renewal::Idle(Instant::now() + renew_backoff.next_delay(rand::rng().next_u64()));
                    }
                }
            }
            dialled = poll_opt(&mut next_dial), if next_dial.is_some() => {
                next_dial = None;
                match dialled {
                    Ok(next) => {
                        let old = Retiring {
                            session: Session { id, conn, control: (send, recv, reader), started },
                            queries,
                            ctx: ctx.clone(),
                        };
                        return End::Rotated { next: Box::new(next), old: Box::new(old) };
                    }
                    Err(e) => {
                        // Keep serving on the old connection; dial again after a backoff.
                        tracing::warn!(error = %e, "cannot bring up the rotated session; retrying");
                        renewal = Renewal::RedialAt(Instant::now() + renew_backoff.next_delay(rand::rng().next_u64()));
                    }
                }
            }
            () = tokio::time::sleep_until(expiry) => break End::Expired,
            Some(_) = queries.join_next() => {}
            _ = heartbeat.tick() => write_status(ctx, State::Connected, Some(id), 0, &None),
        }
    };
    let mut r = ctx.audit.record(Event::SessionLost);
    r.session_id = Some(id);
    r.client = Some(ctx.client_id());
    r.duration_ms = Some(started.elapsed().as_millis() as u64);
    r.reason = Some(match &end {
        End::Lost(reason) => reason.clone(),
        End::Revoked(reason) => format!("revoked: {reason}"),
        End::Expired => "SVID expired".into(),
        End::Stopped => "stopped".into(),
        End::Rotated { .. } => "rotated".into(),
    });
    ctx.audit.emit(r);
    end
}
/// Checks a `Renewed` answer and makes it the identity in use (files first, then memory).
fn adopt_renewal(
    ctx: &Ctx,
    key: &rcgen::KeyPair,
    chain: Vec<Vec<u8>>,
    bundle: Vec<Vec<u8>>,
) -> Result<(), String> {
    let old = ctx.identity();
    let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(Into::into).collect();
    let leaf = chain.first().ok_or("empty chain")?;
    let anchors: Vec<CertificateDer<'static>> = if bundle.is_empty() {
        ctx.bundle.anchors()
    } else {
        bundle.into_iter().map(Into::into).collect()
    };
    let info = SpiffeVerifier::new(
        Bundle::new(anchors.clone()),
        old.leaf.id.trust_domain(),
        Expect::Client,
    )
    .verify_chain(leaf, &chain[1..], rustls::pki_types::UnixTime::now())?;
    if info.id != old.leaf.id {
        return Err(format!(
            "renewed SVID is for {}, not {}",
            info.id, old.leaf.id
        ));
    }
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|_| "leaf does not parse".to_string())?;
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice() {
        return Err("renewed SVID is not for the key we sent".into());
    }
    let svid = Svid::new(chain, key);
    let dir = &ctx.config.state_dir;
    svid.save(dir, store::SVID_CERT, store::SVID_KEY)
        .map_err(|e| e.to_string())?;
    store::write_file(
        &dir.join(store::BUNDLE),
        store::Pem::certs(&anchors).as_bytes(),
        0o644,
    )
    .map_err(|e| e.to_string())?;
    ctx.bundle.replace(anchors);
    let mut r = ctx.audit.record(Event::SvidRotated);
    r.client = Some(info.id.to_string());
    r.outcome = Some(Outcome::Ok);
    r.reason = Some(format!(
        "serial {} replaces {}",
        info.serial, old.leaf.serial
    ));
    ctx.audit.emit(r);
    if let Ok(mut id) = ctx.identity.write() {
        *id = Arc::new(Identity { svid, leaf: info });
    }
    Ok(())
}

/// A bundle pushed by the Hub over the authenticated control stream replaces ours.
fn adopt_bundle(ctx: &Ctx, bundle: Vec<Vec<u8>>) {
    let anchors: Vec<CertificateDer<'static>> = bundle.into_iter().map(Into::into).collect();
    let usable = anchors
        .iter()
        .filter(|c| webpki::anchor_from_trusted_cert(c).is_ok())
        .count();
    let mut r = ctx.audit.record(Event::BundleUpdated);
    r.client = Some(ctx.client_id());
    if usable == 0 || usable != anchors.len() {
        r.outcome = Some(Outcome::Refused);
        r.reason = Some(format!(
            "{} of {} anchors usable; bundle kept",
            usable,
            anchors.len()
        ));
    } else if let Err(e) = store::write_file(
        &ctx.config.state_dir.join(store::BUNDLE),
        store::Pem::certs(&anchors).as_bytes(),
        0o644,
    ) {
        r.outcome = Some(Outcome::Failed);
        r.reason = Some(e.to_string());
    } else {
        ctx.bundle.replace(anchors);
        r.outcome = Some(Outcome::Ok);
        r.reason = Some(format!("{usable} trust anchor(s)"));
    }
    ctx.audit.emit(r);
}

/// Finishes the queries of a connection retired by a rotation, then closes it. Streams the
/// Hub opened on it just before the switch are still served.
async fn drain(old: Retiring) {
    let Retiring {
        session,
        mut queries,
        ctx,
    } = old;
    let Session {
        id,
        conn,
        control: (mut send, _recv, _reader),
        ..
    } = session;
    let _ = tokio::time::timeout(DRAIN_AFTER_ROTATION, async {
        let grace = tokio::time::sleep(ROTATION_GRACE);
        tokio::pin!(grace);
        let mut grace_over = false;
        loop {
            tokio::select! {
                stream = conn.accept_bi() => match stream {
                    Ok((qs, qr)) => { queries.spawn(query(ctx.clone(), id, qs, qr)); }
                    Err(_) => break,
                },
                Some(_) = queries.join_next() => {}
                () = &mut grace, if !grace_over => grace_over = true,
            }
            if grace_over && queries.is_empty() {
                break;
            }
        }
    })
    .await;
    let _ = transport::write_frame(&mut send, &Control::Goodbye { revoke: false }).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(codes::DONE, b"");
}

/// A dial of the rotated session, polled alongside the old one.
type PendingDial<'a> = std::pin::Pin<Box<dyn Future<Output = Result<Session, String>> + Send + 'a>>;

/// Polls the future if there is one; never resolves otherwise.
async fn poll_opt<F: Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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
    r.client = Some(ctx.client_id());
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
    let identity = ctx.identity();
    Status {
        state,
        pid: std::process::id(),
        updated_us: crate::now_timestamp().0,
        hub: ctx.config.hub.to_string(),
        spiffe_id: identity.leaf.id.to_string(),
        svid_not_after: identity.leaf.not_after,
        session_id,
        allow_list: allow_list_lines(&ctx.config),
        failures,
        last_error: last_error.clone(),
        enforcement: ctx.enforcement.clone(),
        kernel_denied: ctx.denied.lock().map(|d| d.clone()).unwrap_or_default(),
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
