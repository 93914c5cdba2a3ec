//! A hostile Hub: the real Hub's identity on a server that speaks the protocol wrongly on
//! purpose. The Client refuses every bad `Open` with a code and an audit record, dials nothing
//! it should not, and stays healthy (P4).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ewii::identity::store::{self, Svid};
use ewii::identity::verify::{Bundle, Expect, SpiffeVerifier};
use ewii::transport::{self, FrameReader};
use ewii_common::audit::{Event, Outcome};
use ewii_common::frame::{self, Control, QueryHead, QueryId, RefuseCode};
use ewii_tests::*;
use rustls::pki_types::CertificateDer;

/// A welcomed connection, the receive half of its control stream (the `Hello` read off it) and
/// its send half (the `Welcome` written on it).
type Welcomed = (quinn::Connection, quinn::RecvStream, quinn::SendStream);

/// A server holding the real Hub's SVID and trusting its CA: it welcomes the Client, then
/// hands the connection to the test.
async fn hostile_hub(hub: &TestHub) -> (SocketAddr, tokio::sync::mpsc::Receiver<Welcomed>) {
    hostile_hub_granting(hub, None).await
}

/// Starts `client` against a [`hostile_hub`]: the connection it made, once welcomed (with
/// the control stream's halves, kept open).
async fn at_a_hostile_hub(hub: &TestHub, client: &mut TestClient) -> Welcomed {
    let (addr, mut conns) = hostile_hub(hub).await;
    client.config.hub = addr.to_string().parse().unwrap();
    client.start();
    tokio::time::timeout(SOON, conns.recv())
        .await
        .unwrap()
        .unwrap()
}

/// [`hostile_hub`]; with `Some(window)`, one that grants the Client `window` bytes of unread
/// data per stream: past the `Hello`, what the Client writes on its control stream waits for
/// the test to read it.
async fn hostile_hub_granting(
    hub: &TestHub,
    window: Option<u32>,
) -> (SocketAddr, tokio::sync::mpsc::Receiver<Welcomed>) {
    let endpoint = hub_impostor(
        hub,
        window.map(|window| {
            let mut t = quinn::TransportConfig::default();
            t.stream_receive_window(quinn::VarInt::from_u32(window));
            t
        }),
    );
    let addr = endpoint.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let endpoint = endpoint;
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                continue;
            };
            let mut reader = FrameReader::new();
            if let Ok(Some(Control::Hello { .. })) = reader.read::<Control>(&mut recv).await {
                // As the Hub grants a session once its checks pass (with a transport of the
                // test's own, this sets the Hub's connection window in place of its own).
                transport::authenticated(&conn);
                transport::write_frame(&mut send, &welcome()).await.unwrap();
                // The test keeps the control stream open (a dropped `SendStream` would finish
                // it): the send half goes with the connection.
                let _ = tx.send((conn, recv, send)).await;
            }
        }
    });
    (addr, rx)
}

/// The `Welcome` the hostile Hub answers a `Hello` with.
fn welcome() -> Control {
    Control::Welcome {
        session_id: 1,
        hub_time_us: 0,
        limits: frame::Limits {
            max_concurrent_queries: 1024,
            idle_timeout_ms: 3000,
        },
    }
}

/// Client `acme`, enrolled with `hub`, running against a hostile Hub with `hub`'s identity,
/// and its first connection, welcomed, once the Client has taken the `Welcome` in (its
/// `session_up` is written). Before that, what the test does next would race with the
/// handshake: a revoke ends the Client with no session to record as lost, a stop says no
/// `Goodbye`.
async fn welcomed_by_hostile_hub(hub: &TestHub) -> (TestClient, Welcomed) {
    welcomed_by_hostile_hub_with(hub, "127.0.0.1:9".parse().unwrap()).await
}

/// [`welcomed_by_hostile_hub`], with its allow-list entry `db` at `db`.
async fn welcomed_by_hostile_hub_with(hub: &TestHub, db: SocketAddr) -> (TestClient, Welcomed) {
    welcomed_by_hostile_hub_granting(hub, db, None).await
}

/// [`welcomed_by_hostile_hub_with`], by a Hub that grants `window` bytes of room per stream
/// ([`hostile_hub_granting`]).
async fn welcomed_by_hostile_hub_granting(
    hub: &TestHub,
    db: SocketAddr,
    window: Option<u32>,
) -> (TestClient, Welcomed) {
    let mut client = TestClient::enrol(hub, "acme", &[("db", db.to_string())]).await;
    let (addr, mut conns) = hostile_hub_granting(hub, window).await;
    client.config.hub = addr.to_string().parse().unwrap();
    client.start();
    let welcomed = tokio::time::timeout(SOON, conns.recv())
        .await
        .expect("the Client's connection in time")
        .expect("welcomed");
    client
        .wait_audit("session_up", |r| r.event == Event::SessionUp)
        .await;
    (client, welcomed)
}

/// A QUIC server on loopback with the real Hub's SVID, trusting its CA: Ewii's own server
/// settings (the Client opens one stream, the control stream; how many the impostor may open
/// is the Client's limit), or `transport` in their place.
fn hub_impostor(hub: &TestHub, transport: Option<quinn::TransportConfig>) -> quinn::Endpoint {
    let dir = hub.state_dir();
    let svid = Svid::load(&dir, "hub.pem", "hub.key").unwrap();
    let ca = store::read_certs(&dir.join("ca.pem")).unwrap();
    let verifier = SpiffeVerifier::new(Bundle::new(ca), TD, Expect::Client);
    let tls = transport::tls_server_config(&svid, Arc::new(verifier), &[frame::ALPN]).unwrap();
    let mut quic = transport::quic_server_config(tls, transport::STREAM_WINDOW).unwrap();
    if let Some(t) = transport {
        quic.transport_config(Arc::new(t));
    }
    quinn::Endpoint::server(quic, "127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Opens a stream, writes `bytes`, ends it, and returns the Client's answer.
async fn ask(conn: &quinn::Connection, bytes: &[u8]) -> Result<Option<QueryHead>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    tokio::time::timeout(SOON, FrameReader::new().read::<QueryHead>(&mut recv))
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())
}

/// A query to `destination` the Client answered `Opened`: its stream's halves.
async fn opened(
    conn: &quinn::Connection,
    destination: &str,
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open(destination)).await.unwrap();
    let answer = FrameReader::new()
        .read::<QueryHead>(&mut recv)
        .await
        .unwrap();
    assert_eq!(answer, Some(QueryHead::Opened));
    (send, recv)
}

fn open(destination: &str) -> Vec<u8> {
    frame::encode_to_vec(&QueryHead::Open {
        query_id: QueryId(7),
        destination: destination.to_owned(),
        source: "hostile".into(),
    })
    .unwrap()
    .to_vec()
}

