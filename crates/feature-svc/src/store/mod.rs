//! One store interface, two backends: the embedded default (redb, one file per shard) and
//! Redis for scale-out. Both hold the same data under the same definitions (`state.rs`,
//! `counters.rs`) and both acknowledge an event batch only once it is durable.

mod embedded;
pub mod redis;
#[cfg(test)]
mod tests;

use recsys_proto::v1::{CatalogItem, ItemFeatures, UserFeatures};

pub use embedded::EmbeddedStore;
pub use redis::RedisStore;

use crate::{Result, StoredEvent};

/// What an append did: events stored now, and events whose id was stored before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Appended {
    pub stored: usize,
    pub duplicates: usize,
}

/// One item of a bundle's catalogue, as the store keeps it: its statistics aligned with
/// the bundle's statistic names.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleItem {
    pub item_id: String,
    pub stats: Vec<f32>,
}

/// What an item read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemRead {
    /// Records and windowed counts, without the bundle's statistics: one store lookup
    /// per item fewer (`GetItemFeaturesRequest.counts_only`).
    Counts,
    /// Records, windowed counts and the current bundle's statistics.
    WithBundleStats,
}

/// Items' features and the names of their bundle statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemBatch {
    pub items: Vec<ItemFeatures>,
    pub stat_names: Vec<String>,
}

/// A bundle version's statistic names, as the stores keep them (`meta`).
fn encode_names(version: &str, names: &[String]) -> String {
    serde_json::json!({ "version": version, "names": names }).to_string()
}

fn decode_names(stored: &str) -> Option<(String, Vec<String>)> {
    #[derive(serde::Deserialize)]
    struct Stored {
        version: String,
        names: Vec<String>,
    }
    serde_json::from_str::<Stored>(stored).ok().map(|stored| (stored.version, stored.names))
}

/// Statistics as stored: little-endian f32s.
fn encode_stats(stats: &[f32]) -> Vec<u8> {
    stats.iter().flat_map(|value| value.to_le_bytes()).collect()
}

fn decode_stats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])).collect()
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

    /// Features of each item, in the order asked, in one round trip to the store; the
    /// bundle's statistics only when `read` asks for them.
    async fn item_features(&self, item_ids: &[String], as_of_ms: i64, read: ItemRead) -> Result<ItemBatch>;

    /// Durably stores `events` — but not those whose `event_id` was stored already (a
    /// retried batch) or appears earlier in the batch — and applies them to the features.
    /// Returns only once the stored events survive a crash.
    async fn append(&self, events: Vec<StoredEvent>) -> Result<Appended>;

    /// Up to `limit` stored events after `cursor` (`None`: from the start), oldest first.
    async fn export(&self, cursor: Option<String>, limit: usize) -> Result<EventPage>;

    /// The bundle version whose item statistics the store holds, if any.
    async fn bundle_version(&self) -> Result<Option<String>>;

    /// Replaces the items' bundle statistics with `version`'s (named `names`), then
    /// records the version (a crash in between reloads it at the next start).
    async fn load_bundle(&self, version: &str, names: Vec<String>, items: Vec<BundleItem>) -> Result<()>;

    /// Durably replaces each item's catalogue record, each change under the next revision
    /// (in the order given); returns the catalogue's revision after the write.
    async fn upsert_catalog(&self, items: Vec<CatalogItem>) -> Result<u64>;

    /// Up to `limit` records changed after revision `since`, by ascending revision, each
    /// with its revision set (an item changed twice appears once, at its latest revision),
    /// and the catalogue's latest revision.
    async fn catalog_changes(&self, since: u64, limit: usize) -> Result<(Vec<CatalogItem>, u64)>;
}

/// A catalogue record as stored: the proto encoding (fields can be added safely), with
/// the revision kept beside it by each store.
fn encode_catalog(item: &CatalogItem) -> Vec<u8> {
    prost::Message::encode_to_vec(&CatalogItem { revision: 0, ..item.clone() })
}

fn decode_catalog(bytes: &[u8], revision: u64) -> std::result::Result<CatalogItem, prost::DecodeError> {
    let mut item: CatalogItem = prost::Message::decode(bytes)?;
    item.revision = revision;
    Ok(item)
}
