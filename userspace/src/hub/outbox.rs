//! Delivers the webhook outbox: signed POSTs with retries and full-jitter backoff, no
//! redirects, only to public addresses (unless `danger_allow_private_targets`). A row is
//! marked delivered only on a 2xx, in the database, so a Hub restart neither loses nor repeats
//! an acknowledged one; the receiver deduplicates the rare retry of an unrecorded success by
//! `webhook-id`. A target this Hub's config refuses by its address (written in the URL) is
//! parked instead of retried: a retry cannot change the refusal, and the next start, which may
//! run with another config, tries it again.
//!
//! Each attempt is a task of its own, [`IN_FLIGHT`] at most at once, so that one customer's
//! slow or silent endpoint holds up only its own deliveries. The task sleeps until a row is
//! queued (the store wakes it), an attempt ends, or the next retry it learned from the store
//! is due: an empty outbox costs no query. A retry's time is wall-clock time (it outlives a
//! restart). A step back of the clock that the running Hub sees moves every retry with it
//! (the store owner), and has this task look again, as a suspend or a step ahead does (some
//! retries are due then); one further ahead than the longest retry delay was set by a clock
//! that moved back while no Hub ran, and is due at once: such a step delays a delivery by at
//! most `retry_max_ms`, not by the step.
//!
//! At a shutdown the task is told to stop, not aborted: the attempts in flight get
//! [`WIND_DOWN`] to be answered, and an answered one is recorded and audited before the task
//! returns, so that a restart neither loses the record of an attempt nor sends an acknowledged
//! webhook again. An attempt not answered by then is abandoned unrecorded, and sent again
//! (same `webhook-id`) after the restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{Event, Outcome};
use ewii_common::backoff::Backoff;
use tokio::sync::{watch, Notify};
use tokio::task::{self, JoinSet};
use tokio::time::Instant;

use super::state::outbox::DUE_PER_URL;
use super::state::{DueBy, PendingWebhook};
use super::store::Store;
use crate::audit::Audit;
use crate::config::WebhookConfig;
use crate::webhook::{check_target, WebhookError, WebhookKey};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the target's name may take to resolve: the system resolver has no bound of its
/// own that the Hub chose.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many attempts at once, and [`DUE_PER_URL`] to one URL, taken in turns by URL:
/// one customer's slow endpoint (an attempt may take [`RESOLVE_TIMEOUT`] and
/// [`REQUEST_TIMEOUT`]), or its many notices, do not hold up another customer's.
pub(crate) const IN_FLIGHT: usize = 16;
/// Pause after the store failed, before asking it again (an attempt's outcome: doubled at
/// each failure in a row, up to [`STORE_RETRY_MAX`]).
const STORE_RETRY: Duration = Duration::from_secs(1);
/// The longest pause between two tries to store an attempt's outcome.
const STORE_RETRY_MAX: Duration = Duration::from_secs(30);
/// After a stop, how long an attempt in flight may wait for its answer.
pub(crate) const WIND_DOWN: Duration = Duration::from_secs(2);

/// What the delivery task needs.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) store: Store,
    pub(crate) audit: Audit,
    pub(crate) config: WebhookConfig,
    pub(crate) key: WebhookKey,
}

/// The attempts in flight, each a task of its own, the rows they hold, and how many go to
/// each URL.
#[derive(Default)]
struct Flying {
    tasks: JoinSet<()>,
    rows: HashMap<task::Id, (String, String)>,
    per_url: HashMap<String, usize>,
}

impl Flying {
    fn ids(&self) -> Vec<String> {
        self.rows.values().map(|(id, _)| id.clone()).collect()
    }

    fn full(&self) -> bool {
        self.rows.len() >= IN_FLIGHT
    }

    /// Whether another attempt to `url` may start: at most [`DUE_PER_URL`] at once, so that
    /// one customer's notices never take every place.
    fn room_for(&self, url: &str) -> bool {
        !self.full() && self.per_url.get(url).copied().unwrap_or(0) < DUE_PER_URL
    }

    fn start(&mut self, parts: &Arc<Parts>, w: PendingWebhook, stop: &watch::Receiver<bool>) {
        let row = (w.id.clone(), w.url.clone());
        *self.per_url.entry(w.url.clone()).or_default() += 1;
        let handle = self.tasks.spawn(attempt(parts.clone(), w, stop.clone()));
        self.rows.insert(handle.id(), row);
    }

    /// One attempt ended: its row is the store's again.
    fn ended(&mut self, done: Result<(task::Id, ()), task::JoinError>) {
        let id = match done {
            Ok((id, ())) => id,
            Err(e) => e.id(),
        };
        if let Some((_, url)) = self.rows.remove(&id) {
            if let Some(n) = self.per_url.get_mut(&url) {
                *n -= 1;
                if *n == 0 {
                    self.per_url.remove(&url);
                }
            }
        }
    }
}

