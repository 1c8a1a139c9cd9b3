//! Property test of the whole API boundary: arbitrary requests, from field values chosen to hit the
//! limits and from raw bytes decoded as each request message, go through the real handlers (checks,
//! conversion, a SQLite queue) as callers of every role. No case may panic, and every refusal must be
//! a proper status: an expected code, a BadRequest naming real fields for INVALID_ARGUMENT, and a
//! message short enough to travel in a trailer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use prost::Message;
use tonic::{Code, Request};
use tonic_types::StatusExt;

use super::auth::{Caller, Role};
use super::convert::{DEFAULT_PRIORITIES, Limits};
use super::handlers::WorkerService;
use super::pb;
use super::pb::worker_service_server::WorkerService as _;
use crate::dataset::DataFormat;
use crate::queue::SqliteQueue;
use crate::queue::sqlite::SqliteStore;
use crate::storage::Destination;
use crate::worker::outputs::Outputs;
use crate::worker::{WorkerConfig, WorkerContext};

/// Cases run (the issue asks for at least 100,000).
const CASES: u32 = 100_000;

fn service(dir: &std::path::Path, rt: &tokio::runtime::Runtime) -> (WorkerService, WorkerService) {
    let queue = SqliteQueue::new(SqliteStore::open(&dir.join("queue.sqlite")).expect("queue"));
    let default = Destination::File { root: dir.join("jobs"), prefix: String::new() };
    let allowed = ["s3://datasets/team-a".parse().expect("destination")];
    let config = WorkerConfig {
        worker_id: "fuzz".into(),
        lease_ttl: Duration::from_secs(60),
        retry_delay: Duration::from_secs(1),
        outage_backoff: Duration::from_secs(1),
        dtype: crate::placement::DType::Fp32,
        layout: crate::model::Layout::Diffusers,
        cuda_graphs: false,
        max_batch_size: 16,
        co_batch: true,
        finalize_after: Duration::from_secs(60),
        reap_interval: Duration::from_secs(1),
        idle_poll: Duration::from_secs(1),
        scratch_dir: dir.join("scratch"),
        queue_name: "sqlite".into(),
        retention: None,
    };
    let outputs = Outputs::new(default, &allowed, true);
    let models = super::convert::tests::catalog_model();
    let ctx = Arc::new(WorkerContext::new(Arc::new(queue), outputs, models, config, rt.handle().clone()));
    let limits = Limits {
        max_samples: 64,
        max_steps: 1000,
        max_batch_size: 16,
        default_batch_size: 4,
        max_samples_per_grid: 1024,
        batches_per_shard: 4,
        max_shards_per_job: 8,
        max_attempts: 3,
        default_format: DataFormat::Files,
        priorities: DEFAULT_PRIORITIES,
        webhook_prefixes: vec!["http://127.0.0.1:9/hooks".into()],
    };
    let open = WorkerService { ctx: Arc::clone(&ctx), limits: limits.clone(), authenticated: false };
    (open, WorkerService { ctx, limits, authenticated: true })
}

/// Strings that reach every branch: empty, valid-looking, control characters, non-ASCII, long.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("tiny".to_string()),
        "[a-z0-9._/-]{1,12}",
        "\\PC{0,40}",
        "[\\x00-\\x1f\\\\./]{1,8}",
        (1usize..20_000).prop_map(|n| "x".repeat(n)),
    ]
}

fn destination() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("s3://datasets/team-a".to_string()),
        Just("s3://datasets/team-a/x".to_string()),
        Just("file:/etc".to_string()),
        ("(s3://|file:|file://|gs://|)", text()).prop_map(|(scheme, rest)| format!("{scheme}{rest}")),
    ]
}

fn number_u64() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..70, Just(u64::MAX), Just(u64::MAX - 1), Just(1 << 53), any::<u64>()]
}

fn number_u32() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..20, 990u32..1010, Just(u32::MAX), any::<u32>()]
}

fn enum_value() -> impl Strategy<Value = i32> {
    prop_oneof![0i32..6, Just(-1), Just(i32::MAX), any::<i32>()]
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop_oneof![
        Just(BTreeMap::new()),
        prop::collection::btree_map(text(), text(), 0..4),
        (60usize..70).prop_map(|n| (0..n).map(|i| (format!("k{i}"), "v".into())).collect()),
    ]
}

