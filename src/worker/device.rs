//! One OS thread per device: it owns a UNet replica of every served model and pulls shards from the
//! queue. Sampling stays on the thread; PNG encoding, uploads and the shard's bookkeeping run on the
//! tokio runtime, overlapping the next shard's sampling.
//!
//! A shard's outputs are written create-only ([`storage::write_once`](crate::storage::write_once)) and
//! its record only after a fenced check that the lease is still held, so a worker that lost its lease
//! (paused, cut off, or its job cancelled) cannot change what another attempt recorded.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use image::DynamicImage;
use tch::Device;

use super::WorkerContext;
use super::outputs::{self, GridEntry, JobOutputs, OutputError, ShardRecord, ShardRun};
use crate::dataset::StoredFile;
use crate::dataset::sink::{self, ShardTarget};
use crate::imaging;
use crate::job::{JobRecord, ShardPayload};
use crate::model::{LoadedUNet, ModelError};
use crate::placement::device_name;
use crate::queue::{Lease, QueueError};
use crate::sampler::{self, BatchRequest, Placement, SampleError};
use crate::schedulers::SchedulerConfig;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Shards of one device whose outputs may still be uploading while it samples the next.
const IN_FLIGHT_SHARDS: usize = 2;

/// A device thread's models, loaded and warmed.
pub struct DeviceModels {
    device: Device,
    unets: BTreeMap<String, LoadedUNet>,
    /// CUDA: the largest batch of each model whose forward fits in the device's memory (the API's limit
    /// when it fits, else the largest power of two below it that does), found at warm-up.
    max_batch: BTreeMap<String, usize>,
}

/// The largest batch size `b ≤ limit` for which `fits(b)`, trying `limit` first and then powers of two
/// downwards; `None` when not even 1 fits. `fits` errors other than running out of memory stop the
/// search.
pub fn largest_fitting<E>(
    limit: usize,
    mut fits: impl FnMut(usize) -> Result<bool, E>,
) -> Result<Option<usize>, E> {
    let mut b = limit.max(1);
    loop {
        if fits(b)? {
            return Ok(Some(b));
        }
        if b == 1 {
            return Ok(None);
        }
        // The largest power of two below b.
        b = 1 << (usize::BITS - 1 - (b - 1).leading_zeros());
    }
}

thread_local! {
    /// Set while a probe expects libtorch's out-of-memory panics, which are then not printed.
    static PROBING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Wraps the panic hook (once) so that panics of a probing thread are not printed; every other panic
/// goes to the hook as before.
fn quiet_probe_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !PROBING.with(std::cell::Cell::get) {
                previous(info)
            }
        }));
    });
}

/// Whether a forward of `batch` rows runs on the UNet's device: `Ok(false)` when it ran out of memory.
fn forward_fits(unet: &LoadedUNet, kind: tch::Kind, batch: usize) -> Result<bool, ModelError> {
    let device = unet.vs.device();
    let (h, w) = unet.config.sample_hw()?;
    quiet_probe_panics();
    PROBING.with(|p| p.set(true));
    let run = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<(), tch::TchError> {
        let x = tch::Tensor::f_zeros([batch as i64, unet.config.in_channels, h, w], (kind, device))?;
        let _ = unet.forward(&x, 0);
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        Ok(())
    }));
    PROBING.with(|p| p.set(false));
    let message = match run {
        Ok(Ok(())) => return Ok(true),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic_message(&panic),
    };
    if message.contains("out of memory") {
        Ok(false)
    } else {
        Err(ModelError::Torch(tch::TchError::Torch(message)))
    }
}

