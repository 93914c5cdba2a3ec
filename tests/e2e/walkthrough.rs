//! The operator's guide followed literally (P13, P7, P10, P11, P15): `docs/operator-guide.md`
//! and the README's customer commands, run with the real binaries (the static release builds
//! when `scripts/test` prepared them) as separate processes on loopback — init, a workload SVID, a token, the Hub, enrolment, the Client, a plain and a
//! TLS query, `clients`, a CA rotation dry run with a short SVID lifetime, a revocation with
//! its webhook verified by the customer's command, re-enrolment, and both stops.
//!
//! Every `ewii-hub` command and the Hub configuration are taken from the guide's own code
//! blocks; the example paths, hosts and ports are replaced by this machine's (the table in
//! [`Guide::load`]). When the guide changes, this test runs the new text: a command that no
//! longer works, or one that disappears, fails it.

use std::collections::HashMap;
use std::fs;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use ewii::identity::store::{self, Svid};
use ewii::identity::verify::{Bundle, Expect, SpiffeVerifier};
use ewii_tests::*;

/// The guide's code blocks, with this machine's paths and ports in place of the examples.
struct Guide {
    /// Every `ewii-hub …` / `ewii-client …` line of its `sh` blocks, comments removed.
    commands: Vec<Vec<String>>,
    /// Its `toml` block (the Hub's configuration).
    hub_toml: String,
}

impl Guide {
    fn load(subst: &[(&str, String)]) -> Self {
        let text = fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/operator-guide.md"
        ))
        .unwrap();
        let put = |s: &str| {
            subst
                .iter()
                .fold(s.to_owned(), |s, (from, to)| s.replace(from, to))
        };
        let mut commands = Vec::new();
        let mut hub_toml = None;
        let mut block: Option<(String, String)> = None;
        for line in text.lines() {
            match (&mut block, line.strip_prefix("```")) {
                (None, Some(lang)) => block = Some((lang.to_owned(), String::new())),
                (Some(_), Some(_)) => {
                    let (lang, body) = block.take().unwrap();
                    match lang.as_str() {
                        "sh" => commands.extend(body.lines().filter_map(|l| {
                            // `[--json]`: an optional flag, shown as such.
                            let words = shlex::split(&put(l).replace(" [--json]", ""))?;
                            words
                                .first()
                                .is_some_and(|w| w.starts_with("ewii-"))
                                .then_some(words)
                        })),
                        "toml" => hub_toml = Some(put(&body)),
                        _ => {}
                    }
                }
                (Some((_, body)), None) => {
                    body.push_str(line);
                    body.push('\n');
                }
                (None, None) => {}
            }
        }
        Self {
            commands,
            hub_toml: hub_toml.expect("the guide shows a hub.toml"),
        }
    }

    /// Every command of the guide that starts with `prefix` (words), as argv.
    fn all(&self, prefix: &str) -> Vec<Vec<String>> {
        let want: Vec<&str> = prefix.split(' ').collect();
        self.commands
            .iter()
            .filter(|c| c.len() >= want.len() && c.iter().zip(&want).all(|(a, b)| a == b))
            .cloned()
            .collect()
    }

    /// The one command of the guide that starts with `prefix` (words), as argv.
    fn command(&self, prefix: &str) -> Vec<String> {
        let mut found = self.all(prefix);
        assert_eq!(
            found.len(),
            1,
            "the guide should show `{prefix} …` once; its commands: {:#?}",
            self.commands
        );
        found.remove(0)
    }
}

/// The binary an operator would run: the static release build `scripts/test` prepares for
/// the images (`EWII_IMAGE_DIST`: `ewii-hub`, and `ewii-client` without the `ebpf` feature,
/// as the default image ships it), else the one cargo built for the tests.
fn binary(name: &str) -> PathBuf {
    std::env::var_os("EWII_IMAGE_DIST")
        .map(|d| PathBuf::from(d).join(name))
        .filter(|p| p.exists())
        .unwrap_or_else(|| bin_path(name))
}

