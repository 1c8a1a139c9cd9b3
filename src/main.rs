use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ddpm_worker::benchmark;
use ddpm_worker::generate::{self, DType, GenerateSpec};
use ddpm_worker::init_model::{self, Preset};
use ddpm_worker::model::Layout;
use ddpm_worker::schedulers::SchedulerKind;
use std::io::IsTerminal;

/// Generate image datasets with diffusers DDPM models on libtorch.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample images from a diffusers model folder into PNGs, a grid and a manifest.
    Generate(GenerateArgs),
    /// Write a diffusers model folder with random weights (for demos and tests; no network needed).
    InitModel(InitModelArgs),
    /// Time UNet forwards (used by bench/); prints one JSON line.
    #[command(hide = true)]
    BenchUnet(BenchUnetArgs),
}

#[derive(clap::Args)]
struct BenchUnetArgs {
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
}

/// Where and how the UNet runs (shared by `generate` and `bench-unet`).
#[derive(clap::Args)]
struct PlacementArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = generate::parse_device)]
    device: tch::Device,
    /// UNet precision (fp16/bf16 on CUDA only); the scheduler always runs in f32.
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: DType,
    /// UNet memory layout: `diffusers` reproduces diffusers bit for bit; `channels-last` is faster on
    /// CPUs and GPUs and agrees with diffusers to ~1e-5.
    #[arg(long, value_enum, default_value = "diffusers")]
    layout: CliLayout,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers model folder (flat, as google/ddpm-*, or with unet/ and scheduler/ subfolders).
    #[arg(long)]
    model: PathBuf,
    /// The sampler; its options come from the folder's scheduler_config.json as diffusers' from_config.
    #[arg(long, value_enum, default_value = "ddpm")]
    scheduler: SchedulerKind,
    /// Denoising steps (UNet evaluations, except PNDM's 9 extra warm-up calls).
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// DDIM's η: 0 is deterministic, 1 matches DDPM's variance.
    #[arg(long)]
    eta: Option<f32>,
    /// Images to generate.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// Sample i draws its noise from a generator seeded with seed + i.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rows per UNet call [default: min(num-samples, 8)]. Fix it to reproduce images across runs.
    #[arg(long)]
    batch_size: Option<usize>,
    #[command(flatten)]
    place: PlacementArgs,
    /// CPU only: sample this many batches at once, each on its own thread with a share of the cores.
    /// More throughput than one batch on all cores; per-thread kernels change the last float bits.
    #[arg(long, default_value_t = 1)]
    lanes: usize,
    /// Shorthand for `--layout channels-last --lanes <CPU cores>` on the CPU
    /// (`--layout channels-last` on CUDA): throughput first, diffusers parity within tolerance.
    #[arg(long)]
    fast: bool,
    /// Output directory: samples/00000000.png …, grid.png, manifest.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CliLayout {
    Diffusers,
    ChannelsLast,
}

impl From<CliLayout> for Layout {
    fn from(l: CliLayout) -> Self {
        match l {
            CliLayout::Diffusers => Layout::Diffusers,
            CliLayout::ChannelsLast => Layout::ChannelsLast,
        }
    }
}

#[derive(clap::Args)]
struct InitModelArgs {
    #[arg(long, value_enum)]
    preset: Preset,
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

/// libtorch's default intra-op thread count (one per physical core).
fn physical_cores() -> usize {
    tch::get_num_threads().max(1) as usize
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => {
            let spec = GenerateSpec {
                model: a.model,
                scheduler: a.scheduler,
                steps: a.steps,
                eta: a.eta,
                num_samples: a.num_samples,
                seed: a.seed,
                batch_size: a.batch_size.unwrap_or(a.num_samples.clamp(1, 8)),
                device: a.place.device,
                dtype: a.place.dtype,
                layout: if a.fast { Layout::ChannelsLast } else { a.place.layout.into() },
                lanes: if a.fast && !a.place.device.is_cuda() { physical_cores() } else { a.lanes },
                out: a.out,
            };
            match generate::run(&spec, std::io::stderr().is_terminal()) {
                Ok(m) => {
                    println!(
                        "wrote {} samples to {} (grid: {}, manifest: {}) at {:.2} images/s",
                        m.samples.len(),
                        spec.out.join("samples").display(),
                        spec.out.join("grid.png").display(),
                        spec.out.join("manifest.json").display(),
                        m.timings.images_per_second
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(if e.is_invalid_input() { 2 } else { 1 })
                }
            }
        }
        Command::BenchUnet(a) => {
            match benchmark::time_unet(
                &a.model,
                a.batch_size,
                a.iterations,
                a.warmup,
                a.place.device,
                a.place.dtype.kind(),
                a.place.layout.into(),
            ) {
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
        Command::InitModel(a) => match init_model::write_model(a.preset, &a.out, a.seed) {
            Ok(unet) => {
                let name = a.preset.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
                println!(
                    "wrote a random-weight {name} model ({} parameters) to {}",
                    unet.num_parameters(),
                    a.out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
