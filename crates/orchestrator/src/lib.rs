//! The orchestrator serves the public `recsys.v1.Recommender` API. It turns each request
//! into a typed query once at the edge (`domain`), then runs feature → recall → rank →
//! rerank (`pipeline`), giving each downstream call only the time that is left of the
//! caller's deadline, and falls back stage by stage (reported in `degraded_stages`) rather
//! than failing the request.

#![forbid(unsafe_code)]

mod admin;
mod deadline;
pub mod domain;
mod error;
pub mod experiments;
mod fallback;
mod metrics;
mod pipeline;
mod prediction_cache;
mod service;
pub mod tracks;

use std::{collections::BTreeMap, future::Future, path::PathBuf, sync::Arc, time::Duration};

use recsys_runtime::{admin_auth::AdminAuthLayer, server::ServiceConfig, Listeners, Served, ServerConfig, Tls};
use serde::{Deserialize, Serialize};
use tonic::service::Routes;

pub use admin::AdminGrpc;
pub use domain::{RecommendQuery, Stage, Track};
pub use error::{OrchestratorError, Result};
pub use experiments::{ExperimentConfig, Overrides};
pub use pipeline::Pipeline;
pub use prediction_cache::CacheConfig;
pub use recsys_proto::limits::MAX_HISTORY;
pub use recsys_runtime::resilience::ResilienceConfig;
pub use service::RecommenderGrpc;
pub use tracks::CanaryConfig;

pub const SERVICE_NAME: &str = "recsys.v1.Recommender";
pub const ADMIN_SERVICE_NAME: &str = "recsys.v1.Admin";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub downstream: DownstreamConfig,
    pub budgets: StageBudgets,
    /// Candidates asked of recall.
    pub candidate_count: u32,
    /// Candidates rank-svc keeps after coarse ranking. The fine model's batch is the
    /// largest per-request CPU cost of the cluster; 50 kept the offline quality of 200
    /// (`make eval` ablation) and the overload behaviour on 2 cores (`make chaos`).
    pub coarse_keep: u32,
    /// Ranked items handed to rerank, as a multiple of top_k.
    pub rerank_window_factor: u32,
    /// How often the popular fallback list is refreshed from recall.
    pub fallback_refresh_ms: u64,
    /// Bundle whose popularity list seeds the fallback at start-up (before recall answers).
    pub fallback_bundle: Option<PathBuf>,
    pub resilience: ResilienceConfig,
    pub experiments: ExperimentConfig,
    pub canary: CanaryConfig,
    /// Per-surface serving configuration, selected by `RecommendRequest.scene` (as
    /// PAI-REC configures per scene): e.g. `[scenes.detail] channel_weights = { item_cf =
    /// 2.0 }`. Experiment variants apply on top of a scene. A request naming a scene
    /// that is not here is rejected; an empty scene uses the defaults above.
    pub scenes: BTreeMap<String, Overrides>,
    /// Short-lived answers to a user's repeats and next pages (`prediction_cache.rs`).
    pub prediction_cache: CacheConfig,
    /// How often the run-time catalogue is polled from feature-svc: every answer (cached,
    /// fallback or fresh) is checked against it last, so a retired item is never served.
    pub catalog_poll_ms: u64,
}

impl Config {
    /// Everything a request could trip over later, checked when the configuration is
    /// loaded: experiments, scenes, and the tracks they name.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let canary_configured = !self.canary.rank.is_empty();
        self.experiments.validate(canary_configured)?;
        let defaults = Overrides {
            candidate_count: Some(self.candidate_count),
            coarse_keep: Some(self.coarse_keep),
            ..Overrides::default()
        };
        defaults.validate("defaults", canary_configured)?;
        for (scene, overrides) in &self.scenes {
            if scene.is_empty() || scene.len() > recsys_proto::limits::MAX_SCENE_BYTES {
                return Err(format!(
                    "scene names must be 1 to {} bytes: {scene:?}",
                    recsys_proto::limits::MAX_SCENE_BYTES
                ));
            }
            overrides.validate(&format!("scene {scene:?}"), canary_configured)?;
        }
        Ok(())
    }
}

