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
        let request = GetItemFeaturesRequest { item_ids, as_of_ms: now_ms, counts_only: true };
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
        // Counts rank-svc read for its fine model travel with the candidates, and so does
        // its new-item pick.
        let mut carried_counts = HashMap::new();
        let mut cold_start = HashSet::new();
        let allowed: Vec<(String, f32)> = candidates
            .into_iter()
            .filter(|c| seen.insert(c.item_id.clone()))
            .map(|c| {
                if let Some(counts) = c.counts {
                    carried_counts.insert(c.item_id.clone(), counts);
                }
                if c.cold_start {
                    cold_start.insert(c.item_id.clone());
                }
                (c.item_id, c.score)
            })
            .collect();
        let variants: Vec<String> =
            experiments.iter().map(|assignment| format!("{}/{}", assignment.layer, assignment.variant)).collect();
        let rule_set = self.rules.current();
        let rules = rule_set.for_request(&scene, &variants);
        let now_ms = if request_time > 0 { request_time.saturating_mul(1000) } else { now_ms() };
        // The window's item counts, only when a rule names one (the other rules need nothing
        // beyond the request and the catalogue): those rank-svc carried, and one
        // feature-svc read for the rest.
        let item_counts = if need_item_counts(&rules) {
            let missing: Vec<String> =
                allowed.iter().filter(|(id, _)| !carried_counts.contains_key(id)).map(|(id, _)| id.clone()).collect();
            if !missing.is_empty() {
                let read = self.item_counts(missing, now_ms).instrument(tracing::info_span!("item_counts")).await;
                carried_counts.extend(read);
            }
            carried_counts
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
            cold_start: &cold_start,
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use recsys_proto::v1::{EventCounts, GetItemFeaturesResponse, ItemFeatures, RerankCandidate};

    use super::*;

    /// A feature store where every item has 3 clicks in the last hour; it records the ids
    /// it was asked for.
    #[derive(Default)]
    struct RecordingStore(Mutex<Vec<Vec<String>>>);

    #[tonic::async_trait]
    impl ItemFeatureSource for RecordingStore {
        async fn item_features(
            &self,
            request: GetItemFeaturesRequest,
            _timeout: Duration,
        ) -> Result<GetItemFeaturesResponse, Status> {
            self.0.lock().unwrap().push(request.item_ids.clone());
            let items = request
                .item_ids
                .into_iter()
                .map(|item_id| ItemFeatures { item_id, counts: Some(clicks_last_hour(3)), ..ItemFeatures::default() })
                .collect();
            Ok(GetItemFeaturesResponse { items, bundle_stat_names: Vec::new() })
        }
    }

    fn clicks_last_hour(clicks: u32) -> WindowedCounts {
        WindowedCounts {
            last_hour: Some(EventCounts { clicks, ..EventCounts::default() }),
            ..WindowedCounts::default()
        }
    }

    /// Counts rank-svc carried are used as they are; feature-svc is read only for the
    /// window's items that came without them.
    #[tokio::test]
    async fn counts_carried_from_rank_are_not_read_again() {
        let bundle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/bundles");
        let rules_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            rules_file.path(),
            "[[rule]]\nname = \"trending\"\nkind = \"boost\"\n\
             when = [{ attribute = \"clicks_1h\", op = \"ge\", value = 2 }]\nadd = 5.0\n",
        )
        .unwrap();
        let config = Config {
            bundle,
            rules: Some(rules_file.path().to_path_buf()),
            catalog: recsys_runtime::catalog::CatalogConfig { feature: String::new(), ..Default::default() },
            follow_current_ms: 0,
            ..Config::default()
        };
        let store = Arc::new(RecordingStore::default());
        let source: Arc<dyn ItemFeatureSource> = store.clone();
        let service = RerankGrpc::with_item_counts(
            crate::open_registry(&config).unwrap(),
            Arc::new(LiveRules::open(config.rules.as_deref()).unwrap()),
            Catalog::follow(&config.catalog, &recsys_runtime::Tls::plaintext()),
            config,
            Some(source),
        );
        let candidate = |item_id: &str, score: f32, counts: Option<WindowedCounts>| RerankCandidate {
            item_id: item_id.into(),
            score,
            counts,
            cold_start: false,
        };
        let request = RerankRequest {
            // Item 1 leads on relevance; rank carried item 50's (trending) and item 1's
            // (quiet) counts, not item 100's.
            candidates: vec![
                candidate("1", 0.9, Some(clicks_last_hour(0))),
                candidate("50", 0.5, Some(clicks_last_hour(9))),
                candidate("100", 0.4, None),
            ],
            top_k: 3,
            relevance_weight: Some(1.0),
            ..RerankRequest::default()
        };
        let response = service.rerank(Request::new(request)).await.unwrap().into_inner();
        let order: Vec<&str> = response.items.iter().map(|item| item.item_id.as_str()).collect();
        assert_eq!(*store.0.lock().unwrap(), vec![vec!["100".to_string()]], "only the item without counts is read");
        assert_eq!(order[2], "1", "the carried counts were used: trending 50 and read 100 are boosted past 1");
    }
}
