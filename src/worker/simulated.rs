//! A simulated device, for tests and benchmarks of the control plane only (the `test-support` feature;
//! the release binary has none): with `DDPM_TEST_SIMULATED_BATCH_MS=N` every batch takes N ms, spread
//! over its steps (each step still reports progress and can be cancelled), and its images are a pure
//! function of their seeds (each sample's initial noise, clamped), so that dozens of worker processes fit
//! on one machine while the queue, leases, outputs and records all run for real.

#[cfg(feature = "test-support")]
pub use enabled::Simulated;

/// A device that does not compute (uninhabited: the release binary cannot make one).
#[cfg(not(feature = "test-support"))]
pub enum Simulated {}

#[cfg(not(feature = "test-support"))]
impl Simulated {
    pub fn from_env() -> Option<Simulated> {
        None
    }

    pub fn sample(
        &self,
        _req: &crate::sampler::BatchRequest,
        _shape: [i64; 3],
        _on_step: impl FnMut(usize) -> bool,
    ) -> Result<tch::Tensor, crate::sampler::SampleError> {
        match *self {}
    }
}

#[cfg(feature = "test-support")]
mod enabled {
    use std::time::{Duration, Instant};

    use tch::Tensor;

    use crate::rng::TorchGenerator;
    use crate::sampler::{BatchRequest, SampleError};

    /// The variable that turns the simulation on: a batch's time in milliseconds.
    const VARIABLE: &str = "DDPM_TEST_SIMULATED_BATCH_MS";

    /// Batches that take `batch_time` each, whatever their size.
    #[derive(Debug, Clone, Copy)]
    pub struct Simulated {
        batch_time: Duration,
    }

    impl Simulated {
        /// The simulation this process was started with, if any.
        pub fn from_env() -> Option<Simulated> {
            let ms = std::env::var(VARIABLE).ok()?.parse::<u64>().ok()?;
            Some(Simulated { batch_time: Duration::from_millis(ms) })
        }

        /// x_0 of `req`'s seeds as `[seeds, C, H, W]`, after the batch's time has passed; `on_step` is
        /// called at the end of each step, and returning `false` cancels as the real sampler does.
        pub fn sample(
            &self,
            req: &BatchRequest,
            shape: [i64; 3],
            mut on_step: impl FnMut(usize) -> bool,
        ) -> Result<Tensor, SampleError> {
            let started = Instant::now();
            let steps = req.steps.max(1);
            for i in 0..steps {
                let due = self.batch_time.mul_f64((i + 1) as f64 / steps as f64);
                std::thread::sleep(due.saturating_sub(started.elapsed()));
                if !on_step(i) {
                    return Err(SampleError::Cancelled);
                }
            }
            let per_sample = (shape[0] * shape[1] * shape[2]) as usize;
            let mut x0 = vec![0f32; per_sample * req.seeds.len()];
            for (row, &seed) in x0.chunks_exact_mut(per_sample).zip(req.seeds) {
                TorchGenerator::new(seed).randn_into(row);
            }
            let size = [req.seeds.len() as i64, shape[0], shape[1], shape[2]];
            Ok(Tensor::from_slice(&x0).view(size).clamp(-1.0, 1.0))
        }
    }
}
