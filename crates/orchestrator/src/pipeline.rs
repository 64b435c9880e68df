//! The request path: feature → recall → rank → rerank. Each call gets the smaller of its
//! stage budget and what is left of the caller's deadline, and each failure is replaced
//! by a fallback recorded in `degraded_stages`:
//! feature down → an anonymous profile; recall down → the cached popular list;
//! rank down → fused recall order; rerank down → the ranked top-k. The popular list is
//! seeded from the bundle at start-up and refreshed from recall, so the last resort
//! never depends on a service being up.

use std::{
    collections::{HashMap, HashSet},
    sync::RwLock,
    time::Duration,
};

use recsys_proto::v1::{
    AppendEventsRequest, Candidate, Event, GetUserFeaturesRequest, ItemTrace, RankRequest, RecallRequest,
    RecommendResponse, RecommendedItem, RerankCandidate, RerankRequest, UserFeatures,
};
use tokio::time::Instant;
use tonic::{Request, Status};
use tracing::Instrument;

use crate::{
    deadline::Deadline,
    downstream::Downstream,
    metrics::{EXPERIMENT_ASSIGNMENTS, SERVED_SCORE, STAGE_CANDIDATES, STAGE_DEGRADED, STAGE_DURATION, TRACK_REQUESTS},
    tracks::{RankRouting, RankTrack, CANARY, STABLE},
    Config, OrchestratorError, RecommendQuery, Result,
};

/// History handed to recall (for exclusion and item-to-item seeds) and rank.
pub const MAX_HISTORY: u32 = 1_000;

pub struct Pipeline {
    downstream: Downstream,
    rank: RankRouting,
    config: Config,
    /// Popular items: the answer of last resort.
    popular_fallback: RwLock<Vec<Candidate>>,
}

/// Per-item scores collected along the way, for debug traces.
#[derive(Default)]
struct Scores {
    recall: HashMap<String, (f32, Vec<String>)>,
    ranked: HashMap<String, (f32, f32)>,
}

impl Pipeline {
    pub fn new(config: Config) -> Result<Self> {
        config.experiments.validate().map_err(OrchestratorError::Config)?;
        let downstream = Downstream::connect(&config.downstream, &config.resilience)?;
        let connect_timeout = Duration::from_millis(config.downstream.connect_timeout_ms);
        let stable = RankTrack::connect(STABLE, &config.downstream.rank, connect_timeout, &config.resilience)?;
        let canary = (!config.canary.rank.is_empty())
            .then(|| RankTrack::connect(CANARY, &config.canary.rank, connect_timeout, &config.resilience))
            .transpose()?;
        let rank = RankRouting::new(stable, canary, config.canary.share_percent, config.canary.salt.clone());
        let popular = seed_popular(&config);
        Ok(Self { downstream, rank, config, popular_fallback: RwLock::new(popular) })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn rank_routing(&self) -> &RankRouting {
        &self.rank
    }

    pub async fn recommend(&self, query: RecommendQuery, deadline: Deadline, request_id: String) -> RecommendResponse {
        let started = Instant::now();
        let budgets = &self.config.budgets;
        let (experiments, overrides) = self.config.experiments.assign(&query.user_id);
        let mut degraded = Vec::new();
        let top_k = query.top_k as usize;

        let feature_request = GetUserFeaturesRequest { user_id: query.user_id.clone(), max_history: MAX_HISTORY };
        let user = match self
            .stage(
                "feature",
                self.downstream.feature.call(
                    "feature",
                    deadline,
                    budgets.feature(),
                    feature_request,
                    |mut client, request| async move { client.get_user_features(request).await },
                ),
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
            candidate_count: overrides.candidate_count.unwrap_or(self.config.candidate_count),
            exclude_item_ids: query.exclude_item_ids.clone(),
            channel_weights: overrides.channel_weights.clone(),
        };
        let mut model_version = String::new();
        let candidates = match self
            .stage(
                "recall",
                self.downstream.recall.call(
                    "recall",
                    deadline,
                    budgets.recall(),
                    recall_request,
                    |mut client, request| async move { client.recall(request).await },
                ),
            )
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

        STAGE_CANDIDATES.with_label_values(&["recall"]).observe(candidates.len() as f64);
        let mut scores = Scores::default();
        if query.debug {
            scores.recall = candidates.iter().map(|c| (c.item_id.clone(), (c.score, c.channels.clone()))).collect();
        }
        let window = top_k * self.config.rerank_window_factor.max(1) as usize;
        let track = self.rank.track_for(&query.user_id, overrides.rank_track.as_deref());
        let rank_request = RankRequest {
            user: Some(user),
            item_ids: candidates.iter().map(|c| c.item_id.clone()).collect(),
            coarse_keep: overrides.coarse_keep.unwrap_or(self.config.coarse_keep),
            fine_keep: window as u32,
            context: query.context.clone(),
        };
        let ranked = self.stage("rank", self.rank(&track, deadline, rank_request)).await;
        let rank_failed = ranked.is_err();
        let ranked: Vec<(String, f32)> = match ranked {
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
                tracing::warn!(%error, track = track.name, "rank stage degraded: keeping recall order");
                degraded.push("rank".to_string());
                candidates.into_iter().take(window).map(|c| (c.item_id, c.score)).collect()
            }
        };

        let ranked_count = ranked.len();
        let rerank_request = RerankRequest {
            candidates: ranked
                .iter()
                .map(|(item_id, score)| RerankCandidate { item_id: item_id.clone(), score: *score })
                .collect(),
            top_k: query.top_k,
            exclude_item_ids: query.exclude_item_ids.clone(),
            relevance_weight: overrides.relevance_weight,
        };
        let final_list: Vec<(String, f32, f32)> = match self
            .stage(
                "rerank",
                self.downstream.rerank.call(
                    "rerank",
                    deadline,
                    budgets.rerank(),
                    rerank_request,
                    |mut client, request| async move { client.rerank(request).await },
                ),
            )
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

        STAGE_CANDIDATES.with_label_values(&["rank"]).observe(ranked_count as f64);
        let items: Vec<RecommendedItem> = final_list
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
        track.stats.record(started.elapsed(), rank_failed, &model_version);
        TRACK_REQUESTS.with_label_values(&[track.name, if rank_failed { "false" } else { "true" }]).inc();
        for assignment in &experiments {
            EXPERIMENT_ASSIGNMENTS.with_label_values(&[assignment.layer.as_str(), assignment.variant.as_str()]).inc();
        }
        for item in &items {
            SERVED_SCORE.observe(f64::from(item.score));
        }
        STAGE_CANDIDATES.with_label_values(&["served"]).observe(items.len() as f64);
        RecommendResponse {
            items,
            request_id,
            model_version,
            degraded_stages: degraded,
            experiments,
            track: track.name.to_string(),
        }
    }

