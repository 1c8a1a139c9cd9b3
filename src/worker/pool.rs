//! The device pool: per device, one OS thread that loads and warms its models and then runs the device
//! loop ([`device::run`]), fed by its batcher task ([`batcher::run`]). Threads report on one channel: ready, or dead (a load error, a panic
//! anywhere outside the per-batch guard, or a device that stopped computing, as a poisoned CUDA
//! context does). [`supervise`] turns the reports and the worker's state into readiness (SERVING while
//! every device is warm, the queue answers and no drain has begun) and liveness (SERVING until a device
//! thread dies), each published on a `watch`. A worker that lost a device is not live: its orchestrator
//! restarts it (SIGTERM, a drain of the other devices, exit 1), and it refuses new jobs meanwhile.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tch::Device;

use super::WorkerContext;
use super::batcher::{self, DeviceSlot};
use super::device::{self, Demand, Lane};
use super::warmup::{DeviceModels, panic_message};
use crate::placement::device_name;

/// What a device thread reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// Its models are loaded and warm; it takes shards from now on.
    Ready(String),
    /// It cannot work: why (it has ended).
    Died(String),
}

/// The running device threads and their reports.
pub struct DevicePool {
    pub threads: Vec<std::thread::JoinHandle<()>>,
    pub events: tokio::sync::mpsc::UnboundedReceiver<DeviceEvent>,
}

/// A device thread to start: its device, and on the CPU its intra-op thread count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceThread {
    pub device: Device,
    /// Intra-op threads of a CPU device thread (libtorch's default when `None`).
    pub cpu_threads: Option<i32>,
}

/// Starts the device threads.
pub fn start(ctx: &Arc<WorkerContext>, devices: &[DeviceThread]) -> std::io::Result<DevicePool> {
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let mut threads = Vec::with_capacity(devices.len());
    for (i, &DeviceThread { device: dev, cpu_threads }) in devices.iter().enumerate() {
        let (ctx, tx) = (Arc::clone(ctx), tx.clone());
        let name = format!("device-{i}-{}", device_name(dev));
        let handle = std::thread::Builder::new().name(name.clone()).spawn(move || {
            let lived = std::panic::catch_unwind(AssertUnwindSafe(|| {
                if let Some(n) = cpu_threads {
                    tch::set_num_threads(n);
                }
                // Device threads sharing a GPU overlap on streams of their own.
                crate::cuda::use_own_stream(dev).map_err(|e| format!("{name}: {e}"))?;
                let models =
                    DeviceModels::load(&ctx, dev).map_err(|e| format!("{name}: loading models: {e}"))?;
                let _ = tx.send(DeviceEvent::Ready(name.clone()));
                run_device(&ctx, &models)
            }));
            let died = match lived {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(panic) => format!("{name}: panicked: {}", panic_message(&panic)),
            };
            tracing::error!(error = died, "device thread died");
            let _ = tx.send(DeviceEvent::Died(died));
        })?;
        threads.push(handle);
    }
    Ok(DevicePool { threads, events })
}

/// Runs a device's batcher on the runtime and its device loop on this thread until the worker drains
/// (`Ok`) or the device stops computing (`Err`); returns once the batcher and its shards' output stages
/// are through.
fn run_device(ctx: &Arc<WorkerContext>, models: &DeviceModels) -> Result<(), String> {
    let name = device_name(models.device);
    let demand = Arc::new(Demand::default());
    let fits: BTreeMap<String, Option<usize>> =
        models.unets.keys().map(|m| (m.clone(), models.max_batch.get(m).copied())).collect();
    if let Ok(mut known) = ctx.device_fits.lock() {
        known.insert(name.clone(), fits.clone());
    }
    let slot = DeviceSlot {
        name: name.clone(),
        models: fits,
        demand: Arc::clone(&demand),
        ran_on: super::finisher::RanOn {
            device: name.clone(),
            cuda_graphs: ctx.config.cuda_graphs && models.device.is_cuda(),
            cudnn_benchmark: crate::model::cudnn_benchmark_applies(models.device, ctx.config.layout),
        },
    };
    // One batch waits while one samples; the batcher builds the next as soon as the device takes one.
    let (batches, ready) = tokio::sync::mpsc::channel(1);
    let batcher = ctx.runtime.spawn(batcher::run(Arc::clone(ctx), slot, batches));
    let lane = Lane {
        name: &name,
        unets: models.unets.iter().map(|(name, unet)| (name.as_str(), unet)).collect(),
        place: crate::sampler::Placement { device: models.device, kind: ctx.config.dtype.kind() },
        abort: &ctx.abort,
        on_step: &|| {},
        demand: Some(&demand),
    };
    let ran = device::run(&lane, ready, |_| {});
    let _ = ctx.runtime.block_on(batcher);
    ran.map_err(|lost| format!("{name}: the device is unusable: {lost}"))
}

/// How often readiness is recomputed from the worker's state (the queue's reachability and the drain
/// flag change without an event).
const READINESS_TICK: Duration = Duration::from_millis(250);

/// Follows the device threads' reports and publishes readiness on `ready` and liveness on `live`,
/// until a drain has ended every thread. A death is recorded in `ctx.device_failure`.
pub async fn supervise(
    ctx: Arc<WorkerContext>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<DeviceEvent>,
    devices: usize,
    ready: tokio::sync::watch::Sender<bool>,
    live: tokio::sync::watch::Sender<bool>,
) {
    let mut warm = 0;
    let mut open = true;
    let mut tick = tokio::time::interval(READINESS_TICK);
    loop {
        tokio::select! {
            event = events.recv(), if open => match event {
                Some(DeviceEvent::Ready(name)) => {
                    warm += 1;
                    tracing::info!(device = name, "models loaded and warm");
                }
                Some(DeviceEvent::Died(e)) => {
                    tracing::error!(error = e, "a device is lost: this worker is no longer live");
                    metrics::counter!("ddpm_device_failures_total").increment(1);
                    let _ = ctx.device_failure.set(e);
                    live.send_if_modified(|was| std::mem::replace(was, false));
                }
                None => open = false,
            },
            _ = tick.tick() => {}
        }
        let draining = ctx.draining.load(Ordering::Relaxed);
        let now = warm == devices
            && !draining
            && ctx.device_failure.get().is_none()
            && ctx.queue_reachable.load(Ordering::Relaxed);
        ready.send_if_modified(|was| std::mem::replace(was, now) != now);
        if draining {
            // Device threads end one by one while draining; that is no death.
            while let Some(event) = events.recv().await {
                if let DeviceEvent::Died(e) = event {
                    tracing::warn!(error = e, "device thread failed while draining");
                }
            }
            return;
        }
    }
}
