//! The diffusers `UNet2DModel` in tch: configuration, network and checkpoint loading.
//!
//! File and type names follow diffusers (`unet_2d.py`, `unet_2d_blocks.py`, `resnet.py`, `embeddings.py`)
//! and variable paths equal the checkpoint keys, so a reader can hold the two side by side.

pub mod attention;
pub mod config;
pub mod embeddings;
pub mod flops;
pub mod graphs;
pub mod resnet;
pub mod unet_2d;
pub mod unet_2d_blocks;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor, nn};

pub use config::UNet2DConfig;
pub use unet_2d::UNet2DModel;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("checkpoint {path} does not match the model: {detail}")]
    KeyMismatch { path: PathBuf, detail: String },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl ModelError {
    fn io(path: &Path, e: impl std::fmt::Display) -> Self {
        ModelError::Io { path: path.to_path_buf(), message: e.to_string() }
    }
}

/// Where a diffusers model's files are: either a pipeline folder with `unet/` and `scheduler/`
/// subfolders (today's `save_pretrained`) or the flat layout of the 2022 google/ddpm-* repositories.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub root: PathBuf,
    pub unet_config: PathBuf,
    pub weights: PathBuf,
    pub scheduler_config: PathBuf,
}

const WEIGHT_NAMES: [&str; 2] = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"];

impl ModelFiles {
    pub fn locate(root: &Path) -> Result<Self, ModelError> {
        if !root.is_dir() {
            return Err(ModelError::io(root, "not a directory"));
        }
        let (unet_dir, scheduler_dir) = if root.join("unet").join("config.json").is_file() {
            (root.join("unet"), root.join("scheduler"))
        } else {
            (root.to_path_buf(), root.to_path_buf())
        };
        let unet_config = unet_dir.join("config.json");
        if !unet_config.is_file() {
            return Err(ModelError::io(
                root,
                "no config.json (nor unet/config.json): not a diffusers model folder",
            ));
        }
        let weights = WEIGHT_NAMES.iter().map(|n| unet_dir.join(n)).find(|p| p.is_file());
        let weights = match weights {
            Some(w) => w,
            None if unet_dir.join("diffusion_pytorch_model.safetensors.index.json").is_file() => {
                return Err(ModelError::Unsupported(format!(
                    "{}: sharded checkpoints are not supported; merge the shards into one file",
                    unet_dir.display()
                )));
            }
            None => {
                return Err(ModelError::io(
                    &unet_dir,
                    "no diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin",
                ));
            }
        };
        let scheduler_config = scheduler_dir.join("scheduler_config.json");
        if !scheduler_config.is_file() {
            return Err(ModelError::io(&scheduler_dir, "no scheduler_config.json"));
        }
        Ok(Self { root: root.to_path_buf(), unet_config, weights, scheduler_config })
    }

    pub fn read_unet_config(&self) -> Result<UNet2DConfig, ModelError> {
        let text =
            std::fs::read_to_string(&self.unet_config).map_err(|e| ModelError::io(&self.unet_config, e))?;
        UNet2DConfig::from_json(&text).map_err(|e| match e {
            ModelError::Config(m) => ModelError::Config(format!("{}: {m}", self.unet_config.display())),
            ModelError::Unsupported(m) => {
                ModelError::Unsupported(format!("{}: {m}", self.unet_config.display()))
            }
            other => other,
        })
    }
}

/// Memory layout of the UNet's activations and convolution weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// diffusers' default: NCHW weights and input. Activations after attention blocks become
    /// channels-last views exactly as in diffusers, so the same kernels run and the results are
    /// bit-identical to diffusers on the same machine.
    #[default]
    Diffusers,
    /// NHWC throughout: oneDNN's faster CPU convolutions (and cuDNN's tensor-core path in half
    /// precision). Results differ from diffusers' in the last float bits (≈1e-5 on a UNet output).
    ChannelsLast,
}

static CUDNN_BENCHMARK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// cuDNN's autotuner (`torch.backends.cudnn.benchmark`) for the UNets this process prepares in the
/// channels-last layout from now on. It times the candidate kernels of each convolution and keeps the
/// fastest, so its picks, and with them the last bits of every image, can differ from one process (or
/// worker, or GPU) to the next; off, cuDNN's heuristics pick the same kernels for the same GPU model and
/// library versions, so workers like that are meant to write a job's images as the same bytes (checked
/// so far only between two threads of one process, on one H200). Off by default.
pub fn set_cudnn_benchmark(on: bool) {
    CUDNN_BENCHMARK.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`LoadedUNet::prepare`] turns cuDNN's autotuner on for a UNet on `device` in `layout`.
pub fn cudnn_benchmark_applies(device: Device, layout: Layout) -> bool {
    device.is_cuda()
        && layout == Layout::ChannelsLast
        && CUDNN_BENCHMARK.load(std::sync::atomic::Ordering::Relaxed)
}

