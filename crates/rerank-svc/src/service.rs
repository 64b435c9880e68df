//! gRPC surface of rerank-svc.

use std::{collections::HashSet, sync::Arc};

use recsys_proto::v1::{
    rerank_service_server::{RerankService, RerankServiceServer},
    RerankRequest, RerankResponse, RerankedItem,
};
use tonic::{Request, Response, Status};

use crate::{diversify, Config, GenreIndex, RerankError};

const MAX_CANDIDATES: usize = 5_000;

#[derive(Clone)]
pub struct RerankGrpc {
    genres: Arc<GenreIndex>,
    config: Arc<Config>,
}

impl RerankGrpc {
    pub fn new(genres: Arc<GenreIndex>, config: Config) -> Self {
        Self { genres, config: Arc::new(config) }
    }

    pub fn into_server(self) -> RerankServiceServer<Self> {
        RerankServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl RerankService for RerankGrpc {
    async fn rerank(&self, request: Request<RerankRequest>) -> Result<Response<RerankResponse>, Status> {
        let RerankRequest { candidates, top_k, exclude_item_ids, relevance_weight } = request.into_inner();
        if top_k == 0 {
            return Err(RerankError::InvalidArgument("top_k must be at least 1".into()).into());
        }
        if candidates.len() > MAX_CANDIDATES {
            return Err(RerankError::InvalidArgument(format!(
                "{} candidates; at most {MAX_CANDIDATES} allowed",
                candidates.len()
            ))
            .into());
        }
        let relevance_weight = relevance_weight.unwrap_or(self.config.relevance_weight);
        if !(0.0..=1.0).contains(&relevance_weight) {
            return Err(
                RerankError::InvalidArgument(format!("relevance_weight {relevance_weight} is outside [0, 1]")).into()
            );
        }
        let excluded: HashSet<&str> = exclude_item_ids.iter().map(String::as_str).collect();
        let mut seen = HashSet::new();
        let window = (top_k as usize).saturating_mul(self.config.window_factor.max(1));
        let allowed: Vec<(String, f32)> = candidates
            .into_iter()
            .filter(|c| !excluded.contains(c.item_id.as_str()) && seen.insert(c.item_id.clone()))
            .take(window)
            .map(|c| (c.item_id, c.score))
            .collect();
        let picked = tracing::info_span!("mmr", candidates = allowed.len())
            .in_scope(|| diversify(&allowed, top_k as usize, relevance_weight, &self.genres));
        Ok(Response::new(RerankResponse {
            items: picked
                .into_iter()
                .map(|p| RerankedItem { item_id: p.item_id, score: p.score, rerank_score: p.mmr_score })
                .collect(),
        }))
    }
}
