//! The end-to-end harness: a real Hub and real Clients in-process on loopback port 0, real
//! TCP services, and helpers to reach the binaries and PostgreSQL.
//!
//! Helpers panic with a message on failure, so a test fails where the problem is.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

pub mod workload_api;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ewii::audit::{Audit, AuditOutput};
use ewii::client::{self, Exit};
use ewii::config::{ClientConfig, HubConfig};
use ewii::hub::admin::{self, TokenReport};
use ewii::hub::{Hub, HubHandle};
use ewii::identity::parse_bundle_hash;
use ewii_common::audit::{AuditRecord, Event, Outcome, Side};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The trust domain every test Hub uses.
pub const TD: &str = "test.ewii.local";
/// Upper bound for "soon" in tests: generous for a loaded 2-core CI machine.
pub const SOON: Duration = Duration::from_secs(10);

/// Installs a log subscriber once (`EWII_LOG=debug` to see the stack's own logs).
pub fn logs() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, _) = ewii::logging::log_filter(std::env::var("EWII_LOG").ok().as_deref(), "off");
    // The filter alone decides (the `fmt()` builder's own default would cap it at `info`).
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_test_writer())
        .try_init();
}

/// A service listener to configure on a test Hub.
#[derive(Clone, Debug)]
pub struct Service {
    /// Listener name.
    pub name: &'static str,
    /// Client name.
    pub client: &'static str,
    /// Allow-list entry name asked for.
    pub destination: &'static str,
    /// `None` for TLS, `Some(principal)` for plain TCP.
    pub principal: Option<&'static str>,
    /// TLS: the workload names allowed to call it.
    pub workloads: &'static [&'static str],
}

impl Service {
    /// A plain TCP service.
    pub fn tcp(name: &'static str, client: &'static str, destination: &'static str) -> Self {
        Self {
            name,
            client,
            destination,
            principal: Some("test-principal"),
            workloads: &[],
        }
    }

    /// A TLS service that workload `billing` may call (callers present a workload SVID).
    pub fn tls(name: &'static str, client: &'static str, destination: &'static str) -> Self {
        Self {
            name,
            client,
            destination,
            principal: None,
            workloads: &["billing"],
        }
    }
}

/// A Hub running in-process.
pub struct TestHub {
    /// Keeps the state directory alive.
    pub dir: TempDir,
    /// UDP address.
    pub addr: SocketAddr,
    /// Its audit records.
    pub audit: Audit,
    /// Where `/metrics` is served, when the config sets `metrics_listen`.
    pub metrics: Option<SocketAddr>,
    handle: Option<HubHandle>,
    services: Vec<Service>,
    service_addrs: Vec<(String, SocketAddr)>,
    extra_toml: String,
    limits: Option<ewii::hub::admission::Limits>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestHub {
    /// `ewii-hub init` in a fresh directory, then bind on 127.0.0.1:0 and run.
    pub async fn start(services: &[Service]) -> Self {
        Self::start_with(services, 86_400).await
    }

    /// Like [`start`](Self::start) with a given SVID lifetime.
    pub async fn start_with(services: &[Service], svid_lifetime_secs: u64) -> Self {
        Self::start_custom(
            services,
            &format!("svid_lifetime_secs = {svid_lifetime_secs}\n"),
        )
        .await
    }

    /// Like [`start`](Self::start) with other admission bounds than the Hub's fixed ones.
    pub async fn start_with_limits(
        services: &[Service],
        limits: ewii::hub::admission::Limits,
    ) -> Self {
        Self::start_with_limits_and_lifetime(services, limits, 86_400).await
    }

    /// [`start_with_limits`](Self::start_with_limits) with a given SVID lifetime.
    pub async fn start_with_limits_and_lifetime(
        services: &[Service],
        limits: ewii::hub::admission::Limits,
        svid_lifetime_secs: u64,
    ) -> Self {
        let mut hub = Self::start_with(services, svid_lifetime_secs).await;
        hub.limits = Some(limits);
        hub.restart().await;
        hub
    }

    /// Like [`start`](Self::start) with extra top-level TOML (keys and tables) in the config.
    pub async fn start_custom(services: &[Service], extra_toml: &str) -> Self {
        logs();
        let dir = tempfile::tempdir().unwrap();
        admin::init(&dir.path().join("hub"), TD).unwrap();
        let mut hub = Self {
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            audit: Audit::open_with_tap(Side::Hub, &AuditOutput::Discard).unwrap(),
            metrics: None,
            handle: None,
            services: services.to_vec(),
            service_addrs: Vec::new(),
            extra_toml: extra_toml.to_owned(),
            limits: None,
            stop: None,
            task: None,
        };
        hub.launch().await;
        hub
    }

    /// Live view of the running Hub.
    pub fn handle(&self) -> &HubHandle {
        self.handle.as_ref().expect("launched")
    }

    /// The Hub's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("hub")
    }

    async fn launch(&mut self) {
        let mut toml = format!(
            "state_dir = {:?}\nlisten = \"{}\"\naudit = \"discard\"\n{}\n",
            self.state_dir(),
            self.addr,
            self.extra_toml
        );
        for s in &self.services {
            // Keep a restarted Hub on the same service ports.
            let listen = self
                .service_addrs
                .iter()
                .find(|(n, _)| n == s.name)
                .map(|(_, a)| *a)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            toml.push_str(&format!(
                "[[service]]\nname = \"{}\"\nlisten = \"{listen}\"\nclient = \"{}\"\ndestination = \"{}\"\n",
                s.name, s.client, s.destination
            ));
            match s.principal {
                Some(p) => toml.push_str(&format!("principal = \"{p}\"\n")),
                None => toml.push_str(&format!("tls = true\nworkloads = {:?}\n", s.workloads)),
            }
        }
        let mut config: HubConfig = toml.parse().unwrap();
        if let Some(limits) = self.limits {
            config.limits = limits;
        }
        // A stopped Hub's QUIC endpoint drains its connections for a moment (RFC 9000 §10.2)
        // and holds the UDP port meanwhile; a restart on the same port waits for it.
        let deadline = tokio::time::Instant::now() + SOON;
        let hub = loop {
            match Hub::bind(config.clone(), self.audit.clone()).await {
                Ok(hub) => break hub,
                Err(ewii::hub::HubError::Bind { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(POLL).await;
                }
                Err(e) => panic!("hub bind: {e}"),
            }
        };
        self.addr = hub.local_addr();
        self.metrics = hub.metrics_addr();
        self.handle = Some(hub.handle());
        self.service_addrs = self
            .services
            .iter()
            .map(|s| (s.name.to_string(), hub.service_addr(s.name).unwrap()))
            .collect();
        let (tx, rx) = oneshot::channel::<()>();
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(async move {
            hub.run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        }));
    }

