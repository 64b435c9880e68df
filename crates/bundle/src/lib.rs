//! A model bundle is one versioned directory written by the training pipeline
//! (`training/`) and read by recall-svc, rank-svc, rerank-svc and `recsysctl`.
//! It is published atomically (written under a temporary name, then renamed), so a
//! reader either sees a complete bundle or none.
//!
//! Layout (ids are strings; an item's *position* is its index in `items.json`, a user's
//! in `users.json`, and every per-item array is indexed by position):
//! - `manifest.json`: version, shapes, feature specification, file checksums, metrics;
//! - `items.json`: the catalog (id, title, genres, year, interaction count);
//! - `users.json`: user ids of the per-user vector table (empty without one);
//! - `embeddings.safetensors`: `item_vectors` [items, dim] f32 and optionally
//!   `user_vectors` [users, dim] (a cache of trained users' vectors);
//! - `item_to_item.safetensors`: item-to-item weights as compressed sparse rows
//!   (`offsets` i64, `neighbors` u32 positions, `weights` f32), strongest first;
//! - `item_signals.safetensors`: `popularity` f32 by position;
//! - `item_index.safetensors` (large catalogues): an HNSW graph of `item_vectors` by
//!   position and an int8 copy of the vectors to walk it with (layout in
//!   `training/recsys_training/ann.py`, search in recall-svc's `hnsw`);
//! - `coarse.onnx`, `ranker.onnx`: the coarse and fine rankers;
//! - `ranker_fixture.json`: examples with their exact inputs and scores (parity tests);
//! - `sequence_encoder.onnx` (optional, `Manifest::sequence`): the sequence channel's
//!   encoder, with `sequence_fixture.json` (histories and their query vectors).
//!
//! The `.safetensors` files are memory-mapped after their checksums are verified
//! (`tensors`).

// Denied everywhere but the one function that memory-maps a file (`tensors`).
#![deny(unsafe_code)]

mod attribute_crosses;
mod content;
pub mod embeddings;
mod features;
mod item_ids;
mod item_to_item;
pub mod onnx;
pub mod registry;
pub mod tensors;

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use attribute_crosses::{AttributeCross, AttributeCrosses, ItemField, UserField};
pub use content::{year_of_ms, ContentMap, ContentMapFile};
pub use embeddings::{EmbeddingSpace, VectorMoments};
pub use features::{
    CountMeasure, CountWindow, CrossSource, Encoding, Feature, FeatureConfig, ItemWindowCounts, LiveItemSource,
    RankerInputs, UserAttributes, RECENT_ITEMS,
};
pub use item_ids::{read_item_columns, ItemColumns, ItemIds};
pub use item_to_item::{ItemScores, ItemToItem, PositionHasher};
pub use registry::{QualityGate, Registry, VersionInfo};
pub use tensors::{Column, Matrix, TensorFile};

/// Bundle format this code reads.
pub const FORMAT_VERSION: u32 = 5;

pub const EMBEDDINGS_FILE: &str = "embeddings.safetensors";
pub const ITEM_TO_ITEM_FILE: &str = "item_to_item.safetensors";
pub const ITEM_SIGNALS_FILE: &str = "item_signals.safetensors";
pub const ANN_INDEX_FILE: &str = "item_index.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("no bundle under {0} (run `make bundle` or set the bundle path)")]
    NotFound(PathBuf),
    #[error("bundle version {version} not accepted: {reason}")]
    Rejected { version: String, reason: String },
}

pub type Result<T, E = BundleError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub version: String,
    pub created_at: String,
    pub training_data_sha256: String,
    pub embedding_dim: usize,
    pub num_users: usize,
    pub num_items: usize,
    pub feature_config: FeatureConfig,
    /// File name → checksum and size, for `recsysctl bundle verify`.
    pub files: HashMap<String, FileEntry>,
    #[serde(default)]
    pub metrics: serde_json::Value,
    /// Histogram of the fine ranker's scores on held-out data at training time: the
    /// reference that live scores are compared with for drift.
    #[serde(default)]
    pub score_distribution: Option<ScoreDistribution>,
    /// Training-time histograms of selected ranker inputs (encoded values), by feature.
    #[serde(default)]
    pub feature_distributions: HashMap<String, ScoreDistribution>,
    /// How items without interactions are served: the vectors of the bundle's were mapped
    /// from their attributes (training's content.py), the map is here for items added
    /// after training, and the threshold says when one is worth a slot.
    #[serde(default)]
    pub cold_start: Option<ColdStartPolicy>,
    /// The sequence channel's encoder, when the bundle ships one.
    #[serde(default)]
    pub sequence: Option<SequenceEncoderSpec>,
}

/// The sequence channel's encoder (training's `sequence.py`): an ONNX model from the
/// history's item vectors `history_vectors` [batch, length, dim] (oldest first, padding in
/// front) and `history_mask` [batch, length] (1 for an item) to `query` [batch, dim], a
/// vector in the bundle's item space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceEncoderSpec {
    pub file: String,
    /// Latest items the encoder reads.
    pub length: usize,
}

/// How the bundle's new items (no interactions at training time) and items added after
/// it are served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColdStartPolicy {
    /// How many items had no interactions.
    pub items: usize,
    /// The share of users `threshold` was set for, on stand-ins for the new items (known
    /// items with their vectors mapped from their attributes: training's
    /// `cold_start_share`); how many training users it shows one to is in the manifest
    /// too (`training_users_shown`).
    pub share: f64,
    /// How the cold-start channel scores a new item for a user: what `threshold` is on.
    #[serde(default)]
    pub score: ColdStartScore,
    /// The cold-start channel's score at or above which rank-svc marks a new item for the
    /// new-item slot.
    pub threshold: f32,
    /// The map from attributes to vectors, for items added after training.
    #[serde(default)]
    pub content: Option<ContentMapFile>,
}

