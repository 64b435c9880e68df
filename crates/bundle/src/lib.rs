//! A model bundle is one versioned directory written by the training pipeline
//! (`training/`) and read by recall-svc, rank-svc, rerank-svc and `recsysctl`.
//! It is published atomically (written under a temporary name, then renamed), so a
//! reader either sees a complete bundle or none.
//!
//! Layout (all ids are strings; indices follow the order of `items.json` / `users.json`):
//! - `manifest.json`: version, shapes, feature specification, file checksums, metrics;
//! - `items.json`: the catalog (id, title, genres, year, interaction count);
//! - `users.json`: user ids known to the embeddings;
//! - `user_embeddings.f32`, `item_embeddings.f32`: little-endian f32 matrices;
//! - `item_neighbors.json`: item-to-item weights (EASE), the strongest per item;
//! - `popularity.json`: items by popularity score;
//! - `coarse.onnx`, `ranker.onnx`: the coarse and fine rankers;
//! - `ranker_fixture.json`: examples with their exact inputs and scores (parity tests).

#![forbid(unsafe_code)]

pub mod embeddings;
mod features;
mod item_to_item;

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use embeddings::EmbeddingSpace;
pub use features::{CrossSource, Encoding, Feature, FeatureConfig, RankerInputs, UserAttributes, RECENT_ITEMS};
pub use item_to_item::{ItemScores, ItemToItem};

/// Bundle format this code reads.
pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("no bundle under {0} (run `make bundle` or set the bundle path)")]
    NotFound(PathBuf),
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

/// Dense row-major matrix of f32.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

impl Matrix {
    pub fn row(&self, index: usize) -> &[f32] {
        &self.values[index * self.cols..(index + 1) * self.cols]
    }
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

/// `item id → [(neighbour id, weight)]`, strongest first.
pub fn read_item_neighbors(dir: &Path) -> Result<HashMap<String, Vec<(String, f32)>>> {
    read_json(&dir.join("item_neighbors.json"))
}

/// `[(item id, score)]`, most popular first.
pub fn read_popularity(dir: &Path) -> Result<Vec<(String, f32)>> {
    read_json(&dir.join("popularity.json"))
}

/// Reads a little-endian f32 matrix that must have `rows × cols` values.
pub fn read_matrix(path: &Path, rows: usize, cols: usize) -> Result<Matrix> {
    let bytes = fs::read(path).map_err(|source| BundleError::Io { path: path.to_path_buf(), source })?;
    if bytes.len() != rows * cols * 4 {
        return Err(BundleError::Malformed {
            path: path.to_path_buf(),
            reason: format!(
                "expected {rows}x{cols} f32 values ({} bytes), found {} bytes",
                rows * cols * 4,
                bytes.len()
            ),
        });
    }
    let values =
        bytes.chunks_exact(4).map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]])).collect();
    Ok(Matrix { rows, cols, values })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs::read_to_string(path).map_err(|source| BundleError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text)
        .map_err(|error| BundleError::Malformed { path: path.to_path_buf(), reason: error.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_of_wrong_size_is_rejected_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.f32");
        fs::write(&path, [0u8; 12]).unwrap();
        let error = read_matrix(&path, 2, 2).unwrap_err();
        assert!(error.to_string().contains("m.f32"), "{error}");
        assert!(error.to_string().contains("found 12 bytes"), "{error}");
    }

    #[test]
    fn matrix_rows_are_little_endian_f32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.f32");
        let values = [1.0f32, 2.0, 3.0, 4.5];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        fs::write(&path, bytes).unwrap();
        let matrix = read_matrix(&path, 2, 2).unwrap();
        assert_eq!(matrix.row(1), &[3.0, 4.5]);
    }

    #[test]
    fn missing_bundle_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let error = resolve_dir(dir.path()).unwrap_err();
        assert!(error.to_string().contains("make bundle"), "{error}");
    }
}
