//! The Hub's trust material at run time: the signing CA, the bundle, and the QUIC and TLS
//! server configurations built from the Hub SVID and them. `ewii-hub ca …` commands change the
//! files; [`Trust::reload`] (run by the watcher on a blocking thread) swaps them in and pushes
//! the new bundle to every live session, so Clients trust the next CA before the Hub presents
//! a certificate from it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use ewii_common::audit::{Event, Outcome};
use ewii_common::frame::{self, Control};
use ewii_common::spiffe::SpiffeId;
use rustls::pki_types::CertificateDer;

use super::layout;
use super::registry::Registry;
use super::store::View;
use crate::audit::Audit;
use crate::identity::ca::{Ca, Issued};
use crate::identity::store::Svid;
use crate::identity::verify::{Bundle, Expect, FederatedDomain, Federation, SpiffeVerifier};
use crate::identity::{inspect_leaf, IdentityError};
use crate::transport;

/// Why the trust material could not be loaded or built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// A file of the state directory is missing or unreadable.
    #[error("hub state in {dir}: {source}")]
    Identity {
        /// The state directory.
        dir: PathBuf,
        /// What failed.
        source: IdentityError,
    },
    /// A TLS or QUIC configuration was refused.
    #[error(transparent)]
    Transport(#[from] transport::ConfigError),
    /// The bundle on disk does not contain the signing CA.
    #[error("the bundle does not contain the signing CA; not reloading")]
    BundleWithoutCa,
    /// The Hub is stopping: a reload that waited for the trust lock gave up.
    #[error("the Hub is stopping")]
    Stopping,
    /// A `[[federation]]` table cannot be used.
    #[error("[[federation]] {trust_domain:?}: {why}")]
    Federation {
        /// Its trust domain.
        trust_domain: String,
        /// What is wrong.
        why: String,
    },
}

/// Reads the `[[federation]]` bundles. Blocking file I/O. A trust domain equal to the Hub's
/// own, or a bundle that [`federated_anchors`] refuses, is refused.
pub(crate) fn load_federation(
    config: &[crate::config::FederationConfig],
    material: &Material,
) -> Result<Federation, TrustError> {
    let own_trust_domain = material.trust_domain();
    let mut domains = Vec::new();
    for f in config {
        let bad = |why: String| TrustError::Federation {
            trust_domain: f.trust_domain.clone(),
            why,
        };
        if f.trust_domain == own_trust_domain {
            return Err(bad(
                "that is this Hub's own trust domain; federation is for the customer's".into(),
            ));
        }
        let bytes = std::fs::read(&f.bundle)
            .map_err(|e| bad(format!("bundle: {}: {e}", f.bundle.display())))?;
        let anchors = federated_anchors(&bytes, &material.anchors)
            .map_err(|why| bad(format!("bundle {}: {why}", f.bundle.display())))?;
        domains.push(FederatedDomain {
            trust_domain: f.trust_domain.clone(),
            bundle: Bundle::new(anchors),
            clients: f
                .clients
                .iter()
                .map(|(name, id)| (id.clone(), name.clone()))
                .collect(),
        });
    }
    Ok(Federation::new(domains))
}

/// The trust anchors of a `[[federation]]` bundle file's contents: PEM certificates, at
/// least one, every one a CA certificate usable as a trust anchor and none of them the Hub's
/// own (`own`: a customer's domain is never vouched for by the operator's CA). Sorted, so
/// that the same CAs in another order are the same bundle.
fn federated_anchors(
    pem: &[u8],
    own: &[CertificateDer<'static>],
) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let mut anchors = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "not PEM certificates".to_owned())?;
    let usable = anchors
        .iter()
        .filter(|c| webpki::anchor_from_trusted_cert(c).is_ok())
        .count();
    if usable == 0 || usable != anchors.len() {
        return Err(format!(
            "{usable} of {} certificates usable as trust anchors",
            anchors.len()
        ));
    }
    for a in &anchors {
        crate::identity::check_ca_certificate(a)?;
        if own.contains(a) {
            return Err("it holds this Hub's own CA certificate".into());
        }
    }
    anchors.sort_by(|a, b| a.as_ref().cmp(b.as_ref()));
    anchors.dedup();
    Ok(anchors)
}

/// A `[[federation]]` bundle file, re-read while the Hub runs ([`Trust::refresh_federation`]).
#[derive(Debug)]
pub(crate) struct BundleFile {
    trust_domain: String,
    path: PathBuf,
    seen: Mutex<Seen>,
}

/// What the last read of a [`BundleFile`] found.
#[derive(Debug, Default)]
struct Seen {
    /// Contents or error, so that a file that has not changed is neither parsed nor audited
    /// again.
    read: Option<Result<Vec<u8>, String>>,
    /// The last contents were refused.
    refused: bool,
}

