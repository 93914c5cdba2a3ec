//! ewii — the Ewii Client and Hub: every piece of I/O lives here.
//!
//! Decisions (frames, policy, SPIFFE IDs, backoff, the session machine, audit records) come from
//! `ewii-common`; this crate moves bytes, keys and files.
//!
//! - [`config`]: the Client's and the Hub's TOML configuration, parsed into typed values.
//! - [`identity`]: the Hub CA, CSRs, the SVID store on disk, and the SPIFFE verifiers that
//!   both sides run on every handshake.
//! - [`transport`]: rustls and quinn configuration (TLS 1.3, ChaCha20-Poly1305 only), frame I/O
//!   on QUIC streams, and the byte pipe between a TCP socket and a QUIC stream.
//! - [`audit`]: audit sinks (stdout, file, in-memory tap), written by a dedicated thread.
//! - [`enforce`]: kernel layers under the Dialer — Landlock, seccomp, the eBPF egress lock —
//!   and their self-proofs; glibc's heap settings; the Hub's datagram steering. The only module
//!   with `unsafe` code.
//! - [`hub`]: the Hub: QUIC listener, enrolment, sessions, service listeners, SQLite state.
//! - [`client`]: the Client: enrolment, the reconnecting session, the [`client::dialer`],
//!   and the status file read by `ewii-client status` and `health`.
//! - `clock`: the wall clock, with its steps and the host's suspends told from its running.
//! - [`logging`]: stderr logs filtered by `EWII_LOG`.
//! - [`quickstart`]: the self-contained demo run by `ewii-quickstart`.
//! - [`signal`]: SIGTERM/SIGINT as a shutdown future.
//! - [`webhook`]: Standard Webhooks signing (Ed25519 `v1a`), verification, target checks.
#![deny(unsafe_code)]

pub mod audit;
pub mod client;
pub(crate) mod clock;
pub mod config;
#[allow(unsafe_code)]
// raw syscalls of the probes, the eBPF map types, mallopt, two socket options; nowhere else
pub mod enforce;
pub mod hub;
pub mod identity;
pub mod logging;
pub mod quickstart;
pub mod signal;
pub mod transport;
pub mod webhook;

/// Microseconds since the Unix epoch, for audit records and certificate validity.
pub fn now_timestamp() -> ewii_common::time::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    ewii_common::time::Timestamp(d.as_micros() as u64)
}

/// Build string sent in `Hello` and printed by `--version`.
pub const BUILD: &str = concat!("ewii ", env!("CARGO_PKG_VERSION"));
