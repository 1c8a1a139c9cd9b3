//! The down, mid and up blocks of `UNet2DModel` (`diffusers/models/unets/unet_2d_blocks.py`:
//! `DownBlock2D`, `AttnDownBlock2D`, `UNetMidBlock2D`, `UpBlock2D`, `AttnUpBlock2D`).

use tch::{Tensor, nn};

use super::attention::{AttentionConfig, SpatialAttention};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};

/// `DownBlock2D` (no attentions) or `AttnDownBlock2D` (one attention after every resnet).
#[derive(Debug)]
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialAttention>,
    downsampler: Option<Downsample2D>,
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
        let downsampler =
            c.downsample_padding.map(|p| Downsample2D::new(&vs / "downsamplers" / 0, c.cout, p));
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
            h = down.forward(&h);
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
    upsampler: Option<Upsample2D>,
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
        let upsampler = c.add_upsample.then(|| Upsample2D::new(&vs / "upsamplers" / 0, c.cout));
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
            Some(up) => up.forward(&h, fast),
            None => h,
        }
    }
}
