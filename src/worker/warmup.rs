//! A device's models, loaded and warmed before it takes work: one forward each (allocator and kernel
//! warm-up), and on CUDA the largest batch that fits in its memory. Also how a device is found to be
//! unusable after a failed batch.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;

use tch::Device;

use super::WorkerContext;
use crate::model::{LoadedUNet, ModelError};
use crate::placement::device_name;

/// A device thread's models, loaded and warmed.
pub struct DeviceModels {
    pub device: Device,
    pub unets: BTreeMap<String, LoadedUNet>,
    /// CUDA: the largest batch of each model whose forward fits in the device's memory (the API's limit
    /// when it fits, else the largest power of two below it that does), found at warm-up.
    pub max_batch: BTreeMap<String, usize>,
}

/// The largest batch size `b ≤ limit` for which `fits(b)`, trying `limit` first and then powers of two
/// downwards; `None` when not even 1 fits. `fits` errors other than running out of memory stop the
/// search.
pub fn largest_fitting<E>(
    limit: usize,
    mut fits: impl FnMut(usize) -> Result<bool, E>,
) -> Result<Option<usize>, E> {
    let mut b = limit.max(1);
    loop {
        if fits(b)? {
            return Ok(Some(b));
        }
        if b == 1 {
            return Ok(None);
        }
        // The largest power of two below b.
        b = 1 << (usize::BITS - 1 - (b - 1).leading_zeros());
    }
}

thread_local! {
    /// Set while a probe expects libtorch's out-of-memory panics, which are then not printed.
    static PROBING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Wraps the panic hook (once) so that panics of a probing thread are not printed; every other panic
/// goes to the hook as before.
fn quiet_probe_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !PROBING.with(std::cell::Cell::get) {
                previous(info)
            }
        }));
    });
}

/// Whether a forward of `batch` rows runs on the UNet's device: `Ok(false)` when it ran out of memory.
fn forward_fits(unet: &LoadedUNet, kind: tch::Kind, batch: usize) -> Result<bool, ModelError> {
    let device = unet.vs.device();
    let (h, w) = unet.config.sample_hw()?;
    quiet_probe_panics();
    PROBING.with(|p| p.set(true));
    let run = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<(), tch::TchError> {
        let x = tch::Tensor::f_zeros([batch as i64, unet.config.in_channels, h, w], (kind, device))?;
        // Waiting for the result's copy to the host waits for this thread's stream only: a device-wide
        // synchronisation would touch the streams of other threads, which may be capturing a graph.
        let _ = unet.forward(&x, 0).f_sum(tch::Kind::Float)?.f_to_device(Device::Cpu)?;
        Ok(())
    }));
    PROBING.with(|p| p.set(false));
    let message = match run {
        Ok(Ok(())) => return Ok(true),
        Ok(Err(e)) => e.to_string(),
        Err(panic) => panic_message(&panic),
    };
    if message.contains("out of memory") {
        Ok(false)
    } else {
        Err(ModelError::Torch(tch::TchError::Torch(message)))
    }
}

impl DeviceModels {
    /// Loads every model on `device` and runs one forward pass each, so the first shard does not pay
    /// for allocator and kernel warm-up. It runs inside the device thread's `catch_unwind`
    /// ([`super::pool`]): a libtorch panic here (out of memory, a kernel error) loses the device, and
    /// the worker is no longer live.
    pub fn load(ctx: &WorkerContext, device: Device) -> Result<Self, ModelError> {
        let mut unets = BTreeMap::new();
        let mut max_batch = BTreeMap::new();
        let _guard = tch::no_grad_guard();
        for (name, model) in ctx.models.iter() {
            let graphs = ctx.config.cuda_graphs && device.is_cuda();
            let unet = LoadedUNet::prepare(
                &model.files,
                device,
                ctx.config.dtype.kind(),
                ctx.config.layout,
                graphs,
            )?;
            let (h, w) = unet.config.sample_hw()?;
            // Threads sharing a GPU warm up and probe one at a time, or each would see the other's
            // memory in use and settle on a smaller batch.
            let _first = crate::model::graphs::first_call_lock(device);
            let x =
                tch::Tensor::f_zeros([1, unet.config.in_channels, h, w], (ctx.config.dtype.kind(), device))?;
            let _ = unet.forward(&x, 0);
            if super::fault::injected("warmup-panic") {
                panic!("injected fault: warm-up of {name} on {}", device_name(device));
            }
            if device.is_cuda() {
                // Found here, not by a job failing half-way: the API's largest batch, or what fits.
                let limit = ctx.config.max_batch_size;
                let fits = largest_fitting(limit, |b| forward_fits(&unet, ctx.config.dtype.kind(), b))?;
                let Some(fits) = fits else {
                    return Err(ModelError::Unsupported(format!(
                        "{name} does not fit in {}'s memory even at batch size 1",
                        device_name(device)
                    )));
                };
                if fits < limit {
                    tracing::warn!(
                        model = name,
                        device = device_name(device),
                        max_batch_size = fits,
                        api_limit = limit,
                        "jobs of this model with a larger batch size will be refused by this device"
                    );
                }
                metrics::gauge!("ddpm_device_max_batch_size", "device" => device_name(device), "model" => name.clone())
                    .set(fits as f64);
                max_batch.insert(name.clone(), fits);
            }
            unets.insert(name.clone(), unet);
        }
        Ok(Self { device, unets, max_batch })
    }
}

/// Whether `device` still computes: a tiny kernel and a copy back. A CUDA context poisoned by an
/// illegal access or a device-side assert fails every later call, this one included.
pub fn device_usable(device: tch::Device) -> Result<(), String> {
    if super::fault::injected("device-lost") {
        return Err("injected fault: CUDA error: an illegal memory access was encountered".into());
    }
    std::panic::catch_unwind(|| -> Result<(), tch::TchError> {
        let x = tch::Tensor::f_ones([16], (tch::Kind::Float, device))?;
        // The copy to the host waits for this thread's stream (not the whole device: another thread's
        // stream may be capturing a graph) and fails if the context is poisoned.
        let sum = x.f_sum(tch::Kind::Float)?.f_to_device(tch::Device::Cpu)?.f_double_value(&[])?;
        if sum == 16.0 { Ok(()) } else { Err(tch::TchError::Torch(format!("1 × 16 summed to {sum}"))) }
    })
    .map_err(|panic| panic_message(&panic))?
    .map_err(|e| e.to_string())
}

pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic in the sampler".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_fitting_batch_is_the_limit_or_a_power_of_two() {
        let search = |limit, max_fit: usize| {
            let mut tried = Vec::new();
            let found = largest_fitting(limit, |b| {
                tried.push(b);
                Ok::<_, ()>(b <= max_fit)
            });
            (found.unwrap(), tried)
        };
        assert_eq!(search(512, 1000), (Some(512), vec![512]));
        assert_eq!(search(512, 100), (Some(64), vec![512, 256, 128, 64]));
        assert_eq!(search(100, 70), (Some(64), vec![100, 64]));
        assert_eq!(search(100, 0), (None, vec![100, 64, 32, 16, 8, 4, 2, 1]));
        assert_eq!(search(1, 1), (Some(1), vec![1]));
        assert_eq!(largest_fitting(8, |b| if b == 4 { Err("kernel") } else { Ok(false) }), Err("kernel"));
    }
}
