//! The bundle's item-to-item model (EASE weights from `item_neighbors.json`), indexed by
//! item position. recall-svc's item-CF channel and rank-svc's `item_cf_*` cross features
//! both score with it, so they agree on what "similar to the history" means.

use std::path::Path;

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

    /// Every item's score given `history` (item positions): the sum of the history items'
    /// weights towards it — the model EASE fits (X·B). Weights can be negative, so a score
    /// is only known after every history item.
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
}
