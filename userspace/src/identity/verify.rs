//! SPIFFE verification, run by both sides on every handshake (DESIGN §5).
//!
//! In order: the chain must lead to an anchor of the current trust bundle (webpki, with the
//! right extended key usage and validity at `now`); the leaf must meet the X509-SVID rules
//! ([`inspect_leaf`]); its ID must be in the expected trust domain with the expected role; and,
//! on the Hub, its serial must be one the Hub issued and has not retired or revoked.
//!
//! A refusal is logged and audited here with its detail; the peer only sees a generic
//! `access_denied` alert, since QUIC would otherwise carry rustls's error text to it.

use std::fmt;
use std::sync::{Arc, RwLock};

use ewii_common::audit::{Event, Outcome};
use ewii_common::spiffe::{Role, SpiffeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};

use super::{inspect_leaf, LeafInfo};
use crate::audit::{Audit, Source};

/// Which identities a verifier accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Exactly `spiffe://<td>/hub`.
    Hub,
    /// `spiffe://<td>/client/<name>`.
    Client,
    /// `spiffe://<td>/workload/<name>`.
    Workload,
}

/// The Hub's check of a serial against its records (issued, not retired, not revoked).
pub trait SerialCheck: Send + Sync + fmt::Debug {
    /// `Err(why)` refuses the handshake (or a renewal).
    fn check(&self, id: &SpiffeId, serial: &str) -> Result<(), SerialRefusal>;
}

/// Why the Hub's records refuse a serial. The text is what the Hub's audit record says; the
/// peer sees only a generic refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SerialRefusal {
    /// The Hub never issued this serial (a certificate minted with a stolen CA key, or one
    /// issued by another Hub sharing the CA).
    #[error("serial {serial} was not issued by this Hub")]
    Unknown {
        /// The serial presented.
        serial: String,
    },
    /// The serial was issued to another identity than the one the certificate names.
    #[error("serial {serial} belongs to {owner}, not {id}")]
    OtherIdentity {
        /// The serial presented.
        serial: String,
        /// The identity it was issued to.
        owner: String,
        /// The identity the certificate claims.
        id: String,
    },
    /// The identity is revoked (by the operator, by a stop, or after its silent grace).
    #[error("{id} is revoked")]
    Revoked {
        /// The identity.
        id: String,
    },
    /// A newer serial of this identity has authenticated a session (or the identity enrolled
    /// again), so this one is dead.
    #[error("serial {serial} of {id} is retired")]
    Retired {
        /// The serial presented.
        serial: String,
        /// The identity.
        id: String,
    },
    /// The records could not be read: the check fails closed.
    #[error("revocation check failed closed: {0}")]
    StoreUnavailable(String),
}

