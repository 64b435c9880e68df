//! The outermost layer of a client stack: a call may spend at most its stage's budget,
//! and never more than what is left of the caller's deadline. It tightens the call's
//! deadline before passing it on, so the retries inside share one budget and the
//! transport propagates the tightened deadline as `grpc-timeout` (the callee stops
//! working when we stop waiting). When time runs out the attempt in flight is dropped,
//! which the breaker below counts as a failure: a hung callee trips it.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;
use tower::{Layer, Service};

use super::{Call, CallError};

#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    budget: Duration,
}

impl TimeoutLayer {
    pub fn new(budget: Duration) -> Self {
        Self { budget }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout { inner, budget: self.budget }
    }
}

#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    budget: Duration,
}

impl<S, M> Service<Call<M>> for Timeout<S>
where
    S: Service<Call<M>, Error = CallError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = CallError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, CallError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call<M>) -> Self::Future {
        let now = Instant::now();
        let until = call.deadline.min(now + self.budget);
        if until <= now {
            return Box::pin(std::future::ready(Err(CallError::DeadlineExceeded)));
        }
        call.deadline = until;
        let response = self.inner.call(call);
        Box::pin(async move {
            match tokio::time::timeout_at(until, response).await {
                Ok(result) => result,
                Err(_) => Err(CallError::DeadlineExceeded),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_test::{assert_pending, assert_ready_err, assert_ready_ok};
    use tower_test::mock::{Handle, Spawn};

    use crate::resilience::test_support::{spawn_layer, MockCall};

    use super::*;

    type MockTimeout = Spawn<Timeout<MockCall<u32, u32>>>;

    /// The timeout layer over a mock callee that takes one call, polled ready.
    fn ready_with_budget(budget: Duration) -> (MockTimeout, Handle<Call<u32>, u32>) {
        let (mut service, mut handle) = spawn_layer::<_, u32, u32>(TimeoutLayer::new(budget));
        handle.allow(1);
        assert_ready_ok!(service.poll_ready());
        (service, handle)
    }

    fn call_until(deadline: Duration) -> Call<u32> {
        Call::new(Arc::new(7), Instant::now() + deadline)
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_callee_costs_exactly_the_stage_budget() {
        let (mut service, mut handle) = ready_with_budget(Duration::from_millis(50));
        let mut response = tokio_test::task::spawn(service.call(call_until(Duration::from_secs(1))));
        let (sent, _reply) = handle.next_request().await.unwrap();
        assert_eq!(sent.deadline, Instant::now() + Duration::from_millis(50), "tightened to the budget");
        tokio::time::advance(Duration::from_millis(49)).await;
        assert_pending!(response.poll());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(assert_ready_err!(response.poll()), CallError::DeadlineExceeded));
    }

    #[tokio::test(start_paused = true)]
    async fn the_callers_deadline_caps_the_budget() {
        let (mut service, mut handle) = ready_with_budget(Duration::from_secs(5));
        let mut response = tokio_test::task::spawn(service.call(call_until(Duration::from_millis(30))));
        let (sent, _reply) = handle.next_request().await.unwrap();
        assert_eq!(sent.deadline, Instant::now() + Duration::from_millis(30));
        tokio::time::advance(Duration::from_millis(30)).await;
        assert!(matches!(assert_ready_err!(response.poll()), CallError::DeadlineExceeded));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_passes_through() {
        let (mut service, mut handle) = ready_with_budget(Duration::from_millis(50));
        let mut response = tokio_test::task::spawn(service.call(call_until(Duration::from_secs(1))));
        let (_, reply) = handle.next_request().await.unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        reply.send_response(42);
        assert_eq!(assert_ready_ok!(response.poll()), 42);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_deadline_sends_nothing() {
        let (mut service, mut handle) = ready_with_budget(Duration::from_millis(50));
        let result = service.call(call_until(Duration::ZERO)).await;
        assert!(matches!(result, Err(CallError::DeadlineExceeded)));
        assert_pending!(handle.poll_request());
    }
}
