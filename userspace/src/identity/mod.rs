//! Identity: the Hub's CA, keys and CSRs, the SVID files on disk, and SPIFFE verification.
//!
//! - [`ca`]: the Hub CA (ECDSA P-256); issues SVIDs from a CSR's public key alone.
//! - [`store`]: key and certificate files (`svid.pem`, `svid.key` 0600, `bundle.pem`).
//! - [`verify`]: the SPIFFE verifiers both sides run on every handshake.
//! - [`present`]: the proof of a new SVID's key on a live connection (`Present`).

pub mod ca;
pub mod present;
pub mod store;
pub mod verify;

use ewii_common::spiffe::SpiffeId;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;

/// Why a key, certificate or CSR could not be made, read or accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading or writing a key or certificate file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{0}: no usable PEM item")]
    Pem(std::path::PathBuf),
    /// Key generation or signing failed.
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A peer's CSR does not parse, or its self-signature does not verify. The text is the
    /// parser's, which may quote the CSR's own bytes: bounded and escaped as every peer text
    /// ([`ewii_common::text::from_peer`]), since it goes into audit records.
    #[error("it does not parse, or its self-signature does not verify: {0}")]
    BadCsr(String),
    /// A certificate does not meet the SPIFFE X509-SVID leaf rules.
    #[error("not a valid SVID: {0}")]
    NotSvid(String),
    /// The bundle hash is not `sha256:` and 64 hex digits.
    #[error("bundle hash must be sha256:<64 hex digits>")]
    BundleHash,
}

/// The longest SVID lifetime a Client takes from a Hub (plus the CA's backdating): a longer
/// one would stop its rotation. A Hub issues at most [`PROMISED_SVID_LIFETIME_SECS`]; the
/// slack lets a Client keep working with a Hub misconfigured by hand, which its `verify`
/// reports as breaking P7.
pub const MAX_SVID_LIFETIME_SECS: u64 = 30 * 86_400;
/// The longest SVID lifetime a Hub may be set to issue (`svid_lifetime_secs`): the customer
/// is promised an SVID rotated every 24 hours (P7), and `ewii-client verify` checks it.
pub const PROMISED_SVID_LIFETIME_SECS: u64 = 86_400;
/// The most octets in a certificate serial (RFC 5280 §4.1.2.2: conforming CAs use at most 20),
/// not counting a leading zero that DER adds to keep it positive. A serial names files in the
/// Client's state directory.
pub const MAX_SERIAL_OCTETS: usize = 20;

/// What the verifiers and the CA read from a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafInfo {
    /// The one URI SAN, canonical.
    pub id: SpiffeId,
    /// Serial in normalised form (see [`normalize_serial`]).
    pub serial: String,
    /// Validity start, seconds since the epoch.
    pub not_before: i64,
    /// Validity end, seconds since the epoch.
    pub not_after: i64,
}

/// Checks that `der` may stand as a trust anchor: a certificate that says it is a CA
/// (basicConstraints `cA=true`) and, when it limits its key's usage, may sign certificates
/// (RFC 5280 §4.2.1.3, §4.2.1.9). webpki takes any certificate as an anchor, a leaf included:
/// a leaf's key holder could then sign SVIDs for any identity of that trust domain.
pub fn check_ca_certificate(der: &[u8]) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| "a certificate does not parse".to_owned())?;
    let subject = cert.subject().to_string();
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => {
            return Err(format!(
                "{subject} is not a CA certificate (no basicConstraints cA=true)"
            ))
        }
        Err(_) => return Err(format!("{subject}: malformed basicConstraints")),
    }
    match cert.key_usage() {
        Ok(None) => Ok(()),
        Ok(Some(ku)) if ku.value.key_cert_sign() => Ok(()),
        Ok(Some(_)) => Err(format!(
            "{subject}: its key usage does not allow signing certificates"
        )),
        Err(_) => Err(format!("{subject}: malformed keyUsage")),
    }
}

