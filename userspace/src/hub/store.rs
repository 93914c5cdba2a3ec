//! The Hub's one door to its database: a [`Store`] handle whose async methods send a job to
//! the thread that owns the database and await the answer. No async task ever runs SQL.
//!
//! The owner thread also keeps the in-memory [`View`] of clients and serials current — after
//! every write it makes, and by a full reload when another process (`ewii-hub revoke`,
//! `ewii-hub ca …`) committed, which it notices by a change marker (SQLite's
//! `PRAGMA data_version`) that the watcher asks it to compare. What changed goes out as
//! [`Change`]s on a channel; sessions are told, they never poll.
//!
//! **The seam.** The owner talks to its database only through [`Backend`]: tokens, enrolments,
//! serials, revocations, sessions, the webhook outbox, a snapshot for the view, and the change
//! marker. [`Db`] (SQLite, one file) is the backend today. A PostgreSQL backend shared by
//! several Hub replicas implements the same trait — its change marker a `LISTEN`/`NOTIFY`
//! sequence or a version row bumped by every writer — and no session, enrolment or watcher
//! code changes: they hold a `Store`, never a backend.
//!
//! Failing to read fails closed: an unreadable view refuses every handshake
//! ([`SerialRefusal::StoreUnavailable`]), and a renewal whose records cannot be read is refused.

mod backend;
mod view;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ewii_common::spiffe::SpiffeId;
use tokio::sync::{mpsc, oneshot, Notify};

use super::state::{
    operator_log, Db, DueBy, IssuedSerial, OperatorEntry, PendingWebhook, RenewalRow, Revoker,
    SerialStatus, SessionRow, Snapshot, StateError, TokenGrant, TokenRefusal,
};
use crate::clock::{Clock, Moved, Stalls};
use crate::identity::verify::SerialRefusal;

pub use backend::Backend;
pub(crate) use view::{Change, View};

/// Jobs waiting for the owner at most; senders wait beyond that (back-pressure).
const QUEUE: usize = 256;

/// How long after its end a serial's certificate is kept ([`Store::forget_ended_certificates`]):
/// a day past it, so that a clock behind the Hub's by less than that sees nothing change.
pub(crate) const CERTIFICATE_KEPT_SECS: i64 = 86_400;
/// Certificates cleared per job: one job holds the database's write lock for a few
/// milliseconds, and the jobs of sessions and renewals queue behind it only that long.
pub(crate) const FORGET_BATCH: u32 = 256;

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The owner thread is gone (the Hub is stopping, or it panicked).
    #[error("the hub store has stopped")]
    Closed,
    /// The database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The owner thread could not be started.
    #[error("cannot start the store thread: {0}")]
    Thread(std::io::Error),
}

/// Why a renewal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RenewalRefusal {
    /// The serial itself is not current (or the records could not be read).
    #[error("no renewal: {0}")]
    Serial(#[from] SerialRefusal),
    /// A newer serial of this client is in use: only the newest key renews.
    #[error("no renewal: serial {0} is superseded by a newer one in use")]
    Superseded(String),
    /// The CSR's key is one an earlier serial of this client certified: a renewal is for a
    /// fresh key (P8), or a copy of an old key would come back to life.
    #[error("no renewal: the CSR's key is the one serial {earlier} certified; a renewal is for a fresh key")]
    KeyReused {
        /// The earlier serial.
        earlier: String,
    },
    /// The serial was renewed already, for another key: a serial renews once. Suspicious: two
    /// holders of one key (a stolen copy), or a Client that lost its pending key.
    #[error("no renewal: serial {serial} was renewed already (to {to}) for another key; a serial renews once — a copy of this key?")]
    AlreadyRenewed {
        /// The serial asked to renew.
        serial: String,
        /// Its renewal.
        to: String,
    },
}

/// What a permitted renewal is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// The first renewal of this serial: sign.
    Fresh,
    /// The same key asked again (its answer was lost): the same certificate, no signature.
    Again(RenewalRow),
}

/// How much database work the owner has done.
#[derive(Debug, Default)]
pub struct Counts {
    statements: AtomicU64,
    change_checks: AtomicU64,
    reloads_failed: AtomicU64,
}