/// The trust bundle: the CA certificates currently trusted. Shared and swappable, so a bundle
/// update reaches the next handshake without rebuilding the TLS configuration.
#[derive(Debug, Clone, Default)]
pub struct Bundle(Arc<RwLock<Vec<CertificateDer<'static>>>>);

impl Bundle {
    /// A bundle holding `anchors`.
    pub fn new(anchors: Vec<CertificateDer<'static>>) -> Self {
        Self(Arc::new(RwLock::new(anchors)))
    }

    /// The anchors now.
    pub fn anchors(&self) -> Vec<CertificateDer<'static>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the anchors.
    pub fn replace(&self, anchors: Vec<CertificateDer<'static>>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = anchors;
    }
}

/// The handshake-signature half of a verifier: the same for every verifier here, since they
/// differ only in how they judge the certificate chain.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// Foreign trust domains whose SVIDs the Hub accepts for named Clients (customers who run
/// SPIRE): each with its own bundle, and the one SPIFFE ID that is each Client.
#[derive(Debug, Clone, Default)]
pub struct Federation {
    domains: Vec<FederatedDomain>,
}

/// One federated trust domain.
#[derive(Debug, Clone)]
pub struct FederatedDomain {
    /// The trust domain.
    pub trust_domain: String,
    /// Its CA certificates.
    pub bundle: Bundle,
    /// SPIFFE ID → Client name.
    pub clients: std::collections::BTreeMap<SpiffeId, String>,
}

impl Federation {
    /// The federated trust domains.
    pub fn new(domains: Vec<FederatedDomain>) -> Self {
        Self { domains }
    }

    /// The trust domain `td`, if federated.
    pub fn domain(&self, td: &str) -> Option<&FederatedDomain> {
        self.domains.iter().find(|d| d.trust_domain == td)
    }

    /// The Client name of a federated SPIFFE ID, if it is one.
    pub fn client(&self, id: &SpiffeId) -> Option<&str> {
        self.domain(id.trust_domain())?
            .clients
            .get(id)
            .map(String::as_str)
    }

    /// Every federated Client: (name, SPIFFE ID).
    pub fn clients(&self) -> impl Iterator<Item = (&str, &SpiffeId)> {
        self.domains
            .iter()
            .flat_map(|d| d.clients.iter().map(|(id, n)| (n.as_str(), id)))
    }

    /// Whether no trust domain is federated.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }
}

/// A SPIFFE verifier for one side of one kind of connection.
#[derive(Clone)]
pub struct SpiffeVerifier {
    bundle: Bundle,
    trust_domain: String,
    expect: Expect,
    /// Client SVIDs of foreign trust domains, each checked against its own bundle only.
    federation: Option<Arc<Federation>>,
    serials: Option<Arc<dyn SerialCheck>>,
    /// Let a current serial of a revoked identity complete the handshake, so that the session
    /// can tell it it is revoked (see [`SpiffeVerifier::telling_revoked`]).
    tell_revoked: bool,
    audit: Option<Audit>,
    algs: WebPkiSupportedAlgorithms,
    mandatory: bool,
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("expect", &self.expect)
            .finish()
    }
}

impl SpiffeVerifier {
    /// Accepts `expect` identities of `trust_domain` chaining to `bundle`.
    pub fn new(bundle: Bundle, trust_domain: &str, expect: Expect) -> Self {
        Self {
            bundle,
            trust_domain: trust_domain.to_owned(),
            expect,
            federation: None,
            serials: None,
            tell_revoked: false,
            audit: None,
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
            mandatory: true,
        }
    }

    /// A current serial of a *revoked* identity passes the handshake: the caller must then
    /// close the connection with `REVOKED` at once (the Hub's session does). The peer holds
    /// the identity's current key, so telling it leaks nothing to a stranger, and it lets the
    /// Client stop dialling instead of retrying a generic refusal for ever. Retired, unknown
    /// and foreign serials are still refused generically.
    pub fn telling_revoked(mut self) -> Self {
        self.tell_revoked = true;
        self
    }

    /// Also accepts the Client SVIDs that `federation` names, each verified against its own
    /// trust domain's bundle (a foreign CA can never vouch for an ID of another domain).
    pub fn with_federation(mut self, federation: Arc<Federation>) -> Self {
        self.federation = Some(federation);
        self
    }

    /// Also checks serials against the Hub's records.
    pub fn with_serial_check(mut self, check: Arc<dyn SerialCheck>) -> Self {
        self.serials = Some(check);
        self
    }

    /// Audits refusals (`handshake_refused`).
    pub fn with_audit(mut self, audit: Audit) -> Self {
        self.audit = Some(audit);
        self
    }

    /// As a client-certificate verifier: let a peer without a certificate through the
    /// handshake (the Hub then allows it nothing but enrolment).
    pub fn optional(mut self) -> Self {
        self.mandatory = false;
        self
    }

    /// Full check of a presented chain at `now`.
    pub fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<LeafInfo, String> {
        self.checked(end_entity, intermediates, now)
            .map_err(|(detail, _)| detail)
    }

