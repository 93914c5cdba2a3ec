//! One Client session (ALPN `ewii/1`): a [`Session`] owns its connection and control stream
//! and runs until the connection ends, in the manner of rathole's `ControlChannel::run`.
//!
//! A session is told, never polls: revocation closes its connection through the registry;
//! retirement of its serial arrives as [`Command::Drain`] (it then takes no new query and
//! closes after [`RETIRED_DRAIN`]); a changed bundle of its trust domain as
//! [`Command::Recheck`] (it ends when the new anchors no longer vouch for its chain); its own
//! SVID's expiry is a timer (of at most 30 s, the wall clock read again at each wake).
//!
//! Nor does it ever wait on the Client: what it writes on the control stream is queued for a
//! writer task ([`ControlOut`]), so a Client that stops reading cannot hold those timers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{AuditRecord, Event, Outcome, SessionEnd, MAX_SESSION_ID};
use ewii_common::frame::{self, Control, Limits, RefuseCode};
use rand::RngCore;
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio::time::Instant;

mod renewal;

use super::registry::{self, Command, Registry, Route};
use super::state::{SerialStatus, SessionRow};
use super::store::Store;
use super::trust::Trust;
use crate::audit::{Audit, Source};
use crate::identity::{inspect_leaf, LeafInfo};
use crate::transport::control::{ControlOut, OutError};
use crate::transport::{self, codes, FrameReader};

