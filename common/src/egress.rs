//! The kernel egress lock's map entries, computed on the host (DESIGN §7, layer 3).
//!
//! The C programs in `ebpf/egress.bpf.c` only look keys up; which keys exist is decided here:
//! the Hub's UDP address(es), the allow-list's TCP endpoints, and — only when a DNS name is in
//! play — the configured resolvers on port 53. Addresses are canonical (a v4-mapped IPv6
//! address becomes an IPv4 key, as the programs unmap before looking up).
//!
//! The `#[repr(C)]` types mirror `ebpf/egress.h`; a test pins both to the same layout.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::policy::canonical;

/// Transport protocol of an entry (IANA protocol numbers, as in the IP header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Proto {
    /// TCP (6).
    Tcp = 6,
    /// UDP (17).
    Udp = 17,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// One allowed destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// Canonical address and port.
    pub addr: SocketAddr,
    /// Protocol.
    pub proto: Proto,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.proto)
    }
}

/// Why a rule set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EgressError {
    /// No Hub address: the lock would cut the Client off.
    #[error("no Hub address to allow")]
    NoHub,
    /// An unspecified, multicast or port-0 address.
    #[error("{0} cannot be an egress destination")]
    Invalid(SocketAddr),
}

/// The rule set: Hub addresses over UDP, allow-list endpoints over TCP, resolvers over UDP
/// and TCP port 53 (pass an empty `resolvers` when no DNS name is used). Sorted, deduplicated.
pub fn rules(
    hub: &[SocketAddr],
    allow: &[SocketAddr],
    resolvers: &[IpAddr],
) -> Result<Vec<Rule>, EgressError> {
    if hub.is_empty() {
        return Err(EgressError::NoHub);
    }
    let mut out = BTreeSet::new();
    let mut add = |addr: SocketAddr, proto| {
        let addr = canonical(addr);
        let ip = addr.ip();
        if addr.port() == 0 || ip.is_unspecified() || ip.is_multicast() {
            return Err(EgressError::Invalid(addr));
        }
        out.insert(Rule { addr, proto });
        Ok(())
    };
    for a in hub {
        add(*a, Proto::Udp)?;
    }
    for a in allow {
        add(*a, Proto::Tcp)?;
    }
    for ip in resolvers {
        add(SocketAddr::new(*ip, 53), Proto::Udp)?;
        add(SocketAddr::new(*ip, 53), Proto::Tcp)?;
    }
    Ok(out.into_iter().collect())
}

/// Key of the `ALLOW4` map (`struct ewii_key4`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key4 {
    /// IPv4 address, network byte order.
    pub addr: [u8; 4],
    /// Port, network byte order.
    pub port: [u8; 2],
    /// [`Proto`] number.
    pub proto: u8,
    /// Zero.
    pub pad: u8,
}

/// Key of the `ALLOW6` map (`struct ewii_key6`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key6 {
    /// IPv6 address, network byte order.
    pub addr: [u8; 16],
    /// Port, network byte order.
    pub port: [u8; 2],
    /// [`Proto`] number.
    pub proto: u8,
    /// Zero.
    pub pad: u8,
}

/// A map key for one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// For `ALLOW4`.
    V4(Key4),
    /// For `ALLOW6`.
    V6(Key6),
}

impl Rule {
    /// The map key for this rule.
    pub fn key(&self) -> Key {
        let port = self.addr.port().to_be_bytes();
        match canonical(self.addr).ip() {
            IpAddr::V4(v4) => Key::V4(Key4 {
                addr: v4.octets(),
                port,
                proto: self.proto as u8,
                pad: 0,
            }),
            IpAddr::V6(v6) => Key::V6(Key6 {
                addr: v6.octets(),
                port,
                proto: self.proto as u8,
                pad: 0,
            }),
        }
    }
}

/// Which program refused (`hook` in events, index of the `DENIES` counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// cgroup/connect4
    Connect4,
    /// cgroup/connect6
    Connect6,
    /// cgroup/sendmsg4
    Sendmsg4,
    /// cgroup/sendmsg6
    Sendmsg6,
    /// cgroup_skb/egress
    SkbEgress,
}

impl Hook {
    /// Every hook, in counter-index order.
    pub const ALL: [Hook; 5] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Sendmsg6,
        Hook::SkbEgress,
    ];

    fn from_index(i: u8) -> Option<Self> {
        Self::ALL.get(usize::from(i)).copied()
    }

    /// The hook's name as the kernel calls its attach point.
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
            Self::Sendmsg4 => "sendmsg4",
            Self::Sendmsg6 => "sendmsg6",
            Self::SkbEgress => "skb_egress",
        }
    }
}

/// A refused attempt, decoded from the `EVENTS` ring buffer (`struct ewii_event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenyEvent {
    /// Kernel monotonic time, ns.
    pub ts_ns: u64,
    /// Thread group id of the caller.
    pub pid: u32,
    /// The program that refused.
    pub hook: Hook,
    /// Destination.
    pub addr: SocketAddr,
    /// IP protocol number (255 for a socket type the lock never allows, e.g. MPTCP).
    pub proto: u8,
    /// Refusals the ring buffer had no room for since the programs were attached, as the
    /// kernel counted them when it sent this one (wraps at 2³²).
    pub lost: u32,
}

/// Size of `struct ewii_event`.
pub const EVENT_LEN: usize = 40;

