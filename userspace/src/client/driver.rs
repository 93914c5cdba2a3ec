//! The thin driver around [`ClientSession`]: it turns I/O into `handle_*` calls and the
//! machine's [`Action`]s into I/O. Every decision — when to dial, renew, move to a renewed
//! connection, drain, back off, stop, exit — is the machine's; this file only does what it
//! is told and reports what happened.
//!
//! One loop: drain `poll_action` → publish the status if it changed → `select!` on the stop
//! signal, the dial in flight, the connections' events, kernel-denial counters and the
//! machine's next timeout. Disk writes (SVID, bundle, marker, status) run off the async
//! workers.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{Event as AuditEvent, Outcome};
use ewii_common::frame::{self, Control};
use ewii_common::session::{
    Action, ClientSession, CloseReason, Exit, Phase, RenewAnswer, SessionConfig, Validity,
    PENDING_REVOKE_REASON,
};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::clock::{random, validity, wake_at};
use super::connect::{self, ConnectError, DialPlan, Opened};
use super::connection::{Command, Connection, End, Event, Lost};
use super::dialer::{self, Addresses, Dialer};
use super::query::QueryCtx;
use super::rotation::{self, Identity, IssueError};
use super::status::{State, Status, StatusWriter};
use super::workload::{same_svid, Delivered, Deliveries, WorkloadError};
use super::{REVOKED_MARKER, REVOKE_PENDING_MARKER};
use crate::audit::Audit;
use crate::clock::Clock;
use crate::config::{ClientConfig, OnStop, SvidSource};
use crate::enforce::{DenySource, Report};
use crate::identity::ca::new_key_and_csr;
use crate::identity::store;
use crate::identity::verify::Bundle;

/// First retry delay of a refused or unanswered renewal.
const RENEW_RETRY: Duration = Duration::from_secs(1);
/// How long the Hub has to answer `Renew` before it is asked again.
const RENEW_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
// That ask again does not wait for the Hub's pause between two `Renew`: it must come later.
const _: () = assert!(RENEW_ANSWER_TIMEOUT.as_secs() > frame::RENEW_PAUSE_MAX.as_secs());
/// How long in-flight queries may drain after a stop.
const STOP_DRAIN: Duration = Duration::from_secs(5);
/// How long a stop without a live connection tries to reach the Hub to deliver its revoke.
const GOODBYE_BUDGET: Duration = Duration::from_secs(5);
/// How long connection tasks get to write their last records once the session is over.
const WIND_DOWN: Duration = Duration::from_secs(3);

type Dialing = Pin<Box<dyn Future<Output = Result<Opened, ConnectError>> + Send>>;

/// What the Client authenticates with: the SVID in use, the bundle the Hub is checked
/// against, and, with a Workload API, the SVIDs it pushes later.
pub(super) struct Credentials {
    pub(super) identity: Arc<Identity>,
    pub(super) bundle: Bundle,
    pub(super) deliveries: Option<Deliveries>,
    /// The key of a renewal an earlier run asked for and did not store.
    pub(super) renew_key: Option<rcgen::KeyPair>,
}

/// The driver's state: the machine, the connections it runs, and what they share.
pub(super) struct Driver {
    machine: ClientSession,
    clock: Clock,
    config: ClientConfig,
    audit: Audit,
    identity: Arc<Identity>,
    bundle: Bundle,
    queries: Arc<QueryCtx>,
    enforcement: Report,
    denies: Option<Box<dyn DenySource>>,
    status: StatusWriter,
    connections: HashMap<u64, mpsc::UnboundedSender<Command>>,
    /// Connections just dialled, started once the machine's first commands for them are
    /// queued (see [`Self::dialled`]).
    starting: Vec<(Connection, mpsc::UnboundedReceiver<Command>)>,
    tasks: Tasks,
    events: (mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>),
    dialing: Option<Dialing>,
    /// The key of the `Renew` in flight, also kept in the state directory
    /// ([`rotation::save_renew_key`]) until the renewed SVID is stored.
    renew_key: Option<rcgen::KeyPair>,
    /// A new `renew_key` is being written; its `Renew` goes out once it is
    /// ([`Event::RenewKeyKept`]), and no other meanwhile.
    renew_key_writing: bool,
    /// The machine asked for the stop's revoke to be recorded as pending.
    pending_revoke: bool,
    /// This run started to deliver a revoke pending from an earlier stop.
    delivering_pending: bool,
    /// The Hub acknowledged this stop's revoke.
    revoked_at_stop: bool,
    last_error: Option<String>,
    /// SVIDs pushed by a SPIFFE Workload API (`svid_source = "workload-api"`).
    deliveries: Option<Deliveries>,
    /// The serial of the last SVID presented to the Hub (`Present`).
    presented: Option<String>,
}

