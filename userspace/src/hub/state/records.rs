//! The rows the database hands out: for `ewii-hub clients`, and the snapshot the running
//! Hub's in-memory view is built from.

use ewii_common::spiffe::SpiffeId;
use rusqlite::params;

use super::{operator_log, Db, OperatorEntry, StateError};
use crate::identity::verify::SerialRefusal;

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
    /// When a session of this client last ended (or began), seconds since the epoch: the
    /// start of its silent-client grace, moved with the Hub's clock when that clock moved
    /// against its running while the client was silent (a step, or a suspend of the host),
    /// and reset by a Hub's start.
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

/// Everything the running Hub keeps in memory about clients and serials, read at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Every client.
    pub clients: Vec<ClientRecord>,
    /// The serials the view keeps ([`RETIRED_KEPT`]).
    pub serials: Vec<SerialRecord>,
}

/// A client as the Hub's in-memory view needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRecord {
    /// Client name.
    pub name: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// The revocation reason, when revoked.
    pub revoked: Option<String>,
    /// When a session of it last ended (or began), seconds since the epoch.
    pub last_seen: Option<i64>,
}

/// A serial as the Hub's in-memory view needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialRecord {
    /// Normalised serial.
    pub serial: String,
    /// The client it was issued to.
    pub client: String,
    /// Issue order (later issues compare greater).
    pub order: i64,
    /// Replaced by a newer serial in use, or by a new enrolment.
    pub retired: bool,
    /// Whether it has authenticated a session.
    pub used: bool,
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

impl SerialStatus {
    /// The refusal this status means for `serial` of `id`, if any.
    pub fn refusal(self, id: &SpiffeId, serial: &str) -> Result<(), SerialRefusal> {
        match self {
            Self::Current => Ok(()),
            Self::Unknown => Err(SerialRefusal::Unknown {
                serial: serial.to_owned(),
            }),
            Self::OtherIdentity(owner) => Err(SerialRefusal::OtherIdentity {
                serial: serial.to_owned(),
                owner,
                id: id.to_string(),
            }),
            Self::Revoked => Err(SerialRefusal::Revoked { id: id.to_string() }),
            Self::Retired => Err(SerialRefusal::Retired {
                serial: serial.to_owned(),
                id: id.to_string(),
            }),
        }
    }
}

impl Db {
    /// Every client and the serials the view keeps ([`RETIRED_KEPT`]), for the running Hub's
    /// in-memory view (in one read transaction, so that its statements agree).
    pub fn snapshot(&self) -> Result<Snapshot, StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let snapshot = read_snapshot(&tx)?;
            tx.commit()?;
            Ok(snapshot)
        })
    }

    /// The [`snapshot`](Self::snapshot) and the operators' log entries after `log_after`, in
    /// one read transaction: a revocation an operator's command commits (with its entry) is in
    /// both or in neither, so the Hub never closes a Client's sessions for a revocation whose
    /// record it has not read, nor audits one its view does not hold yet.
    pub fn snapshot_and_log(
        &self,
        log_after: i64,
    ) -> Result<(Snapshot, Vec<OperatorEntry>), StateError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let snapshot = read_snapshot(&tx)?;
            let log = operator_log::read_after(&tx, log_after)?;
            tx.commit()?;
            Ok((snapshot, log))
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

/// How many of a client's retired serials the snapshot keeps, the most recent first, beside
/// those whose certificates have not ended. A serial retires once a newer one is used, and each
/// Client renews about twice a day: the table holds every serial ever issued (the keys'
/// history that refuses an old key's renewal, P8), and a view of all of them would grow by ~2
/// entries per Client per day for the Hub's whole life (a year of 10,000 Clients: 7 million).
/// The ones kept answer `retired` to an old key's handshake and to the `Goodbye` of a session a
/// newer serial replaced (a session ends with its certificate, so no session holds one left
/// out); one left out answers `unknown`, refused all the same, and a stop's revoke asks the
/// records about it (`Store::revoke_at_stop`).
pub(crate) const RETIRED_KEPT: i64 = 8;

/// The snapshot's serials in use (by the index `serials_by_state`, which the Hub's start
/// builds: [`Db::add_missing_indexes`]).
pub(crate) const SERIALS_IN_USE: &str =
    "SELECT serial, client, rowid, retired, first_used IS NOT NULL FROM serials WHERE retired = 0";
/// Its retired serials whose certificates end after `?1` (by `serials_by_state`).
pub(crate) const SERIALS_RETIRED_NOT_ENDED: &str =
    "SELECT serial, client, rowid, retired, first_used IS NOT NULL FROM serials
     WHERE retired = 1 AND not_after > ?1";
/// Client `?1`'s `?2` most recently issued retired serials (by `serials_by_client`, newest
/// first: a client's newest serials are nearly all retired, so it reads a few more than `?2`).
pub(crate) const SERIALS_RETIRED_RECENT: &str =
    "SELECT serial, client, rowid, retired, first_used IS NOT NULL FROM serials
     WHERE client = ?1 AND retired = 1 ORDER BY rowid DESC LIMIT ?2";

/// Every client, its serials not retired, its retired ones whose certificates have not ended
/// (by the database's clock) and its [`RETIRED_KEPT`] most recently issued retired ones (the
/// caller's transaction makes its statements agree). Without the index the Hub's start builds
/// (an operator's command reading a database no Hub has started on since an upgrade) the
/// first two scan the table: slower, the same answer.
fn read_snapshot(c: &rusqlite::Connection) -> rusqlite::Result<Snapshot> {
    let clients = c
        .prepare("SELECT name, spiffe_id, revoked_at, revoke_reason, last_seen FROM clients")?
        .query_map([], |r| {
            let revoked_at: Option<i64> = r.get(2)?;
            let reason: Option<String> = r.get(3)?;
            Ok(ClientRecord {
                name: r.get(0)?,
                spiffe_id: r.get(1)?,
                revoked: revoked_at.map(|_| reason.unwrap_or_default()),
                last_seen: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    // Each read by an index, so that a reload reads the rows it keeps and not the whole table.
    let now: i64 = c.query_row("SELECT unixepoch()", [], |r| r.get(0))?;
    let record = |r: &rusqlite::Row<'_>| {
        Ok(SerialRecord {
            serial: r.get(0)?,
            client: r.get(1)?,
            order: r.get(2)?,
            retired: r.get(3)?,
            used: r.get(4)?,
        })
    };
    // By their order (the rowid): a serial both recent and not ended is read twice, kept once.
    let mut kept = std::collections::BTreeMap::new();
    for row in c.prepare(SERIALS_IN_USE)?.query_map([], record)? {
        let row = row?;
        kept.insert(row.order, row);
    }
    for row in c
        .prepare(SERIALS_RETIRED_NOT_ENDED)?
        .query_map([now], record)?
    {
        let row = row?;
        kept.insert(row.order, row);
    }
    let mut recent = c.prepare(SERIALS_RETIRED_RECENT)?;
    for client in &clients {
        for row in recent.query_map(params![client.name, RETIRED_KEPT], record)? {
            let row = row?;
            kept.insert(row.order, row);
        }
    }
    let serials = kept.into_values().collect();
    Ok(Snapshot { clients, serials })
}
