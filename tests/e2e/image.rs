//! The images that are shipped are the images that are tested (P1, P2, P3, P16): the
//! Dockerfile's own targets `hub`, `client` and `client-ebpf`, built offline from the static
//! binaries `scripts/test` prepares (`EWII_IMAGE_DIST`), run the way docs/deploy.md says —
//! uid 65532, every capability dropped (the eBPF Client gets back BPF and NET_ADMIN only),
//! a read-only root, `no-new-privileges`, each in its own network namespace on podman's
//! bridge, one writable volume for state.
//!
//! Needs root and podman; `EWII_REQUIRE_IMAGE=1` (set by `.ci/run`) turns a skip into a
//! failure.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ewii_tests::*;

/// `podman` with this test's configuration (DESIGN §9: runc, rlimits root cannot raise).
struct Podman {
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Podman {
    /// `None` (and a SKIPPED line) when podman or the static binaries are missing.
    fn new() -> Option<(Self, PathBuf)> {
        let dist = std::env::var("EWII_IMAGE_DIST")
            .ok()
            .map(PathBuf::from)
            .filter(|d| {
                ["ewii-client", "ewii-client-ebpf", "ewii-hub"]
                    .iter()
                    .all(|f| d.join(f).exists())
            });
        let podman = Command::new("podman")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout == b"0\n");
        let (Some(dist), true, true) = (dist, podman, root) else {
            assert!(
                !require("EWII_REQUIRE_IMAGE"),
                "EWII_REQUIRE_IMAGE=1 but EWII_IMAGE_DIST (ewii-client, ewii-client-ebpf, \
                 ewii-hub), podman or root is missing"
            );
            println!("SKIPPED: needs root, podman and EWII_IMAGE_DIST (run scripts/test)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("containers.conf");
        fs::write(
            &conf,
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\n[engine]\nruntime = \"runc\"\n",
        )
        .unwrap();
        Some((Self { conf, _dir: dir }, dist))
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("podman")
            .env("CONTAINERS_CONF", &self.conf)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs and requires exit 0; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Names removed (containers, images) when the test ends, however it ends.
struct Cleanup<'a>(&'a Podman, Vec<(&'static str, String)>);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for (kind, name) in self.1.iter().rev() {
            let _ = self.0.run(&[kind, "-f", name]);
        }
    }
}

/// How the customer page says the Client runs, and how the Hub image runs: own network
/// namespace, uid 65532, no capability, read-only root, no privilege gain.
const HARDENED: [&str; 10] = [
    "--network",
    "bridge",
    "--user",
    "65532:65532",
    "--cap-drop=ALL",
    "--read-only",
    "--security-opt",
    "no-new-privileges",
    "--log-driver",
    "k8s-file",
];

/// A state directory on the host, owned by the image's user: the one writable volume.
fn volume(dir: &Path, name: &str, mount: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    fs::create_dir(&path).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
    assert!(Command::new("chown")
        .args(["65532:65532"])
        .arg(&path)
        .status()
        .unwrap()
        .success());
    let spec = format!("{}:{mount}", path.display());
    (path, spec)
}

/// A read-only file mounted into a container.
fn file(dir: &Path, name: &str, text: &str, mount: &str) -> String {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    format!("{}:{mount}:ro", path.display())
}

fn label<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label} in {out}"))
        .trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p1_p2_p3_the_dockerfile_targets_run_hardened_in_their_own_network_namespaces() {
    let Some((podman, dist)) = Podman::new() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let id = std::process::id();
    let mut cleanup = Cleanup(&podman, Vec::new());
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let ctx = format!("builder={}", dist.display());

    // The three targets of the one Dockerfile: each ≤ 20 MB, uid 65532.
    let mut tags = std::collections::HashMap::new();
    for target in ["hub", "client-ebpf", "client"] {
        let tag = format!("localhost/ewii-{target}-test:{id}");
        podman.ok(&[
            "build",
            "--build-context",
            &ctx,
            "--build-arg",
            "RUNTIME_BASE=scratch",
            "--format",
            "docker",
            "--target",
            target,
            "-t",
            &tag,
            root,
        ]);
        cleanup.1.push(("rmi", tag.clone()));
        let inspect = podman.ok(&[
            "image",
            "inspect",
            "--format",
            "{{.Size}} {{.Config.User}}",
            &tag,
        ]);
        let (size, user) = inspect.split_once(' ').unwrap();
        let size: u64 = size.parse().unwrap();
        assert!(size <= 20 * 1000 * 1000, "{target} is {size} bytes");
        assert_eq!(user, "65532:65532", "{target}");
        println!("image {target}: {size} bytes");
        tags.insert(target, tag);
    }

    // The Hub, in its own container: init into its volume, then run with a service listener.
    let (_, hub_vol) = volume(dir, "hub-state", "/var/lib/ewii-hub");
    let hub_conf = file(
        dir,
        "hub.toml",
        "state_dir = \"/var/lib/ewii-hub\"\nlisten = \"0.0.0.0:443\"\n\
         [[service]]\nname = \"db\"\nlisten = \"0.0.0.0:15432\"\nclient = \"acme\"\n\
         destination = \"db\"\nprincipal = \"image-test\"\n\
         [[service]]\nname = \"db-locked\"\nlisten = \"0.0.0.0:15433\"\nclient = \"locked\"\n\
         destination = \"db\"\nprincipal = \"image-test\"\n",
        "/etc/ewii/hub.toml",
    );
    let hub_cli = |args: &[&str]| {
        let mut argv = vec!["run", "--rm"];
        argv.extend(HARDENED);
        argv.extend(["-v", &hub_vol, &tags["hub"]]);
        argv.extend(args);
        podman.ok(&argv)
    };
    hub_cli(&["init", "--trust-domain", "example.org"]);
    let hub_name = format!("ewii-hub-test-{id}");
    let mut argv = vec!["run", "-d", "--name", &hub_name];
    argv.extend(HARDENED);
    // Binding UDP/443 as uid 65532 without a capability: a sysctl of the Hub's own netns.
    argv.extend([
        "--sysctl",
        "net.ipv4.ip_unprivileged_port_start=443",
        "-v",
        &hub_vol,
        "-v",
        &hub_conf,
        &tags["hub"],
    ]);
    podman.ok(&argv);
    cleanup.1.push(("rm", hub_name.clone()));
    let hub_ip = podman.ok(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.IPAddress}}",
        &hub_name,
    ]);
    assert!(
        !hub_ip.is_empty() && !hub_ip.starts_with("127."),
        "{hub_ip}"
    );
    let gateway: std::net::IpAddr = podman
        .ok(&[
            "network",
            "inspect",
            "podman",
            "--format",
            "{{range .Subnets}}{{.Gateway}}{{end}}",
        ])
        .parse()
        .unwrap();
    // The customer's database, on the host, reached from the Client's network namespace.
    let db = echo_server_on(gateway).await;

    // Each Client: enrolled by the image itself, then run hardened; the eBPF one with the
    // two capabilities added and what docs/deploy.md says this engine and host need for them.
    let ebpf_extra = ebpf_run_options(&podman, dir);
    let mut ebpf_args = vec!["--cap-add", "BPF", "--cap-add", "NET_ADMIN"];
    ebpf_args.extend(ebpf_extra.iter().map(String::as_str));
    for (name, target, caps, require) in [
        ("acme", "client", &[][..], "any"),
        ("locked", "client-ebpf", &ebpf_args[..], "kernel"),
    ] {
        let token = hub_cli(&[
            "token",
            "create",
            "--client",
            name,
            "--hub-address",
            &format!("{hub_ip}:443"),
        ]);
        let (_, state_vol) = volume(dir, &format!("{name}-state"), "/var/lib/ewii");
        let conf = file(
            dir,
            &format!("{name}.toml"),
            &format!(
                "hub = \"{hub_ip}:443\"\nstate_dir = \"/var/lib/ewii\"\n\
                 [enforcement]\nrequire = \"{require}\"\n\
                 [[allow]]\nname = \"db\"\naddress = \"{db}\"\n"
            ),
            "/etc/ewii/client.toml",
        );
        let image = &tags[target];
        let mut argv = vec!["run", "--rm"];
        argv.extend(HARDENED);
        argv.extend([
            "-v",
            &state_vol,
            image,
            "enroll",
            "--hub",
            label(&token, "ewii-client enroll --hub")
                .split(' ')
                .next()
                .unwrap(),
            "--token",
            label(&token, "token:"),
            "--bundle-hash",
            label(&token, "bundle hash:"),
        ]);
        podman.ok(&argv);

        let cname = format!("ewii-{name}-test-{id}");
        let mut argv = vec!["run", "-d", "--name", &cname];
        argv.extend(HARDENED);
        argv.extend(caps);
        argv.extend(["-v", &state_vol, "-v", &conf, image]);
        podman.ok(&argv);
        cleanup.1.push(("rm", cname.clone()));

        // Served: a query from the operator's side reaches the database through the Client.
        let port = if name == "acme" { 15432 } else { 15433 };
        let service: std::net::SocketAddr = format!("{hub_ip}:{port}").parse().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !podman.run(&["healthcheck", "run", &cname]).status.success() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: not healthy within 30 s; its output:\n{}",
                String::from_utf8_lossy(&podman.run(&["logs", &cname]).stderr)
            );
            tokio::time::sleep(POLL).await;
        }
        assert_eq!(try_roundtrip(service, b"from the operator").await, Ok(()));

        // From inside the container: the Client's own records. The unprivileged image has
        // Landlock and seccomp; the eBPF image has its lock attached to its own cgroup and
        // saw the kernel refuse its self-test connection.
        let records = |logs: &str| -> Vec<serde_json::Value> {
            logs.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        };
        let served = |r: &serde_json::Value| r["event"] == "query" && r["outcome"] == "ok";
        let mut logs = String::new();
        poll_until(&format!("{name}: its query record"), SOON, || {
            logs = podman.ok(&["logs", &cname]);
            records(&logs).iter().any(served)
        })
        .await;
        let records = records(&logs);
        let enforcement = records
            .iter()
            .find(|r| r["event"] == "enforcement")
            .unwrap_or_else(|| panic!("{logs}"));
        let layers = enforcement["reason"].as_str().unwrap();
        assert_eq!(enforcement["outcome"], "ok", "{layers}");
        assert!(layers.contains("seccomp active"), "{layers}");
        assert!(layers.contains("privileges active"), "{layers}");
        if target == "client-ebpf" {
            assert!(layers.contains("ebpf active"), "{layers}");
            assert!(
                records.iter().any(|r| r["event"] == "kernel_denied"),
                "the lock's self-test: {logs}"
            );
        } else {
            assert!(!layers.contains("ebpf active"), "{layers}");
        }
        for r in &records {
            let bad = audit_line_violations(&r.to_string());
            assert!(bad.is_empty(), "{bad:?}");
        }

        // The customer's evidence, from inside the container as the documentation runs it:
        // every promise it can show holds (P16 too with the lock); as the Client's own user it
        // attributes sockets by owner in the container's network namespace.
        let evidence = podman.run(&["exec", &cname, "ewii-client", "verify", "--json"]);
        let report: serde_json::Value =
            serde_json::from_slice(&evidence.stdout).unwrap_or_else(|e| {
                panic!(
                    "{name}: verify printed no JSON ({e}): {}",
                    String::from_utf8_lossy(&evidence.stderr)
                )
            });
        assert!(evidence.status.success(), "{name}: {report:#}");
        for p in report["promises"].as_array().unwrap() {
            let expected = match p["id"].as_str().unwrap() {
                "P1" => "elsewhere",
                "P16" if target == "client" => "off",
                _ => "holds",
            };
            assert_eq!(p["verdict"], expected, "{name}: {p:#}");
        }
        assert!(
            report["client"]["sockets"]["attribution"]["owner_in_namespace"].is_object(),
            "{name}: {report:#}"
        );

        // `docker stop`: SIGTERM, exit 0, and (on_stop = "revoke") the Hub has revoked it.
        podman.ok(&["stop", "-t", "10", &cname]);
        assert_eq!(
            podman.ok(&["inspect", "--format", "{{.State.ExitCode}}", &cname]),
            "0"
        );
        let clients = hub_cli(&["clients"]);
        let row = clients
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{clients}"));
        assert_eq!(row.split_whitespace().nth(1), Some("revoked"), "{clients}");
    }
    podman.ok(&["stop", "-t", "10", &hub_name]);
    assert_eq!(
        podman.ok(&["inspect", "--format", "{{.State.ExitCode}}", &hub_name]),
        "0"
    );
}

