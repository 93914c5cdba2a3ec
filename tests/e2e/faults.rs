//! The tunnel on a bad path: a seeded fault-injecting UDP relay between Client and Hub
//! (`FaultyPath` in the harness; this kernel has no netem). Loss, reordering and duplication,
//! a blackhole, a path change, an Internet's round trip.

use std::net::SocketAddr;
use std::time::Duration;

use ewii_common::audit::Event;
use ewii_tests::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Sends `len` deterministic pseudo-random bytes to a hashing sink through `entry`; returns
/// (the local digest, the sink's digest, seconds taken).
async fn send_hashed(entry: SocketAddr, len: usize, seed: u64) -> ([u8; 32], Vec<u8>, f64) {
    let started = Instant::now();
    let mut s = TcpStream::connect(entry).await.unwrap();
    let mut h = Sha256::new();
    let mut x = seed | 1;
    let mut chunk = vec![0u8; 256 * 1024];
    let mut sent = 0;
    while sent < len {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let n = chunk.len().min(len - sent);
        s.write_all(&chunk[..n]).await.unwrap();
        h.update(&chunk[..n]);
        sent += n;
    }
    s.shutdown().await.unwrap();
    let mut digest = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut digest))
        .await
        .expect("the digest within 120 s")
        .unwrap();
    (h.finalize().into(), digest, started.elapsed().as_secs_f64())
}

async fn echo_once(entry: SocketAddr, data: &[u8]) -> Result<(), String> {
    let mut s = TcpStream::connect(entry).await.map_err(|e| e.to_string())?;
    s.write_all(data).await.map_err(|e| e.to_string())?;
    s.shutdown().await.map_err(|e| e.to_string())?;
    let mut back = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut back))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    (back == data)
        .then_some(())
        .ok_or("wrong bytes back".into())
}

/// A Hub with an echo and a hashing sink service, and a Client that dials it through a
/// faulty path.
async fn world() -> (TestHub, TestClient, FaultyPath) {
    world_with_window(None).await
}

/// [`world`], with `query_window_kib` set on both sides when it is given.
async fn world_with_window(kib: Option<u32>) -> (TestHub, TestClient, FaultyPath) {
    let sink = hashing_sink().await;
    let echo = echo_server().await;
    let hub = TestHub::start_custom(
        &[
            Service::tcp("sink", "acme", "sink"),
            Service::tcp("echo", "acme", "echo"),
        ],
        &kib.map(|k| format!("query_window_kib = {k}\n"))
            .unwrap_or_default(),
    )
    .await;
    let mut client = TestClient::enrol(
        &hub,
        "acme",
        &[("sink", sink.to_string()), ("echo", echo.to_string())],
    )
    .await;
    let path = FaultyPath::start(hub.addr, 0x5eed).await;
    client.config.hub = path.addr.to_string().parse().unwrap();
    if let Some(kib) = kib {
        client.config.query_window = kib * 1024;
    }
    client.start();
    hub.wait_connected("acme").await;
    (hub, client, path)
}

/// Issue 11: through 5 % loss with reordering and duplication, 64 MiB arrive byte-exact
/// (SHA-256 at the far end) and 1,000 short queries all succeed. Throughput is printed
/// beside the clean path's (figures, not assertions: the machine is shared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_p14_a_lossy_reordering_duplicating_path_loses_no_byte_and_no_query() {
    const LEN: usize = 64 << 20;
    let (hub, mut client, path) = world().await;
    let (mine, theirs, clean) = send_hashed(hub.service("sink"), LEN, 1).await;
    assert_eq!(theirs, mine, "clean path: byte-exact");
    path.set(Faults {
        loss: 0.05,
        duplicate: 0.01,
        reorder: 0.05,
        reorder_by: Duration::from_millis(3),
        delay: Duration::from_micros(200),
        jitter: Duration::from_micros(300),
    });
    let (mine, theirs, lossy) = send_hashed(hub.service("sink"), LEN, 2).await;
    assert_eq!(theirs, mine, "lossy path: byte-exact");
    println!(
        "64 MiB: clean path {:.1} MB/s, 5 % loss + reordering + duplication {:.1} MB/s",
        LEN as f64 / clean / 1e6,
        LEN as f64 / lossy / 1e6
    );
    let mut failures = Vec::new();
    for i in 0..1000u32 {
        if let Err(e) = echo_once(hub.service("echo"), &i.to_le_bytes()).await {
            failures.push(format!("query {i}: {e}"));
        }
    }
    assert_eq!(failures, Vec::<String>::new());
    // One session throughout: the faults never broke the connection.
    assert_eq!(count_events(&client, Event::SessionUp), 1);
    client.stop().await;
}

