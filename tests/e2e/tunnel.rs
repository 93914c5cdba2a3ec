//! Queries through the tunnel (P4, P11, P14): byte-exact transfer, half-close, reset,
//! allow-list refusal, concurrency, TLS callers, and reconnection after a Hub restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ewii_common::audit::{Event, Outcome};
use ewii_tests::*;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Writes `data` and reads everything back until EOF, concurrently (so that neither side's
/// buffers fill up and deadlock).
async fn roundtrip(addr: SocketAddr, data: Vec<u8>) -> Vec<u8> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    writer.await.unwrap();
    back
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            // xorshift: cheap bytes that are not all alike
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A Hub with four shards, and one connected Client per name, each with a service of that name
/// to an echo server.
async fn four_shards_serving(names: &[&'static str]) -> (TestHub, Vec<TestClient>) {
    let echo = echo_server().await;
    let services: Vec<Service> = names.iter().map(|n| Service::tcp(n, n, "db")).collect();
    let hub = TestHub::start_custom(&services, "threads = 4").await;
    let mut clients = Vec::new();
    for name in names {
        clients.push(TestClient::enrol_and_run(&hub, name, &[("db", echo.to_string())]).await);
    }
    for name in names {
        hub.wait_connected(name).await;
    }
    (hub, clients)
}

/// A Hub with four shards: eight Clients spread over them, and every Client's queries are
/// byte-exact, through a service listener that follows its Client to its connection's shard
/// (the listener starts on shard 0, so most of them move).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_clients_spread_over_the_hubs_shards_and_each_serves_its_queries() {
    const NAMES: [&str; 8] = ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7"];
    let (hub, clients) = four_shards_serving(&NAMES).await;
    for round in 0..3u64 {
        for (i, name) in NAMES.iter().enumerate() {
            let data = pattern(64 << 10, round * 8 + i as u64);
            let back = roundtrip(hub.service(name), data.clone()).await;
            assert!(back == data, "{name}, round {round}: bytes differ");
        }
    }
    let per_shard = hub.handle().connections_per_shard();
    assert_eq!(per_shard.len(), 4, "{per_shard:?}");
    assert_eq!(
        per_shard.iter().sum::<usize>(),
        NAMES.len(),
        "{per_shard:?}"
    );
    // All eight on one shard by chance: 4 × (1/4)^8, about 1 in 16,000.
    assert!(
        per_shard.iter().filter(|&&n| n > 0).count() >= 2,
        "the connections did not spread over the shards: {per_shard:?}"
    );
    for mut client in clients {
        client.stop().await;
    }
}

/// Junk at a sharded Hub's port, of every shape its steering reads: empty and one-byte
/// datagrams (too short for the program's load), short headers naming every shard by their
/// first ID byte, long headers with made-up IDs and an unknown version. Every shard gets some;
/// each drops it, and no Client's session is lost or slowed to failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_p14_junk_datagrams_at_every_shard_are_dropped_and_no_session_is_lost() {
    const NAMES: [&str; 4] = ["j0", "j1", "j2", "j3"];
    let (hub, clients) = four_shards_serving(&NAMES).await;
    let sessions_up = |h: &TestHub| {
        h.audit
            .records()
            .iter()
            .filter(|r| r.event == Event::SessionUp)
            .count()
    };
    // The registry lists a session before its record is written: wait for the four records.
    poll_until("the sessions' records", SOON, || {
        sessions_up(&hub) >= NAMES.len()
    })
    .await;
    let up_before = sessions_up(&hub);
    let junk = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut tail = pattern(1_400, 5);
    for round in 0..20u8 {
        let mut shapes: Vec<Vec<u8>> = vec![vec![], vec![0x40], vec![0xc0, 0, 0]];
        for byte in 0..=255u8 {
            let mut short = vec![0x40 | (round & 0x3f), byte];
            short.extend_from_slice(&tail[..40]);
            shapes.push(short);
        }
        for version in [1u32, 0x1a2a_3a4a] {
            let mut long = vec![0xc0];
            long.extend_from_slice(&version.to_be_bytes());
            long.push(8);
            long.extend_from_slice(&tail[..1_200]);
            shapes.push(long);
        }
        for datagram in &shapes {
            junk.send_to(datagram, hub.addr).await.unwrap();
        }
        tail.rotate_left(7);
        // Between rounds, the Clients' queries still go through.
        for name in NAMES {
            let data = pattern(4 << 10, u64::from(round));
            let back = roundtrip(hub.service(name), data.clone()).await;
            assert!(back == data, "{name}, round {round}: bytes differ");
        }
    }
    assert_eq!(hub.handle().connections(), NAMES.len());
    assert_eq!(
        sessions_up(&hub),
        up_before,
        "a session was lost and opened again"
    );
    for mut client in clients {
        client.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_one_mib_each_way_is_byte_exact_and_p11_both_sides_audit_it() {
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let client = TestClient::enrol_and_run(&hub, "acme", &[("db", echo.to_string())]).await;
    hub.wait_connected("acme").await;

    let data = pattern(1 << 20, 7);
    let back = roundtrip(hub.service("pg"), data.clone()).await;
    assert_eq!(back.len(), data.len());
    assert!(back == data, "bytes differ");

    let h = hub.wait_audit("hub query", is(Event::Query)).await;
    let qid = h.query_id.expect("query id");
    let c = client
        .wait_audit("client query", |r| {
            r.event == Event::Query && r.query_id == Some(qid)
        })
        .await;
    for r in [&h, &c] {
        assert_eq!(r.outcome, Some(Outcome::Ok));
        assert_eq!(r.bytes_up, Some(1 << 20));
        assert_eq!(r.bytes_down, Some(1 << 20));
        assert_eq!(
            r.client.as_deref(),
            Some("spiffe://test.ewii.local/client/acme")
        );
        assert!(r
            .source
            .as_deref()
            .unwrap()
            .starts_with("test-principal@127.0.0.1:"));
        assert_eq!(r.destination.as_ref().unwrap().name, "db");
        assert!(r.duration_ms.is_some());
        assert_eq!(r.session_id, h.session_id);
    }
    assert_eq!(
        c.destination.as_ref().unwrap().address,
        Some(echo.to_string())
    );
    assert_eq!(
        h.destination.as_ref().unwrap().address,
        None,
        "the Hub never learns addresses"
    );
    // The JSON lines carry the same fields.
    let line: serde_json::Value = serde_json::from_str(&h.to_json_line()).unwrap();
    for key in [
        "time",
        "event",
        "session_id",
        "query_id",
        "client",
        "source",
        "destination",
        "bytes_up",
        "bytes_down",
        "duration_ms",
        "outcome",
    ] {
        assert!(line.get(key).is_some(), "missing {key} in {line}");
    }
}

#[tokio::test]
async fn p4_half_close_crosses_the_tunnel_both_ways() {
    let reporter = eof_reporter().await;
    let hub = TestHub::start(&[Service::tcp("r", "acme", "rep")]).await;
    let _client = TestClient::enrol_and_run(&hub, "acme", &[("rep", reporter.to_string())]).await;
    hub.wait_connected("acme").await;
    // The server answers only after it has seen our FIN; we read its answer on the half that
    // is still open, then its FIN.
    let back = roundtrip(hub.service("r"), b"12345".to_vec()).await;
    assert_eq!(back, b"EOF after 5 bytes");
}

#[tokio::test]
async fn p4_a_reset_destination_resets_the_requester() {
    let rst = resetter().await;
    let hub = TestHub::start(&[Service::tcp("x", "acme", "rst")]).await;
    let client = TestClient::enrol_and_run(&hub, "acme", &[("rst", rst.to_string())]).await;
    hub.wait_connected("acme").await;
    assert_eq!(
        requester_gets_nothing(hub.service("x"), b"x").await,
        Some(std::io::ErrorKind::ConnectionReset)
    );
    let c = client.wait_audit("query", is(Event::Query)).await;
    assert_eq!(c.outcome, Some(Outcome::Failed));
    assert!(c.reason.unwrap().contains("connection reset"));
}

/// The other direction of `p4_a_reset_destination_resets_the_requester`: a requester that
/// aborts (RST) makes the Client abort its connection to the destination, which reads a reset,
/// not a clean end of stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_a_reset_requester_resets_the_destination() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = listener.local_addr().unwrap();
    let (got_bytes, mut bytes_seen) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let (ended, end) = tokio::sync::oneshot::channel::<Result<usize, std::io::ErrorKind>>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 64];
        let mut total = 0;
        let how = loop {
            match s.read(&mut buf).await {
                Ok(0) => break Ok(total),
                Ok(n) => {
                    total += n;
                    let _ = got_bytes.send(total);
                }
                Err(e) => break Err(e.kind()),
            }
        };
        let _ = ended.send(how);
    });
    let (hub, client) = tunnel_to(dest).await;
    let s = TcpStream::connect(hub.service("x")).await.unwrap();
    let mut s = s;
    s.write_all(b"hello").await.unwrap();
    assert_eq!(
        tokio::time::timeout(SOON, bytes_seen.recv()).await.unwrap(),
        Some(5),
        "the bytes went through first"
    );
    s.set_zero_linger().unwrap();
    drop(s);
    let how = tokio::time::timeout(SOON, end).await.unwrap().unwrap();
    assert_eq!(how, Err(std::io::ErrorKind::ConnectionReset));
    let h = hub.wait_audit("query", is(Event::Query)).await;
    assert_eq!(h.outcome, Some(Outcome::Failed));
    assert_eq!(h.reason.as_deref(), Some("tcp connection reset"));
    let c = client.wait_audit("query", is(Event::Query)).await;
    assert_eq!(c.outcome, Some(Outcome::Failed));
    assert_eq!(c.reason.as_deref(), Some("stream reset by peer (1)"));
    assert_eq!(c.bytes_up, Some(5));
}