/// What docs/deploy.md says the `client-ebpf` container needs beyond its two capabilities on
/// this engine and host: a seccomp profile that lets `bpf(2)` through for CAP_BPF (podman 4's
/// default allows it only with CAP_SYS_ADMIN), and on a hybrid cgroup host (cgroup v1 with
/// the v2 hierarchy at `/sys/fs/cgroup/unified`) that hierarchy, read-only.
fn ebpf_run_options(podman: &Podman, dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let default = Path::new("/usr/share/containers/seccomp.json");
    if let Ok(text) = fs::read_to_string(default) {
        let mut profile: serde_json::Value = serde_json::from_str(&text).unwrap();
        let rules = profile["syscalls"].as_array_mut().unwrap();
        for rule in rules.iter_mut() {
            let names = rule["names"].as_array_mut().unwrap();
            names.retain(|n| n != "bpf");
        }
        rules.retain(|r| !r["names"].as_array().unwrap().is_empty());
        rules.push(serde_json::json!({
            "names": ["bpf"],
            "action": "SCMP_ACT_ALLOW",
            "includes": {"caps": ["CAP_BPF"]}
        }));
        let path = dir.join("ewii-seccomp.json");
        fs::write(&path, profile.to_string()).unwrap();
        out.extend([
            "--security-opt".into(),
            format!("seccomp={}", path.display()),
        ]);
    }
    let v1 = podman.ok(&["info", "--format", "{{.Host.CgroupsVersion}}"]) == "v1";
    if v1 && Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists() {
        out.extend([
            "-v".into(),
            "/sys/fs/cgroup/unified:/sys/fs/cgroup/unified:ro".into(),
        ]);
    }
    out
}

