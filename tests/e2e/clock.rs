//! The binaries when the host's wall clock moves under them (P7): a suspend the monotonic clock
//! does not count, a step ahead, and a step back by NTP; and a Hub process held still
//! (`SIGSTOP`) while its host runs on, which moves neither clock against the other. (Each deadline a step back would push
//! away, a reconnect's, a stop's, is tested in the session machine:
//! `common/src/session/tests.rs`.) The clock is moved for one process alone with Debian's
//! libfaketime (`LD_PRELOAD`, its time read from a file the test rewrites; the monotonic clock
//! left alone): the seam is the C library's `clock_gettime`, what a real step or suspend
//! changes. In the Client's tests the Hub runs in-process on the real clock; in the Hub's, the
//! Client binary runs on it: an SVID's end, the silent-client grace (P9) and a webhook's
//! retry (P10) are dated by the Hub's clock.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ewii::client::status::Status;
use ewii::identity::inspect_leaf;
use ewii::identity::store::{self, Svid};
use ewii_common::audit::Event;
use ewii_tests::*;

use crate::process::{self, HubProcess, Proc};

/// Debian's libfaketime, the variant for threaded programs (scripts/install-test-deps).
fn libfaketime() -> PathBuf {
    let found = fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists());
    found.expect("libfaketime is missing: scripts/install-test-deps installs it (faketime)")
}

/// The environment that has a process take its wall clock from `clock` (read at most once a
/// second), its monotonic clock left alone.
fn faketime_env(clock: &Path) -> Vec<(&'static str, OsString)> {
    vec![
        ("LD_PRELOAD", libfaketime().into()),
        ("FAKETIME_TIMESTAMP_FILE", clock.into()),
        ("FAKETIME_CACHE_DURATION", "1".into()),
        ("DONT_FAKE_MONOTONIC", "1".into()),
    ]
}

/// Sets the Client's wall clock to real time plus `offset` (libfaketime's `+13h`, `-2h`,
/// `+0`). The Client reads the file at most once a second.
fn set_clock(file: &Path, offset: &str) {
    fs::write(file, format!("{offset}\n")).unwrap();
}

