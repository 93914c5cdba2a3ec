//! SPIRE customers (issue 12 §4): the Client takes its SVID from a SPIFFE Workload API socket
//! (`svid_source = "workload-api"`), follows the rotations the agent pushes by moving to a new
//! connection (make-before-break), and verifies the Hub with the bundle the agent delivers;
//! the Hub accepts that trust domain's SVIDs only for the Clients its `[[federation]]` table
//! names, and revokes them by name like any other.
//!
//! The agent is the test Workload API server (`ewii_tests::workload_api`: real gRPC on a Unix
//! socket, the specification's messages); the Client's side is the real `spiffe` source.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ewii::audit::{Audit, AuditOutput};
use ewii::client::{self, ClientError, Exit};
use ewii::config::{OnStop, SvidSource};
use ewii::hub::admin;
use ewii::identity::store::read_certs;
use ewii::identity::{inspect_leaf, present};
use ewii_common::audit::{AuditRecord, Event, Outcome, Side};
use ewii_common::frame;
use ewii_tests::workload_api::{IssuedSvid, SpireCa, WorkloadApi};
use ewii_tests::*;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The customer's trust domain.
const CUSTOMER: &str = "customer.test";
/// The Client's SPIFFE ID path in it (the customer's SPIRE registration entry).
const ACME_PATH: &str = "/ewii/acme";
const HOUR: Duration = Duration::from_secs(3_600);

/// A Hub that federates with `ca`'s trust domain for Client `acme`, with a TCP service to its
/// `echo` destination.
async fn federated_hub(ca: &SpireCa, dir: &TempDir) -> TestHub {
    let bundle = dir.path().join("customer.pem");
    ca.write_bundle(&bundle);
    let federation = format!(
        "[[federation]]\ntrust_domain = \"{CUSTOMER}\"\nbundle = {bundle:?}\nclients = {{ acme = \"spiffe://{CUSTOMER}{ACME_PATH}\" }}\n"
    );
    TestHub::start_custom(&[Service::tcp("svc", "acme", "echo")], &federation).await
}

/// The Hub's CA certificates, as the customer's SPIRE server holds them once federated.
fn hub_bundle(hub: &TestHub) -> Vec<Vec<u8>> {
    read_certs(&hub.state_dir().join("ca.pem"))
        .unwrap()
        .into_iter()
        .map(|c| c.to_vec())
        .collect()
}

/// A Client of `hub` that takes its SVID from `api`, running in-process.
struct SpireClient {
    _dir: TempDir,
    audit: Audit,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<Exit, ClientError>>>,
}

impl SpireClient {
    fn start(hub: &TestHub, api: &WorkloadApi, echo: std::net::SocketAddr) -> Self {
        Self::start_with(hub, api, echo, OnStop::Disconnect)
    }