/// Nothing of Ewii travels in QUIC DATAGRAM frames, so neither side may advertise them: one
/// that did would queue a peer's datagrams for a reader that never comes, memory outside
/// every flow-control window. Not advertised, a peer cannot send one (RFC 9221 §3: a
/// protocol violation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_neither_side_takes_quic_datagrams_from_its_peer() {
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    // The Hub, as a Client's handshake sees it.
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let raw = raw_handshake(&hub, &svid)
        .await
        .expect("the Hub's handshake");
    assert_eq!(
        raw.conn.max_datagram_size(),
        None,
        "the Hub advertises QUIC DATAGRAM support"
    );
    assert!(raw
        .conn
        .send_datagram(bytes::Bytes::from_static(b"x"))
        .is_err());
    // The Client, as a Hub sees it.
    let (conn, _control, _send) = at_a_hostile_hub(&hub, &mut client).await;
    assert_eq!(
        conn.max_datagram_size(),
        None,
        "the Client advertises QUIC DATAGRAM support"
    );
    assert!(conn.send_datagram(bytes::Bytes::from_static(b"x")).is_err());
    assert_eq!(client.stop().await, ewii::client::Exit::Stopped);
}

/// A Hub (its real identity) that completes the handshake but grants the Client no stream:
/// the control stream cannot open and `Hello` cannot go. The dial must give up within its
/// bound and try again (P14), not wait for ever while the Hub's keep-alive answers keep the
/// connection alive; and a stop meanwhile ends the Client at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p14_a_hub_that_grants_no_stream_cannot_hold_the_dial() {
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(0));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(transport::IDLE_TIMEOUT).ok());
    let endpoint = hub_impostor(&hub, Some(t));
    let addr = endpoint.local_addr().unwrap();
    let dials = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = dials.clone();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Some(incoming) = endpoint.accept().await {
            if let Ok(conn) = incoming.await {
                counted.fetch_add(1, Ordering::SeqCst);
                conns.push(conn);
            }
        }
    });
    client.config.hub = addr.to_string().parse().unwrap();
    client.start();
    poll_until("the first dial's handshake", SOON, || {
        dials.load(Ordering::SeqCst) >= 1
    })
    .await;
    // Past the 10 s bound for `Welcome`, the dial failed and a new one came.
    poll_until("a second dial", Duration::from_secs(20), || {
        dials.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert!(
        !client
            .audit
            .records()
            .iter()
            .any(|r| r.event == Event::SessionUp),
        "no session came up"
    );
    let stopped = tokio::time::Instant::now();
    assert_eq!(client.stop().await, ewii::client::Exit::Stopped);
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopped.elapsed()
    );
    held.abort();
}

/// One identity (a stolen key, a broken Client) opening session after session: the Hub keeps
/// at most four of them, closing the oldest, so they cannot pile up for the SVID's lifetime;
/// the newest serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p6_one_identity_holds_at_most_four_sessions_on_the_hub() {
    let hub = TestHub::start(&[]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let mut sessions = Vec::new();
    for _ in 0..6 {
        sessions.push(raw_session(&hub, &svid).await.expect("a session"));
    }
    for (i, s) in sessions.iter().enumerate().take(2) {
        assert_eq!(
            s.closed_by_hub().await,
            Some(transport::codes::REFUSED.into_inner()),
            "session {i}, among the oldest, was not closed"
        );
    }
    let superseded = hub
        .wait_audit("the oldest session's end", |r| {
            r.event == Event::SessionLost
                && r.reason
                    .as_deref()
                    .is_some_and(|s| s.contains("superseded"))
        })
        .await;
    assert!(
        superseded.reason.as_deref().unwrap().starts_with("retired"),
        "{superseded:?}"
    );
    for s in &mut sessions[2..] {
        assert!(s.ping().await, "a newer session was closed");
    }
    assert_eq!(hub.handle().connected_clients(), ["acme"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_a_hostile_hub_gets_refusals_with_codes_and_the_client_stays_healthy() {
    let (db, accepted) = counting_listener().await;
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", db.to_string())]).await;
    // The hostile side may open as many streams at once as the Client allows.
    client.config.max_queries = 10_000;
    let (conn, _control, _send) = at_a_hostile_hub(&hub, &mut client).await;

    // Every spelling of a name that is not exactly "db".
    // The longest name a query header holds (4 KiB in all).
    let long = "d".repeat(4_000);
    let names = [
        "DB",
        "Db",
        "db.",
        ".db",
        "db ",
        " db",
        "db\0",
        "db\n",
        "../db",
        "db/..",
        "d/b",
        "ｄｂ",
        "dЬ",
        "",
        long.as_str(),
        &db.to_string(),
        &db.ip().to_string(),
        "localhost",
        "db,db",
        "db*",
        "db\u{202e}bd",
    ];
    for name in names {
        let answer = ask(&conn, &open(name)).await;
        assert_eq!(
            answer,
            Ok(Some(QueryHead::Refused {
                code: RefuseCode::NotAllowed
            })),
            "{name:?}"
        );
    }
    // The Hub's words are recorded with no character that could disguise them in a SIEM.
    let spoof = client
        .wait_audit("the record of a name with a bidi override", |r| {
            r.destination
                .as_ref()
                .is_some_and(|d| d.name.starts_with("db\\u{202e}"))
        })
        .await;
    assert_eq!(spoof.destination.unwrap().name, "db\\u{202e}bd");
    // And bounded: the record of the long one keeps 512 characters of it.
    let cut = format!("{}…", &long[..512]);
    let bounded = client
        .wait_audit("the record of the longest name", |r| {
            r.destination.as_ref().is_some_and(|d| d.name.len() > 500)
        })
        .await;
    assert_eq!(bounded.destination.unwrap().name, cut);
    assert!(
        bounded.reason.as_deref().is_some_and(|r| r.len() < 600),
        "{:?}",
        bounded.reason
    );
    // Frames that are not an Open: truncated, oversized, unknown type, the wrong message.
    let mut oversized = ((frame::MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
    oversized.push(frame::FORMAT_VERSION);
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[frame::FORMAT_VERSION, 0, 1, 2]);
    let unknown = {
        let mut f = 3u32.to_be_bytes().to_vec();
        f.extend_from_slice(&[frame::FORMAT_VERSION, 0x7f, 0]);
        f
    };
    let wrong_message = frame::encode_to_vec(&QueryHead::Opened).unwrap().to_vec();
    let wrong_version = {
        let mut f = open("db");
        f[4] = 99;
        f
    };
    for (what, bytes) in [
        ("oversized", oversized),
        ("larger than a query header", open(&"d".repeat(5_000))),
        ("truncated", truncated),
        ("unknown type", unknown),
        ("wrong message", wrong_message),
        ("wrong format version", wrong_version),
        ("nothing", Vec::new()),
    ] {
        let answer = ask(&conn, &bytes).await;
        assert!(
            answer
                .as_ref()
                .is_err_and(|e| e.contains("reset by peer") || e.contains("stopped")),
            "{what}: {answer:?}"
        );
    }
    // A stream the Hub resets before any header: nothing was sent to refuse.
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.reset(7u32.into()).unwrap();
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing was dialled");

    // 10,000 streams at once, each refused, do not wear it down.
    let many: Vec<_> = (0..10_000)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move { ask(&conn, &open(&format!("nope-{i}"))).await })
        })
        .collect();
    for t in many {
        assert_eq!(
            t.await.unwrap(),
            Ok(Some(QueryHead::Refused {
                code: RefuseCode::NotAllowed
            }))
        );
    }
    // Still healthy: the real name is served.
    drop(opened(&conn, "db").await);
    poll_until("the real query to connect", SOON, || {
        accepted.load(Ordering::SeqCst) == 1
    })
    .await;

    // Every refusal left an audit record with its reason.
    let records = client.audit.records();
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r.event == Event::Query && r.outcome == Some(Outcome::Refused))
        .collect();
    assert_eq!(
        refused.len(),
        names.len() + 6 + 10_000,
        "one record per refusal"
    );
    assert!(
        refused
            .iter()
            .filter(|r| r
                .reason
                .as_deref()
                .is_some_and(|x| x.starts_with("protocol: ")))
            .count()
            == 6
    );
    // The empty stream and the reset one carried nothing to refuse: they failed.
    let mut failed: Vec<_> = records
        .iter()
        .filter(|r| r.event == Event::Query && r.outcome == Some(Outcome::Failed))
        .filter_map(|r| r.reason.as_deref())
        .collect();
    failed.sort_unstable();
    assert_eq!(
        failed,
        [
            "protocol: no Open header: read: stream reset by peer: error 7",
            "protocol: the stream ended before an Open header"
        ]
    );
    assert!(
        refused.iter().any(|r| r.reason.as_deref().is_some_and(|x| x
            .starts_with("protocol: bad Open header: frame: frame of 5")
            && x.ends_with("exceeds this message's maximum of 4096"))),
        "the header over 4 KiB is refused as such"
    );
    client.stop().await;
}

