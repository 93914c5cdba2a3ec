//! A real PostgreSQL behind the Client answers SQL through the tunnel (P4).
//!
//! The harness starts its own cluster on loopback in a temporary directory (`initdb` +
//! `pg_ctl`, as the `postgres` user when running as root) and stops it afterwards. Without the
//! Debian PostgreSQL packages the test prints `SKIPPED` — unless `EWII_REQUIRE_POSTGRES=1`
//! (set by `.ci/run`), which turns the skip into a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use ewii_common::audit::Event;
use ewii_tests::*;

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
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={}",
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
    let out = Command::new(bin.join("psql"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGSSLMODE", "disable")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql through the tunnel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_postgresql_answers_sql_through_the_tunnel() {
    let Some(pg) = Cluster::start() else {
        assert!(
            !require("EWII_REQUIRE_POSTGRES"),
            "PostgreSQL is required (EWII_REQUIRE_POSTGRES=1) but its binaries are missing"
        );
        println!("SKIPPED: PostgreSQL server binaries not found under /usr/lib/postgresql");
        return;
    };
    let hub = TestHub::start(&[Service::tcp("pg", "acme", "db")]).await;
    let client =
        TestClient::enrol_and_run(&hub, "acme", &[("db", format!("127.0.0.1:{}", pg.port))]).await;
    hub.wait_connected("acme").await;
    let entry = hub.service("pg").port();
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