impl BundleFile {
    /// Re-reads the file and, when it changed and passes [`federated_anchors`] (`own`: the
    /// Hub's anchors), replaces `bundle`'s anchors. What to audit, if anything: nothing for a
    /// file that did not change, or changed to the anchors in use after none was refused.
    /// Blocking.
    fn refresh(
        &self,
        bundle: &Bundle,
        own: &[CertificateDer<'static>],
    ) -> Option<(Outcome, String)> {
        let read = std::fs::read(&self.path).map_err(|e| e.to_string());
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.read.as_ref() == Some(&read) {
            return None;
        }
        seen.read = Some(read.clone());
        let in_use = bundle.anchors();
        let was_refused = std::mem::take(&mut seen.refused);
        let (td, path) = (&self.trust_domain, self.path.display());
        match read.and_then(|bytes| federated_anchors(&bytes, own)) {
            Ok(anchors) if anchors == in_use && !was_refused => None,
            Ok(anchors) if anchors == in_use => Some((
                Outcome::Ok,
                format!(
                    "federated trust domain {td}: {path} usable again; its {} trust anchor(s) are the ones in use",
                    in_use.len()
                ),
            )),
            Ok(anchors) => {
                let reason = format!(
                    "federated trust domain {td}: {} trust anchor(s) from {path} (were {}){}",
                    anchors.len(),
                    in_use.len(),
                    crate::identity::anchors_changed(&in_use, &anchors)
                );
                bundle.replace(anchors);
                Some((Outcome::Ok, reason))
            }
            Err(why) => {
                tracing::error!(trust_domain = %td, file = %path, reason = %why, "federated bundle refused; keeping the one in use");
                seen.refused = true;
                Some((
                    Outcome::Failed,
                    format!(
                        "federated trust domain {td}: bundle {path} refused: {why}; keeping the {} trust anchor(s) in use",
                        in_use.len()
                    ),
                ))
            }
        }
    }

    /// The files of `config`'s `[[federation]]` tables.
    pub(crate) fn all(config: &[crate::config::FederationConfig]) -> Vec<Self> {
        config
            .iter()
            .map(|f| Self {
                trust_domain: f.trust_domain.clone(),
                path: f.bundle.clone(),
                seen: Mutex::default(),
            })
            .collect()
    }
}

/// The CA, the Hub SVID and the bundle as read from the state directory.
#[derive(Debug)]
pub(crate) struct Material {
    ca: Ca,
    hub_svid: Svid,
    anchors: Vec<CertificateDer<'static>>,
    trust_domain: String,
}

impl Material {
    /// The Hub's trust domain.
    pub(crate) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Reads (and renews the Hub SVID when due). Blocking file I/O: call it off the async
    /// workers. Waiting for an `ewii-hub ca …` command's trust lock, it gives up
    /// ([`TrustError::Stopping`]) once `stop` is set.
    pub(crate) fn load(dir: &Path, stop: &AtomicBool) -> Result<Self, TrustError> {
        let ident = |source| TrustError::Identity {
            dir: dir.to_owned(),
            source,
        };
        // One consistent state, even while an `ewii-hub ca …` command runs.
        let Some(_lock) = layout::lock_trust_unless(dir, stop).map_err(ident)? else {
            return Err(TrustError::Stopping);
        };
        let ca = Ca::load(dir).map_err(ident)?;
        let anchors = layout::load_bundle(dir, &ca).map_err(ident)?;
        let hub_svid = layout::load_or_renew_hub_svid(dir, &ca).map_err(ident)?;
        let leaf = hub_svid
            .chain
            .first()
            .ok_or_else(|| ident(IdentityError::NotSvid("the Hub SVID is empty".into())))?;
        let trust_domain = inspect_leaf(leaf)
            .map_err(ident)?
            .id
            .trust_domain()
            .to_owned();
        Ok(Self {
            ca,
            hub_svid,
            anchors,
            trust_domain,
        })
    }
}

/// What the Hub's configuration adds to its trust material in what [`Trust`] builds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Terms {
    /// Lifetime of the SVIDs the Hub issues.
    pub(crate) svid_lifetime: Duration,
    /// The QUIC server configuration's per-query receive window, in bytes.
    pub(crate) query_window: u32,
}

/// What the Hub trusts and signs with now.
pub(crate) struct Trust {
    trust_domain: String,
    state_dir: PathBuf,
    terms: Terms,
    ca: RwLock<Arc<Ca>>,
    bundle: Bundle,
    service_tls: RwLock<tokio_rustls::TlsAcceptor>,
    view: Arc<View>,
    audit: Audit,
    federation: Arc<Federation>,
    bundle_files: Vec<BundleFile>,
    /// Counts the anchors that left a bundle (see [`Trust::generation`]).
    generation: AtomicU64,
    /// The same count, for those that wait for it ([`Trust::anchors_left`]).
    left: tokio::sync::watch::Sender<u64>,
    /// Counts the changes of the Hub's own bundle, any change (an anchor added too): what
    /// [`Trust::vouches_for_workload`]'s verdicts are kept for.
    bundle_epoch: AtomicU64,
    /// [`Trust::vouches_for_workload`]'s verdicts for the current bundle, by chain.
    verdicts: Mutex<Verdicts>,
    /// Why the last reload failed, while it keeps failing: the watcher tries again each
    /// [`super::watch::RELOAD_RETRY`], and the same reason is logged and audited once.
    reload_failure: Mutex<Option<String>>,
    /// Reloads that failed, every try counted ([`Trust::reloads_failed`]).
    reloads_failed: AtomicU64,
    /// The Hub SVID the configurations serve: [`Trust::hub_svid_due`].
    served: Mutex<layout::ServedSvid>,
    /// The Hub is stopping: a reload waiting for the trust lock gives up ([`Trust::stop`]).
    stopping: AtomicBool,
}

