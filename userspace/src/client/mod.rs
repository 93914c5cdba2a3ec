//! The Ewii Client: the customer's side.
//!
//! - [`enrol`]: token + local key → SVID, with the Hub pinned by bundle hash.
//! - [`connect`]: resolve and dial the Hub, `Hello` → `Welcome` (one QUIC connection, P5).
//! - `connection`: one task per Hub connection: serves its query streams, reads its control
//!   stream, obeys the driver (renew, goodbye, drain, close).
//! - `query`: one query stream: `Open` → the [`dialer`] → pipe, one audit record (P4, P11).
//! - `rotation`: accepting an issued SVID (enrolment and renewal share it) and a pushed bundle.
//! - `driver`: feeds the sans-IO [`ewii_common::session::ClientSession`] (renewal, rotation,
//!   backoff, drain, stop, revoke, expiry) and performs its actions.
//! - [`dialer`]: the only code that opens outbound TCP connections (P4).
//! - [`state_dir`]: the markers in the state directory and the lock that keeps a second
//!   Client process off it.
//! - [`status`]: the status file behind `ewii-client status` / `health` (no listener, P13).
//! - [`verify`]: `ewii-client verify`, the customer's evidence promise by promise.
//! - `workload`: the SVID from a SPIFFE Workload API (a SPIRE agent), and its rotations.
//! - this module: [`run`] and [`run_enforced`], which load the state directory and start the
//!   driver.

mod clock;
mod connect;
mod connection;
pub mod dialer;
mod driver;
pub mod enrol;
mod query;
mod rotation;
pub mod state_dir;
pub mod status;
pub mod verify;
mod workload;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ewii_common::audit::{Event, Outcome};
use ewii_common::time::Timestamp;

use crate::audit::Audit;
use crate::config::{ClientConfig, SvidSource};
use crate::enforce::{DenySource, Report};
use crate::identity::store::{self, Svid};
use crate::identity::verify::Bundle;
use crate::identity::{inspect_leaf, IdentityError};
use crate::transport;
pub use connect::ConnectError;
pub use connection::Lost;
pub use ewii_common::session::Exit;
pub use rotation::IssueError;
pub use workload::WorkloadError;

pub use state_dir::{REVOKED_MARKER, REVOKE_PENDING_MARKER};