/// The Dockerfile's runtime stages, read as text: a static, shell-less base, uid 65532, one
/// binary and an empty state directory each, nothing privileged; `client` is the default.
#[test]
fn p1_p2_the_dockerfile_targets_are_scratch_based_non_root_and_hold_one_binary() {
    let dockerfile =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("ARG RUNTIME_BASE=gcr.io/distroless/static"),
        "a static, shell-less base"
    );
    assert!(!dockerfile.contains("--privileged"));
    // Each stage by name, with its base; a target's lines are its own and its bases'.
    let stages: Vec<(&str, &str, &str)> = dockerfile
        .split("\nFROM ")
        .skip(1)
        .map(|s| {
            let (head, body) = s.split_once('\n').unwrap();
            let (base, name) = head.split_once(" AS ").unwrap();
            (name.trim(), base.trim(), body)
        })
        .collect();
    let lines = |target: &str| {
        let mut out = Vec::new();
        let mut at = target;
        loop {
            let (_, base, body) = stages.iter().find(|(n, _, _)| *n == at).unwrap();
            out.extend(body.lines());
            if *base == "${RUNTIME_BASE}" {
                return out;
            }
            assert!(*base != "rust:1.95-bookworm", "{target} is a runtime stage");
            at = base;
        }
    };
    let names: Vec<&str> = stages.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(names.last(), Some(&"client"), "client last: the default");
    for target in ["hub", "client-ebpf", "client"] {
        let stage = lines(target);
        let binary = if target == "hub" {
            "ewii-hub"
        } else {
            "ewii-client"
        };
        assert!(stage.contains(&"USER 65532:65532"), "{target}: non-root");
        let entry = format!("ENTRYPOINT [\"/usr/local/bin/{binary}\"]");
        assert!(stage.contains(&entry.as_str()), "{target}");
        // One binary and an empty state directory owned by the image's user: nothing else.
        let copies: Vec<&str> = stage
            .iter()
            .copied()
            .filter(|l| l.starts_with("COPY"))
            .collect();
        assert_eq!(copies.len(), 2, "{target}: {copies:?}");
        assert!(
            copies
                .iter()
                .any(|c| c.contains("--chown=65532:65532 /state ")),
            "{target}: {copies:?}"
        );
        assert!(
            copies
                .iter()
                .any(|c| c.ends_with(&format!(" /usr/local/bin/{binary}"))),
            "{target}: {copies:?}"
        );
    }
}