/// A Hub that stops reading the control stream holds each write on it for ever (QUIC flow
/// control): the Client's loop must not wait behind one. Its stop still ends the session in
/// order, and the session's end is on record (P11: every connection logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_a_hub_that_stops_reading_the_control_stream_still_gets_the_session_on_record() {
    // 10 s SVIDs: the Client asks to renew at 4 to 6 s, and is stopped well before 10.
    let hub = TestHub::start_with(&[], 10).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    // 64 bytes past what was read: a `Renew` (a CSR alone is over 150 bytes) waits.
    let (addr, mut conns) = hostile_hub_granting(&hub, Some(64)).await;
    client.config.hub = addr.to_string().parse().unwrap();
    client.start();
    let (conn, mut control, _send) = tokio::time::timeout(SOON, conns.recv())
        .await
        .unwrap()
        .unwrap();
    // The `Renew` has started (its first byte is here; reading one byte gives one byte of
    // room, not the rest of it): the Client's write of it waits.
    let first = tokio::time::timeout(Duration::from_secs(15), control.read_chunk(1, true))
        .await
        .expect("the Client's Renew in time")
        .unwrap();
    assert!(first.is_some_and(|c| c.bytes.len() == 1));
    let exit = tokio::time::timeout(Duration::from_secs(20), client.stop())
        .await
        .expect("the Client stops");
    assert_eq!(exit, ewii::client::Exit::Stopped);
    let lost = client
        .audit
        .records()
        .into_iter()
        .filter(|r| r.event == Event::SessionLost)
        .count();
    assert_eq!(lost, 1, "the session's end is on record");
    drop(conn);
}

/// The Client's `Renew` on the hostile Hub's control stream (it asks after 4 to 6 s of a
/// 10 s SVID): its CSR.
async fn renew_asked(control: &mut quinn::RecvStream) -> Vec<u8> {
    let mut reader = FrameReader::new();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(15), reader.read(control))
            .await
            .expect("the Client's Renew in time")
            .unwrap();
        match frame {
            Some(Control::Renew { csr }) => return csr,
            Some(_) => continue,
            None => panic!("the control stream ended"),
        }
    }
}

/// A `Renewed` answer to `csr`, signed by `hub`'s CA, whose bundle adds a CA of someone
/// else's (as during a CA rotation); sent on `send`. Returns the new serial and that CA.
async fn renewed_adding_a_ca(
    hub: &TestHub,
    csr: &[u8],
    send: &mut quinn::SendStream,
) -> (String, CertificateDer<'static>) {
    let ca = ewii::identity::ca::Ca::load(&hub.state_dir()).unwrap();
    let theirs = ewii::identity::ca::Ca::generate(TD).unwrap().cert().clone();
    let id = ewii_common::spiffe::SpiffeId::client(TD, "acme").unwrap();
    let issued = ca.sign_csr(csr, &id, Duration::from_secs(10)).unwrap();
    let renewed = Control::Renewed {
        chain: vec![issued.der.to_vec()],
        bundle: vec![ca.cert().to_vec(), theirs.to_vec()],
    };
    send.write_all(&frame::encode_to_vec(&renewed).unwrap())
        .await
        .unwrap();
    (issued.serial, theirs)
}

/// A renewal whose answer brings a bundle with a CA added (as the Hub's answers do during a
/// CA rotation): the change of the Hub's trust anchors has its own `bundle_updated` record,
/// as a pushed bundle's does, not only words in the `svid_rotated` record. Two such renewals
/// could otherwise swap the anchors with no `bundle_updated` record at all (P15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p15_a_bundle_that_comes_with_a_renewal_has_its_own_record() {
    // 10 s SVIDs: the Client asks to renew after 4 to 6 s.
    let hub = TestHub::start_with(&[], 10).await;
    let (mut client, (_conn, mut control, mut send)) = welcomed_by_hostile_hub(&hub).await;
    let csr = renew_asked(&mut control).await;
    let (serial, theirs) = renewed_adding_a_ca(&hub, &csr, &mut send).await;
    let updated = client
        .wait_audit("the bundle's record", |r| r.event == Event::BundleUpdated)
        .await;
    assert_eq!(updated.outcome, Some(Outcome::Ok));
    let reason = updated.reason.unwrap();
    assert!(
        reason.starts_with("with the renewal of serial "),
        "{reason}"
    );
    assert!(
        reason.ends_with(&format!(
            "2 trust anchor(s); added {}",
            ewii::identity::bundle_hash(&theirs)
        )),
        "{reason}"
    );
    let rotated = client
        .wait_audit("the renewal's record", |r| {
            r.event == Event::SvidRotated && r.outcome == Some(Outcome::Ok)
        })
        .await;
    assert!(rotated
        .reason
        .is_some_and(|x| x.contains(&format!("serial {serial}"))),);
    client.stop().await;
}

