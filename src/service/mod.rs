//! `ddpm-worker serve`: the gRPC API, the durable queue, one thread per device, the reaper, health,
//! reflection and Prometheus metrics, in one process. Everything is checked (models found and hashed,
//! queue opened, destination parsed) before a port is bound; the health service reports NOT_SERVING
//! until every device has loaded and warmed its models, and again from the first SIGTERM.

pub mod config_file;
pub mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tch::Device;

use crate::api::{FILE_DESCRIPTOR_SET, pb};
use crate::model::Layout;
use crate::models::{ModelArg, ResolvedModel};
use crate::placement::{DType, device_name, parse_device};
use crate::queue::nats::settings as nats_settings;
use crate::queue::nats::{NatsOptions, NatsSettings};
use crate::queue::sqlite::SqliteStore;
use crate::queue::{Queue, SqliteQueue};
use crate::storage::Destination;
use crate::worker::outputs::Outputs;
use crate::worker::pool;
use crate::worker::{WorkerConfig, WorkerContext};
use tonic_health::ServingStatus;

/// The gRPC service's name in the health service (readiness, like the overall status `""`).
const WORKER_SERVICE: &str = "ddpm.v1.WorkerService";
/// How often the token and TLS files are checked for changes (SIGHUP checks at once).
const FILE_POLL: Duration = Duration::from_secs(5);
/// The health service name of liveness.
const LIVENESS_SERVICE: &str = "liveness";
use crate::api::auth::{self, Auth};
use crate::api::convert::{DEFAULT_PRIORITIES, Limits, MAX_PRIORITY_VALUES};
use crate::api::handlers::WorkerService;

/// Who may call server reflection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReflectionAccess {
    /// The same tokens as the API (any role).
    Auth,
    /// Anyone who reaches the port.
    Public,
}

