//! The byte pipe between a TCP socket and a QUIC bidirectional stream.
//!
//! Bytes move as `Bytes`: a TCP read fills a `BytesMut` that is frozen and handed to quinn
//! without a copy; quinn's received chunks are written to TCP as they are. Memory stays
//! bounded by QUIC flow control on one side and TCP's window on the other, because each
//! direction awaits its write before it reads again.
//!
//! Semantics: a TCP FIN becomes a stream FIN and the other way round (half-close); a TCP
//! reset or any I/O error aborts both directions, and a stream reset becomes a TCP RST.
//!
//! One reset is an end instead ([`PipeError::TcpResetAfterEnd`]): the TCP peer's, once the
//! other party's end (its FIN, passed on) and every byte before it have been sent to it (none
//! waited in this side's send queue; bytes lost on the way as the reset comes are not told
//! apart). It is how many servers close: PostgreSQL over TLS, say,
//! exits on the client's `Terminate` with the client's `close_notify` unread, and its kernel
//! resets the connection for it. The other party has nothing left to send, and the reset can
//! no longer refuse anything it sent; what the reset could still cost is the TCP peer's last
//! bytes, which Linux hands over before the reset and a QUIC stream reset would discard (quinn
//! drops what it has not sent, and the peer's quinn what it holds unread). So the stream ends
//! with a FIN behind those bytes: the other party reads every one of them and then the end of
//! the stream, where a direct connection would read the same bytes and then a reset. The
//! other party's FIN travels a moment behind its last bytes, so the reset can come first here
//! where that party had ended first: it is taken as an end too when that end arrives within
//! [`RESET_GRACE`] with nothing more to write.
//!
//! On the Hub the pipe starts before the Client has answered `Open` ([`Start::AwaitAnswer`]):
//! the requester's first bytes travel right behind `Open` instead of a round trip later, and
//! nothing goes back to the requester until the answer is `Opened`. A refused query discards
//! them (the Client never reads past `Open` before it has decided).

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ewii_common::frame::{QueryHead, RefuseCode};
use quinn::{ReadError, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::{codes, FrameReader};

/// Smallest TCP read (a new query starts here).
const MIN_READ: usize = 4 * 1024;
/// Largest TCP read: enough to fill a GSO batch of QUIC packets.
const MAX_READ: usize = 64 * 1024;
/// Chunks taken off a QUIC stream at once and written to TCP with one `writev`.
const WRITE_BATCH: usize = 32;

/// How long a TCP reset waits for the other party's end, on its way behind its last bytes,
/// before it is taken as a failure (a reset after that end is an end:
/// [`PipeError::TcpResetAfterEnd`]). What it must cover is the gap between a party's last
/// bytes and its FIN, which travel together, not the path's round trip: a moment, unless the
/// host is loaded (100 ms was too short on a busy CI host for psql's sessions) or the FIN's
/// packet is lost (a retransmission may miss it: a failure on record, never an end that was
/// not). On either side, a party whose TCP peer resets mid-conversation while that party sends
/// nothing reads the reset this much later.
pub(crate) const RESET_GRACE: Duration = Duration::from_secs(1);

/// How long a finished query waits for the peer to read its last bytes.
pub(crate) const FINISH_WAIT: Duration = Duration::from_secs(10);

/// What went through, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PipeReport {
    /// Bytes from the TCP socket into the stream.
    pub tcp_to_stream: u64,
    /// Bytes from the stream onto the TCP socket.
    pub stream_to_tcp: u64,
    /// `None` when both directions ended with a FIN; otherwise what broke first.
    pub error: Option<PipeError>,
}

