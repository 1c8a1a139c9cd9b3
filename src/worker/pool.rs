//! The device pool: one OS thread per device, each loading and warming its models and then pulling
//! shards ([`device::run`]). Threads report on one channel: ready, or dead (a load error, or a panic
//! anywhere outside the per-batch guard). A dead device thread is fatal to the process: a worker that
//! can no longer sample must not stay up taking jobs.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tch::Device;

use super::WorkerContext;
use super::device;
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
    pub names: Vec<String>,
}

/// Starts one thread per device; `cpu_threads` is the intra-op thread count of a CPU device thread.
pub fn start(ctx: &Arc<WorkerContext>, devices: &[(Device, Option<i32>)]) -> std::io::Result<DevicePool> {
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let mut threads = Vec::with_capacity(devices.len());
    let mut names = Vec::with_capacity(devices.len());
    for (i, &(dev, cpu_threads)) in devices.iter().enumerate() {
        let (ctx, tx) = (Arc::clone(ctx), tx.clone());
        let name = format!("device-{i}-{}", device_name(dev));
        names.push(name.clone());
        let handle = std::thread::Builder::new().name(name.clone()).spawn(move || {
            let lived = std::panic::catch_unwind(AssertUnwindSafe(|| {
                if let Some(n) = cpu_threads {
                    tch::set_num_threads(n);
                }
                let models = device::DeviceModels::load(&ctx, dev)
                    .map_err(|e| format!("{name}: loading models: {e}"))?;
                let _ = tx.send(DeviceEvent::Ready(name.clone()));
                device::run(Arc::clone(&ctx), models, cpu_threads);
                Ok::<(), String>(())
            }));
            let died = match lived {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(panic) => format!("{name}: panicked: {}", device::panic_message(&panic)),
            };
            tracing::error!(error = died, "device thread died");
            let _ = tx.send(DeviceEvent::Died(died));
        })?;
        threads.push(handle);
    }
    Ok(DevicePool { threads, events, names })
}
