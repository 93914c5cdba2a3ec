//! The proof behind `Present`: a Client whose SVIDs come from its own SPIRE shows the Hub, on
//! its live connection, that it holds the key of a newly delivered SVID, so that the session
//! can be re-bound to it without a second connection.
//!
//! The new key signs [`present_message`]: the connection's TLS exporter output
//! ([`PRESENT_EXPORTER_LABEL`]; the same on both ends of this connection and nowhere else, so a
//! proof cannot be replayed on another) and the leaf certificate. Only TLS 1.3 signature
//! schemes are made or accepted ([`SCHEMES`]). Verifying the chain itself is the Hub's
//! handshake verifier's work, run on the presented chain as on a handshake.

use ewii_common::frame::{present_message, PRESENT_EXPORTER_LEN};
use rustls::pki_types::CertificateDer;
use rustls::SignatureScheme;

use super::store::Svid;

pub use ewii_common::frame::PRESENT_EXPORTER_LABEL;

/// The signature schemes a proof may use, as in TLS 1.3 (RFC 8446 §4.2.3: no PKCS#1 v1.5,
/// no SHA-1), in the order the Client prefers them.
pub const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP521_SHA512,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
];

/// Signs the proof for `svid` on the connection whose exporter output is `exporter`:
/// `(scheme, signature)`. An RSA key takes milliseconds: call it off the async workers.
pub fn sign(svid: &Svid, exporter: &[u8; PRESENT_EXPORTER_LEN]) -> Result<(u16, Vec<u8>), String> {
    let leaf = svid.chain.first().ok_or("the SVID has no certificate")?;
    let key = rustls::crypto::ring::sign::any_supported_type(&svid.key())
        .map_err(|e| format!("the SVID's key cannot sign: {e}"))?;
    let signer = key
        .choose_scheme(SCHEMES)
        .ok_or("the SVID's key has no TLS 1.3 signature scheme")?;
    let proof = signer
        .sign(&present_message(exporter, leaf))
        .map_err(|e| format!("signing failed: {e}"))?;
    Ok((u16::from(signer.scheme()), proof))
}

/// Checks that `proof` is the signature of `leaf`'s key over this connection's message.
pub fn verify(
    leaf: &CertificateDer<'_>,
    exporter: &[u8; PRESENT_EXPORTER_LEN],
    scheme: u16,
    proof: &[u8],
) -> Result<(), String> {
    let scheme = SignatureScheme::from(scheme);
    if !SCHEMES.contains(&scheme) {
        return Err(format!("signature scheme {scheme:?} is not accepted"));
    }
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    let candidates = algs
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .map(|(_, a)| *a)
        .ok_or_else(|| format!("signature scheme {scheme:?} is not supported"))?;
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    let message = present_message(exporter, leaf);
    // TLS 1.3 tries the first algorithm of a scheme only; so does this.
    let alg = candidates
        .first()
        .ok_or_else(|| format!("signature scheme {scheme:?} is not supported"))?;
    cert.verify_signature(*alg, &message, proof).map_err(|_| {
        "the proof is not the presented certificate's key's signature for this connection"
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::Ca;

    fn svid(ca: &Ca, name: &str) -> Svid {
        let (key, csr) = crate::identity::ca::new_key_and_csr().unwrap();
        let id = ewii_common::spiffe::SpiffeId::client("example.org", name).unwrap();
        let issued = ca
            .sign_csr(&csr, &id, std::time::Duration::from_secs(3_600))
            .unwrap();
        Svid::new(vec![issued.der], &key)
    }

    #[test]
    fn a_proof_verifies_for_its_certificate_and_connection_only() {
        let ca = Ca::generate("example.org").unwrap();
        let (a, b) = (svid(&ca, "a"), svid(&ca, "b"));
        let here = [7u8; PRESENT_EXPORTER_LEN];
        let (scheme, proof) = sign(&a, &here).unwrap();
        assert_eq!(scheme, u16::from(SignatureScheme::ECDSA_NISTP256_SHA256));
        verify(&a.chain[0], &here, scheme, &proof).unwrap();
        // Another connection (a replay), another certificate, a damaged proof, a scheme
        // TLS 1.3 does not allow: each refused.
        assert!(verify(&a.chain[0], &[8; PRESENT_EXPORTER_LEN], scheme, &proof).is_err());
        assert!(verify(&b.chain[0], &here, scheme, &proof).is_err());
        let mut bent = proof.clone();
        *bent.last_mut().unwrap() ^= 1;
        assert!(verify(&a.chain[0], &here, scheme, &bent).is_err());
        let pkcs1 = u16::from(SignatureScheme::RSA_PKCS1_SHA256);
        assert!(verify(&a.chain[0], &here, pkcs1, &proof)
            .unwrap_err()
            .contains("not accepted"));
        assert!(verify(&a.chain[0], &here, 0xffff, &proof).is_err());
    }
}