/// Why the Client could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No usable SVID or bundle in the state directory.
    #[error("not enrolled ({dir}): {source}; {}", enrol_hint(source))]
    NotEnrolled {
        /// The state directory.
        dir: PathBuf,
        /// What is missing or broken.
        source: IdentityError,
    },
    /// A file of the state directory that must not be lost could not be read (a kept
    /// renewal key: without it the Client could not renew its SVID).
    #[error(
        "state directory {dir}: {source}; fix the file's permissions (the Client must read it)"
    )]
    StateDir {
        /// The state directory.
        dir: PathBuf,
        /// What failed.
        source: IdentityError,
    },
    /// The state directory's trust bundle holds a certificate that may not stand as a trust
    /// anchor (a leaf, a certificate that is not a CA's): its key's holder could stand as the
    /// Hub. Bundles from the Hub and from SPIRE are checked so before they are kept; this one
    /// was changed on disk.
    #[error(
        "state directory {dir}: {bundle}: {source}; only CA certificates may stand as the Hub's trust anchors (a leaf's key holder could pose as the Hub): restore the file, or enrol again with `ewii-client enroll --replace` and a new token"
    )]
    BadBundle {
        /// The state directory.
        dir: PathBuf,
        /// The bundle file's name.
        bundle: &'static str,
        /// What is wrong with it.
        source: IssueError,
    },
    /// The Hub revoked this Client earlier (the marker file exists).
    #[error("{}; it will not connect again", revoked_earlier(.0))]
    RevokedEarlier(String),
    /// Another Client process uses this state directory.
    #[error(transparent)]
    Busy(#[from] state_dir::LockError),
    /// The SVID expired without being renewed.
    #[error("the SVID expired at {0} without renewal; enrol again with a new token")]
    SvidExpired(Timestamp),
    /// TLS or QUIC configuration.
    #[error(transparent)]
    Transport(#[from] transport::ConfigError),
    /// `svid_source = "workload-api"`: the agent gave no usable SVID or Hub bundle.
    #[error(transparent)]
    WorkloadApi(#[from] WorkloadError),
    /// `[enforcement] require` is not met by the layers in place (the library's [`run`]
    /// installs none: it runs only with `require = "none"`).
    #[error(transparent)]
    Enforcement(#[from] crate::enforce::EnforceError),
}

/// Runs the Client until `shutdown` resolves, the Hub revokes it, or its SVID expires. No
/// kernel layer is installed (that is the binary's job, before its runtime starts), so a
/// config that requires one (`require = "any"`, the default, or `"kernel"`) is refused with
/// [`ClientError::Enforcement`] before anything is dialled: the library runs a Client with
/// `require = "none"` only.
pub async fn run(
    config: ClientConfig,
    audit: Audit,
    shutdown: impl Future<Output = ()>,
) -> Result<Exit, ClientError> {
    // Before anything else (the state directory, the Workload API's agent): nothing a Client
    // run as a library installs can meet a requirement of a kernel layer.
    let report = Report::library();
    if let Err(e) = report.check(config.require) {
        report.audit(&audit, config.require);
        audit.flush_async().await;
        return Err(e.into());
    }
    let dir = config.state_dir.clone();
    let from_agent = matches!(config.svid_source, SvidSource::WorkloadApi { .. });
    let lock = tokio::task::spawn_blocking(move || {
        if from_agent {
            // Nothing to enrol: the directory only holds the status, the lock and markers.
            let _ = store::create_private_dir(&dir);
        } else if !dir.is_dir() {
            // Not enrolled: say so, rather than that the lock file cannot be made.
            load_state(&dir)?;
        }
        Ok::<_, ClientError>(state_dir::StateLock::acquire(&dir)?)
    })
    .await
    .map_err(|e| join_error(&config.state_dir, e))??;
    run_enforced(config, audit, report, None, lock, shutdown).await
}

/// [`run`], with the kernel layers already installed: `report` goes to the status file and
/// the audit, and `denies` (the eBPF ring buffer) becomes `kernel_denied` audit records.
/// `lock` is the state directory's, taken by the caller before anything else (the binary
/// takes it before it installs the kernel layers); it is held until this returns.
pub async fn run_enforced(
    config: ClientConfig,
    audit: Audit,
    report: Report,
    denies: Option<Box<dyn DenySource>>,
    lock: state_dir::StateLock,
    shutdown: impl Future<Output = ()>,
) -> Result<Exit, ClientError> {
    let _lock = lock;
    let dir = config.state_dir.clone();
    let (identity, anchors, pending_revoke, deliveries, renew_key) = match &config.svid_source {
        SvidSource::StateDir => {
            let (identity, anchors, pending, renew_key, completed) =
                tokio::task::spawn_blocking(move || load_state(&dir))
                    .await
                    .map_err(|e| join_error(&config.state_dir, e))??;
            if renew_key.is_some() {
                tracing::info!(serial = %identity.leaf.serial, "a renewal was asked for before a restart; asking again with its key");
            }
            if completed {
                // The last run recorded this renewal as refused (or was cut short before any
                // record): on record, it is in use.
                let mut r = audit.record(Event::SvidRotated);
                r.client = Some(identity.leaf.id.to_string());
                r.outcome = Some(Outcome::Ok);
                r.reason = Some(format!(
                    "serial {} in use: an earlier run stored this renewal's SVID but not its key (a write that failed, recorded then as refused, or a run cut short); its key is stored now",
                    identity.leaf.serial
                ));
                audit.emit(r);
            }
            (identity, anchors, pending, None, renew_key)
        }
        SvidSource::WorkloadApi {
            socket,
            hub_trust_domain,
        } => {
            let pending = tokio::task::spawn_blocking(move || load_markers(&dir))
                .await
                .map_err(|e| join_error(&config.state_dir, e))??;
            let (source, first) = workload::WorkloadSvid::connect(
                socket,
                hub_trust_domain,
                workload::FIRST_SVID_TIMEOUT,
            )
            .await?;
            tracing::info!(
                spiffe_id = %first.identity.leaf.id,
                serial = %first.identity.leaf.serial,
                "SVID from the Workload API"
            );
            let deliveries = workload::spawn_watch(source, first.identity.leaf.id.to_string());
            (
                first.identity,
                first.hub_anchors,
                pending,
                Some(deliveries),
                None,
            )
        }
    };
    if pending_revoke {
        tracing::warn!(
            "a revoke from an earlier stop is pending; delivering it before anything else"
        );
    }
    if identity.leaf.not_after <= crate::now_timestamp().unix_secs() as i64 {
        let at = Timestamp(identity.leaf.not_after.max(0) as u64 * 1_000_000);
        let mut r = audit.record(Event::SvidExpired);
        r.client = Some(identity.leaf.id.to_string());
        r.reason = Some(format!("expired at {at}; enrol again"));
        audit.emit(r);
        audit.flush_async().await;
        return Err(ClientError::SvidExpired(at));
    }
    let mut started = audit.record(Event::Started);
    started.client = Some(identity.leaf.id.to_string());
    started.peer = Some(config.hub.to_string());
    started.reason = Some(format!(
        "allow-list [{}]",
        describe_allow_list(&config).join(", ")
    ));
    audit.emit(started);
    report.audit(&audit, config.require);
    // Fails closed: the caller was told what the layers in place cannot give (the binary
    // checks before it starts its runtime; this is for every other caller).
    if let Err(e) = report.check(config.require) {
        audit.flush_async().await;
        return Err(e.into());
    }
    let client_id = identity.leaf.id.to_string();
    let driver = driver::Driver::new(
        config,
        audit.clone(),
        driver::Credentials {
            identity: Arc::new(identity),
            bundle: Bundle::new(anchors),
            deliveries,
            renew_key,
        },
        report,
        denies,
        pending_revoke,
    );
    let exit = driver.run(shutdown).await;
    let mut stopped = audit.record(Event::Stopped);
    stopped.client = Some(client_id);
    stopped.reason = Some(
        match &exit {
            Exit::Stopped => "stopped",
            Exit::Revoked { .. } => "revoked",
            Exit::Expired => "svid_expired",
        }
        .into(),
    );
    audit.record_shed("stopping");
    audit.emit(stopped);
    audit.flush_async().await;
    Ok(exit)
}

/// The SVID, the bundle, whether a revoke is pending from an earlier stop, the key of a
/// renewal an earlier run asked for and did not store, and whether a renewal an earlier run
/// stored in part was completed ([`rotation::Recovered`]).
type Loaded = (
    rotation::Identity,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    bool,
    Option<rcgen::KeyPair>,
    bool,
);

/// Refuses a `dir` with no SVID file at all: never enrolled (or the wrong directory). The
/// binary asks before it creates the state directory, prints its start-up lines or installs
/// anything, so that a `run` before `enroll` leaves nothing behind. Anything else (a file this
/// user cannot read, a broken one) is left to [`run`], which says more about it. Blocking.
pub fn check_enrolled(dir: &Path) -> Result<(), ClientError> {
    let path = dir.join(store::SVID_CERT);
    match std::fs::symlink_metadata(&path) {
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
            Err(ClientError::NotEnrolled {
                dir: dir.to_owned(),
                source: IdentityError::Io { path, source },
            })
        }
        _ => Ok(()),
    }
}

/// Refuses a Client revoked earlier ([`ClientError::RevokedEarlier`]): the binary asks before
/// it prints its start-up lines or installs anything, as for [`check_enrolled`], so that the
/// restart of a revoked Client says only that, and what to do. [`run`] refuses it all the same.
/// Blocking.
pub fn check_not_revoked(dir: &Path) -> Result<(), ClientError> {
    load_markers(dir).map(|_pending| ())
}

/// Reads the SVID, the bundle and a kept renewal key; refuses a Client revoked earlier.
/// Blocking.
fn load_state(dir: &Path) -> Result<Loaded, ClientError> {
    // A write a crash cut short left its temporary file (a key's holds the whole key).
    store::remove_leftover_temporaries(dir);
    let pending_revoke = load_markers(dir)?;
    let not_enrolled = |source| ClientError::NotEnrolled {
        dir: dir.to_owned(),
        source,
    };
    let svid = Svid::load(dir, store::SVID_CERT, store::SVID_KEY).map_err(not_enrolled)?;
    let recovered =
        rotation::recover_renewal(dir, svid).map_err(|source| ClientError::StateDir {
            dir: dir.to_owned(),
            source,
        })?;
    let (svid, renew_key) = (recovered.svid, recovered.renew_key);
    // A key that is not the certificate's (a copy or an edit gone wrong; no write of the
    // Client's leaves one) would be refused by every handshake, read as a Hub that cannot be
    // reached, for ever: said now, once.
    if !svid.key_matches() {
        return Err(not_enrolled(IdentityError::NotSvid(format!(
            "{} is not the key of the certificate in {}: the SVID cannot be used without its own key",
            store::SVID_KEY,
            store::SVID_CERT
        ))));
    }
    let leaf = inspect_leaf(&svid.chain[0]).map_err(not_enrolled)?;
    let anchors = store::read_certs(&dir.join(store::BUNDLE)).map_err(not_enrolled)?;
    rotation::check_anchors(&anchors).map_err(|source| ClientError::BadBundle {
        dir: dir.to_owned(),
        bundle: store::BUNDLE,
        source,
    })?;
    Ok((
        rotation::Identity { svid, leaf },
        anchors,
        pending_revoke,
        renew_key,
        recovered.completed,
    ))
}

/// Who revoked it, as the marker's reason says: its own stop (`on_stop = "revoke"`, confirmed
/// at the stop or delivered at a restart), or the Hub (an operator's revoke, the Hub's grace
/// for a silent Client).
fn revoked_earlier(reason: &str) -> String {
    if reason == driver::REVOKED_AT_STOP || reason == ewii_common::session::PENDING_REVOKE_REASON {
        format!("this Client is revoked ({reason})")
    } else {
        format!("this Client was revoked by the Hub ({reason})")
    }
}

/// Refuses a Client revoked earlier; says whether a revoke is pending. Blocking.
fn load_markers(dir: &Path) -> Result<bool, ClientError> {
    if let Ok(reason) = std::fs::read_to_string(dir.join(REVOKED_MARKER)) {
        return Err(ClientError::RevokedEarlier(reason.trim().to_owned()));
    }
    Ok(dir.join(REVOKE_PENDING_MARKER).exists())
}

/// What to do when no identity is usable: a missing one is enrolled; files that are there but
/// do not make an identity (a key from another copy, a damaged certificate) are replaced with
/// `--replace`, since a plain `enroll` refuses a directory that holds an SVID.
fn enrol_hint(e: &IdentityError) -> &'static str {
    use std::io::ErrorKind;
    match e {
        // No SVID at all (its absence is checked first): never enrolled here.
        IdentityError::Io { path, source }
            if source.kind() == ErrorKind::NotFound
                && path.file_name() == Some(std::ffi::OsStr::new(store::SVID_CERT)) =>
        {
            "run `ewii-client enroll` first"
        }
        IdentityError::Io { source, .. } if source.kind() == ErrorKind::PermissionDenied => {
            "fix the file's permissions: the Client must read it, as the user it runs as"
        }
        // A step that could not run ([`join_error`]): nothing wrong with the files known.
        IdentityError::Io { source, .. } if source.kind() == ErrorKind::Other => {
            "start it again; if this repeats, report it with this line"
        }
        _ => "restore the state directory's files from the copy they came from, or enrol anew with a new token: `ewii-client enroll --replace`",
    }
}

/// A blocking step that panicked: reported as an I/O failure on the state directory.
fn join_error(dir: &Path, e: tokio::task::JoinError) -> ClientError {
    ClientError::NotEnrolled {
        dir: dir.to_owned(),
        source: IdentityError::Io {
            path: dir.to_owned(),
            source: std::io::Error::other(e.to_string()),
        },
    }
}

/// The effective allow-list as printed at start (`name=endpoint` lines).
pub fn describe_allow_list(config: &ClientConfig) -> Vec<String> {
    config
        .allow
        .entries()
        .map(|e| format!("{}={}", e.name, e.endpoint))
        .collect()
}

/// The audit sink and format, as `status.json` and `verify` show them.
pub fn describe_audit(config: &ClientConfig) -> String {
    let format = match config.audit_format {
        ewii_common::audit::Format::Ewii => "ewii",
        ewii_common::audit::Format::Ocsf => "ocsf",
    };
    format!("{} ({format} JSON lines)", config.audit)
}

/// Where `ewii-client` keeps its state by default.
pub fn default_state_dir() -> &'static Path {
    Path::new("/var/lib/ewii")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `not enrolled` tells the customer to do matches what the state directory holds:
    /// a plain `enroll` only where there is no SVID (it refuses a directory that holds one).
    #[test]
    fn p7_not_enrolled_says_what_would_mend_the_state_directory() {
        let io = |file: &str, kind: std::io::ErrorKind| IdentityError::Io {
            path: Path::new("/var/lib/ewii").join(file),
            source: kind.into(),
        };
        let hint = |e: IdentityError| {
            ClientError::NotEnrolled {
                dir: "/var/lib/ewii".into(),
                source: e,
            }
            .to_string()
        };
        use std::io::ErrorKind::{NotFound, Other, PermissionDenied};
        assert!(hint(io(store::SVID_CERT, NotFound)).ends_with("; run `ewii-client enroll` first"));
        for e in [
            io(store::SVID_KEY, NotFound),
            io(store::BUNDLE, NotFound),
            IdentityError::NotSvid("svid.key is not the key of the certificate".into()),
        ] {
            let said = hint(e);
            assert!(said.ends_with("`ewii-client enroll --replace`"), "{said}");
        }
        assert!(hint(io(store::SVID_KEY, PermissionDenied)).contains("fix the file's permissions"));
        assert!(hint(io("", Other)).contains("start it again"));
    }
}
