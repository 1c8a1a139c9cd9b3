//! `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (`diffusers/models/resnet.py`, `downsampling.py`,
//! `upsampling.py`): the pre-activation residual block of the DDPM UNet (Ho et al. 2020, Appendix B,
//! after Wide ResNet / PixelCNN++), with the time embedding added between the two convolutions.

use tch::{Tensor, nn, nn::Module};

pub fn group_norm(vs: nn::Path, groups: i64, channels: i64, eps: f64) -> GroupNorm {
    GroupNorm {
        inner: nn::group_norm(vs, groups, channels, nn::GroupNormConfig { eps, ..Default::default() }),
        eps,
    }
}

/// `nn.GroupNorm`, with a channels-last form for CUDA.
#[derive(Debug)]
pub struct GroupNorm {
    inner: nn::GroupNorm,
    eps: f64,
}

impl GroupNorm {
    /// libtorch's `group_norm`, as diffusers calls it.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.inner.forward(xs)
    }

    /// The norm of the channels-last layout. On CUDA, libtorch's `group_norm` makes its input contiguous
    /// (NCHW) and returns NCHW (only the CPU kernel keeps channels-last: `aten/src/ATen/native/group_norm.cpp`),
    /// so each norm between two NHWC convolutions would cost two layout copies; there it runs on the NHWC
    /// memory instead: the fused kernels ([`GroupNorm::fused`]) where built, else [`group_norm_nhwc`].
    /// Elsewhere, and for inputs of other layouts, libtorch's.
    pub fn forward_fast(&self, xs: &Tensor) -> Tensor {
        if let Some(out) = self.fused(xs, None, false) {
            return out;
        }
        match (&self.inner.ws, &self.inner.bs) {
            (Some(weight), Some(bias)) if xs.device().is_cuda() && is_channels_last(xs) => {
                group_norm_nhwc(xs, self.inner.num_groups, weight, bias, self.eps)
            }
            _ => self.inner.forward(xs),
        }
    }

    /// `silu?(norm(xs + addend))` by the fused CUDA kernels (`src/cuda/group_norm.cu`; `addend` is
    /// `[B, C]`): statistics and one pass over the activations, where the ops take five passes. `None`
    /// where they do not apply (not CUDA, not channels-last, a build without them, switched off by
    /// `DDPM_FUSED_GROUP_NORM=0`, a shape they do not take): the caller then runs the ops.
    pub fn fused(&self, xs: &Tensor, addend: Option<&Tensor>, silu: bool) -> Option<Tensor> {
        let (Some(weight), Some(bias)) = (&self.inner.ws, &self.inner.bs) else { return None };
        if !(fused_group_norm_enabled() && xs.device().is_cuda() && is_channels_last(xs)) {
            return None;
        }
        // The kernels read 16-byte vectors of channels (kernels.cpp checks the same and more).
        let width = match xs.kind() {
            tch::Kind::Float => 4,
            tch::Kind::Half | tch::Kind::BFloat16 => 8,
            _ => return None,
        };
        let channels = xs.size().get(1).copied().unwrap_or(0);
        if channels % width != 0 || channels / width > 1024 {
            return None;
        }
        match crate::cuda::group_norm_nhwc(xs, weight, bias, addend, self.inner.num_groups, self.eps, silu) {
            Ok(out) => {
                NORMS.fused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Some(out)
            }
            Err(e) => {
                NORMS.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Out of memory is the caller's to meet (the ops will raise it too, and the warm-up's batch
                // search expects it); anything else is worth one line.
                let message = e.to_string();
                if !message.contains("out of memory") {
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(
                        || tracing::warn!(error = %message, "fused group norm failed; using libtorch ops"),
                    );
                }
                None
            }
        }
    }
}

