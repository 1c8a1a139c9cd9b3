//! The demo model of `make run` (demo/digits-16, trained by scripts/demo/train_digits.py): the committed
//! files are the ones SHA256SUMS names, its samples through `ddpm-worker generate` look like digits to a
//! classifier fitted on the real ones (scripts/demo/score_digits.py), and they are pixel-identical to
//! diffusers' pipelines on the same seeds (scripts/demo/diffusers_reference.py). Its class-conditional
//! sibling (demo/digits-16-labeled, `make run`'s model) draws the digit each sample is labelled with.
//!
//! Needs the project venv's python (`DDPM_PYTHON`, set by `make test`) with scikit-learn from
//! scripts/requirements-demo.txt, and torch and diffusers from scripts/requirements.txt.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, load};

// Thresholds on the score of 64 samples (DPM-Solver++, 25 steps, seeds 0..63) of the committed model.
// The run is deterministic (bit-identical to diffusers, AVX2 kernels under `make test`), so the margins
// below the measurements are for deliberate changes (a retrained checkpoint, a kernel change that flips a
// borderline sample), not for chance. A random-weight model of the same shape
// (`random_weights_fail_the_quality_check`) measured mean top-class 0.746, 9 digits, in-distribution 0,
// Fréchet 56.1; saturated noise from a model trained for 20 steps even reaches 0.802 and 9 digits (a
// linear classifier is most confident far from its data). So the first two checks alone would not catch
// a broken model or sampler; the last two do.

/// Mean top-class probability: measured 0.805; real digits score 0.929 on the same classifier. The
/// issue's target, kept although the margin is small.
const MIN_MEAN_TOP_PROB: f64 = 0.80;
/// Digits that are some sample's most likely class: measured 10 of 10.
const MIN_CLASSES: u64 = 9;
/// Share of samples near the real digits in pixel space (PCA residual within the real digits' 99th
/// percentile): measured 0.969 (62 of 64); real digits 1.0, noise 0.
const MIN_IN_DISTRIBUTION: f64 = 0.90;
/// Fréchet distance to the real digits in the classifier's decision space: measured 4.96; random
/// 64-digit subsets of the real digits give 5.3 (median) to 9.6 (max of 20); noise 52.6.
const MAX_FRECHET: f64 = 10.0;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn demo_model() -> PathBuf {
    repo().join("demo/digits-16")
}

fn labelled_model() -> PathBuf {
    repo().join("demo/digits-16-labeled")
}

/// Agreement of 200 guided samples (20 per digit, DPM-Solver++ 25 steps, w = 2, seeds 0..199) with
/// the digit asked for, by the digits classifier: diffusers' loop on the same model and seeds measured
/// 99.5 % (scripts/demo/labeled_reference.py, demo/digits-16-labeled/README.md); the issue asks ≥ 90 %.
const MIN_GUIDED_AGREEMENT: f64 = 0.90;
/// The guidance weight `make run` uses.
const DEMO_GUIDANCE: &str = "2";

fn python() -> String {
    std::env::var("DDPM_PYTHON").expect(
        "DDPM_PYTHON is not set: run `make test`, or point it at the project venv's python (with \
         scripts/requirements-demo.txt installed)",
    )
}

/// Runs a command and returns its stdout; panics with its output when it fails.
fn run(cmd: &mut Command) -> String {
    // A test may run in a pod of an Indexed Job; `generate` would take it for --part-count's index.
    let out = cmd.env_remove("JOB_COMPLETION_INDEX").output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `ddpm-worker generate` of `model` into `out` (on the CPU, the diffusers layout: the defaults).
fn generate(model: &Path, out: &Path, scheduler: &str, steps: usize, samples: usize, batch: usize) {
    run(Command::new(bin()).args([
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--scheduler",
        scheduler,
        "--steps",
        &steps.to_string(),
        "--num-samples",
        &samples.to_string(),
        "--seed",
        "0",
        "--batch-size",
        &batch.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]));
}

/// The decoded pixels of `samples/<i>.png` of a run, checked to be 16×16 8-bit grayscale.
fn sample_pixels(out: &Path, index: usize) -> Vec<u8> {
    let path = out.join(format!("samples/{index:08}.png"));
    let image = image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        image.color(),
        image::ColorType::L8,
        "{}: a one-channel model gives grayscale PNGs",
        path.display()
    );
    assert_eq!((image.width(), image.height()), (16, 16));
    image.into_bytes()
}

