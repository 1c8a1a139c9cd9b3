//! Noise schedulers, ported from diffusers (`src/diffusers/schedulers/`) with the same f32 arithmetic.
//!
//! One [`Scheduler`] trait, one file per algorithm. A scheduler is configured from a model's
//! `scheduler_config.json` the way diffusers' `XScheduler.from_config` does it: every key the file holds
//! explicitly and the target class accepts is taken, every other key gets the target class's default
//! (so a DDPM file drives DDIM, PNDM or DPM-Solver++ as a diffusers user would get them).
//!
//! Noise is injected, not drawn inside: the sampler asks [`Scheduler::needs_noise`] and passes one
//! N(0, I) draw per sample from that sample's own generator, in diffusers' order.

pub mod ddim;
pub mod ddpm;
pub mod dpmsolver;
pub mod pndm;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("invalid scheduler config: {0}")]
    Config(String),
    #[error("unsupported scheduler option: {0}")]
    Unsupported(String),
    #[error("num_inference_steps = {steps} must be in 1..={max}")]
    Steps { steps: usize, max: usize },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// A denoising schedule bound to a number of inference steps. Stateful schedulers (PNDM, DPM-Solver)
/// keep model-output history, so every batch runs its own instance.
pub trait Scheduler: Send {
    /// The timestep of each UNet evaluation, in order.
    fn timesteps(&self) -> &[i64];
    /// Whether step `i` consumes one N(0, I) draw per sample.
    fn needs_noise(&self, i: usize) -> bool;
    /// The update x_t → x_{t-1} of step `i`; `noise` is `Some` exactly when `needs_noise(i)`.
    fn step(&mut self, i: usize, model_output: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> Tensor;
}

/// Which algorithm, as named on the command line and in job specs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    Ddpm,
    Ddim,
    Pndm,
    Dpmsolver,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 4] =
        [SchedulerKind::Ddpm, SchedulerKind::Ddim, SchedulerKind::Pndm, SchedulerKind::Dpmsolver];

    /// The name used on the command line and in job specs.
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Dpmsolver => "dpmsolver",
        }
    }

    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Dpmsolver => "DPMSolverMultistepScheduler",
        }
    }
}

/// A resolved scheduler: the algorithm and every one of its options.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum SchedulerConfig {
    Ddpm(ddpm::DdpmConfig),
    Ddim(ddim::DdimConfig),
    Pndm(pndm::PndmConfig),
    Dpmsolver(dpmsolver::DpmSolverConfig),
}

impl SchedulerConfig {
    /// `kind.from_config(<file>)`: applies the keys `text` holds explicitly over `kind`'s defaults.
    pub fn from_json(kind: SchedulerKind, text: &str) -> Result<Self, SchedulerError> {
        let value: Value = serde_json::from_str(text).map_err(|e| SchedulerError::Config(e.to_string()))?;
        let Value::Object(mut map) = value else {
            return Err(SchedulerError::Config("scheduler_config.json is not a JSON object".into()));
        };
        // Keys recorded as defaults of the source class do not carry over (`extract_init_dict`).
        if let Some(Value::Array(defaults)) = map.remove("_use_default_values") {
            for key in defaults.iter().filter_map(Value::as_str) {
                map.remove(key);
            }
        }
        map.retain(|k, _| !k.starts_with('_'));
        Self::from_map(kind, map)
    }

    pub fn default_for(kind: SchedulerKind) -> Result<Self, SchedulerError> {
        Self::from_map(kind, Map::new())
    }

    fn from_map(kind: SchedulerKind, map: Map<String, Value>) -> Result<Self, SchedulerError> {
        let value = Value::Object(map);
        let parse_err = |e: serde_json::Error| SchedulerError::Config(format!("{}: {e}", kind.class_name()));
        let config = match kind {
            SchedulerKind::Ddpm => Self::Ddpm(serde_json::from_value(value).map_err(parse_err)?),
            SchedulerKind::Ddim => Self::Ddim(serde_json::from_value(value).map_err(parse_err)?),
            SchedulerKind::Pndm => Self::Pndm(serde_json::from_value(value).map_err(parse_err)?),
            SchedulerKind::Dpmsolver => Self::Dpmsolver(serde_json::from_value(value).map_err(parse_err)?),
        };
        config.validate()?;
        Ok(config)
    }

    pub fn kind(&self) -> SchedulerKind {
        match self {
            Self::Ddpm(_) => SchedulerKind::Ddpm,
            Self::Ddim(_) => SchedulerKind::Ddim,
            Self::Pndm(_) => SchedulerKind::Pndm,
            Self::Dpmsolver(_) => SchedulerKind::Dpmsolver,
        }
    }

    /// The training noise schedule (the same keys in every scheduler's config).
    pub fn betas(&self) -> &BetaConfig {
        match self {
            Self::Ddpm(c) => &c.betas,
            Self::Ddim(c) => &c.betas,
            Self::Pndm(c) => &c.betas,
            Self::Dpmsolver(c) => &c.betas,
        }
    }

