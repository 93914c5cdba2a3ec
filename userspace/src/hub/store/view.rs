//! The in-memory view of clients and serials that the store owner keeps current: the TLS
//! verifier checks serials against it (no SQL in a handshake), and the watcher computes the
//! silent-client grace from it.
//!
//! Only the owner thread writes it (the `apply_*` methods, after its own database writes, and
//! [`View::replace`] after another process committed). Readers take a short read lock.

use std::collections::{HashMap, HashSet};
use std::sync::RwLock;

use ewii_common::spiffe::SpiffeId;

use crate::hub::state::{OperatorEntry, SerialStatus, Snapshot};
use crate::identity::verify::{SerialCheck, SerialRefusal};

/// What changed in the view; the owner sends these to the watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// `client` is revoked now: every live connection of it must close.
    Revoked {
        /// Client name.
        client: String,
        /// The operator's or the Hub's reason.
        reason: String,
    },
    /// An operator's command (`ewii-hub token create`, `ewii-hub revoke`) noted this in the
    /// database, for this Hub to audit; once audited, the watcher moves the log's mark past
    /// it ([`Store::operator_log_audited`](super::Store::operator_log_audited)).
    Operator(OperatorEntry),
    /// These serials of `client` are retired now: connections holding them drain.
    Retired {
        /// Client name.
        client: String,
        /// The serials just retired.
        serials: Vec<String>,
    },
    /// A session of some client came up or went down: the silent-client grace moved.
    Seen,
}

/// The clients and serials, or nothing when they could not be read (then every check
/// refuses: fail closed).
#[derive(Debug, Default)]
pub(crate) struct View {
    state: RwLock<Loaded>,
    /// SPIFFE ID → client name of the federated Clients (`[[federation]]`, set at start; not
    /// in the database, so a reload keeps it). Their SVIDs come from the customer's SPIRE, so
    /// the Hub knows no serial of theirs: they stand or fall by the client's revocation.
    federated: RwLock<HashMap<String, String>>,
}

/// The view as last read, and whether the last read failed.
#[derive(Debug, Default)]
struct Loaded {
    /// The last view read (`None` before the first). Kept, and kept up to date with the live
    /// sessions, while reloads fail: the next read is compared with it (a revocation or
    /// retirement committed meanwhile closes what it must), and the sessions that stayed up
    /// are still known to be live (or the silent-client grace would take them for gone).
    state: Option<ViewState>,
    /// The last reload failed: every check refuses until one works.
    failed: bool,
}

impl Loaded {
    /// The view, when it may be believed.
    fn current(&self) -> Option<&ViewState> {
        self.state.as_ref().filter(|_| !self.failed)
    }
}

#[derive(Debug, Default, Clone)]
struct ViewState {
    clients: HashMap<String, ClientView>,
    serials: HashMap<String, SerialView>,
    next_order: i64,
}

#[derive(Debug, Default, Clone)]
struct ClientView {
    spiffe_id: String,
    revoked: Option<String>,
    last_seen: Option<i64>,
    /// Live session ids (not persisted: they are this process's).
    live: HashSet<u64>,
}

#[derive(Debug, Clone)]
struct SerialView {
    client: String,
    order: i64,
    retired: bool,
    used: bool,
}

impl View {
    /// Where `serial` stands for `id`; `None` when the view is unavailable.
    pub(crate) fn status(&self, id: &SpiffeId, serial: &str) -> Option<SerialStatus> {
        let guard = self.state.read().ok()?;
        let state = guard.current()?;
        let federated = self.federated.read().ok()?.get(&id.to_string()).cloned();
        if let Some(name) = federated {
            let Some(client) = state.clients.get(&name) else {
                return Some(SerialStatus::Unknown);
            };
            return Some(if client.spiffe_id != id.to_string() {
                SerialStatus::OtherIdentity(client.spiffe_id.clone())
            } else if client.revoked.is_some() {
                SerialStatus::Revoked
            } else {
                SerialStatus::Current
            });
        }
        let Some(s) = state.serials.get(serial) else {
            return Some(SerialStatus::Unknown);
        };
        let Some(client) = state.clients.get(&s.client) else {
            return Some(SerialStatus::Unknown);
        };
        Some(if client.spiffe_id != id.to_string() {
            SerialStatus::OtherIdentity(client.spiffe_id.clone())
        } else if s.retired {
            // Retirement first: an older key is refused as retired whether or not the
            // identity is revoked too (only a current key is told it is revoked).
            SerialStatus::Retired
        } else if client.revoked.is_some() {
            SerialStatus::Revoked
        } else {
            SerialStatus::Current
        })
    }

