//! Who is connected: every live connection of every Client, one of them marked current for
//! routing queries. The registry is what revocation and retirement act on — it closes
//! **every** connection of a revoked client (also one draining after a rotation, or a second
//! one opened with a stolen key) and tells the holders of retired serials to drain.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use ewii_common::audit::{Event, Outcome};
use ewii_common::frame::Control;
use ewii_common::spiffe::SpiffeId;
use tokio::sync::mpsc;

use super::store::{StopRevoke, Store};
use crate::audit::Audit;
use crate::transport::codes;

/// The most sessions one Client identity keeps at once (see [`Registry::register`]).
pub(crate) const MAX_SESSIONS_PER_CLIENT: usize = 4;

/// What the registry tells a session.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Command {
    /// Write this control message to the Client (a bundle update). Shared: every session
    /// gets the same one, and each session's channel allocates room for 32 commands up front,
    /// so a command stays small.
    Push(Arc<Control>),
    /// The session's serial was retired: finish in-flight queries, then close.
    Drain,
    /// The bundle of this trust domain changed: a session of it checks its SVID's chain
    /// against the new anchors, and ends when they no longer vouch for it.
    Recheck(String),
    /// The Client has more than [`MAX_SESSIONS_PER_CLIENT`] sessions and this is the oldest:
    /// close it.
    Superseded,
}

/// Where to send a query for a client.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// Session id.
    pub(crate) id: u64,
    /// The connection.
    pub(crate) conn: quinn::Connection,
    /// The Client's identity.
    pub(crate) spiffe_id: SpiffeId,
    /// The connection's shard, where its queries run.
    pub(crate) shard: usize,
}

/// The live connections.
#[derive(Debug)]
pub(crate) struct Registry {
    clients: Mutex<HashMap<String, Connections>>,
    audit: Audit,
    /// Requesters' queries in progress, from accept to record, on every service.
    queries_open: std::sync::atomic::AtomicUsize,
    /// Each of them's stop signal, fired when the Hub stops.
    stops: Mutex<Stops>,
    /// Sessions that said `Goodbye` (without a revoke) and drain: no longer routed, but a
    /// revocation of their Client still closes them. By session id.
    departing: Mutex<HashMap<u64, (String, Route)>>,
}

/// The stop signals of the requesters' queries in progress.
#[derive(Debug, Default)]
struct Stops {
    next: u64,
    senders: HashMap<u64, tokio::sync::oneshot::Sender<()>>,
    /// The Hub stops: a query that begins now is told at once.
    stopping: bool,
}

#[derive(Debug, Default)]
struct Connections {
    /// In registration order.
    entries: Vec<Entry>,
    /// The session queries go to.
    current: Option<u64>,
}

#[derive(Debug)]
struct Entry {
    route: Route,
    serial: String,
    tell: mpsc::UnboundedSender<Command>,
    draining: bool,
}

impl Connections {
    /// The newest connection that is not draining becomes current.
    fn pick_current(&mut self) {
        self.current = self
            .entries
            .iter()
            .rev()
            .find(|e| !e.draining)
            .map(|e| e.route.id);
    }
}

impl Registry {
    /// An empty registry that audits through `audit`.
    pub(crate) fn new(audit: Audit) -> Self {
        Self {
            clients: Mutex::new(HashMap::new()),
            audit,
            queries_open: std::sync::atomic::AtomicUsize::new(0),
            stops: Mutex::default(),
            departing: Mutex::default(),
        }
    }

