//! ewii-benches — measurement, never assertion.
//!
//! - `benches/core.rs` (criterion): the frame codec, the allow-list decision, the
//!   ChaCha20-Poly1305 seal (ring, which QUIC uses, against RustCrypto's crate), and the
//!   tunnel end to end through a real Hub and Client on loopback.
//! - `ewii-compare` (`cargo run --release -p ewii-benches --bin ewii-compare`): throughput of a
//!   direct TCP connection, of the tunnel, and of the tunnel with the eBPF egress lock on, in
//!   one run with the configurations interleaved, reported as ratios.
#![forbid(unsafe_code)]
