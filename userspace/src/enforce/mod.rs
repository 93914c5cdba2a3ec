//! Kernel enforcement of the Client's egress (DESIGN §7): every layer below the Dialer.
//!
//! - [`landlock`]: Landlock ABI ≥ 4 — TCP connect only to allow-listed ports, no TCP bind.
//!   Unprivileged.
//! - [`seccomp`]: no `listen`/`accept`/`accept4`, no io_uring, no MPTCP sockets, no
//!   `MSG_FASTOPEN` sends. Unprivileged.
//! - `ebpf` (feature `ebpf`): cgroup programs that allow only the Hub (UDP) and the
//!   allow-list (TCP) for every process in the Client's cgroup. Needs CAP_BPF + CAP_NET_ADMIN.
//! - [`privileges`]: every capability dropped, `no_new_privs`, not dumpable — after the lock
//!   is attached, so that nothing later in the process can undo it.
//! - [`heap`]: not a layer: glibc's allocator settings (freed heap kept under bulk load and
//!   returned when quiet), here because they are foreign calls.
//! - [`code`]: not a layer: the Client's start-up code handed back to the kernel once it serves
//!   (`MADV_PAGEOUT` of the program's read-only segments), here because it is a foreign call.
//! - [`steer`]: not a layer: the Hub's `SO_ATTACH_REUSEPORT_CBPF` (each datagram to the shard
//!   that owns its connection), here because it is a foreign call.
//! - [`probe`]: the self-proof — a deliberate connection the policy forbids must fail with the
//!   layer's own error, or the layer does not count as active.
//!
//! Layers are installed by the binary before the tokio runtime starts its threads (Landlock
//! binds the calling thread and its future children; seccomp is synchronised to all threads).
//! This is the one module with `unsafe` code: raw syscalls for the probes, `capset`/`prctl` to
//! drop privileges, `bpf(BPF_PROG_ATTACH)` for a lock held by the cgroup, `mallopt`, `madvise`
//! of the program's own code, and one socket option.

pub mod code;
pub mod heap;
pub mod landlock;
pub mod privileges;
pub mod probe;
pub mod seccomp;
pub mod steer;
pub mod tcp_info;

#[cfg(feature = "ebpf")]
pub mod ebpf;

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use ewii_common::audit::{AuditRecord, Destination, Event, Outcome};
use ewii_common::egress::{self, DenyEvent, Rule};
use ewii_common::policy::{AllowList, Host};
use serde::{Deserialize, Serialize};

use crate::audit::Audit;
use crate::config::ClientConfig;
pub use crate::config::Require;

/// One layer's state after installation and self-proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// `ebpf`, `landlock`, `seccomp`.
    pub name: String,
    /// Installed and proven by its probe.
    pub active: bool,
    /// `active`, `unavailable` (this host or build cannot offer it: no privilege, no kernel
    /// support, no feature) or `failed` (installed, but its self-test did not see it work).
    #[serde(default)]
    pub state: LayerState,
    /// What it covers.
    pub covers: String,
    /// Why it is inactive, or what its probe saw.
    pub detail: String,
}

/// Where a layer stands. Only `failed` means something is wrong with a layer that should work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerState {
    /// Installed and proven.
    Active,
    /// Not offered here (privilege, kernel, build).
    #[default]
    Unavailable,
    /// Installed, but its self-test failed.
    Failed,
}

impl Layer {
    /// A layer in `state`.
    pub fn new(name: &str, state: LayerState, covers: String, detail: String) -> Self {
        Self {
            name: name.into(),
            active: state == LayerState::Active,
            state,
            covers,
            detail,
        }
    }
}

/// All layers, as written to the status file and the `enforcement` audit record.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Report {
    /// Every layer tried, in installation order.
    pub layers: Vec<Layer>,
    /// What the active layers leave uncovered, in words ([`Report::gaps`]).
    #[serde(default)]
    pub not_covered: Vec<String>,
    /// The addresses each DNS allow-list entry resolved to at start (checked answers only):
    /// what the eBPF lock holds, and where the Dialer starts.
    #[serde(default)]
    pub addresses: std::collections::BTreeMap<String, Vec<SocketAddr>>,
    /// The answers refused at start, with why, by entry name ([`Plan::refused`]).
    #[serde(default)]
    pub refused_answers: std::collections::BTreeMap<String, Vec<String>>,
}

