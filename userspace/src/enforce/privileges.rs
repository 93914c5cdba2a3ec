//! Giving up every privilege once the layers are in, so that no code that runs later in the
//! process — a bug, a compromised dependency — can undo them (DESIGN §7: the lock must survive
//! the process it guards).
//!
//! In this order, while the process still has one thread (capabilities are per thread, and
//! every thread created later inherits the caller's): the bounding set is emptied where the
//! process may (it takes CAP_SETPCAP, which a container that adds only BPF and NET_ADMIN does
//! not give: its bounding set then stays those two, and nothing can raise them again); the
//! ambient set is cleared; the permitted, effective and inheritable sets are emptied;
//! `no_new_privs` is set (an `execve` can never grant a capability, set-uid or file
//! capabilities included); the process is made not dumpable (another process of the same
//! user cannot ptrace it or read its memory, and no core file holds its keys). Then
//! `/proc/self/status` is read back: the layer is `active` only when what it shows is what
//! was asked.

use super::{Layer, LayerState};

const COVERS: &str = "no capability left (permitted, effective, inheritable, ambient), no_new_privs, not dumpable: nothing in this process can regain what attached the lock";

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_V3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What `/proc/self/status` says about this thread's privileges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Privileges {
    /// `CapInh`, `CapPrm`, `CapEff`, `CapBnd`, `CapAmb` as masks.
    pub inheritable: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Effective set.
    pub effective: u64,
    /// Bounding set.
    pub bounding: u64,
    /// Ambient set.
    pub ambient: u64,
    /// `NoNewPrivs`.
    pub no_new_privs: bool,
    /// `Threads` of the process.
    pub threads: u32,
}

impl Privileges {
    /// Reads this thread's `/proc/self/status`.
    pub fn read() -> Result<Self, String> {
        let status = std::fs::read_to_string("/proc/thread-self/status")
            .or_else(|_| std::fs::read_to_string("/proc/self/status"))
            .map_err(|e| format!("/proc/self/status: {e}"))?;
        let field = |name: &str| -> Result<&str, String> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .ok_or_else(|| format!("no {name} in /proc/self/status"))
        };
        let mask = |name: &str| -> Result<u64, String> {
            u64::from_str_radix(field(name)?, 16).map_err(|e| format!("{name}: {e}"))
        };
        Ok(Self {
            inheritable: mask("CapInh")?,
            permitted: mask("CapPrm")?,
            effective: mask("CapEff")?,
            bounding: mask("CapBnd")?,
            ambient: mask("CapAmb")?,
            no_new_privs: field("NoNewPrivs")? == "1",
            threads: field("Threads")?
                .parse()
                .map_err(|e| format!("Threads: {e}"))?,
        })
    }
}

/// Drops every privilege of this (single-threaded) process and reports what is left.
pub fn drop_all() -> Layer {
    let layer = |state, detail: String| Layer::new("privileges", state, COVERS.into(), detail);
    match Privileges::read() {
        Ok(p) if p.threads != 1 => {
            return layer(
                LayerState::Failed,
                format!(
                    "{} threads already run: capabilities are per thread, so they must be dropped before any other thread exists",
                    p.threads
                ),
            )
        }
        Ok(_) => {}
        Err(e) => return layer(LayerState::Failed, e),
    }
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(63)
        .min(63);
    for cap in 0..=last_cap {
        // EPERM without CAP_SETPCAP: what is left is reported below, and cannot be used.
        // SAFETY: prctl with integer arguments only.
        let _ = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    }
    let mut errors = Vec::new();
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        errors.push(format!("ambient: {}", std::io::Error::last_os_error()));
    }
    let header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset(2) reads one header and two data structs (version 3), both valid and
    // #[repr(C)] with the kernel's layout.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    if rc != 0 {
        errors.push(format!("capset: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        errors.push(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        errors.push(format!("dumpable: {}", std::io::Error::last_os_error()));
    }
    let after = match Privileges::read() {
        Ok(p) => p,
        Err(e) => return layer(LayerState::Failed, e),
    };
    let left = after.inheritable | after.permitted | after.effective | after.ambient;
    if left != 0 || !after.no_new_privs || !errors.is_empty() {
        return layer(
            LayerState::Failed,
            format!(
                "privileges left: permitted {:#x}, effective {:#x}, inheritable {:#x}, ambient {:#x}, no_new_privs {}{}{}",
                after.permitted,
                after.effective,
                after.inheritable,
                after.ambient,
                after.no_new_privs,
                if errors.is_empty() { "" } else { "; " },
                errors.join("; ")
            ),
        );
    }
    let bounding = if after.bounding == 0 {
        "bounding set empty".to_owned()
    } else {
        format!(
            "bounding set {:#x} (emptying it takes CAP_SETPCAP; with nothing permitted and no_new_privs it cannot be used)",
            after.bounding
        )
    };
    layer(
        LayerState::Active,
        format!("capabilities dropped (read back from /proc: none permitted, effective, inheritable or ambient; {bounding}); no_new_privs; not dumpable"),
    )
}

/// Raises the soft limit of open files towards `wanted` (never above the hard limit, never
/// lowered): each query holds a socket, and the usual soft limit of 1,024 would refuse a
/// busy Client's dials long before `max_queries`. Returns the soft limit now in force.
pub fn raise_open_files(wanted: u64) -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the kernel to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let target = wanted.min(lim.rlim_max);
    if target > lim.rlim_cur {
        let new = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `new` is a valid rlimit; the soft limit stays within the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        return Ok(target);
    }
    Ok(lim.rlim_cur)
}
