//! The Hub's certificate authority (ECDSA P-256).
//!
//! An SVID is built from the Hub's own record of the identity: only the *public key* of a CSR
//! is used, after its self-signature is checked (proof of possession). A CSR that asks for
//! `cA=true`, another SPIFFE ID or extra SANs gets none of it.

use std::path::Path;
use std::time::Duration;

use ewii_common::spiffe::SpiffeId;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use super::store::{self, Pem};
use super::{normalize_serial, IdentityError};

/// Clock skew allowance: certificates start this long before they are issued (at most a
/// tenth of their lifetime, so that half-life stays half-life for short test lifetimes).
pub const BACKDATE: Duration = Duration::from_secs(30);

fn backdate(lifetime: Duration) -> Duration {
    BACKDATE.min(lifetime / 10)
}
/// Lifetime of the CA itself.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);

/// A freshly issued leaf.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub der: CertificateDer<'static>,
    /// Normalised serial.
    pub serial: String,
    /// Validity end, seconds since the epoch.
    pub not_after: i64,
}

/// The Hub CA: its certificate and signing key.
pub struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("key", &"***").finish()
    }
}

impl Ca {
    /// Makes a new CA for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Ewii");
        dn.push(DnType::CommonName, format!("Ewii CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // SPIFFE X509-SVID §3: a signing certificate MAY carry the trust domain as its URI SAN.
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        Self::load_from(dir, "ca.pem", "ca.key")
    }

    /// Loads a CA from `cert_file` and `key_file` in `dir`.
    pub fn load_from(dir: &Path, cert_file: &str, key_file: &str) -> Result<Self, IdentityError> {
        let cert = store::read_certs(&dir.join(cert_file))?
            .into_iter()
            .next()
            .ok_or_else(|| IdentityError::Pem(dir.join(cert_file)))?;
        let key = store::read_key_pair(&dir.join(key_file))?;
        // A key that does not match the certificate (a half-replaced pair) would sign
        // certificates nobody can verify: refuse it.
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|_| IdentityError::Pem(dir.join(cert_file)))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(IdentityError::NotSvid(format!(
                "{key_file} does not match {cert_file}"
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Self { cert, issuer })
    }

    /// Writes `ca.pem` and `ca.key` (0600) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        self.save_as(dir, "ca.pem", "ca.key")
    }

    /// Writes the certificate and the key (0600, first) under the given names.
    pub fn save_as(
        &self,
        dir: &Path,
        cert_file: &str,
        key_file: &str,
    ) -> Result<(), IdentityError> {
        store::write_file(
            &dir.join(key_file),
            self.issuer.key().serialize_pem().as_bytes(),
            0o600,
        )?;
        store::write_file(
            &dir.join(cert_file),
            Pem::certs(std::slice::from_ref(&self.cert)).as_bytes(),
            0o644,
        )
    }

    /// The CA certificate (a trust anchor).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Issues an SVID for `id` to `public_key`, valid `lifetime` from now (backdated 30 s).
    pub fn issue(
        &self,
        public_key: &impl PublicKeyData,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<Issued, IdentityError> {
        let now = OffsetDateTime::now_utc();
        self.issue_between(public_key, id, now - backdate(lifetime), now + lifetime)
    }

    /// [`issue`](Self::issue) valid from `not_before` to `not_after`.
    pub(crate) fn issue_between(
        &self,
        public_key: &impl PublicKeyData,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, IdentityError> {
        self.issue_with_serial(public_key, id, not_before, not_after, random_serial())
    }

    /// [`issue_between`](Self::issue_between) with a given serial.
    pub(crate) fn issue_with_serial(
        &self,
        public_key: &impl PublicKeyData,
        id: &SpiffeId,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        serial: SerialNumber,
    ) -> Result<Issued, IdentityError> {
        let mut params = CertificateParams::default();
        // The subject is not used by SPIFFE; keep it empty so nothing else can be read into it.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(serial.clone());
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(Issued {
            der: cert.der().clone(),
            serial: normalize_serial(serial.as_ref()),
            not_after: params.not_after.unix_timestamp(),
        })
    }

    /// SHA-256 of the public key (DER SubjectPublicKeyInfo) a CSR asks to certify, after its
    /// self-signature is checked.
    pub fn csr_key_sha256(csr_der: &[u8]) -> Result<Vec<u8>, IdentityError> {
        use sha2::Digest;
        let parsed = parse_csr(csr_der)?;
        Ok(sha2::Sha256::digest(parsed.public_key.der_bytes()).to_vec())
    }

    /// Checks a CSR's self-signature and issues an SVID for `id` to its public key only.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<Issued, IdentityError> {
        let parsed = parse_csr(csr_der)?;
        self.issue(&parsed.public_key, id, lifetime)
    }
}

/// A peer's CSR, its self-signature checked. The parser's error may quote the CSR's own
/// bytes (a subject string it refuses, whole): they reach audit records bounded and escaped.
fn parse_csr(csr_der: &[u8]) -> Result<CertificateSigningRequestParams, IdentityError> {
    let csr = CertificateSigningRequestDer::from(csr_der);
    CertificateSigningRequestParams::from_der(&csr)
        .map_err(|e| IdentityError::BadCsr(ewii_common::text::from_peer(e.to_string().as_bytes())))
}

/// 128 random bits with the top bit clear (RFC 5280 §4.1.2.2: positive, at most 20 octets;
/// CA/B BR: at least 64 bits of randomness).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// A fresh ECDSA P-256 key and a CSR for it (the CA ignores everything in it but the key).
pub fn new_key_and_csr() -> Result<(KeyPair, Vec<u8>), IdentityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = csr_for(&key)?;
    Ok((key, csr))
}

/// A CSR for an existing `key` (a renewal asked again with the key of the first ask).
pub fn csr_for(key: &KeyPair) -> Result<Vec<u8>, IdentityError> {
    Ok(CertificateParams::default()
        .serialize_request(key)?
        .der()
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::inspect_leaf;

    #[test]
    fn p7_issued_leaf_carries_only_the_recorded_identity() {
        let ca = Ca::generate("example.org").unwrap();
        // A CSR that asks for a CA certificate, another identity and extra SANs.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut greedy = CertificateParams::new(vec![
            "spiffe://example.org/hub".to_string(),
            "evil.example".to_string(),
        ])
        .unwrap();
        greedy
            .subject_alt_names
            .push(SanType::URI("spiffe://example.org/hub".try_into().unwrap()));
        greedy.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = greedy.serialize_request(&key).unwrap();
        let id = SpiffeId::client("example.org", "acme").unwrap();
        let issued = ca
            .sign_csr(csr.der(), &id, Duration::from_secs(86_400))
            .unwrap();
        let info = inspect_leaf(&issued.der).unwrap();
        assert_eq!(info.id, id);
        assert_eq!(info.serial, issued.serial);
        assert!(info.serial.len() >= 16, "at least 64 bits of serial");
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 1, "exactly one SAN");
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        assert_eq!(info.not_after - info.not_before, 86_400 + 30);
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
    }

    #[test]
    fn a_csr_with_a_broken_signature_is_refused() {
        let ca = Ca::generate("example.org").unwrap();
        let (_, mut csr) = new_key_and_csr().unwrap();
        let last = csr.len() - 1;
        csr[last] ^= 0x01;
        let id = SpiffeId::client("example.org", "acme").unwrap();
        assert!(matches!(
            ca.sign_csr(&csr, &id, Duration::from_secs(60)),
            Err(IdentityError::BadCsr(_))
        ));
    }

    /// A CSR signed by its own key whose subject the parser refuses: the parser's error
    /// quotes the subject whole, and a hostile Client chooses it (64 KiB of line breaks and
    /// right-to-left overrides in an audit record). The refusal keeps it bounded and escaped.
    #[test]
    fn p12_a_hostile_csr_s_own_text_reaches_its_refusal_bounded_and_escaped() {
        use rcgen::{DnType, DnValue, KeyPair, SigningKey, PKCS_ED25519};
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let filler = "x".repeat(30_000);
        let cn = DnValue::PrintableString(filler.clone().try_into().unwrap());
        params.distinguished_name.push(DnType::CommonName, cn);
        let mut der = params.serialize_request(&key).unwrap().der().to_vec();
        // Characters a PrintableString may not hold, in the same bytes, signed again (an
        // Ed25519 signature is 64 bytes whatever it signs: the lengths stay).
        let at = der
            .windows(filler.len())
            .position(|w| w == filler.as_bytes())
            .unwrap();
        let hostile = "@\n\u{202e}".repeat(6_000);
        der[at..at + 30_000].copy_from_slice(hostile.as_bytes());
        // CertificationRequest ::= SEQUENCE { info, algorithm, signature }: the outer header
        // is 4 bytes (a two-byte length), and so is the info's.
        assert_eq!(&der[..2], &[0x30, 0x82]);
        assert_eq!(&der[4..6], &[0x30, 0x82]);
        let info_len = 4 + usize::from(u16::from_be_bytes([der[6], der[7]]));
        let signature = key.sign(&der[4..4 + info_len]).unwrap();
        let end = der.len();
        der[end - 64..].copy_from_slice(&signature);

        let ca = Ca::generate("example.org").unwrap();
        let id = SpiffeId::client("example.org", "acme").unwrap();
        for refused in [
            ca.sign_csr(&der, &id, Duration::from_secs(60)).map(|_| ()),
            Ca::csr_key_sha256(&der).map(|_| ()),
        ] {
            let Err(IdentityError::BadCsr(text)) = refused else {
                panic!("{refused:?}");
            };
            assert!(text.contains("PrintableString"), "{text}");
            // Cut at 512 characters of the peer's (each escaped in a few): 30,000 were sent.
            assert!(text.contains('…'), "{text}");
            assert!(
                text.chars().count() < 8_000,
                "{} chars",
                text.chars().count()
            );
            assert!(!text.contains('\n') && !text.contains('\u{202e}'), "{text}");
        }
    }

    #[test]
    fn ca_roundtrips_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("example.org").unwrap();
        ca.save(dir.path()).unwrap();
        let again = Ca::load(dir.path()).unwrap();
        assert_eq!(again.cert(), ca.cert());
        let (key, _) = new_key_and_csr().unwrap();
        let id = SpiffeId::hub("example.org").unwrap();
        let issued = again.issue(&key, &id, Duration::from_secs(60)).unwrap();
        assert_eq!(inspect_leaf(&issued.der).unwrap().id, id);
    }
}
