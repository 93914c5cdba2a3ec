//! QUIC and TLS configuration, frame I/O on QUIC streams, the control stream's writer, and the
//! TCP ⇄ stream pipe.
//!
//! P5: TLS 1.3 only, and `TLS13_CHACHA20_POLY1305_SHA256` is the only suite either side can
//! negotiate. QUIC Initial packets are protected with AES-128-GCM by RFC 9001 §5.2 whatever
//! the TLS suites are, so the quinn configs are built with `with_initial`. No 0-RTT and no
//! session resumption: a resumed handshake would skip the client-certificate verifier, and a
//! revoked Client would get back in.

mod connected;
pub mod control;
pub mod pipe;
pub mod shard;

pub use connected::client_endpoint;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ewii_common::frame::{self, FrameError, MAX_FRAME};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, RecvStream, SendStream, TransportConfig, VarInt};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::NoServerSessionStorage;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::identity::store::Svid;

/// The Hub marks a silent Client lost after this long (P9: within 3 s, with room for scheduling).
pub const IDLE_TIMEOUT: Duration = Duration::from_millis(2_500);
/// Keep-alive interval: three chances to be heard within one idle timeout.
pub const KEEP_ALIVE: Duration = Duration::from_millis(800);
/// Most queries the Hub may have open on one Client connection at once, by default
/// (`max_queries` in the Client's configuration).
pub const MAX_CONCURRENT_QUERIES: u32 = 1024;
/// Per-query receive window by default (`query_window_kib` of either side's configuration):
/// how far a sender may run ahead of a slow reader on one stream. It also bounds one query to
/// one window per round trip: about 21 MB/s on a 50 ms path (docs/benchmarks.md).
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// The smallest per-query window a configuration may set: a few dozen datagrams.
pub const MIN_STREAM_WINDOW: u32 = 64 * 1024;
/// Per-connection receive window: bounds what one peer can make us buffer across all queries.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// The Hub's per-connection receive window until the peer has proven who it is (its
/// session's checks passed: [`authenticated`]): one whole frame, as much as the largest
/// enrolment request or `Hello` needs in one flight. Anyone who can reach the Hub's port may
/// open a connection on the enrolment ALPN, and 512 of them at once (`hub/admission.rs`); with
/// the query window as their credit, each could make the Hub hold 1–8 MiB it has not read
/// (data sent out of order, or past the request) for as long as its request may take. Now
/// about twice this: a frame being read, and this much past it.
pub const UNAUTHENTICATED_WINDOW: u32 = (frame::HEADER_LEN + MAX_FRAME) as u32;
/// The largest per-query window a configuration may set: half the connection's. Data held for
/// a reader that does not read also holds the connection's window, so a query window as large
/// as the connection's would let one stalled query stop every other query of its Client.
pub const MAX_STREAM_WINDOW: u32 = CONNECTION_WINDOW / 2;

/// Receive and send buffer asked for the QUIC socket. The kernel's default (208 KiB) drops
/// datagrams under a burst at a few Gbit/s, and QUIC reads a drop as congestion; on a 50 ms
/// path at 1 Gbit/s one round trip is 6 MB in flight. Capped by `net.core.rmem_max` and
/// `wmem_max` (an unprivileged process cannot go past them): see docs/benchmarks.md.
pub const UDP_BUFFER: usize = 4 * 1024 * 1024;

/// A query's TCP legs (the requester's on the Hub, the destination's on the Client) send a
/// keep-alive probe after this long without traffic. Without it a peer that vanished (its
/// host crashed, a path that dropped the connection's state) goes unnoticed for as long as
/// the other end waits, a long-lived query (a `LISTEN`, a pool's idle connection) holds its
/// slot of `max_queries` and the database's connection for ever, and a middlebox's idle timer
/// (a cloud load balancer's, four to six minutes) drops a quiet query that is still wanted.
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Between two unanswered probes.
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Unanswered probes that end the connection: a vanished peer is found within two minutes.
pub const TCP_KEEPALIVE_PROBES: u32 = 4;

