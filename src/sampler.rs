//! The denoising loop for one batch: per-sample initial noise, then for every timestep one UNet call and
//! one scheduler update, with per-sample step noise injected in diffusers' order.
//!
//! Sample `k` of a batch owns a [`TorchGenerator`] seeded with its own seed, so its noise is what
//! `DDPMPipeline(generator=[torch.Generator().manual_seed(s) for s in seeds])` draws for that row: first
//! the initial `randn((1, C, H, W))`, then one draw of the same shape at every step that needs noise.
//! The UNet always runs at the configured batch size (a short last batch is padded with zeros), which
//! keeps a sample's result independent of its neighbours and of how a job was split.

use std::sync::mpsc;

use tch::{Device, Kind, Tensor};

use crate::model::{LoadedUNet, UNet2DConfig};
use crate::rng::TorchGenerator;
use crate::schedulers::{Scheduler, SchedulerConfig, SchedulerError};

/// What to sample: one seed per image, run at `batch_size` rows.
#[derive(Debug, Clone)]
pub struct BatchRequest<'a> {
    pub seeds: &'a [u64],
    pub batch_size: usize,
    pub steps: usize,
    pub eta: f32,
    /// One class label per seed, for a class-conditional model (`None`: an unconditional one).
    pub classes: Option<&'a [i64]>,
    /// Classifier-free guidance, with `classes`.
    pub guidance: Option<Guidance>,
}

impl<'a> BatchRequest<'a> {
    /// An unconditional request.
    pub fn new(seeds: &'a [u64], batch_size: usize, steps: usize, eta: f32) -> Self {
        Self { seeds, batch_size, steps, eta, classes: None, guidance: None }
    }
}

/// Classifier-free guidance (Ho & Salimans 2022): ε = ε_u + w·(ε_c − ε_u), with ε_u the model's
/// output for the null class it was trained with.
///
/// Both outputs come from one forward of the doubled batch (the null-class rows first, then the
/// labelled ones, as diffusers' guided pipelines order them), not from two calls: one call keeps the
/// device's work in one larger batch, and a captured graph replays both halves at once. The batch's
/// activations double, which the warm-up's batch probe accounts for ([`Self::rows`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    pub scale: f32,
    pub null_class: i64,
}

impl Guidance {
    /// UNet rows per sample row: 2 with guidance, else 1.
    pub fn rows(guidance: Option<Guidance>) -> usize {
        if guidance.is_some() { 2 } else { 1 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("starting the noise thread: {0}")]
    Thread(std::io::Error),
    #[error("cancelled")]
    Cancelled,
    #[error("batch of {seeds} seeds does not fit batch size {batch_size}")]
    BatchTooLarge { seeds: usize, batch_size: usize },
    #[error("{0}")]
    Classes(String),
}

/// Where the sampler runs and the UNet's precision; scheduler math always stays in f32.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    pub device: Device,
    pub kind: Kind,
}

