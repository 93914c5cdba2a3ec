//! One query stream, as the Hub opened it: `Open` → the [`Dialer`] reaches the allow-listed
//! entry → `Opened` and the bytes are piped, or `Refused` (DESIGN §4). Every query leaves one
//! audit record (P11).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use ewii_common::audit::{Destination, Event, Outcome};
use ewii_common::frame::{QueryHead, RefuseCode};
use tokio::time::Instant;

use super::dialer::{DialError, Dialer};
use crate::audit::Audit;
use crate::transport::pipe::{pipe_until, PipeError, Start};
use crate::transport::{self, codes, FrameReader, StreamError};

/// How long the Hub has to send the `Open` header once it opened a stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a query waits for the queries opened before it to start their dials
/// ([`DialOrder`]): they do in microseconds once their `Open` is read.
const ORDER_WAIT: Duration = Duration::from_millis(100);
/// Places released ahead of a turn that does not move, before the turn passes the late ones.
const MAX_AHEAD: usize = 1024;
/// How long a stopping Client waits for the Hub to read its `ShuttingDown` answer.
const ANSWER_WAIT: Duration = Duration::from_secs(1);
/// How long an answer to the Hub (`Opened`, `Refused`) may wait for room to be written (QUIC
/// flow control). A Hub whose connection window is held by slow requesters grants it within
/// that; one that grants none does not hold the query, nor the destination's connection.
const ANSWER_BOUND: Duration = Duration::from_secs(10);

/// What a query needs from the Client: shared, read-only.
#[derive(Debug)]
pub(crate) struct QueryCtx {
    pub(crate) audit: Audit,
    pub(crate) dialer: Dialer,
    /// This Client's SPIFFE ID, for the audit records.
    pub(crate) client_id: String,
}

/// How a query ended, when it did not end well. The audit `reason` is rendered from it.
#[derive(Debug, thiserror::Error)]
enum QueryError {
    /// The destination could not be dialled (or is not in the allow-list).
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The Hub's stream broke before `Opened` could be sent.
    #[error("the Hub went away before Opened")]
    HubGone,
    /// The Hub gave no room for `Opened` (QUIC flow control) within [`ANSWER_BOUND`].
    #[error("the Hub gave no room for Opened within {} s", ANSWER_BOUND.as_secs())]
    NoRoom,
    /// The Client had said `Goodbye` (it is stopping) when the query came: answered
    /// `ShuttingDown`, nothing dialled.
    #[error("the Client is stopping: it takes no new query")]
    Stopping,
    /// The destination reset its connection after the requester's end had reached it: the
    /// query ended well ([`PipeError::TcpResetAfterEnd`]), and the Hub was sent the end of the
    /// stream.
    #[error("the destination reset its connection after the requester's end reached it; passed on as the end of the stream")]
    DestinationResetAfterEnd,
    /// The pipe broke.
    #[error(transparent)]
    Pipe(PipeError),
}

impl From<PipeError> for QueryError {
    fn from(e: PipeError) -> Self {
        match e {
            PipeError::TcpResetAfterEnd => Self::DestinationResetAfterEnd,
            e => Self::Pipe(e),
        }
    }
}

impl QueryError {
    fn outcome(&self) -> Outcome {
        match self {
            Self::Dial(DialError::NotAllowed(_)) => Outcome::Refused,
            Self::DestinationResetAfterEnd => Outcome::Ok,
            _ => Outcome::Failed,
        }
    }
}

/// Whether a connection's queries are served, or answered that the Client is stopping: one
/// flag per connection, set when it says `Goodbye`. A stream the Hub opened before it read that
/// is answered `ShuttingDown` (and recorded), so neither side is left guessing.
///
/// Read when a query's `Open` has arrived, not when its stream did: a Hub can open streams,
/// hold back their headers, and send them once it has read `Goodbye`. Those are new queries
/// too, and a stopping Client dials none.
#[derive(Debug, Clone, Default)]
pub(crate) struct Taking(Arc<AtomicBool>);

impl Taking {
    /// From now on, every query whose `Open` is read is answered `ShuttingDown`.
    pub(crate) fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn queries(&self) -> bool {
        !self.0.load(Ordering::Acquire)
    }
}

