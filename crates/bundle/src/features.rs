//! The ranker's input features, built here exactly as `training/recsys_training/features.py`
//! builds them, from the specification the pipeline stores in the manifest. Keeping the
//! encoding in one place on each side (and the vocabularies in the bundle) is what stops
//! training and serving from drifting apart.

use serde::{Deserialize, Serialize};

use crate::CatalogItem;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeatureSpec {
    /// Genre vocabulary: one multi-hot slot each.
    pub genres: Vec<String>,
    /// Occupation vocabulary: one one-hot slot each (unknown → all zeros).
    pub occupations: Vec<String>,
    /// Age is divided by this.
    pub age_scale: f32,
    /// `log1p(user events)` is divided by this.
    pub user_events_log_scale: f32,
    /// `log1p(item interactions)` is divided by this.
    pub item_interactions_log_scale: f32,
    pub year_min: u32,
    pub year_max: u32,
}

/// The attributes of a user the ranker sees.
#[derive(Debug, Clone, Default)]
pub struct UserAttributes<'a> {
    pub age: u32,
    pub gender: &'a str,
    pub occupation: &'a str,
    pub event_count: u64,
}

impl FeatureSpec {
    pub fn user_feature_dim(&self) -> usize {
        3 + self.occupations.len() + 1
    }

    pub fn item_feature_dim(&self) -> usize {
        self.genres.len() + 2
    }

    /// `[age, male, female, occupation one-hot…, log events]`.
    pub fn user_features(&self, user: &UserAttributes<'_>, out: &mut Vec<f32>) {
        out.push(user.age as f32 / self.age_scale);
        out.push(f32::from(u8::from(user.gender == "M")));
        out.push(f32::from(u8::from(user.gender == "F")));
        out.extend(self.occupations.iter().map(|occupation| f32::from(u8::from(occupation == user.occupation))));
        out.push((user.event_count as f32).ln_1p() / self.user_events_log_scale);
    }

    /// `[genre multi-hot…, release year in [0, 1] (0 unknown), log interactions]`.
    pub fn item_features(&self, item: &CatalogItem, out: &mut Vec<f32>) {
        out.extend(self.genres.iter().map(|genre| f32::from(u8::from(item.genres.contains(genre)))));
        let year = if item.year == 0 || self.year_max <= self.year_min {
            0.0
        } else {
            (item.year.clamp(self.year_min, self.year_max) - self.year_min) as f32
                / (self.year_max - self.year_min) as f32
        };
        out.push(year);
        out.push((item.interactions as f32).ln_1p() / self.item_interactions_log_scale);
    }
}

/// One batch of ranker inputs, flattened row-major, in the ONNX model's input order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankerInputs {
    /// 1-based index into `users.json`; 0 is the unknown user.
    pub user_index: Vec<i64>,
    /// 1-based index into `items.json`; 0 is an unknown item.
    pub item_index: Vec<i64>,
    pub user_features: Vec<f32>,
    pub item_features: Vec<f32>,
}

impl RankerInputs {
    pub fn len(&self) -> usize {
        self.item_index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.item_index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FeatureSpec {
        FeatureSpec {
            genres: vec!["Action".into(), "Comedy".into()],
            occupations: vec!["artist".into(), "student".into()],
            age_scale: 100.0,
            user_events_log_scale: 2.0,
            item_interactions_log_scale: 4.0,
            year_min: 1900,
            year_max: 2000,
        }
    }

    #[test]
    fn user_features_encode_age_gender_occupation_and_activity() {
        let mut out = Vec::new();
        let user = UserAttributes { age: 25, gender: "F", occupation: "student", event_count: 0 };
        spec().user_features(&user, &mut out);
        assert_eq!(out, vec![0.25, 0.0, 1.0, 0.0, 1.0, 0.0]);
        assert_eq!(out.len(), spec().user_feature_dim());
    }

    #[test]
    fn item_features_encode_genres_year_and_popularity() {
        let item = CatalogItem {
            id: "1".into(),
            title: "t".into(),
            genres: vec!["Comedy".into()],
            year: 1950,
            interactions: 0,
        };
        let mut out = Vec::new();
        spec().item_features(&item, &mut out);
        assert_eq!(out, vec![0.0, 1.0, 0.5, 0.0]);
        assert_eq!(out.len(), spec().item_feature_dim());
    }
}
