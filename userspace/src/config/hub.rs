//! The Hub's configuration file (`ewii-hub run --config`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ewii_common::policy::EntryName;
use ewii_common::spiffe;
use serde::Deserialize;

use super::{default_audit, parse_toml, ConfigError};
use crate::audit::AuditOutput;

/// The shortest SVID lifetime: a Client renews at half-life, and at least
/// [`MIN_RENEW_GAP`](ewii_common::session::MIN_RENEW_GAP) after its last renewal, so a shorter
/// one could end before its renewal is asked.
const MIN_SVID_LIFETIME_SECS: u64 = 4;

/// The longest `principal` of a plain TCP service (with the requester's address it makes the
/// `source` of every query's `Open`, which the Client takes up to
/// [`MAX_QUERY_HEAD`](ewii_common::frame::MAX_QUERY_HEAD)).
const MAX_PRINCIPAL: usize = 1024;

/// The Hub file's top-level keys.
const HUB_TOP_LEVEL: &[&str] = &[
    "state_dir",
    "listen",
    "svid_lifetime_secs",
    "revoke_after_lost_secs",
    "audit",
    "audit_format",
    "audit_backlog",
    "metrics_listen",
    "threads",
    "query_window_kib",
];

/// How a Hub service listener learns who the requester is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceMode {
    /// Plain TCP: the source recorded is this configured principal plus the peer address.
    Tcp {
        /// Operator-chosen name of the requester.
        principal: String,
    },
    /// TLS with a client certificate: the source recorded is the caller's SPIFFE ID, which
    /// must be a `/workload/<name>` SVID of the Hub's trust domain whose name is listed.
    Tls {
        /// The workload names allowed to call this service (never empty).
        workloads: Vec<String>,
    },
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

/// A foreign trust domain whose SVIDs the Hub accepts for the Clients it names (a customer
/// who runs SPIRE: its agent issues the Client's SVID, `[[federation]]` in the Hub file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationConfig {
    /// The customer's trust domain (never the Hub's own).
    pub trust_domain: String,
    /// PEM file with that trust domain's CA certificates (its SPIFFE bundle), read at start and
    /// re-read every 5 s while the Hub runs.
    pub bundle: PathBuf,
    /// Client name → the one SPIFFE ID (of that trust domain) that authenticates as it.
    pub clients: BTreeMap<String, spiffe::SpiffeId>,
    /// The customer's URL for revocation notices of these Clients (`client.revoked`, signed
    /// with the Hub's webhook key, as for a token's `--webhook`).
    pub webhook: Option<String>,
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
    /// Records waiting for the audit sink above which new queries are refused.
    pub audit_backlog: usize,
    /// Service listeners.
    pub services: Vec<ServiceConfig>,
    /// Revoke a Client that has had no session for this long (`None`: never).
    pub revoke_after_lost: Option<Duration>,
    /// Webhook delivery.
    pub webhooks: WebhookConfig,
    /// What one source may cost before it has proven anything (fixed bounds, not read from
    /// the file: docs/config.md lists them).
    pub limits: crate::hub::admission::Limits,
    /// Where `/metrics` is served (Prometheus text), if anywhere. Off by default.
    pub metrics_listen: Option<SocketAddr>,
    /// Foreign trust domains whose SVIDs authenticate named Clients (SPIRE customers).
    pub federation: Vec<FederationConfig>,
    /// Shards: threads that each serve the connections of one QUIC endpoint (all on the
    /// Hub's port); `None`: one per core.
    pub threads: Option<usize>,
    /// Bytes of one query the Hub takes ahead of its requester's reader: the receive window of
    /// the service → requester direction (`query_window_kib`).
    pub query_window: u32,
}

