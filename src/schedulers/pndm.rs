//! Pseudo numerical methods for diffusion models (Liu, Ren, Lin, Zhao 2022): a Runge-Kutta warm-up
//! (PRK, eq. 13) then the linear multistep PLMS update (eq. 12), with the transfer function φ of eq. 11.
//! Port of `PNDMScheduler`, diffusers `src/diffusers/schedulers/scheduling_pndm.py`.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{
    BetaConfig, PredictionType, Scheduler, SchedulerError, TimestepSpacing, check_common, check_in_range,
    np_arange, np_linspace, torch_f32,
};

/// `PNDMScheduler.__init__` arguments and defaults (no clipping: `clip_sample` is not one of them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PndmConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    pub skip_prk_steps: bool,
    pub set_alpha_to_one: bool,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl Default for PndmConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::default(),
            skip_prk_steps: false,
            set_alpha_to_one: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
        }
    }
}

impl PndmConfig {
    pub(super) fn validate(&self) -> Result<(), SchedulerError> {
        check_common(false, self.prediction_type)?;
        if self.prediction_type == PredictionType::Sample {
            return Err(SchedulerError::Unsupported("prediction_type = sample with PNDM".into()));
        }
        Ok(())
    }
}

pub struct PndmScheduler {
    config: PndmConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// `T // N`.
    stride: i64,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<i64>,
    // Multistep state (`counter`, `ets`, `cur_sample`, `cur_model_output` in diffusers).
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    cur_model_output: Option<Tensor>,
}

