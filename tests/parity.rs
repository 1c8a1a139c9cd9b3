//! Parity with real diffusers (torch 2.13.0, diffusers 0.42.1): noise streams, UNet forward, every
//! scheduler's steps and whole pipelines, against the goldens of `tests/fixtures/gen_fixtures.py`.

mod common;

use common::{fixtures, fraction_within, load, manifest, max_abs_diff};
use ddpm_worker::imaging;
use ddpm_worker::model::{Layout, LoadedUNet, ModelFiles};
use ddpm_worker::rng::TorchGenerator;
use ddpm_worker::sampler::{self, BatchRequest, Placement};
use ddpm_worker::schedulers::{SchedulerConfig, SchedulerKind};
use tch::{Device, Kind, Tensor};

const NOISE_TOL: f64 = 1e-6;
const UNET_TOL: f64 = 1e-4;
const STEP_TOL: f64 = 1e-5;
const PIXEL_SHARE: f64 = 0.999;

#[test]
fn noise_streams_equal_torch_randn() {
    let goldens = load(fixtures().join("noise.safetensors"));
    let mut generator = TorchGenerator::new(0);
    let (mut worst, mut exact, mut total) = (0f64, 0usize, 0usize);
    for case in manifest()["noise"].as_array().expect("noise cases") {
        let name = case["name"].as_str().unwrap();
        let seed = case["seed"].as_u64().unwrap();
        let numel = case["numel"].as_u64().unwrap() as usize;
        if case["draw"].as_u64() == Some(0) {
            generator = TorchGenerator::new(seed);
        }
        let ours = generator.randn(numel);
        let want = Vec::<f32>::try_from(&goldens[name]).unwrap();
        for (a, b) in ours.iter().zip(&want) {
            worst = worst.max(f64::from((a - b).abs()));
            exact += usize::from(a.to_bits() == b.to_bits());
            total += 1;
        }
        assert!(worst <= NOISE_TOL, "{name}: max |Δ| = {worst:e}");
    }
    println!("noise: {total} values, {exact} bit-identical, max |Δ| = {worst:e}");
    assert!(total > 10_000);
}