/// Addresses (`host:port`) of the four leaf services.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownstreamConfig {
    pub feature: String,
    pub recall: String,
    pub rank: String,
    pub rerank: String,
    pub connect_timeout_ms: u64,
}

/// Per-stage time budgets (ms). A stage gets the smaller of its budget and what is left
/// of the request's deadline. Defaults follow the article's budget (recall 20–30 ms,
/// coarse + fine ranking 40–70 ms, rerank 10–20 ms); a stage that overruns is replaced by
/// its fallback rather than delaying the answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StageBudgets {
    /// Used when the caller sends no `grpc-timeout`.
    pub default_deadline_ms: u64,
    pub feature_ms: u64,
    pub recall_ms: u64,
    pub rank_ms: u64,
    pub rerank_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig {
                max_concurrent_requests: 64,
                ..ServerConfig::with_addresses("127.0.0.1:50051", "127.0.0.1:50061", "127.0.0.1:9091")
            },
            downstream: DownstreamConfig::default(),
            budgets: StageBudgets::default(),
            candidate_count: 500,
            coarse_keep: 50,
            rerank_window_factor: 5,
            fallback_refresh_ms: 30_000,
            fallback_bundle: Some(PathBuf::from("models/bundles")),
            resilience: ResilienceConfig::default(),
            experiments: ExperimentConfig::default(),
            canary: CanaryConfig::default(),
            scenes: BTreeMap::new(),
            prediction_cache: CacheConfig::default(),
            catalog_poll_ms: 250,
        }
    }
}

impl Default for DownstreamConfig {
    fn default() -> Self {
        Self {
            feature: "127.0.0.1:50052".into(),
            recall: "127.0.0.1:50053".into(),
            rank: "127.0.0.1:50054".into(),
            rerank: "127.0.0.1:50055".into(),
            connect_timeout_ms: 200,
        }
    }
}

impl Default for StageBudgets {
    fn default() -> Self {
        Self { default_deadline_ms: 250, feature_ms: 20, recall_ms: 30, rank_ms: 60, rerank_ms: 20 }
    }
}

impl StageBudgets {
    pub fn default_deadline(&self) -> Duration {
        Duration::from_millis(self.default_deadline_ms)
    }

    pub fn feature(&self) -> Duration {
        Duration::from_millis(self.feature_ms)
    }

    pub fn recall(&self) -> Duration {
        Duration::from_millis(self.recall_ms)
    }

    pub fn rank(&self) -> Duration {
        Duration::from_millis(self.rank_ms)
    }

    pub fn rerank(&self) -> Duration {
        Duration::from_millis(self.rerank_ms)
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }
}

pub async fn serve(listeners: Listeners, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tls = Tls::load(&config.server.tls)?;
    let pipeline = Arc::new(Pipeline::new(config.clone(), &tls)?);
    let refresher = tokio::spawn(fallback::keep_refreshed(
        Arc::clone(&pipeline),
        Duration::from_millis(config.fallback_refresh_ms),
    ));
    let recommender = RecommenderGrpc::new(Arc::clone(&pipeline))
        .into_server()
        .max_decoding_message_size(config.server.max_message_bytes);
    let guard = AdminAuthLayer::new("orchestrator", &config.server.admin);
    let admin = Served::new(
        &[ADMIN_SERVICE_NAME],
        Routes::new(guard.guard(AdminGrpc::new(Arc::clone(&pipeline)).into_server())),
    );
    let api = Served::new(&[SERVICE_NAME], Routes::new(recommender));
    let result = recsys_runtime::serve(listeners, api, admin, config.server.serve_options(&tls), shutdown).await;
    refresher.abort();
    result?;
    Ok(())
}