impl Report {
    /// The report of a Client run as a library, with no kernel layer installed.
    pub fn library() -> Self {
        Self {
            layers: vec![Layer::new(
                "dialer",
                LayerState::Active,
                "the Client's own code opens sockets only to allow-list entries".into(),
                "kernel layers are installed by the ewii-client binary".into(),
            )],
            not_covered: vec![
                "no kernel layer: a Client run as a library installs none (the ewii-client binary does), so only its own code keeps to the allow-list".into(),
            ],
            addresses: Default::default(),
            refused_answers: Default::default(),
        }
    }

    /// What the active layers leave uncovered: said plainly, so that a customer who runs
    /// without the eBPF lock knows what reaches the network unchecked by the kernel.
    /// `resolvers` are the nameservers the lock lets through (none when no name is used).
    pub fn gaps(&self, resolvers: &[IpAddr]) -> Vec<String> {
        let mut out = Vec::new();
        if self.active("ebpf") {
            out.push(
                "the host's administrator (or a process added from outside with the container's capabilities) can detach the lock".into(),
            );
            if !resolvers.is_empty() {
                let list: Vec<String> = resolvers.iter().map(IpAddr::to_string).collect();
                out.push(format!(
                    "DNS from every process in the container to the resolvers ({}, port 53, UDP and TCP): a recursive resolver asks the Internet for any name, so data can leave in the names asked (DNS tunnelling); with the Hub and every allow-list entry written as addresses the lock lets no resolver through",
                    list.join(", ")
                ));
            }
            return out;
        }
        out.push(if self.active("landlock") {
            "TCP from this process to any address on an allow-listed port, and on port 53 when the configuration names hosts (DNS over TCP; Landlock checks ports, not addresses)".into()
        } else {
            "TCP from this process to any address and port (only the Client's own code keeps to the allow-list)".into()
        });
        out.push(
            "UDP from this process to any address (only the Client's own code keeps QUIC to the Hub and DNS to the resolvers)".into(),
        );
        if !self.active("seccomp") && !self.active("privileges") {
            out.push("ICMP and raw packets, when this process holds CAP_NET_RAW".into());
        }
        out.push(
            "other processes in the container (no kernel layer covers them without the eBPF lock)"
                .into(),
        );
        out
    }

    /// Whether layer `name` is active.
    pub fn active(&self, name: &str) -> bool {
        self.layers.iter().any(|l| l.name == name && l.active)
    }

    /// Checks `require`; `Err` says why the Client must not start.
    pub fn check(&self, require: Require) -> Result<(), EnforceError> {
        let kernel = self.active("ebpf");
        let any = kernel || self.active("landlock") || self.active("seccomp");
        match require {
            Require::Kernel if !kernel => Err(EnforceError::Required {
                require,
                why: self.inactive_reasons(),
            }),
            Require::Any if !any => Err(EnforceError::Required {
                require,
                why: self.inactive_reasons(),
            }),
            _ => Ok(()),
        }
    }

    /// What each layer that is not active said; with none of the kernel layers tried (a
    /// Client run as a library, or `[enforcement] layers` without them), which layers are in
    /// place and what they leave uncovered.
    fn inactive_reasons(&self) -> String {
        let inactive: Vec<String> = self
            .layers
            .iter()
            .filter(|l| !l.active)
            .map(|l| format!("{}: {}", l.name, l.detail))
            .collect();
        if inactive.is_empty() {
            let tried: Vec<&str> = self.layers.iter().map(|l| l.name.as_str()).collect();
            format!(
                "none of ebpf, landlock or seccomp was tried (in place: {}): {}",
                tried.join(", "),
                self.not_covered.join("; ")
            )
        } else {
            inactive.join("; ")
        }
    }

    /// The `enforcement` audit record: `ok` when `require` is met (whatever layers this host
    /// cannot offer), `failed` when it is not or a layer failed its self-test.
    pub fn audit(&self, audit: &Audit, require: Require) {
        let mut r = audit.record(Event::Enforcement);
        let failed = self.layers.iter().any(|l| l.state == LayerState::Failed);
        r.outcome = Some(if self.check(require).is_ok() && !failed {
            Outcome::Ok
        } else {
            Outcome::Failed
        });
        r.reason = Some(format!("require = \"{require}\": {self}"));
        audit.emit(r);
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .layers
            .iter()
            .map(|l| {
                let state = match l.state {
                    LayerState::Active => "active",
                    LayerState::Unavailable => "unavailable",
                    LayerState::Failed => "failed",
                };
                format!("{} {state} ({})", l.name, l.detail)
            })
            .collect();
        f.write_str(&parts.join("; "))
    }
}