/// `x` with channels-last strides (`x.contiguous(memory_format=torch.channels_last)`, which tch lacks).
pub fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// A UNet with its weights, on one device, in one dtype.
pub struct LoadedUNet {
    pub vs: nn::VarStore,
    pub model: UNet2DModel,
    pub config: UNet2DConfig,
    pub layout: Layout,
    /// Graphs by batch shape, when calls replay them ([`Self::denoise`]).
    graphs: Option<std::cell::RefCell<graphs::GraphCache>>,
    /// Batch shapes this replica has run eagerly (see [`graphs::first_call_lock`]).
    eager_shapes: std::cell::RefCell<std::collections::BTreeSet<Vec<i64>>>,
}

impl LoadedUNet {
    /// Builds the network on `device`, copies the checkpoint in (f32), then casts to `kind`.
    pub fn load(files: &ModelFiles, device: Device, kind: Kind) -> Result<Self, ModelError> {
        let config = files.read_unet_config()?;
        let mut vs = nn::VarStore::new(device);
        let model = UNet2DModel::new(vs.root(), &config);
        let tensors = read_checkpoint(&files.weights)?;
        copy_weights(&mut vs, tensors, &files.weights)?;
        vs.set_kind(kind);
        Ok(Self::assemble(vs, model, config, Layout::Diffusers))
    }

    /// [`Self::load`], laid out for `layout`, replaying CUDA graphs if `cuda_graphs`. On CUDA, cuDNN's
    /// autotuner runs only where [`set_cudnn_benchmark`] asked for it, and in the fast layout only.
    pub fn prepare(
        files: &ModelFiles,
        device: Device,
        kind: Kind,
        layout: Layout,
        cuda_graphs: bool,
    ) -> Result<Self, ModelError> {
        if device.is_cuda() {
            tch::Cuda::cudnn_set_benchmark(cudnn_benchmark_applies(device, layout));
        }
        let mut unet = Self::load(files, device, kind)?;
        unet.set_layout(layout);
        if cuda_graphs {
            unet.set_graphs(Some(graphs::GraphMode::Cuda));
        }
        Ok(unet)
    }

    /// Re-lays the convolution weights out for `layout` (inputs follow in [`Self::forward`]).
    /// The channels-last layout also switches the network to its fast path (fused Q/K/V, in-place
    /// element-wise ops, 1×1 convolutions as matrix products).
    pub fn set_layout(&mut self, layout: Layout) {
        let _guard = tch::no_grad_guard();
        if layout == Layout::ChannelsLast {
            for (_, mut var) in self.vs.variables() {
                if var.dim() == 4 {
                    let relaid = channels_last(&var);
                    var.set_data(&relaid);
                }
            }
        }
        self.model.prepare_fast(layout == Layout::ChannelsLast);
        self.layout = layout;
    }

    /// A UNet of these parts, running eagerly (no graphs, no shapes seen yet).
    fn assemble(vs: nn::VarStore, model: UNet2DModel, config: UNet2DConfig, layout: Layout) -> Self {
        Self { vs, model, config, layout, graphs: None, eager_shapes: Default::default() }
    }

    /// Another handle on the same weights (no copy), to move to another thread: tch tensors are `Send`
    /// but not `Sync`, and libtorch allows concurrent reads of one storage.
    pub fn replica(&self) -> Self {
        let vs = nn::VarStore::new(self.vs.device());
        let model = UNet2DModel::new(vs.root(), &self.config);
        let source = self.vs.variables();
        let _guard = tch::no_grad_guard();
        for (name, mut var) in vs.variables() {
            let src = source.get(&name).expect("a replica has the same variables. This is a bug.");
            var.set_data(src);
        }
        let mut model = model;
        model.prepare_fast(self.layout == Layout::ChannelsLast);
        Self::assemble(vs, model, self.config.clone(), self.layout)
    }

    /// A randomly initialised network (tch's default initialisers seeded by `seed`).
    pub fn random(config: UNet2DConfig, seed: i64) -> Result<Self, ModelError> {
        config.validate()?;
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = UNet2DModel::new(vs.root(), &config);
        Ok(Self::assemble(vs, model, config, Layout::Diffusers))
    }

    pub fn num_parameters(&self) -> i64 {
        self.vs.variables().values().map(Tensor::numel).map(|n| n as i64).sum()
    }

    /// ε at one integer timestep, without class labels (a class-conditional network then runs without
    /// its class term: for probes and warm-up; sampling passes labels through [`Self::forward_classes`]).
    pub fn forward(&self, sample: &Tensor, timestep: i64) -> Tensor {
        self.forward_classes(sample, timestep, None)
    }

    /// ε at one integer timestep for the class labels `classes` (`[B]` on the sample's device, or
    /// `[B, time_embed_dim]` vectors for an identity class embedding).
    pub fn forward_classes(&self, sample: &Tensor, timestep: i64, classes: Option<&Tensor>) -> Tensor {
        let timesteps = Tensor::from_slice(&[timestep]).to_device(sample.device());
        self.forward_t(sample, &timesteps, classes)
    }

