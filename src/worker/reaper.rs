//! What a worker does besides sampling: finalizing jobs whose shards are all done, and the reaper's
//! pass (expired leases requeued, jobs with dead shards failed, stragglers finalized, abandoned spool
//! files swept, the queue's gauges set).

use std::sync::atomic::Ordering;

use super::{WorkerContext, outputs};
use crate::job::{JobRecord, JobState};
use crate::queue::QueueError;
use crate::storage::StorageError;

/// Jobs deleted by the retention, and cleanups carried out, in one reaper pass at most.
const CLEANUPS_PER_PASS: usize = 32;

impl WorkerContext {
    /// Writes the manifest of a job whose shards are all done and marks it SUCCEEDED (or FAILED when
    /// its outputs are inconsistent). A job already terminal is left alone.
    pub async fn finalize(&self, job_id: &str) {
        use tracing::Instrument;
        let job = self.queue.job(job_id).await;
        let span = tracing::info_span!("finalize", job_id);
        // In a shard's span (its last shard finished here) the span is that shard's child; from the
        // reaper, it joins the job's trace.
        if tracing::Span::current().is_none()
            && let Ok(Some(job)) = &job
        {
            crate::telemetry::set_parent(&span, &job.spec.trace_context);
        }
        self.finalize_job(job_id, job).instrument(span).await
    }

    /// Finalizes `job` as the caller has it: fresh from the write that counted its last shard. Reading
    /// it again could reach a replica that has not seen that write yet (NATS KV reads are direct gets,
    /// which any replica of a clustered bucket answers), find it unfinished, and leave it to the
    /// reaper's pass a lease later.
    pub async fn finalize_counted(&self, job: JobRecord) {
        use tracing::Instrument;
        let span = tracing::info_span!("finalize", job_id = job.id);
        let id = job.id.clone();
        self.finalize_job(&id, Ok(Some(job))).instrument(span).await
    }

    async fn finalize_job(&self, job_id: &str, job: Result<Option<JobRecord>, QueueError>) {
        let job = match job {
            Ok(Some(job)) if !job.state.is_terminal() && job.shards_done >= job.shards_total => job,
            Ok(_) => return,
            Err(e) => return tracing::warn!(error = %e, "reading the job to finalize"),
        };
        let Some(model) = self.models.get(&job.spec.model) else {
            return tracing::warn!(model = job.spec.model, "cannot finalize: model not served here");
        };
        let result = match self.outputs.for_job(&job.id, &job.spec).await {
            Ok(out) => outputs::finalize(&out, &job, model, crate::queue::now_ms()).await,
            Err(e) => Err(e.into()),
        };
        let finished = match &result {
            Ok(uri) => self.queue.finish_job(job_id, JobState::Succeeded, None, Some(uri)).await,
            Err(outputs::OutputError::Corrupt(message)) => {
                self.queue.finish_job(job_id, JobState::Failed, Some(message), None).await
            }
            // Storage trouble: the reaper tries again later.
            Err(e) => return tracing::warn!(error = %e, "finalizing failed; will retry"),
        };
        match finished {
            Ok(Some(job)) => {
                metrics::counter!("ddpm_jobs_finished_total", "state" => job.state.as_str()).increment(1);
                tracing::info!(state = job.state.as_str(), manifest = job.manifest_uri, "job finished");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "recording the finished job"),
        }
    }

    /// Deletes every object of `job`; returns how many.
    pub async fn remove_outputs(&self, job: &JobRecord) -> Result<u64, StorageError> {
        let deleted = self.outputs.for_job(&job.id, &job.spec).await?.delete().await?;
        metrics::counter!("ddpm_job_objects_deleted_total").increment(deleted);
        Ok(deleted)
    }

