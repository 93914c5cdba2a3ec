//! The seam between the store owner and a database (see the `store` module doc).

use ewii_common::spiffe::SpiffeId;

use crate::hub::state::{
    self, Db, DueBy, IssuedSerial, OperatorEntry, PendingWebhook, RenewalRow, Revoker,
    SerialStatus, SessionRow, Snapshot, StateError, TokenGrant, TokenRefusal,
};

/// What the owner needs from a database. See the module doc: this is the seam for another
/// backend.
pub trait Backend: Send + 'static {
    /// Hub start: forget recorded sessions, make parked webhooks due, restart the
    /// silent-client grace at `now`. Returns where the clients not revoked had their last
    /// sessions from.
    fn start(&self, now: i64) -> Result<Vec<String>, StateError>;
    /// Every client and serial, for the view.
    fn snapshot(&self) -> Result<Snapshot, StateError>;
    /// See [`Db::snapshot_and_log`].
    fn snapshot_and_log(
        &self,
        log_after: i64,
    ) -> Result<(Snapshot, Vec<OperatorEntry>), StateError>;
    /// A value that changes whenever another writer committed.
    fn change_marker(&self) -> Result<i64, StateError>;
    /// Statements run so far on the owner thread (for [`Counts`]).
    fn statements(&self) -> u64;
    /// See [`Db::redeem_token`].
    fn redeem_token(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Result<TokenGrant, TokenRefusal>, StateError>;
    /// See [`Db::record_enrolment`].
    fn record_enrolment(
        &self,
        grant: &TokenGrant,
        id: &SpiffeId,
        serial: &IssuedSerial,
        not_after: i64,
        now: i64,
    ) -> Result<(), StateError>;
    /// See [`Db::record_renewal`].
    fn record_renewal(&self, row: &RenewalRow, now: i64) -> Result<(), StateError>;
    /// See [`Db::renewal_of`].
    fn renewal_of(&self, from: &str) -> Result<Option<RenewalRow>, StateError>;
    /// See [`Db::forget_ended_certificates`].
    fn forget_ended_certificates(&self, before: i64, limit: u32) -> Result<usize, StateError>;
    /// See [`Db::key_certified_before`].
    fn key_certified_before(
        &self,
        client: &str,
        key_sha256: &[u8],
    ) -> Result<Option<String>, StateError>;
    /// See [`Db::serial_status`].
    fn serial_status(&self, id: &SpiffeId, serial: &str) -> Result<SerialStatus, StateError>;
    /// See [`Db::superseded`].
    fn superseded(&self, client: &str, serial: &str) -> Result<bool, StateError>;
    /// See [`Db::revoke_client_noting`].
    fn revoke_client(
        &self,
        client: &str,
        reason: &str,
        now: i64,
        notify: bool,
        by: Revoker,
    ) -> Result<bool, StateError>;
    /// See [`Db::session_up`].
    fn session_up(&self, client: &str, row: &SessionRow) -> Result<(), StateError>;
    /// See [`Db::session_down`].
    fn session_down(
        &self,
        client: &str,
        session_id: u64,
        last_seen: Option<i64>,
    ) -> Result<(), StateError>;
    /// See [`Db::shift_grace`].
    fn shift_grace(&self, by: i64) -> Result<(), StateError>;
    /// See [`Db::shift_webhooks`].
    fn shift_webhooks(&self, by_ms: i64) -> Result<(), StateError>;
    /// See [`Db::admit_federated`].
    fn admit_federated(
        &self,
        client: &str,
        id: &SpiffeId,
        webhook: Option<&str>,
        now: i64,
    ) -> Result<(), StateError>;
    /// See [`Db::meta`].
    fn meta(&self, key: &str) -> Result<Option<i64>, StateError>;
    /// See [`Db::operator_log_audited`].
    fn operator_log_audited(&self, id: i64) -> Result<(), StateError>;
    /// See [`Db::due_webhooks`].
    fn due_webhooks(
        &self,
        due: DueBy,
        max_attempts: u32,
        skip: &[String],
    ) -> Result<Vec<PendingWebhook>, StateError>;
    /// See [`Db::next_webhook_due`].
    fn next_webhook_due(&self, max_attempts: u32, due: DueBy) -> Result<Option<i64>, StateError>;
    /// See [`Db::webhook_delivered`].
    fn webhook_delivered(&self, id: &str, now: i64) -> Result<(), StateError>;
    /// See [`Db::webhook_failed`].
    fn webhook_failed(&self, id: &str, error: &str, next_ms: i64) -> Result<(), StateError>;
    /// See [`Db::webhook_parked`].
    fn webhook_parked(&self, id: &str, error: &str) -> Result<(), StateError>;
}

