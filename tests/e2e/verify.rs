//! `ewii-client verify` against real running Clients (issue: the customer's evidence): an
//! unprivileged Client holds every promise it can show, and real breakages — a Client run as
//! root with its capabilities, an allow-list file changed under a running Client, a stopped
//! Client — each break their promise and the exit status. The metrics a Client publishes
//! without a listener (status.json and the Prometheus textfile) count the query it served.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use ewii_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{healthy, not_root, run, HubProcess, Proc};

/// The uid the image runs as.
const NOBODY: u32 = 65532;

pub(crate) fn verify(state_dir: &Path, extra: &[&str]) -> (Output, serde_json::Value) {
    let out = Command::new(bin_path("ewii-client"))
        .args([
            "verify",
            "--json",
            "--state-dir",
            state_dir.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, json)
}

pub(crate) fn verdict<'a>(report: &'a serde_json::Value, id: &str) -> &'a str {
    report["promises"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .and_then(|p| p["verdict"].as_str())
        .unwrap_or_else(|| panic!("no {id} in {report:#}"))
}

fn chown(path: &Path, uid: u32) {
    let ok = Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}"), path.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn client_toml(path: &Path, hub: &str, dir: &Path, echo: SocketAddr, extra: &str) {
    fs::write(
        path,
        format!(
            "hub = \"{hub}\"\nstate_dir = {dir:?}\n{extra}\n[[allow]]\nname = \"db\"\naddress = \"{echo}\"\n[enforcement]\nlayers = [\"landlock\", \"privileges\", \"seccomp\"]\n"
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2_p3_p4_p13_p14_verify_reports_what_holds_for_a_running_client_and_what_breaks_it() {
    if not_root() {
        eprintln!("skipped: needs root to run the Client as uid {NOBODY}");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    // The Client's user reads its config file in here.
    fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let echo = echo_server().await;
    let (mut hub, ports) = HubProcess::start_with_ports(root.path(), "discard", 1, |p| {
        format!("metrics_listen = \"127.0.0.1:{}\"", p[0])
    });
    let metrics = ports[0];
    let hub_addr = hub.addr.clone();

    // The customer's Client as the image runs it: uid 65532, the unprivileged layers, a
    // metrics textfile for node-exporter.
    let acme = root.path().join("acme");
    hub.enrol("acme", &acme);
    let textfile_dir = root.path().join("textfile");
    fs::create_dir(&textfile_dir).unwrap();
    chown(&acme, NOBODY);
    chown(&textfile_dir, NOBODY);
    let textfile = textfile_dir.join("ewii.prom");
    let acme_toml = root.path().join("acme.toml");
    client_toml(
        &acme_toml,
        &hub_addr,
        &acme,
        echo,
        &format!("metrics_file = {textfile:?}"),
    );
    let mut client = Proc(
        Command::new(bin_path("ewii-client"))
            .args(["run", "--config", acme_toml.to_str().unwrap()])
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    healthy(&acme).await;

    // A query, kept open while verify looks at the sockets.
    let mut s = tokio::net::TcpStream::connect(hub.service).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();

    let acme_toml_s = acme_toml.to_str().unwrap();
    let (out, report) = verify(&acme, &["--config", acme_toml_s]);
    assert!(out.status.success(), "{report:#}");
    assert_eq!(report["holds"], true);
    for id in [
        "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P10", "P11", "P12", "P13", "P14", "P15",
    ] {
        assert_eq!(verdict(&report, id), "holds", "{id}: {report:#}");
    }
    assert_eq!(verdict(&report, "P16"), "off", "no eBPF layer asked for");
    assert_eq!(verdict(&report, "P1"), "elsewhere");
    // Root reads the descriptors of the non-dumpable Client: exact attribution, and the
    // open query is the one TCP connection, to the allow-listed echo server.
    let sockets = &report["client"]["sockets"];
    assert_eq!(sockets["attribution"], "descriptors", "{sockets:#}");
    let tcp: Vec<&serde_json::Value> = sockets["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["proto"] == "tcp")
        .collect();
    assert_eq!(tcp.len(), 1, "{sockets:#}");
    assert_eq!(tcp[0]["remote"], echo.to_string());
    // The QUIC socket is connected to the Hub: nothing else reaches it (P13).
    let udp: Vec<&serde_json::Value> = sockets["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["proto"] == "udp")
        .collect();
    assert_eq!(udp.len(), 1, "{sockets:#}");
    assert_eq!(udp[0]["remote"], hub_addr.as_str(), "{sockets:#}");
    assert_eq!(report["client"]["credentials"]["uids"][1], NOBODY);
    assert_eq!(report["client"]["credentials"]["seccomp"], 2);

    // The text form reads as evidence, one promise a line.
    let text = Command::new(bin_path("ewii-client"))
        .args(["verify", "--state-dir", acme.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains("P13  HOLDS     no inbound listener"),
        "{text}"
    );
    assert!(text.contains("uid 65532/65532/65532/65532"), "{text}");
    assert!(text.contains(" 0 broken,"), "{text}");

    // As the Client's own user (no access to its descriptors: it is not dumpable), the
    // sockets are attributed by owner in its network namespace.
    let as_nobody = Command::new(bin_path("ewii-client"))
        .args(["verify", "--json", "--state-dir", acme.to_str().unwrap()])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let as_nobody: serde_json::Value = serde_json::from_slice(&as_nobody.stdout).unwrap();
    assert!(
        as_nobody["client"]["sockets"]["attribution"]["owner_in_namespace"]["why"]
            .as_str()
            .unwrap()
            .contains("Permission denied"),
        "{as_nobody:#}"
    );
    assert_eq!(verdict(&as_nobody, "P2"), "holds");
    drop(s);

    // Metrics without a listener: the query is counted in status.json and the textfile
    // (counters alone are written at the next heartbeat, within 10 s).
    poll_until(
        "the query to be counted in the textfile",
        SOON + SOON,
        || {
            fs::read_to_string(&textfile)
                .is_ok_and(|t| t.contains("ewii_client_queries_total{outcome=\"ok\"} 1\n"))
        },
    )
    .await;
    let prom = fs::read_to_string(&textfile).unwrap();
    assert!(prom.contains("ewii_client_connected 1\n"), "{prom}");
    assert!(
        prom.contains("ewii_client_query_bytes_total{direction=\"up\"} 4\n"),
        "{prom}"
    );
    assert!(
        prom.contains("ewii_client_enforcement_active{layer=\"seccomp\"} 1\n"),
        "{prom}"
    );
    let status = run(
        "ewii-client",
        &["status", "--state-dir", acme.to_str().unwrap()],
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["metrics"]["queries"]["ok"], 1, "{status:#}");
    assert_eq!(status["metrics"]["bytes_down"], 4, "{status:#}");
    assert_eq!(status["metrics"]["sessions_up"], 1, "{status:#}");

    // The Hub serves the same counters on /metrics (the Hub may listen), read with curl.
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let scrape = Command::new("curl").args(["-fsS", &url]).output().unwrap();
    assert!(scrape.status.success(), "{scrape:?}");
    let scrape = String::from_utf8_lossy(&scrape.stdout).into_owned();
    for line in [
        "ewii_hub_clients_connected 1\n",
        // The query ended (and was recorded) before the scrape.
        "ewii_hub_queries_open 0\n",
        "ewii_hub_queries_total{outcome=\"ok\"} 1\n",
        "ewii_hub_query_bytes_total{direction=\"down\"} 4\n",
        "ewii_hub_enrolments_total{outcome=\"ok\"} 1\n",
        "ewii_hub_connections_refused_total{reason=\"address_bound\"} 0\n",
    ] {
        assert!(scrape.contains(line), "{line:?} not in {scrape}");
    }
    // Its one connection, counted on one of the shards.
    let on_shards: u64 = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("ewii_hub_shard_connections{shard=\""))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    assert_eq!(on_shards, 1, "{scrape}");
    // The QUIC endpoints hold it too (and, for a moment, the enrolment's closed connection).
    let held: u64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("ewii_hub_quic_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ewii_hub_quic_connections in {scrape}"));
    assert!((1..=2).contains(&held), "{scrape}");
    for (args, code) in [
        (vec![url.replace("/metrics", "/")], "404"),
        (vec!["-X".into(), "POST".into(), url.clone()], "405"),
    ] {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), code, "{args:?}");
    }

    // Broken on purpose (real): the allow-list file changed under the running Client.
    let changed = root.path().join("changed.toml");
    client_toml(
        &changed,
        &hub_addr,
        &acme,
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    let (out, report) = verify(&acme, &["--config", changed.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(verdict(&report, "P4"), "broken");
    assert_eq!(report["holds"], false);

    // Broken on purpose (real): a Client run as root, keeping its capabilities.
    let beta = root.path().join("beta");
    hub.enrol("beta", &beta);
    let beta_toml = root.path().join("beta.toml");
    client_toml(&beta_toml, &hub_addr, &beta, echo, "");
    let beta_text = fs::read_to_string(&beta_toml)
        .unwrap()
        .replace("\"landlock\", \"privileges\", \"seccomp\"", "\"seccomp\"");
    fs::write(&beta_toml, beta_text).unwrap();
    let mut beta_client = Proc(
        Command::new(bin_path("ewii-client"))
            .args(["run", "--config", beta_toml.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    healthy(&beta).await;
    let (out, report) = verify(&beta, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(verdict(&report, "P2"), "broken", "{report:#}");
    assert_eq!(verdict(&report, "P3"), "broken", "{report:#}");
    assert_eq!(verdict(&report, "P13"), "holds");
    assert_eq!(beta_client.terminate().code(), Some(0));

    // A configuration file that cannot be read: the report, then the usage error (2), as
    // `run` would exit.
    let missing = root.path().join("no-such-client.toml");
    let (out, report) = verify(&acme, &["--config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(verdict(&report, "P4"), "broken", "{report:#}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("{}: ", missing.display())));

    // Broken on purpose (real): the Client stopped.
    assert_eq!(client.terminate().code(), Some(0));
    let (out, report) = verify(&acme, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(verdict(&report, "P14"), "broken", "{report:#}");

    // No Client ever ran here: a clear error, not a report.
    let empty = root.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let out = Command::new(bin_path("ewii-client"))
        .args(["verify", "--state-dir", empty.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no status.json"));
    assert_eq!(hub.proc.terminate().code(), Some(0));
}
