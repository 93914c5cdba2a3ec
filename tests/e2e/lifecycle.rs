//! The SVID lifecycle and revocation (P7, P8, P9, P10): rotation under load, renewal that
//! grants only the recorded identity, stop-to-revoke, silent loss and its grace, central
//! revoke, and signed webhooks.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ewii::client::status::{State, Status};
use ewii::client::{ClientError, Exit, REVOKED_MARKER, REVOKE_PENDING_MARKER};
use ewii::config::OnStop;
use ewii::hub::admin;
use ewii::identity::inspect_leaf;
use ewii::identity::store::{self, Svid};
use ewii::identity::verify::SerialRefusal;
use ewii::transport;
use ewii_common::audit::{Event, Outcome};
use ewii_common::frame::Control;
use ewii_common::spiffe::SpiffeId;
use ewii_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A Hub that lets an SVID renew at once (the Hub refuses renewals in the first quarter of
/// the life by default), for tests that renew right after enrolling.
async fn hub_renewing_at_once(services: &[Service]) -> TestHub {
    let limits = ewii::hub::admission::Limits {
        renew_after_percent: 0,
        ..Default::default()
    };
    TestHub::start_with_limits(services, limits).await
}

/// The owner's move to a new serial, as the tests of a stolen older key set it up: renews on
/// `session` with a new key, connects with the renewed SVID, and waits until the Hub has
/// retired the older serial. Returns the new serial's session.
async fn move_to_a_new_serial(hub: &TestHub, session: &mut RawSession) -> RawSession {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let renew = Control::Renew {
        csr: csr.der().to_vec(),
    };
    transport::write_frame(&mut session.send, &renew)
        .await
        .unwrap();
    let Some(Control::Renewed { chain, .. }) = session
        .reader
        .read::<Control>(&mut session.recv)
        .await
        .unwrap()
    else {
        panic!("the renewal must succeed");
    };
    let renewed = Svid::new(chain.into_iter().map(Into::into).collect(), &key);
    let new = raw_session(hub, &renewed)
        .await
        .expect("session with the new serial");
    hub.wait_audit("first serial retired", |r| {
        r.event == Event::SvidRotated && r.reason.as_deref().is_some_and(|x| x.contains("retired"))
    })
    .await;
    new
}

fn count(
    audit: &ewii::audit::Audit,
    pred: impl Fn(&ewii_common::audit::AuditRecord) -> bool,
) -> usize {
    audit.records().iter().filter(|r| pred(r)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_p8_rotation_under_load_drops_no_query_and_retires_the_old_serial() {
    let echo = echo_server().await;
    let hub = TestHub::start_with(&[Service::tcp("pg", "acme", "db")], 4).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    let first = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let first_serial = inspect_leaf(&first.chain[0]).unwrap().serial;
    client.start();
    hub.wait_connected("acme").await;
    let entry = hub.service("pg");

    // One query that stays open across the rotations: it lives on the old connection.
    let mut long = TcpStream::connect(entry).await.unwrap();
    long.write_all(b"first").await.unwrap();
    let mut buf = [0u8; 6];
    long.read_exact(&mut buf[..5]).await.unwrap();
    assert_eq!(&buf[..5], b"first");

    // Continuous load from three workers until three rotations have happened.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..3u8)
        .map(|w| {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            tokio::spawn(async move {
                let mut i = 0u32;
                while !stop.load(Ordering::SeqCst) && i < 100_000 {
                    let data = vec![w.wrapping_add(i as u8); 4096 + (i as usize % 4096)];
                    match try_roundtrip(entry, &data).await {
                        Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            failures.lock().unwrap().push(e);
                            0
                        }
                    };
                    i += 1;
                }
            })
        })
        .collect();
    // The long query outlives the first rotation on the connection it started on (a session
    // ends when its own SVID expires, so with a 4 s lifetime it cannot outlive them all).
    poll_until("the first rotation", Duration::from_secs(30), || {
        count(&client.audit, |r| {
            r.event == Event::SvidRotated && r.outcome == Some(Outcome::Ok)
        }) >= 1
    })
    .await;
    long.write_all(b"second").await.unwrap();
    long.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"second");
    drop(long);
    poll_until("three rotations", Duration::from_secs(30), || {
        count(&client.audit, |r| {
            r.event == Event::SvidRotated && r.outcome == Some(Outcome::Ok)
        }) >= 3
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        *failures.lock().unwrap(),
        Vec::<String>::new(),
        "no query may fail"
    );
    assert!(ok.load(Ordering::SeqCst) > 10, "the load ran");

    // The Hub retired the first serial when the renewed one came into use…
    hub.wait_audit("serial retirement", |r| {
        r.event == Event::SvidRotated && r.reason.as_deref().is_some_and(|x| x.contains("retired"))
    })
    .await;
    // …so the Hub's serial check refuses it whether or not it has expired yet…
    let db = ewii::hub::state::Db::open(&hub.state_dir().join(admin::DB_FILE)).unwrap();
    let id = SpiffeId::client(TD, "acme").unwrap();
    let verdict = ewii::identity::verify::SerialCheck::check(&db, &id, &first_serial);
    assert_eq!(
        verdict,
        Err(SerialRefusal::Retired {
            serial: first_serial.clone(),
            id: id.to_string()
        })
    );
    // …and a handshake with it fails.
    assert!(raw_session(&hub, &first).await.is_none());
    hub.wait_audit("old SVID refused", |r| r.event == Event::HandshakeRefused)
        .await;
    // The state directory holds the newest SVID, different from the first.
    let now = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    assert_ne!(inspect_leaf(&now.chain[0]).unwrap().serial, first_serial);
    client.stop().await;
}

#[tokio::test]
async fn p7_a_client_the_hub_issues_for_cannot_present_an_svid_of_its_own() {
    let hub = TestHub::start(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let mut session = raw_session(&hub, &svid).await.expect("session");
    // Its own valid SVID, with a correct proof for this connection: still not taken, since
    // only the Hub's `Renew` changes what such a Client holds.
    let (scheme, proof) = ewii::identity::present::sign(&svid, &session.exporter()).unwrap();
    let chain: Vec<Vec<u8>> = svid.chain.iter().map(|c| c.to_vec()).collect();
    assert_eq!(
        session.present(&chain, scheme, proof).await,
        Control::Refused {
            code: ewii_common::frame::RefuseCode::BadRequest
        }
    );
    hub.wait_rotation_refused("takes its SVIDs from this Hub")
        .await;
    // The session goes on.
    assert!(session.conn.close_reason().is_none());
}

#[tokio::test]
async fn p7_a_renewal_csr_asking_for_more_gets_exactly_the_recorded_identity() {
    let hub = hub_renewing_at_once(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let mut session = raw_session(&hub, &svid).await.expect("session");
    // A CSR for a CA certificate with the Hub's identity and an extra DNS name.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut greedy = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    greedy.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://test.ewii.local/hub".try_into().unwrap(),
    ));
    greedy.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let csr = greedy.serialize_request(&key).unwrap();
    transport::write_frame(
        &mut session.send,
        &Control::Renew {
            csr: csr.der().to_vec(),
        },
    )
    .await
    .unwrap();
    let answer = session
        .reader
        .read::<Control>(&mut session.recv)
        .await
        .unwrap()
        .unwrap();
    let Control::Renewed { chain, .. } = answer else {
        panic!("expected Renewed, got {answer:?}");
    };
    let info = inspect_leaf(&chain[0]).unwrap();
    assert_eq!(info.id, SpiffeId::client(TD, "acme").unwrap());
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(
        cert.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .len(),
        1
    );
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice(),
        "only the public key comes from the CSR"
    );
}

/// The Client's last status in `dir` is `state`, and its `last_error` says `words`.
fn last_status_says(dir: &Path, state: State, words: &str) {
    let status = Status::read(dir).unwrap();
    assert_eq!(status.state, state);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(words)),
        "{status:?}"
    );
}

#[tokio::test]
async fn p9_stop_revokes_and_a_returning_client_is_refused_also_after_a_hub_restart() {
    let mut hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    client.config.on_stop = OnStop::Revoke;
    client.start();
    hub.wait_connected("acme").await;
    assert_eq!(client.stop().await, Exit::Stopped);
    let revoked = hub.wait_audit("revoked", is(Event::Revoked)).await;
    assert_eq!(revoked.reason.as_deref(), Some("stopped by the customer"));
    assert_eq!(
        revoked.client.as_deref(),
        Some("spiffe://test.ewii.local/client/acme")
    );
    // The Hub acknowledged the revoke: the Client records it, and knows it at its next start.
    let own = client
        .wait_audit("the Client's record of its revoke", |r| {
            r.event == Event::Revoked && r.outcome == Some(Outcome::Ok)
        })
        .await;
    assert!(
        own.reason
            .as_deref()
            .unwrap()
            .contains("confirmed by the Hub"),
        "{own:?}"
    );
    let dir = client.state_dir();
    assert!(dir.join(REVOKED_MARKER).exists());
    assert!(!dir.join(REVOKE_PENDING_MARKER).exists());
    // Its last status says revoked, and why, as after the Hub's revoke.
    last_status_says(&dir, State::Revoked, "revoked at its stop");
    assert!(matches!(
        client.run_once(SOON).await,
        Err(ClientError::RevokedEarlier(_))
    ));

    // A copy of its state from before the stop (no marker) comes back with the same SVID:
    // refused on the handshake, and told why (it proved its key), so it records the
    // revocation and stops for good.
    std::fs::remove_file(dir.join(REVOKED_MARKER)).unwrap();
    let exit = client.run_once(SOON).await.unwrap();
    assert_eq!(
        exit,
        Exit::Revoked {
            reason: "stopped by the customer".into()
        }
    );
    hub.wait_audit("refused return", |r| {
        r.event == Event::HandshakeRefused
            && r.reason.as_deref() == Some("spiffe://test.ewii.local/client/acme is revoked")
    })
    .await;
    // The revocation is in the database: a restarted Hub refuses that SVID too.
    hub.restart().await;
    let before = count(&hub.audit, |r| r.event == Event::HandshakeRefused);
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    assert!(raw_session(&hub, &svid).await.is_none());
    poll_until("a refusal after the restart", SOON, || {
        count(&hub.audit, |r| r.event == Event::HandshakeRefused) > before
    })
    .await;
    assert!(hub.handle().connected_clients().is_empty());
    assert_eq!(
        count(&client.audit, is(Event::SessionUp)),
        1,
        "only the first session"
    );
}

/// A stop's revoke that reaches a Hub whose serial records cannot be read (its reloads fail):
/// the Hub cannot tell whether the connection's serial was replaced, and a replaced key's
/// revoke would revoke the identity that replaced it. It neither revokes nor acknowledges,
/// and the Client keeps the revoke pending, as when the Hub is away (P9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_a_stops_revoke_the_hub_cannot_judge_is_kept_pending() {
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    client.config.on_stop = OnStop::Revoke;
    client.start();
    hub.wait_connected("acme").await;
    let db = hub.state_dir().join(admin::DB_FILE);
    let rename = |from: &str, to: &str| {
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch(&format!("ALTER TABLE {from} RENAME TO {to}"))
            .unwrap();
    };
    rename("serials", "gone");
    poll_until("a failed reload of the Hub's records", SOON, || {
        hub.handle().store_reloads_failed() > 0
    })
    .await;
    assert_eq!(client.stop().await, Exit::Stopped);
    let dir = client.state_dir();
    assert!(dir.join(REVOKE_PENDING_MARKER).exists());
    assert!(!dir.join(REVOKED_MARKER).exists());
    let r = hub
        .wait_audit("the Hub's record of the revoke", is(Event::Revoked))
        .await;
    assert_eq!(r.outcome, Some(Outcome::Failed), "{r:?}");
    rename("gone", "serials");
    let acme = ewii::hub::state::Db::open(&db)
        .unwrap()
        .clients()
        .unwrap()
        .into_iter()
        .find(|c| c.name == "acme")
        .unwrap();
    assert_eq!(acme.revoked_at, None, "not revoked");
}

/// Says `Hello` on `handshake` and waits for the Hub's refusal: no `Welcome`, the connection
/// closed with the code of a refusal (not the "CA no longer trusted" one, which the guide
/// answers with a re-enrolment), and a `session_lost` whose reason starts with `code`; returns
/// that reason.
async fn refused_before_welcome(hub: &TestHub, handshake: RawHandshake, code: &str) -> String {
    let conn = handshake.conn.clone();
    assert!(handshake.hello().await.is_none(), "no Welcome");
    assert_eq!(
        closed_by_hub(&conn).await,
        Some(transport::codes::REFUSED.into_inner())
    );
    let ended = hub
        .wait_audit("the end of the session", |r| {
            r.event == Event::SessionLost
                && r.reason.as_deref().is_some_and(|x| x.starts_with(code))
        })
        .await;
    ended.reason.unwrap_or_default()
}

/// A session that opens while the Hub's records cannot be read is not kept (nor registered,
/// which would retire the Client's older serials): a revocation or retirement made before
/// that moment could not be told, and the next good reload reports no change for it (fail
/// closed). Its Client dials again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p12_a_session_registered_while_the_hub_s_records_cannot_be_read_is_not_kept() {
    let hub = TestHub::start(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    // Past the TLS check (the Hub's HANDSHAKE_DONE has arrived) and the Hub's first look at
    // the serial, before `Hello`.
    let handshake = raw_handshake(&hub, &svid).await.expect("a handshake");
    poll_until("the Hub's end of the handshake", SOON, || {
        handshake.conn.stats().frame_rx.handshake_done > 0
    })
    .await;
    let db = hub.state_dir().join(admin::DB_FILE);
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("ALTER TABLE serials RENAME TO gone")
        .unwrap();
    poll_until("a failed reload of the Hub's records", SOON, || {
        hub.handle().store_reloads_failed() > 0
    })
    .await;
    // Refused before it registers.
    let ended = refused_before_welcome(&hub, handshake, "records_unreadable: ").await;
    assert!(ended.contains("could not be read"));
    assert_eq!(
        count(&hub.audit, |r| r.event == Event::SessionUp),
        0,
        "not registered"
    );
}

/// A session the Hub cannot record as it opens (its database refuses the write: a full disk,
/// another writer's lock past the busy timeout; here a trigger) is refused before it registers,
/// with no `Welcome` (fail closed): its serial's first use and the retirement of the client's older serials (P8)
/// would not be on record, and a session the records do not hold would hold off the
/// silent-client grace only until the next reload. Once the Hub can write again, the Client's
/// next dial is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_session_the_hub_cannot_record_is_closed_before_welcome() {
    let hub = TestHub::start(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let db = rusqlite::Connection::open(hub.state_dir().join(admin::DB_FILE)).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse BEFORE INSERT ON sessions BEGIN SELECT RAISE(ABORT, 'disk full'); END",
    )
    .unwrap();
    let handshake = raw_handshake(&hub, &svid).await.expect("a handshake");
    let ended = refused_before_welcome(&hub, handshake, "records_unwritable: ").await;
    assert!(
        ended.contains("could not record this session: ") && ended.contains("disk full"),
        "the database's word: {ended}"
    );
    assert_eq!(
        count(&hub.audit, |r| r.event == Event::SessionUp),
        0,
        "not registered"
    );
    db.execute_batch("DROP TRIGGER refuse").unwrap();
    assert!(
        raw_session(&hub, &svid).await.is_some(),
        "served once it can write"
    );
}

/// A session that does not end within the Hub's stop bound (a renewal's write waits behind
/// another writer's lock as the Hub stops) is aborted: its end is on record all the same, and
/// its connection goes with it: a handle kept after the stop counts none, and the Hub's UDP
/// port is free for the next Hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_a_session_aborted_at_the_hubs_stop_is_on_record_and_keeps_no_port() {
    let mut hub = hub_renewing_at_once(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let mut raw = raw_session(&hub, &svid).await.expect("a session");
    let handle = hub.handle().clone();
    assert_eq!(handle.connections(), 1);
    let db = rusqlite::Connection::open(hub.state_dir().join(admin::DB_FILE)).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = ewii::identity::ca::csr_for(&key).unwrap();
    let before = handle.store_statements();
    transport::write_frame(&mut raw.send, &Control::Renew { csr })
        .await
        .unwrap();
    // The renewal's read is done (reads pass the lock): the session is past its `Renew`, on
    // to a signature and the write, which waits for the lock (the 5 s busy timeout) past the
    // stop's bound (2 s after the stop).
    poll_until("the renewal's read", SOON, || {
        handle.store_statements() > before
    })
    .await;
    hub.stop().await;
    db.execute_batch("ROLLBACK").unwrap();
    assert_eq!(handle.connections(), 0, "let go with its aborted session");
    let ended: Vec<_> = hub
        .audit
        .records()
        .into_iter()
        .filter(|r| r.event == Event::SessionLost)
        .collect();
    assert_eq!(ended.len(), 1, "its end is on record: {ended:?}");
    // Cut short (not a session that saw the stop and whose end's write was then cut).
    assert_eq!(
        ended[0].reason.as_deref(),
        Some("hub_shutdown: this Hub stopped before the session's end could be seen"),
        "{ended:?}"
    );
    let up = hub
        .audit
        .records()
        .into_iter()
        .find(|r| r.event == Event::SessionUp)
        .unwrap();
    assert!(
        ended[0].time.0 >= up.time.0 + 2_000_000,
        "stamped at its end"
    );
    poll_until("the Hub's port to be free", SOON, || {
        std::net::UdpSocket::bind(hub.addr).is_ok()
    })
    .await;
    drop(raw);
}

