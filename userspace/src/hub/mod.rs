//! The Ewii Hub: the operator's side.
//!
//! - [`admin`]: `init`, `token create`, workload SVIDs, `clients` — offline state operations.
//! - [`state`]: the SQLite database (tokens, clients, serials, revocations, webhook outbox).
//! - `watch`: notices revocations made by `ewii-hub revoke` (another process) and Clients
//!   silent past their grace, and closes or revokes them.
//! - `outbox`: delivers signed webhooks from the persisted outbox, with retries.
//! - `trust`: the bundle and the TLS configurations built from it; reloaded live when
//!   `ewii-hub ca prepare|activate|retire` changes them.
//! - this module: [`Hub`], which binds the QUIC endpoint and the service listeners and runs
//!   until its shutdown future resolves. Tests start it in-process on port 0.
//!
//! A Client connection is either an enrolment (ALPN `ewii-enroll/1`, no client certificate,
//! one `Enrol::Request`) or a session (ALPN `ewii/1`, an SVID verified against the bundle and
//! the serial records). A session registers the Client so that service listeners can open
//! query streams to it.

pub mod admin;
mod outbox;
mod query;
pub mod state;
mod trust;
mod watch;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ewii_common::audit::{Event, Outcome};
use ewii_common::frame::{self, Control, Enrol, Limits, RefuseCode};
use ewii_common::spiffe::{Role, SpiffeId};
use quinn::crypto::rustls::HandshakeData;
use rand::RngCore;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::audit::Audit;
use crate::config::{HubConfig, ServiceConfig, WebhookConfig};
use crate::identity::ca::Ca;
use crate::identity::inspect_leaf;
use crate::identity::verify::Bundle;
use crate::transport::{self, codes, FrameReader};
use crate::webhook::WebhookKey;
use state::{Db, SessionRow, StateError, TokenRefusal};

/// How long an enrolment or session opening may take before the Hub gives up on it.
const OPENING_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a live session re-checks its serial (revocation, retirement, expiry).
const RECHECK: Duration = Duration::from_secs(1);
/// How long a session whose serial was retired by a rotation may finish its queries (the
/// Client drains as long; no new query is routed to it meanwhile).
const RETIRED_DRAIN: Duration = Duration::from_secs(600);

/// Why the Hub could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The state directory is missing pieces (run `ewii-hub init`) or unreadable.
    #[error("hub state in {dir}: {source}")]
    Identity {
        /// The state directory.
        dir: std::path::PathBuf,
        /// What failed.
        source: crate::identity::IdentityError,
    },
    /// The database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A TLS or QUIC configuration was refused.
    #[error(transparent)]
    Transport(#[from] transport::ConfigError),
    /// A socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `ewii-hub init` refused to overwrite an existing CA, or got a bad argument.
    #[error("{0}")]
    Usage(String),
}

/// A live session with a Client.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) conn: quinn::Connection,
    pub(crate) spiffe_id: SpiffeId,
    /// Control messages the Hub pushes (bundle updates), written by the session task.
    pub(crate) push: tokio::sync::mpsc::UnboundedSender<Control>,
}