/// `serve`'s options; every flag can also come from its `DDPM_*` environment variable.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// A TOML file of these settings (keys are the long flag names); flags and DDPM_* variables win.
    #[arg(long, env = "DDPM_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC address (port 0: any free port; the bound address is printed).
    #[arg(long, env = "DDPM_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Bearer tokens, one per line: `TOKEN [ROLE [NAME]]`, ROLE read, submit (default) or admin. Every
    /// RPC but health then needs one. Read again when it changes and on SIGHUP. Without it, anyone who
    /// reaches the port may do anything.
    #[arg(long, env = "DDPM_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Who may use server reflection: `auth` (the API's tokens) or `public`.
    #[arg(long, env = "DDPM_REFLECTION", value_enum, default_value = "auth")]
    pub reflection: ReflectionAccess,
    /// TLS certificate chain (PEM) of the gRPC port; read again when it changes and on SIGHUP.
    #[arg(long, env = "DDPM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "DDPM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM): clients must then present a certificate one of them signed (mTLS).
    #[arg(long, env = "DDPM_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// A destination jobs may write within besides --output: s3://BUCKET[/PREFIX] or file:DIR.
    /// Repeatable; a job's output.destination must lie within one of them.
    #[arg(long = "allow-output", env = "DDPM_ALLOW_OUTPUTS", value_delimiter = ',')]
    pub allow_outputs: Vec<Destination>,
    /// Lowest job priority accepted.
    #[arg(long, env = "DDPM_MIN_PRIORITY", default_value_t = *DEFAULT_PRIORITIES.start(), allow_negative_numbers = true)]
    pub min_priority: i32,
    /// Highest job priority accepted (at most 101 distinct values: each is a NATS consumer).
    #[arg(long, env = "DDPM_MAX_PRIORITY", default_value_t = *DEFAULT_PRIORITIES.end(), allow_negative_numbers = true)]
    pub max_priority: i32,
    /// A plaintext address that serves grpc.health.v1 only, for probes that cannot speak TLS (the
    /// kubelet's gRPC probes) when the gRPC port does; none when unset.
    #[arg(long, env = "DDPM_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Prometheus metrics address (`/metrics`); none when unset.
    #[arg(long, env = "DDPM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// A served model, NAME=PATH: a diffusers folder, s3://bucket/prefix, or a hub id (org/name) in the
    /// Hugging Face cache. Repeat for several.
    #[arg(long = "model", env = "DDPM_MODELS", value_delimiter = ',', required = true)]
    pub models: Vec<ModelArg>,
    /// The job queue: sqlite:PATH (embedded; one process), or nats://HOST:PORT[/NAMESPACE] (NATS
    /// JetStream, shared by any number of workers); tls://HOST:PORT[/NAMESPACE] requires TLS. (The
    /// other servers of a NATS cluster are learnt from the one given.)
    #[arg(long, env = "DDPM_QUEUE", default_value = "sqlite:ddpm-data/queue.sqlite")]
    pub queue: String,
    /// How to reach a NATS queue's servers: credentials, TLS, replicas.
    #[command(flatten)]
    pub nats: NatsSettings,
    /// Default output destination: file:DIR or s3://BUCKET/PREFIX (endpoint and credentials from AWS_*).
    #[arg(long, env = "DDPM_OUTPUT", default_value = "file:ddpm-data/jobs")]
    pub output: Destination,
    /// Path-style S3 addressing (MinIO, SeaweedFS, Ceph).
    #[arg(long, env = "DDPM_S3_PATH_STYLE")]
    pub s3_path_style: bool,
    /// auto (every CUDA GPU, else the CPU), or a list such as cuda:0,cuda:1 or cpu. A device listed
    /// twice gets two threads. none: no device, for a front end that takes jobs into a NATS queue
    /// (and finishes them) while workers elsewhere run the shards.
    #[arg(long, env = "DDPM_DEVICES", default_value = "auto")]
    pub devices: String,
    /// Intra-op threads of each CPU device thread (default: the cores shared among them).
    #[arg(long, env = "DDPM_CPU_THREADS")]
    pub cpu_threads: Option<i32>,
    /// UNet precision: fp16 needs CUDA; bf16 also runs on CPUs (fast with AVX512-BF16 or AMX).
    #[arg(long, env = "DDPM_DTYPE", value_enum, default_value = "fp32")]
    pub dtype: DType,
    /// Channels-last UNet layout: faster, agrees with diffusers to ~1e-5 instead of bit for bit.
    #[arg(long, env = "DDPM_CHANNELS_LAST")]
    pub channels_last: bool,
    /// Replay each CUDA device's UNet calls from a graph captured per batch shape (CUDA devices only).
    #[arg(long, env = "DDPM_CUDA_GRAPHS")]
    pub cuda_graphs: bool,
    /// Let cuDNN time its kernels and keep the fastest (CUDA, channels-last): faster, but the picks,
    /// and so the images' last bits, can differ between workers; off, every worker writes the same
    /// bytes for a job.
    #[arg(long, env = "DDPM_CUDNN_BENCHMARK")]
    pub cudnn_benchmark: bool,
    /// Fill the padding rows of a shard's short last batch with the samples of queued shards of other
    /// jobs with the same model, scheduler, steps, η and batch size: each image stays the one its job
    /// gets alone at that batch size (every row has its own seed), with fewer UNet calls.
    #[arg(long, env = "DDPM_CO_BATCH", default_value_t = true, action = clap::ArgAction::Set)]
    pub co_batch: bool,
    /// Batch size of jobs that give none.
    #[arg(long, env = "DDPM_DEFAULT_BATCH_SIZE", default_value_t = 16)]
    pub default_batch_size: u32,
    /// The largest batch size a job may ask for. At warm-up each CUDA device runs a forward of this
    /// size; where it does not fit, the device takes the largest power of two below it that does and
    /// gives back shards of larger batches (another device may take them).
    #[arg(long, env = "DDPM_MAX_BATCH_SIZE", default_value_t = 512)]
    pub max_batch_size: u32,
    /// Batches per shard (the unit of leasing, retry and progress).
    #[arg(long, env = "DDPM_BATCHES_PER_SHARD", default_value_t = 4)]
    pub batches_per_shard: u64,
    /// Shards of one job at most (1 to 100000): a larger job gets more batches per shard, so that
    /// queueing it stays cheap for the queue and for everyone else's requests.
    #[arg(long, env = "DDPM_MAX_SHARDS_PER_JOB", default_value_t = 4096)]
    pub max_shards_per_job: u64,
    #[arg(long, env = "DDPM_MAX_SAMPLES", default_value_t = 10_000_000)]
    pub max_samples: u64,
    #[arg(long, env = "DDPM_MAX_STEPS", default_value_t = 1000)]
    pub max_steps: u32,
    /// Largest accepted request message, in bytes.
    #[arg(long, env = "DDPM_MAX_REQUEST_BYTES", default_value_t = 64 * 1024)]
    pub max_request_bytes: usize,
    /// Attempts of a shard before it is dead-lettered and its job FAILED.
    #[arg(long, env = "DDPM_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Delay before a failed shard's second attempt; it doubles with every further attempt (at most 5 min).
    #[arg(long, env = "DDPM_RETRY_SECONDS", default_value_t = 2.0)]
    pub retry_seconds: f64,
    /// First pause when the output store or the queue is unreachable; it doubles (with jitter) while the
    /// outage lasts, up to 5 min, and such pauses spend none of a shard's attempts.
    #[arg(long, env = "DDPM_OUTAGE_BACKOFF_SECONDS", default_value_t = 5.0)]
    pub outage_backoff_seconds: f64,
    /// Lease time of a shard; heartbeats renew it every quarter.
    #[arg(long, env = "DDPM_LEASE_SECONDS", default_value_t = 60.0)]
    pub lease_seconds: f64,
    /// On SIGTERM, how long running shards may take to finish before they are given back.
    #[arg(long, env = "DDPM_GRACE_SECONDS", default_value_t = 30.0)]
    pub grace_seconds: f64,
    /// Log lines as JSON objects.
    #[arg(long, env = "DDPM_LOG_JSON")]
    pub log_json: bool,
    /// Layout of jobs that name none: files, webdataset or parquet.
    #[arg(long, env = "DDPM_DEFAULT_FORMAT", value_enum, default_value = "files")]
    pub default_format: crate::dataset::DataFormat,
    /// Where WebDataset and Parquet parts are spooled on their way to S3 (a local output directory
    /// spools in its own staging folder). Needs room for two parts per device.
    #[arg(long, env = "DDPM_SCRATCH_DIR", default_value = "ddpm-data/scratch")]
    pub scratch_dir: PathBuf,
    /// Where models from S3 are copied to.
    #[arg(long, env = "DDPM_MODEL_CACHE", default_value = "ddpm-data/models")]
    pub model_cache: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is wrong (exit code 2): nothing was started.
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Runtime(String),
}

