//! `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (`diffusers/models/resnet.py`, `downsampling.py`,
//! `upsampling.py`): the pre-activation residual block of the DDPM UNet (Ho et al. 2020, Appendix B,
//! after Wide ResNet / PixelCNN++), with the time embedding added between the two convolutions.

use tch::{Tensor, nn, nn::Module};

pub fn group_norm(vs: nn::Path, groups: i64, channels: i64, eps: f64) -> nn::GroupNorm {
    nn::group_norm(vs, groups, channels, nn::GroupNormConfig { eps, ..Default::default() })
}

pub fn conv2d(vs: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    nn::conv2d(vs, cin, cout, k, nn::ConvConfig { stride, padding, ..Default::default() })
}

/// How the time embedding enters the block (`resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// `h = norm2(h + proj(t))`.
    Default,
    /// `h = norm2(h) * (1 + scale) + shift`, with `proj(t)` split into scale and shift.
    ScaleShift,
}

#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: nn::Linear,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
    time_embedding_norm: TimeEmbeddingNorm,
    output_scale_factor: f64,
}

pub struct ResnetConfig {
    pub groups: i64,
    pub eps: f64,
    pub temb_channels: i64,
    pub time_embedding_norm: TimeEmbeddingNorm,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vs: nn::Path, cin: i64, cout: i64, c: &ResnetConfig) -> Self {
        let temb_out = match c.time_embedding_norm {
            TimeEmbeddingNorm::Default => cout,
            TimeEmbeddingNorm::ScaleShift => 2 * cout,
        };
        Self {
            norm1: group_norm(&vs / "norm1", c.groups, cin, c.eps),
            conv1: conv2d(&vs / "conv1", cin, cout, 3, 1, 1),
            time_emb_proj: nn::linear(&vs / "time_emb_proj", c.temb_channels, temb_out, Default::default()),
            norm2: group_norm(&vs / "norm2", c.groups, cout, c.eps),
            conv2: conv2d(&vs / "conv2", cout, cout, 3, 1, 1),
            conv_shortcut: (cin != cout).then(|| conv2d(&vs / "conv_shortcut", cin, cout, 1, 1, 0)),
            time_embedding_norm: c.time_embedding_norm,
            output_scale_factor: c.output_scale_factor,
        }
    }

    /// `temb` is the time embedding after its SiLU (shared by every block: diffusers applies the same
    /// `nonlinearity(temb)` in each one).
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, fast: bool) -> Tensor {
        if fast {
            return self.forward_fast(xs, temb);
        }
        let h = self.conv1.forward(&self.norm1.forward(xs).silu());
        let temb = self.time_emb_proj.forward(temb).unsqueeze(-1).unsqueeze(-1);
        let h = match self.time_embedding_norm {
            TimeEmbeddingNorm::Default => self.norm2.forward(&(h + temb)),
            TimeEmbeddingNorm::ScaleShift => {
                let parts = temb.chunk(2, 1);
                self.norm2.forward(&h) * (&parts[0] + 1.0) + &parts[1]
            }
        };
        // Dropout is the identity at inference.
        let h = self.conv2.forward(&h.silu());
        let shortcut = match &self.conv_shortcut {
            // No `.contiguous()` here: diffusers only does that in training, and the input's layout
            // (channels-last after attention blocks) selects the conv kernel.
            Some(conv) => conv.forward(xs),
            None => xs.shallow_clone(),
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 { out } else { out / self.output_scale_factor }
    }

    /// The same block for channels-last activations, in place wherever a fresh tensor allows it (each
    /// SiLU, the time-embedding and residual adds) and with the 1×1 shortcut as one matrix product.
    /// Same operations in the same order; only kernels differ (last-bit differences).
    fn forward_fast(&self, xs: &Tensor, temb: &Tensor) -> Tensor {
        let mut h = self.norm1.forward(xs);
        let _ = h.silu_();
        let mut h = self.conv1.forward(&h);
        let temb = self.time_emb_proj.forward(temb).unsqueeze(-1).unsqueeze(-1);
        let mut h = match self.time_embedding_norm {
            TimeEmbeddingNorm::Default => {
                let _ = h.g_add_(&temb);
                self.norm2.forward(&h)
            }
            TimeEmbeddingNorm::ScaleShift => {
                let parts = temb.chunk(2, 1);
                let mut n = self.norm2.forward(&h);
                let _ = n.g_mul_(&(&parts[0] + 1.0)).g_add_(&parts[1]);
                n
            }
        };
        let _ = h.silu_();
        let mut out = self.conv2.forward(&h);
        let _ = match &self.conv_shortcut {
            Some(conv) => out.g_add_(&pointwise_conv(conv, xs)),
            None => out.g_add_(xs),
        };
        if self.output_scale_factor != 1.0 {
            let _ = out.g_div_scalar_(self.output_scale_factor);
        }
        out
    }
}

