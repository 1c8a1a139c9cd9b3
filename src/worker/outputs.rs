//! A job's outputs under `<prefix>/<job_id>/`: `samples/<index:08>.png`, `grids/<n:05>.png`,
//! `shards/<shard:06>.json` (what a finished shard wrote) and `manifest.json`, written last as the job's
//! commit record.
//!
//! Shard records make a job restartable at any moment: a shard whose record exists is not sampled
//! again, and the manifest is assembled from the records, so it lists every sample exactly once
//! however often shards were retried.
//!
//! Every object is written create-only ([`write_once`]): the first sample, grid, record or manifest at
//! a key stays, and a later writer (a retry, or a worker that lost its lease) lists the stored object's
//! SHA-256 instead of its own. So after a job SUCCEEDED every SHA-256 in its manifest is that of the
//! bytes stored, whatever late writers do.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use image::DynamicImage;
use serde::{Deserialize, Serialize};

use crate::imaging;
use crate::job::{JobRecord, JobSpec};
use crate::models::ResolvedModel;
use crate::storage::{Destination, ObjectStore, StorageError, join_key, write_once};

/// Where jobs write: the server's default destination, or a bucket a job names (S3 only).
#[derive(Debug)]
pub struct Outputs {
    default: Destination,
    path_style: bool,
    /// One client per bucket, opened on first use.
    stores: tokio::sync::Mutex<BTreeMap<String, Arc<dyn ObjectStore>>>,
}

impl Outputs {
    pub fn new(default: Destination, path_style: bool) -> Self {
        Self { default, path_style, stores: Default::default() }
    }

    pub fn default_destination(&self) -> &Destination {
        &self.default
    }

    /// Whether a job may name its own bucket (a local-directory server has none to offer).
    pub fn accepts_buckets(&self) -> bool {
        matches!(self.default, Destination::S3 { .. })
    }

