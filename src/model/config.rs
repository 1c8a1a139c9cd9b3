//! `UNet2DModel`'s `config.json`, read the way diffusers reads it.
//!
//! Defaults are those of `UNet2DModel.__init__` (diffusers `src/diffusers/models/unets/unet_2d.py`); note
//! that a file that omits `attention_head_dim` gets 8, while an explicit `null` means one head per block.
//! Class conditioning follows `UNet2DModel.__init__`'s own branches ([`UNet2DConfig::class_embedding`]).
//! What we do not build (Fourier time embeddings, other block types and activations) is refused by [`UNet2DConfig::validate`] with the key named and the reason, never
//! approximated.

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

/// How a `UNet2DModel` embeds its class labels, by `UNet2DModel.__init__`'s branches: the embedding is
/// added to the time embedding (`emb = emb + class_emb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassEmbedding {
    /// `class_embed_type: null` with `num_class_embeds`: an `nn.Embedding(num_class_embeds,
    /// time_embed_dim)` looked up by class index.
    Table { classes: i64 },
    /// `"timestep"`: the label goes through the sinusoidal time projection, then its own
    /// `TimestepEmbedding` MLP; any integer is a label.
    Timestep,
    /// `"identity"`: the label is itself a `time_embed_dim`-wide vector.
    Identity,
}