/// Why the bundles in use no longer vouch for `chain`, headed by `leaf` (a CA left one): the
/// detail of an `untrusted` end. `None` while they do.
fn no_longer_vouched(
    trust: &Trust,
    leaf: &LeafInfo,
    chain: &[CertificateDer<'_>],
) -> Option<String> {
    let why = trust.vouches_for(chain).err()?;
    Some(format!(
        "the bundle of {} no longer vouches for serial {}: {why}",
        leaf.id.trust_domain(),
        leaf.serial
    ))
}

/// A connection refused while its session opens: a `session_lost` record (refused, with
/// `reason`), then closed with `code` and `said`.
fn refuse_opening(
    parts: &Parts,
    conn: &quinn::Connection,
    leaf: &LeafInfo,
    peer: SocketAddr,
    reason: String,
    code: quinn::VarInt,
    said: &[u8],
) {
    let mut r = parts.audit.record(Event::SessionLost);
    r.client = Some(leaf.id.to_string());
    r.peer = Some(peer.to_string());
    r.outcome = Some(Outcome::Refused);
    r.reason = Some(reason);
    parts.audit.emit(r);
    conn.close(code, said);
}

/// How long a refusal before `Welcome` may take to reach the Client before the close.
const REFUSAL_DELIVERY: Duration = Duration::from_secs(1);
/// How long a session opening may take before the Hub gives up on it.
const OPENING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a session whose serial was retired may finish its queries (no new query is
/// routed to it meanwhile). A rotation re-binds the live session instead, so this only
/// applies to a connection that holds an older key (a second process with a stolen key, or
/// a Client that re-enrolled).
pub(crate) const RETIRED_DRAIN: Duration = Duration::from_secs(600);
/// `Ping`s a session answers in one second at most. The Client sends none (QUIC's PINGs keep
/// it alive); a tool or a test that checks the Hub took what it sent before uses a few.
const PINGS_PER_SECOND: u32 = 100;
/// After `Goodbye`, how long the Client has to finish its in-flight queries and close (it
/// drains for 5 s itself); no new query is routed to it meanwhile.
const GOODBYE_DRAIN: Duration = Duration::from_secs(10);

/// What every session shares with the rest of the Hub.
#[derive(Debug, Clone)]
pub(crate) struct Parts {
    pub(crate) store: Store,
    pub(crate) registry: Arc<Registry>,
    pub(crate) trust: Arc<Trust>,
    pub(crate) audit: Audit,
    /// Queue a webhook when a Client revokes itself by stopping.
    pub(crate) notify_on_stop: bool,
    /// What a new connection may cost before it has proven anything.
    pub(crate) admission: super::admission::Admission,
    /// The shard the connection lives on (set for each connection).
    pub(crate) shard: usize,
    /// Client name → the configured services that route to it, with the allow-list entry
    /// each names: a session whose allow-list lacks one is told of at its start.
    pub(crate) routes: Arc<ServiceRoutes>,
}

/// Client name → `(service, destination entry)` of each configured service to it.
pub(crate) type ServiceRoutes = std::collections::HashMap<String, Vec<(String, String)>>;

/// One authenticated connection with its control stream open and `Welcome` sent.
#[derive(Debug)]
pub(crate) struct Session {
    parts: Parts,
    conn: quinn::Connection,
    peer: SocketAddr,
    name: String,
    leaf: LeafInfo,
    /// The chain `leaf` heads, as the Client presented it (or this Hub issued it).
    chain: Vec<CertificateDer<'static>>,
    /// [`Trust::generation`] when the chain was last checked (the handshake, or `open`).
    generation: u64,
    id: u64,
    /// The control stream's send half: frames queued here never wait for the Client
    /// ([`ControlOut`]), so a Client that stops reading cannot hold this loop's timers.
    out: ControlOut,
    recv: quinn::RecvStream,
    reader: FrameReader,
    allow_list: Vec<String>,
    /// When this session ends because its SVID does (moved by a rotation).
    expiry: Instant,
    /// The SVID issued by the last `Renew`, until the Client says `Rotated`.
    pending: Option<(LeafInfo, CertificateDer<'static>)>,
    /// `Goodbye` received: whether it revoked, and until when the Client may drain.
    goodbye: Option<(bool, Instant)>,
    /// When this session last had a `Renew` served (a flood is refused).
    last_renew: Option<Instant>,
    /// When this session presented its last two SVIDs (a flood is refused).
    last_presents: [Option<Instant>; 2],
    /// Renewal requests in a row that broke the renewal rules (`renewal::STRIKES` end it).
    strikes: u32,
    /// The `Ping`s of the current second: past [`PINGS_PER_SECOND`], a protocol violation.
    pings: transport::Window,
    /// `Goodbye` without a revoke while a newer connection of the client is live: the
    /// Client moved (a new SVID from its SPIRE), it did not stop.
    moved: bool,
    /// `Goodbye` without a revoke found this session in neither of the registry's maps
    /// (superseded or revoked meanwhile): it is not drained but ended by what it was told,
    /// since no revocation could reach it while it drained.
    stranded: bool,
    /// How many older serials recording this session retired (said once it registers).
    retired: usize,
}

impl Session {
    /// Reads `Hello` and answers `Welcome`. `None` when the connection was refused or failed
    /// (closed and audited here). `generation`: [`Trust::generation`] before the handshake.
    pub(crate) async fn open(
        parts: Parts,
        conn: quinn::Connection,
        peer: SocketAddr,
        certs: &[CertificateDer<'static>],
        generation: u64,
    ) -> Option<Self> {
        let Some(leaf) = certs.first().and_then(|c| inspect_leaf(c).ok()) else {
            conn.close(codes::REFUSED, b"");
            return None;
        };
        let Some(name) = parts.trust.client_name(&leaf.id) else {
            conn.close(codes::REFUSED, b"");
            return None;
        };
        // A revoked identity that proved a current key is told so (it holds the key, so
        // telling it leaks nothing): it records the revocation and stops dialling (exit 10).
        // The TLS verifier let it through for this; strangers got the generic refusal there.
        let status = parts.store.view().status(&leaf.id, &leaf.serial);
        // The records cannot be read (a reload failed since the TLS check): whether this
        // serial was revoked or retired meanwhile cannot be told. Refused, as the TLS check
        // refuses then (fail closed).
        // Refused with a record, summed up per identity: the holder of a key may dial in a
        // loop.
        let refuse = |reason: String, code, said: &[u8]| {
            let mut r = parts.audit.record(Event::HandshakeRefused);
            r.client = Some(leaf.id.to_string());
            r.peer = Some(peer.to_string());
            r.outcome = Some(Outcome::Refused);
            r.reason = Some(reason);
            parts
                .audit
                .emit_from(Source::Claimed(leaf.id.to_string()), r);
            conn.close(code, said);
        };
        if status.is_none() {
            let why = format!("{}: the Hub's records cannot be read", leaf.id);
            refuse(
                format!("{why}; refused until they can"),
                codes::REFUSED,
                b"",
            );
            return None;
        }
        if status == Some(SerialStatus::Revoked) {
            let reason = parts.store.view().revocation(&name).unwrap_or_default();
            let why = format!("{} is revoked", leaf.id);
            refuse(why, codes::REVOKED, reason.as_bytes());
            return None;
        }
        // A Client that reconnects in a loop: refused before its session costs a synced write
        // (it backs off, and its next dial comes once its rate allows).
        if !parts.admission.session_allowed(&name) {
            let per_minute = parts.admission.limits().sessions_per_minute;
            let why = format!(
                "{} opens sessions faster than {per_minute} a minute: refused until its rate falls",
                leaf.id
            );
            refuse(why, codes::REFUSED, b"reconnecting too often");
            return None;
        }
        let opened = tokio::time::timeout(OPENING_TIMEOUT, hello(&conn))
            .await
            .unwrap_or_else(|_| Err("no Hello in time".into()));
        let (send, recv, reader, allow_list) = match opened {
            Ok(v) => v,
            Err(reason) => {
                let reason = SessionEnd::Protocol.reason(&reason);
                refuse_opening(&parts, &conn, &leaf, peer, reason, codes::PROTOCOL, b"");
                return None;
            }
        };
        // The records could not be read since the first look (a reload failed while the
        // Client said `Hello`): not registered, which would retire the Client's older serials
        // and route queries to it (fail closed). `run` looks again after registering, for a
        // reload that fails in between.
        if parts.store.view().status(&leaf.id, &leaf.serial).is_none() {
            let why = "the Hub's records could not be read as the Client said Hello";
            let reason = SessionEnd::RecordsUnreadable.reason(why);
            refuse_opening(&parts, &conn, &leaf, peer, reason, codes::REFUSED, b"");
            return None;
        }
        // A CA left a bundle since the handshake was checked: not registered (no query goes
        // to it) unless the bundles in use still vouch for this chain.
        let checked = parts.trust.generation();
        if checked != generation {
            if let Some(reason) = no_longer_vouched(&parts.trust, &leaf, certs) {
                let said = reason.clone().into_bytes();
                let reason = SessionEnd::Untrusted.reason(&reason);
                refuse_opening(&parts, &conn, &leaf, peer, reason, codes::UNTRUSTED, &said);
                return None;
            }
        }
        // Recorded before it registers: a session the Hub cannot record (its database refuses
        // the write: a full disk, another writer's lock past the busy timeout) is not kept, since
        // its serial's first use and the retirement of the client's older serials (P8) would not
        // be on record, nor would the session that holds off the silent-client grace (fail
        // closed). Its Client dials again.
        let id = new_session_id();
        let row = SessionRow {
            session_id: id,
            serial: leaf.serial.clone(),
            peer: peer.to_string(),
            since: crate::now_timestamp().unix_secs() as i64,
        };
        let retired = match parts.store.session_up(&name, row).await {
            Ok(retired) => retired,
            Err(e) => {
                let why = format!("the Hub could not record this session: {e}");
                tracing::warn!(client = %name, "refusing a new session: {why}");
                let reason = SessionEnd::RecordsUnwritable.reason(&why);
                let said = b"the Hub could not record this session";
                refuse_opening(&parts, &conn, &leaf, peer, reason, codes::REFUSED, said);
                return None;
            }
        };
        // Proven: the connection gets the window its queries need (strangers never get here),
        // and its host is one a session came from (it keeps a way in past the bound strangers
        // may hold: `admission`).
        transport::authenticated(&conn);
        parts.admission.session_from(peer.ip());
        Some(Self {
            parts,
            conn,
            peer,
            name,
            expiry: deadline_at(leaf.not_after),
            leaf,
            chain: certs.to_vec(),
            generation: checked,
            id,
            out: ControlOut::spawn(send),
            recv,
            reader,
            allow_list,
            pending: None,
            goodbye: None,
            last_renew: None,
            last_presents: [None; 2],
            strikes: 0,
            pings: transport::Window::new(PINGS_PER_SECOND, Duration::from_secs(1)),
            moved: false,
            stranded: false,
            retired,
        })
    }

    /// Registers the session, answers `Welcome`, serves its control stream until the
    /// connection ends, then records the end.
    ///
    /// `Welcome` goes out only once the session is registered and routable: a Client that
    /// moves to a new connection retires the old one as soon as it reads `Welcome`, and no
    /// query may find neither connection in between.
    pub(crate) async fn run(mut self) {
        let started = Instant::now();
        let (tell, mut told) = mpsc::unbounded_channel::<Command>();
        self.up(tell);
        let mut cut_short = CutShort::new(&self, started);
        let welcome = Control::Welcome {
            session_id: self.id,
            hub_time_us: crate::now_timestamp().0,
            limits: Limits {
                max_concurrent_queries: transport::MAX_CONCURRENT_QUERIES,
                idle_timeout_ms: transport::IDLE_TIMEOUT.as_millis() as u32,
            },
        };
        // Told before it registered? The view says so. When it cannot be read, a revocation
        // or retirement made before could not be seen, and the next good reload reports no
        // change for it: the session is not kept (fail closed), and no `Welcome` goes out (a
        // Client moving to a new connection would retire its working one on reading it). The
        // Client dials again.
        let status = self
            .parts
            .store
            .view()
            .status(&self.leaf.id, &self.leaf.serial);
        let unreadable = status.is_none().then(|| {
            let why = "the Hub's records could not be read as this session registered";
            tracing::warn!(client = %self.name, "closing a new session: {why}");
            self.conn.close(codes::REFUSED, why.as_bytes());
            SessionEnd::RecordsUnreadable.reason(why)
        });
        let welcomed = unreadable.is_none() && self.out.send(&welcome).is_ok();
        // A CA left a bundle between the check in `open` and the registration: the sessions
        // were told before this one could be, so it checks itself.
        let mut untrusted = unreadable.or_else(|| {
            (self.parts.trust.generation() != self.generation)
                .then(|| self.untrusted())
                .flatten()
        });
        let mut drain_until: Option<Instant> = None;
        let mut control_ended = false;
        match status {
            Some(SerialStatus::Revoked) => {
                let reason = self
                    .parts
                    .store
                    .view()
                    .revocation(&self.name)
                    .unwrap_or_default();
                self.parts.registry.close_revoked(&self.name, &reason);
            }
            Some(SerialStatus::Retired) => {
                self.parts
                    .registry
                    .retire(&self.name, std::slice::from_ref(&self.leaf.serial));
            }
            _ => {}
        }
        let reason = loop {
            if let Some(reason) = untrusted.take() {
                break reason;
            }
            if !welcomed {
                break SessionEnd::ConnectionLost.reason("control stream write failed (Welcome)");
            }
            let drained = async {
                match drain_until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let goodbye_over = async {
                match self.goodbye {
                    Some((_, at)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // In this order: the session's own timers and what the registry tells it (a
            // revocation, a drain, a bundle to re-check) before anything more from the peer.
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(self.expiry) => {
                    // The end is wall time, waited for on the monotonic clock, which a step of
                    // the host's clock does not move: read again at each wake.
                    if crate::now_timestamp().unix_secs() as i64 >= self.leaf.not_after {
                        self.conn.close(codes::REFUSED, b"");
                        break SessionEnd::SvidExpired.reason("the SVID of this session expired");
                    }
                    self.expiry = deadline_at(self.leaf.not_after);
                }
                () = drained => {
                    self.conn.close(codes::REFUSED, b"");
                    break SessionEnd::Retired.reason(&format!("serial {} retired; drain time over", self.leaf.serial));
                }
                () = goodbye_over => {
                    self.conn.close(codes::DONE, b"");
                    break goodbye_reason(self.goodbye, self.moved);
                }
                // After `Goodbye` the registry no longer holds this session (it dropped the
                // sender): nothing more is told. Unless it was in neither map as it departed
                // (`stranded`): then what it was told before is read, and ends it.
                command = told.recv(), if self.goodbye.is_none() || self.stranded => match command {
                    Some(Command::Drain) => {
                        drain_until.get_or_insert_with(|| Instant::now() + RETIRED_DRAIN);
                    }
                    Some(Command::Push(msg)) => {
                        if let Err(e) = self.out.send(&*msg) {
                            break self.unsent(&e);
                        }
                    }
                    Some(Command::Recheck(trust_domain)) => {
                        if self.leaf.id.trust_domain() == trust_domain {
                            if let Some(reason) = self.untrusted() {
                                break reason;
                            }
                        }
                    }
                    Some(Command::Superseded) => {
                        self.conn.close(codes::REFUSED, b"superseded: this Client has newer sessions");
                        break SessionEnd::Retired.reason(&format!(
                            "superseded: {} has more than {} sessions, and this was the oldest",
                            self.leaf.id,
                            registry::MAX_SESSIONS_PER_CLIENT
                        ));
                    }
                    // The registry dropped us: we were closed by a revocation.
                    None => break SessionEnd::Revoked.reason(&format!("{} is revoked", self.leaf.id)),
                },
                // A write failed: the connection's own end says why (a revocation, a shutdown), or
                // the Client stopped the control stream under us.
                e = self.out.failed(), if self.goodbye.is_none() => break self.write_failed(&e),
                // The next request is read once its answer has room: a Client that asks without
                // reading the answers is held by flow control, its session's timers are not.
                () = self.out.room(), if !self.out.has_room() => {}
                // After `Goodbye` the stream is read to its end (the Client waits for that
                // before it closes), and nothing on it matters any more.
                msg = self.reader.read::<Control>(&mut self.recv), if !control_ended && self.out.has_room() => {
                    if self.goodbye.is_some() {
                        control_ended = !matches!(msg, Ok(Some(_)));
                    } else if let Some(reason) = self.control(msg).await {
                        break reason;
                    }
                }
                e = self.conn.closed() => match self.goodbye {
                    // Closed by this Hub while it drained: an operator's revocation (the
                    // registry closes departing sessions too) is said as one.
                    Some((false, _)) if matches!(e, quinn::ConnectionError::LocallyClosed) => {
                        break self.lost_reason(&e)
                    }
                    Some(_) => break goodbye_reason(self.goodbye, self.moved),
                    None => break self.lost_reason(&e),
                },
            }
        };
        // Closed on every way out: the writer task holds the connection while a write waits for
        // the Client, so dropping this session alone would not end it. (Only while open: a close
        // would replace the reason the queries still running read.)
        if self.conn.close_reason().is_none() {
            self.conn.close(codes::PROTOCOL, b"");
        }
        self.parts.registry.remove(&self.name, self.id);
        cut_short.0 = None;
        tracing::debug!(session_id = %self.id, stats = ?self.conn.stats(), "session's QUIC counters");
        // Stamped now, when the end was seen, not after the synced commit below.
        let mut r = self.parts.audit.record(Event::SessionLost);
        r.session_id = Some(self.id);
        r.client = Some(self.leaf.id.to_string());
        r.peer = Some(self.peer.to_string());
        r.duration_ms = Some(started.elapsed().as_millis() as u64);
        r.reason = Some(reason);
        // Written after the store has the end (a reader of both sees them agree), or, if the
        // Hub's stop gives up on this task first (its sessions' ends wait for the store's synced
        // commits in turn, bounded as a whole), when the task is dropped: never lost.
        let record = EmitOnDrop(&self.parts.audit, Some(r));
        if let Err(e) = self.parts.store.session_down(&self.name, self.id).await {
            tracing::error!(error = %e, "cannot record the session end");
        }
        drop(record);
    }

    /// After a change of its trust domain's bundle: when the bundle no longer vouches for the
    /// chain the session is bound to (its CA left it), the connection is closed with
    /// [`codes::UNTRUSTED`], and the end's reason is returned. One chain check (a signature or
    /// two): short enough for an async worker, and bundles change rarely.
    fn untrusted(&self) -> Option<String> {
        let reason = no_longer_vouched(&self.parts.trust, &self.leaf, &self.chain)?;
        tracing::warn!(client = %self.name, %reason, "closing a live session");
        self.conn.close(codes::UNTRUSTED, reason.as_bytes());
        Some(SessionEnd::Untrusted.reason(&reason))
    }

    /// Registers the session (recorded in [`open`](Self::open)) for queries, and says so.
    fn up(&mut self, tell: mpsc::UnboundedSender<Command>) {
        if self.retired > 0 {
            self.audit_rotation(
                Outcome::Ok,
                format!(
                    "serial {} in use; {} older serial(s) retired",
                    self.leaf.serial, self.retired
                ),
            );
        }
        let route = Route {
            id: self.id,
            conn: self.conn.clone(),
            spiffe_id: self.leaf.id.clone(),
            shard: self.parts.shard,
        };
        self.parts
            .registry
            .register(&self.name, route, &self.leaf.serial, tell);
        let mut r = self.parts.audit.record(Event::SessionUp);
        r.session_id = Some(self.id);
        r.client = Some(self.leaf.id.to_string());
        r.peer = Some(self.peer.to_string());
        r.outcome = Some(Outcome::Ok);
        let mut reason = format!(
            "serial {}; allow-list [{}]",
            self.leaf.serial,
            names_bounded(&self.allow_list)
        );
        for (service, entry) in self.unrouted() {
            tracing::warn!(
                client = %self.name,
                "service {service} sends its queries to {}'s allow-list entry {entry}, which this Client's allow-list does not name (it names [{}]): the Client refuses every query of {service}; correct the service's destination, or ask the customer to add the entry",
                self.name,
                // The Client's words: bounded and escaped for the log.
                ewii_common::text::from_peer(self.allow_list.join(", ").as_bytes())
            );
            reason.push_str(&format!(
                "; service {service} names entry {entry}, not in it: its queries are refused"
            ));
        }
        r.reason = Some(reason);
        self.parts.audit.emit(r);
    }

    /// The configured services to this Client whose destination entry its allow-list does
    /// not name (each query through them would be refused by the Client).
    fn unrouted(&self) -> impl Iterator<Item = &(String, String)> + '_ {
        self.parts
            .routes
            .get(&self.name)
            .into_iter()
            .flatten()
            .filter(|(_, entry)| !self.allow_list.contains(entry))
    }

    /// Handles one control message; `Some(reason)` ends the session.
    async fn control(
        &mut self,
        msg: Result<Option<Control>, transport::StreamError>,
    ) -> Option<String> {
        match msg {
            // Each one answered costs the shard a frame in and out, and the shard serves other
            // Clients too: more than a Client's own checks could want ends the session.
            Ok(Some(Control::Ping { .. })) if !self.pings.admit(Instant::now()) => {
                self.conn.close(codes::PROTOCOL, b"");
                Some(
                    SessionEnd::Protocol
                        .reason(&format!("more than {PINGS_PER_SECOND} Pings within 1 s")),
                )
            }
            Ok(Some(Control::Ping { time_us })) => {
                let pong = Control::Pong {
                    echo_us: time_us,
                    time_us: crate::now_timestamp().0,
                };
                self.answer(&pong)
            }
            Ok(Some(Control::Goodbye { revoke })) => {
                // Only the newest serial speaks for the identity: a connection of one a newer
                // serial replaced (still draining; a stolen older key's, say) cannot revoke it,
                // as it cannot renew it (P8). Recorded, and taken as a plain `Goodbye`.
                let revoke = revoke && {
                    let Some(may) = self.may_revoke() else {
                        // The records cannot be read now (a reload failed): whether this
                        // serial was replaced is unknown, and a revoke by a replaced key would
                        // revoke the identity that replaced it.
                        self.revoked_record(Outcome::Failed, CANNOT_TELL.into());
                        return Some(self.revoke_kept_pending(CANNOT_TELL_END));
                    };
                    may
                };
                // No new query goes to it; in-flight ones finish, then the Client closes. Until
                // then an operator's revocation still closes it (its own revoke needs no more).
                if revoke {
                    self.parts.registry.remove(&self.name, self.id);
                } else {
                    // In neither of the registry's maps (superseded, or revoked, as the
                    // `Goodbye` came), it still reads what it was told, and ends by it.
                    self.stranded = !self.parts.registry.depart(&self.name, self.id);
                }
                self.moved = !revoke && self.parts.registry.route(&self.name).is_some();
                let mut revoke = revoke;
                if revoke {
                    // The revocation closes any other connection of this client. Checked again
                    // with it: a replacement that came since the check above is not revoked.
                    let stop = registry::AtStop {
                        client: &self.name,
                        id: &self.leaf.id,
                        serial: &self.leaf.serial,
                        session_id: self.id,
                        reason: "stopped by the customer",
                        notify: self.parts.notify_on_stop,
                    };
                    let recorded =
                        registry::revoke_at_stop(&self.parts.store, &self.parts.audit, stop).await;
                    match recorded {
                        registry::AtStopOutcome::Recorded => {}
                        registry::AtStopOutcome::NotRecorded => {
                            return Some(
                                self.revoke_kept_pending("the revocation could not be recorded"),
                            );
                        }
                        registry::AtStopOutcome::CannotTell => {
                            self.revoked_record(Outcome::Failed, CANNOT_TELL.into());
                            return Some(self.revoke_kept_pending(CANNOT_TELL_END));
                        }
                        registry::AtStopOutcome::Replaced => {
                            // Replaced since the check above: a plain `Goodbye`. Out of the
                            // registry already, it drains untold (no operator's revocation
                            // reaches it in those seconds; its serial is retired anyway).
                            self.refused_revoke();
                            revoke = false;
                            self.moved = self.parts.registry.route(&self.name).is_some();
                        }
                    }
                }
                self.goodbye = Some((revoke, Instant::now() + GOODBYE_DRAIN));
                // Tells the Client its `Goodbye` is processed: it closes once its queries are
                // done (closing earlier could have discarded the `Goodbye`).
                let _ = self.out.finish();
                None
            }
            Ok(Some(Control::Rotated { serial })) => self.rotated(serial).await,
            Ok(Some(Control::Present {
                chain,
                scheme,
                proof,
            })) => {
                let answer = self.present(chain, scheme, &proof).await;
                self.answer(&answer).or_else(|| self.struck_out())
            }
            Ok(Some(Control::Renew { csr })) => {
                let answer = self.renew(&csr).await;
                self.answer(&answer).or_else(|| self.struck_out())
            }
            Ok(Some(other)) => {
                self.conn.close(codes::PROTOCOL, b"");
                Some(SessionEnd::Protocol.reason(&format!(
                    "unexpected control message {}",
                    control_name(&other)
                )))
            }
            Ok(None) => {
                self.conn.close(codes::PROTOCOL, b"");
                Some(SessionEnd::Protocol.reason("control stream closed"))
            }
            Err(transport::StreamError::Read(quinn::ReadError::ConnectionLost(e))) => {
                Some(self.lost_reason(&e))
            }
            Err(e) => {
                self.conn.close(codes::PROTOCOL, b"");
                Some(SessionEnd::Protocol.reason(&format!("control stream: {e}")))
            }
        }
    }

    /// Queues `answer` for the Client; `Some(reason)` ends the session.
    fn answer(&self, answer: &Control) -> Option<String> {
        self.out.send(answer).err().map(|e| self.unsent(&e))
    }

    /// Why the session ends when a frame could not be queued: a Client that leaves
    /// [`transport::control::ROOM`] frames unread is not reading its control stream, and its
    /// connection is closed as a protocol violation.
    fn unsent(&self, e: &OutError) -> String {
        match e {
            OutError::Unread => {
                self.conn.close(codes::PROTOCOL, b"");
                SessionEnd::Protocol
                    .reason(&format!("the Client does not read its control stream: {e}"))
            }
            _ => self.write_failed(e),
        }
    }

    /// Why the session ends after a write on the control stream failed: the connection's own
    /// end (a revocation, a shutdown, the Client gone), or, while it is open, the Client
    /// stopped the stream under us (closed as a protocol violation).
    fn write_failed(&self, e: &dyn std::fmt::Display) -> String {
        match self.conn.close_reason() {
            Some(closed) => self.lost_reason(&closed),
            None => {
                self.conn.close(codes::PROTOCOL, b"");
                SessionEnd::Protocol.reason(&format!("control stream write failed: {e}"))
            }
        }
    }

    /// Why the connection ended, as the documented code and a detail.
    fn lost_reason(&self, e: &quinn::ConnectionError) -> String {
        use quinn::ConnectionError as E;
        match e {
            E::TimedOut => SessionEnd::IdleTimeout.reason("the Client went silent"),
            E::ApplicationClosed(c) if c.error_code == codes::REVOKED => {
                SessionEnd::Revoked.reason(&format!("{} is revoked", self.leaf.id))
            }
            E::ApplicationClosed(c) if c.error_code == codes::PROTOCOL => {
                SessionEnd::Protocol.reason("the Client closed it for a protocol error")
            }
            E::ApplicationClosed(c) if c.error_code == codes::SHUTDOWN => {
                SessionEnd::Stopped.reason("the Client shut down")
            }
            E::ApplicationClosed(_) => SessionEnd::ClosedByPeer.reason("closed by the Client"),
            // This Hub closed it: a revocation, or its own shutdown.
            E::LocallyClosed
                if self
                    .parts
                    .store
                    .view()
                    .status(&self.leaf.id, &self.leaf.serial)
                    == Some(SerialStatus::Revoked) =>
            {
                SessionEnd::Revoked.reason(&format!("{} is revoked", self.leaf.id))
            }
            E::LocallyClosed => SessionEnd::HubShutdown.reason("this Hub is shutting down"),
            // The Client's close reason in it: bounded and escaped.
            other => SessionEnd::ConnectionLost.reason(&transport::pipe::peer_said(&other)),
        }
    }
}

impl Session {
    /// Whether this session's serial may revoke the identity: not when a newer serial in use
    /// replaced it (its `Goodbye`'s revoke is then refused, on record); `None` when the view
    /// cannot tell (a reload failed).
    fn may_revoke(&self) -> Option<bool> {
        let status = self
            .parts
            .store
            .view()
            .status(&self.leaf.id, &self.leaf.serial)?;
        if status != SerialStatus::Retired {
            return Some(true);
        }
        self.refused_revoke();
        Some(false)
    }

    /// The record of a `Goodbye{revoke}` on a connection whose serial a newer one replaced.
    fn refused_revoke(&self) {
        self.revoked_record(
            Outcome::Refused,
            format!(
                "a Goodbye asked to revoke {} on a connection of serial {}, which a newer serial \
                 replaced: not revoked (only the newest serial speaks for the identity)",
                self.leaf.id, self.leaf.serial
            ),
        );
    }

    /// A `revoked` record of this session's `Goodbye{revoke}` that did not revoke.
    fn revoked_record(&self, outcome: Outcome, reason: String) {
        let mut r = self.parts.audit.record(Event::Revoked);
        r.client = Some(self.leaf.id.to_string());
        r.session_id = Some(self.id);
        r.peer = Some(self.peer.to_string());
        r.outcome = Some(outcome);
        r.reason = Some(reason);
        self.parts.audit.emit(r);
    }

    /// A stop's revoke this Hub did not take (`why`): the connection closes with the
    /// `Goodbye` unacknowledged, so the Client keeps the revoke pending and delivers it at its
    /// next start (an acknowledgement would tell it the identity is revoked when it is not).
    /// The session's end reason.
    fn revoke_kept_pending(&self, why: &str) -> String {
        self.conn
            .close(codes::SHUTDOWN, b"the revoke could not be recorded");
        SessionEnd::Goodbye.reason(&format!(
            "the Client stopped and asked to be revoked, but {why}; the Client keeps it pending"
        ))
    }
}

/// The record of a stop's revoke when the serial records cannot be read.
const CANNOT_TELL: &str = "stopped by the customer: not recorded: the Hub's serial records cannot be read to tell whether this connection's serial may revoke; the Client keeps the revoke pending";
/// The session's end then.
const CANNOT_TELL_END: &str =
    "the Hub's serial records cannot be read to tell whether its serial may: not revoked";

/// A registered session whose task is dropped before its end (the Hub's stop gives up on it
/// while a request of its Client waits, say a renewal's write behind another writer's lock):
/// its end is still audited (P11), and its connection leaves the registry, which would keep
/// the Hub's UDP socket open for as long as a handle lives. Its row in the store stays, as
/// after a crash: the next start reads it so.
struct CutShort(Option<(Audit, Arc<Registry>, String, u64, AuditRecord, Instant)>);

impl CutShort {
    fn new(session: &Session, started: Instant) -> Self {
        let mut r = session.parts.audit.record(Event::SessionLost);
        r.session_id = Some(session.id);
        r.client = Some(session.leaf.id.to_string());
        r.peer = Some(session.peer.to_string());
        r.reason = Some(
            SessionEnd::HubShutdown
                .reason("this Hub stopped before the session's end could be seen"),
        );
        Self(Some((
            session.parts.audit.clone(),
            session.parts.registry.clone(),
            session.name.clone(),
            session.id,
            r,
            started,
        )))
    }
}

impl Drop for CutShort {
    fn drop(&mut self) {
        if let Some((audit, registry, name, id, mut r, started)) = self.0.take() {
            registry.remove(&name, id);
            // Stamped when the end is seen, as every end is.
            r.time = crate::now_timestamp();
            r.duration_ms = Some(started.elapsed().as_millis() as u64);
            audit.emit(r);
        }
    }
}

/// A record written when this is dropped: at the end of the scope, or when the task holding it
/// is aborted at an `.await` before that.
struct EmitOnDrop<'a>(&'a Audit, Option<AuditRecord>);

impl Drop for EmitOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.1.take() {
            self.0.emit(r);
        }
    }
}

/// A control message's name, for a reason text (never its fields: they can be large).
fn control_name(msg: &Control) -> &'static str {
    match msg {
        Control::Hello { .. } => "Hello",
        Control::Welcome { .. } => "Welcome",
        Control::Refused { .. } => "Refused",
        Control::Renew { .. } => "Renew",
        Control::Renewed { .. } => "Renewed",
        Control::BundleUpdate { .. } => "BundleUpdate",
        Control::Revoked { .. } => "Revoked",
        Control::Goodbye { .. } => "Goodbye",
        Control::Ping { .. } => "Ping",
        Control::Pong { .. } => "Pong",
        Control::Rotated { .. } => "Rotated",
        Control::Present { .. } => "Present",
        Control::Presented { .. } => "Presented",
        _ => "unknown",
    }
}

fn goodbye_reason(goodbye: Option<(bool, Instant)>, moved: bool) -> String {
    SessionEnd::Goodbye.reason(if goodbye.is_some_and(|(r, _)| r) {
        "the Client stopped and asked to be revoked"
    } else if moved {
        "the Client moved to its newer connection (a new SVID)"
    } else {
        "the Client stopped; its identity is kept"
    })
}

/// Reads the Client's `Hello` on the first stream.
async fn hello(
    conn: &quinn::Connection,
) -> Result<
    (
        quinn::SendStream,
        quinn::RecvStream,
        FrameReader,
        Vec<String>,
    ),
    String,
> {
    let said = |e: &dyn std::error::Error| transport::pipe::peer_said(e);
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| said(&e))?;
    let mut reader = FrameReader::new();
    match reader.read::<Control>(&mut recv).await {
        Ok(Some(Control::Hello {
            version: frame::PROTOCOL_VERSION,
            allow_list,
            ..
        })) => {
            // The names go into the Hub's records and logs: a Client's own are entry names
            // (its configuration refuses any other), so anything else is not a Client's.
            if let Some(bad) = allow_list
                .iter()
                .find(|n| n.parse::<ewii_common::policy::EntryName>().is_err())
            {
                // Escaped, then quoted as a Rust string (its `"` and `\` escaped too): it
                // cannot end the quote it is shown in.
                return Err(format!(
                    "Hello names {:?}, which is not an allow-list entry name",
                    ewii_common::text::from_peer(bad.as_bytes())
                ));
            }
            Ok((send, recv, reader, allow_list))
        }
        Ok(Some(Control::Hello { version, .. })) => {
            let _ = transport::write_frame(
                &mut send,
                &Control::Refused {
                    code: RefuseCode::Version,
                },
            )
            .await;
            // The close that follows would discard the answer still unsent: it goes first
            // (until the Client has read it, or a moment).
            let _ = send.finish();
            let _ = tokio::time::timeout(REFUSAL_DELIVERY, send.stopped()).await;
            Err(format!("unsupported protocol version {version}"))
        }
        Ok(_) => Err("expected Hello".to_string()),
        Err(e) => Err(said(&e)),
    }
}

/// The Client's allow-list names, comma-separated, as many whole ones as fit in
/// [`ewii_common::text::PEER_TEXT_MAX`] characters, then how many there are in all: a Client
/// may name 1,024 (up to 64 KiB), and each session's record would carry them all.
fn names_bounded(names: &[String]) -> String {
    let mut out = String::new();
    for name in names {
        let sep = usize::from(!out.is_empty());
        if out.len() + sep + name.len() > ewii_common::text::PEER_TEXT_MAX {
            return format!("{out},… ({} names in all)", names.len());
        }
        if sep == 1 {
            out.push(',');
        }
        out.push_str(name);
    }
    out
}

/// A random session id, at most [`MAX_SESSION_ID`]: 53 random bits.
fn new_session_id() -> u64 {
    rand::rng().next_u64() & MAX_SESSION_ID
}

/// The instant the wall clock reads `unix_secs` (now when that has passed), or the next check
/// ([`EXPIRY_CHECK_US`]) when it is further away.
fn deadline_at(unix_secs: i64) -> Instant {
    let now_us = crate::now_timestamp().0 as i128;
    let wait_us = (i128::from(unix_secs) * 1_000_000 - now_us).clamp(0, EXPIRY_CHECK_US);
    Instant::now() + Duration::from_micros(wait_us as u64)
}

/// The longest a session waits for its SVID's end without reading the wall clock again: a
/// clock stepped ahead (or a host that slept) ends an expired SVID's session within it, not
/// after the step's length again.
const EXPIRY_CHECK_US: i128 = 30_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every id must survive a JSON reader that holds numbers as doubles; and they must still
    /// differ (53 random bits, not a counter or a constant).
    #[test]
    fn session_ids_are_exact_in_every_json_reader() {
        let ids: std::collections::HashSet<u64> = (0..10_000).map(|_| new_session_id()).collect();
        assert_eq!(
            ids.len(),
            10_000,
            "53 random bits should not repeat in 10,000 draws"
        );
        for id in &ids {
            assert!(*id <= MAX_SESSION_ID, "{id} is beyond 2^53 - 1");
            assert_eq!(*id as f64 as u64, *id, "{id} does not survive a double");
        }
        // The top bit in use is used: the ids are not confined to a smaller range.
        assert!(ids.iter().any(|id| id >> 52 == 1));
    }

    /// A Client may name 1,024 entries of 63 characters: its `session_up` record names whole
    /// ones up to the bound on a peer's words, then how many there are.
    #[test]
    fn p12_a_long_allow_list_is_named_bounded_in_the_sessions_record() {
        let few = ["db".to_owned(), "cache".to_owned()];
        assert_eq!(names_bounded(&few), "db,cache");
        let many: Vec<String> = (0..1_024).map(|i| format!("{i:0>60}")).collect();
        let listed = names_bounded(&many);
        let shown = listed
            .strip_suffix(",… (1024 names in all)")
            .unwrap_or_else(|| panic!("{listed}"));
        assert!(shown.len() <= ewii_common::text::PEER_TEXT_MAX, "{listed}");
        // Eight names of 60 and their commas fit in 512 characters; a ninth would not.
        assert_eq!(shown, many[..8].join(","));
    }
}
