//! One QUIC connection to the Hub, owned by one task: it serves the query streams the Hub
//! opens, reads the control stream, and obeys the driver's commands (send `Renew` and
//! `Rotated`, say `Goodbye`, close). It reports what it saw as [`Event`]s and writes its own
//! `session_lost` audit record when it ends. When its last query has ended and no other
//! started for [`QUIET`], it hands its endpoint's receive buffer back to the kernel. So it does
//! when queries stay open but the data has stopped ([`HeldQuiet`]: a pooled database
//! connection after a large result), and it tells the heap thread so.
//!
//! A rotation through the Hub does not change the connection: the driver sends `Rotated` once
//! the renewed SVID is stored, and the Hub re-binds the session to it. Nor does an SVID pushed
//! by a SPIFFE Workload API, as a rule: the connection presents it ([`Command::Present`]: the
//! chain, and the new key's signature over this connection's TLS exporter output), and the
//! Hub re-binds the session to it. Only when the Hub does not take it does the driver dial a
//! new connection with it and then retire this one ([`Command::Retire`]).
//!
//! Retiring is `Goodbye` without a revoke, after which the connection still serves every query
//! the Hub opened before it read the `Goodbye` (the Hub acknowledges by finishing its side of
//! the control stream, and opens nothing here after that); it closes once those are done, a
//! moment after the acknowledgement (a query stream opened just before it may arrive just
//! after it), and at the latest after [`RETIRE_DRAIN`].

use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{Event as AuditEvent, SessionEnd};
use ewii_common::frame::Control;
use ewii_common::session::CloseReason;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::connect::Opened;
use super::driver::sleep_until_opt;
use super::query::{self, QueryCtx, Taking};
use super::rotation::Identity;
use crate::transport::codes;
use crate::transport::control::{ControlOut, OutError};

/// What the driver tells a connection.
#[derive(Debug)]
pub(crate) enum Command {
    /// Send `Renew` with this CSR.
    Renew(Vec<u8>),
    /// Tell the Hub the renewed SVID with this serial is stored and in use.
    Rotated(String),
    /// Present this SVID (delivered by the Workload API) with a proof of its key.
    Present(Arc<Identity>),
    /// Say `Goodbye`, take no new query, report [`Event::Drained`] when none is left and the
    /// Hub has acknowledged the `Goodbye`.
    Goodbye {
        /// Ask the Hub to revoke this identity.
        revoke: bool,
    },
    /// The session moved to a newer connection: say `Goodbye` without a revoke, serve what
    /// the Hub already sent, then close (nothing is reported but the end).
    Retire,
    /// Close now.
    Close(CloseReason),
}

/// What a connection reports to the driver, with its session id.
#[derive(Debug)]
pub(crate) enum Event {
    /// A control message the driver decides on (`Renewed`, `Refused`, `BundleUpdate`,
    /// `Presented`), and the connection it came on.
    Control(u64, Control),
    /// The proof for a `Present` on this connection could not be made (nothing was sent).
    PresentFailed(u64, String),
    /// The Hub has processed the `Goodbye` of a stop (a revoke it asked for is recorded);
    /// queries may still be running.
    GoodbyeAcknowledged(u64),
    /// No query is left after `Goodbye`, and the Hub has processed it.
    Drained(u64),
    /// The connection is over.
    Ended(u64, End),
    /// The driver's own: the key of a new renewal is kept in the state directory (or could
    /// not be: `kept`), and `csr` may go out.
    RenewKeyKept {
        /// The `Renew`'s CSR.
        csr: Vec<u8>,
        /// Whether the key file was written.
        kept: Result<(), String>,
    },
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// The Hub closed it with `REVOKED`, or said `Revoked` on the control stream: its reason,
    /// bounded, escaped and marked when it reads as the Client's own ([`End::revoked`]).
    Revoked(String),
    /// Anything else.
    Lost(Lost),
}

