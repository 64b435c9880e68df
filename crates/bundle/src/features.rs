//! The ranker's input features, assembled from the resolved feature configuration that
//! training stores in the manifest (`training/feature_config.toml` is the declarative
//! source). Each encoding here mirrors `training/recsys_training/features.py`; the bundle's
//! `ranker_fixture.json` and rank-svc's bundle test prove the two build identical tensors.

use serde::{Deserialize, Serialize};

use crate::{AttributeCross, CatalogItem};

const DAY_SECONDS: i64 = 86_400;

/// `item_cf_recent_score` looks at this many of the latest history items.
pub const RECENT_ITEMS: usize = 10;

/// A user-item cross feature rank-svc computes per candidate (see
/// `training/feature_config.toml` for what each one is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrossSource {
    ItemCfScore,
    ItemCfZscore,
    ItemCfRecentScore,
    EmbeddingScore,
    EmbeddingZscore,
    /// The configuration's `attribute_crosses[n]`: an automated user × item attribute cross.
    Attribute(usize),
}

impl CrossSource {
    /// A built-in source by name (an attribute cross is named by its configuration:
    /// [`FeatureConfig::cross_source`]).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "item_cf_score" => Self::ItemCfScore,
            "item_cf_zscore" => Self::ItemCfZscore,
            "item_cf_recent_score" => Self::ItemCfRecentScore,
            "embedding_score" => Self::EmbeddingScore,
            "embedding_zscore" => Self::EmbeddingZscore,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// `value / scale`.
    Scale,
    /// `ln(1 + value) / scale`.
    Log1p,
    /// `(clamp(value, min, max) - min) / (max - min)`; 0 for a 0 (unknown) value.
    MinMax,
    /// One slot per vocabulary entry; an unknown value is all zeros.
    OneHot,
    /// One slot per vocabulary entry, for list-valued sources.
    MultiHot,
    /// The value as computed.
    Identity,
}

/// One resolved feature: where its value comes from and how it is encoded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Feature {
    pub source: String,
    pub encoding: Encoding,
    #[serde(default = "one")]
    pub scale: f32,
    #[serde(default)]
    pub min: f32,
    #[serde(default)]
    pub max: f32,
    #[serde(default)]
    pub vocabulary: Vec<String>,
    /// `scale` / `log1p` values stop at 1.
    #[serde(default)]
    pub clip: bool,
}

fn one() -> f32 {
    1.0
}

/// A raw source value before encoding.
#[derive(Debug, Clone, Copy)]
pub enum SourceValue<'a> {
    Number(f64),
    Text(&'a str),
    List(&'a [String]),
}

impl Feature {
    pub fn width(&self) -> usize {
        match self.encoding {
            Encoding::OneHot | Encoding::MultiHot => self.vocabulary.len(),
            _ => 1,
        }
    }

    fn encode(&self, value: SourceValue<'_>, out: &mut Vec<f32>) {
        let flag = |hit: bool| f32::from(u8::from(hit));
        match (self.encoding, value) {
            (Encoding::OneHot, SourceValue::Text(text)) => out.extend(self.vocabulary.iter().map(|v| flag(v == text))),
            (Encoding::MultiHot, SourceValue::List(values)) => {
                out.extend(self.vocabulary.iter().map(|v| flag(values.contains(v))))
            }
            (Encoding::OneHot | Encoding::MultiHot, _) => out.extend(std::iter::repeat_n(0.0, self.width())),
            (encoding, value) => {
                let number = match value {
                    SourceValue::Number(number) => number,
                    _ => 0.0,
                };
                let clip = |value: f64| if self.clip { value.min(1.0) } else { value };
                out.push(match encoding {
                    Encoding::Scale => clip(number / f64::from(self.scale)) as f32,
                    Encoding::Log1p => clip(number.ln_1p() / f64::from(self.scale)) as f32,
                    Encoding::MinMax if number == 0.0 || self.max <= self.min => 0.0,
                    Encoding::MinMax => {
                        let (min, max) = (f64::from(self.min), f64::from(self.max));
                        ((number.clamp(min, max) - min) / (max - min)) as f32
                    }
                    _ => number as f32,
                });
            }
        }
    }
}

/// The resolved feature configuration (manifest `feature_config`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FeatureConfig {
    /// "din", "deepfm" or "wide_deep": informational here, the ONNX graph is what runs.
    pub fine_model: String,
    pub coarse_model: String,
    pub embedding_dim: usize,
    /// Length of the behaviour sequence input (latest items, 0-padded).
    pub history_length: usize,
    pub user: Vec<Feature>,
    pub item: Vec<Feature>,
    /// Cross feature names, in column order (computed by rank-svc per candidate).
    pub cross: Vec<String>,
    /// Columns of `cross` the coarse model reads (it selects them inside its graph).
    #[serde(default)]
    pub coarse_cross: Vec<usize>,
    /// The candidate's windowed counts as of the request, read from the feature store for
    /// the fine stage's candidates (`<measure>_<window>`, see [`LiveItemSource`]); they follow
    /// the `item` columns in the fine model's item input. Empty when the training data had
    /// no counted events (MovieLens has ratings only).
    #[serde(default)]
    pub live_item: Vec<Feature>,
    /// The automated crosses training kept (their names are `cross` columns).
    #[serde(default)]
    pub attribute_crosses: Vec<AttributeCross>,
}