/// Runs argv (its first word a binary of this workspace), returns the output.
fn exec(argv: &[String]) -> Output {
    Command::new(binary(&argv[0]))
        .args(&argv[1..])
        .output()
        .unwrap()
}

/// Runs argv and requires exit 0.
fn ok(argv: &[String]) -> String {
    let out = exec(argv);
    assert!(
        out.status.success(),
        "{argv:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn words(s: &str) -> Vec<String> {
    shlex::split(s).unwrap()
}

fn with(mut argv: Vec<String>, more: &[&str]) -> Vec<String> {
    argv.extend(more.iter().map(|s| (*s).to_owned()));
    argv
}

/// A process started in the background, stdout and stderr in files; killed if the test fails.
struct Bg {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Bg {
    fn start(argv: &[String], dir: &Path, name: &str) -> Self {
        let out = dir.join(format!("{name}.stdout"));
        let err = dir.join(format!("{name}.stderr"));
        let child = Command::new(binary(&argv[0]))
            .args(&argv[1..])
            .stdout(Stdio::from(fs::File::create(&out).unwrap()))
            .stderr(Stdio::from(fs::File::create(&err).unwrap()))
            .spawn()
            .unwrap();
        Self { child, out, err }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Its audit lines so far (stdout), parsed.
    fn records(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    async fn wait_record(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        poll_until(what, Duration::from_secs(30), || {
            self.records().iter().any(&pred)
        })
        .await;
    }

    /// Waits until `cond` holds while the process runs; fails at once, with its stderr, when
    /// it exits first.
    async fn until(&mut self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "waiting for {what}, the process exited ({status}):\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within 20 s; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn exited(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "did not exit within {within:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        self.exited(Duration::from_secs(15)).await
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ewii-hub clients` line of `name`, split in columns.
fn clients_row(list: &[String], name: &str) -> Vec<String> {
    ok(list)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("{name} not listed"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p13_the_operator_guide_followed_literally_with_the_real_binaries() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let hub_state = dir.join("hub");
    let client_state = dir.join("client");
    let workload = dir.join("billing");
    let hub_udp = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // Held until the Hub listens on them (the guide's text names them from here on).
    let held = [hold_tcp_port(), hold_tcp_port()];
    let (tcp_service, tls_service) = (held[0].addr, held[1].addr);
    let db = echo_server().await;
    let cache = echo_server().await;
    let receiver = Receiver::start(Vec::new()).await;
    let hub_toml = dir.join("hub.toml");
    let client_toml = dir.join("client.toml");
    let body = dir.join("body.json");
    let s = |p: &Path| p.display().to_string();
    let guide = Guide::load(&[
        ("/var/lib/ewii-hub", s(&hub_state)),
        ("/etc/ewii/hub.toml", s(&hub_toml)),
        ("/etc/billing/ewii", s(&workload)),
        ("hub.example.net:443", hub_udp.to_string()),
        ("0.0.0.0:443", hub_udp.to_string()),
        ("127.0.0.1:15432", tcp_service.to_string()),
        ("10.0.0.2:15433", tls_service.to_string()),
        ("body.json", s(&body)),
    ]);

    // §1. Initialise: a 0700 directory, the CA key 0600, the hash `bundle-hash` prints.
    let init = ok(&guide.command("ewii-hub init"));
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(hub_state.clone()), 0o700);
    assert_eq!(mode(hub_state.join("ca.key")), 0o600);
    let hash = ok(&words(&format!(
        "ewii-hub bundle-hash --state-dir {}",
        hub_state.display()
    )));
    assert!(
        init.contains(&format!("bundle hash: {}", hash.trim())),
        "{init}"
    );

    // §2. The guide's hub.toml as written, plus what this dry run needs: a 20 s SVID lifetime
    //     (renewal every ~10 s) and the opt-in for a webhook receiver on loopback (§7).
    fs::write(
        &hub_toml,
        format!(
            "svid_lifetime_secs = 20\n{}\n[webhooks]\ndanger_allow_private_targets = true\n",
            guide.hub_toml
        ),
    )
    .unwrap();
    let out = ok(&guide.command("ewii-hub workload-svid"));
    assert!(
        out.contains("spiffe://example.org/workload/billing"),
        "{out}"
    );
    for f in ["svid.pem", "svid.key", "bundle.pem"] {
        assert!(workload.join(f).exists(), "{f}");
    }

    // §3. A token, with the customer's webhook (§7). What it prints is what the customer gets.
    let created = ok(&with(
        guide.command("ewii-hub token create"),
        &["--webhook", &receiver.url, "--danger-allow-private-webhook"],
    ));
    let line = |label: &str| {
        created
            .lines()
            .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {label} in {created}"))
    };
    let webhook_key = line("webhook key:")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    // Unused tokens by id (never the token); a spare one deleted by id is gone.
    let id = line("token id:")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let listed = ok(&guide.command("ewii-hub token list"));
    assert!(
        listed.contains(&id) && !listed.contains(&line("token:")),
        "{listed}"
    );
    let spare = ok(&words(&format!(
        "ewii-hub token create --state-dir {} --client other",
        hub_state.display()
    )));
    let spare_id = spare
        .lines()
        .find_map(|l| l.strip_prefix("token id:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .to_owned();
    let (by_id, by_client): (Vec<_>, Vec<_>) = guide
        .all("ewii-hub token revoke")
        .into_iter()
        .partition(|c| c.contains(&"--id".to_owned()));
    assert_eq!((by_id.len(), by_client.len()), (1, 1));
    ok(&fill(
        &by_id[0],
        &HashMap::from([("--id", spare_id.clone())]),
    ));
    let listed = ok(&guide.command("ewii-hub token list"));
    assert!(
        listed.contains(&id) && !listed.contains(&spare_id),
        "{listed}"
    );
    let enroll = words(&line("ewii-client enroll"));
    let enroll = with(
        [vec!["ewii-client".to_owned(), "enroll".to_owned()], enroll].concat(),
        &["--state-dir", &s(&client_state)],
    );
    assert!(enroll.contains(&hub_udp.to_string()), "{enroll:?}");

    // §4. Run the Hub.
    let mut hub = Bg::start(&guide.command("ewii-hub run"), dir, "hub");
    let err = hub.err.clone();
    hub.until("the Hub listening", || {
        fs::read_to_string(&err).is_ok_and(|e| e.contains("listening on udp"))
    })
    .await;
    drop(held);

    // The customer (README): enrol with the line they were sent, run with the example
    // config, `status` and `health`.
    let out = ok(&enroll);
    assert!(out.contains("spiffe://example.org/client/acme"), "{out}");
    let example = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/client.toml"
    ))
    .unwrap()
    .replace("hub.example.net:443", &hub_udp.to_string())
    .replace("/var/lib/ewii", &s(&client_state))
    .replace("10.0.0.5:5432", &db.to_string())
    .replace("redis.internal.:6379", &cache.to_string());
    fs::write(&client_toml, example).unwrap();
    let run_client = words(&format!(
        "ewii-client run --config {}",
        client_toml.display()
    ));
    let mut client = Bg::start(&run_client, dir, "client");
    let status = words(&format!(
        "ewii-client status --state-dir {}",
        client_state.display()
    ));
    let health = words(&format!(
        "ewii-client health --state-dir {}",
        client_state.display()
    ));
    client
        .until("health to say connected", || exec(&health).status.success())
        .await;
    assert!(ok(&status).contains("\"connected\""));

    // §5. Inspect: connected.
    let list = guide.command("ewii-hub clients");
    assert_eq!(clients_row(&list, "acme")[1], "connected");
    let json: serde_json::Value = serde_json::from_str(&ok(&with(list.clone(), &["--json"])))
        .unwrap_or_else(|e| panic!("clients --json: {e}"));
    assert!(json.to_string().contains("acme"), "{json}");

    // A query through each service listener of §2: plain TCP, then TLS with the workload
    // SVID of §2; both audited on both sides under one query_id, with the caller as source.
    assert_eq!(try_roundtrip(tcp_service, b"plain").await, Ok(()));
    let tls = tls_caller(tls_service, &workload, "example.org")
        .await
        .unwrap();
    assert_eq!(exchange(tls, b"over tls").await.unwrap(), b"over tls");
    for (source, label) in [
        ("billing-batch@", "plain"),
        ("spiffe://example.org/workload/billing", "tls"),
    ] {
        let mut hub_query = None;
        poll_until(label, Duration::from_secs(10), || {
            hub_query = hub.records().into_iter().find(|r| {
                r["event"] == "query" && r["source"].as_str().is_some_and(|s| s.starts_with(source))
            });
            hub_query.is_some()
        })
        .await;
        let id = hub_query.unwrap()["query_id"].clone();
        client
            .wait_record(label, |r| {
                r["event"] == "query" && r["query_id"] == id && r["outcome"] == "ok"
            })
            .await;
    }

    // §8. A CA rotation dry run. prepare: the live Client receives the two-CA bundle.
    let old_tokens_hash = hash.trim().to_owned();
    let spare = ok(&words(&format!(
        "ewii-hub token create --state-dir {} --client spare --hub-address {hub_udp}",
        hub_state.display()
    )));
    ok(&guide.command("ewii-hub ca prepare"));
    client
        .wait_record("two trust anchors", |r| {
            r["event"] == "bundle_updated"
                && r["reason"]
                    .as_str()
                    .is_some_and(|x| x.starts_with("2 trust anchor(s); added sha256:"))
        })
        .await;
    // activate: the Client's next renewal (half its 20 s life) comes from the new CA.
    let before = Svid::load(&client_state, store::SVID_CERT, store::SVID_KEY).unwrap();
    ok(&guide.command("ewii-hub ca activate"));
    let new_hash = ok(&words(&format!(
        "ewii-hub bundle-hash --state-dir {}",
        hub_state.display()
    )));
    assert_ne!(new_hash.trim(), old_tokens_hash);
    let anchors = store::read_certs(&hub_state.join("ca.pem")).unwrap();
    let only_new = SpiffeVerifier::new(Bundle::new(anchors), "example.org", Expect::Client);
    let from_new_ca = |s: &Svid| {
        only_new
            .verify_chain(&s.chain[0], &[], rustls::pki_types::UnixTime::now())
            .is_ok()
    };
    assert!(!from_new_ca(&before), "the enrolment SVID is the old CA's");
    poll_until(
        "the Client's SVID from the new CA",
        Duration::from_secs(30),
        || {
            Svid::load(&client_state, store::SVID_CERT, store::SVID_KEY)
                .is_ok_and(|s| from_new_ca(&s))
        },
    )
    .await;
    assert_eq!(
        try_roundtrip(tcp_service, b"during the overlap").await,
        Ok(())
    );
    // "Tokens created before activate … no longer enrol": the spare one is refused.
    let spare_line = spare
        .lines()
        .find_map(|l| l.trim().strip_prefix("ewii-client enroll"))
        .unwrap();
    let refused = exec(&with(
        words(&format!("ewii-client enroll {spare_line}")),
        &["--state-dir", &s(&dir.join("spare"))],
    ));
    assert!(!refused.status.success(), "an old-hash token enrolled");
    // retire (the guide's line without --force): allowed soon; the Client drops the old CA.
    let (forced, plain): (Vec<_>, Vec<_>) = guide
        .all("ewii-hub ca retire")
        .into_iter()
        .partition(|c| c.contains(&"--force".to_owned()));
    assert_eq!(
        (forced.len(), plain.len()),
        (1, 1),
        "retire, and retire --force"
    );
    let retire = &plain[0];
    // Refused while the Client's newest SVID was issued within 10 s of `activate` (it may be
    // the old CA's): its next renewal comes within 12 s (20 s SVIDs).
    poll_until(
        "the plain retire to be allowed",
        Duration::from_secs(30),
        || exec(retire).status.success(),
    )
    .await;
    assert!(!hub_state.join("ca-previous.key").exists());
    client
        .wait_record("one trust anchor", |r| {
            r["event"] == "bundle_updated"
                && r["reason"]
                    .as_str()
                    .is_some_and(|x| x.starts_with("1 trust anchor(s); removed sha256:"))
        })
        .await;
    assert_eq!(try_roundtrip(tcp_service, b"after retire").await, Ok(()));

    // §6. Revoke: the Client learns it, says what to do next and exits 10; `clients` says
    //     revoked; §7: the webhook arrives and the customer's command verifies it.
    let revoke = guide.command("ewii-hub revoke");
    ok(&revoke);
    assert_eq!(
        client.exited(Duration::from_secs(10)).await.code(),
        Some(10)
    );
    assert!(
        client.stderr().contains("enroll --replace"),
        "{}",
        client.stderr()
    );
    assert_eq!(clients_row(&list, "acme")[1], "revoked");
    let mut delivery = None;
    poll_until("the webhook", Duration::from_secs(20), || {
        delivery = receiver.deliveries().into_iter().find(|d| d.status == 200);
        delivery.is_some()
    })
    .await;
    let delivery = delivery.unwrap();
    fs::write(&body, &delivery.body).unwrap();
    let value: HashMap<&str, String> = HashMap::from([
        ("--key", webhook_key),
        ("--id", delivery.headers["webhook-id"].clone()),
        ("--timestamp", delivery.headers["webhook-timestamp"].clone()),
        ("--signature", delivery.headers["webhook-signature"].clone()),
    ]);
    let verify = fill(&guide.command("ewii-client verify-webhook"), &value);
    ok(&verify);
    let payload: serde_json::Value = serde_json::from_slice(&delivery.body).unwrap();
    assert_eq!(payload["type"], "client.revoked");
    assert_eq!(payload["data"]["reason"], "contract ended");
    // A tampered body is refused by the same command.
    fs::write(&body, b"{}").unwrap();
    assert!(!exec(&verify).status.success());

    // §6. Back in: a new token, `enroll --replace`, the Client serves again.
    let again = ok(&guide.command("ewii-hub token create"));
    let again_line = again
        .lines()
        .find_map(|l| l.trim().strip_prefix("ewii-client enroll"))
        .unwrap();
    ok(&with(
        words(&format!("ewii-client enroll {again_line}")),
        &["--state-dir", &s(&client_state), "--replace"],
    ));
    let mut client = Bg::start(&run_client, dir, "client-again");
    client
        .until("health to say connected again", || {
            exec(&health).status.success()
        })
        .await;
    assert_eq!(clients_row(&list, "acme")[1], "connected");
    assert_eq!(try_roundtrip(tcp_service, b"back").await, Ok(()));

    // Stops: the Client (on_stop = "revoke", the example's default) revokes itself and
    // exits 0; the Hub exits 0 on SIGTERM.
    assert!(client.terminate().await.success(), "{}", client.stderr());
    assert_eq!(clients_row(&list, "acme")[1], "revoked");
    assert!(hub.terminate().await.success(), "{}", hub.stderr());

    // Every record both processes wrote is on the documented schema.
    for p in [&hub, &client] {
        for r in p.records() {
            let bad = audit_line_violations(&r.to_string());
            assert!(bad.is_empty(), "{bad:?}");
        }
    }
}

/// The guide's argv with each `…` placeholder replaced by the value of the flag before it.
fn fill(argv: &[String], value: &HashMap<&str, String>) -> Vec<String> {
    let mut out = argv.to_vec();
    for i in 1..out.len() {
        if out[i].contains('…') {
            let flag = out[i - 1].clone();
            out[i] = value
                .get(flag.as_str())
                .unwrap_or_else(|| panic!("no value for {flag} in {argv:?}"))
                .clone();
        }
    }
    out
}