    /// The address of service `name`.
    pub fn service(&self, name: &str) -> SocketAddr {
        self.service_addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    /// A join token for `client`.
    pub fn token(&self, client: &str, ttl: Duration) -> TokenReport {
        admin::create_token(&self.state_dir(), client, ttl, None, false).unwrap()
    }

    /// A join token for `client` with a webhook URL (loopback allowed: tests only).
    pub fn token_with_webhook(&self, client: &str, url: &str) -> TokenReport {
        admin::create_token(
            &self.state_dir(),
            client,
            Duration::from_secs(600),
            Some(url),
            true,
        )
        .unwrap()
    }

    /// Stops the Hub and waits for it. The handle goes too: it keeps the UDP socket open.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
        self.handle = None;
    }

    /// Stops and starts again on the same UDP and service ports, with the same state.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }

    /// [`restart`](Self::restart) with `extra_toml` in place of the config's extra TOML.
    pub async fn restart_with(&mut self, extra_toml: &str) {
        extra_toml.clone_into(&mut self.extra_toml);
        self.restart().await;
    }

    /// Waits until `client` has a live session.
    pub async fn wait_connected(&self, client: &str) {
        let handle = self.handle().clone();
        poll_until(&format!("client {client} to connect"), SOON, || {
            handle.connected_clients().iter().any(|c| c == client)
        })
        .await;
    }

    /// Waits for a Hub audit record matching `pred`.
    pub async fn wait_audit(&self, what: &str, pred: impl Fn(&AuditRecord) -> bool) -> AuditRecord {
        wait_audit(&self.audit, what, pred).await
    }

    /// Waits until exactly `n` of the Hub's audit records match `pred`.
    pub async fn wait_count(&self, n: usize, what: &str, pred: impl Fn(&AuditRecord) -> bool) {
        wait_count(&self.audit, n, what, pred).await;
    }

    /// Waits for a refused `svid_rotated` record whose reason contains `why`.
    pub async fn wait_rotation_refused(&self, why: &str) -> AuditRecord {
        self.wait_audit(why, |r| {
            r.event == Event::SvidRotated
                && r.outcome == Some(Outcome::Refused)
                && r.reason.as_deref().is_some_and(|x| x.contains(why))
        })
        .await
    }
}