/// Sets a query's TCP leg as the tunnel wants it: no Nagle delay (a round trip's small writes
/// leave at once) and keep-alive probes ([`TCP_KEEPALIVE_IDLE`]). Failures are logged: a
/// socket that refuses either still carries the query.
pub(crate) fn tune_tcp(stream: &tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_PROBES);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keep-alive");
    }
}

/// At most `max` events in each `length` of time (a window opens at the first event after the
/// last one closed): the bound on a message a peer may otherwise send as often as it likes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    max: u32,
    length: Duration,
    since: Option<tokio::time::Instant>,
    count: u32,
}

impl Window {
    pub(crate) const fn new(max: u32, length: Duration) -> Self {
        Self {
            max,
            length,
            since: None,
            count: 0,
        }
    }

    /// Whether one more, at `now`, is within the bound.
    pub(crate) fn admit(&mut self, now: tokio::time::Instant) -> bool {
        match self.since {
            Some(since) if now.duration_since(since) < self.length => {}
            _ => {
                self.since = Some(now);
                self.count = 0;
            }
        }
        self.count += 1;
        self.count <= self.max
    }
}

/// QUIC application error codes (connection close and stream reset).
pub mod codes {
    use quinn::VarInt;

    /// Orderly close.
    pub const DONE: VarInt = VarInt::from_u32(0);
    /// The TCP side was reset or failed: the stream is aborted, the peer resets its TCP side.
    pub const ABORTED: VarInt = VarInt::from_u32(1);
    /// The peer broke the protocol (bad frame, wrong order).
    pub const PROTOCOL: VarInt = VarInt::from_u32(2);
    /// The identity was revoked.
    pub const REVOKED: VarInt = VarInt::from_u32(3);
    /// The process is shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(4);
    /// Refused (no certificate on a session connection, wrong role, version).
    pub const REFUSED: VarInt = VarInt::from_u32(5);
    /// The Hub no longer trusts the CA of the session's SVID (it left the bundle of its trust
    /// domain); the reason says which.
    pub const UNTRUSTED: VarInt = VarInt::from_u32(6);
}

/// Why a TLS or QUIC configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// rustls refused the key, the chain or the protocol set.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// quinn refused the TLS configuration.
    #[error("QUIC configuration: {0}")]
    Quic(String),
}

/// A frame could not be read or written on a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The bytes were not a valid frame.
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    /// The stream or connection failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// The stream or connection failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
}

/// The ring provider with `TLS13_CHACHA20_POLY1305_SHA256` as its only cipher suite.
pub fn provider() -> CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    p
}

/// The suite that protects QUIC Initial packets (RFC 9001 §5.2 fixes it to AES-128-GCM).
fn initial_suite() -> Result<rustls::quic::Suite, ConfigError> {
    rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .and_then(|s| s.quic_suite())
        .ok_or_else(|| ConfigError::Quic("ring lacks the QUIC initial suite".into()))
}

/// `stream_window` is clamped to [`MIN_STREAM_WINDOW`]..=[`MAX_STREAM_WINDOW`] (the
/// configurations check it before it gets here).
fn transport(
    max_bidi_from_peer: u32,
    keep_alive: bool,
    stream_window: u32,
    connection_window: u32,
) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    // 2 500 ms is far below the VarInt limit.
    t.max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    // Only the Client pings: a Hub ping would restart the Hub's own idle timer (RFC 9000
    // §10.1) and delay the detection of a Client that went silent.
    t.keep_alive_interval(keep_alive.then_some(KEEP_ALIVE));
    t.max_concurrent_bidi_streams(VarInt::from_u32(max_bidi_from_peer));
    // Memory stays bounded whatever the peer sends: flow control stops it at these windows.
    let stream_window = stream_window.clamp(MIN_STREAM_WINDOW, MAX_STREAM_WINDOW);
    t.stream_receive_window(VarInt::from_u32(stream_window));
    t.receive_window(VarInt::from_u32(connection_window));
    t.send_window(u64::from(CONNECTION_WINDOW));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Nothing travels in QUIC DATAGRAM frames. quinn's default advertises them and queues
    // what the peer sends until the application reads it, which nothing here does: a peer
    // could hold memory outside every window above (each tiny datagram pinning a whole
    // receive buffer). Not advertised, a peer's DATAGRAM is a protocol violation.
    t.datagram_receive_buffer_size(None);
    Arc::new(t)
}

