//! The Hub's state directory: what each file is called, and the Hub's own SVID and trust
//! bundle as read from it. Used by the running Hub and by the offline `admin` commands alike.

use std::path::Path;
use std::time::Duration;

use ewii_common::spiffe::SpiffeId;
use rustls::pki_types::CertificateDer;

use crate::identity::ca::{new_key_and_csr, Ca};
use crate::identity::store::{self, Svid};
use crate::identity::{inspect_leaf, IdentityError};
use crate::transport;

/// The signing CA's certificate (made by `ewii-hub init`; its presence means "initialised").
pub const CA_CERT: &str = "ca.pem";
/// The database file inside the state directory.
pub const DB_FILE: &str = "hub.db";
/// The Hub's own SVID chain.
pub const HUB_CERT: &str = "hub.pem";
/// The Hub's own SVID key (0600).
pub const HUB_KEY: &str = "hub.key";
/// The trust bundle (every CA the Hub trusts), when it differs from the signing CA alone.
pub const BUNDLE_FILE: &str = "bundle.pem";
/// A prepared next CA, published in the bundle but not yet signing.
pub const NEXT_CA_CERT: &str = "ca-next.pem";
/// Its key.
pub const NEXT_CA_KEY: &str = "ca-next.key";

/// The lock that keeps a running Hub's reload and the `ewii-hub ca …` commands apart
/// ([`lock_trust`]).
pub const TRUST_LOCK: &str = "trust.lock";

/// A running Hub's hold on its state directory, released when dropped (or when the process
/// ends, however it ends).
#[derive(Debug)]
pub struct RunLock {
    _dir: std::fs::File,
}

/// Takes, without waiting, the lock that keeps a second `ewii-hub run` off `dir`: two Hubs on
/// one state directory would each clear and rewrite the other's live sessions in the database
/// (`ewii-hub clients` then shows a connected Client as offline) and serve its Clients apart.
/// The offline commands (`token create`, `revoke`, …) do not take it: they run beside the Hub.
/// The `flock` is on the directory itself, so no file is left that a start as another user
/// (root) could make unreadable to the owner. `Ok(None)` when another process holds it.
/// Blocking I/O: an open and an `flock`.
pub fn lock_run(dir: &Path) -> Result<Option<RunLock>, IdentityError> {
    let io = |source| IdentityError::Io {
        path: dir.to_owned(),
        source,
    };
    let handle = std::fs::File::open(dir).map_err(io)?;
    match handle.try_lock() {
        Ok(()) => Ok(Some(RunLock { _dir: handle })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Lifetime of the Hub's own SVID; `ewii-hub run` renews it when less than a third is left.
pub const HUB_SVID_LIFETIME: Duration = Duration::from_secs(90 * 86_400);

/// The state directory's trust lock, held until dropped: see [`lock_trust`].
#[derive(Debug)]
pub struct TrustLock {
    _file: std::fs::File,
}

/// Waits for, then takes, the lock of the trust material in `dir`: the CA, the bundle and the
/// Hub SVID. Each `ewii-hub ca …` command holds it from its first read to its last write, and a
/// running Hub while it reads them (and renews its SVID): a Hub reloading while `ca activate`
/// runs would otherwise read the new CA beside the old Hub SVID, issue one of its own, and the
/// two writers would leave a key and a certificate that do not match (a Hub that cannot start
/// again). Blocking I/O: an open and an `flock` that waits while the other side holds it (a
/// few file writes). The file holds nothing; it is opened for reading when it exists, so that
/// one made by another user (root running a command) still serves.
pub fn lock_trust(dir: &Path) -> Result<TrustLock, IdentityError> {
    let (file, io) = open_trust_lock(dir)?;
    file.lock().map_err(io)?;
    Ok(TrustLock { _file: file })
}

/// How long [`lock_trust_unless`] waits before it says so: a command's writes take
/// milliseconds, a paused one holds the lock until it goes on.
const TRUST_WAIT_SAID_AFTER: Duration = Duration::from_secs(1);

/// How often [`lock_trust_unless`] tries the lock while another holds it.
const TRUST_TRY_EVERY: Duration = Duration::from_millis(50);

/// [`lock_trust`], given up (`Ok(None)`) once `stop` is set while another holds the lock: the
/// running Hub's start and reloads, which a stop must not wait for (a command paused with
/// Ctrl-Z holds the lock for as long). Tries again every [`TRUST_TRY_EVERY`] while it waits,
/// and says so in a warning once it has waited [`TRUST_WAIT_SAID_AFTER`].
pub fn lock_trust_unless(
    dir: &Path,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Option<TrustLock>, IdentityError> {
    let (file, io) = open_trust_lock(dir)?;
    let mut tries = 0u32;
    let mut said = false;
    loop {
        match file.try_lock() {
            Ok(()) => {
                if said {
                    tracing::info!("the trust lock is free: going on");
                }
                return Ok(Some(TrustLock { _file: file }));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(None);
                }
                tries += 1;
                if !said && TRUST_TRY_EVERY * tries >= TRUST_WAIT_SAID_AFTER {
                    said = true;
                    tracing::warn!(
                        lock = %dir.join(TRUST_LOCK).display(),
                        "waiting for the trust lock: an `ewii-hub ca …` command holds it (one paused with Ctrl-Z holds it until it is resumed)"
                    );
                }
                std::thread::sleep(TRUST_TRY_EVERY);
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
    }
}

/// The trust lock's file, made when missing, and how to name it in an error.
fn open_trust_lock(
    dir: &Path,
) -> Result<(std::fs::File, impl Fn(std::io::Error) -> IdentityError), IdentityError> {
    let path = dir.join(TRUST_LOCK);
    let io = move |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    let path = dir.join(TRUST_LOCK);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut opts = std::fs::File::options();
            opts.create(true).truncate(false).write(true);
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o644);
            opts.open(&path).map_err(&io)?
        }
        Err(e) => return Err(io(e)),
    };
    Ok((file, io))
}

/// The trusted CAs: `bundle.pem` when present, else the signing CA alone.
pub fn load_bundle(dir: &Path, ca: &Ca) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let path = dir.join(BUNDLE_FILE);
    if path.exists() {
        let anchors = store::read_certs(&path)?;
        if anchors.is_empty() {
            return Err(IdentityError::Pem(path));
        }
        Ok(anchors)
    } else {
        Ok(vec![ca.cert().clone()])
    }
}

/// Loads the Hub SVID, issuing a fresh one when it is missing, has less than a third of its
/// lifetime left, is not from `ca`, or is not whole: a key that does not match its certificate
/// (a write of the two files cut short) would leave a Hub that cannot start.
pub fn load_or_renew_hub_svid(dir: &Path, ca: &Ca) -> Result<Svid, IdentityError> {
    if let Ok(svid) = Svid::load(dir, HUB_CERT, HUB_KEY) {
        let fresh = ServedSvid::of(&svid).is_some_and(|served| !served.due());
        let from_this_ca = svid.chain.get(1) == Some(ca.cert());
        if fresh && from_this_ca && whole(&svid) {
            return Ok(svid);
        }
    }
    issue_hub_svid(dir, ca)
}

/// What the Hub knows of a Hub SVID to decide its renewal: its leaf's serial and validity
/// (seconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ServedSvid {
    pub(crate) serial: String,
    pub(crate) not_before: i64,
    pub(crate) not_after: i64,
}

