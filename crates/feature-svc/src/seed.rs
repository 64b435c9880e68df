//! The seed data set a store is loaded with the first time: `items.csv` (categories and
//! release times), `users.csv` (profiles) and `interactions.csv` (past events), in the
//! project's data format. Rows are streamed, so a seed of tens of millions of events is
//! never held whole.

use std::{collections::HashMap, path::Path};

use recsys_proto::v1::EventType;
use serde::Deserialize;

use crate::{
    state::{ItemRecord, Profile, UserRecord},
    FeatureError, Result, StoredEvent,
};

pub enum SeedRow {
    Item { item_id: String, category: String, release_ms: i64 },
    User { user_id: String, profile: Profile },
    Event(StoredEvent),
}

#[derive(Debug, Deserialize)]
struct InteractionRow {
    user_id: String,
    item_id: String,
    /// Unix seconds.
    timestamp: i64,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    rating: Option<f32>,
}

#[derive(Debug, Deserialize)]
struct UserRow {
    user_id: String,
    #[serde(default)]
    age: Option<u32>,
    #[serde(default)]
    gender: Option<String>,
    #[serde(default)]
    occupation: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ItemRow {
    item_id: String,
    #[serde(default)]
    genres: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    release_time: Option<i64>,
}

/// The seed's users and items as records, built in memory once (then written once each).
pub fn records(dir: &Path, max_history: usize) -> Result<(HashMap<String, UserRecord>, HashMap<String, ItemRecord>)> {
    let mut users: HashMap<String, UserRecord> = HashMap::new();
    let mut items: HashMap<String, ItemRecord> = HashMap::new();
    read(dir, |row| match row {
        SeedRow::Item { item_id, category, release_ms } => {
            let item = items.entry(item_id).or_default();
            item.category = category;
            item.first_seen_ms = release_ms;
        }
        SeedRow::User { user_id, profile } => users.entry(user_id).or_default().profile = Some(profile),
        SeedRow::Event(event) => {
            let item = items.entry(event.item_id.clone()).or_default();
            item.apply(&event);
            users.entry(event.user_id.clone()).or_default().apply(&event, &item.category, max_history);
        }
    })?;
    Ok((users, items))
}

/// Streams the seed in `dir` to `visit`: items, then users, then events. Only
/// `interactions.csv` is required.
pub fn read(dir: &Path, mut visit: impl FnMut(SeedRow)) -> Result<()> {
    let items = dir.join("items.csv");
    if items.exists() {
        each_row(&items, |row: ItemRow| {
            // An item's category is its first genre.
            let category = row.genres.as_deref().and_then(|genres| genres.split('|').next()).unwrap_or_default();
            visit(SeedRow::Item {
                item_id: row.item_id,
                category: category.to_string(),
                release_ms: row.release_time.unwrap_or(0).saturating_mul(1000),
            });
            Ok(())
        })?;
    }
    let users = dir.join("users.csv");
    if users.exists() {
        each_row(&users, |row: UserRow| {
            let profile = Profile {
                age: row.age.unwrap_or(0),
                gender: row.gender.unwrap_or_default(),
                occupation: row.occupation.unwrap_or_default(),
            };
            visit(SeedRow::User { user_id: row.user_id, profile });
            Ok(())
        })?;
    }
    let interactions = dir.join("interactions.csv");
    each_row(&interactions, |row: InteractionRow| {
        // A row without an event column is a rating (MovieLens).
        let event = match row.event.as_deref() {
            None | Some("") => EventType::Rating,
            Some(name) => EventType::from_name(name).ok_or_else(|| format!("unknown event type {name:?}"))?,
        };
        visit(SeedRow::Event(StoredEvent {
            user_id: row.user_id,
            item_id: row.item_id,
            event,
            timestamp_ms: row.timestamp.saturating_mul(1000),
            request_id: String::new(),
            value: row.rating.unwrap_or(0.0),
            experiments: Default::default(),
            event_id: String::new(),
        }));
        Ok(())
    })
}

fn each_row<T: serde::de::DeserializeOwned>(path: &Path, mut visit: impl FnMut(T) -> Result<(), String>) -> Result<()> {
    let seed_error = |reason: String| FeatureError::Seed { path: path.to_path_buf(), reason };
    let mut reader = csv::Reader::from_path(path).map_err(|error| seed_error(error.to_string()))?;
    for (line, row) in reader.deserialize::<T>().enumerate() {
        let row = row.map_err(|error| seed_error(error.to_string()))?;
        visit(row).map_err(|reason| seed_error(format!("row {}: {reason}", line + 1)))?;
    }
    Ok(())
}
