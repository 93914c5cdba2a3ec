//! One QUIC endpoint per shard, all on one UDP port, each datagram steered by the kernel to
//! the shard that owns its connection.
//!
//! A Hub with N shards (`threads`) runs N single-threaded runtimes, each with an endpoint of
//! its own on an `SO_REUSEPORT` socket bound to the Hub's address. Everything of one Client's
//! connection — its packets, its connection and session tasks, its queries' TCP sockets — runs
//! on that connection's shard, so a byte crosses no thread on its way through the Hub (in a
//! multi-threaded runtime, the hand-offs between workers cost 10–20 % of bulk throughput:
//! docs/benchmarks.md). Clients spread over the shards.
//!
//! **Steering.** By default the kernel picks a group's socket by a hash of the 4-tuple, which
//! changes when a Client's NAT rebinds its port (P14: the connection migrates): the datagrams
//! would reach a shard that does not know the connection. So every connection ID a shard
//! issues has a first byte ≡ shard (mod N) — the other seven bytes are random — and a classic
//! BPF program attached to the group reads that byte of each short-header datagram's
//! destination connection ID and hands the datagram to the socket of that shard. Long-header
//! datagrams (the handshake) are left to the kernel's keyed 4-tuple hash: a handshake does not
//! migrate (RFC 9000 §9), and a sender cannot aim a flood of Initials at one shard by the IDs it
//! makes up. The shard that gets a Client's first Initial issues the IDs the Client's
//! short-header packets carry from then on. The program needs no privilege. What an observer
//! learns: connection IDs of one connection share their residue mod N, log2(N) bits (as
//! QUIC-LB's plaintext mode).
//!
//! **One Hub per address.** The group would let a second Hub of the same user join the port.
//! A plain bind comes first and refuses an address anyone holds, as without shards; and for
//! the Hub's life an abstract Unix socket named after the address is held, so that two Hubs
//! starting at once cannot both pass that bind.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{AsyncTimer, AsyncUdpSocket, ConnectionId, ConnectionIdGenerator, Runtime};
use rand::RngCore;
use tokio::runtime::Handle;

/// Most shards: one byte of each connection ID names its shard.
pub const MAX_SHARDS: usize = 256;
/// Length of the connection IDs a shard issues (quinn's default).
const CID_LEN: usize = 8;

/// Binds one QUIC server endpoint per runtime in `shards`, all on `bind` (after the first,
/// on the port it got), with datagrams steered by connection ID. One shard: one plain socket.
pub fn endpoints(
    bind: SocketAddr,
    server: &quinn::ServerConfig,
    shards: &[Handle],
) -> io::Result<Endpoints> {
    let n = shards.len();
    if n == 0 || n > MAX_SHARDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{n} shards: between 1 and {MAX_SHARDS}"),
        ));
    }
    let mut addr = bind;
    let mut held = None;
    if n > 1 {
        // A plain bind first: an address anyone holds (another Hub included) is refused here
        // as it would be without sharding; the group then takes the port this bind proved free.
        addr = super::udp_socket(bind, false)?
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("the QUIC socket has no IP address"))?;
        held = Some(hold(addr)?);
    }
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = super::udp_socket(addr, n > 1)?;
        addr = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("the QUIC socket has no IP address"))?;
        sockets.push(socket);
    }
    if n > 1 {
        // After every bind: the program serves the whole group, indexed in bind order.
        crate::enforce::steer::attach_reuseport_cbpf(&sockets[0], &steering_program(n as u32))?;
    }
    let endpoints = sockets
        .into_iter()
        .zip(shards)
        .enumerate()
        .map(|(shard, (socket, handle))| {
            let mut config = quinn::EndpointConfig::default();
            if n > 1 {
                let cids = ShardCids::new(shard, n);
                config.cid_generator(move || Box::new(cids));
            }
            quinn::Endpoint::new(
                config,
                Some(server.clone()),
                socket.into(),
                Arc::new(ShardRuntime(handle.clone())),
            )
        })
        .collect::<io::Result<_>>()?;
    Ok(Endpoints {
        endpoints,
        held: AddressHeld { _socket: held },
    })
}

/// The endpoints of the shards, in shard order, and what keeps their address this Hub's.
#[derive(Debug)]
pub struct Endpoints {
    /// One per shard.
    pub endpoints: Vec<quinn::Endpoint>,
    /// Keep it as long as the endpoints.
    pub held: AddressHeld,
}

/// Holds the Hub's address against a second sharded Hub until dropped.
#[derive(Debug)]
pub struct AddressHeld {
    /// Closed (and the name released) when dropped.
    _socket: Option<std::os::unix::net::UnixDatagram>,
}

