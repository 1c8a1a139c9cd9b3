//! The batch worker: a job's samples split into shards ([`crate::queue::plan`]) that each device
//! samples in three stages: its [`batcher`] leases shards and makes batches ready, its [`device`] loop
//! samples them, and each shard's [`finisher`] stores its outputs ([`outputs`]) and records it.
//!
//! ```text
//!  queue ──lease──▶ batcher (async, per device) ──ReadyBatch──▶ device loop (OS thread)
//!    ▲               job read once, co-batching,     channel      sample, x_0 → images
//!    │               output targets, noise ahead       of 1            │ images
//!    │                                                                 ▼
//!    └──record, complete, give back── finisher (async, per shard): encode, upload, grids, heartbeat
//! ```

pub mod batcher;
pub mod card;
pub mod device;
pub mod fault;
pub mod finisher;
pub mod outputs;
pub mod pool;
pub mod reaper;
pub mod simulated;
pub mod warmup;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tch::Device;

use crate::model::Layout;
use crate::models::ResolvedModel;
use crate::placement::DType;
use crate::queue::Queue;

/// How long an idle device's batcher waits between polls of the queue (new submissions wake it at once).
pub const DEFAULT_IDLE_POLL: Duration = Duration::from_millis(500);
use outputs::Outputs;

/// How workers run shards.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Identifies this process in leases and shard records.
    pub worker_id: String,
    pub lease_ttl: Duration,
    /// Delay before a failed shard runs again.
    pub retry_delay: Duration,
    /// First pause after the store or the queue was found unavailable; it doubles with each further
    /// failure, up to [`MAX_OUTAGE_PAUSE`].
    pub outage_backoff: Duration,
    /// The UNet's precision.
    pub dtype: DType,
    pub layout: Layout,
    /// CUDA devices replay their UNet calls from captured graphs.
    pub cuda_graphs: bool,
    /// The API's largest batch size: each CUDA device checks at warm-up that it fits.
    pub max_batch_size: usize,
    /// Fill a short last batch with compatible shards of other jobs ([`batcher`]).
    pub co_batch: bool,
    /// How long a job whose shards are all done may wait for its manifest before the reaper writes it.
    pub finalize_after: Duration,
    pub reap_interval: Duration,
    /// Polling period of an idle device thread (new submissions wake it at once).
    pub idle_poll: Duration,
    /// Where data file parts are spooled before they go to S3 (a local directory store spools in its
    /// own staging folder instead).
    pub scratch_dir: std::path::PathBuf,
    /// The queue's name in metrics (`queue` label): the NATS namespace, or `sqlite`.
    pub queue_name: String,
    /// Finished jobs deleted a while after they finished; `None`: kept until DeleteJob.
    pub retention: Option<Retention>,
}

/// How long finished jobs are kept ([`crate::queue::JobStore::expire_jobs`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    /// Time from a job's end to its deletion.
    pub after: Duration,
    /// Remove only the job's record; its objects stay.
    pub keep_outputs: bool,
}

impl WorkerConfig {
    /// How long after a job was cancelled or deleted its objects are deleted (again): by then every
    /// worker that ran a shard of it has found its lease gone (heartbeats come every quarter lease)
    /// and stopped writing.
    pub fn cleanup_grace(&self) -> Duration {
        self.lease_ttl * 2
    }
}

/// Stop flags of the shards running in this process, by job, so CancelJob stops them between steps
/// without waiting for a heartbeat to notice.
#[derive(Debug, Default)]
pub struct ActiveShards {
    flags: Mutex<HashMap<String, Vec<Arc<AtomicBool>>>>,
}

impl ActiveShards {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Arc<AtomicBool>>>> {
        self.flags.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn register(&self, job_id: &str) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.lock().entry(job_id.to_string()).or_default().push(Arc::clone(&flag));
        flag
    }

    pub fn unregister(&self, job_id: &str, flag: &Arc<AtomicBool>) {
        let mut flags = self.lock();
        if let Some(list) = flags.get_mut(job_id) {
            list.retain(|f| !Arc::ptr_eq(f, flag));
            if list.is_empty() {
                flags.remove(job_id);
            }
        }
    }

