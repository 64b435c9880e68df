//! gRPC surface of rank-svc: validation, then the model run on a blocking thread so it
//! never stalls the async workers.

use std::sync::Arc;

use recsys_proto::v1::{
    rank_service_server::{RankService, RankServiceServer},
    RankRequest, RankResponse, RankedItem,
};
use recsys_proto::REQUEST_TIME_CONTEXT_KEY;
use tonic::{Request, Response, Status};

use crate::{RankError, Ranker};

const MAX_ITEMS: usize = 5_000;

fn request_time(context: &std::collections::HashMap<String, String>) -> Result<i64, RankError> {
    match context.get(REQUEST_TIME_CONTEXT_KEY) {
        Some(value) => value.trim().parse::<i64>().map_err(|_| {
            RankError::InvalidArgument(format!("context[{REQUEST_TIME_CONTEXT_KEY:?}] = {value:?} is not Unix seconds"))
        }),
        None => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs() as i64)),
    }
}

#[derive(Clone)]
pub struct RankGrpc {
    ranker: Arc<Ranker>,
    default_coarse_keep: usize,
}

impl RankGrpc {
    pub fn new(ranker: Arc<Ranker>, default_coarse_keep: usize) -> Self {
        Self { ranker, default_coarse_keep }
    }

    pub fn into_server(self) -> RankServiceServer<Self> {
        RankServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl RankService for RankGrpc {
    async fn rank(&self, request: Request<RankRequest>) -> Result<Response<RankResponse>, Status> {
        let RankRequest { user, item_ids, coarse_keep, fine_keep, context } = request.into_inner();
        let user = user.ok_or_else(|| RankError::InvalidArgument("user is required".into()))?;
        if item_ids.len() > MAX_ITEMS {
            return Err(RankError::InvalidArgument(format!(
                "{} item_ids; at most {MAX_ITEMS} allowed",
                item_ids.len()
            ))
            .into());
        }
        let request_time = request_time(&context)?;
        let coarse_keep = if coarse_keep == 0 { self.default_coarse_keep } else { coarse_keep as usize };
        let ranker = Arc::clone(&self.ranker);
        // The model runs on a blocking thread; carry the request's span there.
        let span = tracing::Span::current();
        let ranked = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let items = ranker.resolve_items(&item_ids);
            ranker.rank(&user, &items, coarse_keep, request_time)
        })
        .await
        .map_err(|error| Status::internal(format!("ranking task failed: {error}")))??;
        let keep = if fine_keep == 0 { ranked.len() } else { fine_keep as usize };
        Ok(Response::new(RankResponse {
            items: ranked
                .into_iter()
                .take(keep)
                .map(|candidate| RankedItem {
                    item_id: self.ranker.item_id(candidate.item).to_string(),
                    coarse_score: candidate.coarse_score,
                    fine_score: candidate.fine_score,
                })
                .collect(),
            model_version: self.ranker.version().to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn request_time_comes_from_the_context_or_the_clock() {
        let context = HashMap::from([(REQUEST_TIME_CONTEXT_KEY.to_string(), "893286638".to_string())]);
        assert_eq!(request_time(&context).unwrap(), 893_286_638);
        assert!(request_time(&HashMap::new()).unwrap() > 1_700_000_000);
        let bad = HashMap::from([(REQUEST_TIME_CONTEXT_KEY.to_string(), "yesterday".to_string())]);
        let error = request_time(&bad).unwrap_err().to_string();
        assert!(error.contains("request_time") && error.contains("yesterday"), "{error}");
    }
}