/// "Stop the container and it is revoked" must hold when the network is bad too: a stop
/// while the Hub is unreachable tries within its budget, records the revoke as pending, and
/// the next start delivers it before serving anything, then stays revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_a_stop_while_the_hub_is_away_revokes_at_the_next_start() {
    let mut hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    client.config.on_stop = OnStop::Revoke;
    client.start();
    hub.wait_connected("acme").await;
    hub.stop().await;
    client
        .wait_audit("the loss of the Hub", is(Event::SessionLost))
        .await;
    let stopped = Instant::now();
    assert_eq!(client.stop().await, Exit::Stopped);
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(9),
        "the stop tries for its 5 s budget, no longer: {took:?}"
    );
    let dir = client.state_dir();
    assert!(dir.join(REVOKE_PENDING_MARKER).exists());
    // Not revoked yet: the last status says stopped, and that the revoke waits.
    last_status_says(&dir, State::Stopped, "delivered at the next start");
    let pending = client
        .wait_audit("pending revoke", |r| {
            r.event == Event::Revoked && r.outcome == Some(Outcome::Failed)
        })
        .await;
    assert!(
        pending.reason.as_deref().unwrap().contains("next start"),
        "{pending:?}"
    );

    // The Hub comes back; so does the Client: it delivers the revoke and ends, revoked.
    hub.restart().await;
    let exit = client.run_once(SOON).await.unwrap();
    assert_eq!(
        exit,
        Exit::Revoked {
            reason: ewii_common::session::PENDING_REVOKE_REASON.into()
        }
    );
    let revoked = hub.wait_audit("revoked", is(Event::Revoked)).await;
    assert_eq!(revoked.reason.as_deref(), Some("stopped by the customer"));
    assert_eq!(
        count(&client.audit, |r| r.event == Event::Query),
        0,
        "nothing was served"
    );
    assert!(!dir.join(REVOKE_PENDING_MARKER).exists());
    assert!(dir.join(REVOKED_MARKER).exists());
    assert_eq!(
        Status::read(&dir).unwrap().state,
        State::Revoked,
        "the status says so"
    );
    // And a later start stops at once, saying it was this Client's own revoke.
    let again = client.run_once(SOON).await.unwrap_err().to_string();
    assert!(
        again.starts_with("this Client is revoked (stopped by the customer"),
        "{again}"
    );
}

#[tokio::test]
async fn p9_on_stop_disconnect_keeps_the_identity() {
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol_and_run(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    hub.wait_connected("acme").await;
    client.stop().await;
    hub.wait_audit("goodbye", |r| {
        r.event == Event::SessionLost
            && r.reason.as_deref() == Some("goodbye: the Client stopped; its identity is kept")
    })
    .await;
    client.start();
    poll_until("a second session", SOON, || {
        count(&hub.audit, is(Event::SessionUp)) == 2
    })
    .await;
    assert_eq!(count(&hub.audit, is(Event::Revoked)), 0);
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_silent_loss_is_seen_within_3s_is_not_a_revoke_and_the_client_returns() {
    let hub = TestHub::start(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let toml = client.dir.path().join("client.toml");
    std::fs::write(
        &toml,
        format!(
            "hub = \"{}\"\nstate_dir = {:?}\naudit = \"discard\"\n[reconnect]\ninitial_ms = 50\nmax_ms = 500\n[[allow]]\nname = \"db\"\naddress = \"127.0.0.1:9\"\n",
            hub.addr,
            client.state_dir()
        ),
    )
    .unwrap();
    let spawn = || {
        Command::new(bin_path("ewii-client"))
            .args(["run", "--config", toml.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut proc = spawn();
    hub.wait_connected("acme").await;
    // SIGKILL: no goodbye, no CONNECTION_CLOSE; the Hub only notices the silence.
    proc.kill().unwrap();
    proc.wait().unwrap();
    let killed = Instant::now();
    // Seen when the Hub stops routing to the Client (its record follows the session's end in
    // the database, a synchronous commit that is not part of noticing the loss).
    poll_until("the Hub to see the loss", SOON, || {
        hub.handle().connected_clients().is_empty()
    })
    .await;
    let took = killed.elapsed();
    let lost = hub
        .wait_audit("session_lost", |r| r.event == Event::SessionLost)
        .await;
    assert_eq!(
        lost.reason.as_deref(),
        Some("idle_timeout: the Client went silent")
    );
    assert!(took <= Duration::from_secs(3), "seen after {took:?}");
    assert_eq!(
        count(&hub.audit, is(Event::Revoked)),
        0,
        "a silent loss is not a revoke"
    );
    // The Client comes back with its SVID.
    let mut again = spawn();
    poll_until("the Client back", SOON, || {
        count(&hub.audit, is(Event::SessionUp)) == 2
    })
    .await;
    again.kill().unwrap();
    again.wait().unwrap();
}

#[tokio::test]
async fn p9_a_client_silent_past_the_grace_is_revoked() {
    let hub = TestHub::start_custom(&[], "revoke_after_lost_secs = 1\n").await;
    let mut client = TestClient::enrol_and_run(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    hub.wait_connected("acme").await;
    // Stamped before the stop: the Hub cannot see the Client gone earlier, so the grace runs
    // from after this instant (stamped after, it would include the Client's own wind-down).
    let gone = Instant::now();
    client.stop().await; // disconnect only
    let revoked = hub.wait_audit("grace revocation", is(Event::Revoked)).await;
    assert_eq!(
        revoked.reason.as_deref(),
        Some("no session for 1 s (revoke_after_lost_secs)")
    );
    assert!(
        gone.elapsed() >= Duration::from_millis(900),
        "not before the grace"
    );
    client.start();
    hub.wait_audit("refused after grace", |r| {
        r.event == Event::HandshakeRefused
            && r.reason
                .as_deref()
                .is_some_and(|x| x.ends_with("is revoked"))
    })
    .await;
    client.stop().await;
}

/// A grace revocation the Hub cannot record (a full disk; here a trigger) is tried again after
/// a pause, not at once: the deadline, past and unchanged, used to wake the watcher again at
/// once, each turn two database jobs and a `revoked` `failed` record. Once the database takes
/// the write, the next try revokes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_a_grace_revocation_that_cannot_be_recorded_is_retried_after_a_pause() {
    let hub = TestHub::start_custom(&[], "revoke_after_lost_secs = 1\n").await;
    let mut client = TestClient::enrol_and_run(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    hub.wait_connected("acme").await;
    let db = rusqlite::Connection::open(hub.state_dir().join(admin::DB_FILE)).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse BEFORE UPDATE OF revoked_at ON clients BEGIN SELECT RAISE(ABORT, 'disk full'); END",
    )
    .unwrap();
    client.stop().await; // disconnect only
    let failed = |r: &ewii_common::audit::AuditRecord| {
        r.event == Event::Revoked && r.outcome == Some(Outcome::Failed)
    };
    let first = hub
        .wait_audit("a grace revocation not recorded", failed)
        .await;
    assert!(
        first
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("disk full")),
        "{first:?}"
    );
    // The pause after the first failure: the second try comes no sooner than 2 s after it
    // (judged by the records' own times: the test may be scheduled late on a busy host).
    poll_until("the second try", SOON, || count(&hub.audit, failed) >= 2).await;
    let fails: Vec<_> = hub
        .audit
        .records()
        .into_iter()
        .filter(|r| failed(r))
        .collect();
    let gap_us = fails
        .get(1)
        .map(|second| second.time.0.saturating_sub(first.time.0));
    assert!(
        gap_us.is_none_or(|us| us >= 1_900_000),
        "the second try {gap_us:?} µs after the first: {fails:?}"
    );
    assert!(fails.len() <= 2, "{} tries within the pause", fails.len());
    db.execute_batch("DROP TRIGGER refuse").unwrap();
    let revoked = hub
        .wait_audit("the grace revocation, recorded", |r| {
            r.event == Event::Revoked && r.outcome == Some(Outcome::Ok)
        })
        .await;
    assert_eq!(
        revoked.reason.as_deref(),
        Some("no session for 1 s (revoke_after_lost_secs)")
    );
}

/// A silent client whose recorded SPIFFE ID does not parse (an edited database) is revoked by
/// its name like any other, and the turn goes on to the next. It used to be left unrevoked and
/// each turn counted as a failure: that client was never revoked, and every other client's
/// grace waited behind the growing pause (up to 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_a_silent_client_whose_recorded_id_does_not_parse_is_revoked_by_its_name() {
    let hub = TestHub::start_custom(&[], "revoke_after_lost_secs = 1\n").await;
    let allow = [("db", "127.0.0.1:9".into())];
    let mut edited = TestClient::enrol_and_run(&hub, "acme", &allow).await;
    let mut other = TestClient::enrol_and_run(&hub, "beta", &allow).await;
    hub.wait_connected("acme").await;
    hub.wait_connected("beta").await;
    let db = rusqlite::Connection::open(hub.state_dir().join(admin::DB_FILE)).unwrap();
    db.execute(
        "UPDATE clients SET spiffe_id = 'not a spiffe id' WHERE name = 'acme'",
        [],
    )
    .unwrap();
    edited.stop().await; // disconnect only
    other.stop().await;
    let revoked = |name: &'static str| {
        move |r: &ewii_common::audit::AuditRecord| {
            r.event == Event::Revoked
                && r.outcome == Some(Outcome::Ok)
                && r.client
                    .as_deref()
                    .is_some_and(|c| c.ends_with(&format!("/client/{name}")))
        }
    };
    let acme = hub
        .wait_audit("acme's grace revocation", revoked("acme"))
        .await;
    let reason = acme.reason.as_deref().unwrap_or_default();
    assert!(
        reason.starts_with("no session for 1 s (revoke_after_lost_secs)")
            && reason.contains("\"not a spiffe id\" does not parse"),
        "{acme:?}"
    );
    let beta = hub
        .wait_audit("beta's grace revocation", revoked("beta"))
        .await;
    assert_eq!(
        beta.reason.as_deref(),
        Some("no session for 1 s (revoke_after_lost_secs)")
    );
    assert_eq!(
        count(&hub.audit, |r| r.event == Event::Revoked
            && r.outcome == Some(Outcome::Failed)),
        0,
        "{:#?}",
        hub.audit.records()
    );
    // Recorded in the database, as every revocation is, with the reason the Client and the
    // webhook are told: the row's contents stay in the audit record.
    let (revoked_at, said): (Option<i64>, Option<String>) = db
        .query_row(
            "SELECT revoked_at, revoke_reason FROM clients WHERE name = 'acme'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(revoked_at.is_some());
    assert_eq!(
        said.as_deref(),
        Some("no session for 1 s (revoke_after_lost_secs)")
    );
}

/// An `ewii-hub ca …` command holds the trust lock for its writes (each may wait out the
/// database's busy timeout; a command paused with Ctrl-Z holds it for as long). The Hub's
/// reload of the trust material, which a revocation's change starts, waits for that lock; the
/// revocation itself must not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_a_revocation_closes_the_session_while_a_ca_command_holds_the_trust_lock() {
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    client.start();
    hub.wait_connected("acme").await;
    let held = ewii::hub::layout::lock_trust(&hub.state_dir()).unwrap();
    assert!(
        admin::revoke(&hub.state_dir(), "acme", "contract ended")
            .unwrap()
            .revoked
    );
    hub.wait_audit("revoked while the trust lock is held", |r| {
        r.event == Event::Revoked
            && r.reason.as_deref() == Some("live session closed: contract ended")
    })
    .await;
    let exit = client.ended(SOON).await.unwrap();
    assert!(matches!(exit, Exit::Revoked { .. }), "{exit:?}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_central_revoke_closes_a_live_session_within_1s_and_a_restart_exits_at_once() {
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    // A renewal key kept from an earlier run: a revoked Client does not keep it.
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let serial = inspect_leaf(&svid.chain[0]).unwrap().serial;
    let kept = client.state_dir().join(store::renew_key_file(&serial));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(&kept, key.serialize_pem()).unwrap();
    client.start();
    hub.wait_connected("acme").await;
    let t0 = Instant::now();
    assert!(
        admin::revoke(&hub.state_dir(), "acme", "contract ended")
            .unwrap()
            .revoked
    );
    // The Hub closes the connection, then writes this record.
    hub.wait_audit("revoked", |r| {
        r.event == Event::Revoked
            && r.reason.as_deref() == Some("live session closed: contract ended")
    })
    .await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // The Client's wind-down (the marker, its status, both synced to disk) is not timed.
    let exit = client.ended(SOON).await.unwrap();
    assert_eq!(
        exit,
        Exit::Revoked {
            reason: "contract ended".into()
        }
    );
    client
        .wait_audit("client revoked record", is(Event::Revoked))
        .await;
    let marker = std::fs::read_to_string(client.state_dir().join(REVOKED_MARKER)).unwrap();
    assert_eq!(marker, "contract ended");
    assert!(!kept.exists(), "the kept renewal key is removed");
    let status = Status::read(&client.state_dir()).unwrap();
    assert_eq!(status.state, State::Revoked);

    // A restart sees the marker and stops before touching the network.
    let ups = count(&client.audit, is(Event::SessionUp));
    let again = client.run_once(Duration::from_secs(1)).await;
    assert!(
        matches!(again, Err(ClientError::RevokedEarlier(ref r)) if r == "contract ended"),
        "{again:?}"
    );
    assert_eq!(count(&client.audit, is(Event::SessionUp)), ups);
    // The binary says so with its documented status.
    let toml = client.dir.path().join("client.toml");
    std::fs::write(
        &toml,
        format!(
            "hub = \"{}\"\nstate_dir = {:?}\n[[allow]]\nname = \"db\"\naddress = \"127.0.0.1:9\"\n",
            hub.addr,
            client.state_dir()
        ),
    )
    .unwrap();
    let out = Command::new(bin_path("ewii-client"))
        .args(["run", "--config", toml.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(10));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("revoked by the Hub"), "{err}");
    assert!(
        err.contains("ask the operator for a new token, then run `ewii-client enroll --replace`"),
        "says what to do next: {err}"
    );
    // The operator's listing says revoked.
    let rows = admin::clients(&hub.state_dir()).unwrap();
    assert_eq!(rows[0].revoke_reason.as_deref(), Some("contract ended"));
    assert!(rows[0].session.is_none());

    // The supported way back: a new token from the operator and `enroll --replace`.
    let token = hub.token("acme", Duration::from_secs(600));
    let dir = client.state_dir();
    let enroll = |token: &str, replace: bool| {
        let mut cmd = Command::new(bin_path("ewii-client"));
        cmd.args(["enroll", "--hub", &hub.addr.to_string()])
            .args(["--bundle-hash", &token_hash(&hub)])
            .args(["--state-dir", dir.to_str().unwrap()])
            .env("EWII_TOKEN", token);
        if replace {
            cmd.arg("--replace");
        }
        cmd.output().unwrap()
    };
    let plain = enroll(&token.token, false);
    assert_eq!(plain.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&plain.stderr).contains("enroll --replace"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    // A failed replacement leaves the revoked state as it was.
    let bad = enroll("not-a-token", true);
    assert_eq!(bad.status.code(), Some(3));
    assert!(dir.join(REVOKED_MARKER).exists());
    let replaced = enroll(&token.token, true);
    assert!(
        replaced.status.success(),
        "{}",
        String::from_utf8_lossy(&replaced.stderr)
    );
    assert!(!dir.join(REVOKED_MARKER).exists());
    client.start();
    hub.wait_connected("acme").await;
    assert_eq!(client.stop().await, Exit::Stopped);
}

/// A container or pod recreated after a stop with `on_stop = "revoke"` starts on the same
/// state volume with a new token in its environment (the Kubernetes Secret): `run` enrols
/// again with it, where it would otherwise stop on the revoked SVID at every start. A token
/// the Hub refuses leaves the revoked state as it was; the token it was enrolled with is not
/// sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_a_client_stopped_and_revoked_comes_back_with_a_new_token_in_its_environment() {
    let hub = TestHub::start(&[]).await;
    let first = hub.token("acme", Duration::from_secs(600));
    let mut client = TestClient::enrol_with(&hub, &first, &[("db", "127.0.0.1:9".into())]).await;
    client.config.on_stop = OnStop::Revoke;
    client.start();
    hub.wait_connected("acme").await;
    assert_eq!(client.stop().await, Exit::Stopped);
    let dir = client.state_dir();
    assert!(
        dir.join(REVOKED_MARKER).exists(),
        "the stop's revoke was confirmed"
    );
    let before = store::read_certs(&dir.join(store::SVID_CERT)).unwrap();

    let toml = run_config(&hub, &client);
    let run = |token: &str| run_with_token(&hub, &toml, token);
    // A token that is not (or no longer) good: refused, still revoked, nothing served.
    let (code, err) = exit_of(run("ewii_not-a-token")).await;
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("was revoked") && err.contains("enrolling again with EWII_TOKEN"),
        "{err}"
    );
    assert!(dir.join(REVOKED_MARKER).exists());
    assert_eq!(
        store::read_certs(&dir.join(store::SVID_CERT)).unwrap(),
        before
    );
    // The token it was enrolled with, still in its environment (compose and Kubernetes keep
    // it): spent, so not sent again; revoked, at once, as without a token.
    let enrolments = || {
        count(&hub.audit, |r| {
            matches!(r.event, Event::Enrolled | Event::EnrolmentRefused)
        })
    };
    let before_start = enrolments();
    let (code, err) = exit_of(run(&first.token)).await;
    assert_eq!(code, Some(10), "{err}");
    assert!(err.contains("not sent again"), "{err}");
    assert_eq!(enrolments(), before_start, "the Hub saw no enrolment");

    // The new token: enrolled again and serving, as the same client name.
    let token = hub.token("acme", Duration::from_secs(600));
    let mut child = crate::process::Proc(run(&token.token));
    hub.wait_connected("acme").await;
    assert!(!dir.join(REVOKED_MARKER).exists());
    assert_ne!(
        store::read_certs(&dir.join(store::SVID_CERT)).unwrap(),
        before
    );
    // SIGTERM (on_stop = "revoke" by default): revoked again; the token it came back with is
    // spent, so the next start with it stays revoked without asking the Hub.
    assert_eq!(child.terminate().code(), Some(0));
    assert!(dir.join(REVOKED_MARKER).exists());
    // Whoever stopped it reads so on its stderr, not only in the audit.
    let mut said = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut said).unwrap();
    assert!(
        said.contains("identity revoked at its stop (on_stop = \"revoke\"), confirmed by the Hub: a later start needs a new token"),
        "{said}"
    );
    let (code, err) = exit_of(run(&token.token)).await;
    assert_eq!(code, Some(10), "{err}");
    assert!(
        err.contains("this Client is revoked (revoked at its stop"),
        "{err}"
    );
}

/// The customer asks for a new token first, then stops the old container (`on_stop =
/// "revoke"`) and starts its replacement with the token: the stop's revocation is the
/// customer's, and leaves the operator's unused token good (an operator's revocation deletes
/// them: `p10_a_revocation_by_the_operator_or_the_hub_deletes_unused_tokens_…`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_a_token_given_before_the_stop_brings_the_replacement_back() {
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    client.config.on_stop = OnStop::Revoke;
    client.start();
    hub.wait_connected("acme").await;
    let token = hub.token("acme", Duration::from_secs(600));
    assert_eq!(client.stop().await, Exit::Stopped);
    let dir = client.state_dir();
    assert!(dir.join(REVOKED_MARKER).exists(), "revoked at its stop");
    let db = ewii::hub::state::Db::open(&hub.state_dir().join(admin::DB_FILE)).unwrap();
    assert_eq!(
        db.tokens().unwrap().len(),
        1,
        "the new token is still there"
    );
    let toml = run_config(&hub, &client);
    let mut child = crate::process::Proc(run_with_token(&hub, &toml, &token.token));
    hub.wait_connected("acme").await;
    assert!(!dir.join(REVOKED_MARKER).exists());
    assert_eq!(child.terminate().code(), Some(0));
}

/// A `bundle.pem` changed on disk to hold a leaf beside the CA (here the Client's own SVID,
/// whose key it holds): that key's holder could stand as the Hub. The Client refuses to start
/// on it and says why, as it refuses such a bundle from the Hub or from SPIRE (P15).
#[tokio::test]
async fn p15_a_bundle_changed_on_disk_to_hold_a_leaf_is_refused_at_start() {
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let dir = client.state_dir();
    let mut bundle = std::fs::read(dir.join(store::BUNDLE)).unwrap();
    bundle.extend(std::fs::read(dir.join(store::SVID_CERT)).unwrap());
    std::fs::write(dir.join(store::BUNDLE), bundle).unwrap();
    let err = client.run_once(SOON).await.unwrap_err();
    assert!(matches!(err, ClientError::BadBundle { .. }), "{err}");
    assert!(
        err.to_string().contains("1 of 2 trust anchors usable")
            && err.to_string().contains("only CA certificates"),
        "{err}"
    );
    assert!(hub.handle().connected_clients().is_empty());
}

/// A write a crash cut short leaves its temporary file (a key's holds the whole key): the
/// Client's and the Hub's next starts remove it. (Named for pid 0, which no process has; one
/// of a process still running is left alone: `identity::store::tests`.)
#[tokio::test]
async fn a_start_removes_the_temporary_files_a_crash_left() {
    let mut hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let left = client.state_dir().join(".svid.key.0-00000000deadbeef.tmp");
    std::fs::write(&left, "a key").unwrap();
    client.start();
    hub.wait_connected("acme").await;
    assert!(!left.exists(), "the Client's start removed it");
    client.stop().await;
    let hub_left = hub.state_dir().join(".ca.key.0-00000000deadbeef.tmp");
    std::fs::write(&hub_left, "a key").unwrap();
    hub.restart().await;
    assert!(!hub_left.exists(), "the Hub's start removed it");
}

/// A `client.toml` for `ewii-client run` on `client`'s state directory (allow-list entry `db`,
/// audit discarded).
fn run_config(hub: &TestHub, client: &TestClient) -> PathBuf {
    let toml = client.dir.path().join("client.toml");
    std::fs::write(
        &toml,
        format!(
            "hub = \"{}\"\nstate_dir = {:?}\naudit = \"discard\"\n[[allow]]\nname = \"db\"\naddress = \"127.0.0.1:9\"\n",
            hub.addr,
            client.state_dir()
        ),
    )
    .unwrap();
    toml
}

/// `ewii-client run --config toml` with `token` and `hub`'s bundle hash in its environment
/// (stderr piped).
fn run_with_token(hub: &TestHub, toml: &Path, token: &str) -> std::process::Child {
    Command::new(bin_path("ewii-client"))
        .args(["run", "--config", toml.to_str().unwrap()])
        .env("EWII_TOKEN", token)
        .env("EWII_BUNDLE_HASH", token_hash(hub))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The exit status and stderr of `child`, which must end within [`SOON`].
pub(crate) async fn exit_of(child: std::process::Child) -> (Option<i32>, String) {
    let mut child = crate::process::Proc(child);
    let mut status = None;
    poll_until("the process to end", SOON, || {
        status = child.0.try_wait().unwrap();
        status.is_some()
    })
    .await;
    let mut err = String::new();
    if let Some(mut stderr) = child.0.stderr.take() {
        std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
    }
    (status.unwrap().code(), err)
}

/// A query cut by its session's end (a central revoke here) while it pushes into a
/// destination that reads nothing keeps its byte counts on record: the pipe blocked on the
/// destination's TCP is cut with what it moved, where it used to be dropped after a second
/// and recorded with no bytes at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_a_query_cut_by_its_sessions_end_keeps_its_byte_counts() {
    // A destination that accepts and never reads.
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let hub = TestHub::start(&[Service::tcp("svc", "acme", "sink")]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("sink", sink_addr.to_string())]).await;
    client.start();
    hub.wait_connected("acme").await;
    let mut requester = TcpStream::connect(hub.service("svc")).await.unwrap();
    // Pushes until every buffer on the way is full.
    let pushing = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        while requester.write_all(&chunk).await.is_ok() {}
    });
    // Waits until more than 64 KiB came through the tunnel and wait, unread, at the
    // destination.
    let (held, _) = tokio::time::timeout(SOON, sink.accept())
        .await
        .unwrap()
        .unwrap();
    let mut peeked = vec![0u8; 256 * 1024];
    tokio::time::timeout(SOON, async {
        while held.peek(&mut peeked).await.unwrap() <= 64 * 1024 {
            // peek does not consume readiness: look again shortly, not in a spin.
            tokio::time::sleep(POLL).await;
        }
    })
    .await
    .expect("the tunnel moved less than 64 KiB");
    assert!(
        admin::revoke(&hub.state_dir(), "acme", "contract ended")
            .unwrap()
            .revoked
    );
    let r = client
        .wait_audit("the cut query's record", is(Event::Query))
        .await;
    assert_eq!(r.outcome, Some(Outcome::Failed), "{r:?}");
    assert!(
        r.reason.as_deref().unwrap().contains("the session ended"),
        "{r:?}"
    );
    assert!(
        r.bytes_up.is_some_and(|b| b > 64 * 1024),
        "the bytes it moved: {r:?}"
    );
    // The session's end names the Hub it was with.
    let lost = client
        .wait_audit("the session's end", is(Event::SessionLost))
        .await;
    assert_eq!(lost.peer, Some(hub.addr.to_string()), "{lost:?}");
    pushing.abort();
    drop(held);
}