/// The configuration, checked and resolved.
struct Prepared {
    models: BTreeMap<String, Arc<ResolvedModel>>,
    queue: Arc<dyn Queue>,
    devices: Vec<(Device, Option<i32>)>,
    auth: Option<Arc<Auth>>,
    tls: Option<Arc<tls::Tls>>,
}

fn parse_devices(spec: &str, cpu_threads: Option<i32>) -> Result<Vec<(Device, Option<i32>)>, String> {
    if spec == "none" {
        return Ok(Vec::new());
    }
    let devices = if spec == "auto" {
        crate::worker::auto_devices()
    } else {
        spec.split(',').map(|d| parse_device(d.trim())).collect::<Result<Vec<_>, _>>()?
    };
    let gpus = tch::Cuda::device_count().max(0) as usize;
    for d in &devices {
        if let Device::Cuda(i) = d
            && *i >= gpus
        {
            return Err(format!("cuda:{i} requested but {gpus} CUDA device(s) found"));
        }
    }
    let cpus = devices.iter().filter(|d| **d == Device::Cpu).count().max(1) as i32;
    let share = cpu_threads.unwrap_or((tch::get_num_threads() / cpus).max(1));
    Ok(devices.into_iter().map(|d| (d, (d == Device::Cpu).then_some(share))).collect())
}

