//! The API boundary: requests checked and turned into domain values (every bad field named), and
//! domain values turned back into wire types. Past it everything works on validated [`JobSpec`]s; the
//! handlers and the command-line client are the only other places that know `pb::` types.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::auth::ANONYMOUS;
use super::error::{FieldViolation, ServiceError};
use super::pb;
use crate::classes::{ClassRequest, ClassSpec};
use crate::dataset::{DataFormat, DatasetOptions, ImageFormat};
use crate::job::{JobRecord, JobSpec, JobState};
use crate::models::ResolvedModel;
use crate::queue::{PageCursor, ShardStats};
use crate::schedulers::{SchedulerError, SchedulerKind};
use crate::validation::{self, StorageRequest, Violations};
use crate::worker::outputs::{Outputs, Refusal};

/// Limits on what one request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_samples: u64,
    pub max_steps: u32,
    pub max_batch_size: u32,
    pub default_batch_size: u32,
    pub max_samples_per_grid: u32,
    pub batches_per_shard: u64,
    /// Shards of one job at most: a larger job gets longer shards, so queueing it stays cheap.
    pub max_shards_per_job: u64,
    pub max_attempts: u32,
    /// The layout of jobs that name none.
    pub default_format: DataFormat,
    /// Priorities a job may have (each distinct value is a consumer on a NATS queue, so the range is
    /// small: see [`MAX_PRIORITY_VALUES`]).
    pub priorities: std::ops::RangeInclusive<i32>,
    /// What a job's own webhook must start with (`serve --allow-webhook`); empty: jobs name none.
    pub webhook_prefixes: Vec<String>,
}

impl Limits {
    /// Batches per shard for `spec`: the configured number (for `files`) or one data file's worth
    /// (`webdataset`, `parquet`, so a shard writes whole files), or more where that would make more
    /// than `max_shards_per_job` shards. Shard boundaries do not change the images (see `queue::plan`).
    pub fn batches_per_shard(&self, spec: &JobSpec) -> u64 {
        let batch = u64::from(spec.batch_size.max(1));
        let batches = spec.num_samples.div_ceil(batch);
        let wanted = match spec.dataset.format.parts() {
            None => self.batches_per_shard,
            Some(_) => (spec.dataset.samples_per_file / batch).max(1),
        };
        wanted.max(batches.div_ceil(self.max_shards_per_job.max(1)))
    }
}

/// Job priorities accepted by default.
pub const DEFAULT_PRIORITIES: std::ops::RangeInclusive<i32> = -10..=10;
/// Distinct priorities a server may accept at most (each is a durable consumer on a NATS queue).
pub const MAX_PRIORITY_VALUES: i64 = 101;
/// Longest client value echoed back in an error: error messages travel in trailers (8 KiB at most).
const ECHO_LIMIT: usize = 64;

/// `value` for an error message: quoted, and cut to [`ECHO_LIMIT`] characters.
fn shown(value: &str) -> String {
    if value.chars().count() <= ECHO_LIMIT {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(ECHO_LIMIT).collect();
    format!("{head:?}… ({} bytes)", value.len())
}

/// A job id from a request: present, and short enough to echo in an error.
pub fn job_id(id: &str) -> Result<&str, ServiceError> {
    name_in("job_id", id)
}

/// A name in the request's `field` (a job id, a model's name): present, and short enough to echo in an
/// error.
pub fn name_in<'a>(field: &str, id: &'a str) -> Result<&'a str, ServiceError> {
    if id.is_empty() {
        return Err(ServiceError::invalid(field, "required"));
    }
    if id.len() > 128 {
        return Err(ServiceError::invalid(field, format!("{}: at most 128 bytes", shown(id))));
    }
    Ok(id)
}

/// The submission `req` (whose `extends` names `base`) with the extended job's settings: its model,
/// sampling, batch size and layout, and the seed after its last. A setting the request gives again must
/// be the extended job's; the destination defaults to the extended job's, and the grid, priority and
/// labels are the request's own. Only a SUCCEEDED job is extended (FAILED_PRECONDITION otherwise).
pub fn extension(req: &pb::JobSpec, base: &JobRecord) -> Result<pb::JobSpec, ServiceError> {
    if base.state != JobState::Succeeded {
        return Err(ServiceError::NotExtendable { job_id: base.id.clone(), state: base.state.as_str() });
    }
    let carried = spec_to_pb(&base.spec);
    let carried_output = carried.output.clone().unwrap_or_default();
    let given = req.output.clone().unwrap_or_default();
    let next_seed = base.spec.seed.checked_add(base.spec.num_samples);
    let mut bad = Bad::default();
    let mut check = |field: &str, is_given: bool, same: bool, theirs: String| {
        if is_given && !same {
            let message =
                format!("set by the extended job {}: leave it out or give {theirs}", shown(&base.id));
            bad.spec(field, message);
        }
    };
    check("model", !req.model.is_empty(), req.model == carried.model, shown(&carried.model));
    let s = carried.sampling.unwrap_or_default();
    let scheduler = pb::Scheduler::try_from(s.scheduler).unwrap_or_default().as_str_name();
    let sampling = format!("{{scheduler: {scheduler}, steps: {}, eta: {:?}}}", s.steps, s.eta);
    check("sampling", req.sampling.is_some(), req.sampling == carried.sampling, sampling);
    let seed = next_seed.map_or("nothing".into(), |s| s.to_string());
    check("seed", req.seed.is_some(), req.seed == next_seed, seed);
    let (batch, theirs) = (req.batch_size, carried.batch_size);
    check("batch_size", batch != 0, batch == theirs, theirs.to_string());
    let (asked, theirs) = (given.format, carried_output.format);
    let name = pb::OutputFormat::try_from(theirs).unwrap_or_default().as_str_name().to_string();
    check("output.format", asked != 0, asked == theirs, name);
    let (asked, theirs) = (given.image_format, carried_output.image_format);
    let name = pb::ImageFormat::try_from(theirs).unwrap_or_default().as_str_name().to_string();
    check("output.image_format", asked != 0, asked == theirs, name);
    let numbers = [
        ("output.jpeg_quality", u64::from(given.jpeg_quality), u64::from(carried_output.jpeg_quality)),
        ("output.png_level", u64::from(given.png_level), u64::from(carried_output.png_level)),
        ("output.target_file_bytes", given.target_file_bytes, carried_output.target_file_bytes),
    ];
    for (field, asked, theirs) in numbers {
        check(field, asked != 0, asked == theirs, theirs.to_string());
    }
    if next_seed.is_none() {
        bad.spec("extends", format!("job {}: its seeds end at the largest seed", shown(&base.id)));
    }
    if !bad.0.is_empty() {
        return Err(ServiceError::InvalidArgument(bad.0));
    }
    let destination =
        if given.destination.is_empty() { carried_output.destination } else { given.destination };
    Ok(pb::JobSpec {
        num_samples: req.num_samples,
        seed: next_seed,
        grid: req.grid,
        output: Some(pb::OutputSpec { destination, prefix: given.prefix, ..carried_output }),
        priority: req.priority,
        labels: req.labels.clone(),
        extends: req.extends.clone(),
        webhook_url: req.webhook_url.clone(),
        // The extended job's counts add up to its own samples: the new job spreads its own evenly,
        // with the same guidance, unless it says otherwise.
        classes: req.classes.clone().or_else(|| {
            carried.classes.clone().map(|c| pb::ClassSpec { counts: Default::default(), uniform: true, ..c })
        }),
        ..carried
    })
}

