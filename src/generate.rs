//! `ddpm-worker generate`: one run from a diffusers model to a folder or an S3 prefix, in the layout of
//! a service job's folder: the samples in the job's dataset layout, the index, `grids/`, a shard
//! record and `manifest.json` ([`crate::worker::outputs`]). The run is one shard on the service's
//! device loop ([`crate::worker::device`]): a batcher per lane hands it batches with their noise drawn
//! ahead, and the service's shard writer ([`crate::worker::finisher::upload_shard`]) stores them.
//!
//! A run may be split into parts ([`Part`]) that separate processes (the pods of an Indexed Job) sample
//! into the same destination: each part takes a contiguous run of whole batches, so every sample is
//! computed in the same batch as in the unsplit run. Part `i` is shard `i` of the run: it writes its
//! samples under their run-wide indices, `index/part-<i:06>.parquet`, the grids that lie within it and
//! its record `shards/<i:06>.json`; the part that finds every part's record there writes the grids that
//! straddle parts and `manifest.json`, as a service job's last shard does.

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use tch::Device;

use crate::classes::{ClassRequest, ClassSpec, ModelClasses};
use crate::dataset::{DatasetError, DatasetOptions};
use crate::digest::{sha256_file, sha256_hex};
use crate::imaging::{self, ImageError};
use crate::job::{JobRecord, JobSpec, JobState};
use crate::model::{Layout, LoadedUNet, ModelError, ModelFiles};
use crate::models::{FetchError, ModelLocation, ResolvedModel};
use crate::placement::{DType, device_name};
use crate::sampler::{self, Placement, SampleError};
use crate::schedulers::{SchedulerConfig, SchedulerError, SchedulerKind};
use crate::storage::{Destination, StorageError, write_once};
use crate::validation::{self, StorageRequest, Violations};
use crate::worker::device::{self, BatchTemplate, Lane, ReadyBatch, Row, Sample, Sampled, ShardHandle};
use crate::worker::outputs::{self, BatchTiming, JobOutputs, OutputError, RunTimings, ShardRecord, ShardRun};

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
    /// A batch failed on the device (its error as the device loop reported it).
    #[error("sampling: {0}")]
    Sampling(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("--model: {0}")]
    Fetch(#[from] FetchError),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Output(#[from] OutputError),
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
                | GenerateError::Fetch(
                    FetchError::NoHfCache
                        | FetchError::Hub { .. }
                        | FetchError::Model(ModelError::Config(_) | ModelError::Io { .. })
                )
                | GenerateError::Storage(StorageError::InvalidKey(_) | StorageError::InvalidDestination(_))
        )
    }
}

/// Part `index` (from 0) of a run split into `count` parts, written `INDEX/COUNT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Part {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parsed = s.split_once('/').and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)));
        let (index, count) =
            parsed.ok_or_else(|| format!("{s:?}: expected INDEX/COUNT, e.g. 0/4 (INDEX from 0)"))?;
        Ok(Part { index, count })
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Part {
    /// Batches `first..end` of a run of `batches`: contiguous, the parts' sizes differ by at most one.
    pub fn batches(&self, batches: usize) -> (usize, usize) {
        let at = |i: usize| (i as u128 * batches as u128 / self.count as u128) as usize;
        (at(self.index), at(self.index + 1))
    }
}

