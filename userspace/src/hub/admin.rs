//! Offline operations on the Hub's state directory: `init`, `token create`, workload SVIDs,
//! `clients`. They need no running Hub (SQLite serialises them with one that runs).

use std::path::Path;
use std::time::Duration;

use ewii_common::spiffe::SpiffeId;
use rand::RngCore;

use super::layout::{ca_trust_domain, issue_hub_svid};
use super::state::{token_id_of, ClientRow, Db, TokenRow, TokenSelector};
use super::HubError;
use crate::identity::ca::{new_key_and_csr, Ca};
use crate::identity::store::{self, Svid};
use crate::identity::{bundle_hash, inspect_leaf, IdentityError};
use crate::webhook::WebhookKey;

pub use super::layout::{
    load_or_renew_hub_svid, BUNDLE_FILE, CA_CERT, DB_FILE, HUB_CERT, HUB_KEY, HUB_SVID_LIFETIME,
    NEXT_CA_CERT, NEXT_CA_KEY,
};
pub use crate::identity::store::foreign_owner;

use super::layout::lock_trust;

/// Longest workload SVID (they cannot be revoked before expiry).
pub const MAX_WORKLOAD_LIFETIME: Duration = Duration::from_secs(7 * 86_400);

/// What `init` made.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The Hub's SPIFFE ID.
    pub hub_id: SpiffeId,
    /// The pin Clients install with.
    pub bundle_hash: String,
}

/// What `token create` made.
#[derive(Debug, Clone)]
pub struct TokenReport {
    /// The one-time join token (shown once, stored only as a hash).
    pub token: String,
    /// Its id in `ewii-hub token list` (from the hash: it reveals nothing of the token).
    pub id: String,
    /// The SPIFFE ID the Client will get.
    pub client_id: SpiffeId,
    /// The pin to install the Client with.
    pub bundle_hash: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: i64,
    /// The key the customer verifies webhooks with (`whpk_…`), when a webhook was given.
    pub webhook_public_key: Option<String>,
    /// Set when the client is enrolled, not revoked, and holds an SVID not yet expired: an
    /// enrolment with this token replaces its identity, and the Client holding it is refused
    /// from its next connection. Says whether it is connected.
    pub replaces: Option<&'static str>,
}

fn ident(dir: &Path) -> impl Fn(IdentityError) -> HubError + '_ {
    move |source| HubError::Identity {
        dir: dir.to_owned(),
        source,
    }
}

/// Makes the CA, the Hub SVID and the database in `state_dir`. Refuses to overwrite a CA.
pub fn init(state_dir: &Path, trust_domain: &str) -> Result<InitReport, HubError> {
    let hub_id = SpiffeId::hub(trust_domain)
        .map_err(|e| HubError::Invalid(format!("trust domain {trust_domain:?}: {e}")))?;
    if hub_id.trust_domain() != trust_domain {
        return Err(HubError::Invalid(format!(
            "trust domain must be lower case: {}",
            hub_id.trust_domain()
        )));
    }
    if state_dir.join("ca.key").exists() {
        return Err(HubError::Usage(format!(
            "{} already holds a CA; refusing to replace it (every enrolled Client trusts it)",
            state_dir.display()
        )));
    }
    make_private_dir(state_dir)?;
    let ca = Ca::generate(trust_domain).map_err(ident(state_dir))?;
    ca.save(state_dir).map_err(ident(state_dir))?;
    issue_hub_svid(state_dir, &ca).map_err(ident(state_dir))?;
    Db::open(&state_dir.join(DB_FILE))?;
    Ok(InitReport {
        hub_id,
        bundle_hash: bundle_hash(ca.cert()),
    })
}

/// The bundle pin of the Hub in `state_dir`.
pub fn current_bundle_hash(state_dir: &Path) -> Result<String, HubError> {
    let ca = Ca::load(state_dir).map_err(ident(state_dir))?;
    Ok(bundle_hash(ca.cert()))
}

/// `ewii-hub webhook-key`: the public key customers verify webhook deliveries with (`whpk_…`),
/// made now if no token with a webhook or `[[federation]]` webhook made it before.
pub fn webhook_key(state_dir: &Path) -> Result<String, HubError> {
    Ok(WebhookKey::load_or_create(state_dir)
        .map_err(ident(state_dir))?
        .public())
}

