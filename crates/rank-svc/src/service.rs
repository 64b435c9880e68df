//! gRPC surface of rank-svc: validation, then the model run on a blocking thread so it
//! never stalls the async workers.

use std::sync::Arc;

use recsys_proto::{
    limits::{MAX_CANDIDATES, MAX_HISTORY, MAX_ID_BYTES},
    v1::{
        rank_service_server::{RankService, RankServiceServer},
        RankRequest, RankResponse, RankedItem,
    },
};
use tonic::{Request, Response, Status};

use tracing::Instrument;

use recsys_bundle::Registry;
use recsys_runtime::model_admin::version_for;

use crate::{RankError, RankerVersion};

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

#[derive(Clone)]
pub struct RankGrpc {
    registry: Arc<Registry<RankerVersion>>,
    default_coarse_keep: usize,
}

impl RankGrpc {
    pub fn new(registry: Arc<Registry<RankerVersion>>, default_coarse_keep: usize) -> Self {
        Self { registry, default_coarse_keep }
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
        let (ranked, unscored) = match &version.batcher {
            None => {
                blocking(move || {
                    let _entered = span.enter();
                    let candidates = ranker.candidates(&candidates, scored_here)?;
                    let ranked = ranker.rank_candidates(&user, &candidates, coarse_keep, request_time)?;
                    Ok::<_, RankError>((ranked, candidates.unscored))
                })
                .await??
            }
            Some(batcher) => {
                let arriving = batcher.arriving();
                let (stage, unscored) = blocking(move || {
                    let _entered = span.enter();
                    let candidates = ranker.candidates(&candidates, scored_here)?;
                    let stage = ranker.coarse_stage(&user, &candidates, coarse_keep, request_time)?;
                    Ok::<_, RankError>((stage, candidates.unscored))
                })
                .await??;
                let fine = batcher
                    .score(stage.inputs, arriving)
                    .instrument(tracing::info_span!("fine", batched = true))
                    .await?;
                (version.ranker.finish(stage.coarse, fine), unscored)
            }
        };
        let keep = if fine_keep == 0 { ranked.len() + unscored.len() } else { fine_keep as usize };
        // Unscored new items take at most a fifth of the window, after the scored ones,
        // with the lowest score kept (rerank's freshness and pins decide their place).
        let unscored_kept = unscored.len().min(keep.div_ceil(5));
        let mut items: Vec<RankedItem> = ranked
            .into_iter()
            .take(keep - unscored_kept)
            .map(|candidate| RankedItem {
                item_id: version.ranker.item_id(candidate.item).to_string(),
                coarse_score: candidate.coarse_score,
                fine_score: candidate.fine_score,
            })
            .collect();
        let lowest = items.last().map_or((0.0, 0.0), |item| (item.coarse_score, item.fine_score));
        items.extend(unscored.into_iter().take(unscored_kept).map(|item_id| RankedItem {
            item_id,
            coarse_score: lowest.0,
            fine_score: lowest.1,
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
