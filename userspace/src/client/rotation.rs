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
use crate::identity::{IdentityError, LeafInfo};

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

/// Writes the SVID (key 0600) and its bundle into the state directory. Blocking.
pub(crate) fn save(dir: &Path, accepted: &Accepted) -> Result<(), IdentityError> {
    save_bundle(dir, &accepted.anchors)?;
    accepted
        .identity
        .svid
        .save(dir, store::SVID_CERT, store::SVID_KEY)
}

/// Keeps the key of a renewal asked for `serial` in the state directory (0600, synced), before
/// the ask goes out. Blocking.
pub(crate) fn save_renew_key(dir: &Path, serial: &str, key_pem: &str) -> Result<(), IdentityError> {
    store::write_file(
        &dir.join(store::renew_key_file(serial)),
        key_pem.as_bytes(),
        0o600,
    )
}

/// The key of a renewal asked for `svid`'s serial by an earlier run, if one was kept; every
/// other kept renewal key (for an older serial) is removed. A kept key that does not parse, or
/// is the SVID's own key (the renewal was stored, the key file not yet removed), is removed
/// and not used: the next renewal makes a new key. Blocking.
pub(crate) fn load_renew_key(dir: &Path, serial: &str, svid: &Svid) -> Option<rcgen::KeyPair> {
    let mine = store::renew_key_file(serial);
    let mut kept = None;
    for name in renew_key_files(dir) {
        let path = dir.join(&name);
        if name == mine {
            match store::read_key_pair(&path) {
                Ok(key) if key.serialized_der() != svid.key().secret_der() => {
                    kept = Some(key);
                    continue;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "a kept renewal key does not parse; removed"),
            }
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a stale renewal key");
        }
    }
    kept
}

/// Removes every kept renewal key: the renewed SVID is stored, with its key. Blocking.
pub(crate) fn remove_renew_keys(dir: &Path) {
    for name in renew_key_files(dir) {
        let path = dir.join(name);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove a used renewal key");
        }
    }
}

fn renew_key_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(store::RENEW_KEY_PREFIX) && n.ends_with(".key"))
        .collect()
}

/// Writes the trust bundle into the state directory. Blocking.
pub(crate) fn save_bundle(
    dir: &Path,
    anchors: &[CertificateDer<'static>],
) -> Result<(), IdentityError> {
    store::write_file(
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
}
