//! Queueing a job's shard tasks on NATS, and repairing what a crash between two writes leaves behind
//! (there are no multi-key transactions): the reconciler that runs in every reaper pass.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use futures_util::{StreamExt, TryStreamExt};

use super::kv::{Edit, already_exists};
use super::records::{ShardState, StoredJob, StoredShard, Ticket, encode, priority_token, shard_key};
use super::{INLINE_SHARDS, NatsQueue, PUBLISH_WINDOW, nats_err};
use crate::job::ShardPayload;
use crate::queue::plan::{Shard, plan_shards};
use crate::queue::{QueueError, now_ms};

impl NatsQueue {
    /// Creates the shard records of `job` that are missing and publishes their task messages, at most
    /// [`PUBLISH_WINDOW`] at a time. Idempotent: records are create-only and messages carry a dedup id.
    /// `fresh_ids` names the messages apart from earlier publishes (the reconciler's republish must not
    /// be dropped as a duplicate of a message that was consumed); then only shards whose record had to
    /// be created are published.
    pub(super) async fn ensure_shards(
        &self,
        job: &StoredJob,
        shards: &[Shard],
        fresh_ids: Option<i64>,
    ) -> Result<(), QueueError> {
        let now = now_ms();
        let queue_one = |shard: Shard| {
            async move {
                let payload = ShardPayload { start: shard.start, end: shard.end }.encode();
                let record = StoredShard {
                    job_id: job.id.clone(),
                    shard: shard.index,
                    priority: job.spec.priority,
                    payload,
                    state: ShardState::Queued,
                    attempts: 0,
                    max_attempts: job.max_attempts,
                    available_at: now,
                    owner: None,
                    expires_at: None,
                    ack: None,
                    seq: None,
                    last_error: None,
                    samples: None,
                    done_by: None,
                    retired: false,
                };
                let key = shard_key(&job.id, shard.index);
                match self.shards.create(&key, encode(&record)?).await {
                    Ok(_) => {}
                    Err(e) if already_exists(&e) && fresh_ids.is_some() => return Ok(()),
                    // Created earlier, perhaps without its message (a crash in between): publish it.
                    Err(e) if already_exists(&e) => {}
                    Err(e) => return Err(nats_err(&format!("creating {key}"), e)),
                }
                let id = match fresh_ids {
                    Some(at) => format!("{key}.r{at}"),
                    None => key,
                };
                self.publish_ticket(&job.id, shard.index, job.spec.priority, id).await
            }
        };
        futures_util::stream::iter(shards.iter().copied().map(queue_one))
            .buffer_unordered(PUBLISH_WINDOW)
            .try_collect::<()>()
            .await
    }

    /// Publishes the task message of shard `shard` of `job_id` with dedup id `id` and waits for the
    /// server's ack (the message is durable then).
    pub(super) async fn publish_ticket(
        &self,
        job_id: &str,
        shard: u64,
        priority: i32,
        id: String,
    ) -> Result<(), QueueError> {
        let ticket = encode(&Ticket { job_id: job_id.to_string(), shard })?;
        let subject = format!("{}.{}", self.subject_prefix, priority_token(priority));
        let failed = |e: &dyn std::fmt::Display| nats_err(&format!("publishing {id}"), e);
        let message = jetstream::message::PublishMessage::build().payload(ticket).message_id(id.as_str());
        let ack = self.js.send_publish(subject, message).await.map_err(|e| failed(&e))?;
        ack.await.map_err(|e| failed(&e))?;
        Ok(())
    }

    /// The shards of `job` as its submitter planned them.
    pub(super) fn plan(job: &StoredJob) -> Vec<Shard> {
        plan_shards(job.spec.num_samples, u64::from(job.spec.batch_size), job.batches_per_shard)
    }

