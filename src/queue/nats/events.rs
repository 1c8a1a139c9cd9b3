//! Job events on NATS. The namespace's events stream (`DDPM_<ns>_EVENTS`, subjects
//! `ddpm.<ns>.events.job.<kind>`, kept for [`EVENT_MAX_AGE`]) holds every event as a CloudEvent:
//! subscribers read them there, and the webhook dispatch takes them through the durable consumer
//! `webhooks`, noting in the `ddpm_<ns>_hooks` bucket which webhooks each event reached.
//!
//! A job record says how many events it has had and which was announced last. After a state change its
//! changer publishes the event (id `<job>.<n>`, also the message's dedup id) and then records it as
//! announced; the reconciler announces what a crash in between left unannounced. An intermediate state
//! can be skipped that way (a job that ran and ended while its changer was down is announced once, as
//! ended), the current state never is.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures_util::StreamExt;

use super::delivery::Signal;
use super::records::{StoredJob, decode, encode};
use super::{MAX_CAS_TRIES, NatsQueue, nats_err};
use crate::events::{EventKind, JobEvent};
use crate::queue::{PendingEvent, QueueError, now_ms};

/// How long the events stream keeps an event.
pub(super) const EVENT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The header naming a message's job.
const HEADER_JOB: &str = "Ddpm-Job";
/// The header carrying the job's own webhook, when it named one.
const HEADER_WEBHOOK: &str = "Ddpm-Webhook";
/// The durable consumer the webhook dispatch pulls from.
const WEBHOOKS_CONSUMER: &str = "webhooks";

impl StoredJob {
    /// The event its current state calls for.
    pub(super) fn current_event(&self) -> EventKind {
        if self.deleted_at.is_some() { EventKind::Deleted } else { EventKind::entering(self.state) }
    }
}

impl NatsQueue {
    /// Publishes the event of job `job_id`'s current state unless it was announced already, then records
    /// it as announced (see the module docs).
    pub(super) async fn announce(&self, job_id: &str) -> Result<(), QueueError> {
        for _ in 0..MAX_CAS_TRIES {
            let Some((job, revision)) = self.read::<StoredJob>(&self.jobs, job_id).await? else {
                return Ok(());
            };
            let kind = job.current_event();
            if job.announced == Some(kind) {
                return Ok(());
            }
            let number = job.events + 1;
            self.publish_event(&JobEvent::new(&job.record(), kind, number, &self.namespace, now_ms()))
                .await?;
            let mut announced = job;
            announced.events = number;
            announced.announced = Some(kind);
            match self.jobs.update(job_id, encode(&announced)?, revision).await {
                Ok(_) => return Ok(()),
                // Changed meanwhile: look again (a republish of the same id is dropped as a duplicate).
                Err(e) if super::kv::lost_race(&e) => {}
                Err(e) => return Err(nats_err(&format!("recording job {job_id}'s event"), e)),
            }
        }
        Err(QueueError::Unavailable(format!("announcing job {job_id}: too much contention")))
    }

    /// [`Self::announce`] after a change that already happened: a failure is logged, and the
    /// reconciler announces it later.
    pub(super) async fn announce_quietly(&self, job_id: &str) {
        if let Err(e) = self.announce(job_id).await {
            tracing::warn!(job_id, error = %e, "publishing a job event; the reconciler will");
        }
    }

    async fn publish_event(&self, event: &JobEvent) -> Result<(), QueueError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
        headers.insert(HEADER_JOB, event.job_id.as_str());
        if let Some(webhook) = &event.webhook {
            headers.insert(HEADER_WEBHOOK, webhook.as_str());
        }
        let subject = format!("{}.{}", self.events_prefix, event.kind.as_str());
        let context = format!("publishing event {}", event.id);
        let ack = self
            .js
            .publish_with_headers(subject, headers, event.body.clone().into())
            .await
            .map_err(|e| nats_err(&context, e))?;
        ack.await.map_err(|e| nats_err(&context, e))?;
        Ok(())
    }

    async fn webhooks_consumer(&self, claim: Duration) -> Result<consumer::PullConsumer, QueueError> {
        let consumer = self
            .webhooks
            .get_or_try_init(|| async {
                self.events
                    .get_or_create_consumer(
                        WEBHOOKS_CONSUMER,
                        consumer::pull::Config {
                            durable_name: Some(WEBHOOKS_CONSUMER.to_string()),
                            ack_policy: consumer::AckPolicy::Explicit,
                            ack_wait: claim,
                            max_deliver: -1,
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| nats_err("creating the webhooks consumer", e))
            })
            .await?;
        Ok(consumer.clone())
    }

    /// Events waiting for the webhooks: up to `limit` deliveries pulled from the `webhooks` consumer,
    /// each this process's until it is acknowledged or `claim` passes.
    pub(super) async fn pending_webhook_events(
        &self,
        limit: usize,
        claim: Duration,
    ) -> Result<Vec<PendingEvent>, QueueError> {
        let consumer = self.webhooks_consumer(claim).await?;
        let mut batch = consumer
            .fetch()
            .max_messages(limit)
            .messages()
            .await
            .map_err(|e| nats_err("pulling events", e))?;
        let mut pending = Vec::new();
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| nats_err("pulling events", e))?;
            let header = |name: &str| {
                message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_string())
            };
            let kind = message.subject.rsplit('.').next().and_then(|k| serde_json::from_value(k.into()).ok());
            let (Some(id), Some(job_id), Some(kind), Ok(body), Some(receipt)) = (
                header(async_nats::header::NATS_MESSAGE_ID.as_ref()),
                header(HEADER_JOB),
                kind,
                String::from_utf8(message.payload.to_vec()),
                message.reply.as_ref().map(|r| r.to_string()),
            ) else {
                tracing::warn!(subject = %message.subject, "unreadable event message; dropping it");
                if let Some(reply) = &message.reply {
                    self.ack_quietly(Some(reply.as_str()), Signal::Term).await;
                }
                continue;
            };
            let attempts = message.info().map(|i| i.delivered.saturating_sub(1) as u32).unwrap_or(0);
            let reached =
                match self.hooks.get(&id).await.map_err(|e| nats_err("reading webhooks reached", e))? {
                    Some(bytes) => decode::<BTreeSet<String>>("webhooks reached", &bytes)?,
                    None => BTreeSet::new(),
                };
            let event = JobEvent { id, job_id, kind, webhook: header(HEADER_WEBHOOK), body };
            pending.push(PendingEvent { event, attempts, reached, receipt });
        }
        Ok(pending)
    }

    /// Acknowledges a delivered event, or records the webhooks it reached and has it redelivered after
    /// `retry_in`.
    pub(super) async fn webhook_event_delivered(
        &self,
        pending: &PendingEvent,
        reached: &BTreeSet<String>,
        retry_in: Option<Duration>,
    ) -> Result<(), QueueError> {
        let key = pending.event.id.as_str();
        match retry_in {
            None => {
                self.ack(&pending.receipt, Signal::Ack).await?;
                if !pending.reached.is_empty() {
                    self.hooks.purge(key).await.map_err(|e| nats_err(&format!("purging {key}"), e))?;
                }
            }
            Some(delay) => {
                if reached != &pending.reached {
                    self.hooks
                        .put(key, encode(reached)?)
                        .await
                        .map_err(|e| nats_err(&format!("writing {key}"), e))?;
                }
                self.ack(&pending.receipt, Signal::Nak(Some(delay))).await?;
            }
        }
        Ok(())
    }
}
