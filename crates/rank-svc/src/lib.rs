//! rank-svc: orders recall's candidates for one user in two steps. Coarse ranking scores
//! every candidate with a shallow ONNX model over cheap user-item cross features (the
//! item-to-item model's score given the user's history, the embedding inner product) and
//! keeps the best few hundred; fine ranking runs the bundle's DIN or DeepFM model (through
//! `ort`) on those, with the user's profile, activity, behaviour sequence and the items'
//! attributes and statistics. Features are assembled here from the bundle, as the bundle's
//! feature configuration says, so requests carry only ids.

#![forbid(unsafe_code)]

mod batching;
mod drift;
mod error;
mod model;
mod ranking;
mod service;

use std::{future::Future, path::PathBuf, sync::Arc};

use recsys_bundle::{BundleError, QualityGate, Registry};
use recsys_runtime::model_admin::{ModelAdminGrpc, MODEL_ADMIN_SERVICE_NAME};

use recsys_runtime::{admin_auth::AdminAuthLayer, server::ServiceConfig, Listeners, Served, ServerConfig, Tls};
use serde::{Deserialize, Serialize};
use tonic::service::Routes;

pub use batching::{BatchingConfig, MicroBatcher};
pub use drift::{psi, ScoreDrift};
pub use error::{RankError, Result};
pub use model::{
    onnx_environment, FineVariant, ModelInput, ModelOptions, OnnxModel, WithoutBehaviour, COARSE_INPUTS, FINE_INPUTS,
};
pub use ranking::{Candidates, CoarseOutcome, FineStage, RankedCandidate, Ranker};
pub use service::{item_window_counts, RankGrpc};

pub const SERVICE_NAME: &str = "recsys.v1.RankService";
/// How this service names itself in logs and in `ModelAdmin` answers.
const SERVICE_BINARY: &str = "rank-svc";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    /// Bundle directory, or a root holding `current`.
    pub bundle: PathBuf,
    /// ONNX Runtime shared library; when unset, `ORT_DYLIB_PATH` is used.
    pub onnxruntime_library: Option<PathBuf>,
    /// Candidates kept after coarse ranking when the request does not say.
    pub coarse_keep: usize,
    /// Sessions, threads and the fine model variant.
    pub models: ModelOptions,
    /// Cross-request micro-batching of the fine model (off by default: see the README's
    /// "Ranking speed" for when it pays).
    pub batching: BatchingConfig,
    /// How often the bundle root's `current` link is checked for a new version (0: never;
    /// `recsysctl model load` still works).
    pub follow_current_ms: u64,
    /// The deployment check a new version passes before it serves.
    pub quality_gate: QualityGate,
    /// feature-svc's address, for the fine stage's windowed item counts when the bundle's
    /// fine model reads them (`live_item` features); empty: not read, those columns are 0.
    pub feature: String,
    /// How long the fine stage waits for those counts before ranking without them.
    pub item_counts_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::with_addresses("127.0.0.1:50054", "127.0.0.1:50064", "127.0.0.1:9094"),
            bundle: PathBuf::from("models/bundles"),
            onnxruntime_library: None,
            coarse_keep: 50,
            models: ModelOptions::default(),
            batching: BatchingConfig::default(),
            follow_current_ms: 2_000,
            quality_gate: QualityGate::default(),
            feature: "127.0.0.1:50052".into(),
            item_counts_timeout_ms: 10,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }
}

/// One loaded bundle version: its ranker, and its micro-batcher when batching is on (the
/// batcher runs that version's fine model, and stops when the version is retired).
pub struct RankerVersion {
    pub ranker: Arc<Ranker>,
    pub batcher: Option<Arc<MicroBatcher>>,
}

/// The bundle registry of rank-svc: each version is loaded by `Ranker::load` (feature
/// contract, both models, a finite-output warm-up batch on every session).
pub fn open_registry(config: &Config) -> anyhow::Result<Arc<Registry<RankerVersion>>> {
    let environment = onnx_environment(config.onnxruntime_library.as_deref())?;
    let (models, batching) = (config.models.clone(), config.batching.clone());
    // The gate also checks the fine model that serves, when it is not the teacher.
    let mut gate = config.quality_gate.clone();
    if let Some(metric) = models.fine_variant.auc_metric() {
        if !gate.metrics.iter().any(|name| name == metric) {
            gate.metrics.push(metric.to_string());
        }
    }
    let registry =
        Registry::open_shared(SERVICE_BINARY, &config.bundle, gate, config.follow_current_ms, move |dir, manifest| {
            let ranker = Ranker::load(dir, &environment, &models).map_err(|error| match error {
                RankError::Bundle(error) => error,
                other => BundleError::Rejected { version: manifest.version.clone(), reason: other.to_string() },
            })?;
            let ranker = Arc::new(ranker);
            let batcher = batching
                .enabled
                .then(|| Arc::new(MicroBatcher::start(ranker.fine_model(), models.sessions, &batching)));
            tracing::info!(bundle = %ranker.version(), fine_model = ?models.fine_variant, "ranker loaded");
            Ok(RankerVersion { ranker, batcher })
        })?;
    Ok(registry)
}

pub async fn serve(listeners: Listeners, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let tls = Tls::load(&config.server.tls)?;
    let registry = open_registry(&config)?;
    let max_message_bytes = config.server.max_message_bytes;
    let options = config.server.serve_options(&tls);
    let guard = AdminAuthLayer::new(SERVICE_BINARY, &config.server.admin);
    let item_features = recsys_runtime::item_features::feature_client(&config.feature, &tls);
    let item_counts_timeout = std::time::Duration::from_millis(config.item_counts_timeout_ms);
    let service = RankGrpc::new(Arc::clone(&registry), config.coarse_keep, item_features, item_counts_timeout)
        .into_server()
        .max_decoding_message_size(max_message_bytes);
    let admin = ModelAdminGrpc::new(SERVICE_BINARY, registry).into_server();
    let api = Served::new(&[SERVICE_NAME], Routes::new(service));
    let admin = Served::new(&[MODEL_ADMIN_SERVICE_NAME], Routes::new(guard.guard(admin)));
    recsys_runtime::serve(listeners, api, admin, options, shutdown).await?;
    Ok(())
}
