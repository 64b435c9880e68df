//! Calls to the leaf services. Every call goes through the callee's circuit breaker
//! (open → fail at once, leaving the caller's deadline for the fallback), is bounded by
//! the stage's share of the deadline (propagated as `grpc-timeout`), and may be retried
//! once on UNAVAILABLE when the retry budget allows: the stages only read, so a retry is
//! safe, and the budget (a share of recent traffic) stops retries from multiplying load
//! on a service that is already struggling. Shed requests (RESOURCE_EXHAUSTED) are never
//! retried.

use std::{future::Future, sync::Arc, time::Duration};

use recsys_proto::v1::{
    feature_service_client::FeatureServiceClient, recall_service_client::RecallServiceClient,
    rerank_service_client::RerankServiceClient,
};
use recsys_runtime::resilience::{BreakerConfig, CircuitBreaker, CircuitBreakerLayer};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tonic::{transport::Channel, Code, Request, Response, Status};
use tower::{
    retry::budget::{Budget, TpsBudget},
    ServiceBuilder, ServiceExt,
};

use crate::{deadline::Deadline, DownstreamConfig, OrchestratorError, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResilienceConfig {
    pub breaker: BreakerConfig,
    /// Retries per call on UNAVAILABLE (0 disables).
    pub max_retries: u32,
    /// Retries allowed as a percentage of recent requests to the same service.
    pub retry_budget_percent: f32,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        Self { breaker: BreakerConfig::default(), max_retries: 1, retry_budget_percent: 20.0 }
    }
}

/// A client with the breaker and retry budget of the service it calls.
#[derive(Clone)]
pub struct Guarded<C> {
    pub client: C,
    pub breaker: Arc<CircuitBreaker>,
    budget: Arc<TpsBudget>,
    max_retries: u32,
}

impl<C: Clone> Guarded<C> {
    pub fn new(client: C, breaker: Arc<CircuitBreaker>, resilience: &ResilienceConfig) -> Self {
        Self {
            client,
            breaker,
            budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, resilience.retry_budget_percent / 100.0)),
            max_retries: resilience.max_retries,
        }
    }

    /// One logical call: at most `budget` (and never past `deadline`), through the breaker,
    /// retried on UNAVAILABLE within the retry budget.
    pub async fn call<Req, Resp, F, Fut>(
        &self,
        stage: &'static str,
        deadline: Deadline,
        budget: Duration,
        message: Req,
        call: F,
    ) -> Result<Resp>
    where
        Req: Clone + Send + 'static,
        Resp: Send + 'static,
        F: Fn(C, Request<Req>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<Response<Resp>, Status>> + Send + 'static,
        C: Send + 'static,
    {
        let stage_deadline = Instant::now() + budget;
        let mut attempt = 0;
        self.budget.deposit();
        loop {
            let timeout = deadline
                .stage_timeout(stage_deadline.saturating_duration_since(Instant::now()))
                .ok_or(OrchestratorError::DeadlineExceeded { stage })?;
            let attempt_started = Instant::now();
            let result = self.attempt(timeout, message.clone(), call.clone()).await;
            tracing::debug!(
                stage,
                attempt,
                timeout_ms = timeout.as_millis() as u64,
                took_ms = attempt_started.elapsed().as_millis() as u64,
                ok = result.is_ok(),
                "downstream attempt"
            );
            match result {
                Ok(response) => return Ok(response),
                Err(status)
                    if status.code() == Code::Unavailable
                        && !status.message().starts_with("circuit breaker")
                        && attempt < self.max_retries
                        && self.budget.withdraw() =>
                {
                    attempt += 1;
                    tracing::debug!(stage, attempt, "retrying after UNAVAILABLE");
                }
                Err(status) if matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled) => {
                    return Err(OrchestratorError::DeadlineExceeded { stage })
                }
                Err(status) => {
                    return Err(OrchestratorError::Unavailable {
                        service: stage,
                        reason: format!("{:?}: {}", status.code(), status.message()),
                    })
                }
            }
        }
    }

    async fn attempt<Req, Resp, F, Fut>(&self, timeout: Duration, message: Req, call: F) -> Result<Resp, Status>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
        F: Fn(C, Request<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<Resp>, Status>> + Send + 'static,
        C: Send + 'static,
    {
        let client = self.client.clone();
        // The timeout sits inside the breaker so that a hung callee counts against it.
        let service = ServiceBuilder::new()
            .layer(CircuitBreakerLayer::new(Arc::clone(&self.breaker), counts_against_breaker::<Resp>))
            .service_fn(move |request: Request<Req>| {
                let response = call(client.clone(), request);
                async move {
                    match tokio::time::timeout(timeout, response).await {
                        Ok(result) => result.map(Response::into_inner),
                        Err(_) => Err(Status::deadline_exceeded("stage budget exhausted")),
                    }
                }
            });
        let mut request = Request::new(message);
        // Propagated as grpc-timeout: the callee stops working when we stop waiting.
        request.set_timeout(timeout);
        recsys_runtime::telemetry::inject_trace_context(request.metadata_mut());
        let result = service.oneshot(request).await;
        self.breaker.export_state();
        result
    }
}

