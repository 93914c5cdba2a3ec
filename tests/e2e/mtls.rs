//! Mutual TLS on every connection (P5, P7): each side refuses what it must, and the refusal is
//! asserted on the side that refuses — in TLS 1.3 the client's handshake "succeeds" before the
//! server has checked the client certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ewii::identity::store::{self, Svid};
use ewii::identity::verify::{Bundle, Expect, SpiffeVerifier};
use ewii::transport;
use ewii_common::audit::{AuditRecord, Event, Outcome};
use ewii_common::frame::{self, Control};
use ewii_tests::*;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

/// The test Hub's CA as an rcgen issuer, to mint deliberately bad certificates.
fn hub_ca(hub: &TestHub) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let dir = hub.state_dir();
    let cert = store::read_certs(&dir.join("ca.pem")).unwrap().remove(0);
    let key = store::read_key_pair(&dir.join("ca.key")).unwrap();
    let issuer = Issuer::from_ca_cert_der(&cert, key).unwrap();
    (cert, issuer)
}

struct LeafSpec<'a> {
    uris: &'a [&'a str],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// Which of an SVID's required extensions a test leaves out or narrows.
#[derive(Clone, Copy, PartialEq)]
enum Flaw {
    NoEku,
    NoKeyUsage,
    NoBasicConstraints,
    ClientAuthOnly,
}

fn flawed_leaf(issuer: &Issuer<'_, KeyPair>, spec: &LeafSpec<'_>, flaw: Flaw) -> Svid {
    let mut p = params(spec);
    match flaw {
        Flaw::NoEku => p.extended_key_usages = Vec::new(),
        Flaw::NoKeyUsage => p.key_usages = Vec::new(),
        Flaw::NoBasicConstraints => p.is_ca = IsCa::NoCa,
        Flaw::ClientAuthOnly => p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    Svid::new(vec![cert.der().clone()], &key)
}

impl<'a> LeafSpec<'a> {
    fn valid(uris: &'a [&'a str]) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            uris,
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(3600),
        }
    }
}

fn params(spec: &LeafSpec<'_>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = spec
        .uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.not_before = spec.not_before;
    p.not_after = spec.not_after;
    p
}

fn signed_leaf(issuer: &Issuer<'_, KeyPair>, spec: &LeafSpec<'_>) -> Svid {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params(spec).signed_by(&key, issuer).unwrap();
    Svid::new(vec![cert.der().clone()], &key)
}

async fn assert_hub_refuses(hub: &TestHub, svid: &Svid, reason_contains: &str) -> AuditRecord {
    assert!(
        raw_session(hub, svid).await.is_none(),
        "the Hub must not welcome this SVID"
    );
    let r = hub
        .wait_audit("handshake_refused", |r| {
            r.event == Event::HandshakeRefused
                && r.reason
                    .as_deref()
                    .is_some_and(|x| x.contains(reason_contains))
        })
        .await;
    assert_eq!(r.outcome, Some(Outcome::Refused));
    assert!(hub.handle().connected_clients().is_empty());
    r
}

#[tokio::test]
async fn p7_hub_refuses_an_expired_svid() {
    let hub = TestHub::start(&[]).await;
    let (_, ca) = hub_ca(&hub);
    let now = OffsetDateTime::now_utc();
    let svid = signed_leaf(
        &ca,
        &LeafSpec {
            uris: &["spiffe://test.ewii.local/client/acme"],
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        },
    );
    assert_hub_refuses(&hub, &svid, "Expired").await;
}

#[tokio::test]
async fn p7_hub_refuses_an_svid_from_another_trust_domain() {
    let hub = TestHub::start(&[]).await;
    let (_, ca) = hub_ca(&hub);
    let svid = signed_leaf(
        &ca,
        &LeafSpec::valid(&["spiffe://other.example/client/acme"]),
    );
    assert_hub_refuses(&hub, &svid, "is not in trust domain test.ewii.local").await;
}