#[test]
fn checkpoint_matches_its_sha256sums() {
    for (model, extra) in [(demo_model(), None), (labelled_model(), Some("labels.json"))] {
        let sums = std::fs::read_to_string(model.join("SHA256SUMS")).unwrap();
        let mut listed = Vec::new();
        for line in sums.lines().filter(|l| !l.trim().is_empty()) {
            // sha256sum's format: the hex digest, two spaces (or space and '*'), the file name.
            let (want, name) = line.split_once("  ").unwrap_or_else(|| panic!("SHA256SUMS line {line:?}"));
            let got = ddpm_worker::digest::sha256_file(&model.join(name)).unwrap();
            assert_eq!(got, want, "{}/{name} differs from SHA256SUMS", model.display());
            listed.push(name.to_string());
        }
        for name in ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
            .iter()
            .chain(&extra)
        {
            assert!(listed.iter().any(|l| l == name), "{}: SHA256SUMS does not list {name}", model.display());
        }
    }
}

/// 200 samples of the labelled model, 20 per digit (the default: every class equally), through
/// `generate` with and without guidance: the class counts are exact (a folder per digit, 20 PNGs in
/// each), and with `make run`'s guidance the digits classifier sees the digit asked for in at least
/// 90 % of them. Without guidance the share is printed, not held to a threshold.
#[test]
fn labelled_samples_are_the_digits_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let mut agreement = Vec::new();
    for guidance in [Some(DEMO_GUIDANCE), None] {
        let out = dir.path().join(guidance.map_or("unguided".to_string(), |w| format!("w{w}")));
        let mut cmd = Command::new(bin());
        cmd.args(["generate", "--model", labelled_model().to_str().unwrap(), "--scheduler", "dpmsolver"])
            .args(["--steps", "25", "--num-samples", "200", "--seed", "0", "--batch-size", "50"])
            .args(["--out", out.to_str().unwrap()]);
        if let Some(w) = guidance {
            cmd.args(["--guidance-scale", w]);
        }
        run(&mut cmd);
        for digit in 0..10 {
            let pngs = std::fs::read_dir(out.join(format!("samples/{digit}"))).unwrap().count();
            assert_eq!(pngs, 20, "digit {digit}: samples in its folder");
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        let counts: Vec<(u64, u64)> = manifest["classes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["label"].as_u64().unwrap(), c["samples"].as_u64().unwrap()))
            .collect();
        assert_eq!(counts, (0..10).map(|d| (d, 20)).collect::<Vec<_>>(), "manifest class counts");
        let script = repo().join("scripts/demo/score_digits.py");
        let stdout = run(Command::new(python()).arg(script).arg("--labelled").arg(out.join("samples")));
        let score: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        println!("labelled, guidance {guidance:?}: {score}");
        agreement.push(score["agreement"].as_f64().unwrap());
    }
    println!(
        "agreement with the label: {:.3} guided (w = {DEMO_GUIDANCE}), {:.3} unguided",
        agreement[0], agreement[1]
    );
    assert!(
        agreement[0] >= MIN_GUIDED_AGREEMENT,
        "guided agreement {:.3} < {MIN_GUIDED_AGREEMENT}",
        agreement[0]
    );
}

/// 64 samples of `model` (DPM-Solver++, 25 steps, seeds 0..63, batches of 8) through `generate`, scored
/// by scripts/demo/score_digits.py.
fn score_64(model: &Path) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    generate(model, &out, "dpmsolver", 25, 64, 8);
    for i in 0..64 {
        sample_pixels(&out, i);
    }
    let script = repo().join("scripts/demo/score_digits.py");
    let stdout = run(Command::new(python()).arg(script).arg(out.join("samples")));
    let score: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(score["count"], 64);
    score
}

