//! The eBPF egress lock (feature `ebpf`, aya 0.14): cgroup programs attached to the Client's
//! own cgroup, so the lock holds for every process in the container, whatever code runs.
//!
//! The cgroup is found from `/proc/self/cgroup` and the cgroup2 mount in `mountinfo`. The
//! host's root cgroup is refused (inode 1, or our pid not in its `cgroup.procs`): attaching
//! there would filter the whole machine. So is a cgroup the Client shares with other processes
//! (a login session's, when it is run from a shell): the lock would confine them too, and
//! outlive the Client there. Maps are filled before the programs attach, so the
//! Hub is never cut off.
//!
//! How the programs are held ([`Hold`]): for `run`, by the cgroup itself (`BPF_PROG_ATTACH`,
//! not a bpf link), and every map and program descriptor is closed once they are attached — so
//! nothing in the process (a descriptor closed, reused or misused) can lift or widen the lock,
//! and it outlives a crash of the Client until the cgroup is removed. For `probe-enforcement`,
//! by the process's bpf links, so that the probe leaves nothing behind.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, RingBuf};
use aya::programs::links::FdLink;
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError,
};
use aya::{Ebpf, EbpfLoader};
use ewii_common::egress::{DenyEvent, Hook, Key, Key4, Key6, Rule};

use super::{probe, DenySource, Plan};

/// Why the lock could not be attached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EbpfError {
    /// The cgroup could not be found or must not be used.
    #[error("cgroup: {0}")]
    Cgroup(String),
    /// Loading, filling or attaching failed (often: missing CAP_BPF / CAP_NET_ADMIN).
    #[error("{0}")]
    Bpf(String),
}

fn bpf_err(what: &str) -> impl Fn(String) -> EbpfError + '_ {
    move |e| EbpfError::Bpf(format!("{what}: {e}"))
}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct K4(Key4);
// SAFETY: Key4 is #[repr(C)] with only u8 and [u8; N] fields: no padding, no invalid bit
// patterns, so it may be copied to and from the kernel as bytes.
unsafe impl aya::Pod for K4 {}

#[repr(transparent)]
#[derive(Clone, Copy)]
struct K6(Key6);
// SAFETY: as for K4: #[repr(C)], u8 fields only.
unsafe impl aya::Pod for K6 {}

/// Who holds the attached programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The cgroup (`BPF_PROG_ATTACH` in the exclusive mode): no descriptor of this process
    /// keeps the programs, so none can lift the lock; they stay until the cgroup is removed
    /// (a later Client in the same cgroup replaces them). For `run`.
    Cgroup,
    /// This process's bpf links: the lock ends when the process does. For the probe.
    Process,
}

/// The kernel's count of refusals its ring buffer had no room for: the `LOST` array
/// (`BPF_F_MMAPABLE`), mapped read-only into this process before `bpf(2)` is refused to it.
/// A read-only shared mapping of a bpf map cannot be made writable again (the kernel clears
/// `VM_MAYWRITE`), and the count widens nothing.
struct LostCount(std::ptr::NonNull<u64>);

// SAFETY: the pointer is to a mapping this value owns, only read, through an atomic load.
unsafe impl Send for LostCount {}

impl LostCount {
    fn map(map: &MapData) -> Result<Self, EbpfError> {
        use std::os::fd::{AsFd, AsRawFd};
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a new mapping of the array's first value (the kernel rounds the length to a
        // page), at an address the kernel picks; nothing else refers to it.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size_of::<u64>(),
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(EbpfError::Bpf(format!(
                "LOST: mmap: {}",
                std::io::Error::last_os_error()
            )));
        }
        std::ptr::NonNull::new(at.cast())
            .map(Self)
            .ok_or_else(|| EbpfError::Bpf("LOST: mmap gave no address".into()))
    }

    fn read(&self) -> u64 {
        // SAFETY: the mapping is page-aligned, lives as long as `self`, and the kernel's
        // programs change the value only atomically (`__sync_fetch_and_add`).
        unsafe { std::sync::atomic::AtomicU64::from_ptr(self.0.as_ptr()) }
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for LostCount {
    fn drop(&mut self) {
        // SAFETY: the mapping `map` made; nothing refers to it past this value.
        unsafe {
            libc::munmap(self.0.as_ptr().cast(), size_of::<u64>());
        }
    }
}

/// The attached lock: the ring buffer of refusals, the count of those it had no room for,
/// and (held by the process) the links.
pub struct EgressLock {
    events: RingBuf<MapData>,
    lost: LostCount,
    /// Held, never read: dropping a link detaches its program ([`Hold::Process`]).
    _links: Vec<FdLink>,
    cgroup: PathBuf,
    hold: Hold,
    rules: Vec<Rule>,
    tally: [u64; Hook::ALL.len()],
}

impl std::fmt::Debug for EgressLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressLock")
            .field("cgroup", &self.cgroup)
            .field("hold", &self.hold)
            .finish_non_exhaustive()
    }
}

