//! `ewii-client verify`: the customer's evidence, promise by promise.
//!
//! It reads the state directory (`status.json`, the SVID, the bundle, the markers), the
//! running Client's `/proc` entries (credentials and sockets, as the kernel reports them) and,
//! when given, the configuration file. It opens no listener and sends nothing anywhere.
//!
//! [`gather`] collects the [`Facts`] (all I/O is there); [`assess`] turns them into one
//! [`Finding`] per promise (pure, and tested both ways on facts broken on purpose).

pub mod procfs;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::status::{State, Status};
use super::{REVOKED_MARKER, REVOKE_PENDING_MARKER};
use crate::config::ClientConfig;
use crate::enforce::LayerState;
use crate::identity::{self, store, LeafInfo};
use procfs::{Attribution, Credentials, Proto, Sockets};

/// The longest SVID lifetime that still keeps "rotated every 24 hours" (five minutes of slack
/// for the issuer's back-dating).
const MAX_LIFETIME_SECS: i64 = identity::PROMISED_SVID_LIFETIME_SECS as i64 + 300;

/// The Client's process name in `/proc/<pid>/status`.
const CLIENT_COMM: &str = "ewii-client";

/// Whether a promise holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Checked, and it holds.
    Holds,
    /// Checked, and it does not hold.
    Broken,
    /// An optional protection that is not enabled here (not a failure).
    Off,
    /// Cannot be checked from inside the Client's environment; the evidence says where.
    Elsewhere,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Self::Holds => "HOLDS",
            Self::Broken => "BROKEN",
            Self::Off => "OFF",
            Self::Elsewhere => "ELSEWHERE",
        }
    }
}

/// One promise's verdict and the evidence for it.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// `P1` … `P16`.
    pub id: &'static str,
    /// The promise, in the customer page's words.
    pub promise: &'static str,
    /// The verdict.
    pub verdict: Verdict,
    /// What was seen and where, one line each.
    pub evidence: Vec<String>,
}

/// Everything `verify` read.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Now, seconds since the epoch.
    pub now: i64,
    /// The state directory.
    pub state_dir: PathBuf,
    /// `status.json`, with the age of its last confirmation in seconds.
    pub status: Status,
    /// Seconds since the Client last confirmed the status.
    pub status_age: u64,
    /// `/proc/<pid>/status`, or why it could not be read (the process is gone).
    pub credentials: Result<Credentials, String>,
    /// The process's sockets, or why they could not be read.
    pub sockets: Result<Sockets, String>,
    /// The SVID on disk (or, from a Workload API, as the running Client reports it).
    pub svid: Result<LeafInfo, String>,
    /// The SPIFFE Workload API the SVID comes from (`svid_source` in the status), if any:
    /// then no key and no bundle are on disk, by design.
    pub workload_api: Option<String>,
    /// The key file's permission bits.
    pub key_mode: Result<u32, String>,
    /// `sha256:` of each anchor in `bundle.pem`.
    pub bundle_on_disk: Result<Vec<String>, String>,
    /// The revoked marker's reason, if the Hub revoked this Client.
    pub revoked: Option<String>,
    /// Whether a revoke from an earlier stop is still to be delivered.
    pub revoke_pending: bool,
    /// The DNS resolvers (`/etc/resolv.conf`): UDP to port 53 of one of them is a lookup,
    /// not a second connection.
    pub resolvers: Vec<IpAddr>,
    /// The configuration file, when given: path and parsed file (or why it did not parse).
    pub config: Option<(PathBuf, Result<ClientConfig, String>)>,
}

/// Why `verify` could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// No readable status file: no Client has run with this state directory.
    #[error("{0}")]
    NoStatus(String),
}

