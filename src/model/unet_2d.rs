//! `UNet2DModel` (`diffusers/models/unets/unet_2d.py`), the ε-prediction network of Ho et al. 2020
//! (Appendix B): conv_in, down blocks collecting skips, a mid block, up blocks consuming them, and a
//! GroupNorm-SiLU-conv head.

use tch::{Tensor, nn, nn::Module};

use super::attention::AttentionConfig;
use super::config::{self, BlockKind, UNet2DConfig};
use super::embeddings::{ClassEmbedding, TimeProjection, TimestepEmbedding, Timesteps};
use super::resnet::{Activation, GroupNorm, ResnetConfig, TimeEmbeddingNorm, conv2d, group_norm};
use super::unet_2d_blocks::{DownBlock2D, DownBlockConfig, UNetMidBlock2D, UpBlock2D, UpBlockConfig};

#[derive(Debug)]
pub struct UNet2DModel {
    center_input_sample: bool,
    conv_in: nn::Conv2D,
    time_proj: TimeProjection,
    time_embedding: TimestepEmbedding,
    class_embedding: Option<ClassEmbedding>,
    /// The resnets' non-linearity, which each also applies to the time embedding.
    act: Activation,
    down_blocks: Vec<DownBlock2D>,
    mid_block: Option<UNetMidBlock2D>,
    up_blocks: Vec<UpBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: nn::Conv2D,
    fast: bool,
}

impl UNet2DModel {
    /// Builds the network's variables under `vs` (randomly initialised until weights are copied in).
    /// `config` must have passed [`UNet2DConfig::validate`].
    pub fn new(vs: nn::Path, config: &UNet2DConfig) -> Self {
        let boc = &config.block_out_channels;
        let n = boc.len();
        let groups = config.groups();
        let eps = config.norm_eps;
        let temb_dim = config.time_embed_dim();
        let time_embedding_norm = match config.resnet_time_scale_shift.as_str() {
            "scale_shift" => TimeEmbeddingNorm::ScaleShift,
            _ => TimeEmbeddingNorm::Default,
        };
        let act = config.activation();
        let resnet = ResnetConfig {
            act,
            groups,
            eps,
            temb_channels: temb_dim,
            time_embedding_norm,
            output_scale_factor: 1.0,
        };
        let attention = |channels: i64, norm_groups: Option<i64>, rescale: f64| {
            let (heads, head_dim) = config.attention_heads(channels);
            AttentionConfig { heads, head_dim, norm_groups, eps, rescale_output_factor: rescale }
        };

        let conv_in = conv2d(&vs / "conv_in", config.in_channels, boc[0], 3, 1, 1);
        let time_proj = match config.time_embedding() {
            config::TimeEmbedding::Positional => {
                TimeProjection::Positional(Timesteps::new(boc[0], config.flip_sin_to_cos, config.freq_shift))
            }
            config::TimeEmbedding::Learned { num_train_timesteps } => TimeProjection::Learned(nn::embedding(
                &vs / "time_proj",
                num_train_timesteps,
                boc[0],
                Default::default(),
            )),
        };
        let time_embedding = TimestepEmbedding::new(&vs / "time_embedding", boc[0], temb_dim);
        let class_embedding = config.class_embedding().map(|kind| match kind {
            config::ClassEmbedding::Table { classes } => ClassEmbedding::Table(nn::embedding(
                &vs / "class_embedding",
                classes,
                temb_dim,
                Default::default(),
            )),
            config::ClassEmbedding::Timestep => {
                ClassEmbedding::Timestep(TimestepEmbedding::new(&vs / "class_embedding", boc[0], temb_dim))
            }
            config::ClassEmbedding::Identity => ClassEmbedding::Identity,
        });

        let mut down_blocks = Vec::with_capacity(n);
        let mut cout = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let cin = cout;
            cout = c;
            let attn = attention(cout, Some(groups), 1.0);
            down_blocks.push(DownBlock2D::new(
                &vs / "down_blocks" / i as i64,
                &DownBlockConfig {
                    num_layers: config.layers_per_block,
                    cin,
                    cout,
                    resnet: &resnet,
                    attention: (config.down_kind(i) == BlockKind::Attn).then_some(&attn),
                    downsample_padding: (i + 1 < n).then_some(config.downsample_padding),
                    resnet_downsample: config.down_kind(i) == BlockKind::Attn
                        && config.downsample_type == "resnet",
                },
            ));
        }

