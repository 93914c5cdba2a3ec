//! Certificates as a verifier receives them in a handshake.
#![no_main]

use std::sync::OnceLock;

use ewii::identity::ca::Ca;
use ewii::identity::inspect_leaf;
use ewii::identity::verify::{Bundle, Expect, SpiffeVerifier};
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::{CertificateDer, UnixTime};

fn verifier() -> &'static SpiffeVerifier {
    static V: OnceLock<SpiffeVerifier> = OnceLock::new();
    V.get_or_init(|| {
        let ca = Ca::generate("fuzz.ewii.local").unwrap();
        SpiffeVerifier::new(
            Bundle::new(vec![ca.cert().clone()]),
            "fuzz.ewii.local",
            Expect::Client,
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = inspect_leaf(data);
    let der = CertificateDer::from(data);
    // Nothing the fuzzer can make is signed by a CA whose key it never saw.
    assert!(verifier().verify_chain(&der, &[], UnixTime::now()).is_err());
});