/// A window of the feature store's counters (`WindowedCounts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountWindow {
    LastHour,
    LastDay,
    Last7Days,
    Last30Days,
}

/// What is counted in a window (`EventCounts`); CTR is the store's smoothed one, 0 where
/// the window has no impressions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountMeasure {
    Impressions,
    Clicks,
    Likes,
    Purchases,
    Ctr,
}

/// One item's windowed counts as the feature store serves them, by window then measure
/// (the enums' order).
pub type ItemWindowCounts = [[f64; 5]; 4];

/// A live item source, `<measure>_<window>`: e.g. `clicks_last_7_days`, `ctr_last_day`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveItemSource {
    pub measure: CountMeasure,
    pub window: CountWindow,
}

impl LiveItemSource {
    pub fn parse(name: &str) -> Option<Self> {
        const WINDOWS: [(&str, CountWindow); 4] = [
            ("_last_hour", CountWindow::LastHour),
            ("_last_day", CountWindow::LastDay),
            ("_last_7_days", CountWindow::Last7Days),
            ("_last_30_days", CountWindow::Last30Days),
        ];
        let (measure, window) =
            WINDOWS.iter().find_map(|&(suffix, window)| Some((name.strip_suffix(suffix)?, window)))?;
        let measure = match measure {
            "impressions" => CountMeasure::Impressions,
            "clicks" => CountMeasure::Clicks,
            "likes" => CountMeasure::Likes,
            "purchases" => CountMeasure::Purchases,
            "ctr" => CountMeasure::Ctr,
            _ => return None,
        };
        Some(Self { measure, window })
    }

    pub fn value(self, counts: &ItemWindowCounts) -> f64 {
        counts[self.window as usize][self.measure as usize]
    }
}

/// What the ranker knows about the user of a request.
#[derive(Debug, Clone, Default)]
pub struct UserAttributes<'a> {
    pub age: u32,
    pub gender: &'a str,
    pub occupation: &'a str,
    pub event_count: u64,
    /// Unix seconds of the history entries, most recent first.
    pub history_timestamps: &'a [i64],
    /// Unix seconds of the request (context features).
    pub request_time: i64,
}

