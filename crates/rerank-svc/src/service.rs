//! gRPC surface of rerank-svc: the request's checks, then the policy (`policy.rs`) under
//! the rules its scene and experiment variants select.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use tracing::Instrument;

use recsys_bundle::Registry;
use recsys_proto::{
    limits::{MAX_CANDIDATES, MAX_CONTEXT_ENTRIES, MAX_ID_BYTES, MAX_SCENE_BYTES, MAX_TOP_K},
    v1::{
        rerank_service_server::{RerankService, RerankServiceServer},
        GetItemFeaturesRequest, RerankRequest, RerankResponse, RerankedItem, WindowedCounts,
    },
};
use recsys_runtime::{catalog::Catalog, item_features::ItemFeatureSource, model_admin::version_for};
use tonic::{Request, Response, Status};

use crate::{arrange, rules::need_item_counts, BundleItems, Config, ListRequest, LiveRules, RerankError};

/// Impressions accepted per request (the feature store keeps fewer).
const MAX_IMPRESSIONS: usize = 1_000;

/// What each rule did, summed over requests: the dashboard of business rules.
static RULE_ACTIONS: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter_vec!(
        "recsys_rerank_rule_actions_total",
        "Items each rerank rule acted on, by action (filter, boost, freshness, exposure, cap, pin)",
        &["rule", "action"]
    )
    .expect("metric registers once")
});

/// Requests whose rules named item counts that could not be read in time (the conditions
/// on counts were then not met).
static ITEM_COUNTS_MISSING: std::sync::LazyLock<prometheus::IntCounter> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter!(
        "recsys_rerank_item_counts_unavailable_total",
        "Rerank requests served without the window's item counts (feature-svc slow or down)"
    )
    .expect("metric registers once")
});

#[derive(Clone)]
pub struct RerankGrpc {
    /// Item genres by bundle version.
    registry: Arc<Registry<BundleItems>>,
    rules: Arc<LiveRules>,
    catalog: Arc<Catalog>,
    /// feature-svc, for the window's item counts when a rule names one.
    item_counts: Option<Arc<dyn ItemFeatureSource>>,
    config: Arc<Config>,
}

impl RerankGrpc {
    /// Reads item counts from the feature-svc the catalogue is followed from.
    pub fn new(
        registry: Arc<Registry<BundleItems>>,
        rules: Arc<LiveRules>,
        catalog: Arc<Catalog>,
        config: Config,
        tls: &recsys_runtime::Tls,
    ) -> Self {
        let features = recsys_runtime::item_features::feature_client(&config.catalog.feature, tls);
        Self::with_item_counts(registry, rules, catalog, config, features)
    }

    pub fn with_item_counts(
        registry: Arc<Registry<BundleItems>>,
        rules: Arc<LiveRules>,
        catalog: Arc<Catalog>,
        config: Config,
        item_counts: Option<Arc<dyn ItemFeatureSource>>,
    ) -> Self {
        Self { registry, rules, catalog, item_counts, config: Arc::new(config) }
    }

    /// The window's item counts as of `now_ms`, in one `GetItemFeatures` call within
    /// `item_counts_timeout_ms`; empty (and counted) when feature-svc does not answer.
    async fn item_counts(&self, item_ids: Vec<String>, now_ms: i64) -> HashMap<String, WindowedCounts> {
        let Some(source) = &self.item_counts else { return HashMap::new() };
        let request = GetItemFeaturesRequest { item_ids, as_of_ms: now_ms };
        let timeout = Duration::from_millis(self.config.item_counts_timeout_ms);
        match source.item_features(request, timeout).await {
            Ok(response) => response.items.into_iter().filter_map(|item| Some((item.item_id, item.counts?))).collect(),
            Err(status) => {
                ITEM_COUNTS_MISSING.inc();
                tracing::debug!(code = ?status.code(), message = status.message(), "item counts unavailable");
                HashMap::new()
            }
        }
    }

    pub fn into_server(self) -> RerankServiceServer<Self> {
        RerankServiceServer::new(self)
    }
}

fn invalid<T>(message: String) -> Result<T, Status> {
    Err(RerankError::InvalidArgument(message).into())
}