/// `bpf_attach_type` of each program (linux/bpf.h).
fn attach_type(program: &str) -> Option<u32> {
    Some(match program {
        "ewii_skb_egress" => 1, // BPF_CGROUP_INET_EGRESS
        "ewii_connect4" => 10,  // BPF_CGROUP_INET4_CONNECT
        "ewii_connect6" => 11,  // BPF_CGROUP_INET6_CONNECT
        "ewii_sendmsg4" => 14,  // BPF_CGROUP_UDP4_SENDMSG
        "ewii_sendmsg6" => 15,  // BPF_CGROUP_UDP6_SENDMSG
        _ => return None,
    })
}

/// The `BPF_PROG_ATTACH` part of `union bpf_attr`.
#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// `BPF_PROG_ATTACH` with no flags: the one program of this type on `cgroup`, replacing one a
/// previous Client left, and closing the cgroup's subtree to programs of its own.
fn prog_attach(
    cgroup: std::os::fd::BorrowedFd<'_>,
    prog: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    let attr = ProgAttach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: 0,
    };
    // SAFETY: bpf(2) reads `size` bytes of a valid, #[repr(C)] prefix of union bpf_attr; the
    // kernel treats the fields it does not receive as zero.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const ProgAttach,
            size_of::<ProgAttach>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl EgressLock {
    /// Attaches to this process's own cgroup with `rules`.
    pub fn attach(rules: &[Rule], hold: Hold) -> Result<Self, EbpfError> {
        let cgroup = own_cgroup()?;
        Self::attach_to(&cgroup, rules, hold)
    }

    /// Attaches to `cgroup` (which must not be the host root).
    pub fn attach_to(cgroup: &Path, rules: &[Rule], hold: Hold) -> Result<Self, EbpfError> {
        use std::os::fd::AsFd;
        refuse_root(cgroup)?;
        // Without the kernel's BTF: the programs use no CO-RE relocation, and `Ebpf::load`
        // would parse all of /sys/kernel/btf/vmlinux (megabytes, tens of milliseconds) only to
        // relocate nothing.
        let mut bpf = EbpfLoader::new()
            .btf(None)
            .load(ewii_ebpf::object())
            .map_err(|e| bpf_err("load object")(e.to_string()))?;
        fill(
            &mut bpf,
            "ALLOW4",
            rules.iter().filter_map(|r| match r.key() {
                Key::V4(k) => Some(K4(k)),
                Key::V6(_) => None,
            }),
        )?;
        fill(
            &mut bpf,
            "ALLOW6",
            rules.iter().filter_map(|r| match r.key() {
                Key::V6(k) => Some(K6(k)),
                Key::V4(_) => None,
            }),
        )?;
        let events = bpf
            .take_map("EVENTS")
            .ok_or_else(|| EbpfError::Bpf("no EVENTS map".into()))?;
        let events = RingBuf::try_from(events).map_err(|e| bpf_err("EVENTS")(e.to_string()))?;
        // Kept open until the programs are loaded: their instructions name it by descriptor.
        let Some(Map::Array(lost_map)) = bpf.take_map("LOST") else {
            return Err(EbpfError::Bpf("no LOST array".into()));
        };
        let lost = LostCount::map(&lost_map)?;
        let cg = File::open(cgroup)
            .map_err(|e| EbpfError::Cgroup(format!("{}: {e}", cgroup.display())))?;
        let mut links = Vec::new();
        for (name, _) in ewii_ebpf::PROGRAMS {
            let prog = bpf
                .program_mut(name)
                .ok_or_else(|| EbpfError::Bpf(format!("no program {name}")))?;
            let err = bpf_err(name);
            let skb = name == "ewii_skb_egress";
            if skb {
                let p: &mut CgroupSkb = prog
                    .try_into()
                    .map_err(|e: ProgramError| err(e.to_string()))?;
                p.load().map_err(|e| err(e.to_string()))?;
            } else {
                let p: &mut CgroupSockAddr = prog
                    .try_into()
                    .map_err(|e: ProgramError| err(e.to_string()))?;
                p.load().map_err(|e| err(e.to_string()))?;
            }
            match hold {
                Hold::Cgroup => {
                    let kind = attach_type(name)
                        .ok_or_else(|| EbpfError::Bpf(format!("no attach type for {name}")))?;
                    let fd = prog.fd().map_err(|e| err(e.to_string()))?;
                    prog_attach(cg.as_fd(), fd.as_fd(), kind)
                        .map_err(|e| err(format!("attach: {e}")))?;
                }
                Hold::Process => {
                    let link = if skb {
                        let p: &mut CgroupSkb = prog
                            .try_into()
                            .map_err(|e: ProgramError| err(e.to_string()))?;
                        let id = p
                            .attach(&cg, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
                            .map_err(|e| err(e.to_string()))?;
                        p.take_link(id).ok().and_then(|l| FdLink::try_from(l).ok())
                    } else {
                        let p: &mut CgroupSockAddr = prog
                            .try_into()
                            .map_err(|e: ProgramError| err(e.to_string()))?;
                        let id = p
                            .attach(&cg, CgroupAttachMode::Single)
                            .map_err(|e| err(e.to_string()))?;
                        p.take_link(id).ok().and_then(|l| FdLink::try_from(l).ok())
                    };
                    links.push(link.ok_or_else(|| err("the kernel gave no bpf link".into()))?);
                }
            }
        }
        // Every program descriptor and every map's but the ring buffer's (aya keeps it with
        // its mapping) closes here: held by the cgroup, the programs need none of them, and
        // the lost count is read through its own mapping. (With `bpf(2)` refused by seccomp,
        // the ring buffer's descriptor can change nothing.)
        drop((bpf, lost_map));
        Ok(Self {
            events,
            lost,
            _links: links,
            cgroup: cgroup.to_owned(),
            hold,
            rules: rules.to_vec(),
            tally: [0; Hook::ALL.len()],
        })
    }

    /// Who holds the programs.
    pub fn hold(&self) -> Hold {
        self.hold
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Self-test: a TCP connect and a UDP send to loopback ports the policy does not allow must
    /// both fail with EPERM.
    pub fn prove(&mut self, plan: &Plan) -> Result<String, String> {
        let port = (1..=u16::MAX)
            .rev()
            .find(|p| {
                !self.rules.iter().any(|r| r.addr.port() == *p) && !plan.tcp_ports.contains(p)
            })
            .unwrap_or(1);
        let target = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let tcp = probe::tcp_connect(target);
        let udp = probe::udp_send(target);
        if tcp == Err(libc::EPERM) && udp == Err(libc::EPERM) {
            Ok(format!(
                "attached to {}; self-test: TCP and UDP to {target} refused with EPERM",
                self.cgroup.display()
            ))
        } else {
            Err(format!(
                "attached to {}, but the self-test to {target} saw TCP {} and UDP {}",
                self.cgroup.display(),
                probe::name(&tcp),
                probe::name(&udp)
            ))
        }
    }
}

impl DenySource for EgressLock {
    fn drain(&mut self) -> Vec<DenyEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if let Some(e) = DenyEvent::parse(&item) {
                out.push(e);
            }
        }
        for e in &out {
            if let Some(i) = Hook::ALL.iter().position(|h| *h == e.hook) {
                self.tally[i] += 1;
            }
        }
        out
    }

    fn lost(&self) -> u32 {
        // The program's count is 64-bit; events carry its low 32 bits, compared the same way.
        self.lost.read() as u32
    }

    /// Refusals read from the ring buffer, by hook. (The kernel's own per-CPU counters are
    /// not read: after start-up `bpf(2)` is refused to this process.)
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Hook::ALL
            .iter()
            .zip(self.tally)
            .map(|(h, n)| (h.name(), n))
            .collect()
    }
}

