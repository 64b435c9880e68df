//! The orchestrator's domain, and the edge where the public API becomes it. A
//! `RecommendRequest` is converted into a [`RecommendQuery`] once (`TryFrom`), or rejected
//! with INVALID_ARGUMENT naming the field and the limit; everything behind this point
//! trusts the query. The limits are the request path's shared ones
//! (`recsys_proto::limits`), so a leaf never accepts less than the edge lets through.

use std::{collections::HashMap, fmt};

use recsys_proto::{
    limits::{
        MAX_CONTEXT_ENTRIES, MAX_CONTEXT_VALUE_BYTES, MAX_EXCLUDED_ITEMS, MAX_ID_BYTES, MAX_SCENE_BYTES, MAX_TOP_K,
    },
    v1::{Channel, RecommendRequest},
    REQUEST_TIME_CONTEXT_KEY,
};
use serde::{Deserialize, Serialize};

use crate::OrchestratorError;

/// A user id that passed the edge: non-empty, bounded, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

/// An item id that passed the edge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ItemId(String);

impl UserId {
    pub fn parse(field: &str, value: String) -> Result<Self, OrchestratorError> {
        check_id(field, &value).map(|()| Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ItemId {
    pub fn parse(field: &str, value: String) -> Result<Self, OrchestratorError> {
        check_id(field, &value).map(|()| Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The moment a request is served for, in Unix seconds: the rankers' time features
/// describe it. Absent for live traffic (rank-svc's clock is used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTime(pub i64);

/// A stage of the request path: the unit of budgets, fallbacks and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Feature,
    Recall,
    Rank,
    Rerank,
}

impl Stage {
    /// The name in `degraded_stages`, logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Feature => "feature",
            Stage::Recall => "recall",
            Stage::Rank => "rank",
            Stage::Rerank => "rerank",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A ranking track: the stable rank-svc or the canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Track {
    Stable,
    Canary,
}

impl Track {
    /// The pseudo experiment layer a response names its track under, so clients echo it
    /// on `LogEvents` like any assignment and online CTR is counted per track too.
    pub const LAYER: &'static str = "rank_track";

    pub fn name(self) -> &'static str {
        match self {
            Track::Stable => "stable",
            Track::Canary => "canary",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Track::Stable, Track::Canary].into_iter().find(|track| track.name() == name)
    }
}

/// A recall channel as configuration names it (`item_cf`, …). Unknown names fail when
/// the configuration is loaded, naming the channel and the known ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(pub Channel);

impl Serialize for ChannelName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.name())
    }
}

impl<'de> Deserialize<'de> for ChannelName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Channel::from_name(&name).map(ChannelName).ok_or_else(|| {
            let known: Vec<&str> = Channel::ALL.iter().map(|channel| channel.name()).collect();
            serde::de::Error::custom(format!("unknown recall channel {name:?} (known: {})", known.join(", ")))
        })
    }
}

/// A request that passed the edge.
#[derive(Debug, Clone, PartialEq)]
pub struct RecommendQuery {
    pub user_id: UserId,
    pub top_k: u32,
    /// The configured scene the request names; `None` serves with the defaults.
    pub scene: Option<String>,
    pub request_time: Option<RequestTime>,
    pub exclude_item_ids: Vec<ItemId>,
    pub debug: bool,
    /// The request context (region, age, device...): rerank's rules compare with it.
    pub context: std::collections::BTreeMap<String, String>,
}

impl TryFrom<RecommendRequest> for RecommendQuery {
    type Error = OrchestratorError;

    fn try_from(request: RecommendRequest) -> Result<Self, Self::Error> {
        // Destructured whole, so a new proto field cannot be ignored by accident.
        let RecommendRequest { user_id, top_k, scene, context, exclude_item_ids, debug } = request;
        let user_id = UserId::parse("user_id", user_id)?;
        if top_k == 0 || top_k > MAX_TOP_K {
            return invalid(format!("top_k must be between 1 and {MAX_TOP_K}, got {top_k}"));
        }
        if scene.len() > MAX_SCENE_BYTES {
            return invalid(format!("scene is {} bytes; at most {MAX_SCENE_BYTES} allowed", scene.len()));
        }
        if scene.chars().any(char::is_control) {
            return invalid("scene contains control characters".into());
        }
        let request_time = check_context(&context)?;
        if exclude_item_ids.len() > MAX_EXCLUDED_ITEMS {
            return invalid(format!(
                "exclude_item_ids has {} entries; at most {MAX_EXCLUDED_ITEMS} allowed",
                exclude_item_ids.len()
            ));
        }
        let exclude_item_ids = exclude_item_ids
            .into_iter()
            .enumerate()
            .map(|(index, id)| ItemId::parse(&format!("exclude_item_ids[{index}]"), id))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            user_id,
            top_k,
            scene: (!scene.is_empty()).then_some(scene),
            request_time,
            exclude_item_ids,
            debug,
            context: context.into_iter().collect(),
        })
    }
}

