//! What the operator's commands did, for the running Hub's audit. `ewii-hub token create` and
//! `ewii-hub revoke` run in processes of their own, with no audit sink: each writes an entry
//! here in the transaction that makes the change, and the Hub that runs (or the next one to
//! start) writes the audit record, waits for its audit sink to take it, and moves its mark
//! past it (`meta` key [`AUDITED_UP_TO`]), deleting the entries up to the mark. An entry is
//! audited at least once: a Hub that stops between the record and the mark writes it again at
//! its next start.

use rusqlite::{params, Transaction};

use super::{Db, StateError};

/// The `meta` key holding the id of the last entry the Hub audited.
pub const AUDITED_UP_TO: &str = "operator_log_audited";

/// What an operator's command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorAction {
    /// `token create`: a join token for `client`.
    TokenCreated {
        /// Its id (the first 8 bytes of its hash; never the token).
        id: String,
        /// When it stops working, seconds since the epoch.
        expires_at: i64,
        /// The customer's webhook URL it carries.
        webhook: Option<String>,
    },
    /// `revoke`: the client is revoked, for `reason`.
    Revoked {
        /// The operator's reason.
        reason: String,
        /// The client's SPIFFE ID as enrolled (a `[[federation]]` client's is in its own
        /// trust domain); `None` in an entry that did not record it.
        spiffe_id: Option<String>,
    },
    /// A kind this Hub does not know (written by a newer `ewii-hub`): passed over.
    Other(String),
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorEntry {
    /// Increasing; never reused.
    pub id: i64,
    /// When the command made the change, seconds since the epoch.
    pub at: i64,
    /// The client it concerns.
    pub client: String,
    /// What it did.
    pub action: OperatorAction,
}

/// Writes an entry in the command's transaction.
pub(super) fn log(
    tx: &Transaction<'_>,
    at: i64,
    client: &str,
    action: &OperatorAction,
) -> rusqlite::Result<()> {
    let (kind, detail) = match action {
        OperatorAction::TokenCreated {
            id,
            expires_at,
            webhook,
        } => (
            "token_created",
            serde_json::json!({ "id": id, "expires_at": expires_at, "webhook": webhook }),
        ),
        OperatorAction::Revoked { reason, spiffe_id } => (
            "revoked",
            serde_json::json!({ "reason": reason, "spiffe_id": spiffe_id }),
        ),
        OperatorAction::Other(kind) => (kind.as_str(), serde_json::Value::Null),
    };
    tx.execute(
        "INSERT INTO operator_log (at, client, kind, detail) VALUES (?1, ?2, ?3, ?4)",
        params![at, client, kind, detail.to_string()],
    )?;
    Ok(())
}

impl Db {
    /// Entries after `after` (an id), oldest first.
    pub fn operator_log_after(&self, after: i64) -> Result<Vec<OperatorEntry>, StateError> {
        self.with(|c| read_after(c, after))
    }
}

/// Entries after `after`, oldest first: all of them, as the Hub hands every one to its audit
/// (one statement; the caller's transaction, if any, is what it agrees with).
pub(super) fn read_after(
    c: &rusqlite::Connection,
    after: i64,
) -> rusqlite::Result<Vec<OperatorEntry>> {
    let mut stmt = c.prepare(
        "SELECT id, at, client, kind, detail FROM operator_log WHERE id > ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map(params![after], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    let mut entries = Vec::new();
    for row in rows {
        let (id, at, client, kind, detail) = row?;
        let detail: serde_json::Value =
            serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null);
        let text = |key: &str| detail[key].as_str().map(str::to_owned);
        let action = match kind.as_str() {
            "token_created" => OperatorAction::TokenCreated {
                id: text("id").unwrap_or_default(),
                expires_at: detail["expires_at"].as_i64().unwrap_or_default(),
                webhook: text("webhook"),
            },
            "revoked" => OperatorAction::Revoked {
                reason: text("reason").unwrap_or_default(),
                spiffe_id: text("spiffe_id"),
            },
            _ => OperatorAction::Other(kind),
        };
        entries.push(OperatorEntry {
            id,
            at,
            client,
            action,
        });
    }
    Ok(entries)
}

impl Db {
    /// The newest entry's id (0 for none).
    pub fn operator_log_last(&self) -> Result<i64, StateError> {
        self.with(|c| {
            c.query_row("SELECT COALESCE(MAX(id), 0) FROM operator_log", [], |r| {
                r.get(0)
            })
        })
    }

    /// The Hub audited the log up to entry `id`: the mark moves there, and the entries up to
    /// it go (one transaction).
    pub fn operator_log_audited(&self, id: i64) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
                params![AUDITED_UP_TO, id],
            )?;
            tx.execute("DELETE FROM operator_log WHERE id <= ?1", params![id])?;
            tx.commit()
        })
    }
}