    /// Deletes the jobs the retention is done with, and carries out the cleanups that are due: the
    /// objects of cancelled and deleted jobs, then the deleted jobs' records. Objects that cannot be
    /// deleted now (the store out of reach) are tried again on the next pass.
    async fn clean_up(&self) {
        if let Some(retention) = self.config.retention {
            match self.queue.expire_jobs(retention.after, retention.keep_outputs, CLEANUPS_PER_PASS).await {
                Ok(expired) if !expired.is_empty() => {
                    metrics::counter!("ddpm_jobs_deleted_total", "reason" => "retention")
                        .increment(expired.len() as u64);
                    tracing::info!(jobs = ?expired, "deleted jobs past their retention");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "deleting jobs past their retention"),
            }
        }
        let due = match self.queue.jobs_to_purge(self.config.cleanup_grace(), CLEANUPS_PER_PASS).await {
            Ok(due) => due,
            Err(e) => return tracing::warn!(error = %e, "listing the jobs to clean up"),
        };
        for purge in due {
            let job_id = purge.job.id.as_str();
            if purge.outputs {
                match self.remove_outputs(&purge.job).await {
                    Ok(deleted) => tracing::info!(job_id, deleted, "deleted the objects of a finished job"),
                    Err(e) => {
                        tracing::warn!(job_id, error = %e, "deleting a job's objects; will retry");
                        continue;
                    }
                }
            }
            if let Err(e) = self.queue.purged(&purge).await {
                tracing::warn!(job_id, error = %e, "recording a job's cleanup");
            }
        }
    }

    /// One reaper pass: requeue expired leases, fail jobs with dead shards, finalize stragglers.
    pub async fn reap_once(&self) {
        let reaped = self.queue.reap().await;
        let was_reachable = self.queue_reachable.swap(reaped.is_ok(), Ordering::Relaxed);
        if reaped.is_ok() && !was_reachable {
            tracing::info!("the queue answers again");
            self.queue_outage.recovered();
            self.wake.notify_waiters();
        }
        match reaped {
            Ok(r) if r.requeued + r.dead > 0 => {
                metrics::counter!("ddpm_task_redeliveries_total").increment(r.requeued as u64);
                metrics::counter!("ddpm_task_dead_lettered_total").increment(r.dead as u64);
                tracing::info!(requeued = r.requeued, dead = r.dead, "reaped expired leases");
                self.wake.notify_waiters();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reaping"),
        }
        if let Ok(dead) = self.queue.jobs_with_dead_shards().await {
            for (job_id, error) in dead {
                let message = format!("a shard failed on every attempt: {error}");
                if let Ok(Some(job)) =
                    self.queue.finish_job(&job_id, JobState::Failed, Some(&message), None).await
                {
                    metrics::counter!("ddpm_jobs_finished_total", "state" => job.state.as_str()).increment(1);
                    tracing::warn!(job_id, error = message, "job failed");
                }
                self.active.stop_job(&job_id);
            }
        }
        if let Ok(ready) = self.queue.jobs_to_finalize(self.config.finalize_after).await {
            for job_id in ready {
                self.finalize(&job_id).await;
            }
        }
        self.clean_up().await;
        // Spool files of writers killed mid-write (a live writer's are locked).
        let mut spools = self.outputs.spool_dirs().await;
        spools.push(self.config.scratch_dir.clone());
        let _ = tokio::task::spawn_blocking(move || {
            spools.iter().map(|d| crate::storage::local::sweep_abandoned(d)).sum::<usize>()
        })
        .await;
        // The whole queue's counts, the same on every worker: an autoscaler takes max() over the
        // workers, not the sum.
        if let Ok(counts) = self.queue.shard_counts().await {
            metrics::gauge!("ddpm_queue_depth").set((counts.queued + counts.leased) as f64);
            let queue = self.config.queue_name.clone();
            metrics::gauge!("ddpm_queue_shards", "queue" => queue.clone(), "state" => "queued")
                .set(counts.queued as f64);
            metrics::gauge!("ddpm_queue_shards", "queue" => queue.clone(), "state" => "leased")
                .set(counts.leased as f64);
            // How long the longest-waiting shard has waited for a worker (0: none waits).
            let waited = counts.oldest_queued_at_ms.map_or(0, |t| (crate::queue::now_ms() - t).max(0));
            metrics::gauge!("ddpm_queue_oldest_queued_shard_seconds", "queue" => queue)
                .set(waited as f64 / 1000.0);
        }
        if let Ok(counts) = self.queue.job_counts().await {
            for state in [
                JobState::Queued,
                JobState::Running,
                JobState::Succeeded,
                JobState::Failed,
                JobState::Cancelled,
            ] {
                let n = counts.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n);
                metrics::gauge!("ddpm_jobs", "state" => state.as_str()).set(n as f64);
            }
        }
    }
}