/// What the Hub shares between its tasks.
pub(crate) struct Inner {
    pub(crate) trust_domain: String,
    pub(crate) state_dir: std::path::PathBuf,
    pub(crate) ca: RwLock<Arc<Ca>>,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) service_tls: RwLock<tokio_rustls::TlsAcceptor>,
    pub(crate) db: Arc<Db>,
    pub(crate) audit: Audit,
    pub(crate) svid_lifetime: Duration,
    pub(crate) sessions: Mutex<HashMap<String, Session>>,
    pub(crate) bundle: Bundle,
    pub(crate) revoke_after_lost: Option<Duration>,
    pub(crate) webhooks: WebhookConfig,
    pub(crate) webhook_key: WebhookKey,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("trust_domain", &self.trust_domain)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Inner {
    pub(crate) fn session_for(&self, client: &str) -> Option<Session> {
        self.sessions.lock().ok()?.get(client).cloned()
    }

    /// Removes `client`'s session from the registry if it is still `session_id`.
    pub(crate) fn take_session(&self, client: &str, session_id: u64) -> bool {
        self.sessions.lock().is_ok_and(|mut s| {
            if s.get(client).is_some_and(|x| x.id == session_id) {
                s.remove(client);
                true
            } else {
                false
            }
        })
    }

    /// The signing CA now (it changes on `ewii-hub ca activate`).
    pub(crate) fn ca(&self) -> Arc<Ca> {
        match self.ca.read() {
            Ok(ca) => ca.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The acceptor for TLS service listeners now.
    pub(crate) fn service_tls(&self) -> tokio_rustls::TlsAcceptor {
        match self.service_tls.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// A read-only view of a running Hub, for tests and status.
#[derive(Debug, Clone)]
pub struct HubHandle(Arc<Inner>);

impl HubHandle {
    /// Names of the Clients with a live session.
    pub fn connected_clients(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .0
            .sessions
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }
}

/// A bound, not yet running Hub.
pub struct Hub {
    inner: Arc<Inner>,
    services: Vec<(ServiceConfig, TcpListener, SocketAddr)>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("listen", &self.inner.endpoint.local_addr().ok())
            .field("trust_domain", &self.inner.trust_domain)
            .finish()
    }
}

impl Hub {
    /// Loads the state in `config.state_dir` and binds every socket.
    pub async fn bind(config: HubConfig, audit: Audit) -> Result<Self, HubError> {
        let dir = &config.state_dir;
        let ident = |source| HubError::Identity {
            dir: dir.clone(),
            source,
        };
        let ca = Ca::load(dir).map_err(ident)?;
        let hub_svid = admin::load_or_renew_hub_svid(dir, &ca).map_err(ident)?;
        let trust_domain = inspect_leaf(&hub_svid.chain[0])
            .map_err(ident)?
            .id
            .trust_domain()
            .to_owned();
        let db = Arc::new(Db::open(&dir.join(admin::DB_FILE))?);
        db.clear_sessions()?;
        db.restart_grace(crate::now_timestamp().unix_secs() as i64)?;
        let webhook_key = WebhookKey::load_or_create(dir).map_err(ident)?;
        let bundle = Bundle::new(trust::load_bundle(dir, &ca).map_err(ident)?);
        let (server_config, tls_acceptor) =
            trust::server_configs(&hub_svid, &bundle, &trust_domain, &db, &audit)?;
        let endpoint = quinn::Endpoint::server(server_config, config.listen).map_err(|source| {
            HubError::Bind {
                addr: config.listen,
                source,
            }
        })?;

        let mut services = Vec::new();
        for svc in &config.services {
            let listener =
                TcpListener::bind(svc.listen)
                    .await
                    .map_err(|source| HubError::Bind {
                        addr: svc.listen,
                        source,
                    })?;
            let addr = listener.local_addr().map_err(|source| HubError::Bind {
                addr: svc.listen,
                source,
            })?;
            services.push((svc.clone(), listener, addr));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                trust_domain,
                state_dir: dir.clone(),
                ca: RwLock::new(Arc::new(ca)),
                endpoint,
                service_tls: RwLock::new(tls_acceptor),
                db,
                audit,
                svid_lifetime: config.svid_lifetime,
                sessions: Mutex::new(HashMap::new()),
                bundle,
                revoke_after_lost: config.revoke_after_lost,
                webhooks: config.webhooks.clone(),
                webhook_key,
            }),
            services,
        })
    }

    /// The UDP address Clients dial.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The bound address of service `name`.
    pub fn service_addr(&self, name: &str) -> Option<SocketAddr> {
        self.services
            .iter()
            .find(|(s, _, _)| s.name == name)
            .map(|(_, _, a)| *a)
    }

    /// A view for tests and status.
    pub fn handle(&self) -> HubHandle {
        HubHandle(self.inner.clone())
    }

    /// Serves until `shutdown` resolves; then closes every connection and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), HubError> {
        let Self { inner, services } = self;
        let endpoint = inner.endpoint.clone();
        // Listeners never end by themselves; connections do once the endpoint closes.
        let mut listeners = JoinSet::new();
        let mut connections = JoinSet::new();
        let mut r = inner.audit.record(Event::Started);
        r.peer = endpoint.local_addr().ok().map(|a| a.to_string());
        r.reason = Some(format!(
            "trust domain {}, {} service listener(s)",
            inner.trust_domain,
            services.len()
        ));
        inner.audit.emit(r);
        for (svc, listener, _) in services {
            listeners.spawn(query::serve(inner.clone(), svc, listener));
        }
        listeners.spawn(watch::watch(inner.clone()));
        listeners.spawn(outbox::deliver(inner.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => {
                        connections.spawn(handle_incoming(inner.clone(), incoming));
                    }
                    None => break,
                },
                Some(_) = connections.join_next() => {}
            }
        }
        listeners.shutdown().await;
        endpoint.close(codes::SHUTDOWN, b"");
        // Let each session write its `session_lost` record, within a bound.
        let drained = tokio::time::timeout(Duration::from_secs(2), async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            connections.shutdown().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        inner.audit.emit(inner.audit.record(Event::Stopped));
        inner.audit.flush();
        Ok(())
    }
}