impl PndmScheduler {
    pub fn new(config: &PndmConfig, steps: usize) -> Result<Self, SchedulerError> {
        let train = config.betas.num_train_timesteps;
        if steps == 0 || steps > train {
            return Err(SchedulerError::Steps { steps, max: train });
        }
        // PRK needs the four smallest timesteps; PLMS its first three outputs.
        if steps < 4 && !config.skip_prk_steps {
            return Err(SchedulerError::Config(format!(
                "PNDM with its Runge-Kutta warm-up needs at least 4 steps, got {steps}"
            )));
        }
        let alphas_cumprod = config.betas.alphas_cumprod(false)?;
        let t = train as i64;
        // `_timesteps`, ascending.
        let base: Vec<i64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, steps)
                .into_iter()
                .map(|x| x.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = t / steps as i64;
                (0..steps as i64).map(|i| i * ratio + config.steps_offset).collect()
            }
            TimestepSpacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / steps as f64))
                .into_iter()
                .rev()
                .map(|x| x.round_ties_even() as i64 - 1)
                .collect(),
        };
        let stride = t / steps as i64;
        let (prk_timesteps, plms_timesteps): (Vec<i64>, Vec<i64>) = if config.skip_prk_steps {
            // `concat([_timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:]])[::-1]`.
            let n = base.len();
            let mut v: Vec<i64> = base[..n - 1].to_vec();
            if n >= 2 {
                v.push(base[n - 2]);
            }
            v.push(base[n - 1]);
            v.reverse();
            (Vec::new(), v)
        } else {
            // The four largest timesteps, each paired with t + T//N//2, then `[:-1].repeat(2)[1:-1][::-1]`.
            let half = stride / 2;
            let last4 = &base[base.len() - 4..];
            let paired: Vec<i64> = last4.iter().flat_map(|&x| [x, x + half]).collect();
            let repeated: Vec<i64> = paired[..paired.len() - 1].iter().flat_map(|&x| [x, x]).collect();
            let mut prk = repeated[1..repeated.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..base.len() - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let timesteps: Vec<i64> = prk_timesteps.iter().chain(&plms_timesteps).copied().collect();
        check_in_range(&timesteps, train)?;
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(Self {
            config: config.clone(),
            alphas_cumprod,
            final_alpha_cumprod,
            stride,
            prk_timesteps,
            timesteps,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    /// φ(x_t, ε, t, t_prev) of eq. 11 (`_get_prev_sample`).
    fn prev_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> Tensor {
        let alpha_prod_t = self.alphas_cumprod[timestep as usize];
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            self.alphas_cumprod[prev_timestep as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let model_output = if self.config.prediction_type == PredictionType::VPrediction {
            model_output * f64::from(torch_f32::sqrt(alpha_prod_t))
                + sample * f64::from(torch_f32::sqrt(beta_prod_t))
        } else {
            model_output.shallow_clone()
        };
        let sample_coeff = torch_f32::sqrt(alpha_prod_t_prev / alpha_prod_t);
        let denom = alpha_prod_t * torch_f32::sqrt(beta_prod_t_prev)
            + torch_f32::sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev);
        sample * f64::from(sample_coeff)
            - model_output * f64::from(alpha_prod_t_prev - alpha_prod_t) / f64::from(denom)
    }

    fn step_prk(&mut self, timestep: i64, model_output: &Tensor, sample: &Tensor) -> Tensor {
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { self.stride / 2 };
        let prev_timestep = timestep - diff_to_prev;
        let timestep = self.prk_timesteps[self.counter / 4 * 4];
        let mut model_output = model_output.shallow_clone();
        match self.counter % 4 {
            0 => {
                self.cur_model_output =
                    Some(accumulate(self.cur_model_output.take(), &model_output, 1.0 / 6.0));
                self.ets.push(model_output.shallow_clone());
                self.cur_sample = Some(sample.shallow_clone());
            }
            1 | 2 => {
                self.cur_model_output =
                    Some(accumulate(self.cur_model_output.take(), &model_output, 1.0 / 3.0));
            }
            _ => {
                model_output = accumulate(self.cur_model_output.take(), &model_output, 1.0 / 6.0);
            }
        }
        let cur_sample =
            self.cur_sample.as_ref().map_or_else(|| sample.shallow_clone(), Tensor::shallow_clone);
        let prev = self.prev_sample(&cur_sample, timestep, prev_timestep, &model_output);
        self.counter += 1;
        prev
    }

    fn step_plms(&mut self, timestep: i64, model_output: &Tensor, sample: &Tensor) -> Tensor {
        let mut timestep = timestep;
        let mut prev_timestep = timestep - self.stride;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.shallow_clone());
        } else {
            prev_timestep = timestep;
            timestep += self.stride;
        }
        let mut sample = sample.shallow_clone();
        let e = &self.ets;
        let n = e.len();
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.shallow_clone());
            model_output.shallow_clone()
        } else if n == 1 && self.counter == 1 {
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            (model_output + &e[n - 1]) / 2.0
        } else if n == 2 {
            (&e[n - 1] * 3.0 - &e[n - 2]) / 2.0
        } else if n == 3 {
            (&e[n - 1] * 23.0 - &e[n - 2] * 16.0 + &e[n - 3] * 5.0) / 12.0
        } else {
            (&e[n - 1] * 55.0 - &e[n - 2] * 59.0 + &e[n - 3] * 37.0 - &e[n - 4] * 9.0) * (1.0 / 24.0)
        };
        let prev = self.prev_sample(&sample, timestep, prev_timestep, &model_output);
        self.counter += 1;
        prev
    }
}

/// `cur += c * x` where `cur` starts as the integer 0 of diffusers (`0 + t` is `t` exactly).
fn accumulate(cur: Option<Tensor>, x: &Tensor, c: f64) -> Tensor {
    let term = x * c;
    match cur {
        Some(cur) => cur + term,
        None => term,
    }
}

impl Scheduler for PndmScheduler {
    fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    fn needs_noise(&self, _i: usize) -> bool {
        false
    }

    fn step(&mut self, i: usize, model_output: &Tensor, sample: &Tensor, _noise: Option<&Tensor>) -> Tensor {
        let timestep = self.timesteps[i];
        if self.counter < self.prk_timesteps.len() && !self.config.skip_prk_steps {
            self.step_prk(timestep, model_output, sample)
        } else {
            self.step_plms(timestep, model_output, sample)
        }
    }
}