impl End {
    /// A revocation with the Hub's `reason`, as this Client records it.
    fn revoked(reason: &[u8]) -> Self {
        Self::Revoked(super::driver::from_the_hub(ewii_common::text::from_peer(
            reason,
        )))
    }
}

/// Why a connection was lost. The audit `reason` is rendered from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Lost {
    /// Closed by the driver.
    #[error("{}", close_text(*.0))]
    Closed(CloseReason),
    /// Stopped locally after `Goodbye`.
    #[error("the Client stopped")]
    Stopped,
    /// Retired after the session moved to a newer connection (a new SVID).
    #[error("moved to a newer connection (a new SVID)")]
    Moved,
    /// No packet from the Hub within the idle timeout.
    #[error("idle timeout: the Hub went silent")]
    IdleTimeout,
    /// The Hub closed the connection with this application code.
    #[error("closed by the Hub ({})", hub_code(*.0))]
    ClosedByHub(u64),
    /// The Hub closed the control stream, or broke the protocol on it.
    #[error("control stream: {0}")]
    Control(String),
    /// Any other connection error (reset, transport error).
    #[error("{0}")]
    Connection(String),
}

impl Lost {
    /// The documented code for this end (docs/audit.md).
    pub fn session_end(&self) -> SessionEnd {
        match self {
            Self::Closed(CloseReason::SvidExpired) => SessionEnd::SvidExpired,
            Self::Closed(CloseReason::Protocol) | Self::Control(_) => SessionEnd::Protocol,
            Self::Closed(_) => SessionEnd::Stopped,
            Self::Stopped | Self::Moved => SessionEnd::Goodbye,
            Self::IdleTimeout => SessionEnd::IdleTimeout,
            Self::ClosedByHub(code) if *code == codes::SHUTDOWN.into_inner() => {
                SessionEnd::HubShutdown
            }
            Self::ClosedByHub(code) if *code == codes::PROTOCOL.into_inner() => {
                SessionEnd::Protocol
            }
            Self::ClosedByHub(code) if *code == codes::UNTRUSTED.into_inner() => {
                SessionEnd::Untrusted
            }
            Self::ClosedByHub(_) => SessionEnd::ClosedByPeer,
            Self::Connection(_) => SessionEnd::ConnectionLost,
        }
    }
}

pub(crate) fn hub_code(code: u64) -> String {
    let name = match code {
        0 => "done",
        1 => "aborted",
        2 => "protocol",
        3 => "revoked",
        4 => "shutting down or restarting",
        5 => "refused",
        6 => "its SVID's CA is no longer trusted",
        _ => "unknown code",
    };
    format!("{name}, code {code}")
}

fn close_text(reason: CloseReason) -> &'static str {
    match reason {
        CloseReason::SvidExpired => "SVID expired",
        CloseReason::StopDeadline => "stop drain time over",
        CloseReason::Protocol => "protocol violation by the Hub",
    }
}

/// A connection's `session_lost` record: written by [`end`](Self::end), or, when the task
/// that holds it is dropped first (the driver's stop aborts what still runs after its
/// wind-down), on drop, as the Client's stop: never lost.
struct LostRecord {
    audit: crate::audit::Audit,
    record: Option<ewii_common::audit::AuditRecord>,
    started: Instant,
}

impl LostRecord {
    fn new(
        audit: &crate::audit::Audit,
        client: &str,
        id: u64,
        hub: std::net::SocketAddr,
        started: Instant,
    ) -> Self {
        let mut r = audit.record(AuditEvent::SessionLost);
        r.session_id = Some(id);
        r.client = Some(client.to_owned());
        r.peer = Some(hub.to_string());
        r.reason =
            Some(SessionEnd::Stopped.reason("the Client's stop ended before this connection did"));
        Self {
            audit: audit.clone(),
            record: Some(r),
            started,
        }
    }

    /// Writes the record with `reason`.
    fn end(mut self, reason: String) {
        if let Some(r) = self.record.as_mut() {
            r.reason = Some(reason);
        }
    }
}

