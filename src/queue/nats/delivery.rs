//! Task messages of the NATS queue: pulling (highest priority subject first), claiming a delivery as a
//! lease with a compare-and-swap on its shard record, the fenced writes made under a lease, and what
//! the server is told afterwards (the JetStream ack protocol).

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;

use super::kv::Edit;
use super::records::{ShardState, StoredJob, StoredShard, Ticket, ms_duration, shard_key};
use super::{MAX_PULLS_PER_LEASE, NatsQueue, nats_err};
use crate::job::JobState;
use crate::queue::{Lease, QueueError, ReapReport, ShardCounts, TaskQueue, now_ms};

/// What to tell the server about a delivery.
#[derive(Debug, Clone, Copy)]
pub(super) enum Signal {
    Ack,
    Progress,
    Nak(Option<Duration>),
    Term,
}

impl Signal {
    fn body(self) -> Bytes {
        // The JetStream ack protocol (ADR-1 in nats-io/nats-architecture-and-design): `+ACK`, `+WPI`,
        // `-NAK` with an optional JSON delay in nanoseconds, `+TERM`.
        match self {
            Signal::Ack => Bytes::from_static(b"+ACK"),
            Signal::Progress => Bytes::from_static(b"+WPI"),
            Signal::Nak(None) => Bytes::from_static(b"-NAK"),
            Signal::Nak(Some(d)) => Bytes::from(format!("-NAK {{\"delay\": {}}}", d.as_nanos())),
            Signal::Term => Bytes::from_static(b"+TERM"),
        }
    }
}

impl NatsQueue {
    /// Sends `ack` for the delivery whose ack subject is `reply` and waits for the server's reply.
    pub(super) async fn ack(&self, reply: &str, ack: Signal) -> Result<(), QueueError> {
        self.client
            .request(reply.to_string(), ack.body())
            .await
            .map(|_| ())
            .map_err(|e| nats_err(&format!("ack {ack:?}"), e))
    }

    /// Like [`Self::ack`] after the KV write already decided the outcome: a lost ack only means the
    /// server redelivers after `AckWait`, and the next lease sorts it out from the KV record.
    pub(super) async fn ack_quietly(&self, reply: Option<&str>, ack: Signal) {
        if let Some(reply) = reply
            && let Err(e) = self.ack(reply, ack).await
        {
            tracing::warn!(error = %e, "task message ack failed; the server will redeliver after AckWait");
        }
    }

