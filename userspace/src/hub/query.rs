//! Service listeners: each accepted TCP (or TLS) connection becomes one query — a Hub-opened
//! stream to the configured Client, headed by `Open{query_id, destination, source}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{AuditRecord, Destination, Event, Outcome};
use ewii_common::frame::{QueryHead, QueryId, RefuseCode};
use ewii_common::spiffe::Role;
use rand::RngCore;
use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::task::JoinSet;

use super::registry::Registry;
use super::trust::Trust;
use crate::audit::{Audit, Source};
use crate::config::{ServiceConfig, ServiceMode};
use crate::identity::inspect_leaf;
use crate::transport;
use crate::transport::pipe::{pipe_until, PipeError, Start, TcpLike};

/// How long a query may wait for a stream (the Client's `max_queries` all in use), and then
/// for the Client's answer to `Open` (it dials the destination meanwhile; the requester's first
/// bytes are already on their way).
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause after a failed `accept` (EMFILE and the like), instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Queries in progress on one service listener (waiting for a slot, or piping) at most.
pub const MAX_QUERIES_PER_LISTENER: usize = 16_384;
/// How long a requester may take to finish its TLS handshake.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections a service listener's kernel queue holds before it accepts them (capped by
/// `net.core.somaxconn`, 4096 by default). tokio's `TcpListener::bind` asks for 128: a burst
/// of requesters larger than that (a connection pool opening at once) overflowed the queue,
/// and the kernel answered the rest with SYN cookies or dropped their handshakes.
pub(crate) const LISTEN_BACKLOG: u32 = 4096;

/// A service listener on `addr`: address reuse (a restarted Hub binds again at once while
/// old connections linger) and a queue of [`LISTEN_BACKLOG`].
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What a service listener needs from the rest of the Hub.
#[derive(Debug, Clone)]
pub(crate) struct Parts {
    pub(crate) registry: Arc<Registry>,
    pub(crate) trust: Arc<Trust>,
    pub(crate) audit: Audit,
    /// The shards' runtimes, in shard order.
    pub(crate) shards: Arc<[Handle]>,
    /// True once the Hub stops: listeners stop accepting, open queries are cut.
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
}