fn spec() -> impl Strategy<Value = pb::JobSpec> {
    let sampling = (enum_value(), number_u32(), prop::option::of(any::<f32>()))
        .prop_map(|(scheduler, steps, eta)| pb::SamplingSpec { scheduler, steps, eta });
    let output =
        (destination(), text(), (enum_value(), enum_value()), (number_u32(), number_u32(), number_u64()))
            .prop_map(
                |(
                    destination,
                    prefix,
                    (format, image_format),
                    (jpeg_quality, png_level, target_file_bytes),
                )| {
                    pb::OutputSpec {
                        destination,
                        prefix,
                        format,
                        image_format,
                        jpeg_quality,
                        png_level,
                        target_file_bytes,
                    }
                },
            );
    let grid = (number_u32(), number_u32())
        .prop_map(|(samples_per_grid, columns)| pb::GridSpec { samples_per_grid, columns });
    let classes = (
        prop::collection::btree_map(number_u32(), number_u64(), 0..4),
        any::<bool>(),
        prop::option::of(prop_oneof![any::<f32>(), -1f32..20.0]),
        prop::option::of(number_u32()),
        prop::collection::vec(text(), 0..3),
    )
        .prop_map(|(counts, uniform, guidance_scale, null_class, names)| pb::ClassSpec {
            counts: counts.into_iter().collect(),
            uniform,
            guidance_scale,
            null_class,
            names,
        });
    (
        text(),
        prop::option::of(sampling),
        number_u64(),
        prop::option::of(number_u64()),
        number_u32(),
        prop::option::of(grid),
        prop::option::of(output),
        prop_oneof![-12i32..12, any::<i32>()],
        labels(),
        prop_oneof![Just(String::new()), text()],
        prop_oneof![Just(String::new()), Just("http://127.0.0.1:9/hooks/a".to_string()), text()],
        prop::option::of(classes),
    )
        .prop_map(
            |(
                model,
                sampling,
                num_samples,
                seed,
                batch_size,
                grid,
                output,
                priority,
                labels,
                extends,
                webhook_url,
                classes,
            )| {
                pb::JobSpec {
                    model,
                    sampling,
                    num_samples,
                    seed,
                    batch_size,
                    grid,
                    output,
                    priority,
                    labels,
                    extends,
                    webhook_url,
                    classes,
                }
            },
        )
}

/// A spec that is mostly valid, so that the accepting paths (queueing, idempotency) are exercised too.
fn plausible_spec() -> impl Strategy<Value = pb::JobSpec> {
    (1u32..5, 1u32..30, 1u64..70, prop::option::of(0u64..1000), 0u32..20, -11i32..11, destination(), 0i32..4)
        .prop_map(|(scheduler, steps, num_samples, seed, batch_size, priority, destination, format)| {
            pb::JobSpec {
                model: "tiny".into(),
                sampling: Some(pb::SamplingSpec { scheduler: scheduler as i32, steps, eta: None }),
                num_samples,
                seed,
                batch_size,
                grid: None,
                output: Some(pb::OutputSpec { destination, format, ..Default::default() }),
                priority,
                labels: BTreeMap::new(),
                extends: String::new(),
                webhook_url: String::new(),
                classes: None,
            }
        })
}

#[derive(Debug, Clone)]
#[expect(clippy::large_enum_variant, reason = "test inputs, made once per case")]
enum Call {
    Submit(pb::SubmitJobRequest),
    Get(pb::GetJobRequest),
    List(pb::ListJobsRequest),
    Cancel(pb::CancelJobRequest),
    Retry(pb::RetryJobRequest),
    Delete(pb::DeleteJobRequest),
    Watch(pb::WatchJobRequest),
    Model(pb::GetModelRequest),
}

fn request_id() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "r[0-3]", text()]
}

fn job_id() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[0-9a-f-]{36}", text()]
}

/// Raw bytes decoded as `M` (the empty message where they do not decode).
fn decoded<M: Message + Default + std::fmt::Debug + 'static>() -> impl Strategy<Value = M> {
    prop::collection::vec(any::<u8>(), 0..256)
        .prop_map(|bytes| M::decode(bytes.as_slice()).unwrap_or_default())
}

fn call() -> impl Strategy<Value = Call> {
    let list = (prop::collection::vec(enum_value(), 0..4), labels(), number_u32(), text()).prop_map(
        |(states, labels, page_size, page_token)| pb::ListJobsRequest {
            states,
            labels,
            page_size,
            page_token,
        },
    );
    prop_oneof![
        4 => (request_id(), prop::option::of(spec())).prop_map(|(request_id, spec)| Call::Submit(pb::SubmitJobRequest { request_id, spec })),
        3 => (request_id(), plausible_spec()).prop_map(|(request_id, spec)| Call::Submit(pb::SubmitJobRequest { request_id, spec: Some(spec) })),
        1 => decoded::<pb::SubmitJobRequest>().prop_map(Call::Submit),
        1 => job_id().prop_map(|job_id| Call::Get(pb::GetJobRequest { job_id })),
        1 => list.prop_map(Call::List),
        1 => decoded::<pb::ListJobsRequest>().prop_map(Call::List),
        1 => job_id().prop_map(|job_id| Call::Cancel(pb::CancelJobRequest { job_id })),
        1 => job_id().prop_map(|job_id| Call::Retry(pb::RetryJobRequest { job_id })),
        1 => job_id().prop_map(|job_id| Call::Delete(pb::DeleteJobRequest { job_id })),
        1 => job_id().prop_map(|job_id| Call::Watch(pb::WatchJobRequest { job_id })),
        1 => text().prop_map(|name| Call::Model(pb::GetModelRequest { name })),
    ]
}