/// Reads a leaf and checks the SPIFFE X509-SVID leaf rules (SPIFFE X509-SVID §4, §5): exactly
/// one URI SAN that parses as a SPIFFE ID, explicit `cA=false`, key usage with
/// `digitalSignature` and without `keyCertSign`/`cRLSign`.
pub fn inspect_leaf(der: &[u8]) -> Result<LeafInfo, IdentityError> {
    let bad = |s: &str| IdentityError::NotSvid(s.to_owned());
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| bad("certificate does not parse"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| bad("malformed subjectAltName"))?
        .ok_or_else(|| bad("no subjectAltName"))?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let [uri] = uris.as_slice() else {
        return Err(bad(&format!("{} URI SANs, need exactly one", uris.len())));
    };
    let id: SpiffeId = uri
        .parse()
        .map_err(|e| bad(&format!("URI SAN is not a SPIFFE ID: {e}")))?;
    match cert.basic_constraints() {
        Ok(Some(bc)) if !bc.value.ca => {}
        Ok(Some(_)) => return Err(bad("leaf has cA=true")),
        Ok(None) => return Err(bad("leaf lacks explicit basicConstraints cA=false")),
        Err(_) => return Err(bad("malformed basicConstraints")),
    }
    match cert.key_usage() {
        Ok(Some(ku))
            if ku.value.digital_signature()
                && !ku.value.key_cert_sign()
                && !ku.value.crl_sign() => {}
        _ => return Err(bad("key usage must have digitalSignature and no CA bits")),
    }
    // An SVID names its purpose: without extendedKeyUsage a certificate would be good for any
    // use (RFC 5280 §4.2.1.12). The verifiers then require the one they check for (clientAuth
    // or serverAuth).
    match cert.extended_key_usage() {
        Ok(Some(eku)) if eku.value.client_auth || eku.value.server_auth => {}
        Ok(_) => return Err(bad("no extendedKeyUsage with clientAuth or serverAuth")),
        Err(_) => return Err(bad("malformed extendedKeyUsage")),
    }
    Ok(LeafInfo {
        id,
        serial: normalize_serial(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// A serial as lower-case hex without leading zero bytes, so the DER sign-padding byte
/// (`00` before a high bit) never makes two encodings of one serial differ.
pub fn normalize_serial(raw: &[u8]) -> String {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    let trimmed = &raw[start..];
    if trimmed.is_empty() {
        "00".into()
    } else {
        hex::encode(trimmed)
    }
}

/// `sha256:<hex>` of a trust anchor's DER: what the Client pins at install.
pub fn bundle_hash(ca_der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(ca_der)))
}

/// What `after` adds to and removes from `before`, anchor by anchor, as a record says it:
/// `; added sha256:…; removed sha256:…` (each part when it names one; empty for the same
/// anchors), so that a SIEM sees which CA is trusted from then on.
pub fn anchors_changed(
    before: &[rustls::pki_types::CertificateDer<'_>],
    after: &[rustls::pki_types::CertificateDer<'_>],
) -> String {
    let hashes = |from: &[rustls::pki_types::CertificateDer<'_>],
                  not_in: &[rustls::pki_types::CertificateDer<'_>]| {
        from.iter()
            .filter(|c| !not_in.contains(c))
            .map(|c| bundle_hash(c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::new();
    for (what, list) in [
        ("added", hashes(after, before)),
        ("removed", hashes(before, after)),
    ] {
        if !list.is_empty() {
            out.push_str(&format!("; {what} {list}"));
        }
    }
    out
}

/// Parses a `sha256:<hex>` pin.
pub fn parse_bundle_hash(s: &str) -> Result<[u8; 32], IdentityError> {
    let hex_part = s.strip_prefix("sha256:").ok_or(IdentityError::BundleHash)?;
    let bytes = hex::decode(hex_part).map_err(|_| IdentityError::BundleHash)?;
    bytes.try_into().map_err(|_| IdentityError::BundleHash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p8_serials_compare_in_normalised_form() {
        assert_eq!(normalize_serial(&[0x00, 0x80, 0x01]), "8001");
        assert_eq!(normalize_serial(&[0x80, 0x01]), "8001");
        assert_eq!(normalize_serial(&[0, 0]), "00");
    }

    #[test]
    fn bundle_hash_roundtrip() {
        let h = bundle_hash(b"abc");
        assert_eq!(
            parse_bundle_hash(&h).unwrap().to_vec(),
            Sha256::digest(b"abc").to_vec()
        );
        assert!(parse_bundle_hash("sha1:00").is_err());
        assert!(parse_bundle_hash("sha256:zz").is_err());
        assert!(parse_bundle_hash("sha256:00").is_err());
    }
}