#[tokio::test]
async fn p7_hub_refuses_an_svid_with_two_uri_sans() {
    let hub = TestHub::start(&[]).await;
    let (_, ca) = hub_ca(&hub);
    let svid = signed_leaf(
        &ca,
        &LeafSpec::valid(&[
            "spiffe://test.ewii.local/client/acme",
            "spiffe://test.ewii.local/hub",
        ]),
    );
    assert_hub_refuses(&hub, &svid, "2 URI SANs, need exactly one").await;
}

#[tokio::test]
async fn p7_hub_refuses_a_self_signed_svid() {
    let hub = TestHub::start(&[]).await;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params(&LeafSpec::valid(&["spiffe://test.ewii.local/client/acme"]))
        .self_signed(&key)
        .unwrap();
    let svid = Svid::new(vec![cert.der().clone()], &key);
    let r = assert_hub_refuses(&hub, &svid, "UnknownIssuer").await;
    // Anyone can claim acme's ID in a certificate of their own: the record does not name acme
    // as its `client` (a SIEM would count it against acme), it says what was claimed.
    assert_eq!(r.client, None, "{r:?}");
    assert!(
        r.reason.as_deref().is_some_and(|x| x
            .ends_with("(the certificate claims spiffe://test.ewii.local/client/acme, unproven)")),
        "{r:?}"
    );
}

/// A stranger's certificate may claim a SPIFFE ID of 2,048 bytes: its record quotes it
/// bounded, as every peer's words are (docs/audit.md), not whole in each refusal's line, also
/// where the refusal's detail names it.
#[tokio::test]
async fn p7_p12_a_strangers_long_claimed_id_is_bounded_in_the_refusals_record() {
    let hub = TestHub::start(&[]).await;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let long = format!("spiffe://test.ewii.local/client/{}", "a".repeat(1_900));
    let cert = params(&LeafSpec::valid(&[long.as_str()]))
        .self_signed(&key)
        .unwrap();
    let svid = Svid::new(vec![cert.der().clone()], &key);
    let r = assert_hub_refuses(&hub, &svid, "UnknownIssuer").await;
    let reason = r.reason.unwrap();
    assert!(reason.len() < 1_100, "{} bytes: {reason}", reason.len());
    assert!(
        reason.ends_with(&format!(
            "(the certificate claims {}…, unproven)",
            &long[..ewii_common::text::PEER_TEXT_MAX]
        )),
        "{reason}"
    );

    // Refused for its trust domain before its chain is checked (this Hub's trust domains are
    // known): a detail that names the ID names it bounded, and says the rest whole.
    let (_, ca) = hub_ca(&hub);
    let other = format!("spiffe://other.example/client/{}", "b".repeat(1_900));
    let svid = signed_leaf(&ca, &LeafSpec::valid(&[other.as_str()]));
    let r = assert_hub_refuses(&hub, &svid, "is not in trust domain test.ewii.local").await;
    let cut = format!("{}…", &other[..ewii_common::text::PEER_TEXT_MAX]);
    assert_eq!(
        r.reason.as_deref(),
        Some(format!(
            "{cut} is not in trust domain test.ewii.local nor in a federated one (the certificate claims {cut}, unproven)"
        ).as_str())
    );
    assert_eq!(r.client, None, "unproven");
}

#[tokio::test]
async fn p7_hub_refuses_a_well_formed_svid_it_never_issued() {
    // Signed by the right CA with the right shape: only the Hub's serial records stop it.
    let hub = TestHub::start(&[]).await;
    let (_, ca) = hub_ca(&hub);
    let svid = signed_leaf(
        &ca,
        &LeafSpec::valid(&["spiffe://test.ewii.local/client/acme"]),
    );
    assert_hub_refuses(&hub, &svid, "was not issued by this Hub").await;
}

