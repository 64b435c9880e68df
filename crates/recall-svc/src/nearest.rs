//! Top-k items by inner product with a query vector: the embedding and real-time channels.
//!
//! A large catalogue ships an HNSW index (`item_index.usearch`, built by the training
//! pipeline with usearch and keyed by item position), which is memory-mapped like the
//! vectors. Items the request may not see are skipped *inside* the graph search (a
//! predicate usearch calls per visited key), so the quota is spent on servable items
//! without over-fetching. A catalogue without an index is scanned exactly: below some
//! tens of thousands of items a scan costs less than a graph search, and it is the ground
//! truth the index is tested against.

use std::path::Path;

use recsys_bundle::{embeddings::dot, tensors::verify_file, BundleError, Manifest, Matrix, ANN_INDEX_FILE};
use usearch::{Index, MetricKind};

use crate::{ExcludedItems, RecallError, Result};

pub enum NearestItems {
    Exact,
    Hnsw(Index),
}

impl NearestItems {
    /// The bundle's index when it ships one (checked against the vectors it indexes),
    /// exact search otherwise. `expansion` is the search's candidate list size (HNSW's
    /// `ef`); a search for more items than that widens it to the count asked for.
    pub fn load(dir: &Path, manifest: &Manifest, vectors: &Matrix, expansion: usize) -> Result<Self> {
        if !manifest.files.contains_key(ANN_INDEX_FILE) {
            return Ok(Self::Exact);
        }
        let path = dir.join(ANN_INDEX_FILE);
        verify_file(&path, ANN_INDEX_FILE, manifest)?;
        let malformed = |reason: String| RecallError::Bundle(BundleError::Malformed { path: path.clone(), reason });
        let index =
            Index::restore_view(&path.to_string_lossy()).map_err(|error| malformed(format!("usearch: {error}")))?;
        if index.metric_kind() != MetricKind::IP {
            return Err(malformed(format!("metric {:?}, expected inner product", index.metric_kind())));
        }
        if index.size() != vectors.rows || index.dimensions() != vectors.cols {
            return Err(malformed(format!(
                "{} vectors of {} dimensions, expected {} of {}",
                index.size(),
                index.dimensions(),
                vectors.rows,
                vectors.cols
            )));
        }
        index.change_expansion_search(expansion);
        Ok(Self::Hnsw(index))
    }

    pub fn is_approximate(&self) -> bool {
        matches!(self, Self::Hnsw(_))
    }

    /// Changes the HNSW search's candidate list size (benchmarks sweep it).
    pub fn set_expansion(&self, expansion: usize) {
        if let Self::Hnsw(index) = self {
            index.change_expansion_search(expansion);
        }
    }

    /// The `quota` items with the largest inner product with `query`, best first, none of
    /// them in `excluded`.
    pub fn search(&self, vectors: &Matrix, query: &[f32], excluded: &ExcludedItems, quota: usize) -> Vec<usize> {
        match self {
            Self::Exact => exact(vectors, query, excluded, quota),
            Self::Hnsw(index) => {
                let allowed = |key: u64| !excluded.contains(&(key as usize));
                let found = if excluded.is_empty() {
                    index.search(query, quota)
                } else {
                    index.filtered_search(query, quota, allowed)
                };
                match found {
                    // usearch reports distances (1 - inner product) in ascending order.
                    Ok(matches) => matches.keys.iter().map(|&key| key as usize).collect(),
                    Err(error) => {
                        // Only allocation failures end a search early; the channel is
                        // then empty for this request rather than the whole answer lost.
                        tracing::warn!(%error, "HNSW search failed");
                        Vec::new()
                    }
                }
            }
        }
    }
}

/// Exact top-`quota` by inner product (a scan of every item).
pub fn exact(vectors: &Matrix, query: &[f32], excluded: &ExcludedItems, quota: usize) -> Vec<usize> {
    let mut scored: Vec<(f32, usize)> =
        (0..vectors.rows).filter(|n| !excluded.contains(n)).map(|n| (dot(query, vectors.row(n)), n)).collect();
    top_by_score(&mut scored, quota)
}