/// A Hub that stops while queries are open ends each with its record: one that moved bytes
/// keeps their counts, one still waiting for a query slot says it never opened. (Its tasks
/// were aborted with no record at all before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_a_hub_that_stops_records_every_query_open_then() {
    let echo = echo_server().await;
    let mut hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    // One query at a time: the second requester waits for the first's slot.
    client.config.max_queries = 1;
    client.start();
    hub.wait_connected("acme").await;
    let mut open = TcpStream::connect(hub.service("pg")).await.unwrap();
    open.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    open.read_exact(&mut back).await.unwrap();
    let _waiting = TcpStream::connect(hub.service("pg")).await.unwrap();
    // The second is accepted and waits for the first's slot.
    let handle = hub.handle().clone();
    poll_until("both queries in the Hub", SOON, || {
        handle.queries_open() == 2
    })
    .await;
    hub.stop().await;
    assert_eq!(handle.queries_open(), 0, "every query ended");
    let queries: Vec<_> = hub
        .audit
        .records()
        .into_iter()
        .filter(|r| r.event == Event::Query)
        .collect();
    assert_eq!(queries.len(), 2, "{queries:#?}");
    let cut = queries
        .iter()
        .find(|r| r.reason.as_deref() == Some("the Hub stopped"))
        .expect("the open query's record");
    assert_eq!(cut.outcome, Some(Outcome::Failed));
    assert_eq!(
        (cut.bytes_up, cut.bytes_down),
        (Some(5), Some(5)),
        "{cut:?}"
    );
    let waiting = queries
        .iter()
        .find(|r| r.reason.as_deref() == Some("the Hub stopped before the query was open"))
        .expect("the waiting query's record");
    assert_eq!(waiting.outcome, Some(Outcome::Failed));
    client.stop().await;
}

fn token_hash(hub: &TestHub) -> String {
    hub.token("unused", Duration::from_secs(1)).bundle_hash
}

#[tokio::test]
async fn p10_a_revocation_made_while_the_hub_is_down_holds_after_its_restart_and_the_client_learns_it(
) {
    let mut hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    client.config.on_stop = OnStop::Revoke;
    client.start();
    hub.wait_connected("acme").await;
    hub.stop().await;
    assert!(
        admin::revoke(&hub.state_dir(), "acme", "while down")
            .unwrap()
            .revoked
    );
    hub.restart().await;
    hub.wait_audit("refused", |r| {
        r.event == Event::HandshakeRefused
            && r.reason.as_deref() == Some("spiffe://test.ewii.local/client/acme is revoked")
    })
    .await;
    assert!(hub.handle().connected_clients().is_empty());
    // The Client proved its key, so the Hub told it why (a stranger gets only the generic
    // refusal): it records the revocation and stops dialling instead of retrying for ever.
    let exit = client.ended(SOON).await.unwrap();
    assert_eq!(
        exit,
        Exit::Revoked {
            reason: "while down".into()
        }
    );
    let dir = client.state_dir();
    assert_eq!(
        std::fs::read_to_string(dir.join(REVOKED_MARKER)).unwrap(),
        "while down"
    );
    assert_eq!(Status::read(&dir).unwrap().state, State::Revoked);
    let refusals = count(&hub.audit, is(Event::HandshakeRefused));
    assert!(matches!(
        client.run_once(SOON).await,
        Err(ClientError::RevokedEarlier(_))
    ));
    assert_eq!(
        count(&hub.audit, is(Event::HandshakeRefused)),
        refusals,
        "a restart does not touch the network"
    );
}

/// The outbox is persisted: a webhook the Hub could not deliver before it stopped is delivered
/// by the restarted Hub — the receiver accepts nothing until the first Hub is gone, so the
/// delivery can only come from the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_a_webhook_undelivered_before_a_hub_restart_is_delivered_after_it() {
    let receiver = Receiver::start_closed().await;
    let mut hub = TestHub::start_custom(
        &[],
        "[webhooks]\ndanger_allow_private_targets = true\nretry_initial_ms = 200\nretry_max_ms = 400\n",
    )
    .await;
    let token = hub.token_with_webhook("acme", &receiver.url);
    let _client = TestClient::enrol_with(&hub, &token, &[("db", "127.0.0.1:9".into())]).await;
    admin::revoke(&hub.state_dir(), "acme", "contract ended").unwrap();
    poll_until("a refused delivery", SOON, || {
        !receiver.deliveries().is_empty()
    })
    .await;
    hub.stop().await;
    let refused = receiver.deliveries();
    assert!(refused.iter().all(|d| d.status == 503));
    receiver.open();
    hub.restart().await;
    poll_until("the delivery after the restart", SOON, || {
        receiver.deliveries().iter().any(|d| d.status == 200)
    })
    .await;
    let all = receiver.deliveries();
    let ok: Vec<_> = all.iter().filter(|d| d.status == 200).collect();
    assert_eq!(ok.len(), 1, "delivered once");
    assert!(all.len() > refused.len());
    assert!(all[..refused.len()].iter().all(|d| d.status == 503));
    assert_eq!(
        ok[0].headers["webhook-id"], refused[0].headers["webhook-id"],
        "the same persisted event"
    );
}

/// A webhook whose URL is an address the Hub's config refuses (the token's opt-in without the
/// Hub's) is refused once and parked, not retried `max_attempts` times against a refusal no
/// retry can change; a restart with the opt-in delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_a_webhook_the_hubs_config_refuses_is_parked_until_a_restart_that_allows_it() {
    let receiver = Receiver::start(Vec::new()).await;
    let fast = "[webhooks]\nretry_initial_ms = 50\nretry_max_ms = 100\n";
    let mut hub = TestHub::start_custom(&[], fast).await;
    let token = hub.token_with_webhook("acme", &receiver.url);
    let _client = TestClient::enrol_with(&hub, &token, &[("db", "127.0.0.1:9".into())]).await;
    // Beside it, one whose URL names the same receiver by a name: refused too, but retried
    // (DNS can change). Its retries are the clock this test reads.
    let by_name = receiver.url.replace("127.0.0.1", "localhost");
    let beta = hub.token_with_webhook("beta", &by_name);
    let _beta = TestClient::enrol_with(&hub, &beta, &[("db", "127.0.0.1:9".into())]).await;
    let failed_for = |name: &'static str| {
        move |r: &ewii_common::audit::AuditRecord| {
            r.event == Event::WebhookFailed && r.reason.as_deref().is_some_and(|x| x.contains(name))
        }
    };
    admin::revoke(&hub.state_dir(), "beta", "contract ended").unwrap();
    admin::revoke(&hub.state_dir(), "acme", "contract ended").unwrap();
    let parked = hub
        .wait_audit("the refused attempt", failed_for("to http://127.0.0.1"))
        .await;
    let reason = parked.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("attempt 1 of 30")
            && reason.contains("not a public address")
            && reason.contains("not tried again before the Hub restarts"),
        "{reason}"
    );
    // Three more retries of the other: a retried refusal would have been tried again by now.
    let retried = count(&hub.audit, failed_for("to http://localhost"));
    poll_until("three more retries of the name", SOON, || {
        count(&hub.audit, failed_for("to http://localhost")) >= retried + 3
    })
    .await;
    assert_eq!(
        count(&hub.audit, failed_for("to http://127.0.0.1")),
        1,
        "tried once"
    );
    assert!(receiver.deliveries().is_empty(), "nothing was sent");

    hub.restart_with(&format!("{fast}danger_allow_private_targets = true\n"))
        .await;
    let acme = || {
        receiver
            .deliveries()
            .into_iter()
            .filter(|d| {
                serde_json::from_slice::<serde_json::Value>(&d.body)
                    .is_ok_and(|b| b["data"]["name"] == "acme")
            })
            .collect::<Vec<_>>()
    };
    poll_until("the delivery after the restart", SOON, || {
        acme().iter().any(|d| d.status == 200)
    })
    .await;
    assert_eq!(acme().len(), 1, "delivered once");
    let ok = hub
        .wait_audit("the delivery's record", |r| {
            r.event == Event::WebhookDelivered
                && r.reason
                    .as_deref()
                    .is_some_and(|x| x.contains("to http://127.0.0.1"))
        })
        .await;
    assert!(
        ok.reason.as_deref().is_some_and(|r| r.contains("HTTP 200")),
        "{ok:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_webhook_arrives_exactly_once_across_failures_and_a_hub_restart_and_verifies() {
    let receiver = Receiver::start(vec![500, 503]).await;
    let mut hub = TestHub::start_custom(
        &[],
        "[webhooks]\ndanger_allow_private_targets = true\nretry_initial_ms = 300\nretry_max_ms = 600\n",
    )
    .await;
    let token = hub.token_with_webhook("acme", &receiver.url);
    let key = token
        .webhook_public_key
        .clone()
        .expect("a webhook key is printed");
    let mut client = TestClient::enrol_with(&hub, &token, &[("db", "127.0.0.1:9".into())]).await;
    client.start();
    hub.wait_connected("acme").await;
    admin::revoke(&hub.state_dir(), "acme", "contract ended").unwrap();
    poll_until("the first failed delivery", SOON, || {
        !receiver.deliveries().is_empty()
    })
    .await;
    hub.restart().await;
    poll_until("a successful delivery", SOON, || {
        receiver.deliveries().iter().any(|d| d.status == 200)
    })
    .await;
    // A second event after the first succeeded: once it is delivered, the outbox has run
    // past the first one again — which must not have been sent a second time.
    let token_b = hub.token_with_webhook("beta", &receiver.url);
    let _b = TestClient::enrol_with(&hub, &token_b, &[("db", "127.0.0.1:9".into())]).await;
    admin::revoke(&hub.state_dir(), "beta", "second event").unwrap();
    poll_until("the second event delivered", SOON, || {
        receiver
            .deliveries()
            .iter()
            .filter(|d| d.status == 200)
            .count()
            == 2
    })
    .await;

    let all = receiver.deliveries();
    let first_id = all[0].headers["webhook-id"].clone();
    let acme: Vec<_> = all
        .iter()
        .filter(|d| d.headers["webhook-id"] == first_id)
        .collect();
    let statuses: Vec<u16> = acme.iter().map(|d| d.status).collect();
    assert_eq!(
        statuses,
        [500, 503, 200],
        "retried with one id, acknowledged once"
    );
    assert!(all
        .iter()
        .all(|d| d.body == acme[0].body || d.headers["webhook-id"] != first_id));
    let ok = acme[2];
    let body: serde_json::Value = serde_json::from_slice(&ok.body).unwrap();
    assert_eq!(body["type"], "client.revoked");
    assert_eq!(
        body["data"]["client"],
        "spiffe://test.ewii.local/client/acme"
    );
    assert_eq!(body["data"]["reason"], "contract ended");
    let ts = ok.headers["webhook-timestamp"].clone();
    let sig = ok.headers["webhook-signature"].clone();
    let now: i64 = ts.parse().unwrap();
    assert_eq!(
        ewii::webhook::verify(&key, &first_id, &ts, &sig, &ok.body, now),
        Ok(())
    );
    let mut tampered = ok.body.clone();
    tampered[10] ^= 1;
    assert_eq!(
        ewii::webhook::verify(&key, &first_id, &ts, &sig, &tampered, now),
        Err(ewii::webhook::WebhookError::BadSignature)
    );
    assert_eq!(
        ewii::webhook::verify(&key, &first_id, &ts, &sig, &ok.body, now + 301),
        Err(ewii::webhook::WebhookError::Stale(301))
    );
    // The customer's verifier, as shipped.
    let body_file = hub.dir.path().join("body.json");
    std::fs::write(&body_file, &ok.body).unwrap();
    let verify_in = |cwd: &Path, file: &Path, extra: &[&str]| {
        Command::new(bin_path("ewii-client"))
            .current_dir(cwd)
            .args([
                "verify-webhook",
                "--key",
                &key,
                "--id",
                &first_id,
                "--timestamp",
                &ts,
            ])
            .args(["--signature", &sig, "--body", file.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let verify_with = |file: &Path, extra: &[&str]| verify_in(hub.dir.path(), file, extra);
    let verify = |file: &Path| verify_with(file, &[]);
    assert_eq!(verify(&body_file).status.code(), Some(0));
    // With a file of verified ids, the same delivery verifies once: its retry (or a replay)
    // is reported as a duplicate (exit 6).
    let seen = hub.dir.path().join("seen-ids");
    let with_seen = || verify_with(&body_file, &["--seen", seen.to_str().unwrap()]);
    assert_eq!(with_seen().status.code(), Some(0));
    let again = with_seen();
    assert_eq!(again.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&again.stderr).contains("DUPLICATE"));
    assert_eq!(std::fs::read_to_string(&seen).unwrap().lines().count(), 1);
    // A bare file name: kept in the working directory (where a receiver's script runs).
    let cwd = tempfile::tempdir().unwrap();
    let bare = || verify_in(cwd.path(), &body_file, &["--seen", "seen-ids"]);
    let first = bare();
    assert_eq!(
        first.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(bare().status.code(), Some(6));
    assert!(cwd.path().join("seen-ids").exists());
    // The Hub signs every customer's notices with one key: a receiver that names its Clients
    // refuses a genuine delivery about another (a customer passing its own on), before its id
    // is kept.
    let acme = "spiffe://test.ewii.local/client/acme";
    let ours = verify_with(
        &body_file,
        &["--client", "spiffe://x/client/y", "--client", acme],
    );
    assert_eq!(ours.status.code(), Some(0));
    let other_seen = hub.dir.path().join("other-seen-ids");
    let theirs = verify_with(
        &body_file,
        &[
            "--client",
            "spiffe://test.ewii.local/client/beta",
            "--seen",
            other_seen.to_str().unwrap(),
        ],
    );
    assert_eq!(theirs.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&theirs.stderr).contains(&format!(
            "INVALID: the delivery is about {acme}, which is not one of this receiver's Clients"
        )),
        "{}",
        String::from_utf8_lossy(&theirs.stderr)
    );
    assert!(!other_seen.exists());
    std::fs::write(&body_file, &tampered).unwrap();
    let bad = verify(&body_file);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("INVALID"));
    // Both failures and the delivery are audited.
    assert_eq!(count(&hub.audit, is(Event::WebhookFailed)), 2);
    client.stop().await;
}

/// A webhook URL naming one of the Hub host's own public addresses would have the Hub deliver
/// to its own listeners from inside (a service listener: another customer's destination), past
/// any firewall in front of them: refused, as a private address is, by each delivery's check
/// and by `token create`'s. In a network namespace of its own, with a public address on its
/// loopback interface (P10).
#[test]
fn p10_a_webhook_to_the_hubs_own_public_address_is_refused() {
    use crate::netns::{in_own_netns, run, skip_or_fail};
    use ewii::webhook::{check_target, check_url_now, WebhookError};
    skip_or_fail(in_own_netns(|| async {
        if let Err(why) = run("ip", &["addr", "add", "45.45.45.45/32", "dev", "lo"]) {
            return Some(why);
        }
        let listener = std::net::TcpListener::bind("45.45.45.45:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let own: std::net::IpAddr = "45.45.45.45".parse().unwrap();
        assert_eq!(
            check_target(&url, false).await,
            Err(WebhookError::OwnAddress(own))
        );
        let err = check_url_now(&url, false).unwrap_err();
        assert!(err.contains("an address of this host"), "{err}");
        // With the opt-in, as for any private target; an address not on this host is not
        // refused for it.
        assert!(check_target(&url, true).await.is_ok());
        assert!(check_target("http://46.46.46.46/hook", false).await.is_ok());
        assert!(check_url_now("http://46.46.46.46/hook", false).is_ok());
        None
    }));
}

#[tokio::test]
async fn p10_a_webhook_attempt_in_flight_at_a_hub_stop_is_finished_recorded_and_not_sent_again() {
    // The customer's endpoint holds its answer until the Hub is stopping.
    let receiver = Receiver::start_held().await;
    let mut hub =
        TestHub::start_custom(&[], "[webhooks]\ndanger_allow_private_targets = true\n").await;
    let token = hub.token_with_webhook("acme", &receiver.url);
    let _client = TestClient::enrol_with(&hub, &token, &[("db", "127.0.0.1:9".into())]).await;
    // A Client whose session shows when the Hub has begun to stop (it closes its endpoint
    // after it told the outbox to stop).
    let watcher = TestClient::enrol_and_run(&hub, "watcher", &[("db", "127.0.0.1:9".into())]).await;
    hub.wait_connected("watcher").await;
    admin::revoke(&hub.state_dir(), "acme", "contract ended").unwrap();
    poll_until("the attempt in flight", SOON, || {
        !receiver.deliveries().is_empty()
    })
    .await;
    // The stop is under way when the answer comes.
    tokio::join!(hub.stop(), async {
        watcher
            .wait_audit("the Hub closing its endpoint", is(Event::SessionLost))
            .await;
        receiver.release();
    });
    assert_eq!(
        count(&hub.audit, is(Event::WebhookDelivered)),
        1,
        "the attempt in flight is audited before the Hub ends"
    );
    // The restarted Hub does not send it again: once a later event is delivered, the outbox
    // has been past the first one.
    hub.restart().await;
    let token_b = hub.token_with_webhook("beta", &receiver.url);
    let _b = TestClient::enrol_with(&hub, &token_b, &[("db", "127.0.0.1:9".into())]).await;
    admin::revoke(&hub.state_dir(), "beta", "second event").unwrap();
    poll_until("the second event's attempt", SOON, || {
        receiver.deliveries().len() >= 2
    })
    .await;
    receiver.release();
    poll_until("the second event delivered", SOON, || {
        count(&hub.audit, is(Event::WebhookDelivered)) == 2
    })
    .await;
    let ids: Vec<String> = receiver
        .deliveries()
        .iter()
        .map(|d| d.headers["webhook-id"].clone())
        .collect();
    assert_eq!(ids.len(), 2, "each event sent once: {ids:?}");
    assert_ne!(ids[0], ids[1]);
}

/// A delivered notice whose outcome the Hub's database refuses (a full disk; here a trigger)
/// is not sent again: its outcome is stored once the database takes it. The row stayed due
/// and was re-sent about every second, the same `webhook-id` to a receiver that had answered
/// 2xx each time, each with its own `webhook_delivered` record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_a_delivered_webhook_whose_outcome_cannot_be_stored_is_not_sent_again() {
    let receiver = Receiver::start(Vec::new()).await;
    let hub = TestHub::start_custom(&[], "[webhooks]\ndanger_allow_private_targets = true\n").await;
    let token = hub.token_with_webhook("acme", &receiver.url);
    let _client = TestClient::enrol_with(&hub, &token, &[("db", "127.0.0.1:9".into())]).await;
    let db = rusqlite::Connection::open(hub.state_dir().join(admin::DB_FILE)).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse BEFORE UPDATE OF delivered_at ON webhooks BEGIN SELECT RAISE(ABORT, 'disk full'); END",
    )
    .unwrap();
    admin::revoke(&hub.state_dir(), "acme", "contract ended").unwrap();
    hub.wait_audit("the delivery", is(Event::WebhookDelivered))
        .await;
    // Several of the old retry's seconds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(receiver.deliveries().len(), 1, "sent once");
    assert_eq!(count(&hub.audit, is(Event::WebhookDelivered)), 1);
    db.execute_batch("DROP TRIGGER refuse").unwrap();
    poll_until("the outcome stored", SOON, || {
        db.query_row("SELECT delivered_at IS NOT NULL FROM webhooks", [], |r| {
            r.get::<_, bool>(0)
        })
        .unwrap_or(false)
    })
    .await;
    assert_eq!(receiver.deliveries().len(), 1, "and never again");
}

