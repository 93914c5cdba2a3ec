//! The eBPF egress lock (feature `ebpf`, aya 0.14): cgroup programs attached to the Client's
//! own cgroup, so the lock holds for every process in the container, whatever code runs.
//!
//! The cgroup is found from `/proc/self/cgroup` and the cgroup2 mount in `mountinfo`. The
//! host's root cgroup is refused (inode 1, or our pid not in its `cgroup.procs`): attaching
//! there would filter the whole machine. Maps are filled before the programs attach, so the
//! Hub is never cut off. Links are pinned in a bpffs when one is mounted at /sys/fs/bpf, so a
//! crash of the Client does not lift the lock; otherwise `status` says so.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr};
use aya::Ebpf;
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

/// The attached lock. Dropping it detaches the programs (unless pinned).
pub struct EgressLock {
    bpf: Ebpf,
    events: RingBuf<MapData>,
    cgroup: PathBuf,
    pinned: bool,
    rules: Vec<Rule>,
}

impl std::fmt::Debug for EgressLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressLock")
            .field("cgroup", &self.cgroup)
            .field("pinned", &self.pinned)
            .finish_non_exhaustive()
    }
}

impl EgressLock {
    /// Attaches to this process's own cgroup with `rules`.
    pub fn attach(rules: &[Rule]) -> Result<Self, EbpfError> {
        let cgroup = own_cgroup()?;
        Self::attach_to(&cgroup, rules)
    }

    /// Attaches to `cgroup` (which must not be the host root).
    pub fn attach_to(cgroup: &Path, rules: &[Rule]) -> Result<Self, EbpfError> {
        refuse_root(cgroup)?;
        let mut bpf =
            Ebpf::load(ewii_ebpf::object()).map_err(|e| bpf_err("load object")(e.to_string()))?;
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
        let cg = File::open(cgroup)
            .map_err(|e| EbpfError::Cgroup(format!("{}: {e}", cgroup.display())))?;
        let pin_dir = pin_dir(cgroup);
        if let Some(dir) = &pin_dir {
            // Links a crashed Client left pinned are replaced by ours.
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir)
                .map_err(|e| bpf_err("bpffs pin directory")(e.to_string()))?;
        }
        for (name, _) in ewii_ebpf::PROGRAMS {
            let prog = bpf
                .program_mut(name)
                .ok_or_else(|| EbpfError::Bpf(format!("no program {name}")))?;
            let link = if name == "ewii_skb_egress" {
                let p: &mut CgroupSkb = prog
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| bpf_err(name)(e.to_string()))?;
                p.load().map_err(|e| bpf_err(name)(e.to_string()))?;
                let id = p
                    .attach(&cg, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
                    .map_err(|e| bpf_err(name)(e.to_string()))?;
                p.take_link(id)
                    .ok()
                    .and_then(|l| aya::programs::links::FdLink::try_from(l).ok())
            } else {
                let p: &mut CgroupSockAddr = prog
                    .try_into()
                    .map_err(|e: aya::programs::ProgramError| bpf_err(name)(e.to_string()))?;
                p.load().map_err(|e| bpf_err(name)(e.to_string()))?;
                let id = p
                    .attach(&cg, CgroupAttachMode::Single)
                    .map_err(|e| bpf_err(name)(e.to_string()))?;
                p.take_link(id)
                    .ok()
                    .and_then(|l| aya::programs::links::FdLink::try_from(l).ok())
            };
            let Some(link) = link else {
                return Err(EbpfError::Bpf(format!(
                    "{name}: the kernel gave no bpf link"
                )));
            };
            match &pin_dir {
                Some(dir) => {
                    // The pin holds the link; our fd can go.
                    link.pin(dir.join(name))
                        .map_err(|e| bpf_err("pin")(e.to_string()))?;
                }
                // Keep the link alive for as long as the process runs.
                None => std::mem::forget(link),
            }
        }
        Ok(Self {
            bpf,
            events,
            cgroup: cgroup.to_owned(),
            pinned: pin_dir.is_some(),
            rules: rules.to_vec(),
        })
    }

    /// Whether the links are pinned in a bpffs.
    pub fn pinned(&self) -> bool {
        self.pinned
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
        out
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let Some(map) = self.bpf.map("DENIES") else {
            return Vec::new();
        };
        let Ok(arr) = PerCpuArray::<_, u64>::try_from(map) else {
            return Vec::new();
        };
        Hook::ALL
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let n = arr.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
                (h.name(), n)
            })
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

/// Refuses the host's root cgroup: inode 1, or a directory this process is not in.
fn refuse_root(cgroup: &Path) -> Result<(), EbpfError> {
    let meta = std::fs::metadata(cgroup)
        .map_err(|e| EbpfError::Cgroup(format!("{}: {e}", cgroup.display())))?;
    if meta.ino() == 1 {
        return Err(EbpfError::Cgroup(format!(
            "{} is the root cgroup: attaching there would filter the whole host; run the Client in its own cgroup (a container)",
            cgroup.display()
        )));
    }
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    let me = std::process::id().to_string();
    if !procs.lines().any(|p| p.trim() == me) {
        return Err(EbpfError::Cgroup(format!(
            "this process is not in {}",
            cgroup.display()
        )));
    }
    Ok(())
}

/// `/sys/fs/bpf/ewii-<cgroup inode>` when /sys/fs/bpf is a bpffs.
fn pin_dir(cgroup: &Path) -> Option<PathBuf> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let root = Path::new("/sys/fs/bpf");
    let c = std::ffi::CString::new("/sys/fs/bpf").ok()?;
    // SAFETY: statfs(2) fills the zeroed struct we pass; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid, writable statfs.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        return None;
    }
    let ino = std::fs::metadata(cgroup).ok()?.ino();
    Some(root.join(format!("ewii-{ino}")))
}
