//! A Client whose audit sink stops draining (P11): its stdout is a pipe nobody reads. New
//! queries are refused once `audit_backlog` records wait — the process does not grow without
//! bound and loses no record — and once the pipe is read again, queries work, every query the
//! requester saw served has its record, and one `audit_backlog` record counts the refused ones.
//! The Hub's side of the same, whose count is written at its stop when no query came after.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ewii_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{status_kib, HubProcess};

/// One query: true when the byte came back, false when the requester was closed unanswered.
async fn one_query(service: SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(service).await.ok()?;
        s.write_all(b"x").await.ok()?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.ok()?;
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Queries until `refusals` of them were refused (at most 3,000); returns (served, refused).
async fn until_refused(service: SocketAddr, refusals: u64) -> (u64, u64) {
    let (mut served, mut refused) = (0u64, 0u64);
    for _ in 0..3_000 {
        if one_query(service).await {
            served += 1;
        } else {
            refused += 1;
            if refused == refusals {
                break;
            }
        }
    }
    assert_eq!(refused, refusals, "never refused after {served} queries");
    (served, refused)
}

/// One `ok` record per query `served`, every record valid, and exactly one `audit_backlog`
/// record that counts the `refused` ones; returns it.
fn nothing_lost_and_one_summary(
    records: &[serde_json::Value],
    served: u64,
    refused: u64,
) -> &serde_json::Value {
    let ok = records
        .iter()
        .filter(|r| r["event"] == "query" && r["outcome"] == "ok")
        .count() as u64;
    assert_eq!(ok, served, "one record per query served");
    let summaries: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["event"] == "audit_backlog")
        .collect();
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    let reason = summaries[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("{refused} queries refused since ")),
        "{reason} (requesters saw {refused} refused)"
    );
    for r in records {
        let bad = audit_line_violations(&r.to_string());
        assert!(bad.is_empty(), "{bad:?}");
    }
    summaries[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_a_client_whose_audit_sink_blocks_refuses_new_queries_and_loses_no_record() {
    let root = tempfile::tempdir().unwrap();
    let echo = echo_server().await;
    let mut hub = HubProcess::start(root.path(), "");
    // Audit lines go to a pipe this test does not read (yet).
    let (mut client, _) = hub
        .run_client(root.path(), echo, "audit_backlog = 16", Stdio::piped())
        .await;
    let service = hub.service;

    // The pipe (64 KiB) fills after a few hundred records, then 16 wait in the Client: from
    // there on new queries are refused. Bounded: at most 3,000 queries.
    let rss_before = status_kib(client.pid(), "VmRSS:");
    let (mut served, mut refused) = until_refused(service, 50).await;
    assert!(served > 16, "served {served} before the backlog filled");
    let rss_blocked = status_kib(client.pid(), "VmRSS:");

    // Read the pipe again: the backlog drains and queries are served again.
    let stdout = client.0.stdout.take().unwrap();
    let read = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let read = read.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let record = serde_json::from_str::<serde_json::Value>(&line.unwrap()).unwrap();
                read.lock().unwrap().push(record);
            }
        })
    };
    let mut back = false;
    for _ in 0..100 {
        if one_query(service).await {
            served += 1;
            back = true;
            break;
        }
        refused += 1;
        tokio::time::sleep(POLL).await;
    }
    assert!(back, "queries not served again once the sink drained");
    // The first query admitted wrote the summary behind everything that waited: once it is
    // read, the sink has caught up, and the next queries find the backlog empty (asked while
    // the writer was still behind, they could be refused again).
    poll_until("the summary read from the pipe", SOON, || {
        read.lock()
            .unwrap()
            .iter()
            .any(|r| r["event"] == "audit_backlog")
    })
    .await;
    for _ in 0..5 {
        assert!(one_query(service).await);
        served += 1;
    }
    assert_eq!(client.terminate().code(), Some(0));
    reader.join().unwrap();
    let records = std::mem::take(&mut *read.lock().unwrap());
    nothing_lost_and_one_summary(&records, served, refused);
    // Bounded: refusing costs nothing that stays (reported, not asserted as a timing).
    eprintln!("client RSS: {rss_before} KiB before, {rss_blocked} KiB with the sink blocked");
    assert!(
        rss_blocked < rss_before + 16 * 1024,
        "RSS grew from {rss_before} to {rss_blocked} KiB"
    );
    assert_eq!(hub.proc.terminate().code(), Some(0));
}

/// The Hub's side of P11: its audit sink (here a FIFO nobody reads) stops draining. Requesters
/// are closed at once past `audit_backlog` waiting records, and when the Hub stops before any
/// query was admitted again, its stop still writes the one `audit_backlog` record that counts
/// them, behind every record that waited: nothing is lost, and no refusal goes untold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_a_hub_whose_audit_sink_blocks_closes_requesters_and_counts_them_at_its_stop() {
    let root = tempfile::tempdir().unwrap();
    let echo = echo_server().await;
    let fifo = root.path().join("hub-audit.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // The reader opens the FIFO (which lets the Hub's open go through) and reads nothing until
    // told to; then it reads every line until the Hub closes its end.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&fifo).unwrap();
            wait.recv().unwrap();
            BufReader::new(file)
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap())
                .collect::<Vec<_>>()
        })
    };
    let mut hub = HubProcess::start_with_audit(
        root.path(),
        &format!("file:{}", fifo.display()),
        "audit_backlog = 16",
    );
    let (client, _) = hub.run_client(root.path(), echo, "", Stdio::null()).await;
    let service = hub.service;
    // The FIFO (64 KiB) fills after a few hundred records, then 16 wait in the Hub. Bounded.
    let (served, refused) = until_refused(service, 20).await;
    // The reader drains the FIFO; no query comes, so only the stop can say what was refused.
    go.send(()).unwrap();
    assert_eq!(hub.proc.terminate().code(), Some(0));
    let records = reader.join().unwrap();
    let summary = nothing_lost_and_one_summary(&records, served, refused);
    assert_eq!(summary["side"], "hub");
    assert_eq!(summary["outcome"], "refused");
    assert_eq!(
        records.last().map(|r| r["event"].clone()),
        Some("stopped".into()),
        "the stop's own record comes last"
    );
    // (Killed: its stop would wait for a Hub that is gone to acknowledge its revoke.)
    drop(client);
}