/// Why enforcement could not be planned or required layers are missing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnforceError {
    /// The egress rules are invalid (no Hub address, a wildcard address).
    #[error(transparent)]
    Rules(#[from] egress::EgressError),
    /// `require` is not met.
    #[error("[enforcement] require = \"{require}\" is not met: {why}")]
    Required {
        /// What was required.
        require: Require,
        /// What each missing layer reported.
        why: String,
    },
}

/// What the layers must allow, with names resolved once, at start.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The Hub's UDP addresses.
    pub hub: Vec<SocketAddr>,
    /// Allow-list endpoints (TCP).
    pub allow: Vec<SocketAddr>,
    /// DNS resolvers (only when a name is used).
    pub resolvers: Vec<IpAddr>,
    /// TCP ports the Client may connect to (Landlock).
    pub tcp_ports: Vec<u16>,
    /// `host:port` names that did not resolve at start (left out of the eBPF lock); the Hub's
    /// also when every answer was refused, with why.
    pub unresolved: Vec<String>,
    /// Each DNS allow-list entry's accepted answers at start, by entry name.
    pub by_name: std::collections::BTreeMap<String, Vec<SocketAddr>>,
    /// The answers refused at start (loopback, link-local, metadata, not unicast), with why, by
    /// entry name: recorded once the Client runs, as a refresh's are.
    pub refused: std::collections::BTreeMap<String, Vec<String>>,
}

impl Plan {
    /// Resolves the config's names (blocking: call before the runtime starts). A name that
    /// does not resolve does not stop the plan: it is listed in [`Plan::unresolved`], the
    /// layers that need no address (Landlock, seccomp) are planned as usual, and the eBPF
    /// lock leaves that name's addresses out (it fails closed for them; without a Hub address
    /// it cannot be attached at all). The session then reaches the Hub with backoff (P14).
    pub fn for_config(config: &ClientConfig) -> Self {
        let mut unresolved = Vec::new();
        let mut resolve = |host: &str, port: u16| -> Vec<SocketAddr> {
            let addrs: Vec<SocketAddr> = (host, port)
                .to_socket_addrs()
                .map(Iterator::collect)
                .unwrap_or_default();
            if addrs.is_empty() {
                unresolved.push(format!("{host}:{port}"));
            }
            addrs
        };
        // The answers the Client may dial (`HubAddress::reachable`): the map never holds one
        // it refuses.
        let (hub, refused) = config
            .hub
            .reachable(resolve(&config.hub.host, config.hub.port));
        let hub_refused = match (hub.is_empty(), refused.first()) {
            (true, Some(e)) => Some(format!("{} ({e})", config.hub)),
            _ => None,
        };
        let mut names_used = config.hub.host.parse::<IpAddr>().is_err();
        let mut allow = Vec::new();
        let mut by_name = std::collections::BTreeMap::new();
        let mut refused_by_name = std::collections::BTreeMap::new();
        let mut tcp_ports = Vec::new();
        for e in config.allow.entries() {
            tcp_ports.push(e.endpoint.port);
            match &e.endpoint.host {
                Host::Ip(ip) => allow.push(SocketAddr::new(*ip, e.endpoint.port)),
                Host::Dns(name) => {
                    names_used = true;
                    // The same answers the Dialer starts from: the kernel map never holds more.
                    let mut ok: Vec<SocketAddr> = Vec::new();
                    let mut refused = Vec::new();
                    for a in resolve(name, e.endpoint.port) {
                        match AllowList::check_resolved(name, a) {
                            Ok(a) => ok.push(a),
                            Err(why) => refused.push(why.to_string()),
                        }
                    }
                    ok.sort_unstable();
                    ok.dedup();
                    allow.extend(ok.iter().copied());
                    if !ok.is_empty() {
                        by_name.insert(e.name.to_string(), ok);
                    }
                    if !refused.is_empty() {
                        refused_by_name.insert(e.name.to_string(), refused);
                    }
                }
            }
        }
        unresolved.extend(hub_refused);
        let resolvers = if names_used { resolvers() } else { Vec::new() };
        if !resolvers.is_empty() {
            tcp_ports.push(53);
        }
        tcp_ports.sort_unstable();
        tcp_ports.dedup();
        Self {
            hub,
            allow,
            resolvers,
            tcp_ports,
            unresolved,
            by_name,
            refused: refused_by_name,
        }
    }