    fn validate(&self) -> Result<(), SchedulerError> {
        match self {
            Self::Ddpm(c) => c.validate(),
            Self::Ddim(c) => c.validate(),
            Self::Pndm(c) => c.validate(),
            Self::Dpmsolver(c) => c.validate(),
        }
    }

    /// The config as diffusers would save it, with `_class_name`.
    pub fn to_json(&self) -> Value {
        let mut value = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut value {
            map.insert("_class_name".into(), Value::String(self.kind().class_name().into()));
        }
        value
    }

    /// A scheduler for `steps` inference steps; `eta` is DDIM's η (ignored by the others).
    pub fn build(&self, steps: usize, eta: f32) -> Result<Box<dyn Scheduler>, SchedulerError> {
        Ok(match self {
            Self::Ddpm(c) => Box::new(ddpm::DdpmScheduler::new(c, steps)?),
            Self::Ddim(c) => Box::new(ddim::DdimScheduler::new(c, steps, eta)?),
            Self::Pndm(c) => Box::new(pndm::PndmScheduler::new(c, steps)?),
            Self::Dpmsolver(c) => Box::new(dpmsolver::DpmSolverScheduler::new(c, steps)?),
        })
    }
}

/// The β schedule keys shared by every scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
    Sigmoid,
    Laplace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    Sample,
    VPrediction,
    FlowPrediction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Linspace,
    Trailing,
}

/// The training noise schedule β_1 … β_T: the same keys and defaults in every scheduler's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BetaConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
}

impl Default for BetaConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
        }
    }
}

impl BetaConfig {
    /// ᾱ_t = ∏_{s≤t} (1 − β_s), computed with libtorch's own f32 `linspace` and `cumprod` so that the
    /// table is bit-identical to diffusers' (`torch.linspace(..., dtype=float32)`, `torch.cumprod`).
    pub fn alphas_cumprod(&self, rescale_zero_snr: bool) -> Result<Vec<f32>, SchedulerError> {
        let n = self.num_train_timesteps as i64;
        if n < 2 {
            return Err(SchedulerError::Config(format!("num_train_timesteps = {n} must be at least 2")));
        }
        let opts = (Kind::Float, Device::Cpu);
        let betas = if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return Err(SchedulerError::Config(format!(
                    "trained_betas has {} entries, num_train_timesteps is {n}",
                    b.len()
                )));
            }
            Tensor::from_slice(b).to_kind(Kind::Float)
        } else {
            match self.beta_schedule {
                BetaSchedule::Linear => Tensor::linspace(self.beta_start, self.beta_end, n, opts),
                BetaSchedule::ScaledLinear => {
                    Tensor::linspace(self.beta_start.powf(0.5), self.beta_end.powf(0.5), n, opts)
                        .pow_tensor_scalar(2)
                }
                BetaSchedule::SquaredcosCapV2 => {
                    // Nichol & Dhariwal 2021, eq. 17; `betas_for_alpha_bar` in f64, then cast to f32.
                    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
                    let betas: Vec<f64> = (0..n)
                        .map(|i| {
                            let t1 = i as f64 / n as f64;
                            let t2 = (i + 1) as f64 / n as f64;
                            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                        })
                        .collect();
                    Tensor::from_slice(&betas).to_kind(Kind::Float)
                }
                ref other => return Err(SchedulerError::Unsupported(format!("beta_schedule {other:?}"))),
            }
        };
        let betas = if rescale_zero_snr { rescale_zero_terminal_snr(&betas) } else { betas };
        let alphas: Tensor = 1.0 - betas;
        let cumprod = alphas.cumprod(0, Kind::Float);
        Ok(Vec::<f32>::try_from(&cumprod)?)
    }
}

/// Lin et al. 2023 (arXiv:2305.08891), Algorithm 1, as `rescale_zero_terminal_snr` in diffusers.
fn rescale_zero_terminal_snr(betas: &Tensor) -> Tensor {
    let alphas: Tensor = 1.0 - betas;
    let sqrt = alphas.cumprod(0, Kind::Float).sqrt();
    let first = sqrt.get(0).copy();
    let last = sqrt.get(-1).copy();
    let sqrt = (sqrt - &last) * (&first / (&first - &last));
    let bar = sqrt.pow_tensor_scalar(2);
    let n = bar.size()[0];
    let ratios = bar.narrow(0, 1, n - 1) / bar.narrow(0, 0, n - 1);
    let alphas = Tensor::cat(&[bar.narrow(0, 0, 1), ratios], 0);
    1.0 - alphas
}