impl Counts {
    /// Statements run, except the change-marker checks.
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    /// Change-marker checks (`PRAGMA data_version`) run.
    pub fn change_checks(&self) -> u64 {
        self.change_checks.load(Ordering::Relaxed)
    }

    /// Reloads of the view that failed (each leaves the view refusing every check until one
    /// works).
    pub fn reloads_failed(&self) -> u64 {
        self.reloads_failed.load(Ordering::Relaxed)
    }
}

/// The handle async code holds. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    jobs: mpsc::Sender<Job>,
    view: Arc<View>,
    counts: Arc<Counts>,
    outbox: Arc<Notify>,
    /// Where the clients not revoked had their last sessions from, as this Hub started.
    peers_before: Arc<[IpAddr]>,
}

type Job = Box<dyn FnOnce(&mut Owner) + Send>;

/// What a stop's revoke did ([`Store::revoke_at_stop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopRevoke {
    /// Revoked now (`true`), or revoked already.
    Revoked(bool),
    /// A newer serial replaced the stopping connection's: nothing done.
    Replaced,
    /// The view cannot tell (its records could not be read): nothing done.
    CannotTell,
}

/// The thread that owns the backend.
struct Owner {
    backend: Box<dyn Backend>,
    view: Arc<View>,
    changes: mpsc::UnboundedSender<Change>,
    outbox: Arc<Notify>,
    marker: Option<i64>,
    /// The last entry of the operators' log handed to the watcher.
    operator_log_seen: i64,
    /// Statements spent on change-marker checks during the current job.
    marker_statements: u64,
    counts: Arc<Counts>,
    /// The wall clock, read at the start of every job (since the Unix epoch).
    now: Duration,
    /// Tells a move of the wall clock against the Hub's running (a step, a suspend, a
    /// pause of the process).
    clock: Clock,
    /// Seconds the graces moved in the view that the database has not taken yet (its write
    /// failed): tried again at every job, and applied to every view loaded meanwhile.
    unwritten_shift: i64,
    /// The part of the moves under a second not applied yet, in milliseconds.
    carry_ms: i64,
    /// The database refused the last write of `unwritten_shift`.
    shift_refused: bool,
    /// Sessions whose end the database refused (client, session id): written at the next
    /// jobs, with the `last_seen` the view holds then (never over a grace cleared meanwhile:
    /// [`Db::session_down`](crate::hub::state::Db::session_down)); that `last_seen` is kept
    /// in every view loaded meanwhile whose client still has one. Dropped when the client's
    /// next session replaces the row, so at most one per session live at that moment.
    unwritten_ends: Vec<(String, u64)>,
    /// The database refused the last write of `unwritten_ends`.
    ends_refused: bool,
}

impl Store {
    /// Opens the SQLite database at `path` on a new owner thread, resets the per-run state
    /// (recorded sessions, the silent-client grace) and loads the view. The receiver gets
    /// every [`Change`] of the view.
    pub(crate) async fn open(
        path: &Path,
        now: i64,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Change>), StoreError> {
        let path: PathBuf = path.to_owned();
        Self::spawn(
            move || Ok(Box::new(Db::open(&path)?) as Box<dyn Backend>),
            now,
        )
        .await
    }

