//! The Hub's persistent state in an embedded SQLite database (`hub.db`): join tokens (hashed),
//! enrolled clients, issued serials, revocations. A Hub restart loses none of it.
//!
//! Calls are short single statements behind one mutex; SQLite in WAL mode makes each commit
//! durable before the call returns.

use std::path::Path;
use std::sync::Mutex;

use ewii_common::spiffe::SpiffeId;
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::identity::verify::SerialCheck;

/// Why a state operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The database could not be opened, read or written.
    #[error("hub database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The mutex around the connection was poisoned by a panic elsewhere.
    #[error("hub database lock poisoned")]
    Poisoned,
}

/// Why a join token was not accepted. The peer is told none of this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenRefusal {
    /// No such token: never issued, or already used (used tokens are deleted).
    #[error("unknown or already used token")]
    UnknownOrUsed,
    /// The token existed but its TTL had passed (it is deleted now).
    #[error("expired token")]
    Expired,
}

/// A redeemed token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    /// The Client name it was created for.
    pub client: String,
    /// Webhook URL registered with it, if any.
    pub webhook: Option<String>,
}

/// One row of `ewii-hub clients`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClientRow {
    /// Client name.
    pub name: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// First enrolment, seconds since the epoch.
    pub enrolled_at: i64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
    /// Revocation reason.
    pub revoke_reason: Option<String>,
    /// Current (not retired) serials with their expiry.
    pub serials: Vec<(String, i64)>,
    /// When a session of this client last ended (or began), seconds since the epoch.
    pub last_seen: Option<i64>,
    /// The live session, as the running Hub recorded it.
    pub session: Option<SessionRow>,
}

/// A live session as recorded by the running Hub.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SessionRow {
    /// Hub-chosen session id.
    pub session_id: u64,
    /// The serial it authenticated with.
    pub serial: String,
    /// Client address.
    pub peer: String,
    /// Since, seconds since the epoch.
    pub since: i64,
}

/// A revoked client, as the running Hub polls for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Client name.
    pub client: String,
    /// Operator's or the Hub's reason.
    pub reason: String,
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