#[tokio::test]
async fn p7_hub_refuses_a_ca_certificate_as_a_client() {
    let hub = TestHub::start(&[]).await;
    let (_, ca) = hub_ca(&hub);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = params(&LeafSpec::valid(&["spiffe://test.ewii.local/client/acme"]));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    let cert = p.signed_by(&key, &ca).unwrap();
    let svid = Svid::new(vec![cert.der().clone()], &key);
    assert_hub_refuses(&hub, &svid, "CaUsedAsEndEntity").await;
}

/// A fake Hub: a QUIC server presenting `svid`, offering only `suites`.
async fn fake_hub(
    svid: Svid,
    provider: rustls::crypto::CryptoProvider,
    trusted: Vec<CertificateDer<'static>>,
) -> (SocketAddr, quinn::Endpoint) {
    // Trusts the real CA: a Client it is given is accepted in every respect but the one a
    // test changes (the provider, or the server's own certificate).
    let verifier = SpiffeVerifier::new(Bundle::new(trusted), TD, Expect::Client).optional();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(svid.chain.clone(), svid.key())
        .unwrap();
    tls.alpn_protocols = vec![frame::ALPN.to_vec()];
    let initial = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .and_then(|s| s.quic_suite())
        .unwrap();
    let quic =
        quinn::crypto::rustls::QuicServerConfig::with_initial(Arc::new(tls), initial).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(quic)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            // Drive the handshake and, when it completes, answer Hello with Welcome: a
            // session that comes up proves the handshake was acceptable to the Client.
            tokio::spawn(async move {
                let Ok(c) = incoming.await else { return };
                if let Ok((mut send, mut recv)) = c.accept_bi().await {
                    let mut reader = transport::FrameReader::new();
                    if let Ok(Some(Control::Hello { .. })) = reader.read::<Control>(&mut recv).await
                    {
                        let welcome = Control::Welcome {
                            session_id: 7,
                            hub_time_us: 0,
                            limits: frame::Limits {
                                max_concurrent_queries: 16,
                                idle_timeout_ms: 3000,
                            },
                        };
                        let _ = transport::write_frame(&mut send, &welcome).await;
                    }
                }
                let _ = c.closed().await;
            });
        }
    });
    (addr, endpoint)
}

#[tokio::test]
async fn p7_client_refuses_a_hub_with_the_wrong_spiffe_id() {
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    // A server holding a perfectly valid SVID from the same CA — but not the Hub's ID.
    let (_, ca) = hub_ca(&hub);
    let impostor = signed_leaf(
        &ca,
        &LeafSpec::valid(&["spiffe://test.ewii.local/workload/evil"]),
    );
    let (addr, _endpoint) = fake_hub(impostor, transport::provider(), vec![hub_ca(&hub).0]).await;
    client.config.hub = addr.to_string().parse().unwrap();
    client.start();
    let r = client
        .wait_audit("handshake_refused", is(Event::HandshakeRefused))
        .await;
    assert_eq!(
        r.reason.as_deref(),
        Some("spiffe://test.ewii.local/workload/evil is not a Hub identity")
    );
    assert_eq!(
        r.client.as_deref(),
        Some("spiffe://test.ewii.local/workload/evil")
    );
    assert!(client
        .audit
        .records()
        .iter()
        .all(|r| r.event != Event::SessionUp));
    // The dial's own record: refused (by this side's check of the Hub), not a network failure.
    let failed = client
        .wait_audit("session_failed", is(Event::SessionFailed))
        .await;
    assert_eq!(failed.outcome, Some(Outcome::Refused), "{failed:?}");
    assert_eq!(failed.peer, Some(addr.to_string()));
    assert!(
        failed
            .reason
            .as_deref()
            .is_some_and(|s| s.contains("invalid peer certificate")),
        "{failed:?}"
    );
    client.stop().await;
}

fn aes_only_provider() -> rustls::crypto::CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    p
}

