use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ddpm_worker::client;
use ddpm_worker::generate::{self, GenerateSpec, Part};
use ddpm_worker::init_model::{self, Preset};
use ddpm_worker::placement::PlacementArgs;
use ddpm_worker::schedulers::SchedulerKind;
use std::io::IsTerminal;

/// Exit codes of the client commands (submit, status, list, cancel, retry).
const EXIT_CODES: &str = "Exit codes of submit, status, list, cancel and retry: 0 success; 1 other errors; \
2 bad arguments (the command line's, or INVALID_ARGUMENT); 3 job not found; 4 unauthenticated or \
permission denied; 5 the job FAILED; 6 the job was CANCELLED; 7 the server is unavailable.";

/// Generate image datasets with diffusers DDPM models on libtorch.
#[derive(Parser)]
#[command(version, about, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sample images from a diffusers model into PNGs (or data files), a grid and a manifest, in a
    /// folder or on S3; or one part of such a run.
    Generate(GenerateArgs),
    /// Prove a finished job folder: every listed object and stored sample has its listed SHA-256, and
    /// batches picked at random, sampled again with the recorded model and settings, give the same
    /// bytes.
    #[command(after_help = VERIFY_HELP)]
    Verify(VerifyArgs),
    /// Write a diffusers model folder with random weights (for demos and tests; no network needed).
    InitModel(InitModelArgs),
    /// Print the shell's completion script: `source <(ddpm-worker completions bash)`, or write it where the
    /// shell looks (zsh: a `_ddpm-worker` file on $fpath; fish: ~/.config/fish/completions/).
    Completions { shell: clap_complete::Shell },
    /// Run the batch-job service: gRPC API, durable queue and one sampling thread per device.
    Serve(Box<ddpm_worker::service::ServeArgs>),
    /// Submit a job to a running service (prints its id; --wait follows it to the end).
    #[command(after_help = EXIT_CODES)]
    Submit(Box<client::SubmitArgs>),
    /// Show a job (--wait follows it to the end).
    #[command(after_help = EXIT_CODES)]
    Status(client::JobArgs),
    /// List jobs, newest first.
    #[command(after_help = EXIT_CODES)]
    List(client::ListArgs),
    /// The models a running service samples: shape, schedulers and their steps, batch limits per
    /// device, weights SHA-256.
    #[command(after_help = EXIT_CODES)]
    Models(client::ModelsArgs),
    /// Cancel a job; its running shards stop between denoising steps.
    #[command(after_help = EXIT_CODES)]
    Cancel(client::JobArgs),
    /// Run a FAILED job again: failed shards get fresh attempts, finished ones are kept.
    #[command(after_help = EXIT_CODES)]
    Retry(client::JobArgs),
    /// Delete a job and every object it wrote (a running job is cancelled first).
    #[command(after_help = EXIT_CODES)]
    Delete(client::DeleteArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers model: a folder (flat, as google/ddpm-*, or with unet/ and scheduler/ subfolders),
    /// s3://BUCKET/PREFIX (copied locally first), or a Hugging Face hub id org/name (from the HF cache,
    /// downloaded into it when missing; HF_HOME, HF_HUB_CACHE, HF_ENDPOINT and HF_TOKEN apply).
    #[arg(long, required_unless_present = "extend")]
    model: Option<ddpm_worker::models::ModelLocation>,
    /// Continue a finished run or job (its folder or s3:// prefix): the same model, scheduler, steps, η,
    /// batch size and layout, with --num-samples more samples whose seeds follow its last one.
    /// The new run's manifest names the job it extends (spec.extends); the two share no seed. --model
    /// still picks another copy of the same model.
    #[arg(long, value_name = "JOB", value_parser = parse_out, conflicts_with_all = [
        "scheduler", "steps", "eta", "seed", "batch_size", "format", "image_format", "quality", "png_level",
        "target_file_bytes",
    ])]
    extend: Option<ddpm_worker::storage::Destination>,
    /// Where an s3:// model is copied (under BUCKET/PREFIX) [default: a temporary folder, removed
    /// after the run].
    #[arg(long)]
    model_cache: Option<PathBuf>,
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
    /// Sample this many batches at once, each on its own thread with its own UNet replica. On the CPU each
    /// gets a share of the cores: more throughput than one batch on all cores, and per-thread kernels
    /// change the last float bits. On a GPU, threads share the device; images stay the same.
    #[arg(long, default_value_t = 1)]
    lanes: usize,
    /// Shorthand for `--layout channels-last --lanes <CPU cores>` on the CPU
    /// (`--layout channels-last` on CUDA): throughput first, diffusers parity within tolerance.
    #[arg(long)]
    fast: bool,
    /// Output folder, or s3://BUCKET[/PREFIX] (endpoint and credentials from AWS_*, as for `serve`),
    /// without a run in it. It gets what a service job's folder holds: the samples in --format's layout,
    /// their index (index/part-000000.parquet), grids/<n:05>.png, the run's record (shards/000000.json,
    /// with its timings) and manifest.json. A part writes its samples under their run-wide indices,
    /// index/part-<INDEX:06>.parquet and shards/<INDEX:06>.json; the part that finds every part's record
    /// there writes manifest.json. All parts of a run go to the same --out.
    #[arg(long, value_parser = parse_out)]
    out: ddpm_worker::storage::Destination,
    /// Path-style S3 addressing (MinIO, SeaweedFS, Ceph), for an s3:// --out and --model.
    #[arg(long, env = "DDPM_S3_PATH_STYLE")]
    s3_path_style: bool,
    /// Sample only part INDEX (from 0) of the run split into COUNT parts of whole batches, e.g. 2/8:
    /// each sample comes out as in the whole run (same seed, same batch).
    #[arg(long, value_name = "INDEX/COUNT", conflicts_with = "part_count")]
    part: Option<Part>,
    /// Like --part JOB_COMPLETION_INDEX/COUNT, reading the index Kubernetes gives each pod of an
    /// Indexed Job.
    #[arg(long, value_name = "COUNT")]
    part_count: Option<usize>,
    #[command(flatten)]
    dataset: DatasetArgs,
    /// Samples per grid: grids/<n:05>.png shows samples n·S to (n+1)·S (0: no grids).
    #[arg(long, default_value_t = 64)]
    samples_per_grid: u32,
    #[command(flatten)]
    classes: ddpm_worker::classes::ClassArgs,
}