    /// The eBPF rule set.
    pub fn rules(&self) -> Result<Vec<Rule>, EnforceError> {
        Ok(egress::rules(&self.hub, &self.allow, &self.resolvers)?)
    }

    /// A TCP port that no allow-list entry uses (for the probes).
    pub fn denied_port(&self) -> u16 {
        (1..=u16::MAX)
            .rev()
            .find(|p| !self.tcp_ports.contains(p))
            .unwrap_or(1)
    }
}

/// Nameservers from /etc/resolv.conf.
pub fn resolvers() -> Vec<IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse().ok())
        .collect()
}

/// The audit record for one kernel refusal.
pub fn deny_record(audit: &Audit, e: &DenyEvent) -> AuditRecord {
    let mut r = audit.record(Event::KernelDenied);
    r.destination = Some(Destination {
        name: e.proto_name(),
        address: Some(e.addr.to_string()),
    });
    r.outcome = Some(Outcome::Refused);
    r.reason = Some(format!(
        "{} refused pid {} ({})",
        e.hook.name(),
        e.pid,
        e.proto_name()
    ));
    r
}

/// The record of `n` refusals the kernel could not report one by one (its ring buffer was
/// full when they happened): written before the first event read after them, or at the
/// next read of the buffer when none follows.
pub fn lost_record(audit: &Audit, n: u32) -> AuditRecord {
    let mut r = audit.record(Event::KernelDenied);
    r.outcome = Some(Outcome::Refused);
    r.reason = Some(format!(
        "{n} more refused, not reported one by one: the kernel's 256 KiB ring buffer of \
         refusals was full (each was refused all the same)"
    ));
    r
}

/// Refusals the kernel had no room to report, newly counted in `count` (its count so far, as
/// an event carries it or the Client reads it, which wraps at 2³²) past `seen`; moves `seen`
/// on.
fn newly_lost(seen: &mut u32, count: u32) -> Option<u32> {
    let n = count.wrapping_sub(*seen);
    // Events of several CPUs can arrive a little out of order, and the count read may be
    // newer than an event read after it: an older count is not new.
    if n == 0 || n > u32::MAX / 2 {
        return None;
    }
    *seen = count;
    Some(n)
}