/// A validated `generate` request.
#[derive(Debug, Clone)]
pub struct GenerateSpec {
    /// A folder, `s3://bucket/prefix` or a hub id, as `serve --model` takes.
    pub model: ModelLocation,
    /// Where an S3 model is copied (under `<bucket>/<prefix>`); `None`: a temporary folder, removed
    /// after the run.
    pub model_cache: Option<PathBuf>,
    /// Path-style S3 addressing, for an S3 model and an S3 output.
    pub s3_path_style: bool,
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
    /// Batches sampled concurrently, each on its own thread with its own UNet replica (on the CPU with a
    /// share of the CPU threads; on a GPU, several threads keep it busy between one's kernel launches).
    pub lanes: usize,
    /// Replay the UNet from a CUDA graph per batch shape (CUDA only).
    pub cuda_graphs: bool,
    /// A folder (`Destination::File` without prefix) or an S3 prefix.
    pub out: Destination,
    /// Only this part of the run's batches; `None`: all.
    pub part: Option<Part>,
    /// Layout and encoding of the samples, as asked (checked by [`validation::storage`]).
    pub storage: StorageRequest,
    /// Samples per grid (`grids/<n:05>.png` shows samples `n·S .. (n+1)·S`); 0: no grids.
    pub samples_per_grid: u32,
    /// The job this run continues (`--extend`), named in its manifest.
    pub extends: Option<String>,
    /// Class labels and guidance, for a class-conditional model (`None`: the model's default).
    pub classes: Option<ClassRequest>,
}

/// A finished run or service job that `generate --extend` continues: its manifest's settings.
#[derive(Debug, Clone)]
pub struct Extended {
    pub job_id: String,
    /// Where its model came from (`--model` as its run gave it).
    pub model_source: String,
    pub spec: JobSpec,
}

impl Extended {
    /// Reads the manifest of the job in `folder` (a folder or an S3 prefix).
    pub fn read(folder: &Destination, s3_path_style: bool) -> Result<Self, GenerateError> {
        let invalid = |message: String| GenerateError::InvalidArgument { field: "--extend", message };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(GenerateError::Runtime)?;
        let manifest = runtime.block_on(async {
            let store = crate::storage::open_store(folder, s3_path_style).await?;
            let bytes = store.get("manifest.json").await?;
            Ok::<_, GenerateError>(bytes.map(|b| (store.uri("manifest.json"), b)))
        })?;
        let (uri, bytes) = manifest.ok_or_else(|| {
            invalid(format!("{}: no manifest.json (not a finished job)", out_display(folder)))
        })?;
        let manifest: crate::worker::outputs::JobManifest =
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("{uri}: {e}")))?;
        Ok(Self { job_id: manifest.job_id, model_source: manifest.model.source, spec: manifest.spec })
    }

    /// The seed of the first sample after the job's.
    pub fn next_seed(&self) -> Result<u64, GenerateError> {
        self.spec.seed.checked_add(self.spec.num_samples).ok_or_else(|| GenerateError::InvalidArgument {
            field: "--extend",
            message: format!("job {}: its seeds end at the largest seed", self.job_id),
        })
    }

    /// The job's layout and encoding, as a request for the same.
    pub fn storage(&self) -> StorageRequest {
        let d = &self.spec.dataset;
        StorageRequest {
            format: d.format,
            image: d.encoding.image,
            jpeg_quality: (d.encoding.image == crate::dataset::ImageFormat::Jpeg)
                .then_some(u32::from(d.encoding.quality)),
            png_level: (d.encoding.png_level != 0).then_some(u32::from(d.encoding.png_level)),
            // Data files only: the files layout takes no target size.
            target_file_bytes: d.format.parts().map(|_| d.target_file_bytes),
        }
    }
}

/// What a run (or part) wrote, for the command's summary.
#[derive(Debug, Clone)]
pub struct Report {
    /// The run's (or part's) shard record: its samples, files, grids and timings.
    pub record: ShardRecord,
    pub record_uri: String,
    /// The run's manifest, once every part is recorded (always for a whole run).
    pub manifest_uri: Option<String>,
    /// The first grid this run or part wrote, if any.
    pub grid_uri: Option<String>,
}

impl GenerateSpec {
    /// Batches of the whole run.
    fn batch_count(&self) -> usize {
        self.num_samples.div_ceil(self.batch_size.max(1))
    }