/// Reads the facts for the Client whose state directory is `state_dir`.
pub fn gather(
    state_dir: &Path,
    config: Option<&Path>,
    proc_root: &Path,
) -> Result<Facts, VerifyError> {
    let status = Status::read(state_dir).map_err(VerifyError::NoStatus)?;
    let now_us = crate::now_timestamp().0;
    let status_age = now_us.saturating_sub(status.updated_us) / 1_000_000;
    let credentials = procfs::credentials(proc_root, status.pid)
        .map_err(|e| format!("/proc/{}/status: {e}", status.pid))
        .and_then(|c| {
            // A pid reused by another program, or one from another pid namespace, is not
            // evidence about the Client.
            if c.name == CLIENT_COMM {
                Ok(c)
            } else {
                Err(format!(
                    "pid {} is {:?}, not {CLIENT_COMM}: the Client is gone (its pid reused), or verify runs outside the Client's pid namespace",
                    status.pid, c.name
                ))
            }
        });
    let sockets = match &credentials {
        Ok(c) => procfs::sockets(proc_root, status.pid, c.uids[1])
            .map_err(|e| format!("/proc/{}/net: {e}", status.pid)),
        Err(e) => Err(e.clone()),
    };
    let workload_api = status.svid_source.strip_prefix("workload-api").map(|rest| {
        rest.trim()
            .trim_matches(|c| c == '(' || c == ')')
            .to_owned()
    });
    let svid = match workload_api {
        // The key never touches the disk: the running Client's report is the evidence.
        Some(_) => status
            .spiffe_id
            .parse()
            .map(|id| LeafInfo {
                id,
                serial: status.svid_serial.clone(),
                not_before: status.svid_not_before,
                not_after: status.svid_not_after,
            })
            .map_err(|e| format!("status.json spiffe_id: {e}")),
        None => store::read_certs(&state_dir.join(store::SVID_CERT))
            .map_err(|e| e.to_string())
            .and_then(|chain| {
                let leaf = chain.first().ok_or("svid.pem holds no certificate")?;
                identity::inspect_leaf(leaf).map_err(|e| e.to_string())
            }),
    };
    let key_mode = {
        use std::os::unix::fs::PermissionsExt;
        let path = state_dir.join(store::SVID_KEY);
        std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o7777)
            .map_err(|e| format!("{}: {e}", path.display()))
    };
    let bundle_on_disk = store::read_certs(&state_dir.join(store::BUNDLE))
        .map(|anchors| anchors.iter().map(|a| identity::bundle_hash(a)).collect())
        .map_err(|e| e.to_string());
    let revoked = std::fs::read_to_string(state_dir.join(REVOKED_MARKER))
        .ok()
        .map(|r| r.trim().to_owned());
    let config = config.map(|path| {
        let parsed = crate::config::load::<ClientConfig>(path).map_err(|e| e.to_string());
        (path.to_owned(), parsed)
    });
    Ok(Facts {
        now: (now_us / 1_000_000) as i64,
        state_dir: state_dir.to_owned(),
        revoke_pending: state_dir.join(REVOKE_PENDING_MARKER).exists(),
        status,
        status_age,
        credentials,
        sockets,
        svid,
        workload_api,
        key_mode,
        bundle_on_disk,
        revoked,
        resolvers: crate::enforce::resolvers(),
        config,
    })
}

/// The promises, in the customer page's words.
const PROMISES: [(&str, &str); 16] = [
    ("P1", "a single signed container, small, on any Linux host"),
    ("P2", "runs as a non-root user"),
    (
        "P3",
        "no kernel modules, no privileged capabilities, no host network",
    ),
    (
        "P4",
        "touches only the allow-listed destinations, set at install",
    ),
    (
        "P5",
        "one outbound connection: UDP/443, QUIC + TLS 1.3, ChaCha20-Poly1305",
    ),
    (
        "P6",
        "no second connection, no fallback channel, no telemetry",
    ),
    (
        "P7",
        "a SPIFFE X.509 SVID at every connection, rotated every 24 hours",
    ),
    (
        "P8",
        "a compromised certificate is replaced within one rotation cycle",
    ),
    (
        "P9",
        "stopping the Client revokes it; a returning Client is refused",
    ),
    (
        "P10",
        "the operator can revoke centrally, and you get a webhook if you gave them its URL",
    ),
    ("P11", "every connection leaves a structured audit record"),
    ("P12", "the audit records can go to your SIEM"),
    ("P13", "no inbound listener"),
    ("P14", "reconnects by itself"),
    (
        "P15",
        "the Hub is checked against a pinned trust bundle that rotates",
    ),
    (
        "P16",
        "kernel-level proof of \"no second connection\" (optional eBPF lock)",
    ),
];

