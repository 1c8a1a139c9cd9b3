//! `ddpm-worker verify`: proves a finished job folder is what its manifest says, and that its samples
//! are the ones its model makes.
//!
//! 1. Stored bytes: every object the manifest lists (index parts, data files, grids, the dataset card)
//!    has its listed SHA-256, and every sample's bytes where the index says they are (an object, a tar
//!    member at its offset, a Parquet row) have the index's SHA-256.
//! 2. Resampling: whole batches picked at random (reproducibly, from `--seed`) are sampled again with
//!    the recorded model (its weights' SHA-256 checked first), scheduler, steps, η, precision, layout and
//!    batch size, encoded as the job encoded them, and each sample's SHA-256 compared with the index.
//!
//! What resampling can prove across machines: on the CPU in the diffusers layout, the same bytes on any
//! x86-64 machine with the same libtorch (its kernels run AVX2 code, `ATEN_CPU_CAPABILITY=avx2`, as the
//! goldens do); on a GPU, only on the same GPU model with the same CUDA libraries, and never for a job
//! run with cuDNN's autotuner. A job sampled on a GPU and verified on the CPU (or in another precision)
//! is not expected to match, and verify says so instead of trying.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use tch::Device;

use crate::dataset::index::IndexRow;
use crate::digest::sha256_hex;
use crate::generate::TempFolder;
use crate::model::{Layout, LoadedUNet};
use crate::models::{ModelLocation, ResolvedModel};
use crate::placement::{DType, device_name};
use crate::sampler::{BatchRequest, Placement, sample_batch};
use crate::storage::{Destination, ObjectStore};
use crate::worker::outputs::{JobManifest, ShardRun};

/// What to verify and how.
#[derive(Debug, Clone)]
pub struct VerifySpec {
    /// The job's folder (local or on S3), as a destination whose root is the folder.
    pub folder: Destination,
    /// The share of batches resampled (at least one batch unless 0).
    pub fraction: f64,
    /// Which batches: the same seed picks the same batches.
    pub seed: u64,
    /// The model, instead of the manifest's `model.source`.
    pub model: Option<ModelLocation>,
    pub device: Device,
    pub s3_path_style: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Verification cannot start (no manifest, the model cannot be found or is not the job's).
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Storage(#[from] crate::storage::StorageError),
}

/// One thing that is not as listed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Mismatch {
    /// The sample, where one is concerned.
    pub sample: Option<u64>,
    /// The object.
    pub path: String,
    pub what: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.sample {
            Some(i) => write!(f, "sample {i} ({}): {}", self.path, self.what),
            None => write!(f, "{}: {}", self.path, self.what),
        }
    }
}

/// What was checked, and every mismatch found.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub job_id: String,
    pub objects_checked: u64,
    pub samples_checked: u64,
    pub batches_resampled: u64,
    pub samples_resampled: u64,
    pub mismatches: Vec<Mismatch>,
}

/// Checks the stored bytes, then resamples the chosen batches.
pub async fn verify(spec: &VerifySpec) -> Result<Report, VerifyError> {
    let store = crate::storage::open_store(&spec.folder, spec.s3_path_style).await?;
    let manifest = read_manifest(store.as_ref()).await?;
    let mut report = Report { job_id: manifest.job_id.clone(), ..Default::default() };
    let parts = check_objects(store.as_ref(), &manifest, &mut report).await?;
    let rows = check_samples(&store, &manifest, &parts, &mut report).await?;
    let model = resolve_model(spec, &manifest).await?;
    let batches = pick_batches(&manifest, spec.fraction, spec.seed);
    let (device, manifest) = (spec.device, Arc::new(manifest));
    let found = tokio::task::spawn_blocking(move || resample(&model.0, &manifest, &batches, device, &rows))
        .await
        .map_err(|e| VerifyError::Setup(format!("resampling stopped: {e}")))??;
    report.batches_resampled = found.batches;
    report.samples_resampled = found.samples;
    report.mismatches.extend(found.mismatches);
    Ok(report)
}

async fn read_manifest(store: &dyn ObjectStore) -> Result<JobManifest, VerifyError> {
    let bytes = store.get("manifest.json").await?.ok_or_else(|| {
        VerifyError::Setup(format!("{}: no manifest.json (not a finished job's folder)", store.uri("")))
    })?;
    serde_json::from_slice(&bytes).map_err(|e| VerifyError::Setup(format!("manifest.json: {e}")))
}