impl Driver {
    pub(super) fn new(
        config: ClientConfig,
        audit: Audit,
        credentials: Credentials,
        enforcement: Report,
        denies: Option<Box<dyn DenySource>>,
        pending_revoke: bool,
    ) -> Self {
        let Credentials {
            identity,
            bundle,
            deliveries,
            renew_key,
        } = credentials;
        let mut clock = Clock::start();
        let now = clock.read().now;
        let session = SessionConfig {
            reconnect_initial: config.reconnect.initial,
            reconnect_max: config.reconnect.max,
            renew_retry: RENEW_RETRY,
            renew_answer_timeout: RENEW_ANSWER_TIMEOUT,
            stop_drain: STOP_DRAIN,
            revoke_on_stop: config.on_stop == OnStop::Revoke,
            goodbye_budget: GOODBYE_BUDGET,
            external_svid: matches!(config.svid_source, SvidSource::WorkloadApi { .. }),
        };
        let machine = if pending_revoke {
            ClientSession::new_with_pending_revoke(session, validity(&identity), now, random())
        } else {
            ClientSession::new(session, validity(&identity), now, random())
        };
        // The Dialer starts from the addresses the layers were planned with; with the eBPF
        // lock attached they are the lock's, and stay.
        let addresses = Addresses::new(enforcement.addresses.clone(), enforcement.active("ebpf"));
        let client_id = identity.leaf.id.to_string();
        for change in dialer::refused_at_start(&config.allow, &enforcement) {
            audit.emit(dialer::change_record(&audit, &client_id, &change));
        }
        let queries = Arc::new(QueryCtx {
            audit: audit.clone(),
            dialer: Dialer::with_addresses(config.allow.clone(), config.connect_timeout, addresses)
                .audited(audit.clone(), client_id.clone()),
            client_id,
        });
        Self {
            machine,
            clock,
            status: StatusWriter::start(
                config.state_dir.clone(),
                audit.metrics().clone(),
                config.metrics_file.clone(),
            ),
            config,
            audit,
            identity,
            bundle,
            queries,
            enforcement,
            denies,
            connections: HashMap::new(),
            starting: Vec::new(),
            tasks: Tasks::default(),
            events: mpsc::unbounded_channel(),
            dialing: None,
            renew_key,
            renew_key_writing: false,
            pending_revoke: false,
            delivering_pending: pending_revoke,
            revoked_at_stop: false,
            last_error: None,
            deliveries,
            presented: None,
        }
    }

    /// The Hub's trust anchors in use become `anchors` (stored), which `change` made, `how`.
    /// A change has its own record, however it came (pushed, or with a renewal): the
    /// customer's evidence of each step of a CA swap. Returns whether anything changed.
    fn bundle_replaced(
        &mut self,
        anchors: Vec<CertificateDer<'static>>,
        change: &rotation::BundleChange,
        how: &str,
    ) -> bool {
        self.bundle.replace(anchors);
        if change.added.is_empty() && change.removed.is_empty() {
            return false;
        }
        let mut b = self.audit.record(AuditEvent::BundleUpdated);
        b.client = Some(self.queries.client_id.clone());
        b.outcome = Some(Outcome::Ok);
        b.reason = Some(format!("{how}: {change}"));
        self.audit.emit(b);
        true
    }

    /// The wall clock, read for an event. When it moved against the monotonic clock (a step,
    /// or a suspend), the machine brings its deadlines in line first (a step back would push
    /// a reconnect as far away as the step) and the log says so: a renewal, or the SVID's end,
    /// may follow at once.
    fn now(&mut self) -> Duration {
        let read = self.clock.read();
        if let Some(moved) = read.moved {
            tracing::warn!(
                by_secs = moved.by().as_secs(),
                "the wall clock moved {} (a clock step, or the host was suspended): the session's deadlines follow it",
                moved.way()
            );
            self.machine.handle_clock_moved(read.now);
        }
        read.now
    }

    /// The Hub's trust domain: the configured one with a Workload API, else our own.
    fn hub_trust_domain(&self) -> String {
        match &self.config.svid_source {
            SvidSource::WorkloadApi {
                hub_trust_domain, ..
            } => hub_trust_domain.clone(),
            SvidSource::StateDir => self.identity.leaf.id.trust_domain().to_owned(),
        }
    }

    /// Runs the session until the machine exits.
    pub(super) async fn run(mut self, shutdown: impl Future<Output = ()>) -> Exit {
        tokio::pin!(shutdown);
        let (denied_tx, mut denied) = watch::channel(Vec::new());
        let watcher = self.denies.take().map(|src| {
            tokio::spawn(crate::enforce::forward_denies(
                self.audit.clone(),
                self.queries.client_id.clone(),
                src,
                denied_tx,
            ))
        });
        let refresher = self
            .config
            .dns_refresh
            .filter(|_| {
                self.config
                    .allow
                    .entries()
                    .any(|e| matches!(e.endpoint.host, ewii_common::policy::Host::Dns(_)))
            })
            .map(|every| {
                tokio::spawn(dialer::refresh_every(
                    self.queries.dialer.clone(),
                    self.audit.clone(),
                    self.queries.client_id.clone(),
                    every,
                ))
            });
        let mut stopping = false;
        let exit = loop {
            if let Some(exit) = self.perform_actions() {
                break exit;
            }
            for (connection, commands) in self.starting.drain(..) {
                self.tasks
                    .spawn(connection.run(commands, self.events.0.clone()));
            }
            // Read first: a move of the clock seen here changes the deadlines the status shows.
            let now = self.now();
            let counters = denied.borrow().clone();
            self.publish_status(&counters);
            let timeout = wake_at(self.machine.poll_timeout(), now);
            tokio::select! {
                () = &mut shutdown, if !stopping => {
                    stopping = true;
                    let now = self.now();
                    self.machine.handle_stop(now);
                }
                dialled = poll_dial(&mut self.dialing), if self.dialing.is_some() => {
                    self.dialing = None;
                    self.dialled(dialled);
                }
                Some(event) = self.events.1.recv() => self.event(event).await,
                delivered = next_delivery(&mut self.deliveries), if self.deliveries.is_some() => {
                    match delivered {
                        Some(d) => self.delivered(d),
                        None => self.delivered(Err(WorkloadError::Closed)),
                    }
                }
                Ok(()) = denied.changed() => {}
                () = tokio::time::sleep_until(timeout) => {
                    let now = self.now();
                    self.machine.handle_timeout(now);
                }
            }
        };
        for task in [watcher, refresher].into_iter().flatten() {
            task.abort();
        }
        let denied = denied.borrow().clone();
        self.finish(&exit, &denied).await;
        exit
    }