/// The rustls client configuration for one dial: TLS 1.3, ChaCha20-Poly1305, no resumption,
/// no early data.
pub fn tls_client_config(
    svid: Option<&Svid>,
    verifier: Arc<dyn ServerCertVerifier>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, ConfigError> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut tls = match svid {
        Some(svid) => builder.with_client_auth_cert(svid.chain.clone(), svid.key())?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.resumption = Resumption::disabled();
    tls.enable_early_data = false;
    Ok(tls)
}

/// The quinn client configuration: the Client accepts up to `max_queries` Hub-opened query
/// streams at once (more wait in the Hub for one to end: QUIC stream credit), and takes up to
/// `stream_window` bytes of each ahead of its reader (the requester → service direction).
pub fn quic_client_config(
    tls: rustls::ClientConfig,
    max_queries: u32,
    stream_window: u32,
) -> Result<quinn::ClientConfig, ConfigError> {
    let quic = QuicClientConfig::with_initial(Arc::new(tls), initial_suite()?)
        .map_err(|e| ConfigError::Quic(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport(
        max_queries,
        true,
        stream_window,
        CONNECTION_WINDOW,
    ));
    Ok(cfg)
}

/// The rustls server configuration for `svid`, verifying peers with `verifier`; no tickets,
/// no session cache, no early data.
pub fn tls_server_config(
    svid: &Svid,
    verifier: Arc<dyn ClientCertVerifier>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, ConfigError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(svid.chain.clone(), svid.key())?;
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    tls.session_storage = Arc::new(NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// The quinn server configuration (a Client may open one stream: the control stream). The
/// Hub takes up to `stream_window` bytes of each query ahead of its reader (the service →
/// requester direction), once the connection is [`authenticated`]; until then, at most
/// [`UNAUTHENTICATED_WINDOW`] bytes in all.
pub fn quic_server_config(
    tls: rustls::ServerConfig,
    stream_window: u32,
) -> Result<quinn::ServerConfig, ConfigError> {
    let quic = QuicServerConfig::with_initial(Arc::new(tls), initial_suite()?)
        .map_err(|e| ConfigError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport(1, false, stream_window, UNAUTHENTICATED_WINDOW));
    Ok(cfg)
}

/// Grants a connection the Hub accepted (its peer proven: a session whose checks passed) the
/// whole [`CONNECTION_WINDOW`], before any query is opened on it.
pub fn authenticated(conn: &quinn::Connection) {
    conn.set_receive_window(VarInt::from_u32(CONNECTION_WINDOW));
}

/// A QUIC endpoint on `bind` (a server when `server` is given) whose UDP socket has
/// [`UDP_BUFFER`] receive and send buffers, or as much as the kernel allows (a warning says
/// how to raise it). The Hub binds one per shard instead: [`shard::endpoints`]; the Client
/// dials from [`client_endpoint`].
pub fn endpoint(
    bind: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = udp_socket(bind, false)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket.into(),
        runtime,
    )
}

/// A UDP socket bound to `bind` with [`UDP_BUFFER`] buffers (as far as the kernel allows), in
/// an `SO_REUSEPORT` group when `reuse_port`.
fn udp_socket(bind: SocketAddr, reuse_port: bool) -> std::io::Result<socket2::Socket> {
    let socket = unbound_udp_socket(bind, reuse_port)?;
    socket.bind(&bind.into())?;
    Ok(socket)
}

/// [`udp_socket`] not bound yet, of `family`'s address family.
fn unbound_udp_socket(family: SocketAddr, reuse_port: bool) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(family),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if family.is_ipv6() {
        // Dual-stack when bound to `::` (a v4 Hub address still works), as std binds it.
        let _ = socket.set_only_v6(false);
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Best effort: the kernel caps both at its maxima; below them QUIC still works.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    // Linux reports twice what it grants (its bookkeeping overhead).
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    static WARNED: std::sync::Once = std::sync::Once::new();
    if granted < UDP_BUFFER {
        WARNED.call_once(|| tracing::warn!(
            granted_kib = granted / 1024,
            wanted_kib = UDP_BUFFER / 1024,
            "the QUIC socket's receive buffer is smaller than wanted; bursts may be dropped: raise net.core.rmem_max to {UDP_BUFFER}"
        ));
    }
    Ok(socket)
}

/// Reads frames off a QUIC stream, keeping any bytes past the last frame.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    /// The largest frame body taken.
    max: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::with_max(MAX_FRAME)
    }
}

impl FrameReader {
    /// A reader with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A reader that refuses a frame whose body is larger than `max` (at most [`MAX_FRAME`])
    /// as soon as its length prefix is read: [`FrameError::OverLimit`].
    pub fn with_max(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max: max.min(MAX_FRAME),
        }
    }

    /// A reader of a query stream's [`QueryHead`](frame::QueryHead).
    pub fn query_head() -> Self {
        Self::with_max(frame::MAX_QUERY_HEAD)
    }

    /// The next message; `Ok(None)` when the stream ended cleanly between frames.
    pub async fn read<T: DeserializeOwned>(
        &mut self,
        recv: &mut RecvStream,
    ) -> Result<Option<T>, StreamError> {
        loop {
            // Refused on its length prefix, before its body is read.
            let total = frame::frame_len(&self.buf)?;
            if let Some(len) = total
                .map(|t| t - frame::HEADER_LEN)
                .filter(|l| *l > self.max)
            {
                return Err(FrameError::OverLimit { len, max: self.max }.into());
            }
            if let Some(msg) = frame::decode(&mut self.buf)? {
                return Ok(Some(msg));
            }
            // Read no further than the end of the frame in progress (or its header).
            let want = match total {
                Some(total) => total - self.buf.len(),
                None => frame::HEADER_LEN - self.buf.len(),
            };
            match recv.read_chunk(want.min(MAX_FRAME), true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(StreamError::Truncated),
            }
        }
    }

    /// Bytes read past the last frame (raw payload that followed a header).
    pub fn into_leftover(self) -> Bytes {
        self.buf.freeze()
    }
}