impl Drop for LostRecord {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.time = crate::now_timestamp();
            r.duration_ms = Some(self.started.elapsed().as_millis() as u64);
            self.audit.emit(r);
        }
    }
}

/// How long the queries of an ended connection get to write their own records.
const QUERY_WIND_DOWN: Duration = Duration::from_secs(1);

/// How many `BundleUpdate`s the Hub may push in one [`BUNDLE_WINDOW`]. A Hub pushes one at
/// each step of a CA rotation; each is checked and stored with an fsync, so a flood would
/// queue faster than it is stored: past this many, it is a protocol violation.
const BUNDLE_UPDATES: u32 = 8;
const BUNDLE_WINDOW: Duration = Duration::from_secs(60);
/// Why a connection ends when the Hub answers more than it was asked on it.
const UNASKED: &str = "an answer from the Hub to nothing asked on this connection";
/// How long a retired connection may finish its queries (the Hub allows 10 s after Goodbye).
pub(crate) const RETIRE_DRAIN: Duration = Duration::from_secs(15);
/// After the Hub acknowledged a retiring `Goodbye`, how long a query stream it opened just
/// before may still arrive (in round trips; at least [`RETIRE_LINGER_MIN`]).
const RETIRE_LINGER_RTTS: u32 = 2;
const RETIRE_LINGER_MIN: Duration = Duration::from_millis(20);
/// How long the connection waits, after its last query ended, before it hands the pages of
/// the endpoint's receive buffer back (`quinn::Endpoint::release_receive_buffer`, an Ewii
/// patch, third_party/README.md: a bulk transfer leaves ~1.4 MB of it resident). The heap's
/// release waits about as long (`enforce::heap::QUIET_TICK`).
const QUIET: Duration = Duration::from_millis(250);
/// While queries are open, how often the connection reads how many bytes it has moved.
const HELD_CHECK: Duration = Duration::from_secs(1);
/// Fewer bytes than this, received and sent, over one [`HELD_CHECK`] is quiet: keep-alives and
/// their acknowledgements, or a few small queries, stay far below it.
const HELD_QUIET_BYTES: u64 = 64 * 1024;

/// Whether the queries held open have gone quiet after moving data: fed the connection's count
/// of UDP bytes moved at each [`HELD_CHECK`].
#[derive(Debug, Default)]
struct HeldQuiet {
    last: u64,
    busy: bool,
}

impl HeldQuiet {
    /// Starts counting from `moved` (a query opened on a quiet connection).
    fn from(moved: u64) -> Self {
        Self {
            last: moved,
            busy: false,
        }
    }

    /// Takes the bytes moved so far; true once per busy spell, at the first quiet check after
    /// it.
    fn check(&mut self, moved: u64) -> bool {
        let spell = moved.saturating_sub(self.last);
        self.last = moved;
        if spell >= HELD_QUIET_BYTES {
            self.busy = true;
            false
        } else {
            std::mem::take(&mut self.busy)
        }
    }
}

/// Hands the pages of the endpoint's receive buffer back to the kernel, in place.
fn release_receive_pages(buf: &mut [u8]) {
    let bytes = crate::enforce::heap::discard_pages(buf);
    tracing::trace!(kib = bytes / 1024, "receive buffer handed back");
}

/// A query stream the Hub opened that is here already, without waiting for one.
fn stream_ready(
    conn: &quinn::Connection,
) -> Option<Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>> {
    let mut accept = std::pin::pin!(conn.accept_bi());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::future::Future::poll(accept.as_mut(), &mut cx) {
        std::task::Poll::Ready(stream) => Some(stream),
        std::task::Poll::Pending => None,
    }
}

/// UDP bytes the connection has received and sent.
fn moved(conn: &quinn::Connection) -> u64 {
    let stats = conn.stats();
    stats.udp_rx.bytes + stats.udp_tx.bytes
}

/// One connection and its queries.
#[derive(Debug)]
pub(crate) struct Connection {
    opened: Opened,
    ctx: Arc<QueryCtx>,
    started: Instant,
}