impl ServedSvid {
    /// `svid`'s, if its leaf parses.
    pub(crate) fn of(svid: &Svid) -> Option<Self> {
        let leaf = svid.chain.first().and_then(|c| inspect_leaf(c).ok())?;
        Some(Self {
            serial: leaf.serial,
            not_before: leaf.not_before,
            not_after: leaf.not_after,
        })
    }

    /// Whether it is due for renewal: a third of its lifetime or less left, or not valid yet
    /// (issued while the clock ran ahead, and set right since: every Client would refuse it,
    /// and it would never come due by its end). The running Hub checks the one it serves at
    /// every tick of its watcher, so a Hub that runs for months renews it as a restart would.
    pub(crate) fn due(&self) -> bool {
        let now = crate::now_timestamp().unix_secs() as i64;
        self.not_after - now <= HUB_SVID_LIFETIME.as_secs() as i64 / 3 || self.not_before > now
    }
}

/// Whether `svid`'s key is the one its certificate names.
pub(crate) fn whole(svid: &Svid) -> bool {
    rustls::sign::CertifiedKey::from_der(svid.chain.clone(), svid.key(), &transport::provider())
        .is_ok()
}

/// Issues and saves a new Hub SVID from `ca`.
pub fn issue_hub_svid(dir: &Path, ca: &Ca) -> Result<Svid, IdentityError> {
    let td = ca_trust_domain(ca)?;
    let id = SpiffeId::hub(&td).map_err(|e| IdentityError::NotSvid(e.to_string()))?;
    let (key, _) = new_key_and_csr()?;
    let issued = ca.issue(&key, &id, HUB_SVID_LIFETIME)?;
    // The CA travels in the chain so that an enrolling Client can match its pin.
    let svid = Svid::new(vec![issued.der, ca.cert().clone()], &key);
    svid.save(dir, HUB_CERT, HUB_KEY)?;
    Ok(svid)
}

/// The trust domain named by the CA's `spiffe://<td>` URI SAN.
pub fn ca_trust_domain(ca: &Ca) -> Result<String, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(ca.cert())
        .map_err(|_| IdentityError::NotSvid("CA certificate does not parse".into()))?;
    let san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .ok_or_else(|| IdentityError::NotSvid("CA has no trust-domain SAN".into()))?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u
                .parse::<SpiffeId>()
                .ok()
                .filter(|id| id.path().is_empty())
                .map(|id| id.trust_domain().to_owned()),
            _ => None,
        })
        .ok_or_else(|| IdentityError::NotSvid("CA has no spiffe://<td> SAN".into()))
}

#[cfg(test)]
mod tests {
    use super::ServedSvid;

    #[test]
    fn a_hub_svid_is_due_with_a_third_left_or_before_its_start() {
        let now = crate::now_timestamp().unix_secs() as i64;
        let day = 86_400;
        let served = |not_before, not_after| ServedSvid {
            serial: String::new(),
            not_before,
            not_after,
        };
        assert!(!served(now - 30, now + 90 * day).due(), "fresh");
        assert!(
            !served(now - 59 * day, now + 31 * day).due(),
            "more than a third left"
        );
        assert!(served(now - 61 * day, now + 29 * day).due(), "a third left");
        // Issued while the clock ran a day ahead, and set right since: no Client takes it.
        assert!(
            served(now + day - 30, now + 91 * day).due(),
            "not valid yet"
        );
    }
}
