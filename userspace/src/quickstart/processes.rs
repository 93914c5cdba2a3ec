//! `ewii-quickstart --processes`: the same job with the real binaries, each its own process,
//! as an operator and a customer run them — `ewii-hub init`, `ewii-hub run`, `ewii-hub token
//! create`, `ewii-client enroll`, `ewii-client run`, `ewii-client health` — in a temporary
//! directory, on loopback. The Client runs without the eBPF layer (`[enforcement] layers`): run
//! by hand, as root, outside a container, the lock would fence the caller's own cgroup.

use std::io::Write;
use std::net::{TcpListener as StdTcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use super::{ask, customer_service};

/// `ewii-hub` and `ewii-client`, beside this binary (as `cargo build --bins` leaves them).
struct Bins {
    hub: PathBuf,
    client: PathBuf,
}

impl Bins {
    fn beside_me() -> anyhow::Result<Self> {
        let me = std::env::current_exe().context("where is this binary")?;
        let bins = Self {
            hub: me.with_file_name("ewii-hub"),
            client: me.with_file_name("ewii-client"),
        };
        for b in [&bins.hub, &bins.client] {
            if !b.exists() {
                bail!(
                    "--processes runs the binaries beside this one, and {} is missing: build them first (cargo build --bins)",
                    b.display()
                );
            }
        }
        Ok(bins)
    }
}

/// Runs `program args`, requires success, returns stdout.
async fn run(program: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .with_context(|| format!("starting {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A value printed as `label value` by `ewii-hub token create`.
fn field<'a>(text: &'a str, label: &str) -> anyhow::Result<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .map(str::trim)
        .with_context(|| format!("no {label:?} in: {text}"))
}

/// A free loopback port (the OS picks it; the process that binds it next is the Hub).
fn free_port(udp: bool) -> anyhow::Result<u16> {
    Ok(if udp {
        UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port()
    } else {
        StdTcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
    })
}

/// Starts `program args` with stdout (the audit lines) and stderr kept.
fn spawn(program: &Path, args: &[&str]) -> anyhow::Result<Child> {
    Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// SIGTERM, as `docker stop` sends it; then the exit status and what it wrote to stdout.
async fn stop(mut child: Child) -> anyhow::Result<(std::process::ExitStatus, String)> {
    let pid = child.id().context("the process is gone")?;
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .context("running kill")?;
    if !killed.success() {
        bail!("kill -TERM {pid} failed");
    }
    let mut stdout = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut stdout).await?;
    }
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .context("no exit within 15 s of SIGTERM")??;
    Ok((status, stdout))
}

/// Runs the demo with separate processes, narrating to `out`.
pub async fn run_processes(out: &mut (impl Write + Send)) -> anyhow::Result<()> {
    let bins = Bins::beside_me()?;
    let dir = tempfile::Builder::new()
        .prefix("ewii-quickstart-")
        .tempdir()?;
    let path = |name: &str| dir.path().join(name).display().to_string();
    let (hub_dir, client_dir) = (path("hub"), path("client"));
    writeln!(
        out,
        "== Ewii quickstart, separate processes (state in {})",
        dir.path().display()
    )?;

    run(
        &bins.hub,
        &[
            "init",
            "--state-dir",
            &hub_dir,
            "--trust-domain",
            "quickstart.ewii.test",
        ],
    )
    .await?;
    writeln!(out, "1. ewii-hub init --state-dir {hub_dir}")?;

    let service = TcpListener::bind("127.0.0.1:0").await?;
    let service_addr = service.local_addr()?;
    tokio::spawn(customer_service(service));
    writeln!(out, "2. the customer's service listens on {service_addr}")?;

    let hub_addr = format!("127.0.0.1:{}", free_port(true)?);
    let entry = format!("127.0.0.1:{}", free_port(false)?);
    let hub_toml = path("hub.toml");
    std::fs::write(
        &hub_toml,
        format!(
            "state_dir = \"{hub_dir}\"\nlisten = \"{hub_addr}\"\n\n[[service]]\nname = \"demo-db\"\nlisten = \"{entry}\"\nclient = \"demo\"\ndestination = \"db\"\nprincipal = \"operator-report-job\"\n"
        ),
    )?;
    let mut hub = spawn(&bins.hub, &["run", "--config", &hub_toml])?;
    let mut hub_log = BufReader::new(hub.stderr.take().context("hub stderr")?).lines();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = hub_log.next_line().await? {
            if line.contains("listening on udp") {
                return Ok(());
            }
        }
        bail!("ewii-hub exited before it listened")
    })
    .await
    .context("ewii-hub did not listen within 10 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = hub_log.next_line().await {} });
    writeln!(
        out,
        "3. ewii-hub run --config {hub_toml} (pid {}): QUIC on udp {hub_addr}, service 'demo-db' on tcp {entry}",
        hub.id().unwrap_or(0)
    )?;

    let token = run(
        &bins.hub,
        &[
            "token",
            "create",
            "--state-dir",
            &hub_dir,
            "--client",
            "demo",
            "--hub-address",
            &hub_addr,
        ],
    )
    .await?;
    let (secret, hash) = (field(&token, "token:")?, field(&token, "bundle hash:")?);
    writeln!(
        out,
        "4. ewii-hub token create --client demo: {}…",
        &secret[..12.min(secret.len())]
    )?;

    run(
        &bins.client,
        &[
            "enroll",
            "--hub",
            &hub_addr,
            "--token",
            secret,
            "--bundle-hash",
            hash,
            "--state-dir",
            &client_dir,
        ],
    )
    .await?;
    writeln!(
        out,
        "5. ewii-client enroll --hub {hub_addr} --token … --bundle-hash {hash}"
    )?;

    let client_toml = path("client.toml");
    std::fs::write(
        &client_toml,
        format!(
            "hub = \"{hub_addr}\"\nstate_dir = \"{client_dir}\"\non_stop = \"disconnect\"\n\n[enforcement]\n# Not \"ebpf\": this Client runs in your session's cgroup, not a container of its own.\nlayers = [\"landlock\", \"privileges\", \"seccomp\"]\n\n[[allow]]\nname = \"db\"\naddress = \"{service_addr}\"\n"
        ),
    )?;
    let mut client = spawn(&bins.client, &["run", "--config", &client_toml])?;
    let client_err = client.stderr.take().context("client stderr")?;
    let client_log = tokio::spawn(async move {
        let mut lines = BufReader::new(client_err).lines();
        let mut kept = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            kept.push(line);
        }
        kept
    });
    let mut healthy = false;
    for _ in 0..100 {
        let health = Command::new(&bins.client)
            .args(["health", "--state-dir", &client_dir])
            .output()
            .await?;
        if health.status.success() {
            healthy = true;
            break;
        }
        if let Some(status) = client.try_wait()? {
            bail!(
                "ewii-client exited ({status}): {}",
                client_log.await?.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !healthy {
        bail!("ewii-client health did not say connected within 5 s");
    }
    writeln!(
        out,
        "6. ewii-client run --config {client_toml} (pid {}); ewii-client health: connected",
        client.id().unwrap_or(0)
    )?;

    let answer = ask(entry.parse()?, "SELECT 'hello through Ewii'").await?;
    writeln!(out, "7. query through the tunnel: {answer:?}")?;

    let (client_status, client_audit) = stop(client).await?;
    let (hub_status, hub_audit) = stop(hub).await?;
    writeln!(
        out,
        "8. SIGTERM: ewii-client exited {client_status}, ewii-hub exited {hub_status}"
    )?;
    if !client_status.success() || !hub_status.success() {
        bail!(
            "a process did not stop cleanly: {}",
            client_log.await?.join("\n")
        );
    }
    writeln!(out, "\n== ewii-client stderr (what it enforces)")?;
    for line in client_log.await? {
        writeln!(out, "{line}")?;
    }
    writeln!(out, "\n== audit, hub side (its stdout)")?;
    write!(out, "{hub_audit}")?;
    writeln!(out, "\n== audit, client side (its stdout)")?;
    write!(out, "{client_audit}")?;
    writeln!(out, "\nquickstart OK")?;
    Ok(())
}
