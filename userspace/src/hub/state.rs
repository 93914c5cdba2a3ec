//! The Hub's persistent state in an embedded SQLite database (`hub.db`): join tokens (hashed),
//! enrolled clients, issued serials, revocations, the webhook outbox (in [`outbox`]). A Hub
//! restart loses none of it.
//!
//! [`Db`] is the synchronous backend. The running Hub never calls it from an async task: one
//! owner thread holds it (`hub::store`); the offline `ewii-hub` commands and tests use it
//! directly. Each write is one short transaction; SQLite in WAL mode with `synchronous=FULL`
//! makes it durable before the call returns.
//!
//! Every statement SQLite runs on a `Db` is counted per thread ([`statements_on_this_thread`]),
//! so the store owner can tell how much database work the Hub does.

pub mod operator_log;
pub mod outbox;
mod records;
#[cfg(test)]
mod tests;
mod tokens;

use std::cell::Cell;
use std::path::Path;
use std::sync::Mutex;

use ewii_common::spiffe::SpiffeId;
use rusqlite::trace::{TraceEvent, TraceEventCodes};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::identity::verify::{SerialCheck, SerialRefusal};

pub use operator_log::{OperatorAction, OperatorEntry};

/// Whose revocation it is, for what it does beside revoking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoker {
    /// An operator's or the Hub's own (the silent-client grace): the client's unused join
    /// tokens are deleted with it.
    Hub,
    /// The Client's, at its stop (`Goodbye{revoke}`): its unused tokens stay. `notify`: the
    /// customer's webhook is told (`[webhooks] notify_on_stop`).
    Customer {
        /// Whether the webhook is sent.
        notify: bool,
    },
}
pub use outbox::{DueBy, PendingWebhook};
pub use records::{ClientRecord, ClientRow, SerialRecord, SerialStatus, SessionRow, Snapshot};
pub use tokens::{token_id_of, TokenRow, TokenSelector};

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
    /// The client was revoked after its token was redeemed and before its enrolment was
    /// recorded: the enrolment is refused, so that it cannot undo that revocation.
    #[error("client {0} was revoked while it enrolled; the enrolment is refused")]
    RevokedMeanwhile(String),
    /// A token was redeemed for a name whose records hold another SPIFFE ID (a
    /// `[[federation]]` client, whose SVIDs its SPIRE issues): an enrolment would take its
    /// name, its routes and its revocation over, and is refused.
    #[error("client {client} is {holder} in this Hub's records (a [[federation]] client: its SPIRE issues its SVIDs); a token cannot enrol it")]
    NotTokenEnrolled {
        /// The name.
        client: String,
        /// The SPIFFE ID recorded for it.
        holder: String,
    },
    /// A `[[federation]]` client name is already held by another identity (an enrolled
    /// Client, or another SPIFFE ID).
    #[error("client {client} is {holder} in this Hub's records, not {wanted}; choose another name for it in [[federation]]")]
    NameTaken {
        /// The name.
        client: String,
        /// The SPIFFE ID recorded for it.
        holder: String,
        /// The SPIFFE ID the configuration names.
        wanted: String,
    },
}

/// Why a join token was not accepted. The peer is told none of this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenRefusal {
    /// No such token: never issued, or already used (used tokens are deleted).
    #[error("unknown or used token")]
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
    /// How many times an operator or the Hub had revoked the client when the token was
    /// redeemed (0 for a new client): the enrolment clears only those revocations, never a
    /// later one. A Client's own stop is not counted: it does not refuse its replacement.
    pub revocations: i64,
}

/// A client's first serial, issued at enrolment, and the hash of the key it certifies, when
/// known (SHA-256 of the DER SubjectPublicKeyInfo): a renewal for that key is refused later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSerial {
    /// The serial.
    pub serial: String,
    /// The key's hash.
    pub key_sha256: Option<Vec<u8>>,
}

impl From<&String> for IssuedSerial {
    /// As [`From<&str>`].
    fn from(serial: &String) -> Self {
        serial.as_str().into()
    }
}