#[tonic::async_trait]
impl RerankService for RerankGrpc {
    async fn rerank(&self, request: Request<RerankRequest>) -> Result<Response<RerankResponse>, Status> {
        let RerankRequest {
            candidates,
            top_k,
            relevance_weight,
            bundle_version,
            scene,
            experiments,
            context,
            request_time,
            recent_impressions,
            debug,
        } = request.into_inner();
        if top_k == 0 || top_k > MAX_TOP_K {
            return invalid(format!("top_k must be between 1 and {MAX_TOP_K}"));
        }
        if candidates.len() > MAX_CANDIDATES {
            return invalid(format!("{} candidates; at most {MAX_CANDIDATES} allowed", candidates.len()));
        }
        if bundle_version.len() > MAX_ID_BYTES {
            return invalid(format!("bundle_version is longer than {MAX_ID_BYTES} bytes"));
        }
        if scene.len() > MAX_SCENE_BYTES {
            return invalid(format!("scene is longer than {MAX_SCENE_BYTES} bytes"));
        }
        if context.len() > MAX_CONTEXT_ENTRIES {
            return invalid(format!("context has {} entries; at most {MAX_CONTEXT_ENTRIES} allowed", context.len()));
        }
        if recent_impressions.len() > MAX_IMPRESSIONS {
            return invalid(format!(
                "{} recent_impressions; at most {MAX_IMPRESSIONS} allowed",
                recent_impressions.len()
            ));
        }
        if request_time < 0 {
            return invalid(format!("request_time {request_time} is negative"));
        }
        let relevance_weight = relevance_weight.unwrap_or(self.config.relevance_weight);
        if !(0.0..=1.0).contains(&relevance_weight) {
            return invalid(format!("relevance_weight {relevance_weight} is outside [0, 1]"));
        }
        if let Some(bad) = candidates.iter().position(|c| !c.score.is_finite()) {
            return invalid(format!("candidates[{bad}].score is not a finite number"));
        }
        // The genres of the bundle recall proposed from.
        let bundle = version_for(&self.registry, &bundle_version).await.map_err(|error| {
            RerankError::PinnedBundleUnavailable {
                served: self.registry.current_version(),
                pinned: bundle_version,
                reason: error.to_string(),
            }
        })?;
        // The orchestrator chose the window; a duplicate id would only mean a bad caller.
        let mut seen = HashSet::new();
        let allowed: Vec<(String, f32)> =
            candidates.into_iter().filter(|c| seen.insert(c.item_id.clone())).map(|c| (c.item_id, c.score)).collect();
        let variants: Vec<String> =
            experiments.iter().map(|assignment| format!("{}/{}", assignment.layer, assignment.variant)).collect();
        let rule_set = self.rules.current();
        let rules = rule_set.for_request(&scene, &variants);
        let now_ms = if request_time > 0 { request_time.saturating_mul(1000) } else { now_ms() };
        // The window's item counts (feature-svc's item-feature RPC), only when a rule
        // names one: the other rules need nothing beyond the request and the catalogue.
        let item_counts = if need_item_counts(&rules) {
            let ids = allowed.iter().map(|(id, _)| id.clone()).collect();
            self.item_counts(ids, now_ms).instrument(tracing::info_span!("item_counts")).await
        } else {
            HashMap::new()
        };
        let list_request = ListRequest {
            candidates: &allowed,
            top_k: top_k as usize,
            relevance_weight,
            context: &context,
            now_ms,
            impressions: &recent_impressions,
            item_counts: &item_counts,
            debug,
        };
        let (placed, firings) = tracing::info_span!("rules_and_mmr", candidates = allowed.len(), rules = rules.len())
            .in_scope(|| arrange(&list_request, &rules, &bundle, &self.catalog));
        for ((rule, action), count) in firings {
            RULE_ACTIONS.with_label_values(&[rule.as_str(), action]).inc_by(count);
        }
        Ok(Response::new(RerankResponse {
            items: placed
                .into_iter()
                .map(|p| RerankedItem {
                    item_id: p.item_id,
                    score: p.score,
                    rerank_score: p.rerank_score,
                    rules: p.effects,
                })
                .collect(),
        }))
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as i64)
}