    /// Like [`open`](Self::open) with any backend, made on the owner thread.
    pub(crate) async fn spawn(
        make: impl FnOnce() -> Result<Box<dyn Backend>, StateError> + Send + 'static,
        now: i64,
    ) -> Result<(Self, mpsc::UnboundedReceiver<Change>), StoreError> {
        let (jobs, mut queue) = mpsc::channel::<Job>(QUEUE);
        let (changes, changed) = mpsc::unbounded_channel();
        let view = Arc::new(View::default());
        let counts = Arc::new(Counts::default());
        let outbox = Arc::new(Notify::new());
        let (ready, started) = oneshot::channel::<Result<Vec<String>, StateError>>();
        let (v, c, o) = (view.clone(), counts.clone(), outbox.clone());
        // The grace counts the time this Hub ran: a pause of the process is not a Client's
        // silence (it could not reach the Hub either).
        let stalls = Stalls::start().map_err(StoreError::Thread)?;
        std::thread::Builder::new()
            .name("ewii-store".into())
            .spawn(move || {
                let backend = match make() {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let clock = Clock::start_counting_stalls(stalls);
                let mut owner = Owner {
                    backend,
                    view: v,
                    changes,
                    outbox: o,
                    marker: None,
                    operator_log_seen: 0,
                    marker_statements: 0,
                    counts: c,
                    now: Duration::ZERO,
                    clock,
                    unwritten_shift: 0,
                    carry_ms: 0,
                    shift_refused: false,
                    unwritten_ends: Vec::new(),
                    ends_refused: false,
                };
                let first = owner.begin(now);
                let failed = first.is_err();
                let _ = ready.send(first);
                if failed {
                    return;
                }
                while let Some(job) = queue.blocking_recv() {
                    job(&mut owner);
                }
            })
            .map_err(StoreError::Thread)?;
        let peers = started.await.map_err(|_| StoreError::Closed)??;
        // Recorded by this Hub's own code; one that does not parse (an edited database) is
        // passed over.
        let peers_before: Arc<[IpAddr]> = peers
            .iter()
            .filter_map(|p| p.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
            .collect();
        Ok((
            Self {
                jobs,
                view,
                counts,
                outbox,
                peers_before,
            },
            changed,
        ))
    }

    /// The in-memory view (for the TLS verifier and the watcher).
    pub(crate) fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// Where the clients not revoked had their last sessions from, read at this Hub's start
    /// (whether those sessions ended in order, or were cut by a crash).
    pub(crate) fn peers_before_start(&self) -> Vec<IpAddr> {
        self.peers_before.to_vec()
    }

    /// The statement counters.
    pub(crate) fn counts(&self) -> Arc<Counts> {
        self.counts.clone()
    }

    /// Woken whenever a webhook row may have been queued.
    pub(crate) fn outbox_queued(&self) -> Arc<Notify> {
        self.outbox.clone()
    }

    /// Redeems a join token (deleted whatever the outcome).
    pub(crate) async fn redeem_token(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Result<TokenGrant, TokenRefusal>, StoreError> {
        let token = token.to_owned();
        self.call(move |o| o.backend.redeem_token(&token, now))
            .await?
            .map_err(Into::into)
    }

    /// Records an enrolment and its first serial.
    pub(crate) async fn record_enrolment(
        &self,
        grant: TokenGrant,
        id: SpiffeId,
        serial: IssuedSerial,
        not_after: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        self.call(move |o| {
            o.backend
                .record_enrolment(&grant, &id, &serial, not_after, now)?;
            let changes = o
                .view
                .apply_enrolment(&grant.client, &id.to_string(), &serial.serial);
            o.publish(changes);
            Ok(())
        })
        .await?
    }

    /// Whether the session holding `serial` of `id` (client `client`) may renew: current in
    /// the records, and no newer serial in use. Read from the database, failing closed.
    pub(crate) async fn may_renew(
        &self,
        client: &str,
        id: &SpiffeId,
        serial: &str,
        key_sha256: &[u8],
    ) -> Result<Renewal, RenewalRefusal> {
        let (client, id, serial) = (client.to_owned(), id.clone(), serial.to_owned());
        let key = key_sha256.to_vec();
        let closed = || {
            RenewalRefusal::Serial(SerialRefusal::StoreUnavailable(
                "the hub store has stopped".into(),
            ))
        };
        self.call(move |o| o.renewal(&client, &id, &serial, &key))
            .await
            .unwrap_or_else(|_| Err(closed()))
    }

    /// Records a serial issued by renewal of `row.from` for `id`, if that renewal is still
    /// permitted: decided again in the same job as the write, since another renewal of the
    /// serial (a copy of its key, asking at the same moment) or a re-enrolment may have been
    /// recorded after [`may_renew`](Self::may_renew) answered. `Ok(Ok(Fresh))`: recorded;
    /// `Ok(Ok(Again(row)))`: the same key's renewal recorded meanwhile (answer that one, and
    /// drop the new signature); `Ok(Err(_))`: refused now, nothing recorded.
    pub(crate) async fn record_renewal(
        &self,
        row: RenewalRow,
        id: &SpiffeId,
        now: i64,
    ) -> Result<Result<Renewal, RenewalRefusal>, StoreError> {
        let id = id.clone();
        self.call(move |o| {
            match o.renewal(&row.client, &id, &row.from, &row.key_sha256) {
                Ok(Renewal::Fresh) => {}
                decided => return Ok(decided),
            }
            o.backend.record_renewal(&row, now)?;
            let changes = o.view.apply_renewal(&row.client, &row.serial);
            o.publish(changes);
            Ok(Ok(Renewal::Fresh))
        })
        .await?
    }

    /// Revokes `client` (by `by`); false when there is no such client or it was revoked
    /// already. Tests: the Hub revokes through [`revoke_at_stop`](Self::revoke_at_stop) and
    /// [`revoke_if_silent`](Self::revoke_if_silent), and an operator through `ewii-hub revoke`.
    #[cfg(test)]
    pub(crate) async fn revoke(
        &self,
        client: &str,
        reason: &str,
        now: i64,
        notify: bool,
        by: Revoker,
    ) -> Result<bool, StoreError> {
        let (client, reason) = (client.to_owned(), reason.to_owned());
        self.call(move |o| o.revoke(&client, &reason, now, notify, by))
            .await?
    }

    /// A `Goodbye{revoke}` from a connection of `serial`: revokes `client` (by the customer,
    /// `notify` for the webhook), unless a newer serial has replaced that one by the time the
    /// owner comes to it. Checked with the revocation: a replacement's enrolment or first
    /// session that lands after the session's own check must not be revoked by the stop of
    /// the container it replaced.
    pub(crate) async fn revoke_at_stop(
        &self,
        client: &str,
        id: &SpiffeId,
        serial: &str,
        reason: &str,
        now: i64,
        notify: bool,
    ) -> Result<StopRevoke, StoreError> {
        let (client, reason, id, serial) = (
            client.to_owned(),
            reason.to_owned(),
            id.clone(),
            serial.to_owned(),
        );
        self.call(move |o| {
            // The view keeps a client's most recent retired serials only: one it does not
            // know is asked of the records (an old container's draining session may stop after
            // its replacement renewed many times).
            let status = match o.view.status(&id, &serial) {
                Some(SerialStatus::Unknown) => o.backend.serial_status(&id, &serial).ok(),
                known => known,
            };
            match status {
                Some(SerialStatus::Retired) => return Ok(StopRevoke::Replaced),
                None => return Ok(StopRevoke::CannotTell),
                Some(_) => {}
            }
            let by = Revoker::Customer { notify };
            o.revoke(&client, &reason, now, notify, by)
                .map(StopRevoke::Revoked)
        })
        .await?
    }

    /// Revokes `client` for the silent-client grace, if it is still silent for more than
    /// `grace_secs` when the owner comes to it (it may have come back since it was listed:
    /// [`silent`](Self::silent)); false when it is not, or was revoked already.
    pub(crate) async fn revoke_if_silent(
        &self,
        client: &str,
        reason: &str,
        grace_secs: i64,
    ) -> Result<bool, StoreError> {
        let (client, reason) = (client.to_owned(), reason.to_owned());
        self.call(move |o| {
            let cutoff = o.now.as_secs() as i64 - grace_secs;
            if !o.view.is_silent(&client, cutoff) {
                return Ok(false);
            }
            let now = o.now.as_secs() as i64;
            o.revoke(&client, &reason, now, true, Revoker::Hub)
        })
        .await?
    }

    /// A session came up: recorded, its serial used, older serials retired. Returns how many
    /// serials it retired.
    pub(crate) async fn session_up(
        &self,
        client: &str,
        row: SessionRow,
    ) -> Result<usize, StoreError> {
        let client = client.to_owned();
        self.call(move |o| {
            // Not applied unless written: the view never holds a start (a serial's first use,
            // the older serials' retirement) the database lacks, which a reload would undo.
            // The caller refuses a new session it could not record.
            o.backend.session_up(&client, &row)?;
            // The row is this session's now: an older end still unwritten has nothing left to
            // delete, and the client is not silent.
            o.unwritten_ends.retain(|(c, _)| *c != client);
            let (changes, retired) =
                o.view
                    .apply_session_up(&client, row.session_id, &row.serial, row.since);
            o.publish(changes);
            Ok(retired)
        })
        .await?
    }

    /// Records the federated Clients (name, SPIFFE ID) and tells the view which IDs they are;
    /// refuses a name held by another identity. At Hub start, before any handshake.
    pub(crate) async fn admit_federated(
        &self,
        clients: Vec<(String, SpiffeId, Option<String>)>,
        now: i64,
    ) -> Result<(), StoreError> {
        self.call(move |o| {
            for (name, id, webhook) in &clients {
                o.backend
                    .admit_federated(name, id, webhook.as_deref(), now)?;
            }
            o.view.set_federated(
                clients
                    .iter()
                    .map(|(n, id, _)| (n.as_str(), id.to_string())),
            );
            let snapshot = o.backend.snapshot()?;
            let changes = o.load(Some(snapshot));
            o.publish(changes);
            Ok(())
        })
        .await?
    }

    /// A session ended: dated by the owner's reading of the clock, so that a move of the
    /// clock is applied to every grace before it or after it, never to a part of them.
    pub(crate) async fn session_down(
        &self,
        client: &str,
        session_id: u64,
    ) -> Result<(), StoreError> {
        let client = client.to_owned();
        self.call(move |o| {
            let now = o.now.as_secs() as i64;
            // While a move of the graces is not in the database, the end is written as the
            // database's clock has it, before the move: the move, once written (or applied to a
            // view loaded meanwhile), brings it to `now`, not past it.
            let stored = now - o.unwritten_shift;
            // The view moves even when the write fails: the session is gone either way. The
            // write is tried again at every job; until then a reload would bring back the
            // session's start as the client's `last_seen`, and the silent-client grace would
            // count from there.
            let written = o.backend.session_down(&client, session_id, Some(stored));
            let changes = o.view.apply_session_down(&client, session_id, now);
            o.publish(changes);
            if written.is_err() {
                o.unwritten_ends.push((client, session_id));
            }
            written.map_err(Into::into)
        })
        .await?
    }

    /// The clients without a live session, not revoked, silent for more than `grace_secs`
    /// by the clock as the owner reads it (after it has moved every grace with a move of
    /// that clock), with their SPIFFE IDs.
    pub(crate) async fn silent(
        &self,
        grace_secs: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.call(move |o| {
            let cutoff = o.now.as_secs() as i64 - grace_secs;
            o.view.silent_since(cutoff)
        })
        .await
    }

    /// As if the wall clock had moved so (tests: the clock itself is the host's).
    #[cfg(test)]
    pub(crate) async fn clock_moved(&self, moved: Moved) -> Result<(), StoreError> {
        self.call(move |o| o.clock_moved(moved)).await
    }

    /// Compares the change marker; when another writer committed (or the view is not
    /// loaded), reloads the view and publishes what changed. Returns whether it reloaded.
    pub(crate) async fn refresh(&self) -> Result<bool, StoreError> {
        self.call(Owner::refresh).await?
    }

    /// Clears the kept certificates of serials that ended more than [`CERTIFICATE_KEPT_SECS`]
    /// ago, at most [`FORGET_BATCH`] of them
    /// ([`Db::forget_ended_certificates`](crate::hub::state::Db::forget_ended_certificates)):
    /// whether more may be waiting (it cleared a full batch).
    pub(crate) async fn forget_ended_certificates(&self) -> Result<bool, StoreError> {
        self.call(|o| {
            let before = o.now.as_secs() as i64 - CERTIFICATE_KEPT_SECS;
            o.backend
                .forget_ended_certificates(before, FORGET_BATCH)
                .map(|cleared| cleared == FORGET_BATCH as usize)
        })
        .await?
        .map_err(Into::into)
    }

    /// Outbox rows due, leaving out those in `skip` (the attempts in flight), in turns by URL
    /// ([`Db::due_webhooks`]).
    pub(crate) async fn due_webhooks(
        &self,
        due: DueBy,
        max_attempts: u32,
        skip: Vec<String>,
    ) -> Result<Vec<PendingWebhook>, StoreError> {
        self.call(move |o| o.backend.due_webhooks(due, max_attempts, &skip))
            .await?
            .map_err(Into::into)
    }

    /// The watcher audited the operators' log up to entry `id`: moves the mark there (and
    /// deletes the entries up to it).
    pub(crate) async fn operator_log_audited(&self, id: i64) -> Result<(), StoreError> {
        self.call(move |o| o.backend.operator_log_audited(id))
            .await?
            .map_err(Into::into)
    }

    /// When the next outbox row not due yet is due (ms since the epoch).
    pub(crate) async fn next_webhook_due(
        &self,
        max_attempts: u32,
        due: DueBy,
    ) -> Result<Option<i64>, StoreError> {
        self.call(move |o| o.backend.next_webhook_due(max_attempts, due))
            .await?
            .map_err(Into::into)
    }

    /// A delivery was acknowledged.
    pub(crate) async fn webhook_delivered(&self, id: &str, now: i64) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.call(move |o| o.backend.webhook_delivered(&id, now))
            .await?
            .map_err(Into::into)
    }

    /// A delivery failed; the next attempt is `delay` from now, dated by the owner's reading
    /// of the clock (so that a step back applied before this job does not miss it). Returns
    /// when that is, in milliseconds since the epoch.
    pub(crate) async fn webhook_failed(
        &self,
        id: &str,
        error: &str,
        delay: Duration,
    ) -> Result<i64, StoreError> {
        let (id, error) = (id.to_owned(), error.to_owned());
        self.call(move |o| {
            let delay = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
            let next_ms = (o.now.as_millis() as i64).saturating_add(delay);
            o.backend
                .webhook_failed(&id, &error, next_ms)
                .map(|()| next_ms)
        })
        .await?
        .map_err(Into::into)
    }

    /// A delivery was refused for a reason a retry cannot change: not due before the next
    /// Hub start.
    pub(crate) async fn webhook_parked(&self, id: &str, error: &str) -> Result<(), StoreError> {
        let (id, error) = (id.to_owned(), error.to_owned());
        self.call(move |o| o.backend.webhook_parked(&id, &error))
            .await?
            .map_err(Into::into)
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Owner) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |owner| {
            // Counted before the answer goes out, so that a caller reading the counters
            // after its answer sees its own statements.
            let before = owner.backend.statements();
            owner.follow_clock();
            let answer = f(owner);
            owner.count(before);
            let _ = tx.send(answer);
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)
    }
}

impl Owner {
    /// See [`Store::revoke`].
    fn revoke(
        &self,
        client: &str,
        reason: &str,
        now: i64,
        notify: bool,
        by: Revoker,
    ) -> Result<bool, StoreError> {
        let changed = self
            .backend
            .revoke_client(client, reason, now, notify, by)?;
        if changed {
            let changes = self.view.apply_revocation(client, reason);
            self.publish(changes);
            if notify {
                self.outbox.notify_one();
            }
        }
        Ok(changed)
    }

