//! `ewii-compare`: one run, three ways to move bytes to the same TCP echo service — a direct
//! loopback connection, the Ewii tunnel, and the tunnel with the Client under the eBPF egress
//! lock — interleaved round by round so that a noisy machine affects all alike. Prints the
//! median throughput of each and the ratios. Measures; asserts nothing.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! sudo target/release/ewii-compare            # root: the lock needs a child cgroup and CAP_BPF
//! ```
#![allow(clippy::print_stdout)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use ewii_common::audit::Event;
use ewii_tests::{echo_server, Service, TestClient, TestHub};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Bytes each way per transfer.
const TRANSFER: usize = 8 * 1024 * 1024;
/// Transfers per configuration per round.
const PER_ROUND: usize = 3;
/// How often the harness looks again at a cgroup or the Hub's sessions.
const POLL: Duration = Duration::from_millis(20);
/// Rounds (each runs every configuration once).
const ROUNDS: usize = 3;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(compare())
}

async fn compare() -> anyhow::Result<()> {
    let client_bin = sibling("ewii-client")?;
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    let config = client.dir.path().join("client.toml");
    fs::write(
        &config,
        format!(
            "hub = \"{}\"\nstate_dir = {:?}\naudit = \"discard\"\non_stop = \"disconnect\"\n[reconnect]\ninitial_ms = 50\nmax_ms = 500\n[[allow]]\nname = \"db\"\naddress = \"{echo}\"\n",
            hub.addr,
            client.state_dir()
        ),
    )?;
    let lock_possible = is_root() && cgroup2_mount().is_some();
    let mut results: Vec<(&str, Vec<f64>)> = vec![("direct TCP", vec![]), ("Ewii", vec![])];
    if lock_possible {
        results.push(("Ewii + eBPF lock", vec![]));
    }
    for round in 0..ROUNDS {
        for (name, samples) in results.iter_mut() {
            let target = match *name {
                "direct TCP" => None,
                "Ewii" => Some(false),
                _ => Some(true),
            };
            let mut running = match target {
                None => None,
                Some(locked) => Some(start_client(&client_bin, &config, locked, &hub).await?),
            };
            let addr = if target.is_some() {
                hub.service("pg")
            } else {
                echo
            };
            for _ in 0..PER_ROUND {
                samples.push(transfer(addr).await?);
            }
            if let Some(c) = running.as_mut() {
                c.stop()?;
            }
            eprintln!("round {}/{ROUNDS}: {name} done", round + 1);
        }
    }
    let medians: Vec<(&str, f64)> = results.iter_mut().map(|(n, s)| (*n, median(s))).collect();
    let direct = medians[0].1;
    println!("\n{TRANSFER} bytes each way per transfer, {PER_ROUND} transfers x {ROUNDS} interleaved rounds, median:");
    for (name, m) in &medians {
        println!("  {name:<18} {m:>8.1} MB/s   {:>5.2} x direct", m / direct);
    }
    if let [_, (_, off), (_, on)] = medians.as_slice() {
        println!("  lock on / lock off: {:.3}", on / off);
    } else {
        println!("  eBPF lock: not measured (needs root and cgroup v2)");
    }
    Ok(())
}

/// Echoes `TRANSFER` bytes through `addr`; returns MB/s counting both directions.
async fn transfer(addr: SocketAddr) -> anyhow::Result<f64> {
    let data = vec![0xa5u8; TRANSFER];
    let start = Instant::now();
    let s = tokio::net::TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(TRANSFER);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
        .await
        .context("transfer timed out")??;
    writer.await??;
    if back.len() != TRANSFER {
        bail!("short echo: {} of {TRANSFER}", back.len());
    }
    Ok((2 * TRANSFER) as f64 / start.elapsed().as_secs_f64() / 1e6)
}

struct Running {
    child: Child,
    cgroup: Option<PathBuf>,
}

impl Running {
    fn stop(&mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        self.child.wait()?;
        if let Some(cg) = self.cgroup.take() {
            for _ in 0..100 {
                if fs::remove_dir(&cg).is_ok() {
                    break;
                }
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    }
}

async fn start_client(
    bin: &Path,
    config: &Path,
    locked: bool,
    hub: &TestHub,
) -> anyhow::Result<Running> {
    let ups = session_ups(hub);
    let (child, cgroup) = if locked {
        let cg = cgroup2_mount()
            .context("cgroup2")?
            .join(format!("ewii-compare-{}", std::process::id()));
        fs::create_dir_all(&cg)?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&cg)
            .arg(bin)
            .args(["run", "--config"])
            .arg(config)
            .stderr(Stdio::null())
            .spawn()?;
        (child, Some(cg))
    } else {
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .stderr(Stdio::null())
            .spawn()?;
        (child, None)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while session_ups(hub) == ups {
        if Instant::now() > deadline {
            bail!("the Client did not connect");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(Running { child, cgroup })
}

fn session_ups(hub: &TestHub) -> usize {
    hub.audit
        .records()
        .iter()
        .filter(|r| r.event == Event::SessionUp)
        .count()
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("exe dir")?;
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found next to {}: cargo build --release --workspace --bins",
        exe.display()
    )
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
}

fn cgroup2_mount() -> Option<PathBuf> {
    ewii::enforce::ebpf::cgroup2_mount().ok()
}
