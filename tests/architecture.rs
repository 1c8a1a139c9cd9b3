//! The real checkpoint families come out right (parameter counts, key names and shapes of the hub
//! files), and a checkpoint that does not fit the model is refused with the keys named.

mod common;

use std::collections::BTreeMap;

use ddpm_worker::init_model::Preset;
use ddpm_worker::model::{self, LoadedUNet, ModelFiles};
use tch::{Device, Kind, Tensor};

/// `name [d0, d1, …]` lines of the reference key lists (old attention names).
fn reference_keys(file: &str) -> BTreeMap<String, Vec<i64>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(file);
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (name, shape) = line.split_once(' ').unwrap();
            let dims =
                shape.trim_matches(|c| c == '[' || c == ']').split(',').map(|d| d.trim().parse().unwrap());
            (model::canonical_key(name), dims.collect())
        })
        .collect()
}

fn model_keys(preset: Preset) -> (i64, BTreeMap<String, Vec<i64>>) {
    let unet = LoadedUNet::random(preset.unet_config(), 0).unwrap();
    let keys = unet.vs.variables().into_iter().map(|(k, t)| (k, t.size())).collect();
    (unet.num_parameters(), keys)
}

#[test]
fn cifar10_32_matches_the_hub_checkpoint() {
    let (params, keys) = model_keys(Preset::Cifar10_32);
    assert_eq!(params, 35_746_307);
    let reference = reference_keys("keys_ddpm-cifar10-32_old-names.txt");
    assert_eq!(reference.len(), 328);
    // Attention projections are [C, C] in diffusers' files (squeezed from the original 1x1 convs).
    assert_eq!(keys, reference);
}

#[test]
fn ddpm_256_family_matches_the_hub_checkpoints() {
    let (params, keys) = model_keys(Preset::Ddpm256);
    assert_eq!(params, 113_673_219);
    let reference = reference_keys("keys_ddpm-256_old-names.txt");
    assert_eq!(reference.len(), 450);
    assert_eq!(keys, reference);
}

/// Writes the tiny preset with one tensor removed or one added, and checks the error names it.
#[test]
fn missing_and_unexpected_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    ddpm_worker::init_model::write_model(Preset::Tiny, false, &good, 0).unwrap();
    let weights = good.join("diffusion_pytorch_model.safetensors");
    let tensors = Tensor::read_safetensors(&weights).unwrap();

    let variant = |name: &str, tensors: Vec<(String, Tensor)>| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "scheduler_config.json"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        Tensor::write_safetensors(&tensors, d.join("diffusion_pytorch_model.safetensors")).unwrap();
        let files = ModelFiles::locate(&d).unwrap();
        LoadedUNet::load(&files, Device::Cpu, Kind::Float).err().expect("load must fail").to_string()
    };

    let missing: Vec<_> = tensors
        .iter()
        .filter(|(k, _)| k != "conv_out.bias")
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    let err = variant("missing", missing);
    assert!(err.contains("missing keys [conv_out.bias]"), "{err}");

    let mut extra: Vec<_> = tensors.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    extra.push(("class_embedding.weight".into(), Tensor::zeros([4, 4], (Kind::Float, Device::Cpu))));
    let err = variant("extra", extra);
    assert!(err.contains("unexpected keys [class_embedding.weight]"), "{err}");

    let mut wrong: Vec<_> = tensors.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    let i = wrong.iter().position(|(k, _)| k == "conv_in.weight").unwrap();
    wrong[i].1 = Tensor::zeros([1, 2, 3], (Kind::Float, Device::Cpu));
    let err = variant("wrong-shape", wrong);
    assert!(err.contains("conv_in.weight") && err.contains("shape"), "{err}");
}

#[test]
fn half_precision_checkpoints_load_into_f32() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("m");
    let unet = ddpm_worker::init_model::write_model(Preset::Tiny, false, &good, 3).unwrap();
    let weights = good.join("diffusion_pytorch_model.safetensors");
    let half: Vec<_> = Tensor::read_safetensors(&weights)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.to_kind(Kind::Half)))
        .collect();
    Tensor::write_safetensors(&half, &weights).unwrap();
    let loaded = LoadedUNet::load(&ModelFiles::locate(&good).unwrap(), Device::Cpu, Kind::Float).unwrap();
    let vars = loaded.vs.variables();
    assert!(vars.values().all(|t| t.kind() == Kind::Float));
    let a = &unet.vs.variables()["conv_in.weight"];
    let b = &vars["conv_in.weight"];
    assert!(common::max_abs_diff(a, b) < 1e-3);
}

#[test]
fn sharded_and_foreign_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("config.json"), r#"{"_class_name":"UNet2DModel"}"#).unwrap();
    std::fs::write(d.join("scheduler_config.json"), "{}").unwrap();
    std::fs::write(d.join("diffusion_pytorch_model.safetensors.index.json"), "{}").unwrap();
    let err = ModelFiles::locate(d).unwrap_err().to_string();
    assert!(err.contains("sharded"), "{err}");

    std::fs::write(d.join("config.json"), r#"{"_class_name":"UNet2DConditionModel"}"#).unwrap();
    std::fs::write(d.join("diffusion_pytorch_model.safetensors"), "").unwrap();
    let err = ModelFiles::locate(d).unwrap().read_unet_config().unwrap_err().to_string();
    assert!(err.contains("UNet2DConditionModel"), "{err}");
}
