//! The device loop: the OS thread that owns a device's UNet replicas does tensor work only. It receives
//! [`ReadyBatch`]es (leased, co-batched, their noise already being drawn: [`super::batcher`]), samples
//! each, turns x_0 into images and hands every image to its shard's writer ([`super::finisher`]). It
//! makes no queue or storage call, so nothing but the batcher being behind can keep it waiting.
//!
//! A batch's rows may belong to several shards (co-batching). Every row has its own seed and the UNet
//! always runs at the job's batch size, so each image is the one its job gets alone.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::DynamicImage;
use tokio::sync::{mpsc, oneshot};

use crate::imaging;
use crate::model::LoadedUNet;
use crate::sampler::{self, BatchRequest, Guidance, NoiseAhead, Placement, SampleError};
use crate::schedulers::SchedulerConfig;

/// One sample on its way to its shard's writer: its job-wide index and its image.
pub type Sample = (u64, DynamicImage);

/// How the sampling of a shard ended, as its finisher is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampled {
    /// Every row was handed to the writer; `seconds`: the device time of the batches that held its rows.
    Done { seconds: f64 },
    /// Its job was cancelled, its lease lost, or the drain's grace period ran out.
    Cancelled,
    /// A batch failed; `device_lost` when the device no longer computes (the shard is not to blame).
    Failed { error: String, device_lost: bool },
    /// Its writer stopped taking images (the writer's own error says why).
    WriterStopped,
}

/// A shard as the device sees it: where its images go, whether it was stopped, and, once, how its
/// sampling ended. Dropped unended (its batches never reached a device), its finisher hears nothing
/// and gives the shard back untried.
pub struct ShardHandle {
    stop: Arc<AtomicBool>,
    open: Mutex<Option<Open>>,
    /// Rows not yet handed over.
    remaining: AtomicU64,
    /// Device time of the batches that held its rows.
    busy_ns: AtomicU64,
}

struct Open {
    samples: mpsc::Sender<Sample>,
    ended: oneshot::Sender<Sampled>,
}

impl ShardHandle {
    /// A shard of `rows` rows whose images go to `samples`; the receiver hears how it ended.
    pub fn new(
        rows: u64,
        stop: Arc<AtomicBool>,
        samples: mpsc::Sender<Sample>,
    ) -> (Arc<Self>, oneshot::Receiver<Sampled>) {
        let (ended, heard) = oneshot::channel();
        let open = Mutex::new(Some(Open { samples, ended }));
        let handle = Self { stop, open, remaining: AtomicU64::new(rows), busy_ns: AtomicU64::new(0) };
        (Arc::new(handle), heard)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Open>> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Still taking images: not ended and not stopped.
    pub fn is_open(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && self.lock().is_some()
    }

    /// Ends it (the first end counts): its writer's channel closes and its finisher is told.
    pub fn end(&self, how: Sampled) {
        if let Some(open) = self.lock().take() {
            let _ = open.ended.send(how);
        }
    }

    /// Hands one image to the writer (waiting while it is behind); ends the shard once its last row is
    /// in, or when the writer has stopped.
    fn deliver(&self, sample: Sample) {
        let Some(samples) = self.lock().as_ref().map(|o| o.samples.clone()) else { return };
        if samples.blocking_send(sample).is_err() {
            return self.end(Sampled::WriterStopped);
        }
        if self.remaining.fetch_sub(1, Ordering::Relaxed) == 1 {
            let seconds = Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed)).as_secs_f64();
            self.end(Sampled::Done { seconds });
        }
    }
}

/// One row of a batch: a sample of a shard.
pub struct Row {
    pub shard: Arc<ShardHandle>,
    /// The sample's job-wide index; its seed is the job's seed plus it.
    pub index: u64,
    pub seed: u64,
    /// Its class label, for a class-conditional model.
    pub class: Option<i64>,
}

/// A batch ready to sample: everything decided, its noise drawn ahead.
pub struct ReadyBatch {
    pub model: String,
    pub scheduler: Arc<SchedulerConfig>,
    pub batch_size: usize,
    pub steps: usize,
    pub eta: f32,
    /// Classifier-free guidance of every row (batches mix only rows guided alike).
    pub guidance: Option<Guidance>,
    pub rows: Vec<Row>,
    pub noise: Option<NoiseAhead>,
    /// The batch's number in its source (a `generate` run's batch; for a shard group, in the group).
    pub number: usize,
    /// Whether work was waiting since the device's previous batch (the batcher never found the queue
    /// empty meanwhile): the gap before this batch is then the pipeline's, counted as idle.
    pub fed: bool,
    /// The span of the shard that leads the batch.
    pub span: tracing::Span,
}

