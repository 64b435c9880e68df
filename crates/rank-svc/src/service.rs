//! gRPC surface of rank-svc: validation, then the model run on a blocking thread so it
//! never stalls the async workers.

use std::{collections::HashMap, sync::Arc, time::Duration};

use recsys_proto::{
    limits::{MAX_CANDIDATES, MAX_HISTORY, MAX_ID_BYTES},
    v1::{
        rank_service_server::{RankService, RankServiceServer},
        EventCounts, GetItemFeaturesRequest, RankRequest, RankResponse, RankedItem, WindowedCounts,
    },
};
use tonic::{Request, Response, Status};

use tracing::Instrument;

use recsys_bundle::{ItemWindowCounts, Registry};
use recsys_runtime::{item_features::ItemFeatureSource, model_admin::version_for};

use crate::{
    batching::{Arriving, MicroBatcher},
    Candidates, CoarseOutcome, FineStage, RankError, RankedCandidate, Ranker, RankerVersion,
};

/// Fine stages served without their candidates' windowed counts (feature-svc slow, down or
/// not configured): the live item columns were zeros.
static LIVE_COUNTS_MISSING: std::sync::LazyLock<prometheus::IntCounter> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter!(
        "recsys_rank_item_counts_unavailable_total",
        "Fine stages ranked without the candidates' windowed counts (feature-svc slow, down or not configured)"
    )
    .expect("metric registers once")
});

/// Runs model work on a blocking thread, so it never stalls the async workers.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(work).await.map_err(|error| Status::internal(format!("ranking task failed: {error}")))
}

/// The request's moment, else this service's clock.
fn request_time_or_now(request_time: Option<i64>) -> i64 {
    request_time.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs() as i64)
    })
}

/// The store's counters in the bundle's order (window, then measure); an absent CTR (no
/// impressions in the window) is 0, as training encodes it.
pub fn item_window_counts(counts: &WindowedCounts) -> ItemWindowCounts {
    let row = |counts: Option<EventCounts>| {
        let counts = counts.unwrap_or_default();
        [
            f64::from(counts.impressions),
            f64::from(counts.clicks),
            f64::from(counts.likes),
            f64::from(counts.purchases),
            counts.ctr.map_or(0.0, f64::from),
        ]
    };
    [row(counts.last_hour), row(counts.last_day), row(counts.last_7_days), row(counts.last_30_days)]
}

#[derive(Clone)]
pub struct RankGrpc {
    registry: Arc<Registry<RankerVersion>>,
    default_coarse_keep: usize,
    /// feature-svc, for the fine stage's windowed item counts when the bundle's fine model
    /// reads them.
    item_features: Option<Arc<dyn ItemFeatureSource>>,
    item_features_timeout: Duration,
}

impl RankGrpc {
    pub fn new(
        registry: Arc<Registry<RankerVersion>>,
        default_coarse_keep: usize,
        item_features: Option<Arc<dyn ItemFeatureSource>>,
        item_features_timeout: Duration,
    ) -> Self {
        Self { registry, default_coarse_keep, item_features, item_features_timeout }
    }

    /// Writes the fine stage's live item columns from one `GetItemFeatures` read of its
    /// candidates as of the request's time; zeros (and counted) when it fails or is late.
    /// Returns the counts read, by catalogue position, for the response (rerank-svc reads
    /// the same counts: they travel on instead of being read twice).
    async fn read_live_item_features(
        &self,
        source: &dyn ItemFeatureSource,
        ranker: &Ranker,
        stage: &mut FineStage,
        request_time: i64,
    ) -> HashMap<usize, WindowedCounts> {
        if stage.coarse.is_empty() {
            return HashMap::new();
        }
        let item_ids = stage.coarse.iter().map(|&(item, _)| ranker.item_id(item).to_string()).collect();
        // The counts alone: the bundle's statistics are in the ranker already.
        let request =
            GetItemFeaturesRequest { item_ids, as_of_ms: request_time.saturating_mul(1_000), counts_only: true };
        let answer = source.item_features(request, self.item_features_timeout).await;
        let items = match answer {
            Ok(response) if response.items.len() == stage.coarse.len() => response.items,
            Ok(response) => {
                tracing::warn!(asked = stage.coarse.len(), answered = response.items.len(), "item counts misaligned");
                Vec::new()
            }
            Err(status) => {
                tracing::debug!(code = ?status.code(), message = status.message(), "item counts unavailable");
                Vec::new()
            }
        };
        if items.is_empty() {
            LIVE_COUNTS_MISSING.inc();
            return HashMap::new();
        }
        let counts: Vec<_> = items.iter().map(|item| item.counts.as_ref().map(item_window_counts)).collect();
        ranker.fill_live_item_features(&mut stage.inputs, &counts);
        stage.coarse.iter().zip(items).filter_map(|(&(position, _), item)| Some((position, item.counts?))).collect()
    }

