//! CSRs as the Hub receives them in `Enrol` and `Renew`: only a well-signed CSR is certified.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use ewii::identity::ca::Ca;
use libfuzzer_sys::fuzz_target;

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| Ca::generate("fuzz.ewii.local").unwrap())
}

fuzz_target!(|data: &[u8]| {
    let id = "spiffe://fuzz.ewii.local/client/acme".parse().unwrap();
    let signed = ca().sign_csr(data, &id, Duration::from_secs(60));
    let key = Ca::csr_key_sha256(data);
    assert_eq!(signed.is_ok(), key.is_ok(), "sign and key checks disagree");
});