/// Whether the device waits for its next batch: a batcher holding a batch with padding rows keeps filling
/// it with shards of other jobs until the device asks.
#[derive(Debug, Default)]
pub struct Demand {
    waiting: AtomicBool,
    asked: tokio::sync::Notify,
}

impl Demand {
    pub fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Until the device next starts to wait (at once if it asked since the last call).
    pub async fn asked(&self) {
        self.asked.notified().await
    }

    fn set_waiting(&self, waiting: bool) {
        self.waiting.store(waiting, Ordering::Relaxed);
        if waiting {
            self.asked.notify_one();
        }
    }
}

/// What every batch of a run of batches shares (a shard group's, a `generate` lane's).
#[derive(Clone)]
pub struct BatchTemplate {
    pub model: String,
    pub scheduler: Arc<SchedulerConfig>,
    pub batch_size: usize,
    pub steps: usize,
    pub eta: f32,
    pub guidance: Option<Guidance>,
    /// One sample's `[C, H, W]`, to draw noise ahead; `None`: the device draws it itself.
    pub shape: Option<[i64; 3]>,
    pub span: tracing::Span,
}

impl ReadyBatch {
    /// The batch of `rows`, its noise drawn from now on (while the batch before it samples).
    pub fn new(template: &BatchTemplate, rows: Vec<Row>, number: usize, fed: bool) -> Self {
        let t = template;
        let seeds: Vec<u64> = rows.iter().map(|r| r.seed).collect();
        let req = BatchRequest::new(&seeds, t.batch_size, t.steps, t.eta);
        let noise = t.shape.and_then(|shape| sampler::noise_ahead(shape, &t.scheduler, &req).ok());
        ReadyBatch {
            model: t.model.clone(),
            scheduler: Arc::clone(&t.scheduler),
            batch_size: t.batch_size,
            steps: t.steps,
            eta: t.eta,
            guidance: t.guidance,
            rows,
            noise,
            number,
            fed,
            span: t.span.clone(),
        }
    }
}

/// What the device loop needs besides its batches.
pub struct Lane<'a> {
    /// The device's name in metrics and logs.
    pub name: &'a str,
    pub unets: BTreeMap<&'a str, &'a LoadedUNet>,
    pub place: Placement,
    /// Set when running shards must stop (the drain's grace period is over).
    pub abort: &'a AtomicBool,
    /// Called after every denoising step (a progress bar).
    pub on_step: &'a (dyn Fn() + Sync),
    /// Told whenever the loop waits for a batch.
    pub demand: Option<&'a Demand>,
}

/// Where one batch's time went.
#[derive(Debug, Clone, Copy)]
pub struct BatchReport {
    pub number: usize,
    /// The reverse process, from the first noise draw to x_0 on the host.
    pub sampling: Duration,
    /// Turning x_0 into images and handing them to the writers (waiting while they are behind).
    pub handoff: Duration,
    /// The device's wait for this batch after its previous one, when work was waiting.
    pub idle: Option<Duration>,
}

/// Samples batches until the channel closes. `Err` when the device stopped computing: the batch's
/// shards were told so (they go back untried), and the batches still queued are dropped, which tells
/// theirs the same.
pub fn run(
    lane: &Lane,
    mut batches: mpsc::Receiver<ReadyBatch>,
    mut on_batch: impl FnMut(BatchReport),
) -> Result<(), String> {
    let busy = metrics::histogram!("ddpm_device_busy_seconds", "device" => lane.name.to_string());
    let idle = metrics::histogram!("ddpm_device_idle_seconds", "device" => lane.name.to_string());
    let mut previous_end: Option<Instant> = None;
    loop {
        if let Some(d) = lane.demand {
            d.set_waiting(true);
        }
        let batch = batches.blocking_recv();
        if let Some(d) = lane.demand {
            d.set_waiting(false);
        }
        let Some(batch) = batch else { break };
        let started = Instant::now();
        let waited = previous_end.filter(|_| batch.fed).map(|end| started - end);
        if let Some(w) = waited {
            idle.record(w.as_secs_f64());
        }
        let number = batch.number;
        let outcome = sample_batch(lane, batch);
        previous_end = Some(Instant::now());
        let Some((sampling, handoff)) = outcome? else { continue };
        busy.record(sampling.as_secs_f64());
        on_batch(BatchReport { number, sampling, handoff, idle: waited });
    }
    Ok(())
}