    /// [`verify_chain`](Self::verify_chain); a refusal also says whether the chain itself
    /// verified (what the leaf names is then proven, and it was refused for its identity:
    /// trust domain, role, serial).
    fn checked(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<LeafInfo, (String, bool)> {
        let (leaf, federated) = self
            .chain_verifies(end_entity, intermediates, now)
            .map_err(|d| (d, false))?;
        self.identity_allowed(leaf, federated)
            .map_err(|d| (d, true))
    }

    /// The chain to an anchor of the leaf's trust domain (its own bundle, or a federated one's):
    /// the leaf, and its federated domain if it has one.
    fn chain_verifies(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(LeafInfo, Option<&FederatedDomain>), String> {
        // With federation, the leaf's claimed trust domain picks the bundle; the chain then
        // has to prove it. A leaf that is no SVID at all falls to the Hub's own bundle, and
        // is refused below as before.
        let claimed = self
            .federation
            .as_ref()
            .and_then(|f| Some((f, inspect_leaf(end_entity).ok()?.id)));
        let federated = match claimed {
            Some((f, id)) if id.trust_domain() != self.trust_domain => {
                let domain = f.domain(id.trust_domain()).ok_or_else(|| {
                    format!(
                        "{id} is not in trust domain {} nor in a federated one",
                        self.trust_domain
                    )
                })?;
                Some(domain)
            }
            _ => None,
        };
        let anchors_der = match federated {
            Some(d) => d.bundle.anchors(),
            None => self.bundle.anchors(),
        };
        let anchors: Vec<_> = anchors_der
            .iter()
            .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
            .collect();
        if anchors.is_empty() {
            return Err("trust bundle is empty".into());
        }
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| format!("certificate does not parse: {e}"))?;
        let usage = match self.expect {
            Expect::Hub => webpki::KeyUsage::server_auth(),
            Expect::Client | Expect::Workload => webpki::KeyUsage::client_auth(),
        };
        cert.verify_for_usage(
            self.algs.all,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| format!("chain: {}", chain_error(&e)))?;
        let leaf = inspect_leaf(end_entity).map_err(|e| e.to_string())?;
        Ok((leaf, federated))
    }

    /// What a proven leaf may be here: of this trust domain or a federated Client it lists, in
    /// the expected role, and (with a serial check) a serial in use.
    fn identity_allowed(
        &self,
        leaf: LeafInfo,
        federated: Option<&FederatedDomain>,
    ) -> Result<LeafInfo, String> {
        if let Some(domain) = federated {
            if !domain.clients.contains_key(&leaf.id) {
                return Err(format!(
                    "{} is not a Client of this Hub ([[federation]] {} does not list it)",
                    leaf.id, domain.trust_domain
                ));
            }
        } else if leaf.id.trust_domain() != self.trust_domain {
            return Err(format!(
                "{} is not in trust domain {}",
                leaf.id, self.trust_domain
            ));
        }
        let role_ok = federated.is_some()
            || matches!(
                (self.expect, leaf.id.role()),
                (Expect::Hub, Role::Hub)
                    | (Expect::Client, Role::Client(_))
                    | (Expect::Workload, Role::Workload(_))
            );
        if !role_ok {
            return Err(format!("{} is not a {:?} identity", leaf.id, self.expect));
        }
        if let Some(check) = &self.serials {
            match check.check(&leaf.id, &leaf.serial) {
                Ok(()) => {}
                // Proven key of a revoked identity: the session tells it, and closes.
                Err(SerialRefusal::Revoked { .. }) if self.tell_revoked => {}
                Err(refusal) => return Err(refusal.to_string()),
            }
        }
        Ok(leaf)
    }

    /// Where a refused certificate's record is summed up from: its proven identity; for a
    /// federated trust domain's IDs that its `[[federation]]` entry does not list, that trust
    /// domain (its CA can mint any number of them); every unproven one together.
    fn refusal_source(&self, id: Option<&SpiffeId>, proven: bool) -> Source {
        let Some(id) = id.filter(|_| proven) else {
            return Source::Unverified;
        };
        // The Hub's own trust domain is never a federated one (its CA issues only what the Hub
        // means to; `[[federation]]` may not name it), whatever the federation holds.
        let federated = self
            .federation
            .as_ref()
            .filter(|_| id.trust_domain() != self.trust_domain)
            .and_then(|f| f.domain(id.trust_domain()));
        match federated {
            Some(d) if !d.clients.contains_key(id) => Source::Unlisted(d.trust_domain.clone()),
            _ => Source::Claimed(id.to_string()),
        }
    }

    /// Logs and audits a refusal (`proven`: the chain verified, so what the leaf names is
    /// true), and returns the one error the peer sees.
    fn refuse(
        &self,
        detail: String,
        end_entity: &CertificateDer<'_>,
        proven: bool,
    ) -> rustls::Error {
        let leaf = inspect_leaf(end_entity).ok();
        let who = leaf.as_ref().map(|l| l.id.to_string());
        let Some(audit) = &self.audit else {
            tracing::warn!(peer = ?who, reason = %detail, "handshake refused");
            return generic_refusal();
        };
        let mut r = audit.record(Event::HandshakeRefused);
        // Anyone can send a certificate: a flood is summed up ([`Self::refusal_source`]); the
        // log follows the audit (a warning for each record written one by one).
        let source = self.refusal_source(leaf.as_ref().map(|l| &l.id), proven);
        // Only a proven identity goes in `client`: anyone can write a Client's SPIFFE ID into a
        // self-signed certificate, and a record naming it would frame that Client.
        r.outcome = Some(Outcome::Refused);
        // A SPIFFE ID may be 2,048 bytes long (a stranger's, or one a federated partner's CA
        // issued), and the detail may name it: it is quoted bounded, as a peer's words are,
        // and the rest of the detail (this side's words) as it is.
        let said = |id: &str| ewii_common::text::from_peer(id.as_bytes());
        match (&who, proven) {
            (Some(id), true) => {
                r.client.clone_from(&who);
                r.reason = Some(detail.replace(id.as_str(), &said(id)));
            }
            (Some(claimed), false) => {
                r.reason = Some(format!(
                    "{} (the certificate claims {}, unproven)",
                    detail.replace(claimed.as_str(), &said(claimed)),
                    said(claimed)
                ));
            }
            (None, _) => r.reason = Some(said(&detail)),
        }
        if audit.emit_from(source, r) {
            tracing::warn!(peer = ?who, reason = %detail, "handshake refused");
        }
        generic_refusal()
    }
}

/// A chain error in words (webpki's own text for these is its debug form).
fn chain_error(e: &webpki::Error) -> String {
    let at = |t: &UnixTime| ewii_common::time::Timestamp(t.as_secs() * 1_000_000).to_string();
    match e {
        webpki::Error::CertExpired { time, not_after } => {
            format!(
                "Expired: notAfter {} is before now ({})",
                at(not_after),
                at(time)
            )
        }
        webpki::Error::CertNotValidYet { time, not_before } => format!(
            "NotYetValid: notBefore {} is after now ({})",
            at(not_before),
            at(time)
        ),
        webpki::Error::UnknownIssuer => "UnknownIssuer: not signed by a trusted CA".into(),
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            "RequiredEkuNotFound: the certificate's extendedKeyUsage does not allow this use".into()
        }
        other => other.to_string(),
    }
}