    /// Whether `serial` of `client` (`id`) renews for the key hashed `key`: see
    /// [`Store::may_renew`].
    fn renewal(
        &self,
        client: &str,
        id: &SpiffeId,
        serial: &str,
        key: &[u8],
    ) -> Result<Renewal, RenewalRefusal> {
        let unavailable = |e: StateError| SerialRefusal::StoreUnavailable(e.to_string());
        self.backend
            .serial_status(id, serial)
            .map_err(unavailable)?
            .refusal(id, serial)?;
        if self
            .backend
            .superseded(client, serial)
            .map_err(unavailable)?
        {
            return Err(RenewalRefusal::Superseded(serial.to_owned()));
        }
        match self.backend.renewal_of(serial).map_err(unavailable)? {
            None => match self
                .backend
                .key_certified_before(client, key)
                .map_err(unavailable)?
            {
                Some(earlier) => Err(RenewalRefusal::KeyReused { earlier }),
                None => Ok(Renewal::Fresh),
            },
            // Its certificate was cleared once it ended (`forget_ended_certificates`), or never
            // kept (a row older than the column): nothing to send again.
            Some(row) if row.key_sha256 == key && !row.der.is_empty() => Ok(Renewal::Again(row)),
            Some(row) => Err(RenewalRefusal::AlreadyRenewed {
                serial: serial.to_owned(),
                to: row.serial,
            }),
        }
    }

