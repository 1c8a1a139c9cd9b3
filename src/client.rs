//! The command-line client: `submit` (with a progress bar fed by WatchJob and `--wait`), `status`,
//! `list`, `cancel` and `retry`, against a running `serve`, over plaintext or TLS (`https://`, `--ca`,
//! mTLS with `--cert/--key`), with a bearer token (`--token-file` or `DDPM_TOKEN`). Every unary call
//! has a deadline (`--timeout-seconds`), so a client never hangs on a server that stopped answering;
//! `--wait` follows a job across a server's drain and restart. `--output json` prints jobs in the
//! protobuf JSON mapping. Exit codes: see [`ClientError::exit_code`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::api::pb;
use crate::api::pb::worker_service_client::WorkerServiceClient;
use crate::schedulers::SchedulerKind;

#[derive(Debug, Clone, clap::Args)]
pub struct ServerArg {
    /// The worker's gRPC address: http://HOST:PORT, or https://HOST:PORT for TLS.
    #[arg(long, env = "DDPM_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Deadline of each call (and of connecting), in seconds; following a job with --wait has none.
    #[arg(long, env = "DDPM_TIMEOUT_SECONDS", default_value_t = 30.0)]
    pub timeout_seconds: f64,
    /// A file holding the bearer token (its first line). DDPM_TOKEN holds the token itself.
    #[arg(long, env = "DDPM_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// CA certificate(s), PEM, to trust for https:// (default: the system's roots).
    #[arg(long, env = "DDPM_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for a server that asks for one (mTLS); needs --key.
    #[arg(long, env = "DDPM_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "DDPM_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
    /// How jobs are printed: text, or json (the protobuf JSON mapping; `list` prints one job a line).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputMode {
    Text,
    Json,
}

impl ServerArg {
    fn timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.timeout_seconds).unwrap_or(Duration::from_secs(30))
    }

    /// `message` as a request with this deadline.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout());
        request
    }

    /// The bearer token: `--token-file`'s first line, else `DDPM_TOKEN`.
    fn token(&self) -> Result<Option<String>, ClientError> {
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ClientError::Usage(format!("--token-file {}: {e}", path.display())))?;
            let token = text.lines().next().unwrap_or("").trim().to_string();
            if token.is_empty() {
                return Err(ClientError::Usage(format!("--token-file {}: empty", path.display())));
            }
            return Ok(Some(token));
        }
        Ok(std::env::var("DDPM_TOKEN").ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()))
    }
}

/// Adds `authorization: Bearer TOKEN` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Client = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;

