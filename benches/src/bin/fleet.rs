//! `ewii-fleet`: how many idle Clients one Hub holds, and what each thousand costs it (issue 8:
//! "10,000 idle Clients, keep-alives only, on one Hub under one core and 1 GB").
//!
//! A real `ewii-hub` process (release build) on loopback. Every Client enrols for real (a
//! one-time token, the enrolment protocol, its own key and SVID), then opens its session the
//! way `ewii-client` does — the same TLS and QUIC configuration (keep-alives included), the
//! control stream, `Hello` → `Welcome` — and stays idle. A dial that times out (a handshake
//! that lost packets to a loopback socket buffer under the burst) is made again, as a Client
//! would, and counted in the report. The sessions are held in this process, many connections
//! per UDP socket (a stand-in for N Client processes: the Hub sees N
//! authenticated connections, which is what it pays for). At each step (by default 1,000,
//! 2,000, 5,000 and 10,000 sessions) the Hub's CPU is read from `/proc/<pid>/stat` over a
//! hold window and its RSS from `/proc/<pid>/status`; the report gives both per 1,000 Clients.
//! Measures; asserts nothing.
//!
//! ```sh
//! scripts/fleet                      # builds, runs the default steps, writes the report
//! scripts/fleet --steps 100,500 --hold-secs 5
//! ```
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use ewii::audit::{Audit, AuditOutput};
use ewii::config::HubAddress;
use ewii::identity::store::{self, Svid};
use ewii::identity::verify::{Bundle, Expect, SpiffeVerifier};
use ewii_benches::compare::procs::{self, Proc};
use ewii_benches::host;
use ewii_common::audit::Side;
use ewii_common::frame::{self, Control};
use tokio::task::JoinSet;
use tokio::time::Instant;

const TD: &str = "fleet.ewii.local";
/// Enrolments and session openings in flight at once: under the Hub's fixed bound of 64
/// handshakes from one address (docs/config.md), so none is refused for it.
const IN_FLIGHT: usize = 48;
/// Sessions per UDP socket of this process.
const PER_SOCKET: usize = 1_000;
/// Dials of one session that may time out before the run gives up. Loopback UDP drops
/// datagrams when a socket buffer overflows under the burst of handshakes, and a handshake
/// that loses packets twice outlasts the idle timeout; a Client dials again, and so does this.
const DIALS: u32 = 5;

#[derive(Parser)]
#[command(about = "Idle Clients held by one Hub: CPU and RSS per 1,000")]
struct Args {
    /// Session counts to measure at, ascending (the last is the fleet's size).
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000,10000")]
    steps: Vec<usize>,
    /// Seconds the Hub's CPU is read over at each step (after a settling second).
    #[arg(long, default_value_t = 20)]
    hold_secs: u64,
    /// Where the report goes (`fleet-latest.md` and a dated copy).
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        !args.steps.is_empty() && args.steps.windows(2).all(|w| w[0] < w[1]),
        "--steps must be ascending, e.g. 1000,2000,5000"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(fleet(args))
}

/// One measured step.
struct Step {
    sessions: usize,
    cpu_percent: f64,
    rss_mb: f64,
    open_secs: f64,
    /// Dials that timed out and were made again, while opening this step's sessions.
    redials: u32,
}