/// The order the Hub opened its query streams in, kept at the destination: a query starts its
/// dial only once every query opened before it on the connection has started its own (or
/// ended). Some clients tell their connections apart by the order they were made alone
/// (`iperf3 --bidir`'s two data connections carry the same cookie, and its server takes the
/// first it accepts to receive, the second to send); the queries' tasks, woken together, would
/// otherwise dial in whatever order the runtime runs them. For an entry written as an address,
/// or one resolved already, the dial's first step is its `connect`; a name still to be looked up
/// lets the next query go once its lookup has started. A query waits for those before it at
/// most [`ORDER_WAIT`]: one whose `Open` has not all arrived (a Hub that holds part of it back,
/// its packet lost on the way) does not hold the next ones longer.
#[derive(Debug, Clone, Default)]
pub(crate) struct DialOrder(Arc<std::sync::Mutex<OrderState>>);

#[derive(Debug, Default)]
struct OrderState {
    /// The next stream's place.
    next: u64,
    /// The lowest place not yet released: every one below it has started its dial, or ended.
    turn: u64,
    /// Places released above `turn`.
    released: std::collections::BTreeSet<u64>,
    /// The query waiting for each place's turn. Only the one whose place `turn` reaches is
    /// woken (those below it have all released theirs), so ten thousand queries opened at once
    /// cost one wake-up each, not one per release.
    waiting: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<()>>,
}

impl DialOrder {
    fn state(&self) -> std::sync::MutexGuard<'_, OrderState> {
        // Nothing is left half-done while it is held: a poisoned one is still right.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The place of the stream the connection takes now (called in the order it takes them).
    pub(crate) fn ticket(&self) -> Ticket {
        let mut state = self.state();
        let place = state.next;
        state.next += 1;
        Ticket {
            order: self.clone(),
            place,
            released: false,
        }
    }
}

/// A query's place in its connection's [`DialOrder`]; released when dropped, at the latest.
#[derive(Debug)]
pub(crate) struct Ticket {
    order: DialOrder,
    place: u64,
    released: bool,
}

impl Ticket {
    /// Until every query opened before this one has started its dial, or ended, or
    /// [`ORDER_WAIT`] has passed. Then the places still before it are passed: one query whose
    /// `Open` is late costs the next one wait, not one each.
    async fn turn(&self) {
        let woken = {
            let mut state = self.order.state();
            if state.turn >= self.place {
                return;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            state.waiting.insert(self.place, tx);
            rx
        };
        // A sender dropped unsent is a place whose query went away: the turn came all the same.
        if tokio::time::timeout(ORDER_WAIT, woken).await.is_err() {
            let mut state = self.order.state();
            state.waiting.remove(&self.place);
            state.pass_to(self.place);
        }
    }

    /// This query has started its dial, or will not dial: the next may start theirs.
    fn release(&mut self) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        let mut state = self.order.state();
        state.waiting.remove(&self.place);
        // A place the turn has passed already (its query was late) needs nothing more.
        if self.place >= state.turn {
            state.released.insert(self.place);
        }
        // Queries that end before their turn without waiting (a Hub's junk streams) behind
        // one that is late: passed, rather than kept without bound.
        if state.released.len() > MAX_AHEAD {
            if let Some(&lowest) = state.released.first() {
                state.pass_to(lowest);
            }
        }
        state.advance();
    }
}

impl OrderState {
    /// Moves the turn to `place`, as if every place before it had released: those left
    /// waiting go now, in any order.
    fn pass_to(&mut self, place: u64) {
        if self.turn >= place {
            return;
        }
        self.turn = place;
        self.released = self.released.split_off(&place);
        let passed: Vec<u64> = self
            .waiting
            .keys()
            .filter(|p| **p < place)
            .copied()
            .collect();
        for p in passed {
            if let Some(tx) = self.waiting.remove(&p) {
                let _ = tx.send(());
            }
        }
        self.advance();
    }