/// `s3://BUCKET[/PREFIX]`, or a local folder.
fn parse_out(s: &str) -> Result<ddpm_worker::storage::Destination, String> {
    if s.starts_with("s3://") {
        return s.parse().map_err(|e: ddpm_worker::storage::StorageError| e.to_string());
    }
    if s.is_empty() {
        return Err("empty; give a folder or s3://BUCKET[/PREFIX]".into());
    }
    Ok(ddpm_worker::storage::Destination::File { root: s.into(), prefix: String::new() })
}

/// The part a pod of a Kubernetes Indexed Job samples: `JOB_COMPLETION_INDEX` of `count`.
fn indexed_job_part(count: usize) -> Result<Part, String> {
    let index = std::env::var("JOB_COMPLETION_INDEX").map_err(|_| {
        "--part-count needs JOB_COMPLETION_INDEX, which Kubernetes sets in the pods of an Indexed Job; \
         elsewhere use --part INDEX/COUNT"
            .to_string()
    })?;
    let index =
        index.trim().parse().map_err(|_| format!("JOB_COMPLETION_INDEX={index:?} is not an index"))?;
    Ok(Part { index, count })
}

/// How samples are stored (as `submit` asks a server for).
#[derive(clap::Args)]
struct DatasetArgs {
    /// files: samples/<index:08>.<ext>; webdataset: data/*.tar; parquet: data/*.parquet (Hugging Face
    /// image layout).
    #[arg(long, value_enum, default_value = "files")]
    format: ddpm_worker::dataset::DataFormat,
    /// Encoding of each sample (webp is lossless).
    #[arg(long, value_enum, default_value = "png")]
    image_format: ddpm_worker::dataset::ImageFormat,
    /// JPEG quality, 1 to 100 (default 95; JPEG only).
    #[arg(long)]
    quality: Option<u32>,
    /// PNG deflate level, 1 to 9 (0, the default: fast; PNG only).
    #[arg(long)]
    png_level: Option<u32>,
    /// Size a WebDataset or Parquet data file stays under, in bytes (default 256 MiB).
    #[arg(long)]
    target_file_bytes: Option<u64>,
}

/// What `verify` proves, and where.
const VERIFY_HELP: &str = "What resampling proves across machines: a job sampled on the CPU in the diffusers layout \
gives the same bytes on any x86-64 machine with the same libtorch (run with ATEN_CPU_CAPABILITY=avx2, as the \
tests do); a job sampled on a GPU, only on the same GPU model with the same CUDA libraries, and never one run \
with --cudnn-benchmark. A job is resampled on the kind of device it ran on (--device). Exit codes: 0 everything \
matches; 1 a mismatch (each is printed: the sample, its object, and what differs); 2 bad arguments; 3 the job \
cannot be verified (no manifest, a model that is not the job's, a device that cannot reproduce it).";

