//! Compiles the cgroup programs with clang into OUT_DIR (eBPF in Rust would need `rust-src`).
//! A build script reports failure by panicking with a message; that is what these do.
#![allow(clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() {
        Ok("x86_64") => "x86_64",
        Ok("aarch64") => "aarch64",
        Ok(other) => panic!("ewii-ebpf: no multiarch include dir known for {other}"),
        Err(_) => "x86_64",
    };
    println!("cargo:rerun-if-changed=egress.bpf.c");
    println!("cargo:rerun-if-changed=egress.h");
    let obj = out.join("egress.bpf.o");
    let status = Command::new(std::env::var("CLANG").unwrap_or_else(|_| "clang".into()))
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{arch}-linux-gnu"))
        .args(["-c", "egress.bpf.c", "-o"])
        .arg(&obj)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "ewii-ebpf: cannot run clang ({e}); install it: apt-get install clang libbpf-dev"
            )
        });
    assert!(
        status.success(),
        "ewii-ebpf: clang failed to compile egress.bpf.c (needs libbpf-dev for bpf/bpf_helpers.h)"
    );
}
