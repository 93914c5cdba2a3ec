//! The send half of a control stream, written by a task of its own.
//!
//! A session's loop keeps its timers (an SVID's expiry, a retired serial's drain), what the
//! registry tells it (a bundle to re-check) and its shutdown. Were the loop to write to the
//! peer itself, a peer that stops reading would stall all of them: QUIC flow control holds a
//! write until the peer reads, for ever if it never does. A hostile Client would keep a session
//! routable past its SVID's expiry or its CA's removal; a hostile Hub would hold a stopping
//! Client. So the loop only queues frames, which never waits, and [`ControlOut`]'s task writes
//! them in order.
//!
//! An honest peer has one or two answers outstanding at most, so the queue is short. A loop
//! that answers requests reads the next one only while the queue has room
//! ([`ControlOut::has_room`]): a peer that asks without reading is held by its own flow
//! control. What the loop sends unasked ([`ControlOut::send`] finding [`ROOM`] frames queued:
//! [`OutError::Unread`]) means the peer is not reading its control stream, and the session
//! ends. Memory stays bounded by the queue and QUIC's send window.

use bytes::Bytes;
use ewii_common::frame::{self, FrameError};
use quinn::SendStream;
use serde::Serialize;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::StreamError;

/// Frames that may wait for the peer to read before the session ends.
pub const ROOM: usize = 32;

/// What the writer task is asked to do, in order.
enum Out {
    Frame(Bytes),
    Finish,
}

/// Why a frame could not be queued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutError {
    /// [`ROOM`] frames wait unread: the peer is not reading its control stream.
    #[error("the peer left {} control frames unread", ROOM)]
    Unread,
    /// The stream or connection failed; [`ControlOut::failed`] says how.
    #[error("the control stream failed")]
    Gone,
    /// The message does not fit a frame.
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
}

/// Queues control frames for a task that writes them ([module docs](self)).
#[derive(Debug)]
pub struct ControlOut {
    tx: mpsc::Sender<Out>,
    /// Why the writer stopped, once a write failed; `None` before, and once taken.
    failed: Arc<Mutex<Option<StreamError>>>,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Frame(b) => write!(f, "Frame({} bytes)", b.len()),
            Self::Finish => f.write_str("Finish"),
        }
    }
}

impl ControlOut {
    /// Hands `send` to a new writer task on the current runtime. The task ends once this handle
    /// is dropped and the frames queued are written, or when a write fails. A write the peer
    /// holds ends only when the connection closes: whoever drops the handle closes it (the
    /// task keeps the connection alive meanwhile).
    pub fn spawn(send: SendStream) -> Self {
        let (tx, rx) = mpsc::channel(ROOM);
        let failed = Arc::default();
        tokio::spawn(write_out(send, rx, Arc::clone(&failed)));
        Self { tx, failed }
    }

    /// Queues `msg` as one frame, without waiting for the peer.
    pub fn send<T: Serialize>(&self, msg: &T) -> Result<(), OutError> {
        let buf = frame::encode_to_vec(msg)?;
        self.queue(Out::Frame(buf.freeze()))
    }

    /// Queues the end of the stream, after the frames queued before it.
    pub fn finish(&self) -> Result<(), OutError> {
        self.queue(Out::Finish)
    }

    fn queue(&self, out: Out) -> Result<(), OutError> {
        self.tx.try_send(out).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => OutError::Unread,
            mpsc::error::TrySendError::Closed(_) => OutError::Gone,
        })
    }

    /// Whether a frame may be queued now. A loop that answers what it reads reads only then:
    /// a peer that asks faster than it reads the answers is slowed by QUIC flow control, not
    /// by this loop's memory, and one that never reads stalls only its own requests.
    pub fn has_room(&self) -> bool {
        self.tx.capacity() > 0
    }

    /// Resolves once [`has_room`](Self::has_room) holds (at once if it does); pending once
    /// the writer stopped ([`failed`](Self::failed) says why).
    pub async fn room(&self) {
        match self.tx.reserve().await {
            Ok(permit) => drop(permit),
            Err(_) => std::future::pending().await,
        }
    }

    /// Resolves with the error once a write failed (the stream or the connection is gone);
    /// pending while the frames go out, and after it resolved once.
    pub async fn failed(&self) -> StreamError {
        // The writer drops its end only when a write failed (or when this handle is gone).
        self.tx.closed().await;
        let taken = self.failed.lock().ok().and_then(|mut e| e.take());
        match taken {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }
}