    /// The federated Clients: (name, SPIFFE ID). Only the store owner sets them, at start.
    pub(super) fn set_federated<'a>(&self, clients: impl Iterator<Item = (&'a str, String)>) {
        if let Ok(mut f) = self.federated.write() {
            *f = clients.map(|(n, id)| (id, n.to_owned())).collect();
        }
    }

    /// The revocation reason of `client`, when it is revoked.
    pub(crate) fn revocation(&self, client: &str) -> Option<String> {
        let guard = self.state.read().ok()?;
        guard.current()?.clients.get(client)?.revoked.clone()
    }

    /// When (Unix seconds) the next client without a live session passes `grace_secs` of
    /// silence: it is revoked once the clock reads *more* than `last_seen + grace_secs`.
    pub(crate) fn next_silent_deadline(&self, grace_secs: i64) -> Option<i64> {
        let guard = self.state.read().ok()?;
        guard
            .current()?
            .clients
            .values()
            .filter(|c| c.revoked.is_none() && c.live.is_empty())
            .filter_map(|c| c.last_seen)
            .map(|seen| seen.saturating_add(grace_secs).saturating_add(1))
            .min()
    }

    /// Clients without a live session, not revoked, silent since before `cutoff`, with their
    /// SPIFFE IDs.
    pub(crate) fn silent_since(&self, cutoff: i64) -> Vec<(String, String)> {
        let Ok(guard) = self.state.read() else {
            return Vec::new();
        };
        let Some(state) = guard.current() else {
            return Vec::new();
        };
        let mut v: Vec<(String, String)> = state
            .clients
            .iter()
            .filter(|(_, c)| c.revoked.is_none() && c.live.is_empty())
            .filter(|(_, c)| c.last_seen.is_some_and(|seen| seen < cutoff))
            .map(|(name, c)| (name.clone(), c.spiffe_id.clone()))
            .collect();
        v.sort();
        v
    }

    /// Whether `client` is without a live session, not revoked, and silent since before
    /// `cutoff` ([`silent_since`](Self::silent_since), for one client).
    pub(crate) fn is_silent(&self, client: &str, cutoff: i64) -> bool {
        let Ok(guard) = self.state.read() else {
            return false;
        };
        guard
            .current()
            .and_then(|state| state.clients.get(client))
            .is_some_and(|c| {
                c.revoked.is_none()
                    && c.live.is_empty()
                    && c.last_seen.is_some_and(|seen| seen < cutoff)
            })
    }

    /// Whether the view is loaded (false: every check refuses).
    pub(crate) fn available(&self) -> bool {
        self.state.read().is_ok_and(|s| s.current().is_some())
    }

    /// Replaces the whole view from `snapshot` (or marks it unavailable), keeping the live
    /// sessions this process knows of, and returns what changed since the last view read
    /// (also when reads failed in between).
    pub(super) fn replace(&self, snapshot: Option<Snapshot>) -> Vec<Change> {
        let Ok(mut guard) = self.state.write() else {
            return Vec::new();
        };
        let Some(snapshot) = snapshot else {
            guard.failed = true;
            return Vec::new();
        };
        guard.failed = false;
        let old = guard.state.take();
        let mut new = ViewState::default();
        for c in snapshot.clients {
            let live = old
                .as_ref()
                .and_then(|o| o.clients.get(&c.name))
                .map(|o| o.live.clone())
                .unwrap_or_default();
            new.clients.insert(
                c.name,
                ClientView {
                    spiffe_id: c.spiffe_id,
                    revoked: c.revoked,
                    last_seen: c.last_seen,
                    live,
                },
            );
        }
        for s in snapshot.serials {
            new.next_order = new.next_order.max(s.order + 1);
            new.serials.insert(
                s.serial,
                SerialView {
                    client: s.client,
                    order: s.order,
                    retired: s.retired,
                    used: s.used,
                },
            );
        }
        let mut changes = Vec::new();
        if let Some(old) = &old {
            let mut names: Vec<&String> = new.clients.keys().collect();
            names.sort();
            for name in names {
                let c = &new.clients[name];
                let was = old.clients.get(name).and_then(|o| o.revoked.as_ref());
                if let (Some(reason), None) = (&c.revoked, was) {
                    changes.push(Change::Revoked {
                        client: name.clone(),
                        reason: reason.clone(),
                    });
                }
            }
            let mut retired: HashMap<&str, Vec<String>> = HashMap::new();
            for (serial, s) in &new.serials {
                let was_retired = old.serials.get(serial).is_some_and(|o| o.retired);
                if s.retired && !was_retired {
                    retired.entry(&s.client).or_default().push(serial.clone());
                }
            }
            let mut retired: Vec<_> = retired.into_iter().collect();
            retired.sort();
            for (client, serials) in retired {
                changes.push(Change::Retired {
                    client: client.to_owned(),
                    serials,
                });
            }
        }
        guard.state = Some(new);
        changes.push(Change::Seen);
        changes
    }

    /// After an enrolment was recorded: the client (no longer revoked), its earlier serials
    /// retired, its new serial current.
    pub(super) fn apply_enrolment(
        &self,
        client: &str,
        spiffe_id: &str,
        serial: &str,
    ) -> Vec<Change> {
        self.write(|state| {
            let c = state.clients.entry(client.to_owned()).or_default();
            c.spiffe_id = spiffe_id.to_owned();
            c.revoked = None;
            // No grace until its first session (as in the database): a Client the grace
            // revoked would otherwise be silent for longer than it at once.
            c.last_seen = None;
            let retired = retire(state, client, i64::MAX);
            insert_serial(state, client, serial);
            retired_change(client, retired)
        })
    }

    /// After a renewal was recorded.
    pub(super) fn apply_renewal(&self, client: &str, serial: &str) -> Vec<Change> {
        self.write(|state| {
            insert_serial(state, client, serial);
            Vec::new()
        })
    }

    /// After a revocation was recorded (`changed`: it was not revoked before).
    pub(super) fn apply_revocation(&self, client: &str, reason: &str) -> Vec<Change> {
        self.write(|state| match state.clients.get_mut(client) {
            Some(c) if c.revoked.is_none() => {
                c.revoked = Some(reason.to_owned());
                vec![Change::Revoked {
                    client: client.to_owned(),
                    reason: reason.to_owned(),
                }]
            }
            _ => Vec::new(),
        })
    }

    /// After a session came up with `serial`: it is used, the client seen, and every older
    /// serial of the client retired. Returns the changes and how many serials retired.
    pub(super) fn apply_session_up(
        &self,
        client: &str,
        session_id: u64,
        serial: &str,
        since: i64,
    ) -> (Vec<Change>, usize) {
        let mut n = 0;
        let changes = self.write(|state| {
            // A federated Client's serial is not the Hub's: nothing to mark or retire (its CA
            // may even have chosen a serial this Hub issued to another Client).
            let order = state
                .serials
                .get_mut(serial)
                .filter(|s| s.client == client)
                .map(|s| {
                    s.used = true;
                    s.order
                });
            if let Some(c) = state.clients.get_mut(client) {
                c.last_seen = Some(since);
                c.live.insert(session_id);
            }
            let mut changes = match order {
                Some(order) => {
                    let retired = retire(state, client, order);
                    n = retired.len();
                    retired_change(client, retired)
                }
                None => Vec::new(),
            };
            changes.push(Change::Seen);
            changes
        });
        (changes, n)
    }

    /// After a session ended. As in the database ([`crate::hub::state::Db::session_down`]),
    /// a grace cleared since the session began (`readmit`, a new enrolment) stays cleared
    /// until the client's next session.
    pub(super) fn apply_session_down(
        &self,
        client: &str,
        session_id: u64,
        now: i64,
    ) -> Vec<Change> {
        self.write(|state| {
            if let Some(c) = state.clients.get_mut(client) {
                c.live.remove(&session_id);
                if c.last_seen.is_some() {
                    c.last_seen = Some(now);
                }
            }
            vec![Change::Seen]
        })
    }

    /// The `last_seen` this process holds for `client`, also in a view a failed reload left
    /// standing.
    pub(super) fn last_seen(&self, client: &str) -> Option<i64> {
        let guard = self.state.read().ok()?;
        guard.state.as_ref()?.clients.get(client)?.last_seen
    }

    /// Sets `client`'s `last_seen` back to what this process knows and the database lacks (a
    /// session's end whose write failed, after a reload).
    pub(super) fn restore_last_seen(&self, client: &str, seen: i64) {
        self.write(|state| {
            if let Some(c) = state.clients.get_mut(client) {
                c.last_seen = Some(seen);
            }
            Vec::new()
        });
    }

    /// After the Hub's wall clock moved `by` seconds: every silent client's grace moves with
    /// it (not revoked, no live session: [`crate::hub::state::Db::shift_grace`]).
    pub(super) fn apply_grace_shift(&self, by: i64) -> Vec<Change> {
        self.write(|state| {
            let silent = state
                .clients
                .values_mut()
                .filter(|c| c.revoked.is_none() && c.live.is_empty());
            for c in silent {
                if let Some(seen) = c.last_seen.as_mut() {
                    *seen = seen.saturating_add(by);
                }
            }
            vec![Change::Seen]
        })
    }

    /// Whether a serial of `client` issued after `serial` has authenticated a session.
    #[cfg(test)]
    pub(super) fn superseded(&self, client: &str, serial: &str) -> Option<bool> {
        let guard = self.state.read().ok()?;
        let state = guard.current()?;
        let order = state.serials.get(serial)?.order;
        Some(
            state
                .serials
                .values()
                .any(|s| s.client == client && s.used && s.order > order),
        )
    }

    /// Applies a write this process made to the view, also to one a failed reload left
    /// standing (a session that ends meanwhile is not live when reads work again).
    fn write(&self, f: impl FnOnce(&mut ViewState) -> Vec<Change>) -> Vec<Change> {
        match self.state.write() {
            Ok(mut guard) => match guard.state.as_mut() {
                Some(state) => f(state),
                None => Vec::new(),
            },
            Err(_) => Vec::new(),
        }
    }
}