/// The time projection `UNet2DModel` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbedding {
    /// `"positional"`: sinusoidal features (`Timesteps`).
    Positional,
    /// `"learned"`: an `nn.Embedding(num_train_timesteps, block_out_channels[0])` looked up by timestep.
    Learned { num_train_timesteps: i64 },
}

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

    /// The class embedding diffusers builds for this config, or `None` for an unconditional model.
    /// Mirrors `UNet2DModel.__init__`: `num_class_embeds` counts only when `class_embed_type` is null,
    /// and a `class_embed_type` other than `"timestep"` or `"identity"` builds no embedding at all.
    pub fn class_embedding(&self) -> Option<ClassEmbedding> {
        match (self.class_embed_type.as_deref(), self.num_class_embeds) {
            (None, Some(classes)) => Some(ClassEmbedding::Table { classes }),
            (Some("timestep"), _) => Some(ClassEmbedding::Timestep),
            (Some("identity"), _) => Some(ClassEmbedding::Identity),
            _ => None,
        }
    }

    /// The time projection; `validate` has checked `learned` has its table size.
    pub fn time_embedding(&self) -> TimeEmbedding {
        match (self.time_embedding_type.as_str(), self.num_train_timesteps) {
            ("learned", Some(n)) => TimeEmbedding::Learned { num_train_timesteps: n },
            _ => TimeEmbedding::Positional,
        }
    }

    /// Attention heads and head size of an attention block `channels` wide, as diffusers' blocks make
    /// them: `heads = channels // attention_head_dim` heads of `attention_head_dim` (inner width
    /// `heads × attention_head_dim`, which may be narrower than the block); a null head size means one
    /// head of the block's width.
    pub fn attention_heads(&self, channels: i64) -> (i64, i64) {
        match self.attention_head_dim {
            Some(d) => (channels / d, d),
            None => (1, channels),
        }
    }

    /// The resnets' non-linearity (`validate` has checked `act_fn` names one).
    pub fn activation(&self) -> super::resnet::Activation {
        super::resnet::Activation::from_name(&self.act_fn).unwrap_or(super::resnet::Activation::Silu)
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
        // `UNet2DModel` builds a `UNetMidBlock2D` for any non-null `mid_block_type`, whatever it names.
        match (self.time_embedding_type.as_str(), self.num_train_timesteps) {
            ("positional", _) => {}
            ("learned", Some(n)) if n > 0 => {}
            ("learned", n) => {
                return Err(ModelError::Config(format!(
                    "time_embedding_type = \"learned\" needs num_train_timesteps (the size of its table), \
                     which is {n:?}"
                )));
            }
            ("fourier", _) => {
                return Err(ModelError::Unsupported(
                    "time_embedding_type = \"fourier\" is not supported: it is the score-SDE (NCSN++) \
                     parameterization, which takes the log of the timestep and divides the output by it, so \
                     the integer timesteps of DDPM-family schedulers (t = 0 included) make it infinite"
                        .into(),
                ));
            }
            (other, _) => return unsupported("time_embedding_type", &other),
        }
        if let Some(ClassEmbedding::Table { classes }) = self.class_embedding()
            && classes < 1
        {
            return Err(ModelError::Config(format!("num_class_embeds = {classes} must be at least 1")));
        }
        // `downsample_type` and `upsample_type` reach the attention blocks only (`get_down_block` gives the
        // plain ones their conv sampler whatever the config says), and only those that resample.
        let resampling_attn_down = (0..n.saturating_sub(1)).any(|i| self.down_kind(i) == BlockKind::Attn);
        let resampling_attn_up = (0..n.saturating_sub(1)).any(|i| self.up_kind(i) == BlockKind::Attn);
        for (key, value, used) in [
            ("downsample_type", &self.downsample_type, resampling_attn_down),
            ("upsample_type", &self.upsample_type, resampling_attn_up),
        ] {
            match value.as_str() {
                "conv" | "resnet" => {}
                _ if !used => {}
                other => {
                    return Err(ModelError::Config(format!(
                        "{key} = {other:?}: diffusers builds no resampler for it in an attention block, so \
                         the levels' sizes do not meet (\"conv\" or \"resnet\")"
                    )));
                }
            }
        }
        if super::resnet::Activation::from_name(&self.act_fn).is_none() {
            return Err(ModelError::Config(format!(
                "act_fn = {:?} is not an activation diffusers' get_activation knows (silu, swish, mish, gelu, \
                 relu)",
                self.act_fn
            )));
        }
        match self.resnet_time_scale_shift.as_str() {
            "default" | "scale_shift" => {}
            shift @ ("ada_group" | "spatial") => {
                return Err(ModelError::Unsupported(format!(
                    "resnet_time_scale_shift = {shift:?} is not supported: diffusers' ResnetBlock2D refuses it too \
                     (it needs ResnetBlockCondNorm2D, which UNet2DModel's blocks do not build)"
                )));
            }
            other => return unsupported("resnet_time_scale_shift", &other),
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
            // A head size that does not divide the width is what diffusers runs (`c // d` heads, an inner
            // width of heads × d); one wider than the block leaves no head, and diffusers' attention
            // processor divides by the head count.
            for c in attn_widths {
                if d <= 0 || d > c {
                    return Err(ModelError::Config(format!(
                        "attention_head_dim = {d} leaves an attention block of width {c} with no head \
                         (heads = width // attention_head_dim)"
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
            r#"{"block_out_channels":[8,12],"norm_num_groups":4,"attention_head_dim":16,"down_block_types":["DownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","UpBlock2D"]}"#,
        ] {
            let err = UNet2DConfig::from_json(bad).unwrap_err();
            assert!(err.to_string().contains("attention_head_dim"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_head_size_that_does_not_divide_the_width_makes_heads_as_diffusers_does() {
        // diffusers: `heads = width // attention_head_dim`, each `attention_head_dim` wide.
        let config = UNet2DConfig::from_json(r#"{"block_out_channels":[8,12],"norm_num_groups":4,"down_block_types":["DownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","UpBlock2D"]}"#).unwrap();
        assert_eq!(config.attention_heads(12), (1, 8));
        assert_eq!(config.attention_heads(64), (8, 8));
        let null = UNet2DConfig { attention_head_dim: None, ..config };
        assert_eq!(null.attention_heads(12), (1, 12));
    }

    #[test]
    fn class_embeddings_follow_diffusers_branches() {
        let with = |extra: &str| {
            UNet2DConfig::from_json(&format!(
                r#"{{"block_out_channels":[32,64],"down_block_types":["DownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","UpBlock2D"]{extra}}}"#
            ))
            .unwrap()
            .class_embedding()
        };
        assert_eq!(with(""), None);
        assert_eq!(with(r#","num_class_embeds":11"#), Some(ClassEmbedding::Table { classes: 11 }));
        // `num_class_embeds` is read only when `class_embed_type` is null.
        assert_eq!(
            with(r#","class_embed_type":"timestep","num_class_embeds":11"#),
            Some(ClassEmbedding::Timestep)
        );
        assert_eq!(with(r#","class_embed_type":"identity""#), Some(ClassEmbedding::Identity));
        // UNet2DModel builds no class embedding for the types only UNet2DConditionModel knows.
        assert_eq!(with(r#","class_embed_type":"projection","num_class_embeds":11"#), None);
    }

    #[test]
    fn samplers_and_time_embeddings_are_refused_with_their_reason() {
        let with = |extra: &str| {
            UNet2DConfig::from_json(&format!(
                r#"{{"block_out_channels":[32,64],"attention_head_dim":null,"down_block_types":["AttnDownBlock2D","DownBlock2D"],"up_block_types":["UpBlock2D","UpBlock2D"]{extra}}}"#
            ))
        };
        with(r#","downsample_type":"resnet""#).unwrap();
        let err = with(r#","downsample_type":"pool""#).unwrap_err().to_string();
        assert!(err.contains("no resampler"), "{err}");
        // Up blocks without attention ignore upsample_type, as diffusers does.
        with(r#","upsample_type":"resnet""#).unwrap();
        let err = with(r#","time_embedding_type":"learned""#).unwrap_err().to_string();
        assert!(err.contains("num_train_timesteps"), "{err}");
        with(r#","time_embedding_type":"learned","num_train_timesteps":1000"#).unwrap();
        let err = with(r#","time_embedding_type":"fourier""#).unwrap_err().to_string();
        assert!(err.contains("infinite"), "{err}");
        // Any mid_block_type makes diffusers' UNetMidBlock2D.
        with(r#","mid_block_type":"UNetMidBlock2DCrossAttn""#).unwrap();
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