    /// Starts the backend and loads the view; returns where the clients not revoked had
    /// their last sessions from.
    fn begin(&mut self, now: i64) -> Result<Vec<String>, StateError> {
        let before = self.backend.statements();
        let peers = self.backend.start(now)?;
        self.marker = Some(self.check_marker()?);
        // What operators' commands did while no Hub ran is audited now.
        let seen = self.backend.meta(operator_log::AUDITED_UP_TO)?.unwrap_or(0);
        let (snapshot, log) = self.backend.snapshot_and_log(seen)?;
        self.load(Some(snapshot));
        self.operator_log_seen = seen;
        self.publish_operator_log(log);
        self.count(before);
        Ok(peers)
    }

    /// Hands the operators' log entries read with the view to the watcher.
    fn publish_operator_log(&mut self, entries: Vec<OperatorEntry>) {
        if let Some(last) = entries.last().map(|e| e.id) {
            self.publish(entries.into_iter().map(Change::Operator).collect());
            self.operator_log_seen = last;
        }
    }

    /// Adds what ran since `before` to the counters, the marker checks apart.
    fn count(&mut self, before: u64) {
        let ran = self.backend.statements().wrapping_sub(before);
        let checks = std::mem::take(&mut self.marker_statements);
        self.counts
            .statements
            .fetch_add(ran.saturating_sub(checks), Ordering::Relaxed);
        self.counts
            .change_checks
            .fetch_add(checks, Ordering::Relaxed);
    }

