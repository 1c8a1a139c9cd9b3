//! A job's outputs under `<prefix>/<job_id>/`: its samples in the job's layout ([`crate::dataset`]:
//! `samples/<index:08>.<ext>`, or `data/<shard:06>[-<part:03>].{tar,parquet}`), a Parquet index part per
//! shard (`index/part-<shard:06>.parquet`), `grids/<n:05>.png`, `shards/<shard:06>.json` (what a finished
//! shard wrote) and `manifest.json`, written last as the job's commit record.
//!
//! Shard records make a job restartable at any moment: a shard whose record exists is not sampled
//! again, and the manifest is assembled from the records, so it lists every data file and index part
//! exactly once however often shards were retried.
//!
//! Every object is written create-only ([`write_once`]): the first sample, data file, grid, record or
//! manifest at a key stays, and a later writer (a retry, or a worker that lost its lease) lists the
//! stored object's SHA-256 instead of its own. So after a job SUCCEEDED every SHA-256 in its manifest
//! and index is that of the bytes stored, whatever late writers do.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use image::DynamicImage;
use serde::{Deserialize, Serialize};

use super::card;
use crate::dataset::{self, DataFormat, DatasetError, SampleContext, StoredFile};
use crate::imaging;
use crate::job::{JobRecord, JobSpec};
use crate::model::Layout;
use crate::models::ResolvedModel;
use crate::placement::DType;
use crate::storage::{
    Destination, ObjectStore, StorageError, check_bucket, check_prefix, join_key, write_once,
};

/// Where jobs write: the server's default destination, or one within the destinations it allows.
#[derive(Debug)]
pub struct Outputs {
    default: Destination,
    /// The default first; file roots absolute.
    allowed: Vec<Destination>,
    path_style: bool,
    /// One client per bucket or root, opened on first use.
    stores: tokio::sync::Mutex<BTreeMap<String, Arc<dyn ObjectStore>>>,
}

/// Why a job's destination was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a destination (or not a prefix) at all: `(field, description)`.
    Invalid(&'static str, String),
    /// Well formed, but outside every allowed destination.
    NotAllowed(String),
}

impl Outputs {
    /// `allowed` adds to the default destination; relative file roots are taken from the working
    /// directory.
    pub fn new(default: Destination, allowed: &[Destination], path_style: bool) -> Self {
        let absolute = |d: &Destination| match d {
            Destination::File { root, prefix } => Destination::File {
                root: std::path::absolute(root).unwrap_or_else(|_| root.clone()),
                prefix: prefix.trim_matches('/').to_string(),
            },
            Destination::S3 { bucket, prefix } => {
                Destination::S3 { bucket: bucket.clone(), prefix: prefix.trim_matches('/').to_string() }
            }
        };
        let default = absolute(&default);
        let mut all = vec![default.clone()];
        for d in allowed.iter().map(absolute) {
            if !all.contains(&d) {
                all.push(d);
            }
        }
        Self { default, allowed: all, path_style, stores: Default::default() }
    }

    pub fn default_destination(&self) -> &Destination {
        &self.default
    }

    /// The destinations jobs may write within (the default first).
    pub fn allowed(&self) -> &[Destination] {
        &self.allowed
    }

