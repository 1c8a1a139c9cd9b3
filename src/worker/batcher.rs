//! The batcher: one async task per device that keeps the next batches ready. It leases shards ahead of
//! the device, reads each one's job once, checks the shard can run here, co-batches, starts each
//! shard's output stage ([`super::finisher`]), cuts the rows into batches and hands them over as
//! [`ReadyBatch`]es through a channel of one, drawing each batch's noise while the one before it
//! samples.
//!
//! Co-batching: when a shard's last batch is short, the batcher leases further shards and fills that
//! batch's padding rows with the samples of shards of the same model, scheduler, steps, η and batch
//! size. Every row has its own seed and the UNet always runs at the batch size, so each image is the
//! one its job gets alone at that batch size; only fewer UNet calls are made. A leased shard that does
//! not fit goes straight back to the queue, attempt unspent.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::WorkerContext;
use super::device::{BatchTemplate, Demand, ReadyBatch, Row, Sampled, ShardHandle};
use super::finisher::{self, RanOn, ShardError, ShardOutput};
use super::outputs::JobOutputs;
use crate::dataset::sink::ShardTarget;
use crate::job::{JobRecord, ShardPayload};
use crate::queue::{Lease, QueueError};
use crate::sampler;
use crate::schedulers::SchedulerConfig;

/// Shard groups of one device in flight: one uploading, one sampling, one leased ahead.
const IN_FLIGHT_GROUPS: usize = 3;

/// What the batcher knows of its device.
pub struct DeviceSlot {
    /// The device's name in leases, records and metrics (`cuda:0`).
    pub name: String,
    /// Models loaded on the device, with the largest batch each fits (`None`: no limit found).
    pub models: BTreeMap<String, Option<usize>>,
    /// Whether the device waits for a batch.
    pub demand: Arc<Demand>,
    /// How it computes, for its shards' records.
    pub ran_on: RanOn,
}

/// Leases, groups and hands over batches until the worker drains or the device's channel closes; then
/// waits for its shards' output stages.
pub async fn run(ctx: Arc<WorkerContext>, device: DeviceSlot, batches: mpsc::Sender<ReadyBatch>) {
    let owner = format!("{}/{}", ctx.config.worker_id, device.name);
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_GROUPS));
    // Whether the queue was found empty (or out of reach) since the last batch was handed over.
    let mut starved = true;
    while !ctx.draining.load(Ordering::Relaxed) && !batches.is_closed() {
        // While the store or the queue is out, nobody leases: leases would only fail or be given back.
        if let Some(pause) = ctx.store_outage.remaining().max(ctx.queue_outage.remaining()) {
            starved = true;
            idle(&ctx, pause).await;
            continue;
        }
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else { break };
        let first = match lease_member(&ctx, &device, &owner, &|_, _| true).await {
            Leased::Member(m) => *m,
            Leased::Nothing | Leased::Declined => continue,
            Leased::Empty => {
                starved = true;
                idle(&ctx, ctx.config.idle_poll).await;
                continue;
            }
        };
        if dispatch(&ctx, &device, &owner, first, permit, &batches, !starved).await.is_err() {
            break;
        }
        starved = false;
    }
    drop(batches);
    // The output stages of this device's shards end before the device thread does.
    let _ = in_flight.acquire_many(IN_FLIGHT_GROUPS as u32).await;
}

/// Waits up to `limit`, or until work may be available.
async fn idle(ctx: &WorkerContext, limit: Duration) {
    let _ = tokio::time::timeout(limit, ctx.wake.notified()).await;
}

/// A leased shard ready to sample: its output stage is running, and its handle takes its images.
struct Member {
    output: ShardOutput,
    job: JobRecord,
    scheduler: SchedulerConfig,
    handle: Arc<ShardHandle>,
    /// How its sampling ended: for its finisher.
    heard: oneshot::Receiver<Sampled>,
}

impl Member {
    fn rows(&self) -> u64 {
        self.output.rows()
    }