    /// Performs every queued action; returns the exit once the machine asks for it.
    fn perform_actions(&mut self) -> Option<Exit> {
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::Dial => {
                    let plan = Arc::new(DialPlan {
                        hub: self.config.hub.clone(),
                        identity: self.identity.clone(),
                        bundle: self.bundle.clone(),
                        hub_trust_domain: self.hub_trust_domain(),
                        hello: Control::Hello {
                            version: frame::PROTOCOL_VERSION,
                            allow_list: self.config.allow.names(),
                            allow_list_digest: self.config.allow.digest().to_vec(),
                            build: crate::BUILD.to_owned(),
                        },
                        audit: self.audit.clone(),
                        max_queries: self.config.max_queries,
                        query_window: self.config.query_window,
                    });
                    self.dialing = Some(Box::pin(connect::dial(plan)));
                }
                Action::SendRenew => self.send_renew(),
                Action::Present { session_id } => {
                    self.presented = Some(self.identity.leaf.serial.clone());
                    self.command(Some(session_id), Command::Present(self.identity.clone()));
                }
                // Kept in the map until it ends: a stop meanwhile closes it too.
                Action::Retire { session_id } => self.command(Some(session_id), Command::Retire),
                Action::Close { session_id, reason } => {
                    self.command(Some(session_id), Command::Close(reason));
                    self.connections.remove(&session_id);
                }
                Action::SendGoodbye { session_id, revoke } => {
                    self.command(Some(session_id), Command::Goodbye { revoke });
                }
                // Written in `finish`, which comes next (the machine exits right after).
                Action::RecordPendingRevoke => self.pending_revoke = true,
                Action::RevokedAtStop => self.revoked_at_stop = true,
                Action::Exit(exit) => return Some(exit),
            }
        }
        None
    }

    /// Asks for a renewal. A serial renews once (the Hub refuses a second key): an ask that
    /// got no answer is asked again with the same key, and gets the same certificate, also
    /// after a restart. So a new key is kept in the state directory first, and the `Renew`
    /// goes out once it is ([`Event::RenewKeyKept`]).
    fn send_renew(&mut self) {
        let refused = |this: &mut Self, e: &dyn std::fmt::Display| {
            tracing::error!(error = %e, "cannot make a renewal key");
            let now = this.now();
            this.machine.handle_renew_refused(now, random());
        };
        if self.renew_key_writing {
            return;
        }
        if let Some(key) = &self.renew_key {
            match crate::identity::ca::csr_for(key) {
                Ok(csr) => self.renew_on_current(csr),
                Err(e) => refused(self, &e),
            }
            return;
        }
        let (key, csr) = match new_key_and_csr() {
            Ok(made) => made,
            Err(e) => return refused(self, &e),
        };
        let (dir, serial) = (
            self.config.state_dir.clone(),
            self.identity.leaf.serial.clone(),
        );
        let pem = key.serialize_pem();
        self.renew_key = Some(key);
        self.renew_key_writing = true;
        let events = self.events.0.clone();
        self.tasks.spawn(async move {
            let kept = tokio::task::spawn_blocking(move || {
                rotation::save_renew_key(&dir, &serial, &pem).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            let _ = events.send(Event::RenewKeyKept { csr, kept });
        });
    }

    fn dialled(&mut self, dialled: Result<Opened, ConnectError>) {
        let now = self.now();
        match dialled {
            Ok(opened) => {
                let id = opened.id;
                let (tx, rx) = mpsc::unbounded_channel();
                self.connections.insert(id, tx);
                // Started after the machine's answer to it is queued: a `Goodbye` (a connection
                // dialled only to deliver a revoke, or during a stop) or a `Close` (one that came
                // too late), which the connection takes before any stream. Started at once, it
                // could serve a query the Hub opened right after its `Welcome` first.
                let connection = Connection::new(opened, self.queries.clone());
                self.starting.push((connection, rx));
                self.last_error = None;
                self.machine.handle_dialed(now, id, random());
            }
            Err(ConnectError::Revoked(reason)) => self.machine.handle_revoked(from_the_hub(reason)),
            Err(e) => {
                // A handshake's error can carry the Hub's close reason.
                let said = e.said();
                let attempt = self.machine.failures() + 1;
                if e.refused_here() {
                    tracing::warn!(error = %said, attempt, "this Client refused the Hub");
                } else if e.refused() {
                    tracing::warn!(error = %said, attempt, "the Hub refused this Client's session");
                } else {
                    tracing::warn!(error = %said, attempt, "cannot reach the Hub");
                }
                self.last_error = Some(said);
                self.machine.handle_dial_failed(now, random());
            }
        }
    }

    async fn event(&mut self, event: Event) {
        let now = self.now();
        match event {
            // An answer on a connection that no longer serves (one retired after its
            // presentation timed out) is not the serving one's.
            Event::Control(
                id,
                Control::Renewed { .. } | Control::Refused { .. } | Control::Presented { .. },
            ) if self.current() != Some(id) => {
                tracing::debug!(session_id = %id, "an answer on a connection that no longer serves; ignored");
            }
            // Not asked for: the machine closes the connection (an answer beyond what was
            // asked on the connection never gets here: its own task ends it). A second answer
            // to a `Renew` asked again after its timeout changes nothing. Either way the key
            // stays: the next ask uses it.
            Event::Control(id, Control::Renewed { chain, bundle }) => {
                match self.machine.renew_answer() {
                    RenewAnswer::Awaited => self.renewed(now, chain, bundle).await,
                    other => self.not_awaited(now, id, other, "a renewed SVID"),
                }
            }
            Event::Control(id, Control::Presented { serial }) => {
                if self.machine.awaiting_presentation() {
                    let serial = ewii_common::text::from_peer(serial.as_bytes());
                    tracing::info!(%serial, "the Hub re-bound the session to the SVID from the Workload API");
                }
                // Not asked for: the machine closes the connection.
                self.machine.handle_presented(now, id);
            }
            Event::Control(id, Control::Refused { code })
                if self.machine.awaiting_presentation() =>
            {
                self.present_refused(id, &format!("refused by the Hub: {code}"));
            }
            Event::PresentFailed(id, why) => {
                if self.machine.awaiting_presentation() && self.current() == Some(id) {
                    self.present_refused(id, &why);
                }
            }
            // Outside a presentation a `Refused` answers a `Renew`. One that answers nothing
            // asked (a Client whose SVIDs come from a Workload API never renews) breaks the
            // protocol, as an unasked `Renewed` does: the connection is closed, so that a Hub
            // cannot fill the log with them. A second answer to a `Renew` asked again after
            // its timeout changes nothing.
            Event::Control(id, Control::Refused { code }) => match self.machine.renew_answer() {
                RenewAnswer::Awaited => {
                    tracing::warn!(%code, "the Hub refused the renewal");
                    let mut r = self.audit.record(AuditEvent::SvidRotated);
                    r.client = Some(self.queries.client_id.clone());
                    r.outcome = Some(Outcome::Refused);
                    r.reason = Some(format!("renewal refused by the Hub: {code}"));
                    self.audit.emit(r);
                    // The key is kept: the next ask for this serial is made with it.
                    self.machine.handle_renew_refused(now, random());
                }
                other => self.not_awaited(now, id, other, "a refusal"),
            },
            Event::Control(_, Control::BundleUpdate { bundle }) => self.adopt_bundle(bundle).await,
            Event::Control(..) => {}
            Event::RenewKeyKept { csr, kept } => {
                self.renew_key_writing = false;
                if let Err(e) = kept {
                    // Not asked: the Hub would sign for a key that lives only in this process,
                    // and a serial renews once. A restart before the answer is stored (or an
                    // answer that cannot be stored without its key) would leave the serial
                    // renewed for a key nowhere, every later ask refused, the identity lost at
                    // the SVID's end. Asked again later, with a new key.
                    tracing::warn!(error = %e, "cannot keep a renewal key in the state directory; the renewal is not asked until it can be");
                    self.renew_key = None;
                    let mut r = self.audit.record(AuditEvent::SvidRotated);
                    r.client = Some(self.queries.client_id.clone());
                    r.outcome = Some(Outcome::Failed);
                    r.reason = Some(format!(
                        "renewal not asked: its key cannot be kept in the state directory ({e}); asked again later"
                    ));
                    self.audit.emit(r);
                    if self.machine.awaiting_renewal() {
                        self.machine.handle_renew_refused(now, random());
                    }
                } else if self.machine.awaiting_renewal() {
                    self.renew_on_current(csr);
                }
            }
            Event::GoodbyeAcknowledged(id) => self.machine.handle_goodbye_acknowledged(id),
            Event::Drained(id) => self.machine.handle_drained(id),
            Event::Ended(id, End::Revoked(reason)) => {
                self.connections.remove(&id);
                self.machine.handle_connection_revoked(id, reason);
            }
            Event::Ended(id, End::Lost(lost)) => {
                if self.connections.remove(&id).is_some() && lost != Lost::Moved {
                    self.last_error = Some(lost.to_string());
                }
                self.machine.handle_lost(now, id, random());
            }
        }
    }

    /// The SVID from the Workload API could not be presented on the live connection: the
    /// machine moves to a new connection made with it. Audited: it is the Client's second
    /// connection, for a while.
    fn present_refused(&mut self, session_id: u64, why: &str) {
        tracing::warn!(reason = %why, "the Hub did not take the new SVID on the live connection; moving to a new connection");
        let mut r = self.audit.record(AuditEvent::SvidRotated);
        r.session_id = Some(session_id);
        r.client = Some(self.queries.client_id.clone());
        r.outcome = Some(Outcome::Refused);
        r.reason = Some(format!(
            "serial {} not taken on the live connection ({why}); moving to a new connection made with serial {}",
            self.presented.as_deref().unwrap_or("?"),
            self.identity.leaf.serial
        ));
        self.audit.emit(r);
        self.machine.handle_present_refused(session_id);
    }

    /// Sends `Renew` on the serving connection; the machine counts the answers due.
    fn renew_on_current(&mut self, csr: Vec<u8>) {
        if let Some(id) = self.current() {
            self.command(Some(id), Command::Renew(csr));
            self.machine.renew_sent();
        }
    }

    /// An answer to a `Renew` that the machine does not wait for: a late one is let go, an
    /// unasked one closes the connection (not while the session moves, where it may answer
    /// the presentation that timed out).
    fn not_awaited(&mut self, now: Duration, id: u64, answer: RenewAnswer, what: &str) {
        if answer == RenewAnswer::Unasked && self.machine.handle_unasked(now, id) {
            tracing::warn!(session_id = %id, "{what} from the Hub that answers nothing asked: a protocol violation; the connection is closed");
        } else {
            tracing::debug!(session_id = %id, "{what} from the Hub answers nothing awaited (a renewal asked again and answered since, or a presentation given up); ignored");
        }
    }

    /// The awaited answer to a `Renew`: adopted with the key it was asked with, or refused
    /// (and asked again with that key).
    async fn renewed(&mut self, now: Duration, chain: Vec<Vec<u8>>, bundle: Vec<Vec<u8>>) {
        let key = self.renew_key.take();
        // Put back if the answer is not stored: the next ask must use this key (the Hub
        // issued for it), and so must a restart (its file stays).
        let kept = key.as_ref().map(rcgen::KeyPair::serialize_pem);
        let Some(key) = key else {
            return self.machine.handle_renew_refused(now, random());
        };
        let adopted = self.adopt_renewal(key, chain, bundle).await;
        // After the checks and the writes to disk: the time they took counts.
        let now = self.now();
        match adopted {
            Ok(validity) => {
                // Stored and in use: the Hub re-binds this session to it.
                let serial = self.identity.leaf.serial.clone();
                self.command(self.current(), Command::Rotated(serial));
                self.machine.handle_renewed(now, validity);
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewal answer refused");
                self.renew_key = kept.and_then(|pem| rcgen::KeyPair::from_pem(&pem).ok());
                self.machine.handle_renew_refused(now, random());
            }
        }
    }

    /// Checks a `Renewed` answer and makes it the identity in use (files first, then memory).
    async fn adopt_renewal(
        &mut self,
        key: rcgen::KeyPair,
        chain: Vec<Vec<u8>>,
        bundle: Vec<Vec<u8>>,
    ) -> Result<Validity, RenewalError> {
        let old = self.identity.clone();
        let current = self.bundle.anchors();
        let anchors: Vec<CertificateDer<'static>> = if bundle.is_empty() {
            current.clone()
        } else {
            bundle.into_iter().map(Into::into).collect()
        };
        let dir = self.config.state_dir.clone();
        let accepted = tokio::task::spawn_blocking(move || {
            // A bundle that comes with the SVID is held to the rules of a pushed one.
            let change = rotation::bundle_change(&current, &anchors)?;
            let accepted = rotation::accept_issued(&key, chain, anchors, Some(&old.leaf.id))?;
            // Not stored unless its key is kept beside it: see `ensure_renew_key`.
            rotation::ensure_renew_key(&dir, &old.leaf.serial, &key).map_err(|e| {
                RenewalError::Store(format!(
                    "its key cannot be kept in the state directory ({e}), and the SVID is not stored without it; the SVID in use stays"
                ))
            })?;
            if let Err(e) = rotation::save_renewal(&dir, &accepted) {
                return Err(if e.bundle_saved {
                    RenewalError::StoredBundleOnly {
                        error: e.error.to_string(),
                        anchors: accepted.anchors,
                        change,
                    }
                } else {
                    RenewalError::Store(e.error.to_string())
                });
            }
            rotation::remove_renew_keys(&dir);
            Ok::<_, RenewalError>((accepted, change))
        })
        .await
        .map_err(|e| RenewalError::Store(e.to_string()))?;
        let mut r = self.audit.record(AuditEvent::SvidRotated);
        r.client = Some(self.queries.client_id.clone());
        let serial = self.identity.leaf.serial.clone();
        let (accepted, change) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // On disk, the bundle is the next start's: it is this run's too, on record.
                if let RenewalError::StoredBundleOnly {
                    anchors, change, ..
                } = &e
                {
                    let how = format!(
                        "with a renewal of serial {serial} whose SVID was not stored whole"
                    );
                    self.bundle_replaced(anchors.clone(), change, &how);
                }
                r.outcome = Some(Outcome::Refused);
                r.reason = Some(format!("renewed SVID refused: {e}"));
                self.audit.emit(r);
                return Err(e);
            }
        };
        r.outcome = Some(Outcome::Ok);
        let how = format!("with the renewal of serial {serial}");
        let bundle = if self.bundle_replaced(accepted.anchors, &change, &how) {
            format!("; bundle: {change}")
        } else {
            String::new()
        };
        r.reason = Some(format!(
            "serial {} replaces {}{bundle}",
            accepted.identity.leaf.serial, self.identity.leaf.serial
        ));
        self.audit.emit(r);
        self.identity = Arc::new(accepted.identity);
        Ok(validity(&self.identity))
    }

    /// The Workload API delivered something: a new SVID moves the session (the machine
    /// decides how), a new Hub bundle alone replaces ours; a refused delivery keeps what is in
    /// use and is audited.
    fn delivered(&mut self, delivered: Result<Delivered, WorkloadError>) {
        let mut r = self.audit.record(AuditEvent::SvidRotated);
        r.client = Some(self.queries.client_id.clone());
        let delivered = match delivered {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "Workload API delivery refused; keeping the SVID in use");
                if e == WorkloadError::Closed {
                    // Nothing more will come: the session goes on until the SVID in use ends.
                    self.deliveries = None;
                }
                r.outcome = Some(Outcome::Refused);
                r.reason = Some(format!("{e}; keeping serial {}", self.identity.leaf.serial));
                return self.audit.emit(r);
            }
        };
        // The customer's own agent: what it says of the Hub's CAs is taken as it comes (no
        // overlap asked, unlike a bundle from the Hub), and named in the record.
        if delivered.hub_anchors != self.bundle.anchors() {
            let change = rotation::bundle_diff(&self.bundle.anchors(), &delivered.hub_anchors);
            let how = "for the Hub, from the Workload API";
            self.bundle_replaced(delivered.hub_anchors, &change, how);
        }
        if same_svid(&self.identity, &delivered.identity) {
            return;
        }
        let replaced = std::mem::replace(&mut self.identity, Arc::new(delivered.identity));
        let now = self.now();
        self.machine.handle_svid(now, validity(&self.identity));
        r.outcome = Some(Outcome::Ok);
        r.reason = Some(format!(
            "serial {} replaces {} (from the Workload API); {}",
            self.identity.leaf.serial,
            replaced.leaf.serial,
            if self.machine.awaiting_presentation() {
                "presenting it on the live connection"
            } else {
                "used by the next connection (presented on it if that one was made with an older one)"
            }
        ));
        self.audit.emit(r);
    }

    /// A bundle pushed by the Hub over the authenticated control stream replaces ours.
    /// With `svid_source = "workload-api"` the customer's SPIRE says which CAs vouch for the
    /// Hub (the federated bundle it delivers): a bundle the Hub pushes is refused and recorded,
    /// not taken. Taken, it would trust CAs that SPIRE never federated until the next delivery,
    /// and that delivery would then take them away again.
    async fn adopt_bundle(&mut self, bundle: Vec<Vec<u8>>) {
        let anchors: Vec<CertificateDer<'static>> = bundle.into_iter().map(Into::into).collect();
        let mut r = self.audit.record(AuditEvent::BundleUpdated);
        r.client = Some(self.queries.client_id.clone());
        if let SvidSource::WorkloadApi {
            hub_trust_domain, ..
        } = &self.config.svid_source
        {
            let change = rotation::bundle_diff(&self.bundle.anchors(), &anchors);
            tracing::warn!(%change, "a bundle from the Hub refused: the Hub's CAs come from the Workload API");
            r.outcome = Some(Outcome::Refused);
            r.reason = Some(format!(
                "from the Hub ({change}): not taken, the Hub's CAs come from the Workload API \
                 (svid_source = \"workload-api\"); if the operator is rotating the Hub's CA, \
                 federate its new bundle for {hub_trust_domain} in SPIRE; bundle kept"
            ));
            return self.audit.emit(r);
        }
        let change = match rotation::bundle_change(&self.bundle.anchors(), &anchors) {
            Ok(change) => change,
            Err(e) => {
                tracing::warn!(error = %e, "a bundle from the Hub refused; the bundle in use is kept");
                r.outcome = Some(Outcome::Refused);
                r.reason = Some(format!("{e}; bundle kept"));
                return self.audit.emit(r);
            }
        };
        let dir = self.config.state_dir.clone();
        let to_save = anchors.clone();
        let saved = tokio::task::spawn_blocking(move || rotation::save_bundle(&dir, &to_save))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match saved {
            Err(e) => {
                r.outcome = Some(Outcome::Failed);
                r.reason = Some(e);
            }
            Ok(()) => {
                r.outcome = Some(Outcome::Ok);
                r.reason = Some(change.to_string());
                self.bundle.replace(anchors);
            }
        }
        self.audit.emit(r);
    }

    /// The session is over: record why, let the connections finish (bounded), write the
    /// last status.
    async fn finish(mut self, exit: &Exit, denied: &[(String, u64)]) {
        if self.pending_revoke {
            self.record_pending_revoke().await;
        }
        if self.revoked_at_stop {
            // The next start knows without asking the Hub, and enrols again if it is given
            // a new token (`ewii-client run` with EWII_TOKEN).
            let next = match self.config.svid_source {
                SvidSource::StateDir => {
                    "a later start needs a new token (EWII_TOKEN, or ewii-client enroll --replace)"
                }
                SvidSource::WorkloadApi { .. } => {
                    "a later start needs the operator's `ewii-hub readmit`, then the `revoked` file deleted"
                }
            };
            tracing::info!("identity {REVOKED_AT_STOP}: {next}");
            self.record_revoked(REVOKED_AT_STOP).await;
        }
        let state = match exit {
            // Revoked at its stop: the status says so, as after the Hub's revoke (`status`
            // and `health` read it, and the next start refuses).
            Exit::Stopped if self.revoked_at_stop => {
                self.last_error = Some(REVOKED_AT_STOP.to_owned());
                State::Revoked
            }
            Exit::Stopped => State::Stopped,
            Exit::Revoked { reason } => {
                self.record_revoked(reason).await;
                self.last_error = Some(reason.clone());
                State::Revoked
            }
            Exit::Expired => {
                let at = ewii_common::time::Timestamp(
                    self.identity.leaf.not_after.max(0) as u64 * 1_000_000,
                );
                let mut reason = match self.config.svid_source {
                    SvidSource::StateDir => {
                        format!("SVID expired at {at} without renewal; enrol again")
                    }
                    SvidSource::WorkloadApi { .. } => format!(
                        "SVID expired at {at}: the Workload API delivered no newer one; check the SPIRE agent"
                    ),
                };
                if self.delivering_pending {
                    reason.push_str(
                        "; the revoke of an earlier stop was not delivered (the Hub was not reached before the SVID ended): the Hub's revoke_after_lost_secs revokes a Client that stays away",
                    );
                }
                let mut r = self.audit.record(AuditEvent::SvidExpired);
                r.client = Some(self.queries.client_id.clone());
                r.reason = Some(reason.clone());
                self.audit.emit(r);
                self.last_error = Some(reason);
                State::Expired
            }
        };
        self.dialing = None;
        // A connection still open is closed; one that said Goodbye lingers (bounded) until
        // the Hub closes it, and each writes its `session_lost` record.
        for (_, tx) in self.connections.drain() {
            let _ = tx.send(Command::Close(CloseReason::StopDeadline));
        }
        let tasks = &mut self.tasks.0;
        let _ = tokio::time::timeout(WIND_DOWN, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        // Aborted, and awaited: each writes its `session_lost` as it goes (before the
        // `stopped` record and the last flush).
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        self.status.publish(self.snapshot(state, None, denied));
        let status = self.status;
        let _ = tokio::task::spawn_blocking(move || status.finish()).await;
    }

    fn publish_status(&self, denied: &[(String, u64)]) {
        let (state, session) = match self.machine.phase() {
            Phase::Connecting => (State::Connecting, None),
            Phase::Connected { session_id } => (State::Connected, Some(session_id)),
            Phase::Backoff { .. } => (State::Backoff, None),
            Phase::Revoking => (State::Revoking, None),
            Phase::Stopping | Phase::Done => (State::Stopped, None),
        };
        self.status.publish(self.snapshot(state, session, denied));
    }

    fn snapshot(&self, state: State, session_id: Option<u64>, denied: &[(String, u64)]) -> Status {
        let connected = state == State::Connected;
        Status {
            state,
            pid: std::process::id(),
            updated_us: 0,
            hub: self.config.hub.to_string(),
            spiffe_id: self.queries.client_id.clone(),
            svid_not_after: self.identity.leaf.not_after,
            session_id,
            allow_list: super::describe_allow_list(&self.config),
            failures: if connected {
                0
            } else {
                self.machine.failures()
            },
            last_error: if connected {
                None
            } else {
                self.last_error.clone()
            },
            enforcement: self.enforcement.clone(),
            kernel_denied: denied.to_vec(),
            svid_serial: self.identity.leaf.serial.clone(),
            svid_not_before: self.identity.leaf.not_before,
            next_renewal_unix: self.machine.renewal_due().map(|t| t.as_secs() as i64),
            hub_spiffe_id: format!("spiffe://{}/hub", self.hub_trust_domain()),
            bundle: self
                .bundle
                .anchors()
                .iter()
                .map(|a| crate::identity::bundle_hash(a))
                .collect(),
            allow_list_digest: format!("sha256:{}", hex::encode(self.config.allow.digest())),
            audit: super::describe_audit(&self.config),
            on_stop: self.config.on_stop.to_string(),
            metrics: Default::default(),
            hub_connections: self.connections.len(),
            svid_source: self.config.svid_source.to_string(),
        }
    }

    /// The identity is revoked: the `revoked` marker (later starts stop at once), no kept
    /// renewal key, no pending revoke, and the audit record.
    async fn record_revoked(&mut self, reason: &str) {
        let marker = self.config.state_dir.join(REVOKED_MARKER);
        let _ = write_marker(marker, reason.to_owned()).await;
        // No renewal will be stored any more: a kept key has nothing left to do.
        let dir = self.config.state_dir.clone();
        let _ = tokio::task::spawn_blocking(move || rotation::remove_renew_keys(&dir)).await;
        // The revocation is done: nothing is pending any more.
        let pending = self.config.state_dir.join(REVOKE_PENDING_MARKER);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(pending)).await;
        let mut r = self.audit.record(AuditEvent::Revoked);
        r.client = Some(self.queries.client_id.clone());
        r.outcome = Some(Outcome::Ok);
        r.reason = Some(reason.to_owned());
        self.audit.emit(r);
    }

    /// A stop's revoke was not confirmed by the Hub: the next start delivers it first.
    /// Written (with an fsync, off the async workers) before the session returns. If it
    /// cannot be written, the record says so: the identity is then not revoked.
    async fn record_pending_revoke(&mut self) {
        let path = self.config.state_dir.join(REVOKE_PENDING_MARKER);
        let mut why = format!(
            "the Hub did not confirm the revoke before the stop ended (unreachable for the {} s \
             a stop allows, or the connection lost first); it is delivered at the next start",
            GOODBYE_BUDGET.as_secs()
        );
        if let Err(e) = write_marker(path, why.clone()).await {
            why = format!(
                "the Hub did not confirm the revoke before the stop ended, and it cannot be \
                 kept for the next start ({e}): the identity is NOT revoked; revoke it at the \
                 Hub (`ewii-hub revoke`)"
            );
        }
        // Said on stderr too: whoever stopped the Client learns it there, not only in the audit
        // (and in the last status).
        tracing::warn!("{why}");
        self.last_error = Some(why.clone());
        let mut r = self.audit.record(AuditEvent::Revoked);
        r.client = Some(self.queries.client_id.clone());
        r.outcome = Some(Outcome::Failed);
        r.reason = Some(why);
        self.audit.emit(r);
    }

    fn current(&self) -> Option<u64> {
        match self.machine.phase() {
            Phase::Connected { session_id } => Some(session_id),
            _ => None,
        }
    }

    fn command(&self, session_id: Option<u64>, command: Command) {
        if let Some(tx) = session_id.and_then(|id| self.connections.get(&id)) {
            // A connection that is gone reports `Ended` itself.
            let _ = tx.send(command);
        }
    }
}