#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// The job spec in the protobuf JSON mapping (a file, or - for standard input): a JobSpec, or a Job as
    /// `--output json` prints it. Flags given as well replace its fields (labels are added).
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,
    /// A model name the worker serves.
    #[arg(long, required_unless_present_any = ["extend", "spec"])]
    pub model: Option<String>,
    /// Continue a SUCCEEDED job (its id): its model, sampling, batch size and layout, with
    /// --num-samples more samples whose seeds follow its last one. The new job's manifest names the job
    /// it extends; the two share no seed. Its destination is the extended job's unless given.
    #[arg(long, value_name = "JOB_ID", conflicts_with_all = [
        "spec", "model", "scheduler", "steps", "eta", "seed", "batch_size", "format", "image_format", "quality",
        "png_level", "target_file_bytes",
    ])]
    pub extend: Option<String>,
    /// [default: ddpm]
    #[arg(long, value_enum)]
    pub scheduler: Option<SchedulerKind>,
    /// [default: 1000]
    #[arg(long)]
    pub steps: Option<u32>,
    /// DDIM's eta.
    #[arg(long)]
    pub eta: Option<f32>,
    #[arg(long, required_unless_present = "spec")]
    pub num_samples: Option<u64>,
    /// Assigned by the server when absent (and printed).
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Idempotency key: submitting it again returns the same job.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Samples per grid image (0: none).
    #[arg(long)]
    pub samples_per_grid: Option<u32>,
    #[arg(long)]
    pub grid_columns: Option<u32>,
    /// Where the job writes: s3://BUCKET[/PREFIX] or file:/DIR, within the server's allowed
    /// destinations; the server's default output when absent.
    #[arg(long)]
    pub destination: Option<String>,
    /// A relative path under the destination.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Layout of the samples; the server's default when absent.
    #[arg(long, value_enum)]
    pub format: Option<crate::dataset::DataFormat>,
    /// Encoding of each sample (webp is lossless).
    #[arg(long, value_enum)]
    pub image_format: Option<crate::dataset::ImageFormat>,
    /// JPEG quality, 1 to 100 (default 95).
    #[arg(long)]
    pub quality: Option<u32>,
    /// PNG deflate level, 1 to 9 (default: fast).
    #[arg(long)]
    pub png_level: Option<u32>,
    /// Size a WebDataset or Parquet data file stays under, in bytes (default 256 MiB).
    #[arg(long)]
    pub target_file_bytes: Option<u64>,
    /// Higher runs first (-10 to 10 unless the server says otherwise) [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// KEY=VALUE, repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// A webhook that gets the job's events (within the server's --allow-webhook prefixes).
    #[arg(long)]
    pub webhook_url: Option<String>,
    #[command(flatten)]
    pub classes: crate::classes::ClassArgs,
    /// Follow the job to its end; exit 0 only if it SUCCEEDED.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: how long the server may stay out of reach (a drain, a restart) before giving up.
    #[arg(long, default_value_t = 600.0)]
    pub reconnect_seconds: f64,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub server: ServerArg,
    pub job_id: String,
    /// Follow the job to its end (exit 0 only if it SUCCEEDED).
    #[arg(long)]
    pub wait: bool,
    /// With --wait: how long the server may stay out of reach (a drain, a restart) before giving up.
    #[arg(long, default_value_t = 600.0)]
    pub reconnect_seconds: f64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub server: ServerArg,
    pub job_id: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ModelsArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Only this model (exit 3 when the server has none of that name).
    pub name: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// Only jobs in these states (queued, running, succeeded, failed, cancelled).
    #[arg(long = "state", value_delimiter = ',')]
    pub states: Vec<String>,
    /// Only jobs with these labels, KEY=VALUE.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {server}: {source}")]
    Connect { server: String, source: tonic::transport::Error },
    #[error("{}", describe(.0))]
    Rpc(#[from] tonic::Status),
    #[error("{0}")]
    Usage(String),
    /// The job ended in a state other than SUCCEEDED.
    #[error("job {job_id} ended {state}{}", if .error.is_empty() { String::new() } else { format!(": {}", .error) })]
    JobNotSucceeded { job_id: String, state: String, error: String },
    /// `--wait` gave up on a server that stayed out of reach.
    #[error("job {job_id}: the server stayed out of reach for {seconds:.0} s: {last}")]
    GaveUp { job_id: String, seconds: f64, last: String },
}

impl ClientError {
    /// The process exit code (documented in the README and `--help`): 2 bad arguments (the command
    /// line's, or INVALID_ARGUMENT), 3 not found, 4 unauthenticated or permission denied, 5 the job
    /// FAILED, 6 the job was CANCELLED, 7 the server is unavailable, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        use tonic::Code;
        match self {
            ClientError::Usage(_) => 2,
            ClientError::Connect { .. } | ClientError::GaveUp { .. } => 7,
            ClientError::JobNotSucceeded { state, .. } if state == "CANCELLED" => 6,
            ClientError::JobNotSucceeded { .. } => 5,
            ClientError::Rpc(status) => match status.code() {
                Code::InvalidArgument | Code::OutOfRange => 2,
                Code::NotFound => 3,
                Code::Unauthenticated | Code::PermissionDenied => 4,
                Code::Unavailable | Code::DeadlineExceeded => 7,
                // The connection broke or never carried a call (a TLS handshake the server refused);
                // this client cancels nothing itself.
                Code::Cancelled => 7,
                Code::Unknown if status.message().contains("transport error") => 7,
                _ => 1,
            },
        }
    }
}

/// A status with its field violations, one per line.
fn describe(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(bad) = status.get_details_bad_request() {
        for v in bad.field_violations {
            text.push_str(&format!("\n  {}: {}", v.field, v.description));
        }
    }
    text
}

