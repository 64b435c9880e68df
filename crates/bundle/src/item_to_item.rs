//! The bundle's item-to-item model (EASE weights from `item_neighbors.json`), indexed by
//! item position. recall-svc's item-CF channel and rank-svc's `item_cf_*` cross features
//! both score with it, so they agree on what "similar to the history" means.

use std::{collections::HashMap, path::Path};

use crate::{read_item_neighbors, EmbeddingSpace, Result};

/// A dense scratch vector is used while the catalogue is at most this many times the
/// number of weights summed.
const DENSE_FACTOR: usize = 4;

/// Item-to-item scores of one request (see [`ItemToItem::sparse_scores`]).
pub enum ItemScores {
    Dense(Vec<f64>),
    Sparse(HashMap<usize, f64, PositionHasher>),
}

impl ItemScores {
    fn add(&mut self, item: usize, weight: f64) {
        match self {
            ItemScores::Dense(scores) => scores[item] += weight,
            ItemScores::Sparse(scores) => *scores.entry(item).or_insert(0.0) += weight,
        }
    }

    /// The item's score (0 when the history has no weight towards it).
    pub fn get(&self, item: usize) -> f64 {
        match self {
            ItemScores::Dense(scores) => scores.get(item).copied().unwrap_or(0.0),
            ItemScores::Sparse(scores) => scores.get(&item).copied().unwrap_or(0.0),
        }
    }

    /// Every `(item, score)` with a positive score, in no particular order.
    pub fn positive(&self) -> Vec<(usize, f64)> {
        match self {
            ItemScores::Dense(scores) => {
                scores.iter().enumerate().filter(|(_, &s)| s > 0.0).map(|(n, &s)| (n, s)).collect()
            }
            ItemScores::Sparse(scores) => scores.iter().filter(|(_, &s)| s > 0.0).map(|(&n, &s)| (n, s)).collect(),
        }
    }
}

/// Hashes item positions by one multiplication (Fibonacci hashing): positions are small
/// dense integers, and SipHash, the standard map's default, cost more than the sums.
#[derive(Default, Clone, Copy)]
pub struct PositionHasher(u64);

impl std::hash::Hasher for PositionHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, value: usize) {
        self.0 = (value as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl std::hash::BuildHasher for PositionHasher {
    type Hasher = PositionHasher;

    fn build_hasher(&self) -> PositionHasher {
        PositionHasher(0)
    }
}

pub struct ItemToItem {
    /// Row `i`: `(other item position, weight)` for item `i`'s strongest weights.
    weights: Vec<Vec<(usize, f32)>>,
}

impl ItemToItem {
    /// Reads the weights and maps ids to positions in `embeddings` (ids it does not know
    /// are dropped).
    pub fn load(dir: &Path, embeddings: &EmbeddingSpace) -> Result<Self> {
        let mut by_id = read_item_neighbors(dir)?;
        let weights = embeddings
            .item_ids
            .iter()
            .map(|id| {
                by_id
                    .remove(id)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(other, weight)| Some((embeddings.item_position(&other)?, weight)))
                    .collect()
            })
            .collect();
        Ok(Self { weights })
    }

    pub fn new(weights: Vec<Vec<(usize, f32)>>) -> Self {
        Self { weights }
    }

    /// The scores the history gives, by summing the history items' weights — the model
    /// EASE fits (X·B). Items it has no weight towards score 0. The cost is proportional
    /// to history × neighbours, never to the catalogue: the sums go into a dense scratch
    /// vector only when the catalogue is no larger than a few times that work (a small
    /// catalogue, where a vector beats hashing), else into a hash map.
    pub fn sparse_scores(&self, history: &[usize]) -> ItemScores {
        let work: usize = history.iter().map(|&item| self.weights[item].len()).sum();
        let mut scores = if self.weights.len() <= DENSE_FACTOR * work {
            ItemScores::Dense(vec![0.0; self.weights.len()])
        } else {
            ItemScores::Sparse(HashMap::with_capacity_and_hasher(work, PositionHasher::default()))
        };
        for &item in history {
            for &(other, weight) in &self.weights[item] {
                scores.add(other, f64::from(weight));
            }
        }
        scores
    }

    /// Every catalogue item's score given `history`, as a dense vector (for statistics over
    /// the whole catalogue; `sparse_scores` is the per-request form).
    pub fn scores(&self, history: &[usize]) -> Vec<f64> {
        let mut scores = vec![0.0f64; self.weights.len()];
        for &item in history {
            for &(other, weight) in &self.weights[item] {
                scores[other] += f64::from(weight);
            }
        }
        scores
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_sum_the_history_weights_including_negative_ones() {
        let model = ItemToItem::new(vec![vec![(2, 0.5), (1, -0.25)], vec![(2, 0.25)], vec![]]);
        assert_eq!(model.scores(&[0, 1]), vec![0.0, -0.25, 0.75]);
        assert_eq!(model.scores(&[]), vec![0.0; 3]);
    }

    #[test]
    fn per_request_scores_equal_the_dense_ones_on_both_paths() {
        // Four items, three weights summed: a small catalogue takes the dense scratch.
        let small = ItemToItem::new(vec![vec![(2, 0.5), (1, -0.25)], vec![(2, 0.25)], vec![], vec![(0, 1.0)]]);
        // The same weights in a catalogue of 100 items take the hash map.
        let mut rows = small.weights.clone();
        rows.resize(100, Vec::new());
        let large = ItemToItem::new(rows);
        let history = [0, 1, 3];
        for (model, dense_expected) in [(&small, true), (&large, false)] {
            let scores = model.sparse_scores(&history);
            assert_eq!(matches!(scores, ItemScores::Dense(_)), dense_expected);
            for (item, expected) in model.scores(&history).iter().enumerate() {
                assert_eq!(scores.get(item), *expected, "item {item}");
            }
            let mut positive = scores.positive();
            positive.sort_by_key(|&(item, _)| item);
            assert_eq!(positive, vec![(0, 1.0), (2, 0.75)]);
        }
        assert!(large.sparse_scores(&[]).positive().is_empty());
    }
}