async fn handle_incoming(inner: Arc<Inner>, incoming: quinn::Incoming) {
    let peer = incoming.remote_address();
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
        (Some(frame::ENROLL_ALPN), None) => enrol(&inner, conn, peer).await,
        (Some(frame::ALPN), Some(certs)) => session(&inner, conn, peer, &certs).await,
        (alpn, certs) => {
            let mut r = inner.audit.record(Event::HandshakeRefused);
            r.peer = Some(peer.to_string());
            r.outcome = Some(Outcome::Refused);
            r.reason = Some(format!(
                "ALPN {:?} with{} a client certificate",
                alpn.map(String::from_utf8_lossy),
                if certs.is_some() { "" } else { "out" }
            ));
            inner.audit.emit(r);
            conn.close(codes::REFUSED, b"");
        }
    }
}

/// One enrolment: a token and a CSR in, an SVID out.
async fn enrol(inner: &Inner, conn: quinn::Connection, peer: SocketAddr) {
    let outcome = tokio::time::timeout(OPENING_TIMEOUT, async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut reader = FrameReader::new();
        let request: Option<Enrol> = reader.read(&mut recv).await.map_err(|e| e.to_string())?;
        let Some(Enrol::Request { token, csr }) = request else {
            return Err("expected an enrolment request".to_string());
        };
        let (answer, result) = issue_for_token(inner, &token, &csr);
        transport::write_frame(&mut send, &answer)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        // Let the Client read the answer and close first.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        result
    })
    .await
    .unwrap_or_else(|_| Err("enrolment timed out".into()));
    let mut r = inner.audit.record(match &outcome {
        Ok(_) => Event::Enrolled,
        Err(_) => Event::EnrolmentRefused,
    });
    r.peer = Some(peer.to_string());
    match outcome {
        Ok((id, serial)) => {
            r.client = Some(id.to_string());
            r.outcome = Some(Outcome::Ok);
            r.reason = Some(format!("serial {serial}"));
        }
        Err(reason) => {
            r.outcome = Some(Outcome::Refused);
            r.reason = Some(reason);
        }
    }
    inner.audit.emit(r);
    conn.close(codes::DONE, b"");
}