/// One customer's endpoint that holds its answer (up to the 10 s request bound) holds up only
/// its own delivery: another customer's revocation notice, queued after it, is delivered while
/// the first attempt still waits. Before, the outbox sent one delivery at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_a_slow_webhook_endpoint_does_not_hold_up_another_customers_notice() {
    let slow = Receiver::start_held().await;
    let quick = Receiver::start(Vec::new()).await;
    let hub = TestHub::start_custom(&[], "[webhooks]\ndanger_allow_private_targets = true\n").await;
    let mut clients = Vec::new();
    for (name, receiver) in [("acme", &slow), ("beta", &quick)] {
        let token = hub.token_with_webhook(name, &receiver.url);
        clients.push(TestClient::enrol_with(&hub, &token, &[("db", "127.0.0.1:9".into())]).await);
    }
    let about = |url: &str, event: Event| {
        let url = url.to_owned();
        move |r: &ewii_common::audit::AuditRecord| {
            r.event == event && r.reason.as_deref().is_some_and(|x| x.contains(&url))
        }
    };
    admin::revoke(&hub.state_dir(), "acme", "contract ended").unwrap();
    poll_until("the slow endpoint's attempt in flight", SOON, || {
        !slow.deliveries().is_empty()
    })
    .await;
    admin::revoke(&hub.state_dir(), "beta", "contract ended").unwrap();
    hub.wait_audit(
        "the other customer's delivery",
        about(&quick.url, Event::WebhookDelivered),
    )
    .await;
    for event in [Event::WebhookDelivered, Event::WebhookFailed] {
        assert_eq!(
            count(&hub.audit, about(&slow.url, event)),
            0,
            "the slow endpoint has not answered yet"
        );
    }
    assert_eq!(quick.deliveries().len(), 1);
    slow.release();
    hub.wait_audit(
        "the slow endpoint's delivery",
        about(&slow.url, Event::WebhookDelivered),
    )
    .await;
    assert_eq!(slow.deliveries().len(), 1, "sent once");
}

/// At most 4 attempts to one URL at once: a customer with many notices waiting (six Clients
/// revoked together, one endpoint that holds its answers) takes 4 of the outbox's places, and
/// the fifth attempt starts when one of them ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_webhook_attempts_to_one_url_are_at_most_four_at_once() {
    let slow = Receiver::start_held().await;
    let quick = Receiver::start(Vec::new()).await;
    let hub = TestHub::start_custom(&[], "[webhooks]\ndanger_allow_private_targets = true\n").await;
    let mut clients = Vec::new();
    for n in 0..6 {
        let token = hub.token_with_webhook(&format!("c{n}"), &slow.url);
        clients.push(TestClient::enrol_with(&hub, &token, &[("db", "127.0.0.1:9".into())]).await);
    }
    let token = hub.token_with_webhook("other", &quick.url);
    clients.push(TestClient::enrol_with(&hub, &token, &[("db", "127.0.0.1:9".into())]).await);
    for n in 0..6 {
        admin::revoke(&hub.state_dir(), &format!("c{n}"), "fleet retired").unwrap();
    }
    poll_until("four attempts held", SOON, || slow.deliveries().len() >= 4).await;
    // Another customer's notice goes through meanwhile; by its record the outbox has looked
    // at the waiting rows again.
    admin::revoke(&hub.state_dir(), "other", "contract ended").unwrap();
    hub.wait_audit("the other customer's delivery", |r| {
        r.event == Event::WebhookDelivered
            && r.reason.as_deref().is_some_and(|x| x.contains(&quick.url))
    })
    .await;
    assert_eq!(slow.deliveries().len(), 4, "at most 4 to one URL");
    slow.release();
    poll_until("the fifth attempt", SOON, || slow.deliveries().len() == 5).await;
    for _ in 0..5 {
        slow.release();
    }
    poll_until("all six delivered", SOON, || {
        count(&hub.audit, |r| {
            r.event == Event::WebhookDelivered
                && r.reason.as_deref().is_some_and(|x| x.contains(&slow.url))
        }) == 6
    })
    .await;
    assert_eq!(slow.deliveries().len(), 6, "each sent once");
}

#[tokio::test]
async fn p7_an_svid_that_expires_without_renewal_stops_the_client_plainly() {
    let mut hub = TestHub::start_with(&[], 4).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    hub.stop().await; // the Hub is away for the SVID's whole lifetime
    client.start();
    let exit = client.ended(SOON).await.unwrap();
    assert_eq!(exit, Exit::Expired);
    let status = Status::read(&client.state_dir()).unwrap();
    assert_eq!(status.state, State::Expired);
    let r = client
        .wait_audit("svid_expired", is(Event::SvidExpired))
        .await;
    assert!(r.reason.unwrap().contains("enrol again"));
    // A restart says so at once.
    let again = client.run_once(Duration::from_secs(2)).await;
    assert!(
        matches!(again, Err(ClientError::SvidExpired(_))),
        "{again:?}"
    );
}

/// A reload of the trust material that fails is tried again every second until one succeeds,
/// and audited once: here a bundle file without the signing CA (an operator's edit halfway),
/// taken when a commit of another process wakes the Hub, then put right with no further commit
/// to wake it. Before, the Hub kept the old material until the next change to its database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_a_failed_trust_reload_is_tried_again_until_it_succeeds() {
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let state = hub.state_dir();
    let ca = ewii::identity::ca::Ca::load(&state).unwrap();
    let other = ewii::identity::ca::Ca::generate(TD).unwrap();
    let bundle = state.join(admin::BUNDLE_FILE);
    let write = |certs: &[rustls::pki_types::CertificateDer<'static>]| {
        store::write_file(&bundle, store::Pem::certs(certs).as_bytes(), 0o644).unwrap();
    };
    write(std::slice::from_ref(other.cert()));
    // A commit by another process (a token) is what wakes the Hub to reload.
    admin::create_token(&state, "beta", Duration::from_secs(600), None, false).unwrap();
    hub.wait_audit("the failed reload", |r| {
        r.event == Event::BundleUpdated
            && r.outcome == Some(Outcome::Failed)
            && r.reason.as_deref()
                == Some("the bundle does not contain the signing CA; not reloading")
    })
    .await;
    // Two more tries fail the same way (`RELOAD_RETRY`: one second apart).
    let first = hub.handle().trust_reloads_failed();
    poll_until("two more failed tries", SOON, || {
        hub.handle().trust_reloads_failed() >= first + 2
    })
    .await;
    write(&[ca.cert().clone(), other.cert().clone()]);
    hub.wait_audit(
        "the reload tried again",
        says(Event::BundleUpdated, "2 trust anchor(s); pushed to"),
    )
    .await;
    let failures = hub
        .audit
        .records()
        .iter()
        .filter(|r| r.event == Event::BundleUpdated && r.outcome == Some(Outcome::Failed))
        .count();
    assert_eq!(failures, 1, "one record for one reason, however many tries");
}