    /// A requester's query began: its key, and the signal that resolves when the Hub stops
    /// (a per-query channel: polling it is an atomic load, where a shared one would take a
    /// lock at every wake-up of every query).
    pub(crate) fn query_began(&self) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        self.queries_open
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut stops = self.stops.lock().unwrap_or_else(PoisonError::into_inner);
        let key = stops.next;
        stops.next += 1;
        // Stopping: the sender is dropped here, and the signal resolves at once.
        if !stops.stopping {
            stops.senders.insert(key, tx);
        }
        (key, rx)
    }

    /// The query of `key` ended.
    pub(crate) fn query_ended(&self, key: u64) {
        self.stops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .senders
            .remove(&key);
        self.queries_open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The Hub stops: every query in progress, and every one that begins from now, is told.
    pub(crate) fn stop_queries(&self) {
        let senders = {
            let mut stops = self.stops.lock().unwrap_or_else(PoisonError::into_inner);
            stops.stopping = true;
            std::mem::take(&mut stops.senders)
        };
        // Dropping a sender resolves its signal (and wakes its query: outside the lock).
        drop(senders);
    }

    /// Requesters' queries in progress.
    pub(crate) fn queries_open(&self) -> usize {
        self.queries_open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Adds a session; the newest one is current. A Client holds one session, two while it
    /// moves to a new SVID's connection, and an old one may linger until its idle timeout
    /// after a reconnection: past [`MAX_SESSIONS_PER_CLIENT`], the oldest are closed, so that
    /// one identity (a stolen key, a broken Client) cannot pile up connections, each held by
    /// its keep-alives until its SVID expires.
    pub(crate) fn register(
        &self,
        client: &str,
        route: Route,
        serial: &str,
        tell: mpsc::UnboundedSender<Command>,
    ) {
        let Ok(mut clients) = self.clients.lock() else {
            return;
        };
        let c = clients.entry(client.to_owned()).or_default();
        c.current = Some(route.id);
        c.entries.push(Entry {
            route,
            serial: serial.to_owned(),
            tell,
            draining: false,
        });
        let excess = c.entries.len().saturating_sub(MAX_SESSIONS_PER_CLIENT);
        for old in c.entries.drain(..excess) {
            tracing::warn!(%client, session_id = old.route.id, "more than {MAX_SESSIONS_PER_CLIENT} sessions of one Client: closing its oldest");
            // Told before its channel closes (which alone would read as a revocation).
            let _ = old.tell.send(Command::Superseded);
        }
    }

    /// Session `session_id` of `client` now holds `serial` (a rotation on the live
    /// connection): retiring its older serial no longer concerns it.
    pub(crate) fn rebind(&self, client: &str, session_id: u64, serial: &str) {
        let Ok(mut clients) = self.clients.lock() else {
            return;
        };
        if let Some(e) = clients
            .get_mut(client)
            .and_then(|c| c.entries.iter_mut().find(|e| e.route.id == session_id))
        {
            serial.clone_into(&mut e.serial);
        }
    }

    /// Session `session_id` of `client` said `Goodbye`: no query goes to it any more, but until
    /// it ends ([`Self::remove`]) a revocation of `client` closes it too.
    ///
    /// False when the session was in neither map: superseded ([`Command::Superseded`] waits in
    /// its channel) or closed by a revocation as its `Goodbye` came. It must then end at once:
    /// nothing could reach it while it drained.
    pub(crate) fn depart(&self, client: &str, session_id: u64) -> bool {
        // Under the clients' lock throughout (then the departing one, the order
        // `close_revoked` takes them in): a revocation sees the session in one map or the other.
        let Ok(mut clients) = self.clients.lock() else {
            // Poisoned: the maps cannot be read, and the session drains as it would have.
            return true;
        };
        let Some(c) = clients.get_mut(client) else {
            return false;
        };
        let Some(at) = c.entries.iter().position(|e| e.route.id == session_id) else {
            return false;
        };
        let entry = c.entries.remove(at);
        if c.entries.is_empty() {
            clients.remove(client);
        } else if c.current == Some(session_id) {
            c.pick_current();
        }
        if let Ok(mut departing) = self.departing.lock() {
            departing.insert(session_id, (client.to_owned(), entry.route));
        }
        true
    }

    /// Removes a session (when it ends). False when it was gone already.
    pub(crate) fn remove(&self, client: &str, session_id: u64) -> bool {
        if let Ok(mut departing) = self.departing.lock() {
            departing.remove(&session_id);
        }
        let Ok(mut clients) = self.clients.lock() else {
            return false;
        };
        let Some(c) = clients.get_mut(client) else {
            return false;
        };
        let before = c.entries.len();
        c.entries.retain(|e| e.route.id != session_id);
        let removed = c.entries.len() != before;
        if c.entries.is_empty() {
            clients.remove(client);
        } else if c.current == Some(session_id) {
            c.pick_current();
        }
        removed
    }

    /// The current session of `client`, if it has one.
    pub(crate) fn route(&self, client: &str) -> Option<Route> {
        self.current(client, Route::clone)
    }

    /// What `f` reads from `client`'s current route.
    fn current<T>(&self, client: &str, f: impl FnOnce(&Route) -> T) -> Option<T> {
        let clients = self.clients.lock().ok()?;
        let c = clients.get(client)?;
        let id = c.current?;
        c.entries
            .iter()
            .find(|e| e.route.id == id)
            .map(|e| f(&e.route))
    }

    /// The shard of `client`'s current connection.
    pub(crate) fn shard(&self, client: &str) -> Option<usize> {
        self.current(client, |r| r.shard)
    }

    /// Live connections on each of `shards` shards.
    pub(crate) fn per_shard(&self, shards: usize) -> Vec<usize> {
        let mut counts = vec![0; shards];
        if let Ok(clients) = self.clients.lock() {
            for e in clients.values().flat_map(|c| &c.entries) {
                if let Some(n) = counts.get_mut(e.route.shard) {
                    *n += 1;
                }
            }
        }
        counts
    }

    /// Names of the Clients with at least one live connection, sorted.
    pub(crate) fn connected_clients(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .clients
            .lock()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Number of live connections.
    pub(crate) fn connections(&self) -> usize {
        self.clients
            .lock()
            .map(|c| c.values().map(|x| x.entries.len()).sum())
            .unwrap_or_default()
    }

    /// `client` is revoked: closes every one of its connections with `REVOKED` and the
    /// reason, and audits each. Returns how many it closed.
    pub(crate) fn close_revoked(&self, client: &str, reason: &str) -> usize {
        // Kept until every connection is closed: a session whose channel closes first would
        // end on its own and close with another code.
        // The clients' lock, then the departing one (as `depart` takes them), held until both
        // are read: a session moving from one to the other is in one of them.
        let Ok(mut clients) = self.clients.lock() else {
            return 0;
        };
        let entries: Vec<Entry> = clients
            .remove(client)
            .map(|c| c.entries)
            .unwrap_or_default();
        let mut taken: Vec<Route> = entries.iter().map(|e| e.route.clone()).collect();
        if let Ok(mut departing) = self.departing.lock() {
            let ids: Vec<u64> = departing
                .iter()
                .filter(|(_, (name, _))| name == client)
                .map(|(id, _)| *id)
                .collect();
            taken.extend(
                ids.iter()
                    .filter_map(|id| departing.remove(id))
                    .map(|(_, r)| r),
            );
        }
        drop(clients);
        for route in &taken {
            route.conn.close(codes::REVOKED, reason.as_bytes());
            let mut r = self.audit.record(Event::Revoked);
            r.session_id = Some(route.id);
            r.client = Some(route.spiffe_id.to_string());
            r.outcome = Some(Outcome::Ok);
            r.reason = Some(format!("live session closed: {reason}"));
            self.audit.emit(r);
        }
        taken.len()
    }

    /// `serials` of `client` are retired: their sessions stop taking queries and are told to
    /// drain. Returns how many were told.
    pub(crate) fn retire(&self, client: &str, serials: &[String]) -> usize {
        let Ok(mut clients) = self.clients.lock() else {
            return 0;
        };
        let Some(c) = clients.get_mut(client) else {
            return 0;
        };
        let mut told = 0;
        for e in c
            .entries
            .iter_mut()
            .filter(|e| !e.draining && serials.contains(&e.serial))
        {
            e.draining = true;
            let _ = e.tell.send(Command::Drain);
            told += 1;
        }
        if told > 0 {
            c.pick_current();
        }
        told
    }

    /// Sends `msg` to every live session; returns how many.
    pub(crate) fn push_all(&self, msg: &Control) -> usize {
        self.tell(|_| true, &Command::Push(Arc::new(msg.clone())))
    }

    /// Tells every live session of `trust_domain` to re-check its chain
    /// ([`Command::Recheck`]); returns how many.
    pub(crate) fn recheck(&self, trust_domain: &str) -> usize {
        self.tell(
            |e| e.route.spiffe_id.trust_domain() == trust_domain,
            &Command::Recheck(trust_domain.to_owned()),
        )
    }

    fn tell(&self, to: impl Fn(&Entry) -> bool, command: &Command) -> usize {
        let Ok(clients) = self.clients.lock() else {
            return 0;
        };
        clients
            .values()
            .flat_map(|c| c.entries.iter())
            .filter(|e| to(e) && e.tell.send(command.clone()).is_ok())
            .count()
    }
}

/// A `Goodbye{revoke}`: the session that received it.
pub(crate) struct AtStop<'a> {
    pub(crate) client: &'a str,
    pub(crate) id: &'a SpiffeId,
    /// The serial its connection was made with.
    pub(crate) serial: &'a str,
    pub(crate) session_id: u64,
    pub(crate) reason: &'a str,
    /// Whether the customer's webhook is told (`[webhooks] notify_on_stop`).
    pub(crate) notify: bool,
}

/// What became of a stop's revoke ([`revoke_at_stop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AtStopOutcome {
    /// Recorded (made now or before), and audited.
    Recorded,
    /// Not recorded (the store failed), and audited as such.
    NotRecorded,
    /// A newer serial replaced the stopping connection's: nothing done or audited.
    Replaced,
    /// The records cannot tell whether it was replaced: nothing done or audited.
    CannotTell,
}