#[test]
fn unet_forward_matches_diffusers() {
    let goldens = load(fixtures().join("unet_forward.safetensors"));
    let params = &manifest()["parameters"];
    for (folder, golden) in [
        ("tiny-google", "tiny-google"),
        ("tiny-google-bin", "tiny-google"),
        ("tiny-pipeline", "tiny-pipeline"),
        ("dummy-ddpm-test", "dummy-ddpm-test"),
        ("tiny-gray", "tiny-gray"),
        ("tiny-class-table", "tiny-class-table"),
        ("tiny-class-timestep", "tiny-class-timestep"),
        ("tiny-class-identity", "tiny-class-identity"),
        ("tiny-resnet-resample", "tiny-resnet-resample"),
    ] {
        let files = ModelFiles::locate(&fixtures().join("models").join(folder)).unwrap();
        let unet = LoadedUNet::load(&files, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(
            unet.num_parameters() as u64,
            params[golden].as_u64().unwrap(),
            "{folder} parameter count"
        );
        let x = &goldens[&format!("{golden}.input")];
        // Class-conditional models' labels: indices, or vectors for an identity class embedding.
        let labels = goldens.get(&format!("{golden}.labels"));
        assert_eq!(labels.is_some(), unet.is_conditional(), "{folder}: conditional");
        for t in [0i64, 1, 500, 999] {
            let ours = tch::no_grad(|| unet.forward_classes(x, t, labels));
            let d = max_abs_diff(&ours, &goldens[&format!("{golden}.t{t}")]);
            println!("{folder} t={t}: max |Δ| = {d:e}");
            assert!(d <= UNET_TOL, "{folder} t={t}: max |Δ| = {d:e}");
            // The class-conditional models are held to the last bit (measured: 0 on every case).
            assert!(labels.is_none() || d == 0.0, "{folder} t={t}: not bit-identical, max |Δ| = {d:e}");
        }
    }
}

fn kind_of(class: &str) -> SchedulerKind {
    match class {
        "DDPMScheduler" => SchedulerKind::Ddpm,
        "DDIMScheduler" => SchedulerKind::Ddim,
        "PNDMScheduler" => SchedulerKind::Pndm,
        "DPMSolverMultistepScheduler" => SchedulerKind::Dpmsolver,
        other => panic!("unknown scheduler class {other}"),
    }
}

#[test]
fn scheduler_steps_match_diffusers() {
    for case in manifest()["schedulers"].as_array().expect("scheduler cases") {
        let name = case["name"].as_str().unwrap();
        let kind = kind_of(case["class"].as_str().unwrap());
        let config = SchedulerConfig::from_json(kind, &case["config"].to_string()).unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let eta = case["eta"].as_f64().unwrap_or(0.0) as f32;
        let mut sched = config.build(steps, eta).unwrap();
        let g = load(fixtures().join("schedulers").join(format!("{name}.safetensors")));
        let want_t = Vec::<i64>::try_from(&g["timesteps"]).unwrap();
        assert_eq!(sched.timesteps(), &want_t[..], "{name}: timesteps");
        let mut worst = 0f64;
        for i in 0..want_t.len() {
            let noise = g.get(&format!("noise_{i}"));
            assert_eq!(sched.needs_noise(i), noise.is_some(), "{name} step {i}: noise consumption");
            let prev = sched.step(i, &g[&format!("model_output_{i}")], &g[&format!("sample_{i}")], noise);
            let d = max_abs_diff(&prev, &g[&format!("prev_{i}")]);
            worst = worst.max(d);
            assert!(d <= STEP_TOL, "{name} step {i} (t={}): max |Δ| = {d:e}", want_t[i]);
        }
        println!("{name}: {} steps, max |Δ| = {worst:e}", want_t.len());
    }
}

/// Runs a fixture pipeline case through our sampler; returns x_0 and its 8-bit pixels, H×W×C bytes per
/// image as the goldens hold them (one byte a pixel for one-channel models, like mode "L" images).
fn run_pipeline(case: &serde_json::Value, layout: Layout) -> (Tensor, Vec<u8>) {
    let files = ModelFiles::locate(&fixtures().join("models").join(case["model"].as_str().unwrap())).unwrap();
    let mut unet = LoadedUNet::load(&files, Device::Cpu, Kind::Float).unwrap();
    unet.set_layout(layout);
    let kind: SchedulerKind = serde_json::from_value(case["scheduler"].clone()).unwrap();
    let text = std::fs::read_to_string(&files.scheduler_config).unwrap();
    let config = SchedulerConfig::from_json(kind, &text).unwrap();
    let seeds: Vec<u64> = case["seeds"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    // Class-conditional cases: each seed's label, and the guidance.
    let labels: Option<Vec<i64>> =
        case["labels"].as_array().map(|l| l.iter().map(|v| v.as_i64().unwrap()).collect());
    let guidance = case["guidance_scale"].as_f64().map(|scale| sampler::Guidance {
        scale: scale as f32,
        null_class: case["null_class"].as_i64().unwrap(),
    });
    let req = BatchRequest {
        classes: labels.as_deref(),
        guidance,
        ..BatchRequest::new(
            &seeds,
            seeds.len(),
            case["steps"].as_u64().unwrap() as usize,
            case["eta"].as_f64().unwrap_or(0.0) as f32,
        )
    };
    let place = Placement { device: Device::Cpu, kind: Kind::Float };
    let x0 = sampler::sample_batch(&unet, &config, &req, place, None, |_| true).unwrap();
    let pixels = imaging::to_images(&x0).unwrap().iter().flat_map(|i| i.as_bytes().to_vec()).collect();
    (x0, pixels)
}

fn golden_pixels(name: &str) -> (std::collections::HashMap<String, Tensor>, Vec<u8>) {
    let golden = load(fixtures().join("pipelines").join(format!("{name}.safetensors")));
    let pixels = Vec::<u8>::try_from(golden["uint8"].reshape([-1])).unwrap();
    (golden, pixels)
}

#[test]
fn pipelines_match_diffusers_images() {
    for case in manifest()["pipelines"].as_array().expect("pipeline cases") {
        let name = case["name"].as_str().unwrap();
        let (x0, ours) = run_pipeline(case, Layout::Diffusers);
        let (golden, want) = golden_pixels(name);
        // diffusers' "np" output is (x/2 + 0.5).clamp(0, 1), NHWC (C = 1 for grayscale models).
        let ours_float = (&x0 / 2.0 + 0.5).clamp(0.0, 1.0).permute([0, 2, 3, 1]);
        let float_diff = max_abs_diff(&ours_float, &golden["float"]);
        let share = fraction_within(&ours, &want, 1);
        let identical = fraction_within(&ours, &want, 0);
        println!(
            "{name}: {:.4}% of pixel values within 1/255 ({:.4}% identical), float max |Δ| = {float_diff:e}",
            share * 100.0,
            identical * 100.0
        );
        assert!(share >= PIXEL_SHARE, "{name}: only {:.4}% within 1/255", share * 100.0);
        if case.get("labels").is_some() {
            assert_eq!(float_diff, 0.0, "{name}: the class-conditional loop is not bit-identical");
        }
    }
}

#[test]
fn resolved_scheduler_configs_match_from_config() {
    // What diffusers' pipelines resolved from the folder equals what we resolve from the same file.
    for case in manifest()["pipelines"].as_array().unwrap() {
        let files =
            ModelFiles::locate(&fixtures().join("models").join(case["model"].as_str().unwrap())).unwrap();
        let kind: SchedulerKind = serde_json::from_value(case["scheduler"].clone()).unwrap();
        let ours =
            SchedulerConfig::from_json(kind, &std::fs::read_to_string(&files.scheduler_config).unwrap())
                .unwrap();
        let ours = ours.to_json();
        for (key, value) in case["resolved_scheduler"].as_object().unwrap() {
            if let Some(mine) = ours.get(key) {
                let same = match (mine.as_f64(), value.as_f64()) {
                    (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                    _ => mine == value,
                };
                assert!(same, "{}: {key}: ours {mine} vs diffusers {value}", case["name"]);
            }
        }
    }
}

#[test]
fn padded_batches_and_noise_drawn_ahead_give_the_same_samples() {
    // A short batch padded with zero rows gives the same rows as a full one (bit-identical at a fixed size).
    let files = ModelFiles::locate(&fixtures().join("models").join("tiny-google")).unwrap();
    let unet = LoadedUNet::load(&files, Device::Cpu, Kind::Float).unwrap();
    let config = SchedulerConfig::default_for(SchedulerKind::Ddpm).unwrap();
    let place = Placement { device: Device::Cpu, kind: Kind::Float };
    let run = |seeds: &[u64]| {
        sampler::sample_batch(&unet, &config, &BatchRequest::new(seeds, 4, 10, 0.0), place, None, |_| true)
            .unwrap()
    };
    let full = run(&[5, 6, 7, 8]);
    let short = run(&[7]);
    assert!(bool::try_from(full.isfinite().all()).unwrap());
    assert!(Tensor::equal(&full.get(2), &short.get(0)), "sample 7 differs between a full and a padded batch");

    // Noise drawn ahead (as the next batch's is while one samples) gives the same bits, DDPM drawing at
    // every step; noise drawn ahead for other seeds is not used.
    fn request(seeds: &[u64]) -> BatchRequest<'_> {
        BatchRequest::new(seeds, 4, 10, 0.0)
    }
    let with = |ahead_seeds: &[u64]| {
        let shape = sampler::sample_shape(&unet.config).unwrap();
        let ahead = sampler::noise_ahead(shape, &config, &request(ahead_seeds)).unwrap();
        sampler::sample_batch(&unet, &config, &request(&[5, 6, 7, 8]), place, Some(ahead), |_| true).unwrap()
    };
    assert!(Tensor::equal(&with(&[5, 6, 7, 8]), &full), "noise drawn ahead changed the samples");
    assert!(Tensor::equal(&with(&[1, 2, 3, 4]), &full), "noise drawn ahead for other seeds was used");
}

/// The fast layout agrees with diffusers within the parity tolerances: the UNet everywhere, and whole
/// pipelines wherever the reference itself is stable. With random-weight test models some samplers are
/// chaotic (DDIM η = 0 here): an ULP at the first step grows into whole pixel values, and diffusers
/// run with a channels-last UNet disagrees with diffusers as much as we do. The fixture generator
/// measures that (`channels_last_agreement`); a tolerance check is meaningful only where it holds.
/// The `diffusers` layout is bit-identical and is checked on every pipeline above.
#[test]
fn channels_last_layout_is_within_tolerance() {
    let goldens = load(fixtures().join("unet_forward.safetensors"));
    for name in [
        "tiny-google",
        "tiny-pipeline",
        "dummy-ddpm-test",
        "tiny-gray",
        "tiny-class-table",
        "tiny-class-timestep",
        "tiny-resnet-resample",
    ] {
        let files = ModelFiles::locate(&fixtures().join("models").join(name)).unwrap();
        let mut unet = LoadedUNet::load(&files, Device::Cpu, Kind::Float).unwrap();
        unet.set_layout(Layout::ChannelsLast);
        let labels = goldens.get(&format!("{name}.labels"));
        for t in [0i64, 500, 999] {
            let d = max_abs_diff(
                &tch::no_grad(|| unet.forward_classes(&goldens[&format!("{name}.input")], t, labels)),
                &goldens[&format!("{name}.t{t}")],
            );
            println!("{name} channels-last t={t}: max |Δ| = {d:e}");
            assert!(d <= UNET_TOL, "{name} t={t}: {d:e}");
        }
    }
    let mut checked = 0;
    for case in manifest()["pipelines"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (_, ours) = run_pipeline(case, Layout::ChannelsLast);
        let (_, want) = golden_pixels(name);
        let share = fraction_within(&ours, &want, 1);
        let reference = case["channels_last_agreement"].as_f64().unwrap();
        println!(
            "{name} channels-last: {:.4}% of pixel values within 1/255 (diffusers channels-last vs diffusers: {:.4}%)",
            share * 100.0,
            reference * 100.0
        );
        if reference < PIXEL_SHARE {
            println!("  {name}: the reference is not stable to float noise; no tolerance to check");
            continue;
        }
        assert!(share >= PIXEL_SHARE, "{name}: only {:.4}% within 1/255", share * 100.0);
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} pipelines had a stable reference");
}
