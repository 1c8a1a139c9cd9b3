//! UNet forward timing for `bench/` (the hidden `bench-unet` command): the same model, batch and
//! timesteps as the Python side times, on a warmed-up model.

use std::path::Path;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::model::{Layout, LoadedUNet, ModelError, ModelFiles};

#[derive(Debug, Clone, serde::Serialize)]
pub struct UNetTiming {
    pub batch_size: usize,
    pub iterations: usize,
    pub mean_ms: f64,
    pub min_ms: f64,
}

/// Mean and best wall time of `iterations` forwards at timesteps 500, 499, … after `warmup` calls.
pub fn time_unet(
    model: &Path,
    batch_size: usize,
    iterations: usize,
    warmup: usize,
    device: Device,
    kind: Kind,
    layout: Layout,
) -> Result<UNetTiming, ModelError> {
    let files = ModelFiles::locate(model)?;
    let mut unet = LoadedUNet::load(&files, device, kind)?;
    unet.set_layout(layout);
    let (h, w) = unet.config.sample_hw()?;
    let _guard = tch::no_grad_guard();
    let x = Tensor::randn([batch_size as i64, unet.config.in_channels, h, w], (kind, device));
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for i in 0..warmup {
        let _ = unet.forward(&x, 500 - i as i64);
    }
    sync();
    let mut times = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let start = Instant::now();
        let _ = unet.forward(&x, 500 - i as i64);
        sync();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let mean_ms = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let min_ms = times.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(UNetTiming { batch_size, iterations, mean_ms, min_ms })
}
