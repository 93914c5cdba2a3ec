//! Reacts to what the store reports and to what only the clock or another process can tell:
//!
//! - a [`Change`] from the store (a revocation by this Hub or, after a reload, by
//!   `ewii-hub revoke`; serials retired by a rotation or a new enrolment) is handed to the
//!   registry, which closes or drains every connection concerned; what an operator's command
//!   noted in the database's log (a join token made, a revocation) is audited, and the log's
//!   mark moved past it;
//! - every [`TICK`] the store owner compares SQLite's `data_version` — one pragma, whatever the
//!   number of sessions — so another process's commit is seen within one tick; then the
//!   trust material is reloaded too (`ewii-hub ca …` writes files and touches the database),
//!   and a reload that failed is tried again every [`RELOAD_RETRY`] until one succeeds; at
//!   the same tick, a Hub SVID with a third of its life left is renewed by a reload (one
//!   comparison: a Hub that runs for months must not serve an expired SVID);
//! - the silent-client grace is a timer computed from the view's `last_seen` values, not a
//!   query; the store owner moves those values when the wall clock moves against the Hub's
//!   running (a step, or a suspend of its host), and decides who is silent by its own reading
//!   of the clock ([`Store::silent`]);
//! - every [`FEDERATION_CHECK`] the `[[federation]]` bundle files are re-read, and a changed
//!   one replaces that trust domain's anchors ([`federation`], a task of its own, so that a
//!   file that hangs its reader never holds up a revocation).

use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{Event, Outcome};
use ewii_common::spiffe::SpiffeId;
use ewii_common::text;
use ewii_common::time::Timestamp;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::registry::{self, Registry};
use super::state::{OperatorAction, OperatorEntry};
use super::store::{Change, Store};
use super::trust::Trust;
use crate::audit::Audit;

/// Change-marker period: a revocation by another process reaches live sessions well within
/// 1 s (DESIGN §6).
const TICK: Duration = Duration::from_millis(200);
/// How often the `[[federation]]` bundle files are re-read (a customer's SPIRE rotates its CA
/// daily by default, publishing the next one ahead).
pub(crate) const FEDERATION_CHECK: Duration = Duration::from_secs(5);
/// How soon a failed reload of the trust material is tried again (files an operator is still
/// changing, a state directory that cannot be read for a moment). Without it, the next try
/// would wait for the next change to the database, which may never come.
pub(crate) const RELOAD_RETRY: Duration = Duration::from_secs(1);
/// How soon the silent-client grace is tried again after a revocation it could not record (a
/// full disk, a database another writer holds), doubled at each failure in a row up to
/// [`GRACE_RETRY_MAX`]. Without it the deadline, past and unchanged, would wake the watcher at
/// once, again and again: two database jobs, an error line and a `revoked` `failed` record per
/// silent client per turn, on the thread that admits new connections.
pub(crate) const GRACE_RETRY: Duration = Duration::from_secs(2);
/// The longest wait between two tries of a grace that keeps failing.
const GRACE_RETRY_MAX: Duration = Duration::from_secs(60);
/// The certificates of serials that ended are cleared at the first tick after the start, then
/// every this long, a batch per tick while full batches come
/// ([`Store::forget_ended_certificates`]).
const FORGET_EVERY: Duration = Duration::from_secs(3600);
/// How soon a clearing that failed is tried again (the database's write lock held by another
/// process's command for longer than [`FORGET_BUSY`](super::state::FORGET_BUSY)).
const FORGET_RETRY: Duration = Duration::from_secs(60);

/// What the watcher needs.
#[derive(Debug, Clone)]
pub(crate) struct Parts {
    pub(crate) store: Store,
    pub(crate) registry: Arc<Registry>,
    pub(crate) trust: Arc<Trust>,
    pub(crate) endpoints: Vec<quinn::Endpoint>,
    pub(crate) audit: Audit,
    /// `revoke_after_lost_secs`.
    pub(crate) grace: Option<Duration>,
}