/// Writes one message as a frame.
pub async fn write_frame<T: Serialize>(send: &mut SendStream, msg: &T) -> Result<(), StreamError> {
    let buf = frame::encode_to_vec(msg)?;
    send.write_chunk(buf.freeze()).await?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use ewii_common::spiffe::SpiffeId;

    use super::*;
    use crate::identity::ca::{new_key_and_csr, Ca};
    use crate::identity::verify::{Bundle, Expect, SpiffeVerifier};

    const TD: &str = "transport.test";

    fn svid(ca: &Ca, id: &SpiffeId) -> Svid {
        let (key, _) = new_key_and_csr().unwrap();
        let issued = ca.issue(&key, id, Duration::from_secs(3600)).unwrap();
        Svid::new(vec![issued.der], &key)
    }

    /// The TLS configurations of a Hub and a Client (`acme`) whose SVIDs one new CA issued,
    /// each verifying the other, offering `alpn`.
    pub(crate) fn tls_pair(alpn: &[&[u8]]) -> (rustls::ServerConfig, rustls::ClientConfig) {
        let ca = Ca::generate(TD).unwrap();
        let anchors = || Bundle::new(vec![ca.cert().clone()]);
        let hub = svid(&ca, &SpiffeId::hub(TD).unwrap());
        let client = svid(&ca, &SpiffeId::client(TD, "acme").unwrap());
        let verifier = SpiffeVerifier::new(anchors(), TD, Expect::Client);
        let server = tls_server_config(&hub, Arc::new(verifier), alpn).unwrap();
        let verifier = SpiffeVerifier::new(anchors(), TD, Expect::Hub);
        let client = tls_client_config(Some(&client), Arc::new(verifier), alpn[0]).unwrap();
        (server, client)
    }

    /// A QUIC connection on loopback between `server` and `client`: (the server's endpoint,
    /// the client's, the server's end of the connection, the client's).
    pub(crate) async fn handshake(
        server: quinn::ServerConfig,
        client: quinn::ClientConfig,
    ) -> (
        quinn::Endpoint,
        quinn::Endpoint,
        quinn::Connection,
        quinn::Connection,
    ) {
        let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let dialer = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = dialer
            .connect_with(client, endpoint.local_addr().unwrap(), "127.0.0.1")
            .unwrap();
        let accepted = endpoint.accept().await.unwrap().await.unwrap();
        let conn = connecting.await.unwrap();
        (endpoint, dialer, accepted, conn)
    }

    /// How many bytes `send` takes before a write waits: what the peer's window lets it run
    /// ahead of a reader that reads nothing. Flow-control credit up to the window is granted in
    /// the handshake and counted locally, so each write is polled once, with no wall-time
    /// wait: every write before the window completes on that poll, the first one past it does
    /// not (`timeout` polls its future before it looks at the clock).
    async fn taken_before_a_write_waits(send: &mut SendStream) -> u64 {
        let chunk = vec![0x5a; 64 * 1024];
        let mut taken = 0u64;
        // Bounded: 1,024 chunks is four times the connection's window.
        for _ in 0..1024 {
            match tokio::time::timeout(Duration::ZERO, send.write(&chunk)).await {
                Ok(written) => taken += written.unwrap() as u64,
                Err(_) => return taken,
            }
        }
        panic!("{taken} bytes taken and the writer never waited");
    }

    /// The per-query window each side sets is what the other side may send of one query
    /// ahead of a reader: the Client's for the Hub's writes (requester → service), the Hub's
    /// for the Client's (service → requester). A window outside the bounds is clamped to them.
    #[tokio::test]
    async fn each_side_s_query_window_is_what_the_other_may_send_ahead_of_its_reader() {
        let kib = |n: u32| n * 1024;
        for (hub_window, client_window, hub_takes, client_takes) in [
            (kib(2048), kib(256), kib(256), kib(2048)),
            (kib(128), kib(4096), kib(4096), kib(128)),
            (1, u32::MAX, MAX_STREAM_WINDOW, MIN_STREAM_WINDOW),
        ] {
            let (server_tls, client_tls) = tls_pair(&[b"test"]);
            let server = quic_server_config(server_tls, hub_window).unwrap();
            let client = quic_client_config(client_tls, 1, client_window).unwrap();
            let (_endpoint, _dialer, hub, client) = handshake(server, client).await;
            // As the Hub grants a session once its checks pass.
            authenticated(&hub);
            // The Hub opens a query's stream, as it does; the Client accepts it on the first
            // byte and reads nothing more.
            let (mut hub_send, _hub_recv) = hub.open_bi().await.unwrap();
            hub_send.write_all(b"q").await.unwrap();
            let (mut client_send, _client_recv) = client.accept_bi().await.unwrap();
            let hub_took = taken_before_a_write_waits(&mut hub_send).await + 1;
            let client_took = taken_before_a_write_waits(&mut client_send).await;
            assert_eq!(
                (hub_took, client_took),
                (u64::from(hub_takes), u64::from(client_takes)),
                "windows: Hub {hub_window}, Client {client_window}"
            );
        }
    }

    #[test]
    fn p5_only_chacha20_poly1305_on_tls13() {
        let p = provider();
        let suites: Vec<_> = p.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            suites,
            [rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256]
        );
        assert!(p.cipher_suites.iter().all(|s| s.tls13().is_some()));
    }
}