/// What broke a pipe first. The audit `reason` is rendered from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PipeError {
    /// Reading the TCP (or TLS) side failed.
    #[error("tcp read: {0}")]
    TcpRead(String),
    /// Writing the TCP (or TLS) side failed.
    #[error("tcp write: {0}")]
    TcpWrite(String),
    /// The TCP peer reset its connection.
    #[error("tcp connection reset")]
    TcpReset,
    /// The TCP peer reset its connection once the other party's end (the stream's FIN, passed
    /// on) had gone to it, or that end followed within [`RESET_GRACE`] with nothing more, and
    /// every byte before that end had been sent to it: an end, not a failure. The stream ends
    /// with a FIN, and the peer's QUIC stack acknowledged every byte before it.
    #[error("tcp connection reset after the other party's end reached it")]
    TcpResetAfterEnd,
    /// The QUIC peer reset the stream with this application code.
    #[error("stream reset by peer ({0})")]
    StreamReset(u64),
    /// Writing the QUIC stream failed (the peer stopped it, or the connection was lost).
    #[error("stream write: {0}")]
    StreamWrite(String),
    /// Reading the QUIC stream failed for another reason (connection lost).
    #[error("stream read: {0}")]
    StreamRead(String),
    /// The Client answered `Open` with `Refused` (Hub side).
    #[error("refused by the client: {0}")]
    Refused(RefuseCode),
    /// No valid answer to `Open` (Hub side): none in time, a bad frame, the stream broke.
    #[error("{0}")]
    NoAnswer(String),
    /// Cut by its owner while it ran ([`pipe_until`]), for the reason given.
    #[error("{0}")]
    Cut(String),
    /// Ended by its owner ([`pipe_until`]'s cut) because it stops, or because the connection
    /// the stream belongs to ended: not a decision about the query.
    #[error("{0}")]
    Ended(String),
}

/// What comes off the stream before the peer's raw bytes.
#[derive(Debug)]
pub enum Start {
    /// Nothing more: these bytes, already read off the stream past its header, go to the TCP
    /// socket first (Client side, after `Open`).
    Leftover(Bytes),
    /// The Client's answer to `Open`, awaited at most this long before anything goes back to
    /// the TCP peer (Hub side); the TCP peer's bytes go out meanwhile.
    AwaitAnswer(Duration),
}

/// A byte stream over TCP that can be torn down with an RST.
pub trait TcpLike: AsyncRead + AsyncWrite + Unpin + Send {
    /// Closes the connection with an RST instead of a FIN.
    fn abort(self);
    /// Bytes written that the kernel has not sent yet, when that can be told.
    fn unsent(&self) -> Option<u32>;
}

impl TcpLike for TcpStream {
    fn abort(self) {
        // SO_LINGER 0: close() sends RST and does not block.
        let _ = self.set_zero_linger();
    }

    fn unsent(&self) -> Option<u32> {
        crate::enforce::tcp_info::unsent_bytes(self).ok()
    }
}

impl TcpLike for tokio_rustls::server::TlsStream<TcpStream> {
    fn abort(self) {
        let _ = self.get_ref().0.set_zero_linger();
    }

    /// Not told: TLS may hold records of its own that the pipe never counted.
    fn unsent(&self) -> Option<u32> {
        None
    }
}

/// Pipes until both directions have finished or one fails; `start` says what the stream holds
/// before the peer's raw bytes.
pub async fn pipe<S: TcpLike>(
    io: S,
    send: SendStream,
    recv: RecvStream,
    start: Start,
) -> PipeReport {
    let never = std::future::pending;
    pipe_until(io, send, recv, start, never(), never(), Duration::ZERO).await
}