/// The most shards a Hub may ask for (one byte of connection ID names the shard).
pub const MAX_HUB_THREADS: usize = crate::transport::shard::MAX_SHARDS;

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
    #[serde(default = "super::default_audit_backlog")]
    audit_backlog: usize,
    #[serde(default)]
    service: Vec<RawService>,
    #[serde(default = "default_revoke_after_lost")]
    revoke_after_lost_secs: u64,
    #[serde(default)]
    webhooks: RawWebhooks,
    metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    federation: Vec<RawFederation>,
    threads: Option<usize>,
    #[serde(default = "super::default_query_window_kib")]
    query_window_kib: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederation {
    trust_domain: String,
    bundle: PathBuf,
    clients: BTreeMap<String, String>,
    webhook: Option<String>,
}

/// Checks the `[[federation]]` tables: valid, distinct trust domains; each client name and
/// SPIFFE ID used once across all of them; every ID in its table's trust domain.
fn federation(raw: Vec<RawFederation>) -> Result<Vec<FederationConfig>, ConfigError> {
    let mut out: Vec<FederationConfig> = Vec::new();
    let bad = |td: &str, why: String| ConfigError::Invalid(format!("[[federation]] {td:?}: {why}"));
    for f in raw {
        let td = spiffe::SpiffeId::hub(&f.trust_domain)
            .map_err(|e| bad(&f.trust_domain, format!("invalid trust domain: {e}")))?
            .trust_domain()
            .to_owned();
        if out.iter().any(|o| o.trust_domain == td) {
            return Err(bad(&td, "listed twice".into()));
        }
        if f.clients.is_empty() {
            return Err(bad(
                &td,
                "`clients` is empty: name the Clients it authenticates, e.g. clients = { acme = \"spiffe://customer.example/ewii\" }".into(),
            ));
        }
        let mut clients = BTreeMap::new();
        for (name, id) in f.clients {
            spiffe::valid_name(&name)
                .map_err(|_| bad(&td, format!("invalid client name {name:?}")))?;
            let id: spiffe::SpiffeId = id
                .parse()
                .map_err(|e| bad(&td, format!("client {name:?}: {e}")))?;
            if id.trust_domain() != td {
                return Err(bad(
                    &td,
                    format!("client {name:?}: {id} is not in trust domain {td}"),
                ));
            }
            let taken = out
                .iter()
                .flat_map(|o| o.clients.iter())
                .chain(clients.iter())
                .find(|(n, i)| **n == name || **i == id);
            if let Some((n, i)) = taken {
                return Err(bad(
                    &td,
                    format!("client {name:?} ({id}): {n:?} ({i}) is listed already; each name and each SPIFFE ID once"),
                ));
            }
            clients.insert(name, id);
        }
        out.push(FederationConfig {
            trust_domain: td,
            bundle: f.bundle,
            clients,
            webhook: f.webhook,
        });
    }
    Ok(out)
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
    workloads: Option<Vec<String>>,
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
        if raw.svid_lifetime_secs < MIN_SVID_LIFETIME_SECS
            || raw.svid_lifetime_secs > crate::identity::PROMISED_SVID_LIFETIME_SECS
        {
            return Err(ConfigError::Invalid(format!(
                "svid_lifetime_secs must be between {MIN_SVID_LIFETIME_SECS} and {} (24 hours): \
                 the customers are promised SVIDs rotated every 24 hours, and each Client's \
                 `ewii-client verify` reports a longer one as broken",
                crate::identity::PROMISED_SVID_LIFETIME_SECS
            )));
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
            let mode = match (s.tls, s.principal, s.workloads) {
                // It travels in every query's `Open`, which the Client bounds.
                (false, Some(p), None) if p.len() > MAX_PRINCIPAL => {
                    return Err(ConfigError::Invalid(format!(
                        "service {:?}: `principal` is longer than {MAX_PRINCIPAL} bytes",
                        s.name
                    )))
                }
                (false, Some(p), None) if !p.is_empty() => ServiceMode::Tcp { principal: p },
                (false, _, Some(_)) => {
                    return Err(ConfigError::Invalid(format!(
                        "service {:?}: `workloads` is for TLS services (`tls = true`); a plain TCP service names its caller with `principal`",
                        s.name
                    )))
                }
                (false, _, None) => {
                    return Err(ConfigError::Invalid(format!(
                        "service {:?}: a plain TCP service needs `principal` (who connects here)",
                        s.name
                    )))
                }
                (true, Some(_), _) => {
                    return Err(ConfigError::Invalid(format!(
                        "service {:?}: a TLS service takes the caller's SPIFFE ID; drop `principal`",
                        s.name
                    )))
                }
                (true, None, None) => {
                    return Err(ConfigError::Invalid(format!(
                        "service {:?}: a TLS service needs `workloads`: the workload names allowed to call it (e.g. workloads = [\"billing\"])",
                        s.name
                    )))
                }
                (true, None, Some(workloads)) => {
                    if workloads.is_empty() {
                        return Err(ConfigError::Invalid(format!(
                            "service {:?}: `workloads` is empty: no workload could call it",
                            s.name
                        )));
                    }
                    if let Some(bad) = workloads.iter().find(|w| spiffe::valid_name(w).is_err()) {
                        return Err(ConfigError::Invalid(format!(
                            "service {:?}: invalid workload name {bad:?} (lower-case letters, digits, '-', '_', '.')",
                            s.name
                        )));
                    }
                    ServiceMode::Tls { workloads }
                }
            };
            let destination = s.destination.parse().map_err(|e| {
                ConfigError::Invalid(format!(
                    "service {:?}: `destination` is not the name of an entry in the Client's allow-list: {e}",
                    s.name
                ))
            })?;
            services.push(ServiceConfig {
                destination,
                name: s.name,
                listen: s.listen,
                client: s.client,
                mode,
            });
        }
        tcp_listens_apart(&services, raw.metrics_listen)?;
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
            audit_backlog: super::check_audit_backlog(raw.audit_backlog)?,
            services,
            revoke_after_lost: (raw.revoke_after_lost_secs > 0)
                .then(|| Duration::from_secs(raw.revoke_after_lost_secs)),
            webhooks,
            limits: crate::hub::admission::Limits::default(),
            metrics_listen: raw.metrics_listen,
            federation: federation(raw.federation)?,
            threads: raw
                .threads
                .map(|n| super::in_range("threads", n, 1, MAX_HUB_THREADS))
                .transpose()?,
            query_window: super::query_window(raw.query_window_kib)?,
        })
    }
}