impl DeviceModels {
    /// Loads every model on `device` and runs one forward pass each, so the first shard does not pay
    /// for allocator and kernel warm-up. It runs inside the device thread's `catch_unwind`
    /// ([`super::pool`]): a libtorch panic here (out of memory, a kernel error) loses the device, and
    /// the worker is no longer live.
    pub fn load(ctx: &WorkerContext, device: Device) -> Result<Self, ModelError> {
        let mut unets = BTreeMap::new();
        let mut max_batch = BTreeMap::new();
        let _guard = tch::no_grad_guard();
        for (name, model) in ctx.models.iter() {
            let graphs = ctx.config.cuda_graphs && device.is_cuda();
            let unet = LoadedUNet::prepare(&model.files, device, ctx.config.kind, ctx.config.layout, graphs)?;
            let (h, w) = unet.config.sample_hw()?;
            // Threads sharing a GPU warm up and probe one at a time, or each would see the other's
            // memory in use and settle on a smaller batch.
            let _first = crate::model::graphs::first_call_lock(device);
            let x = tch::Tensor::f_zeros([1, unet.config.in_channels, h, w], (ctx.config.kind, device))?;
            let _ = unet.forward(&x, 0);
            if super::fault::injected("warmup-panic") {
                panic!("injected fault: warm-up of {name} on {}", device_name(device));
            }
            if device.is_cuda() {
                // Found here, not by a job failing half-way: the API's largest batch, or what fits.
                let limit = ctx.config.max_batch_size;
                let fits = largest_fitting(limit, |b| forward_fits(&unet, ctx.config.kind, b))?;
                let Some(fits) = fits else {
                    return Err(ModelError::Unsupported(format!(
                        "{name} does not fit in {}'s memory even at batch size 1",
                        device_name(device)
                    )));
                };
                if fits < limit {
                    tracing::warn!(
                        model = name,
                        device = device_name(device),
                        max_batch_size = fits,
                        api_limit = limit,
                        "jobs of this model with a larger batch size will be refused by this device"
                    );
                }
                metrics::gauge!("ddpm_device_max_batch_size", "device" => device_name(device), "model" => name.clone())
                    .set(fits as f64);
                max_batch.insert(name.clone(), fits);
            }
            unets.insert(name.clone(), unet);
        }
        Ok(Self { device, unets, max_batch })
    }
}

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
            QueueError::Nats(_) | QueueError::Sqlite(_) => ShardError::QueueUnavailable(e.to_string()),
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
    /// Given back untried (the drain's grace period ran out).
    Released,
}

/// Whether `device` still computes: a tiny kernel and a copy back. A CUDA context poisoned by an
/// illegal access or a device-side assert fails every later call, this one included.
fn device_usable(device: tch::Device) -> Result<(), String> {
    if super::fault::injected("device-lost") {
        return Err("injected fault: CUDA error: an illegal memory access was encountered".into());
    }
    std::panic::catch_unwind(|| -> Result<(), tch::TchError> {
        let x = tch::Tensor::f_ones([16], (tch::Kind::Float, device))?;
        let sum = x.f_sum(tch::Kind::Float)?.f_to_device(tch::Device::Cpu)?.f_double_value(&[])?;
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        if sum == 16.0 { Ok(()) } else { Err(tch::TchError::Torch(format!("1 × 16 summed to {sum}"))) }
    })
    .map_err(|panic| panic_message(&panic))?
    .map_err(|e| e.to_string())
}