/// [`pipe`], cut when `cut` resolves first (also while the peer has yet to confirm the last
/// bytes), or by `ended`, the end of the stream's connection: both sides are aborted as on an
/// error (a stream reset, a TCP RST), and the report keeps the bytes moved so far.
///
/// A connection's end matters even to a pipe whose stream read would not see it: one whose
/// stream side is done and whose TCP peer is idle (its answer read), or one blocked writing to
/// a TCP peer that reads nothing. But it does not lose what arrived before it (quinn still
/// hands over the stream's data and its FIN), and a peer that closes right after its last
/// query (a stop) has had its last bytes acknowledged, not necessarily read: what the stream
/// still holds is delivered for at most `drain` (zero: cut at once). Once it was all
/// delivered, the TCP side is closed, not reset, so that its peer reads all of it.
pub async fn pipe_until<S: TcpLike>(
    io: S,
    mut send: SendStream,
    mut recv: RecvStream,
    start: Start,
    cut: impl std::future::Future<Output = PipeError>,
    ended: impl std::future::Future<Output = PipeError>,
    drain: Duration,
) -> PipeReport {
    let (mut r, mut w) = tokio::io::split(io);
    let mut up_count = 0u64;
    let mut down_count = 0u64;
    // Shared by the two directions, polled by this one task.
    let answered = AtomicBool::new(matches!(start, Start::Leftover(_)));
    let stopped_early = AtomicBool::new(false);
    // Also watched while the last bytes are delivered (below).
    let drained = tokio::time::sleep(Duration::ZERO);
    // A TCP reset while the stream's end has yet to reach the TCP peer: that end is awaited
    // for [`RESET_GRACE`].
    let grace = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(cut, ended, drained, grace);
    // The connection's end, while what the stream holds is delivered.
    let mut lost: Option<PipeError> = None;
    // The TCP peer reset its connection after the stream's FIN went to it: that FIN is in the
    // socket's count of what it has not sent, if it has not.
    let mut fin_first = false;
    // Set when the connection's end cut a pipe whose stream side had reached the TCP peer
    // whole.
    let mut delivered = false;
    let error = {
        let up = tcp_to_stream(&mut r, &mut send, &mut up_count);
        let down = async {
            let leftover = match start {
                Start::Leftover(bytes) => bytes,
                Start::AwaitAnswer(within) => {
                    let leftover = answer(&mut recv, within).await?;
                    answered.store(true, Ordering::Relaxed);
                    if stopped_early.load(Ordering::Relaxed) {
                        // Opened, but the stream was already stopped: the upload's error
                        // stands, and nothing is piped.
                        return Ok(());
                    }
                    leftover
                }
            };
            stream_to_tcp(&mut recv, &mut w, leftover, &mut down_count).await
        };
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        // The TCP peer reset its connection before the stream's end reached it.
        let mut reset_early = false;
        // A Client that refuses stops the stream as it answers: the stop may overtake the
        // `Refused` frame, so an upload that fails on the stream before the answer waits for
        // it (bounded by the answer's timeout). A TCP error ends the query at once.
        let mut up_error = None;
        loop {
            tokio::select! {
                res = &mut up, if !up_done => match res {
                    Ok(()) => up_done = true,
                    // An end (once the TCP peer is found to have every byte, below): every
                    // byte before the reset was read (Linux hands those over first), and the
                    // other party has said all it had to.
                    Err(PipeError::TcpReset) if down_done => {
                        fin_first = true;
                        break Some(PipeError::TcpResetAfterEnd);
                    }
                    // The other party's end may be on its way, only behind: a client that
                    // sends its last bytes and closes, to a server that resets as it reads
                    // them (PostgreSQL over TLS), has ended first, but its FIN comes through
                    // the tunnel a moment after those bytes.
                    Err(PipeError::TcpReset) if !down_done && answered.load(Ordering::Relaxed) => {
                        (up_done, reset_early) = (true, true);
                        grace.as_mut().reset(tokio::time::Instant::now() + RESET_GRACE);
                    }
                    Err(e @ PipeError::StreamWrite(_)) if !answered.load(Ordering::Relaxed) => {
                        up_done = true;
                        up_error = Some(e);
                        stopped_early.store(true, Ordering::Relaxed);
                    }
                    Err(e) => break Some(e),
                },
                res = &mut down, if !down_done => match res {
                    // Its end came with nothing more to write to the reset connection.
                    // Unless the connection ended meanwhile (its FIN was already there).
                    Ok(()) if reset_early => {
                        break Some(lost.take().unwrap_or(PipeError::TcpResetAfterEnd))
                    }
                    Ok(()) => {
                        down_done = true;
                        if let (false, Some(e)) = (up_done, lost.take()) {
                            delivered = true;
                            break Some(e);
                        }
                    }
                    // Bytes that could not go to the reset connection: the reset stands.
                    Err(_) if reset_early => break Some(PipeError::TcpReset),
                    Err(e) => break Some(e),
                },
                () = &mut grace, if reset_early => break Some(PipeError::TcpReset),
                e = &mut cut => break Some(e),
                e = &mut ended, if lost.is_none() => {
                    if down_done {
                        delivered = true;
                        break Some(e);
                    }
                    drained.as_mut().reset(tokio::time::Instant::now() + drain);
                    lost = Some(e);
                }
                () = &mut drained, if lost.is_some() => break lost.take(),
            }
            if up_done && down_done {
                break up_error;
            }
        }
    };
    let io = r.unsplit(w);
    let error = match error {
        // Only if every byte the other party sent had gone to the TCP peer: a reset purges
        // what still waits in this side's send queue (behind a peer that stopped reading).
        // Not "acknowledged": a peer that exits with bytes unread resets before its delayed
        // acknowledgement of them, and its reset's own acknowledgement is not counted.
        Some(PipeError::TcpResetAfterEnd)
            if io.unsent().is_some_and(|n| n <= u32::from(fin_first)) =>
        {
            let _ = send.finish();
            Some(PipeError::TcpResetAfterEnd)
        }
        Some(PipeError::TcpResetAfterEnd) => Some(PipeError::TcpReset),
        e => e,
    };
    // The last bytes and the FIN are delivered only once the peer has read them: the query
    // ends then (bounded), so that closing the connection right after (a stop) cannot discard
    // them. A cut meanwhile (the owner stops) ends it as a cut: the peer may not have them.
    let error = match error {
        None => tokio::select! {
            biased;
            _ = tokio::time::timeout(FINISH_WAIT, send.stopped()) => None,
            e = &mut cut => Some(e),
        },
        // An end only once the peer's QUIC stack acknowledged every byte and the FIN: a peer
        // that stopped the stream, a connection lost or no answer in time leave the reset it
        // was.
        Some(PipeError::TcpResetAfterEnd) => tokio::select! {
            biased;
            stopped = tokio::time::timeout(FINISH_WAIT, send.stopped()) => match stopped {
                Ok(Ok(None)) => Some(PipeError::TcpResetAfterEnd),
                _ => Some(PipeError::TcpReset),
            },
            e = &mut cut => Some(e),
        },
        Some(e) => Some(e),
    };
    if let Some(e) = error
        .as_ref()
        .filter(|e| !matches!(e, PipeError::TcpResetAfterEnd))
    {
        // Abort everything: the peer sees a stream reset, the TCP peer an RST.
        let code = match e {
            PipeError::NoAnswer(_) => codes::PROTOCOL,
            _ => codes::ABORTED,
        };
        let _ = send.reset(code);
        let _ = recv.stop(code);
        if delivered {
            // What the stream gave reached the TCP peer with its FIN: closed, not reset, so
            // that the peer reads all of it (what it sends from now on, its kernel refuses).
            drop(io);
        } else {
            io.abort();
        }
    }
    PipeReport {
        tcp_to_stream: up_count,
        stream_to_tcp: down_count,
        error,
    }
}