/// Binds the abstract Unix socket `ewii-hub/udp/<addr>` (in this network namespace, released
/// when the process ends): a second sharded Hub on `addr` fails here.
fn hold(addr: SocketAddr) -> io::Result<std::os::unix::net::UnixDatagram> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("ewii-hub/udp/{addr}");
    let unix = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    std::os::unix::net::UnixDatagram::bind_addr(&unix).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another Hub is starting on {addr}"),
        ),
        _ => e,
    })
}

/// quinn's tokio runtime pinned to one shard: the endpoint's driver and every connection's
/// driver are spawned there, and the socket and timers are registered with its reactor,
/// whatever thread calls.
#[derive(Debug)]
struct ShardRuntime(Handle);

impl Runtime for ShardRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn AsyncTimer>> {
        let _shard = self.0.enter();
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let _shard = self.0.enter();
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }

    fn now(&self) -> Instant {
        quinn::TokioRuntime.now()
    }
}

/// Random connection IDs whose first byte is ≡ `shard` (mod `shards`).
#[derive(Debug, Clone, Copy)]
struct ShardCids {
    shard: u16,
    shards: u16,
}

impl ShardCids {
    fn new(shard: usize, shards: usize) -> Self {
        // Both ≤ MAX_SHARDS (256), checked by `endpoints`.
        Self {
            shard: shard as u16,
            shards: shards as u16,
        }
    }
}

impl ConnectionIdGenerator for ShardCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        rand::rng().fill_bytes(&mut bytes);
        // The byte values ≡ shard (mod N) are shard, shard + N, …: pick one of them at random.
        let choices = (256 - self.shard).div_ceil(self.shards);
        let k = u16::from(bytes[0]) % choices;
        // Below 256 by the choice of `choices`.
        bytes[0] = (self.shard + k * self.shards) as u8;
        ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Classic BPF opcodes (linux/filter.h); `libc` has the structures but not these.
mod op {
    /// `A = packet[k]`, one byte (`BPF_LD | BPF_B | BPF_ABS`).
    pub const LOAD_BYTE: u16 = 0x30;
    /// Jump by `jt` if `A & k`, else by `jf` (`BPF_JMP | BPF_JSET | BPF_K`).
    pub const JUMP_IF_SET: u16 = 0x45;
    /// `A = A % k` (`BPF_ALU | BPF_MOD | BPF_K`).
    pub const MOD: u16 = 0x94;
    /// Return `A` (`BPF_RET | BPF_A`).
    pub const RETURN_A: u16 = 0x16;
    /// Return `k` (`BPF_RET | BPF_K`).
    pub const RETURN_K: u16 = 0x06;
}

/// What the program returns to leave a datagram to the kernel's 4-tuple hash: any index past
/// the group's last socket.
const BY_HASH: u32 = u32::MAX;