/// The device thread's loop: lease, sample, hand off, until the worker drains. `Err` when the device
/// became unusable (the shards that found out were given back untried).
///
/// Co-batching: when a shard's last batch is short, the thread leases further shards and fills that
/// batch's padding rows with the samples of shards of the same model, scheduler, steps, η and batch
/// size. Every row has its own seed and the UNet always runs at the batch size, so each image is the
/// one its job gets alone at that batch size; only fewer UNet calls are made. A leased shard that does
/// not fit goes straight back to the queue, attempt unspent.
pub fn run(ctx: Arc<WorkerContext>, models: DeviceModels, threads: Option<i32>) -> Result<(), String> {
    if let Some(n) = threads {
        tch::set_num_threads(n);
    }
    let device = device_name(models.device);
    let owner = format!("{}/{device}", ctx.config.worker_id);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_SHARDS));
    while !ctx.draining.load(Ordering::Relaxed) {
        // While the store or the queue is out, nobody leases: leases would only fail or be given back.
        if let Some(pause) = ctx.store_outage.remaining().max(ctx.queue_outage.remaining()) {
            idle(&ctx, pause);
            continue;
        }
        let permit = match ctx.runtime.block_on(Arc::clone(&in_flight).acquire_owned()) {
            Ok(p) => p,
            Err(_) => break,
        };
        let first = match lease_member(&ctx, &models, &device, &owner, &|_, _| true) {
            Leased::Member(m) => *m,
            Leased::Nothing | Leased::Declined => continue,
            Leased::Empty => {
                idle(&ctx, ctx.config.idle_poll);
                continue;
            }
        };
        let mut group = vec![first];
        if ctx.config.co_batch {
            fill_batch(&ctx, &models, &device, &owner, &mut group);
        }
        if let Err(lost) = run_group(&ctx, &models, &device, group, permit) {
            let _ = ctx.runtime.block_on(in_flight.acquire_many(IN_FLIGHT_SHARDS as u32));
            return Err(format!("{device}: the device is unusable: {lost}"));
        }
    }
    // Wait for this device's shards to finish their uploads before the thread ends.
    let _ = ctx.runtime.block_on(in_flight.acquire_many(IN_FLIGHT_SHARDS as u32));
    Ok(())
}

/// Waits up to `limit`, or until work may be available or the worker drains.
fn idle(ctx: &WorkerContext, limit: Duration) {
    let wait = ctx.wake.notified();
    let _ = ctx.runtime.block_on(async { tokio::time::timeout(limit, wait).await });
}

/// A leased shard ready to sample: its lease is kept alive, and its samples go to its uploader as they
/// come.
struct Member {
    lease: Lease,
    job: JobRecord,
    payload: ShardPayload,
    out: JobOutputs,
    scheduler: SchedulerConfig,
    stop: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
    tx: Option<tokio::sync::mpsc::Sender<(u64, DynamicImage)>>,
    uploads: tokio::task::JoinHandle<Result<Uploaded, OutputError>>,
    span: tracing::Span,
}

