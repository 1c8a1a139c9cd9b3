//! Traces over OTLP: real `serve` processes export to an OTLP/gRPC trace receiver on loopback (the
//! collector's `TraceService`, run here). A SubmitJob with a W3C `traceparent` makes shard spans in the
//! caller's trace, on whichever worker runs the shards, and the last spans go out when a worker exits.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::service::{Server, request, signal, tiny_model, wait_for};
use ddpm_worker::api::pb;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

const SUCCEEDED: i32 = pb::JobState::Succeeded as i32;

/// A span as received, with its resource's `service.name`.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn trace_id(&self) -> String {
        hex::encode(&self.span.trace_id)
    }

    fn id(&self) -> String {
        hex::encode(&self.span.span_id)
    }

    fn parent(&self) -> String {
        hex::encode(&self.span.parent_span_id)
    }

    fn attr(&self, key: &str) -> Option<Value> {
        self.span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone()?.value)
    }

    fn string(&self, key: &str) -> Option<String> {
        match self.attr(key)? {
            Value::StringValue(s) => Some(s),
            other => panic!("{key} is {other:?}"),
        }
    }

    fn int(&self, key: &str) -> Option<i64> {
        match self.attr(key)? {
            Value::IntValue(i) => Some(i),
            other => panic!("{key} is {other:?}"),
        }
    }
}