impl From<&str> for IssuedSerial {
    /// A serial whose key is not known (tests; records made before keys were kept).
    fn from(serial: &str) -> Self {
        Self {
            serial: serial.to_owned(),
            key_sha256: None,
        }
    }
}

/// A serial issued by renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewalRow {
    /// The Client.
    pub client: String,
    /// The serial it renews.
    pub from: String,
    /// The new serial.
    pub serial: String,
    /// SHA-256 of the public key it certifies (DER SubjectPublicKeyInfo).
    pub key_sha256: Vec<u8>,
    /// The certificate.
    pub der: Vec<u8>,
    /// Validity end, seconds since the epoch.
    pub not_after: i64,
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
    revocations INTEGER NOT NULL DEFAULT 0,
    spiffe_id TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    webhook TEXT,
    revoked_at INTEGER,
    revoke_reason TEXT,
    last_seen INTEGER,
    last_peer TEXT
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
CREATE INDEX IF NOT EXISTS webhooks_undelivered ON webhooks (url, created_at, id)
    WHERE delivered_at IS NULL;
CREATE TABLE IF NOT EXISTS operator_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    client TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS serials (
    serial TEXT PRIMARY KEY,
    client TEXT NOT NULL REFERENCES clients(name),
    issued_at INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    retired INTEGER NOT NULL DEFAULT 0,
    first_used INTEGER,
    renewed_from TEXT,
    key_sha256 BLOB,
    der BLOB
);
CREATE INDEX IF NOT EXISTS serials_by_client ON serials (client);
";

/// The index the view's reads of serials search ([`records::SERIALS_IN_USE`]), added after the
/// table: built at the Hub's start only ([`Db::add_missing_indexes`]).
const SERIALS_BY_STATE: &str =
    "CREATE INDEX IF NOT EXISTS serials_by_state ON serials (retired, not_after)";

/// The serials that still hold their certificate, by its end: what
/// [`Db::forget_ended_certificates`] searches, so that it reads only the rows it clears (a
/// cleared row leaves the index). Built at the Hub's start too.
const SERIALS_HOLDING_CERTIFICATES: &str =
    "CREATE INDEX IF NOT EXISTS serials_holding_certificates \
     ON serials (not_after) WHERE der IS NOT NULL";

/// How long a statement waits for another writer's lock before it fails (`database is
/// locked`).
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The same for [`Db::forget_ended_certificates`], which can wait for its next turn.
pub const FORGET_BUSY: std::time::Duration = std::time::Duration::from_millis(100);