async fn prepare(args: &ServeArgs) -> Result<Prepared, ServeError> {
    let config = ServeError::Config;
    // A front end without devices (--devices none) runs no model, whatever its precision.
    if args.dtype == DType::Fp16
        && args.devices != "none"
        && !args.devices.contains("cuda")
        && tch::Cuda::device_count() == 0
    {
        return Err(config("--dtype fp16 needs a CUDA device (fp32 and bf16 run on the CPU)".into()));
    }
    if !(args.retry_seconds >= 0.0 && args.retry_seconds.is_finite()) {
        return Err(config("--retry-seconds must be a finite number ≥ 0".into()));
    }
    if !(args.outage_backoff_seconds > 0.0 && args.outage_backoff_seconds <= 300.0) {
        return Err(config("--outage-backoff-seconds must be in (0, 300]".into()));
    }
    if !(1..=100_000).contains(&args.max_shards_per_job) {
        return Err(config("--max-shards-per-job must be in 1..=100000".into()));
    }
    if args.batches_per_shard == 0 {
        return Err(config("--batches-per-shard must be at least 1".into()));
    }
    if !(args.grace_seconds >= 0.0 && args.grace_seconds.is_finite()) {
        return Err(config("--grace-seconds must be a finite number ≥ 0".into()));
    }
    if !(args.lease_seconds >= 1.0 && args.lease_seconds.is_finite()) {
        return Err(config("--lease-seconds must be at least 1".into()));
    }
    if args.default_batch_size == 0 || args.default_batch_size > args.max_batch_size {
        return Err(config("--default-batch-size must be in 1..=--max-batch-size".into()));
    }
    let span = i64::from(args.max_priority) - i64::from(args.min_priority) + 1;
    if !(1..=MAX_PRIORITY_VALUES).contains(&span) {
        return Err(config(format!(
            "--min-priority {} and --max-priority {}: 1 to {MAX_PRIORITY_VALUES} values, min ≤ max",
            args.min_priority, args.max_priority
        )));
    }
    let auth = match &args.auth_token_file {
        Some(path) => {
            let auth = Auth::load(path).map_err(|e| config(format!("--auth-token-file {e}")))?;
            if auth.is_empty() {
                tracing::warn!(path = %path.display(), "the token file has no tokens: every call is refused");
            }
            Some(Arc::new(auth))
        }
        None => {
            if !args.listen.ip().is_loopback() {
                tracing::warn!(listen = %args.listen, "no --auth-token-file: anyone who reaches the port may submit and cancel jobs");
            }
            None
        }
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let files =
                tls::TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: args.tls_client_ca.clone() };
            Some(Arc::new(tls::Tls::load(files).map_err(|e| config(format!("--tls-cert/--tls-key: {e}")))?))
        }
        _ => None,
    };
    let devices =
        parse_devices(&args.devices, args.cpu_threads).map_err(|e| config(format!("--devices: {e}")))?;
    let mut models = BTreeMap::new();
    for m in &args.models {
        if models.contains_key(&m.name) {
            return Err(config(format!("--model {}: named twice", m.name)));
        }
        // An S3 model is copied to the model cache under its name.
        let dir = m
            .location
            .fetch(&args.model_cache.join(&m.name), args.s3_path_style)
            .await
            .map_err(|e| config(format!("--model {}: {e}", m.name)))?;
        let source = m.location.source();
        let resolved = ResolvedModel::from_dir(&m.name, source, &dir)
            .map_err(|e| config(format!("--model {}: {e}", m.name)))?;
        models.insert(m.name.clone(), Arc::new(resolved));
    }
    let queue = open_queue(args).await?;
    Ok(Prepared { models, queue, devices, auth, tls })
}

/// `sqlite:PATH` (one process) or `nats://` / `tls://HOST:PORT[/NAMESPACE]` (any number of workers
/// sharing it).
async fn open_queue(args: &ServeArgs) -> Result<Arc<dyn Queue>, ServeError> {
    let config = ServeError::Config;
    if let Some(path) = args.queue.strip_prefix("sqlite:") {
        if let Some(flag) = args.nats.given() {
            return Err(config(format!("{flag} is for a NATS queue, but --queue is {}", args.queue)));
        }
        if args.devices == "none" {
            return Err(config(
                "--devices none needs a NATS queue: the workers that run the shards share it".into(),
            ));
        }
        let path = PathBuf::from(path);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| config(format!("--queue: {}: {e}", dir.display())))?;
        }
        let store =
            SqliteStore::open(&path).map_err(|e| config(format!("--queue {}: {e}", path.display())))?;
        return Ok(Arc::new(SqliteQueue::new(store)));
    }
    if nats_settings::parse_url(&args.queue).is_some() {
        let options = NatsOptions {
            // Heartbeats come every quarter lease, well inside the server's redelivery timer.
            ack_wait: Duration::from_secs_f64(args.lease_seconds),
            // Every consumer a job can land on exists from the start, so that an autoscaler watching
            // their pending counts sees work while no worker is running.
            priorities: Some(args.min_priority..=args.max_priority),
            ..NatsOptions::default()
        };
        return Ok(Arc::new(args.nats.open(&args.queue, options).await.map_err(config)?));
    }
    Err(config(format!(
        "--queue {:?}: expected sqlite:PATH, nats://HOST:PORT[/NAMESPACE] or tls://HOST:PORT[/NAMESPACE]",
        args.queue
    )))
}

