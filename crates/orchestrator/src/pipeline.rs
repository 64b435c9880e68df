//! The request path, in a straight line: feature → recall → rank → rerank → response.
//! Each stage is one function that returns its answer or its fallback (recorded in
//! `degraded_stages`): feature down → an anonymous profile; recall down → the cached
//! popular list; rank down → recall's order; rerank down → the ranked top-k. Each call
//! goes through its downstream's client stack (timeout → retry → breaker), built once.
//! Stage metrics are recorded in `run_stage`, request metrics and debug traces in
//! `respond`. What each hop carries, and why, is in the README ("The request path").

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, RwLock},
    time::Duration,
};

use recsys_proto::{
    limits::MAX_HISTORY,
    v1::{
        feature_service_client::FeatureServiceClient, AppendEventsRequest, AppendEventsResponse, CandidateColumns,
        Channel, ChannelColumn, ChannelWeight, Event, EventRejection, EventType, ExperimentAssignment,
        GetUserFeaturesRequest, Impression, ItemTrace, LogEventsResponse, RankRequest, RecallRequest, RecallResponse,
        RecommendResponse, RecommendedItem, RerankCandidate, RerankRequest, RerankResponse, RerankedItem, UserFeatures,
    },
};
use recsys_runtime::{
    catalog::{servable, Catalog, CatalogConfig},
    client::ResilientClient,
    resilience::CallError,
};
use tokio::time::Instant;
use tonic::{transport::Channel as GrpcChannel, Request, Status};
use tracing::Instrument;

use crate::{
    deadline::Deadline,
    domain::{RecommendQuery, Stage, Track},
    experiments::Overrides,
    metrics::{
        EXPERIMENT_ASSIGNMENTS, FEEDBACK_EVENTS, SERVED_SCORE, STAGE_CANDIDATES, STAGE_DEGRADED, STAGE_DURATION,
        TRACK_DURATION, TRACK_REQUESTS,
    },
    prediction_cache::PredictionCache,
    tracks::{RankRouting, RankTrack},
    Config, OrchestratorError, Result,
};

pub struct Pipeline {
    clients: Clients,
    rank: RankRouting,
    config: Config,
    /// Popular items: the answer of last resort.
    popular_fallback: RwLock<Arc<CandidateColumns>>,
    /// Lists computed in the last seconds, answering a user's repeats and next pages.
    cache: PredictionCache,
    /// Items changed at run time: the last check of every answer.
    catalog: Arc<Catalog>,
}

/// One client stack per leaf, built once.
struct Clients {
    feature: ResilientClient<GetUserFeaturesRequest, UserFeatures>,
    recall: ResilientClient<RecallRequest, RecallResponse>,
    rerank: ResilientClient<RerankRequest, RerankResponse>,
    /// Event intake, outside the stacks: an append is not idempotent, so it is never
    /// retried here (the client decides).
    events: FeatureServiceClient<GrpcChannel>,
}

/// The serving parameters of one request: the defaults, then its scene's, then its
/// experiment variants' (the later wins).
struct Plan {
    experiments: Vec<ExperimentAssignment>,
    candidate_count: u32,
    coarse_keep: u32,
    relevance_weight: Option<f32>,
    channel_weights: Vec<ChannelWeight>,
    track: Arc<RankTrack>,
    /// Ranked items handed to rerank.
    window: usize,
}

/// A stage's answer, or its fallback.
struct Outcome<T> {
    value: T,
    degraded: bool,
}

impl<T> Outcome<T> {
    fn served(value: T) -> Self {
        Self { value, degraded: false }
    }

    fn fallback(value: T) -> Self {
        Self { value, degraded: true }
    }
}

/// Recall's candidates and the bundle they come from (empty for the popular fallback).
struct Recalled {
    candidates: CandidateColumns,
    bundle_version: String,
}