/// Checks the context map and returns the request time it carries. The other entries go
/// to rerank's rules (and are bounded because they are logged).
fn check_context(context: &HashMap<String, String>) -> Result<Option<RequestTime>, OrchestratorError> {
    if context.len() > MAX_CONTEXT_ENTRIES {
        return invalid(format!("context has {} entries; at most {MAX_CONTEXT_ENTRIES} allowed", context.len()));
    }
    for (key, value) in context {
        if key.is_empty() || key.len() > MAX_ID_BYTES {
            return invalid(format!("context keys must be 1 to {MAX_ID_BYTES} bytes"));
        }
        if value.len() > MAX_CONTEXT_VALUE_BYTES {
            return invalid(format!(
                "context[{key:?}] is {} bytes; at most {MAX_CONTEXT_VALUE_BYTES} allowed",
                value.len()
            ));
        }
    }
    context
        .get(REQUEST_TIME_CONTEXT_KEY)
        .map(|value| match value.trim().parse::<i64>() {
            Ok(seconds) if seconds >= 0 => Ok(RequestTime(seconds)),
            _ => invalid(format!("context[{REQUEST_TIME_CONTEXT_KEY:?}] = {value:?} is not Unix seconds (>= 0)")),
        })
        .transpose()
}

fn invalid<T>(message: String) -> Result<T, OrchestratorError> {
    Err(OrchestratorError::InvalidArgument(message))
}

fn check_id(field: &str, value: &str) -> Result<(), OrchestratorError> {
    if value.is_empty() {
        return invalid(format!("{field} is empty"));
    }
    if value.len() > MAX_ID_BYTES {
        return invalid(format!("{field} is {} bytes; at most {MAX_ID_BYTES} allowed", value.len()));
    }
    if value.chars().any(char::is_control) {
        return invalid(format!("{field} contains control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> RecommendRequest {
        RecommendRequest { user_id: "196".into(), top_k: 10, ..RecommendRequest::default() }
    }

    fn rejection(request: RecommendRequest) -> String {
        RecommendQuery::try_from(request).unwrap_err().to_string()
    }

    #[test]
    fn a_plain_request_becomes_a_typed_query() {
        let query = RecommendQuery::try_from(request()).unwrap();
        assert_eq!(query.user_id.as_str(), "196");
        assert_eq!(query.top_k, 10);
        assert_eq!(query.scene, None);
        assert_eq!(query.request_time, None);
    }

    #[test]
    fn the_request_time_is_parsed_once_here() {
        let mut bad = request();
        bad.context.insert(REQUEST_TIME_CONTEXT_KEY.into(), "tomorrow".into());
        assert_eq!(rejection(bad.clone()), "context[\"request_time\"] = \"tomorrow\" is not Unix seconds (>= 0)");
        bad.context.insert(REQUEST_TIME_CONTEXT_KEY.into(), "-1".into());
        assert!(rejection(bad).contains("is not Unix seconds"), "a negative time is refused at the edge");
        let mut good = request();
        good.context.insert(REQUEST_TIME_CONTEXT_KEY.into(), " 893286638".into());
        assert_eq!(RecommendQuery::try_from(good).unwrap().request_time, Some(RequestTime(893_286_638)));
    }

    #[test]
    fn top_k_out_of_range_is_rejected_with_the_range() {
        assert_eq!(rejection(RecommendRequest { top_k: 0, ..request() }), "top_k must be between 1 and 200, got 0");
        assert!(rejection(RecommendRequest { top_k: u32::MAX, ..request() }).contains("top_k"));
    }

    #[test]
    fn empty_or_oversized_user_id_is_rejected() {
        assert_eq!(rejection(RecommendRequest { user_id: String::new(), ..request() }), "user_id is empty");
        let long = RecommendRequest { user_id: "x".repeat(10_000), ..request() };
        assert_eq!(rejection(long), "user_id is 10000 bytes; at most 128 allowed");
        let control = RecommendRequest { user_id: "a\u{0}b".into(), ..request() };
        assert!(rejection(control).contains("control"));
    }

    #[test]
    fn oversized_collections_are_rejected() {
        let excluded = RecommendRequest { exclude_item_ids: vec!["1".into(); 5_000], ..request() };
        assert!(rejection(excluded).contains("exclude_item_ids has 5000 entries"));
        let context =
            RecommendRequest { context: (0..100).map(|n| (n.to_string(), String::new())).collect(), ..request() };
        assert!(rejection(context).contains("context has 100 entries"));
        let empty_item = RecommendRequest { exclude_item_ids: vec![String::new()], ..request() };
        assert_eq!(rejection(empty_item), "exclude_item_ids[0] is empty");
    }

    #[test]
    fn a_scene_is_kept_and_an_empty_one_means_none() {
        let query = RecommendQuery::try_from(RecommendRequest { scene: "home".into(), ..request() }).unwrap();
        assert_eq!(query.scene.as_deref(), Some("home"));
        assert!(rejection(RecommendRequest { scene: "s".repeat(65), ..request() }).contains("scene is 65 bytes"));
    }

    #[test]
    fn channel_names_are_checked_when_configuration_is_read() {
        let known: ChannelName = serde_json::from_str("\"item_cf\"").unwrap();
        assert_eq!(known.0, Channel::ItemCf);
        let unknown = serde_json::from_str::<ChannelName>("\"itemcf\"").unwrap_err().to_string();
        assert!(unknown.contains("unknown recall channel \"itemcf\""), "{unknown}");
        assert!(unknown.contains("item_cf"), "the known names are listed: {unknown}");
        assert!(serde_json::from_str::<ChannelName>("\"unspecified\"").is_err());
    }
}