    /// Its rows, in sample order: sample `i` is seeded `seed + i`.
    fn batch_rows(&self) -> impl Iterator<Item = Row> + '_ {
        let seed = self.job.spec.seed;
        let classes = self.job.spec.classes.as_ref().map(|c| c.layout());
        (self.output.payload.start..self.output.payload.end).map(move |index| Row {
            shard: Arc::clone(&self.handle),
            index,
            seed: seed + index,
            class: classes.as_ref().and_then(|c| c.class_of(index)).map(i64::from),
        })
    }
}

enum Leased {
    Member(Box<Member>),
    /// A shard was leased, but there is nothing to sample (done already, or given back).
    Nothing,
    /// A shard was leased, `accept` declined it, and it went back to the queue.
    Declined,
    /// The queue had no shard (or could not be reached).
    Empty,
}

/// Leases one shard and, if `accept` takes its job and sample range, makes it a [`Member`].
async fn lease_member(
    ctx: &Arc<WorkerContext>,
    device: &DeviceSlot,
    owner: &str,
    accept: &(dyn Fn(&JobRecord, &ShardPayload) -> bool + Sync),
) -> Leased {
    let leased = ctx.queue.lease(owner, ctx.config.lease_ttl).await;
    if leased.is_ok() {
        ctx.queue_outage.recovered();
    }
    let lease = match leased {
        Ok(Some(lease)) => lease,
        Ok(None) => return Leased::Empty,
        Err(e) => {
            let pause = ctx.queue_outage.failed(ctx.config.outage_backoff);
            tracing::warn!(error = %e, pause_seconds = pause.as_secs_f64(), "leasing a shard");
            return Leased::Empty;
        }
    };
    metrics::counter!("ddpm_tasks_leased_total").increment(1);
    // The job first: its trace context is the shard span's parent, set before the span starts.
    let job = ctx.queue.job(&lease.job_id).await;
    // Numbers as i64: tracing-opentelemetry exports other integer types as text.
    let span = tracing::info_span!(
        parent: None,
        "shard",
        job_id = lease.job_id,
        shard = lease.shard as i64,
        attempt = i64::from(lease.attempt),
        device = device.name,
    );
    // Trace-only attributes, kept out of every log line of the shard.
    span.set_attribute("worker", ctx.config.worker_id.clone());
    let payload = lease.range();
    if let Ok(Some(job)) = &job {
        crate::telemetry::set_parent(&span, &job.spec.trace_context);
        span.set_attribute("model", job.spec.model.clone());
        if let Ok(payload) = &payload
            && !accept(job, payload)
        {
            let given = ctx.queue.release(&lease, Duration::ZERO, "not co-batched").await;
            if let Err(e) = given {
                tracing::warn!(parent: &span, error = %e, "giving back a shard not co-batched");
            }
            return Leased::Declined;
        }
    }
    let admitted =
        tracing::Instrument::instrument(admit(ctx, device, &lease, job, payload), span.clone()).await;
    match admitted {
        Ok(Some(admitted)) => {
            let (job, payload, out, scheduler, target) = admitted;
            let (output, samples) = ShardOutput::start(ctx, lease, payload, out, &job.spec, target, span);
            let (handle, heard) = ShardHandle::new(output.rows(), Arc::clone(&output.stop), samples);
            Leased::Member(Box::new(Member { output, job, scheduler, handle, heard }))
        }
        Ok(None) => Leased::Nothing,
        Err(e) => {
            tracing::Instrument::instrument(finisher::give_back(ctx, &lease, e), span).await;
            Leased::Nothing
        }
    }
}

type Admitted = (JobRecord, ShardPayload, JobOutputs, SchedulerConfig, ShardTarget);