/// A client of `server`: TLS for https:// (or when a CA or client certificate is given), HTTP/2
/// keepalives so a vanished server is noticed, and its bearer token on every call.
pub async fn connect(server: &ServerArg) -> Result<Client, ClientError> {
    let failed = |source| ClientError::Connect { server: server.server.clone(), source };
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| ClientError::Usage(format!("{}: {e}", path.display())))
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(server.server.clone())
        .map_err(failed)?
        .connect_timeout(server.timeout())
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let tls = server.server.starts_with("https://") || server.ca.is_some() || server.cert.is_some();
    if tls {
        let mut config = ClientTlsConfig::new();
        config = match &server.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => config.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&server.cert, &server.key) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(config).map_err(failed)?;
    }
    let token = match server.token()? {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| ClientError::Usage("the token is not printable ASCII".into()))?,
        ),
        None => None,
    };
    let channel = endpoint.connect().await.map_err(failed)?;
    Ok(WorkerServiceClient::with_interceptor(channel, BearerToken(token)))
}

/// A message in the protobuf JSON mapping (what grpcurl and the Python client print).
pub fn to_json<M: prost::Message>(message: &M, full_name: &str) -> String {
    let Some(descriptor) = descriptor(full_name) else { return "{}".into() };
    match prost_reflect::DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice()) {
        Ok(dynamic) => serde_json::to_string(&dynamic).unwrap_or_else(|_| "{}".into()),
        Err(_) => "{}".into(),
    }
}

/// The API's message `full_name` (`ddpm.v1.Job`), for the protobuf JSON mapping.
fn descriptor(full_name: &str) -> Option<prost_reflect::MessageDescriptor> {
    prost_reflect::DescriptorPool::decode(crate::api::FILE_DESCRIPTOR_SET)
        .ok()?
        .get_message_by_name(full_name)
}

pub fn state_name(state: i32) -> String {
    pb::JobState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_string())
        .unwrap_or_else(|_| format!("STATE_{state}"))
}

/// A job spec in the protobuf JSON mapping, from `path` (`-`: standard input): a `JobSpec`, or a `Job`
/// as `--output json` prints it (its `spec`).
pub fn read_spec(path: &std::path::Path) -> Result<pb::JobSpec, ClientError> {
    use prost::Message;
    let shown = path.display();
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    }
    .map_err(|e| ClientError::Usage(format!("--spec {shown}: {e}")))?;
    let mut value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ClientError::Usage(format!("--spec {shown}: {e}")))?;
    if value.get("jobId").is_some()
        && let Some(spec) = value.get_mut("spec")
    {
        value = spec.take();
    }
    let descriptor = descriptor("ddpm.v1.JobSpec")
        .ok_or_else(|| ClientError::Usage("the API's descriptor lacks ddpm.v1.JobSpec".into()))?;
    let dynamic = prost_reflect::DynamicMessage::deserialize(descriptor, value)
        .map_err(|e| ClientError::Usage(format!("--spec {shown}: not a ddpm.v1.JobSpec: {e}")))?;
    pb::JobSpec::decode(dynamic.encode_to_vec().as_slice())
        .map_err(|e| ClientError::Usage(format!("--spec {shown}: {e}")))
}

/// The spec `submit` sends: `--spec`'s (or an empty one) with every flag given put over it; without
/// `--spec` or `--extend`, sampling defaults to DDPM with 1000 steps.
pub fn submit_spec(args: &SubmitArgs) -> Result<pb::JobSpec, ClientError> {
    let mut spec = match &args.spec {
        Some(path) => read_spec(path)?,
        None => pb::JobSpec::default(),
    };
    if let Some(model) = &args.model {
        spec.model = model.clone();
    }
    if args.extend.is_none() && (args.spec.is_none() || args.scheduler.is_some() || args.steps.is_some()) {
        let sampling = spec.sampling.get_or_insert(pb::SamplingSpec {
            scheduler: pb::Scheduler::Ddpm as i32,
            steps: 1000,
            eta: None,
        });
        if let Some(kind) = args.scheduler {
            sampling.scheduler = crate::api::convert::scheduler_to_pb(kind) as i32;
        }
        sampling.steps = args.steps.unwrap_or(sampling.steps);
    }
    if let (Some(eta), Some(sampling)) = (args.eta, spec.sampling.as_mut()) {
        sampling.eta = Some(eta);
    }
    spec.num_samples = args.num_samples.unwrap_or(spec.num_samples);
    spec.seed = args.seed.or(spec.seed);
    spec.batch_size = args.batch_size.unwrap_or(spec.batch_size);
    if args.samples_per_grid.is_some() || args.grid_columns.is_some() {
        let grid = spec.grid.get_or_insert(pb::GridSpec { samples_per_grid: 64, columns: 0 });
        grid.samples_per_grid = args.samples_per_grid.unwrap_or(grid.samples_per_grid);
        grid.columns = args.grid_columns.unwrap_or(grid.columns);
    }
    let output = spec.output.get_or_insert_default();
    let set = |field: &mut String, given: &Option<String>| {
        if let Some(value) = given {
            field.clone_from(value);
        }
    };
    set(&mut output.destination, &args.destination);
    set(&mut output.prefix, &args.prefix);
    if let Some(format) = args.format {
        output.format = crate::api::convert::format_to_pb(format) as i32;
    }
    if let Some(image) = args.image_format {
        output.image_format = crate::api::convert::image_to_pb(image) as i32;
    }
    output.jpeg_quality = args.quality.unwrap_or(output.jpeg_quality);
    output.png_level = args.png_level.unwrap_or(output.png_level);
    output.target_file_bytes = args.target_file_bytes.unwrap_or(output.target_file_bytes);
    spec.priority = args.priority.unwrap_or(spec.priority);
    spec.labels.extend(args.labels.iter().cloned());
    set(&mut spec.extends, &args.extend);
    set(&mut spec.webhook_url, &args.webhook_url);
    if let Some(c) = args.classes.request() {
        spec.classes = Some(pb::ClassSpec {
            counts: c.counts,
            uniform: c.uniform,
            guidance_scale: c.guidance_scale,
            null_class: c.null_class,
            names: c.names,
        });
    }
    Ok(spec)
}

