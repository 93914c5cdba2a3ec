//! What the kernel says about a process, read from `/proc`: its credentials and its sockets.
//!
//! `/proc/<pid>/status` and `/proc/<pid>/net/*` are readable by anyone who can see the process;
//! `/proc/<pid>/fd` only by its owner while it is dumpable, or by root. The running Client is
//! not dumpable (the `privileges` layer), so without root the sockets are attributed by owner
//! uid inside the Client's network namespace instead of by descriptor: exact in a container,
//! where that namespace holds only the Client.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// A process's credentials, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Credentials {
    /// The executable's name (`Name:`).
    pub name: String,
    /// Real, effective, saved and filesystem uid.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem gid.
    pub gids: [u32; 4],
    /// Effective capabilities (bit mask).
    pub cap_eff: u64,
    /// Permitted capabilities.
    pub cap_prm: u64,
    /// Ambient capabilities.
    pub cap_amb: u64,
    /// `NoNewPrivs:` is 1.
    pub no_new_privs: bool,
    /// `Seccomp:` mode (0 off, 1 strict, 2 filter).
    pub seccomp: u8,
}

/// Reads `/proc/<pid>/status`.
pub fn credentials(proc_root: &Path, pid: u32) -> std::io::Result<Credentials> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status"))?;
    Ok(parse_status(&text))
}

fn parse_status(text: &str) -> Credentials {
    let mut c = Credentials::default();
    let four = |v: &str| {
        let mut out = [u32::MAX; 4];
        for (slot, n) in out.iter_mut().zip(v.split_whitespace()) {
            *slot = n.parse().unwrap_or(u32::MAX);
        }
        out
    };
    // A field that does not parse reads as "everything": a check then fails, never passes.
    let mask = |v: &str| u64::from_str_radix(v.trim(), 16).unwrap_or(u64::MAX);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Name" => c.name = value.to_owned(),
            "Uid" => c.uids = four(value),
            "Gid" => c.gids = four(value),
            "CapEff" => c.cap_eff = mask(value),
            "CapPrm" => c.cap_prm = mask(value),
            "CapAmb" => c.cap_amb = mask(value),
            "NoNewPrivs" => c.no_new_privs = value == "1",
            "Seccomp" => c.seccomp = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    c
}

/// The capability names of a mask (`CAP_NET_ADMIN`, …; unknown bits as `cap_<n>`).
pub fn capability_names(mask: u64) -> Vec<String> {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    (0..64)
        .filter(|bit| mask & (1 << bit) != 0)
        .map(|bit| {
            NAMES
                .get(bit)
                .map_or_else(|| format!("cap_{bit}"), |n| format!("CAP_{n}"))
        })
        .collect()
}

/// A socket's protocol family as listed under `/proc/<pid>/net`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// `tcp`, `tcp6`.
    Tcp,
    /// `udp`, `udp6`.
    Udp,
    /// `raw`, `raw6`.
    Raw,
    /// `icmp`, `icmp6` (unprivileged ping sockets) and `udplite`, `udplite6`: IP protocols
    /// the Client never uses.
    OtherIp,
}

/// One socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Socket {
    /// TCP, UDP or raw.
    pub proto: Proto,
    /// Local address.
    pub local: SocketAddr,
    /// Remote address (unspecified, port 0, for an unconnected socket).
    pub remote: SocketAddr,
    /// The kernel's state number (TCP: 1 established, 2 syn-sent, 10 listen).
    pub state: u8,
    /// Owner uid.
    pub uid: u32,
    /// Inode (0 for a TCP socket already closed and in TIME_WAIT).
    pub inode: u64,
}

/// TCP state number of a listening socket.
pub const TCP_LISTEN: u8 = 0x0A;

impl Socket {
    /// A TCP socket in the listening state.
    pub fn listening(&self) -> bool {
        self.proto == Proto::Tcp && self.state == TCP_LISTEN
    }

    /// A live connection (or one being made): not listening, not in TIME_WAIT and the like.
    pub fn connected(&self) -> bool {
        self.remote.port() != 0 && self.inode != 0
    }
}

/// How the sockets were attributed to the process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attribution {
    /// By the process's descriptor table (`/proc/<pid>/fd`): exact.
    Descriptors,
    /// By owner uid inside the process's network namespace (`/proc/<pid>/fd` unreadable).
    OwnerInNamespace {
        /// Why the descriptors could not be read.
        why: String,
    },
}

/// The sockets of a process, and how they were found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sockets {
    /// How they were attributed.
    pub attribution: Attribution,
    /// The sockets.
    pub sockets: Vec<Socket>,
    /// Descriptors of the process that are sockets of other families (unix, netlink, …);
    /// only known with [`Attribution::Descriptors`].
    pub other_families: usize,
    /// The files read.
    pub read: Vec<PathBuf>,
}

/// The tables read: name, protocol, and whether a kernel may lack it (no IPv6, or the
/// protocol not built).
const TABLES: [(&str, Proto, bool); 10] = [
    ("tcp", Proto::Tcp, false),
    ("tcp6", Proto::Tcp, true),
    ("udp", Proto::Udp, false),
    ("udp6", Proto::Udp, true),
    ("raw", Proto::Raw, false),
    ("raw6", Proto::Raw, true),
    ("icmp", Proto::OtherIp, true),
    ("icmp6", Proto::OtherIp, true),
    ("udplite", Proto::OtherIp, true),
    ("udplite6", Proto::OtherIp, true),
];