/// Failures that say something about the callee's health. A caller's bad request or a
/// shed request (the callee protecting itself, answering fast) do not.
fn counts_against_breaker<T>(result: &Result<T, Status>) -> bool {
    match result {
        Ok(_) => false,
        Err(status) => matches!(
            status.code(),
            // tonic reports a callee-side timeout as CANCELLED "Timeout expired".
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Internal
                | Code::Unknown
                | Code::DataLoss
        ),
    }
}

#[derive(Clone)]
pub struct Downstream {
    pub feature: Guarded<FeatureServiceClient<Channel>>,
    pub recall: Guarded<RecallServiceClient<Channel>>,
    pub rerank: Guarded<RerankServiceClient<Channel>>,
}

impl Downstream {
    pub fn connect(config: &DownstreamConfig, resilience: &ResilienceConfig) -> Result<Self> {
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        let channel = |address: &str| {
            recsys_runtime::client::lazy_channel(address, timeout)
                .map_err(|error| OrchestratorError::Config(format!("{address}: {error}")))
        };
        let breaker = |name: &str| Arc::new(CircuitBreaker::new(name, resilience.breaker.clone()));
        Ok(Self {
            feature: Guarded::new(FeatureServiceClient::new(channel(&config.feature)?), breaker("feature"), resilience),
            recall: Guarded::new(RecallServiceClient::new(channel(&config.recall)?), breaker("recall"), resilience),
            rerank: Guarded::new(RerankServiceClient::new(channel(&config.rerank)?), breaker("rerank"), resilience),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn guarded() -> Guarded<Arc<AtomicU32>> {
        let breaker = Arc::new(CircuitBreaker::new(
            "test",
            BreakerConfig { consecutive_failures: 3, ..BreakerConfig::default() },
        ));
        Guarded::new(Arc::new(AtomicU32::new(0)), breaker, &ResilienceConfig::default())
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_retried_once_then_succeeds() {
        let guarded = guarded();
        let result = guarded
            .call(
                "x",
                Deadline::after(Duration::from_secs(1)),
                Duration::from_millis(100),
                (),
                |calls: Arc<AtomicU32>, _| async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        Err(Status::unavailable("connection refused"))
                    } else {
                        Ok(Response::new(7))
                    }
                },
            )
            .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(guarded.client.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn shed_requests_are_not_retried() {
        let guarded = guarded();
        let result = guarded
            .call(
                "x",
                Deadline::after(Duration::from_secs(1)),
                Duration::from_millis(100),
                (),
                |calls: Arc<AtomicU32>, _| async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<Response<u32>, _>(Status::resource_exhausted("overloaded"))
                },
            )
            .await;
        assert!(result.is_err());
        assert_eq!(guarded.client.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_callee_costs_only_the_stage_budget_and_opens_the_breaker() {
        let guarded = guarded();
        for _ in 0..3 {
            let started = Instant::now();
            let result = guarded
                .call("x", Deadline::after(Duration::from_secs(1)), Duration::from_millis(50), (), |_, _| async {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(Response::new(1u32))
                })
                .await;
            assert!(matches!(result, Err(OrchestratorError::DeadlineExceeded { .. })));
            assert!(started.elapsed() <= Duration::from_millis(50));
        }
        let started = Instant::now();
        let refused = guarded
            .call("x", Deadline::after(Duration::from_secs(1)), Duration::from_millis(50), (), |_, _| async {
                Ok(Response::new(1u32))
            })
            .await;
        assert!(matches!(refused, Err(OrchestratorError::Unavailable { .. })), "{refused:?}");
        assert_eq!(started.elapsed(), Duration::ZERO, "an open breaker answers at once");
    }

    #[tokio::test(start_paused = true)]
    async fn no_call_outlives_the_callers_deadline() {
        let guarded = guarded();
        let started = Instant::now();
        let result = guarded
            .call(
                "x",
                Deadline::after(Duration::from_millis(30)),
                Duration::from_millis(500),
                (),
                |_, request: Request<()>| async move {
                    // The propagated grpc-timeout is what is left of the caller's deadline.
                    assert!(request.metadata().get("grpc-timeout").is_some());
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(Response::new(1u32))
                },
            )
            .await;
        assert!(result.is_err());
        assert!(started.elapsed() <= Duration::from_millis(30));
    }
}
