//! `/metrics` for Prometheus, on the address the operator chooses (`metrics_listen`). The Hub
//! may listen; the Client never does (it writes a textfile instead).
//!
//! A deliberately small HTTP/1.1 responder: one request per connection, the request head
//! bounded in size and time, a bounded number of scrapes at once. `GET /metrics` answers the
//! audit-derived counters and the Hub's live gauges; anything else is 404 or 405.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ewii_common::audit::Side;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::HubHandle;
use crate::audit::metrics::Exposition;
use crate::audit::Audit;

/// The longest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// How long a scraper has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once. When all are taken, a new connection displaces the oldest one that
/// has not sent its request yet, so that idle connections (16, renewed every 5 s) cannot keep
/// Prometheus out; only connections being answered make a new one wait.
const MAX_SCRAPES: usize = 16;

/// How long a displaced connection has to give its slot back before the next one goes.
const EVICT_RETRY: Duration = Duration::from_millis(20);

/// Connections still waiting for their request head, oldest first: each can be told to go.
#[derive(Default)]
struct Waiting {
    next: u64,
    by_age: BTreeMap<u64, Arc<Notify>>,
}

impl Waiting {
    fn add(&mut self) -> (u64, Arc<Notify>) {
        let id = self.next;
        self.next += 1;
        let go = Arc::new(Notify::new());
        self.by_age.insert(id, go.clone());
        (id, go)
    }
}

/// Serves until the task is dropped.
pub(super) async fn serve(listener: TcpListener, audit: Audit, hub: HubHandle) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    let waiting = Arc::new(Mutex::new(Waiting::default()));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(permit) = make_room(&slots, &waiting).await else {
            return;
        };
        let (id, go) = lock(&waiting).add();
        let (audit, hub, waiting) = (audit.clone(), hub.clone(), waiting.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ =
                tokio::time::timeout(READ_TIMEOUT, answer(stream, go, id, &waiting, &audit, &hub))
                    .await;
            lock(&waiting).by_age.remove(&id);
        });
    }
}

/// A slot for a new connection. When all are taken, the oldest connection that has not sent
/// its whole request yet is told to go, and its permit comes back as it ends; one that read
/// its request meanwhile is answered, and the next oldest goes. With none waiting (every
/// slot answering), this waits for an answer to finish.
async fn make_room(
    slots: &Arc<Semaphore>,
    waiting: &Mutex<Waiting>,
) -> Option<OwnedSemaphorePermit> {
    loop {
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            return Some(permit);
        }
        let Some((_, go)) = lock(waiting).by_age.pop_first() else {
            return slots.clone().acquire_owned().await.ok();
        };
        go.notify_one();
        tokio::select! {
            permit = slots.clone().acquire_owned() => return permit.ok(),
            () = tokio::time::sleep(EVICT_RETRY) => {}
        }
    }
}

fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting.lock().unwrap_or_else(|e| e.into_inner())
}

async fn answer(
    mut stream: TcpStream,
    go: Arc<Notify>,
    id: u64,
    waiting: &Mutex<Waiting>,
    audit: &Audit,
    hub: &HubHandle,
) -> std::io::Result<()> {
    let head = tokio::select! {
        // A request already read is answered, even when its connection was told to go.
        biased;
        head = read_head(&mut stream) => head?,
        () = go.notified() => return Ok(()),
    };
    lock(waiting).by_age.remove(&id);
    let Some(head) = head else {
        return respond(&mut stream, "431 Request Header Fields Too Large", "").await;
    };
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    match (method, target) {
        (b"GET", b"/metrics") => respond(&mut stream, "200 OK", &exposition(audit, hub)).await,
        (b"GET", _) => respond(&mut stream, "404 Not Found", "only /metrics is served\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "GET /metrics only\n").await,
    }
}

/// The request head, up to its blank line; `None` when it is longer than [`MAX_HEAD`]. A peer
/// that closes first is an error.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    // Where the blank line may start in what comes next: each read is looked at once (a peer
    // sending a byte at a time must not make every read rescan the whole head).
    let mut from = 0;
    while !head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
        from = head.len().saturating_sub(3);
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(Some(head))
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// A family of samples, each with its label set (`name="value"`).
fn labelled(
    out: &mut Exposition,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl Iterator<Item = (String, String)>,
) {
    let samples: Vec<(String, String)> = samples.collect();
    let refs: Vec<(&str, String)> = samples
        .iter()
        .map(|(label, n)| (label.as_str(), n.clone()))
        .collect();
    out.family(name, kind, help, &refs);
}

/// The text a scrape receives.
fn exposition(audit: &Audit, hub: &HubHandle) -> String {
    let mut out = Exposition::default();
    out.one(
        "ewii_hub_clients_connected",
        "gauge",
        "Clients with a live session.",
        hub.connected_clients().len(),
    );
    out.one(
        "ewii_hub_connections",
        "gauge",
        "Live Client connections (two for a moment while a Client moves to a new one).",
        hub.connections(),
    );
    out.one(
        "ewii_hub_queries_open",
        "gauge",
        "Requesters' queries in progress on the service listeners (accepted, not yet recorded).",
        hub.queries_open(),
    );
    labelled(
        &mut out,
        "ewii_hub_shard_connections",
        "gauge",
        "Live Client connections on each shard (thread); a Client's queries run on its connection's shard.",
        hub.connections_per_shard()
            .iter()
            .enumerate()
            .map(|(shard, n)| (format!("shard=\"{shard}\""), n.to_string())),
    );
    out.one(
        "ewii_hub_quic_connections",
        "gauge",
        "QUIC connections the Hub's endpoints hold: handshakes, live connections, and closed ones, each kept for three probe timeouts after a close (one that timed out idle or was reset is let go at once).",
        hub.quic_connections(),
    );
    out.one(
        "ewii_hub_quic_retries_total",
        "counter",
        "New connections asked to prove their address (QUIC Retry) under load.",
        hub.retries_sent(),
    );
    labelled(
        &mut out,
        "ewii_hub_connections_refused_total",
        "counter",
        "New connections refused before their handshake: the Hub, or one address, at its bound of handshakes in progress.",
        super::admission::REFUSAL_REASONS
            .iter()
            .zip(hub.handshakes_refused())
            .map(|(reason, n)| (format!("reason=\"{reason}\""), n.to_string())),
    );
    out.one(
        "ewii_hub_trust_reloads_failed_total",
        "counter",
        "Reloads of the trust material (CA, bundle, Hub SVID) that failed, every try: a failed reload is tried again every second and audited once per reason.",
        hub.trust_reloads_failed(),
    );
    out.one(
        "ewii_hub_store_statements_total",
        "counter",
        "Database statements run by the store since start.",
        hub.store_statements(),
    );
    audit.metrics().snapshot().expose(Side::Hub, &mut out);
    out.finish()
}
