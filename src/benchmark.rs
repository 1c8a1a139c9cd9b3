//! UNet forward timing for `bench/` (the hidden `bench-unet` command): the same model, batch and
//! timesteps as the Python side times, on a warmed-up model, with its FLOP rate against 3×3
//! convolutions of the model's own shapes run the same way.

use std::path::Path;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::model::{Layout, LoadedUNet, ModelError, ModelFiles, channels_last, flops};

#[derive(Debug, Clone, serde::Serialize)]
pub struct UNetTiming {
    pub batch_size: usize,
    /// Batches run at once, each on its own thread with a replica and a share of the CPU threads.
    pub lanes: usize,
    pub threads_per_lane: i32,
    pub iterations: usize,
    /// Mean wall time of one forward (of one lane).
    pub mean_ms: f64,
    pub min_ms: f64,
    /// FLOPs of one forward ([`flops::unet_forward`]).
    pub flops: f64,
    /// Of which the attention products.
    pub attention_flops: f64,
    /// All lanes together: `lanes × iterations × flops` over the wall time of the whole run.
    pub gflops_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conv_peak: Option<ConvPeak>,
}

/// 3×3 convolutions alone, on the model's own shapes, run the way the UNet runs (same layout, lanes and
/// threads): the ceiling the UNet's convolutions could reach.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvPeak {
    /// The fastest shape's GFLOP/s (all lanes together).
    pub gflops_per_second: f64,
    /// `[C_in, C_out, H, W]` of that shape.
    pub shape: [i64; 4],
    /// The UNet's GFLOP/s over this peak.
    pub unet_fraction: f64,
    pub shapes: Vec<ConvShapeTiming>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvShapeTiming {
    pub shape: [i64; 4],
    /// How many times one forward runs it.
    pub count: usize,
    pub gflops_per_second: f64,
}

pub struct UNetBench<'a> {
    pub model: &'a Path,
    pub batch_size: usize,
    pub iterations: usize,
    pub warmup: usize,
    pub device: Device,
    pub kind: Kind,
    pub layout: Layout,
    pub lanes: usize,
    /// Also measure [`ConvPeak`].
    pub conv_peak: bool,
    /// Replay the UNet from CUDA graphs.
    pub cuda_graphs: bool,
}

