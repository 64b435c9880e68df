//! Retries inside a stage's budget. Only UNAVAILABLE is retried (the callee could not be
//! reached or is restarting: another attempt may land on a healthy connection); a shed
//! request (RESOURCE_EXHAUSTED), an open breaker (recognised by its type, not its
//! message) or a deadline is not. The calls it wraps only read, so a retry is safe. A
//! budget shared by every call to the same service — a share of recent traffic — caps
//! retries, so they cannot multiply the load on a service that is already struggling.
//! The request is shared between attempts, never copied.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tower::{
    retry::budget::{Budget, TpsBudget},
    Layer, Service, ServiceExt,
};

use super::{Call, CallError};

#[derive(Clone)]
pub struct RetryLayer {
    budget: Arc<TpsBudget>,
    max_retries: u32,
}

impl RetryLayer {
    /// `budget` is shared by every call to one service; `max_retries` bounds one call.
    pub fn new(budget: Arc<TpsBudget>, max_retries: u32) -> Self {
        Self { budget, max_retries }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry { inner, budget: Arc::clone(&self.budget), max_retries: self.max_retries }
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    budget: Arc<TpsBudget>,
    max_retries: u32,
}

fn retryable(error: &CallError) -> bool {
    matches!(error, CallError::Status(status) if status.code() == tonic::Code::Unavailable)
}

impl<S, M> Service<Call<M>> for Retry<S>
where
    S: Service<Call<M>, Error = CallError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    M: Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = CallError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, CallError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call<M>) -> Self::Future {
        // The service that was polled ready takes the first attempt; retries use clones.
        let spare = self.inner.clone();
        let first = std::mem::replace(&mut self.inner, spare.clone());
        let budget = Arc::clone(&self.budget);
        let max_retries = self.max_retries;
        budget.deposit();
        Box::pin(async move {
            let mut result = first.oneshot(call.clone()).await;
            let mut retries = 0;
            while let Err(error) = &result {
                if !(retryable(error) && retries < max_retries && budget.withdraw()) {
                    break;
                }
                retries += 1;
                tracing::debug!(retries, "retrying after UNAVAILABLE");
                result = spare.clone().oneshot(call.clone()).await;
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;
    use tokio_test::assert_ready_ok;

    use super::*;
    use crate::resilience::{test_support::spawn_layer, CircuitOpen};

    fn layer(max_retries: u32, budget_percent: f32) -> RetryLayer {
        RetryLayer::new(Arc::new(TpsBudget::new(Duration::from_secs(10), 10, budget_percent / 100.0)), max_retries)
    }

    fn call() -> Call<String> {
        Call::new(Arc::new("the request".to_string()), Instant::now() + Duration::from_secs(1))
    }

    /// Answers each attempt with the next of `answers`; returns the result and the
    /// requests the callee saw.
    async fn run(
        layer: RetryLayer,
        answers: Vec<Result<u32, CallError>>,
    ) -> (Result<u32, CallError>, Vec<Call<String>>) {
        let (mut service, mut handle) = spawn_layer::<_, String, u32>(layer);
        handle.allow(answers.len() as u64);
        assert_ready_ok!(service.poll_ready());
        let mut response = tokio::spawn(service.call(call()));
        let mut answers = answers.into_iter();
        let mut seen = Vec::new();
        loop {
            tokio::select! {
                result = &mut response => return (result.unwrap(), seen),
                Some((request, reply)) = handle.next_request() => {
                    seen.push(request);
                    match answers.next().expect("no more attempts than answers") {
                        Ok(value) => reply.send_response(value),
                        Err(error) => reply.send_error(error),
                    }
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_retried_with_the_same_shared_request() {
        let answers = vec![Err(tonic::Status::unavailable("connection refused").into()), Ok(7)];
        let (result, seen) = run(layer(1, 20.0), answers).await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(seen.len(), 2);
        assert!(Arc::ptr_eq(&seen[0].message, &seen[1].message), "the retry shares the request, no copy");
    }

    #[tokio::test(start_paused = true)]
    async fn shed_requests_and_open_breakers_are_not_retried() {
        for refusal in [
            CallError::Status(tonic::Status::resource_exhausted("overloaded")),
            CallError::CircuitOpen(CircuitOpen { service: "rank".into() }),
            CallError::DeadlineExceeded,
            CallError::Status(tonic::Status::invalid_argument("bad")),
        ] {
            let (result, seen) = run(layer(3, 100.0), vec![Err(refusal), Ok(1)]).await;
            assert!(result.is_err());
            assert_eq!(seen.len(), 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_per_call_limit() {
        let unavailable = || Err(tonic::Status::unavailable("down").into());
        let (result, seen) = run(layer(2, 100.0), vec![unavailable(), unavailable(), unavailable(), Ok(1)]).await;
        assert!(result.is_err());
        assert_eq!(seen.len(), 3, "one attempt and two retries");
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_budget_stops_retries() {
        // A budget with no reserve and no share of traffic never allows a retry.
        let empty = RetryLayer::new(Arc::new(TpsBudget::new(Duration::from_secs(10), 0, 0.0)), 3);
        let (result, seen) = run(empty, vec![Err(tonic::Status::unavailable("down").into()), Ok(1)]).await;
        assert!(result.is_err());
        assert_eq!(seen.len(), 1);
    }
}
