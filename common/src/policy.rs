//! The install-time allow-list: which destinations the Client may dial, by entry name.
//!
//! The Hub names a destination by *entry name* only; the mapping from name to address lives
//! here, on the Client, and is fixed at start. Parsing is strict and fails closed: an empty
//! list, a duplicate name, a wildcard or multicast address, port 0, or a host name that a
//! resolver could read as an IP address (`127.1`) is an error, never a wider list.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// Why an allow-list or a destination was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The list has no entries: a Client with nothing to reach refuses to start.
    #[error("the allow-list is empty: the Client would have nothing it may reach")]
    Empty,
    /// An entry name is not 1–63 characters of `a-z 0-9 - _ .` starting with a letter or digit.
    #[error("invalid entry name {0:?}: use 1-63 characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit")]
    InvalidName(String),
    /// Two entries share a name.
    #[error("duplicate entry name {0:?}")]
    DuplicateName(String),
    /// An address is not `host:port` with an IP literal (`[v6]` in brackets) or a DNS name.
    #[error("invalid address {address:?} for entry {name:?}: {why}")]
    InvalidAddress {
        /// Entry name.
        name: String,
        /// The address as written.
        address: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A resolved address is one the Client never dials (unspecified, multicast, broadcast).
    #[error("address {0} is not a unicast destination")]
    NotUnicast(SocketAddr),
    /// A DNS answer points somewhere only a literal may: loopback, link-local (including the
    /// cloud metadata service), or an IPv6 form that carries one of those (v4-mapped, NAT64,
    /// IPv4-compatible). DNS answers never widen reach.
    #[error("{name} resolved to {addr}, which a DNS answer may not reach (write the address itself if it is meant)")]
    SpecialAnswer {
        /// The name in the allow-list.
        name: String,
        /// The answer.
        addr: SocketAddr,
    },
}

/// A validated allow-list entry name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryName(String);

impl EntryName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for EntryName {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(PolicyError::InvalidName(s.to_owned()))
        }
    }
}

impl fmt::Display for EntryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where an entry points.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Host {
    /// A literal, unicast IP address (v4-mapped v6 is stored as v4).
    Ip(IpAddr),
    /// A DNS name in lower case, resolved by the Client alone.
    Dns(String),
}

/// One allow-listed TCP endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// Host part.
    pub host: Host,
    /// TCP port, never 0.
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(ip) => write!(f, "{}", SocketAddr::new(*ip, self.port)),
            Host::Dns(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl Endpoint {
    /// Parses `host:port` for entry `name` (the name is only used in error messages).
    pub fn parse(name: &str, address: &str) -> Result<Self, PolicyError> {
        let bad = |why| PolicyError::InvalidAddress {
            name: name.to_owned(),
            address: address.to_owned(),
            why,
        };
        if let Ok(sa) = address.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(bad("port 0 is not a destination"));
            }
            let sa = canonical(sa);
            if !is_unicast(sa.ip()) {
                return Err(bad("not a unicast address"));
            }
            return Ok(Self {
                host: Host::Ip(sa.ip()),
                port: sa.port(),
            });
        }
        let (host, port) = address.rsplit_once(':').ok_or(bad("missing ':port'"))?;
        if host.contains(':') || host.starts_with('[') {
            return Err(bad("IPv6 addresses go in brackets: [addr]:port"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| bad("port is not a number 1-65535"))?;
        if port == 0 {
            return Err(bad("port 0 is not a destination"));
        }
        // A trailing dot is kept: it makes the name absolute, so the resolver asks for it
        // alone and never through `resolv.conf`'s search list (where, in a Kubernetes pod,
        // `db.internal` is first asked as `db.internal.<namespace>.svc.cluster.local`, a name
        // whoever may create Services in that namespace can answer).
        let host = host.to_ascii_lowercase();
        if !is_dns_name(host.strip_suffix('.').unwrap_or(&host)) {
            return Err(bad("host is neither an IP address nor a valid DNS name"));
        }
        Ok(Self {
            host: Host::Dns(host),
            port,
        })
    }
}

/// One entry: a name and its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name the Hub uses.
    pub name: EntryName,
    /// The address only the Client knows.
    pub endpoint: Endpoint,
}

/// The outcome of asking the allow-list about a destination name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'a> {
    /// Dial this entry.
    Allow(&'a Entry),
    /// Refuse: the name is not in the list (or is not even a valid name).
    Deny,
}

/// The parsed, validated allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    entries: BTreeMap<EntryName, Entry>,
}