    fn check_marker(&mut self) -> Result<i64, StateError> {
        let before = self.backend.statements();
        let marker = self.backend.change_marker();
        self.marker_statements += self.backend.statements().wrapping_sub(before);
        marker
    }

    fn refresh(&mut self) -> Result<bool, StoreError> {
        let marker = match self.check_marker() {
            Ok(m) => m,
            Err(e) => {
                // Cannot tell whether someone revoked: fail closed until a reload works.
                self.fail_closed();
                return Err(e.into());
            }
        };
        if self.marker == Some(marker) && self.view.available() {
            return Ok(false);
        }
        // The view and the log in one read: a revocation's record and the closing of its
        // Client's sessions come from the same commit, or neither does (a log that cannot be
        // read fails the reload, closed, like a view that cannot be).
        match self.backend.snapshot_and_log(self.operator_log_seen) {
            Ok((snapshot, log)) => {
                self.marker = Some(marker);
                let changes = self.load(Some(snapshot));
                // The log first: the watcher audits an operator's revocation with whether it
                // closed a live session, before the view's change closes it.
                self.publish_operator_log(log);
                self.publish(changes);
                // Another process may have queued a webhook with its revocation.
                self.outbox.notify_one();
                Ok(true)
            }
            Err(e) => {
                self.fail_closed();
                Err(e.into())
            }
        }
    }

