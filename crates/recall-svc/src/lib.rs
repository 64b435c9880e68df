//! recall-svc: turns one user into ~hundreds of candidates. Each channel (embedding,
//! item-to-item, real-time behaviour, popular, cold start, sequence) proposes a ranked list on its
//! own; `fusion` merges them by weighted reciprocal rank and removes what the user has
//! already seen or asked to exclude.

// Denied everywhere but the HNSW walk's cache prefetch (`hnsw::prefetch`).
#![deny(unsafe_code)]

mod channels;
mod concurrent;
mod error;
mod fusion;
pub mod hnsw;
pub mod nearest;
mod sequence;
mod service;
mod session;

use std::{future::Future, path::PathBuf, sync::Arc};

use recsys_bundle::{BundleError, QualityGate, Registry};
use recsys_runtime::model_admin::{ModelAdminGrpc, MODEL_ADMIN_SERVICE_NAME};

use recsys_runtime::{admin_auth::AdminAuthLayer, server::ServiceConfig, Listeners, Served, ServerConfig, Tls};
use serde::{Deserialize, Serialize};
use tonic::service::Routes;

pub use channels::{RecallIndex, UserSignals};
pub use concurrent::{propose_concurrently, ChannelJob};
pub use error::{RecallError, Result};
pub use fusion::{fuse_channels, ChannelList, FusedCandidate};
pub use recsys_proto::v1::Channel;
pub use service::RecallGrpc;
pub use session::SessionConfig;

pub const SERVICE_NAME: &str = "recsys.v1.RecallService";
/// How this service names itself in logs and in `ModelAdmin` answers.
const SERVICE_BINARY: &str = "recall-svc";

/// Item positions a request may not be proposed (its history and exclusions). Hashed by
/// one multiplication: the HNSW search asks about every node it visits.
pub type ExcludedItems = std::collections::HashSet<usize, recsys_bundle::PositionHasher>;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    /// Bundle directory, or a root holding `current`.
    pub bundle: PathBuf,
    /// Fused candidates returned when the request does not say.
    pub candidate_count: usize,
    /// Reciprocal-rank constant: larger flattens the advantage of top positions.
    pub rrf_k: f32,
    /// HNSW search's candidate list size (`ef`) when the bundle ships an index; a channel
    /// asking for more items than this searches with its quota instead.
    pub ann_expansion: usize,
    pub channels: ChannelSettings,
    /// The real-time channel's session: its window, decay and event weights.
    pub realtime: SessionConfig,
    /// How often the bundle root's `current` link is checked for a new version (0: never;
    /// `recsysctl model load` still works).
    pub follow_current_ms: u64,
    /// The deployment check a new version passes before it serves.
    pub quality_gate: QualityGate,
    /// The run-time catalogue followed from feature-svc: retired and out-of-stock items
    /// are left out of every channel.
    pub catalog: recsys_runtime::catalog::CatalogConfig,
    /// New items from the run-time catalogue that no bundle knows yet (published within
    /// `new_item_days`) which the cold-start channel proposes beside the bundle's
    /// candidates (0: none): the ones whose attributes map nearest the user through the
    /// bundle's content map (newest first without one). rank-svc cannot score them and
    /// passes them on last; rerank's rules (freshness, pins) decide where they show.
    pub new_items: usize,
    pub new_item_days: u32,
    /// ONNX Runtime shared library, for a bundle with a sequence encoder; when unset,
    /// `ORT_DYLIB_PATH` is used.
    pub onnxruntime_library: Option<PathBuf>,
}

/// Per channel: how many items it proposes (0 disables it) and its weight in fusion.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelSettings {
    pub embedding: ChannelQuota,
    pub item_cf: ChannelQuota,
    pub realtime: ChannelQuota,
    pub popular: ChannelQuota,
    pub cold_start: ChannelQuota,
    pub sequence: ChannelQuota,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelQuota {
    pub quota: usize,
    pub weight: f32,
    /// Time the channel may take; past it the answer goes out without this channel.
    #[serde(default = "default_channel_budget_ms")]
    pub budget_ms: u64,
}

/// Well inside the orchestrator's 30 ms recall budget, so fusion and the reply fit too.
fn default_channel_budget_ms() -> u64 {
    20
}