/// The one error a peer ever sees from our verifiers.
pub fn generic_refusal() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The DNS name is irrelevant: the Hub is whoever holds `spiffe://<td>/hub`.
        self.checked(end_entity, intermediates, now)
            .map(|_| ServerCertVerified::assertion())
            .map_err(|(d, proven)| self.refuse(d, end_entity, proven))
    }

    signature_checks!();
}

impl ClientCertVerifier for SpiffeVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.checked(end_entity, intermediates, now)
            .map(|_| ClientCertVerified::assertion())
            .map_err(|(d, proven)| self.refuse(d, end_entity, proven))
    }

    signature_checks!();
}

/// Enrolment-time verifier: the Client has no bundle yet, only the SHA-256 of the Hub CA's
/// certificate, pinned at install. The Hub must present that CA in its chain, and a `/hub`
/// leaf that chains to it. Only then is the join token sent.
#[derive(Debug)]
pub struct PinnedHubVerifier {
    pin: [u8; 32],
    algs: WebPkiSupportedAlgorithms,
    /// The CA that matched the pin, for the Client to check the `Issued` bundle against.
    pub matched: RwLock<Option<CertificateDer<'static>>>,
}

impl PinnedHubVerifier {
    /// Pins the CA with this SHA-256.
    pub fn new(pin: [u8; 32]) -> Self {
        Self {
            pin,
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
            matched: RwLock::new(None),
        }
    }
}