/// Waits up to [`SOON`] until exactly `n` records of `audit` match `pred`.
pub async fn wait_count(audit: &Audit, n: usize, what: &str, pred: impl Fn(&AuditRecord) -> bool) {
    let deadline = tokio::time::Instant::now() + SOON;
    while audit.records().iter().filter(|r| pred(r)).count() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {n} {:?} records: {what}; it has: {:#?}",
            audit.side(),
            audit.records()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to [`SOON`] for a record matching `pred` in `audit`, or panics with the records.
pub async fn wait_audit(
    audit: &Audit,
    what: &str,
    pred: impl Fn(&AuditRecord) -> bool,
) -> AuditRecord {
    match audit.wait_for(SOON, pred).await {
        Some(r) => r,
        None => panic!(
            "no {what} audit record; {:?} side has: {:#?}",
            audit.side(),
            audit.records()
        ),
    }
}

/// A Client running in-process.
pub struct TestClient {
    /// Keeps the state directory alive.
    pub dir: TempDir,
    /// Its audit records.
    pub audit: Audit,
    /// Its configuration.
    pub config: ClientConfig,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<Exit, client::ClientError>>>,
}

impl TestClient {
    /// Enrols `name` with `hub` and starts it with `allow` (`name`, `address`) entries.
    pub async fn enrol_and_run(hub: &TestHub, name: &str, allow: &[(&str, String)]) -> Self {
        let mut c = Self::enrol(hub, name, allow).await;
        c.start();
        c
    }

    /// Enrols without starting.
    pub async fn enrol(hub: &TestHub, name: &str, allow: &[(&str, String)]) -> Self {
        let token = hub.token(name, Duration::from_secs(600));
        Self::enrol_with(hub, &token, allow).await
    }

    /// Enrols with a given token, without starting.
    pub async fn enrol_with(hub: &TestHub, token: &TokenReport, allow: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let audit = Audit::open_with_tap(Side::Client, &AuditOutput::Discard).unwrap();
        client::enrol::enrol(
            &hub.addr.to_string().parse().unwrap(),
            &token.token,
            parse_bundle_hash(&token.bundle_hash).unwrap(),
            &dir.path().join("state"),
            &audit,
        )
        .await
        .unwrap();
        let config = client_config(hub.addr, &dir.path().join("state"), allow);
        Self {
            dir,
            audit,
            config,
            stop: None,
            task: None,
        }
    }

    /// Starts `run` in a task.
    pub fn start(&mut self) {
        let (tx, rx) = oneshot::channel::<()>();
        self.stop = Some(tx);
        let config = self.config.clone();
        let audit = self.audit.clone();
        self.task = Some(tokio::spawn(client::run(config, audit, async {
            let _ = rx.await;
        })));
    }

    /// Stops it (SIGTERM equivalent) and returns how it ended.
    pub async fn stop(&mut self) -> Exit {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("running").await.unwrap().unwrap()
    }

    /// Waits for `run` to end by itself (revocation, expiry) within `within`.
    pub async fn ended(&mut self, within: Duration) -> Result<Exit, client::ClientError> {
        let task = self.task.take().expect("running");
        tokio::time::timeout(within, task)
            .await
            .expect("the Client did not end in time")
            .unwrap()
    }

    /// Runs the Client to completion after a fresh start (e.g. to see it refuse at once).
    pub async fn run_once(&mut self, within: Duration) -> Result<Exit, client::ClientError> {
        self.start();
        self.ended(within).await
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.config.state_dir.clone()
    }

    /// Waits for a Client audit record matching `pred`.
    pub async fn wait_audit(&self, what: &str, pred: impl Fn(&AuditRecord) -> bool) -> AuditRecord {
        wait_audit(&self.audit, what, pred).await
    }

    /// Waits until exactly `n` of the Client's audit records match `pred`.
    pub async fn wait_count(&self, n: usize, what: &str, pred: impl Fn(&AuditRecord) -> bool) {
        wait_count(&self.audit, n, what, pred).await;
    }
}

/// A query record that ended well.
pub fn query_ok(r: &AuditRecord) -> bool {
    r.event == Event::Query && r.outcome == Some(Outcome::Ok)
}

/// A minimal HTTP/1.1 endpoint that records webhook deliveries and answers with the given
/// statuses in turn (then 200).
pub struct Receiver {
    /// `http://127.0.0.1:port/hook`.
    pub url: String,
    /// Every request, in order: headers (lower-case names), body, status answered.
    pub got: std::sync::Arc<std::sync::Mutex<Vec<Delivery>>>,
    /// While false, every request is answered 503 (the customer's endpoint is down).
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Set for a held receiver: each answer waits for [`release`](Self::release).
    held: Option<std::sync::Arc<tokio::sync::Semaphore>>,
}

/// One request the [`Receiver`] saw.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Header name (lower case) → value.
    pub headers: std::collections::HashMap<String, String>,
    /// Exact body bytes.
    pub body: Vec<u8>,
    /// What the receiver answered.
    pub status: u16,
}

impl Receiver {
    /// Starts listening on loopback; answers `statuses` in turn, then 200.
    pub async fn start(statuses: Vec<u16>) -> Self {
        Self::start_gated(statuses, true, false).await
    }

    /// Answers 200 to everything, each only once [`release`](Self::release) lets it (the
    /// request is recorded at once; several can be held at once).
    pub async fn start_held() -> Self {
        Self::start_gated(Vec::new(), true, true).await
    }

    /// Lets one held answer go.
    pub fn release(&self) {
        if let Some(h) = &self.held {
            h.add_permits(1);
        }
    }

    /// Starts answering 503 to everything until [`open`](Self::open) is called.
    pub async fn start_closed() -> Self {
        Self::start_gated(Vec::new(), false, false).await
    }

    /// From now on, answers as [`start`](Self::start) would.
    pub fn open(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    async fn start_gated(statuses: Vec<u16>, open: bool, held: bool) -> Self {
        let held = held.then(|| std::sync::Arc::new(tokio::sync::Semaphore::new(0)));
        let hold = held.clone();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(open));
        let gate = open.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Delivery>::new()));
        let g = got.clone();
        tokio::spawn(async move {
            let mut statuses = statuses.into_iter();
            while let Ok((mut s, _)) = listener.accept().await {
                let open = |gate: &std::sync::atomic::AtomicBool| {
                    gate.load(std::sync::atomic::Ordering::SeqCst)
                };
                // A held receiver holds each request on its own: several can wait at once.
                if let Some(hold) = &hold {
                    let (hold, gate, g) = (hold.clone(), gate.clone(), g.clone());
                    tokio::spawn(async move {
                        if let Some((headers, body)) = read_request(&mut s).await {
                            let status = if open(&gate) { 200 } else { 503 };
                            let delivery = Delivery {
                                headers,
                                body,
                                status,
                            };
                            answer(s, delivery, &g, Some(&hold)).await;
                        }
                    });
                    continue;
                }
                let Some((headers, body)) = read_request(&mut s).await else {
                    continue;
                };
                let status = if open(&gate) {
                    statuses.next().unwrap_or(200)
                } else {
                    503
                };
                let delivery = Delivery {
                    headers,
                    body,
                    status,
                };
                answer(s, delivery, &g, None).await;
            }
        });
        Self {
            url,
            got,
            open,
            held,
        }
    }

    /// Deliveries so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }
}

/// Records `delivery` in `got`, waits for `hold` to let it go (if held), and answers it.
async fn answer(
    mut s: tokio::net::TcpStream,
    delivery: Delivery,
    got: &std::sync::Mutex<Vec<Delivery>>,
    hold: Option<&tokio::sync::Semaphore>,
) {
    let status = delivery.status;
    got.lock().unwrap().push(delivery);
    if let Some(hold) = hold {
        hold.acquire().await.unwrap().forget();
    }
    let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
}

async fn read_request(
    s: &mut tokio::net::TcpStream,
) -> Option<(std::collections::HashMap<String, String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let headers: std::collections::HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    Some((headers, body))
}

/// A raw session with the Hub, as a Client would open it: handshake with `svid`, control
/// stream, `Hello`. `None` when the Hub does not answer `Welcome`.
pub async fn raw_session(hub: &TestHub, svid: &ewii::identity::store::Svid) -> Option<RawSession> {
    raw_handshake(hub, svid).await?.hello().await
}