/// The `ewii-client` binary run with `client`'s state directory and allow-list entry `db` at
/// `echo`, its wall clock taken from `clock` (in the state directory, which its sandbox lets
/// it read). Its log goes to `<state>/../client.stderr`.
fn run_client_binary(client: &TestClient, hub: &TestHub, echo: SocketAddr, clock: &Path) -> Proc {
    let state = client.state_dir();
    let root = state.parent().unwrap();
    let toml = root.join("client.toml");
    fs::write(
        &toml,
        format!(
            "hub = \"{}\"\nstate_dir = {state:?}\naudit = \"discard\"\n[[allow]]\nname = \"db\"\naddress = \"{echo}\"\n[enforcement]\nlayers = [\"landlock\", \"privileges\", \"seccomp\"]\n",
            hub.addr
        ),
    )
    .unwrap();
    Proc(
        Command::new(bin_path("ewii-client"))
            .args(["run", "--config", toml.to_str().unwrap()])
            .envs(faketime_env(clock))
            .stdout(Stdio::null())
            .stderr(fs::File::create(root.join("client.stderr")).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// The Client's log so far, for a failure's message.
fn client_log(client: &TestClient) -> String {
    fs::read_to_string(client.state_dir().parent().unwrap().join("client.stderr"))
        .unwrap_or_default()
}

/// Longer than the Client's longest wait between two readings of the clock (10 s), its
/// libfaketime cache (1 s) and a renewal.
const CLOCK_SEEN: Duration = Duration::from_secs(25);

#[tokio::test]
async fn p7_a_client_whose_clock_is_set_ahead_past_half_life_renews_within_seconds() {
    // The Hub renews at any age here: the Client's clock says 15 h, the Hub's a few seconds.
    let limits = ewii::hub::admission::Limits {
        renew_after_percent: 0,
        ..Default::default()
    };
    let hub = TestHub::start_with_limits(&[Service::tcp("pg", "acme", "db")], limits).await;
    let echo = echo_server().await;
    let client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    let clock = client.state_dir().join("faketime");
    set_clock(&clock, "+0");
    let _proc = run_client_binary(&client, &hub, echo, &clock);
    hub.wait_connected("acme").await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let serial = inspect_leaf(&svid.chain[0]).unwrap().serial;
    // The SVID (24 h) is renewed at half-life ± 10 %, 9.6 to 14.4 h: a clock that ran behind
    // by 15 h, set right, is past it whatever the jitter.
    set_clock(&clock, "+15h");
    let rebound = format!("session re-bound from serial {serial}");
    let renewed = hub
        .audit
        .wait_for(CLOCK_SEEN, says(Event::SvidRotated, &rebound))
        .await;
    assert!(
        renewed.is_some(),
        "no renewal within {CLOCK_SEEN:?} of a 15 h jump; the Client's log:\n{}\nthe Hub's records: {:#?}",
        client_log(&client),
        hub.audit.records()
    );
    assert!(
        client_log(&client).contains("the wall clock moved ahead"),
        "the log says why: {}",
        client_log(&client)
    );
}

#[tokio::test]
async fn p7_a_client_whose_clock_is_set_back_renews_on_its_svid_s_own_schedule() {
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let echo = echo_server().await;
    let client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    let svid = Svid::load(&client.state_dir(), store::SVID_CERT, store::SVID_KEY).unwrap();
    let leaf = inspect_leaf(&svid.chain[0]).unwrap();
    let life = leaf.not_after - leaf.not_before;
    let renewal_due = || {
        Status::read(&client.state_dir())
            .ok()
            .and_then(|s| s.next_renewal_unix)
    };
    // The host's clock runs 20 h ahead when the Client starts: the SVID seems to have 4 h
    // left, and its renewal is set at half of them, near its end.
    let clock = client.state_dir().join("faketime");
    set_clock(&clock, "+20h");
    let _proc = run_client_binary(&client, &hub, echo, &clock);
    hub.wait_connected("acme").await;
    poll_until("a renewal time in the status", SOON, || {
        renewal_due().is_some()
    })
    .await;
    let ahead = renewal_due().unwrap();
    assert!(ahead >= leaf.not_after - 3 * 3_600, "{ahead} for {leaf:?}");
    // NTP sets the clock right: the renewal comes back to the SVID's own half-life (± 10 %),
    // not 10 h after it, when a Hub that was away for a while would leave no time to retry.
    set_clock(&clock, "+0");
    // (Half of the life left when the clock is set right: the SVID was backdated 30 s, and
    // the test's first seconds have passed.)
    let own = leaf.not_before + life * 6 / 10 + 60;
    let seen = tokio::time::timeout(CLOCK_SEEN, async {
        while renewal_due().is_none_or(|due| due > own) {
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    assert!(
        seen.is_ok(),
        "renewal due at {:?}, the SVID's own half-life by {own}; the Client's log:\n{}",
        renewal_due(),
        client_log(&client)
    );
    assert!(
        client_log(&client).contains("the wall clock moved back"),
        "the log says why: {}",
        client_log(&client)
    );
}

#[tokio::test]
async fn p7_a_client_whose_host_slept_past_its_svid_s_end_ends_as_expired() {
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let echo = echo_server().await;
    let client = TestClient::enrol(&hub, "acme", &[("db", echo.to_string())]).await;
    let clock = client.state_dir().join("faketime");
    set_clock(&clock, "+0");
    let mut proc = run_client_binary(&client, &hub, echo, &clock);
    hub.wait_connected("acme").await;
    // The host sleeps for 30 h: the process stands still longer than the 2.5 s idle timeout
    // (the Hub drops its connection), and wakes to a clock past its 24 h SVID's end.
    let signal = |sig: &str| {
        let sent = Command::new("kill")
            .args([sig, &proc.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    signal("-STOP");
    set_clock(&clock, "+30h");
    // Asleep until the Hub has dropped the session (its idle timeout, 2.5 s).
    hub.wait_audit("the Hub's end of the session", |r| {
        r.event == Event::SessionLost
    })
    .await;
    signal("-CONT");
    let mut exit = None;
    let ended = tokio::time::timeout(CLOCK_SEEN, async {
        while exit.is_none() {
            exit = proc.0.try_wait().unwrap();
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    let log = client_log(&client);
    assert!(
        ended.is_ok(),
        "still running {CLOCK_SEEN:?} after waking; its log:\n{log}"
    );
    assert_eq!(exit.unwrap().code(), Some(3), "{log}");
    assert!(log.contains("the SVID expired without renewal"), "{log}");
    assert!(log.contains("the wall clock moved ahead"), "{log}");
}

#[tokio::test]
async fn p7_a_hub_whose_clock_passes_a_client_s_svid_end_ends_its_session_within_seconds() {
    let root = tempfile::tempdir().unwrap();
    let hub = FakeTimeHub::start(root.path(), "");
    let echo = echo_server().await;
    let (_client, _) = hub
        .hub
        .run_client(root.path(), echo, "", Stdio::null())
        .await;
    // The Hub's clock goes past the Client's 24 h SVID's end (a step, or a host that slept):
    // the session ends at the Hub's next look at the clock, not 24 h of running later.
    set_clock(&hub.clock, "+25h");
    poll_until(
        "the Hub to end the session as expired",
        Duration::from_secs(45),
        || {
            fs::read_to_string(&hub.audit)
                .unwrap_or_default()
                .contains("the SVID of this session expired")
        },
    )
    .await;
}

/// An `ewii-hub` process on a wall clock read from a file (starting at real time), its audit
/// records in a file and its log kept as it comes.
struct FakeTimeHub {
    hub: HubProcess,
    clock: PathBuf,
    audit: PathBuf,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl FakeTimeHub {
    fn start(root: &Path, extra: &str) -> Self {
        let clock = root.join("faketime");
        set_clock(&clock, "+0");
        let env = faketime_env(&clock);
        let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
        let audit = root.join("hub-audit.jsonl");
        let (mut hub, _) =
            HubProcess::start_with_env(root, &format!("file:{}", audit.display()), &env, 0, |_| {
                extra.to_owned()
            });
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (stderr, kept) = (hub.proc.0.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                let Ok(line) = line else { break };
                kept.lock().unwrap().push_str(&line);
                kept.lock().unwrap().push('\n');
            }
        });
        Self {
            hub,
            clock,
            audit,
            log,
        }
    }

    /// The Hub's records of `event` so far.
    fn records(&self, event: &str) -> Vec<serde_json::Value> {
        fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["event"] == event)
            .collect()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Moves the Hub's wall clock to real time plus `offset` and waits until the Hub has seen
    /// the move (`ahead` or `back`): its log says so within a watcher tick and the
    /// libfaketime cache (1 s).
    async fn move_clock(&self, offset: &str, way: &str) {
        let said = format!("the wall clock moved {way}");
        let before = self.log().matches(&said).count();
        set_clock(&self.clock, offset);
        let deadline = tokio::time::Instant::now() + SOON;
        while self.log().matches(&said).count() == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the Hub did not say {said:?} within {SOON:?}; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits for the Hub's record of the running Client's loss (it was killed, no goodbye);
    /// returns when the test saw it.
    async fn wait_lost(&self) -> tokio::time::Instant {
        poll_until("the Hub to see the Client lost", SOON, || {
            !self.records("session_lost").is_empty()
        })
        .await;
        tokio::time::Instant::now()
    }
}

/// The grace of the tests below, `revoke_after_lost_secs`.
const GRACE: Duration = Duration::from_secs(10);

/// A Hub on a clock of its own with a [`GRACE`], and Client `acme` running.
async fn hub_with_grace_and_client(root: &Path) -> (FakeTimeHub, Proc) {
    let hub = FakeTimeHub::start(
        root,
        &format!("revoke_after_lost_secs = {}", GRACE.as_secs()),
    );
    let echo = echo_server().await;
    let (client, _) = hub.hub.run_client(root, echo, "", Stdio::null()).await;
    (hub, client)
}

/// Waits for the grace's revocation of the Client the Hub saw lost at `lost`: not before the
/// grace has run (less the second the database's times are rounded to).
async fn wait_grace_revocation(hub: &FakeTimeHub, lost: tokio::time::Instant) {
    poll_until("the grace's revocation", GRACE + SOON, || {
        !hub.records("revoked").is_empty()
    })
    .await;
    let after = lost.elapsed();
    let revoked = hub.records("revoked");
    let reason = format!(
        "no session for {} s (revoke_after_lost_secs)",
        GRACE.as_secs()
    );
    assert_eq!(revoked[0]["reason"], reason, "{revoked:?}");
    assert!(
        after >= GRACE - Duration::from_secs(1),
        "revoked {after:?} after the loss, its grace {GRACE:?}; the Hub's log:\n{}",
        hub.log()
    );
}

#[tokio::test]
async fn p9_a_hub_host_that_slept_does_not_count_its_sleep_against_a_silent_client() {
    let root = tempfile::tempdir().unwrap();
    let (hub, client) = hub_with_grace_and_client(root.path()).await;
    // Killed: no goodbye, so the Hub sees the Client lost and starts the grace.
    drop(client);
    let lost = hub.wait_lost().await;
    // The Hub's host sleeps two hours (for libfaketime, a step ahead: the same move of the
    // wall clock against the monotonic one). No Client could reach it meanwhile.
    hub.move_clock("+2h", "ahead").await;
    // The watcher reads the grace again at any change: an operator's command is one.
    process::run(
        "ewii-hub",
        &[
            "token",
            "create",
            "--state-dir",
            hub.hub.dir.to_str().unwrap(),
            "--client",
            "beta",
        ],
    );
    poll_until("the token's record", SOON, || {
        !hub.records("token_created").is_empty()
    })
    .await;
    // The grace runs on: the Client is revoked once it has been silent for the grace while
    // the Hub ran, not at once.
    wait_grace_revocation(&hub, lost).await;
}

/// A Hub process held still (`SIGSTOP`: what `docker pause` and a frozen cgroup do) while its
/// host runs on: its wall clock and its monotonic clock both move through the hold, and no
/// Client could reach it meanwhile. The silent-client grace counts the time the Hub ran: the
/// Client it lost before the hold is revoked once it has been silent for the grace while the
/// Hub ran, not at the hold's end.
#[tokio::test]
async fn p9_a_hub_process_held_still_does_not_count_the_hold_against_a_silent_client() {
    const HOLD: Duration = Duration::from_secs(15);
    let root = tempfile::tempdir().unwrap();
    let (hub, client) = hub_with_grace_and_client(root.path()).await;
    drop(client);
    let lost = hub.wait_lost().await;
    let pid = hub.hub.proc.pid().to_string();
    let signal = |sig: &str| {
        let done = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(done.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    let held = tokio::time::Instant::now();
    tokio::time::sleep(HOLD).await;
    let ran_before = held - lost;
    signal("-CONT");
    poll_until("the grace's revocation", GRACE + SOON, || {
        !hub.records("revoked").is_empty()
    })
    .await;
    let ran = lost.elapsed() - HOLD;
    assert!(
        ran >= GRACE - Duration::from_secs(1),
        "revoked after {ran:?} of running ({ran_before:?} before the hold), its grace {GRACE:?}; the Hub's log:\n{}",
        hub.log()
    );
    assert!(
        hub.log()
            .contains("the wall clock moved ahead against the time this Hub ran"),
        "{}",
        hub.log()
    );
}

#[tokio::test]
async fn p9_a_hub_whose_clock_is_set_back_revokes_a_silent_client_after_its_grace_not_the_step() {
    let root = tempfile::tempdir().unwrap();
    let (hub, client) = hub_with_grace_and_client(root.path()).await;
    // The Hub's clock runs an hour ahead when it loses the Client...
    hub.move_clock("+1h", "ahead").await;
    drop(client);
    let lost = hub.wait_lost().await;
    // ... and NTP sets it right: the Client's silence is dated an hour ahead of the clock.
    // It is revoked after the grace all the same, not an hour later.
    hub.move_clock("+0", "back").await;
    wait_grace_revocation(&hub, lost).await;
}

#[tokio::test]
async fn p10_a_webhook_retry_is_not_held_back_by_a_step_back_of_the_hub_s_clock() {
    let root = tempfile::tempdir().unwrap();
    // The first attempt fails; the retry is up to 10 s after it (full jitter: in most runs
    // after the step below is seen, a second or so after the failure).
    let receiver = Receiver::start(vec![500]).await;
    let hub = FakeTimeHub::start(
        root.path(),
        "[webhooks]\ndanger_allow_private_targets = true\nretry_initial_ms = 10000\nretry_max_ms = 10000",
    );
    hub.hub
        .enrol_with_webhook("beta", &root.path().join("beta"), Some(&receiver.url));
    // The Hub's clock runs an hour ahead when the revocation's first attempt fails: its retry
    // is dated an hour ahead of the real time...
    hub.move_clock("+1h", "ahead").await;
    process::run(
        "ewii-hub",
        &[
            "revoke",
            "--state-dir",
            hub.hub.dir.to_str().unwrap(),
            "--client",
            "beta",
        ],
    );
    // Its failure recorded (and its retry dated) by the Hub before the step.
    poll_until("the first attempt's record", SOON, || {
        !hub.records("webhook_failed").is_empty()
    })
    .await;
    assert!(receiver.deliveries().iter().any(|d| d.status == 500));
    // ... and NTP sets it right: the retry is not held an hour longer, it keeps its delay
    // (the Hub moves it with its clock).
    hub.move_clock("+0", "back").await;
    poll_until("the retry", Duration::from_secs(10) + SOON, || {
        receiver.deliveries().iter().any(|d| d.status == 200)
    })
    .await;
}
