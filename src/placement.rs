//! Where and in what precision a UNet runs: devices by name (`cpu`, `cuda`, `cuda:N`) and the UNet's
//! dtype (the scheduler always works in f32).

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

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