/// Two TCP listeners of the Hub (the services, `metrics_listen`) on one port where the second
/// could not bind (the same address, or one of them every address of its family, which a
/// dual-stack `[::]` is for both): refused when the file is read, naming both, rather than at
/// `run`'s second bind as an `Address already in use` that reads like another process's.
fn tcp_listens_apart(
    services: &[ServiceConfig],
    metrics: Option<SocketAddr>,
) -> Result<(), ConfigError> {
    let named = services
        .iter()
        .map(|s| (format!("service {:?}", s.name), s.listen))
        .chain(metrics.map(|m| ("metrics_listen".to_owned(), m)));
    let mut seen: Vec<(String, SocketAddr)> = Vec::new();
    for (what, addr) in named {
        // An unspecified address holds the port for every address of its family, and `[::]`
        // (dual-stack, as Linux binds it by default) for IPv4's too.
        let covers = |any: &SocketAddr, other: &SocketAddr| {
            any.ip().is_unspecified() && (any.is_ipv6() || other.is_ipv4())
        };
        let clash = seen.iter().find(|(_, other)| {
            addr.port() != 0
                && addr.port() == other.port()
                && (addr.ip() == other.ip() || covers(&addr, other) || covers(other, &addr))
        });
        if let Some((first, other)) = clash {
            return Err(ConfigError::Invalid(format!(
                "{what} listens on {addr}, where {first} listens ({other}): each needs a port of its own"
            )));
        }
        seen.push((what, addr));
    }
    Ok(())
}