/// The queue's name in metrics: the namespace of a NATS queue (after the servers), else `sqlite`.
fn queue_name(queue: &str) -> String {
    nats_settings::parse_url(queue).map_or_else(|| "sqlite".into(), |(_, namespace, _)| namespace.to_string())
}

fn install_metrics(addr: SocketAddr) -> Result<(), ServeError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let seconds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| b.install())
        .map_err(|e| ServeError::Config(format!("--metrics-listen {addr}: {e}")))?;
    metrics::gauge!("ddpm_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(())
}

/// Runs the service until SIGTERM or SIGINT, then drains. `on_listening` gets the bound address.
pub async fn serve(args: ServeArgs, on_listening: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    crate::model::set_cudnn_benchmark(args.cudnn_benchmark);
    let prepared = prepare(&args).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| ServeError::Config(format!("--listen {}: {e}", args.listen)))?;
    let addr = listener.local_addr().map_err(|e| ServeError::Runtime(e.to_string()))?;
    let health_listener = match args.health_listen {
        Some(h) => Some(
            tokio::net::TcpListener::bind(h)
                .await
                .map_err(|e| ServeError::Config(format!("--health-listen {h}: {e}")))?,
        ),
        None => None,
    };
    if let Some(m) = args.metrics_listen {
        install_metrics(m)?;
    }
    let outputs = Outputs::new(args.output.clone(), &args.allow_outputs, args.s3_path_style);
    let ctx = Arc::new(WorkerContext::new(
        Arc::clone(&prepared.queue),
        outputs,
        prepared.models.clone(),
        worker_config(&args),
        tokio::runtime::Handle::current(),
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status(WORKER_SERVICE, ServingStatus::NotServing).await;
    health.set_service_status("", ServingStatus::NotServing).await;
    // Liveness apart from readiness: SERVING until a device is lost (a restart may bring it back),
    // whatever the queue does (a restart would not bring the queue back).
    health.set_service_status(LIVENESS_SERVICE, ServingStatus::Serving).await;
    let health_only = health_listener.map(|listener| {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tonic::transport::Server::builder().add_service(health_service.clone());
        tokio::spawn(server.serve_with_incoming(incoming))
    });
    let router = api_router(&args, &prepared, &ctx, health_service)?;

    // Device threads load and warm their models; the service is SERVING once all have.
    let pool = pool::start(&ctx, &prepared.devices)
        .map_err(|e| ServeError::Runtime(format!("starting a device thread: {e}")))?;
    let reaper = {
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            loop {
                ctx.reap_once().await;
                tokio::time::sleep(ctx.config.reap_interval).await;
            }
        })
    };
    let grace = Duration::from_secs_f64(args.grace_seconds.max(0.0));
    let shutdown = drain(Arc::clone(&ctx), health.clone(), pool.threads, grace);
    let supervisor = follow_devices(&ctx, health, pool.events, prepared.devices.len());

    on_listening(addr);
    tracing::info!(%addr, models = ?ctx.models.keys().collect::<Vec<_>>(), devices = ?prepared.devices.iter().map(|d| device_name(d.0)).collect::<Vec<_>>(), "listening");
    let server: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match prepared.tls.clone() {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(tls.incoming(listener), shutdown)),
        None => {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            Box::pin(router.serve_with_incoming_shutdown(incoming, shutdown))
        }
    };
    server.await.map_err(|e| ServeError::Runtime(e.to_string()))?;
    let _ = supervisor.await;
    reaper.abort();
    if let Some(h) = health_only {
        h.abort();
    }
    if let Some(failure) = ctx.device_failure.get() {
        return Err(ServeError::Runtime(format!("drained after losing a device: {failure}")));
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// How this process's workers run shards, from its flags.
fn worker_config(args: &ServeArgs) -> WorkerConfig {
    WorkerConfig {
        worker_id: format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into()),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ),
        lease_ttl: Duration::from_secs_f64(args.lease_seconds),
        retry_delay: Duration::from_secs_f64(args.retry_seconds),
        outage_backoff: Duration::from_secs_f64(args.outage_backoff_seconds),
        dtype: args.dtype,
        layout: if args.channels_last { Layout::ChannelsLast } else { Layout::Diffusers },
        cuda_graphs: args.cuda_graphs,
        max_batch_size: args.max_batch_size as usize,
        co_batch: args.co_batch,
        finalize_after: Duration::from_secs_f64(args.lease_seconds),
        reap_interval: Duration::from_secs_f64((args.lease_seconds / 4.0).clamp(0.25, 5.0)),
        idle_poll: crate::worker::DEFAULT_IDLE_POLL,
        scratch_dir: args.scratch_dir.clone(),
        queue_name: queue_name(&args.queue),
    }
}

