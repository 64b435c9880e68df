//! feature-svc: the online feature store. It answers "what do we know about this user"
//! (profile, recent behaviour, windowed counts) for the orchestrator and "what do we know
//! about these items" for ranking, and takes feedback events, acknowledging them only once
//! they are durable in its store.

#![forbid(unsafe_code)]

mod catalog;
mod counters;
mod error;
mod event;
pub mod local_redis;
mod seed;
mod service;
mod state;
mod store;

use std::{future::Future, path::PathBuf, sync::Arc};

use recsys_runtime::{admin_auth::AdminAuthLayer, server::ServiceConfig, Listeners, Served, ServerConfig, Tls};
use serde::{Deserialize, Serialize};
use tonic::service::Routes;

pub use catalog::{CatalogGrpc, CATALOG_ADMIN_SERVICE_NAME, CATALOG_SERVICE_NAME};
pub use counters::Counters;
pub use error::{FeatureError, Result};
pub use event::StoredEvent;
pub use service::FeatureGrpc;
pub use store::redis::{item_keys as redis_item_keys, user_keys as redis_user_keys};
pub use store::{
    redis::RedisConfig, Appended, BundleItem, EmbeddedStore, EventPage, FeatureStore, ItemRead, RedisStore,
};

pub const SERVICE_NAME: &str = "recsys.v1.FeatureService";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    /// Data directory (`interactions.csv`, `users.csv`, `items.csv`) loaded into an empty
    /// store at start-up; optional.
    pub seed_dir: Option<PathBuf>,
    /// Interactions kept per user, most recent first.
    pub max_history: usize,
    pub store: StoreConfig,
    /// Bundle root (or one bundle) whose items' precomputed statistics the store serves;
    /// a new version there is bulk-loaded. None: no bundle statistics.
    pub bundle: Option<PathBuf>,
    /// How often the bundle root is checked for a new current version; 0: at start only.
    pub follow_bundle_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: Backend,
    /// The embedded store's file.
    pub path: PathBuf,
    pub redis: RedisConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// One redb file on local disk: nothing to install, durable, one process per shard.
    Embedded,
    /// A Redis server shared by every replica.
    Redis,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::with_addresses("127.0.0.1:50052", "127.0.0.1:50062", "127.0.0.1:9092"),
            seed_dir: Some(PathBuf::from("data/ml-100k")),
            max_history: 1000,
            store: StoreConfig::default(),
            bundle: Some(PathBuf::from("models/bundles")),
            follow_bundle_ms: 10_000,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            path: PathBuf::from("data/state/features.redb"),
            redis: RedisConfig::default(),
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }
}

/// Opens the configured store (loading the seed into it the first time).
pub async fn open_store(config: &Config) -> Result<Arc<dyn FeatureStore>> {
    let seed = config.seed_dir.as_deref();
    Ok(match config.store.backend {
        Backend::Embedded => {
            let (path, max_history) = (config.store.path.clone(), config.max_history);
            let seed = seed.map(PathBuf::from);
            let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path, seed.as_deref(), max_history))
                .await
                .map_err(|error| FeatureError::Store { store: "embedded".into(), reason: error.to_string() })??;
            Arc::new(store)
        }
        Backend::Redis => Arc::new(RedisStore::open(config.store.redis.clone(), seed, config.max_history).await?),
    })
}

/// Bulk-loads the items' statistics of the bundle `root` names, unless the store holds
/// that version already. Returns the version the store holds afterwards.
pub async fn sync_bundle(store: &dyn FeatureStore, root: &std::path::Path) -> anyhow::Result<String> {
    let root = root.to_path_buf();
    let (dir, manifest) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let dir = recsys_bundle::resolve_dir(&root)?;
        let manifest = recsys_bundle::read_manifest(&dir)?;
        Ok((dir, manifest))
    })
    .await??;
    if store.bundle_version().await?.as_deref() == Some(manifest.version.as_str()) {
        return Ok(manifest.version);
    }
    let started = std::time::Instant::now();
    let items = tokio::task::spawn_blocking(move || recsys_bundle::read_catalog(&dir)).await??;
    // Every statistic any item has, in name order; an item without one has NaN there.
    let names: Vec<String> = items
        .iter()
        .flat_map(|item| item.stats.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let items: Vec<BundleItem> = items
        .into_iter()
        .map(|item| BundleItem {
            stats: names.iter().map(|name| item.stats.get(name).map_or(f32::NAN, |&value| value as f32)).collect(),
            item_id: item.id,
        })
        .collect();
    let count = items.len();
    store.load_bundle(&manifest.version, names, items).await?;
    tracing::info!(version = %manifest.version, items = count, seconds = started.elapsed().as_secs_f64(), "bundle item statistics loaded");
    Ok(manifest.version)
}

/// Keeps the store on the bundle root's current version (a failed check is retried).
async fn follow_bundle(store: Arc<dyn FeatureStore>, root: PathBuf, every_ms: u64) {
    loop {
        if let Err(error) = sync_bundle(&*store, &root).await {
            tracing::warn!(bundle = %root.display(), %error, "bundle item statistics not loaded");
        }
        if every_ms == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(every_ms)).await;
    }
}

/// Opens the store and serves until `shutdown` resolves.
pub async fn serve(listeners: Listeners, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tls = Tls::load(&config.server.tls)?;
    let store = open_store(&config).await?;
    let follower = config
        .bundle
        .clone()
        .map(|root| tokio::spawn(follow_bundle(Arc::clone(&store), root, config.follow_bundle_ms)));
    let catalog = CatalogGrpc::new(Arc::clone(&store));
    let guard = AdminAuthLayer::new("feature-svc", &config.server.admin);
    let admin = Served::new(
        &[CATALOG_ADMIN_SERVICE_NAME],
        Routes::new(
            guard.guard(catalog.clone().into_admin_server().max_decoding_message_size(config.server.max_message_bytes)),
        ),
    );
    let service = FeatureGrpc::new(store, config.max_history)
        .into_server()
        .max_decoding_message_size(config.server.max_message_bytes)
        .max_encoding_message_size(config.server.max_message_bytes);
    let api =
        Served::new(&[SERVICE_NAME, CATALOG_SERVICE_NAME], Routes::new(service).add_service(catalog.into_server()));
    let served = recsys_runtime::serve(listeners, api, admin, config.server.serve_options(&tls), shutdown).await;
    if let Some(follower) = follower {
        follower.abort();
    }
    served?;
    Ok(())
}