pub async fn submit(args: SubmitArgs, progress: bool) -> Result<(), ClientError> {
    let spec = submit_spec(&args)?;
    let mut client = connect(&args.server).await?;
    let request =
        pb::SubmitJobRequest { request_id: args.request_id.clone().unwrap_or_default(), spec: Some(spec) };
    let job = client.submit_job(args.server.request(request)).await?.into_inner().job.unwrap_or_default();
    if args.wait {
        if args.server.output == OutputMode::Text {
            println!(
                "job {} queued (seed {}, batch size {}, {} shards)",
                job.job_id,
                job.spec.as_ref().and_then(|s| s.seed).unwrap_or_default(),
                job.spec.as_ref().map_or(0, |s| s.batch_size),
                job.shards_total
            );
        }
        return wait(client, &args.server, &job.job_id, progress, args.reconnect_seconds).await;
    }
    match args.server.output {
        OutputMode::Json => println!("{}", to_json(&job, "ddpm.v1.Job")),
        OutputMode::Text => println!(
            "job {} queued (seed {}, batch size {}, {} shards)",
            job.job_id,
            job.spec.as_ref().and_then(|s| s.seed).unwrap_or_default(),
            job.spec.as_ref().map_or(0, |s| s.batch_size),
            job.shards_total
        ),
    }
    Ok(())
}

/// Whether a failed call or stream is worth making again once the server is back: it was out of
/// reach, draining, or the connection broke.
fn transient(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted)
}

