//! Resilience building blocks for calls between services. Server-side concurrency
//! limiting and load shedding use tower's own layers (see `server.rs`); what tower lacks
//! lives here, one file per middleware.

pub mod circuit_breaker;

pub use circuit_breaker::{BreakerConfig, BreakerState, CircuitBreaker, CircuitBreakerLayer, CircuitOpen};