#[derive(clap::Args)]
struct VerifyArgs {
    /// The job: its folder, s3://BUCKET/PREFIX/JOB_ID, or its manifest.json.
    job: String,
    /// The share of the job's batches to sample again (at least one batch; 0: check stored bytes only).
    #[arg(long, default_value_t = 0.05)]
    fraction: f64,
    /// Picks the batches: the same seed picks the same batches.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The model folder, s3:// prefix or hub id [default: the manifest's model source]. Its UNet weights
    /// must have the SHA-256 the manifest records.
    #[arg(long)]
    model: Option<ddpm_worker::models::ModelLocation>,
    /// cpu, cuda or cuda:N: where to sample again (the kind the job ran on).
    #[arg(long, default_value = "cpu", value_parser = ddpm_worker::placement::parse_device)]
    device: tch::Device,
    /// Path-style S3 addressing (MinIO, SeaweedFS, Ceph).
    #[arg(long, env = "DDPM_S3_PATH_STYLE")]
    s3_path_style: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The run `generate`'s arguments ask for; with --extend, the extended job's settings.
fn generate_spec(a: GenerateArgs, part: Option<Part>) -> Result<GenerateSpec, String> {
    let extended = match &a.extend {
        Some(folder) => Some(generate::Extended::read(folder, a.s3_path_style).map_err(|e| e.to_string())?),
        None => None,
    };
    let mut spec = GenerateSpec {
        model: match a.model {
            Some(m) => m,
            None => {
                extended.as_ref().map(|e| e.model_source.parse()).transpose()?.ok_or("--model is required")?
            }
        },
        model_cache: a.model_cache,
        s3_path_style: a.s3_path_style,
        scheduler: a.scheduler,
        steps: a.steps,
        eta: a.eta,
        num_samples: a.num_samples,
        seed: a.seed,
        batch_size: a.batch_size.unwrap_or(a.num_samples.clamp(1, 8)),
        device: a.place.device,
        dtype: a.place.dtype,
        layout: a.place.layout(a.fast),
        lanes: a.place.lanes(a.fast, a.lanes),
        cuda_graphs: a.place.cuda_graphs,
        out: a.out,
        part,
        storage: ddpm_worker::validation::StorageRequest {
            format: a.dataset.format,
            image: a.dataset.image_format,
            jpeg_quality: a.dataset.quality,
            png_level: a.dataset.png_level.filter(|&l| l != 0),
            target_file_bytes: a.dataset.target_file_bytes,
        },
        samples_per_grid: a.samples_per_grid,
        extends: None,
        classes: a.classes.request(),
    };
    if let Some(e) = extended {
        (spec.scheduler, spec.steps, spec.eta) = (e.spec.scheduler, e.spec.steps as usize, e.spec.eta);
        spec.batch_size = e.spec.batch_size as usize;
        spec.seed = e.next_seed().map_err(|e| e.to_string())?;
        spec.storage = e.storage();
        spec.extends = Some(e.job_id);
    }
    Ok(spec)
}

/// `verify`'s target: a folder or an S3 prefix (a manifest.json names its folder).
fn job_folder(job: &str) -> Result<ddpm_worker::storage::Destination, String> {
    let job = job.strip_suffix("manifest.json").unwrap_or(job);
    let job = if job.len() > 1 { job.trim_end_matches('/') } else { job };
    if job.is_empty() {
        return Ok(ddpm_worker::storage::Destination::File { root: ".".into(), prefix: String::new() });
    }
    parse_out(job)
}

/// `verify`: exit 0 when everything matches.
fn verify(a: VerifyArgs) -> ExitCode {
    let folder = match job_folder(&a.job) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {}: {e}", a.job);
            return ExitCode::from(2);
        }
    };
    if !(0.0..=1.0).contains(&a.fraction) {
        eprintln!("error: --fraction must be in [0, 1]");
        return ExitCode::from(2);
    }
    let spec = ddpm_worker::verify::VerifySpec {
        folder,
        fraction: a.fraction,
        seed: a.seed,
        model: a.model,
        device: a.device,
        s3_path_style: a.s3_path_style,
    };
    let report = match runtime()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(ddpm_worker::verify::verify(&spec)).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot verify {}: {e}", a.job);
            return ExitCode::from(3);
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        for m in &report.mismatches {
            println!("MISMATCH {m}");
        }
        println!(
            "{}: {} objects and {} stored samples checked, {} samples in {} batches sampled again: {}",
            report.job_id,
            report.objects_checked,
            report.samples_checked,
            report.samples_resampled,
            report.batches_resampled,
            if report.mismatches.is_empty() {
                "all match".to_string()
            } else {
                format!("{} mismatches", report.mismatches.len())
            }
        );
    }
    if report.mismatches.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
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
    /// One image channel instead of three (as DDPM MNIST checkpoints have): grayscale PNGs.
    #[arg(long)]
    grayscale: bool,
}

