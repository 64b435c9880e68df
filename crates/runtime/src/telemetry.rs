//! Logs and traces. Every service logs JSON lines to stderr (one object per event, with
//! the current span's fields, so a line inside a call carries its `trace_id`), filtered by
//! `RUST_LOG` (default `info`); `RECSYS_LOG_FORMAT=text` switches to human-readable
//! lines. When `server.otlp_endpoint` is set, spans are also exported over OTLP/gRPC to
//! that collector, and W3C trace context is propagated on every call either way.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
    Resource,
};
use tracing_subscriber::{fmt, prelude::*, EnvFilter, Layer};

/// Flushes and stops span export when dropped (at the end of `main`).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports every finished span now (tests and benchmarks read the collector after).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber and propagator; exports spans to `otlp_endpoint` when
/// it is not empty. Must run inside a Tokio runtime (the OTLP client is tonic). A second
/// call in the same process (tests) keeps the first subscriber.
pub fn init(service: &'static str, otlp_endpoint: &str, sample_ratio: f64) -> TelemetryGuard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = (!otlp_endpoint.is_empty()).then(|| tracer_provider(service, otlp_endpoint, sample_ratio)).flatten();
    let otel_layer = provider.as_ref().map(|provider| {
        opentelemetry::global::set_tracer_provider(provider.clone());
        // Our spans only: hyper, h2 and tower emit many debug/trace spans per call that
        // would multiply the export volume without telling an operator anything.
        // Timing of idle/busy periods, source locations and thread names cost clock reads
        // and allocations on every poll of every span; the span's own duration is enough.
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let text = std::env::var("RECSYS_LOG_FORMAT").is_ok_and(|format| format == "text");
    let log_layer = if text {
        fmt::layer().with_writer(std::io::stderr).boxed()
    } else {
        fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let installed = tracing_subscriber::registry().with(otel_layer).with(log_layer.with_filter(filter)).try_init();
    if installed.is_ok() {
        tracing::info!(service, otlp = !otlp_endpoint.is_empty(), "telemetry initialised");
    }
    TelemetryGuard { provider }
}

/// Head sampling: the orchestrator decides for the whole trace (`sample_ratio` of root
/// calls), and every service follows the decision carried in `traceparent`, so a trace is
/// either complete or absent.
fn tracer_provider(service: &'static str, endpoint: &str, sample_ratio: f64) -> Option<SdkTracerProvider> {
    let exporter = match opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build() {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("{service}: OTLP exporter for {endpoint} not created: {error}; spans are not exported");
            return None;
        }
    };
    Some(
        SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(sample_ratio.clamp(0.0, 1.0)))))
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service).build())
            .build(),
    )
}

/// Writes the current span's W3C trace context into outgoing gRPC metadata, so that the
/// callee's spans join the caller's trace.
pub fn inject_trace_context(metadata: &mut tonic::metadata::MetadataMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    struct Injector<'a>(&'a mut tonic::metadata::MetadataMap);
    impl opentelemetry::propagation::Injector for Injector<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                tonic::metadata::MetadataValue::try_from(value),
            ) {
                self.0.insert(key, value);
            }
        }
    }
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut Injector(metadata))
    });
}
