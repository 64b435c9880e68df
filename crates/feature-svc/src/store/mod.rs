//! One store interface, two backends: the embedded default (redb, one file per shard) and
//! Redis for scale-out. Both hold the same data under the same definitions (`state.rs`,
//! `counters.rs`) and both acknowledge an event batch only once it is durable.

mod embedded;
pub mod redis;
#[cfg(test)]
mod tests;

use recsys_proto::v1::{ItemFeatures, UserFeatures};

pub use embedded::EmbeddedStore;
pub use redis::RedisStore;

use crate::{Result, StoredEvent};

/// What an append did: events stored now, and events whose id was stored before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Appended {
    pub stored: usize,
    pub duplicates: usize,
}

/// One item of a bundle's catalogue, as the store keeps it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BundleItem {
    pub item_id: String,
    pub stats: std::collections::BTreeMap<String, f32>,
}

/// A page of the exported event log and where the next one starts (`None`: the end).
pub struct EventPage {
    pub events: Vec<StoredEvent>,
    pub next: Option<String>,
}

#[tonic::async_trait]
pub trait FeatureStore: Send + Sync + 'static {
    /// "embedded" or "redis", for logs and metrics.
    fn backend(&self) -> &'static str;

    /// The user's profile, recent behaviour (newest first, at most `max_history`) and
    /// windowed counts as of `as_of_ms`.
    async fn user_features(&self, user_id: &str, max_history: usize, as_of_ms: i64) -> Result<UserFeatures>;

    /// Features of each item, in the order asked, in one round trip to the store.
    async fn item_features(&self, item_ids: &[String], as_of_ms: i64) -> Result<Vec<ItemFeatures>>;

    /// Durably stores `events` — but not those whose `event_id` was stored already (a
    /// retried batch) or appears earlier in the batch — and applies them to the features.
    /// Returns only once the stored events survive a crash.
    async fn append(&self, events: Vec<StoredEvent>) -> Result<Appended>;

    /// Up to `limit` stored events after `cursor` (`None`: from the start), oldest first.
    async fn export(&self, cursor: Option<String>, limit: usize) -> Result<EventPage>;

    /// The bundle version whose item statistics the store holds, if any.
    async fn bundle_version(&self) -> Result<Option<String>>;

    /// Replaces the items' bundle statistics with `version`'s, then records the version
    /// (a crash in between reloads it at the next start).
    async fn load_bundle(&self, version: &str, items: Vec<BundleItem>) -> Result<()>;
}
