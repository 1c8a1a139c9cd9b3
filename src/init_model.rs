//! Random-weight diffusers model folders for demos and tests (`init-model`): the architecture of a real
//! checkpoint family with tch's default initialisers, plus the family's `scheduler_config.json`.

use std::path::Path;

use serde_json::json;

use crate::model::config::SampleSize;
use crate::model::{LoadedUNet, ModelError, UNet2DConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// `google/ddpm-cifar10-32`: 35.7 M parameters, 32×32.
    #[value(name = "cifar10-32")]
    Cifar10_32,
    /// The `google/ddpm-*-256` family (celebahq, church, bedroom, cat): 113.7 M parameters, 256×256.
    #[value(name = "ddpm-256")]
    Ddpm256,
    /// The same code paths at toy size: 2 levels, 32 channels, 16×16 (fast on a CPU).
    Tiny,
}

/// The DDPM-family settings shared by every preset (`config.json` of google/ddpm-cifar10-32).
fn ddpm_family(channels: &[i64], down: &[&str], up: &[&str], size: i64) -> UNet2DConfig {
    UNet2DConfig {
        sample_size: Some(SampleSize::Square(size)),
        block_out_channels: channels.to_vec(),
        down_block_types: down.iter().map(|s| s.to_string()).collect(),
        up_block_types: up.iter().map(|s| s.to_string()).collect(),
        layers_per_block: 2,
        attention_head_dim: None,
        norm_num_groups: Some(32),
        norm_eps: 1e-6,
        downsample_padding: 0,
        flip_sin_to_cos: false,
        freq_shift: 1.0,
        ..UNet2DConfig::default()
    }
}

impl Preset {
    pub fn unet_config(self) -> UNet2DConfig {
        match self {
            // huggingface.co/google/ddpm-cifar10-32 config.json
            Preset::Cifar10_32 => ddpm_family(
                &[128, 256, 256, 256],
                &["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                &["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
                32,
            ),
            // huggingface.co/google/ddpm-ema-church-256 config.json (same for celebahq, bedroom, cat)
            Preset::Ddpm256 => ddpm_family(
                &[128, 128, 256, 256, 512, 512],
                &[
                    "DownBlock2D",
                    "DownBlock2D",
                    "DownBlock2D",
                    "DownBlock2D",
                    "AttnDownBlock2D",
                    "DownBlock2D",
                ],
                &["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
                256,
            ),
            Preset::Tiny => UNet2DConfig {
                layers_per_block: 1,
                norm_num_groups: Some(8),
                ..ddpm_family(
                    &[32, 64],
                    &["DownBlock2D", "AttnDownBlock2D"],
                    &["AttnUpBlock2D", "UpBlock2D"],
                    16,
                )
            },
        }
    }

    /// The scheduler file of the family (cifar10 trains with σ² = β_t, the 256 models with β̃_t).
    pub fn scheduler_config(self) -> serde_json::Value {
        let variance = if self == Preset::Cifar10_32 { "fixed_large" } else { "fixed_small" };
        json!({
            "_class_name": "DDPMScheduler",
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "clip_sample": true,
            "num_train_timesteps": 1000,
            "trained_betas": null,
            "variance_type": variance,
        })
    }
}

/// Writes `config.json`, `diffusion_pytorch_model.safetensors` and `scheduler_config.json` into `out`;
/// `grayscale` makes a one-channel model of the preset's architecture.
pub fn write_model(preset: Preset, grayscale: bool, out: &Path, seed: i64) -> Result<LoadedUNet, ModelError> {
    let mut config = preset.unet_config();
    if grayscale {
        (config.in_channels, config.out_channels) = (1, 1);
    }
    let unet = LoadedUNet::random(config, seed)?;
    unet.save(out)?;
    let path = out.join("scheduler_config.json");
    let text = serde_json::to_string_pretty(&preset.scheduler_config()).unwrap_or_default();
    std::fs::write(&path, text).map_err(|e| ModelError::Io { path, message: e.to_string() })?;
    Ok(unet)
}