/// Runs until the task is aborted.
pub(crate) async fn watch(parts: Parts, mut changes: mpsc::UnboundedReceiver<Change>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The grace's next try is not before `grace_hold`, and waits `grace_retry` after a failure.
    let (mut grace_hold, mut grace_retry) = (None, GRACE_RETRY);
    let mut grace_at = next_grace(&parts, grace_hold);
    // When the last reload failed, while it keeps failing.
    let mut reload_failed: Option<Instant> = None;
    // The reload in flight, and whether the database changed since it started. It runs apart
    // from this loop: it waits for the trust lock, which an `ewii-hub ca …` command holds for
    // its writes (each may wait out the database's busy timeout, and a command paused with
    // Ctrl-Z holds it for as long), and the revocations this loop applies must not wait.
    let mut reloading: Option<tokio::task::JoinHandle<bool>> = None;
    let mut reload_again = false;
    // The clearing of ended certificates, in flight apart from this loop, and when the next
    // starts. It waits at most `FORGET_BUSY` for the database's write lock; the store's other
    // work queues behind it meanwhile.
    let mut forgetting: Option<tokio::task::JoinHandle<Instant>> = None;
    let mut forget_at = Instant::now();
    loop {
        let grace_due = async {
            match grace_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let wake = tokio::select! {
            _ = tick.tick() => Wake::Tick,
            change = changes.recv() => match change {
                Some(change) => Wake::Change(change),
                None => return,
            },
            () = grace_due => Wake::Grace,
            ok = reloaded(&mut reloading), if reloading.is_some() => Wake::Reloaded(ok),
        };
        match wake {
            Wake::Tick => {
                let changed = match parts.store.refresh().await {
                    Ok(changed) => changed,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the hub database; refusing handshakes until it can");
                        false
                    }
                };
                let retry = reload_failed.is_some_and(|at| at.elapsed() >= RELOAD_RETRY);
                // The Hub's own SVID renewed while it runs (a failed renewal waits for `retry`).
                let svid_due = reload_failed.is_none() && parts.trust.hub_svid_due();
                if reloading.is_some() {
                    // What it read may be older than this change: once more when it ends.
                    reload_again |= changed;
                } else if changed || retry || svid_due {
                    reloading = Some(reload_trust(&parts));
                }
                if let Some(done) = forgetting.take_if(|job| job.is_finished()) {
                    forget_at = done.await.unwrap_or_else(|_| Instant::now() + FORGET_EVERY);
                }
                if forgetting.is_none() && Instant::now() >= forget_at {
                    let store = parts.store.clone();
                    forgetting = Some(tokio::spawn(async move {
                        forget_ended_certificates(&store).await
                    }));
                }
            }
            Wake::Reloaded(ok) => {
                reload_failed = (!ok).then(Instant::now);
                reloading = std::mem::take(&mut reload_again).then(|| reload_trust(&parts));
            }
            Wake::Change(change) => {
                // Those queued with it too: the log's mark (a synced write) moves once for a
                // batch, such as the entries a Hub finds at its start.
                let mut audited = apply(&parts, change);
                while let Ok(change) = changes.try_recv() {
                    audited = apply(&parts, change).or(audited);
                }
                if let Some(id) = audited {
                    tokio::spawn(mark_audited(parts.audit.clone(), parts.store.clone(), id));
                }
                grace_at = next_grace(&parts, grace_hold);
            }
            Wake::Grace => {
                if revoke_silent(&parts).await {
                    (grace_hold, grace_retry) = (None, GRACE_RETRY);
                } else {
                    grace_hold = Some(Instant::now() + grace_retry);
                    grace_retry = (grace_retry * 2).min(GRACE_RETRY_MAX);
                }
                grace_at = next_grace(&parts, grace_hold);
                if grace_at.is_none() {
                    // No one silent any more: the next failure starts the pauses over.
                    (grace_hold, grace_retry) = (None, GRACE_RETRY);
                }
            }
        }
    }
}

