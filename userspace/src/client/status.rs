//! The status file: how `ewii-client status` and `ewii-client health` learn the Client's
//! state without any listener (P13).
//!
//! The running Client hands each new [`Status`] to a [`StatusWriter`], a thread of its own:
//! async tasks never write or fsync. The thread rewrites `status.json` atomically only when
//! its content changed, and otherwise refreshes the file's modification time every
//! [`HEARTBEAT`] (no write, no fsync), which is what `health` reads as "still running".

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::audit::metrics::Exposition;
use crate::audit::{Metrics, Snapshot};
use crate::identity::store;
use ewii_common::audit::Side;

/// File name inside the state directory.
pub const STATUS_FILE: &str = "status.json";
/// How often a connected Client refreshes the file.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// `health` fails when the file is older than this.
pub const STALE_AFTER: Duration = Duration::from_secs(35);

/// Link state as written to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Dialling the Hub.
    Connecting,
    /// A session is up.
    Connected,
    /// Waiting before the next dial.
    Backoff,
    /// Stopping: reaching the Hub only to deliver the revoke (`on_stop = "revoke"`).
    Revoking,
    /// Revoked, by the Hub or at its own stop (`on_stop = "revoke"`, confirmed by the Hub; the
    /// reason is in `last_error`); the Client will not dial again.
    Revoked,
    /// Stopped.
    Stopped,
    /// The SVID expired without renewal; enrol again.
    Expired,
}

/// Contents of `status.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Link state.
    pub state: State,
    /// Writer's process id.
    pub pid: u32,
    /// When the running Client last confirmed this content, microseconds since the epoch:
    /// the later of the write and the file's modification time (refreshed every heartbeat).
    pub updated_us: u64,
    /// The Hub address.
    pub hub: String,
    /// This Client's SPIFFE ID.
    pub spiffe_id: String,
    /// SVID expiry, seconds since the epoch.
    pub svid_not_after: i64,
    /// Current session id, when connected.
    pub session_id: Option<u64>,
    /// The effective allow-list, `name=endpoint`.
    pub allow_list: Vec<String>,
    /// Reconnects in a row, while not connected: failed dials, and sessions that ended within
    /// 10 s, since the last session that lasted.
    pub failures: u32,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// Which kernel layers are active, what each covers, what its self-test saw.
    #[serde(default)]
    pub enforcement: crate::enforce::Report,
    /// Kernel refusals per eBPF hook since start.
    #[serde(default)]
    pub kernel_denied: Vec<(String, u64)>,
    /// The serial of the SVID in use.
    #[serde(default)]
    pub svid_serial: String,
    /// SVID validity start, seconds since the epoch.
    #[serde(default)]
    pub svid_not_before: i64,
    /// When the next renewal is due, seconds since the epoch (only while connected).
    #[serde(default)]
    pub next_renewal_unix: Option<i64>,
    /// The identity the Hub must present: `spiffe://<trust domain>/hub`.
    #[serde(default)]
    pub hub_spiffe_id: String,
    /// `sha256:` of each trust anchor the Hub is checked against (the first one is pinned at
    /// enrolment; rotations add and retire anchors).
    #[serde(default)]
    pub bundle: Vec<String>,
    /// `sha256:` of the allow-list (order-independent; what `Hello` tells the Hub).
    #[serde(default)]
    pub allow_list_digest: String,
    /// Where audit records go (`stdout` or `file:<path>`) and in which format.
    #[serde(default)]
    pub audit: String,
    /// What a stop does to the identity (`revoke` or `keep`).
    #[serde(default)]
    pub on_stop: String,
    /// Counters since start, derived from the audit records.
    #[serde(default)]
    pub metrics: Snapshot,
    /// Connections to the Hub held now: the current one, and for a while after a rotation
    /// the one it replaced while its queries drain (each has its own UDP socket).
    #[serde(default)]
    pub hub_connections: usize,
    /// Where the SVID comes from: `state-dir`, or `workload-api (<socket>)` (then the key is
    /// in memory only and the bundle comes from the agent: nothing of either is on disk).
    #[serde(default)]
    pub svid_source: String,
}