/// The request-time sources: UTC hour and weekday on the unit circle (so 23:00 is next to
/// 00:00) and the hours since the user's latest event.
fn time_context(source: &str, request_time: i64, latest_event: Option<i64>) -> Option<f64> {
    use std::f64::consts::TAU;
    let hour = request_time.rem_euclid(DAY_SECONDS) / 3600;
    // 1970-01-01 was a Thursday; Monday = 0.
    let weekday = (request_time.div_euclid(DAY_SECONDS) + 3).rem_euclid(7);
    Some(match source {
        "hour_sin" => (TAU * hour as f64 / 24.0).sin(),
        "hour_cos" => (TAU * hour as f64 / 24.0).cos(),
        "weekday_sin" => (TAU * weekday as f64 / 7.0).sin(),
        "weekday_cos" => (TAU * weekday as f64 / 7.0).cos(),
        "hours_since_last_event" => {
            latest_event.map_or(0.0, |latest| request_time.saturating_sub(latest).max(0) as f64 / 3600.0)
        }
        _ => return None,
    })
}

/// `events_<N>d` / `interactions_<N>d` → N.
fn window_days(source: &str, prefix: &str) -> Option<i64> {
    source.strip_prefix(prefix)?.strip_suffix('d')?.parse().ok()
}

impl FeatureConfig {
    pub fn user_dim(&self) -> usize {
        self.user.iter().map(Feature::width).sum()
    }

    pub fn item_dim(&self) -> usize {
        self.item.iter().map(Feature::width).sum()
    }

    pub fn cross_dim(&self) -> usize {
        self.cross.len()
    }

    pub fn live_item_dim(&self) -> usize {
        self.live_item.iter().map(Feature::width).sum()
    }

    /// Column of a single-width user feature by source name.
    pub fn user_offset(&self, source: &str) -> Option<usize> {
        offset(&self.user, source)
    }

    pub fn item_offset(&self, source: &str) -> Option<usize> {
        offset(&self.item, source)
    }

    /// A cross column's source: built in, or one of the configuration's attribute crosses.
    pub fn cross_source(&self, name: &str) -> Option<CrossSource> {
        CrossSource::parse(name)
            .or_else(|| self.attribute_crosses.iter().position(|cross| cross.name == name).map(CrossSource::Attribute))
    }

    /// Sources this code cannot provide, so a bundle from a newer pipeline is refused at
    /// load time instead of being fed zeros.
    pub fn unknown_sources(&self) -> Vec<String> {
        let user = self.user.iter().map(|f| f.source.as_str()).filter(|s| {
            !matches!(*s, "age" | "gender" | "occupation" | "event_count")
                && window_days(s, "events_").is_none()
                && time_context(s, 0, None).is_none()
        });
        let cross = self.cross.iter().map(String::as_str).filter(|s| self.cross_source(s).is_none());
        let live = self.live_item.iter().map(|f| f.source.as_str()).filter(|s| LiveItemSource::parse(s).is_none());
        user.chain(cross).chain(live).map(String::from).collect()
    }

    pub fn user_features(&self, user: &UserAttributes<'_>, out: &mut Vec<f32>) {
        let latest_event = user.history_timestamps.iter().copied().max();
        let latest = latest_event.unwrap_or(0);
        for feature in &self.user {
            let value = match feature.source.as_str() {
                "age" => SourceValue::Number(f64::from(user.age)),
                "gender" => SourceValue::Text(user.gender),
                "occupation" => SourceValue::Text(user.occupation),
                "event_count" => SourceValue::Number(user.event_count as f64),
                source => match window_days(source, "events_") {
                    Some(days) => SourceValue::Number(
                        user.history_timestamps
                            .iter()
                            .filter(|&&t| latest.saturating_sub(t) < days * DAY_SECONDS)
                            .count() as f64,
                    ),
                    None => {
                        SourceValue::Number(time_context(source, user.request_time, latest_event).unwrap_or_default())
                    }
                },
            };
            feature.encode(value, out);
        }
    }

    /// Item attributes come from the catalog, statistics from the catalog's `stats`
    /// (computed when the bundle was trained); a missing statistic encodes as 0.
    pub fn item_features(&self, item: &CatalogItem, out: &mut Vec<f32>) {
        for feature in &self.item {
            let value = match feature.source.as_str() {
                "genres" => SourceValue::List(&item.genres),
                "year" => SourceValue::Number(f64::from(item.year)),
                source => SourceValue::Number(item.stats.get(source).copied().unwrap_or_default()),
            };
            feature.encode(value, out);
        }
    }
}

