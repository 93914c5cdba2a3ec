//! Real clients from Debian's packages through the tunnel, against real servers behind the
//! Client (P4): `redis-cli` against `redis-server` (a large value, a pipeline, a subscription
//! the server pushes to), `curl` against Python's `http.server` (a download checked byte for
//! byte) and `iperf3` (both directions, parallel connections, both ways at once). Each is what
//! a customer's first try looks like; each tool's own view of success is asserted, and the
//! bytes are compared where the tool hands them back.
//!
//! Without the tools the tests print `SKIPPED`, unless `EWII_REQUIRE_CLIENTS=1` (set by
//! `.ci/run`; `scripts/install-test-deps` installs them).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ewii_common::audit::{Event, Outcome};
use ewii_tests::*;
use sha2::{Digest, Sha256};

use crate::process::Proc;

/// Whether every tool is on the PATH; else the test is skipped (or fails when required).
fn tools(names: &[&str]) -> bool {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        !require("EWII_REQUIRE_CLIENTS"),
        "EWII_REQUIRE_CLIENTS=1 but missing: {missing:?} (scripts/install-test-deps installs them)"
    );
    println!("SKIPPED: missing {missing:?}");
    false
}

/// Waits until something accepts TCP connections at `addr` (a server that has started).
async fn listening(what: &str, addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + SOON;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} does not listen on {addr}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Runs a tool to its end (bounded) and returns its stdout; a failure or a timeout fails the
/// test with what the tool said.
async fn run(cmd: &mut Command, stdin: &[u8]) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let writer = std::thread::spawn(move || input.write_all(&stdin));
    let shown = format!("{cmd:?}");
    // Killed if it outlives its bound (its pid, kept: the child itself waits in the task).
    let pid = child.id();
    let out = match tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    {
        Ok(out) => out.unwrap().unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{shown} did not end within 60 s");
        }
    };
    assert!(
        out.status.success(),
        "{shown}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // After the status: a tool that ended early shows its own words, not a broken pipe.
    writer.join().unwrap().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// A Hub with one service to `client`'s entry `dest`, and that Client, enrolled and connected.
async fn tunnel(client: &'static str, dest: SocketAddr) -> (TestHub, TestClient, SocketAddr) {
    let hub = TestHub::start(&[Service::tcp("svc", client, "dest")]).await;
    let c = TestClient::enrol_and_run(&hub, client, &[("dest", dest.to_string())]).await;
    hub.wait_connected(client).await;
    let entry = hub.service("svc");
    (hub, c, entry)
}

fn redis_cli(entry: SocketAddr, args: &[&str]) -> Command {
    let mut c = Command::new("redis-cli");
    c.args(["-h", "127.0.0.1", "-p", &entry.port().to_string()])
        .args(args);
    c
}

/// P4: `redis-cli` through the tunnel, as a customer's cache would be used: a 1 MiB value
/// written and read back whole, 20,000 commands in one pipeline (`--pipe`, which sends
/// everything before it reads), and a subscription that the server pushes a message to while
/// another query publishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_redis_cli_through_the_tunnel() {
    if !tools(&["redis-server", "redis-cli"]) {
        return;
    }
    let held = hold_tcp_port();
    let port = held.addr.port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let _redis = Proc(
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port, "--save", ""])
            .args(["--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let dest = SocketAddr::from(([127, 0, 0, 1], port.parse::<u16>().unwrap()));
    listening("redis-server", dest).await;
    drop(held);
    let (_hub, client, entry) = tunnel("acme", dest).await;

    assert_eq!(run(&mut redis_cli(entry, &["PING"]), b"").await, "PONG\n");

    // 1 MiB of printable bytes (redis-cli -x takes the value from stdin as it is).
    let value: Vec<u8> = (0..1 << 20).map(|i| b'a' + (i * 7 % 26) as u8).collect();
    assert_eq!(
        run(&mut redis_cli(entry, &["-x", "SET", "big"]), &value).await,
        "OK\n"
    );
    let got = run(&mut redis_cli(entry, &["--no-raw", "STRLEN", "big"]), b"").await;
    assert_eq!(got.trim(), "(integer) 1048576");
    let got = run(&mut redis_cli(entry, &["GET", "big"]), b"").await;
    assert_eq!(got.trim_end().as_bytes(), &value[..], "the value read back");

    // RESP commands, all sent before any reply is read.
    let mut pipe = Vec::new();
    for i in 0..20_000 {
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        write!(
            pipe,
            "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
            k.len(),
            v.len()
        )
        .unwrap();
    }
    let got = run(&mut redis_cli(entry, &["--pipe"]), &pipe).await;
    assert!(got.contains("errors: 0, replies: 20000"), "{got}");
    assert_eq!(
        run(&mut redis_cli(entry, &["GET", "k19999"]), b"").await,
        "v19999\n"
    );

    // A subscriber holds its query open; the server pushes to it.
    let mut sub = Proc(
        redis_cli(entry, &["SUBSCRIBE", "news"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = BufReader::new(sub.0.stdout.take().unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Subscribed: redis-cli prints the confirmation ("subscribe", "news", "1").
    let mut seen = Vec::new();
    while !seen.ends_with(&["subscribe".to_owned(), "news".to_owned(), "1".to_owned()]) {
        let line = tokio::time::timeout(SOON, rx.recv())
            .await
            .expect("the subscription is confirmed through the tunnel")
            .expect("redis-cli SUBSCRIBE ended early");
        seen.push(line);
    }
    let receivers = run(&mut redis_cli(entry, &["PUBLISH", "news", "through"]), b"").await;
    assert_eq!(
        receivers, "1\n",
        "one subscriber, reached through the tunnel"
    );
    let mut pushed = Vec::new();
    while !pushed.ends_with(&[
        "message".to_owned(),
        "news".to_owned(),
        "through".to_owned(),
    ]) {
        let line = tokio::time::timeout(SOON, rx.recv())
            .await
            .expect("the server's push reaches the subscriber")
            .expect("redis-cli SUBSCRIBE ended early");
        pushed.push(line);
    }
    drop(sub);
    // PING, SET, STRLEN, GET, --pipe, GET, SUBSCRIBE, PUBLISH.
    client.wait_count(8, "queries ok", query_ok).await;
}

/// P4: `curl` downloads a 24 MiB file from a web server behind the Client, and two files over
/// one invocation; what it wrote is what the server holds, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_curl_downloads_through_the_tunnel() {
    if !tools(&["curl", "python3"]) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..24 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(root.path().join("big.bin"), &big).unwrap();
    std::fs::write(root.path().join("small.txt"), b"through the tunnel\n").unwrap();
    let held = hold_tcp_port();
    let port = held.addr.port();
    let _http = Proc(
        Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .current_dir(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let dest = SocketAddr::from(([127, 0, 0, 1], port));
    listening("python3 -m http.server", dest).await;
    drop(held);
    let (_hub, client, entry) = tunnel("acme", dest).await;

    let out = tempfile::tempdir().unwrap();
    let url = |f: &str| format!("http://127.0.0.1:{}/{f}", entry.port());
    let got = run(
        Command::new("curl")
            .args(["-fsS", "--max-time", "50", "-o"])
            .arg(out.path().join("big.bin"))
            .args(["-w", "%{http_code} %{size_download}", &url("big.bin")]),
        b"",
    )
    .await;
    assert_eq!(got, format!("200 {}", big.len()));
    assert_eq!(
        sha256_file(&out.path().join("big.bin")),
        Sha256::digest(&big).to_vec(),
        "the download is the file, byte for byte"
    );
    // Two URLs in one invocation: two connections (the server speaks HTTP/1.0), two queries.
    let got = run(
        Command::new("curl").args([
            "-fsS",
            "--max-time",
            "20",
            &url("small.txt"),
            &url("small.txt"),
        ]),
        b"",
    )
    .await;
    assert_eq!(got, "through the tunnel\nthrough the tunnel\n");
    client.wait_count(3, "queries ok", query_ok).await;
}

/// An HTTP/1.1 server (keep-alive, `Expect: 100-continue` as Python's handler answers it) whose
/// PUT answers the SHA-256 of the body it read.
const PUT_SERVER: &str = r#"
import hashlib, http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        out = hashlib.sha256(body).hexdigest().encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// P4: `curl` uploads through the tunnel as an HTTP/1.1 client does: two 5 MiB PUTs on one
/// kept-alive connection (one query), each after the server's `100 Continue` (curl would wait
/// its `--expect100-timeout`, 20 s, for an answer held back on the way), and the server read
/// each body whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_curl_uploads_over_one_kept_alive_connection() {
    if !tools(&["curl", "python3"]) {
        return;
    }
    let held = hold_tcp_port();
    let port = held.addr.port();
    let _http = Proc(
        Command::new("python3")
            .args(["-c", PUT_SERVER, &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let dest = SocketAddr::from(([127, 0, 0, 1], port));
    listening("the PUT server", dest).await;
    drop(held);
    let (_hub, client, entry) = tunnel("acme", dest).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("upload.bin");
    let body: Vec<u8> = (0..5u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&file, &body).unwrap();
    let url = |n: u32| format!("http://127.0.0.1:{}/u{n}", entry.port());
    let started = tokio::time::Instant::now();
    let got = run(
        Command::new("curl")
            .args(["-fsS", "--max-time", "50", "--expect100-timeout", "20"])
            .args(["-H", "Expect: 100-continue"])
            .arg("-T")
            .arg(&file)
            .arg(url(1))
            .arg("-T")
            .arg(&file)
            .arg(url(2))
            .args(["-w", "connects=%{num_connects}\n"]),
        b"",
    )
    .await;
    let digest = format!("{:x}", Sha256::digest(&body));
    assert_eq!(
        got,
        format!("{digest}\nconnects=1\n{digest}\nconnects=0\n"),
        "both bodies read whole; the second on the first's connection"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "no 100-continue wait: {:?}",
        started.elapsed()
    );
    client.wait_count(1, "queries ok", query_ok).await;
}

fn sha256_file(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// One `iperf3` run's JSON, after checking that iperf3 itself reports no error and that data
/// was received in every direction it ran.
async fn iperf3(entry: SocketAddr, args: &[&str]) -> serde_json::Value {
    let out = run(
        Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &entry.port().to_string()])
            .args(["-t", "1", "-J", "--connect-timeout", "10000"])
            .args(args),
        b"",
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v.get("error").is_none(), "iperf3 {args:?}: {}", v["error"]);
    v
}

fn received(v: &serde_json::Value, sum: &str) -> u64 {
    v["end"][sum]["bytes"].as_u64().unwrap_or(0)
}

/// P4: `iperf3` through the tunnel: upload, download (`-R`), four parallel data connections
/// (`-P 4`, five queries with the control connection) and both directions at once
/// (`--bidir`). iperf3's own control protocol checks that both ends agree on the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_iperf3_through_the_tunnel() {
    if !tools(&["iperf3"]) {
        return;
    }
    let held = hold_tcp_port();
    let port = held.addr.port();
    let _server = Proc(
        Command::new("iperf3")
            .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let dest = SocketAddr::from(([127, 0, 0, 1], port));
    listening("iperf3 -s", dest).await;
    drop(held);
    let (_hub, client, entry) = tunnel("acme", dest).await;

    // One run at a time, as the server takes them: the next starts once the last one's
    // connections are on record (the Client records a query once both ends have closed it;
    // a run that reached the server before it had finished the last would be told "busy").
    let queries = |n: usize| client.wait_count(n, "queries", is(Event::Query));
    let up = iperf3(entry, &[]).await;
    assert!(received(&up, "sum_received") > 0, "upload: {up}");
    queries(2).await;
    let down = iperf3(entry, &["-R"]).await;
    assert!(received(&down, "sum_received") > 0, "download: {down}");
    queries(4).await;
    let parallel = iperf3(entry, &["-P", "4"]).await;
    let streams = parallel["end"]["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 4, "{parallel}");
    for s in streams {
        assert!(s["receiver"]["bytes"].as_u64().unwrap_or(0) > 0, "{s}");
    }
    queries(9).await;
    let both = iperf3(entry, &["--bidir"]).await;
    assert!(received(&both, "sum_received") > 0, "bidir, up: {both}");
    assert!(
        received(&both, "sum_received_bidir_reverse") > 0,
        "bidir, down: {both}"
    );
    // Each connection is a query on record: control and data, 2 + 2 + 5 + 3. The control
    // connections end as they should; a data connection's receiver closes while its sender
    // still sends (iperf3 times the test, not the bytes), so the Client records what the
    // destination did to the bytes in flight (a broken pipe, a reset), as TCP would tell them.
    queries(12).await;
    let records = client.audit.records();
    let queries: Vec<_> = records.iter().filter(|r| r.event == Event::Query).collect();
    let ok = queries
        .iter()
        .filter(|r| r.outcome == Some(Outcome::Ok))
        .count();
    assert!(
        ok >= 4,
        "the four control connections end cleanly: {queries:?}"
    );
    assert!(
        queries.iter().all(|r| r.outcome != Some(Outcome::Refused)),
        "{queries:?}"
    );
    let moved: u64 = queries
        .iter()
        .map(|r| r.bytes_up.unwrap_or(0) + r.bytes_down.unwrap_or(0))
        .sum();
    let reported = [&up, &down, &parallel, &both]
        .iter()
        .map(|v| received(v, "sum_received") + received(v, "sum_received_bidir_reverse"))
        .sum::<u64>();
    assert!(
        moved >= reported,
        "the records count at least what iperf3's receivers got: {moved} < {reported}"
    );
}

/// P4: connections reach the destination in the order the requester made them. Some clients
/// tell their connections apart by that order alone: `iperf3 --bidir` makes two data
/// connections with the same cookie, and its server takes the first it accepts to receive
/// and the second to send; swapped, both ends send and neither reads, and the run reports
/// nothing received (a CI run caught that). Two connections made back to back, each sending
/// its number at once, a hundred times: the destination accepts them in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_connections_reach_the_destination_in_the_order_they_were_made() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    let dest = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (_hub, client, entry) = tunnel("acme", dest.local_addr().unwrap()).await;
    let mut swapped = Vec::new();
    for round in 0..100u8 {
        let made = async {
            let mut first = TcpStream::connect(entry).await.unwrap();
            first.write_all(&[round, 0]).await.unwrap();
            let mut second = TcpStream::connect(entry).await.unwrap();
            second.write_all(&[round, 1]).await.unwrap();
            (first, second)
        };
        let accepted = async {
            let mut order = Vec::new();
            let mut kept = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = dest.accept().await.unwrap();
                let mut said = [0u8; 2];
                s.read_exact(&mut said).await.unwrap();
                order.push(said);
                kept.push(s);
            }
            (order, kept)
        };
        let ((_first, _second), (order, _kept)) =
            tokio::time::timeout(SOON, async { tokio::join!(made, accepted) })
                .await
                .expect("both connections through");
        assert!(order.iter().all(|s| s[0] == round), "{order:?}");
        if order[0][1] != 0 {
            swapped.push(round);
        }
    }
    assert!(
        swapped.is_empty(),
        "accepted in the other order in rounds {swapped:?}"
    );
    client.wait_count(200, "queries", is(Event::Query)).await;
}