/// A renewal stored in part: its bundle was written, its SVID could not be (here a directory
/// stands where `svid.pem` is replaced). The bundle on disk is what the next start trusts, so
/// it is the one in use now too, with its `bundle_updated` record; the renewal's refusal says
/// the bundle was stored. Before, the record said refused while the anchors had changed on
/// disk with no record (P15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p15_a_renewal_whose_svid_cannot_be_stored_keeps_its_stored_bundle_on_record() {
    let hub = TestHub::start_with(&[], 10).await;
    let (mut client, (_conn, mut control, mut send)) = welcomed_by_hostile_hub(&hub).await;
    let csr = renew_asked(&mut control).await;
    let cert = client.state_dir().join(store::SVID_CERT);
    std::fs::remove_file(&cert).unwrap();
    std::fs::create_dir(&cert).unwrap();
    std::fs::write(cert.join("in the way"), "").unwrap();
    let (_, theirs) = renewed_adding_a_ca(&hub, &csr, &mut send).await;
    let added = ewii::identity::bundle_hash(&theirs);
    let updated = client
        .wait_audit("the bundle's record", |r| r.event == Event::BundleUpdated)
        .await;
    let reason = updated.reason.unwrap();
    assert!(
        reason.starts_with("with a renewal of serial ")
            && reason.contains("whose SVID was not stored whole: 2 trust anchor(s); added ")
            && reason.ends_with(&added),
        "{reason}"
    );
    let refused = client
        .wait_audit("the renewal's refusal", |r| {
            r.event == Event::SvidRotated && r.outcome == Some(Outcome::Refused)
        })
        .await;
    assert!(
        refused
            .reason
            .as_deref()
            .is_some_and(|x| x.contains("cannot store the renewed SVID (its bundle was stored)")),
        "{refused:?}"
    );
    let on_disk = std::fs::read_to_string(client.state_dir().join(store::BUNDLE)).unwrap();
    assert_eq!(on_disk.matches("BEGIN CERTIFICATE").count(), 2);
    poll_until("the status to show the bundle in use", SOON, || {
        ewii::client::status::Status::read(&client.state_dir())
            .is_ok_and(|s| s.bundle.contains(&added))
    })
    .await;
    client.stop().await;
}

/// The Client's record of a query for `destination`, if one comes `within`.
async fn query_record(
    client: &TestClient,
    destination: &str,
    within: Duration,
) -> Option<ewii_common::audit::AuditRecord> {
    client
        .audit
        .wait_for(within, |r| {
            r.event == Event::Query
                && r.destination
                    .as_ref()
                    .is_some_and(|d| d.name == destination)
        })
        .await
}

/// A Hub that grants one byte of room per stream and reads nothing past the `Hello` asks for a
/// name outside the allow-list: the Client's `Refused` cannot be written whole, and the
/// refusal is on record all the same, as `refused`, without waiting for room. A
/// probe of the allow-list must never hide in a record written only when the session ends (or
/// never, if the Client is killed first), nor pass for a `failed` query (P11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_a_refusal_the_hub_leaves_no_room_for_is_on_record_at_once() {
    let hub = TestHub::start(&[]).await;
    let (mut client, (conn, _control, _send)) =
        welcomed_by_hostile_hub_granting(&hub, "127.0.0.1:9".parse().unwrap(), Some(1)).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&open("metadata")).await.unwrap();
    // Well within the answer's own 10 s bound: the record does not wait for it.
    let refused = query_record(&client, "metadata", Duration::from_secs(5))
        .await
        .expect("the refusal's record before the answer's bound");
    assert_eq!(refused.outcome, Some(Outcome::Refused), "{refused:?}");
    assert!(
        refused
            .reason
            .as_deref()
            .is_some_and(|x| x.contains("not in the allow-list")),
        "{refused:?}"
    );
    assert_eq!(client.stop().await, ewii::client::Exit::Stopped);
    drop(conn);
}

/// The same Hub, asking for the allowed `db`: the Client dials it, and its `Opened` cannot be
/// written. Within the answer's bound (10 s) the query ends, `failed` and on record, and the
/// destination's connection is closed: a Hub cannot hold a database connection open per
/// stream by never making room for the answer (P4, P11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_p11_an_opened_the_hub_leaves_no_room_for_does_not_hold_the_destination() {
    let hub = TestHub::start(&[]).await;
    let db = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (mut client, (conn, _control, _send)) =
        welcomed_by_hostile_hub_granting(&hub, db.local_addr().unwrap(), Some(1)).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&open("db")).await.unwrap();
    let (mut dialled, _) = tokio::time::timeout(SOON, db.accept())
        .await
        .expect("the Client dials db")
        .unwrap();
    let record = query_record(&client, "db", Duration::from_secs(20))
        .await
        .expect("on record within the answer's bound");
    assert_eq!(record.outcome, Some(Outcome::Failed), "{record:?}");
    assert_eq!(
        record.reason.as_deref(),
        Some("the Hub gave no room for Opened within 10 s")
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        SOON,
        tokio::io::AsyncReadExt::read_to_end(&mut dialled, &mut rest),
    )
    .await;
    assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
    assert_eq!(client.stop().await, ewii::client::Exit::Stopped);
    drop(conn);
}

/// The Hub's `/metrics`: connections that send no request (16 of them, as many as it
/// answers at once, renewed by a stranger before each times out) cannot keep Prometheus out.
/// A new connection displaces the oldest one still waiting for its request; the others stay
/// open, so the scrape was answered long before any of them timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_metrics_cannot_starve_a_scrape() {
    use std::io::Read;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = TestHub::start_custom(&[], "metrics_listen = \"127.0.0.1:0\"\n").await;
    let addr = hub.metrics.unwrap();
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // (The Hub accepts in arrival order: the 16 are in before the scrape.)
    let scrape = async {
        let mut scrape = tokio::net::TcpStream::connect(addr).await.unwrap();
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: hub\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        scrape.read_to_string(&mut answer).await.unwrap();
        answer
    };
    let answer = tokio::time::timeout(SOON, scrape)
        .await
        .expect("the scrape answered");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("ewii_hub_clients_connected"), "{answer}");
    // The oldest idle connection was closed to make room; the 15 younger are still open (a
    // read on each, not the runtime's idea of it: closed reads 0, open would block).
    let state = |s: tokio::net::TcpStream| {
        let mut s = s.into_std().unwrap();
        s.set_nonblocking(true).unwrap();
        match s.read(&mut [0u8; 1]) {
            Ok(0) => "closed",
            Ok(_) => "spoke",
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "open",
            Err(_) => "closed",
        }
    };
    let mut idle = idle.into_iter();
    let oldest = idle.next().unwrap();
    let closed = tokio::time::timeout(SOON, async {
        let mut oldest = oldest;
        oldest.read(&mut [0u8; 1]).await
    })
    .await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the oldest idle connection goes: {closed:?}"
    );
    let states: Vec<&str> = idle.map(state).collect();
    assert_eq!(states, vec!["open"; 15], "only the oldest was displaced");
}