    /// Runs one stage under its span, timing it and counting its fallbacks.
    async fn stage<T>(&self, stage: &'static str, call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let started = Instant::now();
        let result = call.instrument(tracing::info_span!("stage", stage)).await;
        STAGE_DURATION.with_label_values(&[stage]).observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            STAGE_DEGRADED.with_label_values(&[stage]).inc();
        }
        result
    }

    async fn rank(
        &self,
        track: &RankTrack,
        deadline: Deadline,
        request: RankRequest,
    ) -> Result<recsys_proto::v1::RankResponse> {
        track
            .rank
            .call("rank", deadline, self.config.budgets.rank(), request, |mut client, request| async move {
                client.rank(request).await
            })
            .await
    }

    /// Forwards feedback to feature-svc; acknowledged only once feature-svc has it durably.
    /// Not retried here: an append is not idempotent, so the client decides.
    pub async fn log_events(&self, events: Vec<Event>, deadline: Deadline) -> Result<u32, Status> {
        let budget = deadline
            .stage_timeout(self.config.budgets.default_deadline())
            .ok_or_else(|| Status::deadline_exceeded("deadline exceeded before the events could be stored"))?;
        let mut request = Request::new(AppendEventsRequest { events });
        request.set_timeout(budget);
        let mut client = self.downstream.feature.client.clone();
        match tokio::time::timeout(budget, client.append_events(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner().accepted),
            // Validation errors are the caller's to fix: pass them through as they are.
            Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => Err(status),
            Ok(Err(status)) => Err(Status::unavailable(format!(
                "event intake unavailable, events were not stored: {}",
                status.message()
            ))),
            Err(_) => Err(Status::deadline_exceeded("events were not acknowledged in time; they may be retried")),
        }
    }

    /// Opens the connections to every leaf before traffic arrives, so the first requests
    /// do not spend their stage budgets on TCP and HTTP/2 handshakes.
    pub async fn warm_up(&self) {
        let deadline = Deadline::after(Duration::from_secs(2));
        let budget = Duration::from_secs(2);
        let user = UserFeatures { user_id: "__warm_up__".into(), ..UserFeatures::default() };
        let feature = self.downstream.feature.call(
            "feature",
            deadline,
            budget,
            GetUserFeaturesRequest { user_id: "__warm_up__".into(), max_history: 1 },
            |mut client, request| async move { client.get_user_features(request).await },
        );
        let track = self.rank_routing().track_for("__warm_up__", None);
        let rank = track.rank.call(
            "rank",
            deadline,
            budget,
            RankRequest { user: Some(user), ..RankRequest::default() },
            |mut client, request| async move { client.rank(request).await },
        );
        let rerank = self.downstream.rerank.call(
            "rerank",
            deadline,
            budget,
            RerankRequest { top_k: 1, ..RerankRequest::default() },
            |mut client, request| async move { client.rerank(request).await },
        );
        let (feature, rank, rerank) = tokio::join!(feature, rank, rerank);
        tracing::debug!(
            feature = feature.is_ok(),
            rank = rank.is_ok(),
            rerank = rerank.is_ok(),
            "connections warmed up"
        );
    }

    /// Refreshes the popular fallback from recall (an anonymous user gets the popular
    /// and cold-start channels).
    pub async fn refresh_fallback(&self) -> Result<usize> {
        let request = RecallRequest {
            user: Some(UserFeatures { user_id: "__fallback__".into(), ..UserFeatures::default() }),
            candidate_count: self.config.candidate_count,
            exclude_item_ids: Vec::new(),
            channel_weights: HashMap::new(),
        };
        let response = self
            .downstream
            .recall
            .call(
                "recall",
                Deadline::after(Duration::from_secs(5)),
                Duration::from_secs(5),
                request,
                |mut client, request| async move { client.recall(request).await },
            )
            .await?;
        let count = response.candidates.len();
        if count > 0 {
            *self.popular_fallback.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = response.candidates;
        }
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
}

/// The bundle's popularity list, so the fallback exists before recall ever answers.
fn seed_popular(config: &Config) -> Vec<Candidate> {
    let Some(root) = &config.fallback_bundle else {
        return Vec::new();
    };
    match recsys_bundle::resolve_dir(root).and_then(|dir| recsys_bundle::read_popularity(&dir)) {
        Ok(popular) => popular
            .into_iter()
            .take(config.candidate_count as usize)
            .map(|(item_id, score)| Candidate { item_id, score, channels: vec!["fallback".into()] })
            .collect(),
        Err(error) => {
            tracing::warn!(%error, "no popular fallback from the bundle; waiting for recall");
            Vec::new()
        }
    }
}