impl Connection {
    pub(crate) fn new(opened: Opened, ctx: Arc<QueryCtx>) -> Self {
        Self {
            opened,
            ctx,
            started: Instant::now(),
        }
    }

    /// Serves until the connection ends; reports to `events`, obeys `commands`.
    pub(crate) async fn run(
        self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        events: mpsc::UnboundedSender<Event>,
    ) {
        let Self {
            opened,
            ctx,
            started,
        } = self;
        let Opened {
            id,
            conn,
            endpoint,
            send,
            mut recv,
            mut reader,
        } = opened;
        // Frames queued here never wait for the Hub: one that stops reading cannot hold this
        // loop, and so a stop, behind a write.
        let out = ControlOut::spawn(send);
        let mut queries = JoinSet::new();
        let hub = conn.remote_address();
        let record = LostRecord::new(&ctx.audit, &ctx.client_id, id, hub, started);
        // Set once `Goodbye` is sent: no new query, and the end comes when none is left.
        let mut stopping = false;
        // The same, for the queries: each reads it once its `Open` is here.
        let taking = Taking::default();
        // The order the Hub opens its query streams in, kept as each dials its destination.
        let order = query::DialOrder::default();
        // The Hub has read and processed our `Goodbye`.
        let mut goodbye_read = false;
        // Until the connection can open no more streams (past `Goodbye` only).
        let mut accepting = true;
        // Set once retired: queries are still taken until the Hub acknowledged, and a moment
        // after; the end comes when none is left then, or at the deadline.
        let mut retiring: Option<Instant> = None;
        let mut linger_until: Option<Instant> = None;
        // Set when the last query ended: the moment to hand the receive buffer back.
        let mut quiet_at: Option<Instant> = None;
        // While queries are open: the next check of whether they went quiet.
        let mut held_check: Option<(Instant, HeldQuiet)> = None;
        let mut bundles = crate::transport::Window::new(BUNDLE_UPDATES, BUNDLE_WINDOW);
        // Answers the Hub owes on this connection: one per `Renew` and per `Present` sent.
        // An answer beyond them breaks the protocol and ends the connection here, before it
        // is queued for the driver: while the driver waits on the disk (a bundle or an SVID
        // being stored), a Hub could otherwise queue them at line rate.
        let mut owed: u32 = 0;
        let end = loop {
            if let Some(deadline) = retiring {
                if goodbye_read && queries.is_empty() {
                    let at = *linger_until.get_or_insert_with(|| {
                        Instant::now() + (conn.rtt() * RETIRE_LINGER_RTTS).max(RETIRE_LINGER_MIN)
                    });
                    if Instant::now() >= at {
                        conn.close(codes::DONE, b"");
                        break End::Lost(Lost::Moved);
                    }
                }
                if Instant::now() >= deadline {
                    conn.close(codes::DONE, b"");
                    break End::Lost(Lost::Moved);
                }
            }
            // Done once no query is left and the Hub has processed the `Goodbye` (it finishes
            // its side of the control stream then): closing earlier could discard it. The
            // session machine bounds the wait.
            if stopping && queries.is_empty() && goodbye_read {
                // A stream that came with the acknowledgement (the select below may have taken
                // the acknowledgement first) is answered before the close.
                if let Some(Ok(stream)) = stream_ready(&conn) {
                    queries.spawn(query::serve(
                        ctx.clone(),
                        id,
                        conn.clone(),
                        stream,
                        taking.clone(),
                        order.ticket(),
                    ));
                    continue;
                }
                let _ = events.send(Event::Drained(id));
                conn.close(codes::DONE, b"");
                break End::Lost(Lost::Stopped);
            }
            // Commands first: the driver queues what a new connection must do before it starts
            // (a `Goodbye` for one dialled only to deliver a revoke), and it is done before any
            // stream is taken. Then the Hub's control messages (a `Revoked`), then streams.
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(Command::Renew(csr)) => {
                        if let Err(e) = out.send(&Control::Renew { csr }) {
                            break unsent(&conn, &e);
                        }
                        owed = owed.saturating_add(1);
                    }
                    Some(Command::Rotated(serial)) => {
                        if let Err(e) = out.send(&Control::Rotated { serial }) {
                            break unsent(&conn, &e);
                        }
                    }
                    Some(Command::Present(identity)) => match present(&conn, identity).await {
                        Ok(msg) => {
                            if let Err(e) = out.send(&msg) {
                                break unsent(&conn, &e);
                            }
                            owed = owed.saturating_add(1);
                        }
                        Err(e) => {
                            let _ = events.send(Event::PresentFailed(id, e));
                        }
                    },
                    Some(Command::Goodbye { revoke }) => {
                        taking.stop();
                        let _ = out.send(&Control::Goodbye { revoke });
                        let _ = out.finish();
                        stopping = true;
                    }
                    Some(Command::Retire) => {
                        if retiring.is_none() && !stopping {
                            let _ = out.send(&Control::Goodbye { revoke: false });
                            let _ = out.finish();
                            retiring = Some(Instant::now() + RETIRE_DRAIN);
                        }
                    }
                    Some(Command::Close(reason)) => {
                        let code = match reason {
                            CloseReason::Protocol => codes::PROTOCOL,
                            _ => codes::DONE,
                        };
                        conn.close(code, b"");
                        break End::Lost(Lost::Closed(reason));
                    }
                    // The driver is gone: nothing will be served any more.
                    None => {
                        conn.close(codes::SHUTDOWN, b"");
                        break End::Lost(Lost::Stopped);
                    }
                },
                // Past `Goodbye`, the end is the Hub's answer or the session machine's bound.
                e = out.failed(), if !stopping && retiring.is_none() => break ended_by(&conn, &e),
                msg = reader.read::<Control>(&mut recv), if !goodbye_read => match msg {
                    Ok(None) if stopping || retiring.is_some() => {
                        goodbye_read = true;
                        if stopping {
                            let _ = events.send(Event::GoodbyeAcknowledged(id));
                        }
                    }
                    Ok(Some(Control::Revoked { reason })) => break End::revoked(reason.as_bytes()),
                    Ok(Some(Control::BundleUpdate { .. })) if !bundles.admit(Instant::now()) => {
                        conn.close(codes::PROTOCOL, b"");
                        break End::Lost(Lost::Control(format!(
                            "more than {BUNDLE_UPDATES} bundle updates within {} s",
                            BUNDLE_WINDOW.as_secs()
                        )));
                    }
                    Ok(Some(Control::Renewed { .. } | Control::Refused { .. } | Control::Presented { .. })) if owed == 0 => {
                        conn.close(codes::PROTOCOL, b"");
                        break End::Lost(Lost::Control(UNASKED.into()));
                    }
                    Ok(Some(msg @ (Control::Renewed { .. } | Control::Refused { .. } | Control::Presented { .. }))) => {
                        owed -= 1;
                        let _ = events.send(Event::Control(id, msg));
                    }
                    Ok(Some(msg @ Control::BundleUpdate { .. })) => {
                        let _ = events.send(Event::Control(id, msg));
                    }
                    Ok(Some(_)) => {
                        conn.close(codes::PROTOCOL, b"");
                        break End::Lost(Lost::Control("unexpected control message".into()));
                    }
                    Ok(None) => {
                        conn.close(codes::PROTOCOL, b"");
                        break End::Lost(Lost::Control("the Hub closed the control stream".into()));
                    }
                    Err(e) => break ended_by(&conn, &e),
                },
                // Also past `Goodbye`: a stream the Hub opened before it read that is answered
                // (`ShuttingDown`) and recorded, not left to fail at the close.
                stream = conn.accept_bi(), if accepting => match stream {
                    Ok(stream) => {
                        quiet_at = None;
                        if held_check.is_none() {
                            held_check = Some((Instant::now() + HELD_CHECK, HeldQuiet::from(moved(&conn))));
                        }
                        queries.spawn(query::serve(ctx.clone(), id, conn.clone(), stream, taking.clone(), order.ticket()));
                    }
                    // Past `Goodbye` the end comes as it did before: drained, or the control
                    // stream's error.
                    Err(_) if stopping => accepting = false,
                    Err(e) => break closed(&e),
                },
                Some(_) = queries.join_next(), if !queries.is_empty() => {
                    // A query that ended makes room for the linger to start again.
                    linger_until = None;
                    if queries.is_empty() {
                        quiet_at = Some(Instant::now() + QUIET);
                        held_check = None;
                    }
                }
                () = sleep_until_opt(retiring.map(|d| linger_until.map_or(d, |l| l.min(d)))) => {}
                () = sleep_until_opt(quiet_at) => {
                    quiet_at = None;
                    endpoint.release_receive_buffer(release_receive_pages);
                }
                () = sleep_until_opt(held_check.as_ref().map(|(at, _)| *at)) => {
                    if let Some((at, watch)) = held_check.as_mut() {
                        *at = Instant::now() + HELD_CHECK;
                        if watch.check(moved(&conn)) {
                            endpoint.release_receive_buffer(release_receive_pages);
                            ctx.audit.metrics().count_quiet_spell();
                        }
                    }
                }
            }
        };
        // Closed on every way out: the writer task holds the connection while a write waits for
        // the Hub. (Only while open: a close would replace the reason the queries read.)
        if conn.close_reason().is_none() {
            conn.close(codes::DONE, b"");
        }
        // The connection is gone: its queries' streams fail at once, so each ends and writes
        // its record; one still stuck after the bound is dropped, and writes it then.
        let _ = tokio::time::timeout(QUERY_WIND_DOWN, async {
            while queries.join_next().await.is_some() {}
        })
        .await;
        queries.abort_all();
        while queries.join_next().await.is_some() {}
        record.end(match &end {
            End::Revoked(reason) => SessionEnd::Revoked.reason(reason),
            End::Lost(lost) => lost.session_end().reason(&lost.to_string()),
        });
        let _ = events.send(Event::Ended(id, end));
    }
}

