//! Top-k items by inner product with a query vector: the embedding and real-time channels.
//!
//! A large catalogue ships an HNSW graph (`item_index.safetensors`, see `hnsw`), searched
//! with the request's exclusions applied inside the walk. A catalogue without one is
//! scanned exactly: below some tens of thousands of items a scan costs less than a graph
//! search, and it is the ground truth the index is tested against.

use std::path::Path;

use recsys_bundle::{embeddings::dot, Manifest, Matrix, ANN_INDEX_FILE};

use crate::{hnsw::HnswIndex, ExcludedItems, Result};

pub enum NearestItems {
    Exact,
    Hnsw(Box<HnswIndex>),
}

impl NearestItems {
    /// The bundle's index when it ships one (checked against the vectors it indexes),
    /// exact search otherwise. `expansion` is the search's candidate list size (HNSW's
    /// `ef`); a search for more items than that widens it to the count asked for.
    pub fn load(dir: &Path, manifest: &Manifest, vectors: &Matrix, expansion: usize) -> Result<Self> {
        if !manifest.files.contains_key(ANN_INDEX_FILE) {
            return Ok(Self::Exact);
        }
        Ok(Self::Hnsw(Box::new(HnswIndex::load(dir, manifest, vectors, expansion)?)))
    }

    pub fn is_approximate(&self) -> bool {
        matches!(self, Self::Hnsw(_))
    }

    /// Changes the HNSW search's candidate list size (benchmarks sweep it).
    pub fn set_expansion(&self, expansion: usize) {
        if let Self::Hnsw(index) = self {
            index.set_expansion(expansion);
        }
    }

    /// The `quota` items with the largest inner product with `query`, best first, none of
    /// them in `excluded`.
    pub fn search(&self, vectors: &Matrix, query: &[f32], excluded: &ExcludedItems, quota: usize) -> Vec<usize> {
        match self {
            Self::Exact => exact(vectors, query, excluded, quota),
            Self::Hnsw(index) => index.search(vectors, query, excluded, quota),
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
    use super::*;

    #[test]
    fn without_an_index_the_search_is_exact() {
        let vectors = Matrix::owned(3, 2, vec![1.0, 0.0, 0.0, 1.0, 0.7, 0.7]);
        let manifest: Manifest = serde_json::from_value(serde_json::json!({
            "format": recsys_bundle::FORMAT_VERSION, "version": "t", "created_at": "", "training_data_sha256": "",
            "embedding_dim": 2, "num_users": 0, "num_items": 3, "files": {},
            "feature_config": {"fine_model": "din", "coarse_model": "mlp", "embedding_dim": 2, "history_length": 1,
                               "user": [], "item": [], "cross": []},
        }))
        .unwrap();
        let nearest = NearestItems::load(Path::new("/nonexistent"), &manifest, &vectors, 64).unwrap();
        assert!(!nearest.is_approximate());
        assert_eq!(nearest.search(&vectors, &[1.0, 0.1], &ExcludedItems::from_iter([0]), 5), vec![2, 1]);
    }

    #[test]
    fn top_by_score_keeps_the_best_in_order() {
        let mut scored = vec![(0.1, 0), (0.9, 1), (0.5, 2), (0.7, 3)];
        assert_eq!(top_by_score(&mut scored, 2), vec![1, 3]);
    }
}
