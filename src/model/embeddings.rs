//! Sinusoidal timestep features and their MLP (`diffusers/models/embeddings.py`: `get_timestep_embedding`,
//! `Timesteps`, `TimestepEmbedding`); the transformer position encoding of Vaswani et al. 2017, §3.5,
//! as DDPM uses it for the noise level (Ho et al. 2020, Appendix B).

use tch::{Kind, Tensor, nn, nn::Module};

/// `Timesteps(num_channels, flip_sin_to_cos, downscale_freq_shift)` with `scale = 1`, `max_period = 10000`.
#[derive(Debug)]
pub struct Timesteps {
    num_channels: i64,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
}

impl Timesteps {
    pub fn new(num_channels: i64, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self { num_channels, flip_sin_to_cos, downscale_freq_shift }
    }

    /// `timesteps`: a 1-D tensor of length `B`. Returns `[B, num_channels]` in f32, computed op for op
    /// as diffusers does (f32 `arange`, f32 `exp`), so the features agree to the last bit.
    pub fn forward(&self, timesteps: &Tensor) -> Tensor {
        let half = self.num_channels / 2;
        let device = timesteps.device();
        let exponent = Tensor::arange(half, (Kind::Float, device)) * (-(10000f64).ln());
        let exponent = exponent / (half as f64 - self.downscale_freq_shift);
        let freqs = exponent.exp();
        let emb = timesteps.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
        let emb = Tensor::cat(&[emb.sin(), emb.cos()], -1);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[emb.narrow(1, half, half), emb.narrow(1, 0, half)], -1)
        } else {
            emb
        };
        if self.num_channels % 2 == 1 { emb.constant_pad_nd([0, 1, 0, 0]) } else { emb }
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: nn::Linear,
    linear_2: nn::Linear,
}

impl TimestepEmbedding {
    pub fn new(vs: nn::Path, in_channels: i64, time_embed_dim: i64) -> Self {
        let linear_1 = nn::linear(&vs / "linear_1", in_channels, time_embed_dim, Default::default());
        let linear_2 = nn::linear(&vs / "linear_2", time_embed_dim, time_embed_dim, Default::default());
        Self { linear_1, linear_2 }
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(xs).silu())
    }
}
