//! The rules of a job's settings, written once. The API ([`crate::api::convert`]) and `generate` check
//! requests with them, each naming the fields its own way ([`Field::api_path`], [`Field::flag`]); the
//! wire conversion is a separate step.

use crate::dataset::{self, DataFormat, DatasetOptions, Encoding, ImageFormat};
use crate::schedulers::SchedulerKind;

/// A setting a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Steps,
    Eta,
    NumSamples,
    Seed,
    BatchSize,
    JpegQuality,
    PngLevel,
    TargetFileBytes,
    SamplesPerGrid,
}

impl Field {
    /// The field's path in a SubmitJob request.
    pub fn api_path(self) -> &'static str {
        match self {
            Field::Steps => "spec.sampling.steps",
            Field::Eta => "spec.sampling.eta",
            Field::NumSamples => "spec.num_samples",
            Field::Seed => "spec.seed",
            Field::BatchSize => "spec.batch_size",
            Field::JpegQuality => "spec.output.jpeg_quality",
            Field::PngLevel => "spec.output.png_level",
            Field::TargetFileBytes => "spec.output.target_file_bytes",
            Field::SamplesPerGrid => "spec.grid.samples_per_grid",
        }
    }

    /// The setting's name on the command line (`generate`'s flags, with `_` for `-`).
    pub fn flag(self) -> &'static str {
        match self {
            Field::Steps => "steps",
            Field::Eta => "eta",
            Field::NumSamples => "num_samples",
            Field::Seed => "seed",
            Field::BatchSize => "batch_size",
            Field::JpegQuality => "quality",
            Field::PngLevel => "png_level",
            Field::TargetFileBytes => "target_file_bytes",
            Field::SamplesPerGrid => "samples_per_grid",
        }
    }
}

/// A broken rule: which setting, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: Field,
    pub message: String,
}

/// Collects the rules a request breaks (all of them, so one error names every bad field).
#[derive(Debug, Default)]
pub struct Violations(pub Vec<Violation>);

impl Violations {
    pub fn add(&mut self, field: Field, message: impl Into<String>) {
        self.0.push(Violation { field, message: message.into() });
    }
}

/// η: DDIM only, a finite number ≥ 0. `scheduler` is `None` when the request's scheduler is itself bad.
pub fn eta(scheduler: Option<SchedulerKind>, eta: Option<f32>, bad: &mut Violations) {
    let Some(eta) = eta else { return };
    if scheduler.is_some_and(|s| s != SchedulerKind::Ddim) {
        bad.add(Field::Eta, "applies to the DDIM scheduler only");
    } else if !(eta.is_finite() && eta >= 0.0) {
        bad.add(Field::Eta, format!("{eta} must be a finite number ≥ 0"));
    }
}

/// Samples `seed..seed + num_samples` are seeded `seed + i`: the last one must fit in a u64.
pub fn seeds(seed: u64, num_samples: u64, bad: &mut Violations) {
    if seed.checked_add(num_samples.saturating_sub(1)).is_none() {
        bad.add(Field::Seed, "seed + num_samples overflows u64");
    }
}

/// The most samples one grid shows (a grid is one PNG, composed in memory).
pub const MAX_SAMPLES_PER_GRID: u32 = 1024;

/// Samples per grid: at most [`MAX_SAMPLES_PER_GRID`] (0: no grids).
pub fn samples_per_grid(n: u32, bad: &mut Violations) {
    if n > MAX_SAMPLES_PER_GRID {
        bad.add(Field::SamplesPerGrid, format!("{n} exceeds the limit of {MAX_SAMPLES_PER_GRID}"));
    }
}

/// An encoder's setting as asked: `None` when not given or refused (the default then), refused where
/// the encoding (`applies`, named `encoding`) does not take it or out of `range`.
fn encoder_setting(
    given: Option<u32>,
    (applies, encoding): (bool, &str),
    range: std::ops::RangeInclusive<u8>,
    field: Field,
    bad: &mut Violations,
) -> Option<u8> {
    let value = given?;
    if !applies {
        bad.add(field, format!("{value}: applies to {encoding} only"));
        return None;
    }
    let fits = u8::try_from(value).ok().filter(|v| range.contains(v));
    if fits.is_none() {
        bad.add(field, format!("{value} must be in {}..={}", range.start(), range.end()));
    }
    fits
}

/// How a request asks its samples to be stored; `None` (or 0 on the wire) takes the default.
#[derive(Debug, Clone, Copy)]
pub struct StorageRequest {
    pub format: DataFormat,
    pub image: ImageFormat,
    pub jpeg_quality: Option<u32>,
    pub png_level: Option<u32>,
    pub target_file_bytes: Option<u64>,
}

