//! Spatial self-attention of the DDPM UNet (`diffusers/models/attention_processor.py`: `Attention` run by
//! `AttnProcessor2_0`, built with `residual_connection=True`, `_from_deprecated_attn_block=True`).
//!
//! Weights are held under today's names `to_q`, `to_k`, `to_v`, `to_out.0` (with `group_norm`); the 2022
//! hub files' `query`, `key`, `value`, `proj_attn` are renamed on load by [`super::load`], as diffusers'
//! `_fix_state_dict_keys_on_load` does.

use tch::{Tensor, nn, nn::Module};

use super::resnet::{GroupNorm, group_norm};

#[derive(Debug)]
pub struct SpatialAttention {
    group_norm: Option<GroupNorm>,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
    heads: i64,
    head_dim: i64,
    rescale_output_factor: f64,
    /// `to_q`, `to_k` and `to_v` stacked (`[3I, C]` and `[3I]`, I the inner width) for the fast path's
    /// single product.
    qkv: Option<(Tensor, Tensor)>,
}

pub struct AttentionConfig {
    /// `heads` heads of `head_dim` each: the inner width `heads × head_dim` is narrower than the block
    /// when the head size does not divide it (diffusers' `channels // attention_head_dim` heads).
    pub heads: i64,
    pub head_dim: i64,
    /// `None`: no input norm (diffusers' mid block with `resnet_time_scale_shift="scale_shift"`).
    pub norm_groups: Option<i64>,
    pub eps: f64,
    pub rescale_output_factor: f64,
}

impl SpatialAttention {
    pub fn new(vs: nn::Path, channels: i64, c: &AttentionConfig) -> Self {
        let inner = c.heads * c.head_dim;
        let linear = |name: &str| nn::linear(&vs / name, channels, inner, Default::default());
        Self {
            group_norm: c.norm_groups.map(|g| group_norm(&vs / "group_norm", g, channels, c.eps)),
            to_q: linear("to_q"),
            to_k: linear("to_k"),
            to_v: linear("to_v"),
            to_out: nn::linear(&vs / "to_out" / 0, inner, channels, Default::default()),
            heads: c.heads,
            head_dim: c.head_dim,
            rescale_output_factor: c.rescale_output_factor,
            qkv: None,
        }
    }

    /// Stacks the projection weights for [`Self::forward`]'s fast path; again after they change.
    pub fn prepare_fast(&mut self, on: bool) {
        self.qkv = on.then(|| {
            let weight = Tensor::cat(&[&self.to_q.ws, &self.to_k.ws, &self.to_v.ws], 0);
            let bias =
                [&self.to_q.bs, &self.to_k.bs, &self.to_v.bs].map(|b| b.as_ref().map(Tensor::shallow_clone));
            let bias = match bias {
                [Some(q), Some(k), Some(v)] => Tensor::cat(&[q, k, v], 0),
                _ => Tensor::zeros([weight.size()[0]], (weight.kind(), weight.device())),
            };
            (weight, bias)
        });
    }
}

impl SpatialAttention {
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        if let Some((weight, bias)) = &self.qkv {
            return self.forward_fast(xs, weight, bias);
        }
        let (b, c, h, w) = xs.size4().unwrap_or((0, 0, 0, 0));
        // [B, C, H, W] -> [B, HW, C], normalised over channel groups first (same op order as diffusers).
        let flat = xs.view([b, c, h * w]);
        let hidden = match &self.group_norm {
            Some(norm) => norm.forward(&flat).transpose(1, 2),
            None => flat.transpose(1, 2),
        };
        let (heads, head_dim) = (self.heads, self.head_dim);
        let split = |t: Tensor| t.view([b, -1, heads, head_dim]).transpose(1, 2);
        let q = split(self.to_q.forward(&hidden));
        let k = split(self.to_k.forward(&hidden));
        let v = split(self.to_v.forward(&hidden));
        // Default scale 1/sqrt(head_dim), the kernel diffusers' AttnProcessor2_0 calls.
        let o = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<&Tensor>, 0.0, false, None, false);
        let o = o.transpose(1, 2).reshape([b, -1, heads * head_dim]);
        let o = self.to_out.forward(&o);
        let o = o.transpose(-1, -2).reshape([b, c, h, w]) + xs;
        if self.rescale_output_factor == 1.0 { o } else { o / self.rescale_output_factor }
    }

    /// The same attention on channels-last activations: the norm keeps NHWC, whose memory already is the
    /// `[B, HW, C]` token matrix, so no transposing copies; one product makes Q, K and V, and the
    /// residual is added in place.
    fn forward_fast(&self, xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
        let (b, c, h, w) = xs.size4().unwrap_or((0, 0, 0, 0));
        let normed = match &self.group_norm {
            Some(norm) => norm.forward_fast(xs),
            None => xs.shallow_clone(),
        };
        let tokens = normed.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let qkv = tokens.linear(weight, Some(bias));
        let (heads, head_dim) = (self.heads, self.head_dim);
        let inner = heads * head_dim;
        let split = |t: &Tensor| t.view([b, h * w, heads, head_dim]).transpose(1, 2);
        let parts = qkv.split(inner, -1);
        let o = Tensor::scaled_dot_product_attention(
            &split(&parts[0]),
            &split(&parts[1]),
            &split(&parts[2]),
            None::<&Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let o = o.transpose(1, 2).reshape([b, h * w, inner]);
        let mut o = self.to_out.forward(&o);
        let _ = o.g_add_(&xs.permute([0, 2, 3, 1]).reshape([b, h * w, c]));
        if self.rescale_output_factor != 1.0 {
            let _ = o.g_div_scalar_(self.rescale_output_factor);
        }
        o.view([b, h, w, c]).permute([0, 3, 1, 2])
    }
}
