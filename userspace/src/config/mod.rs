//! Configuration files (TOML), parsed into typed values: there is no half-checked config.
//!
//! Unknown keys are errors, so a typo (`alow = …`) cannot silently drop a rule. See
//! `docs/config.md` for the reference; every field here is documented there.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ewii_common::policy::{AllowList, EntryName, PolicyError};
use ewii_common::spiffe;
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
    "on_stop",
    "connect_timeout_ms",
];
/// The Hub file's top-level keys.
const HUB_TOP_LEVEL: &[&str] = &[
    "state_dir",
    "listen",
    "svid_lifetime_secs",
    "revoke_after_lost_secs",
    "audit",
    "audit_format",
];

/// Parses TOML; an unknown key that is one of `top_level` gets the ordering hint.
fn parse_toml<T: serde::de::DeserializeOwned>(
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
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Self {
                host: sa.ip().to_string(),
                port: sa.port(),
            });
        }
        if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            return Ok(Self {
                host: ip.to_string(),
                port: 443,
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

impl fmt::Display for HubAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEnforcement {
    #[serde(default)]
    require: Require,
}

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

fn default_audit() -> String {
    "stdout".into()
}

fn default_connect_timeout_ms() -> u64 {
    5_000
}

impl FromStr for ClientConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let raw: RawClient = parse_toml(s, CLIENT_TOP_LEVEL)?;
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
            reconnect,
            allow,
            on_stop: raw.on_stop,
            connect_timeout: Duration::from_millis(raw.connect_timeout_ms),
            require: raw.enforcement.require,
        })
    }
}

/// How a Hub service listener learns who the requester is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceMode {
    /// Plain TCP: the source recorded is this configured principal plus the peer address.
    Tcp {
        /// Operator-chosen name of the requester.
        principal: String,
    },
    /// TLS with a client certificate: the source recorded is the caller's SPIFFE ID, which
    /// must be a `/workload/<name>` SVID of the Hub's trust domain.
    Tls,
}

/// One Hub service listener: operator workloads connect here to reach a Client's destination.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Unique name (for logs).
    pub name: String,
    /// TCP address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Name of the Client (`spiffe://<td>/client/<name>`).
    pub client: String,
    /// Allow-list entry name on that Client.
    pub destination: EntryName,
    /// Plain TCP or TLS.
    pub mode: ServiceMode,
}

/// The Hub's configuration.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Holds the CA, the Hub SVID and `hub.db` (made by `ewii-hub init`).
    pub state_dir: PathBuf,
    /// UDP address for Clients (443 by default).
    pub listen: SocketAddr,
    /// Lifetime of issued SVIDs.
    pub svid_lifetime: Duration,
    /// Where audit lines go.
    pub audit: AuditOutput,
    /// How audit lines are rendered.
    pub audit_format: ewii_common::audit::Format,
    /// Service listeners.
    pub services: Vec<ServiceConfig>,
    /// Revoke a Client that has had no session for this long (`None`: never).
    pub revoke_after_lost: Option<Duration>,
    /// Webhook delivery.
    pub webhooks: WebhookConfig,
}

/// How the Hub delivers webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// Also notify when a Client revokes itself by stopping (`on_stop = "revoke"`).
    pub notify_on_stop: bool,
    /// Deliver to loopback and link-local addresses. For tests only: it lets a webhook URL
    /// reach services on the Hub's own host or a cloud metadata endpoint.
    pub danger_allow_private_targets: bool,
    /// First retry delay; doubles per attempt.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Attempts before a delivery is given up (and left in the outbox, marked failed).
    pub max_attempts: u32,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            notify_on_stop: true,
            danger_allow_private_targets: false,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(600),
            max_attempts: 30,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawWebhooks {
    notify_on_stop: Option<bool>,
    danger_allow_private_targets: Option<bool>,
    retry_initial_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    max_attempts: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    state_dir: PathBuf,
    #[serde(default = "default_hub_listen")]
    listen: SocketAddr,
    #[serde(default = "default_svid_lifetime")]
    svid_lifetime_secs: u64,
    #[serde(default = "default_audit")]
    audit: String,
    #[serde(default)]
    audit_format: ewii_common::audit::Format,
    #[serde(default)]
    service: Vec<RawService>,
    #[serde(default = "default_revoke_after_lost")]
    revoke_after_lost_secs: u64,
    #[serde(default)]
    webhooks: RawWebhooks,
}

