//! The models a worker serves: `NAME=LOCATION` pairs from its configuration, resolved to a diffusers
//! folder on disk once at start-up, hashed, and checked before any port is bound.
//!
//! A location is a local folder, an `s3://bucket/prefix` (copied into the local model cache), or a
//! Hugging Face hub id such as `google/ddpm-cifar10-32`: used from the standard HF cache (`HF_HUB_CACHE`,
//! else `HF_HOME/hub`, else `~/.cache/huggingface/hub`) when it is there, and otherwise downloaded into
//! it with the hub's own Rust client (where a network exists; `HF_ENDPOINT` and `HF_TOKEN` apply).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::classes::ModelClasses;
use crate::model::{ModelError, ModelFiles, UNet2DConfig};
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::storage::ObjectStore;

/// `NAME=LOCATION` as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelArg {
    pub name: String,
    pub location: ModelLocation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    Dir(PathBuf),
    S3 { bucket: String, prefix: String },
    Hub(String),
}

impl FromStr for ModelArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, location) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=PATH (a folder, s3://… or org/name)"))?;
        let valid_name = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid_name {
            return Err(format!("model name {name:?}: use letters, digits, '-', '_' and '.'"));
        }
        if location.is_empty() {
            return Err(format!("{s:?}: empty location"));
        }
        Ok(ModelArg { name: name.into(), location: location.parse()? })
    }
}

impl FromStr for ModelLocation {
    type Err = String;

    /// `s3://bucket/prefix`, a hub id `org/name` (unless a folder of that relative path exists), or a
    /// folder.
    fn from_str(location: &str) -> Result<Self, String> {
        Ok(if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("{location:?}: no bucket"));
            }
            ModelLocation::S3 { bucket: bucket.into(), prefix: prefix.trim_matches('/').into() }
        } else if is_hub_id(location) && !Path::new(location).exists() {
            ModelLocation::Hub(location.into())
        } else if location.is_empty() {
            return Err("empty location".into());
        } else {
            ModelLocation::Dir(location.into())
        })
    }
}

impl ModelLocation {
    /// The location as configured, as manifests record it: the folder, `s3://bucket/prefix` or
    /// `hf://org/name`.
    pub fn source(&self) -> String {
        match self {
            ModelLocation::Dir(d) => d.display().to_string(),
            ModelLocation::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
            ModelLocation::Hub(id) => format!("hf://{id}"),
        }
    }

    /// The model's folder on this machine: a folder as it is; a hub id's snapshot in the Hugging Face
    /// cache, downloaded into it first when it is not complete there (where a network exists); an S3
    /// folder copied into `s3_copy` (with `s3_path_style` addressing).
    pub async fn fetch(&self, s3_copy: &Path, s3_path_style: bool) -> Result<PathBuf, FetchError> {
        match self {
            ModelLocation::Dir(d) => Ok(d.clone()),
            ModelLocation::Hub(id) => {
                let cache = hf_hub_cache().ok_or(FetchError::NoHfCache)?;
                let cached =
                    hub_snapshot(&cache, id).ok().filter(|dir| crate::model::ModelFiles::locate(dir).is_ok());
                match cached {
                    Some(dir) => Ok(dir),
                    None => download_hub_model(&cache, id)
                        .await
                        .map_err(|source| FetchError::Hub { cache, source }),
                }
            }
            ModelLocation::S3 { bucket, prefix } => {
                let dest = crate::storage::Destination::S3 { bucket: bucket.clone(), prefix: prefix.clone() };
                let store = crate::storage::open_store(&dest, s3_path_style).await?;
                fetch_model_folder(store.as_ref(), s3_copy).await?;
                Ok(s3_copy.to_path_buf())
            }
        }
    }
}

/// Why a model's folder could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no HOME, HF_HOME or HF_HUB_CACHE to find the Hugging Face cache")]
    NoHfCache,
    #[error("not in the Hugging Face cache at {}, and {source}", cache.display())]
    Hub { cache: PathBuf, source: ModelError },
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// `org/name`: two segments of hub-legal characters.
fn is_hub_id(s: &str) -> bool {
    let seg = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(s.split('/').collect::<Vec<_>>().as_slice(), [org, name] if seg(org) && seg(name))
}