/// A source of kernel refusals (the eBPF ring buffer), drained by the running Client.
pub trait DenySource: Send {
    /// Refusals since the last call.
    fn drain(&mut self) -> Vec<DenyEvent>;
    /// Per-hook refusal counts since attach.
    fn counters(&self) -> Vec<(&'static str, u64)>;
    /// The kernel's count so far of refusals it had no room to report one by one (wrapping at
    /// 2³²), read now: so that a gap is reported when no event follows it.
    fn lost(&self) -> u32;
}

/// How often the eBPF ring buffer is read.
const DENY_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Turns kernel refusals into `kernel_denied` audit records for `client_id`, and publishes the
/// per-hook counters whenever they change. Runs until aborted.
pub async fn forward_denies(
    audit: Audit,
    client_id: String,
    mut src: Box<dyn DenySource>,
    counters: tokio::sync::watch::Sender<Vec<(String, u64)>>,
) {
    let mut tick = tokio::time::interval(DENY_POLL);
    let (mut lost, mut unreported) = (0, 0u64);
    loop {
        tick.tick().await;
        let mut report_lost = |count: u32| {
            if let Some(n) = newly_lost(&mut lost, count) {
                unreported += u64::from(n);
                let mut r = lost_record(&audit, n);
                r.client = Some(client_id.clone());
                audit.emit(r);
            }
        };
        // A gap an event reveals is placed before it; one after the last event read is
        // reported at this tick all the same (read after the drain: it covers those events').
        for e in src.drain() {
            report_lost(e.lost);
            let mut r = deny_record(&audit, &e);
            r.client = Some(client_id.clone());
            audit.emit(r);
        }
        report_lost(src.lost());
        let mut now: Vec<(String, u64)> = src
            .counters()
            .into_iter()
            .map(|(h, n)| (h.to_owned(), n))
            .collect();
        if unreported > 0 {
            now.push(("unreported".to_owned(), unreported));
        }
        counters.send_if_modified(|c| {
            let changed = *c != now;
            *c = now;
            changed
        });
    }
}

/// Installs the named `layers` in order — eBPF (if built in), Landlock, the privilege drop,
/// seccomp — and proves each one; a layer the kernel refuses is reported inactive with the
/// reason. `run` installs all of them with the lock held by the cgroup; the probe may pick.
/// Call it while the process has one thread. Returns the report and, when the eBPF lock is
/// active, its source of refusals.
///
/// The lock is not counted as active when the process keeps privileges that could undo it:
/// if `privileges` was asked for and did not drop everything, an active eBPF layer becomes
/// `failed` (so `require = "kernel"` refuses to start).
pub fn install(plan: &Plan, layers: &[&str], hold: Hold) -> (Report, Option<Box<dyn DenySource>>) {
    let mut report = Report::default();
    let mut source: Option<Box<dyn DenySource>> = None;
    if layers.contains(&"ebpf") {
        let (layer, src) = install_ebpf(plan, hold);
        report.layers.push(layer);
        source = src;
        // Loading the object (the ELF, the verifier's logs) freed ~16 MB that glibc would
        // otherwise keep for the process's whole life (docs/benchmarks.md).
        heap::release_freed_heap();
    }
    if layers.contains(&"landlock") {
        report.layers.push(landlock::install(plan));
    }
    if layers.contains(&"privileges") {
        let dropped = privileges::drop_all();
        if dropped.state != LayerState::Active {
            if let Some(l) = report
                .layers
                .iter_mut()
                .find(|l| l.name == "ebpf" && l.active)
            {
                *l = ebpf_layer(
                    LayerState::Failed,
                    format!(
                        "{}; but this process kept privileges that could undo it",
                        l.detail
                    ),
                );
                source = None;
            }
        }
        report.layers.push(dropped);
    }
    if layers.contains(&"seccomp") {
        report.layers.push(seccomp::install());
    }
    report.not_covered = report.gaps(&plan.resolvers);
    report.addresses = plan.by_name.clone();
    report.refused_answers = plan.refused.clone();
    (report, source)
}

/// Who holds the eBPF programs once attached: the cgroup (`run`: no descriptor of the process
/// keeps them) or the process (the probe: they go when it exits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The cgroup.
    Cgroup,
    /// The process.
    Process,
}

/// What the eBPF layer covers, as reported.
const EBPF_COVERS: &str = "every process in the Client's cgroup: TCP only to the allow-list (and to the DNS resolvers on port 53 when names are used), UDP only to the Hub (and the resolvers), other IP protocols (ICMP, SCTP, raw IP) refused";

fn ebpf_layer(state: LayerState, detail: String) -> Layer {
    Layer::new("ebpf", state, EBPF_COVERS.into(), detail)
}

#[cfg(feature = "ebpf")]
fn install_ebpf(plan: &Plan, hold: Hold) -> (Layer, Option<Box<dyn DenySource>>) {
    if plan.hub.is_empty() {
        let why = format!(
            "the Hub's name did not resolve at start to an address the Client may dial ({}): the lock needs its addresses",
            plan.unresolved.join(", ")
        );
        return (ebpf_layer(LayerState::Unavailable, why), None);
    }
    let hold = match hold {
        Hold::Cgroup => ebpf::Hold::Cgroup,
        Hold::Process => ebpf::Hold::Process,
    };
    let attached = plan
        .rules()
        .map_err(|e| e.to_string())
        .and_then(|rules| ebpf::EgressLock::attach(&rules, hold).map_err(|e| e.to_string()));
    match attached {
        Ok(mut lock) => {
            let verdict = lock.prove(plan).map(|proof| {
                let held = match lock.hold() {
                    ebpf::Hold::Cgroup => "held by the cgroup, not by any descriptor of this process: it stays until the cgroup is removed",
                    ebpf::Hold::Process => "held by this process: it ends when the process does",
                };
                let mut detail = format!("{proof}; {held}");
                if !plan.unresolved.is_empty() {
                    detail.push_str(&format!(
                        "; not resolved at start, so refused by the lock until a restart: {}",
                        plan.unresolved.join(", ")
                    ));
                }
                detail
            });
            let active = verdict.is_ok();
            (
                ebpf_layer(
                    if active {
                        LayerState::Active
                    } else {
                        LayerState::Failed
                    },
                    verdict.unwrap_or_else(|e| e),
                ),
                active.then(|| Box::new(lock) as Box<dyn DenySource>),
            )
        }
        Err(e) => (ebpf_layer(LayerState::Unavailable, e), None),
    }
}

