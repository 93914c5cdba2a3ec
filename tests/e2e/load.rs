//! Load on one connection (P4, P11): 10,000 queries open at once through one Client — the
//! `max_queries` setting — each served, with the Client's memory reported. Real processes,
//! real TCP on both legs.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ewii_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use crate::process::{status_kib, HubProcess, Proc};

/// Queries held open at once.
const QUERIES: usize = 10_000;

/// The soft open-files limit raised to the hard one (this process, and the Hub and Client it
/// starts, hold one socket per query each; the echo server is a process of its own).
#[allow(unsafe_code)] // getrlimit/setrlimit: no safe wrapper in std
fn raise_open_files() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid, writable rlimit structs; the soft limit stays within the hard one.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_max
}

/// A TCP echo server in a process of its own (python3's asyncio), so its sockets do not
/// count against this process's limit. Returns it and its address.
fn echo_process() -> (Proc, SocketAddr) {
    let script = r#"
import asyncio
async def echo(r, w):
    try:
        while True:
            d = await r.read(65536)
            if not d:
                break
            w.write(d)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def main():
    s = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
    print(s.sockets[0].getsockname()[1], flush=True)
    await s.serve_forever()
asyncio.run(main())
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("echo said {line:?}"));
    (Proc(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

/// One requester: connect, a byte each way (the query is open end to end), then hold the
/// connection until `release`, and check the echo once more.
async fn hold(
    service: SocketAddr,
    open: Arc<AtomicUsize>,
    release: Arc<Notify>,
) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(service)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"a").await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)
        .await
        .map_err(|e| format!("echo: {e}"))?;
    let released = release.notified();
    open.fetch_add(1, Ordering::SeqCst);
    released.await;
    s.write_all(b"z").await.map_err(|e| e.to_string())?;
    s.read_exact(&mut b)
        .await
        .map_err(|e| format!("second echo: {e}"))?;
    (b == *b"z")
        .then_some(())
        .ok_or_else(|| "wrong byte".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_p11_ten_thousand_queries_at_once_on_one_connection() {
    if crate::process::not_root() {
        eprintln!("SKIPPED: needs root to raise the open-files limit");
        return;
    }
    let limit = raise_open_files();
    if limit < QUERIES as u64 + 1_000 {
        assert!(
            !require("EWII_REQUIRE_PRIVILEGED"),
            "open files limited to {limit}"
        );
        eprintln!("SKIPPED: open files limited to {limit}");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (_echo_proc, echo) = echo_process();
    // Both sides' records, read when a query fails: they say which side ended it and why.
    let hub_audit = root.path().join("hub-audit.jsonl");
    let client_audit = root.path().join("client-audit.jsonl");
    let mut hub =
        HubProcess::start_with_audit(root.path(), &format!("file:{}", hub_audit.display()), "");
    let (mut client, _) = hub
        .run_client(
            root.path(),
            echo,
            &format!(
                "audit = \"file:{}\"\nmax_queries = {QUERIES}",
                client_audit.display()
            ),
            Stdio::null(),
        )
        .await;
    let idle = status_kib(client.pid(), "VmRSS:");
    // The service listener's queue holds a burst of requesters larger than a batch here: with
    // tokio's default (128) the kernel answered bursts with SYN cookies and dropped handshakes,
    // and a requester was now and then reset.
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        listen_queue(hub.service.port()),
        4096.min(somaxconn),
        "the service listener's queue"
    );

    let open = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let mut tasks = Vec::with_capacity(QUERIES);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    for batch in 0..QUERIES / 500 {
        for _ in 0..500 {
            tasks.push(tokio::spawn(hold(
                hub.service,
                open.clone(),
                release.clone(),
            )));
        }
        // Paced so the listen queue is not the thing measured.
        let target = (batch + 1) * 500;
        // A requester that ended (it failed) never counts: stop waiting and say why.
        while open.load(Ordering::SeqCst) < target
            && tokio::time::Instant::now() < deadline
            && !tasks.iter().any(|t| t.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if tasks.iter().any(|t| t.is_finished()) {
            break;
        }
    }
    let mut ended = Vec::new();
    for t in tasks.iter_mut().filter(|t| t.is_finished()) {
        ended.push(format!("{:?}", t.await));
    }
    if !ended.is_empty() {
        // Until both sides have ended the query and written its record (bounded: the
        // assertion below shows what there is).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while (not_ok(&hub_audit).is_empty() || not_ok(&client_audit).is_empty())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(POLL).await;
        }
    }
    assert_eq!(
        open.load(Ordering::SeqCst),
        QUERIES,
        "queries open at once; requesters that ended early: {ended:?}; the records of queries \
         that did not go well: Hub {:?}, Client {:?}",
        not_ok(&hub_audit),
        not_ok(&client_audit)
    );
    let loaded = status_kib(client.pid(), "VmRSS:");
    release.notify_waiters();
    let mut failed = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failed.push(e);
        }
    }
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    // Reported (this machine is shared; memory is not asserted to the byte).
    let peak = status_kib(client.pid(), "VmHWM:");
    eprintln!(
        "Client RSS: {idle} KiB idle, {loaded} KiB with {QUERIES} queries open (peak {peak} KiB)"
    );
    assert_eq!(client.terminate().code(), Some(0));
    assert_eq!(hub.proc.terminate().code(), Some(0));
}