async fn tcp_to_stream<S: TcpLike>(
    r: &mut ReadHalf<S>,
    send: &mut SendStream,
    count: &mut u64,
) -> Result<(), PipeError> {
    let mut size = MIN_READ;
    let mut buf = BytesMut::new();
    loop {
        // quinn keeps each chunk until the peer acknowledges it, so a read's allocation is
        // reused only once that happened; a small read size keeps idle and chatty queries from
        // pinning 64 KiB each.
        buf.reserve(size);
        match r.read_buf(&mut buf).await {
            Ok(0) => {
                let _ = send.finish();
                return Ok(());
            }
            Ok(n) => {
                size = next_read_size(size, n);
                // Counted as the stream takes it: a failed or cut write counts what went.
                let mut chunk = [buf.split().freeze()];
                while !chunk[0].is_empty() {
                    let written = send
                        .write_chunks(&mut chunk)
                        .await
                        .map_err(|e| PipeError::StreamWrite(peer_said(&e)))?;
                    *count += written.bytes as u64;
                }
            }
            Err(e) => return Err(tcp_error(&e, PipeError::TcpRead)),
        }
    }
}

/// The next TCP read size: doubled after a read that filled it (bulk), halved after one that
/// used less than a quarter of it, within [`MIN_READ`, `MAX_READ`].
fn next_read_size(size: usize, read: usize) -> usize {
    if read >= size {
        (size * 2).min(MAX_READ)
    } else if read < size / 4 {
        (size / 2).max(MIN_READ)
    } else {
        size
    }
}