/// The thresholds `score` misses, one line each.
fn shortfalls(score: &serde_json::Value) -> Vec<String> {
    let mean_top = score["mean_top_prob"].as_f64().unwrap();
    let classes = score["classes_covered"].as_u64().unwrap();
    let in_distribution = score["in_distribution"].as_f64().unwrap();
    let frechet = score["frechet_distance"].as_f64().unwrap();
    let mut missed = Vec::new();
    if mean_top < MIN_MEAN_TOP_PROB {
        missed.push(format!("mean top-class probability {mean_top:.3} < {MIN_MEAN_TOP_PROB}"));
    }
    if classes < MIN_CLASSES {
        missed.push(format!("{classes} of 10 digits covered < {MIN_CLASSES}"));
    }
    if in_distribution < MIN_IN_DISTRIBUTION {
        missed.push(format!("in-distribution share {in_distribution:.3} < {MIN_IN_DISTRIBUTION}"));
    }
    if frechet > MAX_FRECHET {
        missed.push(format!("Fréchet distance {frechet:.2} > {MAX_FRECHET}"));
    }
    missed
}

#[test]
fn samples_are_recognisable_digits() {
    let score = score_64(&demo_model());
    println!("demo/digits-16, 64 DPM-Solver++ 25-step samples: {score}");
    let missed = shortfalls(&score);
    assert!(missed.is_empty(), "demo/digits-16 misses: {missed:?}");
}

/// The same check on a random-weight model of the same shape (`init-model --preset tiny --grayscale`,
/// 16×16, one channel): it must fail, and on the checks that tell digits from noise.
#[test]
fn random_weights_fail_the_quality_check() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("random");
    run(Command::new(bin()).args([
        "init-model",
        "--preset",
        "tiny",
        "--grayscale",
        "--seed",
        "0",
        "--out",
        model.to_str().unwrap(),
    ]));
    let score = score_64(&model);
    println!("random weights, 64 DPM-Solver++ 25-step samples: {score}");
    let missed = shortfalls(&score);
    assert!(missed.iter().any(|m| m.starts_with("in-distribution")), "{missed:?}");
    assert!(missed.iter().any(|m| m.starts_with("Fréchet")), "{missed:?}");
}

/// The committed model's samples through `generate` equal diffusers' pipelines byte for byte: DDPM
/// (100 steps), DDIM (η = 0, 50) and DPM-Solver++ (25), one batch of 4 with per-sample generators.
/// Unlike the random-weight parity fixtures, a trained model is what users run; its goldens come from
/// scripts/demo/diffusers_reference.py, run here on the committed files.
#[test]
fn generate_equals_diffusers_on_the_demo_model() {
    let dir = tempfile::tempdir().unwrap();
    let goldens = dir.path().join("diffusers");
    run(Command::new(python())
        .arg(repo().join("scripts/demo/diffusers_reference.py"))
        .arg(demo_model())
        .arg(&goldens));
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(goldens.join("cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let scheduler = case["scheduler"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let seeds = case["seeds"].as_array().unwrap();
        // `generate --seed 0` seeds sample i with i: the goldens must have used 0, 1, 2, …
        for (i, s) in seeds.iter().enumerate() {
            assert_eq!(s.as_u64(), Some(i as u64), "{name}: seeds");
        }
        assert_eq!(case["mode"], "L", "{name}: diffusers' PIL images of a one-channel model");
        let out = dir.path().join(name);
        generate(&demo_model(), &out, scheduler, steps, seeds.len(), seeds.len());
        let ours: Vec<u8> = (0..seeds.len()).flat_map(|i| sample_pixels(&out, i)).collect();
        let want =
            Vec::<u8>::try_from(load(goldens.join(format!("{name}.safetensors")))["uint8"].reshape([-1]))
                .unwrap();
        let identical = ours.iter().zip(&want).filter(|(a, b)| a == b).count();
        println!("{name}: {identical}/{} pixel values identical", want.len());
        assert_eq!(ours.len(), want.len(), "{name}: pixel count");
        assert!(identical == want.len(), "{name}: {} pixel values differ", want.len() - identical);
    }
}
