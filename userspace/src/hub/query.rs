//! Service listeners: each accepted TCP (or TLS) connection becomes one query — a Hub-opened
//! stream to the configured Client, headed by `Open{query_id, destination, source}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{Destination, Event, Outcome};
use ewii_common::frame::{QueryHead, QueryId};
use ewii_common::spiffe::Role;
use rand::RngCore;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::Inner;
use crate::config::{ServiceConfig, ServiceMode};
use crate::identity::inspect_leaf;
use crate::transport::pipe::{pipe, TcpLike};
use crate::transport::{self, FrameReader};

/// How long the Client may take to answer `Open` (it dials the destination meanwhile).
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a requester may take to finish its TLS handshake.
const TLS_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts requesters on one service listener until the task is aborted.
pub(super) async fn serve(inner: Arc<Inner>, svc: ServiceConfig, listener: TcpListener) {
    let svc = Arc::new(svc);
    let mut queries = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // The acceptor is fetched per connection: a CA rotation replaces it.
                    let tls = matches!(svc.mode, ServiceMode::Tls).then(|| inner.service_tls());
                    queries.spawn(query(inner.clone(), svc.clone(), tcp, peer, tls));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(service = %svc.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = queries.join_next() => {}
        }
    }
}

async fn query(
    inner: Arc<Inner>,
    svc: Arc<ServiceConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let _ = tcp.set_nodelay(true);
    match tls {
        None => {
            let ServiceMode::Tcp { principal } = &svc.mode else {
                return;
            };
            let source = format!("{principal}@{peer}");
            forward(&inner, &svc, tcp, peer, source).await;
        }
        Some(acceptor) => {
            let stream = match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    audit_query(
                        &inner,
                        &svc,
                        None,
                        peer,
                        None,
                        Outcome::Refused,
                        format!("requester TLS: {e}"),
                        None,
                    );
                    return;
                }
                Err(_) => {
                    audit_query(
                        &inner,
                        &svc,
                        None,
                        peer,
                        None,
                        Outcome::Refused,
                        "requester TLS handshake timed out".into(),
                        None,
                    );
                    return;
                }
            };
            // The verifier accepted only `/workload/<name>` SVIDs of our trust domain.
            let source = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| inspect_leaf(c).ok())
                .filter(|l| matches!(l.id.role(), Role::Workload(_)))
                .map(|l| l.id.to_string());
            match source {
                Some(source) => forward(&inner, &svc, stream, peer, source).await,
                None => audit_query(
                    &inner,
                    &svc,
                    None,
                    peer,
                    None,
                    Outcome::Refused,
                    "requester presented no workload SVID".into(),
                    None,
                ),
            }
        }
    }
}

async fn forward<S: TcpLike>(
    inner: &Inner,
    svc: &ServiceConfig,
    io: S,
    peer: SocketAddr,
    source: String,
) {
    let started = tokio::time::Instant::now();
    let query_id =
        QueryId(u128::from(rand::rng().next_u64()) << 64 | u128::from(rand::rng().next_u64()));
    let Some(session) = inner.session_for(&svc.client) else {
        audit_query(
            inner,
            svc,
            Some((query_id, None)),
            peer,
            Some(source),
            Outcome::Failed,
            format!("client {} is not connected", svc.client),
            None,
        );
        io.abort();
        return;
    };
    let ctx = Some((query_id, Some(&session)));
    let (mut send, mut recv) = match session.conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            audit_query(
                inner,
                svc,
                ctx,
                peer,
                Some(source),
                Outcome::Failed,
                format!("open stream: {e}"),
                None,
            );
            io.abort();
            return;
        }
    };
    let open = QueryHead::Open {
        query_id,
        destination: svc.destination.to_string(),
        source: source.clone(),
    };
    if let Err(e) = transport::write_frame(&mut send, &open).await {
        audit_query(
            inner,
            svc,
            ctx,
            peer,
            Some(source),
            Outcome::Failed,
            format!("send Open: {e}"),
            None,
        );
        io.abort();
        return;
    }
    let mut reader = FrameReader::new();
    let head = tokio::time::timeout(OPEN_TIMEOUT, reader.read::<QueryHead>(&mut recv)).await;
    match head {
        Ok(Ok(Some(QueryHead::Opened))) => {
            let report = pipe(io, send, recv, reader.into_leftover()).await;
            let (outcome, reason) = match report.error {
                None => (Outcome::Ok, None),
                Some(e) => (Outcome::Failed, Some(e)),
            };
            let mut r = query_record(inner, svc, ctx, peer, Some(source), outcome, reason);
            r.bytes_up = Some(report.tcp_to_stream);
            r.bytes_down = Some(report.stream_to_tcp);
            r.duration_ms = Some(started.elapsed().as_millis() as u64);
            inner.audit.emit(r);
        }
        Ok(Ok(Some(QueryHead::Refused { code }))) => {
            audit_query(
                inner,
                svc,
                ctx,
                peer,
                Some(source),
                Outcome::Refused,
                format!("refused by the client: {code}"),
                Some(started),
            );
            io.abort();
        }
        other => {
            let reason = match other {
                Err(_) => "no answer to Open in time".to_string(),
                Ok(Err(e)) => format!("reading the answer to Open: {e}"),
                Ok(Ok(_)) => "unexpected answer to Open".to_string(),
            };
            let _ = send.reset(transport::codes::PROTOCOL);
            audit_query(
                inner,
                svc,
                ctx,
                peer,
                Some(source),
                Outcome::Failed,
                reason,
                Some(started),
            );
            io.abort();
        }
    }
}

type Ctx<'a> = Option<(QueryId, Option<&'a super::Session>)>;

fn query_record(
    inner: &Inner,
    svc: &ServiceConfig,
    ctx: Ctx<'_>,
    peer: SocketAddr,
    source: Option<String>,
    outcome: Outcome,
    reason: Option<String>,
) -> ewii_common::audit::AuditRecord {
    let mut r = inner.audit.record(Event::Query);
    if let Some((qid, session)) = ctx {
        r.query_id = Some(qid);
        if let Some(s) = session {
            r.session_id = Some(s.id);
            r.client = Some(s.spiffe_id.to_string());
        }
    }
    if r.client.is_none() {
        r.client = ewii_common::spiffe::SpiffeId::client(&inner.trust_domain, &svc.client)
            .ok()
            .map(|id| id.to_string());
    }
    r.source = source;
    r.destination = Some(Destination {
        name: svc.destination.to_string(),
        address: None,
    });
    r.peer = Some(peer.to_string());
    r.outcome = Some(outcome);
    r.reason = reason;
    r
}

#[allow(clippy::too_many_arguments)]
fn audit_query(
    inner: &Inner,
    svc: &ServiceConfig,
    ctx: Ctx<'_>,
    peer: SocketAddr,
    source: Option<String>,
    outcome: Outcome,
    reason: String,
    started: Option<tokio::time::Instant>,
) {
    let mut r = query_record(inner, svc, ctx, peer, source, outcome, Some(reason));
    r.duration_ms = started.map(|s| s.elapsed().as_millis() as u64);
    inner.audit.emit(r);
}