/// Whoever holds the Hub's key cannot make the Client trust only a CA of their own in one
/// message: a bundle that keeps none of the anchors in use is refused and recorded with what it
/// held, and the bundle on disk stays (P15: a rotation always overlaps). One that adds a CA is
/// taken, and its record names the CA added, for the customer's SIEM. A `Refused` that answers
/// nothing the Client asked closes the connection as a protocol violation, as an unasked
/// `Renewed` does, rather than a log line per frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p15_a_bundle_from_the_hub_must_overlap_and_its_record_names_what_it_changes() {
    let hub = TestHub::start(&[]).await;
    let (mut client, (conn, _control, mut send)) = welcomed_by_hostile_hub(&hub).await;
    let dir = client.state_dir();
    let on_disk = || std::fs::read(dir.join(store::BUNDLE)).unwrap();
    let before = on_disk();
    let ours = store::read_certs(&hub.state_dir().join("ca.pem")).unwrap()[0].clone();
    let theirs = ewii::identity::ca::Ca::generate(TD).unwrap().cert().clone();
    let hash = ewii::identity::bundle_hash;
    let push = |bundle: Vec<Vec<u8>>| frame::encode_to_vec(&Control::BundleUpdate { bundle });

    send.write_all(&push(vec![theirs.to_vec()]).unwrap())
        .await
        .unwrap();
    let refused = client
        .wait_audit("the refused bundle", |r| {
            r.event == Event::BundleUpdated && r.outcome == Some(Outcome::Refused)
        })
        .await;
    assert_eq!(
        refused.reason.as_deref(),
        Some(
            format!(
                "the bundle keeps none of the trust anchors in use (it holds {}): a CA rotation always overlaps; bundle kept",
                hash(&theirs)
            )
            .as_str()
        )
    );
    assert_eq!(on_disk(), before, "the bundle on disk is the one pinned");

    send.write_all(&push(vec![ours.to_vec(), theirs.to_vec()]).unwrap())
        .await
        .unwrap();
    let taken = client
        .wait_audit("the bundle taken", |r| {
            r.event == Event::BundleUpdated && r.outcome == Some(Outcome::Ok)
        })
        .await;
    assert_eq!(
        taken.reason.as_deref(),
        Some(format!("2 trust anchor(s); added {}", hash(&theirs)).as_str())
    );
    assert_ne!(on_disk(), before);

    let unasked = Control::Refused {
        code: RefuseCode::Busy,
    };
    send.write_all(&frame::encode_to_vec(&unasked).unwrap())
        .await
        .unwrap();
    let closed = tokio::time::timeout(SOON, conn.closed())
        .await
        .expect("the Client closes the connection");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == transport::codes::PROTOCOL),
        "{closed:?}"
    );
    client.stop().await;
}

/// A revocation reason from the Hub that copies the Client's own words for a revoke at its
/// stop cannot pass for one, with a space after them either (the marker is read back
/// trimmed): the marker the next start reads to say who revoked it, and the session's record,
/// keep them as the Hub's. Said on the control stream, and as the close's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_p10_a_hubs_revoke_cannot_pass_for_the_clients_own_at_its_stop() {
    let own = "revoked at its stop (on_stop = \"revoke\"), confirmed by the Hub";
    let said = format!("{own} ");
    for close in [false, true] {
        let hub = TestHub::start(&[]).await;
        let (mut client, (conn, _control, mut send)) = welcomed_by_hostile_hub(&hub).await;
        if close {
            conn.close(transport::codes::REVOKED, said.as_bytes());
        } else {
            let revoked = Control::Revoked {
                reason: said.clone(),
            };
            send.write_all(&frame::encode_to_vec(&revoked).unwrap())
                .await
                .unwrap();
        }
        let exit = client.ended(SOON).await.unwrap();
        let marked = format!("by the Hub: {said}");
        assert_eq!(
            exit,
            ewii::client::Exit::Revoked {
                reason: marked.clone()
            },
            "close: {close}"
        );
        let marker =
            std::fs::read_to_string(client.state_dir().join(ewii::client::REVOKED_MARKER)).unwrap();
        assert_eq!(marker.trim(), marked.trim());
        let lost = client
            .wait_audit("the session_lost record", |r| r.event == Event::SessionLost)
            .await;
        assert_eq!(
            lost.reason.as_deref(),
            Some(format!("revoked: {marked}").as_str()),
            "close: {close}"
        );
        let again = client.run_once(SOON).await.unwrap_err().to_string();
        assert!(again.contains("was revoked by the Hub"), "{again}");
    }
}

/// A Client (a stolen key, a broken build) that grants the Hub almost no room on its query
/// streams cannot hold a requester, or the Hub's task for it, past the Hub's bound on writing
/// the `Open`: the query fails, recorded with why, and the requester's connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_a_client_that_takes_no_open_cannot_hold_the_requester() {
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    // 16 bytes of room per stream: the `Hello` exchange goes through as it is read; an `Open`
    // (its header and the requester's identity) does not fit, and nothing reads it.
    let session = raw_handshake_with_window(&hub, &svid, 16)
        .await
        .expect("the handshake")
        .hello()
        .await
        .expect("a session");
    hub.wait_connected("acme").await;
    let mut requester = tokio::net::TcpStream::connect(hub.service("pg"))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut back = Vec::new();
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::AsyncReadExt::read_to_end(&mut requester, &mut back),
    )
    .await;
    assert!(ended.is_ok(), "the requester was held for 30 s");
    assert!(back.is_empty());
    let failed = hub.wait_audit("the query's record", is(Event::Query)).await;
    assert_eq!(failed.outcome, Some(Outcome::Failed));
    assert_eq!(
        failed.reason.as_deref(),
        Some("send Open: the Client took none of it within 15 s")
    );
    assert!(
        started.elapsed() >= Duration::from_secs(14),
        "ended by the bound, not before: {:?}",
        started.elapsed()
    );
    // The session itself goes on: the bound ends the query, not the Client's connection.
    assert_eq!(hub.handle().connected_clients(), vec!["acme".to_owned()]);
    drop(session);
}