    /// The store and folder of job `job_id`.
    pub async fn for_job(&self, job_id: &str, spec: &JobSpec) -> Result<JobOutputs, StorageError> {
        let (dest, prefix) = match (&self.default, &spec.output) {
            (Destination::S3 { bucket, prefix }, Some(o)) => {
                let bucket = if o.bucket.is_empty() { bucket.clone() } else { o.bucket.clone() };
                let prefix = if o.prefix.is_empty() && o.bucket.is_empty() {
                    prefix.clone()
                } else {
                    o.prefix.clone()
                };
                (Destination::S3 { bucket, prefix: String::new() }, prefix)
            }
            (Destination::File { root, prefix }, Some(o)) => {
                let prefix = if o.prefix.is_empty() { prefix.clone() } else { o.prefix.clone() };
                (Destination::File { root: root.clone(), prefix: String::new() }, prefix)
            }
            (Destination::S3 { bucket, prefix }, None) => {
                (Destination::S3 { bucket: bucket.clone(), prefix: String::new() }, prefix.clone())
            }
            (Destination::File { root, prefix }, None) => {
                (Destination::File { root: root.clone(), prefix: String::new() }, prefix.clone())
            }
        };
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

    pub fn key(&self, relative: &str) -> String {
        join_key(&self.base, relative)
    }

    pub fn sample_key(&self, index: u64) -> String {
        self.key(&crate::job::sample_path(index))
    }

    pub fn grid_key(&self, grid: u64) -> String {
        self.key(&format!("grids/{grid:05}.png"))
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
pub struct SampleEntry {
    pub index: u64,
    pub seed: u64,
    pub key: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GridEntry {
    pub index: u64,
    pub key: String,
    pub sha256: String,
    /// The samples it shows, `first..end`.
    pub first: u64,
    pub end: u64,
}

/// What one finished shard wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    #[serde(flatten)]
    pub run: ShardRun,
    pub samples: Vec<SampleEntry>,
    /// Grids whose samples all lie in this shard.
    pub grids: Vec<GridEntry>,
}

/// The grids of a job: grid `n` shows samples `n * per_grid .. min((n + 1) * per_grid, num_samples)`.
pub fn grid_ranges(spec: &JobSpec) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    let per = u64::from(spec.samples_per_grid);
    let count = if per == 0 { 0 } else { spec.num_samples.div_ceil(per) };
    (0..count).map(move |n| (n, n * per, ((n + 1) * per).min(spec.num_samples)))
}

/// Encodes a sample on the blocking pool and writes it (or adopts what an earlier attempt wrote: the
/// flag says so).
pub async fn put_sample(
    out: &JobOutputs,
    index: u64,
    seed: u64,
    img: DynamicImage,
) -> Result<(SampleEntry, DynamicImage, bool), OutputError> {
    let (png, img) = tokio::task::spawn_blocking(move || imaging::encode_png(&img).map(|png| (png, img)))
        .await
        .map_err(|e| OutputError::Internal(e.to_string()))??;
    let key = out.sample_key(index);
    let put = write_once(out.store.as_ref(), &key, Bytes::from(png), "image/png").await?;
    Ok((SampleEntry { index, seed, key, sha256: put.sha256 }, img, put.adopted))
}

/// Composes and writes grid `n` from its tiles (in sample order).
pub async fn put_grid(
    out: &JobOutputs,
    spec: &JobSpec,
    (n, first, end): (u64, u64, u64),
    tiles: Vec<DynamicImage>,
) -> Result<GridEntry, OutputError> {
    let columns = spec.grid_columns.max(1) as usize;
    let png = tokio::task::spawn_blocking(move || imaging::encode_png(&imaging::make_grid(&tiles, columns)))
        .await
        .map_err(|e| OutputError::Internal(e.to_string()))??;
    let key = out.grid_key(n);
    let put = write_once(out.store.as_ref(), &key, Bytes::from(png), "image/png").await?;
    Ok(GridEntry { index: n, key, sha256: put.sha256, first, end })
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

/// `manifest.json`: everything needed to reproduce or audit a job.
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
    pub shards: Vec<ShardRun>,
    pub samples: Vec<SampleEntry>,
    pub grids: Vec<GridEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestModel {
    pub name: String,
    pub source: String,
    pub sha256: String,
    pub config: serde_json::Value,
}

/// Which samples a shard covered and where and how it ran (in its record and in the manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRun {
    pub shard: u64,
    pub start: u64,
    pub end: u64,
    pub worker: String,
    pub device: String,
    pub attempt: u32,
    pub sampling_seconds: f64,
    /// Samples of the shard whose objects an earlier attempt had written first (kept, and listed with
    /// their stored SHA-256).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub adopted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Writes the grids no shard could make alone and then the manifest; returns the manifest's URI.
/// Idempotent: running it twice (two workers racing, or a restart) leaves the first run's objects.
pub async fn finalize(
    out: &JobOutputs,
    job: &JobRecord,
    model: &ResolvedModel,
    now_ms: i64,
) -> Result<String, OutputError> {
    let spec = &job.spec;
    let mut records = Vec::with_capacity(job.shards_total as usize);
    for shard in 0..job.shards_total {
        let record = out.shard_record(shard).await?.ok_or_else(|| {
            OutputError::Corrupt(format!("shard {shard} is done but its record is missing"))
        })?;
        records.push(record);
    }
    let mut samples: Vec<SampleEntry> = records.iter().flat_map(|r| r.samples.iter().cloned()).collect();
    samples.sort_by_key(|s| s.index);
    let complete = samples.len() as u64 == spec.num_samples
        && samples.iter().enumerate().all(|(i, s)| s.index == i as u64);
    if !complete {
        return Err(OutputError::Corrupt(format!(
            "shard records list {} samples, expected each of 0..{} once",
            samples.len(),
            spec.num_samples
        )));
    }
    let mut grids: BTreeMap<u64, GridEntry> =
        records.iter().flat_map(|r| r.grids.iter().cloned()).map(|g| (g.index, g)).collect();
    for range in grid_ranges(spec) {
        if grids.contains_key(&range.0) {
            continue;
        }
        // A grid straddling shards: read its samples back.
        let mut tiles = Vec::new();
        for s in &samples[range.1 as usize..range.2 as usize] {
            let bytes = out
                .store
                .get(&s.key)
                .await?
                .ok_or_else(|| OutputError::Corrupt(format!("{} is missing", s.key)))?;
            let img = tokio::task::spawn_blocking(move || image::load_from_memory(&bytes))
                .await
                .map_err(|e| OutputError::Internal(e.to_string()))?
                .map_err(|e| OutputError::Corrupt(format!("{}: {e}", s.key)))?;
            tiles.push(img);
        }
        grids.insert(range.0, put_grid(out, spec, range, tiles).await?);
    }
    let scheduler = model.scheduler(spec.scheduler).map(|s| s.to_json()).unwrap_or_default();
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
        sampling_seconds: records.iter().map(|r| r.run.sampling_seconds).sum(),
        shards: records.iter().map(|r| r.run.clone()).collect(),
        samples,
        grids: grids.into_values().collect(),
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| OutputError::Internal(e.to_string()))?;
    let key = out.manifest_key();
    // Two finalizers racing write the same listing; the first manifest stays.
    Ok(write_once(out.store.as_ref(), &key, Bytes::from(json), "application/json").await?.uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_cover_the_samples_in_order() {
        let mut spec = crate::queue::conformance::spec(10, 2, 0, &[]);
        spec.samples_per_grid = 4;
        assert_eq!(grid_ranges(&spec).collect::<Vec<_>>(), [(0, 0, 4), (1, 4, 8), (2, 8, 10)]);
        spec.samples_per_grid = 0;
        assert_eq!(grid_ranges(&spec).count(), 0);
    }
}