/// Draws, on a helper thread, the noise tensors a batch will consume, in consumption order, so that the
/// Mersenne Twister and Box-Muller work overlaps the UNet instead of adding to it.
struct NoiseProducer {
    rx: mpsc::Receiver<Tensor>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl NoiseProducer {
    /// `draws`: how many `[B, C, H, W]` tensors to make (the initial noise plus one per noisy step).
    fn spawn(seeds: &[u64], batch_size: usize, shape: [i64; 3], draws: usize) -> Result<Self, SampleError> {
        let mut generators: Vec<TorchGenerator> = seeds.iter().map(|&s| TorchGenerator::new(s)).collect();
        let per_sample = (shape[0] * shape[1] * shape[2]) as usize;
        // A bound of 2 keeps at most a couple of batches of noise in memory ahead of the sampler.
        let (tx, rx) = mpsc::sync_channel(2);
        let handle = std::thread::Builder::new()
            .name("noise".into())
            .spawn(move || {
                for _ in 0..draws {
                    let mut buf = vec![0f32; per_sample * batch_size];
                    for (row, g) in buf.chunks_exact_mut(per_sample).zip(generators.iter_mut()) {
                        g.randn_into(row);
                    }
                    let t = Tensor::from_slice(&buf).view([batch_size as i64, shape[0], shape[1], shape[2]]);
                    if tx.send(t).is_err() {
                        return; // the sampler stopped early (cancelled or failed)
                    }
                }
            })
            .map_err(SampleError::Thread)?;
        Ok(Self { rx, handle: Some(handle) })
    }

    fn next(&self) -> Tensor {
        self.rx.recv().expect("the noise thread makes exactly the draws the schedule needs. This is a bug.")
    }
}

impl Drop for NoiseProducer {
    fn drop(&mut self) {
        // Dropping the receiver fails a producer blocked on a full channel; then it can be joined.
        drop(std::mem::replace(&mut self.rx, mpsc::sync_channel(0).1));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A batch's noise, already being drawn on its own thread: made for the next batch while this one
/// samples, so that its initial draw (the largest: every pixel of every sample) is not waited for.
pub struct NoiseAhead {
    seeds: Vec<u64>,
    batch_size: usize,
    draws: usize,
    producer: NoiseProducer,
}

/// The labels of a batch on `device`: `[batch_size]` (the padding rows repeat the first label), or
/// `[2 × batch_size]` with the null class first under guidance; `None` for an unconditional request.
fn batch_classes(
    unet: &LoadedUNet,
    req: &BatchRequest,
    device: Device,
) -> Result<Option<Tensor>, SampleError> {
    let Some(classes) = req.classes else {
        if unet.is_conditional() {
            return Err(SampleError::Classes(
                "this model is class-conditional: each sample needs a class label".into(),
            ));
        }
        return Ok(None);
    };
    if !unet.is_conditional() {
        return Err(SampleError::Classes("this model is unconditional: it takes no class labels".into()));
    }
    if classes.len() != req.seeds.len() {
        return Err(SampleError::Classes(format!("{} labels for {} seeds", classes.len(), req.seeds.len())));
    }
    let mut rows: Vec<i64> = Vec::with_capacity(2 * req.batch_size);
    if let Some(g) = req.guidance {
        rows.extend(std::iter::repeat_n(g.null_class, req.batch_size));
    }
    rows.extend(classes);
    rows.extend(std::iter::repeat_n(classes[0], req.batch_size - classes.len()));
    Ok(Some(Tensor::from_slice(&rows).to_device(device)))
}

/// The shape of one sample of a UNet, `[C, H, W]`.
pub fn sample_shape(config: &UNet2DConfig) -> Result<[i64; 3], SampleError> {
    let (h, w) = config.sample_hw()?;
    Ok([config.in_channels, h, w])
}

/// The number of `[B, C, H, W]` draws that sampling with `sched` consumes.
fn noise_draws(sched: &dyn Scheduler) -> usize {
    1 + (0..sched.timesteps().len()).filter(|&i| sched.needs_noise(i)).count()
}

/// Starts drawing `req`'s noise now, for a later [`sample_batch`] of the same request on a UNet whose
/// samples have `shape` ([`sample_shape`]).
pub fn noise_ahead(
    shape: [i64; 3],
    scheduler: &SchedulerConfig,
    req: &BatchRequest,
) -> Result<NoiseAhead, SampleError> {
    let draws = noise_draws(scheduler.build(req.steps, req.eta)?.as_ref());
    let producer = NoiseProducer::spawn(req.seeds, req.batch_size, shape, draws)?;
    Ok(NoiseAhead { seeds: req.seeds.to_vec(), batch_size: req.batch_size, draws, producer })
}

/// Runs the full reverse process for `req.seeds` and returns x_0 as `[seeds.len(), C, H, W]` f32 on CPU.
/// `ahead`: noise started earlier by [`noise_ahead`]; used only if it was made for this very request
/// (same seeds, batch size and number of draws), else this batch draws its own. `on_step` is called
/// after every step; returning `false` cancels between steps.
pub fn sample_batch(
    unet: &LoadedUNet,
    scheduler: &SchedulerConfig,
    req: &BatchRequest,
    place: Placement,
    ahead: Option<NoiseAhead>,
    mut on_step: impl FnMut(usize) -> bool,
) -> Result<Tensor, SampleError> {
    let n = req.seeds.len();
    if n == 0 || n > req.batch_size {
        return Err(SampleError::BatchTooLarge { seeds: n, batch_size: req.batch_size });
    }
    let _guard = tch::no_grad_guard();
    let mut sched: Box<dyn Scheduler> = scheduler.build(req.steps, req.eta)?;
    let (shape, draws) = (sample_shape(&unet.config)?, noise_draws(sched.as_ref()));
    let timesteps = sched.timesteps().to_vec();
    // Noise made for another request is dropped here (its thread stops), not kept until the end.
    let ahead = ahead.filter(|a| a.seeds == req.seeds && a.batch_size == req.batch_size && a.draws == draws);
    let noise = match ahead {
        Some(a) => a.producer,
        None => NoiseProducer::spawn(req.seeds, req.batch_size, shape, draws)?,
    };

    let classes = batch_classes(unet, req, place.device)?;
    let mut sample = noise.next().to_device(place.device);
    for (i, &t) in timesteps.iter().enumerate() {
        let model_output = match (&classes, req.guidance) {
            (Some(labels), Some(g)) => {
                let x = sample.to_kind(place.kind);
                let both = unet.denoise(&Tensor::cat(&[&x, &x], 0), t, Some(labels))?.to_kind(Kind::Float);
                let (uncond, cond) = (
                    both.narrow(0, 0, req.batch_size as i64),
                    both.narrow(0, req.batch_size as i64, req.batch_size as i64),
                );
                &uncond + (cond - &uncond) * f64::from(g.scale)
            }
            (labels, _) => {
                unet.denoise(&sample.to_kind(place.kind), t, labels.as_ref())?.to_kind(Kind::Float)
            }
        };
        let z = sched.needs_noise(i).then(|| noise.next().to_device(place.device));
        sample = sched.step(i, &model_output, &sample, z.as_ref());
        if !on_step(i) {
            return Err(SampleError::Cancelled);
        }
    }
    Ok(sample.narrow(0, 0, n as i64).to_device(Device::Cpu))
}
