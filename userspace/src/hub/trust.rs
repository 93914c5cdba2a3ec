//! The Hub's trust material at run time: the bundle, and the QUIC and TLS server
//! configurations built from the Hub SVID and it. `ewii-hub ca …` commands change the files;
//! [`reload`] (called by the watcher) swaps them in and pushes the new bundle to every live
//! session, so Clients trust the next CA before the Hub presents a certificate from it.

use std::path::Path;
use std::sync::Arc;

use ewii_common::audit::{Event, Outcome};
use ewii_common::frame::{self, Control};
use rustls::pki_types::CertificateDer;

use super::state::Db;
use super::{admin, HubError, Inner};
use crate::audit::Audit;
use crate::identity::ca::Ca;
use crate::identity::store::{self, Svid};
use crate::identity::verify::{Bundle, Expect, SpiffeVerifier};
use crate::identity::IdentityError;
use crate::transport;

/// The trusted CAs: `bundle.pem` when present, else the signing CA alone.
pub(super) fn load_bundle(
    dir: &Path,
    ca: &Ca,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let path = dir.join(admin::BUNDLE_FILE);
    if path.exists() {
        let anchors = store::read_certs(&path)?;
        if anchors.is_empty() {
            return Err(IdentityError::Pem(path));
        }
        Ok(anchors)
    } else {
        Ok(vec![ca.cert().clone()])
    }
}

/// The QUIC server configuration (Clients) and the TLS acceptor (service callers).
pub(super) fn server_configs(
    hub_svid: &Svid,
    bundle: &Bundle,
    trust_domain: &str,
    db: &Arc<Db>,
    audit: &Audit,
) -> Result<(quinn::ServerConfig, tokio_rustls::TlsAcceptor), HubError> {
    let client_verifier = SpiffeVerifier::new(bundle.clone(), trust_domain, Expect::Client)
        .with_serial_check(db.clone())
        .with_audit(audit.clone())
        .optional();
    let tls = transport::tls_server_config(
        hub_svid,
        Arc::new(client_verifier),
        &[frame::ALPN, frame::ENROLL_ALPN],
    )?;
    let quic = transport::quic_server_config(tls)?;
    let workload_verifier = SpiffeVerifier::new(bundle.clone(), trust_domain, Expect::Workload)
        .with_audit(audit.clone());
    let service_tls = transport::tls_server_config(hub_svid, Arc::new(workload_verifier), &[])?;
    Ok((quic, tokio_rustls::TlsAcceptor::from(Arc::new(service_tls))))
}

/// Re-reads the CA, the Hub SVID and the bundle; swaps in what changed.
pub(super) fn reload(inner: &Inner) {
    if let Err(e) = try_reload(inner) {
        tracing::error!(error = %e, "cannot reload the trust material; keeping the current one");
        let mut r = inner.audit.record(Event::BundleUpdated);
        r.outcome = Some(Outcome::Failed);
        r.reason = Some(e.to_string());
        inner.audit.emit(r);
    }
}

fn try_reload(inner: &Inner) -> Result<(), HubError> {
    let dir = &inner.state_dir;
    let ident = |source| HubError::Identity {
        dir: dir.clone(),
        source,
    };
    let ca = Ca::load(dir).map_err(ident)?;
    let anchors = load_bundle(dir, &ca).map_err(ident)?;
    let ca_changed = ca.cert() != inner.ca().cert();
    let bundle_changed = anchors != inner.bundle.anchors();
    if !ca_changed && !bundle_changed {
        return Ok(());
    }
    if !anchors.contains(ca.cert()) {
        return Err(HubError::Usage(
            "the bundle does not contain the signing CA; not reloading".into(),
        ));
    }
    inner.bundle.replace(anchors.clone());
    let hub_svid = admin::load_or_renew_hub_svid(dir, &ca).map_err(ident)?;
    let (quic, acceptor) = server_configs(
        &hub_svid,
        &inner.bundle,
        &inner.trust_domain,
        &inner.db,
        &inner.audit,
    )?;
    inner.endpoint.set_server_config(Some(quic));
    if let Ok(mut a) = inner.service_tls.write() {
        *a = acceptor;
    }
    if let Ok(mut c) = inner.ca.write() {
        *c = Arc::new(ca);
    }
    let sessions: Vec<_> = inner
        .sessions
        .lock()
        .map(|s| s.values().cloned().collect())
        .unwrap_or_default();
    if bundle_changed {
        let der: Vec<Vec<u8>> = anchors.iter().map(|c| c.to_vec()).collect();
        for s in &sessions {
            let _ = s.push.send(Control::BundleUpdate {
                bundle: der.clone(),
            });
        }
    }
    let mut r = inner.audit.record(Event::BundleUpdated);
    r.outcome = Some(Outcome::Ok);
    r.reason = Some(format!(
        "{} trust anchor(s){}; pushed to {} live session(s)",
        anchors.len(),
        if ca_changed { ", new signing CA" } else { "" },
        if bundle_changed { sessions.len() } else { 0 }
    ));
    inner.audit.emit(r);
    Ok(())
}
