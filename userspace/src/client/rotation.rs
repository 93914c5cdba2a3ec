//! Taking an SVID the Hub issued — at enrolment and at every renewal, through one function —
//! and a trust bundle the Hub pushed (P7, P8, P15).
//!
//! [`accept_issued`] is the only place that decides whether an issued chain is ours: it chains
//! to the bundle, names the expected SPIFFE ID, and certifies the key this host made. Saving
//! the files ([`save`], [`save_bundle`]) does blocking I/O with an fsync: async callers run it
//! on the blocking pool.

use std::path::Path;

use ewii_common::spiffe::SpiffeId;
use rcgen::PublicKeyData;
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::identity::store::{self, Svid};
use crate::identity::verify::{Bundle, Expect, SpiffeVerifier};
use crate::identity::{IdentityError, LeafInfo, MAX_SERIAL_OCTETS, MAX_SVID_LIFETIME_SECS};

/// An SVID in use: the chain with its key, and what was read from the leaf.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) svid: Svid,
    pub(crate) leaf: LeafInfo,
}

/// An issued SVID that checked out, with the bundle it came with.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub(crate) identity: Identity,
    pub(crate) anchors: Vec<CertificateDer<'static>>,
}

/// Why an issued SVID was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The Hub sent no certificate.
    #[error("empty chain")]
    EmptyChain,
    /// The chain does not verify against the bundle as a Client SVID.
    #[error("the chain does not verify: {0}")]
    Chain(String),
    /// The SVID names another identity than the one renewed.
    #[error("the SVID is for {got}, not {want}")]
    WrongIdentity {
        /// What the leaf names.
        got: String,
        /// What we hold.
        want: String,
    },
    /// The leaf certifies another key than the one this host made.
    #[error("the certificate is not for the key we sent")]
    WrongKey,
    /// The SVID is valid for longer than a Hub issues: it would never be rotated (P7).
    #[error("the SVID is valid for {secs} s, longer than a Client takes ({} s)", MAX_SVID_LIFETIME_SECS + crate::identity::ca::BACKDATE.as_secs())]
    TooLong {
        /// Its validity, `not_after - not_before`.
        secs: i64,
    },
    /// The certificate's serial is longer than RFC 5280 allows.
    #[error("the SVID's serial is {0} octets long (RFC 5280 allows 20)")]
    LongSerial(usize),
    /// A bundle from the Hub keeps none of the trust anchors in use: not a rotation (P15).
    #[error("the bundle keeps none of the trust anchors in use (it holds {added}): a CA rotation always overlaps")]
    NoOverlap {
        /// The anchors it holds, `sha256:` each.
        added: String,
    },
    /// The bundle holds no usable trust anchor, or some unusable one.
    #[error("{usable} of {total} trust anchors usable")]
    BadBundle {
        /// Anchors that parse as trust anchors and are CA certificates.
        usable: usize,
        /// Anchors sent.
        total: usize,
    },
}

/// Checks an issued `chain` for `key` against `anchors`, the bundle it came with. `expect` is the identity being renewed; at enrolment it is `None` and the
/// leaf's own trust domain is used (the bundle was pinned by hash before).
pub(crate) fn accept_issued(
    key: &rcgen::KeyPair,
    chain: Vec<Vec<u8>>,
    anchors: Vec<CertificateDer<'static>>,
    expect: Option<&SpiffeId>,
) -> Result<Accepted, IssueError> {
    let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(Into::into).collect();
    let leaf = chain.first().ok_or(IssueError::EmptyChain)?;
    check_anchors(&anchors)?;
    let trust_domain = match expect {
        Some(id) => id.trust_domain().to_owned(),
        None => crate::identity::inspect_leaf(leaf)
            .map_err(|e| IssueError::Chain(e.to_string()))?
            .id
            .trust_domain()
            .to_owned(),
    };
    let info = SpiffeVerifier::new(Bundle::new(anchors.clone()), &trust_domain, Expect::Client)
        .verify_chain(leaf, &chain[1..], UnixTime::now())
        .map_err(IssueError::Chain)?;
    if let Some(want) = expect {
        if info.id != *want {
            return Err(IssueError::WrongIdentity {
                got: info.id.to_string(),
                want: want.to_string(),
            });
        }
    }
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|_| IssueError::Chain("leaf does not parse".into()))?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(IssueError::WrongKey);
    }
    let serial = match cert.raw_serial() {
        [0, rest @ ..] if rest.first().is_some_and(|b| b & 0x80 != 0) => rest,
        raw => raw,
    };
    if serial.len() > MAX_SERIAL_OCTETS {
        return Err(IssueError::LongSerial(serial.len()));
    }
    let secs = info.not_after.saturating_sub(info.not_before);
    if secs > (MAX_SVID_LIFETIME_SECS + crate::identity::ca::BACKDATE.as_secs()) as i64 {
        return Err(IssueError::TooLong { secs });
    }
    Ok(Accepted {
        identity: Identity {
            svid: Svid::new(chain, key),
            leaf: info,
        },
        anchors,
    })
}