/// A query stream the Hub opened as the Client said `Goodbye` (before it read it) is answered
/// `shutting_down` and recorded on the Client, with the Hub's query id, as `failed`: the stop
/// does not leave it to die unanswered with the connection. The Client still stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_a_stopping_client_answers_and_records_a_query_opened_as_it_said_goodbye() {
    let hub = TestHub::start(&[]).await;
    let (mut client, (conn, mut control, mut send)) = welcomed_by_hostile_hub(&hub).await;
    let the_hub = async {
        let mut reader = FrameReader::new();
        let goodbye = tokio::time::timeout(SOON, reader.read::<Control>(&mut control))
            .await
            .expect("the Goodbye in time")
            .unwrap();
        assert_eq!(goodbye, Some(Control::Goodbye { revoke: false }));
        // The stream, and the acknowledgement right behind it (the Client may close once
        // nothing is left): it may take either first.
        let (mut query, mut answer) = conn.open_bi().await.unwrap();
        query.write_all(&open("db")).await.unwrap();
        send.finish().unwrap();
        tokio::time::timeout(SOON, FrameReader::new().read::<QueryHead>(&mut answer))
            .await
            .map_err(|_| "no answer in time".to_string())?
            .map_err(|e| e.to_string())
    };
    let (exit, answer) = tokio::join!(client.stop(), the_hub);
    assert_eq!(
        answer,
        Ok(Some(QueryHead::Refused {
            code: RefuseCode::ShuttingDown
        }))
    );
    assert_eq!(exit, ewii::client::Exit::Stopped);
    let r = client
        .wait_audit("the query's record", |r| r.event == Event::Query)
        .await;
    assert_eq!(r.outcome, Some(Outcome::Failed));
    assert_eq!(
        r.reason.as_deref(),
        Some("the Client is stopping: it takes no new query")
    );
    assert_eq!(r.query_id, Some(QueryId(7)));
    assert_eq!(r.destination.map(|d| d.name).as_deref(), Some("db"));
}

/// A query open when the Hub closes the connection is recorded on the Client with the Hub's
/// words for the close, however the pipe learnt of it (its stream read, or the connection's
/// end): "connection lost" alone would hide why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_a_query_cut_by_the_hubs_close_records_the_hubs_reason() {
    let echo = echo_server().await;
    let hub = TestHub::start(&[]).await;
    let (client, (conn, _control, _send)) = welcomed_by_hostile_hub_with(&hub, echo).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open("db")).await.unwrap();
    let answer = tokio::time::timeout(SOON, FrameReader::new().read::<QueryHead>(&mut recv))
        .await
        .expect("the answer in time")
        .unwrap();
    assert_eq!(answer, Some(QueryHead::Opened));
    conn.close(quinn::VarInt::from_u32(5), b"maintenance window");
    let r = client
        .wait_audit("the query's record", |r| r.event == Event::Query)
        .await;
    assert_eq!(r.outcome, Some(Outcome::Failed));
    let reason = r.reason.unwrap_or_default();
    assert!(reason.contains("maintenance window (code 5)"), "{reason}");
}

/// The next connection to `endpoint`, its control stream, and the reader that took its `Hello`
/// off it (nothing answered yet).
async fn hello_from_the_client(
    endpoint: &quinn::Endpoint,
) -> (
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    FrameReader,
) {
    let conn = endpoint.accept().await.unwrap().await.unwrap();
    let (send, mut recv) = conn.accept_bi().await.unwrap();
    let mut reader = FrameReader::new();
    let hello = reader.read::<Control>(&mut recv).await;
    transport::authenticated(&conn);
    assert!(
        matches!(hello, Ok(Some(Control::Hello { .. }))),
        "{hello:?}"
    );
    (conn, send, recv, reader)
}

/// A destination that counts the connections made to it (its kernel's accept queue, never
/// accepted): `pending(&db)` says whether any came.
fn counting_destination() -> std::net::TcpListener {
    let db = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    db.set_nonblocking(true).unwrap();
    db
}

/// Whether a connection to `db` ([`counting_destination`]) was made.
fn dialled(db: &std::net::TcpListener) -> bool {
    match db.accept() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("the destination's listener: {e}"),
    }
}

/// A stopping Client takes no new query (DESIGN §6), also one whose stream the Hub opened
/// before it read `Goodbye` and whose `Open` it sends after: that query is answered
/// `ShuttingDown` and recorded, and its destination, allowed, is never dialled.
#[tokio::test]
async fn p9_a_stopping_client_dials_no_query_whose_open_comes_after_its_goodbye() {
    let hub = TestHub::start(&[]).await;
    let db = counting_destination();
    let (mut client, (conn, mut control, mut send)) =
        welcomed_by_hostile_hub_with(&hub, db.local_addr().unwrap()).await;
    // Stream A: the first byte of an `Open` for the allowed `db`; the rest is held back.
    let head = open("db");
    let (mut held, mut held_answer) = conn.open_bi().await.unwrap();
    held.write_all(&head[..1]).await.unwrap();
    // Stream B, a complete query the allow-list refuses: once it is answered, the Client has
    // taken A too (streams are taken in the order they were opened).
    assert_eq!(
        ask(&conn, &open("elsewhere")).await,
        Ok(Some(QueryHead::Refused {
            code: RefuseCode::NotAllowed
        }))
    );

    let hub_side = async {
        let goodbye = FrameReader::new().read::<Control>(&mut control).await;
        assert!(
            matches!(goodbye, Ok(Some(Control::Goodbye { .. }))),
            "{goodbye:?}"
        );
        // The rest of A's `Open`, after the `Goodbye`.
        held.write_all(&head[1..]).await.unwrap();
        let _ = held.finish();
        let answer =
            tokio::time::timeout(SOON, FrameReader::new().read::<QueryHead>(&mut held_answer))
                .await
                .expect("an answer to the held query in time");
        // The `Goodbye` is taken: the Client may go.
        let _ = send.finish();
        answer
    };
    let (exit, answer) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(20), client.stop()),
        hub_side
    );
    exit.expect("the Client stops");
    assert_eq!(
        answer.unwrap(),
        Some(QueryHead::Refused {
            code: RefuseCode::ShuttingDown
        })
    );
    assert!(!dialled(&db), "a stopping Client dialled the destination");
    let records = client.audit.records();
    let held_query = records
        .iter()
        .find(|r| {
            r.event == Event::Query
                && r.query_id == Some(QueryId(7))
                && r.destination.as_ref().is_some_and(|d| d.name == "db")
        })
        .expect("the held query's record");
    assert_eq!(held_query.outcome, Some(Outcome::Failed));
    assert_eq!(
        held_query.reason.as_deref(),
        Some("the Client is stopping: it takes no new query")
    );
}