/// The Hub database.
#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
CREATE TABLE IF NOT EXISTS tokens (
    hash BLOB PRIMARY KEY,
    client TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    webhook TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    name TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    webhook TEXT,
    revoked_at INTEGER,
    revoke_reason TEXT,
    last_seen INTEGER
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    client TEXT PRIMARY KEY,
    session_id INTEGER NOT NULL,
    serial TEXT NOT NULL,
    peer TEXT NOT NULL,
    since INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    delivered_at INTEGER,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS serials (
    serial TEXT PRIMARY KEY,
    client TEXT NOT NULL REFERENCES clients(name),
    issued_at INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    retired INTEGER NOT NULL DEFAULT 0,
    first_used INTEGER
);
";

impl Db {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StateError> {
        let mut conn = self.conn.lock().map_err(|_| StateError::Poisoned)?;
        Ok(f(&mut conn)?)
    }

    /// Stores a token (as its SHA-256) for `client`, valid until `expires_at`.
    pub fn add_token(
        &self,
        token: &str,
        client: &str,
        expires_at: i64,
        webhook: Option<&str>,
        now: i64,
    ) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO tokens (hash, client, expires_at, webhook, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![token_hash(token), client, expires_at, webhook, now],
            )
            .map(|_| ())
        })
    }

    /// Redeems a token: it is deleted whatever the outcome, so it works at most once.
    pub fn redeem_token(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Result<TokenGrant, TokenRefusal>, StateError> {
        let row = self.with(|c| {
            c.query_row(
                "DELETE FROM tokens WHERE hash = ?1 RETURNING client, expires_at, webhook",
                params![token_hash(token)],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get(2)?)),
            )
            .optional()
        })?;
        Ok(match row {
            None => Err(TokenRefusal::UnknownOrUsed),
            Some((_, expires_at, _)) if expires_at <= now => Err(TokenRefusal::Expired),
            Some((client, _, webhook)) => Ok(TokenGrant { client, webhook }),
        })
    }

    /// Records an enrolment: the client (re-enrolling clears an earlier revocation, since the
    /// operator made a new token for it), and its first serial.
    pub fn record_enrolment(
        &self,
        grant: &TokenGrant,
        id: &SpiffeId,
        serial: &str,
        not_after: i64,
        now: i64,
    ) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO clients (name, spiffe_id, enrolled_at, webhook) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET webhook = excluded.webhook, revoked_at = NULL, revoke_reason = NULL",
                params![grant.client, id.to_string(), now, grant.webhook],
            )?;
            // A new enrolment replaces every earlier key of this client.
            tx.execute(
                "UPDATE serials SET retired = 1 WHERE client = ?1",
                params![grant.client],
            )?;
            tx.execute(
                "INSERT INTO serials (serial, client, issued_at, not_after) VALUES (?1, ?2, ?3, ?4)",
                params![serial, grant.client, now, not_after],
            )?;
            tx.commit()
        })
    }

    /// Marks `client` revoked and, when it registered a webhook and `notify` is set, queues
    /// one `client.revoked` delivery — in the same transaction, so a revocation never loses
    /// its notice. Returns false when there is no such client or it was revoked already.
    pub fn revoke_client(
        &self,
        client: &str,
        reason: &str,
        now: i64,
        notify: bool,
    ) -> Result<bool, StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE clients SET revoked_at = ?2, revoke_reason = ?3 WHERE name = ?1 AND revoked_at IS NULL",
                params![client, now, reason],
            )?;
            // An unused token for this client must not quietly undo the revocation.
            tx.execute("DELETE FROM tokens WHERE client = ?1", params![client])?;
            if n > 0 && notify {
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
                }
            }
            tx.commit()?;
            Ok(n > 0)
        })
    }

    /// Revoked clients among `names`.
    pub fn revoked_among(&self, names: &[String]) -> Result<Vec<Revocation>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT revoke_reason FROM clients WHERE name = ?1 AND revoked_at IS NOT NULL",
            )?;
            let mut out = Vec::new();
            for name in names {
                if let Some(reason) = stmt
                    .query_row(params![name], |r| r.get::<_, Option<String>>(0))
                    .optional()?
                {
                    out.push(Revocation {
                        client: name.clone(),
                        reason: reason.unwrap_or_default(),
                    });
                }
            }
            Ok(out)
        })
    }

    /// Not-revoked clients with no live session whose last session ended before `cutoff`.
    pub fn silent_since(&self, cutoff: i64) -> Result<Vec<String>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT name FROM clients WHERE revoked_at IS NULL AND last_seen IS NOT NULL AND last_seen < ?1
                 AND name NOT IN (SELECT client FROM sessions)",
            )?;
            let rows = stmt.query_map(params![cutoff], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// SQLite's `data_version`: changes when another connection (an `ewii-hub` command)
    /// commits, so the running Hub notices revocations and CA changes without a socket.
    pub fn data_version(&self) -> Result<i64, StateError> {
        self.with(|c| c.query_row("PRAGMA data_version", [], |r| r.get(0)))
    }

    /// A session came up: record it (replacing an older one of the same client).
    pub fn session_up(&self, client: &str, session: &SessionRow) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO sessions (client, session_id, serial, peer, since) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(client) DO UPDATE SET session_id = excluded.session_id, serial = excluded.serial, peer = excluded.peer, since = excluded.since",
                params![client, session.session_id as i64, session.serial, session.peer, session.since],
            )?;
            c.execute(
                "UPDATE serials SET first_used = COALESCE(first_used, ?2) WHERE serial = ?1",
                params![session.serial, session.since],
            )?;
            c.execute(
                "UPDATE clients SET last_seen = ?2 WHERE name = ?1",
                params![client, session.since],
            )
            .map(|_| ())
        })
    }

    /// Whether `client` has a serial issued after `serial` that has already authenticated a
    /// session: then `serial` is superseded and must not be renewed again.
    pub fn superseded(&self, client: &str, serial: &str) -> Result<bool, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM serials WHERE client = ?1 AND first_used IS NOT NULL
                 AND rowid > (SELECT rowid FROM serials WHERE serial = ?2))",
                params![client, serial],
                |r| r.get(0),
            )
        })
    }

    /// At Hub start: the grace for silent clients restarts, since none could reach a Hub that
    /// was down.
    pub fn restart_grace(&self, now: i64) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "UPDATE clients SET last_seen = ?1 WHERE revoked_at IS NULL AND last_seen IS NOT NULL",
                params![now],
            )
            .map(|_| ())
        })
    }

    /// A session ended: forget it (if it is still the recorded one) and note the time.
    pub fn session_down(&self, client: &str, session_id: u64, now: i64) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM sessions WHERE client = ?1 AND session_id = ?2",
                params![client, session_id as i64],
            )?;
            c.execute(
                "UPDATE clients SET last_seen = ?2 WHERE name = ?1",
                params![client, now],
            )
            .map(|_| ())
        })
    }

    /// Sets a bookkeeping value (and so tells a running Hub that something changed).
    pub fn set_meta(&self, key: &str, value: i64) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
        })
    }

    /// A bookkeeping value.
    pub fn meta(&self, key: &str) -> Result<Option<i64>, StateError> {
        self.with(|c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    /// Clients (not revoked) holding a serial issued at or before `ts` (same-second issues
    /// count as old: the running Hub may not have switched CA yet).
    pub fn clients_with_serials_before(&self, ts: i64) -> Result<Vec<String>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT DISTINCT s.client FROM serials s JOIN clients c ON c.name = s.client
                 WHERE s.retired = 0 AND c.revoked_at IS NULL AND s.issued_at <= ?1 ORDER BY s.client",
            )?;
            let rows = stmt.query_map(params![ts], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// At Hub start: no session survives a restart.
    pub fn clear_sessions(&self) -> Result<(), StateError> {
        self.with(|c| c.execute("DELETE FROM sessions", []).map(|_| ()))
    }

    /// Records a serial issued by renewal for `client` (the old one stays valid until the
    /// Client's next session authenticates with the new one).
    pub fn record_renewal(
        &self,
        client: &str,
        serial: &str,
        not_after: i64,
        now: i64,
    ) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO serials (serial, client, issued_at, not_after) VALUES (?1, ?2, ?3, ?4)",
                params![serial, client, now, not_after],
            )
            .map(|_| ())
        })
    }

    /// A session authenticated with `current`: retire every serial of `client` issued before
    /// it. Older serials never retire newer ones, so a stolen old key that races the
    /// legitimate Client cannot lock it out; once the new serial is used, the old is dead.
    pub fn retire_older_serials(&self, client: &str, current: &str) -> Result<usize, StateError> {
        self.with(|c| {
            c.execute(
                "UPDATE serials SET retired = 1 WHERE client = ?1 AND retired = 0
                 AND rowid < (SELECT rowid FROM serials WHERE serial = ?2)",
                params![client, current],
            )
        })
    }

    /// Outbox rows due at `now_ms` (milliseconds since the epoch), oldest first.
    pub fn due_webhooks(
        &self,
        now_ms: i64,
        max_attempts: u32,
    ) -> Result<Vec<PendingWebhook>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, url, body, attempts FROM webhooks
                 WHERE delivered_at IS NULL AND next_attempt_ms <= ?1 AND attempts < ?2
                 ORDER BY created_at, id LIMIT 32",
            )?;
            let rows = stmt.query_map(params![now_ms, max_attempts], |r| {
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

    /// Every client with its current serials.
    pub fn clients(&self) -> Result<Vec<ClientRow>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT c.name, c.spiffe_id, c.enrolled_at, c.revoked_at, c.revoke_reason, c.last_seen,
                        s.session_id, s.serial, s.peer, s.since
                 FROM clients c LEFT JOIN sessions s ON s.client = c.name ORDER BY c.name",
            )?;
            let mut rows: Vec<ClientRow> = stmt
                .query_map([], |r| {
                    let session = match r.get::<_, Option<i64>>(6)? {
                        Some(id) => Some(SessionRow {
                            session_id: id as u64,
                            serial: r.get(7)?,
                            peer: r.get(8)?,
                            since: r.get(9)?,
                        }),
                        None => None,
                    };
                    Ok(ClientRow {
                        name: r.get(0)?,
                        spiffe_id: r.get(1)?,
                        enrolled_at: r.get(2)?,
                        revoked_at: r.get(3)?,
                        revoke_reason: r.get(4)?,
                        serials: Vec::new(),
                        last_seen: r.get(5)?,
                        session,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut serials = c.prepare(
                "SELECT serial, not_after FROM serials WHERE client = ?1 AND retired = 0 ORDER BY issued_at",
            )?;
            for row in &mut rows {
                row.serials = serials
                    .query_map(params![row.name], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?;
            }
            Ok(rows)
        })
    }
}

/// Where a serial stands in the Hub's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialStatus {
    /// Issued to this identity, not retired, identity not revoked.
    Current,
    /// Never issued by this Hub.
    Unknown,
    /// Issued to another identity.
    OtherIdentity(String),
    /// The identity is revoked.
    Revoked,
    /// Replaced by a newer serial that is in use.
    Retired,
}

impl Db {
    /// The status of `serial` for `id`.
    pub fn serial_status(&self, id: &SpiffeId, serial: &str) -> Result<SerialStatus, StateError> {
        let row = self.with(|c| {
            c.query_row(
                "SELECT c.spiffe_id, c.revoked_at, s.retired FROM serials s JOIN clients c ON c.name = s.client WHERE s.serial = ?1",
                params![serial],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?, r.get::<_, bool>(2)?)),
            )
            .optional()
        })?;
        Ok(match row {
            None => SerialStatus::Unknown,
            Some((sid, _, _)) if sid != id.to_string() => SerialStatus::OtherIdentity(sid),
            Some((_, Some(_), _)) => SerialStatus::Revoked,
            Some((_, None, true)) => SerialStatus::Retired,
            Some((_, None, false)) => SerialStatus::Current,
        })
    }
}

