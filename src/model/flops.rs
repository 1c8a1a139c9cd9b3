//! Floating-point operations of one UNet forward, counted as `torch.utils.flop_counter` counts them:
//! 2 per multiply-add of every convolution, linear layer and attention product (`Q·Kᵀ` and `A·V`);
//! norms, activations and additions are not counted. `bench/` checks this count against diffusers'
//! `FlopCounterMode` on the same architecture and divides it by measured time.

use super::ModelError;
use super::config::{BlockKind, UNet2DConfig};

/// FLOPs of one forward.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Flops {
    pub total: f64,
    /// The attention products `Q·Kᵀ` and `A·V` alone (part of `total`). torch's counter has a formula
    /// for the CUDA attention kernels but none for the CPU one, so on the CPU it counts `total -
    /// attention`.
    pub attention: f64,
}

/// One layer of the network, as [`walk`] visits it.
enum Layer {
    /// A convolution producing `h × w`; `body` is false for the input and output convolutions and the
    /// stride-2 downsamplers, which are not among [`conv3x3_shapes`].
    Conv { cin: i64, cout: i64, k: i64, h: i64, w: i64, body: bool },
    /// A linear layer applied to `rows` vectors per sample.
    Linear { rows: i64, cin: i64, cout: i64 },
    /// `Q·Kᵀ` and `A·V` over `h × w` tokens of `c` channels.
    Products { c: i64, h: i64, w: i64 },
}

/// Visits every convolution, linear layer and attention product of one forward, in the order
/// `unet_2d.rs` builds them.
fn walk(config: &UNet2DConfig, visit: &mut dyn FnMut(Layer)) -> Result<(), ModelError> {
    let (height, width) = config.sample_hw()?;
    let temb = config.time_embed_dim();
    let temb_out = |c: i64| if config.resnet_time_scale_shift == "scale_shift" { 2 * c } else { c };
    let conv = |cin, cout, k, h, w| Layer::Conv { cin, cout, k, h, w, body: true };
    let resnet = |visit: &mut dyn FnMut(Layer), cin: i64, cout: i64, h: i64, w: i64| {
        visit(conv(cin, cout, 3, h, w));
        visit(conv(cout, cout, 3, h, w));
        if cin != cout {
            visit(conv(cin, cout, 1, h, w));
        }
        visit(Layer::Linear { rows: 1, cin: temb, cout: temb_out(cout) });
    };
    // Q, K, V and the output projection (to and from the heads' inner width, narrower than the block
    // when the head size does not divide it), then Q·Kᵀ and A·V over all heads together.
    let attention = |visit: &mut dyn FnMut(Layer), c: i64, h: i64, w: i64| {
        let (heads, head_dim) = config.attention_heads(c);
        let inner = heads * head_dim;
        (0..3).for_each(|_| visit(Layer::Linear { rows: h * w, cin: c, cout: inner }));
        visit(Layer::Linear { rows: h * w, cin: inner, cout: c });
        visit(Layer::Products { c: inner, h, w });
    };
    // Attention blocks may resample with a resnet block instead of a convolution.
    let resnet_down = |i: usize| config.down_kind(i) == BlockKind::Attn && config.downsample_type == "resnet";
    let resnet_up = |i: usize| config.up_kind(i) == BlockKind::Attn && config.upsample_type == "resnet";

    let boc = &config.block_out_channels;
    let n = boc.len();
    let layers = config.layers_per_block;
    let c0 = boc[0];
    visit(Layer::Conv { cin: config.in_channels, cout: c0, k: 3, h: height, w: width, body: false });
    visit(Layer::Linear { rows: 1, cin: c0, cout: temb });
    visit(Layer::Linear { rows: 1, cin: temb, cout: temb });
    visit(Layer::Conv { cin: c0, cout: config.out_channels, k: 3, h: height, w: width, body: false });

    let (mut h, mut w) = (height, width);
    let mut cout = c0;
    for (i, &c) in boc.iter().enumerate() {
        let cin = cout;
        cout = c;
        for j in 0..layers {
            resnet(visit, if j == 0 { cin } else { cout }, cout, h, w);
            if config.down_kind(i) == BlockKind::Attn {
                attention(visit, cout, h, w);
            }
        }
        if i + 1 < n {
            (h, w) = (h / 2, w / 2);
            if resnet_down(i) {
                resnet(visit, cout, cout, h, w);
            } else {
                visit(Layer::Conv { cin: cout, cout, k: 3, h, w, body: false });
            }
        }
    }
    if config.mid_block_type.is_some() {
        let c = boc[n - 1];
        resnet(visit, c, c, h, w);
        resnet(visit, c, c, h, w);
        if config.add_attention {
            attention(visit, c, h, w);
        }
    }
    let reversed: Vec<i64> = boc.iter().rev().copied().collect();
    let mut cout = reversed[0];
    for i in 0..n {
        let prev_cout = cout;
        cout = reversed[i];
        let cin = reversed[(i + 1).min(n - 1)];
        for j in 0..layers + 1 {
            let skip = if j == layers { cin } else { cout };
            let resnet_in = if j == 0 { prev_cout } else { cout };
            resnet(visit, resnet_in + skip, cout, h, w);
            if config.up_kind(i) == BlockKind::Attn {
                attention(visit, cout, h, w);
            }
        }
        if i + 1 < n {
            (h, w) = (h * 2, w * 2);
            if resnet_up(i) {
                resnet(visit, cout, cout, h, w);
            } else {
                visit(conv(cout, cout, 3, h, w));
            }
        }
    }
    Ok(())
}