    /// [`Self::forward_classes`] with the timestep as a tensor on the sample's device (`[1]` or `[B]`).
    pub fn forward_t(&self, sample: &Tensor, timesteps: &Tensor, classes: Option<&Tensor>) -> Tensor {
        match self.layout {
            Layout::Diffusers => self.model.forward(sample, timesteps, classes),
            Layout::ChannelsLast => self.model.forward(&channels_last(sample), timesteps, classes),
        }
    }

    /// Whether the network takes class labels.
    pub fn is_conditional(&self) -> bool {
        self.model.is_conditional()
    }

    /// Writes `diffusion_pytorch_model.safetensors` + `config.json` under `dir` (today's key names).
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let path = dir.join(WEIGHT_NAMES[0]);
        let vars = self.vs.variables();
        let named: Vec<(String, Tensor)> = vars.into_iter().collect::<BTreeMap<_, _>>().into_iter().collect();
        Tensor::write_safetensors(&named, &path)?;
        let config = dir.join("config.json");
        std::fs::write(&config, self.config.to_json()).map_err(|e| ModelError::io(&config, e))
    }
}

/// Reads every tensor of a `.safetensors` or PyTorch `.bin` state dict.
pub fn read_checkpoint(path: &Path) -> Result<Vec<(String, Tensor)>, ModelError> {
    let result = match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Tensor::read_safetensors(path),
        _ => Tensor::loadz_multi(path),
    };
    result.map_err(|e| ModelError::io(path, e))
}

/// The 2022 hub name of an attention projection mapped to today's (`_fix_state_dict_keys_on_load`).
pub fn canonical_key(key: &str) -> String {
    const RENAMES: [(&str, &str); 4] =
        [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")];
    if key.contains(".attentions.") {
        for (old, new) in RENAMES {
            if let Some(i) = key.rfind(old) {
                return format!("{}{}{}", &key[..i], new, &key[i + old.len()..]);
            }
        }
    }
    key.to_string()
}

/// Copies checkpoint tensors into the VarStore. The key sets must be equal: a missing or an unexpected
/// key is an error naming them (tch's own `load` would ignore extras and diffusers has renamed keys).
fn copy_weights(
    vs: &mut nn::VarStore,
    tensors: Vec<(String, Tensor)>,
    path: &Path,
) -> Result<(), ModelError> {
    let mut file: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, tensor) in tensors {
        let key = canonical_key(&name);
        if file.insert(key.clone(), tensor).is_some() {
            return Err(ModelError::KeyMismatch {
                path: path.to_path_buf(),
                detail: format!("{key} appears under both its old and new attention name"),
            });
        }
    }
    let mut vars = vs.variables();
    let model_keys: BTreeSet<&String> = vars.keys().collect();
    let file_keys: BTreeSet<&String> = file.keys().collect();
    let missing: Vec<&str> = model_keys.difference(&file_keys).map(|s| s.as_str()).collect();
    let unexpected: Vec<&str> = file_keys.difference(&model_keys).map(|s| s.as_str()).collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(ModelError::KeyMismatch {
            path: path.to_path_buf(),
            detail: format!("missing keys {} ; unexpected keys {}", list(&missing), list(&unexpected)),
        });
    }
    let _guard = tch::no_grad_guard();
    for (key, src) in file {
        let dst = vars.get_mut(&key).expect("key sets were checked equal above. This is a bug.");
        let src = if src.size() == dst.size() {
            src
        } else if src.numel() == dst.numel() && src.size().iter().skip(dst.dim()).all(|&d| d == 1) {
            // Attention projections of the 2022 files may be stored as [C, C, 1, 1] conv kernels.
            src.reshape(dst.size())
        } else {
            return Err(ModelError::KeyMismatch {
                path: path.to_path_buf(),
                detail: format!("{key}: checkpoint shape {:?}, model shape {:?}", src.size(), dst.size()),
            });
        };
        dst.f_copy_(&src.to_kind(dst.kind()))?;
    }
    Ok(())
}

fn list(keys: &[&str]) -> String {
    const SHOWN: usize = 20;
    if keys.is_empty() {
        return "(none)".into();
    }
    let mut s = keys.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(" … and {} more", keys.len() - SHOWN));
    }
    format!("[{s}]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_attention_names_are_renamed() {
        assert_eq!(
            canonical_key("mid_block.attentions.0.query.weight"),
            "mid_block.attentions.0.to_q.weight"
        );
        assert_eq!(
            canonical_key("up_blocks.1.attentions.2.proj_attn.bias"),
            "up_blocks.1.attentions.2.to_out.0.bias"
        );
        assert_eq!(
            canonical_key("down_blocks.1.attentions.0.group_norm.weight"),
            "down_blocks.1.attentions.0.group_norm.weight"
        );
        assert_eq!(
            canonical_key("down_blocks.0.resnets.0.conv1.weight"),
            "down_blocks.0.resnets.0.conv1.weight"
        );
    }
}
