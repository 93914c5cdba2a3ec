//! The byte pipe between a TCP socket and a QUIC bidirectional stream.
//!
//! Bytes move as `Bytes`: a TCP read fills a `BytesMut` that is frozen and handed to quinn
//! without a copy; quinn's received chunks are written to TCP as they are. Memory stays
//! bounded by QUIC flow control on one side and TCP's window on the other, because each
//! direction awaits its write before it reads again.
//!
//! Semantics: a TCP FIN becomes a stream FIN and the other way round (half-close); a TCP
//! reset or any I/O error aborts both directions, and a stream reset becomes a TCP RST.

use std::io;

use bytes::{Bytes, BytesMut};
use quinn::{ReadError, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::codes;

/// Bytes per TCP read; large enough to fill QUIC packets, small enough to keep latency.
const CHUNK: usize = 64 * 1024;

/// How long a finished query waits for the peer to read its last bytes.
const FINISH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// The QUIC peer reset the stream with this application code.
    #[error("stream reset by peer ({0})")]
    StreamReset(u64),
    /// Writing the QUIC stream failed (the peer stopped it, or the connection was lost).
    #[error("stream write: {0}")]
    StreamWrite(String),
    /// Reading the QUIC stream failed for another reason (connection lost).
    #[error("stream read: {0}")]
    StreamRead(String),
}

/// A byte stream over TCP that can be torn down with an RST.
pub trait TcpLike: AsyncRead + AsyncWrite + Unpin + Send {
    /// Closes the connection with an RST instead of a FIN.
    fn abort(self);
}

impl TcpLike for TcpStream {
    fn abort(self) {
        // SO_LINGER 0: close() sends RST and does not block.
        let _ = self.set_zero_linger();
    }
}

impl TcpLike for tokio_rustls::server::TlsStream<TcpStream> {
    fn abort(self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

/// Pipes until both directions have finished or one fails. `leftover` is payload already read
/// off `recv` (it goes to the TCP socket first).
pub async fn pipe<S: TcpLike>(
    io: S,
    mut send: SendStream,
    mut recv: RecvStream,
    leftover: Bytes,
) -> PipeReport {
    let (mut r, mut w) = tokio::io::split(io);
    let mut up_count = 0u64;
    let mut down_count = 0u64;
    let error = {
        let up = tcp_to_stream(&mut r, &mut send, &mut up_count);
        let down = stream_to_tcp(&mut recv, &mut w, leftover, &mut down_count);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                res = &mut up, if !up_done => match res {
                    Ok(()) => up_done = true,
                    Err(e) => break Some(e),
                },
                res = &mut down, if !down_done => match res {
                    Ok(()) => down_done = true,
                    Err(e) => break Some(e),
                },
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    if error.is_some() {
        // Abort everything: the peer sees a stream reset, the TCP peer an RST.
        let _ = send.reset(codes::ABORTED);
        let _ = recv.stop(codes::ABORTED);
        r.unsplit(w).abort();
    } else {
        // The last bytes and the FIN are delivered only once the peer has read them: the query
        // ends then (bounded), so that closing the connection right after (a stop) cannot
        // discard them.
        let _ = tokio::time::timeout(FINISH_WAIT, send.stopped()).await;
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
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        // Reuses the allocation once quinn has released the previous chunk.
        buf.reserve(CHUNK);
        match r.read_buf(&mut buf).await {
            Ok(0) => {
                let _ = send.finish();
                return Ok(());
            }
            Ok(n) => {
                *count += n as u64;
                send.write_chunk(buf.split().freeze())
                    .await
                    .map_err(|e| PipeError::StreamWrite(e.to_string()))?;
            }
            Err(e) => return Err(tcp_error(&e, PipeError::TcpRead)),
        }
    }
}

async fn stream_to_tcp<S: TcpLike>(
    recv: &mut RecvStream,
    w: &mut WriteHalf<S>,
    leftover: Bytes,
    count: &mut u64,
) -> Result<(), PipeError> {
    if !leftover.is_empty() {
        w.write_all(&leftover)
            .await
            .map_err(|e| tcp_error(&e, PipeError::TcpWrite))?;
        *count += leftover.len() as u64;
    }
    loop {
        match recv.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                w.write_all(&chunk.bytes)
                    .await
                    .map_err(|e| tcp_error(&e, PipeError::TcpWrite))?;
                *count += chunk.bytes.len() as u64;
            }
            Ok(None) => {
                // Half-close: the TCP peer reads EOF, and may keep sending.
                let _ = w.shutdown().await;
                return Ok(());
            }
            Err(ReadError::Reset(code)) => return Err(PipeError::StreamReset(code.into_inner())),
            Err(e) => return Err(PipeError::StreamRead(e.to_string())),
        }
    }
}

fn tcp_error(e: &io::Error, other: fn(String) -> PipeError) -> PipeError {
    match e.kind() {
        io::ErrorKind::ConnectionReset => PipeError::TcpReset,
        _ => other(e.to_string()),
    }
}