/// `np.linspace(start, stop, num)` element `i` (NumPy computes `i * step + start`, the last set to `stop`).
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, stop, step)` for a float step.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..len).map(|i| start + i as f64 * step).collect()
}

/// Every inference timestep must index the training schedule.
pub(crate) fn check_in_range(timesteps: &[i64], train: usize) -> Result<(), SchedulerError> {
    match timesteps.iter().find(|&&t| t < 0 || t >= train as i64) {
        Some(t) => Err(SchedulerError::Config(format!(
            "timestep {t} falls outside 0..{train} (check steps_offset and timestep_spacing)"
        ))),
        None => Ok(()),
    }
}

/// The descending inference timesteps of DDPM and DDIM (`set_timesteps`), checked to lie in range.
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    train_steps: usize,
    steps: usize,
    steps_offset: i64,
) -> Result<Vec<i64>, SchedulerError> {
    if steps == 0 || steps > train_steps {
        return Err(SchedulerError::Steps { steps, max: train_steps });
    }
    let t = train_steps as i64;
    let timesteps: Vec<i64> = match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|x| x.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / steps as i64;
            (0..steps as i64).rev().map(|i| i * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / steps as f64))
            .into_iter()
            .map(|x| x.round_ties_even() as i64 - 1)
            .collect(),
    };
    check_in_range(&timesteps, train_steps)?;
    Ok(timesteps)
}

/// Scalar f32 maths done by libtorch, as diffusers does it on 0-d tensors. libtorch's CPU `sqrt`, `log`
/// and `exp` are vectorised library calls that are not always correctly rounded (for ᾱ_t they differ from
/// IEEE `sqrtf` in about a quarter of the entries), so Rust's own would drift from diffusers by an ULP.
pub(crate) mod torch_f32 {
    use tch::Tensor;

    fn unary(x: f32, f: impl Fn(&Tensor) -> Tensor) -> f32 {
        f(&Tensor::from(x)).double_value(&[]) as f32
    }

    pub fn sqrt(x: f32) -> f32 {
        unary(x, Tensor::sqrt)
    }

    pub fn ln(x: f32) -> f32 {
        unary(x, Tensor::log)
    }

    pub fn exp(x: f32) -> f32 {
        unary(x, Tensor::exp)
    }
}

/// x̂_0 and ε̂ from the model output (`prediction_type`), with f32 coefficients as diffusers computes them.
pub(crate) fn predict_x0(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f32,
) -> Tensor {
    let beta_prod_t = 1.0 - alpha_prod_t;
    let (sqrt_alpha, sqrt_beta) =
        (f64::from(torch_f32::sqrt(alpha_prod_t)), f64::from(torch_f32::sqrt(beta_prod_t)));
    match prediction {
        PredictionType::Epsilon => (sample - model_output * sqrt_beta) / sqrt_alpha,
        PredictionType::Sample => model_output.shallow_clone(),
        PredictionType::VPrediction | PredictionType::FlowPrediction => {
            sample * sqrt_alpha - model_output * sqrt_beta
        }
    }
}

/// Refuses the options every scheduler here shares but does not implement.
pub(crate) fn check_common(thresholding: bool, prediction: PredictionType) -> Result<(), SchedulerError> {
    if thresholding {
        return Err(SchedulerError::Unsupported("thresholding = true (dynamic thresholding)".into()));
    }
    if prediction == PredictionType::FlowPrediction {
        return Err(SchedulerError::Unsupported("prediction_type = flow_prediction".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_spacing_matches_diffusers_tables() {
        let t = spaced_timesteps(TimestepSpacing::Leading, 1000, 50, 0).unwrap();
        assert_eq!(t[0], 980);
        assert_eq!(*t.last().unwrap(), 0);
        assert_eq!(spaced_timesteps(TimestepSpacing::Leading, 1000, 3, 0).unwrap(), vec![666, 333, 0]);
        assert_eq!(spaced_timesteps(TimestepSpacing::Leading, 1000, 7, 0).unwrap()[0], 852);
    }

    #[test]
    fn linspace_and_trailing_spacing() {
        assert_eq!(spaced_timesteps(TimestepSpacing::Linspace, 1000, 4, 0).unwrap(), vec![999, 666, 333, 0]);
        assert_eq!(
            spaced_timesteps(TimestepSpacing::Trailing, 1000, 4, 0).unwrap(),
            vec![999, 749, 499, 249]
        );
    }

    #[test]
    fn too_many_steps_is_an_error() {
        assert!(spaced_timesteps(TimestepSpacing::Leading, 1000, 1001, 0).is_err());
        assert!(spaced_timesteps(TimestepSpacing::Leading, 1000, 0, 0).is_err());
    }

    #[test]
    fn explicit_keys_carry_over_defaults_do_not() {
        let file = r#"{"_class_name":"DDPMScheduler","beta_end":0.02,"clip_sample":false,"timestep_spacing":"leading","_use_default_values":["timestep_spacing"]}"#;
        let SchedulerConfig::Dpmsolver(c) =
            SchedulerConfig::from_json(SchedulerKind::Dpmsolver, file).unwrap()
        else {
            panic!("wrong kind")
        };
        assert_eq!(c.timestep_spacing, TimestepSpacing::Linspace);
        let SchedulerConfig::Ddim(c) = SchedulerConfig::from_json(SchedulerKind::Ddim, file).unwrap() else {
            panic!("wrong kind")
        };
        assert!(!c.clip_sample);
        assert!(c.set_alpha_to_one);
    }
}