/// The state of the IPv4 TCP socket at `local` connected to `peer`, as `/proc/net/tcp` gives
/// it (`01` established, `08` close-wait: the peer's FIN arrived), and its send queue (bytes
/// not yet acknowledged).
fn tcp_state(local: SocketAddr, peer: SocketAddr) -> Option<(String, usize)> {
    let addr = |hex: &str| {
        let (ip, port) = hex.split_once(':').unwrap();
        let ip = u32::from_str_radix(ip, 16).unwrap().to_le_bytes();
        SocketAddr::from((ip, u16::from_str_radix(port, 16).unwrap()))
    };
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let queued = usize::from_str_radix(f[4].split_once(':').unwrap().0, 16).unwrap();
        ((addr(f[1]), addr(f[2])) == (local, peer)).then(|| (f[3].to_owned(), queued))
    })
}

/// A Hub whose service `x` reaches `dest` through a connected Client (entry `db`).
async fn tunnel_to(dest: SocketAddr) -> (TestHub, TestClient) {
    let hub = TestHub::start(&[Service::tcp("x", "acme", "db")]).await;
    let client = TestClient::enrol_and_run(&hub, "acme", &[("db", dest.to_string())]).await;
    hub.wait_connected("acme").await;
    (hub, client)
}

/// A query record that ended well, for the reason `said` (none for a plain end), with these
/// bytes (up, down).
fn ended_well(r: &ewii_common::audit::AuditRecord, said: Option<&str>, (up, down): (u64, u64)) {
    assert_eq!(r.outcome, Some(Outcome::Ok), "{r:?}");
    assert_eq!(r.reason.as_deref(), said, "{r:?}");
    assert_eq!((r.bytes_up, r.bytes_down), (Some(up), Some(down)), "{r:?}");
}