/// The TCP, UDP and raw sockets of `pid` (with `uid` its owner, for the fallback).
pub fn sockets(proc_root: &Path, pid: u32, uid: u32) -> std::io::Result<Sockets> {
    let base = proc_root.join(pid.to_string());
    let inodes = socket_inodes(&base.join("fd"));
    let mut all = Vec::new();
    let mut read = Vec::new();
    for (table, proto, optional) in TABLES {
        let path = base.join("net").join(table);
        let v6 = table.ends_with('6');
        match std::fs::read_to_string(&path) {
            Ok(text) => all.extend(parse_table(&text, proto, v6)),
            // A kernel without IPv6 has no tcp6/udp6/raw6 (nor the others without them).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && optional => continue,
            Err(e) => return Err(e),
        }
        read.push(path);
    }
    Ok(match inodes {
        Ok(inodes) => {
            let known: BTreeSet<u64> = all.iter().map(|s| s.inode).collect();
            let sockets: Vec<Socket> = all
                .into_iter()
                .filter(|s| s.inode != 0 && inodes.contains(&s.inode))
                .collect();
            read.push(base.join("fd"));
            Sockets {
                attribution: Attribution::Descriptors,
                other_families: inodes.iter().filter(|i| !known.contains(i)).count(),
                sockets,
                read,
            }
        }
        Err(e) => Sockets {
            attribution: Attribution::OwnerInNamespace {
                why: format!("{}: {e}", base.join("fd").display()),
            },
            sockets: all
                .into_iter()
                .filter(|s| s.uid == uid && s.inode != 0)
                .collect(),
            other_families: 0,
            read,
        },
    })
}

/// The inodes of `socket:[n]` descriptors in an fd directory.
fn socket_inodes(fd_dir: &Path) -> std::io::Result<BTreeSet<u64>> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(fd_dir)? {
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            // Closed between the listing and the read.
            continue;
        };
        if let Some(n) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse().ok())
        {
            out.insert(n);
        }
    }
    Ok(out)
}

/// Parses one `/proc/net/{tcp,udp,raw}[6]` table; lines that do not parse are skipped.
fn parse_table(text: &str, proto: Proto, v6: bool) -> Vec<Socket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(Socket {
                proto,
                local: parse_addr(f.get(1)?, v6)?,
                remote: parse_addr(f.get(2)?, v6)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                uid: f.get(7)?.parse().ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:port` (IPv6): the address in the kernel's
/// byte order, 32-bit word by word; the port in hex.
fn parse_addr(s: &str, v6: bool) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut b = [0u8; 16];
        for i in 0..4 {
            b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        IpAddr::V6(Ipv6Addr::from(b))
    } else {
        if addr.len() != 8 {
            return None;
        }
        IpAddr::V4(Ipv4Addr::from(word(0)?))
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_parse_and_a_garbled_mask_reads_as_every_capability() {
        let c = parse_status(
            "Name:\tewii-client\nUid:\t65532\t65532\t65532\t65532\nGid:\t1\t2\t3\t4\nCapPrm:\t0000000000000000\nCapEff:\tzz\nCapAmb:\t0000000000003000\nNoNewPrivs:\t1\nSeccomp:\t2\n",
        );
        assert_eq!(c.name, "ewii-client");
        assert_eq!(c.uids, [65532; 4]);
        assert_eq!(c.gids, [1, 2, 3, 4]);
        assert_eq!(c.cap_prm, 0);
        assert_eq!(c.cap_eff, u64::MAX);
        assert_eq!(
            capability_names(c.cap_amb),
            ["CAP_NET_ADMIN", "CAP_NET_RAW"]
        );
        assert!(c.no_new_privs);
        assert_eq!(c.seccomp, 2);
    }

    #[test]
    fn tables_parse_in_both_families() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   1: 0100007F:82A7 0200007F:01BB 01 00000000:00000000 00:00000000 00000000 65532        0 3174021 1 0 100 0 0 10 0\n";
        let s = parse_table(v4, Proto::Tcp, false);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].local, "127.0.0.1:33447".parse().unwrap());
        assert_eq!(s[0].remote, "127.0.0.2:443".parse().unwrap());
        assert_eq!((s[0].state, s[0].uid, s[0].inode), (1, 65532, 3174021));
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 42 1 0 100 0 0 10 0\n";
        let s = parse_table(v6, Proto::Tcp, true);
        assert_eq!(s[0].local, "[::1]:8080".parse().unwrap());
        assert!(s[0].listening());
        assert!(parse_table("header\n garbage line\n", Proto::Udp, false).is_empty());
    }

    #[test]
    fn p13_a_listener_of_this_very_process_is_found_by_descriptor() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = std::process::id();
        let uid = credentials(Path::new("/proc"), me).unwrap().uids[0];
        let found = sockets(Path::new("/proc"), me, uid).unwrap();
        assert_eq!(found.attribution, Attribution::Descriptors);
        assert!(
            found
                .sockets
                .iter()
                .any(|s| s.listening() && s.local.port() == port),
            "{found:?}"
        );
        drop(listener);
        let found = sockets(Path::new("/proc"), me, uid).unwrap();
        assert!(!found
            .sockets
            .iter()
            .any(|s| s.listening() && s.local.port() == port));
    }
}