/// What one request may ask for, from the flags.
fn limits(args: &ServeArgs) -> Limits {
    Limits {
        max_samples: args.max_samples,
        max_steps: args.max_steps,
        max_batch_size: args.max_batch_size,
        default_batch_size: args.default_batch_size,
        max_samples_per_grid: crate::validation::MAX_SAMPLES_PER_GRID,
        batches_per_shard: args.batches_per_shard,
        max_shards_per_job: args.max_shards_per_job,
        max_attempts: args.max_attempts,
        default_format: args.default_format,
        priorities: args.min_priority..=args.max_priority,
    }
}

/// The gRPC services: health (open: probes carry no token), the API and reflection (behind the tokens
/// when there are any, reflection unless it is public); tokens and certificates reload as their files
/// change.
fn api_router(
    args: &ServeArgs,
    prepared: &Prepared,
    ctx: &Arc<WorkerContext>,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<tonic::transport::server::Router, ServeError> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Runtime(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        // google.rpc error details, so reflection clients (grpcurl) can decode BadRequest.
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Runtime(e.to_string()))?;
    let service =
        WorkerService { ctx: Arc::clone(ctx), limits: limits(args), authenticated: prepared.auth.is_some() };
    let worker = pb::worker_service_server::WorkerServiceServer::new(service)
        .max_decoding_message_size(args.max_request_bytes);
    use tonic::service::interceptor::InterceptedService;
    let router = tonic::transport::Server::builder().add_service(health_service);
    let router = match &prepared.auth {
        Some(a) => {
            let intercept = || auth::interceptor(Arc::clone(a));
            let router = router.add_service(InterceptedService::new(worker, intercept()));
            if args.reflection == ReflectionAccess::Public {
                router.add_service(reflection_v1).add_service(reflection_v1alpha)
            } else {
                router
                    .add_service(InterceptedService::new(reflection_v1, intercept()))
                    .add_service(InterceptedService::new(reflection_v1alpha, intercept()))
            }
        }
        None => router.add_service(worker).add_service(reflection_v1).add_service(reflection_v1alpha),
    };
    if let Some(a) = &prepared.auth {
        let a = Arc::clone(a);
        watch_file("token file", move || a.reload());
    }
    if let Some(t) = &prepared.tls {
        let t = Arc::clone(t);
        watch_file("TLS certificate", move || t.reload());
    }
    Ok(router)
}

/// The server's shutdown: on SIGTERM or SIGINT, take no new shards and report NOT_SERVING, then wait for
/// the device threads; after `grace`, running shards are given back untried.
async fn drain(
    ctx: Arc<WorkerContext>,
    health: tonic_health::server::HealthReporter,
    threads: Vec<std::thread::JoinHandle<()>>,
    grace: Duration,
) {
    shutdown_signal().await;
    tracing::info!(grace_seconds = grace.as_secs_f64(), "draining: no new shards");
    ctx.draining.store(true, Ordering::Relaxed);
    health.set_service_status(WORKER_SERVICE, ServingStatus::NotServing).await;
    health.set_service_status("", ServingStatus::NotServing).await;
    ctx.wake.notify_waiters();
    let drained = {
        let ctx = Arc::clone(&ctx);
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
            drop(ctx);
        })
    };
    tokio::pin!(drained);
    if tokio::time::timeout(grace, &mut drained).await.is_err() {
        tracing::info!("grace period over: giving running shards back");
        ctx.abort.store(true, Ordering::Relaxed);
        let _ = drained.await;
    }
}