    /// A job's destination: `destination` (`s3://BUCKET[/PREFIX]`, `file:/DIR`; empty for the default)
    /// with `prefix` under it, if that lies within an allowed destination. A file destination keeps the
    /// allowed root it lies in as its store's root, so the store's staging folder stays inside it.
    pub fn resolve(&self, destination: &str, prefix: &str) -> Result<Destination, Refusal> {
        let base =
            if destination.is_empty() { self.default.clone() } else { self.within_allowed(destination)? };
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Ok(base);
        }
        check_prefix(prefix).map_err(|e| Refusal::Invalid("output.prefix", e))?;
        Ok(base.with_prefix(join_key(base.prefix(), prefix)))
    }

    fn within_allowed(&self, uri: &str) -> Result<Destination, Refusal> {
        let invalid = |e: String| Refusal::Invalid("output.destination", e);
        let wanted = uri
            .parse::<Destination>()
            .map_err(|_| invalid("expected s3://BUCKET[/PREFIX] or file:/ABSOLUTE/DIR".into()))?;
        let not_allowed = || {
            let allowed: Vec<String> = self.allowed.iter().map(ToString::to_string).collect();
            Refusal::NotAllowed(format!(
                "output.destination: {uri} is not within an allowed destination ({})",
                allowed.join(", ")
            ))
        };
        match wanted {
            Destination::S3 { bucket, prefix } => {
                check_bucket(&bucket).map_err(|e| invalid(format!("bucket: {e}")))?;
                // The prefix as written (parsing trims its slashes): "s3://b//x" has an empty segment.
                let written = uri["s3://".len()..].split_once('/').map_or("", |(_, p)| p);
                let written = written.strip_suffix('/').unwrap_or(written);
                if !written.is_empty() {
                    check_prefix(written).map_err(|e| invalid(format!("prefix: {e}")))?;
                }
                let inside = self.allowed.iter().any(|a| match a {
                    Destination::S3 { bucket: b, prefix: p } => *b == bucket && is_under(&prefix, p),
                    Destination::File { .. } => false,
                });
                if inside { Ok(Destination::S3 { bucket, prefix }) } else { Err(not_allowed()) }
            }
            Destination::File { root: path, .. } => {
                let text = path.to_string_lossy();
                let Some(relative) = text.strip_prefix('/') else {
                    return Err(invalid("a file: destination is an absolute path".into()));
                };
                let relative = relative.trim_end_matches('/');
                if !relative.is_empty() {
                    check_prefix(relative).map_err(|e| invalid(format!("path: {e}")))?;
                }
                for a in &self.allowed {
                    let Destination::File { root, prefix } = a else { continue };
                    let Ok(rest) = path.strip_prefix(root) else { continue };
                    let rest = rest.to_str().ok_or_else(|| invalid("not UTF-8".into()))?;
                    if is_under(rest, prefix) {
                        return Ok(Destination::File { root: root.clone(), prefix: rest.to_string() });
                    }
                }
                Err(not_allowed())
            }
        }
    }

    /// Whether a job may name an S3 destination at all.
    pub fn accepts_buckets(&self) -> bool {
        self.allowed.iter().any(|d| matches!(d, Destination::S3 { .. }))
    }

    /// The staging folders of the stores opened so far (see
    /// [`sweep_abandoned`](crate::storage::local::sweep_abandoned)).
    pub async fn spool_dirs(&self) -> Vec<std::path::PathBuf> {
        self.stores.lock().await.values().filter_map(|s| s.spool_dir()).collect()
    }

    /// The store and folder of job `job_id`.
    pub async fn for_job(&self, job_id: &str, spec: &JobSpec) -> Result<JobOutputs, StorageError> {
        let dest = match (&spec.output, &self.default) {
            // Jobs queued before destinations were resolved at submission name a prefix, and a bucket
            // where they chose one.
            (Some(Destination::S3 { bucket, prefix }), Destination::File { .. }) if bucket.is_empty() => {
                self.default.with_prefix(prefix.clone())
            }
            (Some(Destination::S3 { bucket, prefix }), Destination::S3 { bucket: default, .. })
                if bucket.is_empty() =>
            {
                Destination::S3 { bucket: default.clone(), prefix: prefix.clone() }
            }
            (Some(dest), _) => dest.clone(),
            (None, default) => default.clone(),
        };
        let prefix = dest.prefix().to_string();
        let dest = dest.with_prefix(String::new());
        let cache_key = format!("{dest:?}");
        let store = {
            let mut stores = self.stores.lock().await;
            match stores.get(&cache_key) {
                Some(s) => Arc::clone(s),
                None => {
                    let s = crate::storage::open_store(&dest, self.path_style).await?;
                    stores.insert(cache_key, Arc::clone(&s));
                    s
                }
            }
        };
        Ok(JobOutputs::new(store, &prefix, job_id))
    }
}