async fn fleet(args: Args) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let hub_bin = me.with_file_name("ewii-hub");
    anyhow::ensure!(
        hub_bin.exists(),
        "ewii-hub is not beside {}: build it (scripts/fleet does)",
        me.display()
    );
    let size = *args.steps.last().context("no steps")?;
    // Read before the run, as the peer comparison does.
    let (commit, _) = host::checked_out();
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("hub");
    ewii::hub::admin::init(&state, TD)?;
    let bundle_hash = ewii::hub::admin::current_bundle_hash(&state)?;
    let pin = ewii::identity::parse_bundle_hash(&bundle_hash)?;
    // Tokens first, in one database connection, before the Hub runs (a running Hub would
    // reload its view at each commit of another process).
    let started = Instant::now();
    let tokens = make_tokens(&state, size)?;
    eprintln!("{size} tokens in {:.1} s", started.elapsed().as_secs_f64());
    let udp = procs::free_port(true)?;
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\nlisten = \"127.0.0.1:{udp}\"\naudit = \"discard\"\nrevoke_after_lost_secs = 0\n"
        ),
    )?;
    let mut hub = Proc::spawn(
        "ewii-hub",
        &hub_bin,
        &["run", "--config", config.to_str().context("path")?],
        None,
    )?;
    hub.wait_line("listening on udp", Duration::from_secs(30))?;
    let hub_addr = SocketAddr::from(([127, 0, 0, 1], udp));
    let idle_rss = procs::rss_mb(hub.pid())?;

    // Enrol every Client for real.
    let started = Instant::now();
    let svids = enrol_all(hub_addr, pin, dir.path(), tokens).await?;
    eprintln!(
        "{} Clients enrolled in {:.1} s",
        svids.len(),
        started.elapsed().as_secs_f64()
    );
    let anchors = store::read_certs(&state.join("ca.pem"))?;

    let mut held = Vec::with_capacity(size);
    let mut endpoints = Vec::new();
    let mut steps = Vec::new();
    let mut svids = svids.into_iter();
    for &target in &args.steps {
        let started = Instant::now();
        let mut redials = 0;
        while held.len() < target {
            let batch = (target - held.len()).min(PER_SOCKET);
            let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            let chunk: Vec<Svid> = svids.by_ref().take(batch).collect();
            let (sessions, again) = open_sessions(&endpoint, hub_addr, &anchors, chunk).await?;
            held.extend(sessions);
            redials += again;
            endpoints.push(endpoint);
            hub.check_alive()?;
        }
        let open_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (cpu0, t0) = (procs::cpu_secs(hub.pid())?, Instant::now());
        tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
        let cpu = procs::cpu_secs(hub.pid())? - cpu0;
        let cpu_percent = 100.0 * cpu / t0.elapsed().as_secs_f64();
        let rss_mb = procs::rss_mb(hub.pid())?;
        let lost = held
            .iter()
            .filter(|s: &&Session| s.conn.close_reason().is_some())
            .count();
        if lost > 0 {
            bail!("{lost} of {} sessions ended while idle", held.len());
        }
        eprintln!(
            "{target} idle sessions: Hub CPU {cpu_percent:.1} % of a core, RSS {rss_mb:.1} MB (opened in {open_secs:.1} s, {redials} dial(s) made again)"
        );
        steps.push(Step {
            sessions: target,
            cpu_percent,
            rss_mb,
            open_secs,
            redials,
        });
    }
    let report = render(&steps, idle_rss, args.hold_secs, &commit);
    println!("{report}");
    std::fs::create_dir_all(&args.out)?;
    let date = ewii::now_timestamp().to_string();
    let day = date.get(..10).unwrap_or("undated");
    std::fs::write(args.out.join("fleet-latest.md"), &report)?;
    std::fs::write(args.out.join(format!("fleet-{day}.md")), &report)?;
    drop(held);
    hub.stop();
    Ok(())
}

/// `n` one-time tokens for clients `c00000…`, written straight into the Hub's database.
/// (Not an operator's `token create`: the Hub is told there is nothing of them to audit, so
/// that its idle figures are not those of writing `n` `token_created` records at its start.)
fn make_tokens(state: &Path, n: usize) -> anyhow::Result<Vec<String>> {
    let db = ewii::hub::state::Db::open(&state.join(ewii::hub::layout::DB_FILE))?;
    let now = ewii::now_timestamp().unix_secs() as i64;
    let tokens = (0..n)
        .map(|i| {
            let mut secret = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
            let token = format!("ewii_{}", hex::encode(secret));
            db.add_token(&token, &format!("c{i:05}"), now + 3_600, None, now)?;
            Ok(token)
        })
        .collect::<anyhow::Result<Vec<String>>>()?;
    db.operator_log_audited(db.operator_log_last()?)?;
    Ok(tokens)
}

/// Enrols one Client per token, `IN_FLIGHT` at a time; returns their SVIDs.
async fn enrol_all(
    hub: SocketAddr,
    pin: [u8; 32],
    root: &Path,
    tokens: Vec<String>,
) -> anyhow::Result<Vec<Svid>> {
    let hub: HubAddress = hub.to_string().parse()?;
    let audit = Audit::open(Side::Client, &AuditOutput::Discard)?;
    let mut out = Vec::with_capacity(tokens.len());
    let mut set = JoinSet::new();
    let mut tokens = tokens.into_iter().enumerate();
    loop {
        while set.len() < IN_FLIGHT {
            let Some((i, token)) = tokens.next() else {
                break;
            };
            let (hub, audit) = (hub.clone(), audit.clone());
            let dir = root.join(format!("c{i:05}"));
            set.spawn(async move {
                ewii::client::enrol::enrol(&hub, &token, pin, &dir, &audit)
                    .await
                    .with_context(|| format!("enrolling client {i}"))?;
                Ok::<_, anyhow::Error>(Svid::load(&dir, store::SVID_CERT, store::SVID_KEY)?)
            });
        }
        match set.join_next().await {
            Some(done) => out.push(done??),
            None => break,
        }
    }
    Ok(out)
}

/// An idle session, held open.
struct Session {
    conn: quinn::Connection,
    _control: (quinn::SendStream, quinn::RecvStream),
}