/// Clears one batch of ended certificates; when to clear the next.
async fn forget_ended_certificates(store: &Store) -> Instant {
    match store.forget_ended_certificates().await {
        // More are waiting: the next tick.
        Ok(true) => Instant::now(),
        Ok(false) => Instant::now() + FORGET_EVERY,
        // The Hub stopped meanwhile.
        Err(super::store::StoreError::Closed) => Instant::now() + FORGET_EVERY,
        Err(e) => {
            tracing::warn!(error = %e, "cannot clear the certificates of ended serials; trying again in a minute");
            Instant::now() + FORGET_RETRY
        }
    }
}

/// What woke the watcher.
enum Wake {
    Tick,
    Change(Change),
    Grace,
    /// The trust reload ended; whether it succeeded.
    Reloaded(bool),
}

/// Acts on one change; returns the operators' log entry it audited, if it was one.
fn apply(parts: &Parts, change: Change) -> Option<i64> {
    match change {
        // This Hub's own revocations are audited where it makes them, and an operator's
        // through the log (below), before this closes anything.
        Change::Revoked { client, reason } => {
            parts.registry.close_revoked(&client, &reason);
        }
        Change::Retired { client, serials } => {
            parts.registry.retire(&client, &serials);
        }
        Change::Operator(entry) => {
            audit_operator(parts, &entry);
            return Some(entry.id);
        }
        Change::Seen => {}
    }
    None
}

/// Moves the operators' log's mark to `id` once the audit sink has taken the records so far:
/// the mark must not pass a record the sink has not taken (if it cannot take them now, they
/// are written again at the next start). A task of its own: a slow sink never holds up the
/// watcher's next revocation.
async fn mark_audited(audit: Audit, store: Store, id: i64) {
    if audit.flush_async().await {
        match store.operator_log_audited(id).await {
            // The Hub has stopped meanwhile: the next start writes them again.
            Ok(()) | Err(super::store::StoreError::Closed) => {}
            Err(e) => {
                tracing::error!(error = %e, "cannot note the operators' log as audited; its records are written again at the next start");
            }
        }
    }
}

/// The audit record of what an operator's command did (`ewii-hub token create`, `revoke`),
/// dated when the command made it. A revocation also closes the Client's live connections
/// here, so that its record says whether one was.
fn audit_operator(parts: &Parts, entry: &OperatorEntry) {
    // As enrolled (a `[[federation]]` client's ID is in its own trust domain), else as the
    // Hub's records name the client.
    let client = match &entry.action {
        OperatorAction::Revoked {
            spiffe_id: Some(id),
            ..
        } => Some(id.clone()),
        _ => parts.trust.client_id(&entry.client),
    };
    let secs = |s: i64| Timestamp((s.max(0) as u64).saturating_mul(1_000_000));
    let when = secs(entry.at);
    let mut r = match &entry.action {
        OperatorAction::TokenCreated {
            id,
            expires_at,
            webhook,
        } => {
            let mut r = parts.audit.record(Event::TokenCreated);
            r.reason = Some(format!(
                "token {id} for {}, valid until {}{} (`ewii-hub token create`)",
                text::printable(&entry.client),
                secs(*expires_at),
                webhook.as_deref().map_or_else(String::new, |url| format!(
                    ", webhook {}",
                    crate::webhook::redacted(url)
                )),
            ));
            r
        }
        OperatorAction::Revoked { reason, .. } => {
            let closed = parts.registry.close_revoked(&entry.client, reason);
            let mut r = parts.audit.record(Event::Revoked);
            r.reason = Some(if closed == 0 {
                format!("{reason} (offline: told at its next handshake)")
            } else {
                reason.clone()
            });
            r
        }
        OperatorAction::Other(kind) => {
            tracing::warn!(%kind, "an operators' log entry of a kind this Hub does not know (a newer ewii-hub wrote it); passed over");
            return;
        }
    };
    r.time = when;
    r.client = client;
    r.outcome = Some(Outcome::Ok);
    parts.audit.emit(r);
}

