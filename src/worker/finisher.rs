//! The output stage: everything a shard needs after it was leased and before the queue is told, on the
//! async runtime. Its writer encodes and stores the samples the device hands over, in the job's layout
//! ([`crate::dataset::sink`]), with the grids that lie wholly inside it; its heartbeat keeps the lease;
//! once the device has said how the sampling ended, the shard is recorded, or given back with the
//! reason, and the worker that completes a job's last shard writes its manifest.
//!
//! A shard's outputs are written create-only ([`storage::write_once`](crate::storage::write_once)) and
//! its record only after a fenced check that the lease is still held, so a worker that lost its lease
//! (paused, cut off, or its job cancelled) cannot change what another attempt recorded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use image::DynamicImage;
use tokio::sync::{mpsc, oneshot};

use super::WorkerContext;
use super::device::{Sample, Sampled};
use super::outputs::{self, GridEntry, GridRange, JobOutputs, OutputError, ShardRecord, ShardRun};
use crate::dataset::StoredFile;
use crate::dataset::sink::{self, ShardTarget};
use crate::job::{JobSpec, ShardPayload};
use crate::queue::{Lease, QueueError};

/// Why a shard did not finish, which decides what the queue is told.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The output store was out of reach: the shard goes back, after a growing pause, without spending
    /// an attempt (attempts are for shards that fail on their own).
    #[error("{0}")]
    StoreUnavailable(String),
    /// The queue was out of reach: likewise.
    #[error("{0}")]
    QueueUnavailable(String),
    /// This attempt failed: the shard runs again after a backoff, or is dead-lettered once its
    /// attempts are used up.
    #[error("{0}")]
    Failed(String),
    /// The shard can never run: it is dead-lettered at once.
    #[error("{0}")]
    Fatal(String),
}

impl From<OutputError> for ShardError {
    fn from(e: OutputError) -> Self {
        match &e {
            OutputError::Storage(s) if s.is_unavailable() => ShardError::StoreUnavailable(e.to_string()),
            _ => ShardError::Failed(e.to_string()),
        }
    }
}

impl From<crate::storage::StorageError> for ShardError {
    fn from(e: crate::storage::StorageError) -> Self {
        OutputError::from(e).into()
    }
}

impl From<QueueError> for ShardError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Unavailable(_) => ShardError::QueueUnavailable(e.to_string()),
            other => ShardError::Failed(other.to_string()),
        }
    }
}

/// How a shard that did not fail ended.
enum Ended {
    /// Its record is written (by this attempt or an earlier one) and its task completed.
    Recorded,
    /// Its job was cancelled or its lease lost: someone else owns it now, nothing to record.
    Stopped,
    /// Given back untried (the drain's grace period ran out, or the device was lost).
    Released,
}

/// What a shard stored, for its record.
pub struct Uploaded {
    pub files: Vec<StoredFile>,
    pub index: StoredFile,
    pub grids: Vec<GridEntry>,
    /// Samples whose objects an earlier attempt had stored first (kept).
    pub adopted: u64,
}

/// A leased shard's output stage, started when the batcher admits it: its heartbeat and its writer.
pub struct ShardOutput {
    pub lease: Lease,
    pub payload: ShardPayload,
    pub out: JobOutputs,
    pub stop: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
    uploads: tokio::task::JoinHandle<Result<Uploaded, OutputError>>,
    pub span: tracing::Span,
    /// The job's model (a label of the shard's metrics).
    model: String,
}

impl ShardOutput {
    /// Starts the heartbeat and the writer of a shard that will sample `target`'s range; returns the
    /// sender its images go to.
    pub fn start(
        ctx: &Arc<WorkerContext>,
        lease: Lease,
        payload: ShardPayload,
        out: JobOutputs,
        spec: &JobSpec,
        target: ShardTarget,
        span: tracing::Span,
    ) -> (Self, mpsc::Sender<Sample>) {
        let stop = ctx.active.register(&lease.job_id);
        let heartbeat = tokio::spawn(keep_alive(Arc::clone(ctx), lease.clone(), Arc::clone(&stop)));
        let (tx, rx) = mpsc::channel::<Sample>(spec.batch_size as usize * 2);
        let uploads = tokio::spawn(upload_shard(out.clone(), spec.clone(), target, rx));
        let model = spec.model.clone();
        (Self { lease, payload, out, stop, heartbeat, uploads, span, model }, tx)
    }

