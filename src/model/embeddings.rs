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

/// `UNet2DModel.time_proj`: sinusoidal features, or a learned table looked up by timestep.
#[derive(Debug)]
pub enum TimeProjection {
    Positional(Timesteps),
    /// `nn.Embedding(num_train_timesteps, C0)`.
    Learned(nn::Embedding),
}

impl TimeProjection {
    /// `[B, C0]` features of the timesteps `[B]`: f32 for the sinusoidal ones (the caller casts), the
    /// table's kind for the learned ones.
    pub fn forward(&self, timesteps: &Tensor) -> Tensor {
        match self {
            TimeProjection::Positional(p) => p.forward(timesteps),
            TimeProjection::Learned(table) => table.forward(&timesteps.to_kind(Kind::Int64)),
        }
    }
}

/// `UNet2DModel.class_embedding`, whose output is added to the time embedding.
#[derive(Debug)]
pub enum ClassEmbedding {
    /// `nn.Embedding(num_class_embeds, time_embed_dim)`, by class index.
    Table(nn::Embedding),
    /// `TimestepEmbedding` over the time projection of the label (`class_embed_type: "timestep"`).
    Timestep(TimestepEmbedding),
    /// The label is the embedding (`class_embed_type: "identity"`).
    Identity,
}

impl ClassEmbedding {
    /// The embedding of `labels` (`[B]` class indices, or `[B, time_embed_dim]` vectors for `Identity`)
    /// in `kind`, op for op as `UNet2DModel.forward`.
    pub fn forward(&self, labels: &Tensor, time_proj: &TimeProjection, kind: Kind) -> Tensor {
        match self {
            ClassEmbedding::Table(table) => table.forward(&labels.to_kind(Kind::Int64)).to_kind(kind),
            // diffusers feeds the f32 projection to the MLP; in a half-precision model it would refuse
            // the mixed kinds, so the projection is cast to the model's kind first (a no-op in f32).
            ClassEmbedding::Timestep(mlp) => {
                mlp.forward(&time_proj.forward(labels).to_kind(kind)).to_kind(kind)
            }
            ClassEmbedding::Identity => labels.to_kind(kind),
        }
    }
}
