//! Enrolment (P7 issuance): one-time tokens, expiry, and the bundle pin checked before the
//! token leaves the Client.

use std::time::Duration;

use ewii::audit::{Audit, AuditOutput};
use ewii::client::enrol::{enrol, EnrolError};
use ewii::hub::admin;
use ewii::hub::state::Db;
use ewii::identity::{inspect_leaf, parse_bundle_hash, store};
use ewii_common::audit::{Event, Outcome, Side};
use ewii_common::spiffe::SpiffeId;
use ewii_tests::*;

fn client_audit() -> Audit {
    Audit::open_with_tap(Side::Client, &AuditOutput::Discard).unwrap()
}

#[tokio::test]
async fn p7_valid_token_issues_a_working_24h_svid_with_a_private_key() {
    let hub = TestHub::start(&[Service::tcp("svc", "acme", "db")]).await;
    let echo = echo_server().await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    let dir = client.state_dir();
    let svid = store::read_certs(&dir.join(store::SVID_CERT)).unwrap();
    let info = inspect_leaf(&svid[0]).unwrap();
    assert_eq!(info.id, SpiffeId::client(TD, "acme").unwrap());
    assert_eq!(
        info.not_after - info.not_before,
        86_400 + 30,
        "24 h, backdated 30 s"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join(store::SVID_KEY))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is private");
    let enrolled = hub.wait_audit("enrolled", is(Event::Enrolled)).await;
    assert_eq!(
        enrolled.client.as_deref(),
        Some("spiffe://test.ewii.local/client/acme")
    );
    assert_eq!(enrolled.reason, Some(format!("serial {}", info.serial)));
    // The SVID works: a session comes up.
    client.start();
    hub.wait_connected("acme").await;
    client.stop().await;
}

#[tokio::test]
async fn p7_a_token_works_once() {
    let hub = TestHub::start(&[]).await;
    let token = hub.token("acme", Duration::from_secs(600));
    let pin = parse_bundle_hash(&token.bundle_hash).unwrap();
    let hub_addr = hub.addr.to_string().parse().unwrap();
    let first = tempfile::tempdir().unwrap();
    enrol(&hub_addr, &token.token, pin, first.path(), &client_audit())
        .await
        .unwrap();
    let second = tempfile::tempdir().unwrap();
    let again = enrol(&hub_addr, &token.token, pin, second.path(), &client_audit()).await;
    assert!(matches!(again, Err(EnrolError::Refused)), "{again:?}");
    assert!(!second.path().join(store::SVID_CERT).exists());
    let refused = hub
        .wait_audit("enrolment_refused", is(Event::EnrolmentRefused))
        .await;
    assert_eq!(refused.reason.as_deref(), Some("unknown or used token"));
    assert_eq!(refused.outcome, Some(Outcome::Refused));
}

#[tokio::test]
async fn p7_an_expired_token_is_refused_with_the_same_answer() {
    let hub = TestHub::start(&[]).await;
    // A token whose TTL ran out a second ago, written the way `token create` writes it.
    let db = Db::open(&hub.state_dir().join(admin::DB_FILE)).unwrap();
    let now = ewii::now_timestamp().unix_secs() as i64;
    db.add_token("ewii_expired", "acme", now - 1, None, now - 3601)
        .unwrap();
    let pin = admin::current_bundle_hash(&hub.state_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let res = enrol(
        &hub.addr.to_string().parse().unwrap(),
        "ewii_expired",
        parse_bundle_hash(&pin).unwrap(),
        dir.path(),
        &client_audit(),
    )
    .await;
    assert!(matches!(res, Err(EnrolError::Refused)), "{res:?}");
    let refused = hub
        .wait_audit("enrolment_refused", is(Event::EnrolmentRefused))
        .await;
    assert_eq!(refused.reason.as_deref(), Some("expired token"));
}

/// An enrolment that never reached a Hub (its name does not resolve) is on record as failed,
/// not refused: a SIEM rule on refused enrolments (a bad or stolen token) does not fire for a
/// network that was down.
#[tokio::test]
async fn p11_an_enrolment_that_reaches_no_hub_is_recorded_as_failed_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let audit = client_audit();
    // `.invalid` never resolves (RFC 6761 §6.4).
    let res = enrol(
        &"hub.invalid:443".parse().unwrap(),
        "ewii_jt_0000",
        [0x42u8; 32],
        dir.path(),
        &audit,
    )
    .await;
    assert!(matches!(res, Err(EnrolError::Resolve(_))), "{res:?}");
    let r = wait_audit(&audit, "enrolment_refused", is(Event::EnrolmentRefused)).await;
    assert_eq!(r.outcome, Some(Outcome::Failed), "{r:?}");
    assert_eq!(r.peer.as_deref(), Some("hub.invalid:443"));
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|s| s.starts_with("cannot resolve the Hub hub.invalid:443: ")),
        "{r:?}"
    );
}