    /// Samples in the shard.
    pub fn rows(&self) -> u64 {
        self.payload.end - self.payload.start
    }
}

/// The device a shard ran on and how, as its record tells.
#[derive(Debug, Clone)]
pub struct RanOn {
    /// Its name (`cuda:0`).
    pub device: String,
    pub cuda_graphs: bool,
    pub cudnn_benchmark: bool,
}

/// Waits for the device's word on the shard and for its writer, then records the shard or tells the
/// queue why not, in the shard's span. `permit` (the group's in-flight slot) is held until then.
pub async fn finish<P: Send + Sync + 'static>(
    ctx: Arc<WorkerContext>,
    shard: ShardOutput,
    sampled: oneshot::Receiver<Sampled>,
    ran_on: RanOn,
    batched_with: Vec<String>,
    permit: Arc<P>,
) {
    let span = shard.span.clone();
    tracing::Instrument::instrument(settle(ctx, shard, sampled, ran_on, batched_with), span).await;
    drop(permit);
}

async fn settle(
    ctx: Arc<WorkerContext>,
    shard: ShardOutput,
    sampled: oneshot::Receiver<Sampled>,
    ran_on: RanOn,
    batched_with: Vec<String>,
) {
    // A shard whose batches never reached the device (it ended first) goes back untried.
    let sampled = sampled.await.unwrap_or(Sampled::Failed {
        error: "the device stopped before sampling the shard".into(),
        device_lost: true,
    });
    let rows = shard.rows();
    let ShardOutput { lease, payload, out, stop, heartbeat, uploads, model, .. } = shard;
    let labels = [("model", model), ("device", ran_on.device.clone())];
    let uploaded = uploads.await.map_err(|e| OutputError::Internal(e.to_string())).and_then(|r| r);
    let stopped = stop.load(Ordering::Relaxed);
    let mut sampling_seconds = 0.0;
    let outcome = match (sampled, uploaded) {
        (Sampled::Done { seconds }, Ok(up)) => {
            sampling_seconds = seconds;
            let run = ShardRun {
                shard: lease.shard,
                start: payload.start,
                end: payload.end,
                worker: ctx.config.worker_id.clone(),
                device: ran_on.device,
                attempt: lease.attempt,
                sampling_seconds,
                adopted: up.adopted,
                batched_with,
                group_norm: crate::model::resnet::group_norm_path().into(),
                dtype: Some(ctx.config.dtype),
                layout: Some(ctx.config.layout),
                cuda_graphs: Some(ran_on.cuda_graphs),
                cudnn_benchmark: Some(ran_on.cudnn_benchmark),
                lanes: None,
                timings: None,
            };
            let record = ShardRecord { run, files: up.files, index: up.index, grids: up.grids };
            record_shard(&ctx, &lease, &out, &record).await
        }
        (Sampled::Cancelled, _) if ctx.abort.load(Ordering::Relaxed) => {
            release(&ctx, &lease).await;
            Ok(Ended::Released)
        }
        (Sampled::Failed { error, device_lost: true }, _) => {
            tracing::error!(error, "the device failed the shard; giving it back untried");
            release(&ctx, &lease).await;
            Ok(Ended::Released)
        }
        // Cancelled job or lost lease: the queue already knows; nothing to record.
        (Sampled::Cancelled, _) if stopped => Ok(Ended::Stopped),
        // The writer's failure stopped the sampling: it is the cause.
        (_, Err(e)) => Err(ShardError::from(e)),
        (Sampled::Failed { error, .. }, Ok(_)) => Err(ShardError::Failed(error)),
        (Sampled::Cancelled, Ok(_)) => Err(ShardError::Failed("sampling stopped".into())),
        (Sampled::WriterStopped, Ok(_)) => Err(ShardError::Failed("the writer stopped".into())),
    };
    heartbeat.abort();
    ctx.active.unregister(&lease.job_id, &stop);
    match outcome {
        Err(e) => give_back(&ctx, &lease, e).await,
        Ok(Ended::Recorded) => {
            ctx.store_outage.recovered();
            metrics::histogram!("ddpm_shard_duration_seconds", &labels).record(sampling_seconds);
            tracing::info!(samples = rows, sampling_seconds, "shard finished");
        }
        Ok(Ended::Stopped) => tracing::info!("shard stopped"),
        Ok(Ended::Released) => {}
    }
    ctx.wake.notify_waiters();
}

