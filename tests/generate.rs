//! `ddpm-worker generate` and `init-model` as a user runs them: outputs, manifest, shard invariance, runs
//! split into parts, models from S3 and the hub cache, S3 outputs, and clear errors with exit code 2 for
//! bad arguments.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{bin, fraction_within};

fn run(args: &[&str]) -> Output {
    run_with_env(args, &[])
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

/// The run's index (every part, in order), checked against the manifest.
fn index_rows(out: &Path, m: &serde_json::Value) -> Vec<ddpm_worker::dataset::index::IndexRow> {
    let mut rows = Vec::new();
    for part in m["index"].as_array().unwrap() {
        let bytes = std::fs::read(out.join(part["path"].as_str().unwrap())).unwrap();
        assert_eq!(ddpm_worker::digest::sha256_hex(&bytes), part["sha256"].as_str().unwrap());
        rows.extend(ddpm_worker::dataset::index::read(bytes.into()).unwrap());
    }
    rows
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

    // A service job's manifest: the spec, the resolved scheduler, the model, one shard (the run).
    assert_eq!(m["spec"]["steps"], 10);
    assert_eq!(m["spec"]["eta"], 0.5);
    assert_eq!(m["spec"]["batch_size"], 3);
    assert_eq!(m["spec"]["seed"], 40);
    assert!(m["job_id"].as_str().unwrap().starts_with("generate-"));
    let run = &m["shards"][0];
    assert_eq!((run["start"].as_u64(), run["end"].as_u64()), (Some(0), Some(3)));
    assert_eq!(run["dtype"], "fp32");
    assert_eq!(run["layout"], "diffusers");
    assert_eq!(run["device"], "cpu");
    assert_eq!(run["worker"], "generate");
    assert_eq!(run["group_norm"], "libtorch");
    assert_eq!(m["shards"].as_array().unwrap().len(), 1);
    assert_eq!(m["totals"]["samples"], 3);
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
    let grid = std::fs::read(out.join("grids/00000.png")).unwrap();
    assert_eq!(m["grids"][0]["path"], "grids/00000.png");
    assert_eq!(m["grids"][0]["sha256"], ddpm_worker::digest::sha256_hex(&grid));
    let grid = image::load_from_memory(&grid).unwrap();
    assert_eq!((grid.width(), grid.height()), (32, 32)); // 3 tiles in a 2x2 grid
    // The run's record carries its timings; the manifest lists it as its one shard.
    let record = read_json(&out.join("shards/000000.json"));
    assert!(record["timings"]["images_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(record["timings"]["batches"].as_array().unwrap().len(), 1);
    assert_eq!(record["index"], m["index"][0]);
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
    // The service's rules: a setting that does not apply to the layout or encoding is refused.
    assert_usage_error(
        &["generate", "--model", m, "--out", o, "--quality", "80"],
        "quality: 80: applies to JPEG only",
    );
    assert_usage_error(
        &["generate", "--model", m, "--out", o, "--png-level", "10"],
        "png_level: 10 must be in 1..=9",
    );
    assert_usage_error(
        &["generate", "--model", m, "--out", o, "--image-format", "jpeg", "--png-level", "3"],
        "applies to PNG only",
    );
    assert_usage_error(
        &["generate", "--model", m, "--out", o, "--target-file-bytes", "65536"],
        "target_file_bytes: 65536: applies to WEBDATASET and PARQUET only",
    );
    assert_usage_error(
        &["generate", "--model", m, "--out", o, "--samples-per-grid", "1025"],
        "samples_per_grid: 1025 exceeds the limit of 1024",
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
    assert_eq!(m["shards"][0]["layout"], "channels-last");
    assert_eq!(m["shards"][0]["lanes"], 2);
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
        assert_eq!(m["spec"]["dataset"]["format"], format);
        assert_eq!(m["files"].as_array().unwrap().len(), 1);
        let reference = (image != "jpeg").then_some(files.as_path());
        common::service::run_readers(&out, reference);
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

/// Runs the binary with `env` added and without JOB_COMPLETION_INDEX (a test may run in a pod).
fn run_with_env(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).env_remove("JOB_COMPLETION_INDEX");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running ddpm-worker")
}

/// A run's or a part's manifest, read from `dir`.
fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// The rows of every index part in `dir/index`, in sample order.
fn all_index_rows(dir: &Path) -> Vec<ddpm_worker::dataset::index::IndexRow> {
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(dir.join("index")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        rows.extend(ddpm_worker::dataset::index::read(bytes.into()).unwrap());
    }
    rows.sort_by_key(|r| r.index);
    rows
}

/// Ten samples in five batches of two, split into three parts of 1, 2 and 2 batches.
const SPLIT_RUN: [&str; 10] =
    ["--scheduler", "ddpm", "--steps", "20", "--seed", "7", "--num-samples", "10", "--batch-size", "2"];

#[test]
fn parts_of_a_run_write_its_samples_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let m = model.to_str().unwrap();
    let full = dir.path().join("full");
    generate(&model, &full, &SPLIT_RUN);

    let split = dir.path().join("split");
    let s = split.to_str().unwrap();
    let base = [&["generate", "--model", m, "--out", s][..], &SPLIT_RUN].concat();
    // Parts run in any order; the middle one as a pod of an Indexed Job gets its index.
    let part = |args: Vec<&str>, env: Vec<(&str, String)>| {
        let o = run_with_env(&[&base[..], &args].concat(), &env);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    part(vec!["--part", "2/3"], vec![]);
    part(vec!["--part-count", "3"], vec![("JOB_COMPLETION_INDEX", "1".to_string())]);
    assert!(!split.join("manifest.json").exists(), "no manifest while a part is missing");

    // A part is not run twice, and a split of another shape is refused where one was written.
    let again = run(&[&base[..], &["--part", "1/3"]].concat());
    assert_eq!(again.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already holds this part (shards/000001.json)"), "{stderr}");
    let other = run(&[&base[..], &["--part", "1/2"]].concat());
    assert_eq!(other.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(stderr.contains("shards/000001.json with samples 2..6, not samples 4..10"), "{stderr}");
    // A part that died before its record (a pod killed mid-run): a split of another shape is still refused
    // by the index part it left, and the part itself runs again, keeping what it stored.
    std::fs::remove_file(split.join("shards/000001.json")).unwrap();
    let other = run(&[&base[..], &["--part", "1/2"]].concat());
    assert_eq!(other.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(stderr.contains("index/part-000001.parquet with samples 2..6"), "{stderr}");
    part(vec!["--part", "1/3"], vec![]);
    assert!(!split.join("manifest.json").exists(), "no manifest while a part is missing");

    // The last part finds every record there and writes the run's manifest, as a job's last shard does.
    part(vec!["--part", "0/3"], vec![]);
    let manifest = read_json(&split.join("manifest.json"));
    assert_eq!(manifest["totals"]["shards"], 3);
    // The same run as the whole one, but for where it was written.
    let (mut split_spec, mut full_spec) =
        (manifest["spec"].clone(), read_json(&full.join("manifest.json"))["spec"].clone());
    assert_ne!(split_spec["output"], full_spec["output"]);
    split_spec["output"] = serde_json::Value::Null;
    full_spec["output"] = serde_json::Value::Null;
    assert_eq!(split_spec, full_spec);
    // Each part: whole batches, its own record and index part; the grid spans parts, so the last part
    // drew it.
    let mut covered = Vec::new();
    for (k, (first, end)) in [(0, 2), (2, 6), (6, 10)].into_iter().enumerate() {
        let record = read_json(&split.join(format!("shards/{k:06}.json")));
        assert_eq!((record["start"].as_u64(), record["end"].as_u64()), (Some(first), Some(end)));
        assert_eq!(record["index"]["path"], format!("index/part-{k:06}.parquet"));
        assert_eq!(manifest["index"][k], record["index"]);
        assert_eq!(manifest["shards"][k]["start"], record["start"]);
        assert!(record["grids"].as_array().unwrap().is_empty(), "grid 0 (samples 0..10) spans parts");
        let index = std::fs::read(split.join(record["index"]["path"].as_str().unwrap())).unwrap();
        let rows = ddpm_worker::dataset::index::read(index.into()).unwrap();
        covered.extend(rows.iter().map(|r| r.index));
        assert_eq!(rows.iter().map(|r| r.index).collect::<Vec<_>>(), (first..end).collect::<Vec<_>>());
    }
    covered.sort();
    assert_eq!(covered, (0..10).collect::<Vec<_>>(), "the parts cover every sample exactly once");
    let grid = std::fs::read(split.join("grids/00000.png")).unwrap();
    assert_eq!(manifest["grids"][0]["sha256"], ddpm_worker::digest::sha256_hex(&grid));
    assert_eq!(grid, std::fs::read(full.join("grids/00000.png")).unwrap(), "the whole run's grid");

    // Every sample is the whole run's, byte for byte, and nothing else was written.
    let listing = |d: &Path| {
        let mut names: Vec<_> =
            std::fs::read_dir(d.join("samples")).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names
    };
    assert_eq!(listing(&split), listing(&full));
    for i in 0..10 {
        assert_eq!(sample_png(&split, i), sample_png(&full, i), "sample {i}");
    }
    let whole = index_rows(&full, &read_json(&full.join("manifest.json")));
    let parts = all_index_rows(&split);
    assert_eq!(index_rows(&split, &manifest).len(), 10);
    let key = |r: &ddpm_worker::dataset::index::IndexRow| (r.index, r.seed, r.sha256.clone(), r.file.clone());
    assert_eq!(parts.iter().map(key).collect::<Vec<_>>(), whole.iter().map(key).collect::<Vec<_>>());

    // A whole run is refused where its parts went, and parts where a whole run went.
    let whole_there = run(&base);
    assert_eq!(whole_there.status.code(), Some(2), "{}", String::from_utf8_lossy(&whole_there.stderr));
    let f = full.to_str().unwrap();
    let part_there =
        run(&[&["generate", "--model", m, "--out", f][..], &SPLIT_RUN, &["--part", "1/3"]].concat());
    assert_eq!(part_there.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&part_there.stderr).contains("already holds a run (manifest.json)"));
}

#[test]
fn bad_parts_exit_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = dir.path().join("o");
    let base = ["generate", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()];
    let base = [&base[..], &SPLIT_RUN].concat();
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    assert_usage_error(&with(&["--part", "3/3"]), "INDEX counts from 0 and must be less than COUNT");
    assert_usage_error(&with(&["--part", "0/0"]), "COUNT must be at least 1");
    assert_usage_error(&with(&["--part", "0/6"]), "6 parts, but the run has only 5 batch(es)");
    assert_usage_error(&with(&["--part", "2"]), "expected INDEX/COUNT");
    assert_usage_error(&with(&["--part=-1/3"]), "expected INDEX/COUNT");
    assert_usage_error(&with(&["--part", "0/2", "--part-count", "2"]), "cannot be used with");
    // Outside an Indexed Job's pod (the tests clear JOB_COMPLETION_INDEX).
    assert_usage_error(&with(&["--part-count", "3"]), "--part-count needs JOB_COMPLETION_INDEX");
    let o = run_with_env(&with(&["--part-count", "3"]), &[("JOB_COMPLETION_INDEX", "x".into())]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("JOB_COMPLETION_INDEX=\"x\" is not an index"));
    let o = run_with_env(&with(&["--part-count", "3"]), &[("JOB_COMPLETION_INDEX", "3".into())]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("3/3: INDEX counts from 0"));
    assert!(!out.exists(), "a refused run writes nothing");
}

#[test]
fn a_hub_id_is_read_from_the_hugging_face_cache() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // The layout huggingface_hub leaves: refs/main names the snapshot folder.
    let cache = dir.path().join("hf");
    let repo = cache.join("models--ddpm-test--tiny");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, snapshot.join(path.file_name().unwrap())).unwrap();
    }
    let args = ["--scheduler", "ddim", "--steps", "4", "--num-samples", "2"];
    let from_folder = dir.path().join("folder");
    generate(&model, &from_folder, &args);
    let from_hub = dir.path().join("hub");
    let hub_args = ["generate", "--model", "ddpm-test/tiny", "--out", from_hub.to_str().unwrap()];
    // A closed port as the hub: the cached snapshot is used without asking it.
    let env = [("HF_HUB_CACHE", cache.display().to_string()), ("HF_ENDPOINT", "http://127.0.0.1:9".into())];
    let o = run_with_env(&[&hub_args[..], &args].concat(), &env);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = read_json(&from_hub.join("manifest.json"));
    assert_eq!(m["model"]["source"], "hf://ddpm-test/tiny");
    assert_eq!(m["spec"]["model"], "hf://ddpm-test/tiny");
    for i in 0..2 {
        assert_eq!(sample_png(&from_hub, i), sample_png(&from_folder, i));
    }
    // Not in the cache, and the hub out of reach: a clear error naming both.
    let x = dir.path().join("x");
    let missing = ["generate", "--model", "ddpm-test/absent", "--out", x.to_str().unwrap()];
    let o = run_with_env(&[&missing[..], &args].concat(), &env);
    assert_eq!(o.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("not in the Hugging Face cache at") && stderr.contains("ddpm-test/absent"),
        "{stderr}"
    );
}

/// A model from S3 and parts written to S3 (a real SeaweedFS), in the WebDataset layout: the samples are
/// the local whole run's, and the temporary model copy and spool files are gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_read_an_s3_model_and_write_to_s3() {
    use common::seaweed::{self, SeaweedFs};
    use ddpm_worker::storage::ObjectStore;
    let s3 = SeaweedFs::shared().await;
    let client = s3.client();
    let prefix = seaweed::unique_prefix("generate");
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    seaweed::upload(&client, &model, &format!("{prefix}/models/tiny")).await;
    let full = dir.path().join("full");
    generate(&model, &full, &SPLIT_RUN);

    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut env: Vec<(&str, String)> = seaweed::aws_env(s3.endpoint()).into_iter().collect();
    env.push(("TMPDIR", tmp.display().to_string()));
    let s3_model = format!("s3://{}/{prefix}/models/tiny", seaweed::BUCKET);
    let out = format!("s3://{}/{prefix}/run", seaweed::BUCKET);
    let base =
        [&["generate", "--model", &s3_model, "--out", &out, "--s3-path-style"][..], &SPLIT_RUN].concat();
    // 64 KiB files hold 14 samples of 16×16 (7 batches of 2): one tar per part.
    let layout = ["--format", "webdataset", "--target-file-bytes", "65536"];
    for (part, last) in [("0/2", false), ("1/2", true)] {
        let o = run_with_env(&[&base[..], &layout, &["--part", part]].concat(), &env);
        assert!(o.status.success(), "part {part}: {}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8_lossy(&o.stdout);
        let shard = &part[..1];
        assert!(stdout.contains(&format!("record: {out}/shards/00000{shard}.json")), "{stdout}");
        // The second part finds both records and writes the run's manifest.
        assert_eq!(stdout.contains(&format!("manifest: {out}/manifest.json")), last, "{stdout}");
    }
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "the model copy and spools are removed");

    let local = dir.path().join("downloaded");
    let keys = seaweed::download(&client, &format!("{prefix}/run"), &local).await;
    assert_eq!(
        keys,
        [
            "README.md",
            "data/000000.tar",
            "data/000001.tar",
            "data/wids.json",
            "grids/00000.png",
            "index/part-000000.parquet",
            "index/part-000001.parquet",
            "manifest.json",
            "shards/000000.json",
            "shards/000001.json",
        ]
    );
    let m = read_json(&local.join("manifest.json"));
    assert_eq!(m["model"]["source"], s3_model);
    assert_eq!(m["shards"][0]["end"], 4, "5 batches split 2 + 3");
    assert_eq!(m["totals"]["data_files"], 2);
    let store: std::sync::Arc<dyn ObjectStore> =
        std::sync::Arc::new(ddpm_worker::storage::local::LocalStore::new(&local).unwrap());
    let rows = all_index_rows(&local);
    assert_eq!(rows.iter().map(|r| r.index).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
    for row in rows {
        let size = |p: &str| std::fs::metadata(local.join(p)).ok().map(|m| m.len());
        let bytes = ddpm_worker::dataset::sink::read_sample(&store, "", &row, size).await.unwrap();
        assert_eq!(bytes.as_ref(), sample_png(&full, row.index as usize), "sample {}", row.index);
    }

    // The same part again: refused, the run's manifest is there.
    let o = run_with_env(&[&base[..], &layout, &["--part", "1/2"]].concat(), &env);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds a run (manifest.json)"));
}
