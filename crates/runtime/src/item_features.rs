//! feature-svc's batch item read (`GetItemFeatures`) as its readers see it: rank-svc reads
//! the fine stage's candidates' windowed counts, rerank-svc its window's when a rule names
//! a count. Behind a trait so the whole-path benchmark's compute floor (`bench-path`) can
//! answer from feature-svc's handler in the same process, without the network.

use std::time::Duration;

use recsys_proto::v1::{feature_service_client::FeatureServiceClient, GetItemFeaturesRequest, GetItemFeaturesResponse};
use tonic::{Request, Status};

use crate::Tls;

#[tonic::async_trait]
pub trait ItemFeatureSource: Send + Sync {
    async fn item_features(
        &self,
        request: GetItemFeaturesRequest,
        timeout: Duration,
    ) -> Result<GetItemFeaturesResponse, Status>;
}

#[tonic::async_trait]
impl ItemFeatureSource for FeatureServiceClient<tonic::transport::Channel> {
    async fn item_features(
        &self,
        request: GetItemFeaturesRequest,
        timeout: Duration,
    ) -> Result<GetItemFeaturesResponse, Status> {
        let mut request = Request::new(request);
        request.set_timeout(timeout);
        // The read is part of the request's trace.
        crate::telemetry::inject_trace_context(request.metadata_mut());
        // The deadline goes to feature-svc and bounds the wait here too (a connection that
        // hangs is not feature-svc's to time out).
        let mut client = self.clone();
        match tokio::time::timeout(timeout, client.get_item_features(request)).await {
            Ok(answer) => Ok(answer?.into_inner()),
            Err(_) => Err(Status::deadline_exceeded("feature-svc's item features were late")),
        }
    }
}

/// A lazily connected feature-svc client at `address`; `None` when the address is empty
/// (not configured) or invalid (logged).
pub fn feature_client(address: &str, tls: &Tls) -> Option<std::sync::Arc<dyn ItemFeatureSource>> {
    if address.is_empty() {
        return None;
    }
    match crate::client::lazy_channel(address, Duration::from_secs(1), tls) {
        Ok(channel) => Some(std::sync::Arc::new(FeatureServiceClient::new(channel))),
        Err(error) => {
            tracing::error!(feature = %address, %error, "feature-svc address is invalid; item features not read");
            None
        }
    }
}
