//! gRPC surface of the orchestrator.

use std::sync::Arc;

use recsys_proto::v1::{
    recommender_server::{Recommender, RecommenderServer},
    LogEventsRequest, LogEventsResponse, RecommendRequest, RecommendResponse,
};
use tonic::{Request, Response, Status};

use recsys_proto::limits::MAX_EVENTS_PER_CALL;

use crate::{deadline::Deadline, Pipeline, RecommendQuery};

#[derive(Clone)]
pub struct RecommenderGrpc {
    pipeline: Arc<Pipeline>,
}

impl RecommenderGrpc {
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self { pipeline }
    }

    pub fn into_server(self) -> RecommenderServer<Self> {
        RecommenderServer::new(self)
    }
}

#[tonic::async_trait]
impl Recommender for RecommenderGrpc {
    async fn recommend(&self, request: Request<RecommendRequest>) -> Result<Response<RecommendResponse>, Status> {
        let config = self.pipeline.config();
        let deadline = Deadline::from_metadata(request.metadata(), config.budgets.default_deadline());
        let request_id = uuid::Uuid::new_v4().to_string();
        let query = RecommendQuery::try_from(request.into_inner())?;
        let response = self.pipeline.recommend(query, deadline, request_id).await?;
        Ok(Response::new(response))
    }

    async fn log_events(&self, request: Request<LogEventsRequest>) -> Result<Response<LogEventsResponse>, Status> {
        let deadline = Deadline::from_metadata(request.metadata(), self.pipeline.config().budgets.default_deadline());
        let LogEventsRequest { events } = request.into_inner();
        if events.is_empty() {
            return Err(Status::invalid_argument("events is empty"));
        }
        if events.len() > MAX_EVENTS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} events in one call; at most {MAX_EVENTS_PER_CALL} allowed",
                events.len()
            )));
        }
        Ok(Response::new(self.pipeline.log_events(events, deadline).await?))
    }
}