/// The layout and encoding a request asks for, with the defaults filled in; data files are sized from
/// the sample shape `(C, H, W)` and hold whole batches. Settings that do not apply to the chosen format
/// are refused rather than ignored.
pub fn storage(
    req: StorageRequest,
    shape: (u64, u64, u64),
    batch_size: u64,
    bad: &mut Violations,
) -> DatasetOptions {
    let jpeg = req.image == ImageFormat::Jpeg;
    let quality = encoder_setting(req.jpeg_quality, (jpeg, "JPEG"), 1..=100, Field::JpegQuality, bad)
        .unwrap_or(dataset::DEFAULT_JPEG_QUALITY);
    let png = req.image == ImageFormat::Png;
    let png_level = encoder_setting(req.png_level, (png, "PNG"), 1..=9, Field::PngLevel, bad)
        .unwrap_or(dataset::DEFAULT_PNG_LEVEL);
    let target = match req.target_file_bytes {
        None => dataset::DEFAULT_TARGET_FILE_BYTES,
        Some(t) if !dataset::TARGET_FILE_BYTES.contains(&t) => {
            let (lo, hi) = (dataset::TARGET_FILE_BYTES.start(), dataset::TARGET_FILE_BYTES.end());
            bad.add(Field::TargetFileBytes, format!("{t} must be in {lo}..={hi}"));
            dataset::DEFAULT_TARGET_FILE_BYTES
        }
        Some(t) if req.format == DataFormat::Files => {
            bad.add(Field::TargetFileBytes, format!("{t}: applies to WEBDATASET and PARQUET only"));
            dataset::DEFAULT_TARGET_FILE_BYTES
        }
        Some(t) => t,
    };
    let encoding = Encoding { image: req.image, png_level, quality };
    DatasetOptions::new(req.format, encoding, target, shape, batch_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage_errors(req: StorageRequest) -> Vec<(Field, String)> {
        let mut bad = Violations::default();
        storage(req, (3, 32, 32), 8, &mut bad);
        bad.0.into_iter().map(|v| (v.field, v.message)).collect()
    }

    #[test]
    fn settings_that_do_not_apply_are_refused_and_ranges_hold() {
        let png = StorageRequest {
            format: DataFormat::Files,
            image: ImageFormat::Png,
            jpeg_quality: None,
            png_level: None,
            target_file_bytes: None,
        };
        assert!(storage_errors(png).is_empty());
        let fields = |r| storage_errors(r).into_iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(fields(StorageRequest { jpeg_quality: Some(90), ..png }), [Field::JpegQuality]);
        assert_eq!(fields(StorageRequest { png_level: Some(10), ..png }), [Field::PngLevel]);
        assert_eq!(storage_errors(StorageRequest { png_level: Some(10), ..png })[0].1, "10 must be in 1..=9");
        assert!(fields(StorageRequest { png_level: Some(9), ..png }).is_empty());
        let jpeg = StorageRequest { image: ImageFormat::Jpeg, ..png };
        assert_eq!(fields(StorageRequest { png_level: Some(3), ..jpeg }), [Field::PngLevel]);
        assert_eq!(fields(StorageRequest { jpeg_quality: Some(0), ..jpeg }), [Field::JpegQuality]);
        assert!(fields(StorageRequest { jpeg_quality: Some(100), ..jpeg }).is_empty());
        assert_eq!(
            fields(StorageRequest { target_file_bytes: Some(1 << 20), ..png }),
            [Field::TargetFileBytes]
        );
        let tars = StorageRequest { format: DataFormat::Webdataset, ..png };
        assert!(fields(StorageRequest { target_file_bytes: Some(1 << 20), ..tars }).is_empty());
        assert_eq!(fields(StorageRequest { target_file_bytes: Some(1), ..tars }), [Field::TargetFileBytes]);
    }

    #[test]
    fn eta_is_for_ddim_and_seeds_fit_in_u64() {
        let mut bad = Violations::default();
        eta(Some(SchedulerKind::Ddpm), Some(0.5), &mut bad);
        eta(Some(SchedulerKind::Ddim), Some(f32::NAN), &mut bad);
        eta(Some(SchedulerKind::Ddim), Some(-1.0), &mut bad);
        eta(Some(SchedulerKind::Ddim), Some(1.0), &mut bad);
        eta(None, Some(1.0), &mut bad);
        seeds(u64::MAX, 1, &mut bad);
        seeds(u64::MAX, 2, &mut bad);
        let fields: Vec<Field> = bad.0.iter().map(|v| v.field).collect();
        assert_eq!(fields, [Field::Eta, Field::Eta, Field::Eta, Field::Seed]);
    }
}