/// Logs to stderr (as JSON lines with `json`), filtered by RUST_LOG (default `info`); with `traces`,
/// this crate's spans (info and above, whatever RUST_LOG says) also go to its OTLP exporter.
fn init_logs(json: bool, traces: Option<&opentelemetry_sdk::trace::SdkTracerProvider>) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: a pod's log collector or a redirected file would keep the escapes.
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs =
        if json { logs.json().with_current_span(true).with_span_list(false).boxed() } else { logs.boxed() };
    let otel = traces.map(|provider| {
        let exported = tracing_subscriber::filter::filter_fn(|meta| {
            *meta.level() <= tracing::Level::INFO && ddpm_worker::telemetry::exported(meta.target())
        });
        tracing_opentelemetry::layer().with_tracer(provider.tracer("ddpm-worker")).with_filter(exported)
    });
    tracing_subscriber::registry().with(logs.with_filter(filter)).with(otel).init();
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// Runs a client command: exit 0 on success, else the error's code ([`client::ClientError::exit_code`])
/// with the error printed.
fn run_client(f: impl std::future::Future<Output = Result<(), client::ClientError>>) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn serve(args: ddpm_worker::service::ServeArgs) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's gRPC channel lives on this runtime.
    let traces = {
        let _runtime = rt.enter();
        ddpm_worker::telemetry::otlp_from_env()
    };
    let traces = match traces {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logs(args.admin.log_json, traces.as_ref().map(|t| &t.0));
    if let Some((_, settings)) = &traces {
        tracing::info!(
            endpoint = settings.endpoint,
            service = settings.service_name,
            "exporting traces over OTLP/gRPC"
        );
    }
    let result = rt.block_on(ddpm_worker::service::serve(args, |addr| {
        // Scripts and tests read the bound address (useful with port 0) from this line.
        println!("listening on {addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }));
    // The spans still buffered go out before the runtime their channel runs on.
    if let Some((traces, _)) = traces
        && let Err(e) = traces.shutdown_with_timeout(std::time::Duration::from_secs(10))
    {
        eprintln!("warning: exporting the last spans: {e}");
    }
    // Device threads may still sit in a blocking call; do not wait for them on the way out.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let config = matches!(e, ddpm_worker::service::ServeError::Config(_));
            ExitCode::from(if config { 2 } else { 1 })
        }
    }
}

/// Applies `serve --config FILE` as defaults of the DDPM_* variables (see `service::config_file`).
fn apply_config_file() -> Result<(), String> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_none_or(|a| a != "serve") {
        return Ok(());
    }
    let Some(path) = ddpm_worker::service::config_file::config_path(&args[1..]) else { return Ok(()) };
    let command = <ddpm_worker::service::ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
    for (var, value) in ddpm_worker::service::config_file::env_defaults(&command, &path)? {
        if std::env::var_os(&var).is_none() {
            // SAFETY: called first thing in main, before any other thread exists.
            unsafe { std::env::set_var(var, value) };
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = apply_config_file() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    let progress = std::io::stderr().is_terminal();
    if !matches!(cli.command, Command::Serve(_)) {
        init_logs(false, None);
    }
    match cli.command {
        Command::Serve(a) => serve(*a),
        Command::Submit(a) => run_client(client::submit(*a, progress)),
        Command::Status(a) => run_client(client::status(a, progress)),
        Command::List(a) => run_client(client::list(a)),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "ddpm-worker", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Models(a) => run_client(client::models(a)),
        Command::Cancel(a) => run_client(client::cancel(a)),
        Command::Delete(a) => run_client(client::delete(a)),
        Command::Retry(a) => run_client(client::retry(a, progress)),
        Command::Generate(a) => generate(a),
        Command::Verify(a) => verify(a),
        Command::InitModel(a) => match init_model::write_model(a.preset, a.grayscale, &a.out, a.seed) {
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

/// `generate`: one run (or its part) into a folder or an S3 prefix.
fn generate(a: GenerateArgs) -> ExitCode {
    ddpm_worker::model::set_cudnn_benchmark(a.place.cudnn_benchmark);
    let part = match (a.part, a.part_count) {
        (Some(p), _) => Some(p),
        (None, Some(count)) => match indexed_job_part(count) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        (None, None) => None,
    };
    let spec = match generate_spec(a, part) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match generate::run(&spec, std::io::stderr().is_terminal()) {
        Ok(r) => {
            let run = &r.record.run;
            let what = match spec.part {
                Some(p) => format!("samples {}..{} (part {p})", run.start, run.end),
                None => format!("{} samples", run.end - run.start),
            };
            let rate = run.timings.as_ref().map_or(0.0, |t| t.images_per_second);
            println!("wrote {what} to {} at {rate:.2} images/s", generate::out_display(&spec.out));
            println!("record: {}", r.record_uri);
            if let Some(grid) = &r.grid_uri {
                println!("grid: {grid}");
            }
            match &r.manifest_uri {
                Some(manifest) => println!("manifest: {manifest}"),
                None => println!("manifest: written by the part that completes the run"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if e.is_invalid_input() { 2 } else { 1 })
        }
    }
}
