//! The binaries start and describe themselves. (This file also makes `cargo test` and
//! `cargo nextest run` build the binaries that the end-to-end tests in `tests/` run.)
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn version(bin: &str) -> String {
    let out = Command::new(bin).arg("--version").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn binaries_report_their_version() {
    let v = env!("CARGO_PKG_VERSION");
    assert_eq!(
        version(env!("CARGO_BIN_EXE_ewii-client")),
        format!("ewii-client {v}\n")
    );
    assert_eq!(
        version(env!("CARGO_BIN_EXE_ewii-hub")),
        format!("ewii-hub {v}\n")
    );
}

#[test]
fn health_without_a_status_file_fails_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ewii-client"))
        .args(["health", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("status.json"));
}
