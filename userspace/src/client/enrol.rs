//! Enrolment: a one-time join token and a locally made key become an SVID.
//!
//! The Hub is checked against the bundle hash pinned at install *during the handshake*; the
//! token is sent only on a connection whose handshake passed that check. The private key is
//! made here and never leaves the host; the Hub sees a CSR.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{Event, Outcome};
use ewii_common::frame::{self, Enrol};
use ewii_common::spiffe::SpiffeId;
use rustls::pki_types::CertificateDer;

use super::{connect, rotation};
use crate::audit::Audit;
use crate::config::HubAddress;
use crate::identity::ca::new_key_and_csr;
use crate::identity::store;
use crate::identity::verify::PinnedHubVerifier;
use crate::identity::IdentityError;
use crate::transport::pipe::peer_said;
use crate::transport::{self, FrameReader};

/// How long the whole enrolment may take.
const ENROL_TIMEOUT: Duration = Duration::from_secs(20);

/// Why enrolment failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrolError {
    /// The Hub address did not resolve (the whole message: `cannot resolve the Hub …`).
    #[error("{0}")]
    Resolve(String),
    /// The Hub did not present the pinned CA (or a valid Hub SVID under it). The token was
    /// not sent.
    #[error("the Hub at {0} is not the one pinned by the bundle hash; the token was NOT sent")]
    HubNotTrusted(String),
    /// The Hub could not be reached: nothing answered on UDP at that address and port.
    #[error("cannot reach the Hub at {hub} ({addr}, UDP/QUIC): {why}; check the address and port, and that outbound UDP to it is allowed")]
    Unreachable {
        /// The Hub as configured.
        hub: String,
        /// The address dialled.
        addr: std::net::SocketAddr,
        /// What failed.
        why: String,
    },
    /// The connection to the Hub broke during enrolment, or a local step failed.
    #[error("enrolment with the Hub failed: {0}")]
    Connect(String),
    /// The Hub refused the token (unknown, used or expired: it does not say which).
    #[error("the Hub refused enrolment (token unknown, already used, or expired)")]
    Refused,
    /// The Hub answered with something that is not a valid SVID for this key.
    #[error("the Hub's answer is invalid: {0}")]
    BadAnswer(String),
    /// Keys or files.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// QUIC or TLS configuration.
    #[error(transparent)]
    Transport(#[from] transport::ConfigError),
    /// The state directory already holds an SVID.
    #[error("{0} already holds an SVID; to enrol again with a new token, use `ewii-client enroll --replace`")]
    AlreadyEnrolled(PathBuf),
    /// Another Client process uses the state directory.
    #[error(transparent)]
    Busy(#[from] super::state_dir::LockError),
    /// The state directory cannot be made, or no file can be made in it: found before the
    /// token is sent, which a failed write after the Hub's answer would have spent.
    #[error("cannot write in the state directory {dir}: {source}; the token was NOT sent and is still good")]
    StateDir {
        /// The state directory.
        dir: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The Hub issued an SVID, and it could not be stored (a volume that filled since the
    /// probe, a write that failed): the token is spent.
    #[error("the Hub issued an SVID, but it could not be stored in {dir}: {source}; the token is spent: make room in the state directory, then ask the operator for a new token")]
    NotStored {
        /// The state directory.
        dir: PathBuf,
        /// What failed.
        source: IdentityError,
    },
    /// It took too long.
    #[error("enrolment timed out")]
    Timeout,
}

impl EnrolError {
    /// Whether the Hub (or this side's check of the Hub) said no, as opposed to a network, a
    /// name, a timeout or a local step that failed: the `outcome` of the enrolment's record.
    pub fn refused(&self) -> bool {
        matches!(
            self,
            Self::HubNotTrusted(_) | Self::Refused | Self::BadAnswer(_) | Self::AlreadyEnrolled(_)
        )
    }
}

/// Enrols with the Hub at `hub` and writes `svid.pem`, `svid.key` (0600) and `bundle.pem`
/// into `state_dir`. Returns the new SPIFFE ID. Refuses a state directory that holds an SVID.
pub async fn enrol(
    hub: &HubAddress,
    token: &str,
    pin: [u8; 32],
    state_dir: &Path,
    audit: &Audit,
) -> Result<SpiffeId, EnrolError> {
    if state_dir.join(store::SVID_CERT).exists() {
        return Err(EnrolError::AlreadyEnrolled(state_dir.to_owned()));
    }
    let dir = state_dir.to_owned();
    let _lock = tokio::task::spawn_blocking(move || lock(&dir))
        .await
        .map_err(|e| EnrolError::Connect(e.to_string()))??;
    // Another enrolment may have finished while this one waited for nothing: the lock is
    // taken without waiting, but the check above was made without it.
    if state_dir.join(store::SVID_CERT).exists() {
        return Err(EnrolError::AlreadyEnrolled(state_dir.to_owned()));
    }
    enrol_audited(hub, token, pin, state_dir, audit).await
}

/// Locks the state directory (creating it) for the enrolment: a running Client must not
/// have its SVID replaced under it, and two enrolments must not spend two tokens on it. A
/// directory that cannot be written is found here, before the token leaves the host.
fn lock(state_dir: &Path) -> Result<super::state_dir::StateLock, EnrolError> {
    let unwritable = |source| EnrolError::StateDir {
        dir: state_dir.to_owned(),
        source,
    };
    create_state_dir(state_dir).map_err(|e| match e {
        IdentityError::Io { source, .. } => unwritable(source),
        other => other.into(),
    })?;
    let lock = super::state_dir::StateLock::acquire(state_dir).map_err(|e| match e {
        super::state_dir::LockError::Io { source, .. } => unwritable(source),
        busy => busy.into(),
    })?;
    writable(state_dir).map_err(unwritable)?;
    Ok(lock)
}

/// Bytes the write probe stores and syncs: several times what an enrolment writes (a key, an
/// SVID chain and a bundle, each a few KiB, each through a temporary file).
const PROBE_BYTES: usize = 64 * 1024;

/// Whether files can be written in `dir`, as the key, the SVID and the bundle will be once the
/// Hub has issued them (the lock's file may exist already, and opening it proves less). A
/// file that is made, filled with [`PROBE_BYTES`] and synced: an empty one can still be made
/// on a full volume, where the SVID's write would then fail with the token spent. A new file
/// of a random name: nothing planted in the directory (a link, another user's file) is opened
/// through. Named as a cut-short write's temporary file, so that one a crash leaves is removed
/// at a later start. Blocking.
fn writable(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let probe = dir.join(format!(
        ".enroll-probe.{}-{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let filled = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&probe)
        .and_then(|mut f| {
            f.write_all(&[0u8; PROBE_BYTES])?;
            f.sync_all()
        });
    let removed = std::fs::remove_file(&probe);
    match filled {
        Err(e) => Err(e),
        Ok(()) => removed,
    }
}

/// [`enrol`] over an existing enrolment (`ewii-client enroll --replace`): the new SVID
/// replaces the old one, and the `revoked` and `revoke-pending` markers are removed — only
/// once the new enrolment succeeded, so a failed attempt leaves the old state as it was.
pub async fn enrol_replacing(
    hub: &HubAddress,
    token: &str,
    pin: [u8; 32],
    state_dir: &Path,
    audit: &Audit,
) -> Result<SpiffeId, EnrolError> {
    let dir = state_dir.to_owned();
    // Held until the end; taking it made sure the directory can be written.
    let _lock = tokio::task::spawn_blocking(move || lock(&dir))
        .await
        .map_err(|e| EnrolError::Connect(e.to_string()))??;
    replace_locked(hub, token, pin, state_dir, audit).await
}

/// [`enrol_replacing`] by a process that holds the state directory's lock already:
/// `ewii-client run`, which enrols at start with the token in its environment when the
/// directory holds no identity, or one that was revoked.
pub async fn enrol_replacing_held(
    hub: &HubAddress,
    token: &str,
    pin: [u8; 32],
    state_dir: &Path,
    audit: &Audit,
    _held: &super::state_dir::StateLock,
) -> Result<SpiffeId, EnrolError> {
    let dir = state_dir.to_owned();
    tokio::task::spawn_blocking(move || {
        writable(&dir).map_err(|source| EnrolError::StateDir { dir, source })
    })
    .await
    .map_err(|e| EnrolError::Connect(e.to_string()))??;
    replace_locked(hub, token, pin, state_dir, audit).await
}

/// The enrolment over an identity, by a caller that holds the state directory's lock and has
/// found it writable: the new SVID, then the markers of the old one removed.
async fn replace_locked(
    hub: &HubAddress,
    token: &str,
    pin: [u8; 32],
    state_dir: &Path,
    audit: &Audit,
) -> Result<SpiffeId, EnrolError> {
    let id = enrol_audited(hub, token, pin, state_dir, audit).await?;
    let dir = state_dir.to_owned();
    tokio::task::spawn_blocking(move || {
        for marker in [super::REVOKED_MARKER, super::REVOKE_PENDING_MARKER] {
            match std::fs::remove_file(dir.join(marker)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(IdentityError::Io {
                        path: dir.join(marker),
                        source: e,
                    })
                }
                _ => {}
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| EnrolError::Connect(e.to_string()))??;
    Ok(id)
}

async fn enrol_audited(
    hub: &HubAddress,
    token: &str,
    pin: [u8; 32],
    state_dir: &Path,
    audit: &Audit,
) -> Result<SpiffeId, EnrolError> {
    let result = tokio::time::timeout(ENROL_TIMEOUT, enrol_inner(hub, token, pin, state_dir))
        .await
        .unwrap_or(Err(EnrolError::Timeout));
    let mut r = audit.record(match result {
        Ok(_) => Event::Enrolled,
        Err(_) => Event::EnrolmentRefused,
    });
    r.peer = Some(hub.to_string());
    match &result {
        Ok(id) => {
            r.client = Some(id.to_string());
            r.outcome = Some(Outcome::Ok);
        }
        Err(e) => {
            r.outcome = Some(if e.refused() {
                Outcome::Refused
            } else {
                Outcome::Failed
            });
            r.reason = Some(e.to_string());
        }
    }
    audit.emit(r);
    audit.flush_async().await;
    if result.is_ok() {
        // The Hub took it: this token is spent. (A refusal is not noted: the Hub refuses
        // alike a bad token, a throttled address and its own failure, and a good token
        // refused for the last two must be sent again.)
        let (path, digest) = (
            state_dir.join(super::state_dir::SPENT_TOKEN),
            token_digest(token),
        );
        let kept = tokio::task::spawn_blocking(move || {
            store::write_durable(&path, digest.as_bytes(), 0o600)
        })
        .await;
        if !matches!(kept, Ok(Ok(()))) {
            tracing::warn!("cannot note the spent token in the state directory: a later start may send it again");
        }
    }
    result
}

/// Whether `token` is the last one this state directory was enrolled with, so sending it
/// again can only be refused. Blocking (a small file read).
pub fn token_spent(state_dir: &Path, token: &str) -> bool {
    std::fs::read_to_string(state_dir.join(super::state_dir::SPENT_TOKEN))
        .is_ok_and(|kept| kept.trim() == token_digest(token))
}

fn token_digest(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

async fn enrol_inner(
    hub: &HubAddress,
    token: &str,
    pin: [u8; 32],
    state_dir: &Path,
) -> Result<SpiffeId, EnrolError> {
    let (key, csr) = new_key_and_csr()?;
    let verifier = Arc::new(PinnedHubVerifier::new(pin));
    let tls = transport::tls_client_config(None, verifier.clone(), frame::ENROLL_ALPN)?;
    // Enrolment runs no query.
    let quic = transport::quic_client_config(tls, 0, transport::STREAM_WINDOW)?;
    let addr = connect::resolve(hub)
        .await
        .map_err(|e| EnrolError::Resolve(e.to_string()))?;
    let endpoint =
        transport::client_endpoint(addr).map_err(|e| EnrolError::Connect(e.to_string()))?;
    let connecting = endpoint
        .connect_with(quic, addr, &hub.host)
        .map_err(|e| EnrolError::Connect(e.to_string()))?;
    let conn = connecting.await.map_err(|e| match e {
        quinn::ConnectionError::TransportError(_) => EnrolError::HubNotTrusted(hub.to_string()),
        // An on-path sender can close the handshake with words of its own: bounded and
        // escaped, as every peer's text is before it is printed.
        other => EnrolError::Unreachable {
            hub: hub.to_string(),
            addr,
            why: peer_said(&other),
        },
    })?;
    // Only now, with the Hub proven, does the token leave this host.
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| EnrolError::Connect(peer_said(&e)))?;
    let request = Enrol::Request {
        token: token.to_owned(),
        csr,
    };
    transport::write_frame(&mut send, &request)
        .await
        .map_err(|e| EnrolError::Connect(peer_said(&e)))?;
    let _ = send.finish();
    let answer = FrameReader::new()
        .read::<Enrol>(&mut recv)
        .await
        .map_err(|e| EnrolError::BadAnswer(peer_said(&e)))?;
    conn.close(transport::codes::DONE, b"");
    endpoint.wait_idle().await;
    let (chain, bundle) = match answer {
        Some(Enrol::Issued { chain, bundle }) => (chain, bundle),
        Some(Enrol::Refused { .. }) => return Err(EnrolError::Refused),
        _ => return Err(EnrolError::BadAnswer("no answer".into())),
    };
    let pinned = verifier
        .matched
        .read()
        .ok()
        .and_then(|m| m.clone())
        .ok_or_else(|| EnrolError::BadAnswer("no pinned CA matched".into()))?;
    let bundle: Vec<CertificateDer<'static>> = bundle.into_iter().map(Into::into).collect();
    if !bundle.contains(&pinned) {
        return Err(EnrolError::BadAnswer(
            "the bundle does not contain the pinned CA".into(),
        ));
    }
    let accepted = rotation::accept_issued(&key, chain, bundle, None)
        .map_err(|e| EnrolError::BadAnswer(e.to_string()))?;
    let dir = state_dir.to_owned();
    let id = accepted.identity.leaf.id.clone();
    let stored = tokio::task::spawn_blocking(move || {
        create_state_dir(&dir)?;
        rotation::save(&dir, &accepted)
    })
    .await
    .map_err(|e| EnrolError::Connect(e.to_string()))?;
    stored.map_err(|source| EnrolError::NotStored {
        dir: state_dir.to_owned(),
        source,
    })?;
    Ok(id)
}

fn create_state_dir(dir: &Path) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: dir.to_owned(),
        source,
    };
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    store::create_private_dir(dir).map_err(io)?;
    // This user's directory is made private. Another's is left as it is: a volume's root that
    // Kubernetes' `fsGroup` gave this user's group (root's, 2775) may be written but not
    // chmod-ed by it, and the key written into it is 0600 (`verify` checks it).
    let meta = std::fs::metadata(dir).map_err(io)?;
    if meta.uid() == store::fs_uid().map_err(io)? && meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}
