//! gRPC surface of feature-svc: request validation and the hop onto a blocking thread
//! for the synced log write.

use std::sync::Arc;

use recsys_proto::limits::{MAX_EVENTS_PER_CALL, MAX_ID_BYTES};
use recsys_proto::v1::{
    feature_service_server::{FeatureService, FeatureServiceServer},
    AppendEventsRequest, AppendEventsResponse, EventRejection, GetUserFeaturesRequest, UserFeatures,
};
use tonic::{Request, Response, Status};

use crate::{FeatureError, FeatureStore, StoredEvent};

/// Store lookups by outcome: the hit rate is the share of users the store knows.
static USER_LOOKUPS: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter_vec!(
        "recsys_feature_lookups_total",
        "User feature lookups by result (hit, miss)",
        &["result"]
    )
    .expect("metric registers once")
});

static EVENTS_APPENDED: std::sync::LazyLock<prometheus::IntCounter> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter!(
        "recsys_events_appended_total",
        "Feedback events durably appended to the event log"
    )
    .expect("metric registers once")
});

static EVENTS_DUPLICATE: std::sync::LazyLock<prometheus::IntCounter> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter!(
        "recsys_events_duplicate_total",
        "Feedback events whose event_id was already stored (retried batches), not counted again"
    )
    .expect("metric registers once")
});

static EVENTS_REJECTED: std::sync::LazyLock<prometheus::IntCounter> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter!("recsys_events_rejected_total", "Invalid feedback events answered with a reason")
        .expect("metric registers once")
});

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
        if user_id.len() > MAX_ID_BYTES {
            return Err(FeatureError::InvalidArgument(format!(
                "user_id is {} bytes; at most {MAX_ID_BYTES} allowed",
                user_id.len()
            ))
            .into());
        }
        let limit = if max_history == 0 { usize::MAX } else { max_history as usize };
        let features = tracing::info_span!("feature_read").in_scope(|| self.store.user_features(&user_id, limit));
        USER_LOOKUPS.with_label_values(&[if features.known { "hit" } else { "miss" }]).inc();
        Ok(Response::new(features))
    }

    async fn append_events(
        &self,
        request: Request<AppendEventsRequest>,
    ) -> Result<Response<AppendEventsResponse>, Status> {
        let AppendEventsRequest { events } = request.into_inner();
        if events.len() > MAX_EVENTS_PER_CALL {
            return Err(FeatureError::InvalidArgument(format!(
                "{} events in one batch; at most {MAX_EVENTS_PER_CALL} allowed",
                events.len()
            ))
            .into());
        }
        // Each invalid event is answered on its own; the valid rest is stored.
        let mut validated = Vec::with_capacity(events.len());
        let mut rejected = Vec::new();
        for (index, event) in events.iter().enumerate() {
            match StoredEvent::from_proto(index, event) {
                Ok(event) => validated.push(event),
                Err(error) => rejected.push(EventRejection { index: index as u32, reason: error.to_string() }),
            }
        }
        if validated.is_empty() && !rejected.is_empty() {
            let reasons: Vec<&str> = rejected.iter().take(3).map(|r| r.reason.as_str()).collect();
            let more = if rejected.len() > 3 { format!(" (and {} more)", rejected.len() - 3) } else { String::new() };
            return Err(FeatureError::InvalidArgument(format!("{}{more}", reasons.join("; "))).into());
        }
        let accepted = validated.len() as u32;
        let span = tracing::info_span!("event_append", events = accepted);
        let store = Arc::clone(&self.store);
        let appended = tokio::task::spawn_blocking(move || span.in_scope(|| store.append(&validated)))
            .await
            .map_err(|error| Status::internal(format!("event write task failed: {error}")))??;
        EVENTS_APPENDED.inc_by(appended.stored as u64);
        EVENTS_DUPLICATE.inc_by(appended.duplicates as u64);
        EVENTS_REJECTED.inc_by(rejected.len() as u64);
        Ok(Response::new(AppendEventsResponse { accepted, rejected, duplicates: appended.duplicates as u32 }))
    }
}
