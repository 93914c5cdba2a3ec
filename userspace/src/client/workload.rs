//! The SVID from a SPIFFE Workload API (`svid_source = "workload-api"`): a SPIRE agent beside
//! the Client issues and rotates it, and delivers the Hub's trust bundle through federation.
//!
//! [`WorkloadSvid::connect`] waits (bounded) for the agent's first delivery; [`WorkloadSvid::watch`]
//! then forwards every later one to the driver, which moves the session to a new connection
//! made with it (make-before-break, see `ewii_common::session`). Nothing is written to disk:
//! the key lives in memory only, as the agent handed it over.
//!
//! Every delivery is checked before it is used, as an issued SVID is: the X509-SVID leaf rules,
//! a key that is the leaf's, the same SPIFFE ID as at start (an agent cannot turn this Client
//! into another identity while it runs), and a usable bundle for the Hub's trust domain.

use std::time::Duration;

use rustls::pki_types::CertificateDer;
use spiffe::{TrustDomain, X509Source};
use tokio::sync::mpsc;

use super::rotation::{check_anchors, Identity};
use crate::identity::inspect_leaf;
use crate::identity::store::Svid;

/// How long the Client waits for the agent's first SVID before it gives up (and says why).
pub(crate) const FIRST_SVID_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the Workload API gave nothing usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// No SVID from the agent (socket missing, no registration entry for this workload, …).
    #[error("no SVID from the SPIFFE Workload API at {socket} within {secs} s: {why}")]
    Unavailable {
        /// The configured endpoint.
        socket: String,
        /// The bound waited.
        secs: u64,
        /// What the source said.
        why: String,
    },
    /// The delivered SVID breaks the X509-SVID rules or its key is not the leaf's.
    #[error("the Workload API's SVID is refused: {0}")]
    BadSvid(String),
    /// The delivered SVID names another identity than the one this Client started with.
    #[error("the Workload API now delivers {got}, but this Client is {want}; restart it to change identity")]
    OtherIdentity {
        /// What the new leaf names.
        got: String,
        /// The identity in use.
        want: String,
    },
    /// No usable bundle for the Hub's trust domain (the agent is not federated with it).
    #[error("the Workload API delivers no usable bundle for the Hub's trust domain {trust_domain}: {why} (federate the SPIRE server with it)")]
    NoHubBundle {
        /// The Hub's trust domain.
        trust_domain: String,
        /// What is missing.
        why: String,
    },
    /// The source stopped delivering (its task ended).
    #[error("the Workload API source has closed")]
    Closed,
}

/// An SVID as the agent delivered it, checked, with the anchors for the Hub's trust domain.
#[derive(Debug)]
pub(crate) struct Delivered {
    pub(crate) identity: Identity,
    pub(crate) hub_anchors: Vec<CertificateDer<'static>>,
}

/// The Workload API source, held for the Client's lifetime.
pub(crate) struct WorkloadSvid {
    source: X509Source,
    socket: String,
    hub_trust_domain: String,
}

impl std::fmt::Debug for WorkloadSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSvid")
            .field("socket", &self.socket)
            .field("hub_trust_domain", &self.hub_trust_domain)
            .finish_non_exhaustive()
    }
}

impl WorkloadSvid {
    /// Connects to the agent at `socket` and waits up to `within` for a first SVID.
    pub(crate) async fn connect(
        socket: &str,
        hub_trust_domain: &str,
        within: Duration,
    ) -> Result<(Self, Delivered), WorkloadError> {
        let unavailable = |why: String| WorkloadError::Unavailable {
            socket: socket.to_owned(),
            secs: within.as_secs(),
            why,
        };
        let built = X509Source::builder()
            .endpoint(socket)
            .reconnect_backoff(Duration::from_millis(200), Duration::from_secs(10))
            .initial_sync_timeout(within)
            .build();
        // The builder's own bound, and ours around it in case a connection attempt hangs.
        let source = tokio::time::timeout(within + Duration::from_secs(1), built)
            .await
            .map_err(|_| unavailable("timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        let me = Self {
            source,
            socket: socket.to_owned(),
            hub_trust_domain: hub_trust_domain.to_owned(),
        };
        let first = me.current(None)?;
        Ok((me, first))
    }

    /// Reads what the source holds now and checks it (against `want`, the identity in use).
    fn current(&self, want: Option<&str>) -> Result<Delivered, WorkloadError> {
        let svid = self
            .source
            .svid()
            .map_err(|e| WorkloadError::BadSvid(e.to_string()))?;
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let leaf = chain
            .first()
            .ok_or_else(|| WorkloadError::BadSvid("empty chain".into()))
            .and_then(|l| inspect_leaf(l).map_err(|e| WorkloadError::BadSvid(e.to_string())))?;
        if let Some(want) = want {
            if leaf.id.to_string() != want {
                return Err(WorkloadError::OtherIdentity {
                    got: leaf.id.to_string(),
                    want: want.to_owned(),
                });
            }
        }
        let svid = Svid::from_pkcs8(chain, svid.private_key().as_bytes().to_vec());
        if !svid.key_matches() {
            return Err(WorkloadError::BadSvid(
                "the private key is not the one the certificate names".into(),
            ));
        }
        let no_bundle = |why: String| WorkloadError::NoHubBundle {
            trust_domain: self.hub_trust_domain.clone(),
            why,
        };
        let td = TrustDomain::new(&self.hub_trust_domain).map_err(|e| no_bundle(e.to_string()))?;
        let bundle = self
            .source
            .bundle_set()
            .map_err(|e| no_bundle(e.to_string()))?
            .get(&td)
            .ok_or_else(|| no_bundle("not in the delivered bundles".into()))?;
        let hub_anchors: Vec<CertificateDer<'static>> = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        check_anchors(&hub_anchors).map_err(|e| no_bundle(e.to_string()))?;
        Ok(Delivered {
            identity: Identity { svid, leaf },
            hub_anchors,
        })
    }

    /// Forwards every later delivery (checked against `identity`) until the driver is gone or
    /// the source closes.
    pub(crate) async fn watch(
        self,
        identity: String,
        to: mpsc::UnboundedSender<Result<Delivered, WorkloadError>>,
    ) {
        let mut updates = self.source.updated();
        loop {
            tokio::select! {
                changed = updates.changed() => {
                    let delivered = match changed {
                        Ok(_) => self.current(Some(&identity)),
                        Err(_) => Err(WorkloadError::Closed),
                    };
                    let closed = matches!(delivered, Err(WorkloadError::Closed));
                    if to.send(delivered).is_err() || closed {
                        break;
                    }
                }
                () = to.closed() => break,
            }
        }
        self.source.shutdown().await;
    }
}

/// What the driver keeps of the source: the deliveries.
pub(crate) type Deliveries = mpsc::UnboundedReceiver<Result<Delivered, WorkloadError>>;

/// Starts the watcher; returns its deliveries.
pub(crate) fn spawn_watch(source: WorkloadSvid, identity: String) -> Deliveries {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(source.watch(identity, tx));
    rx
}

/// Whether two deliveries hold the same SVID.
pub(crate) fn same_svid(a: &Identity, b: &Identity) -> bool {
    a.leaf.serial == b.leaf.serial && a.svid.chain == b.svid.chain
}