/// One finding per promise.
pub fn assess(f: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    for (id, promise) in PROMISES {
        let (verdict, evidence) = match id {
            "P1" => p1(f),
            "P2" => p2(f),
            "P3" => p3(f),
            "P4" => p4(f),
            "P5" => p5(f),
            "P6" => p6(f),
            "P7" => p7(f),
            "P8" => p8(f),
            "P9" => p9(f),
            "P10" => p10(f),
            "P11" => p11(f),
            "P12" => p12(f),
            "P13" => p13(f),
            "P14" => p14(f),
            "P15" => p15(f),
            _ => p16(f),
        };
        out.push(Finding {
            id,
            promise,
            verdict,
            evidence,
        });
    }
    out
}

type Assessed = (Verdict, Vec<String>);

fn holds_if(ok: bool, evidence: Vec<String>) -> Assessed {
    (if ok { Verdict::Holds } else { Verdict::Broken }, evidence)
}

fn proc_status(f: &Facts) -> String {
    format!("/proc/{}/status", f.status.pid)
}

fn p1(f: &Facts) -> Assessed {
    let mut ev = vec![
        "the image's signature and SBOM are checked before deployment: `cosign verify` and `cosign verify-attestation` (docs/deploy.md); a running process cannot prove its own image".into(),
    ];
    if let Ok(c) = &f.credentials {
        ev.push(format!(
            "the process is {:?} (pid {})",
            c.name, f.status.pid
        ));
    }
    (Verdict::Elsewhere, ev)
}

fn p2(f: &Facts) -> Assessed {
    match &f.credentials {
        Err(e) => holds_if(false, vec![format!("cannot read the process: {e}")]),
        Ok(c) => {
            let root = c.uids.contains(&0) || c.gids.contains(&0);
            holds_if(
                !root,
                vec![format!(
                    "uid {} gid {} (real, effective, saved, filesystem) in {}{}",
                    join(&c.uids),
                    join(&c.gids),
                    proc_status(f),
                    if root {
                        ": one of them is 0 (root)"
                    } else {
                        ""
                    }
                )],
            )
        }
    }
}

fn join(ids: &[u32; 4]) -> String {
    ids.map(|i| i.to_string()).join("/")
}

fn p3(f: &Facts) -> Assessed {
    let Ok(c) = &f.credentials else {
        return holds_if(false, vec!["cannot read the process".into()]);
    };
    let held = c.cap_eff | c.cap_prm | c.cap_amb;
    let mut ev = vec![if held == 0 {
        format!(
            "no capability effective, permitted or ambient ({})",
            proc_status(f)
        )
    } else {
        format!(
            "capabilities held: {} ({})",
            procfs::capability_names(held).join(", "),
            proc_status(f)
        )
    }];
    ev.push(format!(
        "no_new_privs {}, seccomp mode {} ({})",
        if c.no_new_privs { "set" } else { "not set" },
        match c.seccomp {
            2 => "filter",
            1 => "strict",
            _ => "off",
        },
        proc_status(f)
    ));
    ev.push("kernel modules: the binary loads none and holds no CAP_SYS_MODULE; host network: check the container's spec (`podman inspect --format '{{.HostConfig.NetworkMode}}'`), not visible from inside".into());
    holds_if(held == 0, ev)
}

/// The addresses the allow-list lets the Client reach over TCP.
fn allowed_addresses(s: &Status) -> BTreeSet<SocketAddr> {
    let mut out: BTreeSet<SocketAddr> = s
        .enforcement
        .addresses
        .values()
        .flatten()
        .copied()
        .collect();
    for entry in &s.allow_list {
        if let Some(addr) = entry
            .split_once('=')
            .and_then(|(_, a)| a.parse::<SocketAddr>().ok())
        {
            out.insert(addr);
        }
    }
    out
}

/// Same address, ignoring the v4-mapped IPv6 spelling.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

fn attribution(s: &Sockets) -> String {
    match &s.attribution {
        Attribution::Descriptors => "sockets attributed by the process's descriptors".into(),
        Attribution::OwnerInNamespace { why } => format!(
            "sockets attributed by owner uid in the Client's network namespace ({why}; exact when the Client is alone in its container)"
        ),
    }
}