/// Decides an enrolment: the answer for the wire (generic on refusal) and the local result.
fn issue_for_token(
    inner: &Inner,
    token: &str,
    csr: &[u8],
) -> (Enrol, Result<(SpiffeId, String), String>) {
    let refuse = |reason: String| {
        (
            Enrol::Refused {
                code: RefuseCode::EnrolmentRefused,
            },
            Err(reason),
        )
    };
    let now = crate::now_timestamp().unix_secs() as i64;
    let grant = match inner.db.redeem_token(token, now) {
        Ok(Ok(grant)) => grant,
        Ok(Err(TokenRefusal::UnknownOrUsed)) => return refuse("unknown or used token".into()),
        Ok(Err(TokenRefusal::Expired)) => return refuse("expired token".into()),
        Err(e) => return refuse(format!("token check failed: {e}")),
    };
    let id = match SpiffeId::client(&inner.trust_domain, &grant.client) {
        Ok(id) => id,
        Err(e) => return refuse(format!("bad client name in token record: {e}")),
    };
    let issued = match inner.ca().sign_csr(csr, &id, inner.svid_lifetime) {
        Ok(issued) => issued,
        Err(e) => return refuse(format!("CSR refused: {e}")),
    };
    if let Err(e) = inner
        .db
        .record_enrolment(&grant, &id, &issued.serial, issued.not_after, now)
    {
        return refuse(format!("could not record enrolment: {e}"));
    }
    (
        Enrol::Issued {
            chain: vec![issued.der.to_vec()],
            bundle: inner.bundle.anchors().iter().map(|c| c.to_vec()).collect(),
        },
        Ok((id, issued.serial)),
    )
}

