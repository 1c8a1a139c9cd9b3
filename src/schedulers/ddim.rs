//! DDIM (Song, Meng, Ermon 2021, eq. 12; σ_t(η) from eq. 16), as `DDIMScheduler` in diffusers
//! `src/diffusers/schedulers/scheduling_ddim.py`. η = 0 is the deterministic sampler, η = 1 matches
//! DDPM's posterior variance.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{
    BetaConfig, PredictionType, Scheduler, SchedulerError, TimestepSpacing, check_common, predict_x0,
    spaced_timesteps, torch_f32,
};

/// `DDIMScheduler.__init__` arguments and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdimConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub clip_sample_range: f64,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::default(),
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimConfig {
    pub(super) fn validate(&self) -> Result<(), SchedulerError> {
        check_common(self.thresholding, self.prediction_type)
    }
}

pub struct DdimScheduler {
    config: DdimConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    /// `T // N`: diffusers steps back by this stride whatever the spacing (issues #12633, #11347).
    stride: i64,
    eta: f32,
}

impl DdimScheduler {
    pub fn new(config: &DdimConfig, steps: usize, eta: f32) -> Result<Self, SchedulerError> {
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(SchedulerError::Config(format!("eta = {eta} must be a finite number ≥ 0")));
        }
        let alphas_cumprod = config.betas.alphas_cumprod(config.rescale_betas_zero_snr)?;
        let timesteps = spaced_timesteps(
            config.timestep_spacing,
            config.betas.num_train_timesteps,
            steps,
            config.steps_offset,
        )?;
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let stride = (config.betas.num_train_timesteps / steps) as i64;
        Ok(Self { config: config.clone(), alphas_cumprod, final_alpha_cumprod, timesteps, stride, eta })
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    fn needs_noise(&self, _i: usize) -> bool {
        self.eta > 0.0
    }

    fn step(&mut self, i: usize, model_output: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> Tensor {
        let t = self.timesteps[i];
        let prev = t - self.stride;
        let alpha_prod_t = self.alphas_cumprod[t as usize];
        let alpha_prod_t_prev =
            if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.final_alpha_cumprod };
        let beta_prod_t = 1.0 - alpha_prod_t;

        // 1. x̂_0 ("predicted x_0" of eq. 12) and ε̂.
        let x0 = predict_x0(self.config.prediction_type, model_output, sample, alpha_prod_t);
        let eps = match self.config.prediction_type {
            PredictionType::Epsilon => model_output.shallow_clone(),
            PredictionType::Sample => {
                (sample - &x0 * f64::from(torch_f32::sqrt(alpha_prod_t)))
                    / f64::from(torch_f32::sqrt(beta_prod_t))
            }
            _ => {
                model_output * f64::from(torch_f32::sqrt(alpha_prod_t))
                    + sample * f64::from(torch_f32::sqrt(beta_prod_t))
            }
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0.clamp(-r, r)
        } else {
            x0
        };

        // 2. σ_t(η), eq. 16.
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta * torch_f32::sqrt(variance);

        // 3. x_{t-1} = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z. The radicand is ≥ 0 in exact arithmetic
        //    but can round below zero in f32 at η = 1; diffusers would produce NaN there.
        let direction_coeff = torch_f32::sqrt((1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).max(0.0));
        let direction = eps * f64::from(direction_coeff);
        let prev_sample = x0 * f64::from(torch_f32::sqrt(alpha_prod_t_prev)) + direction;
        match noise {
            Some(z) if self.eta > 0.0 => prev_sample + z * f64::from(std_dev_t),
            _ => prev_sample,
        }
    }
}