    /// The fine stage after a coarse one ran on its own: the candidates' counts read (when
    /// configured), then the fine model — batched with other requests' when a batcher is
    /// set. Returns the ranked candidates and the counts read.
    async fn fine_stage(
        &self,
        ranker: &Arc<Ranker>,
        mut stage: FineStage,
        counts_source: Option<&dyn ItemFeatureSource>,
        batcher: Option<&MicroBatcher>,
        arriving: Option<Arriving>,
        request_time: i64,
    ) -> Result<(Vec<RankedCandidate>, HashMap<usize, WindowedCounts>), Status> {
        let counts = match counts_source {
            Some(source) => {
                let span = tracing::info_span!("item_counts", items = stage.coarse.len());
                self.read_live_item_features(source, ranker, &mut stage, request_time).instrument(span).await
            }
            None => HashMap::new(),
        };
        let FineStage { coarse, inputs } = stage;
        let fine = match (batcher, arriving) {
            (Some(batcher), Some(arriving)) => {
                batcher.score(inputs, arriving).instrument(tracing::info_span!("fine", batched = true)).await?
            }
            _ => {
                let fine_ranker = Arc::clone(ranker);
                let span = tracing::info_span!("fine", items = inputs.len());
                blocking(move || span.in_scope(|| fine_ranker.fine_scores(&inputs))).await??
            }
        };
        Ok((ranker.finish(coarse, fine), counts))
    }

