//! A circuit breaker per downstream service, as a tower layer.
//!
//! Closed: calls pass; it opens after `consecutive_failures` failures in a row, or when
//! the error rate over the last `window` exceeds `error_rate` (with at least
//! `min_requests` calls seen). Open: calls fail at once with [`CircuitOpen`] until the
//! back-off has passed. Half-open: one probe call at a time goes through; its success
//! closes the breaker, its failure re-opens it with twice the back-off (capped at
//! `max_open`). The point is to stop spending the caller's deadline on a service that
//! is down, and to notice quickly when it is back.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tower::{Layer, Service};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    pub consecutive_failures: u32,
    pub window_ms: u64,
    pub min_requests: u32,
    pub error_rate: f64,
    /// First open period; doubled on each failed probe.
    pub base_open_ms: u64,
    pub max_open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            // Low, because each failure before the breaker opens holds a request for a
            // whole stage budget, and concurrent requests pile up behind it.
            consecutive_failures: 3,
            window_ms: 10_000,
            min_requests: 20,
            error_rate: 0.5,
            base_open_ms: 250,
            max_open_ms: 2_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// Numeric form for metrics: 0 closed, 1 half-open, 2 open.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// The error of a call the breaker refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error("circuit breaker for {service} is open")]
pub struct CircuitOpen {
    pub service: String,
}

impl From<CircuitOpen> for tonic::Status {
    fn from(open: CircuitOpen) -> Self {
        tonic::Status::unavailable(open.to_string())
    }
}

const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    started: Option<Instant>,
    calls: u32,
    failures: u32,
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant, backoff: Duration },
    HalfOpen { probing: bool, backoff: Duration },
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    consecutive_failures: u32,
    buckets: [Bucket; BUCKETS],
}

