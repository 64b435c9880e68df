//! Resilience for calls between services. Server-side concurrency limiting and load
//! shedding use tower's own layers (see `server.rs`); the client side is one stack per
//! downstream service, built once (`crate::client::ResilientClient`), one file per layer:
//!
//! `timeout` → `retry` → `circuit_breaker` → the gRPC call
//!
//! The timeout is outermost so that retries share the stage's budget rather than each
//! getting a fresh one; the breaker is innermost so that it sees every attempt, and an
//! attempt the timeout abandons counts against it.

mod call;
pub mod circuit_breaker;
pub mod retry;
pub mod timeout;

use serde::{Deserialize, Serialize};

pub use call::{Call, CallError};
pub use circuit_breaker::{BreakerConfig, BreakerState, CircuitBreaker, CircuitBreakerLayer, CircuitOpen};
pub use retry::RetryLayer;
pub use timeout::TimeoutLayer;

/// How a caller protects itself from one downstream service.
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

#[cfg(test)]
pub(crate) mod test_support {
    use tower::{Layer, ServiceExt};
    use tower_test::mock::{self, Handle, Mock, Spawn};

    use super::{Call, CallError};

    pub type MockCall<M, R> = tower::util::MapErr<Mock<Call<M>, R>, fn(tower::BoxError) -> CallError>;

    /// A layer over a mock callee whose errors are `CallError`s (the mock boxes them).
    pub fn spawn_layer<L, M, R>(layer: L) -> (Spawn<L::Service>, Handle<Call<M>, R>)
    where
        L: Layer<MockCall<M, R>>,
    {
        let (service, handle) = mock::pair::<Call<M>, R>();
        let unbox: fn(tower::BoxError) -> CallError = |error| match error.downcast::<CallError>() {
            Ok(error) => *error,
            Err(other) => CallError::Status(tonic::Status::internal(other.to_string())),
        };
        (Spawn::new(layer.layer(service.map_err(unbox))), handle)
    }
}
