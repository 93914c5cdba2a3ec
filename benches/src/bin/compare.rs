//! `ewii-compare`: Ewii against the tunnels a customer would pick instead — raw TCP, a bare
//! quinn reference, rathole (`noise` and `tcp`), bore — in one run on this machine, the
//! systems interleaved repetition by repetition so that a noisy machine affects all alike.
//! Writes a Markdown report and an SVG chart (medians, ranges, ratios to raw TCP and to
//! rathole `noise`, Ewii's targets with their gaps). Measures; asserts nothing.
//!
//! ```sh
//! scripts/compare          # installs the peers, builds, runs this (root: the eBPF lock)
//! ```
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ewii_benches::compare::load;
use ewii_benches::compare::procs::{self, Proc};
use ewii_benches::compare::report::{self, Figure, Samples};
use ewii_benches::compare::systems::{find_program, Bins, Kind, Running, Services, Setup};
use ewii_benches::host;

/// Idle connections held for the RSS figure.
const IDLE_CONNECTIONS: usize = 100;
/// How long an agent is left idle after its first echo before its idle memory is read: long
/// enough for keep-alives and timers to have run (Ewii's Client hands its start-up code back
/// within a quarter second of its first session; what idling runs comes back after that).
const IDLE_SETTLE: Duration = Duration::from_secs(2);
/// Bytes in a GiB.
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[derive(Parser)]
#[command(about = "Ewii against rathole, bore, bare quinn and raw TCP, in one run")]
struct Args {
    /// Where rathole and bore were installed (`cargo install --root DIR`: DIR/bin); else PATH.
    #[arg(long)]
    peers: Option<PathBuf>,
    /// Where the report goes (`latest.md`, `latest.svg`, and dated copies).
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Repetitions (each runs every system once).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds of each iperf3 run (two per system and repetition).
    #[arg(long, default_value_t = 5)]
    bulk_secs: u32,
    /// Seconds of each connection-rate run (two per system and repetition).
    #[arg(long, default_value_t = 3)]
    rate_secs: u64,
    /// Timed round trips per system and repetition.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Only these systems (labels as in the report, comma-separated, e.g. "Ewii,rathole noise").
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where `ewii-hub`, `ewii-client` and `ewii-client-ebpf` are (scripts/compare: the
    /// image's static binaries, from scripts/image-bins); else beside this program, with its
    /// `ewii-client` for both Ewii systems.
    #[arg(long, value_name = "DIR")]
    ewii_bins: Option<PathBuf>,
    /// A candidate build to compare with `Ewii` (its `ewii-hub` and `ewii-client`, e.g. a
    /// copy of scripts/image-bins' output from another commit): adds the system
    /// "Ewii (candidate)", interleaved with the rest. The report then goes to
    /// `ab-<date>-<HHMM>.md` and `.svg`, not to `latest.*`.
    #[arg(long, value_name = "DIR")]
    candidate: Option<PathBuf>,
    /// Measure nothing: start each selected system in turn, print its entries and process ids,
    /// and keep it up this many seconds (for a profiler or /proc/<pid>/smaps). Ctrl-C or
    /// SIGTERM ends the hold early and stops every process it started.
    #[arg(long, value_name = "SECS")]
    hold: Option<u64>,
    /// Exit with an error, after writing the report, when a selected system could not start
    /// or one of its measurements failed (CI's reduced run). Without it such a failure is
    /// listed in the report and the run goes on.
    #[arg(long)]
    strict: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(compare(args))
}

/// What scripts/image-bins wrote a directory's binaries were built from (`BUILT_FROM`).
fn built_from(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("BUILT_FROM"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Records the median and 99th percentile of `times` (nothing when there are none).
fn add_percentiles(samples: &mut Samples, kind: Kind, times: &mut [f64], p50: Figure, p99: Figure) {
    if times.is_empty() {
        return;
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    samples.add(kind, p50, pct(0.50));
    samples.add(kind, p99, pct(0.99));
}

fn beside_me(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name(name);
    anyhow::ensure!(
        p.exists(),
        "{name} is not beside {}: build it (scripts/compare does)",
        me.display()
    );
    Ok(p)
}

async fn compare(args: Args) -> anyhow::Result<()> {
    let peers_dir = args.peers.as_deref();
    let iperf3 =
        find_program("iperf3", None).context("iperf3 is not installed (apt-get install iperf3)")?;
    let ewii = |name: &str| match &args.ewii_bins {
        Some(dir) => {
            let p = dir.join(name);
            anyhow::ensure!(p.exists(), "{} is missing", p.display());
            Ok(p)
        }
        None => beside_me(name),
    };
    let client = ewii("ewii-client")?;
    let bins = Bins {
        hub: ewii("ewii-hub")?,
        client_ebpf: match &args.ewii_bins {
            Some(_) => ewii("ewii-client-ebpf")?,
            None => client.clone(),
        },
        client,
        quinn_ref: beside_me("ewii-quinn-ref")?,
        rathole: find_program("rathole", peers_dir),
        bore: find_program("bore", peers_dir),
        candidate: match &args.candidate {
            Some(dir) => {
                let bin = |name: &str| {
                    let p = dir.join(name);
                    anyhow::ensure!(p.exists(), "the candidate's {} is missing", p.display());
                    Ok(p)
                };
                Some((bin("ewii-hub")?, bin("ewii-client")?))
            }
            None => None,
        },
    };
    // `--only`'s names, each a system's label in any case; one the harness does not know is
    // refused, not left out in silence.
    let only: Vec<Kind> = args
        .only
        .iter()
        .map(|name| {
            Kind::ALL
                .into_iter()
                .find(|k| name.eq_ignore_ascii_case(k.label()))
                .with_context(|| {
                    let labels: Vec<&str> = Kind::ALL.iter().map(|k| k.label()).collect();
                    format!(
                        "--only: no system is called {name:?}; the systems: {}",
                        labels.join(", ")
                    )
                })
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(
        bins.candidate.is_some() || !only.contains(&Kind::EwiiCandidate),
        "--only names {:?}, which needs --candidate DIR",
        Kind::EwiiCandidate.label()
    );
    let mut missing = vec![];
    let mut systems: Vec<Kind> = Kind::ALL.to_vec();
    if bins.candidate.is_none() {
        systems.retain(|k| *k != Kind::EwiiCandidate);
    }
    if bins.rathole.is_none() {
        missing.push("rathole (not installed: scripts/compare installs it)".to_owned());
        systems.retain(|k| !matches!(k, Kind::RatholeNoise | Kind::RatholeTcp));
    }
    if bins.bore.is_none() {
        missing.push("bore (not installed: scripts/compare installs it)".to_owned());
        systems.retain(|k| *k != Kind::Bore);
    }
    if !procs::is_root() || ewii::enforce::ebpf::cgroup2_mount().is_err() {
        missing.push("Ewii + eBPF lock (needs root and cgroup v2)".to_owned());
        systems.retain(|k| *k != Kind::EwiiLocked);
    }
    if !only.is_empty() {
        systems.retain(|k| only.contains(k));
    }
    if let Some(absent) = only.iter().find(|k| !systems.contains(k)) {
        anyhow::ensure!(
            !args.strict,
            "--strict: {:?} was asked for and cannot run here: {}",
            absent.label(),
            missing.join("; ")
        );
    }
    // Only what `missing` names can leave `--only`'s systems out (the candidate is checked
    // above), so it says why none is left.
    anyhow::ensure!(
        !systems.is_empty(),
        "no system left to measure: {}",
        missing.join("; ")
    );

    let echo = load::echo_service()?;
    let iperf_addr = procs::free_tcp()?;
    let mut iperf_server = Proc::spawn(
        "iperf3 -s",
        &iperf3,
        &[
            "-s",
            "--forceflush",
            "-B",
            "127.0.0.1",
            "-p",
            &iperf_addr.port().to_string(),
        ],
        None,
    )?;
    iperf_server.wait_line("Server listening", Duration::from_secs(10))?;
    let services = Services {
        echo,
        iperf: iperf_addr,
    };
    let setup = Setup::new(bins.clone(), services)?;

    if let Some(secs) = args.hold {
        // Ctrl-C and `kill` alike end the hold and stop what it started (none is left running),
        // also when they come while a system is still starting: both are caught from here on.
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        for kind in systems {
            let running = setup.start(kind).await?;
            println!(
                "{}: echo entry {}, iperf3 entry {}, processes {:?} (agent {:?}); held {secs} s",
                kind.label(),
                running.echo,
                running.iperf,
                running.pids(),
                running.agent_pids()
            );
            let signalled = tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(secs)) => false,
                _ = int.recv() => true,
                _ = term.recv() => true,
            };
            running.stop();
            if signalled {
                break;
            }
        }
        iperf_server.stop();
        return Ok(());
    }

    let mut samples = Samples::default();
    let started = tokio::time::Instant::now();
    // Read before the run. One reading of the clock for both.
    let now = shell("date", &["-u", "+%Y-%m-%d %H:%M UTC|%Y-%m-%d-%H%M"]);
    let (date, stamp) = now
        .split_once('|')
        .map(|(d, s)| (d.to_owned(), s.to_owned()))
        .unwrap_or_else(|| (now.clone(), now.replace([' ', ':'], "-")));
    let commit = {
        let (tree, dirty) = host::checked_out();
        let checked_out = if dirty {
            format!("{tree} (at the start of the run)")
        } else {
            tree.clone()
        };
        // What the measured binaries were built from, where scripts/image-bins wrote it: a
        // directory of another build says so rather than borrowing the checkout's name.
        let built = args.ewii_bins.as_deref().and_then(built_from);
        let line = match built {
            Some(built) if built == tree => checked_out,
            Some(built) => format!("{checked_out}; the Ewii binaries measured were built from {built}"),
            None if args.ewii_bins.is_some() => format!(
                "{checked_out}; the Ewii binaries measured do not say what they were built from (no BUILT_FROM beside them)"
            ),
            None => checked_out,
        };
        match &args.candidate {
            Some(dir) => format!(
                "{line}; the candidate's from {}, built from {}",
                dir.display(),
                built_from(dir)
                    .unwrap_or_else(|| "what it does not say (no BUILT_FROM)".to_owned())
            ),
            None => line,
        }
    };
    // What went wrong with a selected system (for `--strict`); also listed in the report.
    let mut failed: Vec<String> = vec![];
    for rep in 0..args.reps {
        // Interleaved, and each repetition starts with another system.
        let mut order = systems.clone();
        order.rotate_left(rep % systems.len().max(1));
        for kind in order {
            eprintln!("rep {}/{}: {}", rep + 1, args.reps, kind.label());
            let running = match setup.start(kind).await {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("  could not start: {e:#}");
                    failed.push(format!(
                        "{} (rep {}): could not start: {e}",
                        kind.label(),
                        rep + 1
                    ));
                    continue;
                }
            };
            if let Err(e) = measure(running, &args, &iperf3, &mut samples).await {
                eprintln!("  failed: {e:#}");
                failed.push(format!("{} (rep {}): {e}", kind.label(), rep + 1));
            }
        }
    }
    iperf_server.stop();

    let ctx = report::Context {
        date,
        machine: host::machine(),
        commit,
        versions: [
            bins.rathole.as_deref().map(|p| shell_path(p, &["--version"])),
            bins.bore.as_deref().map(|p| shell_path(p, &["--version"])),
            Some(shell_path(&iperf3, &["--version"])),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; "),
        method: format!(
            "{} repetitions, systems interleaved (each repetition starts with the next system); per system and repetition: \
             agent RSS idle ({} s after the first echo), {IDLE_CONNECTIONS} idle connections held, {} timed 1-byte round trips on one connection from the harness's async client (tokio, two workers; and the tunnel's CPU per round trip, \
             the warm-up's included), then as many from a blocking client on a thread of its own (as psql makes them), connect → 1-byte echo → close for {} s at c=1 (and the CPU per completed \
             connection) and at c=32, iperf3 {} s each way (one TCP stream; CPU time of the tunnel's processes from /proc/<pid>/stat \
             over both runs, divided by the bytes iperf3 received), agent RSS 1 s after; anonymous memory (RssAnon) idle and after; the host's steal time (/proc/stat) over the system's whole measurement. Loopback; QUIC datagrams at most 1,452 bytes. \
             Ewii's binaries: {}; {}. Whole run: {:.0} s.",
            args.reps,
            IDLE_SETTLE.as_secs(),
            args.round_trips,
            args.rate_secs,
            args.bulk_secs,
            match &args.ewii_bins {
                Some(dir) => format!(
                    "from {} (scripts/compare: the images' static builds; the locked system runs ewii-client-ebpf)",
                    dir.display()
                ),
                None => "beside the harness (one ewii-client, built with the ebpf feature, for both systems)".to_owned(),
            },
            if procs::is_root() {
                format!(
                    "the unlocked Client runs as uid {}, its binary owned by root, as in the image (the locked one as root, for the lock)",
                    ewii_benches::compare::systems::IMAGE_UID
                )
            } else {
                "every process runs as the user who ran the harness, who owns Ewii's binaries (in the image the Client does not own its binary: docs/benchmarks.md)".to_owned()
            },
            started.elapsed().as_secs_f64()
        ),
        missing: missing.into_iter().chain(failed.iter().cloned()).collect(),
        chart: if args.candidate.is_some() {
            format!("ab-{stamp}.svg")
        } else {
            "latest.svg".to_owned()
        },
    };
    std::fs::create_dir_all(&args.out)?;
    let md = report::markdown(&samples, &ctx);
    let svg = report::svg(&samples, &ctx);
    // Dated to the minute of its start: a second run on the same day keeps the first.
    // An A/B is not the published comparison: it keeps `latest.*` as they are.
    let files = if args.candidate.is_some() {
        vec![
            (format!("ab-{stamp}.md"), &md),
            (format!("ab-{stamp}.svg"), &svg),
        ]
    } else {
        vec![
            ("latest.md".to_owned(), &md),
            ("latest.svg".to_owned(), &svg),
            (format!("compare-{stamp}.md"), &md),
        ]
    };
    for (name, text) in &files {
        std::fs::write(args.out.join(name), text)?;
    }
    println!("{md}");
    let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
    eprintln!("written in {}: {}", args.out.display(), names.join(", "));
    anyhow::ensure!(
        !args.strict || failed.is_empty(),
        "--strict: {} of the selected systems' runs failed: {}",
        failed.len(),
        failed.join("; ")
    );
    Ok(())
}

async fn measure(
    mut running: Running,
    args: &Args,
    iperf3: &Path,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let kind = running.kind;
    let host_before = procs::host_ticks()?;
    let result = async {
        if let Some(d) = running.start_to_serving {
            samples.add(kind, Figure::StartToServing, d.as_secs_f64() * 1e3);
        }
        let agents = running.agent_pids();
        let sum = |pids: &[u32], of: fn(u32) -> anyhow::Result<f64>| {
            if pids.is_empty() {
                return Ok(None);
            }
            pids.iter()
                .map(|p| of(*p))
                .sum::<anyhow::Result<f64>>()
                .map(Some)
        };
        let rss = |pids: &[u32]| sum(pids, procs::rss_mb);
        let anon = |pids: &[u32]| sum(pids, procs::rss_anon_mb);
        tokio::time::sleep(IDLE_SETTLE).await;
        if let Some(v) = rss(&agents)? {
            samples.add(kind, Figure::RssIdle, v);
        }
        if let Some(v) = anon(&agents)? {
            samples.add(kind, Figure::AnonIdle, v);
        }
        let held = load::hold_idle(running.echo, IDLE_CONNECTIONS).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(v) = rss(&agents)? {
            samples.add(kind, Figure::Rss100, v);
        }
        drop(held);
        tokio::time::sleep(Duration::from_millis(300)).await;

        // CPU of the tunnel's processes (none for raw TCP) per round trip and per new
        // connection: what each costs, beside how long it takes.
        let pids = running.pids();
        let cpu_per = |since: f64, count: f64, figure: Figure, samples: &mut Samples| {
            if !pids.is_empty() && count > 0.0 {
                let used = procs::cpu_total(&pids)? - since;
                samples.add(kind, figure, used / count * 1e6);
            }
            anyhow::Ok(())
        };
        let cpu_before = procs::cpu_total(&pids)?;
        let mut rtt = load::round_trips(running.echo, args.round_trips).await?;
        let echoes = (args.round_trips + load::WARM_UP) as f64;
        cpu_per(cpu_before, echoes, Figure::CpuPerRoundTrip, samples)?;
        add_percentiles(samples, kind, &mut rtt, Figure::RttP50, Figure::RttP99);
        let (echo, n) = (running.echo, args.round_trips);
        let mut rtt =
            tokio::task::spawn_blocking(move || load::round_trips_blocking(echo, n)).await??;
        add_percentiles(
            samples,
            kind,
            &mut rtt,
            Figure::RttBlockingP50,
            Figure::RttBlockingP99,
        );

        let rate_for = Duration::from_secs(args.rate_secs);
        for (c, figure) in [(1, Figure::RateC1), (32, Figure::RateC32)] {
            let cpu_before = procs::cpu_total(&pids)?;
            let r = load::connection_rate(running.echo, c, rate_for).await;
            if c == 1 {
                cpu_per(cpu_before, r.completed as f64, Figure::CpuPerNewC1, samples)?;
            }
            samples.add(kind, figure, r.per_sec);
            if r.failed > 0 {
                eprintln!("  {} at c={c}: {} cycles failed", kind.label(), r.failed);
            }
            // Let closed connections' state (TIME_WAIT, streams winding down) settle.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        let cpu_before = procs::cpu_total(&pids)?;
        let up = load::iperf(iperf3, running.iperf, args.bulk_secs, false).await?;
        let down = load::iperf(iperf3, running.iperf, args.bulk_secs, true).await?;
        let cpu = procs::cpu_total(&pids)? - cpu_before;
        samples.add(kind, Figure::BulkUp, up.bits_per_sec / 1e9);
        samples.add(kind, Figure::BulkDown, down.bits_per_sec / 1e9);
        if !pids.is_empty() {
            samples.add(
                kind,
                Figure::CpuPerGib,
                cpu / ((up.bytes + down.bytes) / GIB),
            );
        }

        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(v) = rss(&agents)? {
            samples.add(kind, Figure::RssAfter, v);
        }
        if let Some(v) = anon(&agents)? {
            samples.add(kind, Figure::AnonAfter, v);
        }
        if let Some(v) = procs::steal_percent(host_before, procs::host_ticks()?) {
            samples.add(kind, Figure::Steal, v);
        }
        running.check_alive()
    }
    .await;
    running.stop();
    result
}

fn shell(program: &str, args: &[&str]) -> String {
    shell_path(Path::new(program), args)
}

fn shell_path(program: &Path, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            // rathole prints its name alone, then "Build Version: …"; the others one line.
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let first = text.lines().next().unwrap_or("").trim();
            match text
                .lines()
                .find_map(|l| l.trim().strip_prefix("Build Version:"))
            {
                Some(v) => format!("{first} {}", v.trim()),
                None => first.to_owned(),
            }
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
