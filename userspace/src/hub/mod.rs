//! The Ewii Hub: the operator's side. [`Hub`] binds the QUIC endpoints (one per shard, on one
//! port) and the service listeners and runs until its shutdown future resolves; tests start it
//! in-process on port 0.
//!
//! - [`admin`]: `init`, `token create`, workload SVIDs, `clients`, `revoke`, `ca …` — offline
//!   operations on the state directory.
//! - [`layout`]: the state directory's files, the Hub SVID and the bundle read from it.
//! - [`state`]: the SQLite database (tokens, clients, serials, revocations, webhook outbox),
//!   the synchronous backend.
//! - `store`: the one owner thread of the database, the async handle to it, and the
//!   in-memory view of serials and revocations that the TLS verifier checks.
//! - `registry`: every live connection per Client, the current one for queries; closes all
//!   of a revoked Client's connections and drains those with a retired serial.
//! - `incoming`: completes a handshake and hands the connection on by its ALPN.
//! - `session`: one Client session (ALPN `ewii/1`), from `Hello` to the end of the connection.
//! - `enrol`: one enrolment (ALPN `ewii-enroll/1`): a token and a CSR in, an SVID out.
//! - `query`: service listeners; each accepted connection becomes a query stream, run on the
//!   shard of its Client's connection.
//! - `shards`: the threads and runtimes of the shards (`threads`); a Client's connection, its
//!   session and its queries live on one of them.
//! - `watch`: hands the store's changes to the registry, notices another process's commits,
//!   revokes Clients silent past their grace.
//! - `outbox`: delivers signed webhooks from the persisted outbox, with retries.
//! - `trust`: the CA, the bundle and the TLS configurations; reloaded on `ewii-hub ca …`.
//!
//! Data flows one way: parts receive the handles they need (`Store`, `Registry`, `Trust`,
//! `Audit`) from [`Hub::bind`]; none reaches back into this module.

pub mod admin;
pub mod admission;
mod enrol;
mod incoming;
pub mod layout;
mod metrics;
mod outbox;
mod query;
mod registry;
mod session;
mod shards;
pub mod state;
mod store;
mod trust;
mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::Event;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::audit::Audit;
use crate::config::{HubConfig, ServiceConfig};
use crate::transport::{self, codes};
use crate::webhook::WebhookKey;
use registry::Registry;
use shards::Shards;
use state::StateError;
use store::{Change, Counts, Store, StoreError};
use trust::{Material, Trust, TrustError};

/// At most one log line per this period for connections refused before their handshake.
const REFUSAL_LOG: Duration = Duration::from_secs(10);

/// At a shutdown, how long the outbox may take to record an answered attempt after its
/// wind-down (a store write and an audit record).
const OUTBOX_RECORD: Duration = Duration::from_secs(3);

/// Why the Hub could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The state directory is missing pieces (run `ewii-hub init`) or unreadable.
    #[error("hub state in {dir}: {source}")]
    Identity {
        /// The state directory.
        dir: PathBuf,
        /// What failed.
        source: crate::identity::IdentityError,
    },
    /// The database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The database's owner thread failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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
    /// A shard's QUIC endpoint stopped while the Hub ran (its socket failed): the Hub stops
    /// rather than lose that shard's share of the Clients, which reconnect once it is back.
    #[error("shard {shard}'s QUIC endpoint stopped; the Hub stopped with it")]
    ShardLost {
        /// The shard.
        shard: usize,
    },
    /// `ewii-hub init` refused to overwrite an existing CA, or the state does not allow
    /// the command.
    #[error("{0}")]
    Usage(String),
    /// A value given on the command line or in the configuration that the command refuses
    /// (a trust domain, a client name, a TTL, a webhook URL, a `[[federation]]` entry):
    /// `ewii-hub` exits 2 for it, as for any bad argument.
    #[error("{0}")]
    Invalid(String),
    /// [`Hub::bind_unless`] gave up at a stop, before it listened.
    #[error("stopped before it listened")]
    Stopped,
}

impl From<TrustError> for HubError {
    fn from(e: TrustError) -> Self {
        match e {
            TrustError::Identity { dir, source } => Self::Identity { dir, source },
            TrustError::Transport(e) => Self::Transport(e),
            e @ TrustError::Federation { .. } => Self::Invalid(e.to_string()),
            TrustError::Stopping => Self::Stopped,
            other => Self::Usage(other.to_string()),
        }
    }
}