/// Runs `lanes` threads: each calls `prepare(lane)` (warm-up, untimed), then, once all are ready,
/// `work(lane, prepared)`; returns the wall time from that start to the last thread's end, with every
/// thread's result.
fn in_lanes<S, T: Send>(
    lanes: usize,
    threads: i32,
    prepare: impl Fn(usize) -> S + Sync,
    work: impl Fn(usize, S) -> T + Sync,
) -> (f64, Vec<T>) {
    if lanes == 1 {
        // One lane runs on the calling thread, as `generate` runs one lane: its OpenMP team is the
        // process's main one.
        tch::set_num_threads(threads);
        let _guard = tch::no_grad_guard();
        let prepared = prepare(0);
        let start = Instant::now();
        let result = work(0, prepared);
        return (start.elapsed().as_secs_f64(), vec![result]);
    }
    let barrier = std::sync::Barrier::new(lanes + 1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..lanes)
            .map(|lane| {
                let (barrier, prepare, work) = (&barrier, &prepare, &work);
                scope.spawn(move || {
                    tch::set_num_threads(threads);
                    let _guard = tch::no_grad_guard();
                    let prepared = prepare(lane);
                    barrier.wait();
                    work(lane, prepared)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let results: Vec<T> = handles
            .into_iter()
            .map(|h| h.join().expect("a benchmark lane panicked. This is a bug."))
            .collect();
        (start.elapsed().as_secs_f64(), results)
    })
}

/// Times `iterations` forwards at timesteps 500, 499, … after `warmup` calls, in every lane at once.
pub fn time_unet(b: &UNetBench) -> Result<UNetTiming, ModelError> {
    let files = ModelFiles::locate(b.model)?;
    // Graphs go on each lane's replica below.
    let unet = LoadedUNet::prepare(&files, b.device, b.kind, b.layout, false)?;
    let (h, w) = unet.config.sample_hw()?;
    let counted = flops::unet_forward(&unet.config, b.batch_size as i64)?;
    let flops = counted.total;
    let lanes = b.lanes.max(1);
    let threads = (tch::get_num_threads() / lanes as i32).max(1);
    // One replica per lane, each taken by its thread (a replica with graphs is not shareable).
    let replicas: Vec<std::sync::Mutex<Option<LoadedUNet>>> = (0..lanes)
        .map(|_| {
            let mut r = unet.replica();
            if b.cuda_graphs {
                r.set_graphs(Some(crate::model::graphs::GraphMode::Cuda));
            }
            std::sync::Mutex::new(Some(r))
        })
        .collect();
    let shape = [b.batch_size as i64, unet.config.in_channels, h, w];
    let sync = || {
        if let Device::Cuda(i) = b.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let warm = |lane: usize| {
        let taken = replicas[lane].lock().ok().and_then(|mut slot| slot.take());
        let unet =
            taken.ok_or_else(|| ModelError::Config("a lane's replica is missing. This is a bug.".into()))?;
        let x = Tensor::randn(shape, (b.kind, b.device));
        for i in 0..b.warmup {
            let _ = unet.denoise(&x, 500 - i as i64)?;
        }
        sync();
        Ok::<_, ModelError>((unet, x))
    };
    let (wall, times) = in_lanes(lanes, threads, warm, |_, prepared| {
        let (unet, x) = prepared?;
        let mut times = Vec::with_capacity(b.iterations);
        for i in 0..b.iterations {
            let start = Instant::now();
            let _ = unet.denoise(&x, 500 - i as i64)?;
            sync();
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        Ok::<_, ModelError>(times)
    });
    let times: Vec<f64> = times.into_iter().collect::<Result<Vec<_>, _>>()?.into_iter().flatten().collect();
    let mean_ms = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let min_ms = times.iter().copied().fold(f64::INFINITY, f64::min);
    let forwards = (lanes * b.iterations) as f64;
    let gflops_per_second = forwards * flops / wall / 1e9;
    let conv_peak = if b.conv_peak {
        Some(time_convs(b, &unet.config, lanes, threads, gflops_per_second)?)
    } else {
        None
    };
    Ok(UNetTiming {
        batch_size: b.batch_size,
        lanes,
        threads_per_lane: threads,
        iterations: b.iterations,
        mean_ms,
        min_ms,
        flops,
        attention_flops: counted.attention,
        gflops_per_second,
        conv_peak,
    })
}

fn time_convs(
    b: &UNetBench,
    config: &crate::model::UNet2DConfig,
    lanes: usize,
    threads: i32,
    unet_gflops: f64,
) -> Result<ConvPeak, ModelError> {
    let mut shapes = Vec::new();
    for ((cin, cout, h, w), count) in flops::conv3x3_shapes(config)? {
        let layout = |t: Tensor| if b.layout == Layout::ChannelsLast { channels_last(&t) } else { t };
        let flops = 2.0 * (b.batch_size as i64 * h * w * cout * cin * 9) as f64;
        // At least 20 GFLOP per lane (a tenth of a second or more), so small shapes are not timed on a
        // few milliseconds.
        let calls = b.iterations.max((2e10 / flops).ceil() as usize);
        let conv = |(x, weight, bias): &(Tensor, Tensor, Tensor)| {
            let _ = x.conv2d(weight, Some(bias), [1, 1], [1, 1], [1, 1], 1);
        };
        // Each lane its own tensors (tensors are not shared between threads), warmed twice.
        let warm = |_| {
            let args = (
                layout(Tensor::randn([b.batch_size as i64, cin, h, w], (b.kind, b.device))),
                layout(Tensor::randn([cout, cin, 3, 3], (b.kind, b.device)) * 0.05),
                Tensor::zeros([cout], (b.kind, b.device)),
            );
            (0..2).for_each(|_| conv(&args));
            args
        };
        let (wall, _) = in_lanes(lanes, threads, warm, |_, args| {
            (0..calls).for_each(|_| conv(&args));
            if let Device::Cuda(i) = b.device {
                tch::Cuda::synchronize(i as i64);
            }
        });
        let gflops_per_second = (lanes * calls) as f64 * flops / wall / 1e9;
        shapes.push(ConvShapeTiming { shape: [cin, cout, h, w], count, gflops_per_second });
    }
    let best = shapes
        .iter()
        .max_by(|a, b| a.gflops_per_second.total_cmp(&b.gflops_per_second))
        .ok_or_else(|| ModelError::Config("the model has no 3×3 convolutions".into()))?;
    Ok(ConvPeak {
        gflops_per_second: best.gflops_per_second,
        shape: best.shape,
        unet_fraction: unet_gflops / best.gflops_per_second,
        shapes: shapes.clone(),
    })
}

pub struct UNetOutput<'a> {
    pub model: &'a Path,
    pub input: &'a Path,
    pub output: &'a Path,
    pub timestep: i64,
    pub device: Device,
    pub kind: Kind,
    pub layout: Layout,
    pub cuda_graphs: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct UNetOutputReport {
    pub shape: Vec<i64>,
    pub output: String,
}

/// One UNet call (through [`LoadedUNet::denoise`], so a graph when asked) on `input`'s `sample`
/// tensor; writes `output` as f32 on the CPU.
pub fn unet_output(a: &UNetOutput) -> Result<UNetOutputReport, ModelError> {
    let files = ModelFiles::locate(a.model)?;
    let unet = LoadedUNet::prepare(&files, a.device, a.kind, a.layout, a.cuda_graphs)?;
    let _guard = tch::no_grad_guard();
    let tensors = Tensor::read_safetensors(a.input)
        .map_err(|e| ModelError::Io { path: a.input.to_path_buf(), message: e.to_string() })?;
    let sample = tensors.into_iter().find(|(name, _)| name == "sample").map(|(_, t)| t).ok_or_else(|| {
        ModelError::Io { path: a.input.to_path_buf(), message: "no tensor named `sample`".into() }
    })?;
    let x = sample.f_to_device(a.device)?.f_to_kind(a.kind)?;
    // Twice, so a graph is captured and then replayed: the replay's output is the one written.
    let _ = unet.denoise(&x, a.timestep)?;
    let out =
        unet.denoise(&x, a.timestep)?.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?;
    Tensor::write_safetensors(&[("output", &out)], a.output)?;
    Ok(UNetOutputReport { shape: out.size(), output: a.output.display().to_string() })
}

/// SubmitJob latency under concurrent clients (the hidden `bench-submit` command).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubmitTiming {
    pub clients: usize,
    pub requests: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub requests_per_second: f64,
}

/// `clients` concurrent connections each submit `per_client` one-sample jobs of `model` back to back.
pub async fn time_submits(
    server: &str,
    model: &str,
    clients: usize,
    per_client: usize,
) -> Result<SubmitTiming, tonic::transport::Error> {
    use crate::api::pb;
    let mut handles = Vec::with_capacity(clients);
    let started = Instant::now();
    for c in 0..clients {
        let mut client = pb::worker_service_client::WorkerServiceClient::connect(server.to_string()).await?;
        let model = model.to_string();
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            let mut errors = 0;
            for i in 0..per_client {
                let req = pb::SubmitJobRequest {
                    request_id: format!("bench-{}-{c}-{i}", std::process::id()),
                    spec: Some(pb::JobSpec {
                        model: model.clone(),
                        sampling: Some(pb::SamplingSpec {
                            scheduler: pb::Scheduler::Ddim as i32,
                            steps: 1,
                            eta: None,
                        }),
                        num_samples: 1,
                        ..Default::default()
                    }),
                };
                let t = Instant::now();
                match client.submit_job(req).await {
                    Ok(_) => latencies.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        if let Ok((l, e)) = h.await {
            all.extend(l);
            errors += e;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| all.get(((all.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    Ok(SubmitTiming {
        clients,
        requests: all.len(),
        errors,
        p50_ms: pct(0.5),
        p90_ms: pct(0.9),
        p99_ms: pct(0.99),
        max_ms: all.last().copied().unwrap_or(f64::NAN),
        requests_per_second: all.len() as f64 / elapsed.max(1e-9),
    })
}

/// One large submission and the latency of other clients' GetJob calls while it is queued (the hidden
/// `bench-large-submit` command).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LargeSubmitTiming {
    pub job_id: String,
    pub num_samples: u64,
    pub shards_total: u32,
    pub submit_ms: f64,
    /// GetJob calls of a small job made back to back by another connection during the submission.
    pub get_job_calls: usize,
    pub get_job_p50_ms: f64,
    pub get_job_max_ms: f64,
}

/// Submits a small job, then a job of `num_samples` one-sample batches while another connection calls
/// GetJob on the small job in a loop; reports both latencies.
pub async fn time_large_submit(
    server: &str,
    model: &str,
    num_samples: u64,
    steps: u32,
) -> Result<LargeSubmitTiming, Box<dyn std::error::Error + Send + Sync>> {
    use crate::api::pb;
    let request = |num_samples: u64| pb::SubmitJobRequest {
        request_id: String::new(),
        spec: Some(pb::JobSpec {
            model: model.to_string(),
            sampling: Some(pb::SamplingSpec { scheduler: pb::Scheduler::Ddim as i32, steps, eta: None }),
            num_samples,
            batch_size: 1,
            ..Default::default()
        }),
    };
    let mut client = pb::worker_service_client::WorkerServiceClient::connect(server.to_string()).await?;
    let small = client.submit_job(request(1)).await?.into_inner().job.unwrap_or_default().job_id;
    let mut reader = pb::worker_service_client::WorkerServiceClient::connect(server.to_string()).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let polling = {
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                if reader.get_job(pb::GetJobRequest { job_id: small.clone() }).await.is_ok() {
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            latencies
        })
    };
    // Let the reader get going first, so that its calls overlap the whole submission.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = Instant::now();
    let job = client.submit_job(request(num_samples)).await?.into_inner().job.unwrap_or_default();
    let submit_ms = started.elapsed().as_secs_f64() * 1e3;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut latencies = polling.await?;
    latencies.sort_by(f64::total_cmp);
    Ok(LargeSubmitTiming {
        job_id: job.job_id,
        num_samples,
        shards_total: job.shards_total,
        submit_ms,
        get_job_calls: latencies.len(),
        get_job_p50_ms: latencies.get(latencies.len() / 2).copied().unwrap_or(f64::NAN),
        get_job_max_ms: latencies.last().copied().unwrap_or(f64::NAN),
    })
}

/// What `bench-finalize` measured: the finalize of a synthetic job whose shards were written by the
/// real shard writer ([`crate::dataset::sink::write_shard`]) with generated images.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FinalizeTiming {
    pub samples: u64,
    pub shards: u64,
    pub format: crate::dataset::DataFormat,
    /// Seconds to write the shards (`prepare`), or to finalize (`run`).
    pub seconds: f64,
    /// Peak resident memory of this process (VmHWM), in MiB.
    pub peak_rss_mib: f64,
    /// The peak before the timed part (libtorch and the model loaded), in MiB.
    pub baseline_rss_mib: f64,
    pub manifest_bytes: u64,
}

/// The job that `bench-finalize` writes and finalizes: `samples` samples of `side`×`side` RGB in
/// `shards` shards, no grids.
fn synthetic_job(
    samples: u64,
    shards: u64,
    format: crate::dataset::DataFormat,
    side: u64,
) -> crate::job::JobRecord {
    use crate::dataset::{DatasetOptions, Encoding};
    let per_shard = samples.div_ceil(shards.max(1));
    let target = crate::dataset::DEFAULT_TARGET_FILE_BYTES;
    let mut dataset = DatasetOptions::new(format, Encoding::default(), target, (3, side, side), 1);
    dataset.samples_per_file = dataset.samples_per_file.min(per_shard);
    crate::job::JobRecord {
        id: format!("bench-{}-{samples}", format.as_str()),
        spec: crate::job::JobSpec {
            request_id: String::new(),
            owner: String::new(),
            model: "bench".into(),
            scheduler: crate::schedulers::SchedulerKind::Ddim,
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
        },
        state: crate::job::JobState::Running,
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
    format: crate::dataset::DataFormat,
    side: u32,
    prepare: bool,
) -> Result<FinalizeTiming, String> {
    use std::sync::Arc;

    use crate::dataset::sink::{ShardTarget, write_shard};
    use crate::worker::outputs::{self, JobOutputs, ShardRecord, ShardRun};
    let job = synthetic_job(samples, shards, format, u64::from(side));
    let store: Arc<dyn crate::storage::ObjectStore> =
        Arc::new(crate::storage::local::LocalStore::new(dir).map_err(|e| e.to_string())?);
    let out = JobOutputs::new(Arc::clone(&store), "", &job.id);
    let resolved = crate::models::ResolvedModel::from_dir("bench", model.display().to_string(), model)
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
                writer: crate::dataset::index::Writer { shard, worker: "bench".into(), attempt: 1 },
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
            crate::storage::write_once(
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