/// What a request is checked against: the models served and the destinations allowed.
pub struct Catalog<'a> {
    pub models: &'a BTreeMap<String, Arc<ResolvedModel>>,
    pub outputs: &'a Outputs,
}

/// The bad fields of a request, by their paths.
#[derive(Default)]
struct Bad(Vec<FieldViolation>);

impl Bad {
    /// A field of the request's spec (`sampling.steps` is `spec.sampling.steps`).
    fn spec(&mut self, field: &str, description: String) {
        self.0.push(FieldViolation { field: format!("spec.{field}"), description });
    }

    /// What the shared rules ([`validation`]) found.
    fn rules(&mut self, rules: Violations) {
        let named = rules
            .0
            .into_iter()
            .map(|v| FieldViolation { field: v.field.api_path().into(), description: v.message });
        self.0.extend(named);
    }
}

/// Checks a submission and resolves its defaults (seed, batch size, grid, destination), naming every
/// bad field by its path in the request (`spec.sampling.steps`). A well-formed destination outside the
/// allowed ones is PERMISSION_DENIED, once nothing else is wrong.
pub fn job_spec(
    submit: &pb::SubmitJobRequest,
    limits: &Limits,
    catalog: &Catalog<'_>,
    owner: &str,
) -> Result<JobSpec, ServiceError> {
    let mut bad = Bad::default();
    if submit.request_id.len() > 128 {
        bad.0.push(FieldViolation { field: "request_id".into(), description: "at most 128 bytes".into() });
    }
    let Some(req) = submit.spec.as_ref() else {
        bad.spec("model", "required (the spec is missing)".into());
        return Err(ServiceError::InvalidArgument(bad.0));
    };
    let (model, scheduler, sampling) = sampling(req, limits, catalog, &mut bad);
    if req.num_samples == 0 || req.num_samples > limits.max_samples {
        bad.spec("num_samples", format!("{} must be in 1..={}", req.num_samples, limits.max_samples));
    }
    // A server-chosen seed stays below 2^53 so it survives JSON tooling exactly.
    let seed = req.seed.unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0 >> 11);
    let mut rules = Violations::default();
    validation::seeds(seed, req.num_samples, &mut rules);
    bad.rules(rules);
    let batch_size = match req.batch_size {
        0 => limits.default_batch_size.min(req.num_samples.clamp(1, u64::from(u32::MAX)) as u32),
        b if b > limits.max_batch_size => {
            bad.spec("batch_size", format!("{b} exceeds the limit of {}", limits.max_batch_size));
            1
        }
        b => b,
    };
    let (samples_per_grid, grid_columns) = grid(req, limits, &mut bad);
    let (output, denied) = destination(req, catalog, &mut bad);
    let (webhook, webhook_denied) = job_webhook(req, limits, &mut bad);
    let dataset =
        dataset_options(req.output.as_ref(), limits, model.map(|m| m.as_ref()), batch_size, &mut bad);
    placement(req, limits, &mut bad);
    let classes = class_spec(req, model.map(|m| m.as_ref()), &mut bad);
    if !bad.0.is_empty() {
        return Err(ServiceError::InvalidArgument(bad.0));
    }
    if let Some(denied) = denied.or(webhook_denied) {
        return Err(ServiceError::PermissionDenied(denied));
    }
    Ok(JobSpec {
        request_id: submit.request_id.clone(),
        owner: owner.to_string(),
        model: req.model.clone(),
        scheduler: scheduler.unwrap_or(SchedulerKind::Ddpm),
        steps: sampling.steps,
        eta: sampling.eta,
        num_samples: req.num_samples,
        seed,
        batch_size,
        samples_per_grid,
        grid_columns,
        output,
        priority: req.priority,
        labels: req.labels.clone().into_iter().collect(),
        dataset,
        // The handler adds the caller's, from the request's metadata.
        trace_context: BTreeMap::new(),
        // Set only by the handler, on what [`extension`] made of the request.
        extends: (!req.extends.is_empty()).then(|| req.extends.clone()),
        webhook,
        classes,
    })
}