impl Member {
    fn rows(&self) -> u64 {
        self.payload.end - self.payload.start
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
fn lease_member(
    ctx: &Arc<WorkerContext>,
    models: &DeviceModels,
    device: &str,
    owner: &str,
    accept: &dyn Fn(&JobRecord, &ShardPayload) -> bool,
) -> Leased {
    let leased = ctx.runtime.block_on(ctx.queue.lease(owner, ctx.config.lease_ttl));
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
    let job = ctx.runtime.block_on(ctx.queue.job(&lease.job_id));
    // Numbers as i64: tracing-opentelemetry exports other integer types as text.
    let span = tracing::info_span!(
        parent: None,
        "shard",
        job_id = lease.job_id,
        shard = lease.shard as i64,
        attempt = i64::from(lease.attempt),
        device,
    );
    // Trace-only attributes, kept out of every log line of the shard.
    span.set_attribute("worker", ctx.config.worker_id.clone());
    if let Ok(Some(job)) = &job {
        crate::telemetry::set_parent(&span, &job.spec.trace_context);
        span.set_attribute("model", job.spec.model.clone());
        if let Ok(payload) = serde_json::from_str::<ShardPayload>(&lease.payload)
            && !accept(job, &payload)
        {
            let given = ctx.runtime.block_on(ctx.queue.release(&lease, Duration::ZERO, "not co-batched"));
            if let Err(e) = given {
                tracing::warn!(parent: &span, error = %e, "giving back a shard not co-batched");
            }
            return Leased::Declined;
        }
    }
    match admit(ctx, models, device, lease, job, span) {
        Some(m) => Leased::Member(Box::new(m)),
        None => Leased::Nothing,
    }
}

/// Checks a leased shard can run here and starts its heartbeat and uploader; `None` when there is
/// nothing to sample or it was given back.
fn admit(
    ctx: &Arc<WorkerContext>,
    models: &DeviceModels,
    device: &str,
    lease: Lease,
    job: Result<Option<JobRecord>, QueueError>,
    span: tracing::Span,
) -> Option<Member> {
    let _enter = span.enter();
    let rt = &ctx.runtime;
    let (job, payload, out) = match rt.block_on(prepare(ctx, &lease, job)) {
        Ok(Some(p)) => p,
        Ok(None) => return None, // nothing to sample: already done or the job is over
        Err(e) => {
            rt.block_on(give_back(ctx, &lease, e));
            return None;
        }
    };
    if !models.unets.contains_key(&job.spec.model) {
        let error = format!("model {:?} is not served by this worker", job.spec.model);
        rt.block_on(give_back(ctx, &lease, ShardError::Failed(error)));
        return None;
    }
    let model = ctx.models.get(&job.spec.model)?;
    if let Some(&fits) = models.max_batch.get(&job.spec.model)
        && job.spec.batch_size as usize > fits
    {
        // Another worker's device may be larger: the shard is retried there, and fails the job once its
        // attempts are spent.
        let error = format!(
            "batch size {} of model {:?} does not fit in {device}'s memory (at most {fits} fits)",
            job.spec.batch_size, job.spec.model
        );
        rt.block_on(give_back(ctx, &lease, ShardError::Failed(error)));
        return None;
    }
    let scheduler = match model.scheduler(job.spec.scheduler) {
        Ok(s) => s,
        Err(e) => {
            rt.block_on(give_back(ctx, &lease, ShardError::Fatal(e.to_string())));
            return None;
        }
    };

    let stop = ctx.active.register(&job.id);
    let heartbeat = rt.spawn(keep_alive(Arc::clone(ctx), lease.clone(), Arc::clone(&stop)));
    let (tx, rx) = tokio::sync::mpsc::channel::<(u64, DynamicImage)>(job.spec.batch_size as usize * 2);
    let target = ShardTarget {
        store: Arc::clone(&out.store),
        base: out.base.clone(),
        options: job.spec.dataset,
        context: outputs::sample_context(&job.spec, model),
        shard: lease.shard,
        start: payload.start,
        end: payload.end,
        writer: crate::dataset::index::Writer {
            shard: lease.shard,
            worker: ctx.config.worker_id.clone(),
            attempt: lease.attempt,
        },
        mtime: (job.created_at_ms.max(0) / 1000) as u64,
        scratch: ctx.config.scratch_dir.clone(),
    };
    let uploads = rt.spawn(upload_shard(out.clone(), job.spec.clone(), target, rx));
    drop(_enter);
    Some(Member { lease, job, payload, out, scheduler, stop, heartbeat, tx: Some(tx), uploads, span })
}

/// Leases shards into `group` while its last batch has padding rows that a compatible shard fills
/// whole; the first leased shard that does not goes back to the queue, and the search ends.
fn fill_batch(
    ctx: &Arc<WorkerContext>,
    models: &DeviceModels,
    device: &str,
    owner: &str,
    group: &mut Vec<Member>,
) {
    let batch_size = u64::from(group[0].job.spec.batch_size);
    let rows: u64 = group.iter().map(Member::rows).sum();
    let mut padding = rows.div_ceil(batch_size) * batch_size - rows;
    // A leased shard with nothing to sample is skipped; the bound keeps a queue of finished shards
    // from holding the device.
    for _ in 0..batch_size {
        if padding == 0 || ctx.draining.load(Ordering::Relaxed) {
            return;
        }
        let lead = &group[0].job.spec;
        let fits = |job: &JobRecord, p: &ShardPayload| {
            let s = &job.spec;
            (&s.model, s.scheduler, s.steps, s.eta.map(f32::to_bits), s.batch_size)
                == (&lead.model, lead.scheduler, lead.steps, lead.eta.map(f32::to_bits), lead.batch_size)
                && p.end - p.start <= padding
        };
        match lease_member(ctx, models, device, owner, &fits) {
            Leased::Member(m) => {
                padding -= m.rows();
                group.push(*m);
            }
            Leased::Nothing => continue,
            Leased::Declined | Leased::Empty => return,
        }
    }
}

/// How a member's sampling ended.
enum Sampled {
    Done,
    Cancelled,
    Failed(String),
}

/// Samples a group of shards in shared batches and hands each shard's outputs to its own finishing
/// task. `Err` when sampling failed because the device no longer works: the shards are then given back
/// without spending an attempt.
fn run_group(
    ctx: &Arc<WorkerContext>,
    models: &DeviceModels,
    device: &str,
    mut group: Vec<Member>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), String> {
    let permit = Arc::new(permit);
    let lead = &group[0];
    let Some(unet) = models.unets.get(&lead.job.spec.model) else {
        // Checked when each shard was admitted; should it happen, the shards fail, not the device.
        for member in group {
            let sampled = Sampled::Failed("the model is not loaded on this device".into());
            let done = Done { sampled, sampling_seconds: 0.0, device_lost: false, batched_with: Vec::new() };
            finish(ctx, member, done, device, Arc::clone(&permit));
        }
        return Ok(());
    };
    let _enter = lead.span.clone().entered();
    if group.len() > 1 {
        tracing::info!(
            shards = group.len(),
            samples = group.iter().map(Member::rows).sum::<u64>(),
            "co-batching shards of {} jobs",
            group.iter().map(|m| &m.job.id).collect::<std::collections::BTreeSet<_>>().len()
        );
        metrics::counter!("ddpm_co_batched_shards_total").increment(group.len() as u64 - 1);
    }
    let spec = &lead.job.spec;
    let batch_size = spec.batch_size as usize;
    let scheduler = lead.scheduler.clone();
    let (steps, eta) = (spec.steps as usize, spec.eta.unwrap_or(0.0));
    // Every row of the group: (member, sample index, seed), in shard order.
    let rows: Vec<(usize, u64, u64)> = group
        .iter()
        .enumerate()
        .flat_map(|(m, member)| {
            let seed = member.job.spec.seed;
            (member.payload.start..member.payload.end).map(move |i| (m, i, seed + i))
        })
        .collect();
    // The last row of each member: its channel closes once that row is handed over.
    let last: Vec<usize> =
        (0..group.len()).map(|m| rows.iter().rposition(|r| r.0 == m).unwrap_or(0)).collect();
    let mut outcome: Vec<Option<Sampled>> = (0..group.len()).map(|_| None).collect();

    let started = Instant::now();
    let place = Placement { device: models.device, kind: ctx.config.kind };
    let stopped = |group: &[Member]| group.iter().all(|m| m.stop.load(Ordering::Relaxed));
    let mut failure: Option<SampleError> = None;
    let chunks: Vec<&[(usize, u64, u64)]> = rows.chunks(batch_size).collect();
    let mut ahead = None;
    for (b, &batch) in chunks.iter().enumerate() {
        // Shards stopped (cancelled, lease lost) stop receiving; the batch runs for the others.
        for (m, member) in group.iter_mut().enumerate() {
            if member.stop.load(Ordering::Relaxed) && outcome[m].is_none() {
                member.tx = None;
                outcome[m] = Some(Sampled::Cancelled);
            }
        }
        if batch.iter().all(|r| outcome[r.0].is_some()) {
            continue;
        }
        let seeds: Vec<u64> = batch.iter().map(|r| r.2).collect();
        let req = BatchRequest { seeds: &seeds, batch_size, steps, eta };
        // The next batch's noise is drawn while this one samples (unused if its shards stop meanwhile).
        let next_seeds: Option<Vec<u64>> = chunks.get(b + 1).map(|next| next.iter().map(|r| r.2).collect());
        let next = next_seeds.as_deref().and_then(|seeds| {
            sampler::noise_ahead(unet, &scheduler, &BatchRequest { seeds, batch_size, steps, eta }).ok()
        });
        // One span per batch (UNet passes are too many to trace one by one).
        let _batch = tracing::info_span!(
            "batch",
            first = batch[0].1 as i64,
            rows = seeds.len() as i64,
            steps = steps as i64
        )
        .entered();
        let mut last_step = Instant::now();
        let sampled = if super::fault::injected("device-lost") {
            Err(SampleError::Torch(tch::TchError::Torch(
                "injected fault: CUDA error: an illegal memory access was encountered".into(),
            )))
        } else {
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                sampler::sample_batch(unet, &scheduler, &req, place, ahead.take(), |_| {
                    metrics::histogram!("ddpm_step_duration_seconds")
                        .record(last_step.elapsed().as_secs_f64());
                    last_step = Instant::now();
                    !stopped(&group) && !ctx.abort.load(Ordering::Relaxed)
                })
            }))
            .unwrap_or_else(|panic| Err(SampleError::Torch(tch::TchError::Torch(panic_message(&panic)))))
        };
        ahead = next;
        let images = sampled.and_then(|x0| {
            imaging::to_images(&x0).map_err(|e| SampleError::Torch(tch::TchError::Convert(e.to_string())))
        });
        let images = match images {
            Ok(images) => images,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        for (k, (img, &(m, index, _))) in images.into_iter().zip(batch).enumerate() {
            let member = &mut group[m];
            if let Some(tx) = &member.tx
                && tx.blocking_send((index, img)).is_err()
            {
                // The uploader failed; its error is reported by the finishing task.
                member.tx = None;
                outcome[m] = Some(Sampled::Failed("the uploader stopped".into()));
            }
            if b * batch_size + k == last[m] && outcome[m].is_none() {
                member.tx = None;
                outcome[m] = Some(Sampled::Done);
            }
        }
        metrics::counter!("ddpm_images_generated_total").increment(seeds.len() as u64);
    }
    let sampling_seconds = started.elapsed().as_secs_f64();
    // A failed batch may be the device's fault rather than the shards': if the device no longer
    // computes, the shards go back untried and this thread ends.
    let lost = match &failure {
        None | Some(SampleError::Cancelled) => None,
        Some(_) => device_usable(models.device).err(),
    };
    let failure = failure.map(|e| match e {
        SampleError::Cancelled => Sampled::Cancelled,
        e => Sampled::Failed(e.to_string()),
    });
    let failure_text = match &failure {
        Some(Sampled::Failed(e)) => Some(e.clone()),
        _ => None,
    };
    drop(_enter);
    // Every shard after the first fits in the first's last batch: all of them shared that batch.
    let ids: Vec<String> = group.iter().map(|m| format!("{}/{}", m.job.id, m.lease.shard)).collect();
    for (m, member) in group.into_iter().enumerate() {
        let batched_with =
            ids.iter().enumerate().filter(|(i, _)| *i != m).map(|(_, id)| id.clone()).collect();
        let sampled = match outcome[m].take() {
            Some(s) => s,
            None => match &failure_text {
                Some(e) => Sampled::Failed(e.clone()),
                None => Sampled::Cancelled,
            },
        };
        let done = Done { sampled, sampling_seconds, device_lost: lost.is_some(), batched_with };
        finish(ctx, member, done, device, Arc::clone(&permit));
    }
    match lost {
        Some(reason) => Err(reason),
        None => Ok(()),
    }
}