#[tokio::test]
async fn p7_a_client_pinned_to_another_bundle_aborts_before_sending_the_token() {
    let hub = TestHub::start(&[]).await;
    let token = hub.token("acme", Duration::from_secs(600));
    let wrong_pin = [0x42u8; 32];
    let dir = tempfile::tempdir().unwrap();
    let audit = client_audit();
    let res = enrol(
        &hub.addr.to_string().parse().unwrap(),
        &token.token,
        wrong_pin,
        dir.path(),
        &audit,
    )
    .await;
    assert!(matches!(res, Err(EnrolError::HubNotTrusted(_))), "{res:?}");
    let refused = wait_audit(&audit, "enrolment_refused", is(Event::EnrolmentRefused)).await;
    assert_eq!(refused.outcome, Some(Outcome::Refused), "this side said no");
    assert!(refused.reason.unwrap().contains("the token was NOT sent"));
    // The Hub never saw an enrolment request, and the token is still unused: it works now.
    assert!(hub
        .audit
        .records()
        .iter()
        .all(|r| r.event != Event::EnrolmentRefused && r.event != Event::Enrolled));
    let ok = enrol(
        &hub.addr.to_string().parse().unwrap(),
        &token.token,
        parse_bundle_hash(&token.bundle_hash).unwrap(),
        dir.path(),
        &client_audit(),
    )
    .await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn enrolling_twice_into_one_state_dir_is_refused() {
    let hub = TestHub::start(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let token = hub.token("acme", Duration::from_secs(600));
    let res = enrol(
        &hub.addr.to_string().parse().unwrap(),
        &token.token,
        parse_bundle_hash(&token.bundle_hash).unwrap(),
        &client.state_dir(),
        &client_audit(),
    )
    .await;
    assert!(
        matches!(res, Err(EnrolError::AlreadyEnrolled(_))),
        "{res:?}"
    );
}

/// Bounded peers (issue 9 §4): after ten refused enrolments (bad tokens) from one address in
/// a minute, its further enrolments are refused unread — a valid token included, which stays
/// unused — and audited as throttled; a Client with an SVID from the same address still opens
/// its session, and the operator's valid token works from elsewhere once the window ends.
#[tokio::test]
async fn p8_bad_tokens_from_one_address_throttle_its_enrolments_and_not_its_sessions() {
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tcp("svc", "acme", "db")]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    let good = hub.token("beta", Duration::from_secs(600));
    let pin = parse_bundle_hash(&good.bundle_hash).unwrap();
    let hub_addr = hub.addr.to_string().parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for i in 0..10 {
        let bad = format!("ewii_{i:064x}");
        let err = enrol(&hub_addr, &bad, pin, dir.path(), &client_audit())
            .await
            .unwrap_err();
        assert!(matches!(err, EnrolError::Refused), "{err}");
    }
    let err = enrol(&hub_addr, &good.token, pin, dir.path(), &client_audit())
        .await
        .unwrap_err();
    assert!(matches!(err, EnrolError::Refused), "{err}");
    let r = hub
        .wait_audit("throttled", |r| {
            r.event == Event::EnrolmentRefused
                && r.reason
                    .as_deref()
                    .is_some_and(|x| x.starts_with("throttled"))
        })
        .await;
    assert_eq!(r.outcome, Some(Outcome::Refused));
    assert_eq!(
        r.reason.as_deref(),
        Some("throttled: 10 refused enrolments from 127.0.0.1 in the last minute")
    );
    // Refused unread: the valid token was not redeemed.
    let db = Db::open(&hub.state_dir().join("hub.db")).unwrap();
    assert_eq!(
        db.tokens().unwrap().len(),
        1,
        "the valid token is still unused"
    );
    // Sessions from the same address are not throttled.
    client.start();
    hub.wait_connected("acme").await;
    client.stop().await;
}

/// A QUIC connection to `hub` on the enrolment ALPN, as `ewii-client enroll` opens it (no
/// SVID; the Hub's certificate checked against its CA): what the test sends on it is its own.
/// `window`: the bytes of unread answer the caller grants the Hub.
async fn raw_enrolment(hub: &TestHub, window: u32) -> quinn::Connection {
    raw_enrolment_with(hub, window, None, "127.0.0.1:0").await
}

/// [`raw_enrolment`] with `transport` in place of Ewii's transport settings, when given,
/// from a socket bound to `from`.
async fn raw_enrolment_with(
    hub: &TestHub,
    window: u32,
    transport: Option<quinn::TransportConfig>,
    from: &str,
) -> quinn::Connection {
    try_raw_enrolment(hub, window, transport, from)
        .await
        .unwrap()
}

/// [`raw_enrolment_with`], or how the Hub refused the connection.
async fn try_raw_enrolment(
    hub: &TestHub,
    window: u32,
    transport: Option<quinn::TransportConfig>,
    from: &str,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    use ewii::identity::verify::{Bundle, Expect, SpiffeVerifier};
    let ca = store::read_certs(&hub.state_dir().join("ca.pem")).unwrap();
    let verifier = SpiffeVerifier::new(Bundle::new(ca), TD, Expect::Hub);
    let tls = ewii::transport::tls_client_config(
        None,
        std::sync::Arc::new(verifier),
        ewii_common::frame::ENROLL_ALPN,
    )
    .unwrap();
    let mut quic = ewii::transport::quic_client_config(tls, 1, window).unwrap();
    if let Some(transport) = transport {
        quic.transport_config(std::sync::Arc::new(transport));
    }
    let endpoint = ewii::transport::endpoint(from.parse().unwrap(), None).unwrap();
    endpoint
        .connect_with(quic, hub.addr, "localhost")
        .unwrap()
        .await
}

/// The Hub's `enrolment_refused` says `refused` for its decisions (a token it does not take, a
/// bad CSR) and `failed` for an enrolment that never got that far, as the Client's does: here a
/// caller that opens the enrolment stream and closes its connection without a request. Its
/// close reason reaches the record bounded and escaped.
#[tokio::test]
async fn p11_an_enrolment_the_caller_broke_off_is_failed_on_the_hub_not_refused() {
    let hub = TestHub::start(&[]).await;
    let conn = raw_enrolment(&hub, 1 << 20).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // One byte, so that the Hub sees the stream; then gone, with a line break in the reason.
    send.write_all(&[0]).await.unwrap();
    conn.close(0u32.into(), b"gone\nforged");
    let r = hub
        .wait_audit("enrolment_refused", is(Event::EnrolmentRefused))
        .await;
    assert_eq!(r.outcome, Some(Outcome::Failed), "{r:?}");
    let reason = r.reason.unwrap_or_default();
    assert!(
        reason.contains("gone\\u{a}forged") && !reason.contains('\n'),
        "{reason}"
    );
}

/// P14 against strangers who hold the Hub's handshake bound: two enrolment connections from
/// another host (127.0.0.2) that never send their request hold both places (the bound is 2
/// here, the request's wait a minute), and a third stranger is refused. A Client whose session
/// came from 127.0.0.1 loses its connection and comes back all the same, after a Retry,
/// from the places kept for hosts sessions came from. It used to be refused until the
/// strangers let go (and, held long enough, revoked by the grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p14_a_client_comes_back_past_strangers_holding_the_handshake_bound() {
    let limits = ewii::hub::admission::Limits {
        handshakes: 2,
        per_address: 2,
        enrol_request: Duration::from_secs(60),
        ..Default::default()
    };
    let hub = TestHub::start_with_limits(&[], limits).await;
    let mut client = TestClient::enrol_and_run(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    hub.wait_connected("acme").await;
    let held = [
        raw_enrolment_with(&hub, 1 << 20, None, "127.0.0.2:0").await,
        raw_enrolment_with(&hub, 1 << 20, None, "127.0.0.2:0").await,
    ];
    // The bound is held: another stranger gets nowhere.
    let refused = tokio::time::timeout(SOON, try_raw_enrolment(&hub, 1 << 20, None, "127.0.0.3:0"))
        .await
        .expect("the third stranger is answered");
    assert!(
        matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(ref c)) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED),
        "{refused:?}"
    );
    // The Client's connection ends (a stop without a revoke), and it dials again.
    client.stop().await;
    let retries = hub.handle().retries_sent();
    client.start();
    poll_until("the Client's second session_up", SOON, || {
        hub.audit
            .records()
            .iter()
            .filter(|r| r.event == Event::SessionUp)
            .count()
            >= 2
    })
    .await;
    hub.wait_connected("acme").await;
    // Past the bound: its address proven by a Retry, while the strangers still held it.
    assert!(hub.handle().retries_sent() > retries);
    for conn in &held {
        assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    }
    client.stop().await;
}