/// The class labels of a class-conditional model's job ([`crate::classes::resolve`]).
fn class_spec(req: &pb::JobSpec, model: Option<&ResolvedModel>, bad: &mut Bad) -> Option<ClassSpec> {
    let model = model?;
    let given = req.classes.as_ref().map(|c| ClassRequest {
        counts: c.counts.clone(),
        uniform: c.uniform,
        guidance_scale: c.guidance_scale,
        null_class: c.null_class,
        names: c.names.clone(),
    });
    let (spec, violations) =
        crate::classes::resolve(&shown(&model.name), &model.classes, given.as_ref(), req.num_samples);
    for (field, message) in violations {
        bad.spec(field, message);
    }
    spec
}

/// The longest webhook URL taken.
const MAX_WEBHOOK_URL_BYTES: usize = 2048;

/// A webhook's URL, checked: http or https with a host, no credentials or fragment, at most 2,048 bytes.
pub fn webhook_url(text: &str) -> Result<url::Url, String> {
    if text.len() > MAX_WEBHOOK_URL_BYTES {
        return Err(format!("at most {MAX_WEBHOOK_URL_BYTES} bytes"));
    }
    let url = url::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err("an http:// or https:// URL with a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err("no credentials or fragment".into());
    }
    Ok(url)
}

/// A job's own webhook, and why it is denied (a well-formed URL outside every allowed prefix).
fn job_webhook(req: &pb::JobSpec, limits: &Limits, bad: &mut Bad) -> (Option<String>, Option<String>) {
    if req.webhook_url.is_empty() {
        return (None, None);
    }
    let url = match webhook_url(&req.webhook_url) {
        Ok(url) => url.to_string(),
        Err(e) => {
            bad.spec("webhook_url", format!("{}: {e}", shown(&req.webhook_url)));
            return (None, None);
        }
    };
    // Within a prefix on a boundary: "https://h/a" allows "https://h/a/x" and "https://h/a?x", not "https://h/ab".
    let within = |prefix: &String| {
        url.strip_prefix(prefix.as_str())
            .is_some_and(|rest| rest.is_empty() || prefix.ends_with('/') || rest.starts_with(['/', '?']))
    };
    if limits.webhook_prefixes.iter().any(within) {
        return (Some(url), None);
    }
    let denied = if limits.webhook_prefixes.is_empty() {
        "spec.webhook_url: this server takes no job webhooks (serve --allow-webhook)".to_string()
    } else {
        format!("spec.webhook_url: {} is not within an allowed prefix", shown(&req.webhook_url))
    };
    (None, Some(denied))
}

/// The model a request names, its scheduler and the sampling settings, checked (the model's own
/// scheduler config decides which step counts work, e.g. DDPM at most its training steps).
fn sampling<'a>(
    req: &pb::JobSpec,
    limits: &Limits,
    catalog: &Catalog<'a>,
    bad: &mut Bad,
) -> (Option<&'a Arc<ResolvedModel>>, Option<SchedulerKind>, pb::SamplingSpec) {
    let model = catalog.models.get(&req.model);
    if req.model.is_empty() {
        bad.spec("model", "required".into());
    } else if model.is_none() {
        let served: Vec<&str> = catalog.models.keys().map(String::as_str).collect();
        let message =
            format!("unknown model {}; this worker serves {}", shown(&req.model), served.join(", "));
        bad.spec("model", message);
    }
    let sampling = req.sampling.unwrap_or_default();
    let scheduler = match pb::Scheduler::try_from(sampling.scheduler) {
        Ok(pb::Scheduler::Unspecified) => {
            bad.spec("sampling.scheduler", "required (DDPM, DDIM, PNDM or DPMSOLVER)".into());
            None
        }
        Ok(known) => Some(scheduler_from_pb(known)),
        Err(_) => {
            bad.spec("sampling.scheduler", format!("unknown scheduler {}", sampling.scheduler));
            None
        }
    };
    if sampling.steps == 0 || sampling.steps > limits.max_steps {
        bad.spec("sampling.steps", format!("{} must be in 1..={}", sampling.steps, limits.max_steps));
    }
    let mut rules = Violations::default();
    validation::eta(scheduler, sampling.eta, &mut rules);
    bad.rules(rules);
    if let (Some(model), Some(kind)) = (model, scheduler)
        && (1..=limits.max_steps).contains(&sampling.steps)
    {
        let steps = sampling.steps as usize;
        match model.scheduler(kind).and_then(|s| s.build(steps, sampling.eta.unwrap_or(0.0))) {
            Ok(_) => {}
            Err(SchedulerError::Steps { max, .. }) => {
                bad.spec("sampling.steps", format!("{steps} must be in 1..={max} for this model"))
            }
            Err(e) => bad.spec("sampling.scheduler", e.to_string()),
        }
    }
    (model, scheduler, sampling)
}

/// Samples per grid and its columns: 64 (or all) by default.
fn grid(req: &pb::JobSpec, limits: &Limits, bad: &mut Bad) -> (u32, u32) {
    match &req.grid {
        None => {
            let n = req.num_samples.min(64) as u32;
            (n, crate::imaging::grid_columns(n as usize) as u32)
        }
        Some(g) if g.samples_per_grid > limits.max_samples_per_grid => {
            let (n, max) = (g.samples_per_grid, limits.max_samples_per_grid);
            bad.spec("grid.samples_per_grid", format!("{n} exceeds the limit of {max}"));
            (0, 0)
        }
        Some(g) if g.samples_per_grid > 0 && g.columns > g.samples_per_grid => {
            bad.spec("grid.columns", format!("{} is more than samples_per_grid", g.columns));
            (0, 0)
        }
        Some(g) if g.columns == 0 => {
            (g.samples_per_grid, crate::imaging::grid_columns(g.samples_per_grid as usize) as u32)
        }
        Some(g) => (g.samples_per_grid, g.columns),
    }
}