/// Every listed object's SHA-256 and size; returns the index parts as read, by path, for
/// [`check_samples`].
async fn check_objects(
    store: &dyn ObjectStore,
    manifest: &JobManifest,
    report: &mut Report,
) -> Result<BTreeMap<String, Bytes>, VerifyError> {
    let mut parts = BTreeMap::new();
    let index = manifest.index.iter().map(|f| (&f.path, &f.sha256, true));
    let files = manifest.files.iter().map(|f| (&f.path, &f.sha256, false));
    let grids = manifest.grids.iter().map(|g| (&g.path, &g.sha256, false));
    let metadata = manifest.metadata.iter().map(|f| (&f.path, &f.sha256, false));
    for (path, sha256, is_part) in index.chain(files).chain(grids).chain(metadata) {
        report.objects_checked += 1;
        let stored = store.get(path).await?;
        if let (true, Some(b)) = (is_part, &stored) {
            parts.insert(path.clone(), b.clone());
        }
        let what = match stored {
            None => "missing".to_string(),
            Some(b) if sha256_hex(&b) != *sha256 => {
                format!("stored with SHA-256 {}, the manifest lists {sha256}", sha256_hex(&b))
            }
            Some(_) => continue,
        };
        report.mismatches.push(Mismatch { sample: None, path: path.clone(), what });
    }
    Ok(parts)
}

/// Every sample's stored bytes against the index; returns the index rows by sample.
async fn check_samples(
    store: &Arc<dyn ObjectStore>,
    manifest: &JobManifest,
    parts: &BTreeMap<String, Bytes>,
    report: &mut Report,
) -> Result<BTreeMap<u64, IndexRow>, VerifyError> {
    let size_of = |path: &str| manifest.files.iter().find(|f| f.path == path).map(|f| f.bytes);
    let mut rows = BTreeMap::new();
    for part in &manifest.index {
        let Some(bytes) = parts.get(&part.path) else { continue };
        let part_rows = crate::dataset::index::read(bytes.clone())
            .map_err(|e| VerifyError::Setup(format!("{}: {e}", part.path)))?;
        for row in part_rows {
            report.samples_checked += 1;
            let stored = crate::dataset::sink::read_sample(store, "", &row, size_of).await;
            let what = match stored {
                Err(e) => Some(format!("unreadable: {e}")),
                Ok(b) if sha256_hex(&b) != row.sha256 => Some(format!(
                    "stored bytes have SHA-256 {}, the index lists {}",
                    sha256_hex(&b),
                    row.sha256
                )),
                Ok(_) => None,
            };
            if let Some(what) = what {
                report.mismatches.push(Mismatch { sample: Some(row.index), path: row.file.clone(), what });
            }
            rows.insert(row.index, row);
        }
    }
    let n = manifest.spec.num_samples;
    if rows.len() as u64 != n || rows.keys().next_back().is_some_and(|&last| last + 1 != n) {
        report.mismatches.push(Mismatch {
            sample: None,
            path: "index/".into(),
            what: format!("lists {} distinct samples of {n}", rows.len()),
        });
    }
    Ok(rows)
}

/// The model folder, resolved and hashed: it must be the one the job ran (its weights' SHA-256).
async fn resolve_model(
    spec: &VerifySpec,
    manifest: &JobManifest,
) -> Result<(ResolvedModel, Option<TempFolder>), VerifyError> {
    let location = match &spec.model {
        Some(l) => l.clone(),
        None => manifest.model.source.parse().map_err(|e| {
            VerifyError::Setup(format!("the manifest's model {:?}: {e}; give --model", manifest.model.source))
        })?,
    };
    let temp = matches!(location, ModelLocation::S3 { .. }).then(|| {
        TempFolder(std::env::temp_dir().join(format!("ddpm-verify-model-{}", uuid::Uuid::new_v4().simple())))
    });
    let copy_to = temp.as_ref().map(|t| t.0.clone()).unwrap_or_default();
    let dir = location
        .fetch(&copy_to, spec.s3_path_style)
        .await
        .map_err(|e| VerifyError::Setup(format!("model {}: {e}", location.source())))?;
    let model = ResolvedModel::from_dir(&manifest.model.name, location.source(), &dir)
        .map_err(|e| VerifyError::Setup(format!("model {}: {e}", location.source())))?;
    if model.weights_sha256 != manifest.model.sha256 {
        return Err(VerifyError::Setup(format!(
            "model {}: its UNet weights have SHA-256 {}, but the job ran weights {}: not the job's model",
            location.source(),
            model.weights_sha256,
            manifest.model.sha256
        )));
    }
    Ok((model, temp))
}

/// A batch as the job ran it: its shard's run and its samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub run: ShardRun,
    pub samples: std::ops::Range<u64>,
}

