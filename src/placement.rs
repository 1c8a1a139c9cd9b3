//! Where and in what precision a UNet runs: devices by name (`cpu`, `cuda`, `cuda:N`) and the UNet's
//! dtype (the scheduler always works in f32).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::model::Layout;

/// Precision of the UNet; the scheduler always runs in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Fp32,
    Fp16,
    Bf16,
}

impl DType {
    pub fn kind(self) -> Kind {
        match self {
            DType::Fp32 => Kind::Float,
            DType::Fp16 => Kind::Half,
            DType::Bf16 => Kind::BFloat16,
        }
    }
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|i| i.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device {s:?}; expected cpu, cuda or cuda:N")),
    }
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// Where and how a UNet runs: the flags that `generate` and the benchmarks share.
#[derive(Debug, Clone, clap::Args)]
pub struct PlacementArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// UNet precision: fp16 on CUDA only; bf16 also on CPUs (fast with AVX512-BF16 or AMX). The
    /// scheduler always runs in f32.
    #[arg(long, value_enum, default_value = "fp32")]
    pub dtype: DType,
    /// UNet memory layout: `diffusers` reproduces diffusers bit for bit; `channels-last` is faster on
    /// CPUs and GPUs and agrees with diffusers to ~1e-5.
    #[arg(long, value_enum, default_value = "diffusers")]
    layout: LayoutArg,
    /// Replay the UNet from a CUDA graph captured once per batch shape (CUDA only).
    #[arg(long)]
    pub cuda_graphs: bool,
    /// Let cuDNN time its kernels and keep the fastest (CUDA, channels-last): faster, but the picks,
    /// and so the images' last bits, can differ from one process or GPU to the next.
    #[arg(long)]
    pub cudnn_benchmark: bool,
}

/// `--layout`'s values (the layouts' own docs are longer than a flag's help wants).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LayoutArg {
    Diffusers,
    ChannelsLast,
}

impl PlacementArgs {
    /// `--layout`, or channels-last for `--fast`.
    pub fn layout(&self, fast: bool) -> Layout {
        match (fast, self.layout) {
            (true, _) | (false, LayoutArg::ChannelsLast) => Layout::ChannelsLast,
            (false, LayoutArg::Diffusers) => Layout::Diffusers,
        }
    }

    /// `lanes`, or one per physical core for `--fast` on the CPU.
    pub fn lanes(&self, fast: bool, lanes: usize) -> usize {
        if fast && !self.device.is_cuda() {
            // libtorch's default intra-op thread count: one per physical core.
            tch::get_num_threads().max(1) as usize
        } else {
            lanes
        }
    }
}