/// Revokes a client at its stop unless a newer serial replaced the stopping connection's
/// meanwhile ([`Store::revoke_at_stop`]), and audits it (a failure too).
pub(crate) async fn revoke_at_stop(
    store: &Store,
    audit: &Audit,
    stop: AtStop<'_>,
) -> AtStopOutcome {
    let now = crate::now_timestamp().unix_secs() as i64;
    let made = match store
        .revoke_at_stop(
            stop.client,
            stop.id,
            stop.serial,
            stop.reason,
            now,
            stop.notify,
        )
        .await
    {
        Ok(StopRevoke::Replaced) => return AtStopOutcome::Replaced,
        Ok(StopRevoke::CannotTell) => return AtStopOutcome::CannotTell,
        Ok(StopRevoke::Revoked(made)) => Ok(made),
        Err(e) => Err(e),
    };
    let id = stop.id.to_string();
    let recorded = audit_revocation(
        audit,
        stop.client,
        &id,
        Some(stop.session_id),
        stop.reason,
        made,
    );
    if recorded {
        AtStopOutcome::Recorded
    } else {
        AtStopOutcome::NotRecorded
    }
}

/// A client past the silent-client grace, to revoke if it is still silent.
pub(crate) struct Silent<'a> {
    pub(crate) client: &'a str,
    /// Its SPIFFE ID, for the record.
    pub(crate) id: &'a str,
    /// The revocation's reason (the Client's and the webhook's).
    pub(crate) reason: &'a str,
    /// Said after the reason in the audit record only.
    pub(crate) note: Option<&'a str>,
    pub(crate) grace_secs: i64,
}

