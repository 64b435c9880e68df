//! The request path: feature → recall → rank → rerank, each call bounded by the stage's
//! budget and the caller's remaining deadline, each failure replaced by a fallback that
//! is recorded in `degraded_stages`:
//! feature down → an anonymous profile; recall down → the cached popular list;
//! rank down → fused recall order; rerank down → the ranked top-k.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::RwLock,
    time::Duration,
};

use recsys_proto::v1::{
    feature_service_client::FeatureServiceClient, rank_service_client::RankServiceClient,
    recall_service_client::RecallServiceClient, rerank_service_client::RerankServiceClient, AppendEventsRequest,
    Candidate, Event, GetUserFeaturesRequest, ItemTrace, RankRequest, RecallRequest, RecommendResponse,
    RecommendedItem, RerankCandidate, RerankRequest, UserFeatures,
};
use tonic::{transport::Channel, Request, Response, Status};

use crate::{deadline::Deadline, Config, DownstreamConfig, OrchestratorError, RecommendQuery, Result};

/// History handed to recall (for exclusion and item-to-item seeds) and rank.
const MAX_HISTORY: u32 = 1_000;

#[derive(Clone)]
pub struct Downstream {
    feature: FeatureServiceClient<Channel>,
    recall: RecallServiceClient<Channel>,
    rank: RankServiceClient<Channel>,
    rerank: RerankServiceClient<Channel>,
}

impl Downstream {
    pub fn connect(config: &DownstreamConfig) -> Result<Self> {
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        let channel = |address: &str| {
            recsys_runtime::client::lazy_channel(address, timeout)
                .map_err(|error| OrchestratorError::Config(format!("{address}: {error}")))
        };
        Ok(Self {
            feature: FeatureServiceClient::new(channel(&config.feature)?),
            recall: RecallServiceClient::new(channel(&config.recall)?),
            rank: RankServiceClient::new(channel(&config.rank)?),
            rerank: RerankServiceClient::new(channel(&config.rerank)?),
        })
    }
}

pub struct Pipeline {
    downstream: Downstream,
    config: Config,
    /// Popular items from the last successful anonymous recall: the answer of last resort.
    popular_fallback: RwLock<Vec<Candidate>>,
}

/// Per-item scores collected along the way, for debug traces.
#[derive(Default)]
struct Scores {
    recall: HashMap<String, (f32, Vec<String>)>,
    ranked: HashMap<String, (f32, f32)>,
}