#[tokio::test]
async fn p5_hub_refuses_a_client_that_offers_no_chacha20_poly1305() {
    let hub = TestHub::start(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let (ca, _) = hub_ca(&hub);
    let verifier = SpiffeVerifier::new(Bundle::new(vec![ca]), TD, Expect::Hub);
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(aes_only_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(svid.chain.clone(), svid.key())
        .unwrap();
    tls.alpn_protocols = vec![frame::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let res = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(quic)),
            hub.addr,
            "127.0.0.1",
        )
        .unwrap()
        .await;
    // TLS alert handshake_failure (40) carried as QUIC CRYPTO_ERROR 0x100 + 40 (RFC 9001 §4.8).
    match res {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            assert_eq!(u64::from(close.error_code), 0x128, "{close:?}");
        }
        other => panic!("the Hub must refuse a peer without ChaCha20-Poly1305: {other:?}"),
    }
    assert!(hub.handle().connected_clients().is_empty());
    // On record, though no certificate was refused (the verifier never ran).
    let r = hub
        .wait_audit("the refusal on record", |r| {
            r.event == Event::HandshakeRefused
                && r.reason
                    .as_deref()
                    .is_some_and(|s| s.starts_with("TLS handshake refused"))
        })
        .await;
    assert!(r.peer.is_some(), "{r:?}");
}