impl AllowList {
    /// Builds the list from `(name, address)` pairs, as written in the config.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, PolicyError> {
        let mut entries = BTreeMap::new();
        for (name, address) in pairs {
            let entry_name: EntryName = name.parse()?;
            let endpoint = Endpoint::parse(name, address)?;
            let entry = Entry {
                name: entry_name.clone(),
                endpoint,
            };
            if entries.insert(entry_name, entry).is_some() {
                return Err(PolicyError::DuplicateName(name.to_owned()));
            }
        }
        if entries.is_empty() {
            return Err(PolicyError::Empty);
        }
        Ok(Self { entries })
    }

    /// Decides on a destination name sent by the Hub. Exact match only.
    pub fn decide(&self, destination: &str) -> Decision<'_> {
        let Ok(name) = destination.parse::<EntryName>() else {
            return Decision::Deny;
        };
        match self.entries.get(&name) {
            Some(entry) => Decision::Allow(entry),
            None => Decision::Deny,
        }
    }

    /// Entries in name order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Entry names in order, as announced to the Hub.
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().map(|n| n.0.clone()).collect()
    }

    /// SHA-256 over the canonical rendering (`name=endpoint\n` per entry, in name order).
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for e in self.entries.values() {
            h.update(format!("{}={}\n", e.name, e.endpoint).as_bytes());
        }
        h.finalize().into()
    }

    /// Checks one address that the DNS name `name` of an entry resolved to, and returns it
    /// canonical. A DNS answer never widens what the Client reaches: loopback, link-local
    /// (169.254.0.0/16, including the cloud metadata address, fe80::/10), the other clouds'
    /// metadata addresses (`fd00:ec2::254`, Alibaba Cloud's `100.100.100.200`, Azure's platform
    /// address `168.63.129.16`),
    /// unspecified, multicast and broadcast answers are refused, and so are IPv6 answers that
    /// carry one of those IPv4 addresses (NAT64's `64:ff9b::/96` and local-use `64:ff9b:1::/48`,
    /// IPv4-translated `::ffff:0:a.b.c.d`, IPv4-compatible `::a.b.c.d`) — except loopback for the name
    /// `localhost`, which is reserved for it (RFC 6761 §6.3). A customer who means such an
    /// address writes it as a literal.
    ///
    /// Literal entries need no check: they were validated at parse time.
    pub fn check_resolved(name: &str, addr: SocketAddr) -> Result<SocketAddr, PolicyError> {
        let addr = canonical(addr);
        // An IPv6 answer that carries an IPv4 address reaches that address through a
        // gateway (NAT64) or a tunnel: it is checked as that address too.
        let carried = match addr.ip() {
            IpAddr::V6(v6) => carried_v4(v6),
            IpAddr::V4(_) => None,
        };
        if !is_unicast(addr.ip()) || carried.is_some_and(|v4| !is_unicast(v4.into())) {
            return Err(PolicyError::NotUnicast(addr));
        }
        let localhost = name.trim_end_matches('.').eq_ignore_ascii_case("localhost");
        let special = match addr.ip() {
            IpAddr::V4(v4) => special_v4(v4, localhost),
            IpAddr::V6(v6) => {
                (v6.is_loopback() && !localhost)
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
                    || v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                    || carried.is_some_and(|v4| special_v4(v4, false))
                    || local_use_v4(v6)
                        .is_some_and(|all| all.iter().any(|v4| special_v4(*v4, false)))
            }
        };
        if special {
            return Err(PolicyError::SpecialAnswer {
                name: name.to_owned(),
                addr,
            });
        }
        Ok(addr)
    }
}

/// Azure's platform address (the WireServer: a VM's extension settings and certificates, its
/// DHCP and DNS). A public address, reachable from every Azure VM, that answers only the
/// platform's own guests: a metadata service in all but its range.
pub const AZURE_PLATFORM: std::net::Ipv4Addr = std::net::Ipv4Addr::new(168, 63, 129, 16);

/// Whether a DNS answer `v4` is one only a literal may reach: loopback (unless the name is
/// `localhost`), link-local (the cloud metadata address among them), Alibaba Cloud's metadata,
/// Azure's platform address.
fn special_v4(v4: std::net::Ipv4Addr, localhost: bool) -> bool {
    (v4.is_loopback() && !localhost)
        || v4.is_link_local()
        || v4 == std::net::Ipv4Addr::new(100, 100, 100, 200)
        || v4 == AZURE_PLATFORM
}