/// Runs until `stop` turns true or its sender is gone (or the task is aborted); then lets the
/// attempts in flight finish (each has [`WIND_DOWN`] from the stop to be answered).
pub(crate) async fn deliver(parts: Parts, mut stop: watch::Receiver<bool>) {
    let parts = Arc::new(parts);
    let queued: Arc<Notify> = parts.store.outbox_queued();
    let mut flying = Flying::default();
    loop {
        // Rows due by now that cannot start (their URL's or the task's places are taken)
        // start when an attempt ends; the timer is for the next row due after now.
        let due = due_by(&parts);
        let next = match start_due(&parts, &stop, &mut flying, due).await {
            Ok(()) => {
                parts
                    .store
                    .next_webhook_due(parts.config.max_attempts, due)
                    .await
            }
            Err(e) => Err(e),
        };
        let wake_at = match next {
            Ok(Some(due_ms)) => {
                let now_ms = (crate::now_timestamp().0 / 1000) as i64;
                let wait = Duration::from_millis(due_ms.saturating_sub(now_ms).max(0) as u64);
                Some(Instant::now() + wait)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the webhook outbox");
                Some(Instant::now() + STORE_RETRY)
            }
        };
        let due = async {
            match wake_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = queued.notified() => {}
            () = due => {}
            Some(done) = flying.tasks.join_next_with_id() => flying.ended(done),
            _ = stop.wait_for(|stop| *stop) => break,
        }
        if stopping(&stop) {
            break;
        }
    }
    while let Some(done) = flying.tasks.join_next_with_id().await {
        flying.ended(done);
    }
}

/// Whether the Hub has told the outbox to stop, or is gone.
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Resolves [`WIND_DOWN`] after the stop (at once when the Hub is gone).
async fn wound_down(mut stop: watch::Receiver<bool>) {
    if stop.wait_for(|stop| *stop).await.is_ok() {
        tokio::time::sleep(WIND_DOWN).await;
    }
}

/// Which rows are due now: a row's next attempt is never set further ahead than the longest
/// retry delay, so one further ahead was set by a clock that has moved back since ([`DueBy`]).
fn due_by(parts: &Parts) -> DueBy {
    let now_ms = (crate::now_timestamp().0 / 1000) as i64;
    DueBy {
        now_ms,
        latest_ms: now_ms
            .saturating_add(i64::try_from(parts.config.retry_max.as_millis()).unwrap_or(i64::MAX)),
    }
}

/// Starts an attempt for each row due and not in flight, up to [`IN_FLIGHT`] at once and
/// [`DUE_PER_URL`] to one URL.
async fn start_due(
    parts: &Arc<Parts>,
    stop: &watch::Receiver<bool>,
    flying: &mut Flying,
    due: DueBy,
) -> Result<(), super::store::StoreError> {
    if flying.full() || stopping(stop) {
        return Ok(());
    }
    let due = parts
        .store
        .due_webhooks(due, parts.config.max_attempts, flying.ids())
        .await?;
    for w in due {
        if flying.room_for(&w.url) {
            flying.start(parts, w, stop);
        }
    }
    Ok(())
}