/// Revokes a client for the silent-client grace, if it is still silent when the store comes
/// to it, and audits it (a failure too): whether it is recorded (or was not due).
pub(crate) async fn revoke_if_silent(store: &Store, audit: &Audit, silent: Silent<'_>) -> bool {
    let made = store
        .revoke_if_silent(silent.client, silent.reason, silent.grace_secs)
        .await;
    let said = match silent.note {
        Some(note) => format!("{}; {note}", silent.reason),
        None => silent.reason.to_owned(),
    };
    audit_revocation(audit, silent.client, silent.id, None, &said, made)
}

/// The audit record of a revocation the store made (`Ok(true)`), or could not (`Err`): whether
/// it is recorded (made now or before).
fn audit_revocation(
    audit: &Audit,
    client: &str,
    id: &str,
    session_id: Option<u64>,
    reason: &str,
    made: Result<bool, super::store::StoreError>,
) -> bool {
    match made {
        Ok(true) => {
            let mut r = audit.record(Event::Revoked);
            r.client = Some(id.to_owned());
            r.session_id = session_id;
            r.outcome = Some(Outcome::Ok);
            r.reason = Some(reason.to_owned());
            audit.emit(r);
            true
        }
        Ok(false) => true,
        Err(e) => {
            tracing::error!(error = %e, %client, "could not record revocation");
            let mut r = audit.record(Event::Revoked);
            r.client = Some(id.to_owned());
            r.session_id = session_id;
            r.outcome = Some(Outcome::Failed);
            r.reason = Some(format!("{reason}: not recorded: {e}"));
            audit.emit(r);
            false
        }
    }
}
