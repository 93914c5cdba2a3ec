//! ewii-benches — measurement, never assertion.
//!
//! - `benches/core.rs` (criterion): the frame codec, the allow-list decision, the
//!   ChaCha20-Poly1305 seal (ring, which QUIC uses, against RustCrypto's crate), and the
//!   tunnel end to end on loopback: Ewii's Hub and Client, the bare-quinn reference and
//!   rathole `noise`, each as its own processes (`compare::systems`), against direct TCP.
//! - `ewii-compare` (`scripts/compare`): Ewii against raw TCP, a bare-quinn reference
//!   (`ewii-quinn-ref`), rathole (`noise` and `tcp`) and bore — bulk, CPU per GiB, round trips,
//!   connection rates, agent memory — in one run with the systems interleaved, written to
//!   `benches/results/` as a Markdown report and an SVG chart.
#![forbid(unsafe_code)]

pub mod compare;
pub mod host;