/// P4, P11: a destination that resets its connection once the requester's end has reached
/// it, as PostgreSQL over TLS does (it exits on `Terminate` with the client's `close_notify`
/// unread, and its kernel resets for it), ended its query well, and lost none of its answer:
/// here it writes 1 MiB after the requester's FIN arrived, and resets as soon as its kernel
/// has handed the last byte over (a stream reset would have let the tunnel drop what it had
/// not yet passed on). The requester reads every byte, then the end of the stream (where a
/// direct connection reads a reset after the same bytes); the Client records the reset, the
/// Hub a plain end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_p11_a_destination_that_resets_after_the_requesters_end_loses_no_byte_of_its_answer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = listener.local_addr().unwrap();
    let answer = pattern(1 << 20, 7);
    let sent = answer.clone();
    tokio::spawn(async move {
        let (mut s, peer) = listener.accept().await.unwrap();
        s.read_exact(&mut [0; 5]).await.unwrap();
        // The requester's FIN arrived, behind bytes this side leaves unread: the close is a
        // reset.
        poll_until("the requester's end at the destination", SOON, || {
            tcp_state(dest, peer).is_some_and(|(state, _)| state == "08")
        })
        .await;
        s.write_all(&sent).await.unwrap();
        poll_until("the answer acknowledged", SOON, || {
            tcp_state(dest, peer).is_some_and(|(_, queued)| queued == 0)
        })
        .await;
        drop(s);
    });
    let (hub, client) = tunnel_to(dest).await;
    let mut s = TcpStream::connect(hub.service("x")).await.unwrap();
    let request = b"hello, and more the destination never reads";
    s.write_all(request).await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut got))
        .await
        .expect("the answer in time")
        .expect("every byte, then the end of the stream");
    assert!(got == answer, "{} bytes of {}", got.len(), answer.len());
    let bytes = (request.len() as u64, 1 << 20);
    let c = client.wait_audit("query", is(Event::Query)).await;
    let said = "the destination reset its connection after the requester's end reached it; \
                passed on as the end of the stream";
    ended_well(&c, Some(said), bytes);
    let h = hub.wait_audit("query", is(Event::Query)).await;
    ended_well(&h, None, bytes);
}

/// A destination's reset after the requester's end went is an end only if every byte before
/// that end reached the destination: one that stops reading (its receive buffer is 4 KiB
/// here) and resets with the requester's 256 KiB still queued in the Client's socket, which
/// the reset purges, failed the query, on both sides, and the requester reads the reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_p11_a_reset_that_purges_the_requesters_bytes_is_a_failure_after_its_end_too() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let dest = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, client) = listener.accept().await.unwrap();
        s.read_exact(&mut [0; 1024]).await.unwrap();
        // The rest, and the requester's end, wait in the Client's socket (FIN-WAIT-1: its FIN
        // is queued behind them).
        poll_until("the requester's end queued at the Client", SOON, || {
            tcp_state(client, dest).is_some_and(|(state, queued)| state == "04" && queued > 0)
        })
        .await;
        drop(s);
    });
    let (hub, client) = tunnel_to(dest).await;
    let mut s = TcpStream::connect(hub.service("x")).await.unwrap();
    s.write_all(&pattern(256 * 1024, 3)).await.unwrap();
    s.shutdown().await.unwrap();
    let end = tokio::time::timeout(SOON, s.read(&mut [0; 16]))
        .await
        .expect("the end in time");
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    let c = client.wait_audit("query", is(Event::Query)).await;
    assert_eq!(c.outcome, Some(Outcome::Failed), "{c:?}");
    assert_eq!(c.reason.as_deref(), Some("tcp connection reset"));
    let h = hub.wait_audit("query", is(Event::Query)).await;
    assert_eq!(h.outcome, Some(Outcome::Failed), "{h:?}");
}

/// The requester's end travels behind its last bytes, so a destination that resets as it
/// reads them (PostgreSQL over TLS reads `Terminate` and exits) can reset before that end has
/// reached it through the tunnel, where it would have been there first without one. A reset is
/// taken as an end when the requester's end follows within the grace with nothing more to
/// write: here it leaves once the reset reached the Client (and a requester that never ends
/// reads a failure: `p4_a_reset_destination_resets_the_requester`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_p11_a_reset_just_before_the_requesters_end_arrives_is_an_end() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = listener.local_addr().unwrap();
    let (reset, was_reset) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, client) = listener.accept().await.unwrap();
        s.read_exact(&mut [0; 3]).await.unwrap();
        s.set_zero_linger().unwrap();
        drop(s);
        let _ = reset.send(client);
    });
    let (hub, client) = tunnel_to(dest).await;
    let mut s = TcpStream::connect(hub.service("x")).await.unwrap();
    s.write_all(b"bye").await.unwrap();
    let client_end = tokio::time::timeout(SOON, was_reset)
        .await
        .unwrap()
        .unwrap();
    // The reset reached the Client's socket (a reset one leaves the kernel's table), before
    // the requester's end leaves.
    poll_until("the reset at the Client", SOON, || {
        tcp_state(client_end, dest).is_none()
    })
    .await;
    s.shutdown().await.unwrap();
    let end = tokio::time::timeout(SOON, s.read(&mut [0; 16]))
        .await
        .expect("the end in time");
    assert_eq!(end.map_err(|e| e.kind()), Ok(0), "the end of the stream");
    let c = client.wait_audit("query", is(Event::Query)).await;
    assert_eq!(c.outcome, Some(Outcome::Ok), "{c:?}");
    let h = hub.wait_audit("query", is(Event::Query)).await;
    assert_eq!(h.outcome, Some(Outcome::Ok), "{h:?}");
}

/// The other direction of the tests above: a requester that resets its connection once the
/// destination's end has reached it (it read the answer to its end, then closed with SO_LINGER
/// 0) ended its query well on both sides, the Hub saying how; the destination reads the end of
/// the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_p11_a_requester_that_resets_after_the_destinations_end_ended_its_query_well() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = listener.local_addr().unwrap();
    let (ended, end) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.read_exact(&mut [0; 5]).await.unwrap();
        s.write_all(b"the whole answer").await.unwrap();
        s.shutdown().await.unwrap();
        let _ = ended.send(s.read(&mut [0; 16]).await.map_err(|e| e.kind()));
    });
    let (hub, client) = tunnel_to(dest).await;
    let mut s = TcpStream::connect(hub.service("x")).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut back))
        .await
        .expect("the answer and its end in time")
        .unwrap();
    assert_eq!(back, b"the whole answer");
    s.set_zero_linger().unwrap();
    drop(s);
    let how = tokio::time::timeout(SOON, end).await.unwrap().unwrap();
    assert_eq!(how, Ok(0), "the end of the stream");
    let h = hub.wait_audit("query", is(Event::Query)).await;
    let said = "the requester reset its connection after the destination's end reached it; \
                passed on as the end of the stream";
    ended_well(&h, Some(said), (5, 16));
    let c = client.wait_audit("query", is(Event::Query)).await;
    ended_well(&c, None, (5, 16));
}

