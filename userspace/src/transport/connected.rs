//! The Client's QUIC endpoint: a UDP socket connected to the Hub, so that the kernel hands it
//! the Hub's datagrams and no one else's (P13).
//!
//! An unconnected socket takes a datagram from any source that reaches its port (through a
//! NAT, anyone the mapping lets in), and quinn parses each one. A stranger's datagrams would
//! then share the socket's receive buffer with the Hub's (a flood displaces them), reach a
//! QUIC parser before any authentication, and could draw an answer: quinn sends a stateless
//! reset to whatever source a packet for one of the endpoint's retired connection IDs claims.
//! Connected, the socket is found only for datagrams from the Hub's address and port; the
//! kernel answers everything else as it answers a closed port. The Hub answers from the
//! address and port the Client dials, as any QUIC server does (it announces no preferred
//! address), and a NAT or load balancer in front of it must keep that pair, as UDP's do.
//!
//! What connecting adds: the kernel reports an ICMP error about the Hub's address (port
//! unreachable while the Hub restarts, or one forged by anyone who knows both addresses and
//! ports, from anywhere the Client's NAT lets ICMP through) on the socket's next call, which
//! consumes it. quinn's tokio socket retries a receive that fails, and (vendored patch,
//! third_party/README.md) makes a send that fails once more: such an error costs one system
//! call, and a datagram only if a second error lands between the two. The tests below keep
//! both true across quinn upgrades.
//!
//! What it costs: connecting fixes the socket's source address too. A NAT rebinding on the way
//! is still the Hub's to follow (QUIC migrates, `faults::p14_a_path_change_…`), but if the
//! Client's own address goes (a host renumbered, an IPv6 temporary address expired, a
//! container's network detached; a container's address rarely changes while it lives), its
//! datagrams stop, the session ends at the idle timeout, and the Client dials again from the
//! address it has then (P14): its open queries are reset, where an unconnected socket would
//! have migrated them.

use std::io;
use std::net::SocketAddr;

/// A client-only QUIC endpoint on an ephemeral port of `peer`'s family, its socket connected
/// to `peer`, with [`super::UDP_BUFFER`] buffers as far as the kernel allows. The connect binds
/// it, inside the one system call: no bound, unconnected socket is left (for longer than that
/// call) for a datagram to reach, or for `ewii-client verify` to read as open to anyone.
pub fn client_endpoint(peer: SocketAddr) -> io::Result<quinn::Endpoint> {
    let socket = super::unbound_udp_socket(peer, false)?;
    socket
        .connect(&peer.into())
        .map_err(|e| io::Error::new(e.kind(), format!("connect to {peer}: {e}")))?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        runtime,
    )
}

#[cfg(test)]
mod tests {
    use std::io::IoSliceMut;
    use std::net::UdpSocket;
    use std::sync::Arc;
    use std::time::Duration;

    use quinn::udp::{RecvMeta, Transmit};
    use quinn::AsyncUdpSocket;

    use tokio::io::Interest;

    use super::*;

    const SOON: Duration = Duration::from_secs(10);

    /// A UDP socket on loopback's port nothing listens on, the port freed at once.
    fn closed_port() -> SocketAddr {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// A stranger's datagram to `client` (a loopback address) is answered as a closed port
    /// would answer it: the stranger's socket reads the ICMP port unreachable as a refusal.
    fn a_stranger_is_refused(client: SocketAddr) {
        let any = if client.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        };
        let stranger = UdpSocket::bind(any).unwrap();
        stranger.connect(client).unwrap();
        stranger.set_read_timeout(Some(SOON)).unwrap();
        stranger.send(&[0x40; 1200]).unwrap();
        let refused = stranger.recv(&mut [0u8; 64]).unwrap_err();
        assert_eq!(
            refused.kind(),
            io::ErrorKind::ConnectionRefused,
            "{client}: {refused}"
        );
    }

    /// `socket` once the kernel has an error pending on it (`EPOLLERR`).
    async fn error_pending(socket: UdpSocket) -> UdpSocket {
        let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
        let ready = tokio::time::timeout(SOON, socket.ready(Interest::ERROR))
            .await
            .expect("no ICMP error reached the socket")
            .unwrap();
        assert!(ready.is_error());
        socket.into_std().unwrap()
    }