/// `Present` for `identity` on `conn`: the chain, and the new key's signature over this
/// connection's exporter output (made off the async workers: an RSA key takes milliseconds).
async fn present(conn: &quinn::Connection, identity: Arc<Identity>) -> Result<Control, String> {
    use crate::identity::present;
    let mut exporter = [0u8; ewii_common::frame::PRESENT_EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, present::PRESENT_EXPORTER_LABEL, b"")
        .map_err(|_| "the connection exports no keying material".to_owned())?;
    let chain = identity.svid.chain.iter().map(|c| c.to_vec()).collect();
    let (scheme, proof) =
        tokio::task::spawn_blocking(move || present::sign(&identity.svid, &exporter))
            .await
            .map_err(|e| e.to_string())??;
    Ok(Control::Present {
        chain,
        scheme,
        proof,
    })
}

/// A frame the Hub did not take: one that leaves [`crate::transport::control::ROOM`] frames unread is
/// not reading its control stream, and the connection is closed as a protocol violation.
fn unsent(conn: &quinn::Connection, e: &OutError) -> End {
    if let OutError::Unread = e {
        conn.close(codes::PROTOCOL, b"");
        return End::Lost(Lost::Control(format!(
            "the Hub does not read its control stream: {e}"
        )));
    }
    ended_by(conn, e)
}