impl ServerCertVerifier for PinnedHubVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref()).as_slice() == self.pin)
        else {
            tracing::warn!("enrolment: the Hub's chain does not contain the pinned CA");
            return Err(generic_refusal());
        };
        let ca = ca.clone().into_owned();
        let td = inspect_leaf(end_entity)
            .map(|l| l.id.trust_domain().to_owned())
            .map_err(|e| {
                tracing::warn!(reason = %e, "enrolment: Hub leaf is not an SVID");
                generic_refusal()
            })?;
        let verifier = SpiffeVerifier::new(Bundle::new(vec![ca.clone()]), &td, Expect::Hub);
        verifier.verify_chain(end_entity, &[], now).map_err(|d| {
            tracing::warn!(reason = %d, "enrolment: Hub refused");
            generic_refusal()
        })?;
        if let Ok(mut m) = self.matched.write() {
            *m = Some(ca);
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A federated customer's CA can mint any ID of its trust domain: the refusals of IDs its
    /// `[[federation]]` entry does not list are summed up as one source (the trust domain), so
    /// that made-up IDs do not each get their own share of records (`audit::quiet`). Every other
    /// proven identity stays its own source, and unproven ones share one.
    #[test]
    fn p11_unlisted_ids_of_a_federated_domain_share_one_source_and_listed_ones_keep_their_own() {
        let id = |s: &str| s.parse::<SpiffeId>().unwrap();
        let listed = id("spiffe://customer.test/ewii/acme");
        let domain = FederatedDomain {
            trust_domain: "customer.test".into(),
            bundle: Bundle::new(Vec::new()),
            clients: [(listed.clone(), "acme".to_owned())].into(),
        };
        // A federation naming the Hub's own trust domain is refused at load (`hub::trust`);
        // the source stays per identity for that domain even so.
        let own = FederatedDomain {
            trust_domain: "ewii.test".into(),
            bundle: Bundle::new(Vec::new()),
            clients: Default::default(),
        };
        let verifier = SpiffeVerifier::new(Bundle::new(Vec::new()), "ewii.test", Expect::Client)
            .with_federation(Arc::new(Federation::new(vec![domain, own])));
        let source = |s: &str, proven| verifier.refusal_source(Some(&id(s)), proven);
        let unlisted = Source::Unlisted("customer.test".into());
        for made_up in ["/ewii/mallory", "/ewii/m1", "/anything/else"] {
            let s = format!("spiffe://customer.test{made_up}");
            assert_eq!(source(&s, true), unlisted, "{s}");
        }
        assert_eq!(
            source("spiffe://customer.test/ewii/acme", true),
            Source::Claimed(listed.to_string())
        );
        // The Hub's own trust domain: its own CA issues only what it means to.
        assert_eq!(
            source("spiffe://ewii.test/client/beta", true),
            Source::Claimed("spiffe://ewii.test/client/beta".into())
        );
        assert_eq!(
            source("spiffe://customer.test/ewii/mallory", false),
            Source::Unverified
        );
        assert_eq!(verifier.refusal_source(None, true), Source::Unverified);
    }
}