        let mid_block = config.mid_block_type.as_ref().map(|_| {
            let mid_resnet = ResnetConfig { output_scale_factor: config.mid_block_scale_factor, ..resnet };
            // diffusers: `attn_groups = resnet_groups if resnet_time_scale_shift == "default" else None`.
            let attn_groups = config
                .attn_norm_num_groups
                .or((time_embedding_norm == TimeEmbeddingNorm::Default).then_some(groups));
            let attn = attention(boc[n - 1], attn_groups, config.mid_block_scale_factor);
            UNetMidBlock2D::new(
                &vs / "mid_block",
                boc[n - 1],
                &mid_resnet,
                config.add_attention.then_some(&attn),
            )
        });

        let reversed: Vec<i64> = boc.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut cout = reversed[0];
        for i in 0..n {
            let prev_cout = cout;
            cout = reversed[i];
            let cin = reversed[(i + 1).min(n - 1)];
            let attn = attention(cout, Some(groups), 1.0);
            up_blocks.push(UpBlock2D::new(
                &vs / "up_blocks" / i as i64,
                &UpBlockConfig {
                    num_layers: config.layers_per_block + 1,
                    cin,
                    prev_cout,
                    cout,
                    resnet: &resnet,
                    attention: (config.up_kind(i) == BlockKind::Attn).then_some(&attn),
                    add_upsample: i + 1 < n,
                    resnet_upsample: config.up_kind(i) == BlockKind::Attn && config.upsample_type == "resnet",
                },
            ));
        }

        Self {
            center_input_sample: config.center_input_sample,
            conv_in,
            time_proj,
            time_embedding,
            class_embedding,
            act,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(&vs / "conv_norm_out", groups, boc[0], eps),
            conv_out: conv2d(&vs / "conv_out", boc[0], config.out_channels, 3, 1, 1),
            fast: false,
        }
    }

    /// ε̂(x_t, t) for a batch `sample` `[B, C, H, W]` at one integer timestep.
    /// Switches the fast (channels-last, fused) path on or off; again after the weights change.
    pub fn prepare_fast(&mut self, on: bool) {
        self.fast = on;
        self.down_blocks.iter_mut().for_each(|b| b.prepare_fast(on));
        if let Some(mid) = &mut self.mid_block {
            mid.prepare_fast(on);
        }
        self.up_blocks.iter_mut().for_each(|b| b.prepare_fast(on));
    }

    /// Whether the network takes class labels.
    pub fn is_conditional(&self) -> bool {
        self.class_embedding.is_some()
    }

    /// ε for `sample` `[B, C, H, W]` at `timesteps` (`[B]` or `[1]`, integer or float, on the sample's
    /// device): a tensor rather than a number so that a captured CUDA graph can replay every step.
    /// `class_labels` (`[B]`, or `[B, time_embed_dim]` for an identity class embedding, on the same
    /// device) condition a class-conditional network; an unconditional one ignores them, and a
    /// conditional one given none runs without its class term (warm-up probes, whose outputs are dropped).
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, class_labels: Option<&Tensor>) -> Tensor {
        let batch = sample.size()[0];
        let fast = self.fast;
        let sample = if self.center_input_sample { sample * 2.0 - 1.0 } else { sample.shallow_clone() };
        let timesteps = timesteps.expand([batch], false);
        let t_emb = self.time_proj.forward(&timesteps).to_kind(sample.kind());
        let mut emb = self.time_embedding.forward(&t_emb);
        if let (Some(class_embedding), Some(labels)) = (&self.class_embedding, class_labels) {
            emb += class_embedding.forward(labels, &self.time_proj, sample.kind());
        }
        // Every resnet block applies the same non-linearity to the embedding before its projection.
        let emb = self.act.apply(&emb);

        let mut h = self.conv_in.forward(&sample);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &emb, &mut skips, fast);
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &emb, fast);
        }
        for block in &self.up_blocks {
            debug_assert!(skips.len() >= block.num_skips());
            h = block.forward(&h, &emb, &mut skips, fast);
        }
        let fused = if fast { self.conv_norm_out.fused(&h, None, true) } else { None };
        let h = fused.unwrap_or_else(|| {
            let mut h =
                if fast { self.conv_norm_out.forward_fast(&h) } else { self.conv_norm_out.forward(&h) };
            let _ = h.silu_();
            h
        });
        self.conv_out.forward(&h)
    }
}