/// How a shard's sampling went, for its finishing task.
struct Done {
    sampled: Sampled,
    sampling_seconds: f64,
    device_lost: bool,
    batched_with: Vec<String>,
}

/// Waits for a shard's uploads, then records it, or tells the queue why not, on the runtime and in the
/// shard's span. The group's permit is released once every shard of the group is through.
fn finish(
    ctx: &Arc<WorkerContext>,
    member: Member,
    done: Done,
    device: &str,
    permit: Arc<tokio::sync::OwnedSemaphorePermit>,
) {
    let Done { sampled, sampling_seconds, device_lost, batched_with } = done;
    let runtime = ctx.runtime.clone();
    let ctx = Arc::clone(ctx);
    let device = device.to_string();
    let Member { lease, payload, out, stop, heartbeat, tx, uploads, span, .. } = member;
    drop(tx);
    runtime.spawn(tracing::Instrument::instrument(
        async move {
            let _permit = permit;
            let uploaded = uploads.await.map_err(|e| OutputError::Internal(e.to_string())).and_then(|r| r);
            let stopped = stop.load(Ordering::Relaxed);
            let outcome = match (sampled, uploaded) {
                (Sampled::Done, Ok((files, index, grids, adopted))) => {
                    let run = ShardRun {
                        shard: lease.shard,
                        start: payload.start,
                        end: payload.end,
                        worker: ctx.config.worker_id.clone(),
                        device,
                        attempt: lease.attempt,
                        sampling_seconds,
                        adopted,
                        batched_with,
                    };
                    record_shard(&ctx, &lease, &out, &ShardRecord { run, files, index, grids }).await
                }
                (Sampled::Cancelled, _) if ctx.abort.load(Ordering::Relaxed) => {
                    release(&ctx, &lease).await;
                    Ok(Ended::Released)
                }
                (Sampled::Failed(e), _) if device_lost => {
                    tracing::error!(error = e, "the device failed the shard; giving it back untried");
                    release(&ctx, &lease).await;
                    Ok(Ended::Released)
                }
                // Cancelled job or lost lease: the queue already knows; nothing to record.
                (Sampled::Cancelled, _) if stopped => Ok(Ended::Stopped),
                // The uploader's failure stopped the sampling: it is the cause.
                (_, Err(e)) => Err(ShardError::from(e)),
                (Sampled::Failed(e), Ok(_)) => Err(ShardError::Failed(e)),
                (Sampled::Cancelled, Ok(_)) => Err(ShardError::Failed("sampling stopped".into())),
            };
            heartbeat.abort();
            ctx.active.unregister(&lease.job_id, &stop);
            match outcome {
                Err(e) => give_back(&ctx, &lease, e).await,
                Ok(Ended::Recorded) => {
                    ctx.store_outage.recovered();
                    metrics::histogram!("ddpm_shard_duration_seconds").record(sampling_seconds);
                    tracing::info!(samples = payload.end - payload.start, sampling_seconds, "shard finished");
                }
                Ok(Ended::Stopped) => tracing::info!("shard stopped"),
                Ok(Ended::Released) => {}
            }
            ctx.wake.notify_waiters();
        },
        span,
    ));
}
type Prepared = (JobRecord, ShardPayload, JobOutputs);

