//! Webhook deliveries as the customer's `verify-webhook` receives them: headers and body,
//! checked against a real key whose private half the fuzzer never sees.
#![no_main]

use std::sync::OnceLock;

use ewii::webhook::{self, WebhookKey};
use libfuzzer_sys::fuzz_target;

fn public_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ewii-fuzz-webhook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = WebhookKey::load_or_create(&dir).unwrap().public();
        let _ = std::fs::remove_dir_all(&dir);
        key
    })
}

fuzz_target!(|data: &[u8]| {
    // Fields split at NUL bytes: id, timestamp, signature header, body; a first field that
    // starts with `whpk_` is used as the key instead (bad keys must be refused too).
    let mut parts: Vec<&[u8]> = data.splitn(5, |b| *b == 0).collect();
    let key = match parts.first() {
        Some(k) if k.starts_with(b"whpk_") => String::from_utf8_lossy(parts.remove(0)).into_owned(),
        _ => public_key().to_owned(),
    };
    let field =
        |i: usize| String::from_utf8_lossy(parts.get(i).copied().unwrap_or_default()).into_owned();
    let (id, ts, sig) = (field(0), field(1), field(2));
    let body = parts.get(3).copied().unwrap_or_default();
    // Without the Hub's private key nothing verifies, whatever the fuzzer sends.
    assert!(webhook::verify(&key, &id, &ts, &sig, body, 1_800_000_000).is_err());
});
