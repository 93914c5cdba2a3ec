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

use crate::identity::store;

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
    /// Revoked by the Hub; the Client will not dial again.
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
    /// Failed dials since the last session.
    pub failures: u32,
    /// Last error, if any.
    pub last_error: Option<String>,
    /// Which kernel layers are active, what each covers, what its self-test saw.
    #[serde(default)]
    pub enforcement: crate::enforce::Report,
    /// Kernel refusals per eBPF hook since start.
    #[serde(default)]
    pub kernel_denied: Vec<(String, u64)>,
}

impl Status {
    /// Writes the file atomically.
    pub fn write(&self, state_dir: &Path) {
        let Ok(json) = serde_json::to_vec_pretty(self) else {
            return;
        };
        if let Err(e) = store::write_file(&state_dir.join(STATUS_FILE), &json, 0o644) {
            tracing::warn!(error = %e, "cannot write status file");
        }
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

    /// Whether the two differ in anything but the time of writing.
    fn differs(&self, other: &Self) -> bool {
        Self {
            updated_us: other.updated_us,
            ..self.clone()
        } != *other
    }

    /// Healthy: connected, and written recently.
    pub fn healthy(&self, now_us: u64) -> Result<(), String> {
        let age = Duration::from_micros(now_us.saturating_sub(self.updated_us));
        if age > STALE_AFTER {
            return Err(format!(
                "status is {}s old: the Client is not running",
                age.as_secs()
            ));
        }
        match self.state {
            State::Connected => Ok(()),
            other => Err(format!("state is {other:?}")),
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
    /// Starts the writer thread for `state_dir`.
    pub fn start(state_dir: PathBuf) -> Self {
        let slot = Arc::new(Mutex::new(None));
        // One pending wake-up is enough: the thread always takes the newest status.
        let (wake, woken) = crossbeam_channel::bounded(1);
        let taken = slot.clone();
        let thread = std::thread::Builder::new()
            .name("ewii-status".into())
            .spawn(move || write_loop(&state_dir, &taken, &woken))
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

fn write_loop(dir: &Path, slot: &Mutex<Option<Status>>, woken: &crossbeam_channel::Receiver<()>) {
    let mut written: Option<Status> = None;
    let now = tokio::time::Instant::now;
    let mut confirmed = now();
    loop {
        let wait = HEARTBEAT.saturating_sub(confirmed.elapsed());
        let wake = woken.recv_timeout(wait);
        let next = slot.lock().ok().and_then(|mut s| s.take());
        if let Some(mut status) = next {
            if written.as_ref().is_none_or(|w| status.differs(w)) {
                status.updated_us = crate::now_timestamp().0;
                status.write(dir);
                written = Some(status);
                confirmed = now();
            }
        }
        if written.is_some() && confirmed.elapsed() >= HEARTBEAT {
            touch(&dir.join(STATUS_FILE));
            confirmed = now();
        }
        if matches!(wake, Err(crossbeam_channel::RecvTimeoutError::Disconnected)) {
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