/// Writes the shard record, then completes the task; the worker that completes the last shard writes
/// the manifest. The record is written only under a lease confirmed a moment before (a cancelled job's
/// or a taken-over shard's worker writes nothing), and only if no attempt recorded the shard first.
async fn record_shard(
    ctx: &WorkerContext,
    lease: &Lease,
    out: &JobOutputs,
    record: &ShardRecord,
) -> Result<Ended, ShardError> {
    let mut held = lease.clone();
    match ctx.queue.heartbeat(&mut held, ctx.config.lease_ttl).await {
        Ok(()) => {}
        Err(QueueError::LeaseLost { .. }) => {
            tracing::info!("lease lost before the shard was recorded; another attempt owns it");
            return Ok(Ended::Stopped);
        }
        Err(e) => return Err(e.into()),
    }
    // A job cancelled on another worker: its shards may not all be retired yet.
    if ctx.queue.job(&lease.job_id).await?.is_none_or(|job| job.state.is_terminal()) {
        tracing::info!("the job ended while the shard ran; not recording it");
        return Ok(Ended::Stopped);
    }
    let json = serde_json::to_vec(record).map_err(|e| ShardError::Failed(e.to_string()))?;
    let key = out.shard_key(lease.shard);
    let written =
        crate::storage::write_once(out.store.as_ref(), &key, json.into(), "application/json").await?;
    if written.adopted {
        tracing::warn!("an earlier attempt recorded this shard first; its record stands");
    }
    complete(ctx, &held, record.run.end - record.run.start).await;
    Ok(Ended::Recorded)
}

/// Completes a shard's task; the worker that completes a job's last shard finalizes the job.
pub async fn complete(ctx: &WorkerContext, lease: &Lease, samples: u64) {
    match ctx.queue.complete_shard(lease, samples).await {
        Ok(job) if job.shards_done >= job.shards_total => ctx.finalize_counted(job).await,
        Ok(_) => {}
        Err(QueueError::LeaseLost { .. }) => {
            tracing::info!("lease lost before completion; another attempt owns the shard")
        }
        Err(e) => tracing::warn!(error = %e, "completing the shard"),
    }
}

/// Stores a shard's samples as they arrive, in the job's layout, and the grids that lie wholly inside
/// it, each as soon as its samples are in (so a shard holds the images of its unfinished grids only).
pub async fn upload_shard(
    out: JobOutputs,
    spec: JobSpec,
    target: ShardTarget,
    rx: mpsc::Receiver<Sample>,
) -> Result<Uploaded, OutputError> {
    let grids: Vec<GridRange> =
        outputs::grid_ranges(&spec).filter(|g| g.first >= target.start && g.end <= target.end).collect();
    let per_grid = u64::from(spec.samples_per_grid.max(1));
    let (tile_tx, mut tile_rx) = mpsc::unbounded_channel::<Sample>();
    let (first_grid, end_grid) =
        (grids.first().map_or(0, |g| g.number), grids.last().map_or(0, |g| g.number + 1));
    let grid_writer = tokio::spawn(async move {
        let mut pending: BTreeMap<u64, BTreeMap<u64, DynamicImage>> = BTreeMap::new();
        let mut entries = Vec::with_capacity(grids.len());
        while let Some((index, img)) = tile_rx.recv().await {
            let n = index / per_grid;
            let Some(&range) = grids.iter().find(|g| g.number == n) else { continue };
            let tiles = pending.entry(n).or_default();
            tiles.insert(index, img);
            if tiles.len() as u64 == range.end - range.first {
                let tiles = pending.remove(&n).unwrap_or_default().into_values().collect();
                entries.push(outputs::put_grid(&out, &spec, range, tiles).await?);
            }
        }
        Ok::<_, OutputError>(entries)
    });
    let written = sink::write_shard(target, rx, move |i, img| {
        if (first_grid..end_grid).contains(&(i / per_grid)) {
            let _ = tile_tx.send((i, img.clone()));
        }
    })
    .await;
    // The sender went with the closure: the grid writer ends once it has drained.
    let grid_entries = grid_writer.await.map_err(|e| OutputError::Internal(e.to_string()))?;
    let written = written?;
    let mut grids = grid_entries?;
    grids.sort_by_key(|g| g.index);
    Ok(Uploaded { files: written.files, index: written.index, grids, adopted: written.adopted })
}