/// The first half of [`raw_session`]: the handshake done, nothing sent yet. `None` when the
/// handshake fails.
pub async fn raw_handshake(
    hub: &TestHub,
    svid: &ewii::identity::store::Svid,
) -> Option<RawHandshake> {
    raw_handshake_tuned(hub, svid, None).await
}

/// Like [`raw_handshake`], from a peer that grants the Hub only `window` bytes of unread data
/// per stream (the Client's keep-alive and idle timeout otherwise): one that reads little or
/// nothing of its control stream holds the Hub's writes.
pub async fn raw_handshake_with_window(
    hub: &TestHub,
    svid: &ewii::identity::store::Svid,
    window: u32,
) -> Option<RawHandshake> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(ewii::transport::KEEP_ALIVE));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(ewii::transport::IDLE_TIMEOUT).ok());
    t.stream_receive_window(quinn::VarInt::from_u32(window));
    raw_handshake_tuned(hub, svid, Some(std::sync::Arc::new(t))).await
}

async fn raw_handshake_tuned(
    hub: &TestHub,
    svid: &ewii::identity::store::Svid,
    transport_config: Option<std::sync::Arc<quinn::TransportConfig>>,
) -> Option<RawHandshake> {
    use std::sync::Arc;

    use ewii::identity::verify::{Bundle, Expect, SpiffeVerifier};
    use ewii::transport;
    use ewii_common::frame;

    let ca = ewii::identity::store::read_certs(&hub.state_dir().join("ca.pem")).ok()?;
    let verifier = SpiffeVerifier::new(Bundle::new(ca), TD, Expect::Hub);
    let tls = transport::tls_client_config(Some(svid), Arc::new(verifier), frame::ALPN).ok()?;
    let mut quic = transport::quic_client_config(
        tls,
        transport::MAX_CONCURRENT_QUERIES,
        transport::STREAM_WINDOW,
    )
    .ok()?;
    if let Some(t) = transport_config {
        quic.transport_config(t);
    }
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().ok()?).ok()?;
    let conn = endpoint
        .connect_with(quic, hub.addr, "127.0.0.1")
        .ok()?
        .await
        .ok()?;
    Some(RawHandshake { endpoint, conn })
}

/// A connection whose handshake the Hub accepted, before `Hello`.
pub struct RawHandshake {
    endpoint: quinn::Endpoint,
    /// The connection.
    pub conn: quinn::Connection,
}

/// The application code the Hub closed `conn` with, waiting at most [`SOON`]; `None` when it
/// did not close it (or closed it otherwise).
pub async fn closed_by_hub(conn: &quinn::Connection) -> Option<u64> {
    match tokio::time::timeout(SOON, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some(c.error_code.into_inner()),
        _ => None,
    }
}

impl RawHandshake {
    /// The second half of [`raw_session`]: control stream, `Hello`, `Welcome`.
    pub async fn hello(self) -> Option<RawSession> {
        use ewii::transport;
        use ewii_common::frame;

        let Self { endpoint, conn } = self;
        let attempt = async {
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            let hello = frame::Control::Hello {
                version: frame::PROTOCOL_VERSION,
                allow_list: vec!["db".into()],
                allow_list_digest: vec![0; 32],
                build: "test".into(),
            };
            transport::write_frame(&mut send, &hello).await.ok()?;
            let mut reader = transport::FrameReader::new();
            match reader.read::<frame::Control>(&mut recv).await.ok()?? {
                frame::Control::Welcome { .. } => Some((send, recv, reader)),
                _ => None,
            }
        };
        let (send, recv, reader) = tokio::time::timeout(SOON, attempt).await.ok()??;
        Some(RawSession {
            _endpoint: endpoint,
            conn,
            send,
            recv,
            reader,
        })
    }
}

/// An open session from [`raw_session`].
pub struct RawSession {
    _endpoint: quinn::Endpoint,
    /// The connection.
    pub conn: quinn::Connection,
    /// Control stream, send half.
    pub send: quinn::SendStream,
    /// Control stream, receive half.
    pub recv: quinn::RecvStream,
    /// Frame reader over `recv`.
    pub reader: ewii::transport::FrameReader,
}

impl RawSession {
    /// Sends `Present` and reads the Hub's answer.
    pub async fn present(
        &mut self,
        chain: &[Vec<u8>],
        scheme: u16,
        proof: Vec<u8>,
    ) -> ewii_common::frame::Control {
        let msg = ewii_common::frame::Control::Present {
            chain: chain.to_vec(),
            scheme,
            proof,
        };
        ewii::transport::write_frame(&mut self.send, &msg)
            .await
            .unwrap();
        tokio::time::timeout(
            SOON,
            self.reader
                .read::<ewii_common::frame::Control>(&mut self.recv),
        )
        .await
        .expect("the Hub answers Present")
        .unwrap()
        .expect("an answer, not the end of the stream")
    }

    /// Sends `Ping` and reads frames until its `Pong` (a pushed bundle may come first):
    /// whether it came within [`SOON`]. The Hub handles what it was told before a frame of
    /// the peer's, so a `Pong` shows that the session took everything told before the `Ping`
    /// and is still up.
    pub async fn ping(&mut self) -> bool {
        use ewii_common::frame::Control;
        let time_us = 42;
        if ewii::transport::write_frame(&mut self.send, &Control::Ping { time_us })
            .await
            .is_err()
        {
            return false;
        }
        let pong = async {
            loop {
                match self.reader.read::<Control>(&mut self.recv).await {
                    Ok(Some(Control::Pong { echo_us, .. })) if echo_us == time_us => return true,
                    Ok(Some(_)) => continue,
                    _ => return false,
                }
            }
        };
        tokio::time::timeout(SOON, pong).await.unwrap_or(false)
    }

    /// [`closed_by_hub`] for this session's connection.
    pub async fn closed_by_hub(&self) -> Option<u64> {
        closed_by_hub(&self.conn).await
    }