/// A column's value as SQLite stored it, kept to be written back unchanged: text is kept as
/// its bytes, never checked as UTF-8 (rusqlite's own `Value` would panic on bytes that are
/// not).
enum Stored {
    Null,
    Integer(i64),
    Real(f64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl From<rusqlite::types::ValueRef<'_>> for Stored {
    fn from(v: rusqlite::types::ValueRef<'_>) -> Self {
        use rusqlite::types::ValueRef;
        match v {
            ValueRef::Null => Self::Null,
            ValueRef::Integer(i) => Self::Integer(i),
            ValueRef::Real(f) => Self::Real(f),
            ValueRef::Text(t) => Self::Text(t.to_vec()),
            ValueRef::Blob(b) => Self::Blob(b.to_vec()),
        }
    }
}

impl rusqlite::ToSql for Stored {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::ValueRef;
        Ok(rusqlite::types::ToSqlOutput::Borrowed(match self {
            Self::Null => ValueRef::Null,
            Self::Integer(i) => ValueRef::Integer(*i),
            Self::Real(f) => ValueRef::Real(*f),
            Self::Text(t) => ValueRef::Text(t),
            Self::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// [`Db::forget_ended_certificates`]'s transaction: at most `limit` of the rows `candidates`
/// names (a `FROM … WHERE …` taking `?1`), each deleted and written again without `der`.
fn rewrite_without_certificates(
    c: &mut Connection,
    candidates: &str,
    before: i64,
    limit: u32,
) -> rusqlite::Result<usize> {
    const COLUMNS: &str =
        "rowid, serial, client, issued_at, not_after, retired, first_used, renewed_from, key_sha256";
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let rows = {
        let mut stmt = tx.prepare(&format!("SELECT {COLUMNS} {candidates} LIMIT ?2"))?;
        let rows = stmt.query_map(params![before, limit], |r| {
            (0..9)
                .map(|i| r.get_ref(i).map(Stored::from))
                .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.collect::<rusqlite::Result<Vec<_>>>()?
    };
    for row in &rows {
        tx.execute("DELETE FROM serials WHERE rowid = ?1", [&row[0]])?;
        tx.execute(
            &format!("INSERT INTO serials ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
            rusqlite::params_from_iter(row),
        )?;
    }
    tx.commit()?;
    Ok(rows.len())
}

/// The indexes added after their tables, by name: built at the Hub's start only.
const ADDED_INDEXES: [(&str, &str); 2] = [
    ("serials_by_state", SERIALS_BY_STATE),
    ("serials_holding_certificates", SERIALS_HOLDING_CERTIFICATES),
];

/// Brings a database made by an older Hub up to [`SCHEMA`] (columns added since). Under a
/// write lock, checked again inside it: two processes of the new version that open an older
/// database at once (a Hub starting, an operator's command) would otherwise both add a column,
/// and the second fail. A database that needs nothing is only read.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    if !missing_columns(conn)? {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    match add_missing_columns(conn) {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            // SQLite may have rolled back itself (a full disk): the error that says why is
            // the step's, not the rollback's.
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            Err(e)
        }
    }
}

/// Whether `table` has column `column`.
fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
        params![table, column],
        |r| r.get(0),
    )
}

/// Whether any column [`add_missing_columns`] adds is missing.
fn missing_columns(conn: &Connection) -> rusqlite::Result<bool> {
    Ok(!has_column(conn, "clients", "revocations")?
        || !has_column(conn, "serials", "renewed_from")?
        || !has_column(conn, "clients", "last_peer")?)
}

fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    if !has_column(conn, "clients", "revocations")? {
        conn.execute_batch(
            "ALTER TABLE clients ADD COLUMN revocations INTEGER NOT NULL DEFAULT 0",
        )?;
    }
    if !has_column(conn, "clients", "last_peer")? {
        // Seeded from the sessions the older Hub recorded (a crash leaves them), so that the
        // first start after the upgrade knows where those Clients came from.
        conn.execute_batch(
            "ALTER TABLE clients ADD COLUMN last_peer TEXT;
             UPDATE clients SET last_peer =
                 (SELECT peer FROM sessions WHERE sessions.client = clients.name);",
        )?;
    }
    if !has_column(conn, "serials", "renewed_from")? {
        conn.execute_batch(
            "ALTER TABLE serials ADD COLUMN renewed_from TEXT;
             ALTER TABLE serials ADD COLUMN key_sha256 BLOB;
             ALTER TABLE serials ADD COLUMN der BLOB;",
        )?;
    }
    Ok(())
}

thread_local! {
    static STATEMENTS: Cell<u64> = const { Cell::new(0) };
}

/// How many SQL statements every [`Db`] used on this thread has run so far (SQLite counts
/// them: each start of a prepared statement, including `BEGIN`, `COMMIT` and pragmas).
pub fn statements_on_this_thread() -> u64 {
    STATEMENTS.with(Cell::get)
}

fn count_statement(event: TraceEvent<'_>) {
    // Trigger sub-programs are reported as `-- ...`; they belong to their statement.
    if let TraceEvent::Stmt(_, sql) = event {
        if !sql.starts_with("--") {
            STATEMENTS.with(|n| n.set(n.get().wrapping_add(1)));
        }
    }
}

impl Db {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let conn = Connection::open(path)?;
        conn.trace_v2(TraceEventCodes::SQLITE_TRACE_STMT, Some(count_statement));
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
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