/// Group norms of this process that ran as the fused kernels, and those where the kernels failed and
/// libtorch's ops ran instead.
struct NormCounts {
    fused: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

static NORMS: NormCounts =
    NormCounts { fused: std::sync::atomic::AtomicU64::new(0), failed: std::sync::atomic::AtomicU64::new(0) };

/// Which group-norm path this process's UNets have taken so far, for manifests and shard records:
/// `fused` (the CUDA kernels every time), `fused-with-fallbacks` (the kernels failed at least once and
/// libtorch's ops ran there), or `libtorch` (never the kernels: the CPU, a build without them, another
/// layout, or `DDPM_FUSED_GROUP_NORM=0`).
pub fn group_norm_path() -> &'static str {
    use std::sync::atomic::Ordering::Relaxed;
    match (NORMS.fused.load(Relaxed), NORMS.failed.load(Relaxed)) {
        (_, 1..) => "fused-with-fallbacks",
        (1.., 0) => "fused",
        (0, 0) => "libtorch",
    }
}

/// The fused group-norm kernels are used where built, unless `DDPM_FUSED_GROUP_NORM=0` (read once): the
/// switch for side-by-side benchmarks and for ruling them out when a result looks wrong.
pub fn fused_group_norm_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        crate::cuda::KERNELS_BUILT && std::env::var("DDPM_FUSED_GROUP_NORM").map_or(true, |v| v != "0")
    })
}

/// Group norm of a channels-last `[B, C, H, W]` input, channels-last out: the statistics by one Welford
/// reduction over the NHWC memory viewed as `[B, HW, G, C/G]` (fp16: two float32 reductions; biased
/// variance, as GroupNorm), the
/// normalisation and affine folded into one per-(sample, channel) scale and shift in float32 and applied
/// by one fused multiply-add, `y = x·(γ/σ) + (β − μ·γ/σ)` (Wu & He 2018, eq. 1).
pub fn group_norm_nhwc(xs: &Tensor, groups: i64, weight: &Tensor, bias: &Tensor, eps: f64) -> Tensor {
    let Ok((b, c, h, w)) = xs.size4() else { return xs.shallow_clone() };
    let per_group = c / groups;
    let grouped = xs.permute([0, 2, 3, 1]).view([b, h * w, groups, per_group]);
    let float = tch::Kind::Float;
    let axes = [1i64, 3];
    let (var, mean) = if xs.kind() == tch::Kind::Half {
        // fp16 ends at 65504, so a group's variance would overflow once its standard deviation passes
        // 256: accumulate and return the moments in float32 instead (two reductions, no float copy).
        let n = (h * w * per_group) as f64;
        let mean = grouped.sum_dim_intlist(axes.as_slice(), true, float) / n;
        let mean_square = grouped.norm_scalaropt_dim_dtype(2, axes.as_slice(), true, float).square() / n;
        ((mean_square - mean.square()).clamp_min(0.0), mean)
    } else {
        grouped.var_mean_correction(axes.as_slice(), 0, true)
    };
    let rstd = (var.to_kind(float) + eps).rsqrt(); // [B, 1, G, 1]
    let scale = rstd * weight.to_kind(float).view([1, 1, groups, per_group]); // [B, 1, G, C/G]
    let shift = bias.to_kind(float).view([1, 1, groups, per_group]) - mean.to_kind(float) * &scale;
    let as_bc11 = |t: Tensor| t.view([b, c, 1, 1]).to_kind(xs.kind());
    as_bc11(shift).addcmul(xs, &as_bc11(scale))
}

pub fn conv2d(vs: nn::Path, cin: i64, cout: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    nn::conv2d(vs, cin, cout, k, nn::ConvConfig { stride, padding, ..Default::default() })
}

/// The resnets' non-linearity (`act_fn`, diffusers' `get_activation`): SiLU unless the config says
/// otherwise. Only SiLU has fused kernels; the others run as libtorch ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Mish,
    /// `nn.GELU()`: the exact (erf) form.
    Gelu,
    Relu,
}

impl Activation {
    /// `get_activation`'s names (`swish` is SiLU).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "mish" => Some(Activation::Mish),
            "gelu" => Some(Activation::Gelu),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Silu => x.silu(),
            Activation::Mish => x.mish(),
            Activation::Gelu => x.gelu("none"),
            Activation::Relu => x.relu(),
        }
    }

    /// In place, on a tensor the caller owns.
    fn apply_(self, x: &mut Tensor) {
        match self {
            Activation::Silu => drop(x.silu_()),
            Activation::Relu => drop(x.relu_()),
            other => *x = other.apply(x),
        }
    }
}