/// A Client whose revoke is pending dials only to deliver it and serves nothing on that
/// connection (P9), even a query the Hub opened before its `Welcome`, already there when the
/// connection starts: it is answered `ShuttingDown`, never dialled. Five Clients in turn: the
/// connection's first moment is where the race was.
#[tokio::test]
async fn p9_the_connection_that_delivers_a_pending_revoke_serves_no_query() {
    let hub = TestHub::start(&[]).await;
    let db = counting_destination();
    let endpoint = hub_impostor(&hub, None);
    let addr = endpoint.local_addr().unwrap();
    for round in 0..5 {
        let name = format!("acme{round}");
        let allow = [("db", db.local_addr().unwrap().to_string())];
        let mut client = TestClient::enrol(&hub, &name, &allow).await;
        std::fs::write(
            client.state_dir().join(ewii::client::REVOKE_PENDING_MARKER),
            "",
        )
        .unwrap();
        client.config.hub = addr.to_string().parse().unwrap();
        client.start();
        let hub_side = async {
            let (conn, mut send, mut recv, mut reader) = hello_from_the_client(&endpoint).await;
            // A query before the `Welcome`: it is there when the Client's connection starts.
            let (mut query, mut answer) = conn.open_bi().await.unwrap();
            query.write_all(&open("db")).await.unwrap();
            let _ = query.finish();
            transport::write_frame(&mut send, &welcome()).await.unwrap();
            let goodbye = reader.read::<Control>(&mut recv).await;
            assert!(
                matches!(goodbye, Ok(Some(Control::Goodbye { revoke: true }))),
                "{goodbye:?}"
            );
            let answer =
                tokio::time::timeout(SOON, FrameReader::new().read::<QueryHead>(&mut answer))
                    .await
                    .expect("an answer to the query in time");
            // The revoke is taken.
            let _ = send.finish();
            (answer, conn)
        };
        let (exit, (answer, _conn)) = tokio::join!(client.ended(Duration::from_secs(20)), hub_side);
        assert_eq!(
            exit.unwrap(),
            ewii::client::Exit::Revoked {
                reason: ewii_common::session::PENDING_REVOKE_REASON.into()
            }
        );
        assert_eq!(
            answer.unwrap(),
            Some(QueryHead::Refused {
                code: RefuseCode::ShuttingDown
            }),
            "round {round}"
        );
        assert!(!dialled(&db), "round {round}: the destination was dialled");
    }
}

/// Only the Client pings (architecture.md, "Hub keep-alives are off"), and it never sends the
/// control stream's `Ping`: a `Ping` or a `Pong` from the Hub is a protocol violation that
/// closes the connection, on record, not a frame a Hub may send as often as it likes.
#[tokio::test]
async fn p4_a_ping_or_an_unasked_pong_from_the_hub_closes_the_connection() {
    for (what, frame) in [
        ("Ping", Control::Ping { time_us: 1 }),
        (
            "Pong",
            Control::Pong {
                echo_us: 1,
                time_us: 2,
            },
        ),
    ] {
        let hub = TestHub::start(&[]).await;
        let (client, (conn, _control, mut send)) = welcomed_by_hostile_hub(&hub).await;
        transport::write_frame(&mut send, &frame).await.unwrap();
        let lost = closed_as_protocol_error(what, &conn, &client).await;
        assert!(
            lost.reason
                .as_deref()
                .is_some_and(|r| r.contains("unexpected control message")),
            "{what}: {lost:?}"
        );
    }
}

/// Answers (`Renewed`, `Refused`, `Presented`) beyond what the Client asked on a connection
/// end it at the first, in the connection's own task: none reaches the driver, which may be
/// waiting on the disk while a Hub sends them at line rate (they would queue without bound).
/// A burst of a thousand is sent in one write; the end is on record with its cause.
#[tokio::test]
async fn p4_answers_to_nothing_asked_end_the_connection_at_the_first() {
    let serial = "ab".repeat(20);
    for (what, frame) in [
        (
            "Renewed",
            Control::Renewed {
                chain: Vec::new(),
                bundle: Vec::new(),
            },
        ),
        (
            "Refused",
            Control::Refused {
                code: RefuseCode::Busy,
            },
        ),
        ("Presented", Control::Presented { serial }),
    ] {
        let hub = TestHub::start(&[]).await;
        let (client, (conn, _control, mut send)) = welcomed_by_hostile_hub(&hub).await;
        let one = frame::encode_to_vec(&frame).unwrap();
        let burst: Vec<u8> = one.iter().copied().cycle().take(one.len() * 1000).collect();
        // The Client may close before it has read them all.
        let _ = send.write_all(&burst).await;
        let lost = closed_as_protocol_error(what, &conn, &client).await;
        assert_eq!(
            lost.reason.as_deref(),
            Some("protocol: control stream: an answer from the Hub to nothing asked on this connection"),
            "{what}: {lost:?}"
        );
    }
}

/// The Client closes `conn` as a protocol violation (`what` broke it), soon; its record of the
/// end.
async fn closed_as_protocol_error(
    what: &str,
    conn: &quinn::Connection,
    client: &TestClient,
) -> ewii_common::audit::AuditRecord {
    let closed = tokio::time::timeout(SOON, conn.closed())
        .await
        .unwrap_or_else(|_| panic!("{what}: the Client kept the connection"));
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == transport::codes::PROTOCOL),
        "{what}: {closed:?}"
    );
    client
        .wait_audit("session_lost", |r| r.event == Event::SessionLost)
        .await
}

/// Client `acme`, enrolled with `hub`, started against an impostor of it ([`hub_impostor`]).
async fn client_of_an_impostor(hub: &TestHub) -> (TestClient, quinn::Endpoint) {
    let endpoint = hub_impostor(hub, None);
    let addr = endpoint.local_addr().unwrap();
    let mut client = TestClient::enrol(hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    client.config.hub = addr.to_string().parse().unwrap();
    client.start();
    (client, endpoint)
}

/// A `Welcome` whose session id is beyond 2^53 - 1: the customer's SIEM would hold it
/// inexactly, and the Client's records could not be joined with the Hub's by session. The
/// Client takes it as a broken protocol: no session on record, the connection given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p11_a_hub_s_session_id_beyond_2_53_is_refused() {
    let hub = TestHub::start(&[]).await;
    let (mut client, endpoint) = client_of_an_impostor(&hub).await;
    let (conn, mut send, _recv, _reader) = hello_from_the_client(&endpoint).await;
    let Control::Welcome {
        hub_time_us,
        limits,
        ..
    } = welcome()
    else {
        unreachable!()
    };
    let beyond = Control::Welcome {
        session_id: 1 << 53,
        hub_time_us,
        limits,
    };
    transport::write_frame(&mut send, &beyond).await.unwrap();
    tokio::time::timeout(SOON, conn.closed())
        .await
        .expect("the Client gives the connection up");
    let ups = client.audit.records();
    assert!(!ups.iter().any(|r| r.event == Event::SessionUp), "{ups:?}");
    client.stop().await;
}