    /// Repairs what a crash between two writes leaves behind (there are no multi-key transactions):
    /// shards recorded done that their job's counters miss (a crash inside `complete_shard`), and a
    /// job whose shard records were not all created (a crash inside `submit`), once it has been left
    /// alone for twice the submit wait. `shards` is a scan of the shards bucket.
    pub(super) async fn reconcile(&self, shards: &[StoredShard]) -> Result<(), QueueError> {
        let mut by_job: HashMap<&str, Vec<&StoredShard>> = HashMap::new();
        for s in shards {
            by_job.entry(s.job_id.as_str()).or_default().push(s);
        }
        for job in self.scan::<StoredJob>(&self.jobs).await? {
            // An event a crash kept from being published (see `events`).
            if job.announced != Some(job.current_event()) {
                self.announce_quietly(&job.id).await;
            }
            if job.state.is_terminal() {
                continue;
            }
            let records = by_job.get(job.id.as_str()).map(Vec::as_slice).unwrap_or_default();
            let recorded: std::collections::HashSet<u64> = records.iter().map(|s| s.shard).collect();
            let uncounted: Vec<(u64, u64)> = records
                .iter()
                .filter(|s| s.state == ShardState::Done && !job.counted.contains(s.shard))
                .map(|s| (s.shard, s.samples.unwrap_or(0)))
                .collect();
            if !uncounted.is_empty() {
                let added = self
                    .update::<StoredJob, usize>(&self.jobs, &job.id, |current| {
                        let Some(mut j) = current else { return Ok(Edit::Keep(0)) };
                        let mut added = 0;
                        for (shard, samples) in &uncounted {
                            if j.counted.insert(*shard) {
                                j.samples_done += samples;
                                j.shards_done += 1;
                                added += 1;
                            }
                        }
                        if added == 0 {
                            return Ok(Edit::Keep(0));
                        }
                        j.updated_at = now_ms();
                        Ok(Edit::Write(j, added))
                    })
                    .await?;
                if added > 0 {
                    tracing::warn!(job = %job.id, shards = added, "reconciled completed shards missing from the job's counters");
                }
            }
            let quiet = now_ms() - job.updated_at > 2 * crate::queue::ms(self.options.submit_wait);
            if (records.len() as u64) < job.shards_total && quiet {
                tracing::warn!(job = %job.id, records = records.len(), total = job.shards_total, "recreating missing shard tasks");
                let missing: Vec<Shard> =
                    Self::plan(&job).into_iter().filter(|s| !recorded.contains(&s.index)).collect();
                self.ensure_shards(&job, &missing, Some(now_ms())).await?;
            }
        }
        Ok(())
    }

    /// Writes a new job (create-only) and queues its shards. If the job already exists (a concurrent
    /// roll-forward won), its stored plan is what gets queued.
    pub(super) async fn write_job(&self, job: StoredJob) -> Result<StoredJob, QueueError> {
        let stored = match self.jobs.create(&job.id, encode(&job)?).await {
            Ok(_) => job,
            Err(e) if already_exists(&e) => self
                .read::<StoredJob>(&self.jobs, &job.id)
                .await?
                .map(|(j, _)| j)
                .ok_or_else(|| QueueError::Corrupt(format!("job {} vanished", job.id)))?,
            Err(e) => return Err(nats_err(&format!("creating job {}", job.id), e)),
        };
        let mut shards = Self::plan(&stored);
        let rest = shards.split_off(shards.len().min(INLINE_SHARDS));
        self.ensure_shards(&stored, &shards, None).await?;
        if !rest.is_empty() {
            let (queue, job) = (self.clone(), stored.clone());
            tokio::spawn(async move {
                if let Err(e) = queue.ensure_shards(&job, &rest, None).await {
                    tracing::warn!(job = %job.id, error = %e, "queueing shards; the reconciler will finish it");
                }
            });
        }
        Ok(stored)
    }

    /// Waits for the job an idempotency key points at; writes it from `fresh` if its submitter died.
    pub(super) async fn await_job(&self, fresh: StoredJob) -> Result<StoredJob, QueueError> {
        let deadline = tokio::time::Instant::now() + self.options.submit_wait;
        loop {
            if let Some((job, _)) = self.read::<StoredJob>(&self.jobs, &fresh.id).await? {
                return Ok(job);
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(job = %fresh.id, "idempotency key without its job: writing the job");
                return self.write_job(fresh).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