/// `ca prepare`, `ca activate`, and the running Hub signing with the new CA.
async fn next_ca_signs(hub: &TestHub) {
    let state = hub.state_dir();
    admin::ca_prepare(&state).unwrap();
    admin::ca_activate(&state).unwrap();
    hub.wait_audit(
        "the Hub signs with the new CA",
        says(Event::BundleUpdated, "new signing CA"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_p15_a_forced_ca_retirement_ends_the_live_sessions_of_old_ca_svids_at_once() {
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    // `acme` holds an SVID from the first CA, and runs.
    let mut acme = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    let old = Svid::load(&acme.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let serial = inspect_leaf(&old.chain[0]).unwrap().serial;
    acme.start();
    hub.wait_connected("acme").await;
    let state = hub.state_dir();
    let old_ca = store::read_certs(&state.join("ca.pem")).unwrap();
    next_ca_signs(&hub).await;
    // `beta` enrols after the activation: its SVID is from the new CA.
    let beta = TestClient::enrol(&hub, "beta", &[("db", echo.to_string())]).await;
    let new = Svid::load(&beta.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let mut beta_session = raw_session(&hub, &new).await.expect("a new-CA session");

    // The operator drops the old CA before `acme` renewed (a compromised CA, say).
    assert!(
        admin::ca_retire(&state, false).is_err(),
        "acme holds an old-CA SVID"
    );
    // (The list may name `beta` too: a Client issued within 10 s after the activation counts as
    // possibly old, signed before the running Hub took the new CA.)
    let stale = admin::ca_retire(&state, true).unwrap();
    assert!(stale.contains(&"acme".to_owned()), "{stale:?}");
    let vouch = format!("untrusted: the bundle of {TD} no longer vouches for serial {serial}");
    hub.wait_audit("acme's session ended", says(Event::SessionLost, &vouch))
        .await;
    let reload = hub
        .wait_audit(
            "the reload",
            says(
                Event::BundleUpdated,
                "1 trust anchor(s); pushed to 2 live session(s), 2 re-checked",
            ),
        )
        .await;
    // The Hub's record names the CA that left, as the Client's does.
    assert!(
        reload
            .reason
            .as_deref()
            .is_some_and(|r| r.ends_with(&format!(
                "; removed {}",
                ewii::identity::bundle_hash(&old_ca[0])
            ))),
        "{reload:?}"
    );
    // The customer's side says why in its own record…
    acme.wait_audit(
        "acme's own record",
        says(
            Event::SessionLost,
            "untrusted: closed by the Hub (its SVID's CA is no longer trusted",
        ),
    )
    .await;
    // …and the way back is refused: the Hub no longer trusts that SVID.
    assert!(raw_session(&hub, &old).await.is_none());
    // The new-CA session took the same re-check and goes on.
    assert!(beta_session.ping().await, "a new-CA session was cut");
    acme.stop().await;
}

/// A TLS service's caller through a CA rotation, in the operator guide's order: `ca prepare`,
/// then `workload-svid` (its `bundle.pem` holds both CAs), then `ca activate`: the caller still
/// reaches the Hub, which now presents a certificate from the new CA. A `bundle.pem` with the
/// signing CA alone, as `workload-svid` wrote before, is refused by the caller (P15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p15_a_workload_svid_issued_after_prepare_still_trusts_the_hub_after_activate() {
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tls("pg-tls", "acme", "db")]).await;
    let mut client = TestClient::enrol_and_run(&hub, "acme", &[("db", echo.to_string())]).await;
    hub.wait_connected("acme").await;
    let state = hub.state_dir();
    admin::ca_prepare(&state).unwrap();
    let dir = hub.dir.path().join("billing");
    admin::issue_workload_svid(&state, "billing", Duration::from_secs(3600), &dir).unwrap();
    assert_eq!(
        store::read_certs(&dir.join(store::BUNDLE)).unwrap(),
        store::read_certs(&state.join(admin::BUNDLE_FILE)).unwrap(),
        "the caller's bundle is the Hub's, both CAs"
    );
    admin::ca_activate(&state).unwrap();
    hub.wait_audit(
        "the Hub signs with the new CA",
        says(Event::BundleUpdated, "new signing CA"),
    )
    .await;
    let mut caller = tls_caller(hub.service("pg-tls"), &dir, TD)
        .await
        .expect("the caller trusts the Hub's new certificate");
    caller.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(SOON, caller.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping");
    client.stop().await;
}

/// A requester's TLS connection rests on its workload SVID as a Client's session rests on its
/// own: when that SVID's CA leaves the bundle (a leaked CA key, retired by force), a connection
/// it opened before is cut at once instead of staying open until the requester closes it, and
/// the Hub's record says why, with the bytes moved so far. A caller whose SVID is from the new
/// CA goes on (P8, P11, P15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_p11_p15_a_forced_ca_retirement_cuts_the_live_tls_queries_of_old_ca_callers() {
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tls("pg-tls", "acme", "db")]).await;
    let state = hub.state_dir();
    let issue = |dir: &str| {
        let dir = hub.dir.path().join(dir);
        admin::issue_workload_svid(&state, "billing", Duration::from_secs(3600), &dir).unwrap();
        dir
    };
    let old = issue("billing-old-ca");
    next_ca_signs(&hub).await;
    // The Client enrols after the activation: its SVID, and so its session, is the new CA's.
    let mut client = TestClient::enrol_and_run(&hub, "acme", &[("db", echo.to_string())]).await;
    hub.wait_connected("acme").await;
    // (One that expires while its connection lives is judged by its anchors alone too:
    // `hub::trust::tests::p15_an_expired_workload_svid_…`.)
    let new = issue("billing-new-ca");
    // The old caller learnt the bundle with both CAs, as it would from the operator: the Hub's
    // own SVID is the new CA's now.
    std::fs::copy(new.join(store::BUNDLE), old.join(store::BUNDLE)).unwrap();
    async fn echoes(s: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin), what: &[u8]) {
        s.write_all(what).await.unwrap();
        let mut back = vec![0; what.len()];
        tokio::time::timeout(SOON, s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, what);
    }
    let mut before = tls_caller(hub.service("pg-tls"), &old, TD).await.unwrap();
    let mut after = tls_caller(hub.service("pg-tls"), &new, TD).await.unwrap();
    echoes(&mut before, b"old ca").await;
    echoes(&mut after, b"the new ca").await;

    admin::ca_retire(&state, true).unwrap();
    let cut = hub
        .wait_audit("the old-CA caller's query cut", |r| {
            r.event == Event::Query && r.outcome == Some(Outcome::Refused)
        })
        .await;
    let reason = cut.reason.as_deref().unwrap_or_default();
    assert!(
        reason.starts_with("untrusted: the bundle no longer vouches for the caller's SVID"),
        "{reason}"
    );
    assert_eq!(
        cut.source.as_deref(),
        Some("spiffe://test.ewii.local/workload/billing")
    );
    assert_eq!((cut.bytes_up, cut.bytes_down), (Some(6), Some(6)));
    // The requester sees its connection end: nothing more comes back.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(SOON, before.read_to_end(&mut rest)).await;
    assert!(
        matches!(&ended, Ok(Err(_)) | Ok(Ok(0))),
        "{ended:?} {rest:?}"
    );
    // The Client's side of it: the stream was reset under it.
    let theirs = client
        .wait_audit("the Client's record of the cut query", |r| {
            r.event == Event::Query && r.outcome == Some(Outcome::Failed)
        })
        .await;
    assert_eq!(theirs.query_id, cut.query_id);
    // The new CA's caller is not touched.
    echoes(&mut after, b"still here").await;
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p15_the_ca_rotates_with_an_overlap_and_clients_follow_over_the_control_stream() {
    use ewii::identity::verify::{Bundle, Expect, SpiffeVerifier};

    let echo = echo_server().await;
    let hub = TestHub::start_with(&[Service::tcp("pg", "acme", "db")], 4).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    let first = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    client.start();
    hub.wait_connected("acme").await;
    let dir = client.state_dir();
    let anchors = || store::read_certs(&dir.join(store::BUNDLE)).unwrap();
    assert_eq!(anchors().len(), 1);

    // 1. Prepare: the next CA is published; the live Client receives it on its control stream.
    assert!(
        admin::ca_retire(&hub.state_dir(), false).is_err(),
        "nothing to retire yet"
    );
    admin::ca_prepare(&hub.state_dir()).unwrap();
    let old_ca = anchors()[0].clone();
    let prepared = client
        .wait_audit("bundle update", |r| {
            r.event == Event::BundleUpdated
                && r.reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("2 trust anchor(s)"))
        })
        .await;
    assert_eq!(anchors().len(), 2);
    let new_ca = anchors()[1].clone();
    // The customer's record names the CA its Client trusts from now on.
    let hash = ewii::identity::bundle_hash;
    assert_eq!(
        prepared.reason.as_deref(),
        Some(format!("2 trust anchor(s); added {}", hash(&new_ca)).as_str())
    );

    // 2. Activate: the running Hub (no restart) reloads its own SVID, now issued by the new
    //    CA, and presents it to the next handshake; the live session goes on. The overlap
    //    lets a new-CA Hub SVID and an old-CA Client SVID through.
    assert!(
        !hub_presents(&hub, &new_ca).await,
        "still the old CA's SVID"
    );
    admin::ca_activate(&hub.state_dir()).unwrap();
    let deadline = Instant::now() + SOON;
    while !hub_presents(&hub, &new_ca).await {
        assert!(
            Instant::now() < deadline,
            "the Hub never presented its new-CA SVID"
        );
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(
        count(&client.audit, is(Event::SessionUp)),
        1,
        "no reconnection was needed"
    );
    let data = b"during the overlap".to_vec();
    let mut s = TcpStream::connect(hub.service("pg")).await.unwrap();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, data);

    // 3. The Client's next renewal comes from the new CA.
    let only_new = SpiffeVerifier::new(Bundle::new(vec![new_ca.clone()]), TD, Expect::Client);
    poll_until("an SVID from the new CA", Duration::from_secs(20), || {
        Svid::load(&dir, store::SVID_CERT, store::SVID_KEY)
            .ok()
            .is_some_and(|s| {
                only_new
                    .verify_chain(&s.chain[0], &[], rustls::pki_types::UnixTime::now())
                    .is_ok()
            })
    })
    .await;

    // 4. Retire: allowed once no Client holds an old-CA SVID; the Client drops the old CA.
    let state = hub.state_dir();
    assert!(state.join("ca-previous.key").exists(), "kept until retire");
    poll_until("retire to be allowed", Duration::from_secs(20), || {
        admin::ca_retire(&state, false).is_ok()
    })
    .await;
    assert!(
        !state.join("ca-previous.key").exists(),
        "retire removes the old CA's key"
    );
    let retired = format!("1 trust anchor(s); removed {}", hash(&old_ca));
    client
        .wait_audit("bundle of one", |r| {
            r.event == Event::BundleUpdated && r.reason.as_deref() == Some(retired.as_str())
        })
        .await;
    assert_eq!(anchors(), vec![new_ca]);
    // The old-CA SVID is refused now; the Client keeps working.
    assert!(raw_session(&hub, &first).await.is_none());
    assert!(try_roundtrip(hub.service("pg"), b"after retirement")
        .await
        .is_ok());
    client.stop().await;
}

/// Whether the Hub at `hub.addr` presents an SVID that chains to `anchor` (a handshake
/// without a client certificate: the server's certificate is checked all the same).
async fn hub_presents(hub: &TestHub, anchor: &rustls::pki_types::CertificateDer<'static>) -> bool {
    use ewii::identity::verify::{Bundle, Expect, SpiffeVerifier};
    let verifier = SpiffeVerifier::new(Bundle::new(vec![anchor.clone()]), TD, Expect::Hub);
    let tls =
        transport::tls_client_config(None, Arc::new(verifier), ewii_common::frame::ALPN).unwrap();
    let quic = transport::quic_client_config(
        tls,
        transport::MAX_CONCURRENT_QUERIES,
        transport::STREAM_WINDOW,
    )
    .unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let ok = match endpoint.connect_with(quic, hub.addr, "hub") {
        Ok(connecting) => tokio::time::timeout(SOON, connecting)
            .await
            .is_ok_and(|c| c.is_ok()),
        Err(_) => false,
    };
    endpoint.close(0u32.into(), b"");
    ok
}

#[tokio::test]
async fn p8_a_stolen_older_key_cannot_renew_once_the_newer_serial_is_in_use() {
    let hub = hub_renewing_at_once(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let first = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    // The thief connects with the first key and keeps the connection.
    let mut thief = raw_session(&hub, &first).await.expect("thief session");
    // The Client renews on its own connection and moves to the new serial.
    let mut owner = raw_session(&hub, &first).await.expect("owner session");
    let _new = move_to_a_new_serial(&hub, &mut owner).await;
    // The thief asks for a fresh certificate on the old connection: refused.
    let key3 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key3)
        .unwrap();
    let renew = Control::Renew {
        csr: csr.der().to_vec(),
    };
    transport::write_frame(&mut thief.send, &renew)
        .await
        .unwrap();
    let answer = thief.reader.read::<Control>(&mut thief.recv).await.unwrap();
    assert!(
        matches!(answer, Some(Control::Refused { .. })),
        "{answer:?}"
    );
    let refusal = hub
        .wait_audit("refused renewal", |r| {
            r.event == Event::SvidRotated && r.outcome == Some(Outcome::Refused)
        })
        .await;
    assert!(
        refusal.reason.unwrap().contains("retired"),
        "only the newest key renews"
    );
}

/// Nor can a stolen older key revoke the identity once the newer serial is in use: its
/// connection, still draining, sends `Goodbye{revoke}`. Refused, on record, and the owner's
/// session on the new serial goes on (P8, P9).
#[tokio::test]
async fn p8_p9_a_stolen_older_key_cannot_revoke_the_identity_once_the_newer_serial_is_in_use() {
    let hub = hub_renewing_at_once(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let first = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let mut thief = raw_session(&hub, &first).await.expect("thief session");
    let mut owner = raw_session(&hub, &first).await.expect("owner session");
    let new = move_to_a_new_serial(&hub, &mut owner).await;
    transport::write_frame(&mut thief.send, &Control::Goodbye { revoke: true })
        .await
        .unwrap();
    let refused = hub
        .wait_audit("the refused revoke", |r| {
            r.event == Event::Revoked && r.outcome == Some(Outcome::Refused)
        })
        .await;
    assert!(
        refused
            .reason
            .as_deref()
            .is_some_and(|x| x.contains("which a newer serial replaced: not revoked")),
        "{refused:?}"
    );
    assert_eq!(
        count(&hub.audit, |r| r.event == Event::Revoked
            && r.outcome == Some(Outcome::Ok)),
        0,
        "the identity is not revoked"
    );
    assert!(
        new.conn.close_reason().is_none(),
        "the owner's session goes on"
    );
}

/// A session that said `Goodbye` without a revoke is no longer routed and drains its queries
/// for up to 10 s; an operator's revocation meanwhile closes it too, at once and with the
/// `REVOKED` code, as it closes every connection of the Client (P10).
#[tokio::test]
async fn p10_a_revoke_closes_a_session_that_is_draining_after_its_goodbye() {
    let hub = TestHub::start(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let mut session = raw_session(&hub, &svid).await.expect("session");
    transport::write_frame(&mut session.send, &Control::Goodbye { revoke: false })
        .await
        .unwrap();
    // The Hub took it: it finishes its side of the control stream.
    let ack = session.reader.read::<Control>(&mut session.recv).await;
    assert!(matches!(ack, Ok(None)), "{ack:?}");
    assert_eq!(
        session.closed_by_a_revocation_of(&hub, "acme").await,
        Some(transport::codes::REVOKED.into_inner()),
        "closed for the revocation, not at the end of its drain"
    );
    hub.wait_audit("the session closed for it", |r| {
        r.event == Event::Revoked
            && r.reason.as_deref() == Some("live session closed: contract ended")
    })
    .await;
    // And its end says so: not "the Client stopped".
    hub.wait_audit("its session_lost", says(Event::SessionLost, "revoked: "))
        .await;
}

#[tokio::test]
async fn p10_a_revoke_closes_every_connection_of_the_client_also_a_draining_one() {
    let hub = hub_renewing_at_once(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let first = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    // A stolen copy of the key holds a second connection with the same serial.
    let stolen = raw_session(&hub, &first).await.expect("stolen session");
    let mut old = raw_session(&hub, &first).await.expect("first session");
    // The Client renews and moves to the new serial: the old connections drain.
    let new = move_to_a_new_serial(&hub, &mut old).await;
    assert_eq!(
        hub.handle().connections(),
        3,
        "the old ones drain, still open"
    );

    let t0 = Instant::now();
    assert!(
        admin::revoke(&hub.state_dir(), "acme", "contract ended")
            .unwrap()
            .revoked
    );
    for (what, conn) in [
        ("new", &new.conn),
        ("draining", &old.conn),
        ("stolen", &stolen.conn),
    ] {
        let closed = tokio::time::timeout(SOON, conn.closed()).await.unwrap();
        match closed {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, transport::codes::REVOKED, "{what}");
                assert_eq!(&close.reason[..], b"contract ended", "{what}");
            }
            other => panic!("{what} connection: {other:?}"),
        }
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    poll_until("no connection left", SOON, || {
        hub.handle().connections() == 0
    })
    .await;
    // Each connection is closed first, its record written after: wait for the three, then
    // check there is no fourth.
    let closed = || {
        count(&hub.audit, |r| {
            r.event == Event::Revoked
                && r.reason.as_deref() == Some("live session closed: contract ended")
        })
    };
    poll_until("each connection's closing audited", SOON, || closed() >= 3).await;
    assert_eq!(closed(), 3, "each connection's closing is audited once");
}

/// DESIGN §6: on SIGTERM a query in flight finishes within the drain bound, a new one is
/// refused, and the Client exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_stop_lets_a_query_in_flight_finish_and_refuses_new_ones() {
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    client.config.on_stop = OnStop::Disconnect;
    client.start();
    hub.wait_connected("acme").await;
    let entry = hub.service("pg");
    let mut long = TcpStream::connect(entry).await.unwrap();
    long.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    long.read_exact(&mut buf).await.unwrap();

    let stopping = tokio::spawn(async move {
        let exit = client.stop().await;
        (exit, client)
    });
    // Goodbye read: the Hub routes nothing new to the Client, and keeps its connection.
    poll_until("the Hub to stop routing to the Client", SOON, || {
        hub.handle().connected_clients().is_empty()
    })
    .await;
    assert_eq!(
        count(&hub.audit, is(Event::SessionLost)),
        0,
        "not closed yet"
    );
    // A new query is refused: nothing reaches the destination.
    requester_gets_nothing(entry, b"late").await;
    hub.wait_audit("the refused late query", |r| {
        r.event == Event::Query && r.outcome != Some(Outcome::Ok)
    })
    .await;
    // The one in flight still works, then ends cleanly.
    long.write_all(b"during").await.unwrap();
    long.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    long.shutdown().await.unwrap();
    let mut rest = Vec::new();
    long.read_to_end(&mut rest).await.unwrap();
    let (exit, client) = tokio::time::timeout(SOON, stopping).await.unwrap().unwrap();
    assert_eq!(exit, Exit::Stopped);
    let q = client
        .wait_audit("the drained query", |r| {
            r.event == Event::Query && r.outcome == Some(Outcome::Ok)
        })
        .await;
    assert_eq!((q.bytes_up, q.bytes_down), (Some(12), Some(12)));
    hub.wait_audit("the Hub's record of it", |r| {
        r.event == Event::Query && r.outcome == Some(Outcome::Ok) && r.bytes_up == Some(12)
    })
    .await;
}

/// Issue 10: a rotation must not cut a long query (database pools keep connections for
/// hours). The renewed SVID is adopted on the live connection; a query kept busy across
/// several rotations moves bytes throughout and ends cleanly while short ones keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_p8_a_query_kept_busy_across_several_rotations_ends_cleanly() {
    let echo = echo_server().await;
    let hub = TestHub::start_with(&[Service::tcp("pg", "acme", "db")], 4).await;
    let mut client = TestClient::enrol_and_run(&hub, "acme", &[("db", echo.to_string())]).await;
    hub.wait_connected("acme").await;
    let entry = hub.service("pg");
    let rotations = |a: &ewii::audit::Audit| {
        count(a, |r| {
            r.event == Event::SvidRotated
                && r.outcome == Some(Outcome::Ok)
                && r.reason.as_deref().is_some_and(|x| x.contains("re-bound"))
        })
    };
    let mut long = TcpStream::connect(entry).await.unwrap();
    let mut moved = 0u64;
    let mut short_ok = 0u32;
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut i = 0u8;
    while rotations(&hub.audit) < 3 {
        assert!(Instant::now() < deadline, "three rotations within 40 s");
        let chunk = [i; 512];
        long.write_all(&chunk).await.unwrap();
        let mut back = [0u8; 512];
        tokio::time::timeout(SOON, long.read_exact(&mut back))
            .await
            .expect("the long query keeps moving bytes")
            .unwrap();
        assert_eq!(back, chunk);
        moved += 512;
        try_roundtrip(entry, &[i; 100]).await.unwrap();
        short_ok += 1;
        i = i.wrapping_add(1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    long.shutdown().await.unwrap();
    let mut rest = Vec::new();
    long.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let q = client
        .wait_audit("the long query's record", |r| {
            r.event == Event::Query && r.bytes_up == Some(moved)
        })
        .await;
    assert_eq!(q.outcome, Some(Outcome::Ok), "{q:?}");
    assert_eq!(q.bytes_down, Some(moved));
    assert!(short_ok >= 3);
    // One connection throughout: the Client brought up one session and lost none.
    assert_eq!(count(&client.audit, is(Event::SessionUp)), 1);
    assert_eq!(count(&client.audit, is(Event::SessionLost)), 0);
    assert!(count(&client.audit, is(Event::SvidRotated)) >= 3);
    client.stop().await;
}

/// A central revoke of a Client that is not connected is audited by the running Hub at once,
/// not only when the Client next shows up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_a_central_revoke_of_an_offline_client_is_audited_at_once() {
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol_and_run(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    hub.wait_connected("acme").await;
    client.stop().await;
    poll_until("the Client to be gone", SOON, || {
        hub.handle().connected_clients().is_empty()
    })
    .await;
    let t0 = Instant::now();
    assert!(
        admin::revoke(&hub.state_dir(), "acme", "contract ended")
            .unwrap()
            .revoked
    );
    let r = hub.wait_audit("the revocation", is(Event::Revoked)).await;
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(
        r.reason.as_deref(),
        Some("contract ended (offline: told at its next handshake)")
    );
    assert_eq!(
        r.client.as_deref(),
        Some("spiffe://test.ewii.local/client/acme")
    );
    assert_eq!(count(&hub.audit, is(Event::Revoked)), 1, "audited once");
}

/// The Hub's `started` record says where it listens in `reason`; `peer`, which a SIEM reads as
/// the other side of something, is not its own address.
#[tokio::test]
async fn p12_the_hubs_started_record_names_its_address_in_reason_not_as_a_peer() {
    let hub = TestHub::start(&[]).await;
    let r = hub.wait_audit("started", is(Event::Started)).await;
    assert_eq!(r.peer, None);
    let expected = format!(
        "listening on udp {}; trust domain test.ewii.local, 0 service listener(s)",
        hub.addr
    );
    assert_eq!(r.reason.as_deref(), Some(expected.as_str()));
}

/// What an operator's commands do is in the Hub's audit, dated when they were done: a join
/// token made (its id, client and webhook, shown without its secret parts; never the token)
/// and a revocation, made while the Hub runs or while it is down (recorded at its next start),
/// each once across restarts. Before, `token_created` was never written, and a revocation
/// made while no Hub ran was never recorded by the Hub.
#[tokio::test]
async fn p10_p12_the_operators_commands_are_audited_also_when_made_while_the_hub_is_down() {
    let mut hub = TestHub::start(&[]).await;
    let token = hub.token_with_webhook("acme", "http://127.0.0.1:9/hook?key=s3cr3t");
    let made = hub
        .wait_audit("the token's creation", is(Event::TokenCreated))
        .await;
    let reason = made.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with(&format!("token {} for acme, valid until ", token.id))
            && reason.contains("webhook http://127.0.0.1:9/hook?…")
            && !reason.contains("s3cr3t"),
        "{reason}"
    );
    assert_eq!(
        made.client.as_deref(),
        Some("spiffe://test.ewii.local/client/acme")
    );
    assert_eq!(made.outcome, Some(Outcome::Ok));
    let _client = TestClient::enrol_with(&hub, &token, &[("db", "127.0.0.1:9".into())]).await;
    // The Hub notes in its database what it has audited (a stop before that writes the record
    // again at the next start: at least once).
    let db = ewii::hub::state::Db::open(&hub.state_dir().join(ewii::hub::layout::DB_FILE)).unwrap();
    let audited = || {
        db.meta(ewii::hub::state::operator_log::AUDITED_UP_TO)
            .unwrap()
            .unwrap_or(0)
    };
    poll_until("the mark past the first entry", SOON, || audited() >= 1).await;

    hub.stop().await;
    let beta = hub.token("beta", Duration::from_secs(600));
    assert!(
        admin::revoke(&hub.state_dir(), "acme", "while down")
            .unwrap()
            .revoked
    );
    let down = ewii::now_timestamp();
    hub.restart().await;
    let revoked = hub
        .wait_audit("the revocation made while down", is(Event::Revoked))
        .await;
    assert_eq!(
        revoked.reason.as_deref(),
        Some("while down (offline: told at its next handshake)")
    );
    assert!(revoked.time <= down, "dated when it was made");
    hub.wait_audit("the token made while down", |r| {
        r.event == Event::TokenCreated
            && r.reason
                .as_deref()
                .is_some_and(|x| x.starts_with(&format!("token {} for beta", beta.id)))
    })
    .await;

    poll_until("the mark past the entries made while down", SOON, || {
        audited() >= 3
    })
    .await;
    // Once: another restart writes none of them again (a token made after it is the mark
    // that the Hub has read its log).
    hub.restart().await;
    let gamma = hub.token("gamma", Duration::from_secs(600));
    hub.wait_audit("the token made after the restart", |r| {
        r.event == Event::TokenCreated && r.reason.as_deref().is_some_and(|x| x.contains(&gamma.id))
    })
    .await;
    assert_eq!(count(&hub.audit, is(Event::TokenCreated)), 3);
    assert_eq!(count(&hub.audit, is(Event::Revoked)), 1);
    let secret = [token.token, beta.token, gamma.token];
    for r in hub.audit.records() {
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            secret.iter().all(|t| !line.contains(&t[5..])),
            "a token in the audit: {line}"
        );
    }
}