/// Resolves once the Hub stops (never, if the Hub is gone without saying so).
async fn hub_stopping(mut stopping: tokio::sync::watch::Receiver<bool>) {
    if stopping.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Serves one service listener until the task is aborted. Its accepts run on the shard of the
/// service's Client and follow that Client's connection when it moves to another shard: each
/// query then runs beside the connection it goes through, and none of its bytes crosses a
/// thread (a hand-off per query cost 5–10 % of the new-query rate: docs/benchmarks.md).
pub(crate) async fn serve(parts: Parts, svc: ServiceConfig, listener: TcpListener) {
    let svc = Arc::new(svc);
    // Kept here and registered nowhere: each shard's accept loop registers a duplicate.
    let listener = match listener.into_std() {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(service = %svc.name, error = %e, "the service listener failed; it accepts no more");
            return;
        }
    };
    let mut queries = JoinSet::new();
    let mut shard = parts.registry.shard(&svc.client).unwrap_or(0);
    loop {
        let duplicate = match listener.try_clone() {
            Ok(duplicate) => duplicate,
            Err(e) => {
                tracing::warn!(service = %svc.name, error = %e, "cannot hand the listener to a shard");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let accepting = accept(parts.clone(), svc.clone(), duplicate, queries, shard);
        // Aborted with this task (the Hub's shutdown), and the queries with it.
        let mut running = Aborting(parts.shards[shard].spawn(accepting));
        match (&mut running.0).await {
            Ok(Moved {
                queries: q,
                shard: s,
            }) if !*parts.stopping.borrow() => (queries, shard) = (q, s),
            // The Hub stops: its queries end with their records (they were told; the Hub
            // bounds the wait).
            Ok(Moved { mut queries, .. }) => {
                while queries.join_next().await.is_some() {}
                return;
            }
            Err(e) => {
                tracing::error!(service = %svc.name, error = %e, "the service listener failed; it accepts no more");
                return;
            }
        }
    }
}

/// A task's handle that aborts it when dropped.
struct Aborting<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Aborting<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why an accept loop ended: the service's Client is on `shard` now (or the listener could not
/// be registered here, and `shard` is this one again).
struct Moved {
    queries: JoinSet<()>,
    shard: usize,
}

/// Accepts requesters on shard `here` until the service's Client is found on another shard.
async fn accept(
    parts: Parts,
    svc: Arc<ServiceConfig>,
    listener: std::net::TcpListener,
    mut queries: JoinSet<()>,
    here: usize,
) -> Moved {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(service = %svc.name, error = %e, "cannot register the listener");
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            return Moved {
                queries,
                shard: here,
            };
        }
    };
    let stop = hub_stopping(parts.stopping.clone());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                // Bounded: beyond this many queries in progress on one listener, a requester
                // is closed at once (and audited) instead of waiting.
                // A requester can cause these at will: held to the audit's per-source burst
                // and summed up beyond it, like refused handshakes.
                Ok((tcp, peer)) if queries.len() >= MAX_QUERIES_PER_LISTENER => {
                    drop(tcp);
                    let mut log = QueryLog::new(&parts, &svc, peer);
                    if let ServiceMode::Tcp { principal } = &svc.mode {
                        log.source = Some(format!("{principal}@{peer}"));
                    }
                    // Load, not policy: `failed`, as a busy Client's answer is.
                    let r = log.record(
                        Outcome::Failed,
                        Some(format!("{MAX_QUERIES_PER_LISTENER} queries already in progress on this service")),
                    );
                    log.emit_from(Source::address(peer.ip()), r);
                }
                Ok((tcp, peer)) => {
                    // The acceptor is fetched per connection: a CA rotation replaces it.
                    let tls = matches!(svc.mode, ServiceMode::Tls { .. })
                        .then(|| parts.trust.service_tls());
                    let there = parts.registry.shard(&svc.client).unwrap_or(here);
                    if there == here {
                        queries.spawn(query(parts.clone(), svc.clone(), tcp, peer, tls));
                        continue;
                    }
                    // The Client's connection is on another shard: this requester's socket
                    // goes there, and so do the accepts after it.
                    match tcp.into_std() {
                        Ok(tcp) => {
                            let (parts, svc) = (parts.clone(), svc.clone());
                            let shard = parts.shards[there].clone();
                            queries.spawn_on(
                                async move {
                                    match TcpStream::from_std(tcp) {
                                        Ok(tcp) => query(parts, svc, tcp, peer, tls).await,
                                        Err(e) => QueryLog::new(&parts, &svc, peer)
                                            .emit(Outcome::Failed, format!("requester socket: {e}")),
                                    }
                                },
                                &shard,
                            );
                        }
                        Err(e) => QueryLog::new(&parts, &svc, peer)
                            .emit(Outcome::Failed, format!("requester socket: {e}")),
                    }
                    return Moved { queries, shard: there };
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(service = %svc.name, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = queries.join_next() => {}
            () = &mut stop => {
                // No more requesters; the open queries are cut by their own signals and end
                // with their records (the Hub bounds the wait).
                drop(listener);
                while queries.join_next().await.is_some() {}
                return Moved { queries, shard: here };
            }
        }
    }
}