    #[tokio::test]
    async fn p13_a_strangers_datagram_is_refused_by_the_kernel_and_the_hubs_reaches_quic() {
        let hub = UdpSocket::bind("127.0.0.1:0").unwrap();
        let endpoint = client_endpoint(hub.local_addr().unwrap()).unwrap();
        let port = endpoint.local_addr().unwrap().port();
        let client = SocketAddr::from(([127, 0, 0, 1], port));
        a_stranger_is_refused(client);

        // The Hub's address is let in: its datagram is taken (and dropped by QUIC as
        // garbage), with no refusal.
        hub.connect(client).unwrap();
        hub.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        hub.send(&[0x40; 1200]).unwrap();
        let quiet = hub.recv(&mut [0u8; 64]).unwrap_err();
        assert_eq!(quiet.kind(), io::ErrorKind::WouldBlock, "{quiet}");
    }

    /// A socket connected to a loopback port nothing listens on, after a send there, with the
    /// kernel's report of the ICMP port unreachable pending, wrapped by quinn's runtime as
    /// `client_endpoint`'s is; and that port, free.
    async fn icmp_error_pending() -> (SocketAddr, Arc<dyn AsyncUdpSocket>) {
        let peer = closed_port();
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(peer).unwrap();
        socket.set_nonblocking(true).unwrap();
        socket.send(b"hello?").unwrap();
        let socket = error_pending(socket).await;
        let wrapped = quinn::default_runtime()
            .unwrap()
            .wrap_udp_socket(socket)
            .unwrap();
        (peer, wrapped)
    }

    #[tokio::test]
    async fn an_icmp_error_about_the_hub_does_not_end_quics_receive() {
        let (peer, wrapped) = icmp_error_pending().await;

        // The peer (back) sends: that datagram is what the receive returns.
        let back = UdpSocket::bind(peer).unwrap();
        back.send_to(b"here", wrapped.local_addr().unwrap())
            .unwrap();
        let mut buf = [0u8; 64];
        let mut meta = [RecvMeta::default()];
        let got = tokio::time::timeout(
            SOON,
            std::future::poll_fn(|cx| {
                wrapped.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta)
            }),
        )
        .await
        .expect("the datagram was not read")
        .expect("the ICMP error ended the receive");
        assert_eq!(got, 1);
        assert_eq!(&buf[..meta[0].len], b"here");
        assert_eq!(meta[0].addr, peer);
    }

    #[tokio::test]
    async fn a_send_that_meets_an_icmp_error_about_the_hub_still_goes_out() {
        let (peer, wrapped) = icmp_error_pending().await;

        // The peer is back; the next send meets the error the kernel holds, and goes out.
        let back = UdpSocket::bind(peer).unwrap();
        back.set_read_timeout(Some(SOON)).unwrap();
        wrapped
            .try_send(&Transmit {
                destination: peer,
                ecn: None,
                contents: b"again",
                segment_size: None,
                src_ip: None,
            })
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = back.recv_from(&mut buf).expect("the send was dropped");
        assert_eq!(&buf[..n], b"again");
        assert_eq!(from.port(), wrapped.local_addr().unwrap().port());
    }

    /// The same over IPv6: a Hub on `[::1]` is dialled through a connected socket of that
    /// family (a whole handshake and a stream each way), and a stranger is refused.
    #[tokio::test]
    async fn p13_an_ipv6_hub_is_dialled_through_a_connected_socket_and_a_stranger_refused() {
        if UdpSocket::bind("[::1]:0").is_err() {
            eprintln!("skipped: no IPv6 loopback here");
            return;
        }
        let (server_tls, client_tls) = super::super::tests::tls_pair(&[b"ewii-test"]);
        let server = super::super::quic_server_config(server_tls, super::super::STREAM_WINDOW);
        let hub = quinn::Endpoint::server(server.unwrap(), "[::1]:0".parse().unwrap()).unwrap();
        let hub_addr = hub.local_addr().unwrap();
        let endpoint = client_endpoint(hub_addr).unwrap();
        assert!(endpoint.local_addr().unwrap().is_ipv6());
        let client = super::super::quic_client_config(client_tls, 4, super::super::STREAM_WINDOW);
        let connecting = endpoint
            .connect_with(client.unwrap(), hub_addr, "localhost")
            .unwrap();
        let accepted =
            tokio::time::timeout(SOON, async { hub.accept().await.unwrap().await.unwrap() })
                .await
                .expect("no handshake");
        let conn = connecting.await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"ping").await.unwrap();
        send.finish().unwrap();
        let (mut back, mut got) = accepted.accept_bi().await.unwrap();
        assert_eq!(got.read_to_end(64).await.unwrap(), b"ping");
        back.write_all(b"pong").await.unwrap();
        back.finish().unwrap();
        assert_eq!(recv.read_to_end(64).await.unwrap(), b"pong");

        let port = endpoint.local_addr().unwrap().port();
        a_stranger_is_refused(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)));
    }
}