/// TCP connections to addresses outside the allow-list.
fn stray_tcp(f: &Facts, s: &Sockets) -> Vec<String> {
    let allowed = allowed_addresses(&f.status);
    s.sockets
        .iter()
        .filter(|x| x.proto == Proto::Tcp && x.connected())
        .filter(|x| !allowed.contains(&canonical(x.remote)))
        .map(|x| format!("TCP {} -> {}", x.local, x.remote))
        .collect()
}

fn p4(f: &Facts) -> Assessed {
    let s = &f.status;
    let mut ok = true;
    let mut ev = vec![format!(
        "running allow-list {} [{}] (status.json)",
        s.allow_list_digest,
        s.allow_list.join(", ")
    )];
    match &f.config {
        None => {
            ev.push("no --config given: the running list was not compared with the file".into())
        }
        Some((path, Err(e))) => {
            ok = false;
            ev.push(format!("{}: {e}", path.display()));
        }
        Some((path, Ok(config))) => {
            let digest = format!("sha256:{}", hex::encode(config.allow.digest()));
            if digest == s.allow_list_digest {
                ev.push(format!("the same list as {} ({digest})", path.display()));
            } else {
                ok = false;
                ev.push(format!(
                    "{} lists {digest}, not the running list: the file changed since the Client started (restart it to apply), or it is not this Client's file",
                    path.display()
                ));
            }
        }
    }
    match &f.sockets {
        Err(e) => {
            ok = false;
            ev.push(format!("cannot read the sockets: {e}"));
        }
        Ok(sockets) => {
            let stray = stray_tcp(f, sockets);
            let live = sockets
                .sockets
                .iter()
                .filter(|x| x.proto == Proto::Tcp && x.connected())
                .count();
            if stray.is_empty() {
                ev.push(format!(
                    "{live} open TCP connection(s), each to an allow-listed address; {}",
                    attribution(sockets)
                ));
            } else {
                ok = false;
                ev.push(format!(
                    "TCP connection(s) outside the allow-list: {}",
                    stray.join("; ")
                ));
            }
        }
    }
    holds_if(ok, ev)
}

/// The UDP sockets that are not a DNS lookup to one of `resolvers`.
fn udp_sockets<'a>(s: &'a Sockets, resolvers: &[IpAddr]) -> Vec<&'a procfs::Socket> {
    s.sockets
        .iter()
        .filter(|x| {
            x.proto == Proto::Udp && !(x.remote.port() == 53 && resolvers.contains(&x.remote.ip()))
        })
        .collect()
}

/// UDP sockets the Client may hold: one per Hub connection it reports (the current one, and
/// one draining after a rotation), at least one.
fn udp_allowance(s: &Status) -> usize {
    s.hub_connections.max(1)
}