async fn query(
    parts: Parts,
    svc: Arc<ServiceConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    // The audit sink lags too far behind: the requester is closed before anything happens
    // (counted, and summed up in one `audit_backlog` record once the sink catches up).
    if !parts.audit.admit_query() {
        tracing::debug!(%peer, service = %svc.name, "query refused: the audit sink lags");
        return;
    }
    transport::tune_tcp(&tcp);
    let mut log = QueryLog::new(&parts, &svc, peer);
    match tls {
        None => {
            let ServiceMode::Tcp { principal } = &svc.mode else {
                return;
            };
            log.source = Some(format!("{principal}@{peer}"));
            forward(log, tcp, std::future::pending()).await;
        }
        Some(acceptor) => {
            // Before the handshake: a CA that leaves the bundle while it runs is seen too.
            let left = parts.trust.anchors_left();
            // The Hub's stop ends a handshake at once (a slow caller cannot hold the stop).
            let accepted = tokio::select! {
                biased;
                () = stopped(&mut log.stop) => None,
                accepted = tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(tcp)) => Some(accepted),
            };
            let Some(accepted) = accepted else {
                return log.emit(Outcome::Failed, NOT_OPEN);
            };
            // Before a workload is proven, anyone who reaches the port can make these records
            // as fast as it connects: held to its address's burst, as refused QUIC handshakes
            // are, so that a stranger cannot fill the audit backlog and shed every service's
            // queries.
            let stranger = |log: &mut QueryLog<'_>, outcome, reason: String| {
                let r = log.record(outcome, Some(reason));
                log.emit_from(Source::address(peer.ip()), r);
            };
            // A caller TLS refused (no SVID, one the bundle does not vouch for) is policy; a
            // handshake the network or the caller broke off, or never finished, is not.
            let stream = match accepted {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return stranger(&mut log, Outcome::Refused, format!("requester TLS: {e}"));
                }
                Ok(Err(e)) => {
                    return stranger(&mut log, Outcome::Failed, format!("requester TLS: {e}"))
                }
                Err(_) => {
                    return stranger(
                        &mut log,
                        Outcome::Failed,
                        "requester TLS handshake timed out".into(),
                    )
                }
            };
            // The verifier accepted only `/workload/<name>` SVIDs of our trust domain; this
            // service takes only the ones it lists.
            let ServiceMode::Tls { workloads } = &svc.mode else {
                return;
            };
            let caller = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| inspect_leaf(c).ok());
            let name = caller.as_ref().and_then(|l| match l.id.role() {
                Role::Workload(name) => Some(name.to_owned()),
                _ => None,
            });
            log.source = caller.filter(|_| name.is_some()).map(|l| l.id.to_string());
            let chain: Vec<CertificateDer<'static>> = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(<[_]>::to_vec)
                .unwrap_or_default();
            match name {
                Some(name) if workloads.contains(&name) => {
                    let trust = Arc::clone(&parts.trust);
                    forward(log, stream, untrusted(trust, left, chain)).await;
                }
                Some(name) => {
                    let reason = format!(
                        "workload {name} is not allowed to call service {} (allowed: {})",
                        svc.name,
                        workloads.join(", ")
                    );
                    log.emit(Outcome::Refused, reason);
                }
                None => stranger(
                    &mut log,
                    Outcome::Refused,
                    "requester presented no workload SVID".into(),
                ),
            }
        }
    }
}

/// Resolves once the bundle no longer vouches for `chain`, a live requester's workload SVID (its
/// CA left the bundle: `ewii-hub ca retire --force`, a leaked key). Its query is then cut, as a
/// Client's session is (`untrusted`): what was proven at the handshake no longer holds.
async fn untrusted(
    trust: Arc<Trust>,
    mut left: tokio::sync::watch::Receiver<u64>,
    chain: Vec<CertificateDer<'static>>,
) -> PipeError {
    while left.changed().await.is_ok() {
        if let Err(why) = trust.vouches_for_workload(&chain) {
            return PipeError::Cut(format!(
                "untrusted: the bundle no longer vouches for the caller's SVID: {why}"
            ));
        }
    }
    // The Hub is going away: nothing more will change.
    std::future::pending().await
}