/// FLOPs of one forward of a `batch`-row input.
pub fn unet_forward(config: &UNet2DConfig, batch: i64) -> Result<Flops, ModelError> {
    let b = batch as f64;
    let (mut total, mut attention) = (0.0, 0.0);
    walk(config, &mut |layer| match layer {
        Layer::Conv { cin, cout, k, h, w, .. } => total += 2.0 * b * (h * w * cout * cin * k * k) as f64,
        Layer::Linear { rows, cin, cout } => total += 2.0 * b * (rows * cin * cout) as f64,
        Layer::Products { c, h, w } => {
            let products = 2.0 * 2.0 * b * ((h * w) * (h * w) * c) as f64;
            total += products;
            attention += products;
        }
    })?;
    Ok(Flops { total, attention })
}

/// A convolution's `(C_in, C_out, H, W)`.
pub type ConvShape = (i64, i64, i64, i64);

/// The distinct 3×3 stride-1 convolutions of the network's blocks and how many times each runs in one
/// forward, for measuring the convolution peak on the model's own shapes.
pub fn conv3x3_shapes(config: &UNet2DConfig) -> Result<Vec<(ConvShape, usize)>, ModelError> {
    let mut shapes: std::collections::BTreeMap<ConvShape, usize> = Default::default();
    walk(config, &mut |layer| {
        if let Layer::Conv { cin, cout, k: 3, h, w, body: true } = layer {
            *shapes.entry((cin, cout, h, w)).or_default() += 1;
        }
    })?;
    Ok(shapes.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// google/ddpm-cifar10-32 at batch 1. Reference: `torch.utils.flop_counter.FlopCounterMode` on
    /// diffusers 0.42.1's `UNet2DModel` with that config on the CPU counts 12,107,907,072 FLOPs, without
    /// the attention products (bench/bench.py prints the comparison for whatever model it runs).
    #[test]
    fn cifar10_forward_flops_match_torchs_counter() {
        let config = crate::init_model::Preset::Cifar10_32.unet_config();
        let flops = unet_forward(&config, 1).unwrap();
        assert_eq!(flops.total - flops.attention, 12_107_907_072.0);
        // Five attention blocks at 16×16 and one at 4×4, 256 channels: 4·N²·C each.
        assert_eq!(flops.attention, 4.0 * 256.0 * (5.0 * 256.0 * 256.0 + 16.0 * 16.0));
        let batch8 = unet_forward(&config, 8).unwrap();
        assert_eq!((batch8.total, batch8.attention), (8.0 * flops.total, 8.0 * flops.attention));
    }

    /// The shapes `bench/` timed for cifar10-32 before the walk was shared (its conv-peak output).
    #[test]
    fn cifar10_conv_shapes_are_the_blocks_3x3_convolutions() {
        let config = crate::init_model::Preset::Cifar10_32.unet_config();
        let shapes: Vec<ConvShape> = conv3x3_shapes(&config).unwrap().into_iter().map(|(s, _)| s).collect();
        let want = [
            (128, 128, 32, 32),
            (128, 256, 16, 16),
            (256, 128, 32, 32),
            (256, 256, 4, 4),
            (256, 256, 8, 8),
            (256, 256, 16, 16),
            (256, 256, 32, 32),
            (384, 128, 32, 32),
            (384, 256, 16, 16),
            (512, 256, 4, 4),
            (512, 256, 8, 8),
            (512, 256, 16, 16),
        ];
        assert_eq!(shapes, want);
    }
}
