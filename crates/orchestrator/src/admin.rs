//! The Admin service: canary share, promotion and rollback at run time, and the per-track
//! statistics operators decide them on (`recsysctl canary ...`).

use std::sync::Arc;

use recsys_proto::v1::{
    admin_server::{Admin, AdminServer},
    GetTrafficSplitRequest, PromoteCanaryRequest, RollbackCanaryRequest, SetCanaryShareRequest, TrafficSplit,
};
use recsys_runtime::admin_auth::Operator;
use tonic::{Request, Response, Status};

use crate::Pipeline;

#[derive(Clone)]
pub struct AdminGrpc {
    pipeline: Arc<Pipeline>,
}

impl AdminGrpc {
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self { pipeline }
    }

    pub fn into_server(self) -> AdminServer<Self> {
        AdminServer::new(self)
    }

    fn split(&self) -> Response<TrafficSplit> {
        Response::new(self.pipeline.rank_routing().snapshot())
    }
}

#[tonic::async_trait]
impl Admin for AdminGrpc {
    async fn get_traffic_split(&self, _: Request<GetTrafficSplitRequest>) -> Result<Response<TrafficSplit>, Status> {
        Ok(self.split())
    }

    async fn set_canary_share(
        &self,
        request: Request<SetCanaryShareRequest>,
    ) -> Result<Response<TrafficSplit>, Status> {
        let operator = Operator::of(&request).to_string();
        let share_percent = request.into_inner().share_percent;
        self.pipeline.rank_routing().set_share(share_percent)?;
        tracing::info!(%operator, share_percent, "canary share set");
        Ok(self.split())
    }

    async fn promote_canary(&self, request: Request<PromoteCanaryRequest>) -> Result<Response<TrafficSplit>, Status> {
        self.pipeline.rank_routing().promote()?;
        tracing::info!(operator = Operator::of(&request), "canary promoted");
        Ok(self.split())
    }

    async fn rollback_canary(&self, request: Request<RollbackCanaryRequest>) -> Result<Response<TrafficSplit>, Status> {
        self.pipeline.rank_routing().rollback();
        tracing::info!(operator = Operator::of(&request), "canary rolled back");
        Ok(self.split())
    }
}