    /// Revokes `client` centrally (`ewii-hub revoke`, asserting it was not revoked yet), then
    /// [`closed_by_hub`](Self::closed_by_hub).
    pub async fn closed_by_a_revocation_of(&self, hub: &TestHub, client: &str) -> Option<u64> {
        assert!(
            admin::revoke(&hub.state_dir(), client, "contract ended")
                .unwrap()
                .revoked
        );
        self.closed_by_hub().await
    }

    /// The exporter output a `Present` proof signs, for this connection.
    pub fn exporter(&self) -> [u8; ewii_common::frame::PRESENT_EXPORTER_LEN] {
        let mut out = [0u8; ewii_common::frame::PRESENT_EXPORTER_LEN];
        self.conn
            .export_keying_material(
                &mut out,
                ewii::identity::present::PRESENT_EXPORTER_LABEL,
                b"",
            )
            .unwrap();
        out
    }
}

/// A Client configuration for tests: fast reconnects, `on_stop = "disconnect"`, and
/// `require = "none"` (the in-process Client installs no kernel layer, and refuses to run
/// when the config requires one).
pub fn client_config(hub: SocketAddr, state_dir: &Path, allow: &[(&str, String)]) -> ClientConfig {
    let mut toml = format!(
        "hub = \"{hub}\"\nstate_dir = {state_dir:?}\naudit = \"discard\"\non_stop = \"disconnect\"\n[reconnect]\ninitial_ms = 50\nmax_ms = 500\n[enforcement]\nrequire = \"none\"\n"
    );
    for (name, address) in allow {
        toml.push_str(&format!(
            "[[allow]]\nname = \"{name}\"\naddress = \"{address}\"\n"
        ));
    }
    toml.parse().unwrap()
}

/// A TCP echo server on loopback; returns its address.
pub async fn echo_server() -> SocketAddr {
    echo_server_on(std::net::Ipv4Addr::LOCALHOST.into()).await
}

/// Like [`echo_server`], on `ip` (for a container that reaches the host at its bridge address).
pub async fn echo_server_on(ip: std::net::IpAddr) -> SocketAddr {
    echo_server_counting(ip).await.0
}

/// Like [`echo_server_on`], and counts the connections it accepted: a query that reached the
/// service.
pub async fn echo_server_counting(
    ip: std::net::IpAddr,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, count)
}

/// A server that reads until EOF and only then answers `EOF after N bytes` and closes:
/// it proves a half-close crossed the tunnel while the other direction stayed open.
pub async fn eof_reporter() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                let _ = s
                    .write_all(format!("EOF after {} bytes", buf.len()).as_bytes())
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A server that resets every connection as soon as it has read something.
pub async fn resetter() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                let _ = s.read(&mut b).await;
                let _ = s.set_zero_linger();
                drop(s);
            });
        }
    });
    addr
}

/// A loopback TCP port kept for a process the test starts next. A port found free by binding
/// and closing a socket is free only then: another test's `connect` can take it as its
/// ephemeral port before the process listens. Held by a socket bound with `SO_REUSEADDR` and
/// not listening, no other socket takes it (a plain bind fails, and `connect` skips explicitly
/// bound ports), while the process's listener, which sets `SO_REUSEADDR` too (the Hub's,
/// PostgreSQL's), binds it. Drop it once the process listens.
pub struct HeldPort {
    _socket: tokio::net::TcpSocket,
    /// The port, on 127.0.0.1.
    pub addr: SocketAddr,
}

/// See [`HeldPort`].
pub fn hold_tcp_port() -> HeldPort {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket
        .bind(SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)))
        .unwrap();
    let addr = socket.local_addr().unwrap();
    HeldPort {
        _socket: socket,
        addr,
    }
}

/// Counts connections accepted by a listener that otherwise does nothing.
pub async fn counting_listener() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = listener.accept().await {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (addr, count)
}

/// Path of a workspace binary next to the test executable (`cargo nextest run --workspace`
/// and `cargo test --workspace` build them).
///
/// `ewii-client` is special: its path is a wrapper that starts the real binary inside a fresh
/// child cgroup of its own whenever it runs as root, so that an eBPF lock the Client attaches
/// can only ever fence that child cgroup — never the test runner's own cgroup, whatever
/// machine the tests run on (without root there is no CAP_BPF and no lock). Tests that place
/// the Client in a cgroup themselves use [`Cgroup::client`].
pub fn bin_path(name: &str) -> PathBuf {
    let real = built_binary(name);
    if name == "ewii-client" {
        confined_client(&real)
    } else {
        real
    }
}

/// A copy of the built program `name` in `dir`, unconfined: a file of its own, so that its
/// pages in memory are its own (the kernel shares a file's pages between the processes that
/// map it, and other tests run the same binary).
pub fn binary_copy(name: &str, dir: &Path) -> PathBuf {
    let copy = dir.join(format!("{name}-copy"));
    std::fs::copy(built_binary(name), &copy).unwrap();
    copy
}

fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace)",
        p.display()
    );
    p
}

/// Writes (once per test process) the wrapper that confines `ewii-client` to a fresh child
/// cgroup; removes the empty ones earlier runs left behind.
fn confined_client(real: &Path) -> PathBuf {
    let wrapper = real.with_file_name(format!("ewii-client-confined-{}", std::process::id()));
    if !wrapper.exists() {
        // `exec` keeps the pid (tests signal it and read its /proc); the cgroup stays behind
        // empty, and the next test process removes it.
        let script = format!(
            r#"#!/bin/sh
# Test harness only (tests/lib.rs): as root, start ewii-client in a fresh child cgroup.
if [ "$(id -u)" = 0 ]; then
  mnt=$(awk '$9 == "cgroup2" {{ print $5; exit }}' /proc/self/mountinfo)
  cur=$(sed -n 's/^0:://p' /proc/self/cgroup)
  cg="$mnt${{cur%/}}/ewii-client-$$"
  if [ -z "$mnt" ] || ! mkdir "$cg" || ! echo $$ > "$cg/cgroup.procs"; then
    echo "test harness: cannot confine ewii-client to a child cgroup ($cg)" >&2
    exit 97
  fi
fi
exec "{}" "$@"
"#,
            real.display()
        );
        let tmp = wrapper.with_extension("tmp");
        std::fs::write(&tmp, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &wrapper).unwrap();
        remove_stale_client_cgroups();
    }
    wrapper
}