/// Follows a job through WatchJob until it ends, watching again (with a fresh connection when needed)
/// while the server drains or restarts, for up to `reconnect_seconds` of no answer in a row. Prints the
/// manifest and first grid on success; the job's final state decides the exit code.
async fn wait(
    mut client: Client,
    server: &ServerArg,
    job_id: &str,
    progress: bool,
    reconnect_seconds: f64,
) -> Result<(), ClientError> {
    let patience = Duration::try_from_secs_f64(reconnect_seconds).unwrap_or(Duration::from_secs(600));
    let progress = progress && server.output == OutputMode::Text;
    let bar = if progress { indicatif::ProgressBar::new(0) } else { indicatif::ProgressBar::hidden() };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} samples {msg}",
    ) {
        bar.set_style(style);
    }
    let mut last: Option<pb::Job> = None;
    let mut out_of_reach: Option<Instant> = None;
    let mut pause = Duration::from_millis(250);
    loop {
        let broke = match client.watch_job(pb::WatchJobRequest { job_id: job_id.to_string() }).await {
            Ok(events) => {
                let mut events = events.into_inner();
                let mut broke = None;
                while let Some(event) = events.next().await {
                    match event {
                        Ok(event) => {
                            let Some(job) = event.job else { continue };
                            out_of_reach = None;
                            pause = Duration::from_millis(250);
                            bar.set_length(job.samples_total);
                            bar.set_position(job.samples_done);
                            bar.set_message(state_name(job.state).to_lowercase());
                            last = Some(job);
                        }
                        Err(status) if transient(&status) => {
                            broke = Some(status);
                            break;
                        }
                        Err(status) => return Err(status.into()),
                    }
                }
                broke
            }
            Err(status) if transient(&status) => Some(status),
            Err(status) => return Err(status.into()),
        };
        let Some(status) = broke else { break };
        if last.as_ref().is_some_and(|j| is_final(j.state)) {
            break;
        }
        let since = *out_of_reach.get_or_insert_with(Instant::now);
        if since.elapsed() >= patience {
            bar.finish_and_clear();
            return Err(ClientError::GaveUp {
                job_id: job_id.to_string(),
                seconds: since.elapsed().as_secs_f64(),
                last: describe(&status),
            });
        }
        bar.set_message(format!("reconnecting ({})", status.code()));
        tracing::debug!(code = ?status.code(), message = status.message(), "watch broke; watching again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
        // A fresh connection: the old one may point at a server that is gone.
        if let Ok(fresh) = connect(server).await {
            client = fresh;
        }
    }
    bar.finish_and_clear();
    let job =
        last.ok_or_else(|| ClientError::Usage(format!("job {job_id}: the watch ended without an event")))?;
    if server.output == OutputMode::Json {
        println!("{}", to_json(&job, "ddpm.v1.Job"));
    }
    if job.state != pb::JobState::Succeeded as i32 {
        return Err(ClientError::JobNotSucceeded {
            job_id: job.job_id,
            state: state_name(job.state),
            error: job.error.map(|e| e.message).unwrap_or_default(),
        });
    }
    if server.output == OutputMode::Text {
        println!("job {} SUCCEEDED: {} samples", job.job_id, job.samples_done);
        println!("manifest: {}", job.manifest_uri);
        if let Some(grid) = job.grid_uris.first() {
            println!("grid: {grid}");
        }
    }
    Ok(())
}

fn is_final(state: i32) -> bool {
    [pb::JobState::Succeeded, pb::JobState::Failed, pb::JobState::Cancelled]
        .iter()
        .any(|s| *s as i32 == state)
}

fn print_job(job: &pb::Job, mode: OutputMode) {
    if mode == OutputMode::Json {
        println!("{}", to_json(job, "ddpm.v1.Job"));
        return;
    }
    let error = job.error.as_ref().map(|e| e.message.as_str()).unwrap_or_default();
    let pace = job.samples_per_second.map(|r| format!("  {r:.2} samples/s")).unwrap_or_default();
    let eta = job
        .estimated_finish_time
        .map(|t| format!(" (ends in ~{} s)", (t.seconds - crate::queue::now_ms() / 1000).max(0)));
    println!(
        "{}  {:<9}  {}/{} samples  {}/{} shards{pace}{}{}{}",
        job.job_id,
        state_name(job.state),
        job.samples_done,
        job.samples_total,
        job.shards_done,
        job.shards_total,
        eta.unwrap_or_default(),
        if job.manifest_uri.is_empty() { String::new() } else { format!("  manifest: {}", job.manifest_uri) },
        if error.is_empty() { String::new() } else { format!("  error: {error}") },
    );
    if let Some(stats) = &job.shard_stats {
        let runners: Vec<String> =
            stats.runners.iter().map(|r| format!("{}/{} ×{}", r.worker, r.device, r.shards)).collect();
        println!(
            "  {} attempts, {} shards retried, {} failed{}",
            stats.attempts,
            stats.retried,
            stats.failed,
            if runners.is_empty() { String::new() } else { format!("; ran on {}", runners.join(", ")) }
        );
    }
}

pub async fn status(args: JobArgs, progress: bool) -> Result<(), ClientError> {
    let mut client = connect(&args.server).await?;
    if args.wait {
        return wait(client, &args.server, &args.job_id, progress, args.reconnect_seconds).await;
    }
    let job =
        client.get_job(args.server.request(pb::GetJobRequest { job_id: args.job_id })).await?.into_inner();
    print_job(&job.job.unwrap_or_default(), args.server.output);
    Ok(())
}