/// Whether `prefix` is `within` or below it, segment by segment (`a/bc` is not under `a/b`).
fn is_under(prefix: &str, within: &str) -> bool {
    within.is_empty()
        || prefix == within
        || prefix.strip_prefix(within).is_some_and(|rest| rest.starts_with('/'))
}

/// The outputs of one job: a store and the job's folder in it.
#[derive(Debug, Clone)]
pub struct JobOutputs {
    pub store: Arc<dyn ObjectStore>,
    pub base: String,
}

impl JobOutputs {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, job_id: &str) -> Self {
        Self { store, base: join_key(prefix, job_id) }
    }

    /// The outputs of a run written straight into `base` of `store` (`generate`'s folder).
    pub fn at(store: Arc<dyn ObjectStore>, base: &str) -> Self {
        Self { store, base: base.trim_matches('/').to_string() }
    }

    /// Where shard `shard` of `spec` (samples `start..end`) stores its samples, as `writer` attempt:
    /// the one place a shard's output target is made.
    pub fn shard_target(
        &self,
        spec: &JobSpec,
        model: &ResolvedModel,
        (shard, start, end): (u64, u64, u64),
        writer: dataset::index::Writer,
        mtime: u64,
        scratch: std::path::PathBuf,
    ) -> dataset::sink::ShardTarget {
        dataset::sink::ShardTarget {
            store: Arc::clone(&self.store),
            base: self.base.clone(),
            options: spec.dataset,
            context: sample_context(spec, model),
            shard,
            start,
            end,
            writer,
            mtime,
            scratch,
        }
    }

    /// Deletes every object of the job (and uploads of it left unfinished); returns how many.
    pub async fn delete(&self) -> Result<u64, StorageError> {
        self.store.delete_folder(&self.base).await
    }

    pub fn key(&self, relative: &str) -> String {
        join_key(&self.base, relative)
    }

    pub fn grid_key(&self, grid: u64) -> String {
        self.key(&grid_path(grid))
    }

    pub fn shard_key(&self, shard: u64) -> String {
        self.key(&format!("shards/{shard:06}.json"))
    }

    pub fn manifest_key(&self) -> String {
        self.key("manifest.json")
    }

    pub fn uri(&self, key: &str) -> String {
        self.store.uri(key)
    }

    pub async fn shard_record(&self, shard: u64) -> Result<Option<ShardRecord>, StorageError> {
        let key = self.shard_key(shard);
        let Some(bytes) = self.store.get(&key).await? else { return Ok(None) };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| StorageError::Remote {
            uri: self.uri(&key),
            message: format!("corrupt shard record: {e}"),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GridEntry {
    pub index: u64,
    /// Relative to the job's folder.
    pub path: String,
    pub sha256: String,
    /// The samples it shows, `first..end`.
    pub first: u64,
    pub end: u64,
}

/// What one finished shard wrote: its data files, then its index part, then this record (the shard's
/// commit). A few hundred bytes per data file, whatever the number of samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    #[serde(flatten)]
    pub run: ShardRun,
    /// Data files (`webdataset`, `parquet`; none for `files`, whose objects the index lists).
    pub files: Vec<StoredFile>,
    pub index: StoredFile,
    /// Grids whose samples all lie in this shard.
    pub grids: Vec<GridEntry>,
}

/// Grid `number` of a job: it shows samples `first..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridRange {
    pub number: u64,
    pub first: u64,
    pub end: u64,
}

/// The grids of a job: grid `n` shows samples `n * per_grid .. min((n + 1) * per_grid, num_samples)`.
pub fn grid_ranges(spec: &JobSpec) -> impl Iterator<Item = GridRange> + '_ {
    let per = u64::from(spec.samples_per_grid);
    let count = if per == 0 { 0 } else { spec.num_samples.div_ceil(per) };
    (0..count).map(move |n| GridRange {
        number: n,
        first: n * per,
        end: ((n + 1) * per).min(spec.num_samples),
    })
}