async fn stream_to_tcp<S: TcpLike>(
    recv: &mut RecvStream,
    w: &mut WriteHalf<S>,
    leftover: Bytes,
    count: &mut u64,
) -> Result<(), PipeError> {
    let mut chunks: [Bytes; WRITE_BATCH] = Default::default();
    let mut n = 0;
    if !leftover.is_empty() {
        chunks[0] = leftover;
        n = 1;
    }
    loop {
        if n > 0 {
            // One `writev` for every chunk quinn had ready (each is about one packet's payload),
            // instead of a `write` per chunk.
            write_all_vectored(w, &mut chunks[..n], count)
                .await
                .map_err(|e| tcp_error(&e, PipeError::TcpWrite))?;
        }
        match recv.read_chunks(&mut chunks).await {
            Ok(Some(got)) => n = got,
            Ok(None) => {
                // Half-close: the TCP peer reads EOF, and may keep sending.
                let _ = w.shutdown().await;
                return Ok(());
            }
            Err(ReadError::Reset(code)) => return Err(PipeError::StreamReset(code.into_inner())),
            Err(e) => return Err(PipeError::StreamRead(peer_said(&e))),
        }
    }
}

/// Writes every byte of `chunks` (emptying them), adding each write's bytes to `count` as it
/// goes (a write that fails part-way leaves what went before it counted).
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
    count: &mut u64,
) -> io::Result<()> {
    let mut first = 0;
    loop {
        while chunks.get(first).is_some_and(Bytes::is_empty) {
            first += 1;
        }
        if first == chunks.len() {
            return Ok(());
        }
        let mut slices = [IoSlice::new(&[]); WRITE_BATCH];
        let used = (chunks.len() - first).min(WRITE_BATCH);
        for (slice, chunk) in slices.iter_mut().zip(&chunks[first..]) {
            *slice = IoSlice::new(chunk);
        }
        let mut written = w.write_vectored(&slices[..used]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        *count += written as u64;
        while first < chunks.len() && written >= chunks[first].len() {
            written -= chunks[first].len();
            chunks[first] = Bytes::new();
            first += 1;
        }
        if written > 0 {
            chunks[first].advance(written);
        }
    }
}

/// Reads the Client's answer to `Open`: the bytes after `Opened`, or why there are none.
async fn answer(recv: &mut RecvStream, within: Duration) -> Result<Bytes, PipeError> {
    let mut reader = FrameReader::query_head();
    match tokio::time::timeout(within, reader.read::<QueryHead>(recv)).await {
        Ok(Ok(Some(QueryHead::Opened))) => Ok(reader.into_leftover()),
        Ok(Ok(Some(QueryHead::Refused { code }))) => Err(PipeError::Refused(code)),
        Ok(Ok(_)) => Err(PipeError::NoAnswer("unexpected answer to Open".into())),
        Ok(Err(e)) => Err(PipeError::NoAnswer(format!(
            "reading the answer to Open: {}",
            peer_said(&e)
        ))),
        Err(_) => Err(PipeError::NoAnswer("no answer to Open in time".into())),
    }
}

/// A stream error as text for a record or a log, with the errors under it that it does not
/// already say (a lost connection's close and the peer's reason for it: quinn's
/// `ReadError::ConnectionLost` says only "connection lost"). The peer's words are bounded and
/// escaped ([`ewii_common::text::from_peer`]).
pub(crate) fn peer_said<E: std::error::Error + ?Sized>(e: &E) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if !text.ends_with(&said) {
            text = format!("{text}: {said}");
        }
        cause = c.source();
    }
    ewii_common::text::from_peer(text.as_bytes())
}

