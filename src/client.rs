//! The command-line client: `submit` (with a progress bar fed by WatchJob and `--wait`), `status`,
//! `list`, `cancel` and `retry`, against a running `serve`. Every unary call has a deadline
//! (`--timeout-seconds`), so a client never hangs on a server that stopped answering.

use std::collections::BTreeMap;

use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::api::pb;
use crate::api::pb::worker_client::WorkerClient;
use crate::schedulers::SchedulerKind;

#[derive(Debug, Clone, clap::Args)]
pub struct ServerArg {
    /// The worker's gRPC address.
    #[arg(long, env = "DDPM_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Deadline of each call (and of connecting), in seconds; following a job with --wait has none.
    #[arg(long, env = "DDPM_TIMEOUT_SECONDS", default_value_t = 30.0)]
    pub timeout_seconds: f64,
}

impl ServerArg {
    fn timeout(&self) -> std::time::Duration {
        std::time::Duration::try_from_secs_f64(self.timeout_seconds)
            .unwrap_or(std::time::Duration::from_secs(30))
    }

    /// `message` as a request with this deadline.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout());
        request
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// A model name the worker serves.
    #[arg(long)]
    pub model: String,
    #[arg(long, value_enum, default_value = "ddpm")]
    pub scheduler: SchedulerKind,
    #[arg(long, default_value_t = 1000)]
    pub steps: u32,
    /// DDIM's eta.
    #[arg(long)]
    pub eta: Option<f32>,
    #[arg(long)]
    pub num_samples: u64,
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
    /// Output bucket (S3 servers) and prefix; the server's default destination when absent.
    #[arg(long)]
    pub bucket: Option<String>,
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
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// KEY=VALUE, repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Follow the job to its end; exit 0 only if it SUCCEEDED.
    #[arg(long)]
    pub wait: bool,
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

async fn connect(server: &ServerArg) -> Result<WorkerClient<Channel>, ClientError> {
    let failed = |source| ClientError::Connect { server: server.server.clone(), source };
    let endpoint = tonic::transport::Endpoint::from_shared(server.server.clone())
        .map_err(failed)?
        .connect_timeout(server.timeout());
    Ok(WorkerClient::new(endpoint.connect().await.map_err(failed)?))
}

pub fn state_name(state: i32) -> String {
    pb::JobState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_string())
        .unwrap_or_else(|_| format!("STATE_{state}"))
}

pub async fn submit(args: SubmitArgs, progress: bool) -> Result<(), ClientError> {
    let mut client = connect(&args.server).await?;
    let grid = (args.samples_per_grid.is_some() || args.grid_columns.is_some()).then(|| pb::GridSpec {
        samples_per_grid: args.samples_per_grid.unwrap_or(64),
        columns: args.grid_columns.unwrap_or(0),
    });
    let image_format = args.image_format.map(|f| match f {
        crate::dataset::ImageFormat::Png => pb::ImageFormat::Png,
        crate::dataset::ImageFormat::Webp => pb::ImageFormat::Webp,
        crate::dataset::ImageFormat::Jpeg => pb::ImageFormat::Jpeg,
    });
    let format = args.format.map(|f| match f {
        crate::dataset::DataFormat::Files => pb::OutputFormat::Files,
        crate::dataset::DataFormat::Webdataset => pb::OutputFormat::Webdataset,
        crate::dataset::DataFormat::Parquet => pb::OutputFormat::Parquet,
    });
    let output = Some(pb::OutputSpec {
        bucket: args.bucket.clone().unwrap_or_default(),
        prefix: args.prefix.clone().unwrap_or_default(),
        format: format.map_or(0, |f| f as i32),
        image_format: image_format.map_or(0, |f| f as i32),
        jpeg_quality: args.quality.unwrap_or(0),
        png_level: args.png_level.unwrap_or(0),
        target_file_bytes: args.target_file_bytes.unwrap_or(0),
    });
    let request = pb::SubmitJobRequest {
        request_id: args.request_id.clone().unwrap_or_default(),
        model: args.model.clone(),
        sampling: Some(pb::SamplingSpec {
            scheduler: crate::api::convert::scheduler_to_pb(args.scheduler) as i32,
            steps: args.steps,
            eta: args.eta,
        }),
        num_samples: args.num_samples,
        seed: args.seed,
        batch_size: args.batch_size.unwrap_or(0),
        grid,
        output,
        priority: args.priority,
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
    };
    let job = client.submit_job(args.server.request(request)).await?.into_inner().job.unwrap_or_default();
    println!(
        "job {} queued (seed {}, batch size {}, {} shards)",
        job.job_id, job.seed, job.batch_size, job.shards_total
    );
    if args.wait { wait(&mut client, &job.job_id, progress).await } else { Ok(()) }
}

