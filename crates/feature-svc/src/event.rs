//! A feedback event as feature-svc stores it: validated once at the edge, then the same
//! value in every store, in the exported training data and in the counters.

use std::collections::BTreeMap;

use recsys_proto::{limits::MAX_ID_BYTES, v1::EventType};
use serde::{Deserialize, Serialize};

use crate::{FeatureError, Result};

const MAX_EXPERIMENTS: usize = 32;

/// One validated feedback event, as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub user_id: String,
    pub item_id: String,
    #[serde(with = "event_name")]
    pub event: EventType,
    pub timestamp_ms: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    #[serde(default)]
    pub value: f32,
    /// Experiment layer → variant of the response the event answers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub experiments: BTreeMap<String, String>,
    /// The client's id of the event, for deduplicating retried batches (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub event_id: String,
}

impl StoredEvent {
    /// Validates one event of a batch; `index` names it in the error.
    pub fn from_proto(index: usize, event: &recsys_proto::v1::Event) -> Result<Self> {
        let invalid = |what: &str| FeatureError::InvalidArgument(format!("events[{index}].{what}"));
        if event.user_id.is_empty() {
            return Err(invalid("user_id is empty"));
        }
        if event.item_id.is_empty() {
            return Err(invalid("item_id is empty"));
        }
        if event.user_id.len() > MAX_ID_BYTES
            || event.item_id.len() > MAX_ID_BYTES
            || event.request_id.len() > MAX_ID_BYTES
            || event.event_id.len() > MAX_ID_BYTES
        {
            return Err(invalid(&format!("ids must be at most {MAX_ID_BYTES} bytes")));
        }
        let event_type = match EventType::try_from(event.r#type) {
            Ok(EventType::Unspecified) | Err(_) => {
                return Err(invalid(&format!("type {} is not a known event type", event.r#type)))
            }
            Ok(event_type) => event_type,
        };
        if event.timestamp_ms <= 0 {
            return Err(invalid("timestamp_ms must be a positive Unix time in milliseconds"));
        }
        // A time far ahead (a clock gone wrong, microseconds sent as milliseconds) would
        // become each entity's newest event and age every real one out of its counters.
        let latest = now_ms().saturating_add(MAX_CLOCK_SKEW_MS);
        if event.timestamp_ms > latest {
            return Err(invalid(&format!(
                "timestamp_ms {} is more than a day ahead of the server's clock (Unix milliseconds expected)",
                event.timestamp_ms
            )));
        }
        if !event.value.is_finite() {
            return Err(invalid("value must be a finite number"));
        }
        if event_type == EventType::Rating && !(0.0..=5.0).contains(&event.value) {
            return Err(invalid("value must be a rating in 0..=5"));
        }
        if event.experiments.len() > MAX_EXPERIMENTS
            || event
                .experiments
                .iter()
                .any(|a| a.layer.is_empty() || a.layer.len() > MAX_ID_BYTES || a.variant.len() > MAX_ID_BYTES)
        {
            return Err(invalid(&format!(
                "experiments must be at most {MAX_EXPERIMENTS} assignments with non-empty layer names of at most {MAX_ID_BYTES} bytes"
            )));
        }
        Ok(Self {
            user_id: event.user_id.clone(),
            item_id: event.item_id.clone(),
            event: event_type,
            timestamp_ms: event.timestamp_ms,
            request_id: event.request_id.clone(),
            value: event.value,
            experiments: event.experiments.iter().map(|a| (a.layer.clone(), a.variant.clone())).collect(),
            event_id: event.event_id.clone(),
        })
    }

    pub fn to_proto(&self) -> recsys_proto::v1::Event {
        recsys_proto::v1::Event {
            user_id: self.user_id.clone(),
            item_id: self.item_id.clone(),
            r#type: self.event as i32,
            timestamp_ms: self.timestamp_ms,
            request_id: self.request_id.clone(),
            value: self.value,
            experiments: self
                .experiments
                .iter()
                .map(|(layer, variant)| recsys_proto::v1::ExperimentAssignment {
                    layer: layer.clone(),
                    variant: variant.clone(),
                })
                .collect(),
            event_id: self.event_id.clone(),
        }
    }
}

/// An event type in the log is its name (`click`); logs written before the names were
/// unified say `EVENT_TYPE_CLICK`, which still reads.
pub(crate) mod event_name {
    use recsys_proto::v1::EventType;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(event: &EventType, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(event.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<EventType, D::Error> {
        let name = String::deserialize(deserializer)?;
        EventType::from_name(&name).ok_or_else(|| D::Error::custom(format!("unknown event type {name:?}")))
    }
}

/// How far ahead of the server's clock an event's time may be.
pub const MAX_CLOCK_SKEW_MS: i64 = 24 * 3_600_000;

/// The server's clock in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// A 128-bit digest of a client's event id: what the stores remember to deduplicate
/// retried batches (ids can be 128 bytes; the digest is 16).
pub fn id_digest(id: &str) -> u128 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(id.as_bytes());
    u128::from_le_bytes(digest[..16].try_into().expect("a sha256 digest has 32 bytes"))
}

#[cfg(test)]
mod tests {
    use recsys_proto::v1::Event;

    use super::*;

    fn click() -> Event {
        Event {
            user_id: "u".into(),
            item_id: "i".into(),
            r#type: EventType::Click as i32,
            timestamp_ms: 1_700_000_000_000,
            ..Event::default()
        }
    }

    fn rejection(event: Event) -> String {
        StoredEvent::from_proto(3, &event).unwrap_err().to_string()
    }

    #[test]
    fn invalid_events_name_the_offending_field() {
        assert!(StoredEvent::from_proto(0, &click()).is_ok());
        assert_eq!(rejection(Event { item_id: String::new(), ..click() }), "events[3].item_id is empty");
        assert!(rejection(Event { r#type: 0, ..click() }).starts_with("events[3].type"));
        // A value JSON cannot carry would make the exported log unreadable.
        assert_eq!(rejection(Event { value: f32::NAN, ..click() }), "events[3].value must be a finite number");
        assert!(rejection(Event { r#type: EventType::Rating as i32, value: 7.0, ..click() }).contains("rating"));
        // Microseconds sent as milliseconds: far in the future.
        let future = rejection(Event { timestamp_ms: 1_700_000_000_000_000, ..click() });
        assert!(future.starts_with("events[3].timestamp_ms"), "{future}");
        assert!(rejection(Event { timestamp_ms: 0, ..click() }).starts_with("events[3].timestamp_ms"));
    }
}
