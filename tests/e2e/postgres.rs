//! A real PostgreSQL behind the Client answers SQL through the tunnel (P4).
//!
//! The harness starts its own cluster on loopback in a temporary directory (`initdb` +
//! `pg_ctl`, as the `postgres` user when running as root) and stops it afterwards. Without the
//! Debian PostgreSQL packages the test prints `SKIPPED` — unless `EWII_REQUIRE_POSTGRES=1`
//! (set by `.ci/run`), which turns the skip into a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use ewii_common::audit::{AuditRecord, Event, Outcome};
use ewii_tests::*;
use sha2::Digest;

struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    _dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .cmd("pg_ctl")
            .args([
                "-D",
                self.data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}

impl Cluster {
    fn cmd(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn start() -> Option<Self> {
        let bin = find_pg_bin()?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new().prefix("ewii-pg-").tempdir().ok()?;
        let data = dir.path().join("data");
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .ok()?
                .success();
            assert!(ok, "chown of the cluster directory failed");
        }
        // Held until PostgreSQL listens on it (`pg_ctl -w` returns then).
        let held = hold_tcp_port();
        let port = held.addr.port();
        let c = Self {
            bin,
            data: data.clone(),
            _dir: dir,
            port,
            as_postgres,
        };
        let init = c
            .cmd("initdb")
            .args([
                "-D",
                data.to_str()?,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ])
            .output()
            .ok()?;
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        // TLS on, as Debian's clusters have it (and psql asks for by default): a certificate
        // for `db.example`, the name a caller checks with `sslmode=verify-full`.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![DB_NAME.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(data.join("server.crt"), cert.pem()).unwrap();
        std::fs::write(data.join("server.key"), key.serialize_pem()).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        if as_postgres {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(data.join("server.crt"))
                .arg(data.join("server.key"))
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the server's key");
        }
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={} -c ssl=on",
            data.display()
        );
        let start = c
            .cmd("pg_ctl")
            .args(["-D", data.to_str()?, "-o", &opts, "-w", "-t", "30", "-l"])
            .arg(data.join("log"))
            .arg("start")
            .output()
            .ok()?;
        drop(held);
        assert!(
            start.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&start.stdout),
            String::from_utf8_lossy(&start.stderr)
        );
        Some(c)
    }
}

/// The database's name in its certificate.
const DB_NAME: &str = "db.example";

fn find_pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn psql(bin: &Path, port: u16, sql: &str) -> String {
    psql_with(bin, port, sql, &[("PGSSLMODE", "disable")])
}

/// A `psql` command to the database at `port` on 127.0.0.1 (or the `PGHOST` of `env`, then
/// reached at its `PGHOSTADDR`), with these libpq variables.
fn psql_command(bin: &Path, port: u16, sql: &str, env: &[(&str, &str)]) -> Command {
    // `-h` would override `PGHOST`: the name a `verify-full` checks is given that way.
    let host = env
        .iter()
        .find(|(k, _)| *k == "PGHOST")
        .map_or("127.0.0.1", |(_, v)| *v);
    let mut c = Command::new(bin.join("psql"));
    c.args([
        "-h",
        host,
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
    ])
    .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
    .env("PGCONNECT_TIMEOUT", "10")
    .envs(env.iter().copied());
    c
}