/// The cold-start channel's score of a new item `v` for a user `u`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColdStartScore {
    /// u·v / |u|: every user's vector scaled to unit length. What bundles written before
    /// `score` was recorded used, hence the default.
    #[default]
    UnitUser,
    /// u·v: the model's own score. The user's norm carries how sure the model is of the
    /// user, so the threshold picks the surest (user, new item) pairs: on `make eval`'s
    /// cold-start protocol it found more of the users' test items per warm item displaced.
    InnerProduct,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoreDistribution {
    /// Bin edges, one more than `counts`.
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogItem {
    pub id: String,
    pub title: String,
    pub genres: Vec<String>,
    /// Release year, 0 when unknown.
    #[serde(default)]
    pub year: u32,
    /// Interactions in the training data.
    #[serde(default)]
    pub interactions: u64,
    /// Statistics computed at training time (`interactions_7d`, `like_rate`, …), read by
    /// the ranker's item features.
    #[serde(default)]
    pub stats: HashMap<String, f64>,
}

/// Directory of a bundle: `root` itself if it holds a manifest, else `root/current`
/// (a symlink or directory the pipeline maintains).
pub fn resolve_dir(root: &Path) -> Result<PathBuf> {
    if root.join("manifest.json").is_file() {
        return Ok(root.to_path_buf());
    }
    let current = root.join("current");
    if current.join("manifest.json").is_file() {
        return Ok(current);
    }
    Err(BundleError::NotFound(root.to_path_buf()))
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let manifest: Manifest = read_json(&dir.join("manifest.json"))?;
    if manifest.format != FORMAT_VERSION {
        return Err(BundleError::Malformed {
            path: dir.join("manifest.json"),
            reason: format!("format {} is not the supported format {FORMAT_VERSION}", manifest.format),
        });
    }
    Ok(manifest)
}

pub fn read_catalog(dir: &Path) -> Result<Vec<CatalogItem>> {
    read_json(&dir.join("items.json"))
}

pub fn read_user_ids(dir: &Path) -> Result<Vec<String>> {
    read_json(&dir.join("users.json"))
}

/// Popularity in [0, 1] by item position (`item_signals.safetensors`).
pub fn read_popularity(dir: &Path, manifest: &Manifest) -> Result<Column<f32>> {
    let column = TensorFile::open(dir, ITEM_SIGNALS_FILE, manifest)?.column::<f32>("popularity")?;
    if column.len() != manifest.num_items {
        return Err(BundleError::Malformed {
            path: dir.join(ITEM_SIGNALS_FILE),
            reason: format!("{} popularity values for {} items", column.len(), manifest.num_items),
        });
    }
    Ok(column)
}

/// Positions of the items with a positive popularity, most popular first (ties by
/// position): the order of the popular channel.
pub fn by_popularity(popularity: &[f32]) -> Vec<usize> {
    let mut positions: Vec<usize> = (0..popularity.len()).filter(|&n| popularity[n] > 0.0).collect();
    positions.sort_by(|&a, &b| popularity[b].total_cmp(&popularity[a]).then(a.cmp(&b)));
    positions
}

/// The `count` most popular items, most popular first: `(item id, popularity)`.
pub fn most_popular(dir: &Path, count: usize) -> Result<Vec<(String, f32)>> {
    let manifest = read_manifest(dir)?;
    let ids = read_item_columns(dir)?.ids;
    let popularity = read_popularity(dir, &manifest)?;
    Ok(by_popularity(popularity.as_slice())
        .into_iter()
        .take(count)
        .map(|position| (ids.get(position).to_string(), popularity.as_slice()[position]))
        .collect())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|source| BundleError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text)
        .map_err(|error| BundleError::Malformed { path: path.to_path_buf(), reason: error.to_string() })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A manifest with no files, for tests that add their own.
    pub(crate) fn empty_manifest() -> Manifest {
        serde_json::from_value(serde_json::json!({
            "format": FORMAT_VERSION, "version": "test", "created_at": "", "training_data_sha256": "",
            "embedding_dim": 2, "num_users": 0, "num_items": 0, "files": {},
            "feature_config": {"fine_model": "din", "coarse_model": "mlp", "embedding_dim": 2, "history_length": 1,
                               "user": [], "item": [], "cross": []},
        }))
        .unwrap()
    }

    #[test]
    fn the_cold_start_score_is_u_dot_v_over_its_norm_unless_the_manifest_says() {
        let policy = |extra: serde_json::Value| {
            let mut json = serde_json::json!({"items": 3, "share": 0.33, "threshold": 1.5});
            json.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            serde_json::from_value::<ColdStartPolicy>(json)
        };
        assert_eq!(policy(serde_json::json!({})).unwrap().score, ColdStartScore::UnitUser);
        let inner = policy(serde_json::json!({"score": "inner_product"})).unwrap();
        assert_eq!(inner.score, ColdStartScore::InnerProduct);
        assert_eq!(policy(serde_json::json!({"score": "unit_user"})).unwrap().score, ColdStartScore::UnitUser);
        let unknown = policy(serde_json::json!({"score": "cosine"})).unwrap_err().to_string();
        assert!(unknown.contains("cosine"), "{unknown}");
    }

    #[test]
    fn missing_bundle_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let error = resolve_dir(dir.path()).unwrap_err();
        assert!(error.to_string().contains("make bundle"), "{error}");
    }
}