/// The collector's OTLP/gRPC trace service on a loopback port, keeping what it receives.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.clone()?.value {
                    Some(Value::StringValue(s)) => Some(s),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                spans.push(Received { service: service.clone(), span });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Receiver {
    /// Serves on a free loopback port; returns its endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `done(spans)` holds, at most `limit`; returns the spans received.
    async fn wait(&self, limit: Duration, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let started = Instant::now();
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(started.elapsed() < limit, "spans still missing after {limit:?}: {spans:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A random W3C trace id and span id: the caller's span.
fn caller_span() -> (String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    (id, uuid::Uuid::new_v4().simple().to_string()[..16].to_string())
}

/// `req` with the caller's trace context in its metadata, as an instrumented gRPC client sends it.
fn traced(req: pb::SubmitJobRequest, trace_id: &str, span_id: &str) -> tonic::Request<pb::SubmitJobRequest> {
    let mut req = tonic::Request::new(req);
    req.metadata_mut().insert("traceparent", format!("00-{trace_id}-{span_id}-01").parse().unwrap());
    req.metadata_mut().insert("tracestate", "ddpm=test".parse().unwrap());
    req
}

/// `serve`'s arguments for the tiny model and outputs under `dir` (and `extra`).
fn serve_args(dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--model".to_string(),
        format!("tiny={}", tiny_model(dir).display()),
        "--output".into(),
        format!("file:{}", dir.join("jobs").display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn shards(spans: &[Received]) -> Vec<&Received> {
    spans.iter().filter(|s| s.span.name == "shard").collect()
}

/// Six samples, two per batch, one batch per shard: three shards.
const SHARDS: i64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_spans_join_the_submitters_trace() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let dir = tempfile::tempdir().unwrap();
    // Quiet logs (RUST_LOG=warn in the tests' servers) do not quiet the traces.
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint), ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string())];
    let server =
        Server::start_with(dir.path(), &serve_args(dir.path(), &["--batches-per-shard", "1"]), &env).await;
    let mut client = server.client().await;
    let (trace_id, caller) = caller_span();
    let req = traced(request(6, pb::Scheduler::Ddim, 3, 2), &trace_id, &caller);
    let job = client.submit_job(req).await.unwrap().into_inner().job.unwrap();
    assert_eq!(i64::from(job.shards_total), SHARDS);
    let done = wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
    assert_eq!(done.samples_done, 6);

    let spans = receiver
        .wait(Duration::from_secs(30), |spans| {
            shards(spans).len() as i64 == SHARDS && spans.iter().any(|s| s.span.name == "finalize")
        })
        .await;
    assert!(spans.iter().all(|s| s.trace_id() == trace_id), "one trace, the caller's: {spans:#?}");
    assert!(spans.iter().all(|s| s.service == "ddpm-worker"), "the default service name: {spans:#?}");
    let by_id: BTreeMap<String, &Received> = spans.iter().map(|s| (s.id(), s)).collect();

    // SubmitJob's server span is the caller's child.
    let submits: Vec<_> = spans.iter().filter(|s| s.span.name == "ddpm.v1.WorkerService/SubmitJob").collect();
    assert_eq!(submits.len(), 1, "{spans:#?}");
    let submit = submits[0];
    assert_eq!(submit.parent(), caller);
    assert_eq!(submit.span.kind, SpanKind::Server as i32);
    assert_eq!(submit.string("job_id").as_deref(), Some(job.job_id.as_str()));
    assert_eq!(submit.string("rpc.method").as_deref(), Some("SubmitJob"));
    assert_eq!(submit.int("rpc.grpc.status_code"), Some(0));

    // Each shard, run on a device thread from the stored job, is SubmitJob's child.
    let shard_spans = shards(&spans);
    let indices: BTreeSet<i64> = shard_spans.iter().map(|s| s.int("shard").unwrap()).collect();
    assert_eq!(indices, (0..SHARDS).collect());
    for shard in &shard_spans {
        assert_eq!(shard.parent(), submit.id(), "{shard:#?}");
        assert_eq!(shard.string("job_id").as_deref(), Some(job.job_id.as_str()));
        assert_eq!(shard.int("samples"), Some(2));
        assert_eq!(shard.string("device").as_deref(), Some("cpu"));
        assert_eq!(shard.string("model").as_deref(), Some("tiny"));
        assert_eq!(shard.span.trace_state, "ddpm=test", "the caller's tracestate travels with the trace");
    }
    // One batch span per shard here, inside it; the manifest is written inside the last shard's span.
    let batches: Vec<_> = spans.iter().filter(|s| s.span.name == "batch").collect();
    assert_eq!(batches.len() as i64, SHARDS);
    for span in spans.iter().filter(|s| s.span.name == "batch" || s.span.name == "finalize") {
        let parent = by_id.get(&span.parent()).unwrap_or_else(|| panic!("no parent for {span:#?}"));
        assert_eq!(parent.span.name, "shard", "{span:#?}");
    }
    // And every span leads up to the caller's.
    for span in &spans {
        let mut at = span;
        while at.parent() != caller {
            at = by_id.get(&at.parent()).unwrap_or_else(|| panic!("{span:#?} does not lead to the caller"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_carries_its_trace_to_another_worker_which_exports_its_spans_on_exit() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--batches-per-shard", "1", "--max-attempts", "1"];

    // The first worker exports nothing (no endpoint) and loses its device on its first batch: it
    // takes the submission and gives its shard back untried.
    let first_env =
        [("OTEL_EXPORTER_OTLP_ENDPOINT", String::new()), ("DDPM_TEST_FAULT", "device-lost".to_string())];
    let mut first = Server::start_with(dir.path(), &serve_args(dir.path(), &flags), &first_env).await;
    let mut client = first.client().await;
    let (trace_id, caller) = caller_span();
    let req = traced(request(6, pb::Scheduler::Ddim, 3, 2), &trace_id, &caller);
    let job = client.submit_job(req).await.unwrap().into_inner().job.unwrap();
    let started = Instant::now();
    while first.health_of("liveness").await
        != Some(tonic_health::pb::health_check_response::ServingStatus::NotServing as i32)
    {
        assert!(started.elapsed() < Duration::from_secs(30), "the first worker's device was not lost");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(first.pid(), "TERM");
    assert_eq!(first.wait_exit(Duration::from_secs(30)).await.code(), Some(1));
    drop(first);

    // Another process runs the shards. Its batches go out every 10 minutes only: what arrives, arrives
    // because it flushes on the way out.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_string()),
        ("OTEL_SERVICE_NAME", "ddpm-test-runner".to_string()),
    ];
    let mut second = Server::start_with(dir.path(), &serve_args(dir.path(), &flags), &env).await;
    let mut client = second.client().await;
    let done = wait_for(&mut client, &job.job_id, |j| j.state == SUCCEEDED).await;
    assert_eq!(done.samples_done, 6);
    assert!(receiver.spans().is_empty(), "nothing is exported before the batch delay or the exit");
    signal(second.pid(), "TERM");
    assert_eq!(second.wait_exit(Duration::from_secs(30)).await.code(), Some(0));

    let spans = receiver.spans();
    let shard_spans = shards(&spans);
    let indices: BTreeSet<i64> = shard_spans.iter().map(|s| s.int("shard").unwrap()).collect();
    assert_eq!(indices, (0..SHARDS).collect(), "{spans:#?}");
    for shard in &shard_spans {
        assert_eq!(shard.trace_id(), trace_id, "{shard:#?}");
        // The first worker recorded no span of its own: the job kept the caller's context as it came.
        assert_eq!(shard.parent(), caller, "{shard:#?}");
        assert_eq!(shard.service, "ddpm-test-runner");
        assert!(shard.string("worker").is_some_and(|w| !w.is_empty()), "which worker ran it: {shard:#?}");
        assert_eq!(shard.span.trace_state, "ddpm=test");
    }
    assert!(spans.iter().all(|s| s.span.name != "ddpm.v1.WorkerService/SubmitJob"), "{spans:#?}");
}
