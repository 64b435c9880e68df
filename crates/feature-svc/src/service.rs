//! gRPC surface of feature-svc: request validation and the hop onto a blocking thread
//! for the synced log write.

use std::sync::Arc;

use recsys_proto::v1::{
    feature_service_server::{FeatureService, FeatureServiceServer},
    AppendEventsRequest, AppendEventsResponse, GetUserFeaturesRequest, UserFeatures,
};
use tonic::{Request, Response, Status};

use crate::{FeatureError, FeatureStore, StoredEvent};

const MAX_USER_ID_BYTES: usize = 256;
const MAX_EVENTS_PER_BATCH: usize = 10_000;

#[derive(Clone)]
pub struct FeatureGrpc {
    store: Arc<FeatureStore>,
}

impl FeatureGrpc {
    pub fn new(store: Arc<FeatureStore>) -> Self {
        Self { store }
    }

    pub fn into_server(self) -> FeatureServiceServer<Self> {
        FeatureServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl FeatureService for FeatureGrpc {
    async fn get_user_features(
        &self,
        request: Request<GetUserFeaturesRequest>,
    ) -> Result<Response<UserFeatures>, Status> {
        let GetUserFeaturesRequest { user_id, max_history } = request.into_inner();
        if user_id.is_empty() {
            return Err(FeatureError::InvalidArgument("user_id is empty".into()).into());
        }
        if user_id.len() > MAX_USER_ID_BYTES {
            return Err(FeatureError::InvalidArgument(format!(
                "user_id is {} bytes; at most {MAX_USER_ID_BYTES} allowed",
                user_id.len()
            ))
            .into());
        }
        let limit = if max_history == 0 { usize::MAX } else { max_history as usize };
        Ok(Response::new(self.store.user_features(&user_id, limit)))
    }

    async fn append_events(
        &self,
        request: Request<AppendEventsRequest>,
    ) -> Result<Response<AppendEventsResponse>, Status> {
        let AppendEventsRequest { events } = request.into_inner();
        if events.len() > MAX_EVENTS_PER_BATCH {
            return Err(FeatureError::InvalidArgument(format!(
                "{} events in one batch; at most {MAX_EVENTS_PER_BATCH} allowed",
                events.len()
            ))
            .into());
        }
        let validated = events
            .iter()
            .enumerate()
            .map(|(index, event)| StoredEvent::from_proto(index, event))
            .collect::<Result<Vec<_>, _>>()?;
        let accepted = validated.len() as u32;
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.append(&validated))
            .await
            .map_err(|error| Status::internal(format!("event write task failed: {error}")))??;
        Ok(Response::new(AppendEventsResponse { accepted }))
    }
}