fn tcp_error(e: &io::Error, other: fn(String) -> PipeError) -> PipeError {
    match e.kind() {
        io::ErrorKind::ConnectionReset => PipeError::TcpReset,
        _ => other(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    #[test]
    fn read_size_grows_under_bulk_and_shrinks_when_reads_are_small() {
        let mut size = MIN_READ;
        for _ in 0..10 {
            size = next_read_size(size, size);
        }
        assert_eq!(size, MAX_READ);
        assert_eq!(
            next_read_size(MAX_READ, MAX_READ / 2),
            MAX_READ,
            "a half-full read keeps it"
        );
        for _ in 0..10 {
            size = next_read_size(size, 100);
        }
        assert_eq!(size, MIN_READ);
    }

    /// A writer that takes at most 5 bytes per call, vectored or not (a stand-in for a full
    /// socket buffer: partial writes are what the loop must survive), and fails once it holds
    /// `room` bytes (a peer that reset).
    struct Dribble {
        taken: Vec<u8>,
        room: usize,
    }

    impl Dribble {
        fn new(room: usize) -> Self {
            Self {
                taken: Vec::new(),
                room,
            }
        }

        fn full(&self) -> Option<io::Error> {
            (self.taken.len() >= self.room).then(|| io::ErrorKind::ConnectionReset.into())
        }
    }

    impl AsyncWrite for Dribble {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if let Some(e) = self.full() {
                return Poll::Ready(Err(e));
            }
            let n = buf.len().min(5);
            self.taken.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            if let Some(e) = self.full() {
                return Poll::Ready(Err(e));
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(5 - n);
                self.taken.extend_from_slice(&b[..take]);
                n += take;
                if n == 5 {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn vectored_writes_deliver_every_byte_in_order_through_partial_writes() {
        let mut chunks: Vec<Bytes> = ["", "abc", "", "defghij", "k", "lmnopqrstu", ""]
            .iter()
            .map(|s| Bytes::from_static(s.as_bytes()))
            .collect();
        let mut w = Dribble::new(usize::MAX);
        let mut n = 0;
        write_all_vectored(&mut w, &mut chunks, &mut n)
            .await
            .unwrap();
        assert_eq!(n, 21);
        assert_eq!(w.taken, b"abcdefghijklmnopqrstu");
        assert!(chunks.iter().all(Bytes::is_empty));
    }

    /// A lost connection's error says why it was lost, in the peer's words (escaped): quinn's
    /// own text for it is only "connection lost".
    #[test]
    fn p11_a_lost_connection_is_said_with_the_peers_reason() {
        let lost = ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(
            quinn::ApplicationClose {
                error_code: quinn::VarInt::from_u32(5),
                reason: Bytes::from_static(b"maintenance\nwindow"),
            },
        ));
        assert_eq!(
            peer_said(&crate::transport::StreamError::Read(lost)),
            "read: connection lost: closed by peer: maintenance\\u{a}window (code 5)"
        );
        let reset = ReadError::Reset(quinn::VarInt::from_u32(7));
        assert_eq!(peer_said(&reset), reset.to_string(), "nothing under it");
    }

    /// The audit's byte count is what reached the TCP peer: a write that fails part-way
    /// through a batch keeps the bytes written before it counted.
    #[tokio::test]
    async fn p11_a_batch_that_fails_part_way_counts_the_bytes_that_went() {
        let mut chunks: Vec<Bytes> = ["abcdefgh", "ijklmnopqrstu"]
            .iter()
            .map(|s| Bytes::from_static(s.as_bytes()))
            .collect();
        let mut w = Dribble::new(12);
        let mut n = 0;
        let e = write_all_vectored(&mut w, &mut chunks, &mut n)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(n, 15, "three writes of 5 went before the failure");
        assert_eq!(n, w.taken.len() as u64);
    }
}
