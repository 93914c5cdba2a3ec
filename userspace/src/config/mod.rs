//! Configuration files (TOML), parsed into typed values: there is no half-checked config.
//!
//! Unknown keys are errors, so a typo (`alow = …`) cannot silently drop a rule. See
//! `docs/config.md` for the reference; every field here is documented there.
//!
//! This module holds the Client's file and what both share; `hub` holds the Hub's.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ewii_common::policy::{AllowList, PolicyError};
use serde::{Deserialize, Serialize};

use crate::audit::AuditOutput;

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type.
    #[error("invalid configuration: {0}")]
    Toml(#[from] toml::de::Error),
    /// The allow-list is refused (empty, duplicate, bad address…).
    #[error("invalid allow-list: {0}")]
    Policy(#[from] PolicyError),
    /// A top-level key was written after a `[section]` or `[[allow]]` header, so TOML read it
    /// as part of that table.
    #[error("invalid configuration: {source}hint: `{key}` is a top-level key: write it before the first [section] or [[…]] header (TOML reads every key after a header as part of that table)")]
    Misplaced {
        /// The key.
        key: String,
        /// The parser's error.
        source: toml::de::Error,
    },
    /// Any other invalid value.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The Client file's top-level keys.
const CLIENT_TOP_LEVEL: &[&str] = &[
    "hub",
    "state_dir",
    "audit",
    "audit_format",
    "audit_backlog",
    "max_queries",
    "query_window_kib",
    "threads",
    "on_stop",
    "connect_timeout_ms",
    "metrics_file",
    "svid_source",
    "workload_api_socket",
    "hub_trust_domain",
];

/// Parses TOML; an unknown key that is one of `top_level` gets the ordering hint.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    s: &str,
    top_level: &[&str],
) -> Result<T, ConfigError> {
    toml::from_str(s).map_err(|source| {
        let misplaced = top_level
            .iter()
            .find(|k| source.message().contains(&format!("unknown field `{k}`")));
        match misplaced {
            Some(key) => ConfigError::Misplaced {
                key: (*key).to_owned(),
                source,
            },
            None => ConfigError::Toml(source),
        }
    })
}

/// `host:port` of the Hub as the Client dials it. The port defaults to 443.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubAddress {
    /// DNS name or IP literal (no brackets).
    pub host: String,
    /// UDP port.
    pub port: u16,
}

impl FromStr for HubAddress {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::Invalid(format!("hub address {s:?} is not host[:port]"));
        // An address, with a port or without (443): `[2001:db8::1]` as well as `2001:db8::1`.
        let address = s
            .parse::<SocketAddr>()
            .map(|sa| (sa.ip(), sa.port()))
            .or_else(|_| {
                match s.strip_prefix('[').and_then(|v6| v6.strip_suffix(']')) {
                    Some(v6) => v6.parse::<std::net::Ipv6Addr>().map(std::net::IpAddr::from),
                    None => s.parse::<std::net::IpAddr>(),
                }
                .map(|ip| (ip, 443))
            });
        if let Ok((ip, port)) = address {
            if port == 0 {
                return Err(bad());
            }
            return Ok(Self {
                host: ip.to_string(),
                port,
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
            None => (s, 443),
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !host_ok || port == 0 {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl HubAddress {
    /// The resolver's `answers` for this address that the Client may dial, in their order: an
    /// IP literal's as written; a DNS name's checked as an allow-list entry's answers are
    /// ([`AllowList::check_resolved`]: no metadata, link-local, wildcard, multicast or
    /// broadcast address, and loopback only for `localhost`), so that whoever answers for the
    /// Hub's name cannot point the Client at this host or its cloud's metadata service. The
    /// refused answers come back as the second list.
    pub fn reachable(
        &self,
        answers: impl IntoIterator<Item = SocketAddr>,
    ) -> (Vec<SocketAddr>, Vec<PolicyError>) {
        let literal = self.host.parse::<std::net::IpAddr>().is_ok();
        let (mut ok, mut refused) = (Vec::new(), Vec::new());
        for a in answers {
            if literal {
                ok.push(a);
                continue;
            }
            match AllowList::check_resolved(&self.host, a) {
                Ok(a) => ok.push(a),
                Err(e) => refused.push(e),
            }
        }
        (ok, refused)
    }
}

impl fmt::Display for HubAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for AuditOutput {
    /// As it is written in the config file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::Discard => f.write_str("discard"),
            Self::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl FromStr for AuditOutput {
    type Err = ConfigError;

    /// `stdout`, `discard`, or `file:/path/to/audit.jsonl`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "discard" => Ok(Self::Discard),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(ConfigError::Invalid(format!(
                    "audit output {s:?}: use \"stdout\", \"discard\" or \"file:/path\""
                ))),
            },
        }
    }
}