/// The queue length of the listening TCP socket on `port`, as the kernel reports it (`ss`:
/// a listener's Send-Q).
fn listen_queue(port: u16) -> u32 {
    let out = Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .expect("ss (iproute2: scripts/install-test-deps)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("ss said {text:?}"))
}

/// The query records in the audit file at `path` whose outcome is not `ok` (the first 5).
fn not_ok(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"event\":\"query\"") && !l.contains("\"outcome\":\"ok\""))
        .take(3)
        .map(str::to_owned)
        .collect()
}

/// What each requester tries to push at the destination that never reads.
const PUSH: usize = 64 << 20;

/// A destination that accepts and never reads: every connection is held, unread.
async fn never_reads() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

/// A destination whose accept queue is full and that never accepts: connects hang.
fn never_accepts() -> (
    tokio::net::TcpListener,
    Vec<std::net::TcpStream>,
    SocketAddr,
) {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = s.listen(1).unwrap();
    let addr = l.local_addr().unwrap();
    // Fill the accept queue (backlog 1 holds two) so that the next SYNs go unanswered.
    let fill = (0..2)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })
        .collect();
    (l, fill, addr)
}

/// A destination that sends a byte every 100 ms and reads nothing.
async fn trickles() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                while s.write_all(b".").await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_p11_hostile_destinations_hold_memory_within_the_window_and_others_are_unaffected() {
    let root = tempfile::tempdir().unwrap();
    let echo = echo_server().await;
    let (sink, (_void_listener, _fill, void), drip) =
        (never_reads().await, never_accepts(), trickles().await);
    let services = |ports: &[u16]| -> String {
        ["sink", "void", "drip"]
            .iter()
            .zip(ports)
            .map(|(name, port)| {
                format!("[[service]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nclient = \"acme\"\ndestination = \"{name}\"\nprincipal = \"ops\"\n")
            })
            .collect()
    };
    let (mut hub, ports) = HubProcess::start_with_ports(root.path(), "discard", 3, services);
    let allow = format!(
        "audit = \"discard\"\nconnect_timeout_ms = 1000\n[[allow]]\nname = \"sink\"\naddress = \"{sink}\"\n[[allow]]\nname = \"void\"\naddress = \"{void}\"\n[[allow]]\nname = \"drip\"\naddress = \"{drip}\""
    );
    let (mut client, _) = hub
        .run_client(root.path(), echo, &allow, Stdio::null())
        .await;
    let idle = status_kib(client.pid(), "VmRSS:");
    let hub_idle = status_kib(hub.proc.pid(), "VmRSS:");
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));

    // 8 requesters push 64 MiB each into the destination that never reads: held back by flow
    // control once the kernel's socket buffers on the way are full, not by the Client's
    // memory (its QUIC receive window is 16 MiB per connection, 1 MiB per query).
    let pushers: Vec<_> = (0..8)
        .map(|_| {
            let target = at(ports[0]);
            tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(target).await.unwrap();
                let chunk = vec![7u8; 64 * 1024];
                let mut sent = 0usize;
                while sent < PUSH {
                    match tokio::time::timeout(Duration::from_secs(3), s.write_all(&chunk)).await {
                        Ok(Ok(())) => sent += chunk.len(),
                        _ => break,
                    }
                }
                (sent, s)
            })
        })
        .collect();
    // 20 requesters to the destination that never accepts: each refused within the connect
    // timeout (1 s), with no byte and no hang.
    let voids: Vec<_> = (0..20)
        .map(|_| {
            let target = at(ports[1]);
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let mut s = tokio::net::TcpStream::connect(target).await.unwrap();
                let mut b = [0u8; 1];
                let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
                // Closed (EOF) or reset: either way, no byte.
                let closed = matches!(n, Ok(Ok(0)))
                    || matches!(&n, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset);
                (closed, started.elapsed())
            })
        })
        .collect();
    // A trickling destination: its bytes arrive, slowly.
    let drip_reader = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(at(ports[2])).await.unwrap();
        let mut got = 0;
        let mut b = [0u8; 16];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            if n == 0 {
                break;
            }
            got += n;
        }
        got
    });

    // Meanwhile the well-behaved destination is served, query after query.
    for i in 0..20u8 {
        let started = tokio::time::Instant::now();
        let mut s = tokio::net::TcpStream::connect(hub.service).await.unwrap();
        s.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .unwrap_or_else(|_| panic!("query {i} not served within 5 s"))
            .unwrap();
        assert_eq!(b[0], i);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    let mut offered = 0;
    let mut held = Vec::new();
    for p in pushers {
        let (sent, s) = p.await.unwrap();
        offered += sent;
        held.push(s);
    }
    let loaded = status_kib(client.pid(), "VmRSS:");
    let hub_loaded = status_kib(hub.proc.pid(), "VmRSS:");
    for v in voids {
        let (closed, took) = v.await.unwrap();
        assert!(closed, "closed without a byte");
        assert!(took < Duration::from_secs(5), "refused in {took:?}");
    }
    let dripped = drip_reader.await.unwrap();
    assert!(
        (10..=40).contains(&dripped),
        "trickled {dripped} bytes in 3 s"
    );
    eprintln!(
        "Client RSS {idle} KiB idle, {loaded} KiB with {} MiB taken of {} MiB pushed at a destination that never reads; Hub RSS {hub_idle} KiB idle, {hub_loaded} KiB then",
        offered >> 20,
        (8 * PUSH) >> 20,
    );
    // The bound: the 16 MiB connection window, plus per-query buffers and bookkeeping.
    assert!(
        loaded < idle + 48 * 1024,
        "RSS grew from {idle} to {loaded} KiB"
    );
    assert!(
        offered < 40 * (4 << 20),
        "flow control held the pushers back"
    );
    drop(held);
    assert_eq!(client.terminate().code(), Some(0));
    assert_eq!(hub.proc.terminate().code(), Some(0));
}

