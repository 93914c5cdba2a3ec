//! The quickstart: the whole job on embedded defaults, in one process and a temporary
//! directory — a Hub, an enrolled Client, a local service, and one query through the tunnel,
//! with the audit lines of both sides. `cargo run --bin ewii-quickstart`; with `--processes`
//! ([`processes`]) the same with the real binaries, each its own process.

mod processes;
pub use processes::run_processes;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use ewii_common::audit::Side;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::audit::{Audit, AuditOutput};
use crate::client;
use crate::config::{ClientConfig, HubConfig};
use crate::hub::{admin, Hub};
use crate::identity::parse_bundle_hash;

/// Runs the demo, narrating to `out`.
pub async fn run(out: &mut (impl Write + Send)) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("ewii-quickstart-")
        .tempdir()?;
    let hub_dir = dir.path().join("hub");
    let client_dir = dir.path().join("client");
    writeln!(
        out,
        "== Ewii quickstart (state in {})",
        dir.path().display()
    )?;

    let init = admin::init(&hub_dir, "quickstart.ewii.test")?;
    writeln!(
        out,
        "1. ewii-hub init: {} (bundle {})",
        init.hub_id, init.bundle_hash
    )?;

    let service = TcpListener::bind("127.0.0.1:0").await?;
    let service_addr = service.local_addr()?;
    tokio::spawn(customer_service(service));
    writeln!(out, "2. the customer's service listens on {service_addr}")?;

    let hub_config: HubConfig = format!(
        r#"
state_dir = "{}"
listen = "127.0.0.1:0"
audit = "discard"
[[service]]
name = "demo-db"
listen = "127.0.0.1:0"
client = "demo"
destination = "db"
principal = "operator-report-job"
"#,
        hub_dir.display()
    )
    .parse()?;
    let hub_audit = Audit::open_with_tap(Side::Hub, &AuditOutput::Discard)?;
    let hub = Hub::bind(hub_config, hub_audit.clone()).await?;
    let hub_addr = hub.local_addr();
    let entry = hub.service_addr("demo-db").context("service listener")?;
    let handle = hub.handle();
    let (stop_hub, hub_stopped) = oneshot::channel::<()>();
    let hub_task = tokio::spawn(hub.run(async {
        let _ = hub_stopped.await;
    }));
    writeln!(
        out,
        "3. ewii-hub run: QUIC on udp {hub_addr}, service 'demo-db' on tcp {entry}"
    )?;

    // A command's synced database write and file reads: not on the runtime the Hub runs on.
    let dir = hub_dir.clone();
    let token = tokio::task::spawn_blocking(move || {
        admin::create_token(&dir, "demo", Duration::from_secs(600), None, false)
    })
    .await??;
    writeln!(
        out,
        "4. ewii-hub token create --client demo: {}…",
        &token.token[..12]
    )?;

    let client_audit = Audit::open_with_tap(Side::Client, &AuditOutput::Discard)?;
    let id = client::enrol::enrol(
        &hub_addr.to_string().parse()?,
        &token.token,
        parse_bundle_hash(&token.bundle_hash)?,
        &client_dir,
        &client_audit,
    )
    .await?;
    writeln!(out, "5. ewii-client enroll: got a 24 h SVID for {id}")?;

    let client_config: ClientConfig = format!(
        r#"
hub = "{hub_addr}"
state_dir = "{}"
audit = "discard"
on_stop = "disconnect"
# In this process the Client has its Dialer only: kernel layers are the ewii-client binary's
# (`--processes`), and asking for one here would be a requirement not met.
[enforcement]
require = "none"
[[allow]]
name = "db"
address = "{service_addr}"
"#,
        client_dir.display()
    )
    .parse()?;
    let (stop_client, client_stopped) = oneshot::channel::<()>();
    let client_task = tokio::spawn(client::run(client_config, client_audit.clone(), async {
        let _ = client_stopped.await;
    }));
    wait_connected(&handle, "demo").await?;
    writeln!(
        out,
        "6. ewii-client run: one outbound QUIC connection, allow-list [db={service_addr}] (in this process: its Dialer keeps to the allow-list; the ewii-client binary adds the kernel layers, see --processes)"
    )?;

    let answer = ask(entry, "SELECT 'hello through Ewii'").await?;
    writeln!(out, "7. query through the tunnel: {answer:?}")?;

    let _ = stop_client.send(());
    let _ = client_task.await;
    // The Hub records the goodbye before it stops.
    hub_audit
        .wait_for(Duration::from_secs(5), |r| {
            r.event == ewii_common::audit::Event::SessionLost
        })
        .await;
    let _ = stop_hub.send(());
    let _ = hub_task.await;

    writeln!(out, "\n== audit, hub side (JSON lines, DESIGN §8)")?;
    for r in hub_audit.records() {
        writeln!(out, "{}", r.to_json_line())?;
    }
    writeln!(out, "\n== audit, client side")?;
    for r in client_audit.records() {
        writeln!(out, "{}", r.to_json_line())?;
    }
    writeln!(out, "\nquickstart OK")?;
    Ok(())
}

/// How often the quickstart looks whether the Client is connected (100 looks: 5 s).
const CONNECT_POLL: Duration = Duration::from_millis(50);

async fn wait_connected(handle: &crate::hub::HubHandle, client: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        if handle.connected_clients().iter().any(|c| c == client) {
            return Ok(());
        }
        tokio::time::sleep(CONNECT_POLL).await;
    }
    bail!("the Client did not connect within 5 s")
}

/// What an operator workload does: connect to the Hub's service listener, ask, read.
pub(crate) async fn ask(entry: SocketAddr, line: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(entry).await?;
    s.write_all(format!("{line}\n").as_bytes()).await?;
    s.shutdown().await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
        .await
        .context("no answer in 5 s")??;
    Ok(answer.trim_end().to_owned())
}

/// A stand-in for the customer's database: answers each line.
pub(crate) async fn customer_service(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = format!("customer-db answers: {line}\n");
                if w.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}