    pub(super) async fn consumer(&self, token: &str) -> Result<consumer::PullConsumer, QueueError> {
        let mut consumers = self.consumers.lock().await;
        if let Some(c) = consumers.get(token) {
            return Ok(c.clone());
        }
        let name = format!("p{token}");
        let c = self
            .tasks
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("{}.{token}", self.subject_prefix),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: self.options.ack_wait,
                    // Attempts are counted in KV (a release gives one back); see the module docs.
                    max_deliver: -1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| nats_err(&format!("consumer {name}"), e))?;
        consumers.insert(token.to_string(), c.clone());
        Ok(c)
    }

    /// Priority tokens with messages in the stream, highest first.
    pub(super) async fn ready_priorities(&self) -> Result<Vec<String>, QueueError> {
        let mut info = self
            .tasks
            .info_with_subjects(format!("{}.>", self.subject_prefix))
            .await
            .map_err(|e| nats_err("stream subjects", e))?;
        let mut tokens = Vec::new();
        while let Some(item) = info.next().await {
            let (subject, count) = item.map_err(|e| nats_err("stream subjects", e))?;
            if count > 0
                && let Some(token) = subject.rsplit('.').next()
            {
                tokens.push(token.to_string());
            }
        }
        tokens.sort_unstable_by(|a, b| b.cmp(a));
        tokens.dedup();
        Ok(tokens)
    }

    /// Marks a job running (its first lease). Returns the job's state and whether this call started
    /// it, `None` when it is missing.
    pub(super) async fn mark_running(
        &self,
        job_id: &str,
        now: i64,
    ) -> Result<Option<(JobState, bool)>, QueueError> {
        self.update::<StoredJob, Option<(JobState, bool)>>(&self.jobs, job_id, |job| {
            Ok(match job {
                Some(mut job) if job.state == JobState::Queued => {
                    job.state = JobState::Running;
                    job.started_at = job.started_at.or(Some(now));
                    job.updated_at = now;
                    Edit::Write(job, Some((JobState::Running, true)))
                }
                job => Edit::Keep(job.map(|j| (j.state, false))),
            })
        })
        .await
    }

    /// Tries to lease the task a delivered message stands for. `None`: the message was dealt with
    /// (stale, delayed or held) and the caller should pull the next one.
    pub(super) async fn claim(
        &self,
        msg: &jetstream::Message,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, QueueError> {
        let reply = msg.reply.as_ref().map(|r| r.to_string());
        let seq = msg.info().map(|i| i.stream_sequence).ok();
        let ticket: Ticket = match serde_json::from_slice(&msg.payload) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable task message; terminating it");
                self.ack_quietly(reply.as_deref(), Signal::Term).await;
                return Ok(None);
            }
        };
        let key = shard_key(&ticket.job_id, ticket.shard);
        let now = now_ms();
        let expires_at = now.saturating_add(crate::queue::ms(ttl));
        enum Verdict {
            Leased(Lease),
            Drop(Signal),
        }
        let verdict = self
            .update::<StoredShard, Verdict>(&self.shards, &key, |shard| {
                let Some(mut shard) = shard else { return Ok(Edit::Keep(Verdict::Drop(Signal::Term))) };
                let available = match shard.state {
                    ShardState::Done => return Ok(Edit::Keep(Verdict::Drop(Signal::Ack))),
                    ShardState::Dead => return Ok(Edit::Keep(Verdict::Drop(Signal::Term))),
                    ShardState::Queued if shard.available_at > now => {
                        let delay = ms_duration(shard.available_at - now);
                        return Ok(Edit::Keep(Verdict::Drop(Signal::Nak(Some(delay)))));
                    }
                    ShardState::Queued => true,
                    // Redelivered after AckWait while the lease is still held: back at its expiry.
                    ShardState::Leased if !shard.lease_expired(now) => {
                        let delay = ms_duration(shard.expires_at.unwrap_or(now) - now + 1);
                        return Ok(Edit::Keep(Verdict::Drop(Signal::Nak(Some(delay)))));
                    }
                    // Expired and not reaped yet: the reaper's accounting, done here.
                    ShardState::Leased => false,
                };
                if !available && shard.attempts >= shard.max_attempts {
                    shard.state = ShardState::Dead;
                    shard.last_error = Some("lease expired after the last attempt".into());
                    shard.clear_lease();
                    return Ok(Edit::Write(shard, Verdict::Drop(Signal::Term)));
                }
                if !available {
                    shard.last_error = Some("lease expired".into());
                }
                shard.state = ShardState::Leased;
                shard.attempts += 1;
                shard.owner = Some(owner.to_string());
                shard.expires_at = Some(expires_at);
                shard.ack = reply.clone();
                shard.seq = seq;
                let lease = Lease {
                    task_id: seq.unwrap_or_default() as i64,
                    job_id: shard.job_id.clone(),
                    shard: shard.shard,
                    payload: shard.payload.clone(),
                    owner: owner.to_string(),
                    attempt: shard.attempts,
                    expires_at,
                };
                Ok(Edit::Write(shard, Verdict::Leased(lease)))
            })
            .await?;
        match verdict {
            Verdict::Leased(lease) => match self.mark_running(&lease.job_id, now).await? {
                Some((state, started)) if !state.is_terminal() => {
                    if started {
                        self.announce_quietly(&lease.job_id).await;
                    }
                    Ok(Some(lease))
                }
                // The job finished while its shards were being retired (finish_job is not one
                // transaction): retire this one too instead of running it.
                state => {
                    let reason =
                        state.map_or("job missing".to_string(), |(s, _)| format!("job {}", s.as_str()));
                    self.fenced(&lease, |shard, _| {
                        shard.state = ShardState::Dead;
                        shard.retired = true;
                        shard.last_error = Some(reason.clone());
                        shard.clear_lease();
                        Signal::Term
                    })
                    .await?;
                    Ok(None)
                }
            },
            Verdict::Drop(ack) => {
                self.ack_quietly(reply.as_deref(), ack).await;
                Ok(None)
            }
        }
    }

    /// A fenced write under `lease`: `edit` runs on the record only while the lease holds it, and what
    /// it returns is sent for the lease's delivery after the write.
    pub(super) async fn fenced(
        &self,
        lease: &Lease,
        mut edit: impl FnMut(&mut StoredShard, i64) -> Signal,
    ) -> Result<StoredShard, QueueError> {
        let key = shard_key(&lease.job_id, lease.shard);
        let lost = QueueError::LeaseLost { task_id: lease.task_id };
        let outcome = self
            .update::<StoredShard, Option<(Signal, Option<String>, StoredShard)>>(
                &self.shards,
                &key,
                |shard| {
                    let now = now_ms();
                    match shard {
                        Some(mut shard) if shard.held_by(lease, now) => {
                            let reply = shard.ack.clone();
                            let ack = edit(&mut shard, now);
                            Ok(Edit::Write(shard.clone(), Some((ack, reply, shard))))
                        }
                        _ => Ok(Edit::Keep(None)),
                    }
                },
            )
            .await?;
        let Some((ack, reply, shard)) = outcome else { return Err(lost) };
        self.ack_quietly(reply.as_deref(), ack).await;
        Ok(shard)
    }
}

