//! The embedded queue: one SQLite file ([`SqliteStore`], synchronous, its times passed in) behind the
//! async [`TaskQueue`] and [`JobStore`] traits ([`SqliteQueue`], each call on tokio's blocking pool).

mod store;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use store::SqliteStore;

use super::{
    IdempotencyKey, JobFilter, JobStore, Lease, PageCursor, PendingEvent, Purge, QueueError, ReapReport,
    ShardCounts, ShardStats, SubmitOutcome, TaskQueue, ms, now_ms,
};
use crate::job::{JobRecord, JobSpec, JobState};

/// The SQLite store behind the async traits: each call runs on tokio's blocking pool.
#[derive(Clone)]
pub struct SqliteQueue(Arc<SqliteStore>);

impl SqliteQueue {
    pub fn new(store: SqliteStore) -> Self {
        Self(Arc::new(store))
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SqliteStore) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let store = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| QueueError::Corrupt(format!("queue call panicked: {e}")))?
    }
}

#[async_trait]
impl TaskQueue for SqliteQueue {
    async fn lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, QueueError> {
        let owner = owner.to_string();
        self.run(move |s| s.lease(&owner, now_ms(), ms(ttl))).await
    }

    async fn heartbeat(&self, lease: &mut Lease, ttl: Duration) -> Result<(), QueueError> {
        let mut held = lease.clone();
        let held = self
            .run(move |s| {
                s.heartbeat(&mut held, now_ms(), ms(ttl))?;
                Ok(held)
            })
            .await?;
        *lease = held;
        Ok(())
    }

    async fn release(&self, lease: &Lease, delay: Duration, reason: &str) -> Result<(), QueueError> {
        let (lease, reason) = (lease.clone(), reason.to_string());
        self.run(move |s| s.release(&lease, now_ms(), ms(delay), &reason)).await
    }

    async fn retry_later(&self, lease: &Lease, delay: Duration, error: &str) -> Result<(), QueueError> {
        let (lease, error) = (lease.clone(), error.to_string());
        self.run(move |s| s.retry_later(&lease, now_ms(), ms(delay), &error)).await
    }

    async fn dead_letter(&self, lease: &Lease, error: &str) -> Result<(), QueueError> {
        let (lease, error) = (lease.clone(), error.to_string());
        self.run(move |s| s.dead_letter(&lease, &error)).await
    }

    async fn reap(&self) -> Result<ReapReport, QueueError> {
        self.run(|s| s.reap(now_ms())).await
    }

    async fn shard_counts(&self) -> Result<ShardCounts, QueueError> {
        self.run(|s| s.shard_counts()).await
    }
}

#[async_trait]
impl JobStore for SqliteQueue {
    async fn submit(
        &self,
        spec: &JobSpec,
        idempotency: Option<&IdempotencyKey>,
        batches_per_shard: u64,
        max_attempts: u32,
    ) -> Result<SubmitOutcome, QueueError> {
        let (spec, key) = (spec.clone(), idempotency.cloned());
        self.run(move |s| s.submit(&spec, key.as_ref(), batches_per_shard, max_attempts, now_ms())).await
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        let id = id.to_string();
        self.run(move |s| s.job(&id)).await
    }

    async fn list_jobs(
        &self,
        filter: &JobFilter,
        cursor: Option<&PageCursor>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, QueueError> {
        let (filter, cursor) = (filter.clone(), cursor.cloned());
        self.run(move |s| s.list_jobs(&filter, cursor.as_ref(), limit)).await
    }

    async fn complete_shard(&self, lease: &Lease, samples: u64) -> Result<JobRecord, QueueError> {
        let lease = lease.clone();
        self.run(move |s| s.complete_shard(&lease, samples, now_ms())).await
    }

    async fn finish_job(
        &self,
        id: &str,
        state: JobState,
        error: Option<&str>,
        manifest_uri: Option<&str>,
    ) -> Result<Option<JobRecord>, QueueError> {
        let (id, error, uri) = (id.to_string(), error.map(str::to_string), manifest_uri.map(str::to_string));
        self.run(move |s| s.finish_job(&id, state, error.as_deref(), uri.as_deref(), now_ms())).await
    }

    async fn retry_job(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        let id = id.to_string();
        self.run(move |s| s.retry_job(&id, now_ms())).await
    }

    async fn jobs_with_dead_shards(&self) -> Result<Vec<(String, String)>, QueueError> {
        self.run(|s| s.jobs_with_dead_shards()).await
    }

    async fn jobs_to_finalize(&self, stale: Duration) -> Result<Vec<String>, QueueError> {
        self.run(move |s| s.jobs_to_finalize(now_ms(), ms(stale))).await
    }

    async fn job_counts(&self) -> Result<Vec<(JobState, u64)>, QueueError> {
        self.run(|s| s.job_counts()).await
    }

    async fn delete_job(&self, id: &str, keep_outputs: bool) -> Result<Option<JobRecord>, QueueError> {
        let id = id.to_string();
        self.run(move |s| s.delete_job(&id, keep_outputs, now_ms())).await
    }

    async fn expire_jobs(
        &self,
        retention: Duration,
        keep_outputs: bool,
        limit: usize,
    ) -> Result<Vec<String>, QueueError> {
        self.run(move |s| {
            let now = now_ms();
            s.expire_jobs(now - ms(retention), keep_outputs, limit, now)
        })
        .await
    }

    async fn jobs_to_purge(&self, grace: Duration, limit: usize) -> Result<Vec<Purge>, QueueError> {
        self.run(move |s| s.jobs_to_purge(now_ms() - ms(grace), limit)).await
    }

    async fn shard_stats(&self, id: &str) -> Result<Option<ShardStats>, QueueError> {
        let id = id.to_string();
        self.run(move |s| s.shard_stats(&id)).await
    }

    async fn pending_events(&self, limit: usize, claim: Duration) -> Result<Vec<PendingEvent>, QueueError> {
        self.run(move |s| s.pending_events(limit, ms(claim), now_ms())).await
    }

    async fn event_delivered(
        &self,
        pending: &PendingEvent,
        reached: &std::collections::BTreeSet<String>,
        retry_in: Option<Duration>,
    ) -> Result<(), QueueError> {
        let (pending, reached) = (pending.clone(), reached.clone());
        self.run(move |s| s.event_delivered(&pending, &reached, retry_in.map(ms), now_ms())).await
    }

    async fn purged(&self, purge: &Purge) -> Result<(), QueueError> {
        let purge = purge.clone();
        self.run(move |s| s.purged(&purge)).await
    }
}

#[cfg(test)]
mod tests;