fn default_revoke_after_lost() -> u64 {
    86_400
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    listen: SocketAddr,
    client: String,
    destination: String,
    #[serde(default)]
    tls: bool,
    principal: Option<String>,
}

fn default_hub_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 443))
}

fn default_svid_lifetime() -> u64 {
    86_400
}

impl FromStr for HubConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let raw: RawHub = parse_toml(s, HUB_TOP_LEVEL)?;
        if raw.svid_lifetime_secs < 2 || raw.svid_lifetime_secs > 30 * 86_400 {
            return Err(ConfigError::Invalid(
                "svid_lifetime_secs must be between 2 and 2592000 (30 days)".into(),
            ));
        }
        let mut services: Vec<ServiceConfig> = Vec::new();
        for s in raw.service {
            if services.iter().any(|o| o.name == s.name) {
                return Err(ConfigError::Invalid(format!(
                    "duplicate service name {:?}",
                    s.name
                )));
            }
            spiffe::valid_name(&s.client).map_err(|_| {
                ConfigError::Invalid(format!("service {:?}: invalid client name", s.name))
            })?;
            let mode = match (s.tls, s.principal) {
                (false, Some(p)) if !p.is_empty() => ServiceMode::Tcp { principal: p },
                (false, _) => {
                    return Err(ConfigError::Invalid(format!(
                        "service {:?}: a plain TCP service needs `principal` (who connects here)",
                        s.name
                    )))
                }
                (true, None) => ServiceMode::Tls,
                (true, Some(_)) => {
                    return Err(ConfigError::Invalid(format!(
                    "service {:?}: a TLS service takes the caller's SPIFFE ID; drop `principal`",
                    s.name
                )))
                }
            };
            services.push(ServiceConfig {
                destination: s.destination.parse()?,
                name: s.name,
                listen: s.listen,
                client: s.client,
                mode,
            });
        }
        let d = WebhookConfig::default();
        let w = raw.webhooks;
        let webhooks = WebhookConfig {
            notify_on_stop: w.notify_on_stop.unwrap_or(d.notify_on_stop),
            danger_allow_private_targets: w
                .danger_allow_private_targets
                .unwrap_or(d.danger_allow_private_targets),
            retry_initial: w
                .retry_initial_ms
                .map_or(d.retry_initial, Duration::from_millis),
            retry_max: w.retry_max_ms.map_or(d.retry_max, Duration::from_millis),
            max_attempts: w.max_attempts.unwrap_or(d.max_attempts),
        };
        if webhooks.retry_initial.is_zero()
            || webhooks.retry_max < webhooks.retry_initial
            || webhooks.max_attempts == 0
        {
            return Err(ConfigError::Invalid(
                "webhooks: need 0 < retry_initial_ms <= retry_max_ms and max_attempts > 0".into(),
            ));
        }
        Ok(Self {
            state_dir: raw.state_dir,
            listen: raw.listen,
            svid_lifetime: Duration::from_secs(raw.svid_lifetime_secs),
            audit: raw.audit.parse()?,
            audit_format: raw.audit_format,
            services,
            revoke_after_lost: (raw.revoke_after_lost_secs > 0)
                .then(|| Duration::from_secs(raw.revoke_after_lost_secs)),
            webhooks,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_examples_parse_with_every_key() {
        let client: ClientConfig = include_str!("../../../examples/client.toml")
            .parse()
            .unwrap();
        assert_eq!(client.allow.names(), vec!["cache".to_string(), "db".into()]);
        assert_eq!(client.on_stop, OnStop::Revoke);
        let hub: HubConfig = include_str!("../../../examples/hub.toml").parse().unwrap();
        assert_eq!(hub.services.len(), 2);
    }

    #[test]
    fn a_top_level_key_after_a_table_says_where_it_belongs() {
        let text = "hub = \"h:443\"\n[[allow]]\nname = \"db\"\naddress = \"127.0.0.1:5432\"\nstate_dir = \"/x\"\n";
        let err = text.parse::<ClientConfig>().unwrap_err();
        assert!(
            matches!(&err, ConfigError::Misplaced { key, .. } if key == "state_dir"),
            "{err}"
        );
        assert!(
            err.to_string().contains("write it before the first"),
            "{err}"
        );
        // A key unknown everywhere is a plain unknown key.
        let text = "hub = \"h:443\"\nstate_dirr = \"/x\"\n";
        assert!(matches!(
            text.parse::<ClientConfig>().unwrap_err(),
            ConfigError::Toml(_)
        ));
    }

    const CLIENT: &str = r#"
hub = "hub.example.net"
state_dir = "/var/lib/ewii"
[[allow]]
name = "db"
address = "10.0.0.5:5432"
"#;

    #[test]
    fn client_defaults() {
        let c: ClientConfig = CLIENT.parse().unwrap();
        assert_eq!(c.hub.to_string(), "hub.example.net:443");
        assert_eq!(c.on_stop, OnStop::Revoke);
        assert_eq!(c.audit, AuditOutput::Stdout);
        assert_eq!(c.allow.names(), ["db"]);
    }

    #[test]
    fn unknown_keys_and_empty_lists_are_errors() {
        let typo = CLIENT.replace("[[allow]]", "[[alow]]");
        assert!(matches!(
            typo.parse::<ClientConfig>(),
            Err(ConfigError::Toml(_))
        ));
        let none = "hub = \"h:443\"\nstate_dir = \"/s\"\n";
        assert!(matches!(
            none.parse::<ClientConfig>(),
            Err(ConfigError::Policy(PolicyError::Empty))
        ));
        let wild = CLIENT.replace("10.0.0.5", "0.0.0.0");
        assert!(matches!(
            wild.parse::<ClientConfig>(),
            Err(ConfigError::Policy(_))
        ));
    }

    #[test]
    fn hub_addresses() {
        for (s, want) in [
            ("10.0.0.1:8443", "10.0.0.1:8443"),
            ("[::1]:443", "[::1]:443"),
            ("::1", "[::1]:443"),
            ("Hub.Example.NET:4433", "hub.example.net:4433"),
        ] {
            assert_eq!(s.parse::<HubAddress>().unwrap().to_string(), want);
        }
        for bad in ["", "hub:0", "hub:x", "hu b:1", "a/b:1"] {
            assert!(bad.parse::<HubAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn hub_services_need_a_principal_or_tls() {
        let base = "state_dir = \"/s\"\n[[service]]\nname = \"pg\"\nlisten = \"127.0.0.1:0\"\nclient = \"acme\"\ndestination = \"db\"\n";
        assert!(base.parse::<HubConfig>().is_err());
        let tcp = format!("{base}principal = \"billing\"\n");
        let h: HubConfig = tcp.parse().unwrap();
        assert_eq!(
            h.services[0].mode,
            ServiceMode::Tcp {
                principal: "billing".into()
            }
        );
        assert_eq!(h.listen.port(), 443);
        let tls = format!("{base}tls = true\n");
        assert_eq!(
            tls.parse::<HubConfig>().unwrap().services[0].mode,
            ServiceMode::Tls
        );
        let both = format!("{base}tls = true\nprincipal = \"x\"\n");
        assert!(both.parse::<HubConfig>().is_err());
        let bad_dest = base.replace("\"db\"", "\"DB!\"") + "principal = \"b\"\n";
        assert!(bad_dest.parse::<HubConfig>().is_err());
    }
}
