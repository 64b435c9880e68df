//! feature-svc: the online feature store. It answers "what do we know about this user"
//! (profile, recent behaviour, counters) for the orchestrator, and takes feedback events,
//! acknowledging them only once they are durable in its event log.

#![forbid(unsafe_code)]

mod error;
mod service;
mod store;

use std::{future::Future, path::PathBuf};

use recsys_runtime::{server::ServiceConfig, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

pub use error::{FeatureError, Result};
pub use service::FeatureGrpc;
pub use store::{Appended, FeatureStore, StoredEvent, DEDUP_WINDOW};

pub const SERVICE_NAME: &str = "recsys.v1.FeatureService";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    /// Data directory (`interactions.csv`, `users.csv`) loaded at start-up; optional.
    pub seed_dir: Option<PathBuf>,
    /// Append-only log of every acknowledged event, replayed at start-up.
    pub event_log: PathBuf,
    /// Interactions kept per user, most recent first.
    pub max_history: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::with_addresses("127.0.0.1:50052", "127.0.0.1:9092"),
            seed_dir: Some(PathBuf::from("data/ml-100k")),
            event_log: PathBuf::from("data/state/feature-events.jsonl"),
            max_history: 1000,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }
}

/// Opens the store and serves until `shutdown` resolves.
pub async fn serve(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let store = FeatureStore::open(config.seed_dir.as_deref(), &config.event_log, config.max_history)?;
    let service = FeatureGrpc::new(std::sync::Arc::new(store))
        .into_server()
        .max_decoding_message_size(config.server.max_message_bytes);
    let routes = tonic::service::Routes::new(service);
    recsys_runtime::serve(listener, &[SERVICE_NAME], routes, config.server.serve_options(), shutdown).await?;
    Ok(())
}
