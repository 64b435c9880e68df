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

use recsys_runtime::{server::ServiceConfig, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

pub use batching::{BatchingConfig, MicroBatcher};
pub use drift::{psi, ScoreDrift};
pub use error::{RankError, Result};
pub use model::{onnx_environment, FineVariant, ModelInput, ModelOptions, OnnxModel, COARSE_INPUTS, FINE_INPUTS};
pub use ranking::{FineStage, RankedCandidate, Ranker};
pub use service::RankGrpc;

pub const SERVICE_NAME: &str = "recsys.v1.RankService";

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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: ServerConfig::with_addresses("127.0.0.1:50054", "127.0.0.1:9094"),
            bundle: PathBuf::from("models/bundles"),
            onnxruntime_library: None,
            coarse_keep: 50,
            models: ModelOptions::default(),
            batching: BatchingConfig::default(),
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }
}

pub async fn serve(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let bundle_dir = recsys_bundle::resolve_dir(&config.bundle)?;
    let environment = onnx_environment(config.onnxruntime_library.as_deref())?;
    let ranker = Arc::new(Ranker::load(&bundle_dir, &environment, &config.models)?);
    tracing::info!(bundle = %ranker.version(), fine_model = ?config.models.fine_variant, "ranker loaded");
    let batcher = config
        .batching
        .enabled
        .then(|| Arc::new(MicroBatcher::start(ranker.fine_model(), config.models.sessions, &config.batching)));
    let max_message_bytes = config.server.max_message_bytes;
    let options = config.server.serve_options();
    let service =
        RankGrpc::new(ranker, batcher, config.coarse_keep).into_server().max_decoding_message_size(max_message_bytes);
    recsys_runtime::serve(listener, &[SERVICE_NAME], tonic::service::Routes::new(service), options, shutdown).await?;
    Ok(())
}