/// Health follows the device pool: readiness (warm, queue reachable, not draining) and liveness (no
/// device lost; when one is, the orchestrator restarts the worker). Returns the pool's supervisor.
fn follow_devices(
    ctx: &Arc<WorkerContext>,
    health: tonic_health::server::HealthReporter,
    events: tokio::sync::mpsc::UnboundedReceiver<pool::DeviceEvent>,
    devices: usize,
) -> tokio::task::JoinHandle<()> {
    let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
    let (live_tx, mut live_rx) = tokio::sync::watch::channel(true);
    let supervisor = tokio::spawn(pool::supervise(Arc::clone(ctx), events, devices, ready_tx, live_tx));
    {
        let health = health.clone();
        tokio::spawn(async move {
            while live_rx.changed().await.is_ok() {
                let live = *live_rx.borrow_and_update();
                let status = if live { ServingStatus::Serving } else { ServingStatus::NotServing };
                health.set_service_status(LIVENESS_SERVICE, status).await;
                tracing::info!(live, "liveness changed");
            }
        });
    }
    tokio::spawn(async move {
        while ready_rx.changed().await.is_ok() {
            let ready = *ready_rx.borrow_and_update();
            let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
            health.set_service_status("", status).await;
            health.set_service_status(WORKER_SERVICE, status).await;
            tracing::info!(ready, "readiness changed");
        }
    });
    supervisor
}

/// Calls `reload` every [`FILE_POLL`] and on SIGHUP, logging what came of it, for as long as the
/// process runs. A reload that fails keeps what was loaded before.
fn watch_file(what: &'static str, reload: impl Fn() -> Result<bool, String> + Send + 'static) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            {
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => drop(h.recv().await),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(FILE_POLL) => {}
                    _ = hangup => {}
                }
            }
            #[cfg(not(unix))]
            tokio::time::sleep(FILE_POLL).await;
            match reload() {
                Ok(true) => tracing::info!(what, "reloaded"),
                Ok(false) => {}
                Err(e) => tracing::error!(what, error = e, "not reloaded; the previous one stays in force"),
            }
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::nats::{NatsAuth, Secret};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(flags: &[&str]) -> Result<ServeArgs, clap::Error> {
        let base = ["serve", "--model", "m=/models/m", "--queue", "tls://nats:4222/ns"];
        Cli::try_parse_from(base.iter().chain(flags)).map(|c| c.serve)
    }

    #[test]
    fn nats_credentials_come_from_files_or_the_environment_one_kind_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "s3cret\r\n").unwrap();
        let password = password.to_str().unwrap();
        let mut args = parse(&["--nats-user", "ddpm", "--nats-password-file", password]).unwrap().nats;
        args.password = None;
        let client = args.client(true).unwrap();
        let want = NatsAuth::UserPassword { user: "ddpm".into(), password: Secret::new("s3cret") };
        assert_eq!(
            (client.auth, client.require_tls),
            (want, true),
            "the file's line ending is not the password"
        );

        args.password = Some(Secret::new("other"));
        let err = args.client(false).unwrap_err();
        assert!(err.contains("--nats-password-file and DDPM_NATS_PASSWORD are both set"), "{err}");

        let mut args = parse(&["--nats-user", "ddpm"]).unwrap().nats;
        args.password = None;
        let err = args.client(false).unwrap_err();
        assert!(err.contains("--nats-user needs a password"), "{err}");
        args.password = Some(Secret::new("env"));
        let want = NatsAuth::UserPassword { user: "ddpm".into(), password: Secret::new("env") };
        assert_eq!(args.client(false).unwrap().auth, want);

        let mut args = parse(&["--nats-ca", "/ca.pem"]).unwrap().nats;
        (args.password, args.token) = (None, Some(Secret::new("t0ken")));
        let client = args.client(false).unwrap();
        assert_eq!(client.auth, NatsAuth::Token(Secret::new("t0ken")));
        assert!(client.require_tls, "a CA makes TLS required on a nats:// URL too");
        args.token = None;
        assert_eq!(args.client(false).unwrap().auth, NatsAuth::None);

        for (flags, conflict) in [
            (&["--nats-creds", "/c", "--nats-user", "u"][..], "--nats-user"),
            (&["--nats-creds", "/c", "--nats-token-file", "/t"], "--nats-token-file"),
            (&["--nats-password-file", "/p"], "--nats-user"),
            (&["--nats-cert", "/c"], "--nats-key"),
        ] {
            let err = parse(flags).err().unwrap_or_else(|| panic!("{flags:?} parsed")).to_string();
            assert!(err.contains(conflict), "{flags:?}: {err}");
        }
    }

    #[test]
    fn the_queue_is_named_by_its_nats_namespace() {
        assert_eq!(queue_name("nats://nats:4222/team-a"), "team-a");
        assert_eq!(queue_name("tls://nats:4222"), "ddpm");
        assert_eq!(queue_name("sqlite:/var/lib/q.sqlite"), "sqlite");
        assert_eq!(parse_devices("none", None).unwrap(), vec![]);
    }
}