/// Puts every key into hash map `name` (value 1: present).
fn fill<K: aya::Pod>(
    bpf: &mut Ebpf,
    name: &str,
    keys: impl Iterator<Item = K>,
) -> Result<(), EbpfError> {
    let map = bpf
        .map_mut(name)
        .ok_or_else(|| EbpfError::Bpf(format!("no {name} map")))?;
    let mut set: HashMap<_, K, u8> =
        HashMap::try_from(map).map_err(|e| bpf_err(name)(e.to_string()))?;
    for k in keys {
        set.insert(k, 1, 0)
            .map_err(|e| bpf_err(name)(format!("fill: {e}")))?;
    }
    Ok(())
}

/// This process's cgroup v2 directory.
pub fn own_cgroup() -> Result<PathBuf, EbpfError> {
    let cg = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| EbpfError::Cgroup(format!("/proc/self/cgroup: {e}")))?;
    let rel = cg
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| EbpfError::Cgroup("no cgroup v2 entry in /proc/self/cgroup".into()))?;
    let mount = cgroup2_mount()?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Where cgroup2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` in hybrid layouts).
pub fn cgroup2_mount() -> Result<PathBuf, EbpfError> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| EbpfError::Cgroup(format!("/proc/self/mountinfo: {e}")))?;
    mi.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
        })
        .ok_or_else(|| EbpfError::Cgroup("cgroup2 is not mounted".into()))
}

/// Refuses the host's root cgroup (inode 1, or a directory this process is not in) and a cgroup
/// shared with other processes.
fn refuse_root(cgroup: &Path) -> Result<(), EbpfError> {
    let meta = std::fs::metadata(cgroup)
        .map_err(|e| EbpfError::Cgroup(format!("{}: {e}", cgroup.display())))?;
    if meta.ino() == 1 {
        return Err(EbpfError::Cgroup(format!(
            "{} is the root cgroup: attaching there would filter the whole host; run the Client in its own cgroup (a container)",
            cgroup.display()
        )));
    }
    let me = std::process::id();
    let listed = || -> Vec<u32> {
        std::fs::read_to_string(cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|p| p.trim().parse().ok())
            .collect()
    };
    let pids = listed();
    if !pids.contains(&me) {
        return Err(EbpfError::Cgroup(format!(
            "this process is not in {}",
            cgroup.display()
        )));
    }
    let nested = nested_pid_namespace();
    let mut others: Vec<u32> = pids
        .into_iter()
        .filter(|&pid| !own_company(pid, me, nested))
        .collect();
    // One passing through (an exec probe's `runc init`, a health check) is gone a moment
    // later, or has become a run of this program; a neighbour stays what it is. Only those
    // found foreign at every look count.
    for _ in 0..STRANGER_LOOKS {
        if others.is_empty() {
            break;
        }
        std::thread::sleep(STRANGER_WAIT);
        let now = listed();
        others.retain(|&pid| now.contains(&pid) && !own_company(pid, me, nested));
    }
    if !others.is_empty() {
        return Err(EbpfError::Cgroup(format!(
            "{} holds other processes too ({}): the lock would confine them as well and stay on that cgroup after the Client exits (a login session's until it ends); run the Client in a cgroup of its own: a container, a systemd service, or `systemd-run --scope`",
            cgroup.display(),
            describe_all(&others)
        )));
    }
    Ok(())
}

/// How many more times a cgroup's other processes are looked at, [`STRANGER_WAIT`] apart.
const STRANGER_LOOKS: usize = 2;
/// See [`STRANGER_LOOKS`].
const STRANGER_WAIT: std::time::Duration = std::time::Duration::from_millis(100);
/// Processes named one by one in the refusal; the rest are counted.
const STRANGERS_NAMED: usize = 5;

/// Whether this process runs in a PID namespace below the host's (a container's), where
/// pid 1 is its init (`tini`, `sh -c`) and not the host's.
fn nested_pid_namespace() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|ids| ids.split_whitespace().count() > 1)
    })
}

/// Whether `pid`, in the Client's cgroup, is one the lock may confine with it: the Client
/// itself, the init of its own (nested) PID namespace (a container's `tini` or `sh -c`), or
/// another run of the same program (`ewii-client health` from a probe). A login shell, or
/// anything else that shares the cgroup, is not; neither is a process outside this PID
/// namespace, listed as pid 0.
fn own_company(pid: u32, me: u32, nested: bool) -> bool {
    if pid == me || (pid == 1 && nested) {
        return true;
    }
    match (
        program("/proc/self/exe"),
        program(&format!("/proc/{pid}/exe")),
    ) {
        (Some(mine), Some(theirs)) => pid != 0 && mine == theirs,
        _ => false,
    }
}

/// The file a `/proc/<pid>/exe` link names, by device and inode; `None` when it cannot be read
/// (another user's process, one not dumpable, one gone).
fn program(exe: &str) -> Option<(u64, u64)> {
    std::fs::metadata(exe).map(|m| (m.dev(), m.ino())).ok()
}

/// The refusal's list: the first few by pid and name, the rest counted, and those outside
/// this PID namespace (pid 0) counted apart.
fn describe_all(others: &[u32]) -> String {
    let outside = others.iter().filter(|&&p| p == 0).count();
    let visible: Vec<u32> = others.iter().copied().filter(|&p| p != 0).collect();
    let mut parts: Vec<String> = visible
        .iter()
        .take(STRANGERS_NAMED)
        .map(|&p| describe(p))
        .collect();
    if visible.len() > STRANGERS_NAMED {
        parts.push(format!("and {} more", visible.len() - STRANGERS_NAMED));
    }
    if outside > 0 {
        parts.push(format!("{outside} outside this PID namespace"));
    }
    parts.join(", ")
}

/// `pid 815 "bash"`, as far as /proc says; `(program unreadable)` when its executable could
/// not be compared with the Client's.
fn describe(pid: u32) -> String {
    let unreadable = if program(&format!("/proc/{pid}/exe")).is_none() {
        " (program unreadable)"
    } else {
        ""
    };
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => format!(
            "pid {pid} {:?}{unreadable}",
            ewii_common::text::printable(comm.trim())
        ),
        Err(_) => format!("pid {pid}{unreadable}"),
    }
}