fn caller() -> impl Strategy<Value = Option<Caller>> {
    prop_oneof![
        Just(None),
        (prop_oneof![Just(Role::Read), Just(Role::Submit), Just(Role::Admin)], "alice|bob|ops")
            .prop_map(|(role, name)| Some(Caller { name, role })),
    ]
}

/// The request paths a BadRequest may name.
const FIELDS: &[&str] = &[
    "name",
    "request_id",
    "job_id",
    "states",
    "page_size",
    "page_token",
    "spec.model",
    "spec.extends",
    "spec.webhook_url",
    "spec.sampling",
    "spec.sampling.scheduler",
    "spec.sampling.steps",
    "spec.sampling.eta",
    "spec.num_samples",
    "spec.seed",
    "spec.batch_size",
    "spec.grid.samples_per_grid",
    "spec.grid.columns",
    "spec.output.destination",
    "spec.output.prefix",
    "spec.output.format",
    "spec.output.image_format",
    "spec.output.jpeg_quality",
    "spec.output.png_level",
    "spec.output.target_file_bytes",
    "spec.labels",
    "spec.priority",
    "spec.classes",
    "spec.classes.counts",
    "spec.classes.uniform",
    "spec.classes.guidance_scale",
    "spec.classes.null_class",
    "spec.classes.names",
];

fn check_refusal(status: &tonic::Status) -> Result<(), TestCaseError> {
    let allowed = [
        Code::InvalidArgument,
        Code::NotFound,
        Code::AlreadyExists,
        Code::FailedPrecondition,
        Code::PermissionDenied,
        Code::Unauthenticated,
    ];
    prop_assert!(allowed.contains(&status.code()), "unexpected code: {status:?}");
    prop_assert!(status.message().len() < 4096, "a {}-byte message", status.message().len());
    if status.code() == Code::InvalidArgument {
        let bad = status.get_details_bad_request();
        prop_assert!(bad.is_some(), "INVALID_ARGUMENT without a BadRequest: {status:?}");
        let violations = bad.map(|b| b.field_violations).unwrap_or_default();
        prop_assert!(!violations.is_empty(), "no field named: {status:?}");
        for v in violations {
            prop_assert!(FIELDS.contains(&v.field.as_str()), "unknown field {:?} in {status:?}", v.field);
        }
    }
    Ok(())
}

fn with_caller<T>(message: T, caller: &Option<Caller>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(c) = caller {
        request.extensions_mut().insert(c.clone());
    }
    request
}

#[test]
fn arbitrary_requests_get_an_answer_or_a_proper_refusal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (open, authenticated) = service(dir.path(), &rt);
    let config = ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() };
    let accepted = std::sync::atomic::AtomicU64::new(0);
    proptest!(config, |(call in call(), caller in caller(), auth in any::<bool>())| {
        let service = if auth { &authenticated } else { &open };
        let outcome: Result<(), tonic::Status> = rt.block_on(async {
            match call {
                Call::Submit(m) => {
                    let response = service.submit_job(with_caller(m, &caller)).await?.into_inner();
                    // What the API shows of an accepted job is itself a valid spec.
                    let job = response.job.unwrap_or_default();
                    let again = pb::SubmitJobRequest { request_id: String::new(), spec: job.spec };
                    service.submit_job(with_caller(again, &caller)).await.map(drop)
                }
                Call::Get(m) => service.get_job(with_caller(m, &caller)).await.map(drop),
                Call::List(m) => service.list_jobs(with_caller(m, &caller)).await.map(drop),
                Call::Cancel(m) => service.cancel_job(with_caller(m, &caller)).await.map(drop),
                Call::Retry(m) => service.retry_job(with_caller(m, &caller)).await.map(drop),
                Call::Delete(m) => service.delete_job(with_caller(m, &caller)).await.map(drop),
                Call::Watch(m) => service.watch_job(with_caller(m, &caller)).await.map(drop),
                Call::Model(m) => service.get_model(with_caller(m, &caller)).await.map(drop),
            }
        });
        match outcome {
            Ok(()) => {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(status) => {
                if auth && caller.is_none() {
                    prop_assert_eq!(status.code(), Code::Unauthenticated);
                }
                check_refusal(&status)?;
            }
        }
    });
    let accepted = accepted.into_inner();
    assert!(accepted > 1000, "only {accepted} cases were accepted: the generators miss the valid paths");
}
