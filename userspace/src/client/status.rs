//! The status file: how `ewii-client status` and `ewii-client health` learn the Client's
//! state without any listener (P13). The running Client rewrites `status.json` in its state
//! directory atomically on every change and every [`HEARTBEAT`].

use std::path::Path;
use std::time::Duration;

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
    /// When written, microseconds since the epoch.
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
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&data).map_err(|e| format!("{}: {e}", path.display()))
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