/// A hostile Client (issue 11): `Renew` in a loop costs one signature, the rest is refused
/// cheaply and audited, and the third refusal in a row ends the session (the records stay
/// few); streams the Hub did not ask for never open; garbage on the control stream ends that
/// session; another Client is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_renew_flood_and_control_garbage_are_cut_off_without_touching_other_clients() {
    let echo = echo_server().await;
    let hub = hub_renewing_at_once(&[Service::tcp("pg", "beta", "db")]).await;
    let hostile = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let mut other = TestClient::enrol_and_run(&hub, "beta", &[("db", echo.to_string())]).await;
    hub.wait_connected("beta").await;
    let svid = Svid::load(&hostile.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let mut raw = raw_session(&hub, &svid).await.expect("a session");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    async fn renew(raw: &mut RawSession, csr: &[u8]) -> Option<Control> {
        let renew = Control::Renew { csr: csr.to_vec() };
        transport::write_frame(&mut raw.send, &renew).await.unwrap();
        raw.reader.read::<Control>(&mut raw.recv).await.unwrap()
    }
    let floods = || {
        count(&hub.audit, |r| {
            r.event == Event::SvidRotated
                && r.reason
                    .as_deref()
                    .is_some_and(|x| x.starts_with("renewal flood"))
        })
    };
    // Before the first Renew went out, and after its answer came: the Hub's pause starts
    // between the two.
    let sent_at = Instant::now();
    assert!(matches!(
        renew(&mut raw, &csr).await,
        Some(Control::Renewed { .. })
    ));
    let served_at = Instant::now();
    // The pause (5 s for this SVID) counts from the Renew served, not from the refusals: one
    // refused halfway does not hold off the next past the pause. (The same key asking again
    // gets the same certificate.)
    tokio::time::sleep_until(sent_at + Duration::from_millis(2_500)).await;
    assert!(matches!(
        renew(&mut raw, &csr).await,
        Some(Control::Refused { .. })
    ));
    assert_eq!(floods(), 1);
    tokio::time::sleep_until(served_at + Duration::from_millis(5_200)).await;
    assert!(matches!(
        renew(&mut raw, &csr).await,
        Some(Control::Renewed { .. })
    ));
    assert_eq!(floods(), 1, "past the pause, not a flood");
    // A flood: 50 Renew sent at once, inside the pause. Each is refused without a signature,
    // and the third in a row ends the session, so it leaves three refusals on record, not 50.
    for _ in 0..50 {
        let renew = Control::Renew { csr: csr.clone() };
        if transport::write_frame(&mut raw.send, &renew).await.is_err() {
            break;
        }
    }
    let mut refused = 0;
    while let Ok(Some(answer)) = raw.reader.read::<Control>(&mut raw.recv).await {
        assert!(matches!(answer, Control::Refused { .. }), "{answer:?}");
        refused += 1;
    }
    assert!(refused <= 3, "{refused} answers");
    assert_eq!(
        raw.closed_by_hub().await,
        Some(2),
        "closed as a protocol violation"
    );
    hub.wait_audit(
        "the flooding session's end",
        says(
            Event::SessionLost,
            "renewal requests in a row broke the renewal rules",
        ),
    )
    .await;
    assert_eq!(floods(), 4, "three refusals on record for the flood");
    assert_eq!(
        count(&hub.audit, |r| r.event == Event::SvidRotated
            && r.outcome == Some(Outcome::Ok)
            && r.client.as_deref()
                == Some("spiffe://test.ewii.local/client/acme")),
        2,
        "two renewals served, one signature"
    );
    let mut raw = raw_session(&hub, &svid).await.expect("a new session");
    // Streams the Hub did not ask for: a Client may open one stream, the control stream, and
    // no unidirectional one; QUIC gives no credit for more, so they never open.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), raw.conn.open_bi())
            .await
            .is_err(),
        "a second bidirectional stream got credit"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(1), raw.conn.open_uni())
            .await
            .is_err(),
        "a unidirectional stream got credit"
    );
    // Garbage on the control stream: that session ends as a protocol violation.
    raw.send
        .write_all(&[0, 0, 0, 3, 1, 0xff, 0xff])
        .await
        .unwrap();
    hub.wait_audit("the hostile session's end", |r| {
        r.event == Event::SessionLost
            && r.reason
                .as_deref()
                .is_some_and(|x| x.starts_with("protocol: "))
    })
    .await;
    // The other Client never noticed.
    assert!(try_roundtrip(hub.service("pg"), b"still fine")
        .await
        .is_ok());
    assert_eq!(count(&other.audit, is(Event::SessionLost)), 0);
    other.stop().await;
}

/// A hostile Client that stops reading its control stream: QUIC flow control then holds each
/// answer the Hub writes, for ever. The session's own timers must not wait behind such a write:
/// it still ends at its SVID's expiry, and is routed to no more (P7, P8). Asking on while it
/// reads nothing only stalls its own requests (the Hub reads the next once its answer has room).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_p8_a_client_that_stops_reading_its_control_stream_still_ends_at_its_svids_expiry() {
    let hub = TestHub::start_with(&[Service::tcp("pg", "acme", "db")], 6).await;
    let acme = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let (mut raw, not_after) = stalled_session(&hub, &acme, "acme").await;
    // More requests than the Hub holds answers for, not one answer read.
    pings(&mut raw, 2 * transport::control::ROOM as u64).await;
    let left = u64::try_from(not_after - ewii::now_timestamp().unix_secs() as i64).unwrap_or(0);
    let closed = tokio::time::timeout(Duration::from_secs(left + 2), raw.conn.closed())
        .await
        .expect("the session outlived its SVID by two seconds");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == transport::codes::REFUSED),
        "{closed:?}"
    );
    hub.wait_audit(
        "the stalled session's end at its expiry",
        says(Event::SessionLost, "the SVID of this session expired"),
    )
    .await;
    assert!(!hub
        .handle()
        .connected_clients()
        .contains(&"acme".to_string()));
}

/// A session of `client`'s SVID (Client `name`) from a peer that grants the Hub room for the `Welcome` and no
/// more: every later answer waits for a read that never comes. Its SVID's end too.
async fn stalled_session(hub: &TestHub, client: &TestClient, name: &str) -> (RawSession, i64) {
    let welcome = Control::Welcome {
        session_id: u64::MAX,
        hub_time_us: u64::MAX,
        limits: ewii_common::frame::Limits {
            max_concurrent_queries: u32::MAX,
            idle_timeout_ms: u32::MAX,
        },
    };
    let window = ewii_common::frame::encode_to_vec(&welcome).unwrap().len() as u32;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let not_after = inspect_leaf(&svid.chain[0]).unwrap().not_after;
    let raw = raw_handshake_with_window(hub, &svid, window)
        .await
        .expect("a handshake")
        .hello()
        .await
        .expect("a session");
    hub.wait_connected(name).await;
    (raw, not_after)
}

/// A Client's `Rotated` for a serial it was not issued ends its session, and the record quotes
/// the serial as every peer text is quoted: bounded, with no character that could disguise the
/// line where the customer reads it (a 60,000-character string of bidi overrides here).
#[tokio::test]
async fn p11_a_rotated_for_a_serial_not_issued_is_quoted_bounded_and_escaped() {
    let hub = TestHub::start(&[]).await;
    let acme = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&acme.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let mut raw = raw_session(&hub, &svid).await.expect("a session");
    let serial = "\u{202e}".repeat(20_000);
    transport::write_frame(&mut raw.send, &Control::Rotated { serial })
        .await
        .unwrap();
    assert!(raw.closed_by_hub().await.is_some());
    let lost = hub
        .wait_audit("the session's end", |r| {
            r.event == Event::SessionLost
                && r.reason.as_deref().is_some_and(|x| x.contains("Rotated"))
        })
        .await;
    let reason = lost.reason.unwrap();
    // The first 512 characters of the Client's text, each override written out.
    assert!(!reason.contains('\u{202e}'), "{reason}");
    assert_eq!(reason.matches("\\u{202e}").count(), 512, "{reason}");
}

/// Sends `n` `Ping`s on `raw`'s control stream.
async fn pings(raw: &mut RawSession, n: u64) {
    for time_us in 0..n {
        let ping = Control::Ping { time_us };
        transport::write_frame(&mut raw.send, &ping).await.unwrap();
    }
}

/// A Client that floods its control stream with `Ping`s (each one the Hub's shard decodes and
/// answers, beside other Clients' work) has its session ended past 100 in a second; a few, as
/// a tool sends them, are answered (P6: one Client cannot take the Hub's time from others).
#[tokio::test]
async fn a_ping_flood_ends_the_session_and_a_few_pings_are_answered() {
    let hub = TestHub::start(&[]).await;
    let acme = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&acme.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let mut raw = raw_session(&hub, &svid).await.expect("a session");
    assert!(raw.ping().await, "a Ping is answered");
    pings(&mut raw, 150).await;
    hub.wait_audit(
        "the session's end",
        says(Event::SessionLost, "more than 100 Pings within 1 s"),
    )
    .await;
    assert_eq!(
        raw.closed_by_hub().await,
        Some(2),
        "closed as a protocol violation"
    );
}

/// A Client whose answers wait unread, then breaks the protocol (a bad frame): its session ends,
/// and its connection is closed, not left open behind the write that waits (the writer task
/// holds it, and keep-alives would keep it, for ever, outside every registry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_that_breaks_the_protocol_has_its_connection_closed() {
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let acme = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let (mut raw, _) = stalled_session(&hub, &acme, "acme").await;
    pings(&mut raw, 4).await;
    raw.send
        .write_all(&[0, 0, 0, 3, 1, 0xff, 0xff])
        .await
        .unwrap();
    hub.wait_audit(
        "the session's end",
        says(Event::SessionLost, "protocol: control stream"),
    )
    .await;
    assert_eq!(
        raw.closed_by_hub().await,
        Some(2),
        "closed as a protocol violation"
    );
}

/// A Client that reconnects in a loop (each session a synced database write and two audit
/// records on the Hub) is held to its rate: past its burst a new session is refused before
/// any of that, with a record saying why, and another Client is not affected (P14: the way
/// back stays open, at the rate of an honest Client's backoff).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p14_a_client_that_reconnects_in_a_loop_is_refused_past_its_rate_and_no_other_is() {
    let echo = echo_server().await;
    let limits = ewii::hub::admission::Limits {
        sessions_per_minute: 5,
        ..Default::default()
    };
    let services = [Service::tcp("pg", "beta", "db")];
    let hub = TestHub::start_with_limits(&services, limits).await;
    let mut looping = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let mut other = TestClient::enrol_and_run(&hub, "beta", &[("db", echo.to_string())]).await;
    hub.wait_connected("beta").await;
    let svid = Svid::load(&looping.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let ups = || {
        count(&hub.audit, |r| {
            r.event == Event::SessionUp
                && r.client.as_deref() == Some("spiffe://test.ewii.local/client/acme")
        })
    };
    for n in 1..=5 {
        let raw = raw_session(&hub, &svid).await;
        assert!(raw.is_some(), "session {n} of the burst");
    }
    let refused = raw_handshake(&hub, &svid)
        .await
        .expect("the handshake itself");
    assert_eq!(closed_by_hub(&refused.conn).await, Some(5), "refused");
    let r = hub
        .wait_audit(
            "the refusal",
            says(
                Event::HandshakeRefused,
                "opens sessions faster than 5 a minute",
            ),
        )
        .await;
    assert_eq!(
        r.client.as_deref(),
        Some("spiffe://test.ewii.local/client/acme")
    );
    assert_eq!(ups(), 5, "no session, and no write, for the refused one");
    // The Client itself, dialling now, says why (and backs off).
    looping.start();
    let dir = looping.state_dir();
    let read = || Status::read(&dir).ok();
    // (Read while it says so: once a token is back, it connects and the error is cleared.)
    let mut said = String::new();
    poll_until("a refused dial, and why", SOON, || {
        said = read().and_then(|s| s.last_error).unwrap_or_default();
        said.contains("reconnecting too often (refused, code 5)")
    })
    .await;
    // And its audit says so to the customer's SIEM: the Hub refused it, from where.
    let r = looping
        .wait_audit("the refused dial on record", |r| {
            r.event == Event::SessionFailed
                && r.reason
                    .as_deref()
                    .is_some_and(|s| s.contains("reconnecting too often (refused, code 5)"))
        })
        .await;
    assert_eq!(r.outcome, Some(Outcome::Refused), "{r:?}");
    assert_eq!(r.peer, Some(hub.addr.to_string()));
    assert_eq!(
        r.client.as_deref(),
        Some("spiffe://test.ewii.local/client/acme")
    );
    looping.stop().await;
    // The other Client has its own rate: it reconnects, and serves as before.
    other.stop().await;
    other.start();
    hub.wait_connected("beta").await;
    try_roundtrip(hub.service("pg"), b"still fine")
        .await
        .unwrap();
    other.stop().await;
}

/// A Client that speaks another protocol version (an upgrade on one side only) is told so in
/// words it can report, `Refused { Version }`, before the Hub closes the connection: the answer
/// is not lost to the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_another_protocol_version_is_told_so_before_the_close() {
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let acme = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&acme.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    for _ in 0..5 {
        let raw = raw_handshake(&hub, &svid).await.expect("the handshake");
        let (mut send, mut recv) = raw.conn.open_bi().await.unwrap();
        let hello = Control::Hello {
            version: ewii_common::frame::PROTOCOL_VERSION + 1,
            allow_list: vec!["db".into()],
            allow_list_digest: vec![0; 32],
            build: "from the future".into(),
        };
        transport::write_frame(&mut send, &hello).await.unwrap();
        let answer = transport::FrameReader::new()
            .read::<Control>(&mut recv)
            .await;
        assert!(
            matches!(
                answer,
                Ok(Some(Control::Refused {
                    code: ewii_common::frame::RefuseCode::Version
                }))
            ),
            "{answer:?}"
        );
        assert_eq!(closed_by_hub(&raw.conn).await, Some(2), "then closed");
    }
}