/// Every anchor must be usable, and there must be one: a bundle never shrinks to garbage.
pub(crate) fn check_anchors(anchors: &[CertificateDer<'static>]) -> Result<(), IssueError> {
    // A leaf is no anchor: its key holder could stand as the Hub.
    let usable = anchors
        .iter()
        .filter(|c| {
            webpki::anchor_from_trusted_cert(c).is_ok()
                && crate::identity::check_ca_certificate(c).is_ok()
        })
        .count();
    if usable == 0 || usable != anchors.len() {
        return Err(IssueError::BadBundle {
            usable,
            total: anchors.len(),
        });
    }
    Ok(())
}

/// What a bundle from the Hub changes in the one in use, by anchor (`sha256:` of each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BundleChange {
    pub(crate) added: Vec<String>,
    pub(crate) removed: Vec<String>,
    /// Anchors in the new bundle.
    pub(crate) total: usize,
}

impl std::fmt::Display for BundleChange {
    /// `N trust anchor(s)`, then what was added and removed (the customer's SIEM sees which CA
    /// its Client trusts from now on).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} trust anchor(s)", self.total)?;
        if !self.added.is_empty() {
            write!(f, "; added {}", self.added.join(", "))?;
        }
        if !self.removed.is_empty() {
            write!(f, "; removed {}", self.removed.join(", "))?;
        }
        Ok(())
    }
}

