//! Clients of downstream services. Channels are lazy so that a service can start before
//! its dependencies and recover when they come back. Each downstream gets one
//! [`ResilientClient`], built once at start-up: the resilience stack (see
//! `resilience/mod.rs`) around a unary gRPC call whose request is shared, not copied,
//! between attempts.

use std::{
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;
use tonic::{
    codec::{Codec, EncodeBuf, Encoder},
    transport::{Channel, Endpoint},
    Status,
};
use tower::{retry::budget::TpsBudget, util::BoxCloneSyncService, Service, ServiceBuilder, ServiceExt};

use crate::resilience::{
    Call, CallError, CircuitBreaker, CircuitBreakerLayer, ResilienceConfig, RetryLayer, TimeoutLayer,
};
use crate::tls::Tls;

/// Builds a lazily connecting channel to `address` (`host:port` or a full URI), over
/// mutual TLS when `tls` is on (the host is the name the server's certificate must hold).
/// Without TLS an `https://` address is refused on first use (tonic's own check), never
/// dialled in plaintext.
pub fn lazy_channel(address: &str, connect_timeout: Duration, tls: &Tls) -> Result<Channel, tonic::transport::Error> {
    let uri = match (tls.connector(), address.strip_prefix("https://")) {
        // TLS is this crate's connector's job (`tls.rs`); tonic refuses an `https` URI on
        // a channel with a connector of its own.
        (Some(_), Some(rest)) => format!("http://{rest}"),
        _ => endpoint_uri(address),
    };
    let endpoint = Endpoint::from_shared(uri)?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    Ok(match tls.connector() {
        Some(connector) => endpoint.connect_with_connector_lazy(connector),
        None => endpoint.connect_lazy(),
    })
}

/// `host:port` as a plaintext gRPC URI; full URIs pass through unchanged.
pub fn endpoint_uri(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

/// One unary method of one downstream service behind its resilience stack. Cloning is
/// cheap and shares the breaker and the retry budget.
#[derive(Clone)]
pub struct ResilientClient<M, R> {
    stack: BoxCloneSyncService<Call<M>, R, CallError>,
    breaker: Arc<CircuitBreaker>,
}

impl<M, R> ResilientClient<M, R>
where
    M: prost::Message + Send + Sync + 'static,
    R: prost::Message + Default + Send + Sync + 'static,
{
    /// The stack for `method` (`/package.Service/Method`) on `channel`: at most `budget`
    /// per call, retried and broken as `config` says. `name` labels the breaker's metrics.
    pub fn new(
        name: impl Into<String>,
        channel: Channel,
        method: &'static str,
        budget: Duration,
        config: &ResilienceConfig,
    ) -> Self {
        Self::over(name, UnaryCall::new(channel, method), budget, config)
    }
}

impl<M, R> ResilientClient<M, R>
where
    M: Send + Sync + 'static,
    R: Send + Sync + 'static,
{
    /// The same stack over any callee (tests use an in-process one).
    pub fn over<S>(name: impl Into<String>, callee: S, budget: Duration, config: &ResilienceConfig) -> Self
    where
        S: Service<Call<M>, Response = R, Error = CallError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        let breaker = Arc::new(CircuitBreaker::new(name, config.breaker.clone()));
        let budget_of_retries =
            Arc::new(TpsBudget::new(Duration::from_secs(10), 10, config.retry_budget_percent / 100.0));
        let stack = ServiceBuilder::new()
            // Outermost: one budget for the call and all its retries.
            .layer(TimeoutLayer::new(budget))
            // Retries wrap the breaker, so each attempt asks it and an open one ends them.
            .layer(RetryLayer::new(budget_of_retries, config.max_retries))
            .layer(CircuitBreakerLayer::new(Arc::clone(&breaker), |result: &Result<R, CallError>| {
                result.as_ref().err().is_some_and(CallError::counts_against_breaker)
            }))
            .service(callee);
        Self { stack: BoxCloneSyncService::new(stack), breaker }
    }

    /// One logical call, answered by `deadline` at the latest.
    pub async fn call(&self, message: Arc<M>, deadline: Instant) -> Result<R, CallError> {
        let result = self.stack.clone().oneshot(Call::new(message, deadline)).await;
        self.breaker.export_state();
        result
    }

    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

/// The innermost service of a stack: one unary gRPC request. It propagates the call's
/// deadline as `grpc-timeout` and the current trace context, and encodes the shared
/// message in place (tonic's generated clients would need an owned copy per attempt).
pub struct UnaryCall<M, R> {
    grpc: tonic::client::Grpc<Channel>,
    method: &'static str,
    _messages: PhantomData<fn(M) -> R>,
}

impl<M, R> Clone for UnaryCall<M, R> {
    fn clone(&self) -> Self {
        Self { grpc: self.grpc.clone(), method: self.method, _messages: PhantomData }
    }
}

impl<M, R> UnaryCall<M, R> {
    pub fn new(channel: Channel, method: &'static str) -> Self {
        Self { grpc: tonic::client::Grpc::new(channel), method, _messages: PhantomData }
    }
}

impl<M, R> Service<Call<M>> for UnaryCall<M, R>
where
    M: prost::Message + Send + Sync + 'static,
    R: prost::Message + Default + Send + Sync + 'static,
{
    type Response = R;
    type Error = CallError;
    type Future = Pin<Box<dyn Future<Output = Result<R, CallError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The channel's readiness is awaited in the call, inside the caller's deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call<M>) -> Self::Future {
        let mut grpc = self.grpc.clone();
        let method = self.method;
        Box::pin(async move {
            let mut request = tonic::Request::new(call.message);
            request.set_timeout(call.deadline.saturating_duration_since(Instant::now()));
            crate::telemetry::inject_trace_context(request.metadata_mut());
            grpc.ready().await.map_err(|error| Status::unavailable(format!("channel not ready: {error}")))?;
            let path = http::uri::PathAndQuery::from_static(method);
            let response = grpc.unary(request, path, SharedCodec::<M, R>::default()).await?;
            Ok(response.into_inner())
        })
    }
}

/// A prost codec whose encoder takes the message behind an `Arc`.
struct SharedCodec<M, R>(PhantomData<fn(M) -> R>);

impl<M, R> Default for SharedCodec<M, R> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<M, R> Codec for SharedCodec<M, R>
where
    M: prost::Message + Send + Sync + 'static,
    R: prost::Message + Default + Send + Sync + 'static,
{
    type Encode = Arc<M>;
    type Decode = R;
    type Encoder = SharedEncoder<M>;
    type Decoder = tonic_prost::ProstDecoder<R>;

    fn encoder(&mut self) -> Self::Encoder {
        SharedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

struct SharedEncoder<M>(PhantomData<fn(M)>);

impl<M: prost::Message> Encoder for SharedEncoder<M> {
    type Item = Arc<M>;
    type Error = Status;

    fn encode(&mut self, item: Arc<M>, buffer: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buffer).map_err(|error| Status::internal(format!("encoding the request: {error}")))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::resilience::{BreakerConfig, BreakerState};

    /// A callee that answers after `delay` with `answer(attempt)`.
    fn callee(
        calls: Arc<AtomicU32>,
        delay: Duration,
        answer: fn(u32) -> Result<u32, CallError>,
    ) -> impl Service<Call<()>, Response = u32, Error = CallError, Future: Send> + Clone + Send + Sync {
        tower::service_fn(move |_: Call<()>| {
            let attempt = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                answer(attempt)
            }
        })
    }

    fn client(
        calls: &Arc<AtomicU32>,
        delay: Duration,
        answer: fn(u32) -> Result<u32, CallError>,
    ) -> ResilientClient<(), u32> {
        let config = ResilienceConfig {
            breaker: BreakerConfig { consecutive_failures: 3, ..BreakerConfig::default() },
            ..ResilienceConfig::default()
        };
        ResilientClient::over("test", callee(Arc::clone(calls), delay, answer), Duration::from_millis(50), &config)
    }

    fn in_one_second() -> Instant {
        Instant::now() + Duration::from_secs(1)
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_callee_costs_only_the_stage_budget_and_opens_the_breaker() {
        let calls = Arc::new(AtomicU32::new(0));
        let client = client(&calls, Duration::from_secs(60), |_| Ok(1));
        for _ in 0..3 {
            let started = Instant::now();
            let result = client.call(Arc::new(()), in_one_second()).await;
            assert!(matches!(result, Err(CallError::DeadlineExceeded)), "{result:?}");
            assert_eq!(started.elapsed(), Duration::from_millis(50));
        }
        assert_eq!(client.breaker().state(), BreakerState::Open);
        let started = Instant::now();
        let refused = client.call(Arc::new(()), in_one_second()).await;
        assert!(matches!(refused, Err(CallError::CircuitOpen(_))), "{refused:?}");
        assert_eq!(started.elapsed(), Duration::ZERO, "an open breaker answers at once");
        assert_eq!(calls.load(Ordering::SeqCst), 3, "the refused call never reached the callee");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_spends_the_same_budget() {
        let calls = Arc::new(AtomicU32::new(0));
        // Each attempt fails after 30 ms: the retry gets only the 20 ms left of 50.
        let client = client(&calls, Duration::from_millis(30), |_| Err(Status::unavailable("restarting").into()));
        let started = Instant::now();
        let result = client.call(Arc::new(()), in_one_second()).await;
        assert!(matches!(result, Err(CallError::DeadlineExceeded)), "{result:?}");
        assert_eq!(started.elapsed(), Duration::from_millis(50));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_then_success_is_one_successful_call() {
        let calls = Arc::new(AtomicU32::new(0));
        let client = client(&calls, Duration::from_millis(1), |attempt| {
            if attempt == 0 {
                Err(Status::unavailable("connection reset").into())
            } else {
                Ok(7)
            }
        });
        assert_eq!(client.call(Arc::new(()), in_one_second()).await.unwrap(), 7);
        assert_eq!(client.breaker().state(), BreakerState::Closed);
    }
}