/// P9 and P14 on a path that goes dark for 10 s in the middle of a transfer: the Hub sees the
/// loss within 3 s, the transfer ends with an error on the requester's side (no hang), and
/// once the path heals the Client is back by itself and queries succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_p14_a_ten_second_blackhole_is_seen_within_3s_and_healed_by_reconnection_without_leaking_tasks(
) {
    let (hub, mut client, path) = world().await;
    // Hub, Client and this test share one runtime: its live tasks, counted once everything
    // is up and one query has run, are the baseline a blackhole must not leave grown.
    echo_once(hub.service("echo"), b"before").await.unwrap();
    let tasks_before = settled_tasks().await;
    let entry = hub.service("sink");
    let transfer = tokio::spawn(async move {
        let mut s = TcpStream::connect(entry).await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        // Until the tunnel gives way (bounded: at most 20 s).
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if tokio::time::timeout(Duration::from_secs(20), s.write_all(&chunk))
                .await
                .map_or(true, |r| r.is_err())
            {
                return true;
            }
        }
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(SOON, s.read_to_end(&mut rest)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    path.blackhole(true);
    let dark = Instant::now();
    // Seen when the Hub stops routing to the Client; its record follows the session's end in
    // the database.
    poll_until("the Hub to see the loss", Duration::from_secs(20), || {
        hub.handle().connected_clients().is_empty()
    })
    .await;
    let seen = dark.elapsed();
    let lost = hub
        .wait_audit("the loss", |r| r.event == Event::SessionLost)
        .await;
    assert_eq!(
        lost.reason.as_deref(),
        Some("idle_timeout: the Client went silent")
    );
    assert!(seen <= Duration::from_secs(3), "seen after {seen:?}");
    assert!(
        tokio::time::timeout(SOON, transfer).await.unwrap().unwrap(),
        "the requester saw its transfer end"
    );
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(dark.elapsed())).await;
    path.blackhole(false);
    poll_until("the Client to come back", Duration::from_secs(40), || {
        count_events(&client, Event::SessionUp) >= 2
    })
    .await;
    hub.wait_connected("acme").await;
    echo_once(hub.service("echo"), b"after the dark")
        .await
        .unwrap();
    // No task leaked by the lost session, its queries, or the reconnection.
    let tasks_after = settled_tasks().await;
    assert!(
        tasks_after <= tasks_before,
        "live tasks: {tasks_before} before the blackhole, {tasks_after} after"
    );
    eprintln!("live tasks: {tasks_before} before the blackhole, {tasks_after} after");
    client.stop().await;
}

/// A path change mid-transfer (a new source port towards the Hub, as after a NAT
/// rebinding): QUIC migrates the connection, the transfer completes byte-exact, and no new
/// session is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p14_a_path_change_mid_transfer_migrates_the_connection() {
    const LEN: usize = 32 << 20;
    let (hub, mut client, path) = world().await;
    let entry = hub.service("sink");
    let transfer = tokio::spawn(async move { send_hashed(entry, LEN, 3).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    path.rebind();
    let (mine, theirs, _) = transfer.await.unwrap();
    assert_eq!(theirs, mine, "byte-exact across the path change");
    echo_once(hub.service("echo"), b"after").await.unwrap();
    assert_eq!(
        count_events(&client, Event::SessionUp),
        1,
        "migrated, not redialled"
    );
    client.stop().await;
}

/// The runtime's live tasks once the count has held still for half a second (queries and
/// connections that just ended take a moment to be reaped); at most 10 s.
async fn settled_tasks() -> usize {
    let alive = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let mut last = alive();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = alive();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

fn count_events(client: &TestClient, event: Event) -> usize {
    client
        .audit
        .records()
        .iter()
        .filter(|r| r.event == event)
        .count()
}

/// P4 on a path with an Internet's round trip (25 ms each way, in order, nothing lost): 64 MiB
/// arrive byte-exact, twice on one session with the default per-query window, then once with
/// `query_window_kib = 4096` on both sides. The throughput is printed beside the ceiling the
/// window sets (one window per round trip; docs/benchmarks.md, "A 50 ms path"): figures, not
/// assertions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_a_50ms_path_carries_a_bulk_query_byte_exact() {
    const LEN: usize = 64 << 20;
    const ONE_WAY: Duration = Duration::from_millis(25);
    for (kib, transfers) in [(None, 2), (Some(4096), 1)] {
        let (hub, mut client, path) = world_with_window(kib).await;
        path.set(Faults {
            delay: ONE_WAY,
            ..Faults::default()
        });
        let window = kib.map_or(ewii::transport::STREAM_WINDOW, |k| k * 1024) as f64;
        for seed in 1..=transfers {
            let (mine, theirs, secs) = send_hashed(hub.service("sink"), LEN, seed).await;
            assert_eq!(theirs, mine, "transfer {seed}: byte-exact");
            println!(
                "64 MiB over a {} ms round trip: {:.1} MB/s (one {} KiB window per round trip: {:.1} MB/s)",
                (2 * ONE_WAY).as_millis(),
                LEN as f64 / secs / 1e6,
                window as u64 / 1024,
                window / (2 * ONE_WAY).as_secs_f64() / 1e6
            );
        }
        assert_eq!(count_events(&client, Event::SessionUp), 1);
        client.stop().await;
    }
}