/// A `Hello` whose allow-list holds something no Client's configuration takes as an entry
/// name (here, words that would read as the Hub's own in its `session_up` record) is a
/// protocol error: the session is refused, recorded with the name quoted and escaped, and
/// nothing of it reaches a `session_up` record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_a_hello_with_a_name_no_allow_list_takes_is_refused() {
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let acme = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&acme.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let raw = raw_handshake(&hub, &svid).await.expect("the handshake");
    let (mut send, _recv) = raw.conn.open_bi().await.unwrap();
    let spoof = "db\"]; service billing names entry db, not in it: its queries are refused\u{202e}";
    let hello = Control::Hello {
        version: ewii_common::frame::PROTOCOL_VERSION,
        allow_list: vec!["db".into(), spoof.into()],
        allow_list_digest: vec![0; 32],
        build: "hostile".into(),
    };
    transport::write_frame(&mut send, &hello).await.unwrap();
    assert_eq!(
        closed_by_hub(&raw.conn).await,
        Some(transport::codes::PROTOCOL.into_inner()),
        "closed as a protocol error"
    );
    let r = hub
        .wait_audit("the refused opening", |r| {
            r.event == Event::SessionLost && r.outcome == Some(Outcome::Refused)
        })
        .await;
    assert_eq!(
        r.reason.as_deref(),
        Some(
            "protocol: Hello names \"db\\\"]; service billing names entry db, not in it: its \
             queries are refused\\\\u{202e}\", which is not an allow-list entry name"
        )
    );
    assert!(
        !hub.audit
            .records()
            .iter()
            .any(|r| r.event == Event::SessionUp),
        "no session came up"
    );
}

/// Sends one `Renew` with `key` on a fresh raw session of `svid`; returns the answer.
async fn renew_once(hub: &TestHub, svid: &Svid, key: &rcgen::KeyPair) -> Control {
    let mut raw = raw_session(hub, svid).await.expect("a session");
    let csr = ewii::identity::ca::csr_for(key).unwrap();
    transport::write_frame(&mut raw.send, &Control::Renew { csr })
        .await
        .unwrap();
    raw.reader
        .read::<Control>(&mut raw.recv)
        .await
        .unwrap()
        .expect("an answer")
}

/// A Hub that issues `lifetime_secs` SVIDs and renews none before `percent` of their life.
async fn hub_renewing_after(percent: u8, lifetime_secs: u64) -> TestHub {
    let limits = ewii::hub::admission::Limits {
        renew_after_percent: percent,
        ..Default::default()
    };
    let services = [Service::tcp("pg", "acme", "db")];
    TestHub::start_with_limits_and_lifetime(&services, limits, lifetime_secs).await
}

/// Waits until the Hub re-bound the session of serial `serial` to its renewal; the SVID then
/// in `dir`.
async fn rebound_from(hub: &TestHub, dir: &Path, serial: &str) -> Svid {
    let rebound = format!("session re-bound from serial {serial}");
    hub.wait_audit("the session re-bound", says(Event::SvidRotated, &rebound))
        .await;
    Svid::load(dir, store::SVID_CERT, store::SVID_KEY).unwrap()
}

/// Client `acme` enrolled with `hub`, not started: its state directory, SVID and serial.
async fn enrolled_acme(hub: &TestHub) -> (TestClient, PathBuf, Svid, String) {
    let client = TestClient::enrol(hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let dir = client.state_dir();
    let svid = Svid::load(&dir, store::SVID_CERT, store::SVID_KEY).unwrap();
    let serial = inspect_leaf(&svid.chain[0]).unwrap().serial;
    (client, dir, svid, serial)
}

/// The run before a restart asked for a renewal and never stored the answer (a crash, a lost
/// answer): the restarted Client asks again with the key it kept, and gets that certificate.
/// A serial renews once, so a new key would be refused as a copy of this one, and the Client
/// would be locked out when its SVID ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_client_restarted_before_it_stored_its_renewal_asks_again_with_the_same_key() {
    let hub = hub_renewing_after(0, 8).await;
    let (mut client, dir, svid, serial) = enrolled_acme(&hub).await;
    // What the earlier run left: its renewal key, kept as the Client keeps it, and a renewal
    // the Hub issued for it.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let kept = dir.join(store::renew_key_file(&serial));
    std::fs::write(&kept, key.serialize_pem()).unwrap();
    let Control::Renewed { chain: issued, .. } = renew_once(&hub, &svid, &key).await else {
        panic!("the Hub issued nothing");
    };

    // At half of its SVID's life the restarted Client renews with the kept key.
    client.start();
    hub.wait_audit(
        "the same key again",
        says(Event::SvidRotated, "re-sent serial"),
    )
    .await;
    let now = rebound_from(&hub, &dir, &serial).await;
    assert_eq!(
        now.chain[0].to_vec(),
        issued[0],
        "the certificate issued before"
    );
    assert_eq!(
        count(&hub.audit, says(Event::SvidRotated, "was renewed already")),
        0
    );
    assert!(!kept.exists(), "the key file goes once its SVID is stored");
    client.stop().await;
}

/// P8: a renewal whose key cannot be kept in the state directory (a full disk; here a
/// directory in the key file's place) is not asked for. The Client used to ask all the same:
/// the Hub signed for a key that lived only in the process, and a serial renews once, so a
/// restart before the answer was stored (or an answer stored chain first, then cut short)
/// lost the identity at the SVID's end. The SVID in use stays; once the key can be kept the
/// next ask renews. A start whose `svid.key` is not its certificate's says so (exit 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_renewal_whose_key_cannot_be_kept_is_not_stored() {
    let hub = hub_renewing_after(0, 12).await;
    let (mut client, dir, svid, serial) = enrolled_acme(&hub).await;
    let kept = dir.join(store::renew_key_file(&serial));
    client.start();
    hub.wait_connected("acme").await;
    // Planted once it runs (a start refuses a kept key it cannot read), seconds before its
    // renewal at half of the SVID's 12 s.
    std::fs::create_dir(&kept).unwrap();
    client
        .wait_audit(
            "the renewal not asked",
            says(
                Event::SvidRotated,
                "renewal not asked: its key cannot be kept",
            ),
        )
        .await;
    assert_eq!(
        count(&hub.audit, says(Event::SvidRotated, "issued serial")),
        0,
        "the Hub signed nothing"
    );
    let now = Svid::load(&dir, store::SVID_CERT, store::SVID_KEY).unwrap();
    assert_eq!(now.chain[0], svid.chain[0], "the SVID in use stays");
    assert!(now.key_matches());
    std::fs::remove_dir(&kept).unwrap();
    let renewed = rebound_from(&hub, &dir, &serial).await;
    assert_ne!(
        renewed.chain[0], svid.chain[0],
        "renewed once the key is kept"
    );
    assert!(renewed.key_matches());
    // One signature in all, for the key asked with once it was kept: an ask sent with the key
    // that could not be kept would have been signed too (then answered again for the same
    // key, or refused for a new one as renewed already).
    assert_eq!(
        count(&hub.audit, says(Event::SvidRotated, "issued serial")),
        1
    );
    assert_eq!(
        count(&hub.audit, says(Event::SvidRotated, "re-sent serial")),
        0
    );
    assert_eq!(
        count(&hub.audit, says(Event::SvidRotated, "was renewed already")),
        0
    );
    client.stop().await;

    // Another key in svid.key: refused at start, saying why.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(dir.join(store::SVID_KEY), other.serialize_pem()).unwrap();
    let err = client.run_once(SOON).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("svid.key is not the key of the certificate in svid.pem"),
        "{err}"
    );
}

/// A renewal is for a fresh key (DESIGN §5): a `Renew` whose CSR is for the key the session's
/// SVID already certifies is refused, so that a Client cannot keep a key (and a stolen copy
/// of it) through every rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_renewal_for_the_key_in_use_is_refused() {
    let hub = hub_renewing_after(0, 3_600).await;
    let (_client, dir, svid, serial) = enrolled_acme(&hub).await;
    let same = store::read_key_pair(&dir.join(store::SVID_KEY)).unwrap();
    let answer = renew_once(&hub, &svid, &same).await;
    assert!(matches!(answer, Control::Refused { .. }), "{answer:?}");
    let refused = hub
        .wait_audit(
            "the refusal",
            says(Event::SvidRotated, "a renewal is for a fresh key"),
        )
        .await;
    assert_eq!(refused.outcome, Some(Outcome::Refused));
    assert!(refused.reason.unwrap().contains(&serial));
    // A fresh key renews.
    let fresh = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let answer = renew_once(&hub, &svid, &fresh).await;
    assert!(matches!(answer, Control::Renewed { .. }), "{answer:?}");
}

/// A renewal is for a key this client never held (P8): after a renewal to key A, the session
/// of A's serial asking to go back to the enrolment's key is refused (the key in use is not
/// that one: the Hub's records of every serial's key decide), so that alternating keys cannot
/// bring a copy of an old one back to life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_renewal_back_to_the_enrolments_key_is_refused() {
    let hub = hub_renewing_after(0, 3_600).await;
    let (_client, dir, svid, serial) = enrolled_acme(&hub).await;
    let enrolled = store::read_key_pair(&dir.join(store::SVID_KEY)).unwrap();
    let a = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let Control::Renewed { chain, .. } = renew_once(&hub, &svid, &a).await else {
        panic!("no renewal to a fresh key");
    };
    let chain = chain
        .into_iter()
        .map(rustls::pki_types::CertificateDer::from);
    let renewed = Svid::new(chain.collect(), &a);
    let answer = renew_once(&hub, &renewed, &enrolled).await;
    assert!(matches!(answer, Control::Refused { .. }), "{answer:?}");
    let refused = hub
        .wait_audit(
            "the refusal",
            says(
                Event::SvidRotated,
                &format!("the one serial {serial} certified"),
            ),
        )
        .await;
    assert_eq!(refused.outcome, Some(Outcome::Refused));
    assert!(
        refused
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("a renewal is for a fresh key"),
        "{refused:?}"
    );
}

/// A session of `svid` that has renewed it (with a fresh key) and not yet said `Rotated`, and
/// the renewed SVID.
async fn renewed_on_a_session(hub: &TestHub, svid: &Svid) -> (RawSession, Svid) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut raw = raw_session(hub, svid).await.expect("a session");
    let csr = ewii::identity::ca::csr_for(&key).unwrap();
    transport::write_frame(&mut raw.send, &Control::Renew { csr })
        .await
        .unwrap();
    let answer = raw.reader.read::<Control>(&mut raw.recv).await.unwrap();
    let Some(Control::Renewed { chain, .. }) = answer else {
        panic!("no renewal: {answer:?}");
    };
    let renewed = Svid::new(chain.into_iter().map(Into::into).collect(), &key);
    (raw, renewed)
}

/// A `Rotated` for a serial this Hub issued, sent after a re-enrolment retired it (say, the
/// holder of a copy of the old key renewed in the moment before the customer enrolled the
/// Client again): the session is not re-bound to it, and the client's recorded session is not
/// moved to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_rotated_for_a_serial_retired_since_its_renewal_is_refused() {
    let hub = hub_renewing_after(0, 3_600).await;
    let (_client, _dir, svid, serial) = enrolled_acme(&hub).await;
    let (mut raw, renewed) = renewed_on_a_session(&hub, &svid).await;
    let renewed = inspect_leaf(&renewed.chain[0]).unwrap().serial;
    // The customer enrols acme again: every earlier serial is retired, the renewal's too.
    let _again = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    transport::write_frame(&mut raw.send, &Control::Rotated { serial: renewed })
        .await
        .unwrap();
    let refused = hub
        .wait_audit(
            "the refusal",
            says(Event::SvidRotated, "Rotated for serial"),
        )
        .await;
    assert_eq!(refused.outcome, Some(Outcome::Refused));
    let reason = refused.reason.unwrap();
    assert!(reason.contains("retired since it was issued"), "{reason}");
    assert!(
        reason.contains(&format!("stays on serial {serial}")),
        "{reason}"
    );
    assert_eq!(
        count(&hub.audit, says(Event::SvidRotated, "session re-bound")),
        0
    );
}

/// A `Rotated` the Hub cannot record (its database refuses the write: a full disk, another
/// writer's lock past the busy timeout; here a trigger) closes the session, fail closed, as a
/// session that cannot be recorded as it opens is refused: kept on the renewed serial, it would
/// run on a serial whose use is not on record, every older serial of the client still current
/// (a stolen copy of an older key would still open sessions). The Client's next session, on
/// the serial it has stored, is served once the Hub can write again, and retires the older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_rotation_the_hub_cannot_record_closes_the_session() {
    let hub = hub_renewing_after(0, 3_600).await;
    let (_client, _dir, svid, serial) = enrolled_acme(&hub).await;
    let (mut raw, renewed) = renewed_on_a_session(&hub, &svid).await;
    let new_serial = inspect_leaf(&renewed.chain[0]).unwrap().serial;
    let db = rusqlite::Connection::open(hub.state_dir().join(admin::DB_FILE)).unwrap();
    // Every write of a session's start (an upsert: SQLite runs the INSERT trigger before it
    // finds the row the rotation would update) is refused.
    db.execute_batch(
        "CREATE TRIGGER refuse BEFORE UPDATE ON sessions BEGIN SELECT RAISE(ABORT, 'disk full'); END;
         CREATE TRIGGER refuse_new BEFORE INSERT ON sessions BEGIN SELECT RAISE(ABORT, 'disk full'); END",
    )
    .unwrap();
    transport::write_frame(
        &mut raw.send,
        &Control::Rotated {
            serial: new_serial.clone(),
        },
    )
    .await
    .unwrap();
    let failed = hub
        .wait_audit(
            "the rotation's failure",
            says(Event::SvidRotated, "could not record"),
        )
        .await;
    assert_eq!(failed.outcome, Some(Outcome::Failed));
    let reason = failed.reason.unwrap();
    assert!(
        reason.contains(&new_serial) && reason.contains("disk full"),
        "{reason}"
    );
    assert_eq!(
        raw.closed_by_hub().await,
        Some(transport::codes::REFUSED.into_inner()),
        "the session is closed"
    );
    hub.wait_audit("the end of the session", |r| {
        r.event == Event::SessionLost
            && r.reason
                .as_deref()
                .is_some_and(|x| x.starts_with("records_unwritable: "))
    })
    .await;
    let id = SpiffeId::client(TD, "acme").unwrap();
    let hub_db = ewii::hub::state::Db::open(&hub.state_dir().join(admin::DB_FILE)).unwrap();
    let check = |serial: &str| ewii::identity::verify::SerialCheck::check(&hub_db, &id, serial);
    assert_eq!(
        check(&serial),
        Ok(()),
        "not retired by what is not on record"
    );
    assert!(
        raw_session(&hub, &renewed).await.is_none(),
        "refused while the Hub cannot write"
    );
    poll_until("the refusal's record", SOON, || {
        count(&hub.audit, |r| {
            r.event == Event::SessionLost
                && r.reason
                    .as_deref()
                    .is_some_and(|x| x.starts_with("records_unwritable: "))
        }) == 2
    })
    .await;
    assert_eq!(check(&serial), Ok(()));
    db.execute_batch("DROP TRIGGER refuse; DROP TRIGGER refuse_new")
        .unwrap();
    assert!(
        raw_session(&hub, &renewed).await.is_some(),
        "served once it can write"
    );
    assert!(
        matches!(check(&serial), Err(SerialRefusal::Retired { .. })),
        "the next session retired the older serial"
    );
}

/// The run before a restart stored its renewal's SVID and not its key, and recorded the
/// renewal as refused: the restarted Client stores the kept key beside the SVID, serves with
/// the renewal, and says so in its audit, so that the customer's record of the renewal does
/// not end at "refused" while another serial is in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_p11_a_renewal_stored_in_part_and_completed_at_start_is_on_record() {
    let hub = hub_renewing_after(0, 3_600).await;
    let (mut client, dir, svid, serial) = enrolled_acme(&hub).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(
        dir.join(store::renew_key_file(&serial)),
        key.serialize_pem(),
    )
    .unwrap();
    let Control::Renewed { chain: issued, .. } = renew_once(&hub, &svid, &key).await else {
        panic!("the Hub issued nothing");
    };
    // The chain written, the key not: the old key is still beside it.
    let chain: Vec<rustls::pki_types::CertificateDer<'static>> =
        issued.iter().map(|c| c.clone().into()).collect();
    std::fs::write(dir.join(store::SVID_CERT), store::Pem::certs(&chain)).unwrap();
    let renewed = inspect_leaf(&chain[0]).unwrap().serial;

    client.start();
    let record = client
        .wait_audit(
            "the completed renewal",
            says(Event::SvidRotated, "its key is stored now"),
        )
        .await;
    assert_eq!(record.outcome, Some(Outcome::Ok));
    assert!(
        record.reason.as_deref().unwrap().contains(&renewed),
        "{record:?}"
    );
    hub.wait_connected("acme").await;
    let now = Svid::load(&dir, store::SVID_CERT, store::SVID_KEY).unwrap();
    assert!(now.key_matches());
    assert_eq!(now.chain[0].to_vec(), issued[0]);
    client.stop().await;
}

/// A renewal answer the Client cannot store (its state directory refuses the write) keeps
/// its key: the next ask uses it and gets the same certificate, where a new key would be
/// refused as a copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_renewal_that_cannot_be_stored_is_asked_again_with_the_same_key() {
    let hub = hub_renewing_after(0, 12).await;
    let (mut client, dir, _svid, serial) = enrolled_acme(&hub).await;
    client.start();
    hub.wait_connected("acme").await;
    // The certificate's file becomes a directory: storing the answer fails.
    let cert = dir.join(store::SVID_CERT);
    let pem = std::fs::read(&cert).unwrap();
    std::fs::remove_file(&cert).unwrap();
    std::fs::create_dir(&cert).unwrap();
    hub.wait_audit("issued", says(Event::SvidRotated, "issued serial"))
        .await;
    client
        .wait_audit(
            "not stored",
            says(Event::SvidRotated, "renewed SVID refused"),
        )
        .await;
    hub.wait_audit("asked again", says(Event::SvidRotated, "re-sent serial"))
        .await;
    // An honest Client's retry waits out the Hub's pause: it is never taken for a flood.
    assert_eq!(
        count(&hub.audit, says(Event::SvidRotated, "renewal flood")),
        0
    );
    std::fs::remove_dir(&cert).unwrap();
    std::fs::write(&cert, pem).unwrap();
    let now = rebound_from(&hub, &dir, &serial).await;
    assert!(now.key_matches());
    assert_eq!(
        count(&hub.audit, says(Event::SvidRotated, "was renewed already")),
        0
    );
    client.stop().await;
}