/// The job (as read for the lease), sample range and output folder of a lease; `None` when there is
/// nothing to sample because the job is over or an earlier attempt already recorded the shard (then it
/// is completed here).
async fn prepare(
    ctx: &WorkerContext,
    lease: &Lease,
    job: Result<Option<JobRecord>, QueueError>,
) -> Result<Option<Prepared>, ShardError> {
    let Some(job) = job? else {
        return Err(ShardError::Fatal("job record missing".into()));
    };
    if job.state.is_terminal() {
        return Ok(None);
    }
    let payload: ShardPayload = serde_json::from_str(&lease.payload)
        .map_err(|e| ShardError::Fatal(format!("unreadable shard payload: {e}")))?;
    tracing::Span::current().set_attribute("samples", (payload.end - payload.start) as i64);
    let out = ctx.outputs.for_job(&job.id, &job.spec).await?;
    if let Some(record) = out.shard_record(lease.shard).await?
        && (record.run.start, record.run.end) == (payload.start, payload.end)
    {
        tracing::info!("shard already recorded by attempt {}; not sampling it again", record.run.attempt);
        complete(ctx, lease, record.run.end - record.run.start).await;
        return Ok(None);
    }
    Ok(Some((job, payload, out)))
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

async fn complete(ctx: &WorkerContext, lease: &Lease, samples: u64) {
    match ctx.queue.complete_shard(lease, samples).await {
        Ok(job) if job.shards_done >= job.shards_total => ctx.finalize(&job.id).await,
        Ok(_) => {}
        Err(QueueError::LeaseLost { .. }) => {
            tracing::info!("lease lost before completion; another attempt owns the shard")
        }
        Err(e) => tracing::warn!(error = %e, "completing the shard"),
    }
}

type Uploaded = (Vec<StoredFile>, StoredFile, Vec<GridEntry>, u64);

/// Stores a shard's samples as they arrive, in the job's layout ([`crate::dataset::sink`]), and the
/// grids that lie wholly inside it, each as soon as its samples are in (so a shard holds the images of
/// its unfinished grids only); also returns how many samples an earlier attempt had stored first (and
/// are kept).
async fn upload_shard(
    out: JobOutputs,
    spec: crate::job::JobSpec,
    target: ShardTarget,
    rx: tokio::sync::mpsc::Receiver<(u64, DynamicImage)>,
) -> Result<Uploaded, OutputError> {
    let grids: Vec<_> =
        outputs::grid_ranges(&spec).filter(|g| g.1 >= target.start && g.2 <= target.end).collect();
    let per_grid = u64::from(spec.samples_per_grid.max(1));
    let (tile_tx, mut tile_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, DynamicImage)>();
    let (first_grid, end_grid) = (grids.first().map_or(0, |g| g.0), grids.last().map_or(0, |g| g.0 + 1));
    let grid_writer = tokio::spawn(async move {
        let mut pending: BTreeMap<u64, BTreeMap<u64, DynamicImage>> = BTreeMap::new();
        let mut entries = Vec::with_capacity(grids.len());
        while let Some((index, img)) = tile_rx.recv().await {
            let n = index / per_grid;
            let Some(&range) = grids.iter().find(|g| g.0 == n) else { continue };
            let tiles = pending.entry(n).or_default();
            tiles.insert(index, img);
            if tiles.len() as u64 == range.2 - range.1 {
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
    let mut grid_entries = grid_entries?;
    grid_entries.sort_by_key(|g| g.index);
    Ok((written.files, written.index, grid_entries, written.adopted))
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
async fn give_back(ctx: &WorkerContext, lease: &Lease, error: ShardError) {
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
    match ctx.queue.release(lease, Duration::ZERO, "released by a draining worker").await {
        Ok(()) => tracing::info!(job_id = lease.job_id, shard = lease.shard, "shard released (draining)"),
        Err(e) => tracing::warn!(error = %e, "releasing the shard"),
    }
}

pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic in the sampler".into())
}

/// How long an idle thread waits between polls; exposed for the service's configuration.
pub const DEFAULT_IDLE_POLL: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_fitting_batch_is_the_limit_or_a_power_of_two() {
        let search = |limit, max_fit: usize| {
            let mut tried = Vec::new();
            let found = largest_fitting(limit, |b| {
                tried.push(b);
                Ok::<_, ()>(b <= max_fit)
            });
            (found.unwrap(), tried)
        };
        assert_eq!(search(512, 1000), (Some(512), vec![512]));
        assert_eq!(search(512, 100), (Some(64), vec![512, 256, 128, 64]));
        assert_eq!(search(100, 70), (Some(64), vec![100, 64]));
        assert_eq!(search(100, 0), (None, vec![100, 64, 32, 16, 8, 4, 2, 1]));
        assert_eq!(search(1, 1), (Some(1), vec![1]));
        assert_eq!(largest_fitting(8, |b| if b == 4 { Err("kernel") } else { Ok(false) }), Err("kernel"));
    }

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
        assert!(matches!(ShardError::from(QueueError::Nats("down".into())), ShardError::QueueUnavailable(_)));
        assert!(matches!(ShardError::from(QueueError::Corrupt("x".into())), ShardError::Failed(_)));
    }
}