/// One delivery attempt, recorded in the audit and the store. Unanswered at the end of the
/// wind-down: left as it is, sent again after a restart.
///
/// An outcome the store refuses (a full disk) is stored again after a pause, for as long as
/// it takes, while the attempt stays in flight: the row, still due in the database, is not
/// sent again meanwhile. Sent again, a delivered notice would reach the customer once per
/// second of the outage, and a failed one would be retried without its backoff or its
/// `max_attempts`. A stop ends the tries (the row is then sent again by the next start).
async fn attempt(parts: Arc<Parts>, w: PendingWebhook, mut stop: watch::Receiver<bool>) {
    let result = tokio::select! {
        result = send(&parts, &w) => result,
        () = wound_down(stop.clone()) => return,
    };
    let now = crate::now_timestamp();
    let mut r = parts.audit.record(Event::WebhookDelivered);
    let outcome = match result {
        Ok(status) => {
            r.outcome = Some(Outcome::Ok);
            r.reason = Some(format!(
                "{} to {}: HTTP {status}",
                w.id,
                crate::webhook::redacted(&w.url)
            ));
            Stored::Delivered(now.unix_secs() as i64)
        }
        Err(failure) => {
            let attempt = w.attempts + 1;
            let last = attempt >= parts.config.max_attempts;
            r.event = Event::WebhookFailed;
            r.outcome = Some(Outcome::Failed);
            let then = if last {
                "; the last attempt: the delivery is kept in the outbox and not sent again"
            } else if matches!(failure, Failure::Parked(_)) {
                PARKED_SAYS
            } else {
                ""
            };
            let e = match &failure {
                Failure::Again(e) | Failure::Parked(e) => e,
            };
            r.reason = Some(format!(
                "{} to {} (attempt {attempt} of {}): {e}{then}",
                w.id,
                crate::webhook::redacted(&w.url),
                parts.config.max_attempts,
            ));
            if last {
                tracing::error!(id = %w.id, url = %crate::webhook::redacted(&w.url), "a webhook was not delivered after its last attempt; the customer was not told of this revocation by webhook");
            } else if matches!(failure, Failure::Parked(_)) {
                tracing::error!(id = %w.id, url = %crate::webhook::redacted(&w.url), error = %e, "this Hub refuses a webhook's target; the delivery waits in the outbox for the next Hub start (the customer is not told of this revocation by webhook until then)");
            }
            match failure {
                Failure::Again(e) => Stored::Failed {
                    error: e,
                    delay: Backoff::new(parts.config.retry_initial, parts.config.retry_max)
                        .delay_for(w.attempts, rand::random()),
                },
                Failure::Parked(e) => Stored::Parked(e),
            }
        }
    };
    parts.audit.emit(r);
    let mut pause = STORE_RETRY;
    let mut said = false;
    loop {
        let stored = match &outcome {
            Stored::Delivered(at) => parts.store.webhook_delivered(&w.id, *at).await,
            Stored::Failed { error, delay } => parts
                .store
                .webhook_failed(&w.id, error, *delay)
                .await
                .map(|_| ()),
            Stored::Parked(error) => parts.store.webhook_parked(&w.id, error).await,
        };
        let Err(e) = stored else {
            if said {
                tracing::info!(id = %w.id, "a webhook attempt's outcome is recorded at last");
            }
            return;
        };
        if !said {
            tracing::error!(id = %w.id, error = %e, "cannot record a webhook attempt's outcome; it is not sent again, and the outcome is stored once the database takes it");
            said = true;
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        pause = (pause * 2).min(STORE_RETRY_MAX);
    }
}

/// An attempt's outcome, as the store records it.
enum Stored {
    /// Delivered at this time (Unix seconds).
    Delivered(i64),
    /// Failed; tried again after `delay`.
    Failed { error: String, delay: Duration },
    /// Refused by this Hub's config until it restarts.
    Parked(String),
}

/// Why an attempt failed, and whether a retry could change it.
#[derive(Debug)]
enum Failure {
    /// Tried again after the backoff (an HTTP error, a timeout, a name that did not resolve).
    Again(String),
    /// Refused by this Hub for a reason a retry cannot change while it runs: an address
    /// written in the URL that its config refuses (or a URL that is not one). Not tried again
    /// before the next Hub start, which may run with another config.
    Parked(String),
}

/// What the record of a parked attempt adds.
const PARKED_SAYS: &str =
    "; not tried again before the Hub restarts: no retry can change this Hub's refusal";

async fn send(parts: &Parts, w: &PendingWebhook) -> Result<u16, Failure> {
    let resolved = tokio::time::timeout(
        RESOLVE_TIMEOUT,
        check_target(&w.url, parts.config.danger_allow_private_targets),
    )
    .await
    .map_err(|_| {
        Failure::Again(format!(
            "the name did not resolve in {} s",
            RESOLVE_TIMEOUT.as_secs()
        ))
    })?;
    let (host, addr) = resolved.map_err(|e| match e {
        // A name may resolve elsewhere later; an address in the URL will not.
        WebhookError::PrivateTarget(_) | WebhookError::OwnAddress(_)
            if names_an_address(&w.url) =>
        {
            Failure::Parked(e.to_string())
        }
        WebhookError::BadUrl(_) => Failure::Parked(e.to_string()),
        e => Failure::Again(e.to_string()),
    })?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // A proxy from the environment would reach targets the address check refused.
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .resolve(&host, addr)
        .build()
        .map_err(|e| Failure::Again(e.to_string()))?;
    let ts = crate::now_timestamp().unix_secs() as i64;
    let signature = parts.key.sign(&w.id, ts, w.body.as_bytes());
    let resp = client
        .post(&w.url)
        .header("content-type", "application/json")
        .header("webhook-id", &w.id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(w.body.clone())
        .send()
        .await
        // (Without the URL: the record names it, redacted.)
        .map_err(|e| Failure::Again(format!("request failed: {}", e.without_url())))?;
    let status = resp.status();
    if status.is_success() {
        Ok(status.as_u16())
    } else {
        Err(Failure::Again(format!("HTTP {status}")))
    }
}

/// Whether the URL's host is an IP address rather than a name.
fn names_an_address(url: &str) -> bool {
    reqwest::Url::parse(url)
        .is_ok_and(|u| matches!(u.host(), Some(url::Host::Ipv4(_) | url::Host::Ipv6(_))))
}