/// The IPv4 address an IPv6 address carries to it: NAT64's well-known prefix
/// (`64:ff9b::/96`, RFC 6052, what DNS64 answers for an IPv4-only name), the IPv4-translated
/// form (`::ffff:0:a.b.c.d`, RFC 2765) and the deprecated IPv4-compatible form (`::a.b.c.d`,
/// RFC 4291 §2.5.5.1; not `::` and `::1`). (v4-mapped answers are folded by [`canonical`]
/// before this; for NAT64's local-use prefix see [`local_use_v4`].)
fn carried_v4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let s = v6.segments();
    let [.., a, b, c, d] = v6.octets();
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    let translated = s[..6] == [0, 0, 0, 0, 0xffff, 0];
    let compatible = s[..6] == [0; 6] && !(v6.is_unspecified() || v6.is_loopback());
    (nat64 || translated || compatible).then(|| std::net::Ipv4Addr::new(a, b, c, d))
}

/// For an address in NAT64's local-use prefix (`64:ff9b:1::/48`, RFC 8215), the IPv4 address
/// it carries under each layout a network-specific prefix inside it may use (RFC 6052 §2.2:
/// prefixes of 48, 56, 64 and 96 bits; bits 64–71 are skipped). The prefix length is the
/// translator's setting and not in the address, so an answer is refused when any of them is
/// one only a literal may reach. (An ordinary address reads as 0.x.x.x under the others.)
fn local_use_v4(v6: std::net::Ipv6Addr) -> Option<[std::net::Ipv4Addr; 4]> {
    let o = v6.octets();
    let v4 = |a, b, c, d| std::net::Ipv4Addr::new(o[a], o[b], o[c], o[d]);
    (v6.segments()[..3] == [0x64, 0xff9b, 1]).then(|| {
        [
            v4(6, 7, 9, 10),
            v4(7, 9, 10, 11),
            v4(9, 10, 11, 12),
            v4(12, 13, 14, 15),
        ]
    })
}