    /// Shards running in this process now.
    pub fn running(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Stops every running shard of `job_id`.
    pub fn stop_job(&self, job_id: &str) {
        for flag in self.lock().get(job_id).into_iter().flatten() {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// The longest pause while the store or the queue stays out of reach.
pub const MAX_OUTAGE_PAUSE: Duration = Duration::from_secs(300);

/// Consecutive failures to reach the store or the queue, and until when device threads lease nothing.
/// Pauses grow exponentially with "equal jitter" (half fixed, half random), so the workers of a fleet
/// do not come back in lockstep when a store returns.
#[derive(Debug, Default)]
pub struct Outage {
    state: Mutex<(u32, Option<std::time::Instant>)>,
}

impl Outage {
    /// Records a failure; returns the pause before the next try.
    pub fn failed(&self, base: Duration) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.0 = state.0.saturating_add(1);
        let full = base.saturating_mul(1 << (state.0 - 1).min(16)).min(MAX_OUTAGE_PAUSE);
        let pause = full / 2 + full.mul_f64(fastrand::f64() / 2.0);
        state.1 = Some(std::time::Instant::now() + pause);
        pause
    }

    /// The store and queue answer again.
    pub fn recovered(&self) {
        *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = (0, None);
    }

    /// What is left of the current pause.
    pub fn remaining(&self) -> Option<Duration> {
        let state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        state.1.and_then(|until| until.checked_duration_since(std::time::Instant::now()))
    }
}

/// What every device thread and background task of a worker process shares.
pub struct WorkerContext {
    pub queue: Arc<dyn Queue>,
    pub outputs: Arc<Outputs>,
    pub models: Arc<BTreeMap<String, Arc<ResolvedModel>>>,
    pub config: WorkerConfig,
    pub active: ActiveShards,
    /// Set on SIGTERM: take no new shards.
    pub draining: AtomicBool,
    /// Set when the drain grace period is over: stop running shards and give them back.
    pub abort: AtomicBool,
    /// Signalled when work may be available (a submission in this process).
    pub wake: tokio::sync::Notify,
    /// Whether the output store is out of reach, and for how long device threads wait.
    pub store_outage: Outage,
    /// Whether the queue is out of reach, and for how long device threads wait (the reaper ends the
    /// wait as soon as one of its passes reaches the queue again).
    pub queue_outage: Outage,
    /// Whether the last reaper pass reached the queue (readiness follows it).
    pub queue_reachable: AtomicBool,
    /// Why a device thread died or its device became unusable (the first such reason): the worker is
    /// then no longer live, and its orchestrator should restart it.
    pub device_failure: std::sync::OnceLock<String>,
    /// The largest batch each warmed-up device samples of each model: device → model → what fits its
    /// memory (CUDA, probed at warm-up) or `None` (no probe: the API's limit holds).
    pub device_fits: Mutex<BTreeMap<String, BTreeMap<String, Option<usize>>>>,
    pub runtime: tokio::runtime::Handle,
}

impl WorkerContext {
    /// A worker that has not started draining, with every outage flag clear.
    pub fn new(
        queue: Arc<dyn Queue>,
        outputs: Outputs,
        models: BTreeMap<String, Arc<ResolvedModel>>,
        config: WorkerConfig,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            queue,
            outputs: Arc::new(outputs),
            models: Arc::new(models),
            config,
            active: Default::default(),
            draining: Default::default(),
            abort: Default::default(),
            wake: Default::default(),
            store_outage: Default::default(),
            queue_outage: Default::default(),
            queue_reachable: AtomicBool::new(true),
            device_failure: Default::default(),
            device_fits: Default::default(),
            runtime,
        }
    }
}

/// The devices `auto` means: every CUDA GPU, or the CPU when there is none.
pub fn auto_devices() -> Vec<Device> {
    let gpus = tch::Cuda::device_count().max(0) as usize;
    if gpus == 0 { vec![Device::Cpu] } else { (0..gpus).map(Device::Cuda).collect() }
}
