//! `ddpm-worker verify` as a data team runs it on a job folder: it passes on an untouched job, and
//! fails naming the sample when one byte of one stored sample is flipped or two tar members are
//! swapped, and refuses a model folder that is not the job's; and `generate --extend`, which continues
//! a job's seeds with its settings.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::bin;

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env("ATEN_CPU_CAPABILITY", "avx2").output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn model(dir: &Path, seed: &str) -> PathBuf {
    let model = dir.join(format!("model-{seed}"));
    let o = run(&["init-model", "--preset", "tiny", "--out", model.to_str().unwrap(), "--seed", seed]);
    assert!(o.status.success(), "{}", text(&o));
    model
}

/// A 12-sample job of batches of 4, as `generate` writes it.
fn job(model: &Path, out: &Path, format: &str) {
    let o = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--scheduler",
        "ddim",
        "--steps",
        "2",
        "--num-samples",
        "12",
        "--batch-size",
        "4",
        "--seed",
        "7",
        "--format",
        format,
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

/// `verify --fraction F` with `extra`.
fn verify(folder: &Path, fraction: &str, extra: &[&str]) -> Output {
    let mut args = vec!["verify", folder.to_str().unwrap(), "--fraction", fraction];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn an_untouched_job_verifies_and_a_flipped_byte_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path(), "1");
    let out = dir.path().join("files");
    job(&model, &out, "files");

    let o = verify(&out, "1", &["--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["samples_checked"], 12);
    assert_eq!(report["samples_resampled"], 12, "--fraction 1 samples every batch again");
    assert_eq!(report["batches_resampled"], 3);
    assert_eq!(report["mismatches"], serde_json::json!([]));
    // The manifest's path names the same job; a fraction picks whole batches, reproducibly.
    let o = run(&["verify", out.join("manifest.json").to_str().unwrap(), "--fraction", "0.3", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (report["batches_resampled"].as_u64(), report["samples_resampled"].as_u64()),
        (Some(1), Some(4))
    );

    // One byte in the middle of sample 5's PNG flipped.
    let png = out.join("samples/00000005.png");
    let mut bytes = std::fs::read(&png).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&png, bytes).unwrap();
    let o = verify(&out, "1", &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let report = text(&o);
    assert!(report.contains("MISMATCH sample 5 (samples/00000005.png): stored bytes"), "{report}");
    assert_eq!(report.matches("MISMATCH").count(), 1, "only sample 5 differs: {report}");
}

#[test]
fn swapped_tar_members_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path(), "1");
    let out = dir.path().join("wds");
    job(&model, &out, "webdataset");
    assert!(verify(&out, "0", &[]).status.success());

    // Samples 2 and 3 change places inside the tar: each member keeps its name and gets the other's
    // image.
    let tar_path = out.join("data/000000.tar");
    let mut members: Vec<(tar::Header, Vec<u8>)> = Vec::new();
    let mut archive = tar::Archive::new(std::fs::File::open(&tar_path).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        members.push((entry.header().clone(), data));
    }
    let find =
        |name: &str| members.iter().position(|(h, _)| h.path().unwrap().to_str() == Some(name)).unwrap();
    let (a, b) = (find("00000002.png"), find("00000003.png"));
    let (data_a, data_b) = (members[a].1.clone(), members[b].1.clone());
    members[a].1 = data_b;
    members[b].1 = data_a;
    let mut builder = tar::Builder::new(Vec::new());
    for (mut header, data) in members {
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, data.as_slice()).unwrap();
    }
    std::fs::write(&tar_path, builder.into_inner().unwrap()).unwrap();

    let o = verify(&out, "0", &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let report = text(&o);
    assert!(report.contains("MISMATCH data/000000.tar: stored with SHA-256"), "{report}");
    assert!(report.contains("MISMATCH sample 2 (data/000000.tar)"), "{report}");
    assert!(report.contains("MISMATCH sample 3 (data/000000.tar)"), "{report}");
    // The members before them are where the index says.
    assert!(!report.contains("sample 0 (") && !report.contains("sample 1 ("), "{report}");
}

#[test]
fn a_model_that_is_not_the_jobs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("files");
    job(&model(dir.path(), "1"), &out, "files");
    let other = model(dir.path(), "2");
    let o = verify(&out, "1", &["--model", other.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("not the job's model"), "{}", text(&o));

    let o = run(&["verify", dir.path().join("nowhere").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("no manifest.json"), "{}", text(&o));
    let o = run(&["verify", out.to_str().unwrap(), "--fraction", "2"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn extending_twice_gives_disjoint_contiguous_seeds_with_the_same_settings() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("a");
    job(&model(dir.path(), "1"), &first, "webdataset");
    let manifest = |folder: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(folder.join("manifest.json")).unwrap()).unwrap()
    };
    let index_seeds = |folder: &Path| -> Vec<u64> {
        let m = manifest(folder);
        let mut seeds = Vec::new();
        for part in m["index"].as_array().unwrap() {
            let bytes = std::fs::read(folder.join(part["path"].as_str().unwrap())).unwrap();
            seeds.extend(ddpm_worker::dataset::index::read(bytes.into()).unwrap().iter().map(|r| r.seed));
        }
        seeds
    };
    let (mut folders, mut previous) = (vec![first.clone()], first);
    for name in ["b", "c"] {
        let next = dir.path().join(name);
        // The model comes from the manifest; settings may not be given again.
        let o = run(&[
            "generate",
            "--extend",
            previous.to_str().unwrap(),
            "--num-samples",
            "6",
            "--out",
            next.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let m = manifest(&next);
        assert_eq!(
            m["spec"]["extends"],
            manifest(&previous)["job_id"],
            "the manifest names the job it extends"
        );
        folders.push(next.clone());
        previous = next;
    }
    let specs: Vec<serde_json::Value> = folders.iter().map(|f| manifest(f)["spec"].clone()).collect();
    for key in ["model", "scheduler", "steps", "eta", "batch_size", "dataset"] {
        assert!(specs.iter().all(|s| s[key] == specs[0][key]), "{key} differs: {specs:?}");
    }
    let seeds: Vec<u64> = folders.iter().flat_map(|f| index_seeds(f)).collect();
    assert_eq!(seeds, (7..7 + 12 + 6 + 6).collect::<Vec<u64>>(), "disjoint and contiguous, in order");
    // An extension verifies like any job.
    assert!(verify(&folders[2], "1", &[]).status.success());

    let o = run(&[
        "generate",
        "--extend",
        folders[0].to_str().unwrap(),
        "--seed",
        "3",
        "--out",
        dir.path().join("d").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "a setting given with --extend: {}", text(&o));
    let o = run(&[
        "generate",
        "--extend",
        dir.path().join("none").to_str().unwrap(),
        "--out",
        dir.path().join("e").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no manifest.json"), "{}", text(&o));
}