/// Folds a v4-mapped IPv6 address (`::ffff:a.b.c.d`) to plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn is_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// RFC 1123 host name; the last label must not be all digits, so that no resolver can take
/// the name for a shorthand IPv4 address (`127.1`, `0x7f.1`).
fn is_dns_name(host: &str) -> bool {
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = host.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let last_is_numeric = labels.last().is_some_and(|l| {
        l.bytes().all(|b| b.is_ascii_digit()) || l.starts_with("0x") || l.starts_with("0X")
    });
    labels.iter().all(label_ok) && !last_is_numeric
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(pairs: &[(&str, &str)]) -> Result<AllowList, PolicyError> {
        AllowList::from_pairs(pairs.iter().copied())
    }

    #[test]
    fn empty_list_fails_closed() {
        assert_eq!(list(&[]), Err(PolicyError::Empty));
    }

    #[test]
    fn decides_by_exact_name() {
        let l = list(&[("db", "10.0.0.5:5432"), ("cache", "cache.internal:6379")]).unwrap();
        match l.decide("db") {
            Decision::Allow(e) => assert_eq!(e.endpoint.to_string(), "10.0.0.5:5432"),
            Decision::Deny => panic!("db must be allowed"),
        }
        for other in [
            "DB",
            "db ",
            "db\n",
            "d",
            "dbx",
            "",
            "../db",
            "10.0.0.5:5432",
        ] {
            assert_eq!(l.decide(other), Decision::Deny, "{other:?}");
        }
    }

    #[test]
    fn refuses_bad_entries() {
        let cases: &[(&str, &str)] = &[
            ("db", "0.0.0.0:5432"),
            ("db", "[::]:5432"),
            ("db", "224.0.0.1:5432"),
            ("db", "255.255.255.255:5432"),
            ("db", "10.0.0.1:0"),
            ("db", "10.0.0.1"),
            ("db", "::1:5432"),
            ("db", "127.1:5432"),
            ("db", "0x7f.1:5432"),
            ("db", "bad_host:5432"),
            ("db", "-x.example:5432"),
            ("db", "example.org:99999"),
            ("Db", "10.0.0.1:1"),
            ("", "10.0.0.1:1"),
            ("db\nx", "10.0.0.1:1"),
        ];
        for (n, a) in cases {
            assert!(list(&[(n, a)]).is_err(), "{n:?} {a:?} must be refused");
        }
        assert_eq!(
            list(&[("db", "10.0.0.1:1"), ("db", "10.0.0.2:1")]),
            Err(PolicyError::DuplicateName("db".into()))
        );
    }

    #[test]
    fn canonicalises_v4_mapped_and_dns_case() {
        let l = list(&[("a", "[::ffff:10.0.0.7]:80"), ("b", "DB.Example.ORG.:5432")]).unwrap();
        let names: Vec<String> = l.entries().map(|e| e.endpoint.to_string()).collect();
        // The trailing dot stays: the name is resolved as written, outside any search list.
        assert_eq!(names, ["10.0.0.7:80", "db.example.org.:5432"]);
        for bad in ["db..:5432", ".:5432", "..:5432", "db.example.org..:5432"] {
            assert!(list(&[("b", bad)]).is_err(), "{bad} must be refused");
        }
        assert_eq!(
            AllowList::check_resolved("db.example.org", "[::ffff:10.0.0.7]:5".parse().unwrap()),
            Ok("10.0.0.7:5".parse().unwrap())
        );
        assert!(AllowList::check_resolved("db.example.org", "0.0.0.0:5".parse().unwrap()).is_err());
    }

    #[test]
    fn p4_dns_answers_never_widen_reach() {
        for (name, answer) in [
            ("db.example.org", "127.0.0.1:5432"),
            ("db.example.org", "[::ffff:127.0.0.1]:5432"),
            ("db.example.org", "[::1]:5432"),
            ("db.example.org", "169.254.169.254:80"),
            ("db.example.org", "[fe80::1]:80"),
            ("db.example.org", "[fd00:ec2::254]:80"),
            ("db.example.org", "100.100.100.200:80"),
            ("db.example.org", "[::ffff:100.100.100.200]:80"),
            ("db.example.org", "168.63.129.16:80"),
            ("db.example.org", "[64:ff9b::168.63.129.16]:32526"),
            // Through NAT64 (DNS64's answer for an IPv4-only name) or the IPv4-compatible form.
            ("db.example.org", "[64:ff9b::169.254.169.254]:80"),
            ("db.example.org", "[64:ff9b::127.0.0.1]:5432"),
            ("db.example.org", "[64:ff9b::100.100.100.200]:80"),
            ("db.example.org", "[::169.254.169.254]:80"),
            ("db.example.org", "[::127.0.0.1]:5432"),
            ("db.example.org", "[::ffff:0:169.254.169.254]:80"),
            // NAT64's local-use prefix, under the /96, /64 and /48 layouts.
            ("db.example.org", "[64:ff9b:1::169.254.169.254]:80"),
            ("db.example.org", "[64:ff9b:1:0:a9:fea9:fe00:0]:80"),
            ("db.example.org", "[64:ff9b:1:7f00:0:100::]:5432"),
            ("localhost", "[64:ff9b::127.0.0.1]:5432"),
            ("vm", "127.0.0.1:22"),
        ] {
            let addr: SocketAddr = answer.parse().unwrap();
            assert!(
                matches!(
                    AllowList::check_resolved(name, addr),
                    Err(PolicyError::SpecialAnswer { .. })
                ),
                "{name} -> {answer}"
            );
        }
        // `localhost` is reserved for loopback (RFC 6761): its answer is what the customer wrote.
        for name in ["localhost", "LOCALHOST.", "localhost"] {
            assert!(AllowList::check_resolved(name, "127.0.0.1:5432".parse().unwrap()).is_ok());
            assert!(AllowList::check_resolved(name, "[::1]:5432".parse().unwrap()).is_ok());
        }
        // …but not a metadata answer.
        assert!(
            AllowList::check_resolved("localhost", "169.254.169.254:80".parse().unwrap()).is_err()
        );
        // An ordinary address behind NAT64 is an ordinary answer.
        for answer in [
            "10.0.0.5:5432",
            "[64:ff9b::10.0.0.5]:5432",
            "[64:ff9b::c633:6407]:5432",
            "[64:ff9b:1::10.0.0.5]:5432",
            "[64:ff9b:1:a00:0:500::]:5432",
            "[::ffff:0:10.0.0.5]:5432",
        ] {
            let addr: SocketAddr = answer.parse().unwrap();
            assert_eq!(AllowList::check_resolved("db.example.org", addr), Ok(addr));
        }
        // A multicast, broadcast or unspecified address carried is not a destination.
        for answer in [
            "[64:ff9b::224.0.0.1]:80",
            "[64:ff9b::255.255.255.255]:80",
            "[64:ff9b::]:80",
        ] {
            assert!(
                matches!(
                    AllowList::check_resolved("db.example.org", answer.parse().unwrap()),
                    Err(PolicyError::NotUnicast(_))
                ),
                "{answer}"
            );
        }
    }

    #[test]
    fn digest_ignores_order_but_not_content() {
        let a = list(&[("a", "10.0.0.1:1"), ("b", "10.0.0.2:2")]).unwrap();
        let b = list(&[("b", "10.0.0.2:2"), ("a", "10.0.0.1:1")]).unwrap();
        let c = list(&[("a", "10.0.0.1:1"), ("b", "10.0.0.2:3")]).unwrap();
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
    }
}