/// Creates a one-time join token for Client `client`, valid for `ttl`.
pub fn create_token(
    state_dir: &Path,
    client: &str,
    ttl: Duration,
    webhook: Option<&str>,
    allow_private_webhook: bool,
) -> Result<TokenReport, HubError> {
    let ca = Ca::load(state_dir).map_err(ident(state_dir))?;
    let leaf = store::read_certs(&state_dir.join(HUB_CERT)).map_err(ident(state_dir))?;
    let td = leaf
        .first()
        .ok_or_else(|| HubError::Usage("hub.pem is empty; run ewii-hub init".into()))
        .and_then(|c| inspect_leaf(c).map_err(ident(state_dir)))?
        .id
        .trust_domain()
        .to_owned();
    let client_id = SpiffeId::client(&td, client).map_err(|_| {
        HubError::Invalid(format!(
            "client name {client:?}: use 1-63 characters of a-z, 0-9, '-', '_', '.'"
        ))
    })?;
    // Under a second would make a token that has expired when it is made (expiry is kept in
    // whole seconds).
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(30 * 86_400) {
        return Err(HubError::Invalid(
            "token TTL must be between 1 s and 30 days".into(),
        ));
    }
    if let Some(url) = webhook {
        crate::webhook::check_url_now(url, allow_private_webhook).map_err(HubError::Invalid)?;
    }
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!("ewii_{}", hex::encode(secret));
    let now = crate::now_timestamp().unix_secs() as i64;
    let expires_at = now + ttl.as_secs() as i64;
    let db = Db::open(&state_dir.join(DB_FILE))?;
    let clients = db.clients()?;
    // A `[[federation]]` client: its SPIRE issues its SVIDs, and an enrolment would take its
    // name (and with it its routes and its revocation) over. The Hub refuses one too.
    if let Some(c) = clients
        .iter()
        .find(|c| c.name == client && c.spiffe_id != client_id.to_string())
    {
        return Err(HubError::Invalid(format!(
            "{client} is {} in this Hub's records: a [[federation]] client, whose SVIDs its SPIRE issues; a token cannot enrol it (a token-enrolled Client needs a name of its own)",
            c.spiffe_id
        )));
    }
    let replaces = clients
        .into_iter()
        .find(|c| {
            c.name == client
                && c.revoked_at.is_none()
                && c.serials.iter().any(|(_, exp)| *exp > now)
        })
        .map(|c| {
            if c.session.is_some() {
                "connected, as the running Hub last recorded it"
            } else {
                "not connected, as the running Hub last recorded it"
            }
        });
    db.add_token(&token, client, expires_at, webhook, now)?;
    let webhook_public_key = match webhook {
        Some(_) => Some(
            WebhookKey::load_or_create(state_dir)
                .map_err(ident(state_dir))?
                .public(),
        ),
        None => None,
    };
    Ok(TokenReport {
        id: token_id_of(&token),
        token,
        client_id,
        bundle_hash: bundle_hash(ca.cert()),
        expires_at,
        webhook_public_key,
        replaces,
    })
}

/// What [`revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// False when the client was revoked already (nothing changed, no notice queued).
    pub revoked: bool,
    /// The webhook URL the customer's notice was queued for (the running Hub delivers it, or
    /// the next one to start); `None`: no notice, since the client has no webhook.
    pub webhook: Option<String>,
}

/// `ewii-hub revoke`: revokes `client` now; the running Hub closes its live session within a
/// second and delivers the customer's webhook, if the client has one.
pub fn revoke(state_dir: &Path, client: &str, reason: &str) -> Result<Revocation, HubError> {
    let db = Db::open(&state_dir.join(DB_FILE))?;
    if !db.clients()?.iter().any(|c| c.name == client) {
        return Err(HubError::Invalid(format!("no client named {client:?}")));
    }
    let now = crate::now_timestamp().unix_secs() as i64;
    let (revoked, webhook) = db.revoke_by_operator(client, reason, now)?;
    Ok(Revocation { revoked, webhook })
}

/// `ewii-hub readmit`: lifts the revocation of a `[[federation]]` Client (its SVIDs come from
/// the customer's SPIRE, so there is no token to enrol it again with). A Client enrolled with
/// a token is refused: it comes back with a new token instead. Returns false when it was not
/// revoked.
pub fn readmit(state_dir: &Path, client: &str) -> Result<bool, HubError> {
    let db = Db::open(&state_dir.join(DB_FILE))?;
    let row = db
        .clients()?
        .into_iter()
        .find(|c| c.name == client)
        .ok_or_else(|| HubError::Invalid(format!("no client named {client:?}")))?;
    let ca = Ca::load(state_dir).map_err(ident(state_dir))?;
    let own = ca_trust_domain(&ca).map_err(ident(state_dir))?;
    let federated = row
        .spiffe_id
        .parse::<SpiffeId>()
        .is_ok_and(|id| id.trust_domain() != own);
    if !federated {
        return Err(HubError::Usage(format!(
            "{client} was enrolled with a token: give it a new one (`ewii-hub token create --client {client}`) and enrol it again; readmit is for [[federation]] Clients"
        )));
    }
    Ok(db.readmit(client)?)
}

