//! The webhook outbox table: rows are queued in the same transaction as the revocation they
//! announce, and marked delivered (or failed, with the next attempt time) by the Hub's
//! delivery task through the store owner.

use rusqlite::{params, OptionalExtension, Transaction};

use super::{Db, StateError};

/// `next_attempt_ms` of a parked row: one this Hub refused for a reason a retry cannot change
/// (its config refuses the URL's address). It is not due again until the next Hub start
/// ([`Db::unpark_webhooks`]), which may run with another config.
pub const PARKED: i64 = i64::MAX;

/// A webhook delivery waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWebhook {
    /// Idempotency key (`webhook-id`).
    pub id: String,
    /// Target URL.
    pub url: String,
    /// JSON body.
    pub body: String,
    /// Attempts so far.
    pub attempts: u32,
}

/// Queues one `client.revoked` delivery when `client` registered a webhook.
pub(super) fn queue_revocation(
    tx: &Transaction<'_>,
    client: &str,
    reason: &str,
    now: i64,
) -> rusqlite::Result<Option<String>> {
    let row: Option<(String, Option<String>)> = tx
        .query_row(
            "SELECT spiffe_id, webhook FROM clients WHERE name = ?1",
            params![client],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((spiffe_id, Some(url))) = row {
        let id = format!("msg_{}", hex::encode(rand::random::<[u8; 16]>()));
        let body = serde_json::json!({
            "type": "client.revoked",
            "timestamp": ewii_common::time::Timestamp(now as u64 * 1_000_000).to_string(),
            "data": { "client": spiffe_id, "name": client, "reason": reason, "revoked_at": now },
        })
        .to_string();
        tx.execute(
            "INSERT INTO webhooks (id, client, url, body, created_at, next_attempt_ms) VALUES (?1, ?2, ?3, ?4, ?5, 0)",
            params![id, client, url, body, now],
        )?;
        return Ok(Some(url));
    }
    Ok(None)
}

impl Db {
    /// Outbox rows due at `now_ms` (milliseconds since the epoch), oldest first, at most 32,
    /// leaving out those in `skip` (the attempts in flight).
    pub fn due_webhooks(
        &self,
        now_ms: i64,
        max_attempts: u32,
        skip: &[String],
    ) -> Result<Vec<PendingWebhook>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, url, body, attempts FROM webhooks
                 WHERE delivered_at IS NULL AND next_attempt_ms <= ?1 AND attempts < ?2
                 ORDER BY created_at, id LIMIT ?3",
            )?;
            let limit = 32 + skip.len() as i64;
            let rows = stmt.query_map(params![now_ms, max_attempts, limit], |r| {
                Ok(PendingWebhook {
                    id: r.get(0)?,
                    url: r.get(1)?,
                    body: r.get(2)?,
                    attempts: r.get(3)?,
                })
            })?;
            let mut due = Vec::new();
            for row in rows {
                let row = row?;
                if !skip.contains(&row.id) && due.len() < 32 {
                    due.push(row);
                }
            }
            Ok(due)
        })
    }

    /// When the next undelivered row not in `skip` is due (milliseconds since the epoch), if
    /// any is left.
    pub fn next_webhook_due(
        &self,
        max_attempts: u32,
        skip: &[String],
    ) -> Result<Option<i64>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, next_attempt_ms FROM webhooks
                 WHERE delivered_at IS NULL AND attempts < ?1 AND next_attempt_ms < ?2
                 ORDER BY next_attempt_ms LIMIT ?3",
            )?;
            let limit = 1 + skip.len() as i64;
            let rows = stmt.query_map(params![max_attempts, PARKED, limit], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?;
            for row in rows {
                let (id, due) = row?;
                if !skip.contains(&id) {
                    return Ok(Some(due));
                }
            }
            Ok(None)
        })
    }

    /// A delivery was acknowledged (2xx).
    pub fn webhook_delivered(&self, id: &str, now: i64) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "UPDATE webhooks SET delivered_at = ?2, attempts = attempts + 1, last_error = NULL WHERE id = ?1",
                params![id, now],
            )
            .map(|_| ())
        })
    }

    /// A delivery failed; try again at `next_ms`.
    pub fn webhook_failed(&self, id: &str, error: &str, next_ms: i64) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "UPDATE webhooks SET attempts = attempts + 1, last_error = ?2, next_attempt_ms = ?3 WHERE id = ?1",
                params![id, error, next_ms],
            )
            .map(|_| ())
        })
    }

    /// A delivery was refused for a reason a retry by this Hub cannot change: not tried again
    /// before the next start ([`PARKED`]).
    pub fn webhook_parked(&self, id: &str, error: &str) -> Result<(), StateError> {
        self.webhook_failed(id, error, PARKED)
    }

    /// At Hub start: the parked rows are due again (this start may allow what the last one
    /// refused). Returns how many.
    pub fn unpark_webhooks(&self) -> Result<usize, StateError> {
        self.with(|c| {
            c.execute(
                "UPDATE webhooks SET next_attempt_ms = 0 WHERE next_attempt_ms = ?1 AND delivered_at IS NULL",
                params![PARKED],
            )
        })
    }
}
