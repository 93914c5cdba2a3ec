//! The load generator: round trips and new-connection rates through a tunnel's entry to the
//! echo service, idle connections held open, and bulk transfers with Debian's `iperf3`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Round trips timed on one connection after this many unmeasured ones.
pub const WARM_UP: usize = 100;

/// A TCP echo service on loopback, on its own thread and runtime so that the load generator
/// does not starve it; returns its address.
pub fn echo_service() -> anyhow::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::spawn(move || {
        rt.block_on(async move {
            let Ok(listener) = TcpListener::from_std(std_listener) else {
                return;
            };
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
    });
    Ok(addr)
}

async fn echo_one(s: &mut TcpStream) -> anyhow::Result<()> {
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    if b != *b"x" {
        bail!("echo returned {b:?}");
    }
    Ok(())
}

/// Until a new connection through `addr` echoes one byte (a tunnel is ready), at most `within`.
pub async fn ready(addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        let attempt = async {
            let mut s = TcpStream::connect(addr).await?;
            echo_one(&mut s).await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = Some(e.to_string()),
            Err(_) => last = Some("no echo within 2 s".into()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!(
        "{addr} did not echo within {within:?}: {}",
        last.unwrap_or_default()
    )
}

/// `n` one-byte round trips on one open connection; each one's time in microseconds.
pub async fn round_trips(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    for _ in 0..WARM_UP {
        echo_one(&mut s).await?;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        echo_one(&mut s).await?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(times)
}

/// The same round trips from a blocking client on a thread of its own, as psql, redis-cli or a
/// thread-per-connection application make them: each read sleeps in the kernel until the echo
/// arrives, with no event loop or other worker between. Call it from a blocking thread
/// (`spawn_blocking`).
pub fn round_trips_blocking(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<f64>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    // Bounded: a tunnel that stops echoing fails the run instead of hanging it.
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let one = |s: &mut std::net::TcpStream| {
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        if b != *b"x" {
            bail!("echo returned {b:?}");
        }
        anyhow::Ok(())
    };
    for _ in 0..WARM_UP {
        one(&mut s)?;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        one(&mut s)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(times)
}

/// What a connection-rate run did.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Completed connect → 1-byte echo → close cycles per second.
    pub per_sec: f64,
    /// Completed cycles.
    pub completed: u64,
    /// Cycles that failed (refused, reset, short echo, 5 s timeout).
    pub failed: u64,
}

/// `concurrency` loops of connect → 1-byte echo → close through `addr` for `dur`.
pub async fn connection_rate(addr: SocketAddr, concurrency: usize, dur: Duration) -> Rate {
    let start = Instant::now();
    let end = start + dur;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        tasks.spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            while Instant::now() < end {
                let cycle = async {
                    let mut s = TcpStream::connect(addr).await?;
                    s.set_nodelay(true)?;
                    echo_one(&mut s).await?;
                    s.shutdown().await?;
                    anyhow::Ok(())
                };
                match tokio::time::timeout(Duration::from_secs(5), cycle).await {
                    Ok(Ok(())) => ok += 1,
                    _ => failed += 1,
                }
            }
            (ok, failed)
        });
    }
    let (mut ok, mut failed) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (o, f) = r.unwrap_or((0, 1));
        ok += o;
        failed += f;
    }
    Rate {
        per_sec: ok as f64 / start.elapsed().as_secs_f64(),
        completed: ok,
        failed,
    }
}

/// `n` connections through `addr`, each having echoed one byte, held open.
pub async fn hold_idle(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await?;
        tokio::time::timeout(Duration::from_secs(5), echo_one(&mut s))
            .await
            .context("idle connection: no echo within 5 s")??;
        held.push(s);
    }
    Ok(held)
}

/// One `iperf3` run through `addr`.
#[derive(Debug, Clone, Copy)]
pub struct Bulk {
    /// Received by the far end, in bits per second.
    pub bits_per_sec: f64,
    /// Bytes received by the far end.
    pub bytes: f64,
}

/// `iperf3 -c` through `addr` for `secs` seconds, one TCP stream; `reverse` sends from the
/// server to the client (`-R`). The figure is what the receiving side counted.
pub async fn iperf(
    iperf3: &Path,
    addr: SocketAddr,
    secs: u32,
    reverse: bool,
) -> anyhow::Result<Bulk> {
    let mut cmd = tokio::process::Command::new(iperf3);
    cmd.args([
        "-c",
        &addr.ip().to_string(),
        "-p",
        &addr.port().to_string(),
        "-t",
        &secs.to_string(),
        "-J",
        // The control connection goes through the tunnel too; keep its setup time bounded.
        "--connect-timeout",
        "5000",
    ]);
    if reverse {
        cmd.arg("-R");
    }
    let out = tokio::time::timeout(Duration::from_secs(u64::from(secs) + 30), cmd.output())
        .await
        .context("iperf3 did not finish")??;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stdout)))?;
    if let Some(e) = json.get("error") {
        bail!("iperf3: {e}");
    }
    let recv = &json["end"]["sum_received"];
    let bits = recv["bits_per_second"]
        .as_f64()
        .context("iperf3: no sum_received")?;
    let bytes = recv["bytes"].as_f64().context("iperf3: no bytes")?;
    Ok(Bulk {
        bits_per_sec: bits,
        bytes,
    })
}
