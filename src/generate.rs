//! `ddpm-worker generate`: one local run from a diffusers model folder to PNGs, a grid and a manifest.
//! The service's workers call the same [`crate::sampler::sample_batch`] for their shards.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use image::DynamicImage;
use serde::Serialize;
use tch::Device;

use crate::dataset::sink::{ShardTarget, write_shard};
use crate::dataset::{DataFormat, DatasetError, DatasetOptions, Encoding, SampleContext, StoredFile};
use crate::digest::{sha256_file, sha256_hex};
use crate::imaging::{self, ImageError};
use crate::model::{Layout, LoadedUNet, ModelError, ModelFiles};
use crate::placement::{DType, device_name};
use crate::sampler::{self, BatchRequest, Placement, SampleError};
use crate::schedulers::{SchedulerConfig, SchedulerError, SchedulerKind};
use crate::storage::ObjectStore;
use crate::storage::local::LocalStore;

/// Most samples drawn into `grid.png`.
pub const GRID_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The request itself is wrong (exit code 2 on the command line).
    #[error("{field}: {message}")]
    InvalidArgument { field: &'static str, message: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Sample(#[from] SampleError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
}

impl GenerateError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| GenerateError::Io { path: path.to_path_buf(), source }
    }

    /// Whether the caller asked for something impossible, as opposed to the run failing.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            GenerateError::InvalidArgument { .. }
                | GenerateError::Model(
                    ModelError::Config(_) | ModelError::Unsupported(_) | ModelError::Io { .. }
                )
                | GenerateError::Scheduler(
                    SchedulerError::Config(_) | SchedulerError::Unsupported(_) | SchedulerError::Steps { .. }
                )
        )
    }
}

/// A validated `generate` request.
#[derive(Debug, Clone)]
pub struct GenerateSpec {
    pub model: PathBuf,
    pub scheduler: SchedulerKind,
    pub steps: usize,
    pub eta: Option<f32>,
    pub num_samples: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub device: Device,
    pub dtype: DType,
    /// Activation and weight layout of the UNet.
    pub layout: Layout,
    /// Batches sampled concurrently, each on its own thread with a share of the CPU threads (CPU only).
    pub lanes: usize,
    pub out: PathBuf,
    /// Layout and encoding of the samples.
    pub format: DataFormat,
    pub encoding: Encoding,
    pub target_file_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileRecord {
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelRecord {
    pub path: String,
    pub weights: String,
    pub sha256: String,
    pub parameters: i64,
    pub config: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub load_seconds: f64,
    pub sampling_seconds: f64,
    pub total_seconds: f64,
    pub images_per_second: f64,
}

/// `manifest.json`: everything needed to reproduce or audit the run.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub version: String,
    pub created_at: String,
    pub model: ModelRecord,
    pub scheduler: serde_json::Value,
    pub steps: usize,
    pub eta: f32,
    pub seed: u64,
    pub num_samples: usize,
    pub batch_size: usize,
    pub dtype: DType,
    pub layout: Layout,
    pub lanes: usize,
    pub device: String,
    pub dataset: DatasetOptions,
    /// The per-sample listing (index, seed, SHA-256 and place of each encoded image).
    pub index: StoredFile,
    /// Data files (`webdataset`, `parquet`).
    pub files: Vec<StoredFile>,
    pub grid: FileRecord,
    pub timings: Timings,
}

/// Writes `bytes` to `path` through a temporary file and a rename, so no reader sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), GenerateError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(GenerateError::io(&tmp))?;
    fs::rename(&tmp, path).map_err(GenerateError::io(path))
}