/// The job's batches (each shard's samples in batches of the job's batch size, the last one short),
/// and `fraction` of them picked by a generator seeded `seed`, in sample order.
pub fn pick_batches(manifest: &JobManifest, fraction: f64, seed: u64) -> Vec<Batch> {
    let size = u64::from(manifest.spec.batch_size.max(1));
    let mut all: Vec<Batch> = manifest
        .shards
        .iter()
        .flat_map(|run| {
            (run.start..run.end)
                .step_by(size as usize)
                .map(move |first| Batch { run: run.clone(), samples: first..(first + size).min(run.end) })
        })
        .collect();
    let wanted =
        if fraction <= 0.0 { 0 } else { ((all.len() as f64 * fraction).ceil() as usize).clamp(1, all.len()) };
    let mut rng = fastrand::Rng::with_seed(seed);
    rng.shuffle(&mut all);
    all.truncate(wanted);
    all.sort_by_key(|b| b.samples.start);
    all
}

struct Resampled {
    batches: u64,
    samples: u64,
    mismatches: Vec<Mismatch>,
}

/// Samples `batches` again and compares each sample's encoded SHA-256 with the index.
fn resample(
    model: &ResolvedModel,
    manifest: &JobManifest,
    batches: &[Batch],
    device: Device,
    rows: &BTreeMap<u64, IndexRow>,
) -> Result<Resampled, VerifyError> {
    let spec = &manifest.spec;
    let setup = |e: &dyn std::fmt::Display| VerifyError::Setup(e.to_string());
    let scheduler = model.scheduler(spec.scheduler).map_err(|e| setup(&e))?;
    // A UNet per precision and layout the shards ran with (a job's shards may differ).
    let mut unets: Vec<((DType, Layout), LoadedUNet)> = Vec::new();
    let mut found = Resampled { batches: 0, samples: 0, mismatches: Vec::new() };
    for batch in batches {
        let (dtype, layout) = how_it_ran(&batch.run, device)?;
        let slot = match unets.iter().position(|(how, _)| *how == (dtype, layout)) {
            Some(slot) => slot,
            None => {
                let unet = LoadedUNet::prepare(&model.files, device, dtype.kind(), layout, false)
                    .map_err(|e| setup(&e))?;
                unets.push(((dtype, layout), unet));
                unets.len() - 1
            }
        };
        let unet = &unets[slot].1;
        let seeds: Vec<u64> = batch.samples.clone().map(|i| spec.seed + i).collect();
        let classes: Option<Vec<i64>> = match spec.classes.as_ref().map(|c| c.layout()) {
            None => None,
            Some(l) => Some(
                batch
                    .samples
                    .clone()
                    .map(|i| l.class_of(i).map(i64::from))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| setup(&"a sample past the job's class counts"))?,
            ),
        };
        let req = BatchRequest {
            classes: classes.as_deref(),
            guidance: spec.guidance(),
            ..BatchRequest::new(
                &seeds,
                spec.batch_size as usize,
                spec.steps as usize,
                spec.eta.unwrap_or(0.0),
            )
        };
        let place = Placement { device, kind: dtype.kind() };
        let x = sample_batch(unet, &scheduler, &req, place, None, |_| true).map_err(|e| setup(&e))?;
        let images = crate::imaging::to_images(&x).map_err(|e| setup(&e))?;
        for (index, image) in batch.samples.clone().zip(images) {
            let encoded: Bytes = spec.dataset.encoding.encode(&image).map_err(|e| setup(&e))?;
            let got = sha256_hex(&encoded);
            let (path, what) = match rows.get(&index) {
                None => ("index/".to_string(), "not in the index".to_string()),
                Some(row) if row.sha256 != got => {
                    (row.file.clone(), format!("resampled to SHA-256 {got}, the index lists {}", row.sha256))
                }
                Some(_) => continue,
            };
            found.mismatches.push(Mismatch { sample: Some(index), path, what });
        }
        found.batches += 1;
        found.samples += batch.samples.end - batch.samples.start;
    }
    Ok(found)
}

/// The precision and layout a shard ran with (fp32 in diffusers' layout where its record predates
/// them), if this device can reproduce them.
fn how_it_ran(run: &ShardRun, device: Device) -> Result<(DType, Layout), VerifyError> {
    let (dtype, layout) = (run.dtype.unwrap_or(DType::Fp32), run.layout.unwrap_or_default());
    let ran_on_cuda = run.device.starts_with("cuda");
    if ran_on_cuda != device.is_cuda() {
        return Err(VerifyError::Setup(format!(
            "shard {} ran on {} and cannot be reproduced on {}: verify it with --device {}",
            run.shard,
            run.device,
            device_name(device),
            if ran_on_cuda { "cuda" } else { "cpu" }
        )));
    }
    if run.cudnn_benchmark == Some(true) {
        return Err(VerifyError::Setup(format!(
            "shard {} ran with cuDNN's autotuner, whose kernel picks (and so the last bits) vary by run: \
             its samples cannot be resampled exactly",
            run.shard
        )));
    }
    Ok((dtype, layout))
}