#[tokio::test]
async fn p4_a_name_outside_the_allow_list_is_refused_with_no_connection_attempt() {
    let (allowed, accepted) = counting_listener().await;
    let hub = TestHub::start(&[
        Service::tcp("sneaky", "acme", "secret"),
        Service::tcp("pg", "acme", "db"),
        Service::tcp("other", "beta", "secret"),
    ])
    .await;
    let client = TestClient::enrol_and_run(&hub, "acme", &[("db", allowed.to_string())]).await;
    hub.wait_connected("acme").await;
    // The Hub tells its operator at the session's start which of its services to this Client
    // name an entry the Client does not have (and only those).
    let up = hub.wait_audit("session_up", is(Event::SessionUp)).await;
    let said = up.reason.unwrap_or_default();
    assert!(
        said.ends_with(
            "allow-list [db]; service sneaky names entry secret, not in it: its queries are refused"
        ),
        "{said}"
    );
    // The Hub drops the requester (RST or EOF) without a byte of data.
    requester_gets_nothing(hub.service("sneaky"), b"").await;
    let c = client.wait_audit("refused query", is(Event::Query)).await;
    assert_eq!(c.outcome, Some(Outcome::Refused));
    assert_eq!(
        c.reason.as_deref(),
        Some("destination \"secret\" is not in the allow-list")
    );
    assert_eq!(c.destination.as_ref().unwrap().address, None);
    let h = hub.wait_audit("refused query", is(Event::Query)).await;
    assert_eq!(h.outcome, Some(Outcome::Refused));
    assert_eq!(
        h.reason.as_deref(),
        Some("refused by the client: not_allowed")
    );
    assert_eq!(h.query_id, c.query_id);
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing was dialled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_a_hundred_concurrent_queries_all_succeed() {
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let client = TestClient::enrol_and_run(&hub, "acme", &[("db", echo.to_string())]).await;
    hub.wait_connected("acme").await;
    let entry = hub.service("pg");
    let tasks: Vec<_> = (0..100u64)
        .map(|i| {
            tokio::spawn(async move {
                let data = pattern(16 * 1024 + i as usize, i);
                let back = roundtrip(entry, data.clone()).await;
                assert!(back == data, "query {i} differs");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    client.wait_count(100, "queries ok", query_ok).await;
}

#[tokio::test]
async fn p14_the_client_reconnects_by_itself_after_a_hub_restart() {
    let echo = echo_server().await;
    let mut hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let client = TestClient::enrol_and_run(&hub, "acme", &[("db", echo.to_string())]).await;
    hub.wait_connected("acme").await;
    assert_eq!(
        roundtrip(hub.service("pg"), b"before".to_vec()).await,
        b"before"
    );
    hub.restart().await;
    hub.wait_connected("acme").await;
    assert_eq!(
        roundtrip(hub.service("pg"), b"after".to_vec()).await,
        b"after"
    );
    let ups = client
        .audit
        .records()
        .iter()
        .filter(|r| r.event == Event::SessionUp)
        .count();
    assert!(ups >= 2, "a second session came up ({ups})");
    let lost = client
        .wait_audit("session_lost", is(Event::SessionLost))
        .await;
    // The Client says why, in the documented vocabulary (docs/audit.md).
    assert_eq!(
        lost.reason.as_deref(),
        Some("hub_shutdown: closed by the Hub (shutting down or restarting, code 4)")
    );
}

#[tokio::test]
async fn p11_a_tls_service_records_the_callers_spiffe_id_as_source() {
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tls("pg-tls", "acme", "db")]).await;
    let client = TestClient::enrol_and_run(&hub, "acme", &[("db", echo.to_string())]).await;
    hub.wait_connected("acme").await;

    let wl_dir: PathBuf = hub.dir.path().join("billing");
    ewii::hub::admin::issue_workload_svid(
        &hub.state_dir(),
        "billing",
        Duration::from_secs(3600),
        &wl_dir,
    )
    .unwrap();
    let stream = tls_caller(hub.service("pg-tls"), &wl_dir, TD)
        .await
        .unwrap();
    let back = exchange(stream, b"over tls").await.unwrap();
    assert_eq!(back, b"over tls");

    let h = hub.wait_audit("hub query", is(Event::Query)).await;
    assert_eq!(
        h.source.as_deref(),
        Some("spiffe://test.ewii.local/workload/billing")
    );
    let c = client.wait_audit("client query", is(Event::Query)).await;
    assert_eq!(c.source, h.source);
    assert_eq!(c.outcome, Some(Outcome::Ok));
}

/// A TLS service admits only the workloads its `workloads` list names: another workload of
/// the same trust domain is refused at the Hub, audited with its SPIFFE ID and the reason,
/// and nothing reaches the Client's destination.
#[tokio::test]
async fn p11_a_tls_service_admits_only_the_workloads_it_lists() {
    let (dest, accepted) = counting_listener().await;
    let hub = TestHub::start(&[Service::tls("pg-tls", "acme", "db")]).await;
    let _client = TestClient::enrol_and_run(&hub, "acme", &[("db", dest.to_string())]).await;
    hub.wait_connected("acme").await;
    let issue = |name: &str| {
        let dir: PathBuf = hub.dir.path().join(name);
        ewii::hub::admin::issue_workload_svid(
            &hub.state_dir(),
            name,
            Duration::from_secs(3600),
            &dir,
        )
        .unwrap();
        dir
    };
    let reports = issue("reports");
    if let Ok(stream) = tls_caller(hub.service("pg-tls"), &reports, TD).await {
        // TLS 1.3: the refusal shows as the end of the stream, with nothing echoed.
        assert_eq!(
            exchange(stream, b"let me in").await.unwrap_or_default(),
            b""
        );
    }
    let r = hub
        .wait_audit("refused query", |r| {
            r.event == Event::Query && r.outcome == Some(Outcome::Refused)
        })
        .await;
    assert_eq!(
        r.source.as_deref(),
        Some("spiffe://test.ewii.local/workload/reports")
    );
    assert_eq!(
        r.reason.as_deref(),
        Some("workload reports is not allowed to call service pg-tls (allowed: billing)")
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 0);

    let billing = issue("billing");
    let stream = tls_caller(hub.service("pg-tls"), &billing, TD)
        .await
        .unwrap();
    exchange(stream, b"hello").await.unwrap();
    poll_until("the listed workload's connection", SOON, || {
        accepted.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn p11_a_tls_service_refuses_a_caller_without_a_workload_svid() {
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tls("pg-tls", "acme", "db")]).await;
    let (accepted_addr, accepted) = counting_listener().await;
    let _client = TestClient::enrol_and_run(
        &hub,
        "acme",
        &[
            ("db", echo.to_string()),
            ("other", accepted_addr.to_string()),
        ],
    )
    .await;
    hub.wait_connected("acme").await;
    // A Client SVID is from the trust domain but is not a workload identity.
    let client_dir = _client.state_dir();
    // TLS 1.3: the client side may finish; the Hub's refusal shows on the first read.
    if let Ok(mut s) = tls_caller(hub.service("pg-tls"), &client_dir, TD).await {
        let _ = s.write_all(b"x").await;
        let mut buf = Vec::new();
        let res = tokio::time::timeout(SOON, s.read_to_end(&mut buf))
            .await
            .unwrap();
        assert!(res.is_err() || buf.is_empty(), "no data may flow");
    }
    let r = hub
        .wait_audit("handshake_refused", |r| r.event == Event::HandshakeRefused)
        .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("spiffe://test.ewii.local/client/acme is not a Workload identity")
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn p11_a_query_for_a_disconnected_client_is_audited_as_failed() {
    let hub = TestHub::start(&[Service::tcp("pg", "nobody", "db")]).await;
    // The Hub resets the requester at once.
    assert_eq!(
        requester_gets_nothing(hub.service("pg"), b"").await,
        Some(std::io::ErrorKind::ConnectionReset)
    );
    let h = hub.wait_audit("query", is(Event::Query)).await;
    assert_eq!(h.outcome, Some(Outcome::Failed));
    assert_eq!(h.reason.as_deref(), Some("client nobody is not connected"));
    assert_eq!(
        h.client.as_deref(),
        Some("spiffe://test.ewii.local/client/nobody")
    );
}

/// A destination that accepts and then reads nothing until told to, then reads everything.
async fn stalled_reader() -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<usize>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let _ = wait.await;
        let mut total = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    });
    (addr, go, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_a_slow_destination_stalls_the_requester_instead_of_being_buffered() {
    let (slow, go, reader) = stalled_reader().await;
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "slow")]).await;
    let _client = TestClient::enrol_and_run(&hub, "acme", &[("slow", slow.to_string())]).await;
    hub.wait_connected("acme").await;
    let mut s = TcpStream::connect(hub.service("pg")).await.unwrap();
    // Offer 256 MiB; with nobody reading, writes must stop long before that.
    let chunk = vec![0x42u8; 64 * 1024];
    let mut written = 0usize;
    while written < 256 * 1024 * 1024 {
        match tokio::time::timeout(Duration::from_millis(500), s.write_all(&chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break, // stalled: backpressure reached the requester
        }
    }
    println!("accepted {} KiB before the stall", written / 1024);
    // What is in flight sits in two TCP socket pairs (kernel autotuning, a few MiB each) and
    // in QUIC's windows (1 MiB per stream): bounded, far below what was offered.
    assert!(
        written < 48 * 1024 * 1024,
        "{} MiB went in with nobody reading",
        written / (1024 * 1024)
    );
    // Released, the destination gets every byte that was accepted.
    let _ = go.send(());
    s.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .unwrap()
        .unwrap();
    // (The write that timed out may have handed part of its chunk over.)
    assert!(
        got >= written && got <= written + chunk.len(),
        "accepted {written}, delivered {got}"
    );
}

/// Writes 64 KiB chunks to `s` until a write has waited a second (or 256 MiB went in);
/// returns the bytes that went in.
async fn write_until_held(s: &mut TcpStream) -> usize {
    let chunk = vec![0x42u8; 64 * 1024];
    let mut written = 0usize;
    while written < 256 * 1024 * 1024 {
        match tokio::time::timeout(Duration::from_secs(1), s.write(&chunk)).await {
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break,
        }
    }
    written
}

/// A TCP socket on loopback whose kernel buffers are fixed at `SMALL` (no autotuning), so
/// that what a stalled query holds is the tunnel's and not the test's.
fn small_buffered() -> tokio::net::TcpSocket {
    const SMALL: u32 = 64 * 1024;
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_send_buffer_size(SMALL).unwrap();
    s.set_recv_buffer_size(SMALL).unwrap();
    s
}

/// The connection a query made to the service listening on `listener`, within [`SOON`].
async fn reached(listener: &TcpListener) -> TcpStream {
    tokio::time::timeout(SOON, listener.accept())
        .await
        .expect("the query reaches the service")
        .unwrap()
        .0
}

/// Bytes waiting in the kernel's queues (sent and not acknowledged, or received and not read)
/// of both ends of each established IPv4 TCP connection in `legs`, named by one end's local
/// and peer address (`/proc/net/tcp`). By whole address pairs: other tests running beside
/// this one may use the same port numbers towards other addresses.
fn tcp_queued(legs: &[&TcpStream]) -> usize {
    let pairs: Vec<(SocketAddr, SocketAddr)> = legs
        .iter()
        .map(|s| (s.local_addr().unwrap(), s.peer_addr().unwrap()))
        .collect();
    // `0100007F:8264`: the address as the kernel holds it (network order, printed as a native
    // little-endian word), then the port.
    let addr = |hex: &str| {
        let (ip, port) = hex.split_once(':').unwrap();
        let ip = u32::from_str_radix(ip, 16).unwrap().to_le_bytes();
        SocketAddr::from((ip, u16::from_str_radix(port, 16).unwrap()))
    };
    let queue = |hex: &str| usize::from_str_radix(hex, 16).unwrap();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|f| {
            let (local, remote) = (addr(f[1]), addr(f[2]));
            f[3] == "01"
                && pairs
                    .iter()
                    .any(|&(a, b)| (local, remote) == (a, b) || (local, remote) == (b, a))
        })
        .map(|f| {
            let (tx, rx) = f[4].split_once(':').unwrap();
            queue(tx) + queue(rx)
        })
        .sum()
}

/// `query_window_kib` on each side is what the tunnel holds of one query ahead of a reader
/// that reads nothing: the Client's for the requester → service direction, the Hub's for the
/// other. Here 8 MiB on both (the most allowed). What a writer got in before it waited, less
/// what the kernel queues of the two TCP legs hold (autotuned: megabytes that vary from run to
/// run), is what the tunnel holds: the window, less what quinn has not yet announced again.
/// With the default 1 MiB it is about 1 MiB. A long path needs a larger window: one window per
/// round trip (docs/config.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_the_query_window_each_side_sets_is_what_it_holds_ahead_of_a_reader() {
    const WINDOW: usize = 8 << 20;
    let mute = small_buffered();
    mute.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let mute = mute.listen(8).unwrap();
    let flood = small_buffered();
    flood.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let flood = flood.listen(8).unwrap();
    let hub = TestHub::start_custom(
        &[
            Service::tcp("up", "acme", "mute"),
            Service::tcp("down", "acme", "flood"),
        ],
        &format!("query_window_kib = {}\n", WINDOW / 1024),
    )
    .await;
    let mut client = TestClient::enrol(
        &hub,
        "acme",
        &[
            ("mute", mute.local_addr().unwrap().to_string()),
            ("flood", flood.local_addr().unwrap().to_string()),
        ],
    )
    .await;
    client.config.query_window = WINDOW as u32;
    client.start();
    hub.wait_connected("acme").await;

    // Service → requester, the Hub's window: the requester reads nothing.
    let down = small_buffered().connect(hub.service("down")).await.unwrap();
    let mut service = reached(&flood).await;
    let taken = write_until_held(&mut service).await;
    let queued = tcp_queued(&[&down, &service]);
    let held_down = taken - queued;
    // Requester → service, the Client's window: the service reads nothing.
    let mut up = small_buffered().connect(hub.service("up")).await.unwrap();
    let held = reached(&mute).await;
    let taken = write_until_held(&mut up).await;
    let queued = tcp_queued(&[&up, &held]);
    let held_up = taken - queued;
    println!(
        "held by the tunnel ahead of a reader with {} KiB windows: {} KiB up, {} KiB down",
        WINDOW / 1024,
        held_up / 1024,
        held_down / 1024
    );
    // Below the window by less than an eighth of it: quinn announces more credit only once its
    // reader has read an eighth of the window past the last announcement
    // (quinn-proto's `Recv::max_stream_data`), so up to that much has left the tunnel without
    // being replaced. Above it by at most a read in a process's hands on each side, between
    // its socket and its stream.
    let within = WINDOW * 7 / 8..=WINDOW + 256 * 1024;
    assert!(
        within.contains(&held_up) && within.contains(&held_down),
        "held {held_up} bytes up, {held_down} down: not the {WINDOW}-byte windows"
    );
    client.stop().await;
}

