//! `ddpm-worker generate` and `init-model` as a user runs them: outputs, manifest, shard invariance,
//! and clear errors with exit code 2 for bad arguments.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{bin, fraction_within};

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("running ddpm-worker")
}

fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    let out = run(&["init-model", "--preset", "tiny", "--out", model.to_str().unwrap(), "--seed", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    model
}

fn generate(model: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "generate {extra:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap()
}

/// The run's index (one part), checked against the manifest.
fn index_rows(out: &Path, m: &serde_json::Value) -> Vec<ddpm_worker::dataset::index::IndexRow> {
    let bytes = std::fs::read(out.join(m["index"]["path"].as_str().unwrap())).unwrap();
    assert_eq!(ddpm_worker::digest::sha256_hex(&bytes), m["index"]["sha256"].as_str().unwrap());
    ddpm_worker::dataset::index::read(bytes.into()).unwrap()
}

fn sample_png(out: &Path, index: usize) -> Vec<u8> {
    std::fs::read(out.join(format!("samples/{index:08}.png"))).unwrap()
}

fn sample_pixels(out: &Path, index: usize) -> Vec<u8> {
    image::load_from_memory(&sample_png(out, index)).unwrap().to_rgb8().into_raw()
}

#[test]
fn outputs_and_manifest_describe_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = dir.path().join("run");
    let m = generate(
        &model,
        &out,
        &["--scheduler", "ddim", "--steps", "10", "--eta", "0.5", "--num-samples", "3", "--seed", "40"],
    );

    assert_eq!(m["steps"], 10);
    assert_eq!(m["eta"], 0.5);
    assert_eq!(m["batch_size"], 3);
    assert_eq!(m["dtype"], "fp32");
    assert_eq!(m["device"], "cpu");
    assert_eq!(m["scheduler"]["_class_name"], "DDIMScheduler");
    assert_eq!(m["scheduler"]["set_alpha_to_one"], true);
    let weights = model.join("diffusion_pytorch_model.safetensors");
    assert_eq!(m["model"]["sha256"], ddpm_worker::digest::sha256_file(&weights).unwrap());
    let samples = index_rows(&out, &m);
    assert_eq!(samples.len(), 3);
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s.index, i as u64);
        assert_eq!(s.seed, 40 + i as u64);
        assert_eq!(s.file, format!("samples/{i:08}.png"));
        let bytes = std::fs::read(out.join(&s.file)).unwrap();
        assert_eq!(s.sha256, ddpm_worker::digest::sha256_hex(&bytes));
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (16, 16));
        assert_eq!(img.color(), image::ColorType::Rgb8);
    }
    let grid = std::fs::read(out.join("grid.png")).unwrap();
    assert_eq!(m["grid"]["sha256"], ddpm_worker::digest::sha256_hex(&grid));
    let grid = image::load_from_memory(&grid).unwrap();
    assert_eq!((grid.width(), grid.height()), (32, 32)); // 3 tiles in a 2x2 grid
    assert!(m["timings"]["images_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_sample_does_not_depend_on_its_run_or_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let common = ["--scheduler", "ddpm", "--steps", "30", "--batch-size", "2"];
    generate(&model, &a, &[&common[..], &["--seed", "10", "--num-samples", "5"]].concat());
    generate(&model, &b, &[&common[..], &["--seed", "11", "--num-samples", "4"]].concat());
    // Seed 11 + i is sample i + 1 of run a and sample i of run b, in different batches and positions.
    for i in 0..4 {
        assert_eq!(sample_png(&a, i + 1), sample_png(&b, i), "seed {} differs between runs", 11 + i);
    }
    assert_ne!(sample_png(&a, 0), sample_png(&a, 1));
}

#[test]
fn batch_size_changes_stay_within_parity_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let runs: Vec<PathBuf> = [1, 2, 5]
        .iter()
        .map(|b| {
            let out = dir.path().join(format!("b{b}"));
            let bs = b.to_string();
            generate(
                &model,
                &out,
                &[
                    "--scheduler",
                    "ddpm",
                    "--steps",
                    "50",
                    "--seed",
                    "3",
                    "--num-samples",
                    "5",
                    "--batch-size",
                    &bs,
                ],
            );
            out
        })
        .collect();
    for i in 0..5 {
        let reference = sample_pixels(&runs[0], i);
        for other in &runs[1..] {
            let share = fraction_within(&reference, &sample_pixels(other, i), 1);
            assert!(share >= 0.999, "sample {i}: {:.4}% of pixels within 1/255", share * 100.0);
        }
    }
}

fn assert_usage_error(args: &[&str], needle: &str) {
    let o = run(args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?} should exit 2; stderr: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in: {stderr}");
}