/// Follows a job through WatchJob until it ends; prints the manifest and first grid on success.
async fn wait(client: &mut WorkerClient<Channel>, job_id: &str, progress: bool) -> Result<(), ClientError> {
    let mut events = client.watch_job(pb::WatchJobRequest { job_id: job_id.to_string() }).await?.into_inner();
    let bar = if progress { indicatif::ProgressBar::new(0) } else { indicatif::ProgressBar::hidden() };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} samples {msg}",
    ) {
        bar.set_style(style);
    }
    let mut last = None;
    while let Some(event) = events.next().await {
        let Some(job) = event?.job else { continue };
        bar.set_length(job.samples_total);
        bar.set_position(job.samples_done);
        bar.set_message(state_name(job.state).to_lowercase());
        last = Some(job);
    }
    bar.finish_and_clear();
    let job =
        last.ok_or_else(|| ClientError::Usage(format!("job {job_id}: the watch ended without an event")))?;
    if job.state != pb::JobState::Succeeded as i32 {
        return Err(ClientError::JobNotSucceeded {
            job_id: job.job_id,
            state: state_name(job.state),
            error: job.error,
        });
    }
    println!("job {} SUCCEEDED: {} samples", job.job_id, job.samples_done);
    println!("manifest: {}", job.manifest_uri);
    if let Some(grid) = job.grid_uris.first() {
        println!("grid: {grid}");
    }
    Ok(())
}

fn print_job(job: &pb::Job) {
    println!(
        "{}  {:<9}  {}/{} samples  {}/{} shards{}{}",
        job.job_id,
        state_name(job.state),
        job.samples_done,
        job.samples_total,
        job.shards_done,
        job.shards_total,
        if job.manifest_uri.is_empty() { String::new() } else { format!("  manifest: {}", job.manifest_uri) },
        if job.error.is_empty() { String::new() } else { format!("  error: {}", job.error) },
    );
}

pub async fn status(args: JobArgs, progress: bool) -> Result<(), ClientError> {
    let mut client = connect(&args.server).await?;
    if args.wait {
        return wait(&mut client, &args.job_id, progress).await;
    }
    let job =
        client.get_job(args.server.request(pb::GetJobRequest { job_id: args.job_id })).await?.into_inner();
    print_job(&job);
    Ok(())
}

pub async fn cancel(args: JobArgs) -> Result<(), ClientError> {
    let mut client = connect(&args.server).await?;
    let job = client
        .cancel_job(args.server.request(pb::CancelJobRequest { job_id: args.job_id }))
        .await?
        .into_inner();
    print_job(&job);
    Ok(())
}

/// Runs a FAILED job again (its finished shards are kept).
pub async fn retry(args: JobArgs) -> Result<(), ClientError> {
    let mut client = connect(&args.server).await?;
    let job_id = args.job_id.clone();
    let job = client.retry_job(args.server.request(pb::RetryJobRequest { job_id })).await?.into_inner();
    if args.wait {
        return wait(&mut client, &args.job_id, true).await;
    }
    print_job(&job);
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
            print_job(job);
            shown += 1;
        }
        token = page.next_page_token;
        if token.is_empty() || shown >= args.limit {
            return Ok(());
        }
    }
}