impl Status {
    /// Writes the file atomically.
    pub fn write(&self, state_dir: &Path) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        store::write_file(&state_dir.join(STATUS_FILE), &json, 0o644).map_err(|e| e.to_string())
    }

    /// Reads the file.
    pub fn read(state_dir: &Path) -> Result<Self, String> {
        let path = state_dir.join(STATUS_FILE);
        let data = std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "no status.json in {}: no Client has run with this state directory yet (is --state-dir / EWII_STATE_DIR the one in its config?)",
                state_dir.display()
            ),
            _ => format!("{}: {e}", path.display()),
        })?;
        let mut status: Self =
            serde_json::from_slice(&data).map_err(|e| format!("{}: {e}", path.display()))?;
        let touched = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_micros() as u64);
        status.updated_us = status.updated_us.max(touched);
        Ok(status)
    }

    /// The state as written in the file (`connected`, `backoff`, …).
    pub fn state_word(&self) -> String {
        serde_json::to_value(self.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Whether the two differ in anything but the time of writing.
    fn differs(&self, other: &Self) -> bool {
        Self {
            updated_us: other.updated_us,
            ..self.clone()
        } != *other
    }

    /// The status as Prometheus families, for node-exporter's textfile collector.
    pub fn prometheus(&self) -> String {
        let mut out = Exposition::default();
        out.one(
            "ewii_client_connected",
            "gauge",
            "1 while a session with the Hub is up.",
            u8::from(self.state == State::Connected),
        );
        out.one(
            "ewii_client_svid_expiry_timestamp_seconds",
            "gauge",
            "When the SVID in use expires.",
            self.svid_not_after,
        );
        if let Some(at) = self.next_renewal_unix {
            out.one(
                "ewii_client_svid_next_renewal_timestamp_seconds",
                "gauge",
                "When the next renewal is due.",
                at,
            );
        }
        out.one(
            "ewii_client_reconnect_failures",
            "gauge",
            "Reconnects in a row while not connected: failed dials and sessions that ended within 10 s.",
            self.failures,
        );
        let layers: Vec<(String, String)> = self
            .enforcement
            .layers
            .iter()
            .map(|l| {
                (
                    format!("layer=\"{}\"", l.name),
                    u8::from(l.active).to_string(),
                )
            })
            .collect();
        let layers: Vec<(&str, String)> = layers
            .iter()
            .map(|(l, v)| (l.as_str(), v.clone()))
            .collect();
        out.family(
            "ewii_client_enforcement_active",
            "gauge",
            "1 for each enforcement layer installed and proven by its self-test.",
            &layers,
        );
        self.metrics.expose(Side::Client, &mut out);
        out.finish()
    }

    /// Healthy: connected, and written recently.
    pub fn healthy(&self, now_us: u64) -> Result<(), String> {
        let age = Duration::from_micros(now_us.saturating_sub(self.updated_us));
        if age > STALE_AFTER {
            return Err(format!(
                "status is {}s old: the Client is not running, or cannot write its state directory (its log says which)",
                age.as_secs()
            ));
        }
        let why = |what: &str| match &self.last_error {
            Some(e) => format!("{what}; last error: {e}"),
            None => what.to_owned(),
        };
        match self.state {
            State::Connected => Ok(()),
            State::Connecting | State::Backoff => Err(why(&format!(
                "state is {:?}: running, with no session to the Hub",
                self.state
            ))),
            State::Revoking => Err(why(
                "state is Revoking: stopping, and telling the Hub to revoke this Client",
            )),
            other => Err(why(&format!(
                "state is {other:?}: the Client has ended (its last status)"
            ))),
        }
    }
}

/// Writes the status file from a thread of its own; see the module documentation.
#[derive(Debug)]
pub struct StatusWriter {
    slot: Arc<Mutex<Option<Status>>>,
    wake: crossbeam_channel::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusWriter {
    /// Starts the writer thread for `state_dir`; it adds the audit `metrics` to every status
    /// it writes, and writes them to `textfile` too when one is configured.
    pub fn start(state_dir: PathBuf, metrics: Arc<Metrics>, textfile: Option<PathBuf>) -> Self {
        Self::start_every(state_dir, metrics, textfile, HEARTBEAT)
    }

    /// [`start`](Self::start) with a heartbeat of its own (a test's, shorter than
    /// [`HEARTBEAT`]).
    pub fn start_every(
        state_dir: PathBuf,
        metrics: Arc<Metrics>,
        textfile: Option<PathBuf>,
        heartbeat: Duration,
    ) -> Self {
        let slot = Arc::new(Mutex::new(None));
        // One pending wake-up is enough: the thread always takes the newest status.
        let (wake, woken) = crossbeam_channel::bounded(1);
        let taken = slot.clone();
        let thread = std::thread::Builder::new()
            .name("ewii-status".into())
            .spawn(move || {
                let out = Outputs {
                    dir: state_dir,
                    metrics,
                    textfile,
                };
                write_loop(&out, &taken, &woken, heartbeat);
            })
            .map_err(|e| tracing::error!(error = %e, "cannot start the status writer"))
            .ok();
        Self { slot, wake, thread }
    }

    /// Hands over the newest status; never blocks on the disk.
    pub fn publish(&self, status: Status) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some(status);
        }
        let _ = self.wake.try_send(());
    }

    /// Writes what was published last and stops the thread (blocking: call it from
    /// `spawn_blocking` or at the end of `main`).
    pub fn finish(mut self) {
        let _ = self.wake.try_send(());
        let (tx, _) = crossbeam_channel::bounded(0);
        // Dropping the sender ends the loop after its last write.
        self.wake = tx;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where the writer thread writes, and the counters it adds.
struct Outputs {
    dir: PathBuf,
    metrics: Arc<Metrics>,
    textfile: Option<PathBuf>,
}

impl Outputs {
    /// Whether `status.json` now holds `status` (the metrics file is a copy for an exporter:
    /// its failure is logged, and does not count).
    fn write(&self, status: &Status) -> Result<(), String> {
        let written = status.write(&self.dir);
        if let Some(path) = &self.textfile {
            // 0644: node-exporter reads it as another user.
            if let Err(e) = store::write_file(path, status.prometheus().as_bytes(), 0o644) {
                tracing::warn!(error = %e, path = %path.display(), "cannot write the metrics file");
            }
        }
        written
    }
}

/// A status whose write failed (a full disk, a read-only volume) is tried again at the next
/// heartbeat, and meanwhile the file's time is not refreshed: `status.json` still holds an
/// older state, and vouching for it as current would let `health` pass a Client that is no
/// longer connected. It goes stale instead, and `health` fails within [`STALE_AFTER`].
fn write_loop(
    out: &Outputs,
    slot: &Mutex<Option<Status>>,
    woken: &crossbeam_channel::Receiver<()>,
    heartbeat: Duration,
) {
    let mut written: Option<Status> = None;
    // The newest status, while its write keeps failing; and whether the last write failed.
    let mut unwritten: Option<Status> = None;
    let mut failing = false;
    let now = tokio::time::Instant::now;
    // The last write, touch or failed try.
    let mut confirmed = now();
    loop {
        let wait = heartbeat.saturating_sub(confirmed.elapsed());
        let wake = woken.recv_timeout(wait);
        let last = matches!(wake, Err(crossbeam_channel::RecvTimeoutError::Disconnected));
        let beat = confirmed.elapsed() >= heartbeat;
        // The newest status, or the last one again at a heartbeat (its counters may have
        // moved: queries do not wake the driver).
        let next = slot
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .or_else(|| unwritten.take())
            .or_else(|| written.clone());
        if let Some(mut status) = next {
            status.metrics = out.metrics.snapshot();
            let content = written.as_ref().is_none_or(|w| status.differs(w));
            // Counters alone are written at heartbeats, not per query.
            let counters_only = written.as_ref().is_some_and(|w| {
                !Status {
                    metrics: w.metrics,
                    ..status.clone()
                }
                .differs(w)
            });
            let retry = failing && beat;
            if retry || (content && (!counters_only || beat || last)) {
                status.updated_us = crate::now_timestamp().0;
                match out.write(&status) {
                    Ok(()) => {
                        if failing {
                            tracing::info!("the status file is written again");
                        }
                        failing = false;
                        // An older status whose write failed is not tried again over this one.
                        unwritten = None;
                        written = Some(status);
                    }
                    Err(e) => {
                        // Said once per run of failures; tried again at each heartbeat.
                        if !failing {
                            tracing::warn!(error = %e, "cannot write the status file: `health` reports it stale until it can");
                        }
                        failing = true;
                        unwritten = Some(status);
                    }
                }
                confirmed = now();
            } else if failing {
                // Not tried now: kept for the next try.
                unwritten = Some(status);
            }
        }
        if !failing && written.is_some() && confirmed.elapsed() >= heartbeat {
            touch(&out.dir.join(STATUS_FILE));
            confirmed = now();
        }
        if last {
            return;
        }
    }
}

/// Refreshes the modification time: the Client is alive and the content still holds.
fn touch(path: &Path) {
    let result = std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot refresh the status file");
    }
}

#[cfg(test)]
mod tests {
    use super::Status;

    /// `health`'s words for each state: running without a session (with the last error),
    /// stopping while it tells the Hub to revoke it, or ended.
    #[test]
    fn p13_health_says_why_a_client_is_unhealthy() {
        let now = 1_000_000_000;
        let status = |state: &str, last_error: Option<&str>| -> Status {
            serde_json::from_value(serde_json::json!({
                "state": state, "pid": 7, "updated_us": now, "hub": "hub:443",
                "spiffe_id": "spiffe://example.org/client/acme", "svid_not_after": 0,
                "session_id": null, "allow_list": [], "failures": 1, "last_error": last_error,
            }))
            .unwrap()
        };
        assert_eq!(status("connected", None).healthy(now), Ok(()));
        assert_eq!(
            status("backoff", Some("handshake with 192.0.2.7:443: timed out")).healthy(now),
            Err("state is Backoff: running, with no session to the Hub; last error: handshake with 192.0.2.7:443: timed out".into())
        );
        assert_eq!(
            status("revoking", None).healthy(now),
            Err("state is Revoking: stopping, and telling the Hub to revoke this Client".into())
        );
        assert_eq!(
            status("stopped", None).healthy(now),
            Err("state is Stopped: the Client has ended (its last status)".into())
        );
        assert!(status("connected", None)
            .healthy(now + 60_000_000)
            .is_err_and(|e| e.contains("the Client is not running")));
    }
}