impl Backend for Db {
    fn start(&self, now: i64) -> Result<Vec<String>, StateError> {
        self.add_missing_indexes()?;
        self.clear_sessions()?;
        let peers = self.last_peers()?;
        self.unpark_webhooks()?;
        self.restart_grace(now)?;
        Ok(peers)
    }
    fn snapshot(&self) -> Result<Snapshot, StateError> {
        Db::snapshot(self)
    }
    fn snapshot_and_log(
        &self,
        log_after: i64,
    ) -> Result<(Snapshot, Vec<OperatorEntry>), StateError> {
        Db::snapshot_and_log(self, log_after)
    }
    fn change_marker(&self) -> Result<i64, StateError> {
        self.data_version()
    }
    fn statements(&self) -> u64 {
        state::statements_on_this_thread()
    }
    fn redeem_token(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Result<TokenGrant, TokenRefusal>, StateError> {
        Db::redeem_token(self, token, now)
    }
    fn record_enrolment(
        &self,
        grant: &TokenGrant,
        id: &SpiffeId,
        serial: &IssuedSerial,
        not_after: i64,
        now: i64,
    ) -> Result<(), StateError> {
        Db::record_enrolment(self, grant, id, serial.clone(), not_after, now)
    }
    fn record_renewal(&self, row: &RenewalRow, now: i64) -> Result<(), StateError> {
        Db::record_renewal(self, row, now)
    }
    fn key_certified_before(
        &self,
        client: &str,
        key_sha256: &[u8],
    ) -> Result<Option<String>, StateError> {
        Db::key_certified_before(self, client, key_sha256)
    }
    fn renewal_of(&self, from: &str) -> Result<Option<RenewalRow>, StateError> {
        Db::renewal_of(self, from)
    }
    fn forget_ended_certificates(&self, before: i64, limit: u32) -> Result<usize, StateError> {
        Db::forget_ended_certificates(self, before, limit)
    }
    fn serial_status(&self, id: &SpiffeId, serial: &str) -> Result<SerialStatus, StateError> {
        Db::serial_status(self, id, serial)
    }
    fn superseded(&self, client: &str, serial: &str) -> Result<bool, StateError> {
        Db::superseded(self, client, serial)
    }
    fn revoke_client(
        &self,
        client: &str,
        reason: &str,
        now: i64,
        notify: bool,
        by: Revoker,
    ) -> Result<bool, StateError> {
        Db::revoke_client_noting(self, client, reason, now, notify, by).map(|(revoked, _)| revoked)
    }
    fn session_up(&self, client: &str, row: &SessionRow) -> Result<(), StateError> {
        Db::session_up(self, client, row)
    }
    fn session_down(
        &self,
        client: &str,
        session_id: u64,
        last_seen: Option<i64>,
    ) -> Result<(), StateError> {
        Db::session_down(self, client, session_id, last_seen)
    }
    fn shift_grace(&self, by: i64) -> Result<(), StateError> {
        Db::shift_grace(self, by)
    }
    fn shift_webhooks(&self, by_ms: i64) -> Result<(), StateError> {
        Db::shift_webhooks(self, by_ms)
    }
    fn admit_federated(
        &self,
        client: &str,
        id: &SpiffeId,
        webhook: Option<&str>,
        now: i64,
    ) -> Result<(), StateError> {
        Db::admit_federated(self, client, id, webhook, now)
    }
    fn meta(&self, key: &str) -> Result<Option<i64>, StateError> {
        Db::meta(self, key)
    }
    fn operator_log_audited(&self, id: i64) -> Result<(), StateError> {
        Db::operator_log_audited(self, id)
    }
    fn due_webhooks(
        &self,
        due: DueBy,
        max_attempts: u32,
        skip: &[String],
    ) -> Result<Vec<PendingWebhook>, StateError> {
        Db::due_webhooks(self, due, max_attempts, skip)
    }
    fn next_webhook_due(&self, max_attempts: u32, due: DueBy) -> Result<Option<i64>, StateError> {
        Db::next_webhook_due(self, max_attempts, due)
    }
    fn webhook_delivered(&self, id: &str, now: i64) -> Result<(), StateError> {
        Db::webhook_delivered(self, id, now)
    }
    fn webhook_failed(&self, id: &str, error: &str, next_ms: i64) -> Result<(), StateError> {
        Db::webhook_failed(self, id, error, next_ms)
    }
    fn webhook_parked(&self, id: &str, error: &str) -> Result<(), StateError> {
        Db::webhook_parked(self, id, error)
    }
}