/// Checks a leased shard can run on this device and where its outputs go; `None` when there is nothing
/// to sample because the job is over or an earlier attempt already recorded the shard (then it is
/// completed here).
async fn admit(
    ctx: &Arc<WorkerContext>,
    device: &DeviceSlot,
    lease: &Lease,
    job: Result<Option<JobRecord>, QueueError>,
    payload: Result<ShardPayload, QueueError>,
) -> Result<Option<Admitted>, ShardError> {
    let Some(job) = job? else {
        return Err(ShardError::Fatal("job record missing".into()));
    };
    if job.state.is_terminal() {
        return Ok(None);
    }
    let payload = payload.map_err(|e| ShardError::Fatal(e.to_string()))?;
    tracing::Span::current().set_attribute("samples", (payload.end - payload.start) as i64);
    let name = &job.spec.model;
    let (Some(fits), Some(model)) = (device.models.get(name), ctx.models.get(name)) else {
        return Err(ShardError::Failed(format!("model {name:?} is not served by this worker")));
    };
    // Guidance runs each batch doubled: twice the rows through the UNet.
    let guided = job.spec.guidance();
    let rows = job.spec.batch_size as usize * crate::sampler::Guidance::rows(guided);
    if let Some(fits) = *fits
        && rows > fits
    {
        // Another worker's device may be larger: the shard is retried there, and fails the job once its
        // attempts are spent.
        let doubled = if guided.is_some() { " (doubled by guidance)" } else { "" };
        return Err(ShardError::Failed(format!(
            "batch size {}{doubled} of model {name:?} does not fit in {}'s memory (at most {fits} rows fit)",
            job.spec.batch_size, device.name
        )));
    }
    let scheduler = model.scheduler(job.spec.scheduler).map_err(|e| ShardError::Fatal(e.to_string()))?;
    let out = ctx.outputs.for_job(&job.id, &job.spec).await?;
    if let Some(record) = out.shard_record(lease.shard).await?
        && (record.run.start, record.run.end) == (payload.start, payload.end)
    {
        tracing::info!("shard already recorded by attempt {}; not sampling it again", record.run.attempt);
        finisher::complete(ctx, lease, record.run.end - record.run.start).await;
        return Ok(None);
    }
    let writer = crate::dataset::index::Writer {
        shard: lease.shard,
        worker: ctx.config.worker_id.clone(),
        attempt: lease.attempt,
    };
    let mtime = (job.created_at_ms.max(0) / 1000) as u64;
    let range = (lease.shard, payload.start, payload.end);
    let target = out.shard_target(&job.spec, model, range, writer, mtime, ctx.config.scratch_dir.clone());
    Ok(Some((job, payload, out, scheduler, target)))
}

/// Leases shards into `group` while its last batch has padding rows that a compatible shard fills
/// whole; the first leased shard that does not goes back to the queue, and the search ends.
async fn fill_batch(ctx: &Arc<WorkerContext>, device: &DeviceSlot, owner: &str, group: &mut Vec<Member>) {
    let batch_size = u64::from(group[0].job.spec.batch_size);
    let rows: u64 = group.iter().map(Member::rows).sum();
    let mut padding = rows.div_ceil(batch_size) * batch_size - rows;
    let key = |s: &crate::job::JobSpec| {
        let guidance = s.guidance().map(|g| (g.scale.to_bits(), g.null_class));
        (s.model.clone(), s.scheduler, s.steps, s.eta.map(f32::to_bits), s.batch_size, guidance)
    };
    let wanted = key(&group[0].job.spec);
    // A leased shard with nothing to sample is skipped; the bound keeps a queue of finished shards
    // from holding the device.
    for _ in 0..batch_size {
        if padding == 0 || ctx.draining.load(Ordering::Relaxed) {
            return;
        }
        let fits = |job: &JobRecord, p: &ShardPayload| key(&job.spec) == wanted && p.end - p.start <= padding;
        match lease_member(ctx, device, owner, &fits).await {
            Leased::Member(m) => {
                padding -= m.rows();
                group.push(*m);
            }
            Leased::Nothing => continue,
            Leased::Declined | Leased::Empty => return,
        }
    }
}

/// How often a batch with padding rows looks for shards to fill them while the device is busy.
const FILL_TRIES: usize = 16;