/// Reconnection backoff (full jitter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Ceiling of the first wait.
    pub initial: Duration,
    /// Ceiling of every wait.
    pub max: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

/// What the Client does with its identity when it is stopped (SIGTERM/SIGINT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStop {
    /// Ask the Hub to revoke this identity (the seed's promise: stopping revokes).
    #[default]
    Revoke,
    /// Only disconnect; the identity stays valid for a restart.
    Disconnect,
}

impl fmt::Display for OnStop {
    /// As it is written in the config file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Revoke => "revoke",
            Self::Disconnect => "disconnect",
        })
    }
}

/// What the Client requires of the kernel before it starts (`[enforcement] require`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Require {
    /// The eBPF egress lock must be attached and proven (feature `ebpf`, CAP_BPF + CAP_NET_ADMIN).
    Kernel,
    /// At least one kernel layer (eBPF, Landlock or seccomp) must be active and proven.
    #[default]
    Any,
    /// Start on the Dialer alone if the kernel offers nothing (says so in status and audit).
    None,
}

impl fmt::Display for Require {
    /// As it is written in the config file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Any => "any",
            Self::None => "none",
        })
    }
}

/// Where the Client's SVID comes from (`svid_source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SvidSource {
    /// Enrolled with a join token; the Hub renews it; kept in the state directory.
    StateDir,
    /// A SPIFFE Workload API (a SPIRE agent beside the Client): the agent issues and rotates
    /// the SVID and delivers the Hub's trust bundle; nothing is written to disk.
    WorkloadApi {
        /// The agent's endpoint, `unix:///path/to/agent.sock` (or `unix:/path`).
        socket: String,
        /// The Hub's trust domain: the Hub must present `spiffe://<it>/hub`, verified with
        /// that trust domain's bundle as the agent delivers it (federation).
        hub_trust_domain: String,
    },
}

impl fmt::Display for SvidSource {
    /// As it is written in the config file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::StateDir => f.write_str("state-dir"),
            Self::WorkloadApi { socket, .. } => write!(f, "workload-api ({socket})"),
        }
    }
}

/// The Client's configuration.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where the Hub is.
    pub hub: HubAddress,
    /// Holds `svid.pem`, `svid.key`, `bundle.pem`, `status.json`.
    pub state_dir: PathBuf,
    /// Where audit lines go.
    pub audit: AuditOutput,
    /// How audit lines are rendered.
    pub audit_format: ewii_common::audit::Format,
    /// Records waiting for the audit sink above which new queries are refused.
    pub audit_backlog: usize,
    /// Queries the Hub may run through this Client at once (per connection).
    pub max_queries: u32,
    /// Bytes of one query the Client takes ahead of its destination's reader: the receive
    /// window of the requester → service direction (`query_window_kib`).
    pub query_window: u32,
    /// Worker threads of the Client's runtime ([`DEFAULT_CLIENT_THREADS`] by default).
    pub threads: usize,
    /// Reconnection backoff.
    pub reconnect: ReconnectPolicy,
    /// The install-time allow-list.
    pub allow: AllowList,
    /// What stopping does to the identity.
    pub on_stop: OnStop,
    /// Timeout of one TCP connect to a destination.
    pub connect_timeout: Duration,
    /// What the kernel must enforce before the Client starts.
    pub require: Require,
    /// Which kernel layers `run` installs, in order (`[enforcement] layers`; all by default).
    pub layers: Vec<String>,
    /// How often DNS allow-list entries are resolved again (`None`: only at start).
    pub dns_refresh: Option<Duration>,
    /// A Prometheus textfile for node-exporter's textfile collector, rewritten with the
    /// status (the Client has no listener, so no `/metrics`).
    pub metrics_file: Option<PathBuf>,
    /// Where the SVID comes from.
    pub svid_source: SvidSource,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    hub: String,
    state_dir: PathBuf,
    #[serde(default = "default_audit")]
    audit: String,
    #[serde(default)]
    audit_format: ewii_common::audit::Format,
    #[serde(default = "default_audit_backlog")]
    audit_backlog: usize,
    #[serde(default = "default_max_queries")]
    max_queries: u32,
    #[serde(default = "default_query_window_kib")]
    query_window_kib: u32,
    #[serde(default = "default_client_threads")]
    threads: usize,
    #[serde(default)]
    reconnect: RawReconnect,
    #[serde(default)]
    on_stop: OnStop,
    #[serde(default = "default_connect_timeout_ms")]
    connect_timeout_ms: u64,
    #[serde(default)]
    allow: Vec<RawAllow>,
    #[serde(default)]
    enforcement: RawEnforcement,
    #[serde(default)]
    dns: RawDns,
    metrics_file: Option<PathBuf>,
    #[serde(default)]
    svid_source: RawSvidSource,
    workload_api_socket: Option<String>,
    hub_trust_domain: Option<String>,
}

