//! Keeps the popular fallback list fresh in the background, so that it is ready before
//! recall ever fails (a fallback that has to be fetched from a failing service is none).

use std::{sync::Arc, time::Duration};

use crate::Pipeline;

const RETRY_WHILE_EMPTY: Duration = Duration::from_secs(1);

pub async fn keep_refreshed(pipeline: Arc<Pipeline>, interval: Duration) {
    pipeline.warm_up().await;
    loop {
        let wait = match pipeline.refresh_fallback().await {
            Ok(count) => {
                tracing::debug!(count, "popular fallback refreshed");
                interval
            }
            Err(error) => {
                tracing::debug!(%error, "popular fallback not refreshed; retrying");
                RETRY_WHILE_EMPTY.min(interval)
            }
        };
        tokio::time::sleep(wait).await;
    }
}
