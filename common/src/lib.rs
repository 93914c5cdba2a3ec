//! ewii-common — the sans-IO core of Ewii.
//!
//! Nothing here opens a socket, reads a file or the clock: time comes in as an argument, bytes
//! come in as buffers. That keeps every decision testable without tokio and lets the Client and
//! the Hub share exactly one definition of each.
//!
//! - [`frame`]: length-prefixed, versioned frames and the messages they carry (control stream,
//!   enrolment, query headers). Decoding never panics and never allocates past [`frame::MAX_FRAME`].
//! - [`policy`]: the install-time allow-list — parsing, validation and the per-query decision.
//! - [`spiffe`]: SPIFFE IDs in canonical form and the path rules for Hub and Client identities.
//! - [`backoff`]: full-jitter exponential backoff with the randomness passed in.
//! - [`egress`]: the kernel egress lock's rules and map keys (mirrors `ebpf/egress.h`).
//! - [`session`]: the Client's session machine: dial, renew at half-life on the live connection,
//!   drain, back off, stop, revoke, expire — with time passed in.
//! - [`audit`]: audit record types and their one-line JSON rendering.
//! - [`time`]: UTC timestamps rendered as RFC 3339 with microseconds.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod backoff;
pub mod egress;
pub mod frame;
pub mod policy;
pub mod session;
pub mod spiffe;
pub mod text;
pub mod time;
