//! End-to-end tests: one binary, one module per area (link time matters on two cores).
//!
//! Test names carry the promise ids of DESIGN §2 they prove: `grep -r p4_ tests/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod backlog;
mod clients;
mod clock;
mod crash;
mod enrol;
mod faults;
mod fleet;
mod hostile;
mod image;
mod kernel;
mod lifecycle;
mod load;
mod manifests;
mod mtls;
mod netns;
mod postgres;
mod process;
mod scale;
mod soak;
mod spire;
mod tunnel;
mod udp;
mod verify;
mod walkthrough;