/// A read-only view of a running Hub, for tests and status.
#[derive(Debug, Clone)]
pub struct HubHandle {
    registry: Arc<Registry>,
    shards: usize,
    endpoints: Endpoints,
    counts: Arc<Counts>,
    trust: Arc<Trust>,
    admission: admission::Admission,
}

impl HubHandle {
    /// How many new connections were asked to prove their address (a QUIC Retry) so far.
    pub fn retries_sent(&self) -> u64 {
        self.admission.retries_sent()
    }

    /// New connections refused before their handshake so far: the Hub at its bound, one
    /// address at its bound.
    pub fn handshakes_refused(&self) -> [u64; 2] {
        self.admission.refused()
    }

    /// Names of the Clients with a live session.
    pub fn connected_clients(&self) -> Vec<String> {
        self.registry.connected_clients()
    }

    /// QUIC connections the Hub's endpoints hold: handshakes, live connections, and closed
    /// ones, each kept for three probe timeouts after a close (to answer its peer's late
    /// packets; one that timed out idle or was reset is let go at once). 0 once the Hub is
    /// gone.
    pub fn quic_connections(&self) -> usize {
        self.endpoints.open_connections()
    }

    /// Live connections (a Client has two for a moment while it rotates).
    pub fn connections(&self) -> usize {
        self.registry.connections()
    }

    /// Requesters' queries in progress on every service listener, from accept to record.
    pub fn queries_open(&self) -> usize {
        self.registry.queries_open()
    }

    /// Live connections on each shard (`threads`), in shard order.
    pub fn connections_per_shard(&self) -> Vec<usize> {
        self.registry.per_shard(self.shards)
    }

    /// Database statements run by the store owner since the Hub started, except the
    /// change-detection pragma (see [`store_change_checks`](Self::store_change_checks)).
    pub fn store_statements(&self) -> u64 {
        self.counts.statements()
    }

    /// Change-detection pragmas (`PRAGMA data_version`) run since the Hub started.
    pub fn store_change_checks(&self) -> u64 {
        self.counts.change_checks()
    }

    /// Reloads of the Hub's records that failed since it started (each leaves every handshake
    /// refused until one works).
    pub fn store_reloads_failed(&self) -> u64 {
        self.counts.reloads_failed()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        self.trust.trust_domain()
    }

    /// Reloads of the trust material that failed since start, every try: a reload that fails
    /// is tried again every second until one succeeds, and audited once per reason.
    pub fn trust_reloads_failed(&self) -> u64 {
        self.trust.reloads_failed()
    }
}

/// The shards' endpoints as handles see them while the Hub is bound or runs: a handle kept
/// after the Hub is gone must not hold its UDP port.
#[derive(Debug, Clone, Default)]
struct Endpoints(Arc<std::sync::Mutex<Vec<quinn::Endpoint>>>);