fn remove_stale_client_cgroups() {
    let Ok(mnt) = ewii::enforce::ebpf::cgroup2_mount() else {
        return;
    };
    let Ok(me) = std::fs::read_to_string("/proc/self/cgroup") else {
        return;
    };
    let Some(cur) = me.lines().find_map(|l| l.strip_prefix("0::")) else {
        return;
    };
    let dir = mnt.join(cur.trim_start_matches('/'));
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("ewii-client-")
        {
            // Fails (and is left) while a Client still runs in it.
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// A fresh child cgroup of the test's own, removed on drop (its processes must be gone).
#[derive(Debug)]
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    /// Makes it (needs root and cgroup v2).
    pub fn new() -> Self {
        let name = format!(
            "ewii-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let path = ewii::enforce::ebpf::cgroup2_mount().unwrap().join(name);
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }

    /// `sh -c 'join the cgroup; exec …'`: the program starts inside it.
    pub fn command(&self, program: &Path, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new("sh");
        c.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.0)
            .arg(program)
            .args(args);
        c
    }

    /// `ewii-client` started inside this cgroup (not a child of it).
    pub fn client(&self, args: &[&str]) -> std::process::Command {
        self.command(&built_binary("ewii-client"), args)
    }

    /// The real `ewii-client`, for a script that joins this cgroup before it runs it.
    pub fn client_binary(&self) -> PathBuf {
        built_binary("ewii-client")
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes have exited by now; a cgroup without processes can be removed.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(POLL);
        }
    }
}

/// How often [`poll_until`] looks again.
pub const POLL: Duration = Duration::from_millis(20);

/// Waits until `cond` holds, looking every [`POLL`], for at most `within`; panics with `what`.
/// For state that has no notification (files, process tables); records use `wait_audit`.
pub async fn poll_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Whether a skip must fail (CI sets it: a skipped privileged test proves nothing).
pub fn require(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// `Event` shorthand for matchers.
pub fn is(event: Event) -> impl Fn(&AuditRecord) -> bool {
    move |r| r.event == event
}

/// A record of `event` whose reason contains `text`.
pub fn says(event: Event, text: &str) -> impl Fn(&AuditRecord) -> bool + '_ {
    move |r| r.event == event && r.reason.as_deref().is_some_and(|x| x.contains(text))
}

/// Checks every record of `audit` against the Ewii audit schema and its OCSF rendering against
/// the OCSF schema (`tests/schemas/`); panics with every violation. Called when a test Hub or
/// Client goes away, so every record the tests produce is checked.
pub fn check_audit_schemas(audit: &Audit) {
    let mut bad = Vec::new();
    for r in audit.records() {
        bad.extend(audit_line_violations(&r.to_json_line()));
        let o: serde_json::Value = serde_json::from_str(&r.to_ocsf_line()).unwrap();
        for e in schema_violations(&o, &ocsf_schema()) {
            bad.push(format!("OCSF: {e} in {o}"));
        }
    }
    assert!(
        bad.is_empty(),
        "audit records off their schema:\n{}",
        bad.join("\n")
    );
}

/// The OCSF 1.1 Network Activity schema (`tests/schemas/`).
pub fn ocsf_schema() -> serde_json::Value {
    serde_json::from_str(include_str!(
        "schemas/ocsf-1.1-network-activity.schema.json"
    ))
    .unwrap()
}

/// What is wrong with one Ewii-format audit line (as a binary writes it to stdout): its
/// schema (`tests/schemas/ewii-audit.schema.json`), a session end off the documented list of
/// codes (docs/audit.md), Rust debug text in a reason. Empty when nothing is.
pub fn audit_line_violations(line: &str) -> Vec<String> {
    let ewii: serde_json::Value =
        serde_json::from_str(include_str!("schemas/ewii-audit.schema.json")).unwrap();
    let v: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return vec![format!("not JSON ({e}): {line}")],
    };
    let mut bad: Vec<String> = schema_violations(&v, &ewii)
        .into_iter()
        .map(|e| format!("{e} in {line}"))
        .collect();
    let reason = v["reason"].as_str();
    // A session's end is one of the documented codes (docs/audit.md).
    if v["event"] == "session_lost" {
        const CODES: [&str; 13] = [
            "goodbye",
            "hub_shutdown",
            "idle_timeout",
            "revoked",
            "svid_expired",
            "retired",
            "untrusted",
            "records_unreadable",
            "records_unwritable",
            "protocol",
            "stopped",
            "closed_by_peer",
            "connection_lost",
        ];
        let code = reason.and_then(|x| x.split(": ").next());
        if !code.is_some_and(|c| CODES.contains(&c)) {
            bad.push(format!("session_lost reason off the list: {line}"));
        }
    }
    // No Rust debug text in a reason (a SIEM rule cannot match `Revoked { … }`).
    if reason.is_some_and(|r| r.contains(" { ") || r.contains("Some(")) {
        bad.push(format!("debug text in a reason: {line}"));
    }
    bad
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            check_audit_schemas(&self.audit);
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            check_audit_schemas(&self.audit);
        }
    }
}

