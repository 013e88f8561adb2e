//! OpenTelemetry traces: each run exported over OTLP as one span tree.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set; `OTEL_SERVICE_NAME` names the service (default `fmhost`);
//! `OTEL_EXPORTER_OTLP_PROTOCOL` is `http/protobuf` (the default) or `http/json`.
//!
//! Nothing here is on a stage's path: while a run goes, [`RunSpans`] only collects its
//! outbound attempts; when it ends, [`export`] turns the report and the attempts into
//! spans with the ids [`crate::trace`] gave them (the ids already sent upstream in
//! `traceparent`) and their real start and end times, and hands them to the SDK's batch
//! processor, which sends them from its own thread.
//!
//! The tree: `run PIPELINE` (child of the caller's span when the run joined a trace) >
//! `stage ID` > `plugin NAME` (when a plugin ran the stage) > one client span per
//! outbound attempt, named by its method, with the HTTP semantic-convention attributes.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use crate::engine::{RunObserver, RunReport, StageReport, StageStatus};
use crate::http::{Attempt, AttemptObserver};
use crate::trace::{RunTrace, SpanRef};

struct Exporter {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

static EXPORTER: OnceLock<Option<Exporter>> = OnceLock::new();

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Starts the exporter if the environment asks for one; says where spans go, or why not.
/// Call once, early; later calls return the first answer's state.
pub fn init() -> Result<Option<String>, String> {
    let mut outcome = Ok(None);
    EXPORTER.get_or_init(|| match build() {
        Ok(Some((exporter, endpoint))) => {
            outcome = Ok(Some(endpoint));
            Some(exporter)
        }
        Ok(None) => None,
        Err(e) => {
            outcome = Err(e);
            None
        }
    });
    outcome
}

fn build() -> Result<Option<(Exporter, String)>, String> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none")
    {
        return Ok(None);
    }
    let Some(endpoint) =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
    else {
        return Ok(None);
    };
    let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into());
    let protocol = match protocol.as_str() {
        "http/protobuf" => Protocol::HttpBinary,
        "http/json" => Protocol::HttpJson,
        other => {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other:?}: fmhost exports over http/protobuf or http/json"
            ));
        }
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .map_err(|e| format!("OpenTelemetry exporter for {endpoint}: {e}"))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("fmhost");
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "fmhost");
    Ok(Some((Exporter { provider, tracer }, endpoint)))
}

/// Whether runs are exported.
pub fn enabled() -> bool {
    EXPORTER.get().is_some_and(Option::is_some)
}

/// Sends what is still queued and stops the exporter (at the end of a process).
pub fn shutdown() {
    if let Some(Some(e)) = EXPORTER.get() {
        let _ = e.provider.force_flush();
        let _ = e.provider.shutdown();
    }
}

/// Collects one run's attempts for its spans, passing everything on to `inner`.
pub struct RunSpans {
    inner: Option<Arc<dyn RunObserver>>,
    started: SystemTime,
    attempts: Mutex<Vec<(String, Attempt)>>,
}

impl RunSpans {
    /// `started`: when the run began, the origin of its stages' times.
    pub fn new(inner: Option<Arc<dyn RunObserver>>, started: SystemTime) -> Arc<RunSpans> {
        Arc::new(RunSpans {
            inner,
            started,
            attempts: Mutex::new(Vec::new()),
        })
    }

    /// Exports the finished run.
    pub fn finish(&self, report: &RunReport) {
        let attempts = std::mem::take(&mut *self.attempts.lock().expect("attempts"));
        export(report, self.started, &attempts);
    }
}

impl AttemptObserver for RunSpans {
    fn attempt(&self, run_id: &str, stage_id: &str, attempt: &Attempt) {
        self.attempts
            .lock()
            .expect("attempts")
            .push((stage_id.to_string(), attempt.clone()));
        if let Some(o) = &self.inner {
            o.attempt(run_id, stage_id, attempt);
        }
    }
}

impl RunObserver for RunSpans {
    fn run_started(&self, run_id: &str, pipeline: &str, stages: &[StageReport]) {
        if let Some(o) = &self.inner {
            o.run_started(run_id, pipeline, stages);
        }
    }
    fn stage_updated(&self, run_id: &str, stage: &StageReport) {
        if let Some(o) = &self.inner {
            o.stage_updated(run_id, stage);
        }
    }
}

fn span_id(hex_id: &str) -> Option<opentelemetry::trace::SpanId> {
    let bytes: [u8; 8] = hex::decode(hex_id).ok()?.try_into().ok()?;
    Some(opentelemetry::trace::SpanId::from_bytes(bytes))
}

fn parent(trace: opentelemetry::trace::TraceId, span: opentelemetry::trace::SpanId) -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        trace,
        span,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