/// A control-stream error: the connection's own close reason says more. While it is open, the
/// Hub broke the stream (a bad frame, a reset): it is closed as a protocol violation.
fn ended_by(conn: &quinn::Connection, e: &dyn std::fmt::Display) -> End {
    match conn.close_reason() {
        Some(reason) => closed(&reason),
        None => {
            conn.close(codes::PROTOCOL, b"");
            End::Lost(Lost::Control(e.to_string()))
        }
    }
}

fn closed(e: &quinn::ConnectionError) -> End {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) if close.error_code == codes::REVOKED => {
            End::revoked(&close.reason)
        }
        quinn::ConnectionError::ApplicationClosed(close) => {
            End::Lost(Lost::ClosedByHub(close.error_code.into_inner()))
        }
        quinn::ConnectionError::TimedOut => End::Lost(Lost::IdleTimeout),
        // Its text can carry the Hub's close reason.
        other => End::Lost(Lost::Connection(ewii_common::text::from_peer(
            other.to_string().as_bytes(),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn p11_a_connection_task_aborted_before_its_end_still_writes_its_session_lost() {
        use crate::audit::{Audit, AuditOutput};
        let audit =
            Audit::open_with_tap(ewii_common::audit::Side::Client, &AuditOutput::Discard).unwrap();
        let hub: std::net::SocketAddr = "192.0.2.1:443".parse().unwrap();
        let lost = |audit: &Audit| {
            audit
                .records()
                .into_iter()
                .filter(|r| r.event == AuditEvent::SessionLost)
                .collect::<Vec<_>>()
        };
        // Ended: the reason given.
        LostRecord::new(&audit, "spiffe://t/client/a", 1, hub, Instant::now())
            .end(SessionEnd::IdleTimeout.reason("no packet for 30 s"));
        // Aborted while it waits: the stop's reason.
        let record = LostRecord::new(&audit, "spiffe://t/client/a", 2, hub, Instant::now());
        let task = tokio::spawn(async move {
            let _record = record;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        let records = lost(&audit);
        assert_eq!(records.len(), 2, "{records:#?}");
        assert_eq!(records[0].session_id, Some(1));
        assert!(records[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("idle_timeout: ")));
        assert_eq!(records[1].session_id, Some(2));
        assert_eq!(records[1].peer.as_deref(), Some("192.0.2.1:443"));
        assert!(records[1]
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("stopped: ")));
    }

    #[test]
    fn held_queries_go_quiet_once_per_busy_spell() {
        let mut w = HeldQuiet::from(1_000);
        // Keep-alives only: never busy, never a release.
        assert!(!w.check(1_200));
        assert!(!w.check(1_400));
        // A large result, over two checks, then quiet: one release.
        assert!(!w.check(1_400 + 10 * HELD_QUIET_BYTES));
        assert!(!w.check(1_400 + 20 * HELD_QUIET_BYTES));
        assert!(w.check(1_500 + 20 * HELD_QUIET_BYTES));
        assert!(!w.check(1_600 + 20 * HELD_QUIET_BYTES));
        // Just under the bound is quiet; at it, busy again.
        let now = 1_600 + 20 * HELD_QUIET_BYTES;
        assert!(!w.check(now + HELD_QUIET_BYTES - 1));
        assert!(!w.check(now + 2 * HELD_QUIET_BYTES - 1));
        let now = now + 3 * HELD_QUIET_BYTES - 1;
        assert!(!w.check(now));
        assert!(w.check(now));
    }

    #[test]
    fn p4_a_hub_flooding_bundle_updates_is_cut_at_the_bound_and_a_rotation_is_not() {
        let mut rate = crate::transport::Window::new(BUNDLE_UPDATES, BUNDLE_WINDOW);
        let t0 = Instant::now();
        for i in 0..BUNDLE_UPDATES {
            assert!(rate.admit(t0), "update {i} of a window");
        }
        assert!(!rate.admit(t0 + Duration::from_secs(59)));
        // A new window: a rotation's prepare, activate and retire, minutes apart.
        let mut rate = crate::transport::Window::new(BUNDLE_UPDATES, BUNDLE_WINDOW);
        for minute in 0..3 {
            assert!(rate.admit(t0 + Duration::from_secs(60 * minute)));
        }
        assert!(rate.admit(t0 + BUNDLE_WINDOW * 10));
    }
}