/// Where the job writes, and why it may not write where it asks (PERMISSION_DENIED once nothing else is
/// wrong). The prefix is checked on its own first, so that a bad destination and a bad prefix are both
/// named.
fn destination(
    req: &pb::JobSpec,
    catalog: &Catalog<'_>,
    bad: &mut Bad,
) -> (Option<crate::storage::Destination>, Option<String>) {
    let (destination, prefix) =
        req.output.as_ref().map_or(("", ""), |o| (o.destination.as_str(), o.prefix.as_str()));
    let prefix = match prefix.trim_end_matches('/') {
        "" => "",
        p => match crate::storage::check_prefix(p) {
            Ok(()) => prefix,
            Err(e) => {
                bad.spec("output.prefix", format!("{}: {e}", shown(prefix)));
                ""
            }
        },
    };
    match catalog.outputs.resolve(destination, prefix) {
        Ok(dest) => (Some(dest), None),
        Err(Refusal::Invalid(field, e)) => {
            let value = if field == "output.prefix" { prefix } else { destination };
            bad.spec(field, format!("{}: {e}", shown(value)));
            (None, None)
        }
        Err(Refusal::NotAllowed(e)) => (None, Some(e)),
    }
}

/// Labels (as Kubernetes' keys, with short values) and the priority.
fn placement(req: &pb::JobSpec, limits: &Limits, bad: &mut Bad) {
    if req.labels.len() > 64 {
        bad.spec("labels", "at most 64 labels".into());
    }
    for (k, v) in &req.labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if !key_ok {
            bad.spec("labels", format!("key {}: 1 to 63 of letters, digits, '-', '_', '.', '/'", shown(k)));
        }
        if v.len() > 256 {
            bad.spec("labels", format!("value of {}: at most 256 bytes", shown(k)));
        }
    }
    if !limits.priorities.contains(&req.priority) {
        let (lo, hi) = (limits.priorities.start(), limits.priorities.end());
        bad.spec("priority", format!("{} must be in {lo}..={hi}", req.priority));
    }
}

/// The layout and encoding a request asks for, with the server's defaults (the rules themselves are
/// [`validation::storage`]'s); data files are sized from the model's sample shape.
fn dataset_options(
    output: Option<&pb::OutputSpec>,
    limits: &Limits,
    model: Option<&ResolvedModel>,
    batch_size: u32,
    bad: &mut Bad,
) -> DatasetOptions {
    let o = output.cloned().unwrap_or_default();
    let format = match pb::OutputFormat::try_from(o.format) {
        Ok(pb::OutputFormat::Unspecified) => limits.default_format,
        Ok(pb::OutputFormat::Files) => DataFormat::Files,
        Ok(pb::OutputFormat::Webdataset) => DataFormat::Webdataset,
        Ok(pb::OutputFormat::Parquet) => DataFormat::Parquet,
        Err(_) => {
            bad.spec("output.format", format!("unknown format {}", o.format));
            DataFormat::Files
        }
    };
    let image = match pb::ImageFormat::try_from(o.image_format) {
        Ok(pb::ImageFormat::Unspecified | pb::ImageFormat::Png) => ImageFormat::Png,
        Ok(pb::ImageFormat::Webp) => ImageFormat::Webp,
        Ok(pb::ImageFormat::Jpeg) => ImageFormat::Jpeg,
        Err(_) => {
            bad.spec("output.image_format", format!("unknown image format {}", o.image_format));
            ImageFormat::Png
        }
    };
    let given = |v: u32| (v != 0).then_some(v);
    let request = StorageRequest {
        format,
        image,
        jpeg_quality: given(o.jpeg_quality),
        png_level: given(o.png_level),
        target_file_bytes: (o.target_file_bytes != 0).then_some(o.target_file_bytes),
    };
    let shape = model.map_or((3, 32, 32), |m| m.sample_shape());
    let mut rules = Violations::default();
    let options = validation::storage(request, shape, u64::from(batch_size), &mut rules);
    bad.rules(rules);
    options
}

/// The wire value of a layout.
pub fn format_to_pb(format: DataFormat) -> pb::OutputFormat {
    match format {
        DataFormat::Files => pb::OutputFormat::Files,
        DataFormat::Webdataset => pb::OutputFormat::Webdataset,
        DataFormat::Parquet => pb::OutputFormat::Parquet,
    }
}

/// The wire value of an image encoding.
pub fn image_to_pb(image: ImageFormat) -> pb::ImageFormat {
    match image {
        ImageFormat::Png => pb::ImageFormat::Png,
        ImageFormat::Webp => pb::ImageFormat::Webp,
        ImageFormat::Jpeg => pb::ImageFormat::Jpeg,
    }
}

pub fn scheduler_to_pb(kind: SchedulerKind) -> pb::Scheduler {
    match kind {
        SchedulerKind::Ddpm => pb::Scheduler::Ddpm,
        SchedulerKind::Ddim => pb::Scheduler::Ddim,
        SchedulerKind::Pndm => pb::Scheduler::Pndm,
        SchedulerKind::Dpmsolver => pb::Scheduler::Dpmsolver,
    }
}

/// The scheduler a specified wire value names (`Unspecified` is refused by [`job_spec`] first).
pub fn scheduler_from_pb(s: pb::Scheduler) -> SchedulerKind {
    match s {
        pb::Scheduler::Ddpm | pb::Scheduler::Unspecified => SchedulerKind::Ddpm,
        pb::Scheduler::Ddim => SchedulerKind::Ddim,
        pb::Scheduler::Pndm => SchedulerKind::Pndm,
        pb::Scheduler::Dpmsolver => SchedulerKind::Dpmsolver,
    }
}