impl Endpoints {
    fn open_connections(&self) -> usize {
        self.held()
            .iter()
            .map(quinn::Endpoint::open_connections)
            .sum()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<quinn::Endpoint>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The Hub's own [`Endpoints`]: when it is dropped (the Hub stopped, or was dropped unrun, or
/// its `run` was cancelled), the handles let the endpoints go.
#[derive(Debug)]
struct EndpointsOwner(Endpoints);

impl Drop for EndpointsOwner {
    fn drop(&mut self) {
        self.0.held().clear();
    }
}

/// A bound, not yet running Hub.
#[derive(Debug)]
pub struct Hub {
    /// One per shard, in shard order, all on one UDP port.
    endpoints: Vec<quinn::Endpoint>,
    /// The same, for handles.
    shared: EndpointsOwner,
    held: transport::shard::AddressHeld,
    shards: Shards,
    changes: mpsc::UnboundedReceiver<Change>,
    sessions: session::Parts,
    watcher: watch::Parts,
    outbox: outbox::Parts,
    services: Vec<(ServiceConfig, TcpListener, SocketAddr)>,
    metrics: Option<(TcpListener, SocketAddr)>,
    /// Held until `run` returns: no second Hub on this state directory.
    run_lock: layout::RunLock,
}

impl Hub {
    /// Loads the state in `config.state_dir` and binds every socket.
    pub async fn bind(config: HubConfig, audit: Audit) -> Result<Self, HubError> {
        Self::bind_unless(config, audit, Arc::new(AtomicBool::new(false))).await
    }

    /// [`bind`](Self::bind), given up ([`HubError::Stopped`]) once `stop` is set: at once while
    /// it waits for the trust lock an `ewii-hub ca …` command holds (a stop during the start
    /// must not wait for that command, which may be paused), else at its next step before it
    /// binds a socket. The steps between are bounded: file reads, and the database's open
    /// (SQLite's busy wait of 5 s per statement, and at the first start after an upgrade an
    /// index to build).
    pub async fn bind_unless(
        config: HubConfig,
        audit: Audit,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, HubError> {
        let dir = config.state_dir.clone();
        let d = dir.clone();
        let run_lock = tokio::task::spawn_blocking(move || layout::lock_run(&d))
            .await
            .map_err(|e| HubError::Usage(format!("locking the state directory: {e}")))?
            .map_err(|source| HubError::Identity {
                dir: dir.clone(),
                source,
            })?
            .ok_or_else(|| {
                HubError::Usage(format!(
                    "another `ewii-hub run` is using {}: stop it first (one running Hub per state directory; the other ewii-hub commands run beside it)",
                    dir.display()
                ))
            })?;
        // File reads (and maybe a renewed Hub SVID written to disk): off the async workers.
        let d = dir.clone();
        // A `[[federation]]` webhook is checked at start for what cannot change: an http(s)
        // URL, and an address written in it. A host name is not resolved here: what it
        // resolves to is the customer's to change, and is checked (and pinned) at every
        // delivery; a name that pointed at a private address for a while must not keep this
        // Hub, and every customer on it, from starting.
        let allow_private = config.webhooks.danger_allow_private_targets;
        for f in &config.federation {
            if let Some(url) = &f.webhook {
                crate::webhook::check_url(url, allow_private).map_err(|why| {
                    TrustError::Federation {
                        trust_domain: f.trust_domain.clone(),
                        why,
                    }
                })?;
            }
        }
        let federation_config = config.federation.clone();
        let giving_up = stop.clone();
        let (material, key, federation) = tokio::task::spawn_blocking(move || {
            // A write a crash cut short left its temporary file (a CA key's holds the key).
            crate::identity::store::remove_leftover_temporaries(&d);
            let material = Material::load(&d, &giving_up)?;
            let federation = trust::load_federation(&federation_config, &material)?;
            let key = WebhookKey::load_or_create(&d)
                .map_err(|source| TrustError::Identity { dir: d, source })?;
            Ok::<_, TrustError>((material, key, federation))
        })
        .await
        .map_err(|e| HubError::Usage(format!("loading the state directory: {e}")))??;
        let stopped = || match stop.load(std::sync::atomic::Ordering::Relaxed) {
            true => Err(HubError::Stopped),
            false => Ok(()),
        };
        stopped()?;
        let now = crate::now_timestamp().unix_secs() as i64;
        let (store, changes) = Store::open(&dir.join(layout::DB_FILE), now).await?;
        // Before any handshake: the verifier checks federated Clients against these rows.
        store
            .admit_federated(
                config
                    .federation
                    .iter()
                    .flat_map(|f| {
                        f.clients
                            .iter()
                            .map(|(name, id)| (name.clone(), id.clone(), f.webhook.clone()))
                    })
                    .collect(),
                now,
            )
            .await
            .map_err(|e| match e {
                // The configuration names a client another identity holds: a bad entry, as
                // every other refused `[[federation]]` entry is (exit 2).
                StoreError::State(taken @ StateError::NameTaken { .. }) => {
                    HubError::Invalid(format!("[[federation]]: {taken}"))
                }
                other => other.into(),
            })?;
        // Before anything listens: a stop during the database's open (its busy waits, an
        // index built at the first start after an upgrade) ends the start here.
        stopped()?;
        let view = store.view().clone();
        let (trust, quic) = Trust::new(
            material,
            &dir,
            trust::Terms {
                svid_lifetime: config.svid_lifetime,
                query_window: config.query_window,
            },
            view,
            audit.clone(),
            federation,
            trust::BundleFile::all(&config.federation),
        )?;
        let bind_err = |source| HubError::Bind {
            addr: config.listen,
            source,
        };
        let shards = Shards::start(config.threads.unwrap_or_else(default_threads))
            .map_err(|e| HubError::Usage(format!("starting the shard threads: {e}")))?;
        let transport::shard::Endpoints { endpoints, held } =
            transport::shard::endpoints(config.listen, &quic, shards.handles())
                .map_err(bind_err)?;
        let mut services = Vec::new();
        for svc in &config.services {
            let bind_err = |source| HubError::Bind {
                addr: svc.listen,
                source,
            };
            let listener = query::bind(svc.listen).map_err(bind_err)?;
            let addr = listener.local_addr().map_err(bind_err)?;
            services.push((svc.clone(), listener, addr));
        }
        let metrics = match config.metrics_listen {
            None => None,
            Some(addr) => {
                let bind_err = |source| HubError::Bind { addr, source };
                let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
                let bound = listener.local_addr().map_err(bind_err)?;
                Some((listener, bound))
            }
        };
        let (registry, trust) = (Arc::new(Registry::new(audit.clone())), Arc::new(trust));
        // The hosts its Clients came from before the restart keep a way in (`admission`).
        let admission =
            admission::Admission::new(config.limits).with_returning(store.peers_before_start());
        Ok(Self {
            watcher: watch::Parts {
                store: store.clone(),
                registry: registry.clone(),
                trust: trust.clone(),
                endpoints: endpoints.clone(),
                audit: audit.clone(),
                grace: config.revoke_after_lost,
            },
            outbox: outbox::Parts {
                store: store.clone(),
                audit: audit.clone(),
                config: config.webhooks.clone(),
                key,
            },
            sessions: session::Parts {
                store,
                registry,
                trust,
                audit,
                notify_on_stop: config.webhooks.notify_on_stop,
                admission,
                shard: 0,
                routes: Arc::new(service_routes(&config.services)),
            },
            shared: EndpointsOwner(Endpoints(Arc::new(std::sync::Mutex::new(
                endpoints.clone(),
            )))),
            endpoints,
            held,
            shards,
            changes,
            services,
            metrics,
            run_lock,
        })
    }

    /// The bound address of `/metrics`, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(_, a)| *a)
    }

    /// The UDP address Clients dial.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoints[0]
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
        HubHandle {
            registry: self.sessions.registry.clone(),
            shards: self.endpoints.len(),
            endpoints: self.shared.0.clone(),
            counts: self.sessions.store.counts(),
            trust: self.sessions.trust.clone(),
            admission: self.sessions.admission.clone(),
        }
    }

    /// Serves until `shutdown` resolves; then closes every connection and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), HubError> {
        let handle = self.handle();
        let Self {
            endpoints,
            shared,
            held,
            shards,
            changes,
            sessions,
            watcher,
            outbox,
            services,
            metrics,
            run_lock,
        } = self;
        // However the run ends (stopped, or its future dropped), a trust reload waiting for an
        // `ewii-hub ca …` command's lock gives up: the runtime's end would wait for its thread.
        let _reloads_give_up = trust::StopOnDrop(sessions.trust.clone());
        let audit = sessions.audit.clone();
        // Its own address is in `reason`: `peer` is the other side of something, and a SIEM
        // reads it so.
        let mut r = audit.record(Event::Started);
        // (One endpoint per shard, all on one address.)
        let listening = endpoints
            .iter()
            .filter_map(|e| e.local_addr().ok())
            .map(|a| a.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ");
        r.reason = Some(format!(
            "listening on udp {listening}; trust domain {}, {} service listener(s)",
            sessions.trust.trust_domain(),
            services.len()
        ));
        audit.emit(r);
        // Listeners never end by themselves; connections do once the endpoint closes.
        let mut listeners = JoinSet::new();
        let mut connections = JoinSet::new();
        // The service listeners and their queries: at a stop, told first and waited for, so
        // that every query open then ends with its record and byte counts.
        let mut services_set = JoinSet::new();
        let (stop_queries, queries_stop) = tokio::sync::watch::channel(false);
        let query = query::Parts {
            registry: sessions.registry.clone(),
            trust: sessions.trust.clone(),
            audit: audit.clone(),
            shards: shards.handles().into(),
            stopping: queries_stop,
        };
        for (svc, listener, _) in services {
            services_set.spawn(query::serve(query.clone(), svc, listener));
        }
        if sessions.trust.has_federation_files() {
            listeners.spawn(watch::federation(
                sessions.trust.clone(),
                sessions.registry.clone(),
            ));
        }
        listeners.spawn(watch::watch(watcher, changes));
        let (stop_outbox, outbox_stop) = tokio::sync::watch::channel(false);
        // Its own set: aborted if this future is dropped, waited for at a shutdown.
        let mut outbox_task = JoinSet::new();
        outbox_task.spawn(outbox::deliver(outbox, outbox_stop));
        if let Some((listener, _)) = metrics {
            listeners.spawn(metrics::serve(listener, audit.clone(), handle));
        }
        // Each shard's new connections come here for admission, and go back to be served on
        // that shard. Only a connection's first moment crosses threads.
        // `None` from a shard: its endpoint stopped (these tasks are aborted before a shutdown
        // closes the endpoints, so it is a failure).
        let (arrived, mut arrivals) = mpsc::channel::<(usize, Option<quinn::Incoming>)>(64);
        for (shard, endpoint) in endpoints.iter().enumerate() {
            let (endpoint, arrived) = (endpoint.clone(), arrived.clone());
            listeners.spawn(async move {
                loop {
                    let incoming = endpoint.accept().await;
                    let ended = incoming.is_none();
                    if arrived.send((shard, incoming)).await.is_err() || ended {
                        break;
                    }
                }
            });
        }
        drop(arrived);
        let mut lost = None;
        // Refusals before the handshake are logged at most every REFUSAL_LOG, with a count.
        let (mut refused_unlogged, mut refusal_logged) = (0u64, None::<tokio::time::Instant>);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                incoming = arrivals.recv() => match incoming {
                    Some((shard, None)) => {
                        tracing::error!(shard, "a shard's QUIC endpoint stopped; stopping the Hub");
                        lost = Some(shard);
                        break;
                    }
                    Some((shard, Some(incoming))) => {
                        let peer = incoming.remote_address();
                        let validated = incoming.remote_address_validated();
                        match sessions.admission.admit(peer.ip(), validated) {
                            (admission::Verdict::Accept, Some(slot)) => {
                                let mut parts = sessions.clone();
                                parts.shard = shard;
                                connections.spawn_on(
                                    incoming::handle(parts, incoming, slot),
                                    &shards.handles()[shard],
                                );
                            }
                            (admission::Verdict::Retry, _) if incoming.may_retry() => {
                                if incoming.retry().is_ok() {
                                    sessions.admission.retried();
                                }
                            }
                            (verdict, _) => {
                                refused_unlogged += 1;
                                if refusal_logged.is_none_or(|at| at.elapsed() >= REFUSAL_LOG) {
                                    tracing::warn!(%peer, ?verdict, refused = refused_unlogged, "connections refused before their handshake (ewii_hub_connections_refused_total)");
                                    (refused_unlogged, refusal_logged) = (0, Some(tokio::time::Instant::now()));
                                }
                                incoming.refuse();
                            }
                        }
                    }
                    None => break,
                },
                Some(_) = connections.join_next() => {}
            }
        }
        // A trust reload waiting for an `ewii-hub ca …` command's lock gives up now (the
        // guard above makes sure of it, later, on every other way out).
        sessions.trust.stop();
        // The outbox finishes the attempt in flight meanwhile (bounded below).
        let _ = stop_outbox.send(true);
        // The requesters' queries end first, each with its record: the listeners stop
        // accepting, each open query is cut (its bytes so far counted), and one still opening
        // stops there. One that does not end within the bound is dropped, and records that.
        let _ = stop_queries.send(true);
        query.registry.stop_queries();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while services_set.join_next().await.is_some() {}
        })
        .await;
        services_set.shutdown().await;
        listeners.shutdown().await;
        for endpoint in &endpoints {
            endpoint.close(codes::SHUTDOWN, b"");
        }
        // Let each session write its `session_lost` record, within a bound.
        let drained = tokio::time::timeout(Duration::from_secs(2), async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            connections.shutdown().await;
        }
        if tokio::time::timeout(outbox::WIND_DOWN + OUTBOX_RECORD, outbox_task.join_next())
            .await
            .is_err()
        {
            tracing::warn!("the webhook outbox did not stop in time; an attempt it was recording is sent again after the restart");
            outbox_task.shutdown().await;
        }
        let idle = async {
            for endpoint in &endpoints {
                endpoint.wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), idle).await;
        drop(shared);
        drop(endpoints);
        shards.stop().await;
        drop(held);
        audit.record_shed("stopping");
        let mut r = audit.record(Event::Stopped);
        if let Some(shard) = lost {
            r.reason = Some(HubError::ShardLost { shard }.to_string());
        }
        audit.emit(r);
        audit.flush_async().await;
        drop(run_lock);
        match lost {
            Some(shard) => Err(HubError::ShardLost { shard }),
            None => Ok(()),
        }
    }
}