/// Checks a bundle the Hub sent (pushed, or with a renewal) against the one in use: every
/// anchor usable ([`check_anchors`]), and at least one of those in use kept. A CA rotation
/// always overlaps (P15: `ca prepare` adds the next CA beside the current one, `ca retire`
/// drops the old one once the new one is in the bundle), so a bundle that keeps none is not a
/// rotation: whoever holds the Hub's key could otherwise make this Client trust only a CA of
/// their own, for good, in one message.
pub(crate) fn bundle_change(
    current: &[CertificateDer<'static>],
    new: &[CertificateDer<'static>],
) -> Result<BundleChange, IssueError> {
    check_anchors(new)?;
    let change = bundle_diff(current, new);
    if !current.is_empty() && change.removed.len() == current.len() {
        return Err(IssueError::NoOverlap {
            added: change.added.join(", "),
        });
    }
    Ok(change)
}

/// What `new` adds to and removes from `current`, by anchor; nothing checked.
pub(crate) fn bundle_diff(
    current: &[CertificateDer<'static>],
    new: &[CertificateDer<'static>],
) -> BundleChange {
    let hashes = |set: &[CertificateDer<'static>]| -> Vec<String> {
        set.iter()
            .map(|c| crate::identity::bundle_hash(c))
            .collect()
    };
    let (now, next) = (hashes(current), hashes(new));
    BundleChange {
        added: next.iter().filter(|h| !now.contains(h)).cloned().collect(),
        removed: now.iter().filter(|h| !next.contains(h)).cloned().collect(),
        total: new.len(),
    }
}

/// Writes the SVID (key 0600) and its bundle into the state directory. Blocking.
pub(crate) fn save(dir: &Path, accepted: &Accepted) -> Result<(), IdentityError> {
    save_bundle(dir, &accepted.anchors)?;
    accepted
        .identity
        .svid
        .save(dir, store::SVID_CERT, store::SVID_KEY)
}

/// [`save`] for a renewal, whose key is kept ([`save_renew_key`]): the bundle, then the chain
/// ([`Svid::save_chain_first`]), so that an interruption leaves what [`recover_renewal`]
/// puts right. Blocking.
///
/// The bundle goes first: the renewed SVID may come from a CA only the new bundle has. So a
/// chain that cannot be written leaves the new bundle on disk, the next start's:
/// [`SaveError::bundle_saved`] says so, for the bundle in use and its record to follow.
pub(crate) fn save_renewal(dir: &Path, accepted: &Accepted) -> Result<(), SaveError> {
    save_bundle(dir, &accepted.anchors).map_err(|error| SaveError {
        error,
        bundle_saved: false,
    })?;
    accepted
        .identity
        .svid
        .save_chain_first(dir, store::SVID_CERT, store::SVID_KEY)
        .map_err(|error| SaveError {
            error,
            bundle_saved: true,
        })
}

/// A renewal [`save_renewal`] could not store whole.
#[derive(Debug)]
pub(crate) struct SaveError {
    pub(crate) error: IdentityError,
    /// `bundle.pem` holds the renewal's bundle; the SVID was not stored whole (its chain may
    /// be, without its key: [`recover_renewal`] completes it at the next start).
    pub(crate) bundle_saved: bool,
}

/// Keeps the key of a renewal asked for `serial` in the state directory (0600, synced), before
/// the ask goes out. Blocking.
pub(crate) fn save_renew_key(dir: &Path, serial: &str, key_pem: &str) -> Result<(), IdentityError> {
    store::write_durable(
        &dir.join(store::renew_key_file(serial)),
        key_pem.as_bytes(),
        0o600,
    )
}

/// Makes sure the key of a renewal asked for `serial` is kept in the state directory, as
/// [`save_renew_key`] keeps it when the `Renew` goes out (that write may have failed, and the
/// ask went out all the same): [`save_renewal`] writes the chain first, and a save cut short
/// after it is completed at the next start from this key ([`recover_renewal`]). Without it,
/// such a save would leave a chain whose key is nowhere, and the identity lost. Blocking.
pub(crate) fn ensure_renew_key(
    dir: &Path,
    serial: &str,
    key: &rcgen::KeyPair,
) -> Result<(), IdentityError> {
    let path = dir.join(store::renew_key_file(serial));
    if store::read_key_pair(&path).is_ok_and(|k| k.serialized_der() == key.serialized_der()) {
        return Ok(());
    }
    save_renew_key(dir, serial, &key.serialize_pem())
}

/// What an earlier run left of a renewal, put right at start: `svid` as loaded, and the key
/// of a renewal asked for its serial and not stored yet, if one was kept. Blocking.
///
/// - A kept key that certifies `svid`'s chain while `svid.key` does not: the renewal's save
///   was interrupted between the chain and the key ([`save_renewal`]); the key is written
///   now.
/// - A kept key for `svid`'s serial: asked for, not stored; the next `Renew` asks with it
///   (a serial renews once: another key would be refused).
/// - Every other kept key (an older serial's, one that does not parse) and leftover temporary
///   files are removed.
///
/// A kept key that cannot be read (permissions, I/O) is an error: removing it could lock the
/// Client out, and a new key would overwrite it.
pub(crate) fn recover_renewal(dir: &Path, mut svid: Svid) -> Result<Recovered, IdentityError> {
    let mut completed = false;
    let mut kept = Vec::new();
    for (name, temporary) in renew_key_files(dir) {
        let path = dir.join(&name);
        let key = if temporary {
            None
        } else {
            match store::read_key_pair(&path) {
                Ok(key) => Some(key),
                Err(IdentityError::Pem(_)) => {
                    tracing::warn!(file = %path.display(), "a kept renewal key does not parse; removed");
                    None
                }
                Err(e) => return Err(e),
            }
        };
        match key {
            Some(key) => kept.push((name, key)),
            None => remove(&path),
        }
    }
    if !svid.key_matches() {
        if let Some(i) = kept
            .iter()
            .position(|(_, key)| Svid::new(svid.chain.clone(), key).key_matches())
        {
            let (name, key) = kept.swap_remove(i);
            tracing::warn!(file = %name, "the last renewal's key was not stored beside its SVID; storing it now");
            let repaired = Svid::new(svid.chain.clone(), &key);
            store::write_durable(
                &dir.join(store::SVID_KEY),
                key.serialize_pem().as_bytes(),
                0o600,
            )?;
            remove(&dir.join(name));
            svid = repaired;
            completed = true;
        }
    }
    let serial = svid
        .chain
        .first()
        .and_then(|c| crate::identity::inspect_leaf(c).ok())
        .map(|l| l.serial);
    let mine = serial.as_deref().map(store::renew_key_file);
    let mut pending = None;
    for (name, key) in kept {
        if Some(&name) == mine.as_ref() && key.serialized_der() != svid.key().secret_der() {
            pending = Some(key);
        } else {
            remove(&dir.join(name));
        }
    }
    Ok(Recovered {
        svid,
        renew_key: pending,
        completed,
    })
}

/// What [`recover_renewal`] found, and did.
pub(crate) struct Recovered {
    /// The SVID in use.
    pub(crate) svid: Svid,
    /// The key of a renewal asked for and not stored: the next `Renew` asks with it.
    pub(crate) renew_key: Option<rcgen::KeyPair>,
    /// The last run stored a renewal's chain and not its key (and recorded the renewal as
    /// refused): the key is stored now, and the renewal is the SVID in use.
    pub(crate) completed: bool,
}

/// Removes every kept renewal key: the renewed SVID is stored, with its key. Blocking.
pub(crate) fn remove_renew_keys(dir: &Path) {
    for (name, _) in renew_key_files(dir) {
        remove(&dir.join(name));
    }
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(file = %path.display(), error = %e, "cannot remove a renewal key file");
    }
}

/// The names of the kept renewal keys, and of their temporary files (`true`) that a write cut
/// short left behind.
fn renew_key_files(dir: &Path) -> Vec<(String, bool)> {
    let temporary_prefix = format!(".{}", store::RENEW_KEY_PREFIX);
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| {
            if n.starts_with(store::RENEW_KEY_PREFIX) && n.ends_with(".key") {
                Some((n, false))
            } else if n.starts_with(&temporary_prefix) && n.contains(".key.") && n.ends_with(".tmp")
            {
                Some((n, true))
            } else {
                None
            }
        })
        .collect()
}

/// Writes the trust bundle into the state directory. Blocking.
pub(crate) fn save_bundle(
    dir: &Path,
    anchors: &[CertificateDer<'static>],
) -> Result<(), IdentityError> {
    store::write_durable(
        &dir.join(store::BUNDLE),
        store::Pem::certs(anchors).as_bytes(),
        0o644,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::{new_key_and_csr, Ca};

    #[test]
    fn p15_a_bundle_for_the_hub_holds_only_ca_certificates() {
        let ca = Ca::generate("example.org").unwrap();
        check_anchors(&[ca.cert().clone()]).unwrap();
        let (_key, csr) = new_key_and_csr().unwrap();
        let id = SpiffeId::hub("example.org").unwrap();
        let leaf = ca
            .sign_csr(&csr, &id, std::time::Duration::from_secs(3_600))
            .unwrap()
            .der;
        // A leaf beside the CA (its key holder could stand as the Hub), alone, or nothing.
        let err = check_anchors(&[ca.cert().clone(), leaf.clone()]).unwrap_err();
        assert_eq!(err.to_string(), "1 of 2 trust anchors usable");
        assert!(check_anchors(&[leaf]).is_err());
        assert!(check_anchors(&[]).is_err());
    }

    /// A bundle from the Hub must keep an anchor in use; what it adds and removes is named.
    #[test]
    fn p15_a_bundle_from_the_hub_keeps_an_anchor_in_use() {
        let (old, new, other) = (
            Ca::generate("example.org").unwrap().cert().clone(),
            Ca::generate("example.org").unwrap().cert().clone(),
            Ca::generate("example.org").unwrap().cert().clone(),
        );
        let h = |c: &CertificateDer<'static>| crate::identity::bundle_hash(c);
        // prepare, then retire: each overlaps the bundle before it.
        let prepared =
            bundle_change(std::slice::from_ref(&old), &[old.clone(), new.clone()]).unwrap();
        assert_eq!(
            prepared.to_string(),
            format!("2 trust anchor(s); added {}", h(&new))
        );
        let retired =
            bundle_change(&[old.clone(), new.clone()], std::slice::from_ref(&new)).unwrap();
        assert_eq!(
            retired.to_string(),
            format!("1 trust anchor(s); removed {}", h(&old))
        );
        let same = bundle_change(std::slice::from_ref(&old), std::slice::from_ref(&old)).unwrap();
        assert_eq!(same.to_string(), "1 trust anchor(s)");
        // Swapped for another CA in one message, or two others: not a rotation.
        for next in [vec![new.clone()], vec![new.clone(), other.clone()]] {
            assert!(
                matches!(
                    bundle_change(std::slice::from_ref(&old), &next),
                    Err(IssueError::NoOverlap { .. })
                ),
                "{} anchor(s)",
                next.len()
            );
        }
        // And every anchor must be a CA, as before.
        assert!(matches!(
            bundle_change(std::slice::from_ref(&old), &[]),
            Err(IssueError::BadBundle { .. })
        ));
    }

    /// A `Renewed` from a hostile Hub for another identity (another client of the same trust
    /// domain), or for another key than the one asked with (a key the Hub would hold): both
    /// refused, so the Client never serves as someone else or with a key it did not make.
    #[test]
    fn p7_p8_an_svid_for_another_identity_or_another_key_is_refused() {
        let ca = Ca::generate("example.org").unwrap();
        let acme = SpiffeId::client("example.org", "acme").unwrap();
        let beta = SpiffeId::client("example.org", "beta").unwrap();
        let key = new_key();
        let sign = |key: &rcgen::KeyPair, id: &SpiffeId| {
            let csr = crate::identity::ca::csr_for(key).unwrap();
            let issued = ca
                .sign_csr(&csr, id, std::time::Duration::from_secs(3_600))
                .unwrap();
            vec![issued.der.to_vec()]
        };
        let take = |chain| accept_issued(&key, chain, vec![ca.cert().clone()], Some(&acme));
        assert!(take(sign(&key, &acme)).is_ok());
        let Err(IssueError::WrongIdentity { got, want }) = take(sign(&key, &beta)) else {
            panic!("another identity taken");
        };
        assert_eq!((got, want), (beta.to_string(), acme.to_string()));
        assert!(matches!(
            take(sign(&new_key(), &acme)),
            Err(IssueError::WrongKey)
        ));
    }

    /// An issued SVID a Hub could not have issued is refused: valid for longer than the
    /// longest lifetime (it would never rotate), or with a serial longer than RFC 5280 allows
    /// (it names files in the state directory).
    #[test]
    fn p7_an_svid_valid_for_too_long_or_with_a_long_serial_is_refused() {
        use time::OffsetDateTime;
        let ca = Ca::generate("example.org").unwrap();
        let id = SpiffeId::client("example.org", "acme").unwrap();
        let key = new_key();
        let now = OffsetDateTime::now_utc();
        let take = |issued: crate::identity::ca::Issued| {
            accept_issued(
                &key,
                vec![issued.der.to_vec()],
                vec![ca.cert().clone()],
                Some(&id),
            )
        };
        let serial = |n: usize| rcgen::SerialNumber::from_slice(&vec![0x42; n]);
        let longest = MAX_SVID_LIFETIME_SECS as i64;
        let issue = |secs: i64, octets: usize| {
            ca.issue_with_serial(
                &key,
                &id,
                now - time::Duration::seconds(30),
                now + time::Duration::seconds(secs),
                serial(octets),
            )
            .unwrap()
        };
        assert!(take(issue(longest, 20)).is_ok(), "the longest a Hub issues");
        // 20 octets with DER's leading zero (the first is over 0x7f): 20, not 21.
        let signed = ca
            .issue_with_serial(
                &key,
                &id,
                now - time::Duration::seconds(30),
                now + time::Duration::seconds(3_600),
                rcgen::SerialNumber::from_slice(&[[0u8].as_slice(), &[0xc2; 20]].concat()),
            )
            .unwrap();
        assert!(take(signed).is_ok());
        assert_eq!(
            take(issue(3_600, 21)).unwrap_err(),
            IssueError::LongSerial(21)
        );
        assert_eq!(
            take(issue(longest + 3_600, 16)).unwrap_err(),
            IssueError::TooLong {
                secs: longest + 3_630
            }
        );
        assert_eq!(
            take(issue(3_600, 40)).unwrap_err(),
            IssueError::LongSerial(40)
        );
    }

    /// An SVID for `key` from `ca`, and its serial.
    fn svid_for(ca: &Ca, key: &rcgen::KeyPair) -> (Svid, String) {
        let csr = crate::identity::ca::csr_for(key).unwrap();
        let id = SpiffeId::client("example.org", "acme").unwrap();
        let issued = ca
            .sign_csr(&csr, &id, std::time::Duration::from_secs(3_600))
            .unwrap();
        let serial = crate::identity::inspect_leaf(&issued.der).unwrap().serial;
        (Svid::new(vec![issued.der], key), serial)
    }

    fn new_key() -> rcgen::KeyPair {
        new_key_and_csr().unwrap().0
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn p8_a_start_keeps_the_renewal_key_of_its_serial_and_removes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = Ca::generate("example.org").unwrap();
        let (svid, serial) = svid_for(&ca, &new_key());
        svid.save(d, store::SVID_CERT, store::SVID_KEY).unwrap();
        let asked = new_key();
        save_renew_key(d, &serial, &asked.serialize_pem()).unwrap();
        save_renew_key(d, "0123", &new_key().serialize_pem()).unwrap();
        std::fs::write(d.join(store::renew_key_file("04")), "not a key").unwrap();
        std::fs::write(d.join(".renew-05.key.tmp"), "half a key").unwrap();
        std::fs::write(d.join(".renew-06.key.4242-00000000deadbeef.tmp"), "half").unwrap();
        let loaded = Svid::load(d, store::SVID_CERT, store::SVID_KEY).unwrap();
        let back = recover_renewal(d, loaded).unwrap();
        assert!(!back.completed);
        assert_eq!(back.svid.key().secret_der(), svid.key().secret_der());
        assert_eq!(
            back.renew_key.unwrap().serialized_der(),
            asked.serialized_der(),
            "the key asked with, for this serial"
        );
        let mut want = vec![
            store::SVID_KEY.to_owned(),
            store::SVID_CERT.to_owned(),
            store::renew_key_file(&serial),
        ];
        want.sort();
        assert_eq!(
            names(d),
            want,
            "the other serial's key, garbage and a temporary file go"
        );
    }

    #[test]
    fn p8_a_kept_renewal_key_that_cannot_be_read_stops_the_start_and_stays() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = Ca::generate("example.org").unwrap();
        let (svid, serial) = svid_for(&ca, &new_key());
        // A read that fails for another reason than its contents (a directory here: the test
        // runs as root, which reads any file whatever its mode).
        std::fs::create_dir(d.join(store::renew_key_file(&serial))).unwrap();
        let Err(err) = recover_renewal(d, svid) else {
            panic!("a kept key that cannot be read must fail the start");
        };
        assert!(matches!(err, IdentityError::Io { .. }), "{err:?}");
        assert!(d.join(store::renew_key_file(&serial)).exists());
    }

    #[test]
    fn p8_a_renewal_saved_up_to_its_chain_is_completed_from_the_kept_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = Ca::generate("example.org").unwrap();
        let old_key = new_key();
        let (old, old_serial) = svid_for(&ca, &old_key);
        old.save(d, store::SVID_CERT, store::SVID_KEY).unwrap();
        // The renewal: its key kept, its chain written, then the run ended.
        let renewed_key = new_key();
        save_renew_key(d, &old_serial, &renewed_key.serialize_pem()).unwrap();
        let (renewed, _) = svid_for(&ca, &renewed_key);
        std::fs::write(d.join(store::SVID_CERT), store::Pem::certs(&renewed.chain)).unwrap();
        let loaded = Svid::load(d, store::SVID_CERT, store::SVID_KEY).unwrap();
        assert!(!loaded.key_matches(), "the new chain beside the old key");
        let recovered = recover_renewal(d, loaded).unwrap();
        let fixed = recovered.svid;
        assert!(fixed.key_matches());
        assert_eq!(fixed.key().secret_der(), renewed_key.serialized_der());
        assert!(recovered.renew_key.is_none());
        assert!(recovered.completed, "told, for its audit record");
        let on_disk = Svid::load(d, store::SVID_CERT, store::SVID_KEY).unwrap();
        assert!(on_disk.key_matches(), "the key is stored beside its chain");
        assert_eq!(
            names(d),
            vec![store::SVID_KEY.to_owned(), store::SVID_CERT.to_owned()]
        );
    }
}
