//! Property tests of every decoder that reads bytes from the other side or from the operator,
//! beyond the wire frames (`common/tests/codec_props.rs`): both configuration files, CSRs the
//! Hub signs, certificates the verifiers check, join tokens, webhook headers. Arbitrary and
//! mutated input gets a typed error — never a panic, never an acceptance it should not get.
//! The same inputs are the fuzz targets' (`fuzz/`); these run in every test run.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ewii::config::{ClientConfig, HubConfig};
use ewii::hub::state::{Db, TokenRefusal};
use ewii::identity::ca::{new_key_and_csr, Ca};
use ewii::identity::inspect_leaf;
use ewii::identity::verify::{Bundle, Expect, SpiffeVerifier};
use ewii::webhook::{self, WebhookKey};
use proptest::prelude::*;
use rustls::pki_types::{CertificateDer, UnixTime};

const CLIENT: &str = "hub = \"hub.example.net:443\"\nstate_dir = \"/var/lib/ewii\"\n[[allow]]\nname = \"db\"\naddress = \"10.0.0.5:5432\"\n";
const HUB: &str = "state_dir = \"/var/lib/ewii-hub\"\n[[service]]\nname = \"pg\"\nlisten = \"127.0.0.1:15432\"\nclient = \"acme\"\ndestination = \"db\"\nprincipal = \"ops\"\n";