#[derive(Debug)]
pub struct CircuitBreaker {
    service: String,
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    pub fn new(service: impl Into<String>, config: BreakerConfig) -> Self {
        let service = service.into();
        // Series exist from the start, at zero and closed.
        crate::metrics::BREAKER_OPENED.with_label_values(&[service.as_str()]).inc_by(0);
        crate::metrics::BREAKER_STATE.with_label_values(&[service.as_str()]).set(0);
        Self {
            service,
            config,
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                consecutive_failures: 0,
                buckets: [Bucket::default(); BUCKETS],
            }),
        }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// Publishes the current state on the breaker gauge.
    pub fn export_state(&self) {
        crate::metrics::BREAKER_STATE.with_label_values(&[self.service.as_str()]).set(self.state().as_gauge());
    }

    pub fn state(&self) -> BreakerState {
        let mut inner = self.lock();
        let now = Instant::now();
        if let Phase::Open { until, backoff } = inner.phase {
            if now >= until {
                inner.phase = Phase::HalfOpen { probing: false, backoff };
            }
        }
        match inner.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Admits a call, or refuses it while open (or while a half-open probe is out).
    pub fn try_acquire(&self) -> Result<(), CircuitOpen> {
        let mut inner = self.lock();
        let now = Instant::now();
        match inner.phase {
            Phase::Closed => Ok(()),
            Phase::Open { until, backoff } if now >= until => {
                inner.phase = Phase::HalfOpen { probing: true, backoff };
                Ok(())
            }
            Phase::HalfOpen { probing: false, backoff } => {
                inner.phase = Phase::HalfOpen { probing: true, backoff };
                Ok(())
            }
            Phase::Open { .. } | Phase::HalfOpen { probing: true, .. } => {
                Err(CircuitOpen { service: self.service.clone() })
            }
        }
    }

    /// Records the outcome of an admitted call.
    pub fn record(&self, success: bool) {
        let mut inner = self.lock();
        let now = Instant::now();
        let base = Duration::from_millis(self.config.base_open_ms);
        let max = Duration::from_millis(self.config.max_open_ms);
        match inner.phase {
            Phase::HalfOpen { backoff, .. } => {
                if success {
                    tracing::info!(service = %self.service, "circuit breaker closed");
                    inner.phase = Phase::Closed;
                    inner.consecutive_failures = 0;
                    inner.buckets = [Bucket::default(); BUCKETS];
                } else {
                    let backoff = (backoff * 2).min(max);
                    inner.phase = Phase::Open { until: now + backoff, backoff };
                }
                return;
            }
            Phase::Open { .. } => return,
            Phase::Closed => {}
        }
        let bucket = self.current_bucket(&mut inner, now);
        bucket.calls += 1;
        if success {
            inner.consecutive_failures = 0;
            return;
        }
        bucket.failures += 1;
        inner.consecutive_failures += 1;
        let (calls, failures) = self.window_totals(&inner, now);
        let rate_tripped =
            calls >= self.config.min_requests && f64::from(failures) / f64::from(calls) > self.config.error_rate;
        if inner.consecutive_failures >= self.config.consecutive_failures || rate_tripped {
            tracing::warn!(service = %self.service, calls, failures, "circuit breaker opened");
            crate::metrics::BREAKER_OPENED.with_label_values(&[self.service.as_str()]).inc();
            inner.phase = Phase::Open { until: now + base, backoff: base };
        }
    }

    fn bucket_width(&self) -> Duration {
        Duration::from_millis((self.config.window_ms / BUCKETS as u64).max(1))
    }

    fn current_bucket<'a>(&self, inner: &'a mut Inner, now: Instant) -> &'a mut Bucket {
        let width = self.bucket_width();
        // Buckets rotate: the newest is reused while younger than one width.
        let newest = inner
            .buckets
            .iter()
            .enumerate()
            .filter_map(|(n, b)| b.started.map(|s| (n, s)))
            .max_by_key(|&(_, started)| started);
        match newest {
            Some((n, started)) if now.duration_since(started) < width => &mut inner.buckets[n],
            _ => {
                let oldest =
                    inner.buckets.iter().enumerate().min_by_key(|(_, b)| b.started).map(|(n, _)| n).unwrap_or(0);
                inner.buckets[oldest] = Bucket { started: Some(now), calls: 0, failures: 0 };
                &mut inner.buckets[oldest]
            }
        }
    }

    fn window_totals(&self, inner: &Inner, now: Instant) -> (u32, u32) {
        let window = Duration::from_millis(self.config.window_ms);
        inner
            .buckets
            .iter()
            .filter(|b| b.started.is_some_and(|s| now.duration_since(s) < window))
            .fold((0, 0), |(calls, failures), b| (calls + b.calls, failures + b.failures))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Records a failure if the call is dropped before it finished (a caller's timeout),
/// so an abandoned half-open probe cannot wedge the breaker.
struct Attempt {
    breaker: Arc<CircuitBreaker>,
    finished: bool,
}

impl Attempt {
    fn finish(mut self, success: bool) {
        self.finished = true;
        self.breaker.record(success);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.finished {
            self.breaker.record(false);
        }
    }
}

/// Wraps a service in a shared breaker; `is_failure` says which results count against it
/// (a caller's INVALID_ARGUMENT says nothing about the callee's health).
#[derive(Clone)]
pub struct CircuitBreakerLayer<F> {
    breaker: Arc<CircuitBreaker>,
    is_failure: F,
}

impl<F> CircuitBreakerLayer<F> {
    pub fn new(breaker: Arc<CircuitBreaker>, is_failure: F) -> Self {
        Self { breaker, is_failure }
    }
}

impl<S, F: Clone> Layer<S> for CircuitBreakerLayer<F> {
    type Service = CircuitBreakerService<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService { inner, breaker: Arc::clone(&self.breaker), is_failure: self.is_failure.clone() }
    }
}

#[derive(Clone)]
pub struct CircuitBreakerService<S, F> {
    inner: S,
    breaker: Arc<CircuitBreaker>,
    is_failure: F,
}

impl<S, F, Request> Service<Request> for CircuitBreakerService<S, F>
where
    S: Service<Request>,
    S::Future: Send + 'static,
    S::Error: From<CircuitOpen> + Send + 'static,
    S::Response: Send + 'static,
    F: Fn(&Result<S::Response, S::Error>) -> bool + Clone + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if let Err(open) = self.breaker.try_acquire() {
            return Box::pin(std::future::ready(Err(open.into())));
        }
        let attempt = Attempt { breaker: Arc::clone(&self.breaker), finished: false };
        let is_failure = self.is_failure.clone();
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            attempt.finish(!is_failure(&result));
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            window_ms: 10_000,
            min_requests: 10,
            error_rate: 0.5,
            base_open_ms: 100,
            max_open_ms: 400,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_refuses_calls() {
        let breaker = CircuitBreaker::new("rank", config());
        for _ in 0..3 {
            breaker.try_acquire().unwrap();
            breaker.record(false);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.try_acquire().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_consecutive_count() {
        let breaker = CircuitBreaker::new("rank", config());
        for success in [false, false, true, false, false] {
            breaker.try_acquire().unwrap();
            breaker.record(success);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_error_rate_over_the_window() {
        let breaker = CircuitBreaker::new("rank", BreakerConfig { consecutive_failures: 100, ..config() });
        // Never many failures in a row, but two thirds of the calls fail.
        for n in 0..30 {
            if breaker.try_acquire().is_err() {
                break;
            }
            breaker.record(n % 3 == 0);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_leave_the_window() {
        let breaker = CircuitBreaker::new("rank", BreakerConfig { consecutive_failures: 100, ..config() });
        for _ in 0..9 {
            breaker.try_acquire().unwrap();
            breaker.record(false);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..9 {
            breaker.try_acquire().unwrap();
            breaker.record(true);
        }
        breaker.try_acquire().unwrap();
        breaker.record(false);
        assert_eq!(breaker.state(), BreakerState::Closed, "1 failure in 10 recent calls");
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_one_probe_and_closes_on_success() {
        let breaker = CircuitBreaker::new("rank", config());
        for _ in 0..3 {
            breaker.try_acquire().unwrap();
            breaker.record(false);
        }
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        breaker.try_acquire().unwrap();
        assert!(breaker.try_acquire().is_err(), "only one probe at a time");
        breaker.record(true);
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.try_acquire().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probes_back_off_exponentially_up_to_the_cap() {
        let breaker = CircuitBreaker::new("rank", config());
        for _ in 0..3 {
            breaker.try_acquire().unwrap();
            breaker.record(false);
        }
        tokio::time::advance(Duration::from_millis(100)).await;
        for expected_open_ms in [200, 400, 400] {
            breaker.try_acquire().expect("half-open admits a probe");
            breaker.record(false);
            tokio::time::advance(Duration::from_millis(expected_open_ms - 1)).await;
            assert!(breaker.try_acquire().is_err(), "open for {expected_open_ms}ms after the failed probe");
            tokio::time::advance(Duration::from_millis(1)).await;
            assert_eq!(breaker.state(), BreakerState::HalfOpen);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn layer_counts_only_classified_failures_and_a_dropped_call() {
        let breaker = Arc::new(CircuitBreaker::new("rank", config()));
        let layer = CircuitBreakerLayer::new(
            Arc::clone(&breaker),
            |result: &Result<u32, tonic::Status>| matches!(result, Err(status) if status.code() != tonic::Code::InvalidArgument),
        );
        let invalid = tower::ServiceBuilder::new()
            .layer(layer.clone())
            .service(service_fn(|_: ()| async { Err::<u32, _>(tonic::Status::invalid_argument("bad")) }));
        for _ in 0..5 {
            let _ = invalid.clone().oneshot(()).await;
        }
        assert_eq!(breaker.state(), BreakerState::Closed, "caller errors do not trip it");

        let slow = tower::ServiceBuilder::new().layer(layer.clone()).service(service_fn(|_: ()| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<u32, tonic::Status>(1)
        }));
        for _ in 0..3 {
            let timed_out = tokio::time::timeout(Duration::from_millis(10), slow.clone().oneshot(())).await;
            assert!(timed_out.is_err());
        }
        assert_eq!(breaker.state(), BreakerState::Open, "abandoned calls count as failures");
        let refused = slow.clone().oneshot(()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
    }
}