impl Default for ChannelSettings {
    fn default() -> Self {
        Self {
            embedding: ChannelQuota { quota: 400, weight: 1.0, budget_ms: default_channel_budget_ms() },
            item_cf: ChannelQuota { quota: 300, weight: 1.0, budget_ms: default_channel_budget_ms() },
            realtime: ChannelQuota { quota: 200, weight: 0.6, budget_ms: default_channel_budget_ms() },
            popular: ChannelQuota { quota: 150, weight: 0.5, budget_ms: default_channel_budget_ms() },
            cold_start: ChannelQuota { quota: 50, weight: 0.2, budget_ms: default_channel_budget_ms() },
            sequence: ChannelQuota { quota: 200, weight: 0.2, budget_ms: default_channel_budget_ms() },
        }
    }
}

impl ChannelSettings {
    pub fn quota(&self, channel: Channel) -> ChannelQuota {
        match channel {
            Channel::Embedding => self.embedding,
            Channel::ItemCf => self.item_cf,
            Channel::Realtime => self.realtime,
            Channel::Popular => self.popular,
            Channel::ColdStart => self.cold_start,
            Channel::Sequence => self.sequence,
            Channel::Unspecified => ChannelQuota { quota: 0, weight: 0.0, budget_ms: 0 },
        }
    }

    /// A channel's settings, to change (`Unspecified` has none).
    pub fn quota_mut(&mut self, channel: Channel) -> Option<&mut ChannelQuota> {
        match channel {
            Channel::Embedding => Some(&mut self.embedding),
            Channel::ItemCf => Some(&mut self.item_cf),
            Channel::Realtime => Some(&mut self.realtime),
            Channel::Popular => Some(&mut self.popular),
            Channel::ColdStart => Some(&mut self.cold_start),
            Channel::Sequence => Some(&mut self.sequence),
            Channel::Unspecified => None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::with_addresses("127.0.0.1:50053", "127.0.0.1:50063", "127.0.0.1:9093"),
            bundle: PathBuf::from("models/bundles"),
            candidate_count: 500,
            rrf_k: 60.0,
            ann_expansion: 128,
            channels: ChannelSettings::default(),
            realtime: SessionConfig::default(),
            follow_current_ms: 2_000,
            quality_gate: QualityGate::default(),
            catalog: recsys_runtime::catalog::CatalogConfig::default(),
            new_items: 10,
            new_item_days: 30,
            onnxruntime_library: None,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }
}

/// The bundle registry of recall-svc: each version is loaded by `RecallIndex::load`
/// (every tensor checked and mapped, links bounds-checked) and warmed up before it serves.
pub fn open_registry(config: &Config) -> anyhow::Result<Arc<Registry<RecallIndex>>> {
    let (ann_expansion, warm_up_quota) = (config.ann_expansion, config.channels.embedding.quota);
    let onnx_library = config.onnxruntime_library.clone();
    let registry = Registry::open_shared(
        SERVICE_BINARY,
        &config.bundle,
        config.quality_gate.clone(),
        config.follow_current_ms,
        move |dir, _| {
            let index =
                RecallIndex::load(dir, ann_expansion, onnx_library.as_deref()).map_err(|error| match error {
                    RecallError::Bundle(error) => error,
                    other => BundleError::Malformed { path: dir.to_path_buf(), reason: other.to_string() },
                })?;
            index.warm_up(warm_up_quota);
            tracing::info!(
                bundle = %index.version,
                items = index.embeddings.num_items(),
                approximate = index.is_approximate(),
                "recall index loaded"
            );
            Ok(index)
        },
    )?;
    Ok(registry)
}

pub async fn serve(listeners: Listeners, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    config.realtime.validate().map_err(anyhow::Error::msg)?;
    let tls = Tls::load(&config.server.tls)?;
    let registry = open_registry(&config)?;
    let max_message_bytes = config.server.max_message_bytes;
    let options = config.server.serve_options(&tls);
    let guard = AdminAuthLayer::new(SERVICE_BINARY, &config.server.admin);
    let admin = ModelAdminGrpc::new(SERVICE_BINARY, Arc::clone(&registry)).into_server();
    let catalog = recsys_runtime::catalog::Catalog::follow_synced(&config.catalog, &tls).await;
    let service = RecallGrpc::new(registry, catalog, config).into_server().max_decoding_message_size(max_message_bytes);
    let api = Served::new(&[SERVICE_NAME], Routes::new(service));
    let admin = Served::new(&[MODEL_ADMIN_SERVICE_NAME], Routes::new(guard.guard(admin)));
    recsys_runtime::serve(listeners, api, admin, options, shutdown).await?;
    Ok(())
}
