//! What the store derives from events, one definition for every backend: a user's profile,
//! recent behaviour and counters (also per item category), and an item's category, first
//! sighting and counters. The embedded store keeps these records whole; Redis keeps the
//! same data in native structures (see `store/redis.rs`) and reads them back into these.

use std::collections::BTreeMap;

use recsys_proto::v1::{CategoryCounts, EventType, Impression, ItemFeatures, UserFeatures, UserProfile};
use serde::{Deserialize, Serialize};

use crate::{counters::Counters, StoredEvent};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub age: u32,
    pub gender: String,
    pub occupation: String,
}

/// One entry of a user's recent behaviour: the latest engagement with an item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Engagement {
    pub item_id: String,
    #[serde(with = "crate::event::event_name")]
    pub event: EventType,
    pub timestamp_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    pub profile: Option<Profile>,
    pub event_count: u64,
    /// Newest first, one entry per item, at most the store's history limit.
    pub behaviour: Vec<Engagement>,
    pub counters: Counters,
    pub categories: BTreeMap<String, Counters>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemRecord {
    pub category: String,
    /// 0 until known.
    pub first_seen_ms: i64,
    pub counters: Counters,
}

impl UserRecord {
    /// Applies one event; `category` is the item's, if the store knows it.
    pub fn apply(&mut self, event: &StoredEvent, category: &str, max_history: usize) {
        self.event_count += 1;
        self.counters.record(event.event, event.timestamp_ms);
        // Only counted kinds make a category entry (as in Redis): a rating adds no counts.
        if !category.is_empty() && crate::counters::counted_index(event.event).is_some() {
            self.categories.entry(category.to_string()).or_default().record(event.event, event.timestamp_ms);
        }
        if event.event.is_engagement() {
            self.engage(&event.item_id, event.event, event.timestamp_ms, max_history);
        }
    }

    /// Moves `item_id` to the front of the behaviour (an item appears once). An engagement
    /// older than the newest is placed by its time, so replays out of order still read
    /// newest first.
    pub fn engage(&mut self, item_id: &str, event: EventType, timestamp_ms: i64, max_history: usize) {
        if let Some(position) = self.behaviour.iter().position(|entry| entry.item_id == item_id) {
            if self.behaviour[position].timestamp_ms > timestamp_ms {
                return;
            }
            self.behaviour.remove(position);
        }
        let position = self.behaviour.partition_point(|entry| entry.timestamp_ms > timestamp_ms);
        self.behaviour.insert(position, Engagement { item_id: item_id.to_string(), event, timestamp_ms });
        self.behaviour.truncate(max_history);
    }

    pub fn to_features(&self, user_id: &str, max_history: usize, as_of_ms: i64) -> UserFeatures {
        let recent = &self.behaviour[..max_history.min(self.behaviour.len())];
        UserFeatures {
            user_id: user_id.to_string(),
            known: true,
            profile: self.profile.as_ref().map(|profile| UserProfile {
                age: profile.age,
                gender: profile.gender.clone(),
                occupation: profile.occupation.clone(),
            }),
            history_item_ids: recent.iter().map(|entry| entry.item_id.clone()).collect(),
            history_timestamps: recent.iter().map(|entry| entry.timestamp_ms / 1000).collect(),
            history_event_types: recent.iter().map(|entry| entry.event as i32).collect(),
            event_count: self.event_count,
            counts: Some(self.counters.windows(as_of_ms)),
            category_counts: self
                .categories
                .iter()
                .map(|(category, counters)| CategoryCounts {
                    category: category.clone(),
                    counts: Some(counters.windows(as_of_ms)),
                })
                .collect(),
            // Read from their own table or list by the store.
            recent_impressions: Vec::new(),
        }
    }
}

impl ItemRecord {
    pub fn apply(&mut self, event: &StoredEvent) {
        if self.first_seen_ms == 0 || event.timestamp_ms < self.first_seen_ms {
            self.first_seen_ms = event.timestamp_ms;
        }
        self.counters.record(event.event, event.timestamp_ms);
    }

    pub fn to_features(&self, item_id: &str, as_of_ms: i64) -> ItemFeatures {
        ItemFeatures {
            item_id: item_id.to_string(),
            known: true,
            category: self.category.clone(),
            first_seen_ms: self.first_seen_ms,
            counts: Some(self.counters.windows(as_of_ms)),
            ..ItemFeatures::default()
        }
    }
}

/// How many of a user's latest impressions the store keeps: rerank's exposure control
/// counts them over its window (a few hours to days of lists at a page of ten).
pub const RECENT_IMPRESSIONS: usize = 200;

/// A user's latest impressions, newest first: (item, Unix ms). Kept apart from the user
/// record (its own table, its own Redis list) because impressions are the most frequent
/// event and nothing but exposure control reads them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Impressions(pub Vec<(String, i64)>);

impl Impressions {
    /// Adds one impression in time order (a replay out of order still reads newest first)
    /// and keeps the newest `RECENT_IMPRESSIONS`.
    pub fn record(&mut self, item_id: &str, timestamp_ms: i64) {
        let position = self.0.partition_point(|(_, shown)| *shown > timestamp_ms);
        self.0.insert(position, (item_id.to_string(), timestamp_ms));
        self.0.truncate(RECENT_IMPRESSIONS);
    }

    pub fn to_proto(&self) -> Vec<Impression> {
        self.0
            .iter()
            .map(|(item_id, timestamp_ms)| Impression { item_id: item_id.clone(), timestamp_ms: *timestamp_ms })
            .collect()
    }
}

/// What the store answers for a user it has never seen.
pub fn unknown_user(user_id: &str) -> UserFeatures {
    UserFeatures { user_id: user_id.to_string(), ..UserFeatures::default() }
}

pub fn unknown_item(item_id: &str) -> ItemFeatures {
    ItemFeatures { item_id: item_id.to_string(), ..ItemFeatures::default() }
}