impl FeatureConfig {
    /// The live item columns of one candidate from its windowed counts (all zeros when the
    /// store could not answer: `counts` is then `None`).
    pub fn live_item_features(&self, counts: Option<&ItemWindowCounts>, out: &mut Vec<f32>) {
        for feature in &self.live_item {
            let value = match (counts, LiveItemSource::parse(&feature.source)) {
                (Some(counts), Some(source)) => source.value(counts),
                _ => 0.0,
            };
            feature.encode(SourceValue::Number(value), out);
        }
    }
}

fn offset(features: &[Feature], source: &str) -> Option<usize> {
    let mut column = 0;
    for feature in features {
        if feature.source == source {
            return Some(column);
        }
        column += feature.width();
    }
    None
}

/// One batch of fine-ranker inputs, flattened row-major, in the ONNX model's input order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankerInputs {
    /// 1-based index into `users.json`; 0 is the unknown user.
    pub user_index: Vec<i64>,
    /// 1-based index into `items.json`; 0 is an unknown item.
    pub item_index: Vec<i64>,
    /// `history_length` 1-based item indices per row, latest first, 0-padded.
    pub history: Vec<i64>,
    pub user_features: Vec<f32>,
    pub item_features: Vec<f32>,
    pub cross_features: Vec<f32>,
}

impl RankerInputs {
    pub fn len(&self) -> usize {
        self.item_index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.item_index.is_empty()
    }

    /// Empties every tensor, keeping the buffers for the next batch.
    pub fn clear(&mut self) {
        self.user_index.clear();
        self.item_index.clear();
        self.history.clear();
        self.user_features.clear();
        self.item_features.clear();
        self.cross_features.clear();
    }

