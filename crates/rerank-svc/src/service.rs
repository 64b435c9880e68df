//! gRPC surface of rerank-svc.

use std::{collections::HashSet, sync::Arc};

use recsys_bundle::Registry;
use recsys_proto::{
    limits::{MAX_CANDIDATES, MAX_ID_BYTES, MAX_TOP_K},
    v1::{
        rerank_service_server::{RerankService, RerankServiceServer},
        RerankRequest, RerankResponse, RerankedItem,
    },
};
use recsys_runtime::model_admin::version_for;
use tonic::{Request, Response, Status};

use crate::{diversify, Config, GenreIndex, RerankError};

#[derive(Clone)]
pub struct RerankGrpc {
    /// Item genres by bundle version.
    registry: Arc<Registry<GenreIndex>>,
    config: Arc<Config>,
}

impl RerankGrpc {
    pub fn new(registry: Arc<Registry<GenreIndex>>, config: Config) -> Self {
        Self { registry, config: Arc::new(config) }
    }

    pub fn into_server(self) -> RerankServiceServer<Self> {
        RerankServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl RerankService for RerankGrpc {
    async fn rerank(&self, request: Request<RerankRequest>) -> Result<Response<RerankResponse>, Status> {
        let RerankRequest { candidates, top_k, relevance_weight, bundle_version } = request.into_inner();
        if top_k == 0 || top_k > MAX_TOP_K {
            return Err(RerankError::InvalidArgument(format!("top_k must be between 1 and {MAX_TOP_K}")).into());
        }
        if candidates.len() > MAX_CANDIDATES {
            return Err(RerankError::InvalidArgument(format!(
                "{} candidates; at most {MAX_CANDIDATES} allowed",
                candidates.len()
            ))
            .into());
        }
        if bundle_version.len() > MAX_ID_BYTES {
            return Err(
                RerankError::InvalidArgument(format!("bundle_version is longer than {MAX_ID_BYTES} bytes")).into()
            );
        }
        // The genres of the bundle recall proposed from.
        let genres = version_for(&self.registry, &bundle_version).await.map_err(|error| {
            RerankError::PinnedBundleUnavailable {
                served: self.registry.current_version(),
                pinned: bundle_version,
                reason: error.to_string(),
            }
        })?;
        let relevance_weight = relevance_weight.unwrap_or(self.config.relevance_weight);
        if !(0.0..=1.0).contains(&relevance_weight) {
            return Err(
                RerankError::InvalidArgument(format!("relevance_weight {relevance_weight} is outside [0, 1]")).into()
            );
        }
        // The orchestrator chose the window; a duplicate id would only mean a bad caller.
        let mut seen = HashSet::new();
        let allowed: Vec<(String, f32)> =
            candidates.into_iter().filter(|c| seen.insert(c.item_id.clone())).map(|c| (c.item_id, c.score)).collect();
        let picked = tracing::info_span!("mmr", candidates = allowed.len())
            .in_scope(|| diversify(&allowed, top_k as usize, relevance_weight, &genres));
        Ok(Response::new(RerankResponse {
            items: picked
                .into_iter()
                .map(|p| RerankedItem { item_id: p.item_id, score: p.score, rerank_score: p.mmr_score })
                .collect(),
        }))
    }
}
