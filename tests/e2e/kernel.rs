//! Kernel enforcement, for real (P6, P13, P16): the eBPF egress lock attached to a fresh child
//! cgroup, the unprivileged Landlock + seccomp layers as uid 65534, and `require = "kernel"`.
//!
//! These need root (cgroup and BPF). Without it they print `SKIPPED: …` — unless
//! `EWII_REQUIRE_PRIVILEGED=1` (set by `.ci/run`), which turns the skip into a failure.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ewii_common::audit::Event;
use ewii_tests::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `Some(reason)` when this process cannot run privileged tests.
pub(crate) fn lacking_privilege() -> Option<String> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid_root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    if !euid_root {
        return Some("not root".into());
    }
    if cgroup2_mount().is_none() {
        return Some("cgroup2 is not mounted".into());
    }
    None
}

/// Skips the test (or, with `EWII_REQUIRE_PRIVILEGED=1`, fails it) without the privileges.
macro_rules! privileged {
    () => {
        if let Some(why) = $crate::kernel::lacking_privilege() {
            assert!(
                !require("EWII_REQUIRE_PRIVILEGED"),
                "EWII_REQUIRE_PRIVILEGED=1 but this test cannot run: {why}"
            );
            println!("SKIPPED: {why}");
            return;
        }
    };
}
pub(crate) use privileged;

fn cgroup2_mount() -> Option<PathBuf> {
    ewii::enforce::ebpf::cgroup2_mount().ok()
}