/// `ewii-hub token list`: every unused token (by id, never the token itself).
pub fn tokens(state_dir: &Path) -> Result<Vec<TokenRow>, HubError> {
    Ok(Db::open(&state_dir.join(DB_FILE))?.tokens()?)
}

/// `ewii-hub token revoke`: deletes the unused tokens `which` names (a token sent to the
/// wrong person, or no longer wanted). Refuses when none matches, so a mistyped id is not
/// taken for success.
pub fn revoke_tokens(state_dir: &Path, which: &TokenSelector) -> Result<usize, HubError> {
    let n = Db::open(&state_dir.join(DB_FILE))?.delete_tokens(which)?;
    if n == 0 {
        return Err(HubError::Usage(match which {
            TokenSelector::Id(id) => {
                format!("no unused token with id {id:?} (see `ewii-hub token list`)")
            }
            TokenSelector::Client(c) => format!("client {c:?} has no unused token"),
        }));
    }
    Ok(n)
}

/// Issues an SVID for operator workload `name` into `out_dir` (`svid.pem`, `svid.key`, and
/// `bundle.pem`: the Hub's trust bundle, every CA in it), for callers of TLS service
/// listeners.
pub fn issue_workload_svid(
    state_dir: &Path,
    name: &str,
    lifetime: Duration,
    out_dir: &Path,
) -> Result<SpiffeId, HubError> {
    // Reads the state directory only: it is run as whoever owns `out_dir` (root, often), and
    // a Hub SVID renewed here would be that user's.
    let ca = Ca::load(state_dir).map_err(ident(state_dir))?;
    let td = ca_trust_domain(&ca).map_err(ident(state_dir))?;
    let id = SpiffeId::workload(&td, name)
        .map_err(|_| HubError::Invalid(format!("workload name {name:?} is not valid")))?;
    // Workload serials are not tracked, so a workload SVID cannot be revoked before it
    // expires: keep that window short.
    if lifetime < Duration::from_secs(1) || lifetime > MAX_WORKLOAD_LIFETIME {
        return Err(HubError::Invalid(
            "workload SVID lifetime must be between 1 s and 7 days".into(),
        ));
    }
    // Made 0700 when missing; one that exists keeps its mode (`--out /etc/billing` must not
    // lock the workload's other files away from it): the key written into it is 0600.
    store::create_private_dir(out_dir)
        .map_err(|e| HubError::Usage(format!("{}: {e}", out_dir.display())))?;
    let (key, _) = new_key_and_csr().map_err(ident(state_dir))?;
    let issued = ca.issue(&key, &id, lifetime).map_err(ident(state_dir))?;
    Svid::new(vec![issued.der], &key)
        .save(out_dir, store::SVID_CERT, store::SVID_KEY)
        .map_err(ident(out_dir))?;
    // The whole bundle, not the signing CA alone: during a CA rotation it holds the next CA
    // too, which the Hub presents from `ca activate` on; a caller trusting only the CA of the
    // moment would refuse the Hub from then.
    let bundle = super::layout::load_bundle(state_dir, &ca).map_err(ident(state_dir))?;
    store::write_file(
        &out_dir.join(store::BUNDLE),
        store::Pem::certs(&bundle).as_bytes(),
        0o644,
    )
    .map_err(ident(out_dir))?;
    Ok(id)
}

/// Every client the Hub knows.
pub fn clients(state_dir: &Path) -> Result<Vec<ClientRow>, HubError> {
    Ok(Db::open(&state_dir.join(DB_FILE))?.clients()?)
}

/// `ewii-hub ca prepare`: makes the next CA and publishes it in the bundle beside the current
/// one. A running Hub pushes the bundle to every live Client within a second; Clients then
/// trust both. Returns the new CA's bundle hash.
pub fn ca_prepare(state_dir: &Path) -> Result<String, HubError> {
    let _lock = lock_trust(state_dir).map_err(ident(state_dir))?;
    let ca = Ca::load(state_dir).map_err(ident(state_dir))?;
    if state_dir.join(NEXT_CA_KEY).exists() {
        return Err(HubError::Usage(
            "a next CA is prepared already; run `ewii-hub ca activate`".into(),
        ));
    }
    let td = ca_trust_domain(&ca).map_err(ident(state_dir))?;
    let next = Ca::generate(&td).map_err(ident(state_dir))?;
    next.save_as(state_dir, NEXT_CA_CERT, NEXT_CA_KEY)
        .map_err(ident(state_dir))?;
    let mut bundle = current_bundle(state_dir, &ca)?;
    bundle.push(next.cert().clone());
    write_bundle(state_dir, &bundle)?;
    touch(state_dir, "ca_prepared_at")?;
    Ok(bundle_hash(next.cert()))
}