    /// Reads the wall clock for this job; when it moved, applies the move first.
    fn follow_clock(&mut self) {
        let read = self.clock.read();
        self.now = read.now;
        if let Some(moved) = read.moved {
            tracing::warn!(
                by_secs = moved.by().as_secs(),
                "the wall clock moved {} against the time this Hub ran (a clock step, the host suspended, or this process held still: SIGSTOP, a paused container): the silent-client grace counts the time this Hub ran, not the move",
                moved.way()
            );
            self.clock_moved(moved);
        } else {
            self.write_shift();
        }
        self.write_ends();
    }

    /// Writes the sessions' ends the database refused, in order, each with the `last_seen` the
    /// view holds now (moved with the clock since, as the client was silent) in the database's
    /// frame: the moves it has not taken yet are left out, and applied to it with them. A
    /// client whose grace was cleared since (a new enrolment, `readmit`) keeps it cleared.
    /// Stops at the first refusal: under a lock, each try may wait the busy timeout.
    fn write_ends(&mut self) {
        while let Some((client, session_id)) = self.unwritten_ends.first().cloned() {
            let seen = self
                .view
                .last_seen(&client)
                .map(|s| s - self.unwritten_shift);
            if let Err(e) = self.backend.session_down(&client, session_id, seen) {
                if !std::mem::replace(&mut self.ends_refused, true) {
                    tracing::warn!(error = %e, "cannot record sessions' ends in the hub database yet; the running Hub keeps them, and tries again at every use of the database");
                }
                return;
            }
            self.unwritten_ends.remove(0);
        }
        if std::mem::take(&mut self.ends_refused) {
            tracing::info!("the sessions' ends are in the hub database now");
        }
    }

