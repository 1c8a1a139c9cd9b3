//! OpenTelemetry traces over OTLP/gRPC, and the W3C trace context a job carries from its submitter to
//! the workers that run its shards.
//!
//! Export is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set;
//! the SDK reads the other standard variables itself (`OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`,
//! `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`/`TIMEOUT`/`COMPRESSION`, `OTEL_RESOURCE_ATTRIBUTES`).
//!
//! SubmitJob reads `traceparent`/`tracestate` from the request's metadata ([`extract_grpc`]) and stores
//! the context of its own span, or the caller's when this process exports nothing, with the job
//! ([`crate::job::JobSpec::trace_context`]); a shard span, on whichever worker leases the shard, takes
//! its parent from there ([`set_parent`]).

use std::collections::BTreeMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `service.name` unless `OTEL_SERVICE_NAME` (or `service.name` in `OTEL_RESOURCE_ATTRIBUTES`) says
/// otherwise.
pub const DEFAULT_SERVICE_NAME: &str = "ddpm-worker";

/// How spans are exported, as the environment asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The collector's OTLP/gRPC address (the traces endpoint wins over the general one).
    pub endpoint: String,
    pub service_name: String,
}

/// The export the environment asks for, read through `var` (the process environment in
/// [`otlp_from_env`]): `None` when no OTLP endpoint is set, when `OTEL_SDK_DISABLED` is true or
/// `OTEL_TRACES_EXPORTER` is `none`; an error for settings this build cannot honour.
pub fn otlp_settings(var: impl Fn(&str) -> Option<String>) -> Result<Option<OtlpSettings>, String> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match set("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase()) {
        None => {}
        Some(e) if e == "none" => return Ok(None),
        Some(e) if e == "otlp" => {}
        Some(e) => return Err(format!("OTEL_TRACES_EXPORTER={e}: only otlp (or none) is supported")),
    }
    let Some(endpoint) =
        set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
    else {
        return Ok(None);
    };
    for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Some(p) = set(name).filter(|p| p.trim() != "grpc") {
            // An HTTP collector port would otherwise see gRPC frames and drop every span quietly.
            return Err(format!("{name}={p}: only grpc is supported (the collector's OTLP/gRPC port, 4317)"));
        }
    }
    let from_attributes = set("OTEL_RESOURCE_ATTRIBUTES").and_then(|attrs| {
        attrs.split(',').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k.trim() == "service.name").then(|| v.trim().to_string())
        })
    });
    let service_name =
        set("OTEL_SERVICE_NAME").or(from_attributes).unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_string());
    Ok(Some(OtlpSettings { endpoint: endpoint.trim().to_string(), service_name }))
}

/// The tracer provider exporting over OTLP/gRPC, when the environment asks for one. Call it inside a
/// tokio runtime (the gRPC channel runs on it) that outlives the provider, and
/// [`SdkTracerProvider::shutdown`] it before the runtime goes, so the last spans are sent.
pub fn otlp_from_env() -> Result<Option<(SdkTracerProvider, OtlpSettings)>, String> {
    let Some(settings) = otlp_settings(|name| std::env::var(name).ok())? else { return Ok(None) };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_protocol(opentelemetry_otlp::Protocol::Grpc)
        // An https:// endpoint is checked against the system's roots (plain http:// uses no TLS).
        .with_tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots())
        .build()
        .map_err(|e| format!("OTLP trace exporter: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    Ok(Some((provider, settings)))
}

/// Whether a span from `target` goes to the exporter: this crate's spans only (the exporter's own gRPC
/// client is traced too, and exporting its spans would feed on itself).
pub fn exported(target: &str) -> bool {
    target == "ddpm_worker" || target.starts_with("ddpm_worker::")
}

/// The caller's trace context in gRPC request metadata (`traceparent`, `tracestate`); an empty context
/// when there is none or it is malformed.
pub fn extract_grpc(metadata: &tonic::metadata::MetadataMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&Metadata(metadata))
}

/// The trace context a job stores: the context of `span` (its SubmitJob span) when this process
/// records it, else the caller's `parent`, so that workers that export still join the caller's trace.
/// Empty when there is neither.
pub fn job_trace_context(span: &tracing::Span, parent: &opentelemetry::Context) -> BTreeMap<String, String> {
    let own = span.context();
    let cx = if own.span().span_context().is_valid() { &own } else { parent };
    let mut carrier = BTreeMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut Carrier(&mut carrier));
    carrier
}

