//! Lays out the Client's code so that what an idle Client runs sits together (issue 8's idle
//! memory target; docs/benchmarks.md, "The Client's code layout").
//!
//! An idle Client's memory is mostly the pages of its own binary that the kernel maps in, and
//! the kernel maps them 64 KiB at a time around each page touched. The linker puts functions
//! in the order the compiler hands them over, so the ~240 pages an idle Client touches were
//! spread over the whole text. `link/client-hot.txt` lists, in order, the sections that
//! `scripts/code-order` saw a Client touch (idle first, then under load); LLD places them first.
//! The `ebpf` build has its own list, `link/client-hot-ebpf.txt`: it compiles this crate with
//! other features, so many of its symbols carry other names.
//!
//! The list changes the order of code only, never what is linked: a name that is gone (another
//! compiler, a dependency bump) is skipped silently, so a stale list makes the binary larger at
//! idle, never wrong. `scripts/image-bins` reports how much of the list a build found.
//!
//! Set `EWII_LINK_MAP=<file>` to have the linker also write its map there (`scripts/code-order`
//! reads it to turn touched pages into names).
use std::env;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    // Cargo sets CARGO_FEATURE_<NAME> for a build script whose package has the feature on.
    let file = if env::var_os("CARGO_FEATURE_EBPF").is_some() {
        "client-hot-ebpf.txt"
    } else {
        "client-hot.txt"
    };
    let list = manifest.join("link").join(file);
    println!("cargo:rerun-if-changed={}", list.display());
    println!("cargo:rerun-if-env-changed=EWII_LINK_MAP");

    let skipped = if !list.is_file() {
        Some(format!("{} is missing", list.display()))
    } else if !linked_by_lld() {
        Some("not rustc's default linker (LLD) on x86_64 Linux".to_owned())
    } else {
        None
    };
    if let Some(why) = skipped {
        if env::var_os("EWII_LINK_MAP").is_some() {
            println!("cargo:warning=the Client's code layout and link map are skipped: {why}");
        }
        return;
    }
    // One linker option per `-Xlinker`, so that a path may hold a comma (`-Wl,` would split it).
    let arg = |a: &str| {
        println!("cargo:rustc-link-arg-bin=ewii-client=-Xlinker");
        println!("cargo:rustc-link-arg-bin=ewii-client={a}");
    };
    let Some(list) = list.to_str() else {
        println!("cargo:warning=the Client's code layout is skipped: its path is not UTF-8");
        return;
    };
    arg(&format!("--symbol-ordering-file={list}"));
    // Names the list has and this build has not (see above) are expected, not news.
    arg("--no-warn-symbol-ordering");
    if let Some(map) = env::var_os("EWII_LINK_MAP").filter(|m| !m.is_empty()) {
        let Some(map) = map.to_str().map(str::to_owned) else {
            println!("cargo:warning=EWII_LINK_MAP is not UTF-8: no link map is written");
            return;
        };
        arg(&format!("-Map={map}"));
        // Mangled names, as the list holds them.
        arg("--no-demangle");
    }
}

/// Whether the link is rustc's default on x86_64 Linux (glibc) since 1.90: `cc` driving the
/// bundled LLD. Another target, a linker of the user's (`linker = …` in .cargo/config,
/// `-C linker=…`, `-C link-arg=-fuse-ld=…`) or another linker flavour gets no flags: GNU ld and
/// others spell the option differently or lack it, and the build must not fail for a layout.
fn linked_by_lld() -> bool {
    let var = |k: &str| env::var(k).unwrap_or_default();
    for k in ["RUSTC_LINKER", "CARGO_ENCODED_RUSTFLAGS"] {
        println!("cargo:rerun-if-env-changed={k}");
    }
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    // Exactly this target: x32 (`…-gnux32`) also reads x86_64/linux/gnu and links with GNU ld.
    var("TARGET") == "x86_64-unknown-linux-gnu"
        && env::var_os("RUSTC_LINKER").is_none()
        && !flags
            .split('\x1f')
            .any(|f| f.contains("linker") || f.contains("fuse-ld"))
}
