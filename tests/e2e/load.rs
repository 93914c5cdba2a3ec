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

use crate::process::{HubProcess, Proc};

/// Queries held open at once.
const QUERIES: usize = 10_000;

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

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
    let mut hub = HubProcess::start(root.path(), "");
    let (mut client, _) = hub
        .run_client(
            root.path(),
            echo,
            &format!("audit = \"discard\"\nmax_queries = {QUERIES}"),
            Stdio::null(),
        )
        .await;
    let idle = status_kib(client.pid(), "VmRSS:");

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
        while open.load(Ordering::SeqCst) < target && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(open.load(Ordering::SeqCst), QUERIES, "queries open at once");
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
