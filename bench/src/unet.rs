//! UNet forward timing (`ddpm-bench unet`): the same model, batch and timesteps as the Python side
//! times, on a warmed-up model, with its FLOP rate against 3×3 convolutions of the model's own shapes
//! run the same way; and one UNet call on a given input (`ddpm-bench unet-output`).

use std::path::Path;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use ddpm_worker::model::{Layout, LoadedUNet, ModelError, ModelFiles, channels_last, flops};

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
                r.set_graphs(Some(ddpm_worker::model::graphs::GraphMode::Cuda));
            }
            std::sync::Mutex::new(Some(r))
        })
        .collect();
    let shape = [b.batch_size as i64, unet.config.in_channels, h, w];
    // Each lane waits for its own stream only.
    let sync = || ddpm_worker::cuda::synchronize(b.device).map_err(|e| ModelError::Config(e.to_string()));
    let warm = |lane: usize| {
        ddpm_worker::cuda::use_own_stream(b.device).map_err(|e| ModelError::Config(e.to_string()))?;
        let taken = replicas[lane].lock().ok().and_then(|mut slot| slot.take());
        let unet =
            taken.ok_or_else(|| ModelError::Config("a lane's replica is missing. This is a bug.".into()))?;
        let x = Tensor::randn(shape, (b.kind, b.device));
        for i in 0..b.warmup {
            let _ = unet.denoise(&x, 500 - i as i64, None)?;
        }
        sync()?;
        Ok::<_, ModelError>((unet, x))
    };
    let (wall, times) = in_lanes(lanes, threads, warm, |_, prepared| {
        let (unet, x) = prepared?;
        let mut times = Vec::with_capacity(b.iterations);
        for i in 0..b.iterations {
            let start = Instant::now();
            let _ = unet.denoise(&x, 500 - i as i64, None)?;
            sync()?;
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
    config: &ddpm_worker::model::UNet2DConfig,
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
            let _ = ddpm_worker::cuda::use_own_stream(b.device);
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
            let _ = ddpm_worker::cuda::synchronize(b.device);
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
    let _ = unet.denoise(&x, a.timestep, None)?;
    let out = unet
        .denoise(&x, a.timestep, None)?
        .f_to_kind(Kind::Float)?
        .f_to_device(Device::Cpu)?
        .f_contiguous()?;
    Tensor::write_safetensors(&[("output", &out)], a.output)?;
    Ok(UNetOutputReport { shape: out.size(), output: a.output.display().to_string() })
}
