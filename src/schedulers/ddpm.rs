//! DDPM ancestral sampling (Ho, Jain, Abbeel 2020, Algorithm 2; eqs. 6–7 for the posterior q(x_{t-1}|x_t, x_0)),
//! as `DDPMScheduler` in diffusers `src/diffusers/schedulers/scheduling_ddpm.py` with fewer steps than
//! training ("skip" posterior with β'_t = 1 − ᾱ_t/ᾱ_prev, PR #3006).

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{
    BetaConfig, PredictionType, Scheduler, SchedulerError, TimestepSpacing, check_common, predict_x0,
    spaced_timesteps, torch_f32,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// σ² = β̃_t, the posterior variance (Ho et al. eq. 7).
    FixedSmall,
    FixedSmallLog,
    /// σ² = β_t.
    FixedLarge,
    FixedLargeLog,
    Learned,
    LearnedRange,
}

/// `DDPMScheduler.__init__` arguments and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DdpmConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    pub variance_type: VarianceType,
    pub clip_sample: bool,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub clip_sample_range: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::default(),
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            clip_sample_range: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdpmConfig {
    pub(super) fn validate(&self) -> Result<(), SchedulerError> {
        check_common(self.thresholding, self.prediction_type)?;
        if matches!(
            self.variance_type,
            VarianceType::Learned | VarianceType::LearnedRange | VarianceType::FixedLargeLog
        ) {
            // learned*: the model would predict its variance (6 output channels); fixed_large_log is
            // broken upstream (sqrt of a log, diffusers issue #14569).
            return Err(SchedulerError::Unsupported(format!("variance_type {:?}", self.variance_type)));
        }
        Ok(())
    }
}

pub struct DdpmScheduler {
    config: DdpmConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<i64>,
}

impl DdpmScheduler {
    pub fn new(config: &DdpmConfig, steps: usize) -> Result<Self, SchedulerError> {
        let alphas_cumprod = config.betas.alphas_cumprod(config.rescale_betas_zero_snr)?;
        let timesteps = spaced_timesteps(
            config.timestep_spacing,
            config.betas.num_train_timesteps,
            steps,
            config.steps_offset,
        )?;
        Ok(Self { config: config.clone(), alphas_cumprod, timesteps })
    }
}

impl Scheduler for DdpmScheduler {
    fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    fn needs_noise(&self, i: usize) -> bool {
        self.timesteps[i] > 0
    }

    fn step(&mut self, i: usize, model_output: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> Tensor {
        let t = self.timesteps[i] as usize;
        // `previous_timestep`: the next entry of the schedule, or −1 after the last.
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev = match self.timesteps.get(i + 1) {
            Some(&prev) => self.alphas_cumprod[prev as usize],
            None => 1.0,
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;

        // 1. x̂_0 (eq. 15), clipped to the data range.
        let mut x0 = predict_x0(self.config.prediction_type, model_output, sample, alpha_prod_t);
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r);
        }

        // 2. Posterior mean μ̃_t(x_t, x̂_0), eq. 7.
        let x0_coeff = (torch_f32::sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t;
        let xt_coeff = torch_f32::sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t;
        let mean = x0 * f64::from(x0_coeff) + sample * f64::from(xt_coeff);

        // 3. Add σ_t z for t > 0.
        match noise {
            Some(z) if t > 0 => {
                let small = ((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t).max(1e-20);
                let std = match self.config.variance_type {
                    VarianceType::FixedSmall => torch_f32::sqrt(small),
                    // diffusers: exp(0.5 * log(var)) multiplies the noise directly.
                    VarianceType::FixedSmallLog => torch_f32::exp(0.5 * torch_f32::ln(small)),
                    _ => torch_f32::sqrt(current_beta_t),
                };
                mean + z * f64::from(std)
            }
            _ => mean,
        }
    }
}
