//! What one job may ask for, and what it gets when it asks for nothing ([`JobArgs`] → [`Limits`]).

use super::ServeError;
use crate::api::convert::{DEFAULT_PRIORITIES, Limits, MAX_PRIORITY_VALUES};

/// Jobs' limits and defaults.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Jobs")]
pub struct JobArgs {
    /// Lowest job priority accepted.
    #[arg(long, env = "DDPM_MIN_PRIORITY", default_value_t = *DEFAULT_PRIORITIES.start(), allow_negative_numbers = true)]
    pub min_priority: i32,
    /// Highest job priority accepted (at most 101 distinct values: each is a NATS consumer).
    #[arg(long, env = "DDPM_MAX_PRIORITY", default_value_t = *DEFAULT_PRIORITIES.end(), allow_negative_numbers = true)]
    pub max_priority: i32,
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
    /// Attempts of a shard before it is dead-lettered and its job FAILED.
    #[arg(long, env = "DDPM_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Layout of jobs that name none: files, webdataset or parquet.
    #[arg(long, env = "DDPM_DEFAULT_FORMAT", value_enum, default_value = "files")]
    pub default_format: crate::dataset::DataFormat,
    /// Delete jobs this many seconds after they ended (SUCCEEDED, FAILED or CANCELLED), as DeleteJob
    /// does: their records, and their objects unless --job-retention-keeps-outputs. Unset (the
    /// default), jobs are kept until deleted.
    #[arg(long, env = "DDPM_JOB_RETENTION_SECONDS")]
    pub job_retention_seconds: Option<f64>,
    /// With --job-retention-seconds, remove only the jobs' records and keep their datasets.
    #[arg(long, env = "DDPM_JOB_RETENTION_KEEPS_OUTPUTS")]
    pub job_retention_keeps_outputs: bool,
}

impl JobArgs {
    /// How long finished jobs are kept (`None`: until deleted).
    pub fn retention(&self) -> Result<Option<crate::worker::Retention>, ServeError> {
        let Some(seconds) = self.job_retention_seconds else {
            if self.job_retention_keeps_outputs {
                return Err(ServeError::Config(
                    "--job-retention-keeps-outputs needs --job-retention-seconds".into(),
                ));
            }
            return Ok(None);
        };
        if !(seconds > 0.0 && seconds.is_finite() && seconds <= 1e12) {
            return Err(ServeError::Config("--job-retention-seconds must be a number of seconds > 0".into()));
        }
        Ok(Some(crate::worker::Retention {
            after: std::time::Duration::from_secs_f64(seconds),
            keep_outputs: self.job_retention_keeps_outputs,
        }))
    }

    /// The limits the API checks each request against.
    pub fn build(&self) -> Result<Limits, ServeError> {
        let config = ServeError::Config;
        if !(1..=100_000).contains(&self.max_shards_per_job) {
            return Err(config("--max-shards-per-job must be in 1..=100000".into()));
        }
        if self.batches_per_shard == 0 {
            return Err(config("--batches-per-shard must be at least 1".into()));
        }
        if self.default_batch_size == 0 || self.default_batch_size > self.max_batch_size {
            return Err(config("--default-batch-size must be in 1..=--max-batch-size".into()));
        }
        let span = i64::from(self.max_priority) - i64::from(self.min_priority) + 1;
        if !(1..=MAX_PRIORITY_VALUES).contains(&span) {
            return Err(config(format!(
                "--min-priority {} and --max-priority {}: 1 to {MAX_PRIORITY_VALUES} values, min ≤ max",
                self.min_priority, self.max_priority
            )));
        }
        Ok(Limits {
            max_samples: self.max_samples,
            max_steps: self.max_steps,
            max_batch_size: self.max_batch_size,
            default_batch_size: self.default_batch_size,
            max_samples_per_grid: crate::validation::MAX_SAMPLES_PER_GRID,
            batches_per_shard: self.batches_per_shard,
            max_shards_per_job: self.max_shards_per_job,
            max_attempts: self.max_attempts,
            default_format: self.default_format,
            priorities: self.min_priority..=self.max_priority,
            // Set from the event settings (serve --allow-webhook).
            webhook_prefixes: Vec::new(),
        })
    }
}