/// What every sample of `spec` shares besides its seed (its WebDataset JSON and Parquet columns).
pub fn sample_context(spec: &JobSpec, model: &ResolvedModel) -> SampleContext {
    SampleContext {
        model: model.name.clone(),
        model_sha256: model.weights_sha256.clone(),
        scheduler: spec.scheduler.as_str().to_string(),
        steps: spec.steps,
        eta: spec.eta.unwrap_or(0.0),
        seed: spec.seed,
        classes: spec.classes.clone(),
    }
}

/// Composes and writes grid `n` from its tiles (in sample order).
pub async fn put_grid(
    out: &JobOutputs,
    spec: &JobSpec,
    GridRange { number: n, first, end }: GridRange,
    tiles: Vec<DynamicImage>,
) -> Result<GridEntry, OutputError> {
    let columns = spec.grid_columns.max(1) as usize;
    // A labelled job's grids give each class its own rows.
    let classes = spec.classes.as_ref().map(|c| {
        let layout = c.layout();
        (first..end).map(|i| layout.class_of(i).unwrap_or(u32::MAX)).collect::<Vec<_>>()
    });
    let png = tokio::task::spawn_blocking(move || {
        let grid = match classes {
            Some(classes) => {
                imaging::make_class_grid(&classes.into_iter().zip(tiles).collect::<Vec<_>>(), columns)
            }
            None => imaging::make_grid(&tiles, columns),
        };
        imaging::encode_png(&grid)
    })
    .await
    .map_err(|e| OutputError::Internal(e.to_string()))??;
    let path = grid_path(n);
    let put = write_once(out.store.as_ref(), &out.key(&path), Bytes::from(png), "image/png").await?;
    Ok(GridEntry { index: n, path, sha256: put.sha256, first, end })
}

pub fn grid_path(n: u64) -> String {
    format!("grids/{n:05}.png")
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Image(#[from] imaging::ImageError),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Internal(String),
}

impl From<DatasetError> for OutputError {
    fn from(e: DatasetError) -> Self {
        match e {
            DatasetError::Storage(s) => OutputError::Storage(s),
            DatasetError::Image(i) => OutputError::Image(i),
            DatasetError::Corrupt(m) => OutputError::Corrupt(m),
            other => OutputError::Internal(other.to_string()),
        }
    }
}

/// `manifest.json`: everything needed to reproduce or audit a job, in size proportional to its shards
/// and data files. The per-sample listing is the Parquet index (`index`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobManifest {
    pub job_id: String,
    pub version: String,
    pub spec: JobSpec,
    pub scheduler: serde_json::Value,
    pub model: ManifestModel,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finalized_at_ms: i64,
    pub sampling_seconds: f64,
    pub totals: Totals,
    pub shards: Vec<ShardRun>,
    /// Index parts, one per shard, in sample order.
    pub index: Vec<StoredFile>,
    /// Data files (`webdataset`, `parquet`), in sample order.
    pub files: Vec<StoredFile>,
    pub grids: Vec<GridEntry>,
    /// What describes the data to its readers: the dataset card (`README.md`) and, for WebDataset,
    /// `wids`' shard index (`data/wids.json`); absent from manifests written before they were.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<ListedFile>,
    /// A labelled job's samples per class, in class order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassCount>,
}

/// How many samples of one class a job holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCount {
    pub label: u32,
    pub name: String,
    pub samples: u64,
}

/// An object the manifest lists, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedFile {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub samples: u64,
    pub shards: u64,
    pub index_parts: u64,
    pub index_bytes: u64,
    pub data_files: u64,
    pub data_bytes: u64,
    pub grids: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestModel {
    pub name: String,
    pub source: String,
    pub sha256: String,
    pub config: serde_json::Value,
}

