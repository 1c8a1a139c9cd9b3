//! DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2, data prediction, multistep second
//! order, first order at the last step), as `DPMSolverMultistepScheduler` with its defaults in diffusers
//! `src/diffusers/schedulers/scheduling_dpmsolver_multistep.py`. Good samples in ~20 steps.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{
    BetaConfig, PredictionType, Scheduler, SchedulerError, TimestepSpacing, check_common, check_in_range,
    np_arange, np_linspace, torch_f32,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlgorithmType {
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    Midpoint,
    Heun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    Zero,
    SigmaMin,
}

/// The `DPMSolverMultistepScheduler.__init__` arguments this port honours, with their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DpmSolverConfig {
    #[serde(flatten)]
    pub betas: BetaConfig,
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub algorithm_type: AlgorithmType,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    pub final_sigmas_type: FinalSigmasType,
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DpmSolverConfig {
    fn default() -> Self {
        Self {
            betas: BetaConfig::default(),
            solver_order: 2,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            final_sigmas_type: FinalSigmasType::Zero,
            // diffusers' default is -inf, which JSON cannot hold; `None` stands for it.
            lambda_min_clipped: None,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DpmSolverConfig {
    pub(super) fn validate(&self) -> Result<(), SchedulerError> {
        check_common(self.thresholding, self.prediction_type)?;
        let unsupported = |what: &str| Err(SchedulerError::Unsupported(what.to_string()));
        if !matches!(self.solver_order, 1 | 2) {
            return unsupported("solver_order other than 1 or 2");
        }
        if self.algorithm_type != AlgorithmType::DpmSolverPlusPlus {
            return unsupported("algorithm_type other than dpmsolver++");
        }
        if self.use_karras_sigmas
            || self.use_exponential_sigmas
            || self.use_beta_sigmas
            || self.use_lu_lambdas
            || self.use_flow_sigmas
        {
            return unsupported("non-default sigma schedules (use_*_sigmas, use_lu_lambdas)");
        }
        if self.lambda_min_clipped.is_some_and(|l| l.is_finite()) {
            return unsupported("lambda_min_clipped");
        }
        // A DDPM file's `variance_type` ("fixed_small", …) carries over through from_config and is inert;
        // only a learned variance changes the model output's meaning.
        if self.variance_type.as_deref().is_some_and(|v| v.starts_with("learned")) {
            return unsupported("variance_type learned/learned_range");
        }
        if self.rescale_betas_zero_snr {
            return unsupported("rescale_betas_zero_snr with DPM-Solver");
        }
        Ok(())
    }
}

pub struct DpmSolverScheduler {
    config: DpmSolverConfig,
    /// σ_i = √((1 − ᾱ)/ᾱ) at each timestep, then the final σ (0 or σ_min); f32 as diffusers stores them.
    sigmas: Vec<f32>,
    timesteps: Vec<i64>,
    /// Converted model outputs (x̂_0) of the previous steps, newest last.
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

impl DpmSolverScheduler {
    pub fn new(config: &DpmSolverConfig, steps: usize) -> Result<Self, SchedulerError> {
        let train = config.betas.num_train_timesteps;
        if steps == 0 || steps > train {
            return Err(SchedulerError::Steps { steps, max: train });
        }
        let ac = config.betas.alphas_cumprod(false)?;
        // lambda_min_clipped = -inf leaves the whole range: last_timestep = T.
        let last = train as i64;
        let timesteps: Vec<i64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => {
                let v = np_linspace(0.0, (last - 1) as f64, steps + 1);
                v.iter().rev().take(steps).map(|x| x.round_ties_even() as i64).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = last / (steps as i64 + 1);
                (1..=steps as i64).rev().map(|i| i * ratio + config.steps_offset).collect()
            }
            TimestepSpacing::Trailing => np_arange(last as f64, 0.0, -(train as f64 / steps as f64))
                .into_iter()
                .map(|x| x.round_ties_even() as i64 - 1)
                .collect(),
        };
        check_in_range(&timesteps, train)?;
        // `((1 - ᾱ) / ᾱ) ** 0.5` over the whole f32 table, by libtorch as in diffusers; `np.interp` at
        // integer timesteps returns the entries exactly.
        let ac_t = Tensor::from_slice(&ac);
        let one_minus: Tensor = 1.0 - &ac_t;
        let all_sigmas = Vec::<f32>::try_from((one_minus / &ac_t).pow_tensor_scalar(0.5))?;
        let mut sigmas: Vec<f32> = timesteps.iter().map(|&t| all_sigmas[t as usize]).collect();
        sigmas.push(match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => torch_f32::sqrt((1.0 - ac[0]) / ac[0]),
        });
        Ok(Self { config: config.clone(), sigmas, timesteps, model_outputs: Vec::new(), lower_order_nums: 0 })
    }
}

/// (α_t, σ_t) from σ = σ_t/α_t: α_t = 1/√(σ² + 1), σ_t = σ α_t.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / torch_f32::sqrt(sigma * sigma + 1.0);
    (alpha, sigma * alpha)
}

/// λ = log α − log σ, the half log-SNR.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    torch_f32::ln(alpha) - torch_f32::ln(sigma)
}

impl Scheduler for DpmSolverScheduler {
    fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    fn needs_noise(&self, _i: usize) -> bool {
        false
    }

    fn step(&mut self, i: usize, model_output: &Tensor, sample: &Tensor, _noise: Option<&Tensor>) -> Tensor {
        let n = self.timesteps.len();
        let c = &self.config;
        let lower_order_final = i == n - 1
            && (c.euler_at_final
                || (c.lower_order_final && n < 15)
                || c.final_sigmas_type == FinalSigmasType::Zero);

        // Data prediction x̂_0 (`convert_model_output`, dpmsolver++).
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let x0 = match c.prediction_type {
            PredictionType::Epsilon => (sample - model_output * f64::from(sigma_s0)) / f64::from(alpha_s0),
            PredictionType::Sample => model_output.shallow_clone(),
            _ => sample * f64::from(alpha_s0) - model_output * f64::from(sigma_s0),
        };
        if self.model_outputs.len() == c.solver_order {
            drop(self.model_outputs.remove(0));
        }
        self.model_outputs.push(x0);

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        // α_t (e^{-h} − 1), shared by both orders.
        let phi = alpha_t * (torch_f32::exp(-h) - 1.0);
        let m0 = &self.model_outputs[self.model_outputs.len() - 1];

        let prev = if c.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            // First order (DDIM-equivalent), eq. 5 with data prediction.
            sample * f64::from(sigma_t / sigma_s0) - m0 * f64::from(phi)
        } else {
            // Second order multistep (`multistep_dpm_solver_second_order_update`).
            let m1 = &self.model_outputs[self.model_outputs.len() - 2];
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
            let lambda_s1 = lambda(alpha_s1, sigma_s1);
            let h_0 = lambda_s0 - lambda_s1;
            let r0 = h_0 / h;
            let d1 = (m0 - m1) * f64::from(1.0 / r0);
            match c.solver_type {
                SolverType::Midpoint => {
                    sample * f64::from(sigma_t / sigma_s0) - m0 * f64::from(phi) - d1 * f64::from(0.5 * phi)
                }
                SolverType::Heun => {
                    let coeff = alpha_t * ((torch_f32::exp(-h) - 1.0) / h + 1.0);
                    sample * f64::from(sigma_t / sigma_s0) - m0 * f64::from(phi) + d1 * f64::from(coeff)
                }
            }
        };
        if self.lower_order_nums < c.solver_order {
            self.lower_order_nums += 1;
        }
        prev
    }
}