/// `ewii-hub ca activate`: the prepared CA becomes the signing CA and issues a new Hub SVID.
/// Clients keep working: the bundle still holds both CAs, and their SVIDs move to the new CA
/// at their next renewal.
pub fn ca_activate(state_dir: &Path) -> Result<String, HubError> {
    let _lock = lock_trust(state_dir).map_err(ident(state_dir))?;
    let next = Ca::load_from(state_dir, NEXT_CA_CERT, NEXT_CA_KEY)
        .map_err(|_| HubError::Usage("no prepared CA; run `ewii-hub ca prepare` first".into()))?;
    let old = Ca::load(state_dir).map_err(ident(state_dir))?;
    let bundle = current_bundle(state_dir, &old)?;
    if !bundle.contains(next.cert()) {
        return Err(HubError::Usage(
            "the prepared CA is not in the bundle; run `ewii-hub ca prepare` again".into(),
        ));
    }
    old.save_as(state_dir, "ca-previous.pem", "ca-previous.key")
        .map_err(ident(state_dir))?;
    next.save(state_dir).map_err(ident(state_dir))?;
    let _ = std::fs::remove_file(state_dir.join(NEXT_CA_KEY));
    let _ = std::fs::remove_file(state_dir.join(NEXT_CA_CERT));
    issue_hub_svid(state_dir, &next).map_err(ident(state_dir))?;
    touch(state_dir, "ca_activated_at")?;
    Ok(bundle_hash(next.cert()))
}

/// How long after `ca activate` an SVID the running Hub issues may still come from the old
/// CA, as `ca retire` counts: the Hub takes the new CA at the next tick of its watcher, and a
/// reload that fails (a file still being written) is tried again every second.
pub const ACTIVATION_SLACK: Duration = Duration::from_secs(10);

/// `ewii-hub ca retire`: removes every CA but the signing one from the bundle. Refused while
/// a Client still holds an SVID issued before the last activation, or within
/// [`ACTIVATION_SLACK`] after it (it would be locked out), unless `force`.
pub fn ca_retire(state_dir: &Path, force: bool) -> Result<Vec<String>, HubError> {
    let _lock = lock_trust(state_dir).map_err(ident(state_dir))?;
    let ca = Ca::load(state_dir).map_err(ident(state_dir))?;
    let db = Db::open(&state_dir.join(DB_FILE))?;
    let activated = db
        .meta("ca_activated_at")?
        .ok_or_else(|| HubError::Usage("no CA was activated; nothing to retire".into()))?;
    let now = crate::now_timestamp().unix_secs() as i64;
    let stale =
        db.clients_with_serials_before(activated + ACTIVATION_SLACK.as_secs() as i64, now)?;
    if !stale.is_empty() && !force {
        return Err(HubError::Usage(format!(
            "client(s) {} may still hold an SVID from the old CA (issued before the activation, or within {} s after it, before the running Hub took the new CA); wait for their renewal (up to 60 % of an SVID lifetime after the activation) or use --force",
            stale.join(", "),
            ACTIVATION_SLACK.as_secs()
        )));
    }
    write_bundle(state_dir, std::slice::from_ref(ca.cert()))?;
    touch(state_dir, "ca_retired_at")?;
    // The old CA signs nothing any more and is no longer trusted: its key goes.
    for file in ["ca-previous.key", "ca-previous.pem"] {
        match std::fs::remove_file(state_dir.join(file)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(HubError::Identity {
                    dir: state_dir.to_owned(),
                    source: IdentityError::Io {
                        path: state_dir.join(file),
                        source: e,
                    },
                })
            }
            _ => {}
        }
    }
    Ok(stale)
}

fn current_bundle(
    state_dir: &Path,
    ca: &Ca,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, HubError> {
    let path = state_dir.join(BUNDLE_FILE);
    if path.exists() {
        store::read_certs(&path).map_err(ident(state_dir))
    } else {
        Ok(vec![ca.cert().clone()])
    }
}

fn write_bundle(
    state_dir: &Path,
    anchors: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<(), HubError> {
    store::write_file(
        &state_dir.join(BUNDLE_FILE),
        store::Pem::certs(anchors).as_bytes(),
        0o644,
    )
    .map_err(ident(state_dir))
}

/// Records when a CA step happened; the write also wakes a running Hub's watcher.
fn touch(state_dir: &Path, key: &str) -> Result<(), HubError> {
    let now = crate::now_timestamp().unix_secs() as i64;
    Db::open(&state_dir.join(DB_FILE))?.set_meta(key, now)?;
    Ok(())
}

/// Makes `dir` (the Hub's state directory) and makes it 0700, also when it exists: it holds
/// the CA's key. (A directory handed to someone else keeps its mode:
/// [`store::create_private_dir`].)
fn make_private_dir(dir: &Path) -> Result<(), HubError> {
    let io = |e: std::io::Error| HubError::Usage(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}