/// The program the kernel runs on each datagram (its UDP payload from offset 0) to pick the
/// socket. A short header (first bit 0): the first byte of the destination connection ID, the
/// packet's second byte, modulo `shards`. A long header (the handshake): [`BY_HASH`]. A
/// datagram too short for the byte ends the program with 0 (the kernel's rule for a load past
/// the end): shard 0 gets it, and QUIC drops it as garbage.
fn steering_program(shards: u32) -> [libc::sock_filter; 6] {
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        insn(op::LOAD_BYTE, 0, 0, 0),
        // Long header: to the return at 5.
        insn(op::JUMP_IF_SET, 3, 0, 0x80),
        insn(op::LOAD_BYTE, 0, 0, 1),
        insn(op::MOD, 0, 0, shards),
        insn(op::RETURN_A, 0, 0, 0),
        insn(op::RETURN_K, 0, 0, BY_HASH),
    ]
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    /// `n` sockets in one `SO_REUSEPORT` group on a loopback port, steered by the program; each
    /// datagram they get comes out of the receiver with the index of its socket.
    struct Group {
        addr: SocketAddr,
        got: tokio::sync::mpsc::UnboundedReceiver<(usize, Vec<u8>)>,
    }

    impl Group {
        fn new(n: usize) -> Self {
            let mut addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
            let sockets: Vec<UdpSocket> = (0..n)
                .map(|_| {
                    let s = crate::transport::udp_socket(addr, true).unwrap();
                    addr = s.local_addr().unwrap().as_socket().unwrap();
                    s.into()
                })
                .collect();
            crate::enforce::steer::attach_reuseport_cbpf(&sockets[0], &steering_program(n as u32))
                .unwrap();
            let (tell, got) = tokio::sync::mpsc::unbounded_channel();
            for (i, socket) in sockets.into_iter().enumerate() {
                socket.set_nonblocking(true).unwrap();
                let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
                let tell = tell.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok((len, _)) = socket.recv_from(&mut buf).await {
                        if tell.send((i, buf[..len].to_vec())).is_err() {
                            break;
                        }
                    }
                });
            }
            Self { addr, got }
        }

        /// Sends `packet` to the group from `client` and returns the index of the socket that
        /// received it.
        async fn landing(&mut self, client: &UdpSocket, packet: &[u8]) -> usize {
            client.send_to(packet, self.addr).unwrap();
            let (i, got) = tokio::time::timeout(Duration::from_secs(2), self.got.recv())
                .await
                .unwrap_or_else(|_| panic!("no socket got {packet:?}"))
                .unwrap();
            assert_eq!(got, packet);
            i
        }
    }

    #[tokio::test]
    async fn p14_the_kernel_hands_each_datagram_to_the_shard_its_connection_id_names() {
        let shards = 4;
        let mut group = Group::new(shards);
        // One client 4-tuple for every packet: without the program the kernel's hash would put
        // them all on one socket.
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        for byte in 0u8..12 {
            let short = [0x40, byte, 0xaa, 0xbb];
            assert_eq!(
                group.landing(&client, &short).await,
                usize::from(byte) % shards,
                "short header, first ID byte {byte}"
            );
        }
        // Long headers go by the 4-tuple, whatever ID they carry: one client, one socket…
        let long = |byte: u8| [0xc0, 0, 0, 0, 1, 8, byte, 0xcc];
        let first = group.landing(&client, &long(0)).await;
        for byte in 1u8..12 {
            assert_eq!(
                group.landing(&client, &long(byte)).await,
                first,
                "long header, first ID byte {byte}"
            );
        }
        // …and many clients, several sockets (all 16 on one of 4 by chance: 1 in 10^9).
        let mut spread = std::collections::HashSet::new();
        for _ in 0..16 {
            let other = UdpSocket::bind("127.0.0.1:0").unwrap();
            spread.insert(group.landing(&other, &long(0)).await);
        }
        assert!(
            spread.len() > 1,
            "long headers all went to socket {spread:?}"
        );
        // A connection's IDs as each shard issues them bring its datagrams back to it.
        for shard in 0..shards {
            let mut cids = ShardCids::new(shard, shards);
            for _ in 0..16 {
                let cid = cids.generate_cid();
                assert_eq!(cid.len(), CID_LEN);
                let mut packet = vec![0x41];
                packet.extend_from_slice(&cid);
                assert_eq!(
                    group.landing(&client, &packet).await,
                    shard,
                    "an ID of shard {shard}: {cid:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_port_in_use_is_refused_even_by_a_sharded_hub() {
        let server = test_server_config();
        let shards = vec![Handle::current(); 3];
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let bound = endpoints(any, &server, &shards).unwrap();
        let first = &bound.endpoints;
        assert_eq!(first.len(), 3);
        let taken = first[0].local_addr().unwrap();
        assert!(first.iter().all(|e| e.local_addr().unwrap() == taken));
        // A second sharded Hub, a one-shard Hub, and anything else: all refused.
        for n in [3, 1] {
            match endpoints(taken, &server, &shards[..n]).map(|e| e.endpoints) {
                Ok(_) => panic!("{n} shards bound a port in use"),
                Err(err) => assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{n} shards: {err}"),
            }
        }
        assert!(UdpSocket::bind(taken).is_err());
        // Two Hubs starting at once: the second cannot hold the address the first holds.
        assert_eq!(hold(taken).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        match endpoints(any, &server, &[]).map(|e| e.endpoints) {
            Ok(_) => panic!("no shard bound"),
            Err(err) => assert_eq!(err.kind(), io::ErrorKind::InvalidInput),
        }
    }

    fn test_server_config() -> quinn::ServerConfig {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["hub".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(super::super::provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        super::super::quic_server_config(tls, super::super::STREAM_WINDOW).unwrap()
    }

    #[test]
    fn shard_ids_are_random_apart_from_their_residue() {
        let mut cids = ShardCids::new(3, 5);
        let ids: std::collections::HashSet<Vec<u8>> =
            (0..200).map(|_| cids.generate_cid().to_vec()).collect();
        assert_eq!(ids.len(), 200, "IDs repeat");
        let firsts: std::collections::HashSet<u8> = ids.iter().map(|id| id[0]).collect();
        assert!(firsts.iter().all(|b| b % 5 == 3), "{firsts:?}");
        // 52 byte values are ≡ 3 (mod 5); 200 draws find most of them.
        assert!(firsts.len() > 30, "first bytes barely vary: {firsts:?}");
        // The largest such value, 253, fits: no wrap to a wrong residue.
        let mut top = ShardCids::new(255, 256);
        assert!((0..50).all(|_| top.generate_cid()[0] == 255));
    }
}