/// A model ready to load on any device: its files, their identity and its default scheduler config.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub name: String,
    /// Where it came from, as configured.
    pub source: String,
    pub files: ModelFiles,
    pub weights_sha256: String,
    pub unet_config: UNet2DConfig,
    /// `scheduler_config.json` as shipped with the model; a job's scheduler is built from it.
    pub scheduler_text: String,
    /// What the folder's model card (`README.md`) says of its license; empty without one.
    pub card: ModelCard,
    /// Its classes, for a class-conditional model (`labels.json` names them).
    pub classes: ModelClasses,
}

/// The fields of a Hugging Face model card's YAML front matter that a dataset made with the model
/// carries over to its own card.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct ModelCard {
    pub license: Option<String>,
    pub license_name: Option<String>,
    pub license_link: Option<String>,
}

impl ModelCard {
    /// The front matter of `README.md` in `dir` (the model folder); none when the folder has no card or
    /// the card no front matter. A card that cannot be read is logged and left out: it says nothing
    /// about how to sample.
    pub fn read(dir: &Path) -> Self {
        let path = dir.join("README.md");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Self::default();
        };
        match Self::parse(&text) {
            Ok(card) => card,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = e, "the model card's front matter is not readable YAML; left out");
                Self::default()
            }
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix("---\n").or_else(|| text.strip_prefix("---\r\n")) else {
            return Ok(Self::default());
        };
        let end = rest.find("\n---").ok_or("no closing ---")?;
        let yaml = &rest[..end];
        if yaml.trim().is_empty() {
            return Ok(Self::default());
        }
        // Only these keys are wanted; the others (any YAML at all) are read as values and dropped.
        let all: std::collections::BTreeMap<String, serde_json::Value> =
            serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        let text = |key: &str| all.get(key).and_then(|v| v.as_str()).map(str::to_string);
        Ok(Self {
            license: text("license"),
            license_name: text("license_name"),
            license_link: text("license_link"),
        })
    }
}

impl ResolvedModel {
    /// The scheduler a job asks for, configured from the model's scheduler config.
    pub fn scheduler(
        &self,
        kind: SchedulerKind,
    ) -> Result<SchedulerConfig, crate::schedulers::SchedulerError> {
        SchedulerConfig::from_json(kind, &self.scheduler_text)
    }

    /// The shape of one sample: (channels, height, width).
    pub fn sample_shape(&self) -> (u64, u64, u64) {
        let (h, w) = self.unet_config.sample_hw().unwrap_or((32, 32));
        (self.unet_config.in_channels.max(1) as u64, h.max(1) as u64, w.max(1) as u64)
    }

    /// Reads a model folder and checks everything that can be checked without a device: the UNet
    /// config is one we build, the weights load into it (on the CPU, then dropped), and the scheduler
    /// config makes a working scheduler. A server must not start with a model it cannot sample.
    pub fn from_dir(name: &str, source: String, dir: &Path) -> Result<Self, ModelError> {
        let files = ModelFiles::locate(dir)?;
        let unet_config = files.read_unet_config()?;
        unet_config.validate()?;
        unet_config.sample_hw()?;
        let scheduler_text = std::fs::read_to_string(&files.scheduler_config)
            .map_err(|e| ModelError::Io { path: files.scheduler_config.clone(), message: e.to_string() })?;
        check_scheduler_config(&scheduler_text)?;
        // Catches a truncated or corrupt checkpoint and keys or shapes that do not fit the config.
        drop(crate::model::LoadedUNet::load(&files, tch::Device::Cpu, tch::Kind::Float)?);
        let weights_sha256 = crate::digest::sha256_file(&files.weights)
            .map_err(|e| ModelError::Io { path: files.weights.clone(), message: e.to_string() })?;
        let card = ModelCard::read(&files.root);
        let classes = ModelClasses::read(&files.root, &unet_config)?;
        check_learned_time_table(&unet_config, &scheduler_text)?;
        Ok(Self {
            name: name.into(),
            source,
            files,
            weights_sha256,
            unet_config,
            scheduler_text,
            card,
            classes,
        })
    }
}