/// One Client session: control stream first, then it stays registered until it ends.
async fn session(
    inner: &Arc<Inner>,
    conn: quinn::Connection,
    peer: SocketAddr,
    certs: &[CertificateDer<'static>],
) {
    let Some(leaf) = certs.first().and_then(|c| inspect_leaf(c).ok()) else {
        conn.close(codes::REFUSED, b"");
        return;
    };
    let Role::Client(name) = leaf.id.role() else {
        conn.close(codes::REFUSED, b"");
        return;
    };
    let opened = tokio::time::timeout(OPENING_TIMEOUT, async {
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut reader = FrameReader::new();
        match reader.read::<Control>(&mut recv).await {
            Ok(Some(Control::Hello {
                version: frame::PROTOCOL_VERSION,
                allow_list,
                ..
            })) => Ok((send, recv, reader, allow_list)),
            Ok(Some(Control::Hello { version, .. })) => {
                let _ = transport::write_frame(
                    &mut send,
                    &Control::Refused {
                        code: RefuseCode::Version,
                    },
                )
                .await;
                Err(format!("unsupported protocol version {version}"))
            }
            Ok(_) => Err("expected Hello".to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .unwrap_or_else(|_| Err("no Hello in time".into()));
    let (mut send, mut recv, mut reader, allow_list) = match opened {
        Ok(v) => v,
        Err(reason) => {
            let mut r = inner.audit.record(Event::SessionLost);
            r.client = Some(leaf.id.to_string());
            r.peer = Some(peer.to_string());
            r.outcome = Some(Outcome::Refused);
            r.reason = Some(reason);
            inner.audit.emit(r);
            conn.close(codes::PROTOCOL, b"");
            return;
        }
    };
    let session_id = rand::rng().next_u64();
    let welcome = Control::Welcome {
        session_id,
        hub_time_us: crate::now_timestamp().0,
        limits: Limits {
            max_concurrent_queries: transport::MAX_CONCURRENT_QUERIES,
            idle_timeout_ms: transport::IDLE_TIMEOUT.as_millis() as u32,
        },
    };
    if transport::write_frame(&mut send, &welcome).await.is_err() {
        return;
    }
    let started = tokio::time::Instant::now();
    let now = crate::now_timestamp().unix_secs() as i64;
    let row = SessionRow {
        session_id,
        serial: leaf.serial.clone(),
        peer: peer.to_string(),
        since: now,
    };
    if let Err(e) = inner.db.session_up(&name, &row) {
        tracing::error!(error = %e, "cannot record the session");
    }
    // P8: once a renewed serial is in use, every older one is dead.
    match inner.db.retire_older_serials(&name, &leaf.serial) {
        Ok(0) => {}
        Ok(n) => {
            let mut r = inner.audit.record(Event::SvidRotated);
            r.session_id = Some(session_id);
            r.client = Some(leaf.id.to_string());
            r.outcome = Some(Outcome::Ok);
            r.reason = Some(format!(
                "serial {} in use; {n} older serial(s) retired",
                leaf.serial
            ));
            inner.audit.emit(r);
        }
        Err(e) => tracing::error!(error = %e, "cannot retire older serials"),
    }
    let (push, mut pushed) = tokio::sync::mpsc::unbounded_channel::<Control>();
    if let Ok(mut sessions) = inner.sessions.lock() {
        sessions.insert(
            name.clone(),
            Session {
                id: session_id,
                conn: conn.clone(),
                spiffe_id: leaf.id.clone(),
                push,
            },
        );
    }
    let mut r = inner.audit.record(Event::SessionUp);
    r.session_id = Some(session_id);
    r.client = Some(leaf.id.to_string());
    r.peer = Some(peer.to_string());
    r.outcome = Some(Outcome::Ok);
    r.reason = Some(format!(
        "serial {}; allow-list [{}]",
        leaf.serial,
        allow_list.join(",")
    ));
    inner.audit.emit(r);

    // The handshake checked the serial once; the session keeps checking it, so that a
    // revocation, a retirement (after a bounded drain) or the SVID's expiry ends it.
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retired_since: Option<tokio::time::Instant> = None;
    if inner
        .db
        .revoked_among(std::slice::from_ref(&name))
        .map_or(true, |v| !v.is_empty())
    {
        conn.close(codes::REVOKED, b"revoked");
    }
    let reason = loop {
        tokio::select! {
            _ = recheck.tick() => {
                let now = crate::now_timestamp().unix_secs() as i64;
                if now >= leaf.not_after {
                    conn.close(codes::REFUSED, b"");
                    break "the SVID of this session expired".to_string();
                }
                match inner.db.serial_status(&leaf.id, &leaf.serial) {
                    Ok(state::SerialStatus::Current) => retired_since = None,
                    Ok(state::SerialStatus::Retired) => {
                        let since = *retired_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() >= RETIRED_DRAIN {
                            conn.close(codes::REFUSED, b"");
                            break format!("serial {} retired; drain time over", leaf.serial);
                        }
                    }
                    Ok(state::SerialStatus::Revoked) => {
                        // Whoever takes the session out of the registry closes it: this task
                        // or the watcher, never both.
                        if inner.take_session(&name, session_id) {
                            let reason = inner
                                .db
                                .revoked_among(std::slice::from_ref(&name))
                                .ok()
                                .and_then(|v| v.into_iter().next())
                                .map(|r| r.reason)
                                .unwrap_or_default();
                            watch::close_for_revocation(inner, &conn, session_id, &leaf.id, &reason);
                        }
                        break format!("{} is revoked", leaf.id);
                    }
                    // Unknown, someone else's, or the database failing: fail closed.
                    Ok(other) => {
                        conn.close(codes::REFUSED, b"");
                        break format!("serial {} no longer valid: {other:?}", leaf.serial);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot re-check a session's serial"),                }
            }
            msg = reader.read::<Control>(&mut recv) => match msg {
                Ok(Some(Control::Ping { time_us })) => {
                    let pong = Control::Pong { echo_us: time_us, time_us: crate::now_timestamp().0 };
                    if transport::write_frame(&mut send, &pong).await.is_err() {
                        break "control stream write failed".to_string();
                    }
                }
                Ok(Some(Control::Goodbye { revoke })) => {
                    if revoke {
                        revoke_now(inner, &name, &leaf.id, Some(session_id), "stopped by the customer", inner.webhooks.notify_on_stop);
                    }
                    conn.close(codes::DONE, b"");
                    break format!("goodbye (revoke: {revoke})");
                }
                Ok(Some(Control::Renew { csr })) => {
                    let answer = renew(inner, &name, &leaf, session_id, &csr);
                    if transport::write_frame(&mut send, &answer).await.is_err() {
                        break "control stream write failed".to_string();
                    }
                }
                Ok(Some(other)) => {
                    conn.close(codes::PROTOCOL, b"");
                    break format!("unexpected control message {other:?}");
                }
                Ok(None) => {
                    conn.close(codes::PROTOCOL, b"");
                    break "control stream closed".to_string();
                }
                Err(transport::StreamError::Read(quinn::ReadError::ConnectionLost(e))) => {
                    break lost_reason(&e)
                }
                Err(e) => break format!("control stream: {e}"),
            },
            Some(msg) = pushed.recv() => {
                if transport::write_frame(&mut send, &msg).await.is_err() {
                    break "control stream write failed".to_string();
                }
            }
            e = conn.closed() => break lost_reason(&e),
        }
    };
    if let Ok(mut sessions) = inner.sessions.lock() {
        if sessions.get(&name).is_some_and(|s| s.id == session_id) {
            sessions.remove(&name);
        }
    }
    let now = crate::now_timestamp().unix_secs() as i64;
    if let Err(e) = inner.db.session_down(&name, session_id, now) {
        tracing::error!(error = %e, "cannot record the session end");
    }
    let mut r = inner.audit.record(Event::SessionLost);
    r.session_id = Some(session_id);
    r.client = Some(leaf.id.to_string());
    r.peer = Some(peer.to_string());
    r.duration_ms = Some(started.elapsed().as_millis() as u64);
    r.reason = Some(reason);
    inner.audit.emit(r);
}

/// Signs a renewal CSR for the session's own identity (never what the CSR asks for).
fn renew(
    inner: &Inner,
    name: &str,
    leaf: &crate::identity::LeafInfo,
    session_id: u64,
    csr: &[u8],
) -> Control {
    let mut r = inner.audit.record(Event::SvidRotated);
    r.session_id = Some(session_id);
    r.client = Some(leaf.id.to_string());
    let now = crate::now_timestamp().unix_secs() as i64;
    // Only the newest key in use renews: a connection holding a retired, revoked or
    // superseded serial (a stolen old key) gets nothing.
    use crate::identity::verify::SerialCheck;
    let current = inner.db.check(&leaf.id, &leaf.serial);
    let superseded = inner.db.superseded(name, &leaf.serial).unwrap_or(true);
    let issued = if let Err(why) = current {
        Err(format!("no renewal: {why}"))
    } else if superseded {
        Err(format!(
            "no renewal: serial {} is superseded by a newer one in use",
            leaf.serial
        ))
    } else {
        inner
            .ca()
            .sign_csr(csr, &leaf.id, inner.svid_lifetime)
            .map_err(|e| format!("renewal CSR refused: {e}"))
            .and_then(|issued| {
                inner
                    .db
                    .record_renewal(name, &issued.serial, issued.not_after, now)
                    .map(|()| issued)
                    .map_err(|e| e.to_string())
            })
    };
    let answer = match issued {
        Ok(issued) => {
            r.outcome = Some(Outcome::Ok);
            r.reason = Some(format!(
                "issued serial {} to replace {}",
                issued.serial, leaf.serial
            ));
            Control::Renewed {
                chain: vec![issued.der.to_vec()],
                bundle: inner.bundle.anchors().iter().map(|c| c.to_vec()).collect(),
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
    inner.audit.emit(r);
    answer
}

/// Revokes `name` now (persisted first), closes its live session with `REVOKED`, audits.
pub(crate) fn revoke_now(
    inner: &Inner,
    name: &str,
    id: &SpiffeId,
    session_id: Option<u64>,
    reason: &str,
    notify: bool,
) {
    let now = crate::now_timestamp().unix_secs() as i64;
    match inner.db.revoke_client(name, reason, now, notify) {
        Ok(true) => {
            let mut r = inner.audit.record(Event::Revoked);
            r.client = Some(id.to_string());
            r.session_id = session_id;
            r.outcome = Some(Outcome::Ok);
            r.reason = Some(reason.to_owned());
            inner.audit.emit(r);
        }
        Ok(false) => {}
        Err(e) => tracing::error!(error = %e, client = %name, "could not record revocation"),
    }
}

fn lost_reason(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::TimedOut => "idle timeout: the Client went silent".into(),
        other => other.to_string(),
    }
}

/// Where `ewii-hub` keeps its state by default.
pub fn default_state_dir() -> &'static Path {
    Path::new("/var/lib/ewii-hub")
}