async fn write_out(
    mut send: SendStream,
    mut rx: mpsc::Receiver<Out>,
    failed: Arc<Mutex<Option<StreamError>>>,
) {
    while let Some(out) = rx.recv().await {
        let written = match out {
            Out::Frame(bytes) => send.write_chunk(bytes).await.map_err(StreamError::from),
            // Finished once: a second finish has nothing to add.
            Out::Finish => {
                let _ = send.finish();
                Ok(())
            }
        };
        if let Err(e) = written {
            if let Ok(mut failed) = failed.lock() {
                *failed = Some(e);
            }
            // Dropping `rx` now tells `failed`.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use ewii_common::frame::{self as f, Control};

    use super::*;
    use crate::transport::{self, FrameReader};

    const SOON: Duration = Duration::from_secs(10);

    /// A real QUIC connection on loopback whose server grants `window` bytes per stream: the
    /// client's end of a control stream, and the server's connection with its receive half.
    async fn pair(
        window: u32,
    ) -> (
        quinn::Endpoint,
        quinn::Connection,
        SendStream,
        quinn::Connection,
        quinn::RecvStream,
    ) {
        let (tls, client_tls) = transport::tests::tls_pair(&[f::ALPN]);
        let mut server = transport::quic_server_config(tls, transport::STREAM_WINDOW).unwrap();
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(quinn::VarInt::from_u32(window));
        server.transport_config(Arc::new(t));
        let quic = transport::quic_client_config(client_tls, 1, transport::STREAM_WINDOW).unwrap();
        let (endpoint, dialer, accepted, conn) = transport::tests::handshake(server, quic).await;
        let (mut send, _) = conn.open_bi().await.unwrap();
        // A stream is seen by the peer once it carries a byte.
        transport::write_frame(&mut send, &Control::Ping { time_us: u64::MAX })
            .await
            .unwrap();
        let (_, mut recv) = accepted.accept_bi().await.unwrap();
        let first = FrameReader::new().read::<Control>(&mut recv).await.unwrap();
        assert_eq!(first, Some(Control::Ping { time_us: u64::MAX }));
        drop(endpoint);
        (dialer, conn, send, accepted, recv)
    }

    #[tokio::test]
    async fn a_peer_that_reads_nothing_holds_only_the_writer_and_loses_nothing() {
        let (_dialer, conn, send, peer, mut recv) = pair(64).await;
        let out = ControlOut::spawn(send);
        // Queued without waiting, in order, until the queue is full behind the held writer.
        let mut queued = 0u64;
        let full = loop {
            match out.send(&Control::Ping { time_us: queued }) {
                Ok(()) => queued += 1,
                Err(e) => break e,
            }
            assert!(queued <= 4 * ROOM as u64, "the queue never filled");
            tokio::task::yield_now().await;
        };
        assert!(matches!(full, OutError::Unread), "{full:?}");
        assert!(!out.has_room());
        assert!(queued >= ROOM as u64, "{queued} queued");
        // The peer reads at last: every frame arrives, in order, and room comes back.
        let mut reader = FrameReader::new();
        for time_us in 0..queued {
            let msg = tokio::time::timeout(SOON, reader.read::<Control>(&mut recv))
                .await
                .expect("the frames go out once read")
                .unwrap();
            assert_eq!(msg, Some(Control::Ping { time_us }));
        }
        tokio::time::timeout(SOON, out.room()).await.expect("room");
        assert!(out.has_room());
        // The peer goes away: the next write fails, and `failed` says so.
        peer.close(transport::codes::DONE, b"");
        tokio::time::timeout(SOON, conn.closed()).await.unwrap();
        let _ = out.send(&Control::Ping { time_us: 0 });
        let e = tokio::time::timeout(SOON, out.failed())
            .await
            .expect("the failure is told");
        assert!(matches!(e, StreamError::Write(_)), "{e:?}");
    }
}
