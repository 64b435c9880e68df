//! gRPC surface of feature-svc: request validation, then one call into the store.

use std::{pin::Pin, sync::Arc};

use recsys_proto::limits::{MAX_CANDIDATES, MAX_EVENTS_PER_CALL, MAX_ID_BYTES};
use recsys_proto::v1::{
    feature_service_server::{FeatureService, FeatureServiceServer},
    AppendEventsRequest, AppendEventsResponse, EventRejection, ExportEventsRequest, ExportEventsResponse,
    GetItemFeaturesRequest, GetItemFeaturesResponse, GetUserFeaturesRequest, UserFeatures,
};
use tonic::{Request, Response, Status};

use crate::{FeatureError, FeatureStore, ItemRead, StoredEvent};

/// Events per exported message.
const EXPORT_PAGE: usize = 1_000;

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
    prometheus::register_int_counter!("recsys_events_appended_total", "Feedback events durably stored")
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
    store: Arc<dyn FeatureStore>,
    max_history: usize,
}

impl FeatureGrpc {
    pub fn new(store: Arc<dyn FeatureStore>, max_history: usize) -> Self {
        Self { store, max_history }
    }

    pub fn into_server(self) -> FeatureServiceServer<Self> {
        FeatureServiceServer::new(self)
    }
}

/// The time counts are computed as of: the request's, or now.
fn as_of(as_of_ms: i64) -> Result<i64, FeatureError> {
    match as_of_ms {
        0 => Ok(crate::event::now_ms()),
        ms if ms < 0 => Err(FeatureError::InvalidArgument(format!("as_of_ms {ms} is negative"))),
        ms => Ok(ms),
    }
}

pub(crate) fn check_id(what: &str, id: &str) -> Result<(), FeatureError> {
    if id.is_empty() {
        return Err(FeatureError::InvalidArgument(format!("{what} is empty")));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(FeatureError::InvalidArgument(format!(
            "{what} is {} bytes; at most {MAX_ID_BYTES} allowed",
            id.len()
        )));
    }
    Ok(())
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ExportEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl FeatureService for FeatureGrpc {
    async fn get_user_features(
        &self,
        request: Request<GetUserFeaturesRequest>,
    ) -> Result<Response<UserFeatures>, Status> {
        let GetUserFeaturesRequest { user_id, max_history, as_of_ms } = request.into_inner();
        check_id("user_id", &user_id)?;
        let as_of_ms = as_of(as_of_ms)?;
        let limit = if max_history == 0 { self.max_history } else { (max_history as usize).min(self.max_history) };
        let features = tracing::Instrument::instrument(
            self.store.user_features(&user_id, limit, as_of_ms),
            tracing::info_span!("feature_read", backend = self.store.backend()),
        )
        .await?;
        USER_LOOKUPS.with_label_values(&[if features.known { "hit" } else { "miss" }]).inc();
        Ok(Response::new(features))
    }

    async fn get_item_features(
        &self,
        request: Request<GetItemFeaturesRequest>,
    ) -> Result<Response<GetItemFeaturesResponse>, Status> {
        let GetItemFeaturesRequest { item_ids, as_of_ms, counts_only } = request.into_inner();
        let read = if counts_only { ItemRead::Counts } else { ItemRead::WithBundleStats };
        if item_ids.len() > MAX_CANDIDATES {
            return Err(FeatureError::InvalidArgument(format!(
                "{} item_ids in one call; at most {MAX_CANDIDATES} allowed",
                item_ids.len()
            ))
            .into());
        }
        for (index, id) in item_ids.iter().enumerate() {
            check_id(&format!("item_ids[{index}]"), id)?;
        }
        let as_of_ms = as_of(as_of_ms)?;
        let batch = tracing::Instrument::instrument(
            self.store.item_features(&item_ids, as_of_ms, read),
            tracing::info_span!("item_feature_read", backend = self.store.backend(), items = item_ids.len()),
        )
        .await?;
        Ok(Response::new(GetItemFeaturesResponse { items: batch.items, bundle_stat_names: batch.stat_names }))
    }

    type ExportEventsStream = EventStream;

    async fn export_events(
        &self,
        request: Request<ExportEventsRequest>,
    ) -> Result<Response<Self::ExportEventsStream>, Status> {
        let ExportEventsRequest { since_ms, until_ms } = request.into_inner();
        if since_ms < 0 || until_ms < 0 || (until_ms > 0 && until_ms < since_ms) {
            return Err(FeatureError::InvalidArgument(format!(
                "since_ms {since_ms} and until_ms {until_ms} must be non-negative, until_ms after since_ms (0: unbounded)"
            ))
            .into());
        }
        let in_range = move |event: &StoredEvent| {
            event.timestamp_ms >= since_ms && (until_ms == 0 || event.timestamp_ms < until_ms)
        };
        let store = Arc::clone(&self.store);
        let (pages, stream) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut cursor = None;
            loop {
                let page = match store.export(cursor.take(), EXPORT_PAGE).await {
                    Ok(page) => page,
                    Err(error) => {
                        let _ = pages.send(Err(error.into())).await;
                        return;
                    }
                };
                let events = page.events.iter().filter(|event| in_range(event)).map(StoredEvent::to_proto).collect();
                if pages.send(Ok(ExportEventsResponse { events })).await.is_err() {
                    return; // the client went away
                }
                match page.next {
                    Some(next) => cursor = Some(next),
                    None => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(stream))))
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
        let appended = tracing::Instrument::instrument(
            self.store.append(validated),
            tracing::info_span!("event_append", backend = self.store.backend(), events = accepted),
        )
        .await?;
        EVENTS_APPENDED.inc_by(appended.stored as u64);
        EVENTS_DUPLICATE.inc_by(appended.duplicates as u64);
        EVENTS_REJECTED.inc_by(rejected.len() as u64);
        Ok(Response::new(AppendEventsResponse { accepted, rejected, duplicates: appended.duplicates as u32 }))
    }
}