/// Samples one batch and hands its images over; `Ok(None)` when no row was still wanted. Times the
/// sampling and the hand-off.
fn sample_batch(lane: &Lane, batch: ReadyBatch) -> Result<Option<(Duration, Duration)>, String> {
    let ReadyBatch { model, scheduler, batch_size, steps, eta, guidance, rows, noise, span, .. } = batch;
    // Stopped shards (cancelled, lease lost) stop receiving; the batch runs for the others.
    let aborted = lane.abort.load(Ordering::Relaxed);
    for row in &rows {
        if aborted || row.shard.stop.load(Ordering::Relaxed) {
            row.shard.end(Sampled::Cancelled);
        }
    }
    if rows.iter().all(|r| !r.shard.is_open()) {
        return Ok(None);
    }
    let shards = distinct_shards(&rows);
    let Some(&unet) = lane.unets.get(model.as_str()) else {
        // The batcher admits only models loaded here; should it happen, the shards fail, not the device.
        let error = format!("model {model:?} is not loaded on this device");
        for s in &shards {
            s.end(Sampled::Failed { error: error.clone(), device_lost: false });
        }
        return Ok(None);
    };
    let _batch = tracing::info_span!(
        parent: &span,
        "batch",
        first = rows[0].index as i64,
        rows = rows.len() as i64,
        steps = steps as i64
    )
    .entered();
    let seeds: Vec<u64> = rows.iter().map(|r| r.seed).collect();
    let classes: Option<Vec<i64>> = rows.iter().map(|r| r.class).collect();
    let req = BatchRequest { seeds: &seeds, batch_size, steps, eta, classes: classes.as_deref(), guidance };
    let labels = [("model", model.clone()), ("device", lane.name.to_string())];
    let step_seconds = metrics::histogram!("ddpm_step_duration_seconds", &labels);
    let started = Instant::now();
    let mut last_step = started;
    let wanted = || shards.iter().any(|s| s.is_open()) && !lane.abort.load(Ordering::Relaxed);
    let sampled = if super::fault::injected("device-lost") {
        Err(SampleError::Torch(tch::TchError::Torch(
            "injected fault: CUDA error: an illegal memory access was encountered".into(),
        )))
    } else if let Some(simulated) = super::simulated::Simulated::from_env() {
        sampler::sample_shape(&unet.config).and_then(|shape| {
            simulated.sample(&req, shape, |_| {
                step_seconds.record(last_step.elapsed().as_secs_f64());
                last_step = Instant::now();
                (lane.on_step)();
                wanted()
            })
        })
    } else {
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            sampler::sample_batch(unet, &scheduler, &req, lane.place, noise, |_| {
                step_seconds.record(last_step.elapsed().as_secs_f64());
                last_step = Instant::now();
                (lane.on_step)();
                wanted()
            })
        }))
        .unwrap_or_else(|panic| {
            Err(SampleError::Torch(tch::TchError::Torch(super::warmup::panic_message(&panic))))
        })
    };
    let images = sampled.and_then(|x0| {
        imaging::to_images(&x0).map_err(|e| SampleError::Torch(tch::TchError::Convert(e.to_string())))
    });
    let sampling = started.elapsed();
    for s in &shards {
        s.busy_ns.fetch_add(sampling.as_nanos() as u64, Ordering::Relaxed);
    }
    let images = match images {
        Ok(images) => images,
        Err(SampleError::Cancelled) => {
            shards.iter().for_each(|s| s.end(Sampled::Cancelled));
            return Ok(Some((sampling, Duration::ZERO)));
        }
        Err(e) => {
            // The batch's failure may be the device's rather than the shards': if the device no longer
            // computes, the shards go back untried and the loop ends.
            let lost = super::warmup::device_usable(lane.place.device).err();
            let error = e.to_string();
            shards
                .iter()
                .for_each(|s| s.end(Sampled::Failed { error: error.clone(), device_lost: lost.is_some() }));
            return match lost {
                Some(reason) => Err(reason),
                None => Ok(Some((sampling, Duration::ZERO))),
            };
        }
    };
    let handed = Instant::now();
    for (img, row) in images.into_iter().zip(&rows) {
        row.shard.deliver((row.index, img));
    }
    metrics::counter!("ddpm_images_generated_total", &labels).increment(rows.len() as u64);
    Ok(Some((sampling, handed.elapsed())))
}

/// The shards of a batch's rows, each once, in row order.
fn distinct_shards(rows: &[Row]) -> Vec<Arc<ShardHandle>> {
    let mut shards: Vec<Arc<ShardHandle>> = Vec::new();
    for row in rows {
        if !shards.iter().any(|s| Arc::ptr_eq(s, &row.shard)) {
            shards.push(Arc::clone(&row.shard));
        }
    }
    shards
}

#[cfg(test)]
mod tests;
