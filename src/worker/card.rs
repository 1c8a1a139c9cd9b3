//! What a finished job's folder says about itself to the tools that open it: the dataset card
//! (`README.md`, whose YAML `configs` let `datasets.load_dataset(<folder>)` load the samples with no
//! `data_files`, and in the Parquet layout the index as a second config) and, for WebDataset jobs, the shard index that
//! `wids.ShardListDataset` reads (`data/wids.json`). Both are written by finalize before the manifest,
//! create-only, and their bytes are a pure function of the job, so racing finalizers write the same.

use serde::Serialize;

use crate::dataset::{DataFormat, StoredFile};
use crate::job::JobRecord;
use crate::models::{ModelCard, ResolvedModel};

/// The dataset card's path in the job folder.
pub const CARD_PATH: &str = "README.md";
/// The WebDataset shard index's path in the job folder.
pub const WIDS_PATH: &str = "data/wids.json";

/// The DDPM paper, which every card cites for the method.
const DDPM_CITATION: &str = "@inproceedings{ho2020denoising,
  title     = {Denoising Diffusion Probabilistic Models},
  author    = {Ho, Jonathan and Jain, Ajay and Abbeel, Pieter},
  booktitle = {Advances in Neural Information Processing Systems},
  volume    = {33},
  pages     = {6840--6851},
  year      = {2020}
}";

#[derive(Serialize)]
struct Front<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    license: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    license_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    license_link: Option<&'a str>,
    pretty_name: String,
    task_categories: [&'static str; 1],
    tags: Vec<String>,
    size_categories: [&'static str; 1],
    configs: Vec<Config>,
}

#[derive(Serialize)]
struct Config {
    config_name: &'static str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    default: bool,
    data_files: [DataFiles; 1],
}

#[derive(Serialize)]
struct DataFiles {
    split: &'static str,
    path: String,
}

/// The glob of a layout's samples: what `load_dataset(<folder>)` loads by default.
fn samples_glob(job: &JobRecord) -> String {
    let dataset = &job.spec.dataset;
    match dataset.format {
        // A labelled job's samples sit in a folder per class, whose names `datasets` takes as labels.
        DataFormat::Files if job.spec.classes.is_some() => {
            format!("samples/*/*.{}", dataset.encoding.image.extension())
        }
        DataFormat::Files => format!("samples/*.{}", dataset.encoding.image.extension()),
        DataFormat::Webdataset => "data/*.tar".into(),
        DataFormat::Parquet => "data/*.parquet".into(),
    }
}

/// The samples as the default config and, where the samples are Parquet too, the index as a second
/// (`datasets` reads every config of a folder with the one builder its files call for: the index of a
/// WebDataset or image-folder job is loaded as Parquet by name instead, as the card says).
fn configs(job: &JobRecord) -> Vec<Config> {
    let mut configs = vec![Config {
        config_name: "default",
        default: true,
        data_files: [DataFiles { split: "train", path: samples_glob(job) }],
    }];
    if job.spec.dataset.format == DataFormat::Parquet {
        configs.push(Config {
            config_name: "index",
            default: false,
            data_files: [DataFiles { split: "train", path: "index/*.parquet".into() }],
        });
    }
    configs
}

/// How the card tells readers to load the index.
fn index_loader(job: &JobRecord) -> &'static str {
    if job.spec.dataset.format == DataFormat::Parquet {
        "load_dataset(\"path/to/this/folder\", \"index\", split=\"train\")"
    } else {
        "load_dataset(\"parquet\", data_files=\"path/to/this/folder/index/*.parquet\", split=\"train\")"
    }
}

/// The Hub's size category of `n` samples.
fn size_category(n: u64) -> &'static str {
    match n {
        0..1_000 => "n<1K",
        1_000..10_000 => "1K<n<10K",
        10_000..100_000 => "10K<n<100K",
        100_000..1_000_000 => "100K<n<1M",
        1_000_000..10_000_000 => "1M<n<10M",
        10_000_000..100_000_000 => "10M<n<100M",
        _ => "100M<n<1B",
    }
}

/// The card of `job`, sampled from `model`.
pub fn dataset_card(job: &JobRecord, model: &ResolvedModel) -> Result<String, String> {
    let spec = &job.spec;
    let card: &ModelCard = &model.card;
    let scheduler = spec.scheduler.as_str();
    let front = Front {
        license: card.license.as_deref(),
        license_name: card.license_name.as_deref(),
        license_link: card.license_link.as_deref(),
        pretty_name: format!("{} samples ({})", model.name, job.id),
        task_categories: ["unconditional-image-generation"],
        tags: ["synthetic", "ddpm", "ddpm-worker", scheduler].map(String::from).to_vec(),
        size_categories: [size_category(spec.num_samples)],
        configs: configs(job),
    };
    let yaml = serde_saphyr::to_string(&front).map_err(|e| e.to_string())?;
    let last_seed = spec.seed.saturating_add(spec.num_samples.saturating_sub(1));
    let eta = spec.eta.map_or(String::new(), |eta| format!(", η {eta}"));
    let encoding = spec.dataset.encoding.image.extension();
    let body = format!(
        "# {pretty}

Synthetic images sampled by ddpm-worker {version} from the diffusion model `{source}` (served as
`{name}`; UNet weights SHA-256 `{sha}`).

| | |
|---|---|
| samples | {n}, sample `i` drawn from a generator seeded `{seed} + i` (seeds {seed} to {last_seed}) |
| scheduler | {scheduler}, {steps} steps{eta}, batches of {batch} |
| layout | {format}, {encoding} images |
| job | `{id}` |

Every sample is listed in the index (`index/*.parquet`: seed, SHA-256, size and where it is stored),
and `manifest.json` records how each shard ran.

## Load

```python
from datasets import load_dataset

samples = load_dataset(\"path/to/this/folder\", split=\"train\")
index = {index_loader}
```

## Verify

`ddpm-worker verify path/to/this/folder` samples whole batches again with the recorded model, scheduler,
precision and batch size, and compares each sample's SHA-256 with the index.

## Citation

```bibtex
{citation}
```
{license}",
        pretty = front.pretty_name,
        version = env!("CARGO_PKG_VERSION"),
        source = model.source,
        name = model.name,
        sha = model.weights_sha256,
        n = spec.num_samples,
        seed = spec.seed,
        steps = spec.steps,
        batch = spec.batch_size,
        format = spec.dataset.format.as_str(),
        id = job.id,
        citation = DDPM_CITATION,
        index_loader = index_loader(job),
        license = card
            .license
            .as_deref()
            .map_or(String::new(), |l| format!("\nThe model's card gives its license as `{l}`.\n")),
    );
    Ok(format!("---\n{yaml}---\n\n{body}"))
}

/// The shard index of a WebDataset job (`wids`' `ShardListDataset` JSON), tars named relative to it,
/// in sample order.
pub fn wids_index(job: &JobRecord, files: &[StoredFile]) -> Result<String, String> {
    let shardlist: Vec<_> = files
        .iter()
        .map(|f| {
            serde_json::json!({
                "url": f.path.strip_prefix("data/").unwrap_or(&f.path),
                "nsamples": f.end - f.first,
                "filesize": f.bytes,
            })
        })
        .collect();
    let index = serde_json::json!({
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": job.id,
        "shardlist": shardlist,
    });
    serde_json::to_string_pretty(&index).map_err(|e| e.to_string())
}