    /// Moves the turn past the places released, and wakes the query whose place it reaches.
    fn advance(&mut self) {
        while self.released.remove(&self.turn) {
            self.turn += 1;
        }
        if let Some(next) = self.waiting.remove(&self.turn) {
            let _ = next.send(());
        }
        if self.waiting.is_empty() && self.waiting.capacity() > 64 {
            self.waiting.shrink_to_fit();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release();
    }
}

/// Serves one query stream of session `session_id`, opened by the Hub at `hub`, at its place
/// `ticket` in the order the Hub opened them.
pub(crate) async fn serve(
    ctx: Arc<QueryCtx>,
    session_id: u64,
    conn: quinn::Connection,
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
    taking: Taking,
    mut ticket: Ticket,
) {
    let started = Instant::now();
    let started_at = crate::now_timestamp();
    let hub = conn.remote_address();
    let mut reader = FrameReader::query_head();
    let head = tokio::time::timeout(OPEN_TIMEOUT, reader.read::<QueryHead>(&mut recv)).await;
    let (query_id, destination, source) = match head {
        Ok(Ok(Some(QueryHead::Open {
            query_id,
            destination,
            source,
        }))) => (query_id, destination, source),
        // Anything else from the Hub is refused with a code, and audited: a hostile or broken
        // Hub leaves a trace, and the Client goes on.
        other => {
            let _ = send.reset(codes::PROTOCOL);
            let _ = recv.stop(codes::PROTOCOL);
            // A Hub can open such streams as fast as it likes: their records wait for the
            // sink like any query's, and past the backlog they are counted (the
            // `audit_backlog` summary), not queued without bound.
            if !ctx.audit.admit_query() {
                return;
            }
            // What the Hub sent is refused; what it never sent (in time, or before its
            // stream or connection broke) failed.
            let (outcome, why) = match other {
                Err(_) => (Outcome::Failed, "no Open header in time".to_string()),
                Ok(Err(e @ (StreamError::Read(_) | StreamError::Write(_)))) => (
                    Outcome::Failed,
                    format!("no Open header: {}", transport::pipe::peer_said(&e)),
                ),
                Ok(Err(e)) => (
                    Outcome::Refused,
                    format!("bad Open header: {}", transport::pipe::peer_said(&e)),
                ),
                Ok(Ok(None)) => (
                    Outcome::Failed,
                    "the stream ended before an Open header".to_string(),
                ),
                Ok(Ok(Some(_))) => (
                    Outcome::Refused,
                    "a stream that does not start with Open".to_string(),
                ),
            };
            let mut r = ctx.audit.record(Event::Query);
            r.session_id = Some(session_id);
            r.client = Some(ctx.client_id.clone());
            r.outcome = Some(outcome);
            r.reason = Some(format!("protocol: {why}"));
            r.started = Some(started_at);
            r.peer = Some(hub.to_string());
            ctx.audit.emit(r);
            return;
        }
    };
    // The audit sink lags too far behind (a blocked stdout, a full disk): refuse before doing
    // anything, rather than lose a record or grow without bound. Counted, and summed up in
    // one `audit_backlog` record once the sink catches up.
    if !ctx.audit.admit_query() {
        ticket.release();
        refuse(&mut send, RefuseCode::Busy).await;
        return;
    }
    // Written when the query ends, or — if the task is dropped first (its session ended and
    // it did not wind down in time) — by the guard, so that no query goes unrecorded (P11).
    let mut r = Unfinished::new(&ctx.audit, started, started_at, hub);
    r.session_id = Some(session_id);
    r.query_id = Some(query_id);
    r.client = Some(ctx.client_id.clone());
    // Both are the Hub's words: recorded bounded (512 characters) and with no character that
    // could break or disguise a line where the customer reads them (bidi controls, line
    // separators), as `\u{…}`. A name that is allowed is short and has none; the dial below
    // uses the name as it came.
    r.source = Some(ewii_common::text::from_peer(source.as_bytes()));
    r.destination = Some(Destination {
        name: ewii_common::text::from_peer(destination.as_bytes()),
        address: None,
    });
    let dialed = match taking.queries() {
        true => {
            ticket.turn().await;
            let mut dial = std::pin::pin!(ctx.dialer.dial(&destination));
            // Its first step (the `connect`, for an address known) before the next query's.
            let first = std::future::poll_fn(|cx| Poll::Ready(dial.as_mut().poll(cx))).await;
            ticket.release();
            match first {
                Poll::Ready(dialed) => dialed,
                Poll::Pending => dial.await,
            }
        }
        false => {
            ticket.release();
            r.outcome = Some(Outcome::Failed);
            r.reason = Some(QueryError::Stopping.to_string());
            // On record before the answer, which waits for the Hub's room.
            r.finish();
            if refuse(&mut send, RefuseCode::ShuttingDown).await {
                // Read before the connection closes (a close discards what is unsent): the
                // Hub stops the stream once it has the answer, about a round trip.
                let _ = tokio::time::timeout(ANSWER_WAIT, send.stopped()).await;
            }
            return;
        }
    };
    let result = match dialed {
        Ok((tcp, addr)) => {
            if let Some(d) = &mut r.destination {
                d.address = Some(addr.to_string());
            }
            match answer(&mut send, &QueryHead::Opened, codes::ABORTED).await {
                Err(Unanswered::Broke) => Err(QueryError::HubGone),
                Err(Unanswered::NoRoom) => Err(QueryError::NoRoom),
                Ok(()) => {
                    // The session's end cuts the query with its bytes so far on record: a pipe
                    // blocked on the destination's TCP alone would not notice the stream is gone.
                    let ended = async move {
                        let closed = conn.closed().await;
                        PipeError::Cut(format!(
                            "the session ended: {}",
                            transport::pipe::peer_said(&closed)
                        ))
                    };
                    // Cut at once: the Hub's side is gone, and the connection's own wind-down is
                    // short (a destination that reads nothing must not hold it).
                    let drain = Duration::ZERO;
                    let start = Start::Leftover(reader.into_leftover());
                    let never = std::future::pending();
                    let report = pipe_until(tcp, send, recv, start, never, ended, drain).await;
                    r.bytes_up = Some(report.stream_to_tcp);
                    r.bytes_down = Some(report.tcp_to_stream);
                    report.error.map_or(Ok(()), |e| Err(e.into()))
                }
            }
        }
        Err(e) => {
            if let (Some(d), Some(addr)) = (&mut r.destination, e.address()) {
                d.address = Some(addr.to_string());
            }
            let code = match e {
                DialError::NotAllowed(_) => RefuseCode::NotAllowed,
                _ => RefuseCode::Unreachable,
            };
            // On record before the answer, which waits for the Hub's room: a Hub that gives
            // none cannot hide a probe of the allow-list until its session ends.
            let e = QueryError::from(e);
            r.outcome = Some(e.outcome());
            r.reason = Some(e.to_string());
            r.finish();
            refuse(&mut send, code).await;
            return;
        }
    };
    match result {
        Ok(()) => r.outcome = Some(Outcome::Ok),
        Err(e) => {
            r.outcome = Some(e.outcome());
            r.reason = Some(e.to_string());
        }
    }
    r.finish();
}

/// Answers `Refused{code}` and ends the stream: whether the answer was written. Bounded
/// ([`ANSWER_BOUND`]): a Hub that grants no room for it does not hold the query until its
/// session ends; the stream is reset instead.
async fn refuse(send: &mut quinn::SendStream, code: RefuseCode) -> bool {
    match answer(send, &QueryHead::Refused { code }, codes::REFUSED).await {
        Err(Unanswered::NoRoom) => false,
        written => {
            let _ = send.finish();
            written.is_ok()
        }
    }
}

/// Why an answer to the Hub was not written.
enum Unanswered {
    /// The stream or the connection broke.
    Broke,
    /// No room for it within [`ANSWER_BOUND`]: the stream was reset (with the code given).
    NoRoom,
}

/// Writes `head` to the Hub, waiting at most [`ANSWER_BOUND`] for room; past that the stream
/// is reset with `code`.
async fn answer(
    send: &mut quinn::SendStream,
    head: &QueryHead,
    code: quinn::VarInt,
) -> Result<(), Unanswered> {
    match tokio::time::timeout(ANSWER_BOUND, transport::write_frame(send, head)).await {
        Ok(written) => written.map_err(|_| Unanswered::Broke),
        Err(_) => {
            let _ = send.reset(code);
            Err(Unanswered::NoRoom)
        }
    }
}

/// A query's audit record until it is written: [`finish`](Self::finish) writes it; dropped
/// unwritten, it is written as failed.
struct Unfinished {
    audit: Audit,
    record: Option<ewii_common::audit::AuditRecord>,
    started: Instant,
}

impl Unfinished {
    fn new(
        audit: &Audit,
        started: Instant,
        started_at: ewii_common::time::Timestamp,
        hub: std::net::SocketAddr,
    ) -> Self {
        let mut r = audit.record(Event::Query);
        r.started = Some(started_at);
        r.peer = Some(hub.to_string());
        Self {
            audit: audit.clone(),
            record: Some(r),
            started,
        }
    }