/// A directory and config readable by uid 65534.
fn world_readable_config(allow: &str, hub: &str, extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("client.toml");
    fs::write(
        &path,
        format!(
            "hub = \"{hub}\"\nstate_dir = {:?}\n{extra}\n[[allow]]\nname = \"db\"\naddress = \"{allow}\"\n",
            dir.path().join("state")
        ),
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    (dir, path)
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p16_the_ebpf_lock_refuses_everything_outside_the_policy_with_eperm() {
    privileged!();
    let (allowed, _accepted) = counting_listener().await;
    let (_dir, config) = world_readable_config(&allowed.to_string(), "127.0.0.1:47443", "");
    let report = probe_ebpf_in_own_cgroup(&config).await;
    assert_eq!(report["layers"][0]["name"], "ebpf");
    assert_eq!(report["layers"][0]["active"], true, "{report:#}");
    let p = &report["probes"];
    for allowed in ["tcp_allowed", "tcp_allowed_v4_mapped", "udp_hub"] {
        assert_eq!(p[allowed], "allowed", "{allowed}: {p:#}");
    }
    for refused in [
        "tcp_other_port",
        "tcp_other_address",
        "tcp_v4_mapped_denied",
        "udp_other",
        "tcp_fast_open",
        "mptcp",
        "raw_icmp",
    ] {
        assert_eq!(p[refused], "blocked (EPERM)", "{refused}: {p:#}");
    }
    // Every refusal became an audit record, and the counters agree: the seven probes above
    // and the self-test's TCP connect and UDP send.
    let denied = report["kernel_denied"].as_array().unwrap();
    assert_eq!(denied.len(), 9, "{denied:#?}");
    assert!(denied
        .iter()
        .all(|r| r["event"] == "kernel_denied" && r["outcome"] == "refused"));
    let addrs: Vec<&str> = denied
        .iter()
        .map(|r| r["destination"]["address"].as_str().unwrap())
        .collect();
    assert!(
        addrs.contains(&format!("127.0.0.2:{}", allowed.port()).as_str()),
        "{addrs:?}"
    );
    assert!(
        addrs.contains(&"127.0.0.2:0"),
        "the raw ICMP packet: {addrs:?}"
    );
    let c = &report["counters"];
    let total: u64 = ["connect4", "connect6", "sendmsg4", "sendmsg6", "skb_egress"]
        .iter()
        .map(|h| c[h].as_u64().unwrap())
        .sum();
    assert_eq!(total, 9, "{c}");
    assert_eq!(
        c["connect6"], 1,
        "the v4-mapped spelling went through connect6"
    );
    assert_eq!(
        c["skb_egress"], 1,
        "the raw packet was caught by the backstop"
    );
    // Addresses only: the lock lets no resolver through, and the report names none.
    assert!(
        !not_covered(&report).iter().any(|g| g.starts_with("DNS ")),
        "{report:#}"
    );
    // The probe's lock is its own: it says so, and ends with it.
    assert!(
        report["layers"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("held by this process"),
        "{report:#}"
    );
}

/// A Hub written as a name puts the resolvers in the lock, and the report says what that lets
/// out: DNS from every process in the container, which a recursive resolver carries anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p16_the_lock_report_names_the_resolvers_it_lets_through_when_names_are_used() {
    privileged!();
    let (allowed, _accepted) = counting_listener().await;
    let (_dir, config) = world_readable_config(&allowed.to_string(), "localhost:47443", "");
    let report = probe_ebpf_in_own_cgroup(&config).await;
    assert_eq!(report["layers"][0]["active"], true, "{report:#}");
    let resolvers: Vec<String> = fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .map(|a| a.to_string())
        .collect();
    let dns: Vec<String> = not_covered(&report)
        .into_iter()
        .filter(|g| g.starts_with("DNS "))
        .collect();
    if resolvers.is_empty() {
        assert!(dns.is_empty(), "no resolver, none let through: {dns:?}");
    } else {
        assert_eq!(dns.len(), 1, "{report:#}");
        for r in &resolvers {
            assert!(dns[0].contains(r.as_str()), "{r} named: {dns:?}");
        }
        assert!(dns[0].contains("DNS tunnelling"), "{dns:?}");
    }
}

/// `probe-enforcement --layers ebpf` with `config`, run in a cgroup of its own; its report.
async fn probe_ebpf_in_own_cgroup(config: &Path) -> Value {
    let cg = Cgroup::new();
    let cfg = config.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        cg.client(&["probe-enforcement", "--config", &cfg, "--layers", "ebpf"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    json(&out)
}

/// The report's `not_covered` gaps.
fn not_covered(report: &Value) -> Vec<String> {
    report["not_covered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap().to_owned())
        .collect()
}

/// `probe-enforcement` installs the layers the configuration names (`[enforcement] layers`), as
/// `run` would, unless `--layers` names others; a layer name it does not know is refused, where
/// it used to be passed over (a misspelt `ebpf` probed nothing of it and said nothing). The
/// layers named need no privilege and no optional kernel feature (seccomp, privileges).
#[test]
fn p3_probe_enforcement_installs_the_configured_layers_and_refuses_an_unknown_one() {
    let (_dir, config) = world_readable_config(
        "127.0.0.1:9",
        "127.0.0.1:47443",
        "[enforcement]\nlayers = [\"seccomp\"]",
    );
    let probe = |args: &[&str]| {
        Command::new(bin_path("ewii-client"))
            .args(["probe-enforcement", "--config", config.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    let installed = |out: Output| -> Vec<String> {
        json(&out)["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(installed(probe(&[])), ["seccomp"]);
    assert_eq!(
        installed(probe(&["--layers", "seccomp,privileges"])),
        ["privileges", "seccomp"]
    );
    let out = probe(&["--layers", "ebfp"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("invalid value 'ebfp' for '--layers"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2_p3_p13_p6_the_unprivileged_layers_hold_as_uid_65534() {
    privileged!();
    let (allowed, _accepted) = counting_listener().await;
    let (_dir, config) = world_readable_config(&allowed.to_string(), "127.0.0.1:47443", "");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin_path("ewii-client"))
        .args(["probe-enforcement", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let report = json(&out);
    let layers = report["layers"].as_array().unwrap();
    let layer = |n: &str| layers.iter().find(|l| l["name"] == n).unwrap().clone();
    assert_eq!(layer("ebpf")["active"], false, "no CAP_BPF as uid 65534");
    assert_eq!(layer("landlock")["active"], true, "{report:#}");
    assert_eq!(layer("seccomp")["active"], true, "{report:#}");
    let p = &report["probes"];
    assert_eq!(p["listen"], "blocked (EPERM)");
    assert_eq!(p["io_uring_setup"], "blocked (EPERM)");
    assert_eq!(p["mptcp"], "blocked (EPERM)");
    assert_eq!(p["tcp_fast_open"], "blocked (EPERM)");
    // Aimed at the allowed destination: refused for what they are, not where they go.
    assert_eq!(p["tcp_fast_open_allowed"], "blocked (EPERM)", "{p:#}");
    assert_eq!(p["mptcp_allowed"], "blocked (EPERM)", "{p:#}");
    // accept4 on a non-listening socket would be EINVAL from the kernel: EPERM is seccomp.
    assert_eq!(p["accept"], "blocked (EPERM)", "{p:#}");
    assert_eq!(
        p["tcp_bind"], "blocked (EACCES)",
        "Landlock: no TCP bind: {p:#}"
    );
    assert_eq!(
        p["tcp_other_port"], "blocked (EACCES)",
        "Landlock: only allow-listed ports"
    );
    assert_eq!(p["tcp_allowed"], "allowed", "allowed traffic still flows");
    // Without the lock, the report says what is left to the Client's own code.
    let gaps: Vec<&str> = report["not_covered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    assert!(
        gaps.iter()
            .any(|g| g.starts_with("UDP from this process to any address")),
        "{gaps:?}"
    );
    assert!(
        gaps.iter()
            .any(|g| g.starts_with("TCP from this process to any address on an allow-listed port")),
        "{gaps:?}"
    );
    assert!(
        gaps.iter()
            .any(|g| g.starts_with("other processes in the container")),
        "{gaps:?}"
    );
}

/// `probe-enforcement --layers ebpf`'s report, checked to say the eBPF layer is not active.
fn inactive_ebpf_report(out: &Output) -> Value {
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let ebpf = &report["layers"][0];
    assert_eq!(ebpf["name"], "ebpf");
    assert_eq!(ebpf["active"], false, "{report:#}");
    report
}

/// The lock stays on its cgroup after the Client exits, and confines every process in it: run
/// from a login shell (its session's cgroup), it would lock that session's network until it
/// ends. So the lock refuses a cgroup the Client shares with another program, names what it
/// found there, and the process beside it stays free; `run` with `require = "kernel"` does
/// not start. (Only the Client, its namespace's init and other runs of `ewii-client` may share
/// it.)
#[test]
fn p16_the_lock_refuses_a_cgroup_the_client_shares_with_other_processes() {
    privileged!();
    let (_dir, config) = world_readable_config("127.0.0.1:5432", "127.0.0.1:47443", "");
    let cg = Cgroup::new();
    let mut neighbour = cg
        .command(Path::new("/bin/sleep"), &["30"])
        .spawn()
        .unwrap();
    let neighbour_pid = neighbour.id();
    // In the cgroup, and `sleep` by then (its `sh` joins, then execs).
    let settled = || {
        fs::read_to_string(cg.0.join("cgroup.procs"))
            .is_ok_and(|p| p.lines().any(|l| l.trim() == neighbour_pid.to_string()))
            && fs::read_to_string(format!("/proc/{neighbour_pid}/comm"))
                .is_ok_and(|c| c.trim() == "sleep")
    };
    for _ in 0..500 {
        if settled() {
            break;
        }
        std::thread::sleep(POLL);
    }
    assert!(settled(), "the neighbour never settled");
    let out = cg
        .client(&[
            "probe-enforcement",
            "--config",
            config.to_str().unwrap(),
            "--layers",
            "ebpf",
        ])
        .output()
        .unwrap();
    let _ = neighbour.kill();
    let _ = neighbour.wait();
    let report = inactive_ebpf_report(&out);
    let ebpf = &report["layers"][0];
    let detail = ebpf["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!(
            "holds other processes too (pid {neighbour_pid} \"sleep\")"
        )),
        "{report:#}"
    );
    assert!(detail.contains("a cgroup of its own"), "{detail}");
    assert_eq!(out.status.code(), Some(4), "the required layer is missing");
}

/// DESIGN §9: attaching to the host's root cgroup would filter the whole machine, so the lock
/// refuses it. Run in a private mount namespace with an empty /sys/fs/bpf: should the refusal
/// ever break, nothing is pinned and the lock ends with the probe.
#[test]
fn p16_the_lock_refuses_to_attach_to_the_host_root_cgroup() {
    privileged!();
    let (_dir, config) = world_readable_config("127.0.0.1:5432", "127.0.0.1:47443", "");
    let mnt = cgroup2_mount().unwrap();
    let cg = Cgroup::new();
    let script = format!(
        r#"mount -t tmpfs none /sys/fs/bpf || exit 90
echo $$ > "{root}/cgroup.procs" || exit 92
exec "{bin}" probe-enforcement --config "{cfg}" --layers ebpf"#,
        root = mnt.display(),
        bin = cg.client_binary().display(),
        cfg = config.display(),
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let report = inactive_ebpf_report(&out);
    let ebpf = &report["layers"][0];
    assert!(
        ebpf["detail"]
            .as_str()
            .unwrap()
            .contains("is the root cgroup"),
        "{report:#}"
    );
    assert_eq!(
        out.status.code(),
        Some(4),
        "the required layer is missing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn p16_require_kernel_refuses_to_start_without_the_lock() {
    privileged!();
    let (_dir, config) = world_readable_config(
        "127.0.0.1:5432",
        "127.0.0.1:47443",
        "[enforcement]\nrequire = \"kernel\"\n",
    );
    // As uid 65534 there is no CAP_BPF: the eBPF lock cannot load. A first start with a token
    // (an unenrolled one without would stop at that): refused before it enrols, too.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin_path("ewii-client"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("EWII_TOKEN", format!("ewii_{}", "00".repeat(32)))
        .env("EWII_BUNDLE_HASH", format!("sha256:{}", "00".repeat(32)))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[enforcement] require = \"kernel\" is not met"),
        "{err}"
    );
    assert!(err.contains("ebpf:"), "the reason names the layer: {err}");
}

/// The library's `client::run` installs no kernel layer: with the default `require = "any"`
/// (and with `"kernel"`) it refuses before it dials, with the reason and a `failed`
/// enforcement record, rather than serving on the Dialer alone. Needs no privilege.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p16_the_library_client_refuses_a_requirement_it_cannot_meet() {
    use ewii::client::ClientError;
    use ewii::config::Require;
    use ewii_common::audit::Outcome;
    let hub = TestHub::start(&[]).await;
    let mut client = TestClient::enrol(&hub, "acme", &[("db", "127.0.0.1:9".into())]).await;
    for require in [Require::Any, Require::Kernel] {
        client.config.require = require;
        let err = client.run_once(SOON).await.unwrap_err();
        assert!(matches!(err, ClientError::Enforcement(_)), "{err:?}");
        let said = err.to_string();
        assert!(
            said.contains(&format!("[enforcement] require = \"{require}\" is not met")),
            "{said}"
        );
        assert!(
            said.contains("no kernel layer: a Client run as a library installs none"),
            "the reason says why: {said}"
        );
        let record = client
            .wait_audit("enforcement", |r| {
                r.event == Event::Enforcement
                    && r.reason
                        .as_deref()
                        .is_some_and(|w| w.starts_with(&format!("require = \"{require}\"")))
            })
            .await;
        assert_eq!(record.outcome, Some(Outcome::Failed), "{record:?}");
    }
    // Nothing reached the Hub: refused before the dial.
    assert!(
        !hub.audit
            .records()
            .iter()
            .any(|r| r.event == Event::SessionUp),
        "a session came up"
    );
    // What the library can honestly run: the Dialer alone, said so.
    client.config.require = Require::None;
    client.start();
    hub.wait_connected("acme").await;
    client.stop().await;
}

/// The Client binary run with `require = "kernel"` in a fresh child cgroup (the eBPF lock held
/// by it), auditing to a file, its one allow-list entry `db` at `echo`; connected.
struct LockedClient {
    audit_file: PathBuf,
    cg: Cgroup,
    /// Killed on drop unless taken (a failed test leaves no Client behind).
    proc: Option<std::process::Child>,
    log: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Drop for LockedClient {
    fn drop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            let _ = proc.kill();
            let _ = proc.wait();
        }
    }
}

impl LockedClient {
    async fn start(hub: &TestHub, client: &TestClient, echo: std::net::SocketAddr) -> Self {
        let audit_file = client.dir.path().join("audit.jsonl");
        let config = client.dir.path().join("client.toml");
        fs::write(
            &config,
            format!(
                "hub = \"{}\"\nstate_dir = {:?}\naudit = \"file:{}\"\n[enforcement]\nrequire = \"kernel\"\n[[allow]]\nname = \"db\"\naddress = \"{echo}\"\n",
                hub.addr,
                client.state_dir(),
                audit_file.display()
            ),
        )
        .unwrap();
        let cg = Cgroup::new();
        let mut proc = cg
            .client(&["run", "--config", config.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = proc.stderr.take().unwrap();
        let log = std::thread::spawn(move || {
            BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        let locked = Self {
            audit_file,
            cg,
            proc: Some(proc),
            log: Some(log),
        };
        hub.wait_connected("acme").await;
        locked
    }

    fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, std::process::Child::id)
    }

    /// Sends `signal` (`-TERM`, `-STOP`, `-CONT`) to the Client.
    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Stops the Client (SIGTERM) and waits for it: its exit code and what it said.
    async fn stop(&mut self) -> (Option<i32>, String) {
        self.signal("-TERM");
        let mut proc = self.proc.take().unwrap();
        let code = tokio::task::spawn_blocking(move || proc.wait().unwrap())
            .await
            .unwrap();
        let log = self.log.take().unwrap().join().unwrap().join("\n");
        (code.code(), log)
    }

    /// The audit file's records so far.
    fn records(&self) -> Vec<Value> {
        fs::read_to_string(&self.audit_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Its `kernel_denied` records for `dest`.
    fn denied_to(&self, dest: &str) -> usize {
        self.records()
            .iter()
            .filter(|r| r["event"] == "kernel_denied" && r["destination"]["address"] == dest)
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p16_a_locked_client_serves_queries_while_the_kernel_refuses_a_rogue_connect() {
    privileged!();
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    let mut locked = LockedClient::start(&hub, &client, echo).await;
    let (audit_file, cg) = (locked.audit_file.clone(), &locked.cg);

    // The Client serves queries through the lock.
    let mut s = TcpStream::connect(hub.service("pg")).await.unwrap();
    s.write_all(b"through the lock").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"through the lock");

    // A second program in the Client's container cgroup tries another connection.
    let rogue_port = 47999;
    let rogue = cg
        .command(
            Path::new("/bin/bash"),
            &["-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{rogue_port}")],
        )
        .output()
        .unwrap();
    assert!(!rogue.status.success());
    assert!(
        String::from_utf8_lossy(&rogue.stderr).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&rogue.stderr)
    );
    let rogue_dest = format!("127.0.0.1:{rogue_port}");
    poll_until("the rogue connect in the Client's audit", SOON, || {
        fs::read_to_string(&audit_file).is_ok_and(|t| t.contains(&rogue_dest))
    })
    .await;

    let status = ewii::client::status::Status::read(&client.state_dir()).unwrap();
    assert!(
        status.enforcement.active("ebpf"),
        "{:?}",
        status.enforcement
    );

    let (code, log) = locked.stop().await;
    assert_eq!(code, Some(0));
    assert!(log.contains("ebpf active"), "{log}");

    let records: Vec<Value> = fs::read_to_string(&audit_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let enforcement = records
        .iter()
        .find(|r| r["event"] == "enforcement")
        .unwrap();
    assert!(enforcement["reason"]
        .as_str()
        .unwrap()
        .contains("ebpf active"));
    // The self-test's own refused connect (same process) and the rogue's (same cgroup).
    let denied: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "kernel_denied")
        .collect();
    assert!(denied.len() >= 3, "{denied:#?}");
    assert!(denied
        .iter()
        .any(|r| r["destination"]["address"] == rogue_dest.as_str()));
    assert!(records
        .iter()
        .any(|r| r["event"] == "query" && r["outcome"] == "ok"));
    let hub_query = hub.wait_audit("hub query", is(Event::Query)).await;
    assert_eq!(hub_query.bytes_up, Some(16));
    drop(locked);
}

/// A burst of refusals beyond what the kernel's ring buffer holds between two reads (a rogue
/// in the Client's cgroup sending 20,000 datagrams to a refused address while the Client is
/// paused, so that it reads nothing meanwhile, on any machine): those the kernel had no room to
/// report are not silently gone. The Client reads the kernel's count of them at every read of
/// the buffer (and an event carries it too) and writes each gap as one `kernel_denied`
/// record, also when no refusal follows it (none does here). Every refusal is accounted for:
/// reported one by one, or counted; the metric and the status count them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p16_refusals_beyond_the_kernels_ring_buffer_are_counted_in_the_audit() {
    privileged!();
    let echo = echo_server().await;
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    let locked = LockedClient::start(&hub, &client, echo).await;
    const FLOOD: usize = 20_000;
    // Paused: the ring buffer (about 5,400 events) is not read during the flood.
    locked.signal("-STOP");
    let mut flood = locked.cg.command(
        Path::new("python3"),
        &[
            "-c",
            &format!(
                "import socket\n\
                     s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                     refused = 0\n\
                     for _ in range({FLOOD}):\n\
                     \ttry:\n\
                     \t\ts.sendto(b'x', ('127.0.0.1', 47997))\n\
                     \texcept PermissionError:\n\
                     \t\trefused += 1\n\
                     print(refused)\n"
            ),
        ],
    );
    // (Off the test's workers: the Hub runs on them.)
    let flood = tokio::task::spawn_blocking(move || flood.output().unwrap())
        .await
        .unwrap();
    locked.signal("-CONT");
    assert!(flood.status.success(), "{flood:?}");
    assert_eq!(
        String::from_utf8_lossy(&flood.stdout).trim(),
        FLOOD.to_string(),
        "every datagram refused"
    );
    // No refusal follows the flood: the count of the lost ones comes all the same, at the
    // Client's first read of the buffer after the pause (after the events it read).
    let lost_counted = || -> u64 {
        locked
            .records()
            .iter()
            .filter(|r| r["event"] == "kernel_denied" && r["destination"].is_null())
            .map(|r| {
                let reason = r["reason"].as_str().unwrap();
                assert!(
                    reason.contains("not reported one by one: the kernel's 256 KiB ring buffer"),
                    "{reason}"
                );
                reason.split(' ').next().unwrap().parse::<u64>().unwrap()
            })
            .sum()
    };
    poll_until("every refusal reported or counted", SOON, || {
        locked.denied_to("127.0.0.1:47997") as u64 + lost_counted() == FLOOD as u64
    })
    .await;
    let lost = lost_counted();
    assert!(lost > 0, "the burst did not overflow the ring buffer");
    // The status counts them too (`unreported`, beside the hooks' counts); it is written as
    // the Client goes on.
    poll_until("the status's count of unreported refusals", SOON, || {
        ewii::client::status::Status::read(&client.state_dir()).is_ok_and(|s| {
            s.kernel_denied
                .iter()
                .any(|(what, n)| what == "unreported" && *n == lost)
        })
    })
    .await;
    drop(locked);
}

/// P6/P16 against hostile code inside the Client process. A harness runs the Client's own
/// start-up (every layer, the lock held by the cgroup) as uid 65532 with only CAP_BPF and
/// CAP_NET_ADMIN, as the `client-ebpf` container does, then plays a compromised dependency on
/// another thread: it tries to detach the programs, to write an allow entry through every
/// descriptor it holds, to make the kernel maps' read-only mappings writable, to raise its
/// capabilities again, to ptrace, to write process memory, to steal descriptors, to exec, to make a user namespace, raw/packet/netlink-diag sockets,
/// the x32 ABI; then it closes every descriptor and tries the lock itself. Everything is
/// refused; the allowed destination still works; and after the process is gone another
/// program in the same cgroup is still refused (the lock is the cgroup's, not the process's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p6_p16_hostile_code_inside_the_client_cannot_lift_widen_or_outlive_around_the_lock() {
    privileged!();
    let (allowed, accepted) = counting_listener().await;
    let (_dir, config) = world_readable_config(&allowed.to_string(), "127.0.0.1:47443", "");
    let cg = Cgroup::new();
    let harness = PathBuf::from(env!("CARGO_BIN_EXE_ewii-hostile-client"));
    let cfg = config.to_str().unwrap().to_owned();
    let mut cmd = cg.command(
        Path::new("setpriv"),
        &[
            "--reuid=65532",
            "--regid=65532",
            "--clear-groups",
            "--inh-caps=-all,+bpf,+net_admin",
            "--ambient-caps=-all,+bpf,+net_admin",
            "--bounding-set=-all,+bpf,+net_admin",
            harness.to_str().unwrap(),
            "--config",
            &cfg,
        ],
    );
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let report = json(&out);
    let layers = report["layers"].as_array().unwrap();
    let state = |n: &str| layers.iter().find(|l| l["name"] == n).unwrap()["state"].clone();
    for layer in ["ebpf", "landlock", "privileges", "seccomp"] {
        assert_eq!(state(layer), "active", "{layer}: {report:#}");
    }
    let attacks = report["attacks"].as_object().unwrap();
    for (attack, answer) in attacks {
        let expected = match attack.as_str() {
            "tcp_allowed" => "allowed",
            "capabilities_left" => {
                "permitted 0x0 effective 0x0 inheritable 0x0 ambient 0x0 no_new_privs true"
            }
            // The kernel's own answer: a read-only mapping of a bpf map stays read-only.
            "mprotect_bpf_maps_writable" => "blocked (EACCES)",
            _ => "blocked (EPERM)",
        };
        assert_eq!(answer, expected, "{attack}: {report:#}");
    }
    assert_eq!(attacks.len(), 23, "every attack ran: {report:#}");
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the allowed connect arrived"
    );
    // The harness is gone; the lock is not.
    let rogue = cg
        .command(
            Path::new("/bin/bash"),
            &["-c", "exec 3<>/dev/tcp/127.0.0.1/47998"],
        )
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rogue.stderr).contains("Operation not permitted"),
        "after the Client process: {}",
        String::from_utf8_lossy(&rogue.stderr)
    );
    drop(cg);
}
