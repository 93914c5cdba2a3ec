//! The Client's state directory: what lives in it besides the SVID files
//! ([`crate::identity::store`]) and the status file ([`super::status`]), and the lock that
//! keeps a second Client process off it.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};

/// Marker file written when the Hub revokes this Client; its presence stops every restart.
pub const REVOKED_MARKER: &str = "revoked";
/// Marker file written when a stop could not deliver its revoke; the next start delivers it
/// before anything else, then exits as revoked.
pub const REVOKE_PENDING_MARKER: &str = "revoke-pending";
/// Lock file: held (`flock`, exclusive) by the one process that runs or enrols with this
/// state directory.
pub const LOCK_FILE: &str = ".lock";

/// The SHA-256 of the join token this state directory was last enrolled with, hex: a token
/// is single-use, so a start that finds the same one in `EWII_TOKEN` over a revoked identity
/// does not send it again (a restart policy would loop it against the Hub).
pub const SPENT_TOKEN: &str = "spent-token";

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another Client process holds the lock.
    #[error(
        "another ewii-client process is using {0}; stop it first (one Client per state directory)"
    )]
    Busy(PathBuf),
    /// The lock file could not be opened or locked.
    #[error("cannot lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The exclusive hold on a state directory; released when dropped (or when the process ends,
/// however it ends).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock of `dir` without waiting. Blocking I/O (one open and one `flock`).
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(TryLockError::WouldBlock) => Err(LockError::Busy(dir.to_owned())),
            Err(TryLockError::Error(e)) => Err(io(e)),
        }
    }
}