#[cfg(not(feature = "ebpf"))]
fn install_ebpf(_plan: &Plan, _hold: Hold) -> (Layer, Option<Box<dyn DenySource>>) {
    (
        ebpf_layer(
            LayerState::Unavailable,
            "this build has no `ebpf` feature".into(),
        ),
        None,
    )
}

/// The layers `run` installs, in order.
pub const ALL_LAYERS: [&str; 4] = crate::config::LAYERS;

/// Tries, from this process, what the policy allows and what it forbids, and names what the
/// kernel answered. Targets are loopback or configured destinations only.
pub fn matrix(plan: &Plan) -> std::collections::BTreeMap<&'static str, String> {
    use std::net::{Ipv4Addr, SocketAddrV4};

    let denied = plan.denied_port();
    let lo = |port| SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    let mut out = std::collections::BTreeMap::new();
    if let Some(first) = plan.allow.first() {
        out.insert("tcp_allowed", probe::name(&probe::tcp_connect(*first)));
        if let SocketAddr::V4(v4) = egress_canonical(*first) {
            out.insert(
                "tcp_allowed_v4_mapped",
                probe::name(&probe::tcp_connect_v4_mapped(v4)),
            );
            // Same address, a port the allow-list does not have.
            out.insert(
                "tcp_other_port",
                probe::name(&probe::tcp_connect(SocketAddr::V4(SocketAddrV4::new(
                    *v4.ip(),
                    denied,
                )))),
            );
            // Another loopback address, the allowed port.
            let other = if v4.ip().octets()[3] == 2 {
                Ipv4Addr::new(127, 0, 0, 3)
            } else {
                Ipv4Addr::new(127, 0, 0, 2)
            };
            out.insert(
                "tcp_other_address",
                probe::name(&probe::tcp_connect(SocketAddr::V4(SocketAddrV4::new(
                    other,
                    v4.port(),
                )))),
            );
        }
    }
    out.insert(
        "tcp_v4_mapped_denied",
        probe::name(&probe::tcp_connect_v4_mapped(lo(denied))),
    );
    if let Some(hub) = plan.hub.first() {
        out.insert("udp_hub", probe::name(&probe::udp_send(*hub)));
    }
    out.insert(
        "udp_other",
        probe::name(&probe::udp_send(SocketAddr::V4(lo(denied)))),
    );
    out.insert("tcp_fast_open", probe::name(&probe::tfo_send(lo(denied))));
    out.insert("mptcp", probe::name(&probe::mptcp_connect(lo(denied))));
    // The same two aimed at an allowed destination: a refusal there is the seccomp rule on
    // the mechanism itself, not the address policy.
    if let Some(SocketAddr::V4(first)) = plan.allow.first().map(|a| egress_canonical(*a)) {
        out.insert(
            "tcp_fast_open_allowed",
            probe::name(&probe::tfo_send(first)),
        );
        out.insert("mptcp_allowed", probe::name(&probe::mptcp_connect(first)));
    }
    out.insert("accept", probe::name(&probe::accept()));
    out.insert("tcp_bind", probe::name(&probe::tcp_bind(lo(0))));
    out.insert(
        "raw_icmp",
        probe::name(&probe::raw_icmp(Ipv4Addr::new(127, 0, 0, 2))),
    );
    out.insert("listen", probe::name(&probe::listen()));
    out.insert("io_uring_setup", probe::name(&probe::io_uring_setup()));
    out
}

fn egress_canonical(a: SocketAddr) -> SocketAddr {
    ewii_common::policy::canonical(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p16_refusals_the_kernel_could_not_report_are_counted_once_across_its_wrap() {
        let mut seen = 0;
        assert_eq!(newly_lost(&mut seen, 0), None);
        assert_eq!(newly_lost(&mut seen, 7), Some(7));
        assert_eq!(newly_lost(&mut seen, 7), None, "counted once");
        // An event of another CPU read after a newer count: not new.
        assert_eq!(newly_lost(&mut seen, 5), None);
        assert_eq!(seen, 7);
        // The kernel's count wraps at 2^32.
        let mut seen = u32::MAX - 2;
        assert_eq!(newly_lost(&mut seen, 4), Some(7));
    }
}
