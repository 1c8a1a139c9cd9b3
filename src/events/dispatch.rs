//! The loop that delivers recorded events to webhooks: the server's (`--webhook`) and a job's own
//! (`spec.webhook_url`, within `--allow-webhook`). Every serve process runs it; the queue hands a pending
//! event to one of them at a time (a claim that lapses if that process dies) and keeps, per event, the
//! webhooks it reached, so a retry goes only to those it missed. A webhook that keeps failing is retried
//! with doubling delays for about a day, then given up on (logged and counted).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::webhook::Sender;
use crate::queue::{PendingEvent, Queue};

/// Events taken from the queue at once.
const BATCH: usize = 64;
/// How long a taken event is this process's before another may take it.
pub const CLAIM: Duration = Duration::from_secs(60);
/// Deliveries in flight at once.
const CONCURRENCY: usize = 16;
/// How often an idle loop looks for events.
const POLL: Duration = Duration::from_millis(250);
/// The first retry's delay; it doubles per attempt up to [`MAX_DELAY`].
const FIRST_DELAY: Duration = Duration::from_secs(2);
const MAX_DELAY: Duration = Duration::from_secs(600);
/// Attempts before an event is given up on: with the delays above, about a day.
pub const MAX_ATTEMPTS: u32 = 150;

/// Where events go, and how they are sent.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    /// The server's webhooks, which get every event.
    pub webhooks: Vec<String>,
    pub sender: Sender,
}

impl Dispatcher {
    /// Delivers events for as long as the process runs.
    pub async fn run(self, queue: Arc<dyn Queue>) {
        loop {
            let pending = match queue.pending_events(BATCH, CLAIM).await {
                Ok(pending) => pending,
                Err(e) => {
                    tracing::warn!(error = %e, "reading events to deliver");
                    Vec::new()
                }
            };
            if pending.is_empty() {
                tokio::time::sleep(POLL).await;
                continue;
            }
            futures_util::stream::iter(pending)
                .for_each_concurrent(CONCURRENCY, |event| self.deliver(queue.as_ref(), event))
                .await;
        }
    }

    /// Sends one event to every webhook it has not reached yet, and tells the queue how it went.
    async fn deliver(&self, queue: &dyn Queue, pending: PendingEvent) {
        let mut reached = pending.reached.clone();
        let targets: BTreeSet<&str> =
            self.webhooks.iter().map(String::as_str).chain(pending.event.webhook.as_deref()).collect();
        let mut failure = None;
        for url in targets.into_iter().filter(|url| !pending.reached.contains(*url)) {
            match self.sender.post(url, &pending.event).await {
                Ok(()) => {
                    metrics::counter!("ddpm_webhook_deliveries_total", "outcome" => "delivered").increment(1);
                    reached.insert(url.to_string());
                }
                Err(e) => {
                    metrics::counter!("ddpm_webhook_deliveries_total", "outcome" => "failed").increment(1);
                    failure = Some(e);
                }
            }
        }
        let attempts = pending.attempts + 1;
        let retry_in = match failure {
            None => None,
            Some(error) if attempts >= MAX_ATTEMPTS => {
                metrics::counter!("ddpm_webhook_events_dropped_total").increment(1);
                tracing::error!(
                    event = pending.event.id,
                    attempts,
                    error,
                    "webhook failed every attempt; event given up"
                );
                None
            }
            Some(error) => {
                let delay = backoff(attempts);
                tracing::warn!(event = pending.event.id, attempts, error, retry_in = ?delay, "webhook delivery failed");
                Some(delay)
            }
        };
        if let Err(e) = queue.event_delivered(&pending, &reached, retry_in).await {
            // The claim lapses and the event comes back: delivered again, which receivers tell by its id.
            tracing::warn!(event = pending.event.id, error = %e, "recording a delivery");
        }
    }
}

/// The delay before attempt `attempts + 1`: doubling from [`FIRST_DELAY`] up to [`MAX_DELAY`], with up
/// to a quarter more at random so that retries of many events spread out.
pub fn backoff(attempts: u32) -> Duration {
    let base = FIRST_DELAY.saturating_mul(1 << attempts.saturating_sub(1).min(16)).min(MAX_DELAY);
    base + base.mul_f64(fastrand::f64() / 4.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_ten_minutes_and_give_up_after_about_a_day() {
        assert!((Duration::from_secs(2)..=Duration::from_millis(2500)).contains(&backoff(1)));
        assert!((Duration::from_secs(4)..=Duration::from_secs(5)).contains(&backoff(2)));
        assert!((MAX_DELAY..=MAX_DELAY.mul_f64(1.25)).contains(&backoff(40)));
        let total: Duration =
            (1..MAX_ATTEMPTS).map(|a| FIRST_DELAY.saturating_mul(1 << (a - 1).min(16)).min(MAX_DELAY)).sum();
        assert!(
            (Duration::from_secs(20 * 3600)..Duration::from_secs(30 * 3600)).contains(&total),
            "{total:?}"
        );
    }
}