/// Bounded peers (issue 9 §4): a Hub under load first asks an address QUIC has not validated
/// for a Retry (RFC 9000 §8.1) before it spends a handshake on it. Here every connection is
/// asked (`retry_above = 0`): the Client enrols, opens its session and serves a query through
/// it.
#[tokio::test]
async fn p8_a_client_enrols_and_serves_through_quic_retries() {
    let echo = echo_server().await;
    let limits = ewii::hub::admission::Limits {
        retry_above: 0,
        ..Default::default()
    };
    let hub = TestHub::start_with_limits(&[Service::tcp("pg", "acme", "db")], limits).await;
    let _client = TestClient::enrol_and_run(&hub, "acme", &[("db", echo.to_string())]).await;
    hub.wait_connected("acme").await;
    assert_eq!(
        try_roundtrip(hub.service("pg"), b"after a retry").await,
        Ok(())
    );
    assert!(
        hub.handle().retries_sent() >= 2,
        "the enrolment and the session each proved their address: {}",
        hub.handle().retries_sent()
    );
}

/// A query as a stand-in Client (a raw session with the acme SVID) sees it before answering:
/// the Hub, the session, the requester (who wrote `SELECT 1`), the stream, and the bytes that
/// arrived behind `Open`.
async fn a_query_at_a_raw_client() -> RawQuery {
    a_query_at_a_raw_client_with(None, "").await
}