/// A token redeemed is on record as `enrolled`, with the identity it made, however long its
/// answer then takes: the Hub bounds the request's arrival (10 s), not what follows it. A
/// caller whose request arrives in time and that then holds its connection open (the Hub
/// waits up to 2 s for its close, longer than the 1 s request bound set here) must not leave
/// an SVID issued with a refusal ("timed out") on record, nor an address throttled for it
/// (P11). No sleep: the Hub's own wait for the close outlasts the bound.
#[tokio::test]
async fn p11_a_token_redeemed_is_on_record_also_when_its_answer_outlasts_the_request_bound() {
    let limits = ewii::hub::admission::Limits {
        enrol_request: Duration::from_secs(1),
        ..Default::default()
    };
    let hub = TestHub::start_with_limits(&[], limits).await;
    let token = hub.token("acme", Duration::from_secs(600));
    let (_key, csr) = ewii::identity::ca::new_key_and_csr().unwrap();
    let conn = raw_enrolment(&hub, 1 << 20).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let request = ewii_common::frame::Enrol::Request {
        token: token.token.clone(),
        csr,
    };
    ewii::transport::write_frame(&mut send, &request)
        .await
        .unwrap();
    let _ = send.finish();
    let r = hub
        .wait_audit("the enrolment's record", |r| {
            matches!(r.event, Event::Enrolled | Event::EnrolmentRefused)
        })
        .await;
    assert_eq!(r.event, Event::Enrolled, "{r:?}");
    assert_eq!(r.outcome, Some(Outcome::Ok));
    assert_eq!(
        r.client.as_deref(),
        Some("spiffe://test.ewii.local/client/acme")
    );
    drop(conn);
}

