//! A fleet (P9, P14): many `ewii-client` processes, each its own QUIC connection, on one
//! `ewii-hub` process with queries flowing; then the Hub restarts and all of them come back
//! at once — spread by their jittered backoff, not a storm. Reports the spread of their
//! returns and the Hub's CPU and memory.
//!
//! Opt-in by size: `EWII_FLEET_CLIENTS` (unset: skipped). `.ci/run` runs 50 (`scripts/soak 120 50`);
//! `scripts/soak 1800 200` runs 200.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use ewii_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{
    field, free_tcp_port, run, spawn_hub, spawn_hub_on_free_ports, status_kib, Proc,
};

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

async fn echo_query(service: SocketAddr) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(service)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut b))
        .await
        .map_err(|_| "no echo in 20 s".to_string())?
        .map_err(|e| e.to_string())?;
    (&b == b"ping")
        .then_some(())
        .ok_or_else(|| "wrong echo".into())
}

/// Microseconds since the epoch of each `session_up` in an audit file.
fn sessions_up(audit: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "session_up")
        .filter_map(|r| {
            let t = r["time"].as_str()?;
            let t = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .ok()?;
            Some((t.unix_timestamp_nanos() / 1_000) as u64)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_p14_a_fleet_of_clients_returns_after_a_hub_restart_without_a_storm() {
    let Some(n) = std::env::var("EWII_FLEET_CLIENTS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    else {
        eprintln!("SKIPPED: set EWII_FLEET_CLIENTS (scripts/soak) to run the fleet");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let echo = echo_server().await;
    let hub_dir = root.path().join("hub");
    let hub_dir_s = hub_dir.to_str().unwrap().to_owned();
    let init = run(
        "ewii-hub",
        &["init", "--state-dir", &hub_dir_s, "--trust-domain", TD],
    );
    let bundle_hash = field(&init, "bundle hash:");
    let hub_toml = root.path().join("hub.toml");
    let mut services: Vec<u16> = Vec::with_capacity(n);
    let (mut hub, udp) = spawn_hub_on_free_ports(&hub_toml, |udp| {
        let mut toml =
            format!("state_dir = {hub_dir:?}\nlisten = \"127.0.0.1:{udp}\"\naudit = \"discard\"\n");
        // Distinct ports (a port freed by one probe can come back from the next).
        services.clear();
        while services.len() < n {
            let port = free_tcp_port();
            if port != udp && !services.contains(&port) {
                services.push(port);
            }
        }
        for (i, port) in services.iter().enumerate() {
            let _ = write!(
                toml,
                "[[service]]\nname = \"s{i}\"\nlisten = \"127.0.0.1:{port}\"\nclient = \"c{i}\"\ndestination = \"db\"\nprincipal = \"ops\"\n"
            );
        }
        toml
    });
    let hub_addr = format!("127.0.0.1:{udp}");

    // The fleet: enrolled and started one after the other, each its own process.
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let dir = root.path().join(format!("c{i}"));
        let token = run(
            "ewii-hub",
            &[
                "token",
                "create",
                "--state-dir",
                &hub_dir_s,
                "--client",
                &format!("c{i}"),
                "--ttl",
                "10m",
            ],
        );
        let out = Command::new(bin_path("ewii-client"))
            .args(["enroll", "--hub", &hub_addr, "--bundle-hash", &bundle_hash])
            .args(["--state-dir", dir.to_str().unwrap()])
            .env("EWII_TOKEN", field(&token, "token:"))
            .output()
            .unwrap();
        assert!(out.status.success(), "c{i}: {out:?}");
        let audit = dir.join("audit.jsonl");
        let config = root.path().join(format!("c{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "hub = \"{hub_addr}\"\nstate_dir = {dir:?}\naudit = \"file:{}\"\non_stop = \"disconnect\"\n[reconnect]\ninitial_ms = 500\nmax_ms = 5000\n[[allow]]\nname = \"db\"\naddress = \"{echo}\"\n[enforcement]\nlayers = [\"landlock\", \"privileges\", \"seccomp\"]\n",
                audit.display()
            ),
        )
        .unwrap();
        let proc = Proc(
            Command::new(bin_path("ewii-client"))
                .args(["run", "--config", config.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        clients.push((proc, dir, audit));
    }
    for (_, dir, _) in &clients {
        crate::process::healthy(dir).await;
    }
    let service = |i: usize| SocketAddr::from(([127, 0, 0, 1], services[i]));
    let round = |label: &'static str| async move {
        let queries: Vec<_> = (0..n)
            .map(|i| tokio::spawn(echo_query(service(i))))
            .collect();
        for (i, q) in queries.into_iter().enumerate() {
            assert_eq!(q.await.unwrap(), Ok(()), "{label}: c{i}");
        }
    };
    round("queries before the restart").await;
    let (cpu_idle, rss_before) = (cpu_seconds(hub.pid()), status_kib(hub.pid(), "VmRSS:"));

    // The Hub restarts (SIGTERM: every session is told; then a new process).
    assert_eq!(hub.terminate().code(), Some(0));
    let restarted_us = ewii::now_timestamp().0;
    hub = spawn_hub(&hub_toml);
    let hub_pid = hub.pid();
    let mut peak_rss = 0;
    let mut returns: Vec<f64> = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while returns.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} back in 60 s",
            returns.len()
        );
        peak_rss = peak_rss.max(status_kib(hub_pid, "VmRSS:"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        returns = clients
            .iter()
            .filter_map(|(_, _, audit)| {
                sessions_up(audit)
                    .into_iter()
                    .find(|t| *t > restarted_us)
                    .map(|t| (t - restarted_us) as f64 / 1e6)
            })
            .collect();
    }
    let cpu_return = cpu_seconds(hub_pid);
    round("queries after the restart").await;
    returns.sort_by(f64::total_cmp);
    let pick = |q: f64| returns[((returns.len() - 1) as f64 * q) as usize];
    eprintln!(
        "{n} Clients back after the Hub restart in {:.2} s min, {:.2} s median, {:.2} s p90, {:.2} s max; \
         Hub: {rss_before} KiB before (CPU {cpu_idle:.2} s so far), the new Hub peaked at {peak_rss} KiB and \
         used {cpu_return:.2} CPU-s taking them back",
        pick(0.0),
        pick(0.5),
        pick(0.9),
        pick(1.0)
    );
    // Jittered, not a storm: the returns spread over time rather than arriving as one.
    assert!(
        pick(1.0) - pick(0.0) > 0.05 || n < 10,
        "all {n} back at the same instant"
    );
    // Each within its backoff: a cap of 5 s after the first failed dial, and some room.
    assert!(
        pick(1.0) < 5.0 + 10.0,
        "the last back after {:.2} s",
        pick(1.0)
    );
    assert_eq!(hub.terminate().code(), Some(0));
}