/// What [`a_query_at_a_raw_client`] gives.
type RawQuery = (
    TestHub,
    RawSession,
    TcpStream,
    quinn::SendStream,
    quinn::RecvStream,
    Vec<u8>,
);

/// [`a_query_at_a_raw_client`], the requester's receive buffer at `rcvbuf` bytes when given,
/// the Hub started with `hub_toml` as extra configuration.
async fn a_query_at_a_raw_client_with(rcvbuf: Option<u32>, hub_toml: &str) -> RawQuery {
    use ewii::identity::store::{self, Svid};
    use ewii_common::frame::QueryHead;

    let hub = TestHub::start_custom(&[Service::tcp("pg", "acme", "db")], hub_toml).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let session = raw_session(&hub, &svid).await.expect("session");
    hub.wait_connected("acme").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let mut requester = socket.connect(hub.service("pg")).await.unwrap();
    requester.write_all(b"SELECT 1").await.unwrap();
    let (send, mut recv) = tokio::time::timeout(SOON, session.conn.accept_bi())
        .await
        .expect("a query stream")
        .unwrap();
    let mut reader = ewii::transport::FrameReader::new();
    let open = reader.read::<QueryHead>(&mut recv).await.unwrap().unwrap();
    assert!(matches!(open, QueryHead::Open { .. }), "{open:?}");
    // Nothing has been answered yet, and the requester's bytes are already here.
    let mut early = reader.into_leftover().to_vec();
    while early.len() < 8 {
        let chunk = tokio::time::timeout(SOON, recv.read_chunk(64, true))
            .await
            .expect("the requester's bytes before any answer")
            .unwrap()
            .unwrap();
        early.extend_from_slice(&chunk.bytes);
    }
    (hub, session, requester, send, recv, early)
}