/// A Client at its `max_queries`: the next requester waits for a slot — bounded by the Hub's
/// open timeout (15 s) — and is then closed with a record saying why; once a slot frees, the
/// next query is served. Requesters cannot pile up on the Hub without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_p11_a_requester_beyond_max_queries_waits_a_bounded_time_and_is_audited() {
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    client.config.max_queries = 1;
    client.start();
    hub.wait_connected("acme").await;
    let service = hub.service("pg");
    let mut held = tokio::net::TcpStream::connect(service).await.unwrap();
    held.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).await.unwrap();

    let waited = tokio::time::Instant::now();
    let mut second = tokio::net::TcpStream::connect(service).await.unwrap();
    second.write_all(b"b").await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(40), second.read(&mut b))
        .await
        .expect("closed within the bound");
    assert!(
        matches!(answer, Ok(0)) || answer.is_err(),
        "closed, not answered: {answer:?}"
    );
    assert!(
        waited.elapsed() >= Duration::from_secs(10),
        "it waited for a slot first"
    );
    hub.wait_audit("the refusal's record", |r| {
        r.reason
            .as_deref()
            .is_some_and(|x| x.starts_with("no query slot on acme within 15 s"))
    })
    .await;
    drop(held);
    assert_eq!(try_roundtrip(service, b"after").await, Ok(()));
    client.stop().await;
}