/// How the time embedding enters the block (`resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// `h = norm2(h + proj(t))`.
    Default,
    /// `h = norm2(h) * (1 + scale) + shift`, with `proj(t)` split into scale and shift.
    ScaleShift,
}

/// A resnet block that also resamples (diffusers' `ResnetBlock2D(down=True)` / `(up=True)` with no
/// FIR kernel, what `downsample_type` / `upsample_type` `"resnet"` put in attention blocks): after
/// `norm1` and the non-linearity, both the hidden state and the shortcut are average-pooled 2×2
/// (`Downsample2D(use_conv=False)`) or repeated 2×2 by nearest interpolation (`Upsample2D(use_conv=False)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Down,
    Up,
}

impl Resample {
    /// One tensor resampled, as diffusers does (the upsampler makes batches of 64 or more, and huge
    /// tensors, contiguous first: the layout selects the kernel).
    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Resample::Down => x.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>),
            Resample::Up => {
                let b = x.size().first().copied().unwrap_or(0);
                let x = if b >= 64 || x.numel() * 2 > (1usize << 31) {
                    x.contiguous()
                } else {
                    x.shallow_clone()
                };
                x.upsample_nearest2d_vec(None::<&[i64]>, [2.0, 2.0].as_slice())
            }
        }
    }
}

#[derive(Debug)]
pub struct ResnetBlock2D {
    resample: Option<Resample>,
    norm1: GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: nn::Linear,
    norm2: GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
    time_embedding_norm: TimeEmbeddingNorm,
    output_scale_factor: f64,
    act: Activation,
}