impl DenyEvent {
    /// Decodes one ring-buffer record; `None` for a short or malformed one.
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < EVENT_LEN {
            return None;
        }
        let ts_ns = u64::from_ne_bytes(b[0..8].try_into().ok()?);
        let pid = u32::from_ne_bytes(b[8..12].try_into().ok()?);
        let hook = Hook::from_index(b[12])?;
        let port = u16::from_be_bytes([b[32], b[33]]);
        let ip = match b[13] {
            4 => IpAddr::V4(Ipv4Addr::new(b[16], b[17], b[18], b[19])),
            6 => {
                let octets: [u8; 16] = b[16..32].try_into().ok()?;
                IpAddr::V6(Ipv6Addr::from(octets))
            }
            _ => return None,
        };
        Some(Self {
            ts_ns,
            pid,
            hook,
            addr: SocketAddr::new(ip, port),
            proto: b[14],
            lost: u32::from_ne_bytes(b[36..40].try_into().ok()?),
        })
    }

    /// `tcp`, `udp`, or the protocol number.
    pub fn proto_name(&self) -> String {
        match self.proto {
            6 => "tcp".into(),
            17 => "udp".into(),
            255 => "other-socket-type".into(),
            n => format!("ip-proto-{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn p16_rules_hold_exactly_the_hub_the_allow_list_and_resolvers() {
        let hub: SocketAddr = "203.0.113.7:443".parse().unwrap();
        let db: SocketAddr = "[::ffff:10.0.0.5]:5432".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:6379".parse().unwrap();
        let r = rules(&[hub, hub], &[db, v6], &[]).unwrap();
        let shown: Vec<String> = r.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            shown,
            [
                "10.0.0.5:5432/tcp",
                "203.0.113.7:443/udp",
                "[2001:db8::1]:6379/tcp"
            ]
        );
        let with_dns = rules(&[hub], &[db], &["127.0.0.53".parse().unwrap()]).unwrap();
        assert!(with_dns.contains(&Rule {
            addr: "127.0.0.53:53".parse().unwrap(),
            proto: Proto::Udp
        }));
        assert_eq!(with_dns.len(), 4);
        assert_eq!(rules(&[], &[db], &[]), Err(EgressError::NoHub));
        assert!(rules(&[hub], &["0.0.0.0:80".parse().unwrap()], &[]).is_err());
        assert!(rules(&["[ff02::1]:443".parse().unwrap()], &[], &[]).is_err());
    }

    #[test]
    fn p16_keys_are_in_network_byte_order_and_v4_mapped_becomes_v4() {
        let rule = Rule {
            addr: "[::ffff:10.0.0.5]:5432".parse().unwrap(),
            proto: Proto::Tcp,
        };
        assert_eq!(
            rule.key(),
            Key::V4(Key4 {
                addr: [10, 0, 0, 5],
                port: [0x15, 0x38],
                proto: 6,
                pad: 0
            })
        );
        let rule6 = Rule {
            addr: "[2001:db8::1]:443".parse().unwrap(),
            proto: Proto::Udp,
        };
        let Key::V6(k) = rule6.key() else {
            panic!("v6 key expected")
        };
        assert_eq!(&k.addr[..4], &[0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(k.port, [0x01, 0xbb]);
        assert_eq!(k.proto, 17);
    }

    /// The Rust mirrors match `ebpf/egress.h`: the numbers its `_Static_assert`s pin.
    #[test]
    fn p16_layout_matches_egress_h() {
        let header = include_str!("../../ebpf/egress.h");
        let pinned = |what: &str| -> usize {
            let line = header
                .lines()
                .find(|l| l.starts_with("_Static_assert") && l.contains(&format!("\"{what}\"")))
                .unwrap_or_else(|| panic!("no assert for {what}"));
            let n = line.split("==").nth(1).unwrap().split(',').next().unwrap();
            n.trim().parse().unwrap()
        };
        assert_eq!(size_of::<Key4>(), pinned("ewii_key4 size"));
        assert_eq!(offset_of!(Key4, port), pinned("ewii_key4.port offset"));
        assert_eq!(offset_of!(Key4, proto), pinned("ewii_key4.proto offset"));
        assert_eq!(size_of::<Key6>(), pinned("ewii_key6 size"));
        assert_eq!(offset_of!(Key6, port), pinned("ewii_key6.port offset"));
        assert_eq!(offset_of!(Key6, proto), pinned("ewii_key6.proto offset"));
        assert_eq!(EVENT_LEN, pinned("ewii_event size"));
        for (field, at) in [
            ("pid", 8),
            ("hook", 12),
            ("family", 13),
            ("proto", 14),
            ("addr", 16),
            ("port", 32),
            ("lost", 36),
        ] {
            assert_eq!(at, pinned(&format!("ewii_event.{field} offset")), "{field}");
        }
    }

    #[test]
    fn deny_events_decode_and_reject_garbage() {
        let mut b = [0u8; EVENT_LEN];
        b[0..8].copy_from_slice(&7u64.to_ne_bytes());
        b[8..12].copy_from_slice(&4242u32.to_ne_bytes());
        b[12] = 0;
        b[13] = 4;
        b[14] = 6;
        b[16..20].copy_from_slice(&[127, 0, 0, 2]);
        b[32..34].copy_from_slice(&9u16.to_be_bytes());
        b[36..40].copy_from_slice(&31u32.to_ne_bytes());
        let e = DenyEvent::parse(&b).unwrap();
        assert_eq!(e.addr, "127.0.0.2:9".parse::<SocketAddr>().unwrap());
        assert_eq!(e.lost, 31);
        assert_eq!(
            (e.pid, e.hook, e.proto_name().as_str()),
            (4242, Hook::Connect4, "tcp")
        );
        assert_eq!(DenyEvent::parse(&b[..39]), None);
        b[13] = 5;
        assert_eq!(DenyEvent::parse(&b), None);
        b[13] = 4;
        b[12] = 9;
        assert_eq!(DenyEvent::parse(&b), None);
    }
}