/// Extends the lease while the shard runs; stops the shard if the lease is lost (the job was cancelled
/// or the lease expired and was taken over).
async fn keep_alive(ctx: Arc<WorkerContext>, mut lease: Lease, stop: Arc<AtomicBool>) {
    let period = ctx.config.lease_ttl / 4;
    loop {
        tokio::time::sleep(period).await;
        match ctx.queue.heartbeat(&mut lease, ctx.config.lease_ttl).await {
            Ok(()) => {}
            Err(QueueError::LeaseLost { .. }) => {
                stop.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat"),
        }
    }
}

/// The delay before attempt `attempt + 1`: `base` doubled per failed attempt, at most five minutes.
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(Duration::from_secs(300))
}

/// Tells the queue how a shard failed: an outage gives it back for later at no cost in attempts, a
/// failure spends the attempt, and a shard that can never run is dead-lettered.
pub async fn give_back(ctx: &WorkerContext, lease: &Lease, error: ShardError) {
    let reason = error.to_string();
    let told = match error {
        ShardError::StoreUnavailable(_) | ShardError::QueueUnavailable(_) => {
            let outage = if matches!(error, ShardError::StoreUnavailable(_)) {
                &ctx.store_outage
            } else {
                &ctx.queue_outage
            };
            let pause = outage.failed(ctx.config.outage_backoff);
            metrics::counter!("ddpm_shard_postponed_total").increment(1);
            tracing::warn!(
                error = reason,
                pause_seconds = pause.as_secs_f64(),
                "store or queue unavailable; shard postponed"
            );
            ctx.queue.release(lease, pause, &reason).await
        }
        ShardError::Failed(_) => {
            metrics::counter!("ddpm_shard_failures_total").increment(1);
            tracing::warn!(error = reason, "shard failed");
            ctx.queue.retry_later(lease, backoff(ctx.config.retry_delay, lease.attempt), &reason).await
        }
        ShardError::Fatal(_) => {
            tracing::warn!(error = reason, "shard cannot run");
            ctx.queue.dead_letter(lease, &reason).await
        }
    };
    match told {
        Ok(()) | Err(QueueError::LeaseLost { .. }) => {}
        // The lease expires and the reaper requeues the shard.
        Err(e) => tracing::warn!(error = %e, "giving the shard back"),
    }
}

async fn release(ctx: &WorkerContext, lease: &Lease) {
    match ctx.queue.release(lease, Duration::ZERO, "released untried").await {
        Ok(()) => tracing::info!(job_id = lease.job_id, shard = lease.shard, "shard released untried"),
        Err(e) => tracing::warn!(error = %e, "releasing the shard"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_five_minutes() {
        let base = Duration::from_secs(2);
        let delays: Vec<u64> = (1..=10).map(|a| backoff(base, a).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff(base, u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn outages_are_not_failures() {
        let unavailable =
            crate::storage::StorageError::Unavailable { uri: "s3://b/k".into(), message: "refused".into() };
        assert!(matches!(ShardError::from(unavailable), ShardError::StoreUnavailable(_)));
        let refused = crate::storage::StorageError::Remote { uri: "s3://b/k".into(), message: "403".into() };
        assert!(matches!(ShardError::from(refused), ShardError::Failed(_)));
        let down = QueueError::Unavailable("down".into());
        assert!(matches!(ShardError::from(down), ShardError::QueueUnavailable(_)));
        assert!(matches!(ShardError::from(QueueError::Corrupt("x".into())), ShardError::Failed(_)));
    }
}
