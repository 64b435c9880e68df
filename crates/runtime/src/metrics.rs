//! Prometheus metrics. Every process has one registry (prometheus' default); the RPC
//! layer, the resilience code and each service register their families here, and
//! `serve_metrics` exposes them in the text format on `GET /metrics`.

use std::{net::SocketAddr, sync::LazyLock};

use prometheus::{
    exponential_buckets, register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, Encoder,
    HistogramVec, IntCounterVec, IntGaugeVec, TextEncoder,
};
use tokio::net::TcpListener;

/// 0.25 ms .. ~8 s, doubling.
pub fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.000_25, 2.0, 16).expect("valid buckets")
}

/// Latency of every RPC a server answered, by service, method and gRPC status.
pub static RPC_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "recsys_rpc_duration_seconds",
        "Server-side latency of gRPC calls by service, method and status code",
        &["service", "method", "code"],
        latency_buckets()
    )
    .expect("metric registers once")
});

/// Requests refused by load shedding, by service.
pub static LOAD_SHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "recsys_load_shed_total",
        "Requests shed because the concurrency limit was reached",
        &["service"]
    )
    .expect("metric registers once")
});

/// Circuit breaker state per protected downstream: 0 closed, 1 half-open, 2 open.
pub static BREAKER_STATE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "recsys_circuit_breaker_state",
        "Circuit breaker state per downstream (0 closed, 1 half-open, 2 open)",
        &["downstream"]
    )
    .expect("metric registers once")
});

/// Times a breaker opened, per downstream.
pub static BREAKER_OPENED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "recsys_circuit_breaker_opened_total",
        "Times the circuit breaker opened",
        &["downstream"]
    )
    .expect("metric registers once")
});

/// Certificate reloads, by outcome (`loaded`, `rejected`).
pub static TLS_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("recsys_tls_reloads_total", "TLS certificate file changes, by outcome", &["outcome"])
        .expect("metric registers once")
});

/// Admin calls, by service, admin service and outcome (`allowed`, `unauthenticated`, `denied`).
pub static ADMIN_CALLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "recsys_admin_calls_total",
        "Calls to admin ports by service, admin service and authorisation outcome",
        &["service", "admin_service", "outcome"]
    )
    .expect("metric registers once")
});

/// Connections closed before serving, by service and reason (`limit`, `handshake`).
pub static CONNECTIONS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "recsys_connections_refused_total",
        "Connections closed before any call: over the connection limit, or no TLS handshake or first bytes in time",
        &["service", "reason"]
    )
    .expect("metric registers once")
});

/// Renders every registered metric in the Prometheus text format.
pub fn render() -> String {
    let mut buffer = Vec::new();
    TextEncoder::new().encode(&prometheus::gather(), &mut buffer).expect("text encoding cannot fail");
    String::from_utf8(buffer).expect("the text format is UTF-8")
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve_metrics(listener: TcpListener) -> std::io::Result<()> {
    let app = axum::Router::new().route("/metrics", axum::routing::get(|| async { render() }));
    axum::serve(listener, app).await
}

/// Binds the metrics endpoint when `address` is set (empty disables it).
pub async fn spawn_metrics_endpoint(address: &str) -> std::io::Result<Option<SocketAddr>> {
    if address.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = serve_metrics(listener).await {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    tracing::info!(address = %bound, "metrics endpoint listening");
    Ok(Some(bound))
}