    fn start_with(
        hub: &TestHub,
        api: &WorkloadApi,
        echo: std::net::SocketAddr,
        on_stop: OnStop,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = client_config(
            hub.addr,
            &dir.path().join("state"),
            &[("echo", echo.to_string())],
        );
        config.svid_source = SvidSource::WorkloadApi {
            socket: api.endpoint(),
            hub_trust_domain: TD.into(),
        };
        config.on_stop = on_stop;
        let audit = Audit::open_with_tap(Side::Client, &AuditOutput::Discard).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(client::run(config, audit.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            _dir: dir,
            audit,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(&mut self) -> Exit {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap().await.unwrap().unwrap()
    }

    async fn ended(&mut self, within: Duration) -> Result<Exit, ClientError> {
        tokio::time::timeout(within, self.task.take().unwrap())
            .await
            .expect("the Client did not end in time")
            .unwrap()
    }
}

/// A federated Hub, an echo destination, and an agent serving a first SVID for `acme`.
struct Setup {
    dir: TempDir,
    ca: SpireCa,
    hub: TestHub,
    echo: std::net::SocketAddr,
    api: WorkloadApi,
    first: IssuedSvid,
}

impl Setup {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = SpireCa::new(CUSTOMER);
        let hub = federated_hub(&ca, &dir).await;
        let echo = echo_server().await;
        let api = WorkloadApi::start(&dir.path().join("agent.sock"));
        let first = ca.issue(ACME_PATH, HOUR);
        serve(&api, &first, &hub);
        Self {
            dir,
            ca,
            hub,
            echo,
            api,
            first,
        }
    }
}

impl Setup {
    /// [`Setup::new`], with a Client of it running and connected.
    async fn connected() -> (Self, SpireClient) {
        let s = Self::new().await;
        let client = SpireClient::start(&s.hub, &s.api, s.echo);
        s.hub.wait_connected("acme").await;
        (s, client)
    }
}

/// Serves `svid` with the Hub's bundle federated in.
fn serve(api: &WorkloadApi, svid: &IssuedSvid, hub: &TestHub) {
    let bundle = hub_bundle(hub);
    api.push(svid, &[(TD, bundle.as_slice())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_p7_p8_a_rotation_pushed_by_the_workload_api_re_binds_the_live_session_and_one_the_hub_refuses_moves_later(
) {
    let (
        Setup {
            dir: _dir,
            mut ca,
            hub,
            api,
            first,
            ..
        },
        mut client,
    ) = Setup::connected().await;
    let up = hub
        .wait_audit("session_up", |r| r.event == Event::SessionUp)
        .await;
    assert!(
        up.reason
            .as_deref()
            .is_some_and(|r| r.contains(&format!("serial {}", first.serial))),
        "the Hub saw the agent's SVID: {up:?}"
    );
    assert_eq!(
        up.client.as_deref(),
        Some(format!("spiffe://{CUSTOMER}{ACME_PATH}").as_str())
    );
    let svc = hub.service("svc");
    try_roundtrip(svc, b"before the rotation").await.unwrap();

    // Load: 8 workers, each a new query after the other, until told to stop (bounded).
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for w in 0..8u8 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let data = vec![w; 4096];
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match try_roundtrip(svc, &data).await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("query failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    // A query open across both rotations: opened before, used between, finished after.
    let mut long = tokio::net::TcpStream::connect(svc).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    long.write_all(b"opened before").await.unwrap();
    let mut buf = [0u8; 13];
    long.read_exact(&mut buf).await.unwrap();
    poll_until("load before the push", SOON, || {
        ok.load(Ordering::Relaxed) >= 50
    })
    .await;
    let count = |audit: &Audit, event: Event| {
        audit
            .records()
            .into_iter()
            .filter(|r| r.event == event)
            .count()
    };

    // The agent rotates: a new key and SVID, pushed to the open stream. The Client presents
    // it on its one connection, and the Hub re-binds that session to it.
    let second = ca.issue(ACME_PATH, HOUR);
    assert_ne!(first.serial, second.serial);
    serve(&api, &second, &hub);
    let rotated = client
        .audit
        .wait_for(SOON, |r| {
            r.event == Event::SvidRotated && r.outcome == Some(Outcome::Ok)
        })
        .await
        .expect("the Client took the pushed SVID");
    assert!(
        rotated
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(&second.serial) && r.contains(&first.serial)),
        "{rotated:?}"
    );
    let rebound = wait_rebound(&hub, &first, &second).await;
    assert_eq!(rebound.session_id, up.session_id, "the same session");
    let at_rebind = ok.load(Ordering::Relaxed);
    poll_until("load after the re-bind", SOON, || {
        ok.load(Ordering::Relaxed) >= at_rebind + 50
    })
    .await;
    long.write_all(b"across the re-bind").await.unwrap();
    let mut buf = [0u8; 18];
    long.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"across the re-bind");
    assert_eq!(
        count(&hub.audit, Event::SessionUp),
        1,
        "no second connection"
    );
    assert_eq!(count(&hub.audit, Event::SessionLost), 0);
    assert_eq!(count(&client.audit, Event::SessionLost), 0);

    // The agent delivers an SVID the Hub does not accept (the customer's SPIRE signs with a
    // CA the Hub's `[[federation]]` bundle does not hold yet): the Hub refuses the
    // presentation, the Client tries to move, and that handshake is refused too. The old
    // connection goes on serving meanwhile.
    let foreign = SpireCa::new(CUSTOMER).issue(ACME_PATH, HOUR);
    serve(&api, &foreign, &hub);
    hub.wait_rotation_refused("presented SVID refused: chain:")
        .await;
    let moving = client
        .audit
        .wait_for(SOON, |r| {
            r.event == Event::SvidRotated && r.outcome == Some(Outcome::Refused)
        })
        .await
        .expect("the Client says it moves");
    assert!(
        moving
            .reason
            .as_deref()
            .is_some_and(|x| x.contains(&format!(
                "serial {} not taken on the live connection",
                foreign.serial
            ))),
        "{moving:?}"
    );
    hub.wait_audit("the move's handshake refused", |r| {
        r.event == Event::HandshakeRefused
    })
    .await;
    let at_refusal = ok.load(Ordering::Relaxed);
    poll_until(
        "load on the old connection while the move fails",
        SOON,
        || ok.load(Ordering::Relaxed) >= at_refusal + 50,
    )
    .await;
    // Then an SVID the Hub accepts: the move's next dial is made with it, and the old
    // connection is retired, make-before-break: it finishes the query open on it.
    move_with(&hub, &api, &ca.issue(ACME_PATH, HOUR)).await;
    // The old connection must stay while the long query is open on it.
    let handle = hub.handle().clone();
    assert_eq!(
        count(&hub.audit, Event::SessionLost),
        0,
        "the old connection drains its query in flight"
    );
    assert_eq!(
        count(&client.audit, Event::SessionLost),
        0,
        "the old connection drains its query in flight"
    );
    long.write_all(b"finished after").await.unwrap();
    long.shutdown().await.unwrap();
    let mut rest = Vec::new();
    long.read_to_end(&mut rest).await.unwrap();
    assert_eq!(
        rest, b"finished after",
        "the query in flight survived both rotations"
    );

    // The old one ended as a move once its query was done.
    let moved = hub
        .wait_audit("the old session ending as a move", |r| {
            r.event == Event::SessionLost
                && r.reason.as_deref().is_some_and(|x| x.contains("moved"))
        })
        .await;
    assert_eq!(moved.session_id, up.session_id);
    poll_until("one connection again", SOON, || handle.connections() == 1).await;
    let at_move = ok.load(Ordering::Relaxed);
    poll_until("load after the move", SOON, || {
        ok.load(Ordering::Relaxed) >= at_move + 50
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no query failed");
    assert!(ok.load(Ordering::Relaxed) >= 200);
    // Nothing of the agent's SVID was written to disk.
    assert!(!client._dir.path().join("state/svid.key").exists());
    assert_eq!(client.stop().await, Exit::Stopped);
}

/// A Client that stops (and so revokes) while a connection a move retired still drains at the
/// Hub: the Hub's revocation closes that one as revoked. That is the stop's own revoke, not an
/// operator's: the Client ends as a stop, with the revoke recorded. Before, it ended as
/// "revoked" (exit 10 for the binary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9_a_workload_api_client_that_stops_soon_after_a_move_ends_as_a_stop() {
    let s = Setup::new().await;
    let (mut ca, hub, api) = (s.ca, s.hub, s.api);
    let mut client = SpireClient::start_with(&hub, &api, s.echo, OnStop::Revoke);
    hub.wait_connected("acme").await;
    // A query held open on the first connection keeps it draining after the move.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut held = tokio::net::TcpStream::connect(hub.service("svc"))
        .await
        .unwrap();
    held.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    held.read_exact(&mut buf).await.unwrap();
    // An SVID the Hub does not take on the live connection (another CA) moves the Client (its
    // dial is refused too); the next one is taken by the move's new connection.
    serve(&api, &SpireCa::new(CUSTOMER).issue(ACME_PATH, HOUR), &hub);
    hub.wait_rotation_refused("presented SVID refused: chain:")
        .await;
    move_with(&hub, &api, &ca.issue(ACME_PATH, HOUR)).await;
    // A query held open on the new connection: the stop cannot drain before the Hub's
    // revocation has closed the old one.
    let mut on_new = tokio::net::TcpStream::connect(hub.service("svc"))
        .await
        .unwrap();
    on_new.write_all(b"new!").await.unwrap();
    on_new.read_exact(&mut buf).await.unwrap();
    let _ = client.stop.take().unwrap().send(());
    hub.wait_audit("the retired connection closed as revoked", |r| {
        r.event == Event::SessionLost
            && r.reason
                .as_deref()
                .is_some_and(|x| x.starts_with("revoked"))
    })
    .await;
    on_new.shutdown().await.unwrap();
    let mut rest = Vec::new();
    on_new.read_to_end(&mut rest).await.unwrap();
    let exit = client.ended(SOON).await.unwrap();
    assert_eq!(exit, Exit::Stopped);
    let revoked: Vec<AuditRecord> = client
        .audit
        .records()
        .into_iter()
        .filter(|r| r.event == Event::Revoked)
        .collect();
    assert_eq!(revoked.len(), 1, "{revoked:#?}");
    assert_eq!(revoked[0].outcome, Some(Outcome::Ok));
    assert!(
        revoked[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("at its stop")),
        "{revoked:?}"
    );
}

/// Serves `svid`, which a Client moving to a new connection dials with: waits for that
/// session, and for the Hub to have read the old connection's retiring `Goodbye` (it routes
/// nothing more to the old session: its registry holds the new one only).
async fn move_with(hub: &TestHub, api: &WorkloadApi, svid: &IssuedSvid) {
    serve(api, svid, hub);
    hub.wait_audit("session_up with the new serial", |r| {
        r.event == Event::SessionUp
            && r.reason
                .as_deref()
                .is_some_and(|x| x.contains(&format!("serial {}", svid.serial)))
    })
    .await;
    let handle = hub.handle().clone();
    poll_until("the Hub to process the retiring Goodbye", SOON, || {
        handle.connections() == 1
    })
    .await;
}

/// Waits for the Hub's record of a session re-bound from `from` to the presented `to`.
async fn wait_rebound(hub: &TestHub, from: &IssuedSvid, to: &IssuedSvid) -> AuditRecord {
    let rebound = hub
        .wait_audit("the session re-bound to the presented SVID", |r| {
            r.event == Event::SvidRotated && r.outcome == Some(Outcome::Ok)
        })
        .await;
    let expected = format!(
        "session re-bound from serial {} to {} (presented from the Client's SPIRE)",
        from.serial, to.serial
    );
    assert!(
        rebound
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(&expected)),
        "{rebound:?}"
    );
    rebound
}

fn der_chain(svid: &IssuedSvid) -> Vec<Vec<u8>> {
    svid.svid().chain.iter().map(|c| c.to_vec()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_p8_a_presented_svid_is_taken_only_for_this_identity_with_its_keys_proof_for_this_connection(
) {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = SpireCa::new(CUSTOMER);
    // Two federated Clients: one must not take the other's SVID on its session.
    let bundle = dir.path().join("customer.pem");
    ca.write_bundle(&bundle);
    let federation = format!(
        "[[federation]]\ntrust_domain = \"{CUSTOMER}\"\nbundle = {bundle:?}\nclients = {{ acme = \"spiffe://{CUSTOMER}{ACME_PATH}\", bob = \"spiffe://{CUSTOMER}/ewii/bob\" }}\n"
    );
    let hub = TestHub::start_custom(&[Service::tcp("svc", "acme", "echo")], &federation).await;
    let first = ca.issue(ACME_PATH, HOUR);
    let next = ca.issue(ACME_PATH, HOUR);
    let refused = frame::Control::Refused {
        code: frame::RefuseCode::BadRequest,
    };
    // Each attempt on its own session: one session may present once per flood bound.
    let session = || async { raw_session(&hub, &first.svid()).await.unwrap() };
    // A proof made for another connection (replayed, or made elsewhere).
    let mut s = session().await;
    let (scheme, proof) = present::sign(&next.svid(), &[0; frame::PRESENT_EXPORTER_LEN]).unwrap();
    assert_eq!(s.present(&der_chain(&next), scheme, proof).await, refused);
    hub.wait_rotation_refused("is not the presented certificate's key's signature")
        .await;
    // The new chain with a proof by the key in use, not the new one (a stolen certificate).
    let mut s = session().await;
    let (scheme, proof) = present::sign(&first.svid(), &s.exporter()).unwrap();
    assert_eq!(s.present(&der_chain(&next), scheme, proof).await, refused);
    let bad_proofs = || {
        hub.audit
            .records()
            .iter()
            .filter(|r| {
                r.reason
                    .as_deref()
                    .is_some_and(|x| x.contains("is not the presented certificate's key's"))
            })
            .count()
    };
    poll_until("the stolen certificate's refusal", SOON, || {
        bad_proofs() == 2
    })
    .await;
    // Another Client of this Hub, with its own key's proof (it cannot take over acme's
    // session).
    let bob = ca.issue("/ewii/bob", HOUR);
    let mut s = session().await;
    let (scheme, proof) = present::sign(&bob.svid(), &s.exporter()).unwrap();
    assert_eq!(s.present(&der_chain(&bob), scheme, proof).await, refused);
    hub.wait_rotation_refused("but this session is").await;
    // An identity of the same trust domain this Hub does not list, with its own key's proof.
    let mallory = ca.issue("/ewii/mallory", HOUR);
    let mut s = session().await;
    let (scheme, proof) = present::sign(&mallory.svid(), &s.exporter()).unwrap();
    assert_eq!(
        s.present(&der_chain(&mallory), scheme, proof).await,
        refused
    );
    hub.wait_rotation_refused("not a Client of this Hub").await;
    // The same identity from another CA claiming the customer's trust domain.
    let forged = SpireCa::new(CUSTOMER).issue(ACME_PATH, HOUR);
    let mut s = session().await;
    let (scheme, proof) = present::sign(&forged.svid(), &s.exporter()).unwrap();
    assert_eq!(s.present(&der_chain(&forged), scheme, proof).await, refused);
    hub.wait_rotation_refused("presented SVID refused: chain:")
        .await;
    // Nothing was re-bound by any of that.
    assert!(!hub
        .audit
        .records()
        .iter()
        .any(|r| r.event == Event::SvidRotated && r.outcome == Some(Outcome::Ok)));

    // The new SVID with its own key's proof for this connection is taken, on a session
    // whose first SVID ends in seconds: the session outlives it.
    let short = ca.issue(ACME_PATH, Duration::from_secs(8));
    let mut s = raw_session(&hub, &short.svid()).await.unwrap();
    let (scheme, proof) = present::sign(&next.svid(), &s.exporter()).unwrap();
    assert_eq!(
        s.present(&der_chain(&next), scheme, proof.clone()).await,
        frame::Control::Presented {
            serial: next.serial.clone()
        }
    );
    wait_rebound(&hub, &short, &next).await;
    // Two presentations within the bound are taken (one pushed while the last was being
    // presented follows it), a third is not.
    assert_eq!(
        s.present(&der_chain(&next), scheme, proof.clone()).await,
        frame::Control::Presented {
            serial: next.serial.clone()
        }
    );
    assert_eq!(s.present(&der_chain(&next), scheme, proof).await, refused);
    hub.wait_rotation_refused("flood: a third Present").await;
    // Past the first SVID's end the session is still up, and answers on its control stream.
    let left = u64::try_from(inspect_leaf(&short.svid().chain[0]).unwrap().not_after)
        .unwrap()
        .saturating_sub(ewii::now_timestamp().unix_secs());
    tokio::time::sleep(Duration::from_secs(left + 1)).await;
    answers_a_ping(&mut s, "the session outlives its first SVID").await;
    assert!(s.conn.close_reason().is_none());
}

/// Sends a `Ping` on the session's control stream and waits for its `Pong`; `live` says why it
/// must come.
async fn answers_a_ping(s: &mut RawSession, live: &str) {
    ewii::transport::write_frame(&mut s.send, &frame::Control::Ping { time_us: 1 })
        .await
        .unwrap();
    let pong = tokio::time::timeout(SOON, s.reader.read::<frame::Control>(&mut s.recv))
        .await
        .expect("an answer")
        .expect(live);
    assert!(
        matches!(pong, Some(frame::Control::Pong { echo_us: 1, .. })),
        "{pong:?}"
    );
}

/// A presented SVID whose re-binding the Hub's database refuses to record (a full disk,
/// another writer's lock past the busy timeout; here a trigger) is refused (`busy`), not taken
/// unrecorded: the session stays on the SVID it has and keeps serving (a federated serial
/// retires no other, so nothing the records should have retired stays current), and the
/// Client moves to a new connection as for any refused `Present`. Once the Hub can write, the
/// same presentation is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_a_presented_svid_the_hub_cannot_record_is_refused_and_the_session_stays() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = SpireCa::new(CUSTOMER);
    let hub = federated_hub(&ca, &dir).await;
    let first = ca.issue(ACME_PATH, HOUR);
    let next = ca.issue(ACME_PATH, HOUR);
    let mut s = raw_session(&hub, &first.svid()).await.unwrap();
    let db = rusqlite::Connection::open(hub.state_dir().join(admin::DB_FILE)).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse BEFORE UPDATE ON sessions BEGIN SELECT RAISE(ABORT, 'disk full'); END",
    )
    .unwrap();
    let (scheme, proof) = present::sign(&next.svid(), &s.exporter()).unwrap();
    assert_eq!(
        s.present(&der_chain(&next), scheme, proof.clone()).await,
        frame::Control::Refused {
            code: frame::RefuseCode::Busy,
        }
    );
    let failed = hub
        .wait_audit("the re-binding's failure", |r| {
            r.event == Event::SvidRotated && r.outcome == Some(Outcome::Failed)
        })
        .await;
    let reason = failed.reason.unwrap();
    assert!(
        reason.contains("disk full")
            && reason.contains(&format!("the session stays on serial {}", first.serial)),
        "{reason}"
    );
    // Still up, on its control stream.
    answers_a_ping(&mut s, "the session stays").await;
    db.execute_batch("DROP TRIGGER refuse").unwrap();
    assert_eq!(
        s.present(&der_chain(&next), scheme, proof).await,
        frame::Control::Presented {
            serial: next.serial.clone()
        }
    );
    wait_rebound(&hub, &first, &next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_the_hub_accepts_a_federated_svid_only_for_the_id_it_lists_and_from_that_domains_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = SpireCa::new(CUSTOMER);
    let hub = federated_hub(&ca, &dir).await;
    let raw = |svid: &IssuedSvid| svid.svid();
    // The listed ID from the listed domain's CA gets in.
    let listed = ca.issue(ACME_PATH, HOUR);
    assert!(raw_session(&hub, &raw(&listed)).await.is_some());
    // Another ID of the same domain does not.
    let unlisted = ca.issue("/ewii/mallory", HOUR);
    assert!(raw_session(&hub, &raw(&unlisted)).await.is_none());
    hub.wait_audit("the unlisted ID refused", |r| {
        r.event == Event::HandshakeRefused
            && r.reason
                .as_deref()
                .is_some_and(|x| x.contains("not a Client of this Hub"))
    })
    .await;
    // The listed ID from another CA claiming the same trust domain does not.
    let mut impostor = SpireCa::new(CUSTOMER);
    let forged = impostor.issue(ACME_PATH, HOUR);
    assert!(raw_session(&hub, &raw(&forged)).await.is_none());
    // The federated CA cannot vouch for an ID of the Hub's own trust domain.
    let mut crossing = SpireCa::new(CUSTOMER);
    crossing.trust_domain = TD.into();
    let own = crossing.issue("/client/acme", HOUR);
    assert!(raw_session(&hub, &raw(&own)).await.is_none());
    // Nor for a trust domain nobody federated.
    let mut stranger = SpireCa::new("elsewhere.test");
    let far = stranger.issue(ACME_PATH, HOUR);
    assert!(raw_session(&hub, &raw(&far)).await.is_none());
    let refusals = hub
        .audit
        .records()
        .into_iter()
        .filter(|r| r.event == Event::HandshakeRefused)
        .count();
    assert!(refusals >= 4, "each refusal is audited ({refusals})");
}

/// Waits for the Hub's `bundle_updated` record with `outcome` whose reason contains `text`.
async fn bundle_updated(hub: &TestHub, outcome: Outcome, text: String) {
    hub.wait_audit(&text.clone(), move |r| {
        r.event == Event::BundleUpdated
            && r.outcome == Some(outcome)
            && r.reason.as_deref().is_some_and(|x| x.contains(&text))
    })
    .await;
}

/// Replaces `path` with `pem` at once (a new file renamed over it, as a ConfigMap update or
/// an atomic write does), so that the Hub never reads half of it.
fn replace_file(path: &std::path::Path, pem: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, pem).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_the_hub_follows_the_customers_ca_rotation_in_its_bundle_file_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = SpireCa::new(CUSTOMER);
    let hub = federated_hub(&ca, &dir).await;
    let file = dir.path().join("customer.pem");
    let old = ca.issue(ACME_PATH, HOUR);
    // The customer's SPIRE prepares its next CA.
    let mut next_ca = SpireCa::new(CUSTOMER);
    let new = next_ca.issue(ACME_PATH, HOUR);
    assert!(
        raw_session(&hub, &new.svid()).await.is_none(),
        "not trusted before the bundle says so"
    );
    let pem = |ca: &SpireCa| {
        let p = dir.path().join("one.pem");
        ca.write_bundle(&p);
        std::fs::read(p).unwrap()
    };
    // A file the Hub cannot use changes nothing: here a leaf (an SVID copied by mistake),
    // whose key could otherwise sign SVIDs for any listed Client.
    replace_file(
        &file,
        ewii::identity::store::Pem::certs(&old.svid().chain[..1]).as_bytes(),
    );
    bundle_updated(
        &hub,
        Outcome::Failed,
        "is not a CA certificate (no basicConstraints cA=true); keeping the 1 trust anchor(s) in use".into(),
    )
    .await;
    assert!(raw_session(&hub, &old.svid()).await.is_some());
    assert!(raw_session(&hub, &new.svid()).await.is_none());
    // (That an unchanged file is not audited again at each re-read is shown by
    // `hub::trust::tests`, without waiting for re-reads here.)

    // The overlap: both CAs. Both SVIDs get in.
    replace_file(&file, &[pem(&ca), pem(&next_ca)].concat());
    bundle_updated(
        &hub,
        Outcome::Ok,
        format!("federated trust domain {CUSTOMER}: 2 trust anchor(s)"),
    )
    .await;
    assert!(
        raw_session(&hub, &new.svid()).await.is_some(),
        "the next CA is trusted"
    );
    assert!(raw_session(&hub, &old.svid()).await.is_some());

    // The old CA retired: its SVIDs no longer get in.
    replace_file(&file, &pem(&next_ca));
    bundle_updated(&hub, Outcome::Ok, "1 trust anchor(s) from".into()).await;
    assert!(
        raw_session(&hub, &old.svid()).await.is_none(),
        "the old CA is gone"
    );
    assert!(raw_session(&hub, &new.svid()).await.is_some());
    let failed = hub
        .audit
        .records()
        .into_iter()
        .filter(|r| r.event == Event::BundleUpdated && r.outcome == Some(Outcome::Failed))
        .count();
    assert_eq!(failed, 1, "a file that did not change is not audited again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_p15_a_ca_that_leaves_a_federated_bundle_ends_the_live_sessions_it_vouched_for_and_no_other(
) {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = SpireCa::new(CUSTOMER);
    let hub = federated_hub(&ca, &dir).await;
    let file = dir.path().join("customer.pem");
    let mut next_ca = SpireCa::new(CUSTOMER);
    let old = ca.issue(ACME_PATH, HOUR);
    // (The test CAs count serials from the same number: one more, so that they differ.)
    let _ = next_ca.issue(ACME_PATH, HOUR);
    let new = next_ca.issue(ACME_PATH, HOUR);
    assert_ne!(old.serial, new.serial);
    let pem = |ca: &SpireCa| {
        let p = dir.path().join("one.pem");
        ca.write_bundle(&p);
        std::fs::read(p).unwrap()
    };
    // The overlap: a live session on an SVID of each CA. (The newer one retires the older
    // serial, which then drains: still live.)
    replace_file(&file, &[pem(&ca), pem(&next_ca)].concat());
    bundle_updated(&hub, Outcome::Ok, "2 trust anchor(s)".into()).await;
    let old_session = raw_session(&hub, &old.svid())
        .await
        .expect("the old CA's SVID");
    let mut new_session = raw_session(&hub, &new.svid())
        .await
        .expect("the new CA's SVID");
    // And one more on the old CA's SVID, whose handshake passes now and whose session
    // registers only after the sessions were told to re-check.
    let late = raw_handshake(&hub, &old.svid()).await.expect("a handshake");

    // The customer's SPIRE retires its old CA: the session it vouched for ends at once, not
    // when its SVID would (an hour here, a day by default).
    replace_file(&file, &pem(&next_ca));
    bundle_updated(&hub, Outcome::Ok, "1 trust anchor(s) from".into()).await;
    // The late one says Hello now: the Hub sees that a CA left since its handshake, checks
    // it before it registers it (no query could reach it), and closes it.
    let late_conn = late.conn.clone();
    assert!(late.hello().await.is_none(), "no Welcome for it");
    assert_eq!(
        closed_by_hub(&late_conn).await,
        Some(ewii::transport::codes::UNTRUSTED.into_inner()),
        "a session that registered after the re-check went on"
    );
    assert_eq!(
        old_session.closed_by_hub().await,
        Some(ewii::transport::codes::UNTRUSTED.into_inner())
    );
    let serial = old.serial.clone();
    let lost = hub
        .wait_audit("the old session's end", |r| {
            r.event == Event::SessionLost
                && r.session_id.is_some()
                && r.reason.as_deref().is_some_and(|x| x.contains(&serial))
        })
        .await;
    let reason = lost.reason.unwrap();
    assert!(
        reason.starts_with(&format!(
            "untrusted: the bundle of {CUSTOMER} no longer vouches for serial {serial}"
        )),
        "{reason}"
    );
    let update = hub
        .audit
        .records()
        .into_iter()
        .rfind(|r| r.event == Event::BundleUpdated)
        .and_then(|r| r.reason)
        .unwrap();
    assert!(
        update.ends_with("; 2 live session(s) re-checked"),
        "{update}"
    );
    // The session on the new CA's SVID took the same re-check and goes on.
    assert!(new_session.ping().await, "the new CA's session was cut");
    let ended = |hub: &TestHub| {
        hub.audit
            .records()
            .into_iter()
            .filter(|r| r.event == Event::SessionLost)
            .filter_map(|r| r.reason)
            .collect::<Vec<_>>()
    };
    poll_until("the late session's record", SOON, || ended(&hub).len() == 2).await;
    assert!(
        ended(&hub).iter().all(|r| r.starts_with("untrusted:")),
        "{:?}",
        ended(&hub)
    );
}

/// P10 for a SPIRE customer: no token carried a webhook URL, so the `[[federation]]` table
/// does; a revocation of one of its Clients reaches it, signed with the key the operator hands
/// over (`ewii-hub webhook-key`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_a_federated_clients_revocation_reaches_the_webhook_of_its_table_signed() {
    let receiver = Receiver::start(Vec::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut ca = SpireCa::new(CUSTOMER);
    let bundle = dir.path().join("customer.pem");
    ca.write_bundle(&bundle);
    let config = format!(
        "[[federation]]\ntrust_domain = \"{CUSTOMER}\"\nbundle = {bundle:?}\nclients = {{ acme = \"spiffe://{CUSTOMER}{ACME_PATH}\" }}\nwebhook = \"{}\"\n[webhooks]\ndanger_allow_private_targets = true\n",
        receiver.url
    );
    let hub = TestHub::start_custom(&[], &config).await;
    let svid = ca.issue(ACME_PATH, HOUR);
    let session = raw_session(&hub, &svid.svid()).await.expect("a session");
    // The key the operator hands over, as the command prints it.
    let printed = std::process::Command::new(bin_path("ewii-hub"))
        .arg("webhook-key")
        .arg("--state-dir")
        .arg(hub.state_dir())
        .output()
        .unwrap();
    assert!(printed.status.success(), "{printed:?}");
    let key = String::from_utf8(printed.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("whpk_"), "{key}");
    assert_eq!(
        session.closed_by_a_revocation_of(&hub, "acme").await,
        Some(ewii::transport::codes::REVOKED.into_inner())
    );
    poll_until("the delivery", SOON, || !receiver.deliveries().is_empty()).await;
    let got = receiver.deliveries().remove(0);
    let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["type"], "client.revoked");
    assert_eq!(
        body["data"]["client"],
        format!("spiffe://{CUSTOMER}{ACME_PATH}")
    );
    assert_eq!(body["data"]["name"], "acme");
    assert_eq!(body["data"]["reason"], "contract ended");
    let (id, ts) = (
        &got.headers["webhook-id"],
        &got.headers["webhook-timestamp"],
    );
    let now: i64 = ts.parse().unwrap();
    assert_eq!(
        ewii::webhook::verify(
            &key,
            id,
            ts,
            &got.headers["webhook-signature"],
            &got.body,
            now
        ),
        Ok(())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_a_federated_client_is_revoked_by_name_and_stays_revoked() {
    let (
        Setup {
            dir: _dir,
            mut ca,
            mut hub,
            api: _api,
            first: _,
            ..
        },
        mut client,
    ) = Setup::connected().await;
    assert!(
        admin::revoke(&hub.state_dir(), "acme", "operator says no")
            .unwrap()
            .revoked
    );
    match client.ended(SOON).await {
        Ok(Exit::Revoked { reason }) => assert!(reason.contains("operator says no"), "{reason}"),
        other => panic!("expected a revocation, got {other:?}"),
    }
    // The Hub's record of the operator's revocation names the identity as it is: in the
    // customer's trust domain.
    let revoked = hub
        .wait_audit("the operator's revocation", |r| {
            r.event == Event::Revoked
                && r.reason
                    .as_deref()
                    .is_some_and(|x| x.starts_with("operator says no"))
        })
        .await;
    assert_eq!(
        revoked.client.as_deref(),
        Some(format!("spiffe://{CUSTOMER}{ACME_PATH}").as_str())
    );
    // So does the record of a query that found it gone. (The Hub ends such a requester at
    // once; on a busy machine its connect can already fail: the record is what counts here.)
    if let Ok(mut requester) = tokio::net::TcpStream::connect(hub.service("svc")).await {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = requester.write_all(b"anyone there?").await;
        let mut rest = Vec::new();
        let _ = requester.read_to_end(&mut rest).await;
    }
    let unrouted = hub
        .wait_audit("the query that found no session", |r| {
            r.event == Event::Query && r.outcome == Some(Outcome::Failed)
        })
        .await;
    assert_eq!(
        unrouted.client.as_deref(),
        Some(format!("spiffe://{CUSTOMER}{ACME_PATH}").as_str())
    );
    // A restarted Hub keeps it revoked, whatever SVID the agent issues next.
    hub.restart().await;
    let fresh = ca.issue(ACME_PATH, HOUR);
    let session = raw_session(&hub, &fresh.svid()).await;
    assert!(
        session.is_none(),
        "a revoked federated client gets no session"
    );
    // The operator readmits it (there is no token to enrol it again with); the running Hub
    // takes it from the database.
    assert!(admin::readmit(&hub.state_dir(), "acme").unwrap());
    assert!(!admin::readmit(&hub.state_dir(), "acme").unwrap(), "once");
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let svid = fresh.svid();
        if raw_session(&hub, &svid).await.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readmitted, but still refused"
        );
        tokio::time::sleep(POLL).await;
    }
    // A Client enrolled with a token is not readmitted: it gets a new token.
    let _enrolled = TestClient::enrol(&hub, "beta", &[("db", "127.0.0.1:1".into())]).await;
    admin::revoke(&hub.state_dir(), "beta", "test").unwrap();
    let err = admin::readmit(&hub.state_dir(), "beta")
        .unwrap_err()
        .to_string();
    assert!(err.contains("token create --client beta"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_a_client_without_the_hubs_bundle_from_its_agent_refuses_to_start_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = SpireCa::new(CUSTOMER);
    let hub = federated_hub(&ca, &dir).await;
    let api = WorkloadApi::start(&dir.path().join("agent.sock"));
    // The agent is not federated with the Hub's trust domain: no bundle for it.
    api.push(&ca.issue(ACME_PATH, HOUR), &[]);
    let mut client = SpireClient::start(&hub, &api, echo_server().await);
    let err = client.ended(SOON * 2).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(TD) && text.contains("federate"),
        "names the missing trust domain: {text}"
    );
    // And no agent at all: a clear error within the bound, not a hang.
    let mut none = SpireClient::start(
        &hub,
        &WorkloadApi::start(&dir.path().join("silent.sock")),
        echo_server().await,
    );
    let err = none.ended(SOON * 3).await.unwrap_err();
    assert!(
        matches!(err, ClientError::WorkloadApi(_)) && err.to_string().contains("silent.sock"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p3_p7_the_client_binary_under_every_kernel_layer_takes_its_svid_from_the_agent_and_presents_the_next(
) {
    crate::kernel::privileged!();
    let Setup {
        dir,
        mut ca,
        hub,
        echo,
        api,
        first: _,
    } = Setup::new().await;
    let state = dir.path().join("state");
    let config = dir.path().join("client.toml");
    std::fs::write(
        &config,
        format!(
            "hub = \"{}\"\nstate_dir = {state:?}\naudit = \"discard\"\non_stop = \"disconnect\"\nsvid_source = \"workload-api\"\nworkload_api_socket = \"{}\"\nhub_trust_domain = \"{TD}\"\n[enforcement]\nrequire = \"kernel\"\n[[allow]]\nname = \"echo\"\naddress = \"{echo}\"\n",
            hub.addr,
            api.endpoint()
        ),
    )
    .unwrap();
    let cgroup = Cgroup::new();
    let mut client = crate::process::Proc(
        cgroup
            .client(&["run", "--config", config.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let handle = hub.handle().clone();
    let deadline = tokio::time::Instant::now() + SOON;
    while !handle.connected_clients().iter().any(|c| c == "acme") {
        if tokio::time::Instant::now() > deadline {
            let _ = client.0.kill();
            let out = client.0.wait_with_output_ref();
            panic!("the Client binary did not connect: {out}");
        }
        tokio::time::sleep(POLL).await;
    }
    let svc = hub.service("svc");
    try_roundtrip(svc, b"through the locked binary")
        .await
        .unwrap();
    // The agent rotates; the locked process (seccomp, Landlock, eBPF) still reaches the
    // agent's socket, and presents the new SVID on its one connection.
    let second = ca.issue(ACME_PATH, HOUR);
    serve(&api, &second, &hub);
    hub.wait_audit("the session re-bound to the new serial", |r| {
        r.event == Event::SvidRotated
            && r.outcome == Some(Outcome::Ok)
            && r.reason
                .as_deref()
                .is_some_and(|x| x.contains(&format!("to {} (presented", second.serial)))
    })
    .await;
    try_roundtrip(svc, b"after the rotation").await.unwrap();
    // The customer's evidence: the SVID and the bundle from the agent, nothing of them on disk.
    let (_, report) = crate::verify::verify(&state, &[]);
    for id in ["P7", "P15", "P13"] {
        assert_eq!(
            crate::verify::verdict(&report, id),
            "holds",
            "{id}: {report:#}"
        );
    }
    assert!(
        report.to_string().contains("memory only"),
        "P7 says where the key is: {report:#}"
    );
    let status = client.terminate();
    let mut stderr = String::new();
    use std::io::Read;
    client
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{status:?}\n{stderr}");
    for layer in ["ebpf active", "landlock active", "seccomp active"] {
        assert!(stderr.contains(layer), "{layer}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_a_federated_client_gets_no_svid_from_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = SpireCa::new(CUSTOMER);
    let hub = federated_hub(&ca, &dir).await;
    let svid = ca.issue(ACME_PATH, HOUR);
    let mut session = raw_session(&hub, &svid.svid())
        .await
        .expect("a listed federated SVID gets a session");
    let (_key, csr) = ewii::identity::ca::new_key_and_csr().unwrap();
    ewii::transport::write_frame(&mut session.send, &frame::Control::Renew { csr })
        .await
        .unwrap();
    let answer = session
        .reader
        .read::<frame::Control>(&mut session.recv)
        .await
        .unwrap();
    assert!(
        matches!(answer, Some(frame::Control::Refused { .. })),
        "{answer:?}"
    );
    hub.wait_audit("the refused renewal", |r| {
        r.event == Event::SvidRotated
            && r.outcome == Some(Outcome::Refused)
            && r.reason
                .as_deref()
                .is_some_and(|x| x.contains("its own SPIRE"))
    })
    .await;
}

/// `ewii-hub token create` for a `[[federation]]` client's name is refused, and says why: an
/// enrolment with it would take the name over (its routes, its revocation) from the identity
/// the customer's SPIRE issues for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_no_token_is_made_for_a_federated_clients_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = SpireCa::new(CUSTOMER);
    let hub = federated_hub(&ca, &dir).await;
    let made = admin::create_token(
        &hub.state_dir(),
        "acme",
        Duration::from_secs(600),
        None,
        false,
    );
    let Err(e) = made else {
        panic!("a token for a federated name: {made:?}")
    };
    assert!(
        matches!(e, ewii::hub::HubError::Invalid(_))
            && e.to_string().contains(&format!(
                "acme is spiffe://{CUSTOMER}{ACME_PATH} in this Hub's records: a [[federation]] client"
            )),
        "{e}"
    );
    // Another name is no federated client's.
    admin::create_token(&hub.state_dir(), "beta", HOUR, None, false).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_a_hub_refuses_to_start_with_a_federation_it_cannot_use_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let ca = SpireCa::new(CUSTOMER);
    let good = dir.path().join("customer.pem");
    ca.write_bundle(&good);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    // A name enrolled under the Hub's own trust domain cannot be given to a federated ID.
    let mut hub = TestHub::start(&[]).await;
    let _enrolled = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:1".into())]).await;
    // Stopped, its state kept: each Hub below is the only one on it (one runs per directory).
    hub.stop().await;
    let state = hub.state_dir();
    let table = |td: &str, bundle: &std::path::Path, name: &str| {
        format!("[[federation]]\ntrust_domain = \"{td}\"\nbundle = {bundle:?}\nclients = {{ {name} = \"spiffe://{td}/ewii\" }}\n")
    };
    for (federation, says) in [
        (table(TD, &good, "beta"), "this Hub's own trust domain"),
        (
            table(CUSTOMER, &dir.path().join("missing.pem"), "beta"),
            "missing.pem",
        ),
        (table(CUSTOMER, &garbage, "beta"), "bundle"),
        (table(CUSTOMER, &good, "acme"), "choose another name"),
        (
            table(CUSTOMER, &good, "beta") + "webhook = \"ftp://customer.test/hook\"\n",
            "is not an http(s) URL",
        ),
        // The rules of a token's --webhook: no private address without the opt-in.
        (
            table(CUSTOMER, &good, "beta") + "webhook = \"http://169.254.169.254/latest\"\n",
            "not a public address",
        ),
        // And the URL is shown redacted: its credentials and query are the customer's secrets.
        (
            table(CUSTOMER, &good, "beta")
                + "webhook = \"https://hook:s3cret@10.1.2.3/x?key=s3cret\"\n",
            "webhook https://…@10.1.2.3/x?… points at 10.1.2.3",
        ),
    ] {
        let config: ewii::config::HubConfig = format!(
            "state_dir = {state:?}\nlisten = \"127.0.0.1:0\"\naudit = \"discard\"\n{federation}"
        )
        .parse()
        .unwrap();
        let audit = Audit::open_with_tap(Side::Hub, &AuditOutput::Discard).unwrap();
        let err = ewii::hub::Hub::bind(config, audit)
            .await
            .expect_err(&federation);
        // A bad entry, whatever is wrong with it: `ewii-hub` exits 2 for it.
        assert!(
            matches!(err, ewii::hub::HubError::Invalid(_)),
            "{federation}: {err:?}"
        );
        let err = err.to_string();
        assert!(err.contains(says), "{federation}: {err}");
        assert!(!err.contains("s3cret"), "{federation}: {err}");
    }
    // A host name is not resolved at start: what it resolves to is the customer's to change
    // (here to loopback), and must not keep the Hub, and every customer on it, from starting.
    // Its deliveries are checked one by one.
    let federation = table(CUSTOMER, &good, "beta") + "webhook = \"http://localhost:8080/hook\"\n";
    let config: ewii::config::HubConfig = format!(
        "state_dir = {state:?}\nlisten = \"127.0.0.1:0\"\naudit = \"discard\"\n{federation}"
    )
    .parse()
    .unwrap();
    let audit = Audit::open_with_tap(Side::Hub, &AuditOutput::Discard).unwrap();
    assert!(ewii::hub::Hub::bind(config, audit).await.is_ok());
}

/// What a killed child wrote to its piped stderr.
trait StderrOf {
    fn wait_with_output_ref(&mut self) -> String;
}

impl StderrOf for std::process::Child {
    fn wait_with_output_ref(&mut self) -> String {
        use std::io::Read;
        let _ = self.wait();
        let mut out = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut out);
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_a_delivery_for_another_identity_or_with_a_foreign_key_is_refused_and_the_svid_kept() {
    let (mut s, mut client) = Setup::connected().await;
    let svc = s.hub.service("svc");
    let refused = |client: &SpireClient, says: &'static str| {
        let audit = client.audit.clone();
        async move {
            audit
                .wait_for(SOON, |r| {
                    r.event == Event::SvidRotated
                        && r.outcome == Some(Outcome::Refused)
                        && r.reason.as_deref().is_some_and(|x| x.contains(says))
                })
                .await
                .unwrap_or_else(|| panic!("no refusal saying {says:?}: {:#?}", audit.records()))
        }
    };
    // A compromised or misconfigured agent hands over another identity: refused, kept.
    let other = s.ca.issue("/ewii/other", HOUR);
    serve(&s.api, &other, &s.hub);
    let r = refused(&client, "restart it to change identity").await;
    assert!(
        r.reason.unwrap().contains(&s.first.serial),
        "keeps the SVID in use"
    );
    // A certificate with a key that is not its own: refused, kept.
    let mut mismatched = s.ca.issue(ACME_PATH, HOUR);
    mismatched.key_pkcs8 = s.ca.issue(ACME_PATH, HOUR).key_pkcs8;
    serve(&s.api, &mismatched, &s.hub);
    refused(&client, "not the one the certificate names").await;
    // Still serving, on the first SVID: no move, no second session at the Hub.
    try_roundtrip(svc, b"still here").await.unwrap();
    let ups = s
        .hub
        .audit
        .records()
        .into_iter()
        .filter(|r| r.event == Event::SessionUp)
        .count();
    assert_eq!(ups, 1, "no move for a refused delivery");
    assert_eq!(client.stop().await, Exit::Stopped);
}

/// With its SVID from the Workload API, a Client takes the Hub's CAs from its SPIRE alone: a
/// bundle the Hub pushes (`ca prepare`) is refused, and recorded with what it would have
/// changed and what the customer does about it; the session and its queries go on (P7, P15).
/// Taken, it would have had the Client trust a CA that SPIRE never federated, until SPIRE's
/// next delivery took it away again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_p15_a_workload_api_client_takes_the_hubs_cas_from_spire_not_from_the_hub() {
    let (s, mut client) = Setup::connected().await;
    let svc = s.hub.service("svc");
    admin::ca_prepare(&s.hub.state_dir()).unwrap();
    let refused = wait_audit(&client.audit, "the Hub's bundle, refused", |r| {
        r.event == Event::BundleUpdated
    })
    .await;
    assert_eq!(refused.outcome, Some(Outcome::Refused), "{refused:?}");
    let reason = refused.reason.unwrap_or_default();
    assert!(
        reason.starts_with("from the Hub (2 trust anchor(s); added sha256:")
            && reason.contains("the Hub's CAs come from the Workload API")
            && reason.contains(&format!("federate its new bundle for {TD} in SPIRE")),
        "{reason}"
    );
    try_roundtrip(svc, b"after the push").await.unwrap();
    assert_eq!(client.stop().await, Exit::Stopped);
    assert!(
        !client
            .audit
            .records()
            .iter()
            .any(|r| r.event == Event::BundleUpdated && r.outcome == Some(Outcome::Ok)),
        "nothing took the Hub's bundle"
    );
}