impl GenerateSpec {
    fn validate(&self) -> Result<(), GenerateError> {
        let invalid = |field, message: String| Err(GenerateError::InvalidArgument { field, message });
        if self.num_samples == 0 {
            return invalid("num_samples", "must be at least 1".into());
        }
        if self.lanes == 0 {
            return invalid("lanes", "must be at least 1".into());
        }
        if self.lanes > 1 && self.device.is_cuda() {
            return invalid("lanes", "applies to the CPU; a CUDA device runs one batch at a time".into());
        }
        if self.batch_size == 0 {
            return invalid("batch_size", "must be at least 1".into());
        }
        if self.seed.checked_add(self.num_samples as u64 - 1).is_none() {
            return invalid("seed", "seed + num_samples overflows u64".into());
        }
        if let Some(eta) = self.eta {
            if self.scheduler != SchedulerKind::Ddim {
                return invalid("eta", "applies to the ddim scheduler only".into());
            }
            if !(eta.is_finite() && eta >= 0.0) {
                return invalid("eta", format!("{eta} must be a finite number ≥ 0"));
            }
        }
        if !crate::dataset::TARGET_FILE_BYTES.contains(&self.target_file_bytes) {
            let (lo, hi) =
                (crate::dataset::TARGET_FILE_BYTES.start(), crate::dataset::TARGET_FILE_BYTES.end());
            return invalid(
                "target_file_bytes",
                format!("{} must be in {lo}..={hi}", self.target_file_bytes),
            );
        }
        if !(1..=100).contains(&self.encoding.quality) {
            return invalid("quality", format!("{} must be in 1..=100", self.encoding.quality));
        }
        if self.encoding.png_level > 9 {
            return invalid("png_level", format!("{} must be in 1..=9", self.encoding.png_level));
        }
        if self.out.join("manifest.json").exists() {
            return invalid(
                "out",
                format!("{} already holds a run (manifest.json); choose another folder", self.out.display()),
            );
        }
        if self.dtype != DType::Fp32 && !self.device.is_cuda() {
            return invalid("dtype", format!("{:?} needs a CUDA device; use fp32 on the CPU", self.dtype));
        }
        if let Device::Cuda(i) = self.device {
            let count = tch::Cuda::device_count() as usize;
            if i >= count {
                return invalid("device", format!("cuda:{i} requested but {count} CUDA device(s) found"));
            }
        }
        Ok(())
    }
}

/// Runs the whole job; `progress` shows a bar on a terminal.
pub fn run(spec: &GenerateSpec, progress: bool) -> Result<Manifest, GenerateError> {
    let started = Instant::now();
    spec.validate()?;
    let files = ModelFiles::locate(&spec.model)?;
    let scheduler_text =
        fs::read_to_string(&files.scheduler_config).map_err(GenerateError::io(&files.scheduler_config))?;
    let scheduler = SchedulerConfig::from_json(spec.scheduler, &scheduler_text)?;
    let eta = spec.eta.unwrap_or(0.0);
    let steps_per_batch = scheduler.build(spec.steps, eta)?.timesteps().len();

    let weights_sha = sha256_file(&files.weights).map_err(GenerateError::io(&files.weights))?;
    let mut unet = LoadedUNet::load(&files, spec.device, spec.dtype.kind())?;
    unet.set_layout(spec.layout);
    let load_seconds = started.elapsed().as_secs_f64();
    // Only once the model is known to load, so a refused run leaves no output folder behind.
    fs::create_dir_all(&spec.out).map_err(GenerateError::io(&spec.out))?;

    let batches: Vec<Vec<u64>> = (0..spec.num_samples as u64)
        .map(|i| spec.seed + i)
        .collect::<Vec<_>>()
        .chunks(spec.batch_size)
        .map(<[u64]>::to_vec)
        .collect();
    let bar = progress_bar(progress, (batches.len() * steps_per_batch) as u64);

    // Encoding and writing overlap the next batch's sampling, as a service shard's do.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(GenerateError::io(&spec.out))?;
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalStore::new(&spec.out).map_err(|e| GenerateError::Dataset(e.into()))?);
    let (h, w) = unet.config.sample_hw()?;
    let shape = (unet.config.in_channels as u64, h as u64, w as u64);
    let dataset = DatasetOptions::new(
        spec.format,
        spec.encoding,
        spec.target_file_bytes,
        shape,
        spec.batch_size as u64,
    );
    let target = ShardTarget {
        store,
        base: String::new(),
        options: dataset,
        context: SampleContext {
            model: files.root.display().to_string(),
            model_sha256: weights_sha.clone(),
            scheduler: spec.scheduler.as_str().into(),
            steps: spec.steps as u32,
            eta,
            seed: spec.seed,
        },
        shard: 0,
        start: 0,
        end: spec.num_samples as u64,
        writer: crate::dataset::index::Writer { shard: 0, worker: "generate".into(), attempt: 1 },
        mtime: time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64,
        scratch: spec.out.clone(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<(u64, DynamicImage)>(spec.batch_size * 2);
    let (tile_tx, tile_rx) = std::sync::mpsc::channel::<(u64, DynamicImage)>();
    let writer = runtime.spawn(write_shard(target, rx, move |i, img| {
        if i < GRID_MAX as u64 {
            let _ = tile_tx.send((i, img.clone()));
        }
    }));

    let sampling_started = Instant::now();
    let place = Placement { device: spec.device, kind: spec.dtype.kind() };
    let job = BatchJob { batches: &batches, spec, scheduler: &scheduler, eta, place, bar: &bar };
    let lanes = spec.lanes.clamp(1, batches.len().max(1));
    let sampled = if lanes == 1 {
        job.run_lane(&unet, 0, 1, &tx, &AtomicBool::new(false))
    } else {
        // Each lane samples every `lanes`-th batch on its own thread and share of the CPU threads.
        let threads = (tch::get_num_threads() / lanes as i32).max(1);
        let failed = AtomicBool::new(false);
        let results: Vec<Result<(), GenerateError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..lanes)
                .map(|lane| {
                    let (replica, tx, job, failed) = (unet.replica(), tx.clone(), &job, &failed);
                    scope.spawn(move || {
                        tch::set_num_threads(threads);
                        let result = job.run_lane(&replica, lane, lanes, &tx, failed);
                        if result.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        result
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("a sampling lane panicked. This is a bug.")).collect()
        });
        // Report the lane that failed, not the ones it stopped.
        let cancelled =
            |r: &Result<(), GenerateError>| matches!(r, Err(GenerateError::Sample(SampleError::Cancelled)));
        let first_error = results.iter().position(|r| r.is_err() && !cancelled(r));
        let first_error = first_error.or_else(|| results.iter().position(Result::is_err));
        first_error.map_or(Ok(()), |i| results.into_iter().nth(i).unwrap_or(Ok(())))
    };
    drop(tx);
    let written =
        runtime.block_on(writer).map_err(|e| GenerateError::Dataset(DatasetError::Corrupt(e.to_string())))?;
    sampled?;
    let written = written?;
    let grid_tiles: Vec<DynamicImage> =
        tile_rx.try_iter().collect::<std::collections::BTreeMap<_, _>>().into_values().collect();
    let sampling_seconds = sampling_started.elapsed().as_secs_f64();
    bar.finish_and_clear();

    let grid = imaging::make_grid(&grid_tiles, imaging::grid_columns(grid_tiles.len()));
    let grid_png = imaging::encode_png(&grid)?;
    write_atomic(&spec.out.join("grid.png"), &grid_png)?;

    let manifest = Manifest {
        version: format!("ddpm-worker {}", env!("CARGO_PKG_VERSION")),
        created_at: now_rfc3339(),
        model: ModelRecord {
            path: files.root.display().to_string(),
            weights: files.weights.display().to_string(),
            sha256: weights_sha,
            parameters: unet.num_parameters(),
            config: serde_json::to_value(&unet.config).unwrap_or_default(),
        },
        scheduler: scheduler.to_json(),
        steps: spec.steps,
        eta,
        seed: spec.seed,
        num_samples: spec.num_samples,
        batch_size: spec.batch_size,
        dtype: spec.dtype,
        layout: spec.layout,
        lanes,
        device: device_name(spec.device),
        dataset,
        index: written.index,
        files: written.files,
        grid: FileRecord { file: "grid.png".into(), sha256: sha256_hex(&grid_png) },
        timings: Timings {
            load_seconds,
            sampling_seconds,
            total_seconds: started.elapsed().as_secs_f64(),
            images_per_second: spec.num_samples as f64 / sampling_seconds.max(1e-9),
        },
    };
    let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    write_atomic(&spec.out.join("manifest.json"), &json)?;
    // The writer's staging folder, empty now.
    let _ = fs::remove_dir(spec.out.join(crate::storage::local::STAGING_DIR));
    Ok(manifest)
}

/// What every sampling lane shares.
struct BatchJob<'a> {
    batches: &'a [Vec<u64>],
    spec: &'a GenerateSpec,
    scheduler: &'a SchedulerConfig,
    eta: f32,
    place: Placement,
    bar: &'a indicatif::ProgressBar,
}

