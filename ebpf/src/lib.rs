//! ewii-ebpf — the kernel side of the Client's egress lock.
//!
//! The cgroup programs are written in C (`egress.bpf.c`, map ABI in `egress.h`) because eBPF in
//! Rust needs `rust-src`, which this toolchain does not ship. They arrive with the kernel-lock
//! work (the `ebpf` feature of `ewii`); until then this crate exposes no object.
#![forbid(unsafe_code)]