/// The services to each Client, with the allow-list entry each names.
fn service_routes(services: &[ServiceConfig]) -> session::ServiceRoutes {
    let mut routes = session::ServiceRoutes::new();
    for svc in services {
        routes
            .entry(svc.client.clone())
            .or_default()
            .push((svc.name.clone(), svc.destination.as_str().to_owned()));
    }
    routes
}

/// Shards when `threads` is not set: one per core.
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(transport::shard::MAX_SHARDS)
}

/// Where `ewii-hub` keeps its state by default.
pub fn default_state_dir() -> &'static Path {
    Path::new("/var/lib/ewii-hub")
}

#[cfg(test)]
mod tests {
    use ewii_common::audit::Side;

    use super::*;
    use crate::audit::AuditOutput;

    /// A Hub bound on a free loopback port with `threads` shards, its state in `dir`, and
    /// its audit.
    async fn bound(dir: &tempfile::TempDir, threads: usize) -> (Hub, Audit) {
        let state = dir.path().join("hub");
        admin::init(&state, "test.ewii.local").unwrap();
        let config: HubConfig = format!(
            "state_dir = {state:?}\nlisten = \"127.0.0.1:0\"\naudit = \"discard\"\nthreads = {threads}\n"
        )
        .parse()
        .unwrap();
        let audit = Audit::open_with_tap(Side::Hub, &AuditOutput::Discard).unwrap();
        (Hub::bind(config, audit.clone()).await.unwrap(), audit)
    }