/// TOML-ish lines that reach past the parser into the checks.
fn toml_line() -> impl Strategy<Value = String> {
    let keys = prop::sample::select(vec![
        "hub",
        "state_dir",
        "audit",
        "audit_format",
        "audit_backlog",
        "on_stop",
        "connect_timeout_ms",
        "max_queries",
        "metrics_file",
        "listen",
        "svid_lifetime_secs",
        "revoke_after_lost_secs",
        "metrics_listen",
        "name",
        "address",
        "client",
        "destination",
        "tls",
        "workloads",
        "principal",
        "layers",
        "require",
        "refresh_secs",
        "initial_ms",
        "max_ms",
    ]);
    let values = prop::sample::select(vec![
        "0",
        "-1",
        "1",
        "18446744073709551616",
        "\"\"",
        "\"x\"",
        "\"127.1:80\"",
        "\"[::]:0\"",
        "\"db..:1\"",
        "true",
        "[]",
        "[\"ebpf\"]",
        "\"file:\"",
        "\"kernel\"",
        "\"ocsf\"",
        "\"0.0.0.0:443\"",
        "{}",
        "1e9",
        "\"\\u0000\"",
    ]);
    let tables = prop::sample::select(vec![
        "",
        "[[allow]]\n",
        "[enforcement]\n",
        "[reconnect]\n",
        "[dns]\n",
        "[[service]]\n",
        "[webhooks]\n",
    ]);
    (tables, keys, values).prop_map(|(t, k, v)| format!("{t}{k} = {v}\n"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn p4_config_files_of_any_text_parse_or_say_why(text in ".{0,400}") {
        let _ = text.parse::<ClientConfig>();
        let _ = text.parse::<HubConfig>();
    }

    #[test]
    fn p4_valid_configs_with_lines_spliced_in_parse_or_say_why(
        lines in prop::collection::vec(toml_line(), 1..6),
        at in 0usize..5,
    ) {
        for base in [CLIENT, HUB] {
            let mut all: Vec<&str> = base.lines().collect();
            let extra = lines.concat();
            all.insert(at.min(all.len()), &extra);
            let text = all.join("\n");
            match text.parse::<ClientConfig>() {
                // Whatever else was spliced in, a Client config never has an entry that was
                // not written as one.
                Ok(c) => prop_assert!(c.allow.entries().all(|e| text.contains(&e.name.to_string()))),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            if let Err(e) = text.parse::<HubConfig>() {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }

    #[test]
    fn p7_arbitrary_csr_bytes_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let ca = ca();
        let id = "spiffe://test.ewii.local/client/acme".parse().unwrap();
        prop_assert!(ca.sign_csr(&bytes, &id, Duration::from_secs(60)).is_err());
        prop_assert!(Ca::csr_key_sha256(&bytes).is_err());
    }

    #[test]
    fn p7_a_csr_with_one_byte_changed_never_certifies_another_key(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let (_, csr) = new_key_and_csr().unwrap();
        let key = Ca::csr_key_sha256(&csr).unwrap();
        let mut bad = csr.clone();
        let i = pos.index(bad.len());
        bad[i] ^= 1 << bit;
        // A change in the signed part breaks the self-signature; in the signature, the same.
        // Either way no certificate for a key the asker does not hold.
        if let Ok(other) = Ca::csr_key_sha256(&bad) {
            prop_assert_eq!(other, key, "byte {} bit {}", i, bit);
        }
    }

    #[test]
    fn p7_arbitrary_certificates_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..800)) {
        prop_assert!(inspect_leaf(&bytes).is_err());
        let (ca, verifier) = ca_and_verifier();
        drop(ca);
        let der = CertificateDer::from(bytes);
        prop_assert!(verifier.verify_chain(&der, &[], UnixTime::now()).is_err());
    }

    #[test]
    fn p7_a_certificate_with_one_byte_changed_is_refused(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let (ca, verifier) = ca_and_verifier();
        let (key, _) = new_key_and_csr().unwrap();
        let id = "spiffe://test.ewii.local/client/acme".parse().unwrap();
        let issued = ca.issue(&key, &id, Duration::from_secs(3600)).unwrap();
        prop_assert!(verifier.verify_chain(&issued.der, &[], UnixTime::now()).is_ok());
        let mut bad = issued.der.to_vec();
        let i = pos.index(bad.len());
        bad[i] ^= 1 << bit;
        let bad = CertificateDer::from(bad);
        prop_assert!(verifier.verify_chain(&bad, &[], UnixTime::now()).is_err(), "byte {} bit {}", i, bit);
    }

    #[test]
    fn p10_webhook_headers_of_any_text_are_refused(
        key in ".{0,60}", id in ".{0,40}", ts in ".{0,20}", sig in ".{0,120}",
        body in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        prop_assert!(webhook::verify(&key, &id, &ts, &sig, &body, 1_800_000_000).is_err());
    }

    #[test]
    fn p10_a_signed_delivery_with_anything_changed_is_refused(
        which in 0usize..3, pos in any::<prop::sample::Index>(), bit in 0u8..8,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let key = WebhookKey::load_or_create(dir.path()).unwrap();
        let (id, ts, body) = ("msg_1".to_string(), 1_800_000_000i64, b"{\"a\":1}".to_vec());
        let sig = key.sign(&id, ts, &body);
        prop_assert!(webhook::verify(&key.public(), &id, &ts.to_string(), &sig, &body, ts).is_ok());
        let mut parts = [id.into_bytes(), ts.to_string().into_bytes(), body];
        let part = &mut parts[which];
        let i = pos.index(part.len());
        part[i] ^= 1 << bit;
        let [id, ts, body] = parts;
        let (id, ts) = (String::from_utf8_lossy(&id), String::from_utf8_lossy(&ts));
        prop_assert!(webhook::verify(&key.public(), &id, &ts, &sig, &body, 1_800_000_000).is_err());
    }

    #[test]
    fn p7_tokens_of_any_text_redeem_nothing(token in ".{0,120}") {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("hub.db")).unwrap();
        db.add_token("ewii_real", "acme", i64::MAX, None, 0).unwrap();
        prop_assume!(token != "ewii_real");
        prop_assert!(matches!(db.redeem_token(&token, 1), Ok(Err(TokenRefusal::UnknownOrUsed))));
        // The real one still works, once.
        prop_assert!(matches!(db.redeem_token("ewii_real", 1), Ok(Ok(_))));
        prop_assert!(matches!(db.redeem_token("ewii_real", 1), Ok(Err(TokenRefusal::UnknownOrUsed))));
    }
}

fn ca() -> Ca {
    Ca::generate("test.ewii.local").unwrap()
}

fn ca_and_verifier() -> (Ca, SpiffeVerifier) {
    let ca = ca();
    let verifier = SpiffeVerifier::new(
        Bundle::new(vec![ca.cert().clone()]),
        "test.ewii.local",
        Expect::Client,
    );
    (ca, verifier)
}
