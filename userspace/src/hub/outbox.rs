//! Delivers the webhook outbox: signed POSTs with retries and backoff, no redirects, only to
//! public addresses (unless `danger_allow_private_targets`). A row is marked delivered only
//! on a 2xx, in the database, so a Hub restart neither loses nor repeats an acknowledged one;
//! the receiver deduplicates the rare retry of an unrecorded success by `webhook-id`.

use std::sync::Arc;
use std::time::Duration;

use ewii_common::audit::{Event, Outcome};

use super::state::PendingWebhook;
use super::Inner;
use crate::webhook::check_target;

const TICK: Duration = Duration::from_millis(200);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn deliver(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now_ms = (crate::now_timestamp().0 / 1000) as i64;
        let due = match inner.db.due_webhooks(now_ms, inner.webhooks.max_attempts) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the webhook outbox");
                continue;
            }
        };
        for w in due {
            let result = send(&inner, &w).await;
            let now = crate::now_timestamp();
            let mut r = inner.audit.record(Event::WebhookDelivered);
            r.reason = Some(format!("{} to {}", w.id, w.url));
            match result {
                Ok(status) => {
                    if let Err(e) = inner.db.webhook_delivered(&w.id, now.unix_secs() as i64) {
                        tracing::error!(error = %e, "cannot record a webhook delivery");
                    }
                    r.outcome = Some(Outcome::Ok);
                    r.reason = Some(format!("{} to {}: HTTP {status}", w.id, w.url));
                }
                Err(e) => {
                    let delay = backoff(&inner, w.attempts);
                    let next = (now.0 / 1000) as i64 + delay.as_millis() as i64;
                    if let Err(e) = inner.db.webhook_failed(&w.id, &e, next) {
                        tracing::error!(error = %e, "cannot record a webhook failure");
                    }
                    r.event = Event::WebhookFailed;
                    r.outcome = Some(Outcome::Failed);
                    r.reason = Some(format!(
                        "{} to {} (attempt {} of {}): {e}",
                        w.id,
                        w.url,
                        w.attempts + 1,
                        inner.webhooks.max_attempts
                    ));
                }
            }
            inner.audit.emit(r);
        }
    }
}

fn backoff(inner: &Inner, attempts: u32) -> Duration {
    let factor = 1u32.checked_shl(attempts.min(20)).unwrap_or(u32::MAX);
    inner
        .webhooks
        .retry_initial
        .saturating_mul(factor)
        .min(inner.webhooks.retry_max)
}

async fn send(inner: &Inner, w: &PendingWebhook) -> Result<u16, String> {
    let (host, addr) = check_target(&w.url, inner.webhooks.danger_allow_private_targets)
        .await
        .map_err(|e| e.to_string())?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        // A proxy from the environment would reach targets the address check refused.
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .resolve(&host, addr)
        .build()
        .map_err(|e| e.to_string())?;
    let ts = crate::now_timestamp().unix_secs() as i64;
    let signature = inner.webhook_key.sign(&w.id, ts, w.body.as_bytes());
    let resp = client
        .post(&w.url)
        .header("content-type", "application/json")
        .header("webhook-id", &w.id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(w.body.clone())
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    if status.is_success() {
        Ok(status.as_u16())
    } else {
        Err(format!("HTTP {status}"))
    }
}