    /// A handle kept after its Hub stopped does not hold the Hub's UDP port: another Hub can
    /// bind it as soon as the run has returned (its shards' threads are joined by then, and the
    /// endpoints' last owners gone; a dropped or cancelled Hub drops the same guard).
    #[tokio::test]
    async fn a_handle_kept_after_its_hub_does_not_hold_the_port() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, _) = bound(&dir, 2).await;
        let (addr, handle) = (hub.local_addr(), hub.handle());
        hub.run(std::future::ready(())).await.unwrap();
        assert!(
            std::net::UdpSocket::bind(addr).is_ok(),
            "{addr} still bound while a handle lives"
        );
        assert_eq!(handle.quic_connections(), 0);
    }

    /// A shard whose endpoint stops (its socket failed) stops the Hub with an error and a
    /// `stopped` record that says why, instead of losing that shard's Clients in silence.
    #[tokio::test]
    async fn a_lost_shard_stops_the_hub_and_says_which() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, audit) = bound(&dir, 3).await;
        assert_eq!(hub.endpoints.len(), 3);
        hub.endpoints[1].close(codes::SHUTDOWN, b"");
        let ran = tokio::time::timeout(Duration::from_secs(10), hub.run(std::future::pending()))
            .await
            .expect("the Hub stops by itself");
        assert!(
            matches!(ran, Err(HubError::ShardLost { shard: 1 })),
            "{ran:?}"
        );
        let stopped = audit
            .records()
            .into_iter()
            .find(|r| r.event == Event::Stopped)
            .expect("a stopped record");
        assert!(
            stopped
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("shard 1")),
            "{stopped:?}"
        );
    }
}
