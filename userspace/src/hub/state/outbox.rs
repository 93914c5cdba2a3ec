//! The webhook outbox table: rows are queued in the same transaction as the revocation they
//! announce, and marked delivered (or failed, with the next attempt time) by the Hub's
//! delivery task through the store owner.

use rusqlite::{params, OptionalExtension, Transaction};

use super::{Db, StateError};

/// `next_attempt_ms` of a parked row: one this Hub refused for a reason a retry cannot change
/// (its config refuses the URL's address). It is not due again until the next Hub start
/// ([`Db::unpark_webhooks`]), which may run with another config.
pub const PARKED: i64 = i64::MAX;

/// At most this many rows of one URL are returned as due at once (the delivery task also
/// keeps at most this many attempts to one URL in flight).
pub const DUE_PER_URL: usize = 4;

/// When a row is due: its next attempt is at or before `now_ms`, or after `latest_ms`, the
/// furthest ahead of now that a retry is ever set (`retry_max_ms`). A row set further ahead
/// was set by a clock that has moved back since (a Hub whose clock ran ahead, set right):
/// without this bound, it would wait the step's length on top of its retry's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueBy {
    /// Now, in milliseconds since the epoch.
    pub now_ms: i64,
    /// Now plus the longest retry delay.
    pub latest_ms: i64,
}

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
    /// Outbox rows due ([`DueBy`]) and not in `skip` (the attempts in flight), at most [`DUE_PER_URL`] of each URL, taken in turns: the oldest of
    /// every URL first, then the second oldest, and so on, at most 64. So a customer with many
    /// notices waiting does not fill the list before another customer's first.
    pub fn due_webhooks(
        &self,
        due: DueBy,
        max_attempts: u32,
        skip: &[String],
    ) -> Result<Vec<PendingWebhook>, StateError> {
        self.with(|c| {
            let not_in = if skip.is_empty() {
                String::new()
            } else {
                format!("AND id NOT IN ({})", vec!["?"; skip.len()].join(", "))
            };
            // The turns are taken over the small columns; the bodies are read for the rows
            // kept only.
            let mut stmt = c.prepare(&format!(
                "SELECT w.id, w.url, w.body, w.attempts FROM (
                     SELECT id, created_at,
                            ROW_NUMBER() OVER (PARTITION BY url ORDER BY created_at, id) AS turn
                     FROM webhooks
                     WHERE delivered_at IS NULL AND attempts < ?
                       AND (next_attempt_ms <= ? OR (next_attempt_ms > ? AND next_attempt_ms < ?)) {not_in}
                 ) AS t JOIN webhooks AS w ON w.id = t.id
                 WHERE t.turn <= {DUE_PER_URL}
                 ORDER BY t.turn, t.created_at, t.id LIMIT 64"
            ))?;
            let mut args: Vec<rusqlite::types::Value> = vec![
                max_attempts.into(),
                due.now_ms.into(),
                due.latest_ms.into(),
                PARKED.into(),
            ];
            args.extend(skip.iter().map(|id| id.clone().into()));
            let rows = stmt.query_map(rusqlite::params_from_iter(args), |r| {
                Ok(PendingWebhook {
                    id: r.get(0)?,
                    url: r.get(1)?,
                    body: r.get(2)?,
                    attempts: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    /// When the next undelivered row not due by `due` is due (milliseconds since the epoch),
    /// if any. (Rows due by then are the caller's to have taken already, or to take when an
    /// attempt ends.)
    pub fn next_webhook_due(
        &self,
        max_attempts: u32,
        due: DueBy,
    ) -> Result<Option<i64>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT MIN(next_attempt_ms) FROM webhooks WHERE delivered_at IS NULL AND attempts < ?1 AND next_attempt_ms > ?2 AND next_attempt_ms <= ?3",
                params![max_attempts, due.now_ms, due.latest_ms],
                |r| r.get(0),
            )
        })
    }

    /// The Hub's wall clock was set back `by_ms` (negative): every retry set before moves
    /// with it, so that it keeps its delay ([`DueBy`] bounds one moved while no Hub ran).
    pub fn shift_webhooks(&self, by_ms: i64) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "UPDATE webhooks SET next_attempt_ms = next_attempt_ms + ?1
                 WHERE delivered_at IS NULL AND next_attempt_ms > 0 AND next_attempt_ms < ?2",
                params![by_ms, PARKED],
            )
            .map(|_| ())
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