fn psql_with(bin: &Path, port: u16, sql: &str, env: &[(&str, &str)]) -> String {
    let out = psql_command(bin, port, sql, env).output().unwrap();
    assert!(
        out.status.success(),
        "psql through the tunnel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A cluster behind a Client, and the Hub's service port to it; `None` (said, or a failure
/// when required) without PostgreSQL.
async fn tunnelled() -> Option<(Cluster, TestHub, TestClient, u16)> {
    let Some(pg) = Cluster::start() else {
        assert!(
            !require("EWII_REQUIRE_POSTGRES"),
            "PostgreSQL is required (EWII_REQUIRE_POSTGRES=1) but its binaries are missing"
        );
        println!("SKIPPED: PostgreSQL server binaries not found under /usr/lib/postgresql");
        return None;
    };
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let client =
        TestClient::enrol_and_run(&hub, "acme", &[("db", format!("127.0.0.1:{}", pg.port))]).await;
    hub.wait_connected("acme").await;
    let entry = hub.service("pg").port();
    Some((pg, hub, client, entry))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_postgresql_answers_sql_through_the_tunnel() {
    let Some((pg, _hub, client, entry)) = tunnelled().await else {
        return;
    };
    let bin = pg.bin.clone();
    let answers = tokio::task::spawn_blocking(move || {
        let a = psql(&bin, entry, "SELECT 6 * 7");
        psql(
            &bin,
            entry,
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g",
        );
        let b = psql(&bin, entry, "SELECT count(*), sum(length(v)) FROM t");
        (a, b)
    })
    .await
    .unwrap();
    assert_eq!(answers.0, "42");
    assert_eq!(answers.1, "2000|64000");
    client.wait_count(3, "queries ok", query_ok).await;
    let q = client.wait_audit("query", is(Event::Query)).await;
    assert_eq!(
        q.destination.unwrap().address,
        Some(format!("127.0.0.1:{}", pg.port))
    );
}

/// P4: psql as it runs by default against a database with TLS on: the database's own TLS
/// end to end through the tunnel (the bytes pass untouched), checked by the server itself
/// (`pg_stat_ssl`), with `sslmode=require` and with `verify-full`, which checks the name the
/// caller gives as `host` (the database's) while `hostaddr` reaches the Hub (docs/operator-
/// guide.md). And psql's cancel (Ctrl-C): a second connection carrying the cancel key, which
/// the tunnel takes to the same database, which stops the running statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_p11_psql_with_tls_and_its_cancel_through_the_tunnel() {
    let Some((pg, hub, client, entry)) = tunnelled().await else {
        return;
    };
    let bin = pg.bin.clone();
    let root = pg.data.join("server.crt");
    let in_tls = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let (required, verified) = tokio::task::spawn_blocking({
        let bin = bin.clone();
        move || {
            let required = psql_with(&bin, entry, in_tls, &[("PGSSLMODE", "require")]);
            let verified = psql_with(
                &bin,
                entry,
                in_tls,
                &[
                    ("PGSSLMODE", "verify-full"),
                    ("PGSSLROOTCERT", root.to_str().unwrap()),
                    ("PGHOST", DB_NAME),
                    ("PGHOSTADDR", "127.0.0.1"),
                ],
            );
            (required, verified)
        }
    })
    .await
    .unwrap();
    assert_eq!(required, "t", "TLS to the database, end to end");
    assert_eq!(verified, "t", "and its certificate checked by name");
    // psql ends with `Terminate` and its TLS `close_notify`; the database exits on the first,
    // and its kernel resets the connection when the second came first and is unread: an end,
    // on both sides, as is the database's FIN when it closed before the second came.
    let ended_well = |r: &AuditRecord| {
        r.event == Event::Query
            && r.outcome == Some(Outcome::Ok)
            && r.reason.as_deref().is_none_or(|why| {
                why.starts_with("the destination reset its connection after the requester's end")
            })
    };
    client
        .wait_count(2, "TLS sessions ended well", ended_well)
        .await;
    hub.wait_count(2, "TLS sessions ended well", ended_well)
        .await;

    // A statement that would run 60 s, cancelled once it runs.
    let running = psql_command(
        &bin,
        entry,
        "SELECT pg_sleep(60)",
        &[("PGSSLMODE", "require")],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // Killed if the test fails before it ends.
    let mut running = crate::process::Proc(running);
    let direct = pg.port;
    poll_until("the statement running", SOON, || {
        psql(
            &bin,
            direct,
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
        ) == "1"
    })
    .await;
    let started = tokio::time::Instant::now();
    let sent = Command::new("kill")
        .args(["-INT", &running.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = tokio::task::spawn_blocking(move || {
        let status = running.0.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut running.0.stderr.take().unwrap(), &mut err).unwrap();
        (status, err)
    });
    let (status, err) = tokio::time::timeout(SOON, out)
        .await
        .expect("psql ends once its statement is cancelled")
        .unwrap();
    assert!(
        err.contains("canceling statement due to user request"),
        "{status}: {err}"
    );
    assert!(started.elapsed() < SOON);
    // The two TLS checks, the statement and its cancel request.
    client
        .wait_count(4, "queries", |r| r.event == Event::Query)
        .await;
}

/// P4: a large `\copy` each way through the tunnel, over the database's TLS, arrives whole:
/// 32 MiB of rows psql streams from a file into a table (the server's digest of what it stored
/// is the file's), then the table streamed back into a file, byte for byte the one sent. Each
/// is one query on record, with its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_a_large_copy_each_way_through_the_tunnel_arrives_whole() {
    let Some((pg, _hub, client, entry)) = tunnelled().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (sent, back) = (dir.path().join("in.csv"), dir.path().join("out.csv"));
    // Rows of an id and 96 pseudo-random hex digits: no quoting, so `\copy … TO` writes each
    // row as it was read.
    let mut rows = String::with_capacity(33 << 20);
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut id = 0u32;
    while rows.len() < 32 << 20 {
        id += 1;
        rows.push_str(&format!("{id},"));
        for _ in 0..6 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            rows.push_str(&format!("{x:016x}"));
        }
        rows.push('\n');
    }
    std::fs::write(&sent, &rows).unwrap();
    let values: Vec<&str> = rows.lines().map(|l| l.split_once(',').unwrap().1).collect();
    let digest: String = sha2::Sha256::digest(values.join(",").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let bin = pg.bin.clone();
    let tls = [("PGSSLMODE", "require")];
    let (stored, sent_path, back_path) = (sent.clone(), sent.clone(), back.clone());
    let server_digest = tokio::task::spawn_blocking(move || {
        psql_with(&bin, entry, "CREATE TABLE big (id int PRIMARY KEY, v text)", &tls);
        let copy_in = format!("\\copy big FROM '{}' WITH (FORMAT csv)", sent_path.display());
        psql_with(&bin, entry, &copy_in, &tls);
        let copy_out = format!(
            "\\copy (SELECT id, v FROM big ORDER BY id) TO '{}' WITH (FORMAT csv)",
            back_path.display()
        );
        psql_with(&bin, entry, &copy_out, &tls);
        psql_with(
            &bin,
            entry,
            "SELECT count(*) || '|' || encode(sha256(convert_to(string_agg(v, ',' ORDER BY id), 'UTF8')), 'hex') FROM big",
            &tls,
        )
    })
    .await
    .unwrap();
    assert_eq!(
        server_digest,
        format!("{id}|{digest}"),
        "what the server stored"
    );
    let returned = std::fs::read(&back).unwrap();
    assert!(
        returned == std::fs::read(&stored).unwrap(),
        "the table came back as {} bytes, not the {} sent, or not the same",
        returned.len(),
        rows.len()
    );
    // Each ended well, with its bytes: the server resets a TLS connection as it ends (a
    // backend that exits on `Terminate` closes with libpq's `close_notify` unread), after the
    // client's end.
    client.wait_count(4, "queries ended well", query_ok).await;
    let size = rows.len() as u64;
    let records = client.audit.records();
    let moved = |up: bool| {
        records.iter().any(|r| {
            r.event == Event::Query
                && if up { r.bytes_up } else { r.bytes_down }.is_some_and(|b| b > size)
        })
    };
    assert!(moved(true) && moved(false), "{records:#?}");
}