/// A JSON-schema check for the subset of keywords the schemas in `tests/schemas/` use:
/// `type` (object, string, integer), `const`, `enum`, `required`, `properties`,
/// `additionalProperties: false`, `minimum`, `maximum`. Returns every violation, with its path.
pub fn schema_violations(value: &serde_json::Value, schema: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    check_schema(value, schema, "$", &mut out);
    out
}

fn check_schema(v: &serde_json::Value, s: &serde_json::Value, at: &str, out: &mut Vec<String>) {
    use serde_json::Value;
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            other => panic!("schema keyword type={other} is not supported by this check"),
        };
        if !ok {
            out.push(format!("{at}: not a {t}: {v}"));
            return;
        }
    }
    if let Some(c) = s.get("const") {
        if v != c {
            out.push(format!("{at}: {v} is not {c}"));
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            out.push(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    if let Some(min) = s.get("minimum").and_then(Value::as_i64) {
        if v.as_i64().is_some_and(|n| n < min) {
            out.push(format!("{at}: {v} < {min}"));
        }
    }
    if let Some(max) = s.get("maximum").and_then(Value::as_i64) {
        if v.as_i64().is_some_and(|n| n > max) {
            out.push(format!("{at}: {v} > {max}"));
        }
    }
    let Some(obj) = v.as_object() else { return };
    for r in s
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let r = r.as_str().unwrap();
        if !obj.contains_key(r) {
            out.push(format!("{at}: missing {r}"));
        }
    }
    let props = s.get("properties").and_then(Value::as_object);
    for (k, child) in obj {
        match props.and_then(|p| p.get(k)) {
            Some(sub) => check_schema(child, sub, &format!("{at}.{k}"), out),
            None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                out.push(format!("{at}: unexpected field {k}"));
            }
            None => {}
        }
    }
}

/// What a [`FaultyPath`] does to each datagram, both ways.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Probability a datagram is dropped.
    pub loss: f64,
    /// Probability a datagram is sent twice.
    pub duplicate: f64,
    /// Probability a datagram is held back (by `reorder_by`) so that later ones overtake it.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_by: Duration,
    /// Delay added to every datagram.
    pub delay: Duration,
    /// Up to this much more, uniformly.
    pub jitter: Duration,
}

/// A user-space UDP relay between a Client and a Hub that injects seeded faults (this kernel
/// has no netem): loss, duplication, reordering, delay (datagrams keep their order) with
/// jitter, a blackhole, and a path change (a new source port towards the Hub, as after a NAT
/// rebinding). The Client dials [`FaultyPath::addr`]; one Client per relay.
#[derive(Debug)]
pub struct FaultyPath {
    /// Where the Client dials.
    pub addr: SocketAddr,
    ctl: std::sync::Arc<std::sync::Mutex<PathControl>>,
    /// Wakes the relay when a control changes (a rebind).
    wake: std::sync::Arc<tokio::sync::Notify>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct PathControl {
    faults: Faults,
    blackhole: bool,
    rebinds: u64,
    rng: u64,
}

impl PathControl {
    fn chance(&mut self, p: f64) -> bool {
        // xorshift64*: deterministic for a seed.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        (x as f64 / (1u64 << 53) as f64) < p
    }

    /// When to send one datagram (none: dropped; two: duplicated), and whether it keeps its
    /// place in line: one delayed by `delay` alone leaves after those that came before it, as
    /// on a real path; jitter and reordering let it overtake or be overtaken.
    fn plan(&mut self) -> Vec<(Duration, bool)> {
        if self.blackhole || self.chance(self.faults.loss) {
            return Vec::new();
        }
        let f = self.faults;
        let mut delay = f.delay;
        let mut in_line = true;
        if !f.jitter.is_zero() {
            let r = (self.rng % 1_000_000) as f64 / 1_000_000.0;
            delay += f.jitter.mul_f64(r);
            in_line = false;
        }
        if self.chance(f.reorder) {
            delay += f.reorder_by;
            in_line = false;
        }
        let mut out = vec![(delay, in_line)];
        if self.chance(f.duplicate) {
            out.push((delay, in_line));
        }
        out
    }
}

impl FaultyPath {
    /// Relays to `target` (the Hub's UDP address) with no fault until [`set`](Self::set).
    pub async fn start(target: SocketAddr, seed: u64) -> Self {
        use std::sync::Arc;
        let front = Arc::new(relay_socket());
        let addr = front.local_addr().unwrap();
        let ctl = Arc::new(std::sync::Mutex::new(PathControl {
            faults: Faults::default(),
            blackhole: false,
            rebinds: 0,
            rng: seed | 1,
        }));
        let c = ctl.clone();
        let wake = Arc::new(tokio::sync::Notify::new());
        let woken = wake.clone();
        let task = tokio::spawn(async move {
            let mut back = Arc::new(relay_socket());
            let mut bound = 0u64;
            let (mut up_line, down_line) = (delay_line(back.clone()), delay_line(front.clone()));
            let mut client: Option<SocketAddr> = None;
            let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            loop {
                let rebinds = c.lock().unwrap().rebinds;
                if rebinds != bound {
                    back = Arc::new(relay_socket());
                    up_line = delay_line(back.clone());
                    bound = rebinds;
                }
                tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let Ok((n, from)) = r else { continue };
                        client = Some(from);
                        let plan = c.lock().unwrap().plan();
                        send_later(&back, &up_line, &up[..n], target, plan);
                    }
                    r = back.recv_from(&mut down) => {
                        let (Ok((n, _)), Some(to)) = (r, client) else { continue };
                        let plan = c.lock().unwrap().plan();
                        send_later(&front, &down_line, &down[..n], to, plan);
                    }
                    // A control changed (a rebind): look at them again.
                    () = woken.notified() => {}
                }
            }
        });
        Self {
            addr,
            ctl,
            wake,
            task,
        }
    }

    /// Applies `faults` from now on.
    pub fn set(&self, faults: Faults) {
        self.ctl.lock().unwrap().faults = faults;
    }

    /// Drops everything, both ways, while `on`.
    pub fn blackhole(&self, on: bool) {
        self.ctl.lock().unwrap().blackhole = on;
    }

    /// From now on, talks to the Hub from a new source port.
    pub fn rebind(&self) {
        self.ctl.lock().unwrap().rebinds += 1;
        self.wake.notify_one();
    }
}