impl SerialCheck for Db {
    fn check(&self, id: &SpiffeId, serial: &str) -> Result<(), String> {
        match self.serial_status(id, serial) {
            Err(e) => Err(format!("revocation check failed closed: {e}")),
            Ok(SerialStatus::Current) => Ok(()),
            Ok(SerialStatus::Unknown) => Err(format!("serial {serial} was not issued by this Hub")),
            Ok(SerialStatus::OtherIdentity(sid)) => {
                Err(format!("serial {serial} belongs to {sid}, not {id}"))
            }
            Ok(SerialStatus::Revoked) => Err(format!("{id} is revoked")),
            Ok(SerialStatus::Retired) => Err(format!("serial {serial} of {id} is retired")),
        }
    }
}

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_work_once_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("hub.db")).unwrap();
        db.add_token("t1", "acme", 100, None, 0).unwrap();
        db.add_token("t2", "acme", 100, Some("https://x"), 0)
            .unwrap();
        assert_eq!(
            db.redeem_token("t1", 50).unwrap(),
            Ok(TokenGrant {
                client: "acme".into(),
                webhook: None
            })
        );
        assert_eq!(
            db.redeem_token("t1", 50).unwrap(),
            Err(TokenRefusal::UnknownOrUsed)
        );
        assert_eq!(
            db.redeem_token("t2", 100).unwrap(),
            Err(TokenRefusal::Expired)
        );
        // Expired tokens are deleted too.
        assert_eq!(
            db.redeem_token("t2", 0).unwrap(),
            Err(TokenRefusal::UnknownOrUsed)
        );
        assert_eq!(
            db.redeem_token("nope", 0).unwrap(),
            Err(TokenRefusal::UnknownOrUsed)
        );
    }

    #[test]
    fn p10_revocation_deletes_outstanding_tokens_and_a_restart_resets_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("hub.db")).unwrap();
        let id = SpiffeId::client("example.org", "acme").unwrap();
        let grant = TokenGrant {
            client: "acme".into(),
            webhook: None,
        };
        db.record_enrolment(&grant, &id, "0a", 1000, 1).unwrap();
        db.add_token("spare", "acme", 10_000, None, 1).unwrap();
        assert!(db.revoke_client("acme", "test", 2, false).unwrap());
        // A leaked spare token must not quietly undo the revocation.
        assert_eq!(
            db.redeem_token("spare", 3).unwrap(),
            Err(TokenRefusal::UnknownOrUsed)
        );

        let other = SpiffeId::client("example.org", "beta").unwrap();
        let grant_b = TokenGrant {
            client: "beta".into(),
            webhook: None,
        };
        db.record_enrolment(&grant_b, &other, "0b", 1000, 1)
            .unwrap();
        let row = SessionRow {
            session_id: 1,
            serial: "0b".into(),
            peer: "p".into(),
            since: 10,
        };
        db.session_up("beta", &row).unwrap();
        db.session_down("beta", 1, 10).unwrap();
        assert_eq!(db.silent_since(100).unwrap(), vec!["beta".to_string()]);
        // The Hub was down until 500: nobody could reach it, so the grace starts again.
        db.restart_grace(500).unwrap();
        assert!(db.silent_since(100).unwrap().is_empty());
        assert_eq!(db.silent_since(501).unwrap(), vec!["beta".to_string()]);
    }

    #[test]
    fn serial_check_follows_enrolment_and_revocation_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let id = SpiffeId::client("example.org", "acme").unwrap();
        let grant = TokenGrant {
            client: "acme".into(),
            webhook: None,
        };
        {
            let db = Db::open(&path).unwrap();
            db.record_enrolment(&grant, &id, "0a", 1000, 1).unwrap();
            assert_eq!(db.check(&id, "0a"), Ok(()));
            assert!(db.check(&id, "0b").is_err());
            let other = SpiffeId::client("example.org", "other").unwrap();
            assert!(db.check(&other, "0a").is_err());
            db.record_enrolment(&grant, &id, "0c", 1000, 2).unwrap();
            assert!(db.check(&id, "0a").unwrap_err().contains("retired"));
            assert!(db.revoke_client("acme", "test", 3, true).unwrap());
            assert!(!db.revoke_client("acme", "again", 4, true).unwrap(), "once");
            assert!(!db.revoke_client("nobody", "test", 3, true).unwrap());
        }
        let db = Db::open(&path).unwrap();
        assert!(db.check(&id, "0c").unwrap_err().contains("revoked"));
        let rows = db.clients().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].revoked_at, Some(3));
        assert_eq!(rows[0].serials, vec![("0c".to_string(), 1000)]);
    }
}