/// A job as the API shows it; `grid_uris` are where its grids are once it SUCCEEDED.
pub fn job_to_pb(job: &JobRecord, grid_uris: Vec<String>) -> pb::Job {
    let spec = &job.spec;
    let pace = pace(job, crate::queue::now_ms());
    let error = job.error.as_ref().map(|message| {
        let code =
            if job.state == JobState::Cancelled { tonic::Code::Cancelled } else { tonic::Code::Internal };
        tonic_types::Status { code: code as i32, message: message.clone(), details: Vec::new() }
    });
    pb::Job {
        job_id: job.id.clone(),
        spec: Some(spec_to_pb(spec)),
        request_id: spec.request_id.clone(),
        owner: if spec.owner.is_empty() { ANONYMOUS.to_string() } else { spec.owner.clone() },
        state: state_to_pb(job.state) as i32,
        samples_done: job.samples_done,
        samples_total: spec.num_samples,
        shards_done: job.shards_done as u32,
        shards_total: job.shards_total as u32,
        create_time: Some(timestamp(job.created_at_ms)),
        start_time: job.started_at_ms.map(timestamp),
        finish_time: job.finished_at_ms.map(timestamp),
        error,
        manifest_uri: job.manifest_uri.clone().unwrap_or_default(),
        grid_uris,
        samples_per_second: pace.map(|p| p.samples_per_second),
        estimated_finish_time: pace.and_then(|p| p.finish_ms).map(timestamp),
        shard_stats: None,
    }
}

/// How a job's shards ran (GetJob): the runners with the most shards first, then by name.
pub fn shard_stats_to_pb(stats: &ShardStats) -> pb::ShardStats {
    let count = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    let mut runners: Vec<pb::ShardRunner> = stats
        .completed_by
        .iter()
        .map(|(owner, &shards)| {
            let (worker, device) = owner.rsplit_once('/').unwrap_or((owner.as_str(), ""));
            pb::ShardRunner { worker: worker.to_string(), device: device.to_string(), shards: count(shards) }
        })
        .collect();
    runners.sort_by(|a, b| {
        b.shards.cmp(&a.shards).then_with(|| (&a.worker, &a.device).cmp(&(&b.worker, &b.device)))
    });
    pb::ShardStats {
        attempts: count(stats.attempts),
        retried: count(stats.retried),
        failed: count(stats.failed),
        runners,
    }
}

/// How fast a job goes: samples stored per second since its first shard started (to `now_ms`, or to its
/// end), and when a RUNNING job should end at that rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    pub samples_per_second: f64,
    pub finish_ms: Option<i64>,
}

/// `job`'s pace at `now_ms`; `None` until a sample is stored.
pub fn pace(job: &JobRecord, now_ms: i64) -> Option<Pace> {
    let started = job.started_at_ms?;
    if job.samples_done == 0 {
        return None;
    }
    let end = job.finished_at_ms.unwrap_or(now_ms);
    let seconds = ((end - started).max(1)) as f64 / 1000.0;
    let samples_per_second = job.samples_done as f64 / seconds;
    let left = job.spec.num_samples.saturating_sub(job.samples_done) as f64;
    let finish_ms =
        (job.state == JobState::Running).then(|| now_ms + (1000.0 * left / samples_per_second) as i64);
    Some(Pace { samples_per_second, finish_ms })
}

/// The spec a job was made from, with its resolved defaults: submitted again, it is the same job.
pub fn spec_to_pb(spec: &JobSpec) -> pb::JobSpec {
    let scheduler = scheduler_to_pb(spec.scheduler);
    pb::JobSpec {
        model: spec.model.clone(),
        sampling: Some(pb::SamplingSpec { scheduler: scheduler as i32, steps: spec.steps, eta: spec.eta }),
        num_samples: spec.num_samples,
        seed: Some(spec.seed),
        batch_size: spec.batch_size,
        grid: Some(pb::GridSpec { samples_per_grid: spec.samples_per_grid, columns: spec.grid_columns }),
        output: Some(pb::OutputSpec {
            destination: spec.output.as_ref().map(ToString::to_string).unwrap_or_default(),
            prefix: String::new(),
            format: format_to_pb(spec.dataset.format) as i32,
            image_format: image_to_pb(spec.dataset.encoding.image) as i32,
            jpeg_quality: if spec.dataset.encoding.image == ImageFormat::Jpeg {
                u32::from(spec.dataset.encoding.quality)
            } else {
                0
            },
            png_level: u32::from(spec.dataset.encoding.png_level),
            target_file_bytes: if spec.dataset.format == DataFormat::Files {
                0
            } else {
                spec.dataset.target_file_bytes
            },
        }),
        priority: spec.priority,
        labels: spec.labels.clone().into_iter().collect(),
        extends: spec.extends.clone().unwrap_or_default(),
        webhook_url: spec.webhook.clone().unwrap_or_default(),
        classes: spec.classes.as_ref().map(|c| pb::ClassSpec {
            counts: c.counts.iter().map(|(&k, &v)| (k, v)).collect(),
            uniform: false,
            guidance_scale: c.guidance.map(|g| g.scale),
            null_class: c.guidance.map(|g| g.null_class),
            names: c.names.clone(),
        }),
    }
}

/// A served model as the API shows it: its shape and hash, the schedulers its config makes with the
/// steps each takes (within `limits`), and `fits`, the largest batch each warmed-up device samples
/// (`None`: not probed, the API's limit).
pub fn model_to_pb(
    model: &ResolvedModel,
    limits: &Limits,
    fits: &BTreeMap<String, BTreeMap<String, Option<usize>>>,
) -> pb::Model {
    let (channels, height, width) = model.sample_shape();
    let configs: Vec<_> = SchedulerKind::ALL.iter().filter_map(|&kind| model.scheduler(kind).ok()).collect();
    let schedulers = configs
        .iter()
        .filter_map(|config| {
            let max_steps = match config.build(limits.max_steps as usize, 0.0) {
                Ok(_) => limits.max_steps,
                Err(SchedulerError::Steps { max, .. }) => max.min(limits.max_steps as usize) as u32,
                Err(_) => return None,
            };
            Some(pb::SchedulerSupport { scheduler: scheduler_to_pb(config.kind()) as i32, max_steps })
        })
        .collect();
    // Every scheduler reads the same training schedule from the config (a server's model makes one).
    let train_steps = configs.first().map_or(0, |c| c.betas().num_train_timesteps);
    let devices = fits
        .iter()
        .filter_map(|(device, models)| {
            let fit = models.get(&model.name)?;
            let limit = fit.map_or(limits.max_batch_size, |f| (f as u32).min(limits.max_batch_size));
            Some(pb::DeviceFit { device: device.clone(), max_batch_size: limit })
        })
        .collect();
    let card = &model.card;
    pb::Model {
        name: model.name.clone(),
        source: model.source.clone(),
        weights_sha256: model.weights_sha256.clone(),
        channels: channels as u32,
        height: height as u32,
        width: width as u32,
        num_train_timesteps: u32::try_from(train_steps).unwrap_or(u32::MAX),
        schedulers,
        default_batch_size: limits.default_batch_size,
        max_batch_size: limits.max_batch_size,
        devices,
        license: card.license_name.clone().or_else(|| card.license.clone()).unwrap_or_default(),
        num_classes: model.classes.num_classes,
        class_names: model.classes.names.clone(),
        null_class: model.classes.null_class,
    }
}

