//! `UNet2DModel`'s `config.json`, read the way diffusers reads it.
//!
//! Defaults are those of `UNet2DModel.__init__` (diffusers `src/diffusers/models/unets/unet_2d.py`); note
//! that a file that omits `attention_head_dim` gets 8, while an explicit `null` means one head per block.
//! Anything we do not build (Fourier/learned time embeddings, class embeddings, resnet up/down sampling,
//! other block types) is refused by [`UNet2DConfig::validate`] with the key named, never approximated.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ModelError;

/// The `UNet2DModel` options this crate builds. Unknown keys (`_class_name`, `_diffusers_version`, …) are
/// kept out; keys whose non-default values we cannot honour are checked in `validate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNet2DConfig {
    pub sample_size: Option<SampleSize>,
    pub in_channels: i64,
    pub out_channels: i64,
    pub center_input_sample: bool,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<i64>,
    pub freq_shift: f64,
    pub flip_sin_to_cos: bool,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub mid_block_scale_factor: f64,
    pub downsample_padding: i64,
    pub downsample_type: String,
    pub upsample_type: String,
    pub dropout: f64,
    pub act_fn: String,
    /// `None` is an explicit JSON `null`: one head of the block's width.
    #[serde(deserialize_with = "explicit_null")]
    pub attention_head_dim: Option<i64>,
    pub norm_num_groups: Option<i64>,
    pub attn_norm_num_groups: Option<i64>,
    pub norm_eps: f64,
    pub resnet_time_scale_shift: String,
    pub add_attention: bool,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<i64>,
    pub num_train_timesteps: Option<i64>,
}

/// `sample_size` is an int or an `[h, w]` pair.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(i64),
    Rect([i64; 2]),
}

impl SampleSize {
    pub fn hw(self) -> (i64, i64) {
        match self {
            SampleSize::Square(s) => (s, s),
            SampleSize::Rect([h, w]) => (h, w),
        }
    }
}

fn explicit_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Option::<i64>::deserialize(d)
}

impl Default for UNet2DConfig {
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]
                .map(String::from)
                .to_vec(),
            mid_block_type: Some("UNetMidBlock2D".into()),
            up_block_types: ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
                .map(String::from)
                .to_vec(),
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".into(),
            upsample_type: "conv".into(),
            dropout: 0.0,
            act_fn: "silu".into(),
            attention_head_dim: Some(8),
            norm_num_groups: Some(32),
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: "default".into(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
        }
    }
}

/// The largest image side we accept: a 2048² sample already needs tens of GB of activations per image
/// with this architecture; a config asking for more is a mistake, not a workload.
pub const MAX_SAMPLE_SIZE: i64 = 2048;
/// Resolution levels (`block_out_channels` entries) at most: the sample is halved once per level.
const MAX_LEVELS: usize = 12;

/// The block kinds of `get_down_block` / `get_up_block` we build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Plain,
    Attn,
}