    /// Stamps and writes the record.
    fn finish(mut self) {
        self.write();
    }

    fn write(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.duration_ms = Some(self.started.elapsed().as_millis() as u64);
            // Stamped at the end, like the Hub's record of the same query.
            r.time = crate::now_timestamp();
            self.audit.emit(r);
        }
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(r) = &mut self.record {
            r.outcome = Some(Outcome::Failed);
            r.reason = Some("the session ended before the query did".into());
        }
        self.write();
    }
}

impl std::ops::Deref for Unfinished {
    type Target = ewii_common::audit::AuditRecord;
    fn deref(&self) -> &Self::Target {
        // Present until written, and written only by `finish` (which consumes) or `drop`.
        self.record.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for Unfinished {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.record.as_mut().unwrap_or_else(|| unreachable!())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `f` is ready at its first poll.
    async fn at_once(f: impl Future<Output = ()>) -> bool {
        tokio::time::timeout(Duration::ZERO, f).await.is_ok()
    }

    /// P4: dials start in the order the Hub opened the streams: a query waits for those before
    /// it and is woken by the release that reaches it; one that ended early counts.
    #[tokio::test]
    async fn p4_dials_start_in_the_order_the_streams_were_opened() {
        let order = DialOrder::default();
        let (mut a, b, c) = (order.ticket(), order.ticket(), order.ticket());
        assert!(at_once(a.turn()).await, "the first goes at once");
        assert!(!at_once(b.turn()).await, "the second waits for the first");
        drop(c); // ended before its turn (a stream with no Open)
        let waiting = tokio::spawn(async move {
            b.turn().await;
            b
        });
        while !order.state().waiting.contains_key(&1) {
            tokio::task::yield_now().await;
        }
        a.release();
        assert!(
            !order.state().waiting.contains_key(&1),
            "woken by that release"
        );
        let mut b = waiting.await.unwrap();
        assert_eq!(order.state().turn, 1);
        b.release();
        let state = order.state();
        assert_eq!(
            (state.turn, state.released.len()),
            (3, 0),
            "c's end counted"
        );
    }

    /// A query whose `Open` is late holds the next one at most `ORDER_WAIT`, and only that one:
    /// the turn passes it, and its own late release leaves nothing behind.
    #[tokio::test]
    async fn p4_a_late_query_holds_the_next_one_wait_and_no_more() {
        let order = DialOrder::default();
        let (mut late, mut b, mut c) = (order.ticket(), order.ticket(), order.ticket());
        b.turn().await; // after ORDER_WAIT: `late` never released
        assert_eq!(order.state().turn, 1, "passed");
        assert!(!at_once(c.turn()).await, "c still waits for b");
        b.release();
        assert!(
            at_once(c.turn()).await,
            "and goes with b's release, no second wait"
        );
        c.release();
        assert!(at_once(late.turn()).await, "its turn has passed");
        late.release();
        let state = order.state();
        assert_eq!((state.turn, state.released.len()), (3, 0));
    }

    /// Queries that end before their turn without waiting, behind one that is late, are not
    /// kept without bound: past `MAX_AHEAD` the turn passes the late one.
    #[tokio::test]
    async fn p4_releases_kept_behind_a_late_query_are_bounded() {
        let order = DialOrder::default();
        let _late = order.ticket();
        for _ in 0..MAX_AHEAD + 10 {
            drop(order.ticket());
        }
        let state = order.state();
        assert!(
            state.released.len() <= MAX_AHEAD,
            "{}",
            state.released.len()
        );
        assert!(state.turn > 0);
    }
}
