//! The down, mid and up blocks of `UNet2DModel` (`diffusers/models/unets/unet_2d_blocks.py`:
//! `DownBlock2D`, `AttnDownBlock2D`, `UNetMidBlock2D`, `UpBlock2D`, `AttnUpBlock2D`).

use tch::{Tensor, nn};

use super::attention::{AttentionConfig, SpatialAttention};
use super::resnet::{Downsample2D, Resample, ResnetBlock2D, ResnetConfig, Upsample2D};

/// What halves or doubles a block's resolution: a convolution (`"conv"`, every plain block's), or a
/// resnet block that resamples (`"resnet"`, in attention blocks only).
#[derive(Debug)]
enum Downsampler {
    Conv(Downsample2D),
    Resnet(Box<ResnetBlock2D>),
}

#[derive(Debug)]
enum Upsampler {
    Conv(Upsample2D),
    Resnet(Box<ResnetBlock2D>),
}

/// `DownBlock2D` (no attentions) or `AttnDownBlock2D` (one attention after every resnet).
#[derive(Debug)]
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialAttention>,
    downsampler: Option<Downsampler>,
}

pub struct DownBlockConfig<'a> {
    pub num_layers: i64,
    pub cin: i64,
    pub cout: i64,
    pub resnet: &'a ResnetConfig,
    /// `Some` for `AttnDownBlock2D`.
    pub attention: Option<&'a AttentionConfig>,
    /// `Some(padding)` unless this is the last block.
    pub downsample_padding: Option<i64>,
    /// Downsample with a resnet block (an attention block with `downsample_type: "resnet"`).
    pub resnet_downsample: bool,
}

impl DownBlock2D {
    pub fn new(vs: nn::Path, c: &DownBlockConfig) -> Self {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..c.num_layers {
            let cin = if j == 0 { c.cin } else { c.cout };
            resnets.push(ResnetBlock2D::new(&vs / "resnets" / j, cin, c.cout, c.resnet));
            if let Some(a) = c.attention {
                attentions.push(SpatialAttention::new(&vs / "attentions" / j, c.cout, a));
            }
        }
        let path = &vs / "downsamplers" / 0;
        let downsampler = c.downsample_padding.map(|p| match c.resnet_downsample {
            true => Downsampler::Resnet(Box::new(ResnetBlock2D::resampling(
                path,
                c.cout,
                c.resnet,
                Resample::Down,
            ))),
            false => Downsampler::Conv(Downsample2D::new(path, c.cout, p)),
        });
        Self { resnets, attentions, downsampler }
    }

    pub fn prepare_fast(&mut self, on: bool) {
        self.attentions.iter_mut().for_each(|a| a.prepare_fast(on));
    }

    /// Returns the block output and appends every skip connection it makes to `skips`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, skips: &mut Vec<Tensor>, fast: bool) -> Tensor {
        let mut h = xs.shallow_clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb, fast);
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h);
            }
            skips.push(h.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            h = match down {
                Downsampler::Conv(conv) => conv.forward(&h),
                Downsampler::Resnet(resnet) => resnet.forward(&h, temb, fast),
            };
            skips.push(h.shallow_clone());
        }
        h
    }
}

/// `UNetMidBlock2D` with one attention layer: resnet, attention, resnet.
#[derive(Debug)]
pub struct UNetMidBlock2D {
    resnets: [ResnetBlock2D; 2],
    attention: Option<SpatialAttention>,
}

impl UNetMidBlock2D {
    pub fn new(
        vs: nn::Path,
        channels: i64,
        resnet: &ResnetConfig,
        attention: Option<&AttentionConfig>,
    ) -> Self {
        Self {
            resnets: [
                ResnetBlock2D::new(&vs / "resnets" / 0, channels, channels, resnet),
                ResnetBlock2D::new(&vs / "resnets" / 1, channels, channels, resnet),
            ],
            attention: attention.map(|a| SpatialAttention::new(&vs / "attentions" / 0, channels, a)),
        }
    }

    pub fn prepare_fast(&mut self, on: bool) {
        if let Some(a) = &mut self.attention {
            a.prepare_fast(on);
        }
    }

    pub fn forward(&self, xs: &Tensor, temb: &Tensor, fast: bool) -> Tensor {
        let mut h = self.resnets[0].forward(xs, temb, fast);
        if let Some(attn) = &self.attention {
            h = attn.forward(&h);
        }
        self.resnets[1].forward(&h, temb, fast)
    }
}

/// `UpBlock2D` or `AttnUpBlock2D`: every resnet consumes one skip, concatenated after the hidden state.
#[derive(Debug)]
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialAttention>,
    upsampler: Option<Upsampler>,
}

pub struct UpBlockConfig<'a> {
    pub num_layers: i64,
    /// Channels of the matching down block's input (the skip of the last resnet).
    pub cin: i64,
    pub prev_cout: i64,
    pub cout: i64,
    pub resnet: &'a ResnetConfig,
    pub attention: Option<&'a AttentionConfig>,
    pub add_upsample: bool,
    /// Upsample with a resnet block (an attention block with `upsample_type: "resnet"`).
    pub resnet_upsample: bool,
}

impl UpBlock2D {
    pub fn new(vs: nn::Path, c: &UpBlockConfig) -> Self {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..c.num_layers {
            let skip = if j == c.num_layers - 1 { c.cin } else { c.cout };
            let resnet_in = if j == 0 { c.prev_cout } else { c.cout };
            resnets.push(ResnetBlock2D::new(&vs / "resnets" / j, resnet_in + skip, c.cout, c.resnet));
            if let Some(a) = c.attention {
                attentions.push(SpatialAttention::new(&vs / "attentions" / j, c.cout, a));
            }
        }
        let path = &vs / "upsamplers" / 0;
        let upsampler = c.add_upsample.then(|| match c.resnet_upsample {
            true => {
                Upsampler::Resnet(Box::new(ResnetBlock2D::resampling(path, c.cout, c.resnet, Resample::Up)))
            }
            false => Upsampler::Conv(Upsample2D::new(path, c.cout)),
        });
        Self { resnets, attentions, upsampler }
    }

    pub fn prepare_fast(&mut self, on: bool) {
        self.attentions.iter_mut().for_each(|a| a.prepare_fast(on));
    }

    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are popped from the end, one per resnet.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, skips: &mut Vec<Tensor>, fast: bool) -> Tensor {
        let mut h = xs.shallow_clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("the UNet builds one skip per up-block resnet. This is a bug.");
            h = resnet.forward(&Tensor::cat(&[h, skip], 1), temb, fast);
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h);
            }
        }
        match &self.upsampler {
            Some(Upsampler::Conv(up)) => up.forward(&h, fast),
            Some(Upsampler::Resnet(up)) => up.forward(&h, temb, fast),
            None => h,
        }
    }
}