/// Exports one run's span tree; `started` is when the run began.
pub fn export(report: &RunReport, started: SystemTime, attempts: &[(String, Attempt)]) {
    let Some(Some(exporter)) = EXPORTER.get() else {
        return;
    };
    let Some(trace) = &report.trace else { return };
    let Some(run_span) = trace.span() else { return };
    let trace_id = opentelemetry::trace::TraceId::from_bytes(run_span.trace_id);
    let tracer = &exporter.tracer;
    let at = |ms: u64| started + Duration::from_millis(ms);
    let build = |name: String,
                 id: SpanRef,
                 parent_cx: &Context,
                 kind: SpanKind,
                 start: SystemTime,
                 end: SystemTime,
                 attributes: Vec<KeyValue>,
                 status: Status| {
        let mut span = tracer
            .span_builder(name)
            .with_trace_id(trace_id)
            .with_span_id(opentelemetry::trace::SpanId::from_bytes(id.span_id))
            .with_kind(kind)
            .with_start_time(start)
            .with_attributes(attributes)
            .with_status(status)
            .start_with_context(tracer, parent_cx);
        span.end_with_timestamp(end.max(start));
    };

    let caller = match trace.parent_span_id.as_deref().and_then(span_id) {
        Some(p) => parent(trace_id, p),
        None => Context::new(),
    };
    let run_status = match &report.error {
        None => Status::Ok,
        Some(e) => Status::error(e.clone()),
    };
    let mut run_attrs = vec![
        KeyValue::new("fmhost.run_id", report.run_id.clone()),
        KeyValue::new("fmhost.pipeline", report.pipeline.clone()),
        KeyValue::new("fmhost.run.status", report.status.as_str()),
    ];
    if let Some(s) = &report.failed_stage {
        run_attrs.push(KeyValue::new("fmhost.failed_stage", s.clone()));
    }
    build(
        format!("run {}", report.pipeline),
        run_span,
        &caller,
        SpanKind::Server,
        started,
        at(report.duration_ms),
        run_attrs,
        run_status,
    );

    let run_cx = parent(
        trace_id,
        opentelemetry::trace::SpanId::from_bytes(run_span.span_id),
    );
    for stage in &report.stages {
        let (Some(start_ms), Some(span)) = (stage.started_ms, trace.stage_span(&stage.id)) else {
            continue;
        };
        let (start, end) = (at(start_ms), at(start_ms + stage.duration_ms.unwrap_or(0)));
        let mut attrs = vec![
            KeyValue::new("fmhost.run_id", report.run_id.clone()),
            KeyValue::new("fmhost.stage.id", stage.id.clone()),
            KeyValue::new("fmhost.stage.component", stage.component.clone()),
            KeyValue::new("fmhost.stage.status", stage.status.as_str()),
            KeyValue::new("fmhost.stage.attempts", i64::from(stage.attempts)),
        ];
        if let Some(from) = &stage.reused_from {
            attrs.push(KeyValue::new("fmhost.stage.reused_from", from.clone()));
        }
        let status = match (&stage.error, stage.status) {
            (Some(e), _) => {
                attrs.push(KeyValue::new("error.type", e.kind.as_str()));
                Status::error(e.message.clone())
            }
            (None, StageStatus::Succeeded) => Status::Ok,
            _ => Status::Unset,
        };
        build(
            format!("stage {}", stage.id),
            span,
            &run_cx,
            SpanKind::Internal,
            start,
            end,
            attrs,
            status.clone(),
        );
        if let Some(version) = &stage.version {
            let plugin = crate::trace::plugin_span(&span);
            let mut attrs = vec![
                KeyValue::new("fmhost.plugin.name", stage.component.clone()),
                KeyValue::new("fmhost.plugin.version", version.clone()),
            ];
            if let Some(e) = &stage.error {
                attrs.push(KeyValue::new("error.type", e.kind.as_str()));
            }
            build(
                format!("plugin {}", stage.component),
                plugin,
                &parent(
                    trace_id,
                    opentelemetry::trace::SpanId::from_bytes(span.span_id),
                ),
                SpanKind::Internal,
                start,
                end,
                attrs,
                status,
            );
        }
    }

    for (stage_id, a) in attempts {
        let (Some(id), Some(parent_id)) = (
            a.span_id.as_deref().and_then(span_id),
            a.parent_span_id.as_deref().and_then(span_id),
        ) else {
            continue;
        };
        let end = SystemTime::UNIX_EPOCH + Duration::from_millis(a.at_ms.max(0) as u64);
        let start = end - Duration::from_millis(a.duration_ms);
        let mut attrs = vec![
            KeyValue::new("http.request.method", a.method.clone()),
            KeyValue::new("url.full", a.url.clone()),
            KeyValue::new("fmhost.service", a.service.clone()),
            KeyValue::new("fmhost.stage.id", stage_id.clone()),
            KeyValue::new("fmhost.run_id", report.run_id.clone()),
        ];
        if a.attempt > 1 {
            attrs.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(a.attempt - 1),
            ));
        }
        if let Ok(url) = reqwest::Url::parse(&a.url) {
            if let Some(host) = url.host_str() {
                attrs.push(KeyValue::new("server.address", host.to_string()));
            }
            if let Some(port) = url.port_or_known_default() {
                attrs.push(KeyValue::new("server.port", i64::from(port)));
            }
        }
        if let Some(s) = a.status {
            attrs.push(KeyValue::new("http.response.status_code", i64::from(s)));
        }
        if let Some(k) = &a.idempotency_key {
            attrs.push(KeyValue::new("fmhost.idempotency_key", k.clone()));
        }
        let status = match (&a.error_kind, a.status) {
            (Some(kind), _) => {
                attrs.push(KeyValue::new("error.type", kind.clone()));
                Status::error(kind.clone())
            }
            (None, Some(s)) if s >= 400 => {
                attrs.push(KeyValue::new("error.type", s.to_string()));
                Status::error(s.to_string())
            }
            _ => Status::Unset,
        };
        build(
            a.method.clone(),
            SpanRef {
                trace_id: run_span.trace_id,
                span_id: id.to_bytes(),
            },
            &parent(trace_id, parent_id),
            SpanKind::Client,
            start,
            end,
            attrs,
            status,
        );
    }
}

/// The trace of a run: its caller's, from a `traceparent` header, else its own.
pub fn run_trace(run_id: &str, traceparent: Option<&str>) -> RunTrace {
    RunTrace::start(run_id, traceparent.and_then(SpanRef::parse))
}