/// The Client keeps a renewal's key in its state directory before it asks, asks again with it
/// after a refusal, and removes it once the renewed SVID is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_renewal_key_is_kept_on_disk_before_the_ask_and_goes_with_the_renewal() {
    use std::os::unix::fs::PermissionsExt;

    // The Client asks at half of the life; this Hub refuses before three quarters.
    let hub = hub_renewing_after(75, 8).await;
    let (mut client, dir, svid, serial) = enrolled_acme(&hub).await;
    let kept = dir.join(store::renew_key_file(&serial));
    client.start();
    let refused = hub
        .wait_audit("too early", says(Event::SvidRotated, "renewal too early"))
        .await;
    // The Hub saw the ask: the key was on disk before it went out (written before the Hub's
    // record of the ask, by the same clock), and it is not the SVID's.
    let key = std::fs::read_to_string(&kept).expect("the renewal key is kept");
    let meta = std::fs::metadata(&kept).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let written = meta
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    assert!(
        written <= refused.time.0,
        "written after the Hub saw the ask"
    );
    let key = rcgen::KeyPair::from_pem(&key).unwrap();
    assert_ne!(key.serialized_der(), svid.key().secret_der());
    // Asked again with it past three quarters: issued, stored, and the key file removed.
    let now = rebound_from(&hub, &dir, &serial).await;
    assert_eq!(now.key().secret_der(), key.serialized_der(), "the kept key");
    assert!(!kept.exists(), "removed before the Client said Rotated");
    client.stop().await;
}

/// Issue 9 §4 (P8): a serial renews once. The same key asking again (its answer lost) gets
/// the very same certificate and no new serial; another key asking for the same serial — two
/// holders of one key — is refused and audited as such. And by default an SVID in the first
/// quarter of its life does not renew at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_serial_renews_once_and_not_in_the_first_quarter_of_its_life() {
    // Default bounds: right after enrolment it is too early.
    let hub = TestHub::start(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    assert!(matches!(
        renew_once(&hub, &svid, &key).await,
        Control::Refused { .. }
    ));
    let r = hub
        .wait_audit("too early", |r| {
            r.event == Event::SvidRotated && r.outcome == Some(Outcome::Refused)
        })
        .await;
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .starts_with("renewal too early:"),
        "{r:?}"
    );
    drop(client);

    // Renewal allowed at once: one serial, one renewal.
    let hub = hub_renewing_at_once(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let first = match renew_once(&hub, &svid, &key).await {
        Control::Renewed { chain, .. } => chain,
        other => panic!("{other:?}"),
    };
    // The answer was "lost": the same key asks again and gets the same certificate.
    let again = match renew_once(&hub, &svid, &key).await {
        Control::Renewed { chain, .. } => chain,
        other => panic!("{other:?}"),
    };
    assert_eq!(again, first, "the same certificate, not a second serial");
    hub.wait_audit("re-sent", |r| {
        r.event == Event::SvidRotated
            && r.reason
                .as_deref()
                .is_some_and(|x| x.starts_with("re-sent serial"))
    })
    .await;
    // Another key for the same serial: refused, and said why.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    assert!(matches!(
        renew_once(&hub, &svid, &other).await,
        Control::Refused { .. }
    ));
    let r = hub
        .wait_audit("a second renewal", |r| {
            r.event == Event::SvidRotated
                && r.reason
                    .as_deref()
                    .is_some_and(|x| x.contains("was renewed already"))
        })
        .await;
    assert_eq!(r.outcome, Some(Outcome::Refused));
    assert!(r.reason.unwrap().contains("a copy of this key?"));
    // One renewal recorded for the enrolment serial: two serials in all.
    let rows = admin::clients(&hub.state_dir()).unwrap();
    assert_eq!(rows[0].serials.len(), 2, "{rows:?}");
}

/// A token's TTL and a workload SVID's lifetime out of range are refused as bad arguments
/// (`ewii-hub` exits 2), under a second too: such a token would be expired when made.
#[tokio::test]
async fn p7_a_token_ttl_or_workload_lifetime_out_of_range_is_refused() {
    let hub = TestHub::start(&[]).await;
    let state = hub.state_dir();
    let out = hub.dir.path().join("workload");
    let day = Duration::from_secs(86_400);
    let second = Duration::from_secs(1);
    for ttl in [
        Duration::ZERO,
        Duration::from_millis(500),
        30 * day + second,
    ] {
        let err = admin::create_token(&state, "beta", ttl, None, false).unwrap_err();
        assert!(
            matches!(&err, ewii::hub::HubError::Invalid(m) if m == "token TTL must be between 1 s and 30 days"),
            "{ttl:?}: {err:?}"
        );
    }
    for lifetime in [Duration::ZERO, Duration::from_millis(500), 7 * day + second] {
        let err = admin::issue_workload_svid(&state, "billing", lifetime, &out).unwrap_err();
        assert!(
            matches!(&err, ewii::hub::HubError::Invalid(m) if m.contains("between 1 s and 7 days")),
            "{lifetime:?}: {err:?}"
        );
    }
    assert!(!out.exists(), "nothing written for a refused lifetime");
    admin::create_token(&state, "beta", second, None, false).unwrap();
    admin::issue_workload_svid(&state, "billing", second, &out).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&out), 0o700, "a directory it makes is private");
    assert_eq!(mode(&out.join(store::SVID_KEY)), 0o600);
    // A directory that exists (the workload's own, `--out /etc/billing`) keeps its mode.
    let shared = hub.dir.path().join("billing");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    admin::issue_workload_svid(&state, "billing", second, &shared).unwrap();
    assert_eq!(mode(&shared), 0o755);
    assert_eq!(mode(&shared.join(store::SVID_KEY)), 0o600);
    // Missing parents are made as any directory is (`--out /etc/billing/ewii` with no
    // `/etc/billing` yet): only the directory handed over is private.
    let nested = hub.dir.path().join("etc").join("billing").join("ewii");
    admin::issue_workload_svid(&state, "billing", second, &nested).unwrap();
    let plain = hub.dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    assert_eq!(mode(nested.parent().unwrap()), mode(&plain));
    assert_eq!(mode(&nested), 0o700);
}

/// At a stop, each session's end goes to the store (a synced commit) before its record, and the
/// stop waits 2 s for them all. A store that cannot take them in time (a long commit, a slow
/// disk; here another connection holding the database's write lock, so every write waits out
/// the 5 s busy timeout) must not cost the records: every session still gets its
/// `session_lost` (P11).
#[tokio::test]
async fn p11_a_hub_stop_whose_store_cannot_take_the_sessions_ends_still_records_them() {
    let mut hub = TestHub::start(&[]).await;
    let mut clients = Vec::new();
    for name in ["acme", "beta", "gamma"] {
        let client = TestClient::enrol_and_run(&hub, name, &[("db", "127.0.0.1:9".into())]).await;
        hub.wait_connected(name).await;
        clients.push(client);
    }
    let db = rusqlite::Connection::open(hub.state_dir().join("hub.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    hub.stop().await;
    let lost: Vec<_> = hub
        .audit
        .records()
        .into_iter()
        .filter(|r| r.event == Event::SessionLost)
        .filter_map(|r| r.client)
        .collect();
    db.execute_batch("ROLLBACK").unwrap();
    assert_eq!(lost.len(), 3, "a session_lost for each session: {lost:?}");
    drop(clients);
}

/// The Hub's SVID as a handshake presents it: its leaf's serial and end.
fn served(conn: &quinn::Connection) -> (String, i64) {
    let chain = conn
        .peer_identity()
        .expect("the Hub's certificate")
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .expect("a chain");
    let leaf = inspect_leaf(&chain[0]).unwrap();
    (leaf.serial, leaf.not_after)
}

/// A Hub that runs past two thirds of its own SVID's life renews it while it runs, as a
/// restart would: new handshakes present the new one, and the renewal is on record. It was
/// renewed only at start or with a new CA: a Hub up for 90 days served an expired SVID, and
/// every Client refused it (P15: the Client checks the Hub).
#[tokio::test]
async fn p15_a_running_hub_renews_its_own_svid_when_a_third_of_its_life_is_left() {
    let mut hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    // A Hub SVID with a third of its lifetime left, and 8 s: fresh when the Hub starts with
    // it, due soon after.
    hub.stop().await;
    let dir = hub.state_dir();
    let ca = ewii::identity::ca::Ca::load(&dir).unwrap();
    let (key, _) = ewii::identity::ca::new_key_and_csr().unwrap();
    let left = ewii::hub::layout::HUB_SVID_LIFETIME / 3 + Duration::from_secs(8);
    let issued = ca.issue(&key, &SpiffeId::hub(TD).unwrap(), left).unwrap();
    Svid::new(vec![issued.der.clone(), ca.cert().clone()], &key)
        .save(
            &dir,
            ewii::hub::layout::HUB_CERT,
            ewii::hub::layout::HUB_KEY,
        )
        .unwrap();
    hub.restart().await;
    // A session (past `Hello`: a bare handshake is closed by the Hub when no `Hello` follows).
    let mut before = raw_session(&hub, &svid).await.expect("a session");
    assert_eq!(served(&before.conn).0, issued.serial, "started with it");
    let renewed = hub
        .audit
        .wait_for(Duration::from_secs(30), |r| {
            r.event == Event::SvidRotated
                && r.reason
                    .as_deref()
                    .is_some_and(|x| x.starts_with("the Hub's own SVID: serial "))
        })
        .await;
    assert!(renewed.is_some(), "{:#?}", hub.audit.records());
    // Once: the new SVID is not due (a Hub that kept renewing would write one a tick). A
    // look at what does not happen, bounded by the Hub's own clock: ten ticks of its watcher
    // (each compares the database's change marker once, and looks at its SVID).
    let ticks = hub.handle().store_change_checks();
    poll_until("ten ticks of the Hub's watcher", SOON, || {
        hub.handle().store_change_checks() >= ticks + 10
    })
    .await;
    let own = hub
        .audit
        .records()
        .into_iter()
        .filter(|r| {
            r.reason
                .as_deref()
                .is_some_and(|x| x.starts_with("the Hub's own SVID"))
        })
        .count();
    assert_eq!(own, 1);
    let after = raw_handshake(&hub, &svid).await.expect("a handshake");
    let (serial, end) = served(&after.conn);
    assert_ne!(serial, issued.serial);
    let now = ewii::now_timestamp().unix_secs() as i64;
    let lifetime = ewii::hub::layout::HUB_SVID_LIFETIME.as_secs() as i64;
    assert!(
        end - now > lifetime - 60,
        "a whole lifetime: {end} at {now}"
    );
    let on_disk = Svid::load(
        &dir,
        ewii::hub::layout::HUB_CERT,
        ewii::hub::layout::HUB_KEY,
    )
    .unwrap();
    assert_eq!(inspect_leaf(&on_disk.chain[0]).unwrap().serial, serial);
    assert!(renewed.unwrap().reason.unwrap().contains(&serial));
    // The session made before goes on: its handshake is done.
    assert!(before.conn.close_reason().is_none());
    assert!(
        before.ping().await,
        "the session before the renewal still answers"
    );
}

/// A renewal the running Hub signs in the moments after `ca activate`, before its watcher
/// takes the new CA, is still the old CA's: `ca retire` names its Client when it was issued
/// within 10 s of the activation. It counted only the activation's own second, and a plain
/// `retire` then locked that Client out (P15). The moment is made by writing the serial's
/// issue time into the database (a seam: the race itself is one tick of the watcher wide).
#[tokio::test]
async fn p15_ca_retire_names_a_client_issued_in_the_seconds_after_activate() {
    let mut hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let _client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    hub.stop().await;
    let state = hub.state_dir();
    admin::ca_prepare(&state).unwrap();
    admin::ca_activate(&state).unwrap();
    let db = rusqlite::Connection::open(state.join(ewii::hub::layout::DB_FILE)).unwrap();
    let activated: i64 = db
        .query_row(
            "SELECT value FROM meta WHERE key = 'ca_activated_at'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let issued_at = |at: i64| {
        db.execute(
            "UPDATE serials SET issued_at = ?1 WHERE client = 'acme'",
            [at],
        )
        .unwrap()
    };
    issued_at(activated + 3);
    let refused = admin::ca_retire(&state, false).unwrap_err().to_string();
    assert!(
        refused.contains("acme") && refused.contains("within 10 s after it"),
        "{refused}"
    );
    // An SVID that has expired authenticates nothing: it holds nothing back (a Client gone for
    // good would otherwise block a plain retire for ever).
    let now = ewii::now_timestamp().unix_secs() as i64;
    let ends = |at: i64| {
        db.execute(
            "UPDATE serials SET not_after = ?1 WHERE client = 'acme'",
            [at],
        )
        .unwrap()
    };
    let store = ewii::hub::state::Db::open(&state.join(ewii::hub::layout::DB_FILE)).unwrap();
    ends(now - 1);
    assert!(store
        .clients_with_serials_before(activated + 10, now)
        .unwrap()
        .is_empty());
    ends(now + 3_600);
    assert_eq!(
        store
            .clients_with_serials_before(activated + 10, now)
            .unwrap(),
        ["acme"]
    );
    // Issued past the slack, it is the new CA's: the retire goes ahead.
    issued_at(activated + 11);
    admin::ca_retire(&state, false).unwrap();
}

/// Sets or clears the immutable flag of `dir` (root): no entry can be made in it, while a file
/// already in it can still be opened for writing and its time set. The shape of a full disk
/// for the status file: its atomic write (a new temporary, renamed) fails, a touch works.
fn immutable(dir: &Path, on: bool) -> bool {
    Command::new("chattr")
        .arg(if on { "+i" } else { "-i" })
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

/// P13: a status the Client cannot write (a full or read-only state volume) is not vouched
/// for. The writer used to refresh the old file's time at every heartbeat while each new
/// status failed to be written: `health` read an old `connected` as current. Now the file
/// goes stale (and `health` fails within 35 s), and the next heartbeat after the volume
/// recovers writes the newest status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p13_a_status_that_cannot_be_written_is_not_refreshed_as_current() {
    use ewii::client::status::{StatusWriter, STATUS_FILE};
    // The writer's heartbeat, short for the test (10 s in a Client): what is shown is what a
    // heartbeat does, and a wait for nothing to happen must last one.
    const HEARTBEAT: Duration = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    // Setting the flag takes CAP_LINUX_IMMUTABLE (root) and a file system that has it.
    if !immutable(dir.path(), true) {
        assert!(
            !require("EWII_REQUIRE_PRIVILEGED"),
            "EWII_REQUIRE_PRIVILEGED=1 but chattr +i does not work here"
        );
        println!("SKIPPED: chattr +i does not work here (root, and a file system with the flag)");
        return;
    }
    assert!(immutable(dir.path(), false));
    let status = |state: &str| -> Status {
        serde_json::from_value(serde_json::json!({
            "state": state, "pid": 7, "updated_us": 0, "hub": "hub:443",
            "spiffe_id": "spiffe://example.org/client/acme", "svid_not_after": 0,
            "session_id": null, "allow_list": [], "failures": 0, "last_error": null,
        }))
        .unwrap()
    };
    let file = dir.path().join(STATUS_FILE);
    let modified = || std::fs::metadata(&file).and_then(|m| m.modified()).ok();
    let writer = StatusWriter::start_every(dir.path().into(), Default::default(), None, HEARTBEAT);
    writer.publish(status("connected"));
    poll_until("the first status written", SOON, || {
        Status::read(dir.path()).is_ok_and(|s| s.state == State::Connected)
    })
    .await;
    struct Mutable<'a>(&'a Path);
    impl Drop for Mutable<'_> {
        fn drop(&mut self) {
            immutable(self.0, false);
        }
    }
    assert!(immutable(dir.path(), true));
    let guard = Mutable(dir.path());
    writer.publish(status("backoff"));
    let before = modified();
    // Past three heartbeats: the old code touched the file at each.
    tokio::time::sleep(HEARTBEAT * 3).await;
    assert_eq!(
        Status::read(dir.path()).unwrap().state,
        State::Connected,
        "the write failed: the file holds the old state"
    );
    assert_eq!(modified(), before, "and its time is not refreshed");
    drop(guard);
    poll_until(
        "the newest status written once the volume takes it",
        HEARTBEAT + SOON,
        || Status::read(dir.path()).is_ok_and(|s| s.state == State::Backoff),
    )
    .await;

    // A failed write, then a newer status written before the retry: the failed one is not
    // written over it later (at a heartbeat, or at the end).
    let guard = Mutable(dir.path());
    assert!(immutable(dir.path(), true));
    writer.publish(status("connecting"));
    // Time for the writer's tries (it wakes at the publish, and tries again at each
    // heartbeat).
    tokio::time::sleep(HEARTBEAT * 3).await;
    assert_eq!(Status::read(dir.path()).unwrap().state, State::Backoff);
    drop(guard);
    writer.publish(status("connected"));
    poll_until("the newer status written", SOON, || {
        Status::read(dir.path()).is_ok_and(|s| s.state == State::Connected)
    })
    .await;
    tokio::time::sleep(HEARTBEAT * 3).await;
    assert_eq!(
        Status::read(dir.path()).unwrap().state,
        State::Connected,
        "a heartbeat writes the newest status, not the one that failed"
    );
    tokio::task::spawn_blocking(move || writer.finish())
        .await
        .unwrap();
    assert_eq!(
        Status::read(dir.path()).unwrap().state,
        State::Connected,
        "and so does the last write"
    );
}

/// A running Hub clears the certificate kept with each serial whose certificate ended more
/// than a day ago (as it starts, then every hour), so that its database does not grow
/// by the certificates of every renewal it ever issued (docs/operator-guide.md); the rows stay,
/// and a certificate that has not ended is kept (a renewal asked again still gets it).
#[tokio::test]
async fn p8_a_running_hub_clears_the_certificates_of_serials_that_ended() {
    let mut hub = TestHub::start(&[]).await;
    let _client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let db = ewii::hub::state::Db::open(&hub.state_dir().join(admin::DB_FILE)).unwrap();
    let now = ewii::now_timestamp().unix_secs() as i64;
    for (from, not_after) in [("f-ended", now - 2 * 86_400), ("f-current", now + 86_400)] {
        let row = ewii::hub::state::RenewalRow {
            client: "acme".into(),
            from: from.into(),
            serial: format!("s-{from}"),
            key_sha256: from.as_bytes().to_vec(),
            der: vec![0x30; 600],
            not_after,
        };
        db.record_renewal(&row, now).unwrap();
    }
    // Read at the start: the rows were there before it.
    hub.restart().await;
    let der = |from: &str| db.renewal_of(from).unwrap().expect("the row stays").der;
    poll_until("the ended certificate cleared", 3 * SOON, || {
        der("f-ended").is_empty()
    })
    .await;
    assert_eq!(der("f-current"), vec![0x30; 600]);
}
