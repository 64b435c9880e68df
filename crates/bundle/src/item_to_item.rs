//! The bundle's item-to-item model (`item_to_item.safetensors`: each item's strongest
//! weights as compressed sparse rows over item positions, memory-mapped). recall-svc's
//! item-CF channel and rank-svc's `item_cf_*` cross features both score with it, so they
//! agree on what "similar to the history" means.

use std::{collections::HashMap, path::Path};

use crate::{BundleError, Column, Manifest, Result, TensorFile, ITEM_TO_ITEM_FILE};

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

    /// Every `(item, score)` with a non-zero score, in no particular order.
    pub fn nonzero(&self) -> Box<dyn Iterator<Item = (usize, f64)> + '_> {
        match self {
            ItemScores::Dense(scores) => {
                Box::new(scores.iter().enumerate().filter(|(_, &s)| s != 0.0).map(|(n, &s)| (n, s)))
            }
            ItemScores::Sparse(scores) => Box::new(scores.iter().filter(|(_, &s)| s != 0.0).map(|(&n, &s)| (n, s))),
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
    /// Row `i` is `offsets[i]..offsets[i + 1]` of `neighbors` (positions) and `weights`.
    offsets: Column<i64>,
    neighbors: Column<u32>,
    weights: Column<f32>,
}

impl ItemToItem {
    /// Maps the weights of a bundle whose catalogue has `manifest.num_items` items and
    /// checks the row offsets once. Neighbour positions are checked as rows are read
    /// (`row`), not here: a scan of every neighbour at load would make the whole file
    /// resident in every process for the sake of a bounds check.
    pub fn load(dir: &Path, manifest: &Manifest) -> Result<Self> {
        let file = TensorFile::open(dir, ITEM_TO_ITEM_FILE, manifest)?;
        let model = Self {
            offsets: file.column("offsets")?,
            neighbors: file.column("neighbors")?,
            weights: file.column("weights")?,
        };
        model
            .check(manifest.num_items)
            .map_err(|reason| BundleError::Malformed { path: dir.join(ITEM_TO_ITEM_FILE), reason })?;
        Ok(model)
    }

    /// From each item's `(other item, weight)` list (tests and small models).
    pub fn new(rows: Vec<Vec<(usize, f32)>>) -> Self {
        let mut offsets = vec![0i64];
        let (mut neighbors, mut weights) = (Vec::new(), Vec::new());
        for row in &rows {
            for &(other, weight) in row {
                neighbors.push(other as u32);
                weights.push(weight);
            }
            offsets.push(neighbors.len() as i64);
        }
        Self { offsets: Column::owned(offsets), neighbors: Column::owned(neighbors), weights: Column::owned(weights) }
    }

    fn check(&self, items: usize) -> Result<(), String> {
        let offsets = self.offsets.as_slice();
        if offsets.len() != items + 1 {
            return Err(format!("{} offsets for {items} items", offsets.len()));
        }
        if offsets[0] != 0 || offsets.windows(2).any(|pair| pair[0] > pair[1]) {
            return Err("offsets do not start at 0 and grow".into());
        }
        let entries = self.neighbors.len();
        if offsets[items] as usize != entries || self.weights.len() != entries {
            return Err(format!(
                "{entries} neighbours and {} weights for {} entries",
                self.weights.len(),
                offsets[items]
            ));
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Item `item`'s `(other item, weight)` pairs, strongest first (a neighbour outside
    /// the catalogue, which only a corrupt file could hold, is skipped).
    fn row(&self, item: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let range = self.offsets.as_slice()[item] as usize..self.offsets.as_slice()[item + 1] as usize;
        let neighbors = &self.neighbors.as_slice()[range.clone()];
        let weights = &self.weights.as_slice()[range];
        let items = self.len();
        neighbors.iter().zip(weights).map(|(&n, &w)| (n as usize, w)).filter(move |&(n, _)| n < items)
    }

    fn row_len(&self, item: usize) -> usize {
        (self.offsets.as_slice()[item + 1] - self.offsets.as_slice()[item]) as usize
    }

    /// The scores the history gives, by summing the history items' weights — the model
    /// EASE fits (X·B). Items it has no weight towards score 0. The cost is proportional
    /// to history × neighbours, never to the catalogue: the sums go into a dense scratch
    /// vector only when the catalogue is no larger than a few times that work (a small
    /// catalogue, where a vector beats hashing), else into a hash map.
    pub fn sparse_scores(&self, history: &[usize]) -> ItemScores {
        let work: usize = history.iter().map(|&item| self.row_len(item)).sum();
        let mut scores = if self.len() <= DENSE_FACTOR * work {
            ItemScores::Dense(vec![0.0; self.len()])
        } else {
            ItemScores::Sparse(HashMap::with_capacity_and_hasher(work, PositionHasher::default()))
        };
        for &item in history {
            for (other, weight) in self.row(item) {
                scores.add(other, f64::from(weight));
            }
        }
        scores
    }

    /// Every catalogue item's score given `history`, as a dense vector (for statistics over
    /// the whole catalogue; `sparse_scores` is the per-request form).
    pub fn scores(&self, history: &[usize]) -> Vec<f64> {
        let mut scores = vec![0.0f64; self.len()];
        for &item in history {
            for (other, weight) in self.row(item) {
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
        let mut rows = vec![vec![(2, 0.5), (1, -0.25)], vec![(2, 0.25)], vec![], vec![(0, 1.0)]];
        let small = ItemToItem::new(rows.clone());
        // The same weights in a catalogue of 100 items take the hash map.
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

    #[test]
    fn rows_that_would_index_out_of_bounds_are_refused_or_skipped() {
        let model = ItemToItem::new(vec![vec![(1, 0.5)], vec![(0, 0.5)]]);
        assert_eq!(model.check(2), Ok(()));
        assert!(model.check(3).unwrap_err().contains("3 offsets for 3 items"));
        let outside = ItemToItem::new(vec![vec![(5, 0.5), (1, 0.25)], vec![]]);
        assert_eq!(outside.scores(&[0]), vec![0.0, 0.25]);
        assert_eq!(outside.sparse_scores(&[0]).positive(), vec![(1, 0.25)]);
    }

    #[test]
    fn a_mapped_file_reads_like_the_rows_it_was_written_from() {
        use crate::tensors::tests::{f32_bytes, write};
        use safetensors::Dtype;
        let dir = tempfile::tempdir().unwrap();
        let offsets: Vec<u8> = [0i64, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
        let neighbors: Vec<u8> = [1u32, 0, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut manifest = write(
            dir.path(),
            ITEM_TO_ITEM_FILE,
            &[
                ("offsets", Dtype::I64, vec![3], offsets),
                ("neighbors", Dtype::U32, vec![3], neighbors),
                ("weights", Dtype::F32, vec![3], f32_bytes(&[0.5, 0.25, 1.0])),
            ],
        );
        manifest.num_items = 2;
        let model = ItemToItem::load(dir.path(), &manifest).unwrap();
        assert_eq!(model.scores(&[0, 1]), vec![1.25, 0.5]);
        manifest.num_items = 3;
        assert!(ItemToItem::load(dir.path(), &manifest).is_err(), "a catalogue of another size is refused");
    }
}