/// A 1×1 convolution of a channels-last input as one `[B·H·W, C_in] × [C_in, C_out]` product on the
/// NHWC memory it already has (oneDNN and the im2col path both copy first); other inputs take the conv.
pub fn pointwise_conv(conv: &nn::Conv2D, xs: &Tensor) -> Tensor {
    let (shape, weight) = (xs.size4(), conv.ws.size());
    let (Ok((b, c, h, w)), &[cout, cin, 1, 1]) = (shape, weight.as_slice()) else {
        return conv.forward(xs);
    };
    if !is_channels_last(xs) || cin != c {
        return conv.forward(xs);
    }
    let nhwc = xs.permute([0, 2, 3, 1]);
    let weight = conv.ws.reshape([cout, cin]);
    nhwc.linear(&weight, conv.bs.as_ref()).view([b, h, w, cout]).permute([0, 3, 1, 2])
}

/// Whether `x` (4-D) is laid out NHWC in memory, densely.
pub fn is_channels_last(x: &Tensor) -> bool {
    let (Ok((_, c, _, w)), stride) = (x.size4(), x.stride()) else { return false };
    stride.len() == 4
        && stride[1] == 1
        && stride[3] == c
        && stride[2] == w * c
        && stride[0] == stride[2] * x.size()[2]
}

/// `Downsample2D(use_conv=True)`. With `padding == 0` the original TF code's "SAME" stride-2 conv is
/// reproduced by padding one row and column at the bottom/right first.
#[derive(Debug)]
pub struct Downsample2D {
    conv: nn::Conv2D,
    pad_asymmetric: bool,
}

impl Downsample2D {
    pub fn new(vs: nn::Path, channels: i64, padding: i64) -> Self {
        Self { conv: conv2d(&vs / "conv", channels, channels, 3, 2, padding), pad_asymmetric: padding == 0 }
    }
}

impl Downsample2D {
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        if self.pad_asymmetric {
            self.conv.forward(&xs.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(xs)
        }
    }
}

/// `Upsample2D(use_conv=True)`: nearest ×2 then a 3×3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
}

impl Upsample2D {
    pub fn new(vs: nn::Path, channels: i64) -> Self {
        Self { conv: conv2d(&vs / "conv", channels, channels, 3, 1, 1) }
    }
}

impl Upsample2D {
    /// `fast`: the input is channels-last throughout, so no contiguity rule applies.
    pub fn forward(&self, xs: &Tensor, fast: bool) -> Tensor {
        if fast {
            let up = xs.upsample_nearest2d_vec(None::<&[i64]>, [2.0, 2.0].as_slice());
            return self.conv.forward(&up);
        }
        // Activations after an attention block are channels-last views (its output is a transposed
        // reshape) and the layout selects the conv kernel, so contiguity follows diffusers exactly:
        // only large batches and huge tensors are made contiguous (issues #984, #2306).
        let b = xs.size().first().copied().unwrap_or(0);
        let xs =
            if b >= 64 || xs.numel() * 2 > (1usize << 31) { xs.contiguous() } else { xs.shallow_clone() };
        // `F.interpolate(scale_factor=2.0)` is the `.vec` overload, which keeps channels-last inputs
        // channels-last (the sized overload returns NCHW).
        let up = xs.upsample_nearest2d_vec(None::<&[i64]>, [2.0, 2.0].as_slice());
        self.conv.forward(&up)
    }
}