/// Re-reads the `[[federation]]` bundle files every [`FEDERATION_CHECK`]; runs until aborted.
pub(crate) async fn federation(trust: Arc<Trust>, registry: Arc<Registry>) {
    let mut every = tokio::time::interval(FEDERATION_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let (trust, registry) = (trust.clone(), registry.clone());
        // File reads: not on an async worker.
        let _ = tokio::task::spawn_blocking(move || trust.refresh_federation(&registry)).await;
    }
}

/// The end of the reload in flight: whether it succeeded (a task that could not run counts as
/// a failure); never resolves without one.
async fn reloaded(reloading: &mut Option<tokio::task::JoinHandle<bool>>) -> bool {
    match reloading {
        Some(task) => task.await.unwrap_or(false),
        None => std::future::pending().await,
    }
}

/// Starts a trust reload; its result says whether it succeeded (a task that could not run
/// counts as a failure).
fn reload_trust(parts: &Parts) -> tokio::task::JoinHandle<bool> {
    let (trust, endpoint, registry) = (
        parts.trust.clone(),
        parts.endpoints.clone(),
        parts.registry.clone(),
    );
    // File reads, a lock an `ewii-hub ca …` command may hold for a few writes, and possibly a
    // new Hub SVID on disk: not on an async worker.
    tokio::task::spawn_blocking(move || trust.reload(&endpoint, &registry))
}

/// When the next client passes its grace, as an instant; not before `hold` (a retry after a
/// failure).
fn next_grace(parts: &Parts, hold: Option<Instant>) -> Option<Instant> {
    let grace = parts.grace?;
    let at = parts
        .store
        .view()
        .next_silent_deadline(grace.as_secs() as i64)?;
    let now_us = crate::now_timestamp().0 as i128;
    let wait_us = (i128::from(at) * 1_000_000 - now_us).clamp(0, 1 << 62);
    let at = Instant::now() + Duration::from_micros(wait_us as u64);
    Some(hold.map_or(at, |hold| at.max(hold)))
}

/// Revokes the clients silent past the grace; false when one could not be recorded (or the
/// silent ones could not be read): the grace is tried again later ([`GRACE_RETRY`]).
async fn revoke_silent(parts: &Parts) -> bool {
    let Some(grace) = parts.grace else {
        return true;
    };
    let silent = match parts.store.silent(grace.as_secs() as i64).await {
        Ok(silent) => silent,
        Err(e) => {
            tracing::error!(error = %e, "cannot read which clients are silent");
            return false;
        }
    };
    let mut recorded = true;
    for (name, spiffe_id) in silent {
        let reason = format!(
            "no session for {} s (revoke_after_lost_secs)",
            grace.as_secs()
        );
        // Said in the audit record, not in the reason the Client and the webhook are given.
        let mut note = None;
        // One the Hub did not write (an edited database) is revoked all the same: a client
        // silent past its grace is revoked whatever its row says, and one left silent would
        // be due again at every turn, each failure pausing the grace of every other client.
        // Its record names the ID its name stands for.
        let id = match spiffe_id.parse::<SpiffeId>() {
            Ok(id) => id.to_string(),
            Err(e) => {
                tracing::error!(client = %name, error = %e, "a silent client's recorded SPIFFE ID does not parse (an edited database?); revoking it by its name");
                note = Some(format!(
                    "its recorded SPIFFE ID {:?} does not parse ({e})",
                    text::printable(&spiffe_id)
                ));
                parts.trust.client_id(&name).unwrap_or(spiffe_id)
            }
        };
        // Only if it is still silent then: it may have come back since it was listed.
        let grace = grace.as_secs() as i64;
        let silent = registry::Silent {
            client: &name,
            id: &id,
            reason: &reason,
            note: note.as_deref(),
            grace_secs: grace,
        };
        recorded &= registry::revoke_if_silent(&parts.store, &parts.audit, silent).await;
    }
    recorded
}
