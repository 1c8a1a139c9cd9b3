//! Spatial self-attention of the DDPM UNet (`diffusers/models/attention_processor.py`: `Attention` run by
//! `AttnProcessor2_0`, built with `residual_connection=True`, `_from_deprecated_attn_block=True`).
//!
//! Weights are held under today's names `to_q`, `to_k`, `to_v`, `to_out.0` (with `group_norm`); the 2022
//! hub files' `query`, `key`, `value`, `proj_attn` are renamed on load by [`super::load`], as diffusers'
//! `_fix_state_dict_keys_on_load` does.

use tch::{Tensor, nn, nn::Module};

use super::resnet::group_norm;

#[derive(Debug)]
pub struct SpatialAttention {
    group_norm: Option<nn::GroupNorm>,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
    heads: i64,
    rescale_output_factor: f64,
}

pub struct AttentionConfig {
    pub heads: i64,
    /// `None`: no input norm (diffusers' mid block with `resnet_time_scale_shift="scale_shift"`).
    pub norm_groups: Option<i64>,
    pub eps: f64,
    pub rescale_output_factor: f64,
}

impl SpatialAttention {
    pub fn new(vs: nn::Path, channels: i64, c: &AttentionConfig) -> Self {
        let linear = |name: &str| nn::linear(&vs / name, channels, channels, Default::default());
        Self {
            group_norm: c.norm_groups.map(|g| group_norm(&vs / "group_norm", g, channels, c.eps)),
            to_q: linear("to_q"),
            to_k: linear("to_k"),
            to_v: linear("to_v"),
            to_out: nn::linear(&vs / "to_out" / 0, channels, channels, Default::default()),
            heads: c.heads,
            rescale_output_factor: c.rescale_output_factor,
        }
    }
}

impl Module for SpatialAttention {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let (b, c, h, w) = xs.size4().unwrap_or((0, 0, 0, 0));
        // [B, C, H, W] -> [B, HW, C], normalised over channel groups first (same op order as diffusers).
        let flat = xs.view([b, c, h * w]);
        let hidden = match &self.group_norm {
            Some(norm) => norm.forward(&flat).transpose(1, 2),
            None => flat.transpose(1, 2),
        };
        let head_dim = c / self.heads;
        let split = |t: Tensor| t.view([b, -1, self.heads, head_dim]).transpose(1, 2);
        let q = split(self.to_q.forward(&hidden));
        let k = split(self.to_k.forward(&hidden));
        let v = split(self.to_v.forward(&hidden));
        // Default scale 1/sqrt(head_dim), the kernel diffusers' AttnProcessor2_0 calls.
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<&Tensor>, 0.0, false, None, false);
        let o = o.transpose(1, 2).reshape([b, -1, self.heads * head_dim]);
        let o = self.to_out.forward(&o);
        let o = o.transpose(-1, -2).reshape([b, c, h, w]) + xs;
        if self.rescale_output_factor == 1.0 { o } else { o / self.rescale_output_factor }
    }
}