impl BatchJob<'_> {
    /// Samples batches `lane`, `lane + lanes`, … and hands their images to the writer.
    fn run_lane(
        &self,
        unet: &LoadedUNet,
        lane: usize,
        lanes: usize,
        tx: &tokio::sync::mpsc::Sender<(u64, DynamicImage)>,
        stop: &AtomicBool,
    ) -> Result<(), GenerateError> {
        for (b, seeds) in self.batches.iter().enumerate().skip(lane).step_by(lanes) {
            let req = BatchRequest {
                seeds,
                batch_size: self.spec.batch_size,
                steps: self.spec.steps,
                eta: self.eta,
            };
            let x0 = sampler::sample_batch(unet, self.scheduler, &req, self.place, |_| {
                self.bar.inc(1);
                !stop.load(Ordering::Relaxed)
            })?;
            let first = (b * self.spec.batch_size) as u64;
            for (k, img) in imaging::to_images(&x0)?.into_iter().enumerate() {
                if tx.blocking_send((first + k as u64, img)).is_err() {
                    return Ok(()); // the writer failed; its error is reported by the caller
                }
            }
        }
        Ok(())
    }
}

fn progress_bar(show: bool, total: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} steps ({eta})",
    ) {
        bar.set_style(style);
    }
    bar
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}