/// Why a renewed SVID was not adopted.
#[derive(Debug, thiserror::Error)]
enum RenewalError {
    /// It did not check out.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// It could not be stored.
    #[error("cannot store the renewed SVID: {0}")]
    Store(String),
    /// Its bundle was stored (and is in use), the SVID could not be.
    #[error("cannot store the renewed SVID (its bundle was stored): {error}")]
    StoredBundleOnly {
        error: String,
        anchors: Vec<CertificateDer<'static>>,
        change: rotation::BundleChange,
    },
}

/// A revocation reason from the Hub as this Client records it. One that reads as the Client's
/// own words, a revoke at its stop or one delivered at a restart (the next start reads the
/// marker to say who revoked it), is marked as the Hub's: the Hub's words cannot pass for the
/// customer's. Compared as the marker is read back, trimmed. Applied where the reason arrives
/// (a refused handshake here, a live session's `Revoked` or close in [`super::connection`]),
/// so that the `revoked` and `session_lost` records, the marker and `status` all carry it.
pub(super) fn from_the_hub(reason: String) -> String {
    if [REVOKED_AT_STOP, PENDING_REVOKE_REASON].contains(&reason.trim()) {
        format!("by the Hub: {reason}")
    } else {
        reason
    }
}

/// The reason in the `revoked` marker and the audit record when a stop's revoke was
/// acknowledged by the Hub.
pub(crate) const REVOKED_AT_STOP: &str =
    "revoked at its stop (on_stop = \"revoke\"), confirmed by the Hub";

