//! Structured logging. Every service logs JSON lines to stderr (one object per event, with
//! the service name), filtered by `RUST_LOG` (default `info`). `RECSYS_LOG_FORMAT=text`
//! switches to human-readable lines for local debugging.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

/// Installs the global subscriber; a second call (as in tests that start several
/// services in one process) keeps the first.
pub fn init(service: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let text = std::env::var("RECSYS_LOG_FORMAT").is_ok_and(|format| format == "text");
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if text {
        registry.with(fmt::layer().with_writer(std::io::stderr)).try_init()
    } else {
        registry
            .with(fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(std::io::stderr))
            .try_init()
    };
    if installed.is_ok() {
        tracing::info!(service, "telemetry initialised");
    }
}