impl UNet2DConfig {
    /// Parses a `config.json`, refusing a file that is not a `UNet2DModel`.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ModelError::Config(e.to_string()))?;
        if let Some(class) = value.get("_class_name").and_then(Value::as_str)
            && class != "UNet2DModel"
        {
            return Err(ModelError::Unsupported(format!(
                "_class_name {class:?}: only UNet2DModel checkpoints are supported"
            )));
        }
        let config: Self = serde_json::from_value(value).map_err(|e| ModelError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_json(&self) -> String {
        let mut value = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut value {
            map.insert("_class_name".into(), Value::String("UNet2DModel".into()));
            map.insert("_diffusers_version".into(), Value::String("0.42.1".into()));
        }
        serde_json::to_string_pretty(&value).unwrap_or_default()
    }

    /// Height and width of a generated image.
    pub fn sample_hw(&self) -> Result<(i64, i64), ModelError> {
        self.sample_size
            .map(SampleSize::hw)
            .ok_or_else(|| ModelError::Unsupported("sample_size is null; the image size is unknown".into()))
    }

    pub fn time_embed_dim(&self) -> i64 {
        self.time_embedding_dim.unwrap_or(self.block_out_channels[0] * 4)
    }

    /// `norm_num_groups` (a null falls back to `min(C0 / 4, 32)` as diffusers does for the output norm).
    pub fn groups(&self) -> i64 {
        self.norm_num_groups.unwrap_or_else(|| (self.block_out_channels[0] / 4).min(32))
    }

    pub fn down_kind(&self, i: usize) -> BlockKind {
        block_kind(&self.down_block_types[i])
    }

    pub fn up_kind(&self, i: usize) -> BlockKind {
        block_kind(&self.up_block_types[i])
    }

    /// Every option that would change the network from what `model::unet_2d` builds is an error here.
    pub fn validate(&self) -> Result<(), ModelError> {
        self.check_supported()?;
        self.check_shapes()
    }

    /// Block types and options we build, with as many blocks as widths.
    fn check_supported(&self) -> Result<(), ModelError> {
        let unsupported = |key: &str, value: &dyn std::fmt::Debug| {
            Err(ModelError::Unsupported(format!("{key} = {value:?} is not supported")))
        };
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(ModelError::Config("block_out_channels is empty".into()));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(ModelError::Config(format!(
                "block_out_channels has {n} entries but down_block_types has {} and up_block_types {}",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        for t in &self.down_block_types {
            if !matches!(t.as_str(), "DownBlock2D" | "AttnDownBlock2D") {
                return unsupported("down_block_types", t);
            }
        }
        for t in &self.up_block_types {
            if !matches!(t.as_str(), "UpBlock2D" | "AttnUpBlock2D") {
                return unsupported("up_block_types", t);
            }
        }
        if self.mid_block_type.as_deref().is_some_and(|m| m != "UNetMidBlock2D") {
            return unsupported("mid_block_type", &self.mid_block_type);
        }
        if self.time_embedding_type != "positional" {
            return unsupported("time_embedding_type", &self.time_embedding_type);
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            return unsupported(
                "class_embed_type/num_class_embeds",
                &(&self.class_embed_type, self.num_class_embeds),
            );
        }
        if self.downsample_type != "conv" {
            return unsupported("downsample_type", &self.downsample_type);
        }
        if self.upsample_type != "conv" {
            return unsupported("upsample_type", &self.upsample_type);
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return unsupported("act_fn", &self.act_fn);
        }
        if !matches!(self.resnet_time_scale_shift.as_str(), "default" | "scale_shift") {
            return unsupported("resnet_time_scale_shift", &self.resnet_time_scale_shift);
        }
        Ok(())
    }

    /// Widths, groups, heads and sizes that fit together.
    fn check_shapes(&self) -> Result<(), ModelError> {
        let unsupported = |key: &str, value: &dyn std::fmt::Debug| {
            Err(ModelError::Unsupported(format!("{key} = {value:?} is not supported")))
        };
        let n = self.block_out_channels.len();
        let groups = self.groups();
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c <= 0 || groups <= 0 || c % groups != 0 {
                return Err(ModelError::Config(format!(
                    "block_out_channels[{i}] = {c} is not a positive multiple of norm_num_groups = {groups}"
                )));
            }
        }
        // Heads are `width / attention_head_dim` only where there is attention (diffusers' unet_2d.py
        // passes the head size to attention blocks and the mid block; plain blocks ignore it).
        if let Some(d) = self.attention_head_dim {
            let up_widths = self.block_out_channels.iter().rev();
            let attn_widths = (self.block_out_channels.iter().zip(&self.down_block_types))
                .chain(up_widths.zip(&self.up_block_types))
                .filter(|(_, kind)| block_kind(kind) == BlockKind::Attn)
                .map(|(c, _)| *c)
                .chain(self.add_attention.then_some(self.block_out_channels[n - 1]));
            for c in attn_widths {
                if d <= 0 || c % d != 0 {
                    return Err(ModelError::Config(format!(
                        "an attention block of width {c} is not a multiple of attention_head_dim = {d}"
                    )));
                }
            }
        }
        if let Some(g) = self.attn_norm_num_groups
            && (g <= 0 || self.block_out_channels[n - 1] % g != 0)
        {
            return Err(ModelError::Config(format!(
                "attn_norm_num_groups = {g} does not divide the mid block width"
            )));
        }
        if self.layers_per_block < 1 || self.in_channels < 1 || self.out_channels < 1 {
            return Err(ModelError::Config(
                "layers_per_block, in_channels and out_channels must be positive".into(),
            ));
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return Err(ModelError::Config(format!("norm_eps = {} must be positive", self.norm_eps)));
        }
        if !matches!(self.downsample_padding, 0 | 1) {
            return unsupported("downsample_padding", &self.downsample_padding);
        }
        if n > MAX_LEVELS {
            return Err(ModelError::Config(format!(
                "{n} resolution levels; at most {MAX_LEVELS} are supported"
            )));
        }
        if let Some((h, w)) = self.sample_size.map(SampleSize::hw) {
            let factor = 1i64 << (n - 1);
            if h <= 0 || w <= 0 || h % factor != 0 || w % factor != 0 {
                return Err(ModelError::Config(format!(
                    "sample_size {h}x{w} must be a positive multiple of {factor} ({n} resolution levels)"
                )));
            }
            if h > MAX_SAMPLE_SIZE || w > MAX_SAMPLE_SIZE {
                return Err(ModelError::Config(format!(
                    "sample_size {h}x{w} is larger than {MAX_SAMPLE_SIZE} pixels a side"
                )));
            }
        }
        if !matches!(self.in_channels, 1 | 3) || self.out_channels != self.in_channels {
            return Err(ModelError::Unsupported(format!(
                "in_channels = {} and out_channels = {}: images are grayscale (1, 1) or RGB (3, 3)",
                self.in_channels, self.out_channels
            )));
        }
        Ok(())
    }
}

fn block_kind(name: &str) -> BlockKind {
    if name.starts_with("Attn") { BlockKind::Attn } else { BlockKind::Plain }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn omitted_head_dim_defaults_to_8_but_null_means_one_head() {
        let omitted = UNet2DConfig::from_json(r#"{"block_out_channels":[32,64],"down_block_types":["DownBlock2D","AttnDownBlock2D"],"up_block_types":["AttnUpBlock2D","UpBlock2D"]}"#).unwrap();
        assert_eq!(omitted.attention_head_dim, Some(8));
        let null = UNet2DConfig::from_json(r#"{"block_out_channels":[32,64],"down_block_types":["DownBlock2D","AttnDownBlock2D"],"up_block_types":["AttnUpBlock2D","UpBlock2D"],"attention_head_dim":null}"#).unwrap();
        assert_eq!(null.attention_head_dim, None);
    }

    #[test]
    fn head_size_is_checked_only_where_there_is_attention() {
        // The dummy UNet of diffusers' own DDPM pipeline tests: a 4-wide plain block, attention at 8.
        let dummy = r#"{"block_out_channels":[4,8],"layers_per_block":1,"norm_num_groups":4,"sample_size":8,
            "down_block_types":["DownBlock2D","AttnDownBlock2D"],"up_block_types":["AttnUpBlock2D","UpBlock2D"]}"#;
        UNet2DConfig::from_json(dummy).unwrap();
        // Attention in the 4-wide block (down or up side), or the mid block at a width 8 does not divide.
        for bad in [
            r#"{"block_out_channels":[4,8],"norm_num_groups":4,"down_block_types":["AttnDownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","UpBlock2D"],"add_attention":false}"#,
            r#"{"block_out_channels":[4,8],"norm_num_groups":4,"down_block_types":["DownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","AttnUpBlock2D"],"add_attention":false}"#,
            r#"{"block_out_channels":[8,12],"norm_num_groups":4,"down_block_types":["DownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","UpBlock2D"]}"#,
        ] {
            let err = UNet2DConfig::from_json(bad).unwrap_err();
            assert!(err.to_string().contains("attention_head_dim"), "{bad}: {err}");
        }
    }

    #[test]
    fn image_size_and_channels_are_bounded() {
        let with = |extra: &str| {
            UNet2DConfig::from_json(&format!(
                r#"{{"block_out_channels":[32,64],"down_block_types":["DownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","UpBlock2D"]{extra}}}"#
            ))
        };
        let err = with(r#","sample_size":100000"#).unwrap_err();
        assert!(err.to_string().contains("larger than 2048"), "{err}");
        with(r#","sample_size":2048"#).unwrap();
        with(r#","in_channels":1,"out_channels":1"#).unwrap();
        for bad in [r#","in_channels":1"#, r#","in_channels":4,"out_channels":4"#] {
            let err = with(bad).unwrap_err();
            assert!(err.to_string().contains("grayscale"), "{bad}: {err}");
        }
    }

    #[test]
    fn unsupported_options_are_named() {
        let err = UNet2DConfig::from_json(r#"{"time_embedding_type":"fourier"}"#).unwrap_err();
        assert!(err.to_string().contains("time_embedding_type"), "{err}");
        let err = UNet2DConfig::from_json(r#"{"_class_name":"UNet2DConditionModel"}"#).unwrap_err();
        assert!(err.to_string().contains("UNet2DConditionModel"), "{err}");
        let err = UNet2DConfig::from_json(r#"{"down_block_types":["DownBlock2D","CrossAttnDownBlock2D","AttnDownBlock2D","AttnDownBlock2D"]}"#).unwrap_err();
        assert!(err.to_string().contains("CrossAttnDownBlock2D"), "{err}");
    }
}
