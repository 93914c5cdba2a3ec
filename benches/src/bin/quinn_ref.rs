//! `ewii-quinn-ref`: the bare-quinn reference of the comparison — TCP forwarded over one QUIC
//! connection with Ewii's TLS and transport settings (`ewii::transport`: TLS 1.3,
//! ChaCha20-Poly1305 only, the same windows, stream credit and keep-alive) and nothing else:
//! no frames, no policy, no audit, no enforcement, no client certificate. What Ewii costs on
//! top of QUIC is the distance between the two in the report.
//!
//! ```sh
//! ewii-quinn-ref server --udp 127.0.0.1:4433 --cert-out cert.der --entry 127.0.0.1:7000
//! ewii-quinn-ref client --server 127.0.0.1:4433 --cert cert.der --dest 127.0.0.1:5432
//! ```
//! Like the Hub, the server side accepts TCP on each `--entry` and opens a stream per
//! connection on the client's QUIC connection; the stream's first byte names the entry, and
//! the client connects to the `--dest` of the same position.
#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const SERVER_NAME: &str = "quinn-ref.test";
const ALPN: &[u8] = b"ewii-quinn-ref";
/// Copy buffers of each direction, as large as Ewii's pipe reads.
const BUF: usize = 64 * 1024;

#[derive(Parser)]
#[command(about = "The bare-quinn reference of the peer comparison")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The operator side: QUIC listener and TCP entries.
    Server {
        /// UDP address to listen on.
        #[arg(long)]
        udp: SocketAddr,
        /// Where to write the self-signed certificate (DER) the client pins.
        #[arg(long)]
        cert_out: PathBuf,
        /// TCP entries, in order.
        #[arg(long, required = true)]
        entry: Vec<SocketAddr>,
    },
    /// The customer side: dials the server, forwards each stream to its destination.
    Client {
        /// The server's UDP address.
        #[arg(long)]
        server: SocketAddr,
        /// The server's certificate (DER).
        #[arg(long)]
        cert: PathBuf,
        /// Destinations, in the order of the server's entries.
        #[arg(long, required = true)]
        dest: Vec<SocketAddr>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        match cli.command {
            Cmd::Server {
                udp,
                cert_out,
                entry,
            } => server(udp, cert_out, entry).await,
            Cmd::Client { server, cert, dest } => client(server, cert, dest).await,
        }
    })
}

/// TLS 1.3 only, as Ewii.
static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

async fn server(
    udp: SocketAddr,
    cert_out: PathBuf,
    entries: Vec<SocketAddr>,
) -> anyhow::Result<()> {
    let key = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])?;
    std::fs::write(&cert_out, key.cert.der())?;
    let mut tls =
        rustls::ServerConfig::builder_with_provider(Arc::new(ewii::transport::provider()))
            .with_protocol_versions(TLS13)?
            .with_no_client_auth()
            .with_single_cert(
                vec![key.cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into()),
            )?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let endpoint = ewii::transport::endpoint(
        udp,
        Some(ewii::transport::quic_server_config(
            tls,
            ewii::transport::STREAM_WINDOW,
        )?),
    )?;
    let (tx, rx) = watch::channel(None::<quinn::Connection>);
    for (i, addr) in entries.iter().enumerate() {
        let listener = TcpListener::bind(addr).await?;
        let index = u8::try_from(i).context("at most 255 entries")?;
        let rx = rx.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let conn = rx.borrow().clone();
                tokio::spawn(async move {
                    let Some(conn) = conn else { return };
                    let _ = tcp.set_nodelay(true);
                    let Ok((mut send, recv)) = conn.open_bi().await else {
                        return;
                    };
                    if send.write_all(&[index]).await.is_ok() {
                        forward(tcp, recv, send).await;
                    }
                });
            }
        });
    }
    println!("listening on udp {udp}");
    // The latest connection serves the entries (a reconnecting client replaces it).
    while let Some(incoming) = endpoint.accept().await {
        match incoming.await {
            Ok(conn) => {
                // As the Hub grants a session once its checks pass.
                ewii::transport::authenticated(&conn);
                let _ = tx.send(Some(conn));
            }
            Err(e) => eprintln!("handshake: {e}"),
        }
    }
    Ok(())
}

async fn client(server: SocketAddr, cert: PathBuf, dests: Vec<SocketAddr>) -> anyhow::Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(std::fs::read(
        &cert,
    )?))?;
    let mut tls =
        rustls::ClientConfig::builder_with_provider(Arc::new(ewii::transport::provider()))
            .with_protocol_versions(TLS13)?
            .with_root_certificates(roots)
            .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // As the Client dials: a socket connected to the server.
    let mut endpoint = ewii::transport::client_endpoint(server)?;
    endpoint.set_default_client_config(ewii::transport::quic_client_config(
        tls,
        ewii::transport::MAX_CONCURRENT_QUERIES,
        ewii::transport::STREAM_WINDOW,
    )?);
    let conn = endpoint.connect(server, SERVER_NAME)?.await?;
    println!("connected to {server}");
    let dests = Arc::new(dests);
    loop {
        let (send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => bail!("connection lost: {e}"),
        };
        let dests = dests.clone();
        tokio::spawn(async move {
            let Ok(index) = recv.read_u8().await else {
                return;
            };
            let Some(dest) = dests.get(usize::from(index)) else {
                return;
            };
            let Ok(tcp) = TcpStream::connect(dest).await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            forward(tcp, recv, send).await;
        });
    }
}

/// Both directions until both end: TCP FIN ⇄ stream FIN.
async fn forward(mut tcp: TcpStream, recv: quinn::RecvStream, send: quinn::SendStream) {
    let mut stream = tokio::io::join(recv, send);
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut stream, BUF, BUF).await;
    let _ = stream.shutdown().await;
}
