//! `ddpm-bench`: the measurements that `bench/*.py` drive, each printing one JSON line. Built beside
//! `ddpm-worker` and kept out of its library and binary (and of the image).

mod finalize;
mod submit;
mod unet;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ddpm_worker::placement::PlacementArgs;

/// Benchmarks of ddpm-worker, for bench/*.py: each prints one JSON line (exit 0) or an error (exit 1).
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time UNet forwards (bench.py, gpu.py).
    Unet(UnetArgs),
    /// One UNet call on an input read from a safetensors file (tensor `sample`), its output written to
    /// another (tensor `output`, f32): for comparing against diffusers on the same device (gpu.py).
    UnetOutput(UnetOutputArgs),
    /// Time SubmitJob under concurrent clients (service.py).
    Submit(SubmitArgs),
    /// Time one large SubmitJob and concurrent GetJob calls (stress.py).
    LargeSubmit(LargeSubmitArgs),
    /// Write a synthetic job's shards with the real writer, or finalize them (datasets.py).
    Finalize(FinalizeArgs),
}

#[derive(clap::Args)]
struct UnetArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[command(flatten)]
    place: PlacementArgs,
    /// Forwards run at once, each on its own thread with a replica and a share of the CPU threads.
    #[arg(long, default_value_t = 1)]
    lanes: usize,
    /// `--layout channels-last --lanes <CPU cores>` on the CPU, as `generate --fast`.
    #[arg(long)]
    fast: bool,
    /// Also time the model's 3×3 convolution shapes alone, run the same way (the peak the UNet is
    /// measured against).
    #[arg(long)]
    conv_peak: bool,
}

#[derive(clap::Args)]
struct UnetOutputArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    #[arg(long)]
    timestep: i64,
    #[command(flatten)]
    place: PlacementArgs,
}

#[derive(clap::Args)]
struct SubmitArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    #[arg(long)]
    model: String,
    #[arg(long, default_value_t = 200)]
    clients: usize,
    #[arg(long, default_value_t = 10)]
    per_client: usize,
}

#[derive(clap::Args)]
struct LargeSubmitArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    #[arg(long)]
    model: String,
    #[arg(long, default_value_t = 20_000)]
    num_samples: u64,
    #[arg(long, default_value_t = 2)]
    steps: u32,
}

#[derive(clap::Args)]
struct FinalizeArgs {
    /// The store's root directory.
    #[arg(long)]
    dir: PathBuf,
    /// A model folder (its identity goes into the manifest).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    samples: u64,
    #[arg(long)]
    shards: u64,
    #[arg(long, value_enum, default_value = "webdataset")]
    format: ddpm_worker::dataset::DataFormat,
    /// Side of the synthetic RGB images.
    #[arg(long, default_value_t = 8)]
    side: u32,
    /// Write the shards instead of finalizing.
    #[arg(long)]
    prepare: bool,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Unet(a) => {
            ddpm_worker::model::set_cudnn_benchmark(a.place.cudnn_benchmark);
            print_json(unet::time_unet(&unet::UNetBench {
                model: &a.model,
                batch_size: a.batch_size,
                iterations: a.iterations,
                warmup: a.warmup,
                device: a.place.device,
                kind: a.place.dtype.kind(),
                layout: a.place.layout(a.fast),
                lanes: a.place.lanes(a.fast, a.lanes),
                conv_peak: a.conv_peak,
                cuda_graphs: a.place.cuda_graphs,
            }))
        }
        Command::UnetOutput(a) => {
            ddpm_worker::model::set_cudnn_benchmark(a.place.cudnn_benchmark);
            print_json(unet::unet_output(&unet::UNetOutput {
                model: &a.model,
                input: &a.input,
                output: &a.output,
                timestep: a.timestep,
                device: a.place.device,
                kind: a.place.dtype.kind(),
                layout: a.place.layout(false),
                cuda_graphs: a.place.cuda_graphs,
            }))
        }
        Command::Submit(a) => print_json(in_runtime(async move {
            submit::time_submits(&a.server, &a.model, a.clients, a.per_client)
                .await
                .map_err(|e| e.to_string())
        })),
        Command::LargeSubmit(a) => print_json(in_runtime(async move {
            submit::time_large_submit(&a.server, &a.model, a.num_samples, a.steps)
                .await
                .map_err(|e| e.to_string())
        })),
        Command::Finalize(a) => print_json(in_runtime(async move {
            finalize::time_finalize(&a.dir, &a.model, a.samples, a.shards, a.format, a.side, a.prepare).await
        })),
    }
}

/// Runs `work` on a multi-threaded runtime (as the service's).
fn in_runtime<T>(work: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(work)
}

/// A result as one JSON line (exit 0), or its error (exit 1).
fn print_json(result: Result<impl serde::Serialize, impl std::fmt::Display>) -> ExitCode {
    match result {
        Ok(t) => {
            println!("{}", serde_json::to_string(&t).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