/// The server's models (or one): a line each, or one JSON model a line.
pub async fn models(args: ModelsArgs) -> Result<(), ClientError> {
    let mut client = connect(&args.server).await?;
    let models = match args.name {
        Some(name) => {
            let request = args.server.request(pb::GetModelRequest { name });
            client.get_model(request).await?.into_inner().model.into_iter().collect()
        }
        None => client.list_models(args.server.request(pb::ListModelsRequest {})).await?.into_inner().models,
    };
    for model in &models {
        match args.server.output {
            OutputMode::Json => println!("{}", to_json(model, "ddpm.v1.Model")),
            OutputMode::Text => println!("{}", model_line(model)),
        }
    }
    Ok(())
}

/// `cifar10  3×32×32  ddpm≤1000 ddim≤1000 …  batch ≤64 (cuda:0 ≤48)  sha256 0123abcd…  <source>`.
fn model_line(m: &pb::Model) -> String {
    let schedulers: Vec<String> = m
        .schedulers
        .iter()
        .map(|s| {
            let name = pb::Scheduler::try_from(s.scheduler).unwrap_or_default().as_str_name();
            format!("{}≤{}", name.trim_start_matches("SCHEDULER_").to_lowercase(), s.max_steps)
        })
        .collect();
    let devices: Vec<String> =
        m.devices.iter().map(|d| format!("{} ≤{}", d.device, d.max_batch_size)).collect();
    let devices = if devices.is_empty() { String::new() } else { format!(" ({})", devices.join(", ")) };
    let sha = m.weights_sha256.get(..12).unwrap_or(&m.weights_sha256);
    format!(
        "{}  {}×{}×{}  T={}  {}  batch {} (≤{}){devices}  sha256 {sha}…  {}",
        m.name,
        m.channels,
        m.height,
        m.width,
        m.num_train_timesteps,
        schedulers.join(" "),
        m.default_batch_size,
        m.max_batch_size,
        m.source
    )
}

pub async fn cancel(args: JobArgs) -> Result<(), ClientError> {
    let mut client = connect(&args.server).await?;
    let job = client
        .cancel_job(args.server.request(pb::CancelJobRequest { job_id: args.job_id }))
        .await?
        .into_inner();
    print_job(&job.job.unwrap_or_default(), args.server.output);
    Ok(())
}

/// Deletes a job and its objects (cancelling it first if it runs).
pub async fn delete(args: DeleteArgs) -> Result<(), ClientError> {
    let mut client = connect(&args.server).await?;
    let deleted = client
        .delete_job(args.server.request(pb::DeleteJobRequest { job_id: args.job_id }))
        .await?
        .into_inner();
    if args.server.output == OutputMode::Json {
        println!("{}", to_json(&deleted, "ddpm.v1.DeleteJobResponse"));
        return Ok(());
    }
    let job = deleted.job.unwrap_or_default();
    println!(
        "{}  deleted ({} when deleted, {} objects removed)",
        job.job_id,
        state_name(job.state),
        deleted.objects_deleted
    );
    Ok(())
}

/// Runs a FAILED job again (its finished shards are kept).
pub async fn retry(args: JobArgs, progress: bool) -> Result<(), ClientError> {
    let mut client = connect(&args.server).await?;
    let job_id = args.job_id.clone();
    let job = client.retry_job(args.server.request(pb::RetryJobRequest { job_id })).await?.into_inner();
    if args.wait {
        return wait(client, &args.server, &args.job_id, progress, args.reconnect_seconds).await;
    }
    print_job(&job.job.unwrap_or_default(), args.server.output);
    Ok(())
}

pub async fn list(args: ListArgs) -> Result<(), ClientError> {
    let mut client = connect(&args.server).await?;
    let mut states = Vec::new();
    for s in &args.states {
        let name = format!("JOB_STATE_{}", s.to_uppercase());
        let state = pb::JobState::from_str_name(&name)
            .ok_or_else(|| ClientError::Usage(format!("--state {s}: unknown")))?;
        states.push(state as i32);
    }
    let mut token = String::new();
    let mut shown = 0;
    loop {
        let page = client
            .list_jobs(args.server.request(pb::ListJobsRequest {
                states: states.clone(),
                labels: args.labels.iter().cloned().collect(),
                page_size: args.limit.min(1000),
                page_token: token,
            }))
            .await?
            .into_inner();
        for job in &page.jobs {
            if shown >= args.limit {
                return Ok(());
            }
            print_job(job, args.server.output);
            shown += 1;
        }
        token = page.next_page_token;
        if token.is_empty() || shown >= args.limit {
            return Ok(());
        }
    }
}