/// Opens one session per SVID on `endpoint`, `IN_FLIGHT` at a time; returns them and how many
/// dials timed out and were made again.
async fn open_sessions(
    endpoint: &quinn::Endpoint,
    hub: SocketAddr,
    anchors: &[rustls::pki_types::CertificateDer<'static>],
    svids: Vec<Svid>,
) -> anyhow::Result<(Vec<Session>, u32)> {
    let mut out = Vec::with_capacity(svids.len());
    let mut redials = 0;
    let mut set = JoinSet::new();
    let mut svids = svids.into_iter();
    let bundle = Bundle::new(anchors.to_vec());
    loop {
        while set.len() < IN_FLIGHT {
            let Some(svid) = svids.next() else { break };
            let (endpoint, bundle) = (endpoint.clone(), bundle.clone());
            set.spawn(async move { open_redialling(&endpoint, hub, bundle, &svid).await });
        }
        match set.join_next().await {
            Some(done) => {
                let (session, again) = done??;
                out.push(session);
                redials += again;
            }
            None => break,
        }
    }
    Ok((out, redials))
}

/// [`open`], dialled again when the handshake timed out, up to [`DIALS`] times in all; returns
/// the session and how many dials were made again.
async fn open_redialling(
    endpoint: &quinn::Endpoint,
    hub: SocketAddr,
    bundle: Bundle,
    svid: &Svid,
) -> anyhow::Result<(Session, u32)> {
    let mut again = 0;
    loop {
        match open(endpoint, hub, bundle.clone(), svid).await {
            Ok(session) => return Ok((session, again)),
            Err(e)
                if again + 1 < DIALS
                    && matches!(
                        e.downcast_ref::<quinn::ConnectionError>(),
                        Some(quinn::ConnectionError::TimedOut)
                    ) =>
            {
                again += 1;
            }
            Err(e) => return Err(e.context(format!("a session, after {} dial(s)", again + 1))),
        }
    }
}

/// What `ewii-client` does to open its session: the same TLS and QUIC configuration, the
/// control stream, `Hello` → `Welcome`.
async fn open(
    endpoint: &quinn::Endpoint,
    hub: SocketAddr,
    bundle: Bundle,
    svid: &Svid,
) -> anyhow::Result<Session> {
    let verifier = SpiffeVerifier::new(bundle, TD, Expect::Hub);
    let tls = ewii::transport::tls_client_config(Some(svid), Arc::new(verifier), frame::ALPN)?;
    let quic = ewii::transport::quic_client_config(
        tls,
        ewii::transport::MAX_CONCURRENT_QUERIES,
        ewii::transport::STREAM_WINDOW,
    )?;
    let conn = endpoint.connect_with(quic, hub, "127.0.0.1")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Control::Hello {
        version: frame::PROTOCOL_VERSION,
        allow_list: vec!["db".into()],
        allow_list_digest: vec![0; 32],
        build: "ewii-fleet".into(),
    };
    ewii::transport::write_frame(&mut send, &hello).await?;
    let mut reader = ewii::transport::FrameReader::new();
    match tokio::time::timeout(Duration::from_secs(30), reader.read::<Control>(&mut recv)).await {
        Ok(Ok(Some(Control::Welcome { .. }))) => Ok(Session {
            conn,
            _control: (send, recv),
        }),
        other => bail!("no Welcome: {other:?}"),
    }
}

/// The Markdown report.
fn render(steps: &[Step], idle_rss: f64, hold_secs: u64, commit: &str) -> String {
    let mut s = String::new();
    let date = ewii::now_timestamp();
    s.push_str(&format!(
        "# Idle Clients on one Hub ({date})\n\n- machine: {}\n- commit: {} (checked out at the start of the run; scripts/fleet builds the Hub from it)\n\n`ewii-fleet`: a {} `ewii-hub` on loopback; each Client enrolled for real and holds one idle session (keep-alives only, the Client's own QUIC settings). Hub CPU over {hold_secs} s per step, from `/proc/<pid>/stat`; RSS from `/proc/<pid>/status`. Hub RSS with no session: {idle_rss:.1} MB.\n\n",
        host::machine(),
        commit,
        if cfg!(debug_assertions) {
            "debug (not for figures)"
        } else {
            "release"
        },
    ));
    s.push_str("| idle Clients | Hub CPU (% of one core) | Hub RSS (MB) | CPU per 1,000 (% of a core) | RSS per 1,000 (MB) | sessions opened in (s) | dials made again |\n|---|---|---|---|---|---|---|\n");
    for st in steps {
        let k = st.sessions as f64 / 1_000.0;
        s.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {} |\n",
            st.sessions,
            st.cpu_percent,
            st.rss_mb,
            st.cpu_percent / k,
            (st.rss_mb - idle_rss) / k,
            st.open_secs,
            st.redials
        ));
    }
    if let Some(last) = steps.last() {
        let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
        s.push_str(&format!(
            "\nTarget (issue 8): {} idle Clients under one core and 1 GB — CPU {:.1} % ({}), RSS {:.0} MB ({}).\n",
            last.sessions,
            last.cpu_percent,
            verdict(last.cpu_percent < 100.0),
            last.rss_mb,
            verdict(last.rss_mb < 1_000.0)
        ));
    }
    s
}