pub fn top_by_score(scored: &mut Vec<(f32, usize)>, quota: usize) -> Vec<usize> {
    let by_score = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if scored.len() > quota {
        scored.select_nth_unstable_by(quota, by_score);
        scored.truncate(quota);
    }
    scored.sort_by(by_score);
    scored.iter().map(|&(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use recsys_bundle::FileEntry;
    use usearch::{IndexOptions, ScalarKind};

    use super::*;

    /// Clustered unit vectors, like trained item embeddings (a deterministic generator, so
    /// the test needs no random-number crate).
    fn clustered(rows: usize, cols: usize) -> Matrix {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        let centres: Vec<Vec<f32>> = (0..20).map(|_| (0..cols).map(|_| next()).collect()).collect();
        let mut values = Vec::with_capacity(rows * cols);
        for row in 0..rows {
            let vector: Vec<f32> = centres[row % centres.len()].iter().map(|c| c + 0.3 * next()).collect();
            let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
            values.extend(vector.iter().map(|v| v / norm));
        }
        Matrix::owned(rows, cols, values)
    }

    /// Builds and saves an index of `vectors` the way the training pipeline does, and a
    /// manifest listing it.
    fn bundle_with_index(dir: &Path, vectors: &Matrix) -> Manifest {
        let options = IndexOptions {
            dimensions: vectors.cols,
            metric: MetricKind::IP,
            quantization: ScalarKind::F32,
            connectivity: 16,
            expansion_add: 128,
            expansion_search: 64,
            multi: false,
        };
        let index = Index::new(&options).unwrap();
        index.reserve(vectors.rows).unwrap();
        for row in 0..vectors.rows {
            index.add(row as u64, vectors.row(row)).unwrap();
        }
        let path = dir.join(ANN_INDEX_FILE);
        index.save(&path.to_string_lossy()).unwrap();
        let entry = FileEntry {
            sha256: recsys_bundle::tensors::sha256_file(&path).unwrap(),
            bytes: std::fs::metadata(&path).unwrap().len(),
        };
        let mut manifest: Manifest = serde_json::from_value(serde_json::json!({
            "format": recsys_bundle::FORMAT_VERSION, "version": "t", "created_at": "", "training_data_sha256": "",
            "embedding_dim": vectors.cols, "num_users": 0, "num_items": vectors.rows, "files": {},
            "feature_config": {"fine_model": "din", "coarse_model": "mlp", "embedding_dim": 2, "history_length": 1,
                               "user": [], "item": [], "cross": []},
        }))
        .unwrap();
        manifest.files = HashMap::from([(ANN_INDEX_FILE.to_string(), entry)]);
        manifest
    }

    #[test]
    fn the_index_finds_what_exact_search_finds_and_skips_excluded_items() {
        let dir = tempfile::tempdir().unwrap();
        let vectors = clustered(5_000, 16);
        let manifest = bundle_with_index(dir.path(), &vectors);
        let nearest = NearestItems::load(dir.path(), &manifest, &vectors, 200).unwrap();
        assert!(nearest.is_approximate());
        let (mut found, mut total) = (0usize, 0usize);
        for query_row in (0..5_000).step_by(250) {
            let query = vectors.row(query_row);
            let truth = exact(&vectors, query, &ExcludedItems::default(), 100);
            let excluded: ExcludedItems = truth.iter().copied().step_by(3).collect();
            let approximate = nearest.search(&vectors, query, &excluded, 100);
            assert!(approximate.iter().all(|n| !excluded.contains(n)), "an excluded item was returned");
            assert_eq!(approximate.len(), 100, "excluded items do not shrink the answer");
            let allowed_truth: HashSet<usize> = exact(&vectors, query, &excluded, 100).into_iter().collect();
            found += approximate.iter().filter(|n| allowed_truth.contains(n)).count();
            total += 100;
        }
        let recall = found as f64 / total as f64;
        assert!(recall >= 0.95, "recall@100 {recall}");
    }

    #[test]
    fn an_index_that_does_not_match_the_vectors_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vectors = clustered(300, 8);
        let manifest = bundle_with_index(dir.path(), &vectors);
        let error = NearestItems::load(dir.path(), &manifest, &clustered(301, 8), 64).err().unwrap().to_string();
        assert!(error.contains("300 vectors of 8 dimensions, expected 301"), "{error}");
        let bytes = std::fs::read(dir.path().join(ANN_INDEX_FILE)).unwrap();
        std::fs::write(dir.path().join(ANN_INDEX_FILE), &bytes[..bytes.len() / 2]).unwrap();
        let error = NearestItems::load(dir.path(), &manifest, &vectors, 64).err().unwrap().to_string();
        assert!(error.contains("truncated"), "{error}");
    }

    #[test]
    fn without_an_index_the_search_is_exact() {
        let vectors = Matrix::owned(3, 2, vec![1.0, 0.0, 0.0, 1.0, 0.7, 0.7]);
        let nearest = NearestItems::load(Path::new("/nonexistent"), &manifest_without_index(), &vectors, 64).unwrap();
        assert!(!nearest.is_approximate());
        assert_eq!(nearest.search(&vectors, &[1.0, 0.1], &ExcludedItems::from_iter([0]), 5), vec![2, 1]);
    }

    fn manifest_without_index() -> Manifest {
        let mut manifest = bundle_with_index(tempfile::tempdir().unwrap().path(), &clustered(10, 2));
        manifest.files.clear();
        manifest
    }

    #[test]
    fn top_by_score_keeps_the_best_in_order() {
        let mut scored = vec![(0.1, 0), (0.9, 1), (0.5, 2), (0.7, 3)];
        assert_eq!(top_by_score(&mut scored, 2), vec![1, 3]);
    }
}