/// The Hub's `Welcome` carries its clock: a Client whose host's clock is off by 5 s or more
/// says so in its `session_up` record (and its log), where the customer looks when certificates
/// are refused as not yet valid. A Hub that agrees with it leaves the record as it was.
#[tokio::test]
async fn a_client_records_how_far_its_clock_is_from_the_hubs() {
    let hub = TestHub::start(&[]).await;
    let (mut client, endpoint) = client_of_an_impostor(&hub).await;
    let (_conn, mut send, _recv, _reader) = hello_from_the_client(&endpoint).await;
    let now_us = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap();
    let ahead = Control::Welcome {
        session_id: 1,
        hub_time_us: now_us + 120_000_000,
        limits: frame::Limits {
            max_concurrent_queries: 1024,
            idle_timeout_ms: 3000,
        },
    };
    transport::write_frame(&mut send, &ahead).await.unwrap();
    let up = client
        .wait_audit("session_up", |r| r.event == Event::SessionUp)
        .await;
    let reason = up.reason.unwrap_or_default();
    assert!(
        reason.starts_with("serial ")
            && (reason.contains("; the Hub's clock is 119 s ahead of this host's")
                || reason.contains("; the Hub's clock is 120 s ahead of this host's"))
            && reason.contains("set this host's time (NTP)"),
        "{reason}"
    );
    client.stop().await;

    // The real Hub: the same clock, nothing said.
    let mut client = TestClient::enrol(&hub, "beta", &[("db", "127.0.0.1:9".into())]).await;
    client.start();
    let up = client
        .wait_audit("session_up", |r| r.event == Event::SessionUp)
        .await;
    assert!(
        !up.reason.as_deref().unwrap_or_default().contains("clock"),
        "{up:?}"
    );
    client.stop().await;
}

/// A revocation forged before the Hub proved itself is not taken. quinn takes an
/// `APPLICATION_CLOSE` from a server's Initial packet (RFC 9000 §12.4 forbids it there), and an
/// Initial's keys come from the Client's own connection ID, sent in the clear: anyone who sees
/// the dial, or answers for the Hub's name, can send one without a key. With the Hub's
/// `revoked` code, the Client used to record a revocation no Hub made, delete its renewal keys
/// and stop for good (exit 10, refusing every later start). Now it is a failed dial, said as
/// such, and the Client dials again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_a_revocation_forged_before_the_hub_proved_itself_is_not_taken() {
    let hub = TestHub::start(&[]).await;
    let forger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    client.config.hub = forger.local_addr().unwrap().to_string().parse().unwrap();
    client.start();
    // Every dial answered at once with the forged close, until two dials (two connection IDs)
    // were: the Client still dials after the first.
    let mut dials: Vec<Vec<u8>> = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while dials.len() < 2 {
        let (n, from) = tokio::time::timeout(SOON, forger.recv_from(&mut buf))
            .await
            .expect("the Client dials again")
            .unwrap();
        let Some((dcid, packet)) = forged_close(&buf[..n], 3, b"forged: you are revoked") else {
            continue;
        };
        forger.send_to(&packet, from).await.unwrap();
        if !dials.contains(&dcid) {
            dials.push(dcid);
        }
    }
    // The close was taken by quinn (the record quotes it), as a failed dial.
    let failed = client
        .wait_audit("the forged close, as a failed dial", |r| {
            r.event == Event::SessionFailed
                && r.reason
                    .as_deref()
                    .is_some_and(|x| x.contains("forged: you are revoked"))
        })
        .await;
    assert_eq!(failed.outcome, Some(Outcome::Failed), "{failed:?}");
    assert!(
        failed
            .reason
            .as_deref()
            .is_some_and(|x| x.contains("before the Hub proved itself")),
        "{failed:?}"
    );
    assert_eq!(client.stop().await, ewii::client::Exit::Stopped);
    let records = client.audit.records();
    assert!(
        !records.iter().any(|r| r.event == Event::Revoked),
        "{records:#?}"
    );
    assert!(!client
        .state_dir()
        .join(ewii::client::REVOKED_MARKER)
        .exists());
}

/// The server's answer to a client's QUIC v1 Initial `initial`: an Initial packet carrying an
/// `APPLICATION_CLOSE` (frame type 0x1d) with `code` and `reason`, protected with the Initial
/// keys every observer can derive from the client's destination connection ID (RFC 9001
/// §5.2). With that ID, for telling dials apart; `None` for what is not a v1 Initial.
fn forged_close(initial: &[u8], code: u8, reason: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    // Long header, type Initial, version 1.
    if initial.first()? & 0xf0 != 0xc0 || initial.get(1..5)? != [0, 0, 0, 1] {
        return None;
    }
    let dcid_len = usize::from(*initial.get(5)?);
    let dcid = initial.get(6..6 + dcid_len)?;
    let scid_len = usize::from(*initial.get(6 + dcid_len)?);
    let scid = initial.get(7 + dcid_len..7 + dcid_len + scid_len)?;
    let rustls::SupportedCipherSuite::Tls13(suite) =
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
    else {
        unreachable!("a TLS 1.3 suite")
    };
    let keys = rustls::quic::Keys::initial(
        rustls::quic::Version::V1,
        suite,
        suite.quic?,
        dcid,
        rustls::Side::Server,
    );
    // APPLICATION_CLOSE: type, code, reason length (one-byte varints), reason; padded so that
    // the header protection's sample lies within the packet.
    let mut payload = vec![0x1d, code, u8::try_from(reason.len()).ok()?];
    payload.extend_from_slice(reason);
    payload.resize(payload.len().max(32), 0);
    let tag_len = keys.local.packet.tag_len();
    // One-byte packet number 0; the length (two-byte varint) counts it, the payload and tag.
    let mut header = vec![0xc0, 0, 0, 0, 1, u8::try_from(scid_len).ok()?];
    header.extend_from_slice(scid);
    header.extend_from_slice(&[8, 0x5e, 0x1f, 0x0e, 0xd0, 0xc0, 0xde, 0x00, 0x01]);
    header.push(0); // no token
    let length = u16::try_from(1 + payload.len() + tag_len).ok()?;
    header.extend_from_slice(&(0x4000 | length).to_be_bytes());
    let pn_at = header.len();
    header.push(0);
    let tag = keys
        .local
        .packet
        .encrypt_in_place(0, &header, &mut payload)
        .ok()?;
    let mut packet = header;
    packet.extend_from_slice(&payload);
    packet.extend_from_slice(tag.as_ref());
    let sample = packet.get(pn_at + 4..pn_at + 4 + 16)?.to_vec();
    let (first, rest) = packet.split_at_mut(1);
    keys.local
        .header
        .encrypt_in_place(&sample, &mut first[0], &mut rest[pn_at - 1..pn_at])
        .ok()?;
    Some((dcid.to_vec(), packet))
}
