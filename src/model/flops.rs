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

/// FLOPs of one forward of a `batch`-row input.
pub fn unet_forward(config: &UNet2DConfig, batch: i64) -> Result<Flops, ModelError> {
    let (height, width) = config.sample_hw()?;
    let b = batch as f64;
    let conv = |cin: i64, cout: i64, k: i64, h: i64, w: i64| 2.0 * b * (h * w * cout * cin * k * k) as f64;
    let linear = |rows: f64, cin: i64, cout: i64| 2.0 * rows * (cin * cout) as f64;
    let temb = config.time_embed_dim();
    let temb_out = |c: i64| if config.resnet_time_scale_shift == "scale_shift" { 2 * c } else { c };
    let resnet = |cin: i64, cout: i64, h: i64, w: i64| {
        conv(cin, cout, 3, h, w)
            + conv(cout, cout, 3, h, w)
            + if cin != cout { conv(cin, cout, 1, h, w) } else { 0.0 }
            + linear(b, temb, temb_out(cout))
    };
    let products = |c: i64, h: i64, w: i64| 2.0 * 2.0 * b * ((h * w) * (h * w) * c) as f64;
    // Q, K, V and the output projection, then Q·Kᵀ and A·V over all heads together.
    let attention = |c: i64, h: i64, w: i64| 4.0 * linear(b * (h * w) as f64, c, c) + products(c, h, w);
    let mut attention_products = 0.0;

    let boc = &config.block_out_channels;
    let n = boc.len();
    let layers = config.layers_per_block;
    let c0 = boc[0];
    let mut flops = conv(config.in_channels, c0, 3, height, width)
        + linear(b, c0, temb)
        + linear(b, temb, temb)
        + conv(c0, config.out_channels, 3, height, width);

    let (mut h, mut w) = (height, width);
    let mut cout = c0;
    for (i, &c) in boc.iter().enumerate() {
        let cin = cout;
        cout = c;
        for j in 0..layers {
            flops += resnet(if j == 0 { cin } else { cout }, cout, h, w);
            if config.down_kind(i) == BlockKind::Attn {
                flops += attention(cout, h, w);
                attention_products += products(cout, h, w);
            }
        }
        if i + 1 < n {
            (h, w) = (h / 2, w / 2);
            flops += conv(cout, cout, 3, h, w);
        }
    }
    if config.mid_block_type.is_some() {
        let c = boc[n - 1];
        flops += 2.0 * resnet(c, c, h, w);
        if config.add_attention {
            flops += attention(c, h, w);
            attention_products += products(c, h, w);
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
            flops += resnet(resnet_in + skip, cout, h, w);
            if config.up_kind(i) == BlockKind::Attn {
                flops += attention(cout, h, w);
                attention_products += products(cout, h, w);
            }
        }
        if i + 1 < n {
            (h, w) = (h * 2, w * 2);
            flops += conv(cout, cout, 3, h, w);
        }
    }
    Ok(Flops { total: flops, attention: attention_products })
}

/// A convolution's `(C_in, C_out, H, W)`.
pub type ConvShape = (i64, i64, i64, i64);

/// The distinct 3×3 stride-1 convolutions of the network and how many times each runs in one forward,
/// for measuring the convolution peak on the model's own shapes.
pub fn conv3x3_shapes(config: &UNet2DConfig) -> Result<Vec<(ConvShape, usize)>, ModelError> {
    let (height, width) = config.sample_hw()?;
    let mut shapes: std::collections::BTreeMap<ConvShape, usize> = Default::default();
    let mut add = |cin, cout, h, w| *shapes.entry((cin, cout, h, w)).or_default() += 1;
    let boc = &config.block_out_channels;
    let n = boc.len();
    let layers = config.layers_per_block;
    let (mut h, mut w) = (height, width);
    let mut cout = boc[0];
    for &c in boc {
        let cin = cout;
        cout = c;
        for j in 0..layers {
            add(if j == 0 { cin } else { cout }, cout, h, w);
            add(cout, cout, h, w);
        }
        (h, w) = (h / 2, w / 2);
    }
    (h, w) = (height >> (n - 1), width >> (n - 1));
    if config.mid_block_type.is_some() {
        let c = boc[n - 1];
        (0..4).for_each(|_| add(c, c, h, w));
    }
    let reversed: Vec<i64> = boc.iter().rev().copied().collect();
    let mut cout = reversed[0];
    for i in 0..n {
        let prev_cout = cout;
        cout = reversed[i];
        let cin = reversed[(i + 1).min(n - 1)];
        for j in 0..layers + 1 {
            let skip = if j == layers { cin } else { cout };
            add((if j == 0 { prev_cout } else { cout }) + skip, cout, h, w);
            add(cout, cout, h, w);
        }
        if i + 1 < n {
            (h, w) = (h * 2, w * 2);
            add(cout, cout, h, w);
        }
    }
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
}