/// Opens a query on the client's current session and pipes `io` through it until it ends, or
/// until `cut` resolves.
async fn forward<S: TcpLike>(
    mut log: QueryLog<'_>,
    io: S,
    cut: impl std::future::Future<Output = PipeError>,
) {
    let query_id =
        QueryId(u128::from(rand::rng().next_u64()) << 64 | u128::from(rand::rng().next_u64()));
    log.query_id = Some(query_id);
    let Some(session) = log.parts.registry.route(&log.svc.client) else {
        let reason = format!("client {} is not connected", log.svc.client);
        log.emit(Outcome::Failed, reason);
        io.abort();
        return;
    };
    log.session = Some((session.id, session.spiffe_id.to_string()));
    // A stream needs the Client's credit: with all of its `max_queries` in use, a requester
    // waits for one to end — bounded, so that waiting requesters cannot pile up.
    // The stop first: once the Hub stops, no query opens.
    let opening = tokio::select! {
        biased;
        () = stopped(&mut log.stop) => None,
        opening = tokio::time::timeout(OPEN_TIMEOUT, session.conn.open_bi()) => Some(opening),
    };
    let Some(opening) = opening else {
        log.emit(Outcome::Failed, NOT_OPEN);
        io.abort();
        return;
    };
    let (mut send, recv) = match opening {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let e = transport::pipe::peer_said(&e);
            log.emit(Outcome::Failed, format!("open stream: {e}"));
            io.abort();
            return;
        }
        Err(_) => {
            let reason = format!(
                "no query slot on {} within {} s: all of its max_queries are in use",
                log.svc.client,
                OPEN_TIMEOUT.as_secs()
            );
            log.emit(Outcome::Failed, reason);
            io.abort();
            return;
        }
    };
    let open = QueryHead::Open {
        query_id,
        destination: log.svc.destination.to_string(),
        source: log.source.clone().unwrap_or_default(),
    };
    // Bounded like the stream's opening and its answer: a Client that grants no credit
    // cannot hold the requester (and its socket) here until its connection ends.
    let written = tokio::select! {
        biased;
        () = stopped(&mut log.stop) => None,
        written = tokio::time::timeout(OPEN_TIMEOUT, transport::write_frame(&mut send, &open)) => {
            Some(written)
        }
    };
    let Some(written) = written else {
        let _ = send.reset(transport::codes::ABORTED);
        log.emit(Outcome::Failed, NOT_OPEN);
        io.abort();
        return;
    };
    match written {
        Ok(Ok(())) => log.open = true,
        Ok(Err(e)) => {
            let e = transport::pipe::peer_said(&e);
            log.emit(Outcome::Failed, format!("send Open: {e}"));
            io.abort();
            return;
        }
        Err(_) => {
            let _ = send.reset(transport::codes::ABORTED);
            log.emit(
                Outcome::Failed,
                format!(
                    "send Open: the Client took none of it within {} s",
                    OPEN_TIMEOUT.as_secs()
                ),
            );
            io.abort();
            return;
        }
    }
    // The Hub's stop ends the query too, with what it moved so far on record.
    let stop = &mut log.stop;
    let cut = async move {
        tokio::select! {
            e = cut => e,
            () = stopped(stop) => PipeError::Ended("the Hub stopped".into()),
        }
    };
    // So does the end of the Client's connection (a pipe whose requester is idle would not
    // notice it, and hold the requester until it acts), once what the Client sent before it
    // reached the requester: within the bound a finished query waits for its last bytes.
    let conn = session.conn.clone();
    let ended = async move {
        let closed = conn.closed().await;
        PipeError::Ended(format!(
            "the Client's connection ended: {}",
            transport::pipe::peer_said(&closed)
        ))
    };
    let drain = transport::pipe::FINISH_WAIT;
    // The requester's bytes follow `Open` at once; nothing goes back before `Opened`.
    let start = Start::AwaitAnswer(OPEN_TIMEOUT);
    let report = pipe_until(io, send, recv, start, cut, ended, drain).await;
    let (outcome, record_bytes) = match &report.error {
        None => (Outcome::Ok, true),
        // One vocabulary on both sides: `refused` is policy (not in the allow-list), `failed`
        // is the network or load (the destination did not answer or refused, the Client is
        // busy or stopping). A code no Client sends in answer to `Open` stays `refused`.
        Some(PipeError::Refused(
            RefuseCode::Unreachable | RefuseCode::Busy | RefuseCode::ShuttingDown,
        )) => (Outcome::Failed, false),
        Some(PipeError::Refused(_)) => (Outcome::Refused, false),
        Some(PipeError::NoAnswer(_)) => (Outcome::Failed, false),
        // Policy again: the caller is no longer trusted. What it moved until then is counted.
        Some(PipeError::Cut(_)) => (Outcome::Refused, true),
        // A reset after the other party's end: how the query ended, not a failure.
        Some(PipeError::TcpResetAfterEnd) => (Outcome::Ok, true),
        Some(_) => (Outcome::Failed, true),
    };
    let reason = report.error.as_ref().map(|e| match e {
        PipeError::TcpResetAfterEnd => "the requester reset its connection after the \
             destination's end reached it; passed on as the end of the stream"
            .into(),
        e => e.to_string(),
    });
    let mut r = log.record(outcome, reason);
    if record_bytes {
        r.bytes_up = Some(report.tcp_to_stream);
        r.bytes_down = Some(report.stream_to_tcp);
    }
    log.emit_record(r);
}

