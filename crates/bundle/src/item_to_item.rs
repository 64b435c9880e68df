//! The bundle's item-to-item model (EASE weights from `item_neighbors.json`), indexed by
//! item position. recall-svc's item-CF channel and rank-svc's `item_cf_*` cross features
//! both score with it, so they agree on what "similar to the history" means.

use std::{collections::HashMap, path::Path};

use crate::{read_item_neighbors, EmbeddingSpace, Result};

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

    /// The score of every item the history has a weight towards, given `history` (item
    /// positions): the sum of the history items' weights — the model EASE fits (X·B).
    /// Every other item scores 0. Costs history × neighbours, never the catalogue.
    /// Weights can be negative, so a score is only known after every history item.
    pub fn sparse_scores(&self, history: &[usize]) -> HashMap<usize, f64> {
        let mut scores = HashMap::with_capacity(history.len() * 64);
        for &item in history {
            for &(other, weight) in &self.weights[item] {
                *scores.entry(other).or_insert(0.0) += f64::from(weight);
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
    fn sparse_scores_are_the_dense_ones_without_the_zeros() {
        let model = ItemToItem::new(vec![vec![(2, 0.5), (1, -0.25)], vec![(2, 0.25)], vec![], vec![(0, 1.0)]]);
        let history = [0, 1, 3];
        let sparse = model.sparse_scores(&history);
        let dense = model.scores(&history);
        assert_eq!(sparse.len(), 3);
        for (item, score) in dense.iter().enumerate() {
            assert_eq!(sparse.get(&item).copied().unwrap_or(0.0), *score);
        }
        assert!(model.sparse_scores(&[]).is_empty());
    }
}