    /// Stores a token (as its SHA-256) for `client`, valid until `expires_at`, and notes its
    /// creation for the running Hub's audit ([`operator_log`]).
    pub fn add_token(
        &self,
        token: &str,
        client: &str,
        expires_at: i64,
        webhook: Option<&str>,
        now: i64,
    ) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let hash = token_hash(token);
            tx.execute(
                "INSERT INTO tokens (hash, client, expires_at, webhook, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![hash, client, expires_at, webhook, now],
            )?;
            let action = OperatorAction::TokenCreated {
                id: tokens::token_id(&hash),
                expires_at,
                webhook: webhook.map(str::to_owned),
            };
            operator_log::log(&tx, now, client, &action)?;
            tx.commit()
        })
    }

    /// Redeems a token: it is deleted whatever the outcome, so it works at most once.
    pub fn redeem_token(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Result<TokenGrant, TokenRefusal>, StateError> {
        // One transaction: a revocation lands before the redemption (and is counted in the
        // grant, so the enrolment may clear it) or after it (and the enrolment is refused).
        let row = self.with(|c| {
            let tx = c.transaction()?;
            let row = tx
                .query_row(
                    "DELETE FROM tokens WHERE hash = ?1 RETURNING client, expires_at, webhook",
                    params![token_hash(token)],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get(2)?)),
                )
                .optional()?;
            let revocations = match &row {
                Some((client, _, _)) => tx
                    .query_row(
                        "SELECT revocations FROM clients WHERE name = ?1",
                        params![client],
                        |r| r.get::<_, i64>(0),
                    )
                    .optional()?
                    .unwrap_or(0),
                None => 0,
            };
            tx.commit()?;
            Ok(row.map(|(client, expires_at, webhook)| (client, expires_at, webhook, revocations)))
        })?;
        Ok(match row {
            None => Err(TokenRefusal::UnknownOrUsed),
            Some((_, expires_at, _, _)) if expires_at <= now => Err(TokenRefusal::Expired),
            Some((client, _, webhook, revocations)) => Ok(TokenGrant {
                client,
                webhook,
                revocations,
            }),
        })
    }

    /// Records an enrolment: the client (re-enrolling clears an earlier revocation, since the
    /// operator made a new token for it), and its first serial. A revocation made after the
    /// token was redeemed is not cleared: the enrolment is refused
    /// ([`StateError::RevokedMeanwhile`]); so is one for a name held by another SPIFFE ID
    /// ([`StateError::NotTokenEnrolled`]).
    pub fn record_enrolment(
        &self,
        grant: &TokenGrant,
        id: &SpiffeId,
        serial: impl Into<IssuedSerial>,
        not_after: i64,
        now: i64,
    ) -> Result<(), StateError> {
        let issued = serial.into();
        let recorded = self.with(|c| {
            let tx = c.transaction()?;
            let held: Option<(i64, String)> = tx
                .query_row(
                    "SELECT revocations, spiffe_id FROM clients WHERE name = ?1",
                    params![grant.client],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            match held {
                Some((_, holder)) if holder != id.to_string() => {
                    return Ok(Err(StateError::NotTokenEnrolled {
                        client: grant.client.clone(),
                        holder,
                    }))
                }
                Some((n, _)) if n != grant.revocations => {
                    return Ok(Err(StateError::RevokedMeanwhile(grant.client.clone())))
                }
                _ => {}
            }
            tx.execute(
                "INSERT INTO clients (name, spiffe_id, enrolled_at, webhook) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET webhook = excluded.webhook, revoked_at = NULL, revoke_reason = NULL, last_seen = NULL",
                params![grant.client, id.to_string(), now, grant.webhook],
            )?;
            // A new enrolment replaces every earlier key of this client.
            tx.execute(
                "UPDATE serials SET retired = 1 WHERE client = ?1",
                params![grant.client],
            )?;
            tx.execute(
                "INSERT INTO serials (serial, client, issued_at, not_after, key_sha256) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![issued.serial, grant.client, now, not_after, issued.key_sha256],
            )?;
            tx.commit()?;
            Ok(Ok(()))
        })?;
        recorded
    }

    /// Records a federated client (`[[federation]]`): no token and no serial, the customer's
    /// SPIRE issues its SVIDs. An existing row for the same ID is kept as it is, revocation
    /// included (a revoked federated client stays revoked across restarts), but takes
    /// `webhook`, as the configuration says now; a name held by another identity is refused.
    pub fn admit_federated(
        &self,
        client: &str,
        id: &SpiffeId,
        webhook: Option<&str>,
        now: i64,
    ) -> Result<(), StateError> {
        let holder: Option<String> = self.with(|c| {
            let tx = c.transaction()?;
            let holder: Option<String> = tx
                .query_row(
                    "SELECT spiffe_id FROM clients WHERE name = ?1",
                    params![client],
                    |r| r.get(0),
                )
                .optional()?;
            if holder.is_none() {
                tx.execute(
                    "INSERT INTO clients (name, spiffe_id, enrolled_at, webhook) VALUES (?1, ?2, ?3, ?4)",
                    params![client, id.to_string(), now, webhook],
                )?;
            } else {
                tx.execute(
                    "UPDATE clients SET webhook = ?3 WHERE name = ?1 AND spiffe_id = ?2",
                    params![client, id.to_string(), webhook],
                )?;
            }
            tx.commit()?;
            Ok(holder)
        })?;
        match holder {
            Some(h) if h != id.to_string() => Err(StateError::NameTaken {
                client: client.to_owned(),
                holder: h,
                wanted: id.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Lifts the revocation of `client` (for `[[federation]]` Clients; the caller checks).
    /// Returns false when it was not revoked. Its silence before is forgotten, as at an
    /// enrolment: a readmitted Client has no grace until its first session (else a Client the
    /// grace revoked would be revoked again at once).
    pub fn readmit(&self, client: &str) -> Result<bool, StateError> {
        self.with(|c| {
            c.execute(
                "UPDATE clients SET revoked_at = NULL, revoke_reason = NULL, last_seen = NULL WHERE name = ?1 AND revoked_at IS NOT NULL",
                params![client],
            )
            .map(|n| n > 0)
        })
    }

    /// Marks `client` revoked by the Hub and, when it registered a webhook and `notify` is
    /// set, queues one `client.revoked` delivery — in the same transaction, so a revocation
    /// never loses its notice. Returns false when there is no such client or it was revoked
    /// already.
    pub fn revoke_client(
        &self,
        client: &str,
        reason: &str,
        now: i64,
        notify: bool,
    ) -> Result<bool, StateError> {
        self.revoke_client_noting(client, reason, now, notify, Revoker::Hub)
            .map(|(revoked, _)| revoked)
    }

    /// [`revoke_client`](Self::revoke_client) by `by`, also returning the webhook URL the
    /// notice was queued for, as read in the same transaction (`None`: no notice, or none to
    /// send).
    pub fn revoke_client_noting(
        &self,
        client: &str,
        reason: &str,
        now: i64,
        notify: bool,
        by: Revoker,
    ) -> Result<(bool, Option<String>), StateError> {
        self.revoke_in_transaction(client, reason, now, notify, false, by)
    }

    /// `ewii-hub revoke`: [`revoke_client_noting`](Self::revoke_client_noting) with a notice,
    /// noted for the running Hub's audit ([`operator_log`]) when it revoked.
    pub fn revoke_by_operator(
        &self,
        client: &str,
        reason: &str,
        now: i64,
    ) -> Result<(bool, Option<String>), StateError> {
        self.revoke_in_transaction(client, reason, now, true, true, Revoker::Hub)
    }

    fn revoke_in_transaction(
        &self,
        client: &str,
        reason: &str,
        now: i64,
        notify: bool,
        logged: bool,
        by: Revoker,
    ) -> Result<(bool, Option<String>), StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE clients SET revoked_at = ?2, revoke_reason = ?3 WHERE name = ?1 AND revoked_at IS NULL",
                params![client, now, reason],
            )?;
            // An operator's or the Hub's "no" is counted even when the client was revoked
            // already: an enrolment in flight must not undo it. And an unused token for this
            // client must not quietly undo it either.
            //
            // A Client's own stop is the customer's, and no "no" to what replaces it: a token
            // the operator gave for the container that replaces it stays good (it was good
            // before the stop, and a revoked client is enrolled again only with a token the
            // operator created), and an enrolment with it that is in flight goes on, as it
            // would had the stop come before it redeemed the token (a blue/green swap).
            if by == Revoker::Hub {
                tx.execute(
                    "UPDATE clients SET revocations = revocations + 1 WHERE name = ?1",
                    params![client],
                )?;
                tx.execute("DELETE FROM tokens WHERE client = ?1", params![client])?;
            }
            let queued = if n > 0 && notify {
                outbox::queue_revocation(&tx, client, reason, now)?
            } else {
                None
            };
            if n > 0 && logged {
                let spiffe_id: Option<String> = tx
                    .query_row(
                        "SELECT spiffe_id FROM clients WHERE name = ?1",
                        params![client],
                        |r| r.get(0),
                    )
                    .optional()?;
                let action = OperatorAction::Revoked {
                    reason: reason.to_owned(),
                    spiffe_id,
                };
                operator_log::log(&tx, now, client, &action)?;
            }
            tx.commit()?;
            Ok((n > 0, queued))
        })
    }

    /// SQLite's `data_version`: changes when another connection (an `ewii-hub` command)
    /// commits, so the running Hub notices revocations and CA changes without a socket.
    pub fn data_version(&self) -> Result<i64, StateError> {
        self.with(|c| c.query_row("PRAGMA data_version", [], |r| r.get(0)))
    }

    /// A session came up: record it (replacing an older one of the same client), mark its
    /// serial used and the client seen, and retire every serial of the client issued before
    /// that one — one transaction. Older serials never retire newer ones, so a stolen old key
    /// that races the legitimate Client cannot lock it out; once the new serial is used, the
    /// old is dead.
    pub fn session_up(&self, client: &str, session: &SessionRow) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO sessions (client, session_id, serial, peer, since) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(client) DO UPDATE SET session_id = excluded.session_id, serial = excluded.serial, peer = excluded.peer, since = excluded.since",
                params![client, session.session_id as i64, session.serial, session.peer, session.since],
            )?;
            tx.execute(
                "UPDATE serials SET first_used = COALESCE(first_used, ?2) WHERE serial = ?1 AND client = ?3",
                params![session.serial, session.since, client],
            )?;
            tx.execute(
                "UPDATE clients SET last_seen = ?2, last_peer = ?3 WHERE name = ?1",
                params![client, session.since, session.peer],
            )?;
            // The session's serial is in use: every older one of the client retires (P8), in
            // the same transaction, so that a session is never on record with its older
            // serials still current.
            tx.execute(
                "UPDATE serials SET retired = 1 WHERE client = ?1 AND retired = 0
                 AND rowid < (SELECT rowid FROM serials WHERE serial = ?2)",
                params![client, session.serial],
            )?;
            tx.commit()
        })
    }

    /// The first serial of `client` that certified the key hashed `key_sha256`: a renewal for
    /// a key this client held before is refused (P8: a copy of an old key must not come back
    /// to life). Asked only for a serial not renewed yet (the same key asking again for a
    /// renewal gets that renewal first). Keys of enrolments recorded before the Hub kept them
    /// are not known.
    pub fn key_certified_before(
        &self,
        client: &str,
        key_sha256: &[u8],
    ) -> Result<Option<String>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT serial FROM serials WHERE client = ?1 AND key_sha256 = ?2
                 ORDER BY rowid LIMIT 1",
                params![client, key_sha256],
                |r| r.get(0),
            )
            .optional()
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

    /// The Hub's wall clock moved `by` seconds against its running (a step, or a suspend of its
    /// host): every silent client's grace moves with it (not revoked, no live session), so
    /// that the grace counts the time this Hub ran, as a restart does ([`Db::restart_grace`]).
    pub fn shift_grace(&self, by: i64) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "UPDATE clients SET last_seen = last_seen + ?1 WHERE revoked_at IS NULL AND last_seen IS NOT NULL
                 AND name NOT IN (SELECT client FROM sessions)",
                params![by],
            )
            .map(|_| ())
        })
    }

    /// A session ended: forget it (if it is still the recorded one) and note `last_seen`
    /// (`None` leaves it). A grace cleared since the session began (`readmit`, a new
    /// enrolment: until the client's next session) stays cleared.
    pub fn session_down(
        &self,
        client: &str,
        session_id: u64,
        last_seen: Option<i64>,
    ) -> Result<(), StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM sessions WHERE client = ?1 AND session_id = ?2",
                params![client, session_id as i64],
            )?;
            if let Some(seen) = last_seen {
                tx.execute(
                    "UPDATE clients SET last_seen = ?2 WHERE name = ?1 AND last_seen IS NOT NULL",
                    params![client, seen],
                )?;
            }
            tx.commit()
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

    /// Clients (not revoked) holding a serial issued at or before `ts` (the caller adds the
    /// time the running Hub may take to switch CA: [`super::admin::ACTIVATION_SLACK`]) and not
    /// expired at `now` (an expired SVID authenticates nothing: a Client gone for good does not
    /// hold a retirement back).
    pub fn clients_with_serials_before(
        &self,
        ts: i64,
        now: i64,
    ) -> Result<Vec<String>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT DISTINCT s.client FROM serials s JOIN clients c ON c.name = s.client
                 WHERE s.retired = 0 AND c.revoked_at IS NULL AND s.issued_at <= ?1
                   AND s.not_after > ?2 ORDER BY s.client",
            )?;
            let rows = stmt.query_map(params![ts, now], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// At Hub start, before anything else: builds the indexes a database made by an older
    /// Hub lacks. On a large table a build holds the write lock while it reads every row (an
    /// operator's command that opens the database meanwhile waits out its busy timeout and
    /// fails: docs/operator-guide.md), so `Db::open`, which every command runs, never builds
    /// one; the Hub is not serving yet, and its run lock keeps any other Hub out. A database
    /// that has them is only read.
    pub fn add_missing_indexes(&self) -> Result<(), StateError> {
        let has = |c: &Connection, name: &str| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'index' AND name = ?1)",
                params![name],
                |r| r.get::<_, bool>(0),
            )
        };
        self.with(|c| {
            for (name, sql) in ADDED_INDEXES {
                if has(c, name)? {
                    continue;
                }
                tracing::info!(index = name, "building an index of the serials (once, after an upgrade; a large table takes a while)");
                c.execute_batch("BEGIN IMMEDIATE")?;
                let built = match has(c, name) {
                    Ok(true) => Ok(()),
                    Ok(false) => c.execute_batch(sql),
                    Err(e) => Err(e),
                };
                match built {
                    Ok(()) => c.execute_batch("COMMIT")?,
                    Err(e) => {
                        if !c.is_autocommit() {
                            let _ = c.execute_batch("ROLLBACK");
                        }
                        return Err(e);
                    }
                }
            }
            Ok(())
        })
    }

    /// Clears the certificate kept with each serial (`der`) that ended before `before`, at most
    /// `limit` of them: how many it cleared. A certificate is kept to send a renewal again to
    /// the key it was issued to ([`Self::renewal_of`]: the answer was lost on the way), which
    /// no session can ask for once it has ended (the serial it renewed ended before it). It is
    /// most of each row (with its indexes ~890 bytes, ~100 without it; two rows per Client a
    /// day): without this, a Hub's database grows by ~1.8 KB per Client every day for as long
    /// as it runs, and by ~0.2 KB with it. The rows stay (P8 refuses a retired key for ever,
    /// and the records name every serial), each at its place in the issue order (its rowid,
    /// which P8's decisions compare).
    ///
    /// Each row is deleted and written again without its certificate, at the same rowid and
    /// with its values as stored (never read as Rust types: a hand-edited value stays what it
    /// was): an update that shortens a row leaves its page as long as it was (SQLite merges
    /// pages only as rows leave them), so the space would never come back. A row whose client
    /// is not on record (edited by hand) could not be written again: it is left as it is. By
    /// the index of the rows that still hold one: each call reads only what it clears. It
    /// waits at most [`FORGET_BUSY`] for the write lock (another process's command holding
    /// it), since the Hub's other database work queues behind it.
    pub fn forget_ended_certificates(&self, before: i64, limit: u32) -> Result<usize, StateError> {
        const CANDIDATES: &str = "FROM serials INDEXED BY serials_holding_certificates
             WHERE der IS NOT NULL AND not_after < ?1
             AND client IN (SELECT name FROM clients)";
        self.with(|c| {
            // Read first: with nothing to clear the write lock is not taken.
            let any: bool = c.query_row(
                &format!("SELECT EXISTS (SELECT 1 {CANDIDATES})"),
                params![before],
                |r| r.get(0),
            )?;
            if !any {
                return Ok(0);
            }
            c.busy_timeout(FORGET_BUSY)?;
            let cleared = rewrite_without_certificates(c, CANDIDATES, before, limit);
            c.busy_timeout(BUSY_TIMEOUT)?;
            cleared
        })
    }

    /// At Hub start: no session survives a restart.
    pub fn clear_sessions(&self) -> Result<(), StateError> {
        self.with(|c| c.execute("DELETE FROM sessions", []).map(|_| ()))
    }

    /// Where each client not revoked had its last session from (`ip:port`), however it ended.
    pub fn last_peers(&self) -> Result<Vec<String>, StateError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT last_peer FROM clients WHERE revoked_at IS NULL AND last_peer IS NOT NULL",
            )?;
            let peers = stmt.query_map([], |r| r.get(0))?.collect();
            peers
        })
    }

    /// Records a serial issued by renewal (the old one stays valid until the Client's next
    /// session authenticates with the new one), with what renewed it: the serial it renews,
    /// the key it certifies and the certificate, so that the same key asking again gets the
    /// same certificate and no second one.
    pub fn record_renewal(&self, row: &RenewalRow, now: i64) -> Result<(), StateError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO serials (serial, client, issued_at, not_after, renewed_from, key_sha256, der)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    row.serial,
                    row.client,
                    now,
                    row.not_after,
                    row.from,
                    row.key_sha256,
                    row.der
                ],
            )
            .map(|_| ())
        })
    }

    /// The renewal of serial `from`, if it was renewed.
    pub fn renewal_of(&self, from: &str) -> Result<Option<RenewalRow>, StateError> {
        self.with(|c| {
            c.query_row(
                "SELECT serial, client, not_after, key_sha256, der FROM serials WHERE renewed_from = ?1",
                params![from],
                |r| {
                    Ok(RenewalRow {
                        serial: r.get(0)?,
                        client: r.get(1)?,
                        not_after: r.get(2)?,
                        from: from.to_owned(),
                        key_sha256: r.get::<_, Option<Vec<u8>>>(3)?.unwrap_or_default(),
                        der: r.get::<_, Option<Vec<u8>>>(4)?.unwrap_or_default(),
                    })
                },
            )
            .optional()
        })
    }

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
            // Retirement first, as in the view: only a current key is told it is revoked.
            Some((_, _, true)) => SerialStatus::Retired,
            Some((_, Some(_), false)) => SerialStatus::Revoked,
            Some((_, None, false)) => SerialStatus::Current,
        })
    }
}

/// The database's own answer (offline commands and tests; the running Hub checks its
/// in-memory view instead, so that no handshake waits for SQLite).
impl SerialCheck for Db {
    fn check(&self, id: &SpiffeId, serial: &str) -> Result<(), SerialRefusal> {
        match self.serial_status(id, serial) {
            Ok(status) => status.refusal(id, serial),
            Err(e) => Err(SerialRefusal::StoreUnavailable(e.to_string())),
        }
    }
}

fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}