pub struct ResnetConfig {
    pub act: Activation,
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
            resample: None,
            norm1: group_norm(&vs / "norm1", c.groups, cin, c.eps),
            conv1: conv2d(&vs / "conv1", cin, cout, 3, 1, 1),
            time_emb_proj: nn::linear(&vs / "time_emb_proj", c.temb_channels, temb_out, Default::default()),
            norm2: group_norm(&vs / "norm2", c.groups, cout, c.eps),
            conv2: conv2d(&vs / "conv2", cout, cout, 3, 1, 1),
            conv_shortcut: (cin != cout).then(|| conv2d(&vs / "conv_shortcut", cin, cout, 1, 1, 0)),
            time_embedding_norm: c.time_embedding_norm,
            output_scale_factor: c.output_scale_factor,
            act: c.act,
        }
    }

    /// A `channels`-wide block that resamples (the downsampler or upsampler of an attention block).
    pub fn resampling(vs: nn::Path, channels: i64, c: &ResnetConfig, resample: Resample) -> Self {
        Self { resample: Some(resample), ..Self::new(vs, channels, channels, c) }
    }

    /// `temb` is the time embedding after the block's non-linearity (shared by every block: diffusers
    /// applies the same `nonlinearity(temb)` in each one).
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, fast: bool) -> Tensor {
        if fast {
            return self.forward_fast(xs, temb);
        }
        let h = self.act.apply(&self.norm1.forward(xs));
        let (xs, h) = match self.resample {
            Some(r) => (r.apply(xs), r.apply(&h)),
            None => (xs.shallow_clone(), h),
        };
        let xs = &xs;
        let h = self.conv1.forward(&h);
        let temb = self.time_emb_proj.forward(temb).unsqueeze(-1).unsqueeze(-1);
        let h = match self.time_embedding_norm {
            TimeEmbeddingNorm::Default => self.norm2.forward(&(h + temb)),
            TimeEmbeddingNorm::ScaleShift => {
                let parts = temb.chunk(2, 1);
                self.norm2.forward(&h) * (&parts[0] + 1.0) + &parts[1]
            }
        };
        // Dropout is the identity at inference.
        let h = self.conv2.forward(&self.act.apply(&h));
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
    /// Same operations in the same order; only kernels differ (last-bit differences). On CUDA each norm,
    /// the SiLU after it and the time-embedding add before `norm2` are one fused call where built
    /// ([`GroupNorm::fused`]; the sum `h + temb` then stays in float32 instead of being rounded to the
    /// activations' dtype first).
    fn forward_fast(&self, xs: &Tensor, temb: &Tensor) -> Tensor {
        let silu = self.act == Activation::Silu;
        let h = silu.then(|| self.norm1.fused(xs, None, true)).flatten().unwrap_or_else(|| {
            let mut h = self.norm1.forward_fast(xs);
            self.act.apply_(&mut h);
            h
        });
        let (xs, h) = match self.resample {
            Some(r) => (r.apply(xs), r.apply(&h)),
            None => (xs.shallow_clone(), h),
        };
        let xs = &xs;
        let mut h = self.conv1.forward(&h);
        let temb = self.time_emb_proj.forward(temb);
        let fused = match self.time_embedding_norm {
            TimeEmbeddingNorm::Default if silu => self.norm2.fused(&h, Some(&temb), true),
            _ => None,
        };
        let h = fused.unwrap_or_else(|| {
            let temb = temb.unsqueeze(-1).unsqueeze(-1);
            let mut h = match self.time_embedding_norm {
                TimeEmbeddingNorm::Default => {
                    let _ = h.g_add_(&temb);
                    self.norm2.forward_fast(&h)
                }
                TimeEmbeddingNorm::ScaleShift => {
                    let parts = temb.chunk(2, 1);
                    let mut n = self.norm2.forward_fast(&h);
                    let _ = n.g_mul_(&(&parts[0] + 1.0)).g_add_(&parts[1]);
                    n
                }
            };
            self.act.apply_(&mut h);
            h
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// The channels-last norm equals libtorch's (to float32 rounding) and keeps the layout; checked
    /// on the CPU, where its kernels are the same TensorIterator reduction and pointwise ops.
    #[test]
    fn group_norm_nhwc_matches_libtorchs_and_stays_channels_last() {
        tch::manual_seed(0);
        let xs = crate::model::channels_last(
            &(Tensor::randn([3, 64, 5, 7], (Kind::Float, Device::Cpu)) * 3.0 + 1.5),
        );
        let weight = Tensor::randn([64], (Kind::Float, Device::Cpu));
        let bias = Tensor::randn([64], (Kind::Float, Device::Cpu));
        let ours = group_norm_nhwc(&xs, 32, &weight, &bias, 1e-6);
        let theirs = xs.contiguous().group_norm(32, Some(&weight), Some(&bias), 1e-6, false);
        assert!(is_channels_last(&ours));
        let delta = (&ours - &theirs).abs().max().double_value(&[]);
        assert!(delta < 1e-5, "max |Δ| {delta}");
        // fp16 with a standard deviation past 256 (its variance is past fp16's range).
        let big = &xs * 1000.0;
        let theirs_big = big.contiguous().group_norm(32, Some(&weight), Some(&bias), 1e-6, false);
        let half = group_norm_nhwc(&big.to_kind(Kind::Half), 32, &weight, &bias, 1e-6);
        let delta = (half.to_kind(Kind::Float) - &theirs_big).abs().max().double_value(&[]);
        assert!(delta < 0.05, "max |Δ| {delta}");
        // bf16 in, bf16 out.
        let half = group_norm_nhwc(&xs.to_kind(Kind::BFloat16), 32, &weight, &bias, 1e-6);
        assert_eq!(half.kind(), Kind::BFloat16);
        let delta = (half.to_kind(Kind::Float) - &theirs).abs().max().double_value(&[]);
        assert!(delta < 0.1, "max |Δ| {delta}");
    }

    /// The fused kernels against libtorch's ops in float32, `silu?(group_norm(x + addend))`, over shapes
    /// with odd sizes, 1 to 256 chunks, channel counts of the UNet (concatenations included) and one
    /// group per 4 to 16 channels; also bit-identical on a rerun and whatever else is in the batch. It
    /// needs a CUDA device: `cargo test --release --lib -- --ignored fused_group_norm`.
    #[test]
    #[ignore = "needs a CUDA device and a build with the fused kernels"]
    fn fused_group_norm_matches_libtorch_on_cuda() {
        assert!(tch::Cuda::is_available(), "no CUDA device");
        let device = Device::Cuda(0);
        let float = (Kind::Float, device);
        tch::manual_seed(0);
        let shapes = [
            (1, 128, 1, 1),
            (3, 128, 7, 9),
            (2, 384, 16, 16),
            (32, 512, 16, 16),
            (2, 256, 33, 17),
            (4, 128, 64, 64),
            // Past 32 chunks of 256 rows, with a short last one: the finalize's warp merges several
            // chunks per lane before the lanes are merged.
            (2, 128, 96, 100),
            // 256 chunks, as each norm of a 256×256 model's first level has.
            (1, 128, 256, 256),
        ];
        for (b, c, h, w) in shapes {
            let xs = crate::model::channels_last(&(Tensor::randn([b, c, h, w], float) * 3.0 + 1.5));
            let weight = Tensor::randn([c], float);
            let bias = Tensor::randn([c], float);
            let addend = Tensor::randn([b, c], float) * 2.0;
            for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
                let (x, wk, bk, ak) =
                    (xs.to_kind(kind), weight.to_kind(kind), bias.to_kind(kind), addend.to_kind(kind));
                for (add, silu) in [(false, false), (false, true), (true, true)] {
                    let input = if add {
                        x.to_kind(Kind::Float) + ak.to_kind(Kind::Float).view([b, c, 1, 1])
                    } else {
                        x.to_kind(Kind::Float)
                    };
                    let mut reference = input.contiguous().group_norm(
                        32,
                        Some(&wk.to_kind(Kind::Float)),
                        Some(&bk.to_kind(Kind::Float)),
                        1e-6,
                        false,
                    );
                    if silu {
                        reference = reference.silu();
                    }
                    let run =
                        || crate::cuda::group_norm_nhwc(&x, &wk, &bk, add.then_some(&ak), 32, 1e-6, silu);
                    let ours = run().expect("fused group norm");
                    assert!(is_channels_last(&ours) && ours.kind() == kind, "{b}x{c}x{h}x{w} {kind:?}");
                    let scale = reference.abs().max().double_value(&[]);
                    let delta = (ours.to_kind(Kind::Float) - &reference).abs().max().double_value(&[]);
                    let tolerance = match kind {
                        Kind::Float => 1e-5,
                        Kind::Half => 2e-3,
                        _ => 1.6e-2,
                    };
                    assert!(
                        delta <= tolerance * scale,
                        "{b}x{c}x{h}x{w} {kind:?} add {add} silu {silu}: max |Δ| {delta} of {scale}"
                    );
                    assert!(ours.equal(&run().expect("rerun")), "not repeatable: {b}x{c}x{h}x{w} {kind:?}");
                    // The first sample alone gives the same bits as in its batch.
                    let alone = crate::cuda::group_norm_nhwc(
                        &crate::model::channels_last(&x.narrow(0, 0, 1)),
                        &wk,
                        &bk,
                        add.then(|| ak.narrow(0, 0, 1)).as_ref(),
                        32,
                        1e-6,
                        silu,
                    )
                    .expect("one sample");
                    assert!(alone.equal(&ours.narrow(0, 0, 1)), "batch-dependent: {b}x{c}x{h}x{w} {kind:?}");
                }
            }
        }
        // fp16 with a standard deviation past 256: moments in float32 stay finite.
        let big =
            crate::model::channels_last(&(Tensor::randn([2, 128, 8, 8], float) * 3000.0)).to_kind(Kind::Half);
        let (w16, b16) =
            (Tensor::ones([128], (Kind::Half, device)), Tensor::zeros([128], (Kind::Half, device)));
        let out = crate::cuda::group_norm_nhwc(&big, &w16, &b16, None, 32, 1e-6, false).expect("fp16");
        let reference = big.to_kind(Kind::Float).contiguous().group_norm(
            32,
            None::<&Tensor>,
            None::<&Tensor>,
            1e-6,
            false,
        );
        let delta = (out.to_kind(Kind::Float) - reference).abs().max().double_value(&[]);
        assert!(delta < 0.01, "fp16 large: max |Δ| {delta}");
    }
}