#[async_trait]
impl TaskQueue for NatsQueue {
    async fn lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, QueueError> {
        let mut pulls = 0;
        for token in self.ready_priorities().await? {
            let consumer = self.consumer(&token).await?;
            loop {
                if pulls >= MAX_PULLS_PER_LEASE {
                    return Ok(None);
                }
                pulls += 1;
                // No-wait pull of one message: nothing pending ends the batch at once.
                let mut batch = consumer
                    .fetch()
                    .max_messages(1)
                    .messages()
                    .await
                    .map_err(|e| nats_err("pulling a task", e))?;
                let Some(msg) = batch.next().await else { break };
                let msg = msg.map_err(|e| nats_err("pulling a task", e))?;
                if let Some(lease) = self.claim(&msg, owner, ttl).await? {
                    return Ok(Some(lease));
                }
            }
        }
        Ok(None)
    }

    async fn heartbeat(&self, lease: &mut Lease, ttl: Duration) -> Result<(), QueueError> {
        let mut expires = 0;
        self.fenced(lease, |shard, now| {
            expires = now.saturating_add(crate::queue::ms(ttl));
            shard.expires_at = Some(expires);
            Signal::Progress
        })
        .await?;
        lease.expires_at = expires;
        Ok(())
    }

    async fn release(&self, lease: &Lease, delay: Duration, reason: &str) -> Result<(), QueueError> {
        self.fenced(lease, |shard, now| {
            shard.state = ShardState::Queued;
            shard.attempts = shard.attempts.saturating_sub(1);
            shard.available_at = now.saturating_add(crate::queue::ms(delay));
            shard.last_error = Some(reason.to_string());
            shard.clear_lease();
            Signal::Nak((!delay.is_zero()).then_some(delay))
        })
        .await
        .map(|_| ())
    }

    async fn retry_later(&self, lease: &Lease, delay: Duration, error: &str) -> Result<(), QueueError> {
        self.fenced(lease, |shard, now| {
            shard.last_error = Some(error.to_string());
            shard.clear_lease();
            if shard.attempts >= shard.max_attempts {
                shard.state = ShardState::Dead;
                Signal::Term
            } else {
                shard.state = ShardState::Queued;
                shard.available_at = now.saturating_add(crate::queue::ms(delay));
                Signal::Nak((!delay.is_zero()).then_some(delay))
            }
        })
        .await
        .map(|_| ())
    }

    async fn dead_letter(&self, lease: &Lease, error: &str) -> Result<(), QueueError> {
        self.fenced(lease, |shard, _| {
            shard.state = ShardState::Dead;
            shard.last_error = Some(error.to_string());
            shard.clear_lease();
            Signal::Term
        })
        .await
        .map(|_| ())
    }

    async fn reap(&self) -> Result<ReapReport, QueueError> {
        let mut report = ReapReport::default();
        let shards = self.scan::<StoredShard>(&self.shards).await?;
        for shard in shards.iter().cloned() {
            if !shard.lease_expired(now_ms()) {
                continue;
            }
            let key = shard_key(&shard.job_id, shard.shard);
            let outcome = self
                .update::<StoredShard, Option<(bool, Option<String>)>>(&self.shards, &key, |s| {
                    let now = now_ms();
                    match s {
                        Some(mut s) if s.lease_expired(now) => {
                            let reply = s.ack.clone();
                            s.clear_lease();
                            let dead = s.attempts >= s.max_attempts;
                            if dead {
                                s.state = ShardState::Dead;
                                s.last_error = Some("lease expired after the last attempt".into());
                            } else {
                                s.state = ShardState::Queued;
                                s.available_at = now;
                                s.last_error = Some("lease expired".into());
                            }
                            Ok(Edit::Write(s, Some((dead, reply))))
                        }
                        _ => Ok(Edit::Keep(None)),
                    }
                })
                .await?;
            match outcome {
                Some((true, reply)) => {
                    report.dead += 1;
                    self.ack_quietly(reply.as_deref(), Signal::Term).await;
                }
                Some((false, reply)) => {
                    report.requeued += 1;
                    self.ack_quietly(reply.as_deref(), Signal::Nak(None)).await;
                }
                None => {}
            }
        }
        self.reconcile(&shards).await?;
        Ok(report)
    }

    async fn shard_counts(&self) -> Result<ShardCounts, QueueError> {
        let mut counts = ShardCounts::default();
        for shard in self.scan::<StoredShard>(&self.shards).await? {
            match shard.state {
                ShardState::Queued => {
                    counts.queued += 1;
                    let oldest = counts.oldest_queued_at_ms.get_or_insert(shard.available_at);
                    *oldest = (*oldest).min(shard.available_at);
                }
                ShardState::Leased => counts.leased += 1,
                ShardState::Done | ShardState::Dead => {}
            }
        }
        Ok(counts)
    }
}
