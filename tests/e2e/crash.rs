//! The Hub killed (SIGKILL) and restarted in the middle of 100 queries (P9, P10, P11, P14):
//! every requester gets its bytes back or a closed connection — nothing hangs —, the Client
//! writes one audit record per query, comes back within its backoff cap, and the Hub's state
//! (enrolments, serials, a revocation, a webhook still to deliver) survives the kill.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use ewii_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{field, healthy, run, spawn_hub, HubProcess};

/// One slow query: 64 chunks of 4 KiB, 30 ms apart, each echoed. `Ok` when every byte came
/// back, else what the requester saw.
async fn slow_query(service: SocketAddr, seed: u8) -> Result<(), String> {
    let s = tokio::net::TcpStream::connect(service)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        for i in 0..64u8 {
            let chunk = vec![seed ^ i; 4096];
            if w.write_all(&chunk).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let _ = w.shutdown().await;
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut got)).await;
    writer.abort();
    match read {
        Err(_) => Err("hung for 30 s".into()),
        Ok(Err(e)) => Err(format!("closed: {e}")),
        Ok(Ok(_)) if got.len() == 64 * 4096 => {
            let expected: Vec<u8> = (0..64u8).flat_map(|i| vec![seed ^ i; 4096]).collect();
            (got == expected)
                .then_some(())
                .ok_or_else(|| "wrong bytes".into())
        }
        Ok(Ok(n)) => Err(format!("closed after {n} of {} bytes", 64 * 4096)),
    }
}

fn clients(hub_dir: &str) -> serde_json::Value {
    let out = run("ewii-hub", &["clients", "--state-dir", hub_dir, "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_p10_p11_p14_the_hub_killed_during_100_queries_loses_no_record_and_no_state() {
    let root = tempfile::tempdir().unwrap();
    let (echo, reached) = echo_server_counting(std::net::Ipv4Addr::LOCALHOST.into()).await;
    let receiver = Receiver::start_closed().await;
    let mut hub = HubProcess::start(
        root.path(),
        "[webhooks]\ndanger_allow_private_targets = true\nretry_initial_ms = 200\nretry_max_ms = 500\nmax_attempts = 1000",
    );
    let hub_dir = hub.dir.to_str().unwrap().to_owned();

    // beta: enrolled with a webhook, then revoked while the customer's endpoint is down: the
    // delivery waits in the Hub's outbox.
    let token = run(
        "ewii-hub",
        &[
            "token",
            "create",
            "--state-dir",
            &hub_dir,
            "--client",
            "beta",
            "--webhook",
            &receiver.url,
            "--danger-allow-private-webhook",
        ],
    );
    let enrolled = Command::new(bin_path("ewii-client"))
        .args([
            "enroll",
            "--hub",
            &hub.addr,
            "--bundle-hash",
            &hub.bundle_hash,
        ])
        .args(["--state-dir", root.path().join("beta").to_str().unwrap()])
        .env("EWII_TOKEN", field(&token, "token:"))
        .output()
        .unwrap();
    assert!(enrolled.status.success(), "{enrolled:?}");
    run(
        "ewii-hub",
        &[
            "revoke",
            "--state-dir",
            &hub_dir,
            "--client",
            "beta",
            "--reason",
            "test",
        ],
    );
    poll_until("a failed delivery attempt", SOON, || {
        receiver.deliveries().iter().any(|d| d.status == 503)
    })
    .await;

    // acme: running, its audit read as it comes.
    let (mut client, client_dir) = hub
        .run_client(
            root.path(),
            echo,
            "[reconnect]\ninitial_ms = 200\nmax_ms = 2000",
            Stdio::piped(),
        )
        .await;
    let stdout = client.0.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap())
            .collect::<Vec<_>>()
    });
    let before = clients(&hub_dir);
    let session = |dir: &std::path::Path| {
        let out = run(
            "ewii-client",
            &["status", "--state-dir", dir.to_str().unwrap()],
        );
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (status["state"] == "connected")
            .then(|| status["session_id"].as_u64())
            .flatten()
    };
    let first_session = session(&client_dir).unwrap();

    // 100 slow queries; the Hub is killed while they run, and started again.
    let queries: Vec<_> = (0..100u8)
        .map(|i| tokio::spawn(slow_query(hub.service, i)))
        .collect();
    // Killed once every query reached the service: the Client read each one's `Open`, so each
    // leaves a record on its side (a query the Hub had not yet sent would leave none). A
    // query takes at least 1.9 s (64 chunks, 30 ms apart): the kill finds them running.
    poll_until("the 100 queries at the service", SOON, || {
        reached.load(std::sync::atomic::Ordering::SeqCst) >= 100
    })
    .await;
    let killed = Command::new("kill")
        .args(["-KILL", &hub.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = hub.proc.0.wait();
    let restarted = tokio::time::Instant::now();
    hub.proc = spawn_hub(&root.path().join("hub.toml"));

    let mut outcomes = Vec::new();
    for q in queries {
        outcomes.push(q.await.unwrap());
    }
    let done = outcomes.iter().filter(|o| o.is_ok()).count();
    assert!(
        outcomes
            .iter()
            .all(|o| o.as_ref().is_ok() || o.as_ref().is_err_and(|e| e.starts_with("closed"))),
        "every query completed or was closed: {outcomes:?}"
    );

    // Back on a new session within the loss detection (2.5 s) and the backoff cap (2 s),
    // with room for a loaded machine.
    poll_until(
        "the Client on a new session",
        Duration::from_secs(30),
        || session(&client_dir).is_some_and(|s| s != first_session),
    )
    .await;
    healthy(&client_dir).await;
    let back = restarted.elapsed();
    assert!(back < Duration::from_secs(3 + 2 + 8), "back after {back:?}");
    assert_eq!(
        slow_query(hub.service, 200).await,
        Ok(()),
        "a query after the restart"
    );

    // Nothing of the Hub's state was lost: the same clients, serials and revocation.
    let after = clients(&hub_dir);
    let strip = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].clone(),
                    c["serials"].clone(),
                    c["revoked_at"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&before), strip(&after));
    // The webhook that waited in the outbox is delivered once the endpoint is up.
    receiver.open();
    poll_until("the pending webhook, after the kill", SOON, || {
        receiver
            .deliveries()
            .iter()
            .any(|d| d.status == 200 && String::from_utf8_lossy(&d.body).contains("beta"))
    })
    .await;

    // One audit record per query on the Client: the 100, and the one after.
    assert_eq!(client.terminate().code(), Some(0));
    let records = lines.join().unwrap();
    let ids: std::collections::HashSet<String> = records
        .iter()
        .filter(|r| r["event"] == "query")
        .map(|r| r["query_id"].as_str().unwrap().to_owned())
        .collect();
    let query_records = records.iter().filter(|r| r["event"] == "query").count();
    assert_eq!(query_records, 101, "one record per query");
    assert_eq!(ids.len(), 101, "each its own query_id");
    let ok = records
        .iter()
        .filter(|r| r["event"] == "query" && r["outcome"] == "ok")
        .count();
    assert_eq!(
        ok,
        done + 1,
        "the Client's ok records match what the requesters got"
    );
    eprintln!("{done} of 100 queries completed across the kill; the rest were closed");
    assert_eq!(hub.proc.terminate().code(), Some(0));
}