async fn write_marker(path: PathBuf, reason: String) -> Result<(), String> {
    let written = tokio::task::spawn_blocking(move || {
        // Durable: a marker lost to a power cut would forget a revoke still to deliver, or let
        // a revoked Client dial its Hub again at every start.
        store::write_durable(&path, reason.as_bytes(), 0o644).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    if let Err(e) = &written {
        tracing::error!(error = %e, "cannot write the revocation marker");
    }
    written
}

/// The driver's tasks: its connections and the renewal key's writes. A `JoinSet` keeps each
/// ended task's allocation (sized for its whole future) until it is joined, and the driver
/// joins them only as it stops: each spawn first joins those that have ended, so a Client
/// that reconnects for weeks holds the tasks still running, not one per session it had.
#[derive(Default)]
struct Tasks(JoinSet<()>);

impl Tasks {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        while self.0.try_join_next().is_some() {}
        self.0.spawn(task);
    }
}

/// The next Workload API delivery; never resolves without a source.
async fn next_delivery(
    deliveries: &mut Option<Deliveries>,
) -> Option<Result<Delivered, WorkloadError>> {
    match deliveries {
        Some(d) => d.recv().await,
        None => std::future::pending().await,
    }
}

/// Polls the dial in flight; never resolves without one.
async fn poll_dial(dialing: &mut Option<Dialing>) -> Result<Opened, ConnectError> {
    match dialing {
        Some(d) => d.await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`; never wakes without one.
pub(super) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ended_tasks_are_joined_as_the_next_starts() {
        let mut tasks = Tasks::default();
        for _ in 0..100 {
            tasks.spawn(async {});
            // The task runs, and ends, before this one goes on.
            tokio::task::yield_now().await;
        }
        assert_eq!(
            tasks.0.len(),
            1,
            "only the last one, which has not been joined yet"
        );
        tasks.spawn(std::future::pending());
        tasks.spawn(std::future::pending());
        assert_eq!(tasks.0.len(), 2, "running tasks are kept");
    }
}