/// What the stages produced for one request, on its way into the response.
struct Served {
    /// Each stage and whether it fell back.
    degraded: [(Stage, bool); 4],
    model_version: String,
    recalled_count: usize,
    ranked_count: usize,
    items: Vec<RerankedItem>,
    traces: Option<DebugTraces>,
}

/// Per-item stage scores, collected only for `debug` requests.
struct DebugTraces {
    /// Recall's fused score and the channels that proposed the item.
    recall: HashMap<String, (f32, Vec<String>)>,
    /// Coarse and fine score.
    ranked: HashMap<String, (f32, f32)>,
}

/// The ranked window handed to rerank.
struct Ranked {
    items: Vec<RerankCandidate>,
    model_version: Option<String>,
    /// Coarse and fine score by item, kept only for debug traces.
    stage_scores: HashMap<String, (f32, f32)>,
}

impl Pipeline {
    /// `tls` is the process's client side: every downstream channel uses it.
    pub fn new(config: Config, tls: &recsys_runtime::Tls) -> Result<Self> {
        config.validate().map_err(OrchestratorError::Config)?;
        let budgets = &config.budgets;
        let resilience = &config.resilience;
        let connect_timeout = Duration::from_millis(config.downstream.connect_timeout_ms);
        let channel = |address: &str| {
            recsys_runtime::client::lazy_channel(address, connect_timeout, tls)
                .map_err(|error| OrchestratorError::Config(format!("{address}: {error}")))
        };
        let feature_channel = channel(&config.downstream.feature)?;
        let clients = Clients {
            feature: ResilientClient::new(
                "feature",
                feature_channel.clone(),
                "/recsys.v1.FeatureService/GetUserFeatures",
                budgets.feature(),
                resilience,
            ),
            recall: ResilientClient::new(
                "recall",
                channel(&config.downstream.recall)?,
                "/recsys.v1.RecallService/Recall",
                budgets.recall(),
                resilience,
            ),
            rerank: ResilientClient::new(
                "rerank",
                channel(&config.downstream.rerank)?,
                "/recsys.v1.RerankService/Rerank",
                budgets.rerank(),
                resilience,
            ),
            events: FeatureServiceClient::new(feature_channel),
        };
        let track =
            |track, address: &str| RankTrack::connect(track, address, connect_timeout, budgets.rank(), resilience, tls);
        let stable = track(Track::Stable, &config.downstream.rank)?;
        let canary = (!config.canary.rank.is_empty()).then(|| track(Track::Canary, &config.canary.rank)).transpose()?;
        let rank = RankRouting::new(stable, canary, config.canary.share_percent, config.canary.salt.clone());
        let popular = Arc::new(seed_popular(&config));
        let cache = PredictionCache::new(config.prediction_cache.clone());
        // No start-up wait: recall and rerank filter first; this is the backstop.
        let catalog = Catalog::follow(
            &CatalogConfig {
                feature: config.downstream.feature.clone(),
                poll_ms: config.catalog_poll_ms,
                startup_wait_ms: 0,
            },
            tls,
        );
        Ok(Self { clients, rank, config, popular_fallback: RwLock::new(popular), cache, catalog })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn rank_routing(&self) -> &RankRouting {
        &self.rank
    }

    /// Serves one request that passed the edge. Fails only for an unknown scene; every
    /// downstream failure is replaced by its stage's fallback.
    pub async fn recommend(
        &self,
        query: RecommendQuery,
        deadline: Deadline,
        request_id: String,
    ) -> Result<RecommendResponse> {
        let asked = query.top_k;
        let query = RecommendQuery { top_k: self.cache.compute_top_k(&query), ..query };
        let plan = self.plan(&query)?;
        // The track is part of the cached answer: an operator's canary change applies at once.
        let route = plan.track.track.name();
        if let Some(cached) = self.cache.get(&query, asked, route) {
            let mut response = RecommendResponse { request_id: request_id.clone(), from_cache: true, ..cached };
            // A cached list that lost an item to the catalogue since is computed afresh
            // (it would come back short).
            if !self.drop_unservable(&mut response) {
                return Ok(response);
            }
        }
        let cache_key = self.cache.enabled().then(|| (query.clone(), self.cache.ticket(query.user_id.as_str())));
        let mut response = self.compute(query, plan, deadline, request_id).await;
        if let Some((query, ticket)) = cache_key {
            self.cache.put(&query, route, &response, ticket);
        }
        let _ = self.drop_unservable(&mut response);
        response.items.truncate(asked as usize);
        Ok(response)
    }

    /// Removes items the run-time catalogue retired or marked out of stock since the list
    /// was computed (a cached list, a fallback that skipped recall or rerank), keeping
    /// positions contiguous. Recall and rerank filter them too; this is the guarantee.
    /// Returns whether it removed any.
    fn drop_unservable(&self, response: &mut RecommendResponse) -> bool {
        let records = self.catalog.get_many(response.items.iter().map(|item| item.item_id.as_str()));
        if records.iter().flatten().all(|item| servable(item)) {
            return false;
        }
        let mut records = records.into_iter();
        response.items.retain(|_| records.next().flatten().is_none_or(|item| servable(&item)));
        for (position, item) in response.items.iter_mut().enumerate() {
            item.rank = position as u32 + 1;
        }
        true
    }

    /// One pass through the four services.
    async fn compute(
        &self,
        query: RecommendQuery,
        plan: Plan,
        deadline: Deadline,
        request_id: String,
    ) -> RecommendResponse {
        let started = Instant::now();
        let mut user = self.fetch_user(&query, deadline).await;
        // Only rerank's exposure control reads the impressions: recall and rank never carry them.
        let impressions = std::mem::take(&mut user.value.recent_impressions);
        let (recalled, user_features) = self.recall(&query, &plan, user.value, deadline).await;
        let recall_traces = query.debug.then(|| recall_traces(&recalled.value.candidates));
        let recalled_count = recalled.value.candidates.len();
        let bundle_version = recalled.value.bundle_version.clone();
        let ranked = self.rank(&query, &plan, user_features, recalled.value, deadline).await;
        let ranked_count = ranked.value.items.len();
        let reranked = self.rerank(&query, &plan, &bundle_version, ranked.value.items, impressions, deadline).await;
        let served = Served {
            degraded: [
                (Stage::Feature, user.degraded),
                (Stage::Recall, recalled.degraded),
                (Stage::Rank, ranked.degraded),
                (Stage::Rerank, reranked.degraded),
            ],
            model_version: ranked.value.model_version.unwrap_or(bundle_version),
            recalled_count,
            ranked_count,
            items: reranked.value,
            traces: recall_traces.map(|recall| DebugTraces { recall, ranked: ranked.value.stage_scores }),
        };
        self.respond(query, plan, request_id, started, served)
    }

    fn plan(&self, query: &RecommendQuery) -> Result<Plan> {
        let mut overrides = Overrides::default();
        if let Some(scene) = &query.scene {
            let configured = self.config.scenes.get(scene).ok_or_else(|| {
                let known: Vec<&str> = self.config.scenes.keys().map(String::as_str).collect();
                OrchestratorError::InvalidArgument(format!(
                    "scene {scene:?} is not configured (configured scenes: [{}])",
                    known.join(", ")
                ))
            })?;
            overrides.apply(configured);
        }
        let (experiments, variants) = self.config.experiments.assign(query.user_id.as_str());
        overrides.apply(&variants);
        Ok(Plan {
            experiments,
            candidate_count: overrides.candidate_count.unwrap_or(self.config.candidate_count),
            coarse_keep: overrides.coarse_keep.unwrap_or(self.config.coarse_keep),
            relevance_weight: overrides.relevance_weight,
            channel_weights: overrides
                .channel_weights
                .iter()
                .map(|(channel, &weight)| ChannelWeight { channel: channel.0 as i32, weight })
                .collect(),
            track: self.rank.track_for(query.user_id.as_str(), overrides.rank_track),
            window: query.top_k as usize * self.config.rerank_window_factor.max(1) as usize,
        })
    }

    async fn fetch_user(&self, query: &RecommendQuery, deadline: Deadline) -> Outcome<UserFeatures> {
        let request = GetUserFeaturesRequest {
            user_id: query.user_id.as_str().to_string(),
            max_history: MAX_HISTORY,
            // Counts as of the request's time when it replays the past, else now.
            as_of_ms: query.request_time.map_or(0, |time| time.0.saturating_mul(1000)),
        };
        let call = self.clients.feature.call(Arc::new(request), deadline.for_calls());
        match self.run_stage(Stage::Feature, call).await {
            Ok(user) => Outcome::served(user),
            Err(_) => Outcome::fallback(UserFeatures {
                user_id: query.user_id.as_str().to_string(),
                ..UserFeatures::default()
            }),
        }
    }

    /// Recall's candidates, and the user handed back: the request owned it on the way out,
    /// and rank needs it next (moved, not copied).
    async fn recall(
        &self,
        query: &RecommendQuery,
        plan: &Plan,
        user: UserFeatures,
        deadline: Deadline,
    ) -> (Outcome<Recalled>, UserFeatures) {
        let request = Arc::new(RecallRequest {
            user: Some(user),
            candidate_count: plan.candidate_count,
            exclude_item_ids: query.exclude_item_ids.iter().map(|id| id.as_str().to_string()).collect(),
            channel_weights: plan.channel_weights.clone(),
        });
        let call = self.clients.recall.call(Arc::clone(&request), deadline.for_calls());
        let result = self.run_stage(Stage::Recall, call).await;
        // The stack has dropped its references once the call is over.
        let user = Arc::unwrap_or_clone(request).user.unwrap_or_default();
        let outcome = match result {
            Ok(RecallResponse { candidates, bundle_version }) => {
                Outcome::served(Recalled { candidates: candidates.unwrap_or_default(), bundle_version })
            }
            Err(_) => Outcome::fallback(Recalled {
                candidates: self.popular_excluding(&user, query),
                bundle_version: String::new(),
            }),
        };
        (outcome, user)
    }

    async fn rank(
        &self,
        query: &RecommendQuery,
        plan: &Plan,
        user: UserFeatures,
        recalled: Recalled,
        deadline: Deadline,
    ) -> Outcome<Ranked> {
        let request = Arc::new(RankRequest {
            user: Some(user),
            candidates: Some(recalled.candidates),
            coarse_keep: plan.coarse_keep,
            fine_keep: plan.window as u32,
            request_time: query.request_time.map(|time| time.0),
            bundle_version: recalled.bundle_version,
        });
        let call = plan.track.rank.call(Arc::clone(&request), deadline.for_calls());
        match self.run_stage(Stage::Rank, call).await {
            Ok(response) => {
                let stage_scores = if query.debug {
                    response
                        .items
                        .iter()
                        .map(|item| (item.item_id.clone(), (item.coarse_score, item.fine_score)))
                        .collect()
                } else {
                    HashMap::new()
                };
                let items = response
                    .items
                    .into_iter()
                    .map(|item| RerankCandidate {
                        item_id: item.item_id,
                        score: item.fine_score,
                        counts: item.counts,
                        cold_start: item.cold_start,
                    })
                    .collect();
                Outcome::served(Ranked { items, model_version: Some(response.model_version), stage_scores })
            }
            Err(_) => {
                // The stack has dropped its references by now, so this takes the
                // candidates back without a copy.
                let mut candidates = Arc::unwrap_or_clone(request).candidates.unwrap_or_default();
                let item_ids = std::mem::take(&mut candidates.item_ids);
                let items = item_ids
                    .into_iter()
                    .take(plan.window)
                    .enumerate()
                    .map(|(index, item_id)| RerankCandidate {
                        item_id,
                        score: candidates.score(index),
                        counts: None,
                        cold_start: false,
                    })
                    .collect();
                Outcome::fallback(Ranked { items, model_version: None, stage_scores: HashMap::new() })
            }
        }
    }

    async fn rerank(
        &self,
        query: &RecommendQuery,
        plan: &Plan,
        bundle_version: &str,
        ranked: Vec<RerankCandidate>,
        recent_impressions: Vec<Impression>,
        deadline: Deadline,
    ) -> Outcome<Vec<RerankedItem>> {
        let request = Arc::new(RerankRequest {
            candidates: ranked,
            top_k: query.top_k,
            relevance_weight: plan.relevance_weight,
            bundle_version: bundle_version.to_string(),
            scene: query.scene.clone().unwrap_or_default(),
            experiments: plan.experiments.clone(),
            context: query.context.iter().map(|(key, value)| (key.clone(), value.clone())).collect(),
            request_time: query.request_time.map_or(0, |time| time.0),
            recent_impressions,
            debug: query.debug,
        });
        let call = self.clients.rerank.call(Arc::clone(&request), deadline.for_calls());
        match self.run_stage(Stage::Rerank, call).await {
            Ok(response) => Outcome::served(response.items),
            Err(_) => {
                let ranked = Arc::unwrap_or_clone(request).candidates;
                let top_k = ranked.into_iter().take(query.top_k as usize);
                Outcome::fallback(
                    top_k
                        .map(|item| RerankedItem {
                            item_id: item.item_id,
                            score: item.score,
                            rerank_score: item.score,
                            rules: Vec::new(),
                        })
                        .collect(),
                )
            }
        }
    }

    /// Builds the response and records the request's metrics.
    fn respond(
        &self,
        query: RecommendQuery,
        plan: Plan,
        request_id: String,
        started: Instant,
        served: Served,
    ) -> RecommendResponse {
        let Served { degraded, model_version, recalled_count, ranked_count, items, traces } = served;
        let items: Vec<RecommendedItem> = items
            .into_iter()
            .enumerate()
            .map(|(position, item)| {
                let trace = traces.as_ref().map(|traces| {
                    let (recall_score, recall_channels) = traces.recall.get(&item.item_id).cloned().unwrap_or_default();
                    let (coarse_score, fine_score) = traces.ranked.get(&item.item_id).copied().unwrap_or_default();
                    ItemTrace {
                        recall_channels,
                        recall_score,
                        coarse_score,
                        fine_score,
                        rerank_score: item.rerank_score,
                        rules: item.rules.clone(),
                    }
                });
                RecommendedItem { item_id: item.item_id, score: item.score, rank: position as u32 + 1, trace }
            })
            .collect();
        let rank_failed = degraded.iter().any(|&(stage, failed)| stage == Stage::Rank && failed);
        let track = &plan.track;
        track.stats.record(started.elapsed(), rank_failed, &model_version);
        TRACK_DURATION.with_label_values(&[track.track.name()]).observe(started.elapsed().as_secs_f64());
        TRACK_REQUESTS.with_label_values(&[track.track.name(), if rank_failed { "false" } else { "true" }]).inc();
        for assignment in &plan.experiments {
            EXPERIMENT_ASSIGNMENTS.with_label_values(&[assignment.layer.as_str(), assignment.variant.as_str()]).inc();
        }
        STAGE_CANDIDATES.with_label_values(&["recall"]).observe(recalled_count as f64);
        STAGE_CANDIDATES.with_label_values(&["rank"]).observe(ranked_count as f64);
        STAGE_CANDIDATES.with_label_values(&["served"]).observe(items.len() as f64);
        for item in &items {
            SERVED_SCORE.observe(f64::from(item.score));
        }
        let degraded_stages: Vec<String> =
            degraded.iter().filter(|(_, failed)| *failed).map(|(stage, _)| stage.name().to_string()).collect();
        if !degraded_stages.is_empty() {
            tracing::warn!(%request_id, user = query.user_id.as_str(), degraded = ?degraded_stages, "served degraded");
        }
        let mut experiments = plan.experiments;
        experiments
            .push(ExperimentAssignment { layer: Track::LAYER.to_string(), variant: track.track.name().to_string() });
        RecommendResponse {
            items,
            request_id,
            model_version,
            degraded_stages,
            experiments,
            track: track.track.name().to_string(),
            from_cache: false,
        }
    }

    /// Runs one stage's call under its span, timing it and counting its fallbacks.
    async fn run_stage<T>(&self, stage: Stage, call: impl Future<Output = Result<T, CallError>>) -> Result<T> {
        let started = Instant::now();
        let result = call.instrument(tracing::info_span!("stage", stage = stage.name())).await;
        STAGE_DURATION.with_label_values(&[stage.name()]).observe(started.elapsed().as_secs_f64());
        result.map_err(|source| {
            STAGE_DEGRADED.with_label_values(&[stage.name()]).inc();
            let error = OrchestratorError::Stage { stage, source };
            tracing::warn!(%error, "stage degraded: serving its fallback");
            error
        })
    }

    /// Forwards feedback to feature-svc; acknowledged only once feature-svc has it durably.
    /// Not retried here: an append is not idempotent, so the client decides.
    pub async fn log_events(&self, events: Vec<Event>, deadline: Deadline) -> Result<LogEventsResponse, Status> {
        // Before the events are stored and again once they are: a list computed from the
        // features before the events (cached or still being computed) never answers after
        // the acknowledgement (`PredictionCache::ticket`).
        let users: Vec<String> = events
            .iter()
            .map(|event| event.user_id.clone())
            .collect::<std::collections::HashSet<_>>()
            .into_iter()
            .collect();
        let invalidate = || users.iter().for_each(|user_id| self.cache.invalidate(user_id));
        invalidate();
        let budget = deadline
            .remaining()
            .ok_or_else(|| Status::deadline_exceeded("deadline exceeded before the events could be stored"))?;
        // What to count once the events are stored (the request takes them).
        let outcomes: Vec<(EventType, Vec<ExperimentAssignment>)> = events
            .iter()
            .map(|event| {
                (EventType::try_from(event.r#type).unwrap_or(EventType::Unspecified), event.experiments.clone())
            })
            .collect();
        let mut request = Request::new(AppendEventsRequest { events });
        request.set_timeout(budget);
        let mut client = self.clients.events.clone();
        let outcome = tokio::time::timeout(budget, client.append_events(request)).await;
        // Also when the outcome is unknown (a timeout): the events may still be stored.
        invalidate();
        match outcome {
            Ok(Ok(response)) => {
                let AppendEventsResponse { accepted, rejected, duplicates } = response.into_inner();
                // At most once: a batch with retried events is not counted (which of its
                // events are new is not known here), so retries never inflate the CTR.
                if duplicates == 0 {
                    self.count_feedback(&outcomes, &rejected);
                }
                Ok(LogEventsResponse { accepted, rejected, duplicates })
            }
            // Validation errors are the caller's to fix: pass them through as they are.
            Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => Err(status),
            Ok(Err(status)) => Err(Status::unavailable(format!(
                "event intake unavailable, events were not stored: {}",
                status.message()
            ))),
            Err(_) => Err(Status::deadline_exceeded("events were not acknowledged in time; they may be retried")),
        }
    }

    /// Counts stored events per configured experiment variant and per ranking track
    /// (`FEEDBACK_EVENTS`).
    fn count_feedback(&self, outcomes: &[(EventType, Vec<ExperimentAssignment>)], rejected: &[EventRejection]) {
        let rejected: std::collections::HashSet<u32> = rejected.iter().map(|r| r.index).collect();
        for (index, (event, assignments)) in outcomes.iter().enumerate() {
            if rejected.contains(&(index as u32)) {
                continue;
            }
            for assignment in assignments {
                let track = assignment.layer == Track::LAYER && Track::from_name(&assignment.variant).is_some();
                if track || self.config.experiments.is_configured(&assignment.layer, &assignment.variant) {
                    FEEDBACK_EVENTS.with_label_values(&[&assignment.layer, &assignment.variant, event.name()]).inc();
                }
            }
        }
    }

    /// Opens the connections to every leaf before traffic arrives, so the first requests
    /// do not spend their stage budgets on TCP and HTTP/2 handshakes.
    pub async fn warm_up(&self) {
        let until = Instant::now() + Duration::from_secs(2);
        let user = UserFeatures { user_id: "__warm_up__".into(), ..UserFeatures::default() };
        let feature = self.clients.feature.call(
            Arc::new(GetUserFeaturesRequest { user_id: "__warm_up__".into(), max_history: 1, as_of_ms: 0 }),
            until,
        );
        let track = self.rank.track_for("__warm_up__", None);
        let rank = track.rank.call(Arc::new(RankRequest { user: Some(user), ..RankRequest::default() }), until);
        let rerank = self.clients.rerank.call(Arc::new(RerankRequest { top_k: 1, ..RerankRequest::default() }), until);
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
            ..RecallRequest::default()
        };
        let until = Instant::now() + Duration::from_secs(5);
        let response = self
            .clients
            .recall
            .call(Arc::new(request), until)
            .await
            .map_err(|source| OrchestratorError::Stage { stage: Stage::Recall, source })?;
        let candidates = response.candidates.unwrap_or_default();
        let count = candidates.len();
        if count > 0 {
            *self.popular_fallback.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(candidates);
        }
        Ok(count)
    }

    /// The popular list less the user's history and the caller's exclusions: the one
    /// place besides recall that filters, because here recall could not.
    fn popular_excluding(&self, user: &UserFeatures, query: &RecommendQuery) -> CandidateColumns {
        let popular = Arc::clone(&self.popular_fallback.read().unwrap_or_else(|poisoned| poisoned.into_inner()));
        let excluded: std::collections::HashSet<&str> = user
            .history_item_ids
            .iter()
            .map(String::as_str)
            .chain(query.exclude_item_ids.iter().map(|id| id.as_str()))
            .collect();
        popular.select((0..popular.len()).filter(|&index| !excluded.contains(popular.item_ids[index].as_str())))
    }
}

/// Recall's score and channels by item, for debug traces.
fn recall_traces(candidates: &CandidateColumns) -> HashMap<String, (f32, Vec<String>)> {
    candidates
        .item_ids
        .iter()
        .enumerate()
        .map(|(index, item_id)| {
            let channels = candidates
                .channels
                .iter()
                .filter(|column| column.rank(index) > 0)
                .map(|column| column.channel().name().to_string())
                .collect();
            (item_id.clone(), (candidates.score(index), channels))
        })
        .collect()
}

/// The bundle's popularity list, so the fallback exists before recall ever answers.
fn seed_popular(config: &Config) -> CandidateColumns {
    let Some(root) = &config.fallback_bundle else {
        return CandidateColumns::default();
    };
    let count = config.candidate_count as usize;
    match recsys_bundle::resolve_dir(root).and_then(|dir| recsys_bundle::most_popular(&dir, count)) {
        Ok(popular) => {
            let (item_ids, scores): (Vec<String>, Vec<f32>) = popular.into_iter().unzip();
            let ranks = (1..=item_ids.len() as u32).collect();
            CandidateColumns {
                item_ids,
                channels: vec![ChannelColumn { channel: Channel::Popular as i32, scores: scores.clone(), ranks }],
                scores,
                // The fallback is read by id: it may outlive the bundle it came from.
                positions: Vec::new(),
            }
        }
        Err(error) => {
            tracing::warn!(%error, "no popular fallback from the bundle; waiting for recall");
            CandidateColumns::default()
        }
    }
}