/// Which samples a shard covered and where and how it ran (in its record and in the manifest).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardRun {
    pub shard: u64,
    pub start: u64,
    pub end: u64,
    pub worker: String,
    pub device: String,
    pub attempt: u32,
    pub sampling_seconds: f64,
    /// Samples of the shard whose objects an earlier attempt had written first (kept, and indexed with
    /// their stored SHA-256).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub adopted: u64,
    /// Other shards whose samples ran in the same UNet batches (co-batching), as `JOB_ID/SHARD`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batched_with: Vec<String>,
    /// The group-norm path the worker's UNets had taken when the shard was recorded
    /// ([`crate::model::resnet::group_norm_path`]); empty in records written before it was kept.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group_norm: String,
    /// The UNet's precision and layout, and whether CUDA graphs and cuDNN's autotuner ran (absent from
    /// records written before they were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<DType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Layout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_graphs: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cudnn_benchmark: Option<bool>,
    /// `generate`: threads that sampled the shard's batches, and where its time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lanes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<RunTimings>,
}

/// Where a `generate` run's time went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunTimings {
    /// Fetching, checking, hashing and loading the model.
    pub load_seconds: f64,
    /// From the start of the command to the shard's record.
    pub total_seconds: f64,
    /// The shard's samples over its sampling time (first noise draw to the last sample stored).
    pub images_per_second: f64,
    /// Each batch, in order (the first batch of a lane on CUDA also pays for kernel selection and
    /// graph capture).
    pub batches: Vec<BatchTiming>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchTiming {
    pub batch: usize,
    pub lane: usize,
    /// The reverse process, from the first noise draw to x_0 on the host.
    pub sampling_seconds: f64,
    /// Turning x_0 into images and handing them to the writer (waiting while it is behind).
    pub handoff_seconds: f64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Shard records read concurrently by [`finalize`].
const RECORD_READS: usize = 16;

/// Files that must tile `0..n` in order, each sample once.
fn check_tiling(what: &str, files: &[StoredFile], n: u64) -> Result<(), OutputError> {
    let mut next = 0;
    for f in files {
        if f.first != next || f.end <= f.first {
            return Err(OutputError::Corrupt(format!(
                "{what} {} covers samples {}..{}, expected to start at {next}",
                f.path, f.first, f.end
            )));
        }
        next = f.end;
    }
    if next != n {
        return Err(OutputError::Corrupt(format!("{what} cover samples 0..{next} of 0..{n}")));
    }
    Ok(())
}

/// Writes the grids no shard could make alone and then the manifest; returns the manifest's URI.
/// Reads one shard record at a time, so its memory grows with the number of shards and data files,
/// not samples. Idempotent: running it twice (two workers racing, or a restart) leaves the first run's
/// objects.
pub async fn finalize(
    out: &JobOutputs,
    job: &JobRecord,
    model: &ResolvedModel,
    now_ms: i64,
) -> Result<String, OutputError> {
    let spec = &job.spec;
    let mut runs = Vec::with_capacity(job.shards_total as usize);
    let mut index = Vec::with_capacity(job.shards_total as usize);
    let mut files = Vec::new();
    let mut grids: BTreeMap<u64, GridEntry> = BTreeMap::new();
    // Records are read a few at a time (a store round trip each) and folded in shard order.
    let mut records = futures_util::stream::iter(0..job.shards_total)
        .map(|shard| async move { (shard, out.shard_record(shard).await) })
        .buffered(RECORD_READS);
    while let Some((shard, record)) = records.next().await {
        let record = record?.ok_or_else(|| {
            OutputError::Corrupt(format!("shard {shard} is done but its record is missing"))
        })?;
        if (record.index.first, record.index.end) != (record.run.start, record.run.end) {
            return Err(OutputError::Corrupt(format!("shard {shard}: its index part covers other samples")));
        }
        grids.extend(record.grids.into_iter().map(|g| (g.index, g)));
        files.extend(record.files);
        index.push(record.index);
        runs.push(record.run);
    }
    check_tiling("index parts", &index, spec.num_samples)?;
    if spec.dataset.format.parts().is_some() {
        check_tiling("data files", &files, spec.num_samples)?;
    }
    for range in grid_ranges(spec) {
        if let std::collections::btree_map::Entry::Vacant(slot) = grids.entry(range.number) {
            let tiles = read_tiles(out, &index, &files, range.first..range.end).await?;
            slot.insert(put_grid(out, spec, range, tiles).await?);
        }
    }
    let metadata = put_metadata(out, job, model, &files).await?;
    let scheduler = model.scheduler(spec.scheduler).map(|s| s.to_json()).unwrap_or_default();
    let totals = Totals {
        samples: spec.num_samples,
        shards: runs.len() as u64,
        index_parts: index.len() as u64,
        index_bytes: index.iter().map(|f| f.bytes).sum(),
        data_files: files.len() as u64,
        data_bytes: files.iter().map(|f| f.bytes).sum(),
        grids: grids.len() as u64,
    };
    let manifest = JobManifest {
        job_id: job.id.clone(),
        version: format!("ddpm-worker {}", env!("CARGO_PKG_VERSION")),
        spec: spec.clone(),
        scheduler,
        model: ManifestModel {
            name: model.name.clone(),
            source: model.source.clone(),
            sha256: model.weights_sha256.clone(),
            config: serde_json::to_value(&model.unet_config).unwrap_or_default(),
        },
        created_at_ms: job.created_at_ms,
        started_at_ms: job.started_at_ms,
        finalized_at_ms: now_ms,
        sampling_seconds: runs.iter().map(|r| r.sampling_seconds).sum(),
        totals,
        shards: runs,
        index,
        files,
        grids: grids.into_values().collect(),
        metadata,
        classes: spec
            .classes
            .iter()
            .flat_map(|c| {
                c.counts.iter().map(|(&label, &samples)| ClassCount {
                    label,
                    name: c.name_of(label),
                    samples,
                })
            })
            .collect(),
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| OutputError::Internal(e.to_string()))?;
    let key = out.manifest_key();
    // Two finalizers racing write the same listing; the first manifest stays.
    Ok(write_once(out.store.as_ref(), &key, Bytes::from(json), "application/json").await?.uri)
}

/// Writes the dataset card and, for WebDataset, the `wids` shard index (create-only: what is stored is
/// what gets listed).
async fn put_metadata(
    out: &JobOutputs,
    job: &JobRecord,
    model: &ResolvedModel,
    files: &[StoredFile],
) -> Result<Vec<ListedFile>, OutputError> {
    let mut objects = vec![(card::CARD_PATH, card::dataset_card(job, model), "text/markdown; charset=utf-8")];
    if job.spec.dataset.format == DataFormat::Webdataset {
        objects.push((card::WIDS_PATH, card::wids_index(job, files), "application/json"));
    }
    let mut listed = Vec::with_capacity(objects.len());
    for (path, text, content_type) in objects {
        let text = text.map_err(|e| OutputError::Internal(format!("{path}: {e}")))?;
        let written = write_once(out.store.as_ref(), &out.key(path), Bytes::from(text), content_type).await?;
        listed.push(ListedFile { path: path.into(), sha256: written.sha256, bytes: written.bytes });
    }
    Ok(listed)
}

/// The decoded samples `range` of a grid that straddles shards, read through the index parts that
/// list them (a grid's worth of images, whatever the job's size).
async fn read_tiles(
    out: &JobOutputs,
    index: &[StoredFile],
    files: &[StoredFile],
    range: std::ops::Range<u64>,
) -> Result<Vec<DynamicImage>, OutputError> {
    let mut tiles = Vec::with_capacity((range.end - range.start) as usize);
    let size_of = |path: &str| files.iter().find(|f| f.path == path).map(|f| f.bytes);
    for part in index.iter().filter(|p| p.first < range.end && range.start < p.end) {
        let bytes = out
            .store
            .get(&out.key(&part.path))
            .await?
            .ok_or_else(|| OutputError::Corrupt(format!("{} is missing", part.path)))?;
        let rows = dataset::index::read(bytes)?;
        for row in rows.iter().filter(|r| range.contains(&r.index)) {
            let encoded = dataset::sink::read_sample(&out.store, &out.base, row, size_of).await?;
            let img = tokio::task::spawn_blocking(move || image::load_from_memory(&encoded))
                .await
                .map_err(|e| OutputError::Internal(e.to_string()))?
                .map_err(|e| OutputError::Corrupt(format!("{}: {e}", row.file)))?;
            tiles.push(img);
        }
    }
    if tiles.len() as u64 != range.end - range.start {
        return Err(OutputError::Corrupt(format!("the index lists {} of samples {range:?}", tiles.len())));
    }
    Ok(tiles)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_write_only_within_the_allowed_destinations() {
        let allowed: Vec<Destination> =
            ["s3://data/team-a".parse().unwrap(), "file:/mnt/shared".parse().unwrap()].to_vec();
        let outputs = Outputs::new("file:/srv/jobs".parse().unwrap(), &allowed, false);
        let file = |root: &str, prefix: &str| Destination::File { root: root.into(), prefix: prefix.into() };
        let s3 =
            |bucket: &str, prefix: &str| Destination::S3 { bucket: bucket.into(), prefix: prefix.into() };
        assert_eq!(outputs.resolve("", ""), Ok(file("/srv/jobs", "")));
        assert_eq!(outputs.resolve("", "a/b/"), Ok(file("/srv/jobs", "a/b")));
        assert_eq!(outputs.resolve("file:/srv/jobs/x", "y"), Ok(file("/srv/jobs", "x/y")));
        assert_eq!(outputs.resolve("file:///mnt/shared/", ""), Ok(file("/mnt/shared", "")));
        assert_eq!(outputs.resolve("s3://data/team-a", ""), Ok(s3("data", "team-a")));
        assert_eq!(outputs.resolve("s3://data/team-a/run/", "p"), Ok(s3("data", "team-a/run/p")));
        for outside in [
            "s3://data",
            "s3://data/team-ab",
            "s3://data/team",
            "s3://other/team-a",
            "file:/srv",
            "file:/srv/jobsx",
            "file:/mnt",
            "file:/etc/passwd",
        ] {
            assert!(matches!(outputs.resolve(outside, ""), Err(Refusal::NotAllowed(_))), "{outside}");
        }
        for malformed in [
            "/srv/jobs",
            "gs://data",
            "s3://UPPER/x",
            "s3://data/team-a/../team-b",
            "s3://data/team-a//x",
            "s3://data//team-a",
            "s3://data/team-a//",
            "file:srv/jobs",
            "file:/srv/jobs/../../etc",
            "file:/srv/jobs/./x",
            "file:/srv//jobs",
            "file:/srv/jobs/a\nb",
        ] {
            assert!(
                matches!(outputs.resolve(malformed, ""), Err(Refusal::Invalid("output.destination", _))),
                "{malformed}: {:?}",
                outputs.resolve(malformed, "")
            );
        }
        for bad_prefix in ["../x", "/abs", "a//b", "a/./b", "a\\b", ".ddpm-staging/x"] {
            assert!(
                matches!(outputs.resolve("", bad_prefix), Err(Refusal::Invalid("output.prefix", _))),
                "{bad_prefix}"
            );
        }
        let display: Vec<String> = outputs.allowed().iter().map(ToString::to_string).collect();
        assert_eq!(display, ["file:/srv/jobs", "s3://data/team-a", "file:/mnt/shared"]);
        let only_default = Outputs::new("file:/srv/jobs".parse().unwrap(), &[], false);
        assert!(!only_default.accepts_buckets());
        assert!(matches!(only_default.resolve("s3://data/team-a", ""), Err(Refusal::NotAllowed(_))));
    }

    #[test]
    fn grids_cover_the_samples_in_order() {
        let mut spec = crate::queue::conformance::spec(10, 2, 0, &[]);
        spec.samples_per_grid = 4;
        let ranges: Vec<_> = grid_ranges(&spec).map(|g| (g.number, g.first, g.end)).collect();
        assert_eq!(ranges, [(0, 0, 4), (1, 4, 8), (2, 8, 10)]);
        spec.samples_per_grid = 0;
        assert_eq!(grid_ranges(&spec).count(), 0);
    }
}