impl Drop for FaultyPath {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A [`FaultyPath`] socket on loopback with the buffers the Hub and Client ask for
/// (`transport::UDP_BUFFER`): the relay is the path, and drops at its own sockets under a
/// burst are faults no test asked for.
fn relay_socket() -> tokio::net::UdpSocket {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .unwrap();
    let _ = socket.set_recv_buffer_size(ewii::transport::UDP_BUFFER);
    let _ = socket.set_send_buffer_size(ewii::transport::UDP_BUFFER);
    socket.set_nonblocking(true).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    tokio::net::UdpSocket::from_std(socket.into()).unwrap()
}

/// Datagrams waiting in one direction of a [`FaultyPath`], each with when it may leave.
type DelayLine = tokio::sync::mpsc::UnboundedSender<(tokio::time::Instant, Vec<u8>, SocketAddr)>;

/// One direction's line: datagrams leave `socket` in the order they were queued, each once
/// its time has come. (A timer each would let those due within the same millisecond of
/// tokio's timer overtake one another: a path that reorders most of a burst, which QUIC reads
/// as loss.) The line ends once its sender is dropped and it is empty.
fn delay_line(socket: std::sync::Arc<tokio::net::UdpSocket>) -> DelayLine {
    let (tx, mut rx): (DelayLine, _) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((due, data, to)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let _ = socket.send_to(&data, to).await;
        }
    });
    tx
}

fn send_later(
    socket: &std::sync::Arc<tokio::net::UdpSocket>,
    line: &DelayLine,
    data: &[u8],
    to: SocketAddr,
    plan: Vec<(Duration, bool)>,
) {
    for (delay, in_line) in plan {
        if delay.is_zero() {
            let _ = socket.try_send_to(data, to);
        } else if in_line {
            let _ = line.send((tokio::time::Instant::now() + delay, data.to_vec(), to));
        } else {
            let (socket, data) = (socket.clone(), data.to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = socket.send_to(&data, to).await;
            });
        }
    }
}

/// A destination that hashes every byte it receives (SHA-256) and, at the end of the stream,
/// answers with the 32-byte digest.
pub async fn hashing_sink() -> SocketAddr {
    use sha2::{Digest, Sha256};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => h.update(&buf[..n]),
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&h.finalize()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// How a query the Hub ends without an answer (refused, failed, or for a Client that is not
/// there) looks to its requester: it reads nothing, and the Hub closes within [`SOON`].
/// Returns `None` for an end of stream, the error's kind for anything else (a reset).
///
/// The Hub sends `Open` the moment it accepts, so on loopback the Client's refusal can reset
/// the requester before a busy test runtime polls `connect` to its end: a reset there, or on
/// writing `early`, is the same answer and is returned as such.
pub async fn requester_gets_nothing(entry: SocketAddr, early: &[u8]) -> Option<std::io::ErrorKind> {
    let mut s = match tokio::net::TcpStream::connect(entry).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(e.kind()),
        Err(e) => panic!("connect to {entry}: {e}"),
    };
    if !early.is_empty() {
        if let Err(e) = s.write_all(early).await {
            // The reset came first; the kernel reports it once, here and not to the read.
            return Some(e.kind());
        }
    }
    let mut back = Vec::new();
    let ended = tokio::time::timeout(SOON, s.read_to_end(&mut back))
        .await
        .unwrap_or_else(|_| panic!("the Hub did not end the query within {SOON:?}"));
    assert!(
        back.is_empty(),
        "a query ended without an answer sent back {} bytes",
        back.len()
    );
    ended.err().map(|e| e.kind())
}

/// One query through a service listener: sends `data`, half-closes, and requires the same
/// bytes back within [`SOON`]; says what went wrong otherwise.
pub async fn try_roundtrip(addr: SocketAddr, data: &[u8]) -> Result<(), String> {
    let s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let back = exchange(s, data).await?;
    if back == data {
        Ok(())
    } else {
        Err(format!(
            "got {} bytes back, sent {}",
            back.len(),
            data.len()
        ))
    }
}

/// Writes `data` on `s`, half-closes, and reads to the end (within [`SOON`]).
pub async fn exchange<S>(mut s: S, data: &[u8]) -> Result<Vec<u8>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(data).await.map_err(|e| format!("write: {e}"))?;
    s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut back = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut back))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    Ok(back)
}

/// A TLS 1.3 caller of a Hub TLS service listener at `addr`, presenting the SVID in `dir` and
/// trusting its bundle (`svid.pem`, `svid.key`, `bundle.pem`: what `ewii-hub workload-svid`
/// writes, and what a Client's state directory holds). The handshake's outcome is returned:
/// with TLS 1.3 a refusal of the caller may show only at the first read.
pub async fn tls_caller(
    addr: SocketAddr,
    dir: &Path,
    trust_domain: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use ewii::identity::{store, verify};
    let svid = store::Svid::load(dir, store::SVID_CERT, store::SVID_KEY).unwrap();
    let bundle = store::read_certs(&dir.join(store::BUNDLE)).unwrap();
    let verifier = verify::SpiffeVerifier::new(
        verify::Bundle::new(bundle),
        trust_domain,
        verify::Expect::Hub,
    );
    let mut tls =
        ewii::transport::tls_client_config(Some(&svid), std::sync::Arc::new(verifier), b"x")
            .unwrap();
    // A service listener speaks plain TLS: no ALPN.
    tls.alpn_protocols.clear();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("hub").unwrap();
    connector.connect(name, tcp).await
}