    /// The wall clock moved against the Hub's running. The silent-client grace
    /// (`revoke_after_lost_secs`) is dated by the wall clock and timed by the monotonic one,
    /// which stands still while the host sleeps: without a shift, a Hub host that slept (or
    /// whose clock was stepped ahead) would revoke every Client silent for the sleep's length,
    /// though none could reach it meanwhile; and a clock set back would hold every grace for
    /// the step's length. So every silent client's grace moves with the clock. A step back
    /// moves the webhook retries too (they would wait the step's length on top of their own
    /// delay); after a suspend or a step ahead, those that fell due are sent at once. The
    /// outbox looks again either way.
    fn clock_moved(&mut self, moved: Moved) {
        let ms = match moved {
            Moved::Ahead(by) => by.as_millis() as i64,
            Moved::Back(by) => -(by.as_millis() as i64),
        };
        let total = self.carry_ms + ms;
        let secs = total / 1_000;
        self.carry_ms = total % 1_000;
        if secs != 0 {
            let changes = self.view.apply_grace_shift(secs);
            self.publish(changes);
            self.unwritten_shift += secs;
            self.write_shift();
        }
        if ms < 0 {
            if let Err(e) = self.backend.shift_webhooks(ms) {
                tracing::error!(error = %e, "cannot move the webhook retries with the clock; those set before the step wait up to retry_max_ms longer");
            }
        }
        self.outbox.notify_one();
    }

    /// Writes the graces' moves the database has not taken yet (says so once while it cannot).
    fn write_shift(&mut self) {
        if self.unwritten_shift == 0 {
            return;
        }
        match self.backend.shift_grace(self.unwritten_shift) {
            Ok(()) => {
                if std::mem::take(&mut self.shift_refused) {
                    tracing::info!("the silent-client grace's move is in the hub database now");
                }
                self.unwritten_shift = 0;
            }
            Err(e) => {
                if !std::mem::replace(&mut self.shift_refused, true) {
                    tracing::warn!(error = %e, "cannot move the silent-client grace in the hub database yet; the running Hub keeps the move, and tries again at every use of the database");
                }
            }
        }
    }

    /// Loads `snapshot` into the view, with the graces' moves the database has not taken.
    fn load(&mut self, snapshot: Option<Snapshot>) -> Vec<Change> {
        let ended: Vec<(String, Option<i64>)> = self
            .unwritten_ends
            .iter()
            .map(|(client, _)| (client.clone(), self.view.last_seen(client)))
            .collect();
        let mut changes = self.view.replace(snapshot);
        if self.unwritten_shift != 0 {
            changes.extend(self.view.apply_grace_shift(self.unwritten_shift));
        }
        for (client, seen) in ended {
            // Not over a grace cleared by another process meanwhile (`readmit`).
            if let (Some(seen), Some(_)) = (seen, self.view.last_seen(&client)) {
                self.view.restore_last_seen(&client, seen);
            }
        }
        changes
    }

    /// A reload failed: the view refuses every check until one works.
    fn fail_closed(&mut self) {
        self.marker = None;
        self.view.replace(None);
        self.counts.reloads_failed.fetch_add(1, Ordering::Relaxed);
    }

    fn publish(&self, changes: Vec<Change>) {
        for change in changes {
            // Nobody listening means the Hub is stopping.
            let _ = self.changes.send(change);
        }
    }
}

#[cfg(test)]
mod tests;
