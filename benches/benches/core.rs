//! Criterion benches. `scripts/bench` (release profile; HTML reports in
//! `target/criterion/report/index.html`). The tunnel groups run each tunnel as its own
//! processes, as deployed (Ewii's from `$EWII_BENCH_BINS`, see `ewii_bins`); this process
//! is only the load.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ewii_benches::compare::load;
use ewii_benches::compare::systems::{find_program, Bins, Kind, Running, Services, Setup};
use ewii_common::frame::{self, Control, QueryHead, QueryId};
use ewii_common::policy::AllowList;

/// Payload sizes: a small packet, a full QUIC datagram, a TLS record, a large transfer.
const SIZES: [usize; 4] = [128, 1350, 16 * 1024, 1024 * 1024];

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    let open = QueryHead::Open {
        query_id: QueryId(0x1234_5678_9abc_def0_1234_5678_9abc_def0),
        destination: "db".into(),
        source: "spiffe://example.org/workload/billing".into(),
    };
    let encoded = frame::encode_to_vec(&open).unwrap();
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("encode_open", |b| {
        let mut buf = BytesMut::with_capacity(256);
        b.iter(|| {
            buf.clear();
            frame::encode(black_box(&open), &mut buf).unwrap();
        })
    });
    g.bench_function("decode_open", |b| {
        b.iter(|| {
            let mut buf = encoded.clone();
            black_box(frame::decode::<QueryHead>(&mut buf).unwrap())
        })
    });
    let renewed = Control::Renewed {
        chain: vec![vec![0x30; 600]],
        bundle: vec![vec![0x30; 550], vec![0x30; 550]],
    };
    let encoded = frame::encode_to_vec(&renewed).unwrap();
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("decode_renewed", |b| {
        b.iter(|| {
            let mut buf = encoded.clone();
            black_box(frame::decode::<Control>(&mut buf).unwrap())
        })
    });
    g.finish();
}

fn policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy");
    for n in [1usize, 16, 256] {
        let names: Vec<(String, String)> = (0..n)
            .map(|i| {
                (
                    format!("db-{i}"),
                    format!("10.0.{}.{}:5432", i / 250, i % 250 + 1),
                )
            })
            .collect();
        let list =
            AllowList::from_pairs(names.iter().map(|(a, b)| (a.as_str(), b.as_str()))).unwrap();
        let hit = format!("db-{}", n / 2);
        g.bench_with_input(BenchmarkId::new("decide_hit", n), &hit, |b, hit| {
            b.iter(|| black_box(list.decide(black_box(hit))))
        });
        g.bench_with_input(BenchmarkId::new("decide_miss", n), &"secret", |b, miss| {
            b.iter(|| black_box(list.decide(black_box(miss))))
        });
    }
    g.finish();
}

/// The seal QUIC applies to every packet: ring (what quinn uses) against RustCrypto's
/// `chacha20poly1305`, the reference. DESIGN §4 explains why payloads are not sealed twice.
fn seal(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal_chacha20poly1305");
    let key = [7u8; 32];
    let ring_key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, &key).unwrap(),
    );
    let rc = ChaCha20Poly1305::new((&key).into());
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let mut buf = vec![0u8; size];
        g.bench_with_input(BenchmarkId::new("ring", size), &size, |b, _| {
            b.iter(|| {
                let nonce = ring::aead::Nonce::assume_unique_for_key([1u8; 12]);
                let tag = ring_key
                    .seal_in_place_separate_tag(nonce, ring::aead::Aad::empty(), &mut buf)
                    .unwrap();
                let _ = black_box(tag);
            })
        });
        g.bench_with_input(BenchmarkId::new("rustcrypto", size), &size, |b, _| {
            b.iter(|| {
                let tag = rc
                    .encrypt_in_place_detached((&[1u8; 12]).into(), b"", &mut buf)
                    .unwrap();
                let _ = black_box(tag);
            })
        });
    }
    g.finish();
}