/// A learned time embedding is a table of `num_train_timesteps` rows: the scheduler's timesteps must
/// all be rows of it.
fn check_learned_time_table(config: &UNet2DConfig, scheduler_text: &str) -> Result<(), ModelError> {
    let crate::model::config::TimeEmbedding::Learned { num_train_timesteps } = config.time_embedding() else {
        return Ok(());
    };
    let trained = SchedulerKind::ALL
        .iter()
        .find_map(|&kind| SchedulerConfig::from_json(kind, scheduler_text).ok())
        .map_or(0, |c| c.betas().num_train_timesteps as i64);
    if trained > num_train_timesteps {
        return Err(ModelError::Config(format!(
            "the UNet's learned time embedding has {num_train_timesteps} rows (num_train_timesteps), but the \
             scheduler's timesteps go up to {}",
            trained - 1
        )));
    }
    Ok(())
}

/// The scheduler config must make at least one of our schedulers (each job builds its own, and names
/// what its choice does not support); one that makes none (`num_train_timesteps: 0`, broken betas) is
/// refused with the first scheduler's reason.
fn check_scheduler_config(text: &str) -> Result<(), ModelError> {
    let tried: Vec<_> = SchedulerKind::ALL
        .iter()
        .map(|&kind| SchedulerConfig::from_json(kind, text).and_then(|c| c.build(1, 0.0)).map(drop))
        .collect();
    if tried.iter().any(Result::is_ok) {
        return Ok(());
    }
    let reason = tried.into_iter().find_map(Result::err).map(|e| e.to_string()).unwrap_or_default();
    Err(ModelError::Config(format!("scheduler_config.json: {reason}")))
}

/// The standard Hugging Face hub cache folder.
pub fn hf_hub_cache() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return Some(dir.into());
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// The snapshot folder of `repo_id` at `refs/main` in an HF cache (`models--org--name/snapshots/<sha>`).
pub fn hub_snapshot(cache: &Path, repo_id: &str) -> Result<PathBuf, ModelError> {
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let refs = repo.join("refs").join("main");
    let revision = std::fs::read_to_string(&refs).map_err(|_| ModelError::Io {
        path: repo.clone(),
        message: format!(
            "{repo_id} is not in the Hugging Face cache; fetch it where a network exists with \
             `huggingface-cli download {repo_id}` (or set HF_HOME / HF_HUB_CACHE)"
        ),
    })?;
    Ok(repo.join("snapshots").join(revision.trim()))
}

/// Downloads the diffusers files of hub repository `repo_id` into the HF cache at `cache` and returns
/// the snapshot folder. Only the files a UNet pipeline needs are fetched (safetensors weights rather
/// than `.bin` when a folder has both).
pub async fn download_hub_model(cache: &Path, repo_id: &str) -> Result<PathBuf, ModelError> {
    download_hub_model_from(cache, repo_id, std::env::var("HF_ENDPOINT").ok().as_deref()).await
}

async fn download_hub_model_from(
    cache: &Path,
    repo_id: &str,
    endpoint: Option<&str>,
) -> Result<PathBuf, ModelError> {
    let fail = |e: &dyn std::fmt::Display| ModelError::Io {
        path: cache.join(format!("models--{}", repo_id.replace('/', "--"))),
        message: format!("downloading {repo_id} from the Hugging Face hub: {e}"),
    };
    let mut builder = hf_hub::api::tokio::ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf()))
        .with_progress(false);
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint.to_string());
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let repo = builder.build().map_err(|e| fail(&e))?.model(repo_id.to_string());
    let info = repo.info().await.map_err(|e| fail(&e))?;
    let present: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let wanted = hub_files(&present);
    if wanted.is_empty() {
        return Err(fail(&"the repository holds no diffusers UNet files"));
    }
    let mut snapshot = None;
    for file in wanted {
        let path = repo.get(file).await.map_err(|e| fail(&e))?;
        // `<cache>/models--org--name/snapshots/<sha>/<file>`: the snapshot is `file`'s depth above.
        let mut root = path.clone();
        for _ in file.split('/') {
            root.pop();
        }
        snapshot = Some(root);
    }
    snapshot.ok_or_else(|| fail(&"nothing downloaded"))
}

/// Which of a hub repository's files to download: the pipeline files it has, with `.bin` weights
/// only where the same folder has no safetensors.
fn hub_files<'a>(present: &[&'a str]) -> Vec<&'a str> {
    MODEL_FILES
        .iter()
        .filter_map(|f| present.iter().find(|p| *p == f).copied())
        .filter(|f| {
            let safetensors = f.replace(".bin", ".safetensors");
            !f.ends_with(".bin") || !present.contains(&safetensors.as_str())
        })
        .collect()
}

