//! Scale (P9, issue 7): a Hub holding many idle sessions does no database work while nothing
//! changes. Sessions are told of revocations and retirements; none polls the store.
//!
//! The Hub runs on a runtime of its own (threads `hub-rt`) and its shards (`ewii-shard-…`), so
//! that its CPU time can be told apart from the test's 1,000 QUIC clients, which run on the
//! test's runtime.

use std::sync::Arc;
use std::time::Duration;

use ewii::audit::{Audit, AuditOutput};
use ewii::config::HubConfig;
use ewii::hub::admin;
use ewii::hub::state::{Db, TokenGrant};
use ewii::hub::Hub;
use ewii::identity::ca::Ca;
use ewii::identity::store::{self, Svid};
use ewii::identity::verify::{Bundle, Expect, SpiffeVerifier};
use ewii::transport;
use ewii_common::audit::Side;
use ewii_common::frame;
use ewii_common::spiffe::SpiffeId;
use ewii_tests::*;
use tokio::task::JoinSet;
use tokio::time::Instant;

const SESSIONS: usize = 1_000;
/// Handshakes in flight at once.
const PARALLEL: usize = 16;
const IDLE_WINDOW: Duration = Duration::from_secs(3);

/// User + system CPU seconds of this process's threads whose name starts with one of
/// `prefixes` (all threads when empty), from `/proc/self/task/*/stat`.
fn cpu_seconds(prefixes: &[&str]) -> f64 {
    // USER_HZ: 100 on every Linux ABI we run on (`getconf CLK_TCK`).
    const TICKS: f64 = 100.0;
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        if !prefixes.is_empty() && !prefixes.iter().any(|p| comm.starts_with(p)) {
            continue;
        }
        // Fields after the command: state is field 3, utime 14, stime 15.
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        ticks += rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    }
    ticks as f64 / TICKS
}

/// Bytes of heap in use by the whole process (glibc's count over every arena, mapped chunks
/// included).
#[allow(unsafe_code)] // mallinfo2: no safe wrapper
fn heap_in_use() -> usize {
    // SAFETY: `mallinfo2` only reads the allocator's counters.
    let info = unsafe { libc::mallinfo2() };
    info.uordblks + info.hblkhd
}

/// The heap one idle session may cost, its two ends together (the Hub's side and the test's
/// Client side share this process). Measured 2026-12-03 (debug build, as the tests run):
/// 158 KB. Before quinn gave its send buffer back between bursts (third_party/README.md),
/// a connection kept one sized for a whole batch of datagrams from its handshake on: 222 KB.
const HEAP_PER_SESSION: usize = 190 * 1024;

/// The Hub's threads: its runtime (workers and blocking pool), its shards, the store owner,
/// the audit writer.
const HUB_THREADS: &[&str] = &["hub-rt", "ewii-shard", "ewii-store", "ewii-audit"];

/// Opens a session the way a Client does (handshake, `Hello`, `Welcome`) and keeps it.
/// Loopback UDP drops datagrams when a socket buffer overflows during the burst of
/// handshakes; like a real Client, a dial that times out is tried again (counted).
async fn open_session(
    endpoint: quinn::Endpoint,
    hub: std::net::SocketAddr,
    verifier: Arc<SpiffeVerifier>,
    svid: Svid,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream, u32) {
    let mut retries = 0;
    loop {
        match try_open(&endpoint, hub, verifier.clone(), &svid).await {
            Ok((conn, send, recv)) => return (conn, send, recv, retries),
            Err(e) if retries < 5 => {
                tracing::debug!(error = %e, "dial again");
                retries += 1;
            }
            Err(e) => panic!("no session after {retries} retries: {e}"),
        }
    }
}

async fn try_open(
    endpoint: &quinn::Endpoint,
    hub: std::net::SocketAddr,
    verifier: Arc<SpiffeVerifier>,
    svid: &Svid,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), String> {
    let tls = transport::tls_client_config(Some(svid), verifier, frame::ALPN).unwrap();
    let quic = transport::quic_client_config(
        tls,
        transport::MAX_CONCURRENT_QUERIES,
        transport::STREAM_WINDOW,
    )
    .unwrap();
    let conn = endpoint
        .connect_with(quic, hub, "127.0.0.1")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let hello = frame::Control::Hello {
        version: frame::PROTOCOL_VERSION,
        allow_list: vec!["db".into()],
        allow_list_digest: vec![0; 32],
        build: "scale".into(),
    };
    transport::write_frame(&mut send, &hello)
        .await
        .map_err(|e| e.to_string())?;
    let mut reader = transport::FrameReader::new();
    match reader.read::<frame::Control>(&mut recv).await {
        Ok(Some(frame::Control::Welcome { .. })) => Ok((conn, send, recv)),
        other => Err(format!("expected Welcome, got {other:?}")),
    }
}

