//! Finalize at scale (`ddpm-bench finalize`): a synthetic job's shards written by the real shard
//! writer, then its manifest written by the real finalize, each in its own process.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use ddpm_worker::dataset::sink::{ShardTarget, write_shard};
use ddpm_worker::dataset::{DataFormat, DatasetOptions, Encoding};
use ddpm_worker::job::{JobRecord, JobSpec, JobState};
use ddpm_worker::worker::outputs::{self, JobOutputs, ShardRecord, ShardRun};

/// What `ddpm-bench finalize` measured: the finalize of a synthetic job whose shards were written by the
/// real shard writer ([`ddpm_worker::dataset::sink::write_shard`]) with generated images.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FinalizeTiming {
    pub samples: u64,
    pub shards: u64,
    pub format: DataFormat,
    /// Seconds to write the shards (`prepare`), or to finalize (`run`).
    pub seconds: f64,
    /// Peak resident memory of this process (VmHWM), in MiB.
    pub peak_rss_mib: f64,
    /// The peak before the timed part (libtorch and the model loaded), in MiB.
    pub baseline_rss_mib: f64,
    pub manifest_bytes: u64,
}

/// The job that `ddpm-bench finalize` writes and finalizes: `samples` samples of `side`×`side` RGB in
/// `shards` shards, no grids.
fn synthetic_job(samples: u64, shards: u64, format: DataFormat, side: u64) -> JobRecord {
    let per_shard = samples.div_ceil(shards.max(1));
    let target = ddpm_worker::dataset::DEFAULT_TARGET_FILE_BYTES;
    let mut dataset = DatasetOptions::new(format, Encoding::default(), target, (3, side, side), 1);
    dataset.samples_per_file = dataset.samples_per_file.min(per_shard);
    JobRecord {
        id: format!("bench-{}-{samples}", format.as_str()),
        spec: JobSpec {
            request_id: String::new(),
            owner: String::new(),
            model: "bench".into(),
            scheduler: ddpm_worker::schedulers::SchedulerKind::Ddim,
            steps: 1,
            eta: None,
            num_samples: samples,
            seed: 0,
            batch_size: 1,
            samples_per_grid: 0,
            grid_columns: 0,
            output: None,
            priority: 0,
            labels: Default::default(),
            dataset,
            trace_context: Default::default(),
            extends: None,
            webhook: None,
            classes: None,
        },
        state: JobState::Running,
        samples_done: samples,
        shards_done: shards,
        shards_total: shards,
        created_at_ms: 0,
        started_at_ms: Some(0),
        finished_at_ms: None,
        error: None,
        manifest_uri: None,
    }
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `prepare`: writes every shard of the synthetic job (data, index part and record) under `dir` with
/// the real writer; `run`: finalizes it (writes its manifest). Run them as two processes, so the
/// finalize's peak memory is its own.
pub async fn time_finalize(
    dir: &Path,
    model: &Path,
    samples: u64,
    shards: u64,
    format: DataFormat,
    side: u32,
    prepare: bool,
) -> Result<FinalizeTiming, String> {
    let job = synthetic_job(samples, shards, format, u64::from(side));
    let store: Arc<dyn ddpm_worker::storage::ObjectStore> =
        Arc::new(ddpm_worker::storage::local::LocalStore::new(dir).map_err(|e| e.to_string())?);
    let out = JobOutputs::new(Arc::clone(&store), "", &job.id);
    let resolved = ddpm_worker::models::ResolvedModel::from_dir("bench", model.display().to_string(), model)
        .map_err(|e| e.to_string())?;
    let baseline_rss_mib = peak_rss_mib();
    let started = Instant::now();
    let mut manifest_bytes = 0;
    if prepare {
        let per_shard = samples.div_ceil(shards.max(1));
        for shard in 0..shards {
            let (start, end) = (shard * per_shard, ((shard + 1) * per_shard).min(samples));
            let target = ShardTarget {
                store: Arc::clone(&store),
                base: out.base.clone(),
                options: job.spec.dataset,
                context: outputs::sample_context(&job.spec, &resolved),
                shard,
                start,
                end,
                writer: ddpm_worker::dataset::index::Writer { shard, worker: "bench".into(), attempt: 1 },
                mtime: 0,
                scratch: dir.join("scratch"),
            };
            let (tx, rx) = tokio::sync::mpsc::channel(256);
            let writer = tokio::spawn(write_shard(target, rx, |_, _| {}));
            for index in start..end {
                let px: Vec<u8> = (0..192u64)
                    .map(|k| (index.wrapping_mul(2654435761).wrapping_add(k * 97) >> 7) as u8)
                    .collect();
                let img = image::RgbImage::from_raw(8, 8, px).ok_or("image")?;
                tx.send((index, image::DynamicImage::ImageRgb8(img))).await.map_err(|e| e.to_string())?;
            }
            drop(tx);
            let written = writer.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
            let run = ShardRun {
                shard,
                start,
                end,
                worker: "bench".into(),
                device: "cpu".into(),
                attempt: 1,
                sampling_seconds: 0.0,
                adopted: written.adopted,
                ..Default::default()
            };
            let record = ShardRecord { run, files: written.files, index: written.index, grids: Vec::new() };
            let json = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
            ddpm_worker::storage::write_once(
                store.as_ref(),
                &out.shard_key(shard),
                json.into(),
                "application/json",
            )
            .await
            .map_err(|e| e.to_string())?;
        }
    } else {
        outputs::finalize(&out, &job, &resolved, 0).await.map_err(|e| e.to_string())?;
        manifest_bytes = std::fs::metadata(dir.join(&job.id).join("manifest.json")).map_or(0, |m| m.len());
    }
    Ok(FinalizeTiming {
        samples,
        shards,
        format,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_mib: peak_rss_mib(),
        baseline_rss_mib,
        manifest_bytes,
    })
}