/// Makes `span` (not entered yet) a child of a job's stored trace context; nothing when the context is
/// empty or malformed, or when spans are not exported.
pub fn set_parent(span: &tracing::Span, trace_context: &BTreeMap<String, String>) {
    if !trace_context.is_empty() {
        set_parent_context(span, &TraceContextPropagator::new().extract(&Stored(trace_context)));
    }
}

/// Makes `span` (not entered yet) a child of `parent` when that holds a span.
pub fn set_parent_context(span: &tracing::Span, parent: &opentelemetry::Context) {
    if parent.span().span_context().is_valid() {
        // An error means this process records no OpenTelemetry spans: nothing to join.
        let _ = span.set_parent(parent.clone());
    }
}

struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct Stored<'a>(&'a BTreeMap<String, String>);

impl Extractor for Stored<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct Carrier<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty tracestate is the same as none.
        if !value.is_empty() {
            self.0.insert(key.to_ascii_lowercase(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Option<OtlpSettings>, String> {
        otlp_settings(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
    }

    fn named(name: &str) -> Result<Option<OtlpSettings>, String> {
        Ok(settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")])?
            .map(|s| OtlpSettings { service_name: name.into(), ..s }))
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_set() {
        assert_eq!(settings(&[]), Ok(None));
        assert_eq!(settings(&[("OTEL_SERVICE_NAME", "x"), ("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]), Ok(None));
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert_eq!(settings(&[endpoint]), named(DEFAULT_SERVICE_NAME));
        let traces = settings(&[endpoint, ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", " https://traces:4317 ")]);
        assert_eq!(traces.unwrap().unwrap().endpoint, "https://traces:4317");
        assert_eq!(settings(&[endpoint, ("OTEL_SDK_DISABLED", "TRUE")]), Ok(None));
        assert_eq!(settings(&[endpoint, ("OTEL_SDK_DISABLED", "false")]), named("ddpm-worker"));
        assert_eq!(settings(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]), Ok(None));
        assert_eq!(settings(&[endpoint, ("OTEL_TRACES_EXPORTER", "otlp")]), named("ddpm-worker"));
    }

    #[test]
    fn the_service_name_comes_from_the_environment_first() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        let attrs = ("OTEL_RESOURCE_ATTRIBUTES", "team=ml, service.name = gen-a ,x=y");
        assert_eq!(settings(&[endpoint, attrs]), named("gen-a"));
        assert_eq!(settings(&[endpoint, attrs, ("OTEL_SERVICE_NAME", "gen-b")]), named("gen-b"));
    }

    #[test]
    fn settings_this_build_cannot_honour_are_refused() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        let http = settings(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).unwrap_err();
        assert!(http.contains("OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"), "{http}");
        let traces = settings(&[endpoint, ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")]).unwrap_err();
        assert!(traces.contains("only grpc"), "{traces}");
        assert_eq!(settings(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]), named("ddpm-worker"));
        let zipkin = settings(&[endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")]).unwrap_err();
        assert!(zipkin.contains("only otlp"), "{zipkin}");
    }

    #[test]
    fn grpc_metadata_round_trips_through_a_stored_job() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        metadata.insert("traceparent", traceparent.parse().unwrap());
        metadata.insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
        let parent = extract_grpc(&metadata);
        // No OpenTelemetry layer here: the job keeps the caller's context as it came.
        let stored = job_trace_context(&tracing::Span::none(), &parent);
        assert_eq!(
            stored,
            BTreeMap::from([
                ("traceparent".to_string(), traceparent.to_string()),
                ("tracestate".to_string(), "congo=t61rcWkgMzE".to_string()),
            ])
        );
        let back = TraceContextPropagator::new().extract(&Stored(&stored));
        let span = back.span();
        assert_eq!(span.span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span.span_context().span_id().to_string(), "00f067aa0ba902b7");
        assert!(span.span_context().is_sampled());
    }

    #[test]
    fn malformed_or_missing_context_stores_nothing() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert!(job_trace_context(&tracing::Span::none(), &extract_grpc(&metadata)).is_empty());
        // Upper-case hex and an all-zero trace id are invalid W3C trace context.
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "garbage",
        ] {
            metadata.insert("traceparent", bad.parse().unwrap());
            assert!(job_trace_context(&tracing::Span::none(), &extract_grpc(&metadata)).is_empty(), "{bad}");
        }
    }

    #[test]
    fn only_this_crates_spans_are_exported() {
        assert!(exported("ddpm_worker"));
        assert!(exported("ddpm_worker::worker::device"));
        assert!(!exported("ddpm_worker_extra"));
        assert!(!exported("h2::proto"));
        assert!(!exported("tonic::transport"));
    }
}