/// The tunnels under test, each as the real processes a customer runs (Ewii's `ewii-hub` and
/// `ewii-client`, the bare-quinn reference, rathole `noise` when installed), forwarding to one
/// echo service that has a thread of its own; and the echo service directly, the ceiling.
/// Criterion's IDs: `direct_tcp`, `bare_quinn`, `rathole_noise`, `ewii`.
struct Tunnels {
    entries: Vec<(&'static str, SocketAddr)>,
    running: Vec<Running>,
    setup: Setup,
}

impl Drop for Tunnels {
    fn drop(&mut self) {
        for r in self.running.drain(..) {
            r.stop();
        }
    }
}

/// Where Ewii's binaries are: `$EWII_BENCH_BINS` (scripts/bench: the images' static binaries,
/// from scripts/image-bins), else beside this package's own binaries (a `cargo build
/// --release -p ewii` in the same target directory).
fn ewii_bins() -> Result<PathBuf, String> {
    let quinn_ref = PathBuf::from(env!("CARGO_BIN_EXE_ewii-quinn-ref"));
    let dir = match std::env::var_os("EWII_BENCH_BINS") {
        Some(d) => PathBuf::from(d),
        None => quinn_ref.parent().map(PathBuf::from).unwrap_or_default(),
    };
    match ["ewii-hub", "ewii-client"]
        .iter()
        .find(|b| !dir.join(b).exists())
    {
        Some(b) => Err(format!(
            "{b} is not in {}: run scripts/bench, or set EWII_BENCH_BINS",
            dir.display()
        )),
        None => Ok(dir),
    }
}

fn start_tunnels(rt: &tokio::runtime::Runtime) -> anyhow::Result<Tunnels> {
    let dir = ewii_bins().map_err(anyhow::Error::msg)?;
    let peers = std::env::var_os("EWII_BENCH_PEERS")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    let bins = Bins {
        hub: dir.join("ewii-hub"),
        client: dir.join("ewii-client"),
        client_ebpf: dir.join("ewii-client"),
        quinn_ref: PathBuf::from(env!("CARGO_BIN_EXE_ewii-quinn-ref")),
        rathole: find_program("rathole", peers.as_deref()),
        bore: None,
        candidate: None,
    };
    let echo = load::echo_service()?;
    // No bulk service here: the second entry each system forwards goes to the echo service too.
    let setup = Setup::new(bins.clone(), Services { echo, iperf: echo })?;
    let mut tunnels = Tunnels {
        entries: vec![("direct_tcp", echo)],
        running: vec![],
        setup,
    };
    let mut systems = vec![("bare_quinn", Kind::QuinnRef), ("ewii", Kind::Ewii)];
    match bins.rathole {
        Some(_) => systems.insert(1, ("rathole_noise", Kind::RatholeNoise)),
        None => eprintln!(
            "tunnel benches: rathole is not installed, so rathole_noise is left out \
             (scripts/bench installs it)"
        ),
    }
    for (id, kind) in systems {
        let running = rt.block_on(tunnels.setup.start(kind))?;
        tunnels.entries.push((id, running.echo));
        tunnels.running.push(running);
    }
    Ok(tunnels)
}

/// One query of `size` bytes each way, and new queries, through each tunnel on loopback.
fn tunnel(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tunnels = match start_tunnels(&rt) {
        Ok(t) => t,
        // Asked for Ewii's binaries by name (scripts/bench does): a failure is the run's.
        Err(e) if std::env::var_os("EWII_BENCH_BINS").is_some() => {
            panic!("tunnel benches: {e:#}")
        }
        Err(e) => {
            eprintln!("tunnel benches NOT RUN: {e:#}");
            return;
        }
    };
    let mut g = c.benchmark_group("tunnel_echo");
    g.measurement_time(Duration::from_secs(5));
    g.sample_size(10);
    for size in [16 * 1024usize, 1024 * 1024] {
        g.throughput(Throughput::Bytes(2 * size as u64));
        let data = vec![0x5au8; size];
        for (id, entry) in &tunnels.entries {
            g.bench_with_input(BenchmarkId::new(*id, size), &size, |b, _| {
                b.iter(|| rt.block_on(ewii_benches_roundtrip(*entry, &data)))
            });
        }
    }
    g.finish();
    // A new query: connect → 1-byte echo → close (Ewii: the requester's byte travels with
    // `Open`).
    let mut g = c.benchmark_group("tunnel_new_query");
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    for (id, entry) in &tunnels.entries {
        g.bench_function(*id, |b| {
            b.iter(|| rt.block_on(ewii_benches_roundtrip(*entry, b"x")))
        });
    }
    g.finish();
    drop(tunnels);
}

async fn ewii_benches_roundtrip(addr: SocketAddr, data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let payload = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(data.len());
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), data.len());
}

criterion_group!(benches, codec, policy, seal, tunnel);
criterion_main!(benches);