/// What a peer that has proven nothing can make the Hub hold: anyone who can reach its port may
/// open an enrolment connection (512 at once), and quinn keeps what such a peer sends ahead of
/// the Hub's reader (out of order, or past its request) up to the credit it was granted. That
/// credit is one frame's worth (`UNAUTHENTICATED_WINDOW`), not the query window; a session whose
/// checks passed gets the query window for its streams. Read off the peer's side: one `write`
/// takes what the credit allows at that moment, and no more.
#[tokio::test]
async fn a_stranger_gets_one_frame_of_credit_and_a_proven_session_the_query_window() {
    let hub = TestHub::start(&[]).await;
    let lot = vec![0u8; 8 << 20];
    let conn = raw_enrolment(&hub, 1 << 20).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let taken = send.write(&lot).await.unwrap();
    let credit = ewii::transport::UNAUTHENTICATED_WINDOW as usize;
    // All of it, and no more: the largest frame fits in one flight.
    assert_eq!(
        taken, credit,
        "a stranger sent {taken} bytes at once; its credit is {credit}"
    );
    assert!(credit >= ewii_common::frame::HEADER_LEN + ewii_common::frame::MAX_FRAME);
    drop(conn);

    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = store::Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let mut session = raw_session(&hub, &svid)
        .await
        .expect("the Hub welcomes the session");
    // The raise is a MAX_DATA frame, sent before `Welcome`, but in a packet of its own that
    // loss could delay: the write waits for it (its `Hello` was too short to earn one).
    poll_until("the Hub's MAX_DATA", SOON, || {
        session.conn.stats().frame_rx.max_data > 0
    })
    .await;
    let taken = session.send.write(&lot).await.unwrap();
    let window = ewii::transport::STREAM_WINDOW as usize;
    // The control stream's window, less the `Hello` it carried.
    assert!(
        taken > window - 4096 && taken <= window,
        "a proven session sent {taken} bytes at once; its stream window is {window}"
    );
}

/// QUIC keeps a closed connection's state for three probe timeouts (to answer the peer's late
/// packets), and the probe timeout counts the `max_ack_delay` the peer declares, up to 16.4 s.
/// A stranger declaring that much made the Hub keep every enrolment connection it closed for
/// ~49 s, buffers and all, while the admission bounds (64 per address, 512 in all) count open
/// connections only: the next ones could follow at once, and a throwaway run of 2,000 such
/// strangers left a Hub at 74 MB of RSS where honest ones left it at 25. The Hub counts at most
/// the default 25 ms there (vendored quinn-proto, `set_close_timer`): on loopback a closed
/// stranger is forgotten within a fraction of a second.
#[tokio::test]
async fn a_closed_strangers_state_is_not_kept_for_the_ack_delay_it_declared() {
    let hub = TestHub::start(&[]).await;
    let mut strangers = Vec::new();
    // Eight: past ten refusals in a minute, one address's enrolments are refused unread.
    for _ in 0..8 {
        let mut transport = quinn::TransportConfig::default();
        // The largest value a peer may declare (RFC 9000 §18.2: below 2^14 ms).
        transport.declared_max_ack_delay(quinn::VarInt::from_u32((1 << 14) - 1));
        let conn = raw_enrolment_with(&hub, 1 << 20, Some(transport), "127.0.0.1:0").await;
        assert!(hub.handle().quic_connections() >= 1, "counted while open");
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        // No request: a frame header that announces more than any frame may carry.
        send.write_all(&[0xff; 1024]).await.unwrap();
        assert!(
            tokio::time::timeout(SOON, conn.closed()).await.is_ok(),
            "the Hub closes a stranger that sends no request"
        );
        // Kept: a silent peer, not one that drops its state and says so.
        strangers.push(conn);
    }
    poll_until(
        "the Hub to forget the strangers it closed",
        Duration::from_secs(10),
        || hub.handle().quic_connections() == 0,
    )
    .await;
    drop(strangers);
}