#[test]
fn p9_thousand_idle_sessions_cost_no_database_work_and_bounded_heap() {
    logs();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("hub");
    admin::init(&state_dir, TD).unwrap();
    let hub_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("hub-rt")
        .enable_all()
        .build()
        .unwrap();
    let config: HubConfig = format!(
        "state_dir = {state_dir:?}\nlisten = \"127.0.0.1:0\"\naudit = \"discard\"\n\
         revoke_after_lost_secs = 3600\n"
    )
    .parse()
    .unwrap();
    let audit = Audit::open(Side::Hub, &AuditOutput::Discard).unwrap();
    let hub = hub_rt.block_on(Hub::bind(config, audit)).unwrap();
    let (addr, handle) = (hub.local_addr(), hub.handle());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hub_task = hub_rt.spawn(hub.run(async {
        let _ = stopped.await;
    }));

    // 1,000 Clients enrolled the way `record_enrolment` records them, with SVIDs signed by
    // the Hub CA directly: 1,000 enrolment handshakes would measure enrolment, not idling.
    let ca = Ca::load(&state_dir).unwrap();
    let db = Db::open(&state_dir.join(admin::DB_FILE)).unwrap();
    let now = ewii::now_timestamp().unix_secs() as i64;
    let svids: Vec<Svid> = (0..SESSIONS)
        .map(|i| {
            let name = format!("c{i:04}");
            let id = SpiffeId::client(TD, &name).unwrap();
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let issued = ca.issue(&key, &id, Duration::from_secs(3600)).unwrap();
            let grant = TokenGrant {
                client: name,
                webhook: None,
                revocations: 0,
            };
            db.record_enrolment(&grant, &id, &issued.serial, issued.not_after, now)
                .unwrap();
            Svid::new(vec![issued.der], &key)
        })
        .collect();
    drop(db);
    let enrolled = started.elapsed();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("clients")
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // The Hub picks the enrolments up at its next change check.
        let before = handle.store_statements();
        poll_until("the Hub to reload its view", SOON, || {
            handle.store_statements() > before
        })
        .await;
        let anchors = store::read_certs(&state_dir.join("ca.pem")).unwrap();
        let verifier = Arc::new(SpiffeVerifier::new(Bundle::new(anchors), TD, Expect::Hub));
        let endpoints: Vec<quinn::Endpoint> = (0..4)
            .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap())
            .collect();
        let heap0 = heap_in_use();
        let t0 = Instant::now();
        let mut opening = JoinSet::new();
        let mut open = Vec::with_capacity(SESSIONS);
        for (i, svid) in svids.into_iter().enumerate() {
            if opening.len() >= PARALLEL {
                open.push(opening.join_next().await.unwrap().unwrap());
            }
            let endpoint = endpoints[i % endpoints.len()].clone();
            opening.spawn(open_session(endpoint, addr, verifier.clone(), svid));
        }
        while let Some(s) = opening.join_next().await {
            open.push(s.unwrap());
        }
        let retries: u32 = open.iter().map(|s| s.3).sum();
        poll_until("every session registered", SOON, || {
            handle.connections() == SESSIONS
        })
        .await;
        let opened = t0.elapsed();
        // Let the last `session_up` writes land, then watch the Hub idle.
        let mut stmts = handle.store_statements();
        let settle = Instant::now() + SOON;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = handle.store_statements();
            if now == stmts || Instant::now() > settle {
                break;
            }
            stmts = now;
        }
        let heap_per_session = heap_in_use().saturating_sub(heap0) / SESSIONS;
        let (checks0, hub_cpu0, all_cpu0) = (
            handle.store_change_checks(),
            cpu_seconds(HUB_THREADS),
            cpu_seconds(&[]),
        );
        let t1 = Instant::now();
        tokio::time::sleep(IDLE_WINDOW).await;
        let window = t1.elapsed().as_secs_f64();
        let (stmts1, checks1) = (handle.store_statements(), handle.store_change_checks());
        let hub_cpu = cpu_seconds(HUB_THREADS) - hub_cpu0;
        let all_cpu = cpu_seconds(&[]) - all_cpu0;
        println!(
            "scale: {SESSIONS} sessions (enrolled in {enrolled:.1?}, opened in {opened:.1?}, \
             {retries} dial(s) retried); \
             idle {window:.1} s: {} database statements, {} change checks; \
             Hub CPU {hub_cpu:.2} s ({:.1} % of one core), whole test process {all_cpu:.2} s \
             (with the clients' keep-alives); heap {} KB per session, both ends",
            stmts1 - stmts,
            checks1 - checks0,
            100.0 * hub_cpu / window,
            heap_per_session / 1024,
        );
        assert_eq!(handle.connections(), SESSIONS, "every session stayed up");
        assert_eq!(
            stmts1 - stmts,
            0,
            "idle sessions must cost no database statement"
        );
        // The one thing that may run: the change check, once per tick whatever the count of
        // sessions (it is how another process's revocation is noticed).
        assert!(
            (5..=30).contains(&(checks1 - checks0)),
            "{} change checks in {window:.1} s",
            checks1 - checks0
        );
        assert!(
            heap_per_session <= HEAP_PER_SESSION,
            "an idle session holds {} KB of heap, both ends; at most {} KB expected",
            heap_per_session / 1024,
            HEAP_PER_SESSION / 1024
        );
        drop(open);
        for e in endpoints {
            e.close(0u32.into(), b"");
        }
    });
    let _ = stop.send(());
    hub_rt.block_on(hub_task).unwrap().unwrap();
    rt.shutdown_timeout(Duration::from_secs(2));
    hub_rt.shutdown_timeout(Duration::from_secs(2));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