impl Pipeline {
    pub fn new(downstream: Downstream, config: Config) -> Self {
        Self { downstream, config, popular_fallback: RwLock::new(Vec::new()) }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub async fn recommend(
        &self,
        query: RecommendQuery,
        deadline: Deadline,
        request_id: String,
    ) -> Result<RecommendResponse> {
        let budgets = &self.config.budgets;
        let mut degraded = Vec::new();
        let top_k = query.top_k as usize;

        let user = match self
            .call(
                "feature",
                deadline,
                budgets.feature_ms,
                GetUserFeaturesRequest { user_id: query.user_id.clone(), max_history: MAX_HISTORY },
                |r| {
                    let mut client = self.downstream.feature.clone();
                    async move { client.get_user_features(r).await }
                },
            )
            .await
        {
            Ok(user) => user,
            Err(error) => {
                tracing::warn!(%error, "feature stage degraded");
                degraded.push("feature".to_string());
                UserFeatures { user_id: query.user_id.clone(), ..UserFeatures::default() }
            }
        };

        let recall_request = RecallRequest {
            user: Some(user.clone()),
            candidate_count: self.config.candidate_count,
            exclude_item_ids: query.exclude_item_ids.clone(),
        };
        let mut model_version = String::new();
        let candidates = match self
            .call("recall", deadline, budgets.recall_ms, recall_request, |r| {
                let mut client = self.downstream.recall.clone();
                async move { client.recall(r).await }
            })
            .await
        {
            Ok(response) => {
                model_version = response.bundle_version;
                response.candidates
            }
            Err(error) => {
                tracing::warn!(%error, "recall stage degraded: serving the popular fallback");
                degraded.push("recall".to_string());
                self.popular_excluding(&user, &query.exclude_item_ids)
            }
        };
        if candidates.is_empty() && degraded.iter().any(|stage| stage == "recall") {
            return Err(OrchestratorError::Unavailable {
                service: "recall",
                reason: "no candidates and no cached fallback yet".into(),
            });
        }

        let mut scores = Scores::default();
        if query.debug {
            scores.recall = candidates.iter().map(|c| (c.item_id.clone(), (c.score, c.channels.clone()))).collect();
        }
        let window = top_k * self.config.rerank_window_factor.max(1) as usize;
        let rank_request = RankRequest {
            user: Some(user),
            item_ids: candidates.iter().map(|c| c.item_id.clone()).collect(),
            coarse_keep: self.config.coarse_keep,
            fine_keep: window as u32,
            context: query.context.clone(),
        };
        let ranked: Vec<(String, f32)> = match self
            .call("rank", deadline, budgets.rank_ms, rank_request, |r| {
                let mut client = self.downstream.rank.clone();
                async move { client.rank(r).await }
            })
            .await
        {
            Ok(response) => {
                model_version = response.model_version;
                if query.debug {
                    scores.ranked = response
                        .items
                        .iter()
                        .map(|item| (item.item_id.clone(), (item.coarse_score, item.fine_score)))
                        .collect();
                }
                response.items.into_iter().map(|item| (item.item_id, item.fine_score)).collect()
            }
            Err(error) => {
                tracing::warn!(%error, "rank stage degraded: keeping recall order");
                degraded.push("rank".to_string());
                candidates.into_iter().take(window).map(|c| (c.item_id, c.score)).collect()
            }
        };

        let rerank_request = RerankRequest {
            candidates: ranked
                .iter()
                .map(|(item_id, score)| RerankCandidate { item_id: item_id.clone(), score: *score })
                .collect(),
            top_k: query.top_k,
            exclude_item_ids: query.exclude_item_ids.clone(),
            relevance_weight: None,
        };
        let final_list: Vec<(String, f32, f32)> = match self
            .call("rerank", deadline, budgets.rerank_ms, rerank_request, |r| {
                let mut client = self.downstream.rerank.clone();
                async move { client.rerank(r).await }
            })
            .await
        {
            Ok(response) => {
                response.items.into_iter().map(|item| (item.item_id, item.score, item.rerank_score)).collect()
            }
            Err(error) => {
                tracing::warn!(%error, "rerank stage degraded: serving ranked top-k");
                degraded.push("rerank".to_string());
                let excluded: HashSet<&String> = query.exclude_item_ids.iter().collect();
                ranked
                    .into_iter()
                    .filter(|(item_id, _)| !excluded.contains(item_id))
                    .take(top_k)
                    .map(|(item_id, score)| (item_id, score, score))
                    .collect()
            }
        };

        let items = final_list
            .into_iter()
            .enumerate()
            .map(|(position, (item_id, score, rerank_score))| {
                let trace = query.debug.then(|| {
                    let (recall_score, recall_channels) = scores.recall.get(&item_id).cloned().unwrap_or_default();
                    let (coarse_score, fine_score) = scores.ranked.get(&item_id).copied().unwrap_or_default();
                    ItemTrace { recall_channels, recall_score, coarse_score, fine_score, rerank_score }
                });
                RecommendedItem { item_id, score, rank: position as u32 + 1, trace }
            })
            .collect();
        Ok(RecommendResponse { items, request_id, model_version, degraded_stages: degraded })
    }

    /// Forwards feedback to feature-svc; acknowledged only once feature-svc has it durably.
    pub async fn log_events(&self, events: Vec<Event>, deadline: Deadline) -> Result<u32, Status> {
        let budget = deadline
            .stage_timeout(self.config.budgets.default_deadline())
            .ok_or_else(|| Status::deadline_exceeded("deadline exceeded before the events could be stored"))?;
        let mut request = Request::new(AppendEventsRequest { events });
        request.set_timeout(budget);
        let mut client = self.downstream.feature.clone();
        match tokio::time::timeout(budget, client.append_events(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner().accepted),
            // Validation errors are the caller's to fix: pass them through as they are.
            Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => Err(status),
            Ok(Err(status)) => Err(Status::unavailable(format!(
                "event intake unavailable, events were not stored: {}",
                status.message()
            ))),
            Err(_) => Err(Status::deadline_exceeded("events were not acknowledged in time; retry")),
        }
    }

    /// Refreshes the popular fallback from recall (an anonymous user gets the popular
    /// and cold-start channels).
    pub async fn refresh_fallback(&self) -> Result<usize> {
        let request = RecallRequest {
            user: Some(UserFeatures { user_id: "__fallback__".into(), ..UserFeatures::default() }),
            candidate_count: self.config.candidate_count,
            exclude_item_ids: Vec::new(),
        };
        let deadline = Deadline::after(Duration::from_secs(5));
        let response = self
            .call("recall", deadline, 5_000, request, |r| {
                let mut client = self.downstream.recall.clone();
                async move { client.recall(r).await }
            })
            .await?;
        let count = response.candidates.len();
        *self.popular_fallback.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = response.candidates;
        Ok(count)
    }

    fn popular_excluding(&self, user: &UserFeatures, exclude: &[String]) -> Vec<Candidate> {
        let excluded: HashSet<&String> = user.history_item_ids.iter().chain(exclude).collect();
        self.popular_fallback
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter(|c| !excluded.contains(&c.item_id))
            .cloned()
            .collect()
    }

    /// One downstream call within `min(budget, time left)`.
    async fn call<Req, Resp, F, Fut>(
        &self,
        stage: &'static str,
        deadline: Deadline,
        budget_ms: u64,
        message: Req,
        call: F,
    ) -> Result<Resp>
    where
        F: FnOnce(Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let timeout = deadline
            .stage_timeout(Duration::from_millis(budget_ms))
            .ok_or(OrchestratorError::DeadlineExceeded { stage })?;
        let mut request = Request::new(message);
        // Propagated as grpc-timeout, so the callee stops working when we stop waiting.
        request.set_timeout(timeout);
        match tokio::time::timeout(timeout, call(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(OrchestratorError::Unavailable {
                service: stage,
                reason: format!("{:?}: {}", status.code(), status.message()),
            }),
            Err(_) => Err(OrchestratorError::DeadlineExceeded { stage }),
        }
    }
}