/// [`a_query_at_a_raw_client`], answered with `answer`.
async fn first_query_seen_by_a_raw_client(
    answer: ewii_common::frame::QueryHead,
) -> (Vec<u8>, TcpStream, TestHub) {
    use ewii_common::frame::QueryHead;

    let (hub, session, requester, mut send, mut recv, early) = a_query_at_a_raw_client().await;
    ewii::transport::write_frame(&mut send, &answer)
        .await
        .unwrap();
    let opened = matches!(answer, QueryHead::Opened);
    if opened {
        send.write_all(b"one row").await.unwrap();
    }
    send.finish().unwrap();
    // Keeps the session open until the caller is done; an opened query reads the requester's
    // end (the Hub finishes a query once its last bytes were read), a refused one stops.
    tokio::spawn(async move {
        // All of it (a closure takes only the fields it names): dropped, its control stream
        // would end, and the Hub would close the session.
        let session = session;
        if opened {
            let _ = recv.read_to_end(1024).await;
        } else {
            drop(recv);
        }
        // Until the Hub closes the session (or the test's runtime ends, which drops this).
        let _ = tokio::time::timeout(SOON * 3, session.conn.closed()).await;
    });
    (early, requester, hub)
}

#[tokio::test]
async fn p4_the_requesters_first_bytes_travel_with_open_and_reach_it_back_after_opened() {
    let (early, mut requester, hub) =
        first_query_seen_by_a_raw_client(ewii_common::frame::QueryHead::Opened).await;
    assert_eq!(early, b"SELECT 1");
    let mut back = Vec::new();
    tokio::time::timeout(SOON, requester.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"one row");
    requester.shutdown().await.unwrap();
    let h = hub.wait_audit("the query", is(Event::Query)).await;
    assert_eq!(h.outcome, Some(Outcome::Ok), "{h:?}");
    assert_eq!(h.bytes_up, Some(8));
    assert_eq!(h.bytes_down, Some(7));
}

#[tokio::test]
async fn p4_a_refused_query_discards_the_requesters_early_bytes_and_sends_nothing_back() {
    let code = ewii_common::frame::RefuseCode::NotAllowed;
    let (early, mut requester, hub) =
        first_query_seen_by_a_raw_client(ewii_common::frame::QueryHead::Refused { code }).await;
    assert_eq!(early, b"SELECT 1");
    let mut back = Vec::new();
    let res = tokio::time::timeout(SOON, requester.read_to_end(&mut back))
        .await
        .unwrap();
    assert!(
        back.is_empty(),
        "nothing goes back to a refused requester: {res:?}"
    );
    let h = hub.wait_audit("the refused query", is(Event::Query)).await;
    assert_eq!(h.outcome, Some(Outcome::Refused));
    assert_eq!(
        h.reason.as_deref(),
        Some("refused by the client: not_allowed")
    );
    assert_eq!(h.bytes_up, None);
}

#[tokio::test]
async fn p4_a_requester_that_resets_before_the_answer_ends_its_query_at_once() {
    let (hub, _session, requester, _send, _recv, early) = a_query_at_a_raw_client().await;
    assert_eq!(early, b"SELECT 1");
    // The Client never answers; the requester gives up with an RST.
    requester.set_zero_linger().unwrap();
    drop(requester);
    // Within wait_audit's 10 s, where waiting for the answer would take the Hub's 15 s.
    let h = hub.wait_audit("the query", is(Event::Query)).await;
    assert_eq!(h.outcome, Some(Outcome::Failed));
    assert_eq!(h.reason.as_deref(), Some("tcp connection reset"));
}