#[test]
fn bad_arguments_exit_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let m = model.to_str().unwrap();
    let out = dir.path().join("o");
    let o = out.to_str().unwrap();
    assert_usage_error(&["generate", "--model", m, "--out", o, "--steps", "0"], "num_inference_steps");
    assert_usage_error(
        &["generate", "--model", m, "--out", o, "--steps", "1001"],
        "num_inference_steps = 1001",
    );
    assert_usage_error(&["generate", "--model", m, "--out", o, "--eta", "1"], "eta");
    assert_usage_error(&["generate", "--model", m, "--out", o, "--scheduler", "ddim", "--eta=-1"], "eta");
    assert_usage_error(&["generate", "--model", m, "--out", o, "--num-samples", "0"], "num_samples");
    assert_usage_error(&["generate", "--model", m, "--out", o, "--batch-size", "0"], "batch_size");
    assert_usage_error(&["generate", "--model", m, "--out", o, "--dtype", "fp16"], "dtype");
    assert_usage_error(&["generate", "--model", m, "--out", o, "--device", "tpu"], "device");
    if !tch::Cuda::is_available() {
        assert_usage_error(
            &["generate", "--model", m, "--out", o, "--device", "cuda:0"],
            "CUDA device(s) found",
        );
    }
    assert_usage_error(&["generate", "--model", m, "--out", o, "--lanes", "0"], "lanes");
    assert_usage_error(&["generate", "--model", m, "--out", o, "--scheduler", "euler"], "scheduler");
    assert_usage_error(&["generate", "--model", "/nonexistent", "--out", o], "/nonexistent");
    assert_usage_error(
        &["generate", "--model", m, "--out", o, "--scheduler", "pndm", "--steps", "3"],
        "at least 4 steps",
    );
    assert!(!out.join("manifest.json").exists());
}

#[test]
fn unsupported_scheduler_options_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    std::fs::write(
        model.join("scheduler_config.json"),
        r#"{"_class_name":"DDPMScheduler","variance_type":"learned_range"}"#,
    )
    .unwrap();
    let o = dir.path().join("o");
    assert_usage_error(
        &["generate", "--model", model.to_str().unwrap(), "--out", o.to_str().unwrap()],
        "LearnedRange",
    );
    std::fs::write(model.join("scheduler_config.json"), r#"{"thresholding":true}"#).unwrap();
    assert_usage_error(
        &["generate", "--model", model.to_str().unwrap(), "--out", o.to_str().unwrap()],
        "thresholding",
    );
}

#[test]
fn fast_mode_writes_every_sample_once_within_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let exact = dir.path().join("exact");
    let fast = dir.path().join("fast");
    let args =
        ["--scheduler", "ddpm", "--steps", "40", "--seed", "7", "--num-samples", "7", "--batch-size", "2"];
    generate(&model, &exact, &args);
    // Two lanes on the CPU whatever its core count, so the multi-lane path is exercised.
    let m = generate(&model, &fast, &[&args[..], &["--layout", "channels-last", "--lanes", "2"]].concat());
    assert_eq!(m["layout"], "channels-last");
    assert_eq!(m["lanes"], 2);
    let samples = index_rows(&fast, &m);
    assert_eq!(samples.len(), 7);
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s.index, i as u64);
        assert_eq!(s.seed, 7 + i as u64);
        let share = fraction_within(&sample_pixels(&exact, i), &sample_pixels(&fast, i), 1);
        assert!(share >= 0.999, "sample {i}: {:.4}% of pixels within 1/255", share * 100.0);
    }
}

#[test]
fn every_layout_of_a_run_opens_in_the_dataset_readers() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let args =
        ["--scheduler", "ddim", "--steps", "3", "--seed", "5", "--num-samples", "10", "--batch-size", "2"];
    let files = dir.path().join("files");
    generate(&model, &files, &args);
    for (format, image) in [("webdataset", "png"), ("parquet", "webp"), ("webdataset", "jpeg")] {
        let out = dir.path().join(format!("{format}-{image}"));
        // 64 KiB files hold 14 samples of 16×16 (7 batches of 2): one file for 10 samples.
        let m = generate(
            &model,
            &out,
            &[&args[..], &["--format", format, "--image-format", image, "--target-file-bytes", "65536"]]
                .concat(),
        );
        assert_eq!(m["dataset"]["format"], format);
        assert_eq!(m["files"].as_array().unwrap().len(), 1);
        let reference = (image != "jpeg").then_some(files.as_path());
        let python = std::env::var("DDPM_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/readers/check_dataset.py");
        let mut cmd = std::process::Command::new(python);
        cmd.arg(script).arg(&out);
        if let Some(r) = reference {
            cmd.arg("--reference").arg(r);
        }
        let o = cmd.output().unwrap();
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(!out.join(".ddpm-staging").exists(), "generate leaves no staging folder");
    }
    // A folder that holds a run is not written over.
    let again = run(&[
        &["generate", "--model", model.to_str().unwrap(), "--out", files.to_str().unwrap()][..],
        &args,
    ]
    .concat());
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a run"));
}