/// What the Hub knows about one query so far; every exit path writes its record from here.
struct QueryLog<'a> {
    parts: &'a Parts,
    svc: &'a ServiceConfig,
    peer: SocketAddr,
    started: tokio::time::Instant,
    started_at: ewii_common::time::Timestamp,
    source: Option<String>,
    query_id: Option<QueryId>,
    /// Session id and the Client's SPIFFE ID, once a session was found.
    session: Option<(u64, String)>,
    /// Whether its record was written: one that was not when it is dropped (the Hub stopped
    /// while the query opened, or its task failed) writes one then.
    written: bool,
    /// Whether the Client was sent its `Open` (for the record a drop writes).
    open: bool,
    /// Its key among the queries in progress ([`Registry::query_began`]).
    key: u64,
    /// Resolves when the Hub stops ([`stopped`]; `None` once it has).
    stop: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// The record of a query the Hub's stop ended before its `Open` was sent.
const NOT_OPEN: &str = "the Hub stopped before the query was open";

impl<'a> QueryLog<'a> {
    fn new(parts: &'a Parts, svc: &'a ServiceConfig, peer: SocketAddr) -> Self {
        let (key, stop) = parts.registry.query_began();
        Self {
            parts,
            svc,
            peer,
            started: tokio::time::Instant::now(),
            started_at: crate::now_timestamp(),
            source: None,
            query_id: None,
            session: None,
            written: false,
            open: false,
            key,
            stop: Some(stop),
        }
    }

    fn record(&self, outcome: Outcome, reason: Option<String>) -> AuditRecord {
        let mut r = self.parts.audit.record(Event::Query);
        r.query_id = self.query_id;
        r.session_id = self.session.as_ref().map(|(id, _)| *id);
        r.client = match &self.session {
            Some((_, client)) => Some(client.clone()),
            None => self.parts.trust.client_id(&self.svc.client),
        };
        r.source = self.source.clone();
        r.destination = Some(Destination {
            name: self.svc.destination.to_string(),
            address: None,
        });
        r.peer = Some(self.peer.to_string());
        r.outcome = Some(outcome);
        r.reason = reason;
        r.duration_ms = Some(self.started.elapsed().as_millis() as u64);
        r.started = Some(self.started_at);
        r
    }

    fn emit(&mut self, outcome: Outcome, reason: impl Into<String>) {
        self.emit_record(self.record(outcome, Some(reason.into())));
    }

    /// Writes `r`, this query's record.
    fn emit_record(&mut self, r: AuditRecord) {
        self.written = true;
        self.parts.audit.emit(r);
    }

    /// Writes `r`, this query's record, held to the audit's per-source burst.
    fn emit_from(&mut self, source: Source, r: AuditRecord) {
        self.written = true;
        self.parts.audit.emit_from(source, r);
    }
}

/// Resolves when the Hub stops (`stop` is then spent: taken, so never polled again).
async fn stopped(stop: &mut Option<tokio::sync::oneshot::Receiver<()>>) {
    match stop {
        Some(rx) => {
            let _ = rx.await;
            *stop = None;
        }
        None => std::future::pending().await,
    }
}

impl Drop for QueryLog<'_> {
    fn drop(&mut self) {
        // The record first: the gauge counts a query until it is recorded.
        self.record_if_unwritten();
        self.parts.registry.query_ended(self.key);
    }
}

impl QueryLog<'_> {
    /// The record of a query dropped before it wrote one.
    fn record_if_unwritten(&mut self) {
        if self.written {
            return;
        }
        let why = if !*self.parts.stopping.borrow() {
            "the query's task ended before it was recorded (a fault in the Hub)"
        } else if self.open {
            "the Hub stopped while the query was open; its byte counts were not taken"
        } else {
            NOT_OPEN
        };
        self.emit(Outcome::Failed, why);
    }
}