    /// The shard (the part's number, 0 for a whole run) and the samples `first..end` this run samples.
    fn range(&self) -> (u64, u64, u64) {
        match self.part {
            None => (0, 0, self.num_samples as u64),
            Some(p) => {
                let (first, end) = p.batches(self.batch_count());
                let bs = self.batch_size as u64;
                (p.index as u64, first as u64 * bs, (end as u64 * bs).min(self.num_samples as u64))
            }
        }
    }

    /// Parts of the run: its shards.
    fn parts(&self) -> u64 {
        self.part.map_or(1, |p| p.count as u64)
    }

    /// The run as a job spec: what its manifest records, the same for every part of it.
    fn job_spec(&self, model: &str, dataset: DatasetOptions, classes: Option<ClassSpec>) -> JobSpec {
        let per_grid = (self.samples_per_grid as usize).min(self.num_samples);
        JobSpec {
            request_id: String::new(),
            owner: String::new(),
            model: model.to_string(),
            scheduler: self.scheduler,
            steps: self.steps as u32,
            eta: self.eta,
            num_samples: self.num_samples as u64,
            seed: self.seed,
            batch_size: self.batch_size as u32,
            samples_per_grid: per_grid as u32,
            grid_columns: imaging::grid_columns(per_grid) as u32,
            output: Some(self.out.clone()),
            priority: 0,
            labels: Default::default(),
            dataset,
            trace_context: Default::default(),
            extends: self.extends.clone(),
            webhook: None,
            classes,
        }
    }