    pub fn into_server(self) -> RankServiceServer<Self> {
        RankServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl RankService for RankGrpc {
    async fn rank(&self, request: Request<RankRequest>) -> Result<Response<RankResponse>, Status> {
        let RankRequest { user, candidates, coarse_keep, fine_keep, request_time, bundle_version } =
            request.into_inner();
        let user = user.ok_or_else(|| RankError::InvalidArgument("user is required".into()))?;
        let candidates = candidates.unwrap_or_default();
        if candidates.len() > MAX_CANDIDATES || user.history_item_ids.len() > MAX_HISTORY as usize {
            return Err(RankError::InvalidArgument(format!(
                "{} candidates and {} history items; at most {MAX_CANDIDATES} and {MAX_HISTORY} allowed",
                candidates.len(),
                user.history_item_ids.len()
            ))
            .into());
        }
        if bundle_version.len() > MAX_ID_BYTES {
            return Err(
                RankError::InvalidArgument(format!("bundle_version is longer than {MAX_ID_BYTES} bytes")).into()
            );
        }
        // Recall's scores are features only if recall computed them on the version ranking
        // them: a pinned request is ranked by the version it is pinned to.
        let scored_here = !bundle_version.is_empty();
        // Item positions and features must agree with the bundle recall proposed from.
        let version =
            version_for(&self.registry, &bundle_version).await.map_err(|error| RankError::PinnedBundleUnavailable {
                served: self.registry.current_version(),
                pinned: bundle_version,
                reason: error.to_string(),
            })?;
        let request_time = request_time_or_now(request_time);
        let coarse_keep = if coarse_keep == 0 { self.default_coarse_keep } else { coarse_keep as usize };
        let ranker = Arc::clone(&version.ranker);
        // The models run on a blocking thread; carry the request's span there.
        let span = tracing::Span::current();
        // The fine stage waits for the candidates' counts only when the bundle's model reads
        // them and feature-svc is configured (without it those columns are zeros: counted).
        let reads_counts = ranker.reads_live_item_features();
        if reads_counts && self.item_features.is_none() {
            LIVE_COUNTS_MISSING.inc();
        }
        let counts_source = self.item_features.as_deref().filter(|_| reads_counts);
        let (mut ranked, Candidates { unscored, cold_start_pick, .. }, mut counts) = match &version.batcher {
            // One hand-off to the blocking pool for both stages when nothing is read between them.
            None if counts_source.is_none() => {
                blocking(move || {
                    let _entered = span.enter();
                    let candidates = ranker.candidates(&candidates, scored_here)?;
                    let ranked = ranker.rank_candidates(&user, &candidates, coarse_keep, request_time)?;
                    Ok::<_, RankError>((ranked, candidates, HashMap::new()))
                })
                .await??
            }
            batcher => {
                let arriving = batcher.as_ref().map(|batcher| batcher.arriving());
                let stage_ranker = Arc::clone(&ranker);
                let (outcome, candidates) = blocking(move || {
                    let _entered = span.enter();
                    let candidates = stage_ranker.candidates(&candidates, scored_here)?;
                    let outcome = stage_ranker.coarse_stage(&user, &candidates, coarse_keep, request_time)?;
                    Ok::<_, RankError>((outcome, candidates))
                })
                .await??;
                match outcome {
                    CoarseOutcome::Decided(ranked) => (ranked, candidates, HashMap::new()),
                    CoarseOutcome::Fine(stage) => {
                        let fine =
                            self.fine_stage(&ranker, stage, counts_source, batcher.as_deref(), arriving, request_time);
                        let (ranked, counts) = fine.await?;
                        (ranked, candidates, counts)
                    }
                }
            }
        };
        let keep = if fine_keep == 0 { ranked.len() + unscored.len() } else { fine_keep as usize };
        // Unscored new items take at most a fifth of the window, after the scored ones,
        // with the lowest score kept (rerank's freshness and pins decide their place).
        let unscored_kept = unscored.len().min(keep.div_ceil(5));
        let scored_kept = keep - unscored_kept;
        // The new-item pick stays in the window, in place of the last scored item if it
        // ranked below it, with that item's scores (rerank normalises relevance over the
        // window: a far lower score would squeeze everyone else's); rerank's
        // `new_item_slot` rule places it.
        if let Some(at) = cold_start_pick.and_then(|pick| ranked.iter().position(|c| c.item == pick)) {
            if at >= scored_kept && scored_kept > 0 {
                let last = scored_kept - 1;
                let (coarse_score, fine_score) = (ranked[last].coarse_score, ranked[last].fine_score);
                ranked.swap(at, last);
                ranked[last].coarse_score = coarse_score;
                ranked[last].fine_score = fine_score;
            }
        }
        // At most one mark, should a caller repeat the item.
        let mut unmarked = cold_start_pick;
        let mut items: Vec<RankedItem> = ranked
            .into_iter()
            .take(scored_kept)
            .map(|candidate| RankedItem {
                item_id: version.ranker.item_id(candidate.item).to_string(),
                coarse_score: candidate.coarse_score,
                fine_score: candidate.fine_score,
                counts: counts.remove(&candidate.item),
                cold_start: unmarked.take_if(|pick| *pick == candidate.item).is_some(),
            })
            .collect();
        let lowest = items.last().map_or((0.0, 0.0), |item| (item.coarse_score, item.fine_score));
        items.extend(unscored.into_iter().take(unscored_kept).map(|item_id| RankedItem {
            item_id,
            coarse_score: lowest.0,
            fine_score: lowest.1,
            counts: None,
            cold_start: false,
        }));
        Ok(Response::new(RankResponse { items, model_version: version.ranker.version().to_string() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_time_is_the_requests_or_the_clock() {
        assert_eq!(request_time_or_now(Some(893_286_638)), 893_286_638);
        assert!(request_time_or_now(None) > 1_700_000_000);
    }
}