    /// Appends `other`'s rows (same feature configuration) after this batch's.
    pub fn extend_from(&mut self, other: &RankerInputs) {
        self.user_index.extend_from_slice(&other.user_index);
        self.item_index.extend_from_slice(&other.item_index);
        self.history.extend_from_slice(&other.history);
        self.user_features.extend_from_slice(&other.user_features);
        self.item_features.extend_from_slice(&other.item_features);
        self.cross_features.extend_from_slice(&other.cross_features);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn feature(source: &str, encoding: Encoding) -> Feature {
        Feature { source: source.into(), encoding, scale: 1.0, min: 0.0, max: 0.0, vocabulary: Vec::new(), clip: false }
    }

    /// The same configuration as `training/tests/test_features.py`, which asserts the
    /// same vectors: the two encoders must agree.
    fn config() -> FeatureConfig {
        FeatureConfig {
            fine_model: "din".into(),
            coarse_model: "mlp".into(),
            embedding_dim: 4,
            history_length: 3,
            user: vec![
                Feature { scale: 100.0, ..feature("age", Encoding::Scale) },
                Feature { vocabulary: vec!["M".into(), "F".into()], ..feature("gender", Encoding::OneHot) },
                Feature {
                    vocabulary: vec!["artist".into(), "student".into()],
                    ..feature("occupation", Encoding::OneHot)
                },
                Feature { scale: 2.0, ..feature("event_count", Encoding::Log1p) },
                feature("events_1d", Encoding::Scale),
                feature("hour_cos", Encoding::Identity),
                feature("weekday_sin", Encoding::Identity),
                Feature { scale: 2.0, clip: true, ..feature("hours_since_last_event", Encoding::Log1p) },
            ],
            item: vec![
                Feature { vocabulary: vec!["Action".into(), "Comedy".into()], ..feature("genres", Encoding::MultiHot) },
                Feature { min: 1900.0, max: 2000.0, ..feature("year", Encoding::MinMax) },
                Feature { scale: 4.0, ..feature("interactions", Encoding::Log1p) },
                feature("like_rate", Encoding::Scale),
            ],
            cross: vec!["item_cf_score".into()],
            coarse_cross: vec![0],
            live_item: vec![
                Feature { scale: 2.0, ..feature("clicks_last_7_days", Encoding::Log1p) },
                feature("ctr_last_day", Encoding::Scale),
            ],
            attribute_crosses: Vec::new(),
        }
    }

    #[test]
    fn live_item_features_read_the_named_window_and_measure() {
        let mut counts: ItemWindowCounts = [[0.0; 5]; 4];
        counts[CountWindow::Last7Days as usize][CountMeasure::Clicks as usize] = std::f64::consts::E - 1.0;
        counts[CountWindow::LastDay as usize][CountMeasure::Ctr as usize] = 0.25;
        let mut out = Vec::new();
        config().live_item_features(Some(&counts), &mut out);
        assert!((out[0] - 0.5).abs() < 1e-6, "log1p(e - 1) / 2: {}", out[0]);
        assert_eq!(out[1], 0.25);
        out.clear();
        config().live_item_features(None, &mut out);
        assert_eq!(out, vec![0.0, 0.0], "unknown counts encode as zeros");
        assert_eq!(config().live_item_dim(), 2);
        assert_eq!(
            LiveItemSource::parse("purchases_last_hour"),
            Some(LiveItemSource { measure: CountMeasure::Purchases, window: CountWindow::LastHour })
        );
        assert_eq!(LiveItemSource::parse("clicks_last_week"), None);
        assert_eq!(LiveItemSource::parse("views_last_day"), None);
    }

    #[test]
    fn user_features_encode_attributes_activity_and_windows() {
        let mut out = Vec::new();
        let timestamps = [200_000, 190_000, 100_000];
        let user = UserAttributes {
            age: 25,
            gender: "F",
            occupation: "student",
            event_count: 0,
            history_timestamps: &timestamps,
            // Monday 1970-01-05 12:00 UTC, 2 days after the latest event.
            request_time: 4 * 86_400 + 12 * 3_600,
        };
        config().user_features(&user, &mut out);
        assert_eq!(out[..7], [0.25, 0.0, 1.0, 0.0, 1.0, 0.0, 2.0]);
        assert!((out[7] + 1.0).abs() < 1e-6, "cos of noon is -1: {}", out[7]);
        assert!(out[8].abs() < 1e-6, "Monday is weekday 0: {}", out[8]);
        assert_eq!(out[9], 1.0, "log1p(~100 h) / 2 is clipped at 1");
        assert_eq!(out.len(), config().user_dim());
        assert_eq!(config().user_offset("event_count"), Some(5));
    }

    #[test]
    fn item_features_encode_genres_year_and_statistics() {
        let item = CatalogItem {
            id: "1".into(),
            title: "t".into(),
            genres: vec!["Comedy".into()],
            year: 1950,
            interactions: 0,
            stats: HashMap::from([("like_rate".to_string(), 0.75)]),
        };
        let mut out = Vec::new();
        config().item_features(&item, &mut out);
        assert_eq!(out, vec![0.0, 1.0, 0.5, 0.0, 0.75]);
        assert_eq!(out.len(), config().item_dim());
    }

    #[test]
    fn unknown_sources_are_reported() {
        let mut config = config();
        assert!(config.unknown_sources().is_empty());
        config.user.push(feature("shoe_size", Encoding::Scale));
        config.cross.push("graph_score".into());
        assert_eq!(config.unknown_sources(), vec!["shoe_size".to_string(), "graph_score".to_string()]);
        // An attribute cross is known by the name its table gives it.
        config.cross.push("gender×genres".into());
        assert_eq!(config.unknown_sources().len(), 3);
        config.attribute_crosses.push(AttributeCross {
            name: "gender×genres".into(),
            user_field: crate::UserField::Gender,
            item_field: crate::ItemField::Genres,
            user_values: vec!["F".into()],
            item_values: vec!["Drama".into()],
            lift: vec![vec![0.5]],
            prior: vec![1.0],
            smoothing: 1.0,
        });
        assert_eq!(config.unknown_sources().len(), 2);
        assert_eq!(config.cross_source("gender×genres"), Some(CrossSource::Attribute(0)));
    }
}