/// The files a diffusers UNet pipeline folder may hold, in either layout, its model card and the class
/// names of a class-conditional model.
const MODEL_FILES: [&str; 11] = [
    "README.md",
    "labels.json",
    "model_index.json",
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "scheduler_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "scheduler/scheduler_config.json",
];

/// Copies a diffusers folder out of an object store into `dest` (files it lacks are skipped).
pub async fn fetch_model_folder(store: &dyn ObjectStore, dest: &Path) -> Result<(), ModelError> {
    let io =
        |path: &Path, e: &dyn std::fmt::Display| ModelError::Io { path: path.into(), message: e.to_string() };
    let mut found = 0;
    for file in MODEL_FILES {
        let Some(bytes) = store.get(file).await.map_err(|e| io(dest, &e))? else {
            continue;
        };
        let path = dest.join(file);
        let parent = path.parent().unwrap_or(dest);
        std::fs::create_dir_all(parent).map_err(|e| io(parent, &e))?;
        std::fs::write(&path, &bytes).map_err(|e| io(&path, &e))?;
        found += 1;
    }
    if found == 0 {
        return Err(io(dest, &format!("no diffusers model files under {}", store.uri(""))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_args_parse_every_kind_of_location() {
        let a: ModelArg = "cifar=./models/cifar".parse().unwrap();
        assert_eq!(a.location, ModelLocation::Dir("./models/cifar".into()));
        let a: ModelArg = "cifar=google/ddpm-cifar10-32".parse().unwrap();
        assert_eq!(a.location, ModelLocation::Hub("google/ddpm-cifar10-32".into()));
        let a: ModelArg = "c=s3://models/ddpm/cifar/".parse().unwrap();
        assert_eq!(a.location, ModelLocation::S3 { bucket: "models".into(), prefix: "ddpm/cifar".into() });
        assert_eq!("c=/abs/dir".parse::<ModelArg>().unwrap().location, ModelLocation::Dir("/abs/dir".into()));
        for bad in ["nameonly", "=dir", "a b=dir", "c=", "c=s3://"] {
            assert!(bad.parse::<ModelArg>().is_err(), "{bad}");
        }
    }

    #[test]
    fn hub_ids_resolve_through_the_cache_refs() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--google--ddpm-cifar10-32");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(
            hub_snapshot(cache.path(), "google/ddpm-cifar10-32").unwrap(),
            repo.join("snapshots/abc123")
        );
        let err = hub_snapshot(cache.path(), "google/ddpm-cat-256").unwrap_err().to_string();
        assert!(err.contains("huggingface-cli download google/ddpm-cat-256"), "{err}");
    }

    #[test]
    fn hub_downloads_pick_the_pipeline_files_preferring_safetensors() {
        let repo = [
            "README.md",
            "config.json",
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.safetensors",
            "scheduler_config.json",
            "images/sample.png",
        ];
        assert_eq!(
            hub_files(&repo),
            ["README.md", "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
        );
        let old = ["config.json", "diffusion_pytorch_model.bin", "scheduler_config.json"];
        assert_eq!(hub_files(&old), old);
        let pipeline = [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.bin",
            "scheduler/scheduler_config.json",
        ];
        assert_eq!(hub_files(&pipeline), pipeline);
    }

    #[tokio::test]
    async fn hub_downloads_fail_with_the_cause_when_the_hub_is_unreachable() {
        let cache = tempfile::tempdir().unwrap();
        // A closed local port stands in for a machine without a network.
        let err = download_hub_model_from(cache.path(), "google/ddpm-cifar10-32", Some("http://127.0.0.1:9"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("downloading google/ddpm-cifar10-32 from the Hugging Face hub"), "{err}");
    }

    #[tokio::test]
    async fn model_folders_copy_out_of_an_object_store() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("unet")).unwrap();
        std::fs::write(src.path().join("unet/config.json"), "{}").unwrap();
        std::fs::write(src.path().join("model_index.json"), "{}").unwrap();
        let store = crate::storage::local::LocalStore::new(src.path()).unwrap();
        let dest = tempfile::tempdir().unwrap();
        fetch_model_folder(&store, dest.path()).await.unwrap();
        assert!(dest.path().join("unet/config.json").is_file());
        assert!(!dest.path().join("config.json").exists());
        let empty = crate::storage::local::LocalStore::new(dest.path().join("nothing")).unwrap();
        assert!(fetch_model_folder(&empty, dest.path()).await.is_err());
    }
}
