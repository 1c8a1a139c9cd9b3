//! What the service reads and writes: its models (fetched and hashed before anything starts) and the
//! destinations jobs write to ([`StorageArgs`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::ServeError;
use crate::models::{ModelArg, ResolvedModel};
use crate::storage::Destination;
use crate::worker::outputs::Outputs;

/// Models and outputs.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Models and outputs")]
pub struct StorageArgs {
    /// A served model, NAME=PATH: a diffusers folder, s3://bucket/prefix, or a hub id (org/name) in the
    /// Hugging Face cache. Repeat for several.
    #[arg(long = "model", env = "DDPM_MODELS", value_delimiter = ',', required = true)]
    pub models: Vec<ModelArg>,
    /// Where models from S3 are copied to.
    #[arg(long, env = "DDPM_MODEL_CACHE", default_value = "ddpm-data/models")]
    pub model_cache: PathBuf,
    /// Default output destination: file:DIR or s3://BUCKET/PREFIX (endpoint and credentials from AWS_*).
    #[arg(long, env = "DDPM_OUTPUT", default_value = "file:ddpm-data/jobs")]
    pub output: Destination,
    /// A destination jobs may write within besides --output: s3://BUCKET[/PREFIX] or file:DIR.
    /// Repeatable; a job's output.destination must lie within one of them.
    #[arg(long = "allow-output", env = "DDPM_ALLOW_OUTPUTS", value_delimiter = ',')]
    pub allow_outputs: Vec<Destination>,
    /// Path-style S3 addressing (MinIO, SeaweedFS, Ceph).
    #[arg(long, env = "DDPM_S3_PATH_STYLE")]
    pub s3_path_style: bool,
    /// Where WebDataset and Parquet parts are spooled on their way to S3 (a local output directory
    /// spools in its own staging folder). Needs room for two parts per device.
    #[arg(long, env = "DDPM_SCRATCH_DIR", default_value = "ddpm-data/scratch")]
    pub scratch_dir: PathBuf,
}

impl StorageArgs {
    /// Each model found (an S3 model copied to the model cache under its name), read and hashed.
    pub async fn models(&self) -> Result<BTreeMap<String, Arc<ResolvedModel>>, ServeError> {
        let config = ServeError::Config;
        let mut models = BTreeMap::new();
        for m in &self.models {
            if models.contains_key(&m.name) {
                return Err(config(format!("--model {}: named twice", m.name)));
            }
            let dir = m
                .location
                .fetch(&self.model_cache.join(&m.name), self.s3_path_style)
                .await
                .map_err(|e| config(format!("--model {}: {e}", m.name)))?;
            let resolved = ResolvedModel::from_dir(&m.name, m.location.source(), &dir)
                .map_err(|e| config(format!("--model {}: {e}", m.name)))?;
            models.insert(m.name.clone(), Arc::new(resolved));
        }
        Ok(models)
    }

    /// Where jobs write.
    pub fn outputs(&self) -> Outputs {
        Outputs::new(self.output.clone(), &self.allow_outputs, self.s3_path_style)
    }
}
