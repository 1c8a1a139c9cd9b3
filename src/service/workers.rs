//! This process's workers ([`WorkerArgs`]): a thread per device sampling shards, the reaper, and the
//! drain on SIGTERM. [`WorkerArgs::build`] checks the settings and finds the devices;
//! [`Workers::spawn`] starts them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tch::Device;

use super::ServeError;
use super::admin::Health;
use crate::model::Layout;
use crate::placement::{DType, parse_device};
use crate::worker::pool::{self, DeviceThread};
use crate::worker::{WorkerConfig, WorkerContext};

/// Devices and shards.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Devices and shards")]
pub struct WorkerArgs {
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
}

/// The devices found and how their threads will run shards.
pub struct Workers {
    pub devices: Vec<DeviceThread>,
    pub config: WorkerConfig,
    grace: Duration,
    cudnn_benchmark: bool,
}

/// What the rest of the service gives the workers.
pub struct WorkerNeeds {
    /// The API's largest batch size: each CUDA device checks at warm-up that it fits.
    pub max_batch_size: u32,
    pub scratch_dir: std::path::PathBuf,
    /// The queue's name in metrics.
    pub queue_name: String,
    /// How long finished jobs are kept.
    pub retention: Option<crate::worker::Retention>,
}

impl WorkerArgs {
    /// Checks the settings and finds the devices (none is started yet).
    pub fn build(&self, needs: WorkerNeeds) -> Result<Workers, ServeError> {
        let config = ServeError::Config;
        // A front end without devices (--devices none) runs no model, whatever its precision.
        if self.dtype == DType::Fp16
            && self.devices != "none"
            && !self.devices.contains("cuda")
            && tch::Cuda::device_count() == 0
        {
            return Err(config("--dtype fp16 needs a CUDA device (fp32 and bf16 run on the CPU)".into()));
        }
        if !(self.retry_seconds >= 0.0 && self.retry_seconds.is_finite()) {
            return Err(config("--retry-seconds must be a finite number ≥ 0".into()));
        }
        if !(self.outage_backoff_seconds > 0.0 && self.outage_backoff_seconds <= 300.0) {
            return Err(config("--outage-backoff-seconds must be in (0, 300]".into()));
        }
        if !(self.grace_seconds >= 0.0 && self.grace_seconds.is_finite()) {
            return Err(config("--grace-seconds must be a finite number ≥ 0".into()));
        }
        if !(self.lease_seconds >= 1.0 && self.lease_seconds.is_finite()) {
            return Err(config("--lease-seconds must be at least 1".into()));
        }
        let devices =
            parse_devices(&self.devices, self.cpu_threads).map_err(|e| config(format!("--devices: {e}")))?;
        Ok(Workers {
            devices,
            config: self.worker_config(needs),
            grace: Duration::from_secs_f64(self.grace_seconds),
            cudnn_benchmark: self.cudnn_benchmark,
        })
    }

    fn worker_config(&self, needs: WorkerNeeds) -> WorkerConfig {
        WorkerConfig {
            worker_id: format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into()),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            lease_ttl: Duration::from_secs_f64(self.lease_seconds),
            retry_delay: Duration::from_secs_f64(self.retry_seconds),
            outage_backoff: Duration::from_secs_f64(self.outage_backoff_seconds),
            dtype: self.dtype,
            layout: if self.channels_last { Layout::ChannelsLast } else { Layout::Diffusers },
            cuda_graphs: self.cuda_graphs,
            max_batch_size: needs.max_batch_size as usize,
            co_batch: self.co_batch,
            finalize_after: Duration::from_secs_f64(self.lease_seconds),
            reap_interval: Duration::from_secs_f64((self.lease_seconds / 4.0).clamp(0.25, 5.0)),
            idle_poll: crate::worker::DEFAULT_IDLE_POLL,
            scratch_dir: needs.scratch_dir,
            queue_name: needs.queue_name,
            retention: needs.retention,
        }
    }
}

/// The started workers: the device threads' supervisor and the reaper.
pub struct Running {
    supervisor: tokio::task::JoinHandle<()>,
    reaper: tokio::task::JoinHandle<()>,
}

impl Workers {
    /// Starts a thread per device (each loads and warms its models; health is SERVING once all have),
    /// their supervisor and the reaper. The future returned ends once `signal` has come and the
    /// process has drained: no new shards from the signal on, and after the grace period running shards
    /// are given back untried.
    pub fn spawn(
        &self,
        ctx: &Arc<WorkerContext>,
        health: &Health,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(impl Future<Output = ()> + Send + 'static, Running), ServeError> {
        crate::model::set_cudnn_benchmark(self.cudnn_benchmark);
        let pool = pool::start(ctx, &self.devices)
            .map_err(|e| ServeError::Runtime(format!("starting a device thread: {e}")))?;
        let reaper = {
            let ctx = Arc::clone(ctx);
            tokio::spawn(async move {
                loop {
                    ctx.reap_once().await;
                    tokio::time::sleep(ctx.config.reap_interval).await;
                }
            })
        };
        // Readiness (warm, queue reachable, not draining) and liveness (no device lost; when one is,
        // the orchestrator restarts the worker) follow the pool.
        let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
        let (live_tx, live_rx) = tokio::sync::watch::channel(true);
        let supervisor = tokio::spawn(pool::supervise(
            Arc::clone(ctx),
            pool.events,
            self.devices.len(),
            ready_tx,
            live_tx,
        ));
        health.follow(ready_rx, live_rx);
        let drained = drain(signal, Arc::clone(ctx), health.clone(), pool.threads, self.grace);
        Ok((drained, Running { supervisor, reaper }))
    }
}

impl Running {
    /// Waits for the supervisor to see every device thread end, and stops the reaper.
    pub async fn stop(self) {
        let _ = self.supervisor.await;
        self.reaper.abort();
    }
}

/// The drain: after `signal`, take no new shards and report NOT_SERVING, then wait for the device
/// threads; after `grace`, running shards are given back untried.
async fn drain(
    signal: impl Future<Output = ()>,
    ctx: Arc<WorkerContext>,
    health: Health,
    threads: Vec<std::thread::JoinHandle<()>>,
    grace: Duration,
) {
    signal.await;
    tracing::info!(grace_seconds = grace.as_secs_f64(), "draining: no new shards");
    ctx.draining.store(true, Ordering::Relaxed);
    health.not_ready().await;
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

fn parse_devices(spec: &str, cpu_threads: Option<i32>) -> Result<Vec<DeviceThread>, String> {
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
    Ok(devices
        .into_iter()
        .map(|device| DeviceThread { device, cpu_threads: (device == Device::Cpu).then_some(share) })
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_devices_is_a_front_end() {
        assert_eq!(super::parse_devices("none", None).unwrap(), vec![]);
        assert!(super::parse_devices("tpu", None).unwrap_err().contains("unknown device"));
    }
}