/// Calls [`Trust::stop`] when dropped.
pub(crate) struct StopOnDrop(pub(crate) Arc<Trust>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Verdicts on requesters' chains, kept while the Hub's own bundle stays as it is: when an
/// anchor leaves, every live TLS query re-checks its caller on its shard's thread, and
/// thousands of them usually share a few callers' SVIDs. A distinct chain is verified once
/// per change (on each shard at most, where two miss at the same moment), where each query
/// verified its own (a signature check each, the shard's other work waiting behind them all).
#[derive(Debug, Default)]
struct Verdicts {
    epoch: u64,
    by_chain: std::collections::HashMap<[u8; 32], Result<(), String>>,
}

impl Verdicts {
    /// Chains remembered per bundle; past it, a verdict is computed and not kept.
    const BOUND: usize = 4096;

    /// `verify`'s verdict on `chain` for the bundle of `epoch` (the count of its changes),
    /// kept for the next caller with the same chain while the count stays.
    fn judge(
        cell: &Mutex<Self>,
        epoch: &AtomicU64,
        chain: &[CertificateDer<'_>],
        verify: impl FnOnce(&[CertificateDer<'_>]) -> Result<(), String>,
    ) -> Result<(), String> {
        // Read first: the bundle is replaced before the count moves, so a verdict reached
        // after this read was judged against this bundle or a newer one.
        let now = epoch.load(Ordering::SeqCst);
        let key = chain_digest(chain);
        let lock = || cell.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(verdict) = lock().get(now, &key) {
            return verdict;
        }
        let verdict = verify(chain);
        lock().put(now, key, verdict.clone());
        verdict
    }

    /// The verdict kept for `chain` in `epoch`, if any.
    fn get(&self, epoch: u64, chain: &[u8; 32]) -> Option<Result<(), String>> {
        (self.epoch == epoch)
            .then(|| self.by_chain.get(chain).cloned())
            .flatten()
    }

    /// Keeps `verdict`, reached in `epoch` (read before the chain was verified: a verdict of
    /// an older bundle is never kept, nor served for a newer one).
    fn put(&mut self, epoch: u64, chain: [u8; 32], verdict: Result<(), String>) {
        if epoch > self.epoch {
            self.epoch = epoch;
            self.by_chain.clear();
        }
        if epoch == self.epoch && self.by_chain.len() < Self::BOUND {
            self.by_chain.insert(chain, verdict);
        }
    }
}

/// One digest for a whole chain, as presented (the leaf first).
fn chain_digest(chain: &[CertificateDer<'_>]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for cert in chain {
        h.update((cert.len() as u64).to_be_bytes());
        h.update(cert.as_ref());
    }
    h.finalize().into()
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("trust_domain", &self.trust_domain)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Trust {
    /// Builds the configurations from `material`; the QUIC one is for the endpoint.
    pub(crate) fn new(
        material: Material,
        state_dir: &Path,
        terms: Terms,
        view: Arc<View>,
        audit: Audit,
        federation: Federation,
        bundle_files: Vec<BundleFile>,
    ) -> Result<(Self, quinn::ServerConfig), TrustError> {
        let bundle = Bundle::new(material.anchors);
        let federation = Arc::new(federation);
        let served = layout::ServedSvid::of(&material.hub_svid).unwrap_or_default();
        let (quic, acceptor) = server_configs(
            &material.hub_svid,
            &bundle,
            &material.trust_domain,
            &view,
            &audit,
            &federation,
            terms.query_window,
        )?;
        Ok((
            Self {
                trust_domain: material.trust_domain,
                state_dir: state_dir.to_owned(),
                terms,
                ca: RwLock::new(Arc::new(material.ca)),
                bundle,
                service_tls: RwLock::new(acceptor),
                view,
                audit,
                federation,
                bundle_files,
                generation: AtomicU64::new(0),
                left: tokio::sync::watch::Sender::new(0),
                bundle_epoch: AtomicU64::new(0),
                verdicts: Mutex::default(),
                reload_failure: Mutex::default(),
                reloads_failed: AtomicU64::new(0),
                stopping: AtomicBool::new(false),
                served: Mutex::new(served),
            },
            quic,
        ))
    }

    /// The SPIFFE ID of Client `name` as the records name it: the one its `[[federation]]`
    /// table lists, else `spiffe://<td>/client/<name>` of the Hub's trust domain.
    pub(crate) fn client_id(&self, name: &str) -> Option<String> {
        if let Some((_, id)) = self.federation.clients().find(|(n, _)| *n == name) {
            return Some(id.to_string());
        }
        SpiffeId::client(&self.trust_domain, name)
            .ok()
            .map(|id| id.to_string())
    }

    /// The Client name an authenticated SPIFFE ID stands for: `spiffe://<td>/client/<name>`
    /// of the Hub's trust domain, or a SPIFFE ID a `[[federation]]` table names.
    pub(crate) fn client_name(&self, id: &SpiffeId) -> Option<String> {
        if id.trust_domain() == self.trust_domain {
            return match id.role() {
                ewii_common::spiffe::Role::Client(name) => Some(name),
                _ => None,
            };
        }
        self.federation.client(id).map(str::to_owned)
    }

    /// Whether `id` is a federated Client (its SVIDs come from the customer's SPIRE, and the
    /// Hub renews nothing for it).
    pub(crate) fn is_federated(&self, id: &SpiffeId) -> bool {
        self.federation.client(id).is_some()
    }

    /// Checks a chain a live Client presents (`Present`) as its handshake was checked: the
    /// chain to the bundle of its trust domain (a federated one's own), the SVID rules, a
    /// Client this Hub knows, and the Hub's records (a revoked identity is refused).
    pub(crate) fn verify_client_chain(
        &self,
        chain: &[CertificateDer<'_>],
    ) -> Result<crate::identity::LeafInfo, String> {
        let (leaf, intermediates) = chain.split_first().ok_or("empty chain")?;
        SpiffeVerifier::new(self.bundle.clone(), &self.trust_domain, Expect::Client)
            .with_federation(self.federation.clone())
            .with_serial_check(self.view.clone())
            .verify_chain(leaf, intermediates, rustls::pki_types::UnixTime::now())
    }

    /// Whether the bundles in use still vouch for `chain`, the one a live session is bound to:
    /// it chains to an anchor of its trust domain and passes the SVID rules, as at the
    /// handshake. The serial is not looked at: a revoked one is closed by its revocation, a
    /// retired one drains.
    pub(crate) fn vouches_for(&self, chain: &[CertificateDer<'_>]) -> Result<(), String> {
        let (leaf, intermediates) = chain.split_first().ok_or("empty chain")?;
        SpiffeVerifier::new(self.bundle.clone(), &self.trust_domain, Expect::Client)
            .with_federation(self.federation.clone())
            .verify_chain(leaf, intermediates, rustls::pki_types::UnixTime::now())
            .map(drop)
    }

    /// Whether the Hub's bundle still vouches for `chain`, a requester's workload SVID, as the
    /// TLS service listeners' verifier checks it at the handshake. Checked within the SVID's
    /// life: a connection may outlive its certificate, as any TLS connection does, and only the
    /// anchors are in question here. A chain is verified once per change of the bundle: the live
    /// queries of one caller share the verdict.
    pub(crate) fn vouches_for_workload(&self, chain: &[CertificateDer<'_>]) -> Result<(), String> {
        Verdicts::judge(&self.verdicts, &self.bundle_epoch, chain, |chain| {
            workload_vouched(&self.bundle, &self.trust_domain, chain)
        })
    }

    /// Changes when an anchor leaves a bundle ([`Trust::generation`]): a live requester's
    /// connection re-checks its caller's chain then. Subscribed before its handshake, it also
    /// sees a change made during it.
    pub(crate) fn anchors_left(&self) -> tokio::sync::watch::Receiver<u64> {
        self.left.subscribe()
    }

    /// How many times an anchor left a bundle. A change is counted after the anchors are
    /// replaced and before the live sessions are told to re-check: a connection whose
    /// handshake began before a change, and that registers after the sessions were told,
    /// sees the count move and checks itself.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The trust domain.
    pub(crate) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The bundle's anchors as DER, for `Issued`/`Renewed`/`BundleUpdate`.
    pub(crate) fn bundle_der(&self) -> Vec<Vec<u8>> {
        self.bundle.anchors().iter().map(|c| c.to_vec()).collect()
    }

    /// The acceptor for TLS service listeners now (a CA rotation replaces it).
    pub(crate) fn service_tls(&self) -> tokio_rustls::TlsAcceptor {
        match self.service_tls.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Signs the public key of `csr` for `id` with the current CA (nothing else from the CSR
    /// is used). One ECDSA signature: short enough for an async worker.
    pub(crate) fn issue(&self, csr: &[u8], id: &SpiffeId) -> Result<Issued, IdentityError> {
        let ca = match self.ca.read() {
            Ok(ca) => ca.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        ca.sign_csr(csr, id, self.terms.svid_lifetime)
    }

    /// Whether any `[[federation]]` bundle file is to be re-read.
    pub(crate) fn has_federation_files(&self) -> bool {
        !self.bundle_files.is_empty()
    }

    /// Re-reads every `[[federation]]` bundle file and, where it changed and passes
    /// [`federated_anchors`] (the checks made at start), replaces that trust domain's
    /// anchors: the next handshake and `Present` of its Clients are checked against them, and
    /// when a CA left, its live sessions re-check the chains they are bound to
    /// ([`Registry::recheck`]): one the new anchors no longer vouch for ends. A file that cannot be read or is refused
    /// changes nothing: the anchors in use stay. Each outcome is audited (`bundle_updated`)
    /// once per change of the file, and so is a file usable again after a refusal. Blocking:
    /// run it with `spawn_blocking`.
    pub(crate) fn refresh_federation(&self, registry: &Registry) {
        let own = self.bundle.anchors();
        for file in &self.bundle_files {
            let Some(domain) = self.federation.domain(&file.trust_domain) else {
                continue;
            };
            let before = domain.bundle.anchors();
            if let Some((outcome, mut reason)) = file.refresh(&domain.bundle, &own) {
                let after = domain.bundle.anchors();
                let td = &domain.trust_domain;
                if let Some(told) = self.recheck_if_removed(&before, &after, td, registry) {
                    let _ = write!(reason, "; {told} live session(s) re-checked");
                }
                let mut r = self.audit.record(Event::BundleUpdated);
                r.outcome = Some(outcome);
                r.reason = Some(reason);
                self.audit.emit(r);
            }
        }
    }

    /// When `before` held an anchor that `after` lacks, counts a change ([`Trust::generation`])
    /// and tells the live sessions of `trust_domain` to re-check their chains; how many were
    /// told. `None` when no anchor left: what passed before passes still.
    fn recheck_if_removed(
        &self,
        before: &[CertificateDer<'static>],
        after: &[CertificateDer<'static>],
        trust_domain: &str,
        registry: &Registry,
    ) -> Option<usize> {
        if before.iter().all(|a| after.contains(a)) {
            return None;
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        // Requesters' workload SVIDs are of this Hub's own trust domain only.
        if trust_domain == self.trust_domain {
            self.left.send_replace(generation);
        }
        Some(registry.recheck(trust_domain))
    }

    /// Reloads of the trust material that failed since start, every try (the audit says each
    /// reason once; this shows that the tries go on).
    pub(crate) fn reloads_failed(&self) -> u64 {
        self.reloads_failed.load(Ordering::Relaxed)
    }

    /// Whether the Hub SVID the configurations serve is due for renewal
    /// ([`layout::ServedSvid::due`]): the watcher then reloads, which renews it. Two
    /// comparisons.
    pub(crate) fn hub_svid_due(&self) -> bool {
        self.served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .due()
    }

    /// The Hub is stopping: a reload waiting for the trust lock (an `ewii-hub ca …` command
    /// holds it) gives up, so that the stop does not wait for that command.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Re-reads the CA, the Hub SVID and the bundle; swaps in what changed and pushes a new
    /// bundle to every live session. Whether it succeeded: a failed reload changes nothing,
    /// and the watcher tries again until one does. A failure is logged and audited once per
    /// reason. Blocking: run it with `spawn_blocking`.
    pub(crate) fn reload(&self, endpoints: &[quinn::Endpoint], registry: &Registry) -> bool {
        let outcome = self.try_reload(endpoints, registry);
        if matches!(outcome, Err(TrustError::Stopping)) {
            return false;
        }
        let mut last = self
            .reload_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match outcome {
            Ok(()) => {
                *last = None;
                true
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                let why = e.to_string();
                if last.as_deref() != Some(why.as_str()) {
                    tracing::error!(error = %why, "cannot reload the trust material; keeping the current one, and trying again every second");
                    let mut r = self.audit.record(Event::BundleUpdated);
                    r.outcome = Some(Outcome::Failed);
                    r.reason = Some(why.clone());
                    self.audit.emit(r);
                    *last = Some(why);
                }
                false
            }
        }
    }

    fn try_reload(
        &self,
        endpoints: &[quinn::Endpoint],
        registry: &Registry,
    ) -> Result<(), TrustError> {
        let dir = &self.state_dir;
        let ident = |source| TrustError::Identity {
            dir: dir.clone(),
            source,
        };
        // The files as one `ewii-hub ca …` command left them, never halfway through one: a
        // new CA read beside the old Hub SVID would have this Hub issue an SVID of its own
        // while the command writes another.
        let Some(_lock) = layout::lock_trust_unless(dir, &self.stopping).map_err(ident)? else {
            return Err(TrustError::Stopping);
        };
        let ca = Ca::load(dir).map_err(ident)?;
        let anchors = layout::load_bundle(dir, &ca).map_err(ident)?;
        let current = match self.ca.read() {
            Ok(c) => c.cert().clone(),
            Err(poisoned) => poisoned.into_inner().cert().clone(),
        };
        let ca_changed = *ca.cert() != current;
        let bundle_changed = anchors != self.bundle.anchors();
        let svid_due = self.hub_svid_due();
        if !ca_changed && !bundle_changed && !svid_due {
            return Ok(());
        }
        if !anchors.contains(ca.cert()) {
            return Err(TrustError::BundleWithoutCa);
        }
        // What can fail comes first: a reload that fails changes nothing, and the next one
        // finds the same change to make. (The configurations share `self.bundle`, replaced
        // below.)
        let hub_svid = layout::load_or_renew_hub_svid(dir, &ca).map_err(ident)?;
        let (quic, acceptor) = server_configs(
            &hub_svid,
            &self.bundle,
            &self.trust_domain,
            &self.view,
            &self.audit,
            &self.federation,
            self.terms.query_window,
        )?;
        let before = self.bundle.anchors();
        self.bundle.replace(anchors.clone());
        if bundle_changed {
            // After the replace and before anyone is told: requesters' verdicts are judged
            // again, against this bundle.
            self.bundle_epoch.fetch_add(1, Ordering::SeqCst);
        }
        // Handshakes are checked against the new bundle from now on: the Clients learn it, and
        // where a CA left it (`ca retire`), a session still bound to an SVID from that CA ends.
        let (pushed, rechecked) = if bundle_changed {
            let pushed = registry.push_all(&Control::BundleUpdate {
                bundle: anchors.iter().map(|c| c.to_vec()).collect(),
            });
            let rechecked =
                self.recheck_if_removed(&before, &anchors, &self.trust_domain, registry);
            (pushed, rechecked)
        } else {
            (0, None)
        };
        for endpoint in endpoints {
            endpoint.set_server_config(Some(quic.clone()));
        }
        if let Ok(mut a) = self.service_tls.write() {
            *a = acceptor;
        }
        if let Ok(mut c) = self.ca.write() {
            *c = Arc::new(ca);
        }
        let served = layout::ServedSvid::of(&hub_svid).unwrap_or_default();
        let was = std::mem::replace(
            &mut *self.served.lock().unwrap_or_else(PoisonError::into_inner),
            served.clone(),
        );
        if served.serial != was.serial {
            self.hub_svid_renewed(&served);
        }
        if !ca_changed && !bundle_changed {
            return Ok(());
        }
        let mut r = self.audit.record(Event::BundleUpdated);
        r.outcome = Some(Outcome::Ok);
        r.reason = Some(if bundle_changed {
            format!(
                "{} trust anchor(s){}; pushed to {pushed} live session(s){}{}",
                anchors.len(),
                if ca_changed { ", new signing CA" } else { "" },
                rechecked.map_or_else(String::new, |n| format!(", {n} re-checked")),
                crate::identity::anchors_changed(&before, &anchors),
            )
        } else {
            format!(
                "new signing CA; the bundle of {} trust anchor(s) is unchanged (live Clients have it already)",
                anchors.len()
            )
        });
        self.audit.emit(r);
        Ok(())
    }
}

impl Trust {
    /// The Hub serves with a new SVID of its own (renewed when a third of its life was left,
    /// or issued by a new signing CA): logged, and on record for the operator.
    fn hub_svid_renewed(&self, served: &layout::ServedSvid) {
        let serial = &served.serial;
        let until =
            ewii_common::time::Timestamp(u64::try_from(served.not_after).unwrap_or(0) * 1_000_000);
        tracing::info!(%serial, %until, "the Hub serves with a new SVID of its own");
        let mut r = self.audit.record(Event::SvidRotated);
        r.outcome = Some(Outcome::Ok);
        r.reason = Some(format!(
            "the Hub's own SVID: serial {serial}, valid until {until}; new handshakes present it"
        ));
        self.audit.emit(r);
    }
}

/// [`Trust::vouches_for_workload`] for `bundle` of `trust_domain`: the chain is checked at the
/// leaf's end when that has passed.
fn workload_vouched(
    bundle: &Bundle,
    trust_domain: &str,
    chain: &[CertificateDer<'_>],
) -> Result<(), String> {
    let (leaf, intermediates) = chain.split_first().ok_or("empty chain")?;
    let now = rustls::pki_types::UnixTime::now();
    let ends = inspect_leaf(leaf)
        .ok()
        .and_then(|l| u64::try_from(l.not_after).ok());
    let at = match ends {
        Some(end) if end < now.as_secs() => {
            rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(end))
        }
        _ => now,
    };
    SpiffeVerifier::new(bundle.clone(), trust_domain, Expect::Workload)
        .verify_chain(leaf, intermediates, at)
        .map(drop)
}

/// The QUIC server configuration (Clients; serials checked against the in-memory view) and
/// the TLS acceptor (service callers).
fn server_configs(
    hub_svid: &Svid,
    bundle: &Bundle,
    trust_domain: &str,
    view: &Arc<View>,
    audit: &Audit,
    federation: &Arc<Federation>,
    query_window: u32,
) -> Result<(quinn::ServerConfig, tokio_rustls::TlsAcceptor), TrustError> {
    let client_verifier = SpiffeVerifier::new(bundle.clone(), trust_domain, Expect::Client)
        .with_federation(federation.clone())
        .with_serial_check(view.clone())
        .telling_revoked()
        .with_audit(audit.clone())
        .optional();
    let tls = transport::tls_server_config(
        hub_svid,
        Arc::new(client_verifier),
        &[frame::ALPN, frame::ENROLL_ALPN],
    )?;
    let quic = transport::quic_server_config(tls, query_window)?;
    let workload_verifier = SpiffeVerifier::new(bundle.clone(), trust_domain, Expect::Workload)
        .with_audit(audit.clone());
    let service_tls = transport::tls_server_config(hub_svid, Arc::new(workload_verifier), &[])?;
    Ok((quic, tokio_rustls::TlsAcceptor::from(Arc::new(service_tls))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::store::Pem;

    /// A verdict serves its own bundle only: once the bundle changes (the count moves), a
    /// chain is verified again, and a verdict reached for an older bundle is not kept.
    #[test]
    fn a_requesters_verdict_lasts_while_the_bundle_stays() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mut v = Verdicts::default();
        v.put(1, a, Ok(()));
        assert_eq!(v.get(1, &a), Some(Ok(())));
        assert_eq!(v.get(1, &b), None, "another chain");
        assert_eq!(v.get(2, &a), None, "a verdict of bundle 1 judged bundle 2");
        v.put(2, a, Err("chain: unknown issuer".into()));
        assert_eq!(v.get(2, &a), Some(Err("chain: unknown issuer".into())));
        assert_eq!(v.get(1, &a), None, "bundle 1's verdicts were dropped");
        // A late verdict of bundle 1 (verified before the count moved) is not kept.
        v.put(1, b, Ok(()));
        assert_eq!(v.get(2, &b), None);
        assert_eq!(v.get(1, &b), None);
        // Bounded: past the bound a verdict is not kept.
        for n in 0..Verdicts::BOUND + 10 {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(n as u64).to_be_bytes());
            v.put(3, key, Ok(()));
        }
        assert_eq!(v.by_chain.len(), Verdicts::BOUND);
    }

    /// How the Hub judges a live requester: one verification per chain while the bundle stays
    /// (the queries of one caller share it), and again once it changes, whichever way: its CA
    /// left (cut), or came back (vouched again, not a kept refusal).
    #[test]
    fn p15_a_requesters_chain_is_judged_once_per_bundle() {
        let td = "hub.example";
        let ca = Ca::generate(td).unwrap();
        let other = Ca::generate(td).unwrap();
        let (key, _) = crate::identity::ca::new_key_and_csr().unwrap();
        let id = SpiffeId::new(td, "/workload/billing").unwrap();
        let chain = vec![ca.issue(&key, &id, Duration::from_secs(3_600)).unwrap().der];
        let bundle = Bundle::new(vec![ca.cert().clone(), other.cert().clone()]);
        let (cell, epoch) = (Mutex::<Verdicts>::default(), AtomicU64::new(0));
        let verified = std::cell::Cell::new(0);
        let judge = || {
            Verdicts::judge(&cell, &epoch, &chain, |c| {
                verified.set(verified.get() + 1);
                workload_vouched(&bundle, td, c)
            })
        };
        for _ in 0..100 {
            assert_eq!(judge(), Ok(()));
        }
        assert_eq!(
            verified.get(),
            1,
            "one verification for 100 queries of one caller"
        );
        // Its CA leaves: replaced, then counted (as `try_reload` does).
        bundle.replace(vec![other.cert().clone()]);
        epoch.fetch_add(1, Ordering::SeqCst);
        assert!(judge().unwrap_err().starts_with("chain: "));
        assert!(judge().is_err());
        assert_eq!(verified.get(), 2);
        // It comes back (an operator undoing a retirement): the refusal is not kept.
        bundle.replace(vec![ca.cert().clone(), other.cert().clone()]);
        epoch.fetch_add(1, Ordering::SeqCst);
        assert_eq!(judge(), Ok(()));
        assert_eq!(verified.get(), 3);
    }

    /// P15, an operator's CA rotation under a running Hub: a Hub reading its trust material
    /// while `ca prepare` and `ca activate` run (as its reload does, renewing its SVID when it
    /// is not from the signing CA) never finds them halfway, and each rotation leaves a whole
    /// Hub SVID from the signing CA. Without the trust lock the reader took the new CA beside
    /// the old Hub SVID, issued an SVID of its own while `ca activate` wrote another, and the
    /// two left a key and a certificate that do not match.
    #[test]
    fn p15_a_hub_reading_its_trust_while_the_ca_rotates_finds_each_rotation_whole() {
        const ROTATIONS: usize = 12;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("hub");
        crate::hub::admin::init(&state, "test.ewii.local").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let reader = {
            let (state, stop, reads) = (state.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                let mut errors = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match Material::load(&state, &AtomicBool::new(false)) {
                        Ok(m) if layout::whole(&m.hub_svid) => {}
                        Ok(_) => errors.push("a Hub SVID whose key does not match".to_owned()),
                        Err(e) => errors.push(e.to_string()),
                    }
                    reads.fetch_add(1, Ordering::SeqCst);
                }
                errors
            })
        };
        for _ in 0..ROTATIONS {
            crate::hub::admin::ca_prepare(&state).unwrap();
            crate::hub::admin::ca_activate(&state).unwrap();
            // The lock is not fair: let the reader in between two rotations, so that it is
            // reading when the next one starts (bounded: 10 s in 1 ms steps).
            let seen = reads.load(Ordering::SeqCst);
            let mut waited = 0;
            while reads.load(Ordering::SeqCst) < seen + 2 {
                assert!(waited < 10_000, "the reader is stuck");
                std::thread::sleep(Duration::from_millis(1));
                waited += 1;
            }
        }
        stop.store(true, Ordering::SeqCst);
        let errors = reader.join().unwrap();
        let reads = reads.load(Ordering::SeqCst);
        assert_eq!(errors, Vec::<String>::new(), "in {reads} reads");
        let last = Material::load(&state, &AtomicBool::new(false)).unwrap();
        assert!(layout::whole(&last.hub_svid));
        assert_eq!(last.hub_svid.chain.get(1), Some(last.ca.cert()));
    }

    /// A Hub SVID whose key was replaced without its certificate (a write cut short between the
    /// two files) is issued again at the next load, where it stopped the Hub from starting.
    #[test]
    fn a_torn_hub_svid_is_issued_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("hub");
        crate::hub::admin::init(&state, "test.ewii.local").unwrap();
        let ca = Ca::load(&state).unwrap();
        let before = Svid::load(&state, layout::HUB_CERT, layout::HUB_KEY).unwrap();
        let (key, _) = crate::identity::ca::new_key_and_csr().unwrap();
        let torn = Svid::new(before.chain.clone(), &key);
        torn.save(&state, layout::HUB_CERT, layout::HUB_KEY)
            .unwrap();
        assert!(!layout::whole(&torn));
        let after = layout::load_or_renew_hub_svid(&state, &ca).unwrap();
        assert!(layout::whole(&after));
        assert_ne!(after.chain[0], before.chain[0], "a new SVID");
        assert!(Material::load(&state, &AtomicBool::new(false)).is_ok());
    }

    /// A chain's digest covers every certificate and where each one ends.
    #[test]
    fn a_chain_digest_tells_chains_apart() {
        let der = |b: &[u8]| CertificateDer::from(b.to_vec());
        let one = chain_digest(&[der(b"leaf"), der(b"ca")]);
        assert_eq!(one, chain_digest(&[der(b"leaf"), der(b"ca")]));
        assert_ne!(one, chain_digest(&[der(b"leaf")]));
        assert_ne!(one, chain_digest(&[der(b"lea"), der(b"fca")]));
    }

    /// A live requester is re-checked for its anchors, not for its SVID's end: a workload SVID
    /// that expired during its connection is still vouched for while its CA is in the bundle,
    /// and not once the CA left (P15).
    #[test]
    fn p15_an_expired_workload_svid_is_judged_by_its_anchors_alone() {
        let td = "hub.example";
        let ca = Ca::generate(td).unwrap();
        let next = Ca::generate(td).unwrap();
        let (key, _) = crate::identity::ca::new_key_and_csr().unwrap();
        let id = SpiffeId::new(td, "/workload/billing").unwrap();
        // Issued after its CA (valid from 30 s ago), ended 5 s ago.
        let now = time::OffsetDateTime::now_utc();
        let from = now - Duration::from_secs(25);
        let to = now - Duration::from_secs(5);
        let expired = ca.issue_between(&key, &id, from, to).unwrap().der;
        let vouched = |anchors: &[&Ca]| {
            let bundle = Bundle::new(anchors.iter().map(|c| c.cert().clone()).collect());
            workload_vouched(&bundle, td, std::slice::from_ref(&expired))
        };
        assert_eq!(vouched(&[&ca, &next]), Ok(()));
        let why = vouched(&[&next]).unwrap_err();
        assert!(why.starts_with("chain: "), "{why}");
        // A live SVID of a CA still in the bundle, for the contrast.
        let live = ca.issue(&key, &id, Duration::from_secs(3_600)).unwrap().der;
        let bundle = Bundle::new(vec![ca.cert().clone()]);
        assert_eq!(workload_vouched(&bundle, td, &[live]), Ok(()));
    }

    #[test]
    fn p7_a_federated_bundle_holds_only_ca_certificates_and_never_the_hubs_own() {
        let customer = Ca::generate("customer.example").unwrap();
        let next = Ca::generate("customer.example").unwrap();
        let own = Ca::generate("hub.example").unwrap();
        let own_anchors = vec![own.cert().clone()];
        let (_key, csr) = crate::identity::ca::new_key_and_csr().unwrap();
        let id = SpiffeId::new("customer.example", "/ewii/acme").unwrap();
        let leaf = customer
            .sign_csr(&csr, &id, Duration::from_secs(3_600))
            .unwrap()
            .der;
        let read = |certs: &[CertificateDer<'static>]| {
            federated_anchors(Pem::certs(certs).as_bytes(), &own_anchors)
        };
        // The same CAs in any order (or twice) are the same bundle.
        let both = read(&[customer.cert().clone(), next.cert().clone()]).unwrap();
        assert_eq!(both.len(), 2);
        assert_eq!(
            read(&[
                next.cert().clone(),
                customer.cert().clone(),
                next.cert().clone()
            ])
            .unwrap(),
            both
        );
        // A leaf (its key would sign SVIDs for anyone listed), the Hub's own CA, nothing and
        // not PEM: refused, with the reason.
        let why = read(&[customer.cert().clone(), leaf]).unwrap_err();
        assert!(why.contains("is not a CA certificate"), "{why}");
        let why = read(&[own.cert().clone()]).unwrap_err();
        assert!(why.contains("this Hub's own CA"), "{why}");
        assert!(read(&[]).unwrap_err().contains("0 of 0"));
        assert!(federated_anchors(b"not pem at all", &own_anchors).is_err());
    }

    #[test]
    fn p7_a_bundle_file_is_taken_when_it_changes_and_audited_once_per_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("customer.pem");
        let first = Ca::generate("customer.example").unwrap();
        let next = Ca::generate("customer.example").unwrap();
        let own = [Ca::generate("hub.example").unwrap().cert().clone()];
        let write = |certs: &[CertificateDer<'static>]| {
            std::fs::write(&path, Pem::certs(certs)).unwrap();
        };
        write(&[first.cert().clone()]);
        let file = BundleFile {
            trust_domain: "customer.example".into(),
            path: path.clone(),
            seen: Mutex::default(),
        };
        let bundle = Bundle::new(vec![first.cert().clone()]);
        // The file as loaded at start: nothing to say, then or on any later read.
        assert_eq!(file.refresh(&bundle, &own), None);
        assert_eq!(file.refresh(&bundle, &own), None);
        // Refused (a leaf would do; here the Hub's own CA): said once, the anchors kept.
        write(&own);
        let (outcome, why) = file.refresh(&bundle, &own).unwrap();
        assert_eq!(outcome, Outcome::Failed);
        assert!(why.contains("this Hub's own CA"), "{why}");
        assert_eq!(file.refresh(&bundle, &own), None, "the same file again");
        assert_eq!(bundle.anchors(), vec![first.cert().clone()]);
        // Back to the anchors in use: said, since the last word was a refusal.
        write(&[first.cert().clone()]);
        let (outcome, why) = file.refresh(&bundle, &own).unwrap();
        assert_eq!(outcome, Outcome::Ok);
        assert!(why.contains("usable again"), "{why}");
        // A new CA: taken, said once.
        write(&[next.cert().clone()]);
        let (outcome, why) = file.refresh(&bundle, &own).unwrap();
        assert_eq!(outcome, Outcome::Ok);
        assert!(why.contains("1 trust anchor(s) from"), "{why}");
        assert_eq!(bundle.anchors(), vec![next.cert().clone()]);
        assert_eq!(file.refresh(&bundle, &own), None);
        // A file that is gone: refused once, the anchors kept.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(file.refresh(&bundle, &own).unwrap().0, Outcome::Failed);
        assert_eq!(file.refresh(&bundle, &own), None);
        assert_eq!(bundle.anchors(), vec![next.cert().clone()]);
    }
}