#[derive(Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum RawSvidSource {
    #[default]
    StateDir,
    WorkloadApi,
}

/// Checks `svid_source` and the keys that belong to it.
fn svid_source(raw: &RawClient) -> Result<SvidSource, ConfigError> {
    match raw.svid_source {
        RawSvidSource::StateDir => {
            if let Some(key) = [
                ("workload_api_socket", raw.workload_api_socket.is_some()),
                ("hub_trust_domain", raw.hub_trust_domain.is_some()),
            ]
            .iter()
            .find_map(|(k, set)| set.then_some(k))
            {
                return Err(ConfigError::Invalid(format!(
                    "{key} is only used with svid_source = \"workload-api\""
                )));
            }
            Ok(SvidSource::StateDir)
        }
        RawSvidSource::WorkloadApi => {
            let socket = raw.workload_api_socket.clone().ok_or_else(|| {
                ConfigError::Invalid(
                    "svid_source = \"workload-api\" needs workload_api_socket = \"unix:///path/to/agent.sock\"".into(),
                )
            })?;
            let path = socket
                .strip_prefix("unix://")
                .or_else(|| socket.strip_prefix("unix:"))
                .unwrap_or_default();
            if !path.starts_with('/') {
                return Err(ConfigError::Invalid(format!(
                    "workload_api_socket {socket:?}: use unix:///absolute/path (the Client opens no TCP connection but to the Hub and its allow-list)"
                )));
            }
            let td = raw.hub_trust_domain.clone().ok_or_else(|| {
                ConfigError::Invalid(
                    "svid_source = \"workload-api\" needs hub_trust_domain = \"<the operator's trust domain>\"".into(),
                )
            })?;
            let hub_trust_domain = ewii_common::spiffe::SpiffeId::hub(&td)
                .map_err(|e| ConfigError::Invalid(format!("hub_trust_domain {td:?}: {e}")))?
                .trust_domain()
                .to_owned();
            Ok(SvidSource::WorkloadApi {
                socket,
                hub_trust_domain,
            })
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    #[serde(default = "default_dns_refresh_secs")]
    refresh_secs: u64,
}

impl Default for RawDns {
    fn default() -> Self {
        Self {
            refresh_secs: default_dns_refresh_secs(),
        }
    }
}

fn default_dns_refresh_secs() -> u64 {
    300
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEnforcement {
    #[serde(default)]
    require: Require,
    layers: Option<Vec<String>>,
}

/// Every kernel layer the Client knows, in the order it installs them.
pub const LAYERS: [&str; 4] = ["ebpf", "landlock", "privileges", "seccomp"];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReconnect {
    initial_ms: Option<u64>,
    max_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    name: String,
    address: String,
}

fn default_max_queries() -> u32 {
    crate::transport::MAX_CONCURRENT_QUERIES
}

/// `query_window_kib` by default, on either side: [`crate::transport::STREAM_WINDOW`].
pub(crate) fn default_query_window_kib() -> u32 {
    crate::transport::STREAM_WINDOW / 1024
}

/// `query_window_kib` in bytes, when it is within the bounds the transport allows: from
/// [`crate::transport::MIN_STREAM_WINDOW`] to half the connection's window,
/// [`crate::transport::MAX_STREAM_WINDOW`] (so that one stalled query never holds all of it).
pub(crate) fn query_window(kib: u32) -> Result<u32, ConfigError> {
    use crate::transport::{MAX_STREAM_WINDOW, MIN_STREAM_WINDOW};
    let kib = in_range(
        "query_window_kib",
        kib,
        MIN_STREAM_WINDOW / 1024,
        MAX_STREAM_WINDOW / 1024,
    )?;
    Ok(kib * 1024)
}

/// The most `max_queries` may be: each query holds a TCP socket and a task.
pub const MAX_QUERIES_LIMIT: u32 = 100_000;

/// The Client's worker threads by default. Its one QUIC connection is processed by one task
/// whatever the count (sealing, opening, acknowledging every packet); more workers only let
/// queries' TCP sockets be served beside it, and cost a cross-thread wake-up on the hops
/// between them: one used 2–16 % less CPU per GiB than two on a 2-core host, depending on the
/// measurement (docs/benchmarks.md). A Client also shares its host with what it serves.
pub const DEFAULT_CLIENT_THREADS: usize = 1;
/// The most worker threads a Client may ask for.
pub const MAX_CLIENT_THREADS: usize = 64;

fn default_client_threads() -> usize {
    DEFAULT_CLIENT_THREADS
}

/// `value` of `key` when it is within `min..=max`; else an error that says the range.
fn in_range<T: PartialOrd + fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if value >= min && value <= max {
        Ok(value)
    } else {
        Err(ConfigError::Invalid(format!(
            "{key} must be {min} to {max} (got {value})"
        )))
    }
}

pub(crate) fn default_audit_backlog() -> usize {
    crate::audit::DEFAULT_BACKLOG
}

/// Checks `audit_backlog`: at least 16 records, at most a million.
pub(crate) fn check_audit_backlog(n: usize) -> Result<usize, ConfigError> {
    in_range("audit_backlog", n, 16, 1_000_000)
}

pub(crate) fn default_audit() -> String {
    "stdout".into()
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

impl FromStr for ClientConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let raw: RawClient = parse_toml(s, CLIENT_TOP_LEVEL)?;
        let svid_source = svid_source(&raw)?;
        let defaults = ReconnectPolicy::default();
        let reconnect = ReconnectPolicy {
            initial: raw
                .reconnect
                .initial_ms
                .map_or(defaults.initial, Duration::from_millis),
            max: raw
                .reconnect
                .max_ms
                .map_or(defaults.max, Duration::from_millis),
        };
        if reconnect.initial.is_zero() || reconnect.max < reconnect.initial {
            return Err(ConfigError::Invalid(
                "reconnect: need 0 < initial_ms <= max_ms".into(),
            ));
        }
        let layers = match raw.enforcement.layers {
            None => LAYERS.iter().map(|l| (*l).to_owned()).collect(),
            Some(asked) => {
                if let Some(bad) = asked.iter().find(|l| !LAYERS.contains(&l.as_str())) {
                    return Err(ConfigError::Invalid(format!(
                        "[enforcement] layers: unknown layer {bad:?} (known: {})",
                        LAYERS.join(", ")
                    )));
                }
                // Always in installation order, each once.
                LAYERS
                    .iter()
                    .filter(|l| asked.iter().any(|a| a == *l))
                    .map(|l| (*l).to_owned())
                    .collect::<Vec<_>>()
            }
        };
        let has = |name: &str| layers.iter().any(|l| l == name);
        if has("ebpf") && !(has("privileges") && has("seccomp")) {
            return Err(ConfigError::Invalid(
                "[enforcement] layers: \"ebpf\" needs \"privileges\" and \"seccomp\" too: without them code in the Client could lift the lock".into(),
            ));
        }
        if raw.enforcement.require == Require::Kernel && !has("ebpf") {
            return Err(ConfigError::Invalid(
                "[enforcement] require = \"kernel\" needs \"ebpf\" in [enforcement] layers".into(),
            ));
        }
        if raw.dns.refresh_secs > 86_400 {
            return Err(ConfigError::Invalid(
                "dns.refresh_secs must be at most 86400 (a day); 0 resolves only at start".into(),
            ));
        }
        if raw.connect_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "connect_timeout_ms must be > 0".into(),
            ));
        }
        let allow = AllowList::from_pairs(
            raw.allow
                .iter()
                .map(|a| (a.name.as_str(), a.address.as_str())),
        )?;
        Ok(Self {
            hub: raw.hub.parse()?,
            state_dir: raw.state_dir,
            audit: raw.audit.parse()?,
            audit_format: raw.audit_format,
            audit_backlog: check_audit_backlog(raw.audit_backlog)?,
            max_queries: in_range("max_queries", raw.max_queries, 1, MAX_QUERIES_LIMIT)?,
            query_window: query_window(raw.query_window_kib)?,
            threads: in_range("threads", raw.threads, 1, MAX_CLIENT_THREADS)?,
            reconnect,
            allow,
            on_stop: raw.on_stop,
            connect_timeout: Duration::from_millis(raw.connect_timeout_ms),
            require: raw.enforcement.require,
            layers,
            dns_refresh: (raw.dns.refresh_secs > 0)
                .then(|| Duration::from_secs(raw.dns.refresh_secs)),
            metrics_file: raw.metrics_file,
            svid_source,
        })
    }
}

/// Reads and parses a config file.
pub fn load<T: FromStr<Err = ConfigError>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.parse()
}

mod hub;

pub use hub::{FederationConfig, HubConfig, ServiceConfig, ServiceMode, WebhookConfig};

#[cfg(test)]
mod tests;
