//! The per-RPC layer of every server: a tracing span per call, parented on the caller's
//! W3C `traceparent` (so one `Recommend` is one trace across all five services), and the
//! latency histogram by method and status. The status of a gRPC call arrives either in
//! the response headers (trailers-only errors) or in the trailers after the body, so the
//! body is wrapped to record when the trailers pass.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use opentelemetry::trace::TraceContextExt;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tower::{BoxError, Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::{LOAD_SHED, RPC_DURATION};

#[derive(Clone, Copy)]
pub struct ObserveLayer {
    service: &'static str,
}

impl ObserveLayer {
    /// `service` labels the metrics (e.g. "rank-svc").
    pub fn new(service: &'static str) -> Self {
        Self { service }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe { inner, service: self.service }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    service: &'static str,
}

/// Reads W3C trace context from HTTP/2 headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}

impl<S> Service<Request<tonic::body::Body>> for Observe<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let method = request.uri().path().to_string();
        let (rpc_service, rpc_method) = method.trim_start_matches('/').split_once('/').unwrap_or(("", &method));
        let span = tracing::info_span!(
            "rpc",
            otel.name = %method.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %rpc_service,
            rpc.method = %rpc_method,
            trace_id = tracing::field::Empty,
        );
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(request.headers()))
        });
        // Without an exporter the span has no OpenTelemetry context, but a caller's
        // traceparent still names the trace: logs carry it either way.
        let remote_trace_id = parent.span().span_context().trace_id();
        let _ = span.set_parent(parent);
        let mut trace_id = span.context().span().span_context().trace_id();
        if trace_id == opentelemetry::trace::TraceId::INVALID {
            trace_id = remote_trace_id;
        }
        if trace_id != opentelemetry::trace::TraceId::INVALID {
            span.record("trace_id", tracing::field::display(trace_id));
        }
        let recorder = Recorder { service: self.service, method, started: Instant::now() };
        let call = self.inner.call(request);
        Box::pin(
            async move {
                match call.await {
                    Ok(response) => Ok(recorder.watch(response)),
                    Err(error) => {
                        let error: BoxError = error.into();
                        if error.is::<tower::load_shed::error::Overloaded>() {
                            LOAD_SHED.with_label_values(&[recorder.service]).inc();
                            recorder.record("ResourceExhausted");
                        } else {
                            recorder.record("Unknown");
                        }
                        Err(error)
                    }
                }
            }
            .instrument(span),
        )
    }
}

struct Recorder {
    service: &'static str,
    method: String,
    started: Instant,
}

impl Recorder {
    fn record(&self, code: &str) {
        RPC_DURATION
            .with_label_values(&[self.service, self.method.as_str(), code])
            .observe(self.started.elapsed().as_secs_f64());
    }

    /// Records now if the status is in the headers, else when the trailers pass.
    fn watch(self, response: Response<tonic::body::Body>) -> Response<tonic::body::Body> {
        if let Some(code) = status_of(response.headers()) {
            self.record(&code);
            return response;
        }
        response.map(|body| tonic::body::Body::new(ObservedBody { inner: body, recorder: Some(self) }))
    }
}

fn status_of(headers: &HeaderMap) -> Option<String> {
    let code: i32 = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(format!("{:?}", tonic::Code::from_i32(code)))
}

struct ObservedBody {
    inner: tonic::body::Body,
    recorder: Option<Recorder>,
}

impl Drop for ObservedBody {
    /// A body dropped before its trailers is a call the client gave up on.
    fn drop(&mut self) {
        if let Some(recorder) = self.recorder.take() {
            recorder.record("Cancelled");
        }
    }
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(recorder) = self.recorder.take() {
                        recorder.record(&status_of(trailers).unwrap_or_else(|| "Unknown".into()));
                    }
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(recorder) = self.recorder.take() {
                    recorder.record("Unknown");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