    fn validate(&self) -> Result<(), GenerateError> {
        let invalid = |field, message: String| Err(GenerateError::InvalidArgument { field, message });
        if self.num_samples == 0 {
            return invalid("num_samples", "must be at least 1".into());
        }
        if self.lanes == 0 {
            return invalid("lanes", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return invalid("batch_size", "must be at least 1".into());
        }
        // The rules every job is held to, as the API holds a SubmitJob (the first broken one is reported).
        let mut bad = Violations::default();
        validation::eta(Some(self.scheduler), self.eta, &mut bad);
        validation::seeds(self.seed, self.num_samples as u64, &mut bad);
        validation::samples_per_grid(self.samples_per_grid, &mut bad);
        validation::storage(self.storage, (3, 32, 32), self.batch_size as u64, &mut bad);
        if let Some(v) = bad.0.into_iter().next() {
            return invalid(v.field.flag(), v.message);
        }
        if let Destination::S3 { bucket, prefix } = &self.out {
            crate::storage::check_bucket(bucket).map_err(|e| GenerateError::InvalidArgument {
                field: "out",
                message: format!("bucket {bucket:?}: {e}"),
            })?;
            if !prefix.is_empty() {
                crate::storage::check_prefix(prefix).map_err(|e| GenerateError::InvalidArgument {
                    field: "out",
                    message: format!("prefix {prefix:?}: {e}"),
                })?;
            }
        }
        if let Some(p) = self.part {
            if p.count == 0 {
                return invalid("part", "COUNT must be at least 1".into());
            }
            if p.index >= p.count {
                return invalid("part", format!("{p}: INDEX counts from 0 and must be less than COUNT"));
            }
            let batches = self.batch_count();
            if p.count > batches {
                return invalid(
                    "part",
                    format!(
                        "{p}: {} parts, but the run has only {batches} batch(es) ({} samples in batches of {}); \
                         a part is whole batches, so use at most {batches} parts",
                        p.count, self.num_samples, self.batch_size
                    ),
                );
            }
        }
        if self.cuda_graphs && !self.device.is_cuda() {
            return invalid("cuda_graphs", "needs a CUDA device".into());
        }
        if self.cuda_graphs && !crate::cuda::GRAPHS_BUILT {
            return invalid(
                "cuda_graphs",
                "this build has no CUDA graph support (built without a CUDA libtorch and CUDA headers)"
                    .into(),
            );
        }
        // bf16 runs on the CPU (oneDNN's AVX512-BF16/AMX kernels, where the CPU has them); fp16 has no
        // fast CPU kernels.
        if self.dtype == DType::Fp16 && !self.device.is_cuda() {
            return invalid("dtype", "fp16 needs a CUDA device; use fp32 or bf16 on the CPU".into());
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

/// Runs the whole job, or its part; `progress` shows a bar on a terminal.
pub fn run(spec: &GenerateSpec, progress: bool) -> Result<Report, GenerateError> {
    let started = Instant::now();
    spec.validate()?;
    // Encoding and writing overlap the next batch's sampling, as a service shard's do.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(GenerateError::Runtime)?;
    let store = runtime.block_on(crate::storage::open_store(&spec.out, spec.s3_path_style))?;
    let out = JobOutputs::at(store, "");
    let (shard, first, end) = spec.range();
    runtime.block_on(check_fresh(spec, &out, shard, (first, end)))?;
    let loaded = Loaded::load(spec, &runtime, started)?;
    let model = loaded.resolved(spec);
    let shape = model.sample_shape();
    let dataset =
        validation::storage(spec.storage, shape, spec.batch_size as u64, &mut Violations::default());
    let (classes, bad) =
        crate::classes::resolve(&model.name, &model.classes, spec.classes.as_ref(), spec.num_samples as u64);
    if let Some((field, message)) = bad.into_iter().next() {
        return Err(GenerateError::InvalidArgument { field, message });
    }
    let job_spec = spec.job_spec(&model.name, dataset, classes);

    // `first` is a batch boundary of the whole run, so these are the run's own batches.
    let batches: Vec<Vec<u64>> = (first..end)
        .map(|i| spec.seed + i)
        .collect::<Vec<_>>()
        .chunks(spec.batch_size)
        .map(<[u64]>::to_vec)
        .collect();
    let bar = progress_bar(progress, (batches.len() * loaded.steps_per_batch) as u64);
    let writer = crate::dataset::index::Writer { shard, worker: "generate".into(), attempt: 1 };
    let mtime = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    // Data file parts are spooled here on their way to S3 (a folder output has its own staging folder).
    let target =
        out.shard_target(&job_spec, &model, (shard, first, end), writer, mtime, std::env::temp_dir());
    let (tx, rx) = tokio::sync::mpsc::channel::<Sample>(spec.batch_size * 2);
    let uploads =
        runtime.spawn(crate::worker::finisher::upload_shard(out.clone(), job_spec.clone(), target, rx));

    let sampling_started = Instant::now();
    let classes = job_spec.classes.as_ref();
    let sampled = sample_lanes(spec, classes, &runtime, &loaded, &batches, end - first, tx, &bar);
    let uploaded =
        runtime.block_on(uploads).map_err(|e| GenerateError::Dataset(DatasetError::Corrupt(e.to_string())));
    let uploaded = uploaded.and_then(|u| u.map_err(GenerateError::from));
    let (lanes, mut batch_times) = match sampled {
        Ok(done) => done,
        // The writer's own error says why it stopped taking samples.
        Err(LanesFailed::WriterStopped) => {
            uploaded?;
            return Err(GenerateError::Sampling("the writer stopped".into()));
        }
        Err(LanesFailed::Sampling(e)) => return Err(e),
    };
    let uploaded = uploaded?;
    let sampling_seconds = sampling_started.elapsed().as_secs_f64();
    batch_times.sort_by_key(|t| t.batch);
    bar.finish_and_clear();

    let run = ShardRun {
        shard,
        start: first,
        end,
        worker: "generate".into(),
        device: device_name(spec.device),
        attempt: 1,
        sampling_seconds,
        adopted: uploaded.adopted,
        batched_with: Vec::new(),
        group_norm: crate::model::resnet::group_norm_path().into(),
        dtype: Some(spec.dtype),
        layout: Some(spec.layout),
        cuda_graphs: Some(spec.cuda_graphs),
        cudnn_benchmark: Some(crate::model::cudnn_benchmark_applies(spec.device, spec.layout)),
        lanes: Some(lanes),
        timings: Some(RunTimings {
            load_seconds: loaded.load_seconds,
            total_seconds: started.elapsed().as_secs_f64(),
            images_per_second: (end - first) as f64 / sampling_seconds.max(1e-9),
            batches: batch_times,
        }),
    };
    let grid_uri = uploaded.grids.first().map(|g| out.uri(&out.key(&g.path)));
    let record = ShardRecord { run, files: uploaded.files, index: uploaded.index, grids: uploaded.grids };
    let json = serde_json::to_vec_pretty(&record)
        .map_err(|e| GenerateError::Dataset(DatasetError::Corrupt(e.to_string())))?;
    let key = out.shard_key(shard);
    let record_uri =
        runtime.block_on(write_once(out.store.as_ref(), &key, json.into(), "application/json"))?.uri;
    let manifest_uri = runtime.block_on(finalize_if_complete(spec, &out, &job_spec, &model, started))?;
    if let Destination::File { root, prefix } = &spec.out {
        // The writer's staging folder, empty now.
        let _ = fs::remove_dir(root.join(prefix).join(crate::storage::local::STAGING_DIR));
    }
    Ok(Report { record, record_uri, manifest_uri, grid_uri })
}

/// Writes the run's manifest (and the grids that straddle parts) once every part's record is there, as
/// a service job's last shard does; `None` while parts are missing. Two parts finishing together may
/// both finalize: every object is written create-only, so the first one's stays.
async fn finalize_if_complete(
    spec: &GenerateSpec,
    out: &JobOutputs,
    job_spec: &JobSpec,
    model: &ResolvedModel,
    started: Instant,
) -> Result<Option<String>, GenerateError> {
    let parts = spec.parts();
    for shard in 0..parts {
        if out.shard_record(shard).await?.is_none() {
            return Ok(None);
        }
    }
    let now = crate::queue::now_ms();
    let started_ms = now - started.elapsed().as_millis() as i64;
    let job = JobRecord {
        id: run_id(job_spec),
        spec: job_spec.clone(),
        state: JobState::Running,
        samples_done: spec.num_samples as u64,
        shards_done: parts,
        shards_total: parts,
        created_at_ms: started_ms,
        started_at_ms: Some(started_ms),
        finished_at_ms: None,
        error: None,
        manifest_uri: None,
    };
    Ok(Some(outputs::finalize(out, &job, model, now).await?))
}

/// The id a run's manifest carries: a digest of its spec, so every part of a run names the same one.
fn run_id(spec: &JobSpec) -> String {
    let text = serde_json::to_string(spec).unwrap_or_default();
    format!("generate-{}", &sha256_hex(text.as_bytes())[..16])
}

/// The model and scheduler of a run, loaded.
struct Loaded {
    files: ModelFiles,
    scheduler_text: String,
    scheduler: SchedulerConfig,
    steps_per_batch: usize,
    weights_sha: String,
    unet: LoadedUNet,
    classes: ModelClasses,
    load_seconds: f64,
}

impl Loaded {
    fn load(
        spec: &GenerateSpec,
        runtime: &tokio::runtime::Runtime,
        started: Instant,
    ) -> Result<Self, GenerateError> {
        let (s3_copy, _temporary) = spec.s3_copy_dir()?;
        let model_dir = runtime.block_on(spec.model.fetch(&s3_copy, spec.s3_path_style))?;
        let files = ModelFiles::locate(&model_dir)?;
        let scheduler_text = fs::read_to_string(&files.scheduler_config)
            .map_err(GenerateError::io(&files.scheduler_config))?;
        let scheduler = SchedulerConfig::from_json(spec.scheduler, &scheduler_text)?;
        let steps_per_batch = scheduler.build(spec.steps, spec.eta.unwrap_or(0.0))?.timesteps().len();
        let weights_sha = sha256_file(&files.weights).map_err(GenerateError::io(&files.weights))?;
        let unet =
            LoadedUNet::prepare(&files, spec.device, spec.dtype.kind(), spec.layout, spec.cuda_graphs)?;
        let classes = ModelClasses::read(&files.root, &unet.config)?;
        let load_seconds = started.elapsed().as_secs_f64();
        Ok(Self {
            files,
            scheduler_text,
            scheduler,
            steps_per_batch,
            weights_sha,
            unet,
            classes,
            load_seconds,
        })
    }

    fn sample_shape(&self) -> Result<[i64; 3], SampleError> {
        sampler::sample_shape(&self.unet.config)
    }

    /// The model as a service resolves one: named by where it came from (`--model` as given).
    fn resolved(&self, spec: &GenerateSpec) -> ResolvedModel {
        ResolvedModel {
            name: spec.model.source(),
            source: spec.model.source(),
            files: self.files.clone(),
            weights_sha256: self.weights_sha.clone(),
            unet_config: self.unet.config.clone(),
            scheduler_text: self.scheduler_text.clone(),
            card: crate::models::ModelCard::read(&self.files.root),
            classes: self.classes.clone(),
        }
    }
}

/// Why a run's lanes did not sample every batch.
enum LanesFailed {
    /// The writer stopped taking samples (its own error says why).
    WriterStopped,
    Sampling(GenerateError),
}

/// Samples a run's batches: the run is one shard on the device loop, as a service shard is. Each lane's
/// batcher hands it every `lanes`-th batch, its device loop samples them, and their images go to `tx`
/// (the run's writer). Returns the lanes used and each batch's timing.
#[allow(clippy::too_many_arguments)]
fn sample_lanes(
    spec: &GenerateSpec,
    classes: Option<&ClassSpec>,
    runtime: &tokio::runtime::Runtime,
    loaded: &Loaded,
    batches: &[Vec<u64>],
    rows: u64,
    tx: tokio::sync::mpsc::Sender<Sample>,
    bar: &indicatif::ProgressBar,
) -> Result<(usize, Vec<BatchTiming>), LanesFailed> {
    let (run_shard, sampled) = ShardHandle::new(rows, Arc::new(AtomicBool::new(false)), tx);
    let lanes = spec.lanes.clamp(1, batches.len().max(1));
    let place = Placement { device: spec.device, kind: spec.dtype.kind() };
    let shape = loaded.sample_shape().map_err(|e| LanesFailed::Sampling(e.into()))?;
    let feeder = LaneSource { spec, classes, scheduler: Arc::new(loaded.scheduler.clone()), shape };
    let batch_timings = std::sync::Mutex::new(Vec::with_capacity(batches.len()));
    let abort = AtomicBool::new(false);
    // A lane: its batcher on the runtime, its device loop on the thread that calls this.
    let run_lane = |lane: usize, unet: &LoadedUNet| -> Result<(), String> {
        let (ready_tx, ready) = tokio::sync::mpsc::channel(1);
        let mine: Vec<(usize, Vec<u64>)> =
            batches.iter().cloned().enumerate().skip(lane).step_by(lanes).collect();
        runtime.spawn(feeder.feed(mine, Arc::clone(&run_shard), ready_tx));
        let unets = std::collections::BTreeMap::from([(MODEL, unet)]);
        let on_step = || bar.inc(1);
        let device = Lane { name: "generate", unets, place, abort: &abort, on_step: &on_step, demand: None };
        device::run(&device, ready, |r| {
            if let Ok(mut timings) = batch_timings.lock() {
                timings.push(BatchTiming {
                    batch: r.number,
                    lane,
                    sampling_seconds: r.sampling.as_secs_f64(),
                    handoff_seconds: r.handoff.as_secs_f64(),
                });
            }
        })
    };
    let lost: Vec<Result<(), String>> = if lanes == 1 {
        // One lane runs on the calling thread (its OpenMP team is the process's).
        vec![run_lane(0, &loaded.unet)]
    } else {
        // Each lane samples on its own thread with its own replica and (CPU) share of the CPU threads.
        let threads = (!spec.device.is_cuda()).then(|| (tch::get_num_threads() / lanes as i32).max(1));
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..lanes)
                .map(|lane| {
                    let mut replica = loaded.unet.replica();
                    if spec.cuda_graphs {
                        replica.set_graphs(Some(crate::model::graphs::GraphMode::Cuda));
                    }
                    let run_lane = &run_lane;
                    let device = spec.device;
                    scope.spawn(move || {
                        if let Some(n) = threads {
                            tch::set_num_threads(n);
                        }
                        // Lanes on one GPU overlap on streams of their own.
                        crate::cuda::use_own_stream(device).map_err(|e| format!("lane {lane}: {e}"))?;
                        run_lane(lane, &replica)
                    })
                })
                .collect();
            let joined = handles.into_iter().map(|h| h.join());
            joined.map(|j| j.unwrap_or_else(|p| Err(crate::worker::warmup::panic_message(&p)))).collect()
        })
    };
    drop(run_shard);
    let failed = |e: String| Err(LanesFailed::Sampling(GenerateError::Sampling(e)));
    match runtime.block_on(sampled) {
        Ok(Sampled::Done { .. }) => Ok((lanes, batch_timings.into_inner().unwrap_or_default())),
        Ok(Sampled::WriterStopped) => Err(LanesFailed::WriterStopped),
        Ok(Sampled::Failed { error, .. }) => failed(error),
        Ok(Sampled::Cancelled) => Err(LanesFailed::Sampling(GenerateError::Sample(SampleError::Cancelled))),
        Err(_) => failed(lost.into_iter().find_map(Result::err).unwrap_or_else(|| "a lane stopped".into())),
    }
}

/// `spec.out` as the user wrote it: the folder, or `s3://bucket/prefix`.
pub fn out_display(out: &Destination) -> String {
    match out {
        Destination::File { root, prefix } if prefix.is_empty() => root.display().to_string(),
        Destination::File { root, prefix } => root.join(prefix).display().to_string(),
        Destination::S3 { .. } => out.to_string(),
    }
}

/// Refuses a destination that holds a finished run (its `manifest.json`) or this part already (its
/// shard record), or an index part for this part's number that lists other samples (a run split
/// another way, or with another seed). An index part that lists this part's samples is from an attempt
/// that died before its record (a retried pod): what it stored is kept.
async fn check_fresh(
    spec: &GenerateSpec,
    out: &JobOutputs,
    shard: u64,
    (first, end): (u64, u64),
) -> Result<(), GenerateError> {
    let shown = out_display(&spec.out);
    let refuse = |message| Err(GenerateError::InvalidArgument { field: "out", message });
    let manifest = out.manifest_key();
    if out.store.get(&manifest).await?.is_some() {
        return refuse(format!("{shown} already holds a run ({manifest}); choose another folder"));
    }
    if let Some(record) = out.shard_record(shard).await? {
        let key = out.shard_key(shard);
        let (start, stop) = (record.run.start, record.run.end);
        if (start, stop) == (first, end) {
            return refuse(format!("{shown} already holds this part ({key}); choose another folder"));
        }
        return refuse(format!(
            "{shown} holds {key} with samples {start}..{stop}, not samples {first}..{end}: a run split \
             another way wrote there; choose another folder"
        ));
    }
    let index_key = out.key(&crate::dataset::index_path(shard));
    if let Some(bytes) = out.store.get(&index_key).await? {
        let rows = crate::dataset::index::read(bytes)?;
        let same = rows.iter().map(|r| (r.index, r.seed)).eq((first..end).map(|i| (i, spec.seed + i)));
        if !same {
            let listed = match (rows.first(), rows.last()) {
                (Some(a), Some(b)) => format!("samples {}..{} from seed {}", a.index, b.index + 1, a.seed),
                _ => "no samples".into(),
            };
            return refuse(format!(
                "{shown} holds {index_key} with {listed}, not samples {first}..{end} from seed {}: \
                 a run with other settings or split another way wrote there; choose another folder",
                spec.seed + first
            ));
        }
    }
    Ok(())
}

/// A folder removed when dropped.
pub(crate) struct TempFolder(pub(crate) PathBuf);

impl Drop for TempFolder {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

impl GenerateSpec {
    /// Where an S3 model is copied: under `model_cache`, or a temporary folder removed when the guard
    /// is dropped.
    fn s3_copy_dir(&self) -> Result<(PathBuf, Option<TempFolder>), GenerateError> {
        let ModelLocation::S3 { bucket, prefix } = &self.model else { return Ok((PathBuf::new(), None)) };
        Ok(match &self.model_cache {
            Some(cache) => {
                let dir = cache.join(bucket);
                if prefix.is_empty() {
                    (dir, None)
                } else {
                    crate::storage::check_key(prefix)?;
                    (dir.join(prefix), None)
                }
            }
            None => {
                let dir =
                    std::env::temp_dir().join(format!("ddpm-worker-model-{}", uuid::Uuid::new_v4().simple()));
                (dir.clone(), Some(TempFolder(dir)))
            }
        })
    }
}

/// The model's name in a lane's map (a run has one model).
const MODEL: &str = "model";

/// What a run's lane batchers share.
struct LaneSource<'a> {
    spec: &'a GenerateSpec,
    classes: Option<&'a ClassSpec>,
    scheduler: Arc<SchedulerConfig>,
    shape: [i64; 3],
}

impl LaneSource<'_> {
    /// Hands a lane its batches (`(number, seeds)`) one at a time, each batch's noise drawn while the
    /// one before it samples.
    fn feed(
        &self,
        batches: Vec<(usize, Vec<u64>)>,
        shard: Arc<ShardHandle>,
        lane: tokio::sync::mpsc::Sender<ReadyBatch>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let template = BatchTemplate {
            model: MODEL.into(),
            scheduler: Arc::clone(&self.scheduler),
            batch_size: self.spec.batch_size,
            steps: self.spec.steps,
            eta: self.spec.eta.unwrap_or(0.0),
            guidance: self.classes.and_then(|c| c.guidance).map(Into::into),
            shape: Some(self.shape),
            span: tracing::Span::current(),
        };
        let seed = self.spec.seed;
        let classes = self.classes.map(ClassSpec::layout);
        async move {
            for (number, seeds) in batches {
                let Ok(slot) = lane.reserve().await else { return };
                let rows = seeds.iter().map(|&s| Row {
                    shard: Arc::clone(&shard),
                    index: s - seed,
                    seed: s,
                    class: classes.as_ref().and_then(|c| c.class_of(s - seed)).map(i64::from),
                });
                slot.send(ReadyBatch::new(&template, rows.collect(), number, true));
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_take_every_batch_once_in_order_in_near_equal_runs() {
        for batches in 1..40 {
            for count in 1..=batches {
                let mut next = 0;
                for index in 0..count {
                    let (first, end) = Part { index, count }.batches(batches);
                    assert_eq!(first, next, "{index}/{count} of {batches}");
                    let len = end - first;
                    assert!(
                        len == batches / count || len == batches / count + 1,
                        "{index}/{count} of {batches}"
                    );
                    next = end;
                }
                assert_eq!(next, batches);
            }
        }
        assert_eq!("2/8".parse::<Part>(), Ok(Part { index: 2, count: 8 }));
        for bad in ["2", "2/", "/8", "a/8", "-1/8", "2/8/1"] {
            assert!(bad.parse::<Part>().is_err(), "{bad}");
        }
    }
}