/// Each image's SBOM (CycloneDX 1.5, made by `scripts/sbom` beside the binaries): every
/// component is the exact version Cargo.lock pins, with its checksum; the crates that carry
/// the promises are there; test- and bench-only crates are not; only the eBPF image has aya.
#[test]
fn p1_each_image_has_an_sbom_of_the_crates_it_is_built_from() {
    let Some(dist) = std::env::var("EWII_IMAGE_DIST")
        .ok()
        .map(PathBuf::from)
        .filter(|d| d.join("ewii-client.cdx.json").exists())
    else {
        assert!(
            !require("EWII_REQUIRE_IMAGE"),
            "EWII_REQUIRE_IMAGE=1 but EWII_IMAGE_DIST has no SBOMs (run scripts/test)"
        );
        println!("SKIPPED: needs EWII_IMAGE_DIST with the SBOMs (run scripts/test)");
        return;
    };
    let lock = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
    // name@version -> checksum, from Cargo.lock's [[package]] entries.
    let mut pinned = std::collections::HashMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |k: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k} = \"")))
                .map(|v| v.trim_end_matches('"').to_owned())
        };
        if let (Some(n), Some(v)) = (field("name"), field("version")) {
            pinned.insert(format!("{n}@{v}"), field("checksum"));
        }
    }
    for (file, app, has_aya) in [
        ("ewii-client.cdx.json", "ewii-client", false),
        ("ewii-client-ebpf.cdx.json", "ewii-client", true),
        ("ewii-hub.cdx.json", "ewii-hub", false),
    ] {
        let bom: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dist.join(file)).unwrap()).unwrap();
        assert_eq!(bom["bomFormat"], "CycloneDX", "{file}");
        assert_eq!(bom["specVersion"], "1.5", "{file}");
        assert_eq!(bom["metadata"]["component"]["name"], app, "{file}");
        let components = bom["components"].as_array().unwrap();
        let names: Vec<&str> = components
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        for c in components {
            let key = format!(
                "{}@{}",
                c["name"].as_str().unwrap(),
                c["version"].as_str().unwrap()
            );
            let sum = pinned
                .get(&key)
                .unwrap_or_else(|| panic!("{file}: {key} is not in Cargo.lock"));
            assert_eq!(c["purl"], format!("pkg:cargo/{key}"), "{file}: {key}");
            let listed = c["hashes"][0]["content"].as_str().map(str::to_owned);
            assert_eq!(&listed, sum, "{file}: {key}'s checksum");
        }
        for needed in ["ewii-common", "quinn", "rustls", "ring", "rcgen", "tokio"] {
            assert!(names.contains(&needed), "{file}: {needed} missing");
        }
        for absent in [
            "criterion",
            "proptest",
            "ewii-tests",
            "ewii-benches",
            "shlex",
        ] {
            assert!(
                !names.contains(&absent),
                "{file}: {absent} is not in the binary"
            );
        }
        assert_eq!(names.contains(&"aya"), has_aya, "{file}: aya");
    }
}