/// Hands a group's batches to the device one at a time, each batch's noise drawn while the one before
/// it samples; the group is `lead` and, when its last batch is short, the shards that fill it
/// (co-batching), looked for up to the moment the device asks for that batch. Then starts the group's
/// finishers. `Err` when the device's channel closed (the shards not handed over are then given back
/// untried by their finishers).
async fn dispatch(
    ctx: &Arc<WorkerContext>,
    device: &DeviceSlot,
    owner: &str,
    lead: Member,
    permit: tokio::sync::OwnedSemaphorePermit,
    batches: &mpsc::Sender<ReadyBatch>,
    fed: bool,
) -> Result<(), ()> {
    let spec = &lead.job.spec;
    let span = lead.output.span.clone();
    let batch_size = spec.batch_size as usize;
    let template = BatchTemplate {
        model: spec.model.clone(),
        scheduler: Arc::new(lead.scheduler.clone()),
        batch_size,
        steps: spec.steps as usize,
        eta: spec.eta.unwrap_or(0.0),
        guidance: spec.guidance(),
        shape: ctx.models.get(&spec.model).and_then(|m| sampler::sample_shape(&m.unet_config).ok()),
        span: span.clone(),
    };
    let mut rows: VecDeque<Row> = lead.batch_rows().collect();
    let mut group = vec![lead];
    let (mut number, mut fed) = (0, fed);
    let mut sent = Ok(());
    while !rows.is_empty() && sent.is_ok() {
        sent = match batches.reserve().await {
            Ok(slot) => {
                // The last batch is short: shards of other jobs fill it, up to the moment it is asked for.
                if rows.len() < batch_size && ctx.config.co_batch {
                    fill_late(ctx, device, owner, &mut group, &mut rows).await;
                }
                let batch: Vec<Row> = rows.drain(..batch_size.min(rows.len())).collect();
                slot.send(ReadyBatch::new(&template, batch, number, fed));
                (number, fed) = (number + 1, true);
                Ok(())
            }
            Err(_) => Err(()),
        };
    }
    if group.len() > 1 {
        let jobs: std::collections::BTreeSet<_> = group.iter().map(|m| &m.job.id).collect();
        tracing::info!(
            parent: &span,
            shards = group.len(),
            samples = group.iter().map(Member::rows).sum::<u64>(),
            "co-batching shards of {} jobs",
            jobs.len()
        );
        metrics::counter!("ddpm_co_batched_shards_total").increment(group.len() as u64 - 1);
    }
    // Every shard after the first fits in the first's last batch: all of them shared that batch.
    let ids: Vec<String> = group.iter().map(|m| format!("{}/{}", m.job.id, m.output.lease.shard)).collect();
    let permit = Arc::new(permit);
    for (m, member) in group.into_iter().enumerate() {
        let batched_with =
            ids.iter().enumerate().filter(|(i, _)| *i != m).map(|(_, id)| id.clone()).collect();
        let ran_on = device.ran_on.clone();
        tokio::spawn(finisher::finish(
            Arc::clone(ctx),
            member.output,
            member.heard,
            ran_on,
            batched_with,
            Arc::clone(&permit),
        ));
    }
    sent
}

/// Fills the padding rows of a group's last batch with compatible shards, trying again whenever work
/// may have arrived, until they are full or the device waits for the batch.
async fn fill_late(
    ctx: &Arc<WorkerContext>,
    device: &DeviceSlot,
    owner: &str,
    group: &mut Vec<Member>,
    rows: &mut VecDeque<Row>,
) {
    for _ in 0..FILL_TRIES {
        let before = group.len();
        fill_batch(ctx, device, owner, group).await;
        for member in &group[before..] {
            rows.extend(member.batch_rows());
        }
        let padding = group[0].job.spec.batch_size as usize - rows.len();
        if padding == 0 || device.demand.is_waiting() || ctx.draining.load(Ordering::Relaxed) {
            return;
        }
        tokio::select! {
            _ = device.demand.asked() => {}
            _ = ctx.wake.notified() => {}
            _ = tokio::time::sleep(ctx.config.idle_poll) => {}
        }
    }
}