/// A query whose Client's connection ends is cut and recorded then, with its bytes so far,
/// even when nothing else would notice: the service already finished its side, and the
/// requester, its answer read, sits idle (a pooled connection). It is not held until the
/// requester acts.
#[tokio::test]
async fn p11_a_hub_query_ends_with_its_clients_connection() {
    use ewii_common::frame::QueryHead;

    let (hub, session, mut requester, mut send, recv, early) = a_query_at_a_raw_client().await;
    assert_eq!(early, b"SELECT 1");
    ewii::transport::write_frame(&mut send, &QueryHead::Opened)
        .await
        .unwrap();
    send.write_all(b"one row").await.unwrap();
    send.finish().unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(SOON, requester.read_to_end(&mut back))
        .await
        .expect("the answer and the service's end")
        .unwrap();
    assert_eq!(back, b"one row");
    // The requester stays open and idle; the Client's connection goes.
    session.conn.close(quinn::VarInt::from_u32(0), b"gone");
    drop(recv);
    let h = hub.wait_audit("the query", is(Event::Query)).await;
    assert_eq!(h.outcome, Some(Outcome::Failed));
    let reason = h.reason.unwrap_or_default();
    assert!(
        reason.starts_with("the Client's connection ended: "),
        "{reason}"
    );
    assert_eq!((h.bytes_up, h.bytes_down), (Some(8), Some(7)));
    // And the requester learns it: its connection is closed (it read the service's end
    // already, so a read says only that; what it writes now is refused).
    let refused = tokio::time::timeout(SOON, async {
        loop {
            if let Err(e) = requester.write_all(b"SELECT 2").await {
                break e;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the requester's writes are refused");
    assert!(
        matches!(
            refused.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{refused:?}"
    );
}

/// An answer the Client sent whole before it closed its connection (a stop right after its
/// last query: every byte acknowledged by the Hub's QUIC stack, not yet written to the
/// requester) reaches the requester whole, with a clean end: the connection's end does not
/// cut what arrived before it. The requester, a slow one, reads nothing until the Client has
/// gone, through a 16 KiB receive buffer: the answer waits in the Hub's socket's send queue
/// (as much as `tcp_wmem` lets it take) and the rest in its stream window when the close
/// comes. Reset instead of closed, the requester would lose the first; cut at once, the second.
#[tokio::test]
async fn p4_an_answer_sent_before_the_clients_close_reaches_the_requester_whole() {
    use ewii_common::frame::QueryHead;

    let (hub, session, mut requester, mut send, recv, early) =
        a_query_at_a_raw_client_with(Some(16 * 1024), "query_window_kib = 4096\n").await;
    assert_eq!(early, b"SELECT 1");
    // More than the Hub's socket takes (`tcp_wmem`'s largest send buffer, 4 MiB by default),
    // less than that and the Hub's stream window, raised to 4 MiB here: how much of its send
    // buffer the socket fills depends on the kernel's congestion control (with BBR, 3.6 of
    // 4 MiB), and with the default 1 MiB window the margin was a few KiB.
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2)?.parse::<usize>().ok())
        .unwrap_or(4 << 20);
    let answer = pattern(wmem_max + (512 << 10), 11);
    let sent = answer.clone();
    let client = tokio::spawn(async move {
        ewii::transport::write_frame(&mut send, &QueryHead::Opened)
            .await
            .unwrap();
        send.write_all(&sent).await.unwrap();
        send.finish().unwrap();
        // Every byte is in the Hub's hands (acknowledged), and the Client goes.
        let _ = send.stopped().await;
        session.conn.close(quinn::VarInt::from_u32(0), b"stopping");
        (session, recv)
    });
    let kept = tokio::time::timeout(SOON, client)
        .await
        .expect("the Hub acknowledged the whole answer")
        .unwrap();
    let mut back = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), requester.read_to_end(&mut back))
        .await
        .expect("the answer in time");
    assert!(read.is_ok(), "{read:?} after {} bytes", back.len());
    assert_eq!(back.len(), answer.len());
    assert!(back == answer, "the answer arrived changed");
    let h = hub.wait_audit("the query", is(Event::Query)).await;
    assert_eq!(h.bytes_down, Some(answer.len() as u64), "{h:?}");
    drop(kept);
}

/// A Client that answers `Open` with `busy` (its audit sink lags) or `shutting_down` (it is
/// stopping) turned the query away for load or for its stop, not by policy: the Hub records
/// it `failed`, as the Client does, and keeps `refused` for what the allow-list refused.
#[tokio::test]
async fn p11_a_busy_or_stopping_client_is_a_failed_query_on_the_hub() {
    use ewii_common::frame::{QueryHead, RefuseCode};

    for code in [RefuseCode::Busy, RefuseCode::ShuttingDown] {
        let (early, mut requester, hub) =
            first_query_seen_by_a_raw_client(QueryHead::Refused { code }).await;
        assert_eq!(early, b"SELECT 1");
        let mut back = Vec::new();
        let _ = tokio::time::timeout(SOON, requester.read_to_end(&mut back))
            .await
            .expect("the requester's connection ends");
        assert!(back.is_empty());
        let h = hub.wait_audit("the query", is(Event::Query)).await;
        assert_eq!(h.outcome, Some(Outcome::Failed), "{code}");
        assert_eq!(
            h.reason.as_deref(),
            Some(format!("refused by the client: {code}").as_str())
        );
    }
}

/// A TLS service's caller that never finishes its handshake (it closes first) failed; one
/// that speaks no TLS at all is refused, like one whose certificate TLS refused.
#[tokio::test]
async fn p11_a_tls_caller_that_breaks_off_failed_and_one_that_speaks_no_tls_is_refused() {
    let hub = TestHub::start(&[Service::tls("pg-tls", "acme", "db")]).await;
    let _client = TestClient::enrol_and_run(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    hub.wait_connected("acme").await;
    let speaking_no_tls: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    for (said, outcome) in [
        (&b""[..], Outcome::Failed),
        (speaking_no_tls, Outcome::Refused),
    ] {
        let mut caller = TcpStream::connect(hub.service("pg-tls")).await.unwrap();
        caller.write_all(said).await.unwrap();
        if said.is_empty() {
            drop(caller);
        }
        let h = hub
            .wait_audit("the caller's query", |r| {
                r.event == Event::Query && r.outcome == Some(outcome)
            })
            .await;
        let reason = h.reason.unwrap_or_default();
        assert!(
            reason.starts_with("requester TLS: "),
            "{outcome:?}: {reason}"
        );
    }
}

/// The TCP sockets of this host, as `ss` lists the established ones: (local, peer, options).
fn established() -> Vec<(String, String, String)> {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output()
        .expect("ss (iproute2)");
    assert!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| (f[2].to_owned(), f[3].to_owned(), f[4..].join(" ")))
        })
        .collect()
}

/// P4: both TCP legs of a query probe a quiet peer with TCP keep-alive (after 60 s, then every
/// 15 s, four times): a requester or a destination that vanished (its host crashed, a path
/// that dropped the connection's state) ends its query within about two minutes, where it
/// held its slot of `max_queries` and the database's connection for ever, and a middlebox's
/// idle timer does not drop a quiet query that is still wanted. Seen as the kernel shows it:
/// a keep-alive timer on the Hub's socket to the requester and on the Client's to the
/// destination (and, as the control, none on the requester's own socket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_a_querys_tcp_legs_probe_a_quiet_peer() {
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tcp("svc", "acme", "echo")]).await;
    let _client = TestClient::enrol_and_run(&hub, "acme", &[("echo", echo.to_string())]).await;
    hub.wait_connected("acme").await;
    let entry = hub.service("svc");
    let mut s = TcpStream::connect(entry).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(SOON, s.read_exact(&mut back))
        .await
        .expect("the echo in time")
        .unwrap();
    assert_eq!(&back, b"ping");
    let requester = s.local_addr().unwrap().to_string();
    let sockets = established();
    let find = |local: &dyn Fn(&str) -> bool, peer: &str| {
        sockets
            .iter()
            .find(|(l, p, _)| local(l) && p == peer)
            .unwrap_or_else(|| panic!("no socket to {peer} in {sockets:?}"))
            .2
            .clone()
    };
    let hub_leg = find(&|l| l == entry.to_string(), &requester);
    assert!(
        hub_leg.contains("timer:(keepalive,"),
        "the Hub's leg: {hub_leg}"
    );
    let client_leg = find(&|_| true, &echo.to_string());
    assert!(
        client_leg.contains("timer:(keepalive,"),
        "the Client's leg: {client_leg}"
    );
    let own = find(&|l| l == requester, &entry.to_string());
    assert!(
        !own.contains("keepalive"),
        "the requester's own socket: {own}"
    );
}