pub fn state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn state_from_pb(s: i32) -> Option<JobState> {
    match pb::JobState::try_from(s).ok()? {
        pb::JobState::Unspecified => None,
        pb::JobState::Queued => Some(JobState::Queued),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Succeeded => Some(JobState::Succeeded),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
    }
}

pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

/// Page tokens are the last job's `(created_at, id)`, hex-encoded so clients treat them as opaque.
pub fn encode_cursor(job: &JobRecord) -> String {
    hex::encode(format!("{}:{}", job.created_at_ms, job.id))
}

pub fn decode_cursor(token: &str) -> Option<PageCursor> {
    let text = String::from_utf8(hex::decode(token).ok()?).ok()?;
    let (ms, id) = text.split_once(':')?;
    Some(PageCursor { created_at_ms: ms.parse().ok()?, id: id.to_string() })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A served model `tiny` (DDPM scheduler config, no files), for request checks without a server.
    pub(crate) fn catalog_model() -> BTreeMap<String, Arc<ResolvedModel>> {
        let path = std::path::PathBuf::from("/nonexistent");
        let model = ResolvedModel {
            name: "tiny".into(),
            source: "test".into(),
            files: crate::model::ModelFiles {
                root: path.clone(),
                unet_config: path.clone(),
                weights: path.clone(),
                scheduler_config: path,
            },
            weights_sha256: String::new(),
            unet_config: crate::model::UNet2DConfig::default(),
            scheduler_text: r#"{"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}"#.into(),
            card: Default::default(),
            classes: Default::default(),
        };
        [("tiny".to_string(), Arc::new(model))].into()
    }

    fn limits() -> Limits {
        Limits {
            max_samples: 1000,
            max_steps: 1000,
            max_batch_size: 64,
            default_batch_size: 16,
            max_samples_per_grid: 1024,
            batches_per_shard: 4,
            max_shards_per_job: 100,
            max_attempts: 3,
            default_format: DataFormat::Files,
            priorities: DEFAULT_PRIORITIES,
            webhook_prefixes: vec!["https://hooks.example.com/ddpm/".into()],
        }
    }

    fn outputs() -> Outputs {
        let default = crate::storage::Destination::File { root: "/srv/jobs".into(), prefix: String::new() };
        let allowed = ["s3://datasets/team-a".parse().unwrap()];
        Outputs::new(default, &allowed, true)
    }

    fn request() -> pb::SubmitJobRequest {
        pb::SubmitJobRequest {
            request_id: "r".into(),
            spec: Some(pb::JobSpec {
                model: "tiny".into(),
                sampling: Some(pb::SamplingSpec {
                    scheduler: pb::Scheduler::Ddim as i32,
                    steps: 50,
                    eta: Some(0.5),
                }),
                num_samples: 10,
                seed: Some(3),
                ..Default::default()
            }),
        }
    }

    fn spec_mut(req: &mut pb::SubmitJobRequest) -> &mut pb::JobSpec {
        req.spec.get_or_insert_default()
    }

    fn fields(e: ServiceError) -> Vec<String> {
        match e {
            ServiceError::InvalidArgument(v) => v.into_iter().map(|v| v.field).collect(),
            other => panic!("not a validation error: {other}"),
        }
    }

    #[test]
    fn a_valid_request_round_trips_through_the_domain() {
        let (models, outputs) = (catalog_model(), outputs());
        let catalog = Catalog { models: &models, outputs: &outputs };
        let mut req = request();
        spec_mut(&mut req).output = Some(pb::OutputSpec {
            destination: "s3://datasets/team-a/x".into(),
            prefix: "run-1/".into(),
            ..Default::default()
        });
        let spec = job_spec(&req, &limits(), &catalog, "alice").unwrap();
        assert_eq!(
            (spec.scheduler, spec.batch_size, spec.seed, spec.samples_per_grid, spec.owner.as_str()),
            (SchedulerKind::Ddim, 10, 3, 10, "alice")
        );
        assert_eq!(
            spec.output,
            Some(crate::storage::Destination::S3 {
                bucket: "datasets".into(),
                prefix: "team-a/x/run-1".into()
            })
        );
        let back = pb::SubmitJobRequest { request_id: "r".into(), spec: Some(spec_to_pb(&spec)) };
        assert_eq!(
            job_spec(&back, &limits(), &catalog, "alice").unwrap(),
            spec,
            "what the API shows is a valid request for the same job"
        );
        let default = job_spec(&request(), &limits(), &catalog, "alice").unwrap();
        let back = pb::SubmitJobRequest { request_id: "r".into(), spec: Some(spec_to_pb(&default)) };
        assert_eq!(job_spec(&back, &limits(), &catalog, "alice").unwrap(), default);
        for kind in SchedulerKind::ALL {
            assert_eq!(scheduler_from_pb(scheduler_to_pb(kind)), kind);
        }
    }

    /// A finished job made from `req`, as the queue would keep it.
    fn finished(req: &pb::SubmitJobRequest, catalog: &Catalog<'_>, state: JobState) -> JobRecord {
        JobRecord {
            id: "job-1".into(),
            spec: job_spec(req, &limits(), catalog, "alice").unwrap(),
            state,
            samples_done: 10,
            shards_done: 1,
            shards_total: 1,
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            error: None,
            manifest_uri: None,
        }
    }

    #[test]
    fn an_extension_continues_the_seeds_with_the_same_settings() {
        let (models, outputs) = (catalog_model(), outputs());
        let catalog = Catalog { models: &models, outputs: &outputs };
        let mut first = request();
        let s = spec_mut(&mut first);
        s.batch_size = 4;
        s.output = Some(pb::OutputSpec {
            destination: "s3://datasets/team-a/x".into(),
            format: pb::OutputFormat::Parquet as i32,
            image_format: pb::ImageFormat::Jpeg as i32,
            jpeg_quality: 90,
            ..Default::default()
        });
        let base = finished(&first, &catalog, JobState::Succeeded);

        // Only the count and the job: everything else is the extended job's, the seeds follow its.
        let ask = pb::JobSpec { num_samples: 7, extends: "job-1".into(), priority: 2, ..Default::default() };
        let merged = extension(&ask, &base).unwrap();
        let req = pb::SubmitJobRequest { request_id: String::new(), spec: Some(merged) };
        let spec = job_spec(&req, &limits(), &catalog, "bob").unwrap();
        assert_eq!((spec.seed, spec.num_samples, spec.priority), (13, 7, 2));
        assert_eq!(spec.extends.as_deref(), Some("job-1"));
        let same = |s: &JobSpec| {
            (s.model.clone(), s.scheduler, s.steps, s.eta, s.batch_size, s.dataset, s.output.clone())
        };
        assert_eq!(same(&spec), same(&base.spec));
        // What the API shows of the extension is a request for the same job.
        let back = pb::SubmitJobRequest { request_id: String::new(), spec: Some(spec_to_pb(&spec)) };
        let back = extension(back.spec.as_ref().unwrap(), &base).unwrap();
        let back = pb::SubmitJobRequest { request_id: String::new(), spec: Some(back) };
        assert_eq!(job_spec(&back, &limits(), &catalog, "bob").unwrap(), spec);

        // Settings given again with other values are named; the same values are fine.
        let mut other = ask.clone();
        other.model = "tiny".into();
        other.seed = Some(3);
        other.batch_size = 8;
        other.sampling =
            Some(pb::SamplingSpec { scheduler: pb::Scheduler::Ddpm as i32, steps: 50, eta: None });
        other.output = Some(pb::OutputSpec {
            format: pb::OutputFormat::Parquet as i32,
            image_format: pb::ImageFormat::Png as i32,
            jpeg_quality: 90,
            target_file_bytes: 1 << 20,
            ..Default::default()
        });
        let named = fields(extension(&other, &base).unwrap_err());
        let expected = [
            "spec.sampling",
            "spec.seed",
            "spec.batch_size",
            "spec.output.image_format",
            "spec.output.target_file_bytes",
        ];
        assert_eq!(named, expected);
        let message = extension(&other, &base).unwrap_err().to_string();
        assert!(message.contains("give 13") && message.contains("SCHEDULER_DDIM"), "{message}");

        // A job that did not succeed is not extended; nor is one whose seeds reach the end.
        for state in [JobState::Queued, JobState::Running, JobState::Failed, JobState::Cancelled] {
            let e = extension(&ask, &finished(&first, &catalog, state)).unwrap_err();
            assert!(matches!(e, ServiceError::NotExtendable { .. }), "{state:?}: {e}");
        }
        let mut last = base.clone();
        last.spec.seed = u64::MAX - 9;
        assert_eq!(fields(extension(&ask, &last).unwrap_err()), ["spec.extends"]);
    }

    #[test]
    fn a_jobs_pace_is_its_samples_over_its_time_so_far() {
        let (models, outputs) = (catalog_model(), outputs());
        let catalog = Catalog { models: &models, outputs: &outputs };
        let mut job = finished(&request(), &catalog, JobState::Running);
        (job.started_at_ms, job.samples_done) = (Some(10_000), 0);
        assert_eq!(pace(&job, 20_000), None, "no sample stored yet");
        // 4 of 10 samples in 8 s: 0.5 per second, the other 6 in 12 s more.
        job.samples_done = 4;
        assert_eq!(pace(&job, 18_000), Some(Pace { samples_per_second: 0.5, finish_ms: Some(30_000) }));
        // A finished job's pace is over its run, and it has no finish ahead.
        (job.state, job.samples_done, job.finished_at_ms) = (JobState::Succeeded, 10, Some(15_000));
        assert_eq!(pace(&job, 99_000), Some(Pace { samples_per_second: 2.0, finish_ms: None }));
        job.started_at_ms = None;
        assert_eq!(pace(&job, 99_000), None, "a job that never started");
    }

    #[test]
    fn every_bad_field_is_named_once() {
        let (models, outputs) = (catalog_model(), outputs());
        let catalog = Catalog { models: &models, outputs: &outputs };
        let mut bad = request();
        bad.request_id = "x".repeat(129);
        let spec = spec_mut(&mut bad);
        spec.model = "m".repeat(10_000);
        spec.sampling = Some(pb::SamplingSpec { scheduler: 99, steps: 0, eta: Some(f32::NAN) });
        spec.num_samples = 0;
        spec.batch_size = 65;
        spec.priority = 11;
        spec.output = Some(pb::OutputSpec { destination: "s3://b".into(), ..Default::default() });
        let e = job_spec(&bad, &limits(), &catalog, "alice").unwrap_err();
        let message = e.to_string();
        assert!(message.len() < 1024, "{} bytes: values are cut when echoed", message.len());
        let mut named = fields(e);
        named.sort();
        assert_eq!(
            named,
            [
                "request_id",
                "spec.batch_size",
                "spec.model",
                "spec.num_samples",
                "spec.output.destination",
                "spec.priority",
                "spec.sampling.eta",
                "spec.sampling.scheduler",
                "spec.sampling.steps"
            ]
        );
        let mut long = request();
        spec_mut(&mut long).num_samples = 1000;
        spec_mut(&mut long).sampling =
            Some(pb::SamplingSpec { scheduler: pb::Scheduler::Ddpm as i32, steps: 1001, eta: None });
        assert_eq!(fields(job_spec(&long, &limits(), &catalog, "a").unwrap_err()), ["spec.sampling.steps"]);
        let mut prefix = request();
        spec_mut(&mut prefix).output = Some(pb::OutputSpec { prefix: "a/../b".into(), ..Default::default() });
        assert_eq!(fields(job_spec(&prefix, &limits(), &catalog, "a").unwrap_err()), ["spec.output.prefix"]);
        let missing = pb::SubmitJobRequest { request_id: String::new(), spec: None };
        assert_eq!(fields(job_spec(&missing, &limits(), &catalog, "a").unwrap_err()), ["spec.model"]);
    }

    #[test]
    fn destinations_outside_the_allow_list_are_denied_and_priorities_stay_in_range() {
        let (models, outputs) = (catalog_model(), outputs());
        let catalog = Catalog { models: &models, outputs: &outputs };
        for outside in
            ["s3://datasets/team-b", "s3://datasets", "s3://other/team-a", "file:/srv", "file:/etc/x"]
        {
            let mut req = request();
            spec_mut(&mut req).output =
                Some(pb::OutputSpec { destination: outside.into(), ..Default::default() });
            match job_spec(&req, &limits(), &catalog, "a") {
                Err(ServiceError::PermissionDenied(m)) => {
                    assert!(m.starts_with("output.destination: "), "{m}")
                }
                other => panic!("{outside}: {other:?}"),
            }
        }
        let mut narrow = limits();
        narrow.priorities = 0..=2;
        let mut req = request();
        spec_mut(&mut req).priority = -1;
        assert_eq!(fields(job_spec(&req, &narrow, &catalog, "a").unwrap_err()), ["spec.priority"]);
        spec_mut(&mut req).priority = 2;
        assert_eq!(job_spec(&req, &narrow, &catalog, "a").unwrap().priority, 2);
    }

    #[test]
    fn a_jobs_webhook_is_checked_and_held_to_the_allowed_prefixes() {
        let (models, outputs) = (catalog_model(), outputs());
        let catalog = Catalog { models: &models, outputs: &outputs };
        let with = |url: &str| {
            let mut req = request();
            spec_mut(&mut req).webhook_url = url.into();
            job_spec(&req, &limits(), &catalog, "a")
        };
        let spec = with("https://hooks.example.com/ddpm/team-a?x=1").unwrap();
        assert_eq!(spec.webhook.as_deref(), Some("https://hooks.example.com/ddpm/team-a?x=1"));
        assert_eq!(spec_to_pb(&spec).webhook_url, "https://hooks.example.com/ddpm/team-a?x=1");
        assert_eq!(with("").unwrap().webhook, None);
        for outside in [
            "https://hooks.example.com/ddpmx",
            "http://hooks.example.com/ddpm/",
            "https://evil.example/ddpm/",
        ] {
            match with(outside) {
                Err(ServiceError::PermissionDenied(m)) => assert!(m.starts_with("spec.webhook_url: "), "{m}"),
                other => panic!("{outside}: {other:?}"),
            }
        }
        for bad in
            ["not a url", "ftp://hooks.example.com/ddpm/", "https://u:p@hooks.example.com/ddpm/", "https://"]
        {
            assert_eq!(fields(with(bad).unwrap_err()), ["spec.webhook_url"], "{bad}");
        }
        let mut closed = limits();
        closed.webhook_prefixes.clear();
        let mut req = request();
        spec_mut(&mut req).webhook_url = "https://hooks.example.com/ddpm/x".into();
        match job_spec(&req, &closed, &catalog, "a") {
            Err(ServiceError::PermissionDenied(m)) => assert!(m.contains("--allow-webhook"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shards_per_job_are_capped_by_longer_shards() {
        let (models, outputs) = (catalog_model(), outputs());
        let catalog = Catalog { models: &models, outputs: &outputs };
        let mut req = request();
        spec_mut(&mut req).num_samples = 1000;
        spec_mut(&mut req).batch_size = 1;
        let spec = job_spec(&req, &limits(), &catalog, "a").unwrap();
        // 1000 batches, at most 100 shards: 10 batches a shard rather than the configured 4.
        assert_eq!(limits().batches_per_shard(&spec), 10);
        spec_mut(&mut req).num_samples = 40;
        let spec = job_spec(&req, &limits(), &catalog, "a").unwrap();
        assert_eq!(limits().batches_per_shard(&spec), 4);
    }

    #[test]
    fn long_values_are_cut_when_echoed() {
        assert_eq!(shown("short"), "\"short\"");
        assert!(shown(&"x".repeat(1000)).len() < 100);
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let job = JobRecord {
            id: "abc-1".into(),
            spec: crate::queue::conformance::spec(1, 1, 0, &[]),
            state: JobState::Queued,
            samples_done: 0,
            shards_done: 0,
            shards_total: 1,
            created_at_ms: 1234,
            started_at_ms: None,
            finished_at_ms: None,
            error: None,
            manifest_uri: None,
        };
        assert_eq!(
            decode_cursor(&encode_cursor(&job)),
            Some(PageCursor { created_at_ms: 1234, id: "abc-1".into() })
        );
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor(&hex::encode("nocolon")), None);
    }

    #[test]
    fn timestamps_split_milliseconds() {
        assert_eq!(timestamp(1_500), prost_types::Timestamp { seconds: 1, nanos: 500_000_000 });
        assert_eq!(timestamp(-1), prost_types::Timestamp { seconds: -1, nanos: 999_000_000 });
    }
}