fn p5(f: &Facts) -> Assessed {
    let Ok(sockets) = &f.sockets else {
        return holds_if(false, vec!["cannot read the sockets".into()]);
    };
    let udp = udp_sockets(sockets, &f.resolvers);
    let connected = f.status.state == State::Connected;
    let allowance = udp_allowance(&f.status);
    let mut ev = vec![format!(
        "Hub {} ({}); {} UDP socket(s) besides DNS: {}",
        f.status.hub,
        f.status.state_word(),
        udp.len(),
        udp.iter()
            .map(|x| x.local.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )];
    if allowance > 1 {
        ev.push(format!(
            "the Client holds {allowance} Hub connections: the current one and, after a rotation, the one it replaced while its queries drain (make-before-break)"
        ));
    }
    ev.push("TLS 1.3 only, with TLS_CHACHA20_POLY1305_SHA256 as the only cipher suite: fixed in the binary, not configurable".into());
    if !f.status.hub.ends_with(":443") {
        ev.push(format!(
            "the Hub listens on {} — not port 443 (the operator's choice)",
            f.status.hub
        ));
    }
    let ok = if connected {
        (1..=allowance).contains(&udp.len())
    } else {
        udp.len() <= allowance
    };
    if !ok {
        ev.push(if udp.is_empty() {
            "connected, yet no UDP socket".into()
        } else {
            format!("more UDP sockets than Hub connections ({allowance})")
        });
    }
    holds_if(ok, ev)
}

fn p6(f: &Facts) -> Assessed {
    let Ok(sockets) = &f.sockets else {
        return holds_if(false, vec!["cannot read the sockets".into()]);
    };
    let mut wrong = stray_tcp(f, sockets);
    wrong.extend(
        sockets
            .sockets
            .iter()
            .filter(|x| matches!(x.proto, Proto::Raw | Proto::OtherIp))
            .map(|x| {
                format!(
                    "{} socket {}",
                    if x.proto == Proto::Raw {
                        "raw"
                    } else {
                        "ICMP or UDP-Lite"
                    },
                    x.local
                )
            }),
    );
    if udp_sockets(sockets, &f.resolvers).len() > udp_allowance(&f.status) {
        wrong.push("a UDP socket that is no Hub connection".into());
    }
    let mut ev = vec![format!(
        "{} socket(s) in all: UDP to the Hub, TCP to allow-listed destinations{}; {}",
        sockets.sockets.len(),
        if wrong.is_empty() {
            ", nothing else".to_owned()
        } else {
            format!("; also: {}", wrong.join("; "))
        },
        attribution(sockets)
    )];
    if sockets.other_families > 0 {
        ev.push(format!(
            "{} socket(s) of other families (unix, netlink: not network connections; seccomp refuses every other)",
            sockets.other_families
        ));
    }
    ev.push(
        "the Client sends no telemetry: its metrics stay in status.json and the optional textfile"
            .into(),
    );
    holds_if(wrong.is_empty(), ev)
}

fn p7(f: &Facts) -> Assessed {
    let s = &f.status;
    let mut ev = Vec::new();
    let mut ok = true;
    let source = match &f.workload_api {
        Some(socket) => format!("from the SPIFFE Workload API at {socket} (status.json)"),
        None => "svid.pem".into(),
    };
    match &f.svid {
        Err(e) => {
            ok = false;
            ev.push(format!("{source}: {e}"));
        }
        Ok(leaf) => {
            let life = leaf.not_after - leaf.not_before;
            ev.push(format!(
                "{} serial {}, valid {} to {} ({}h{:02}m), {source}",
                leaf.id,
                leaf.serial,
                stamp(leaf.not_before),
                stamp(leaf.not_after),
                life / 3600,
                life % 3600 / 60
            ));
            if leaf.not_after <= f.now {
                ok = false;
                ev.push("expired".into());
            }
            if life > MAX_LIFETIME_SECS {
                ok = false;
                ev.push("lives longer than 24 hours".into());
            }
            if leaf.serial != s.svid_serial {
                // A renewal lands between the two reads now and then: say so, but it is
                // not a broken promise unless it stays.
                ev.push(format!(
                    "the running Client reports serial {} (a renewal in progress, or a stale status)",
                    s.svid_serial
                ));
            }
        }
    }
    match f.key_mode {
        _ if f.workload_api.is_some() => ev.push(
            "private key: held in the Client's memory only, as the SPIRE agent delivered it; never written to disk; the agent rotates it".into(),
        ),
        Ok(mode) if mode & 0o077 == 0 => ev.push(format!(
            "private key svid.key mode {mode:04o}: only the Client's user reads it; it never leaves this host"
        )),
        Ok(mode) => {
            ok = false;
            ev.push(format!("private key svid.key mode {mode:04o}: readable by others"));
        }
        Err(ref e) => {
            ok = false;
            ev.push(e.clone());
        }
    }
    if let Some(at) = s.next_renewal_unix {
        ev.push(format!("next renewal due {}", stamp(at)));
    }
    holds_if(ok, ev)
}

fn p8(f: &Facts) -> Assessed {
    let m = &f.status.metrics;
    let mut ev = vec![format!(
        "renewals since start: {} done, {} refused; last {}",
        m.rotations.ok,
        m.rotations.refused,
        if m.last_rotation_unix > 0 {
            stamp(m.last_rotation_unix)
        } else {
            "none yet".into()
        }
    )];
    let ok = match &f.svid {
        Ok(leaf) => {
            ev.push(format!(
                "the certificate in use expires {}; a stolen copy is useless after that, and the Hub retires the old serial at each renewal",
                stamp(leaf.not_after)
            ));
            leaf.not_after > f.now && leaf.not_after - leaf.not_before <= MAX_LIFETIME_SECS
        }
        Err(e) => {
            ev.push(format!("svid.pem: {e}"));
            false
        }
    };
    holds_if(ok, ev)
}

fn p9(f: &Facts) -> Assessed {
    let on_stop = f.status.on_stop.as_str();
    let mut ev = vec![format!("on_stop = {on_stop:?} (status.json)")];
    if f.revoke_pending {
        ev.push("a revoke from an earlier stop is still to be delivered (revoke-pending marker): the Client delivers it first".into());
    }
    let ok = on_stop == "revoke";
    if !ok {
        ev.push("stopping only disconnects: the identity stays valid for a restart".into());
    }
    holds_if(ok, ev)
}

fn p10(f: &Facts) -> Assessed {
    match &f.revoked {
        Some(reason) => holds_if(
            false,
            vec![format!(
                "this Client is revoked ({reason}); it will not connect again until enrolled anew"
            )],
        ),
        None => (
            Verdict::Holds,
            vec![
                "not revoked (no revoked marker); a revocation closes the session and the Client exits 10".into(),
                "the webhook goes from the Hub to the endpoint you gave your operator, if you gave one (this Client cannot see whether they registered it); check deliveries with `ewii-client verify-webhook`".into(),
            ],
        ),
    }
}

fn p11(f: &Facts) -> Assessed {
    let s = &f.status;
    let m = &s.metrics;
    let ok = !s.audit.starts_with("discard");
    holds_if(
        ok,
        vec![
            format!("audit records go to {}", s.audit),
            format!(
                "queries since start: {} ok, {} refused, {} failed; {} bytes up, {} down — each with one record (as of the status file's last write, {})",
                m.queries.ok,
                m.queries.refused,
                m.queries.failed,
                m.bytes_up,
                m.bytes_down,
                ewii_common::time::Timestamp(s.updated_us)
            ),
        ],
    )
}

fn p12(f: &Facts) -> Assessed {
    let ok = !f.status.audit.starts_with("discard");
    holds_if(
        ok,
        vec![
            "JSON lines in the documented schema (docs/audit.md); the Client itself sends them nowhere — your log shipper collects them".into(),
        ],
    )
}

fn p13(f: &Facts) -> Assessed {
    let Ok(sockets) = &f.sockets else {
        return holds_if(false, vec!["cannot read the sockets".into()]);
    };
    let listening: Vec<String> = sockets
        .sockets
        .iter()
        .filter(|x| x.listening())
        .map(|x| x.local.to_string())
        .collect();
    let mut ev = vec![if listening.is_empty() {
        format!("no listening socket; {}", attribution(sockets))
    } else {
        format!("listening on {}", listening.join(", "))
    }];
    if f.status.enforcement.active("seccomp") {
        ev.push("seccomp refuses listen and accept for the Client's life".into());
    } else {
        ev.push(
            "seccomp is not active: nothing but the code keeps a listener from opening later"
                .into(),
        );
    }
    // The Client's QUIC socket is connected to the Hub: the kernel hands it no one else's
    // datagrams. One that is not takes them from any source that reaches its port. (Which
    // peer a connected socket has is P5's and P6's to judge.)
    let udp = udp_sockets(sockets, &f.resolvers);
    let (peered, open): (Vec<&procfs::Socket>, Vec<_>) =
        udp.into_iter().partition(|x| x.connected());
    if !peered.is_empty() {
        ev.push(format!(
            "UDP socket(s) each connected to one peer ({}): the kernel hands each that peer's datagrams alone and answers any other sender as a closed port",
            peered
                .iter()
                .map(|x| x.remote.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !open.is_empty() {
        ev.push(format!(
            "UDP socket(s) taking datagrams from any source: {}",
            open.iter()
                .map(|x| x.local.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    holds_if(listening.is_empty() && open.is_empty(), ev)
}

fn p14(f: &Facts) -> Assessed {
    let s = &f.status;
    let alive = f.credentials.is_ok();
    let mut ev = vec![format!(
        "state {}, status confirmed {}s ago, {} session(s) since start",
        s.state_word(),
        f.status_age,
        s.metrics.sessions_up
    )];
    if let Err(e) = &f.credentials {
        ev.push(format!("the Client (pid {}) is not running: {e}", s.pid));
    }
    if s.failures > 0 {
        ev.push(format!(
            "{} failed dial(s) since the last session; last error: {}",
            s.failures,
            s.last_error.as_deref().unwrap_or("-")
        ));
    }
    let ok = alive
        && f.status_age <= super::status::STALE_AFTER.as_secs()
        && matches!(
            s.state,
            State::Connected | State::Connecting | State::Backoff
        );
    holds_if(ok, ev)
}

fn p15(f: &Facts) -> Assessed {
    let s = &f.status;
    let mut ev = vec![format!(
        "the Hub must present {}, chaining to one of: {}",
        s.hub_spiffe_id,
        s.bundle.join(", ")
    )];
    let ok = match &f.bundle_on_disk {
        _ if f.workload_api.is_some() => {
            ev.push("the bundle comes from the SPIRE agent (federation with the Hub's trust domain); none is kept on disk".into());
            !s.bundle.is_empty()
        }
        Ok(disk) if !disk.is_empty() => {
            if *disk == s.bundle {
                ev.push("bundle.pem holds the same anchors".into());
            } else {
                ev.push(format!(
                    "bundle.pem holds {} (a rotation in progress, or a stale status)",
                    disk.join(", ")
                ));
            }
            !s.bundle.is_empty()
        }
        Ok(_) => {
            ev.push("bundle.pem holds no anchor".into());
            false
        }
        Err(e) => {
            ev.push(format!("bundle.pem: {e}"));
            false
        }
    };
    ev.push("the first anchor was pinned by its hash at enrolment; later ones come only over the authenticated session".into());
    holds_if(ok, ev)
}

fn p16(f: &Facts) -> Assessed {
    let report = &f.status.enforcement;
    let mut ev: Vec<String> = report
        .layers
        .iter()
        .map(|l| format!("{}: {:?} — {}; {}", l.name, l.state, l.covers, l.detail))
        .collect();
    if !f.status.kernel_denied.is_empty() {
        ev.push(format!(
            "kernel refusals since start: {}",
            f.status
                .kernel_denied
                .iter()
                .map(|(hook, n)| format!("{hook} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for gap in &report.not_covered {
        ev.push(format!("not covered: {gap}"));
    }
    let failed = report.layers.iter().any(|l| l.state == LayerState::Failed);
    if failed {
        return holds_if(false, ev);
    }
    if report.active("ebpf") {
        (Verdict::Holds, ev)
    } else {
        ev.insert(
            0,
            "the eBPF lock is not active (the `client-ebpf` image with CAP_BPF + CAP_NET_ADMIN turns it on)".into(),
        );
        (Verdict::Off, ev)
    }
}

fn stamp(unix: i64) -> String {
    ewii_common::time::Timestamp(unix.max(0) as u64 * 1_000_000).to_string()
}

/// The report as text a security team can file.
pub fn render(f: &Facts, findings: &[Finding]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Ewii Client evidence, {} — state directory {}",
        stamp(f.now),
        f.state_dir.display()
    );
    let _ = writeln!(
        out,
        "Client {} (pid {}), {}, Hub {}\n",
        f.status.spiffe_id,
        f.status.pid,
        f.status.state_word(),
        f.status.hub
    );
    for x in findings {
        let _ = writeln!(out, "{:<4} {:<9} {}", x.id, x.verdict.word(), x.promise);
        for e in &x.evidence {
            let _ = writeln!(out, "              {e}");
        }
    }
    let count = |v| findings.iter().filter(|x| x.verdict == v).count();
    let _ = writeln!(
        out,
        "\n{} hold, {} broken, {} off, {} checked elsewhere",
        count(Verdict::Holds),
        count(Verdict::Broken),
        count(Verdict::Off),
        count(Verdict::Elsewhere)
    );
    out
}

/// The report for machines.
pub fn to_json(f: &Facts, findings: &[Finding]) -> serde_json::Value {
    serde_json::json!({
        "checked_at": stamp(f.now),
        "state_dir": f.state_dir,
        "client": {
            "spiffe_id": f.status.spiffe_id,
            "pid": f.status.pid,
            "state": f.status.state,
            "hub": f.status.hub,
            "credentials": f.credentials.as_ref().ok(),
            "sockets": f.sockets.as_ref().ok(),
        },
        "promises": findings,
        "holds": findings.iter().all(|x| x.verdict != Verdict::Broken),
    })
}

#[cfg(test)]
mod tests;