/// A peer speaking another protocol (here HTTP/3's ALPN) is refused in the TLS handshake, and
/// the refusal is on record like any other handshake refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_a_peer_with_another_alpn_is_refused_and_audited() {
    let hub = TestHub::start(&[]).await;
    let (ca, _) = hub_ca(&hub);
    let verifier = SpiffeVerifier::new(Bundle::new(vec![ca]), TD, Expect::Hub);
    // Ewii's own client settings, but HTTP/3's ALPN.
    let tls = transport::tls_client_config(None, Arc::new(verifier), b"h3").unwrap();
    let quic = transport::quic_client_config(tls, 0, transport::STREAM_WINDOW).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let res = endpoint
        .connect_with(quic, hub.addr, "127.0.0.1")
        .unwrap()
        .await;
    assert!(res.is_err(), "an h3 peer got a connection");
    hub.wait_audit("the refusal on record", |r| {
        r.event == Event::HandshakeRefused
            && r.reason
                .as_deref()
                .is_some_and(|s| s.starts_with("TLS handshake refused"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_client_refuses_a_hub_that_offers_no_chacha20_poly1305() {
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    // The real Hub identity, trusting the real CA: with Ewii's own provider (ChaCha20-Poly1305
    // only) the Client's session comes up, so the suite is the only thing the next one changes.
    let hub_svid = || Svid::load(&hub.state_dir(), "hub.pem", "hub.key").unwrap();
    let ca = vec![hub_ca(&hub).0];
    let (good, _good_endpoint) = fake_hub(hub_svid(), transport::provider(), ca.clone()).await;
    client.config.hub = good.to_string().parse().unwrap();
    client.start();
    client
        .wait_audit("a session with a ChaCha20 Hub", is(Event::SessionUp))
        .await;
    client.stop().await;

    // The same server speaking only AES-GCM.
    let (addr, _endpoint) = fake_hub(hub_svid(), aes_only_provider(), ca).await;
    client.config.hub = addr.to_string().parse().unwrap();
    client.start();
    let dir = client.state_dir();
    let read = || ewii::client::status::Status::read(&dir).ok();
    poll_until("two failed dials", SOON, || {
        read().is_some_and(|s| s.failures >= 2)
    })
    .await;
    let status = read().unwrap();
    // The server found no suite in common with what the Client offers (ChaCha20-Poly1305
    // alone) and aborted with TLS alert 40, handshake_failure (RFC 8446 §6.2; QUIC crypto
    // error 0x128, RFC 9001 §4.8). Nothing else differs from the Hub that gave a session.
    assert_eq!(
        status.last_error.as_deref(),
        Some(
            format!(
                "handshake with {addr}: aborted by peer: the cryptographic handshake failed: error 40: peer is incompatible: NoCipherSuitesInCommon"
            )
            .as_str()
        ),
        "{status:?}"
    );
    assert_eq!(
        count_ups(&client),
        1,
        "only the ChaCha20 Hub gave a session"
    );
    // Each refused dial is on record as the Hub's refusal, with its words.
    let refused: Vec<_> = client
        .audit
        .records()
        .into_iter()
        .filter(|r| r.event == Event::SessionFailed)
        .collect();
    assert!(refused.len() >= 2, "{refused:?}");
    for r in &refused {
        assert_eq!(r.outcome, Some(Outcome::Refused), "{r:?}");
        assert_eq!(r.peer, Some(addr.to_string()), "{r:?}");
        assert!(
            r.reason
                .as_deref()
                .is_some_and(|s| s.ends_with("NoCipherSuitesInCommon")),
            "{r:?}"
        );
    }
    client.stop().await;
}

fn count_ups(client: &TestClient) -> usize {
    client
        .audit
        .records()
        .iter()
        .filter(|r| r.event == Event::SessionUp)
        .count()
}

/// The verifiers' leaf rules (DESIGN §5), each tested both ways: a Client SVID without
/// extendedKeyUsage, without keyUsage or without basicConstraints is refused by the Hub with
/// that reason (before any serial lookup); the well-formed one passes the same checks.
#[tokio::test]
async fn p7_hub_refuses_client_leaves_missing_eku_ku_or_basic_constraints() {
    let hub = TestHub::start(&[]).await;
    let (_, ca) = hub_ca(&hub);
    let acme = ["spiffe://test.ewii.local/client/acme"];
    for (flaw, reason) in [
        (
            Flaw::NoEku,
            "no extendedKeyUsage with clientAuth or serverAuth",
        ),
        (Flaw::NoKeyUsage, "key usage must have digitalSignature"),
        (
            Flaw::NoBasicConstraints,
            "lacks explicit basicConstraints cA=false",
        ),
    ] {
        let svid = flawed_leaf(&ca, &LeafSpec::valid(&acme), flaw);
        assert_hub_refuses(&hub, &svid, reason).await;
    }
    // The same leaf without the flaw gets past every structural rule: what stops it is the
    // serial check (the Hub never issued it).
    let good = signed_leaf(&ca, &LeafSpec::valid(&acme));
    assert_hub_refuses(&hub, &good, "was not issued by this Hub").await;
}

/// The Client's side: a Hub certificate that expired, or whose extendedKeyUsage allows only
/// clientAuth, is refused; the Hub's real certificate from the same CA is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p15_client_refuses_an_expired_or_client_only_hub_certificate() {
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let (ca_cert, ca) = hub_ca(&hub);
    let hub_id = ["spiffe://test.ewii.local/hub"];
    let now = OffsetDateTime::now_utc();
    let expired = signed_leaf(
        &ca,
        &LeafSpec {
            uris: &hub_id,
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        },
    );
    let client_only = flawed_leaf(&ca, &LeafSpec::valid(&hub_id), Flaw::ClientAuthOnly);
    for (svid, reason) in [
        (expired, "chain: Expired"),
        (client_only, "chain: RequiredEkuNotFound"),
    ] {
        let (addr, _endpoint) = fake_hub(svid, transport::provider(), vec![ca_cert.clone()]).await;
        client.config.hub = addr.to_string().parse().unwrap();
        client.start();
        let r = client
            .wait_audit("handshake_refused", |r| {
                r.event == Event::HandshakeRefused
                    && r.reason.as_deref().is_some_and(|x| x.starts_with(reason))
            })
            .await;
        assert_eq!(r.outcome, Some(Outcome::Refused));
        client.stop().await;
    }
    assert_eq!(count_ups(&client), 0);
    // The real Hub certificate from the same CA is accepted.
    client.config.hub = hub.addr.to_string().parse().unwrap();
    client.start();
    hub.wait_connected("acme").await;
    client.stop().await;
}
