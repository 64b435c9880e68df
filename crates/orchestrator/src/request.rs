//! Validation at the edge: a `RecommendRequest` becomes a `RecommendQuery` once, or is
//! rejected with INVALID_ARGUMENT naming the field and the limit. Everything behind this
//! point trusts the query.

use std::collections::HashMap;

use recsys_proto::{v1::RecommendRequest, REQUEST_TIME_CONTEXT_KEY};
use serde::{Deserialize, Serialize};

use crate::OrchestratorError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestLimits {
    pub max_top_k: u32,
    pub max_id_bytes: usize,
    pub max_scene_bytes: usize,
    pub max_context_entries: usize,
    pub max_context_value_bytes: usize,
    pub max_excluded_items: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_top_k: 200,
            max_id_bytes: 128,
            max_scene_bytes: 64,
            max_context_entries: 32,
            max_context_value_bytes: 256,
            max_excluded_items: 1_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RecommendQuery {
    pub user_id: String,
    pub top_k: u32,
    pub scene: String,
    pub context: HashMap<String, String>,
    pub exclude_item_ids: Vec<String>,
    pub debug: bool,
}

impl RecommendQuery {
    pub fn parse(request: RecommendRequest, limits: &RequestLimits) -> Result<Self, OrchestratorError> {
        // Destructured whole, so a new proto field cannot be ignored by accident.
        let RecommendRequest { user_id, top_k, scene, context, exclude_item_ids, debug } = request;
        let invalid = |message: String| Err(OrchestratorError::InvalidArgument(message));
        check_id("user_id", &user_id, limits.max_id_bytes)?;
        if top_k == 0 || top_k > limits.max_top_k {
            return invalid(format!("top_k must be between 1 and {}, got {top_k}", limits.max_top_k));
        }
        if scene.len() > limits.max_scene_bytes {
            return invalid(format!("scene is {} bytes; at most {} allowed", scene.len(), limits.max_scene_bytes));
        }
        if context.len() > limits.max_context_entries {
            return invalid(format!(
                "context has {} entries; at most {} allowed",
                context.len(),
                limits.max_context_entries
            ));
        }
        for (key, value) in &context {
            if key.is_empty() || key.len() > limits.max_id_bytes {
                return invalid(format!("context keys must be 1 to {} bytes", limits.max_id_bytes));
            }
            if value.len() > limits.max_context_value_bytes {
                return invalid(format!(
                    "context[{key:?}] is {} bytes; at most {} allowed",
                    value.len(),
                    limits.max_context_value_bytes
                ));
            }
        }
        if let Some(value) = context.get(REQUEST_TIME_CONTEXT_KEY) {
            if value.trim().parse::<i64>().is_err() {
                return invalid(format!("context[{REQUEST_TIME_CONTEXT_KEY:?}] = {value:?} is not Unix seconds"));
            }
        }
        if exclude_item_ids.len() > limits.max_excluded_items {
            return invalid(format!(
                "exclude_item_ids has {} entries; at most {} allowed",
                exclude_item_ids.len(),
                limits.max_excluded_items
            ));
        }
        for (index, item_id) in exclude_item_ids.iter().enumerate() {
            check_id(&format!("exclude_item_ids[{index}]"), item_id, limits.max_id_bytes)?;
        }
        Ok(Self { user_id, top_k, scene, context, exclude_item_ids, debug })
    }
}

fn check_id(field: &str, value: &str, max_bytes: usize) -> Result<(), OrchestratorError> {
    if value.is_empty() {
        return Err(OrchestratorError::InvalidArgument(format!("{field} is empty")));
    }
    if value.len() > max_bytes {
        return Err(OrchestratorError::InvalidArgument(format!(
            "{field} is {} bytes; at most {max_bytes} allowed",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(OrchestratorError::InvalidArgument(format!("{field} contains control characters")));
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
        RecommendQuery::parse(request, &RequestLimits::default()).unwrap_err().to_string()
    }

    #[test]
    fn a_request_time_must_be_unix_seconds() {
        let mut bad = request();
        bad.context.insert(REQUEST_TIME_CONTEXT_KEY.into(), "tomorrow".into());
        assert!(rejection(bad).contains("request_time"));
        let mut good = request();
        good.context.insert(REQUEST_TIME_CONTEXT_KEY.into(), "893286638".into());
        assert!(RecommendQuery::parse(good, &RequestLimits::default()).is_ok());
    }

    #[test]
    fn a_plain_request_is_accepted() {
        let query = RecommendQuery::parse(request(), &RequestLimits::default()).unwrap();
        assert_eq!(query.user_id, "196");
        assert_eq!(query.top_k, 10);
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
}