/// The verifier's check: from memory, failing closed when the view is unavailable.
impl SerialCheck for View {
    fn check(&self, id: &SpiffeId, serial: &str) -> Result<(), SerialRefusal> {
        match self.status(id, serial) {
            Some(status) => status.refusal(id, serial),
            None => Err(SerialRefusal::StoreUnavailable(
                "the Hub's serial records are not loaded".into(),
            )),
        }
    }
}

/// Retires the serials of `client` issued before `order`; returns them.
fn retire(state: &mut ViewState, client: &str, order: i64) -> Vec<String> {
    let mut out: Vec<String> = state
        .serials
        .iter_mut()
        .filter(|(_, s)| s.client == client && !s.retired && s.order < order)
        .map(|(serial, s)| {
            s.retired = true;
            serial.clone()
        })
        .collect();
    out.sort();
    out
}

fn insert_serial(state: &mut ViewState, client: &str, serial: &str) {
    let order = state.next_order;
    state.next_order += 1;
    state.serials.insert(
        serial.to_owned(),
        SerialView {
            client: client.to_owned(),
            order,
            retired: false,
            used: false,
        },
    );
}

fn retired_change(client: &str, serials: Vec<String>) -> Vec<Change> {
    if serials.is_empty() {
        Vec::new()
    } else {
        vec![Change::Retired {
            client: client.to_owned(),
            serials,
        }]
    }
}
