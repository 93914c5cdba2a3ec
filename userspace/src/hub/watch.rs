//! Notices what other processes wrote to the Hub database — `ewii-hub revoke` above all — and
//! Clients silent past their grace. SQLite's `data_version` changes only when another
//! connection commits, so the poll is one cheap pragma; the reaction is within one tick.

use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{Event, Outcome};
use ewii_common::spiffe::SpiffeId;

use super::{revoke_now, Inner};
use crate::transport::codes;

/// Poll period: revocations reach live sessions well within 1 s.
const TICK: Duration = Duration::from_millis(200);

pub(super) async fn watch(inner: Arc<Inner>) {
    let mut version = inner.db.data_version().ok();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = inner.db.data_version().ok();
        if now != version {
            version = now;
            close_revoked(&inner);
            super::trust::reload(&inner);
        }
        if let Some(grace) = inner.revoke_after_lost {
            revoke_silent(&inner, grace);
        }
    }
}

/// Closes every live session whose client is now revoked.
pub(super) fn close_revoked(inner: &Inner) {
    let live: Vec<String> = inner
        .sessions
        .lock()
        .map(|s| s.keys().cloned().collect())
        .unwrap_or_default();
    let revoked = match inner.db.revoked_among(&live) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot read revocations");
            return;
        }
    };
    for rev in revoked {
        let session = inner
            .sessions
            .lock()
            .ok()
            .and_then(|mut s| s.remove(&rev.client));
        if let Some(session) = session {
            close_for_revocation(
                inner,
                &session.conn,
                session.id,
                &session.spiffe_id,
                &rev.reason,
            );
        }
    }
}

/// Closes a live session with `REVOKED` and the operator's reason, and audits it.
pub(super) fn close_for_revocation(
    inner: &Inner,
    conn: &quinn::Connection,
    session_id: u64,
    id: &SpiffeId,
    reason: &str,
) {
    conn.close(codes::REVOKED, reason.as_bytes());
    let mut r = inner.audit.record(Event::Revoked);
    r.session_id = Some(session_id);
    r.client = Some(id.to_string());
    r.outcome = Some(Outcome::Ok);
    r.reason = Some(format!("live session closed: {reason}"));
    inner.audit.emit(r);
}

fn revoke_silent(inner: &Inner, grace: Duration) {
    let cutoff = crate::now_timestamp().unix_secs() as i64 - grace.as_secs() as i64;
    let silent = match inner.db.silent_since(cutoff) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot read silent clients");
            return;
        }
    };
    for name in silent {
        let Ok(id) = SpiffeId::client(&inner.trust_domain, &name) else {
            continue;
        };
        let reason = format!(
            "no session for {} s (revoke_after_lost_secs)",
            grace.as_secs()
        );
        revoke_now(inner, &name, &id, None, &reason, true);
    }
}
