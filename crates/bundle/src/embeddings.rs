//! The retrieval embedding space of a bundle, shared by recall-svc (embedding and
//! real-time channels) and rank-svc (coarse ranking) so both derive a user's vector the
//! same way. Vectors are memory-mapped from `embeddings.safetensors`.

use std::{collections::HashMap, path::Path};

use crate::{read_user_ids, ItemIds, Manifest, Matrix, Result, TensorFile, EMBEDDINGS_FILE};

/// How many of the most recent history items make a user's vector at request time. The
/// catalogue-scale retrieval model is trained for exactly this query
/// (`HISTORY_ITEMS` in `training/recsys_training/scale.py`).
pub const HISTORY_ITEMS: usize = 50;

pub struct EmbeddingSpace {
    pub item_ids: ItemIds,
    user_positions: HashMap<String, usize>,
    pub item_vectors: Matrix,
    user_vectors: Matrix,
    /// Per row of `user_vectors`, what it was trained on: the user's latest training
    /// event time (Unix seconds) and their number of training events. Empty when the
    /// bundle does not say (its table is then used as it is).
    user_trained: Vec<TrainedOn>,
    pub moments: VectorMoments,
}

/// What a user's trained vector stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TrainedOn {
    latest_event: i64,
    events: u32,
}

/// Σx and Σxxᵀ over the item vectors: with them, the sum and the sum of squares of a
/// query's inner products with the whole catalogue cost dim², not the catalogue (rank-svc
/// standardises its embedding scores over the catalogue this way).
#[derive(Debug, Clone, PartialEq)]
pub struct VectorMoments {
    pub sum: Vec<f64>,
    /// Row-major [dim, dim].
    pub gram: Vec<f64>,
}

impl VectorMoments {
    /// Computed from the vectors (bundles written before the training pipeline shipped
    /// them; tests).
    pub fn of(vectors: &Matrix) -> Self {
        let dim = vectors.cols;
        let (mut sum, mut gram) = (vec![0.0; dim], vec![0.0; dim * dim]);
        for row in 0..vectors.rows {
            let vector = vectors.row(row);
            for (i, &x) in vector.iter().enumerate() {
                sum[i] += f64::from(x);
                for (cell, &y) in gram[i * dim..(i + 1) * dim].iter_mut().zip(vector) {
                    *cell += f64::from(x) * f64::from(y);
                }
            }
        }
        Self { sum, gram }
    }

    /// `(Σ v·x, Σ (v·x)²)` over every item vector x.
    pub fn score_sums(&self, query: &[f32]) -> (f64, f64) {
        let dim = self.sum.len();
        let query: Vec<f64> = query.iter().map(|&v| f64::from(v)).collect();
        let sum = query.iter().zip(&self.sum).map(|(v, s)| v * s).sum();
        let squares = (0..dim)
            .map(|i| query[i] * self.gram[i * dim..(i + 1) * dim].iter().zip(&query).map(|(g, v)| g * v).sum::<f64>())
            .sum();
        (sum, squares)
    }
}

impl EmbeddingSpace {
    /// Maps the bundle's vectors; `item_ids` are the catalogue's ids by position (the
    /// caller reads the catalogue for its own columns too).
    pub fn load_with(dir: &Path, manifest: &Manifest, item_ids: ItemIds) -> Result<Self> {
        let file = TensorFile::open(dir, EMBEDDINGS_FILE, manifest)?;
        let item_vectors = file.matrix("item_vectors", manifest.embedding_dim)?;
        let (user_ids, user_vectors) = if file.contains("user_vectors") {
            (read_user_ids(dir)?, file.matrix("user_vectors", manifest.embedding_dim)?)
        } else {
            (Vec::new(), Matrix::owned(0, manifest.embedding_dim, Vec::new()))
        };
        let user_trained: Vec<TrainedOn> = if file.contains("user_trained") {
            let pairs = file.column::<i64>("user_trained")?;
            if pairs.len() != 2 * user_ids.len() {
                return Err(crate::BundleError::Malformed {
                    path: dir.join(EMBEDDINGS_FILE),
                    reason: format!("user_trained is not [{}, 2]", user_ids.len()),
                });
            }
            let events = |count: i64| u32::try_from(count.max(0)).unwrap_or(u32::MAX);
            pairs
                .as_slice()
                .chunks_exact(2)
                .map(|pair| TrainedOn { latest_event: pair[0], events: events(pair[1]) })
                .collect()
        } else {
            Vec::new()
        };
        let malformed = |what: &str, rows: usize, expected: usize| crate::BundleError::Malformed {
            path: dir.join(EMBEDDINGS_FILE),
            reason: format!("{rows} {what} vectors for {expected} {what}s"),
        };
        if item_vectors.rows != item_ids.len() {
            return Err(malformed("item", item_vectors.rows, item_ids.len()));
        }
        if user_vectors.rows != user_ids.len() {
            return Err(malformed("user", user_vectors.rows, user_ids.len()));
        }
        let dim = manifest.embedding_dim;
        let moments = if file.contains("item_vector_sum") && file.contains("item_vector_gram") {
            let (sum, gram) = (file.column::<f64>("item_vector_sum")?, file.column::<f64>("item_vector_gram")?);
            if sum.len() != dim || gram.len() != dim * dim {
                return Err(crate::BundleError::Malformed {
                    path: dir.join(EMBEDDINGS_FILE),
                    reason: format!("item_vector_sum / item_vector_gram are not [{dim}] / [{dim}, {dim}]"),
                });
            }
            VectorMoments { sum: sum.as_slice().to_vec(), gram: gram.as_slice().to_vec() }
        } else {
            VectorMoments::of(&item_vectors)
        };
        Ok(Self { user_trained, ..Self::with_moments(item_ids, user_ids, item_vectors, user_vectors, moments) })
    }

    pub fn new(item_ids: ItemIds, user_ids: Vec<String>, item_vectors: Matrix, user_vectors: Matrix) -> Self {
        let moments = VectorMoments::of(&item_vectors);
        Self::with_moments(item_ids, user_ids, item_vectors, user_vectors, moments)
    }

    fn with_moments(
        item_ids: ItemIds,
        user_ids: Vec<String>,
        item_vectors: Matrix,
        user_vectors: Matrix,
        moments: VectorMoments,
    ) -> Self {
        let user_positions = user_ids.into_iter().enumerate().map(|(n, id)| (id, n)).collect();
        Self { item_ids, user_positions, item_vectors, user_vectors, user_trained: Vec::new(), moments }
    }

    /// `position` if the item there is `item_id` (a position a caller sent with the id).
    pub fn item_at(&self, position: usize, item_id: &str) -> Option<usize> {
        self.item_ids.holds(position, item_id).then_some(position)
    }

    pub fn item_position(&self, item_id: &str) -> Option<usize> {
        self.item_ids.position(item_id)
    }

    pub fn num_items(&self) -> usize {
        self.item_ids.len()
    }

    /// The user's query vector, computed now from `history` (latest first, with its
    /// `timestamps`), so the click of a second ago counts:
    /// - a user the bundle's per-user table knows (MovieLens's graph model) starts from
    ///   the trained vector, a cache of what training saw; each later event in the
    ///   history (newer than the user's latest training event) pulls its direction
    ///   toward that item's as much as one trained event weighs (the events' unit
    ///   vectors averaged with the trained direction, `events` times), keeping its length;
    /// - anyone else (a catalogue-scale bundle has no table; a user new since the bundle
    ///   was built) is the mean of the vectors of their latest `HISTORY_ITEMS` items.
    ///
    /// `None` with no signal at all.
    pub fn user_vector(&self, user_id: &str, history: &[String], timestamps: &[i64]) -> Option<Vec<f32>> {
        let Some(&position) = self.user_positions.get(user_id) else {
            return self.mean_item_vector(history.iter().take(HISTORY_ITEMS));
        };
        let trained = self.user_vectors.row(position);
        let Some(&TrainedOn { latest_event, events }) = self.user_trained.get(position) else {
            return Some(trained.to_vec());
        };
        let later: Vec<&[f32]> = history
            .iter()
            .zip(timestamps)
            .take(HISTORY_ITEMS)
            .take_while(|&(_, &time)| time > latest_event)
            .filter_map(|(id, _)| Some(self.item_vectors.row(self.item_position(id)?)))
            .collect();
        let length = norm(trained);
        if later.is_empty() || length == 0.0 {
            return Some(trained.to_vec());
        }
        let mut direction: Vec<f32> = trained.iter().map(|v| v / length * events.max(1) as f32).collect();
        for item in later {
            let item_length = norm(item);
            if item_length > 0.0 {
                direction.iter_mut().zip(item).for_each(|(d, v)| *d += v / item_length);
            }
        }
        let direction_length = norm(&direction);
        if direction_length == 0.0 {
            return Some(trained.to_vec());
        }
        Some(direction.into_iter().map(|d| d / direction_length * length).collect())
    }

    /// Mean vector of the given items that the bundle knows.
    pub fn mean_item_vector<'a>(&self, items: impl Iterator<Item = &'a String>) -> Option<Vec<f32>> {
        self.weighted_mean_item_vector(items.map(|id| (id, 1.0)))
    }

    /// Weighted mean vector of the given items that the bundle knows; `None` when none is
    /// known or their weights sum to zero.
    pub fn weighted_mean_item_vector<'a>(&self, items: impl Iterator<Item = (&'a String, f32)>) -> Option<Vec<f32>> {
        let mut sum = vec![0.0f32; self.item_vectors.cols];
        let mut total_weight = 0.0f32;
        for (position, weight) in items.filter_map(|(id, weight)| Some((self.item_position(id)?, weight))) {
            for (total, value) in sum.iter_mut().zip(self.item_vectors.row(position)) {
                *total += weight * value;
            }
            total_weight += weight;
        }
        (total_weight > 0.0).then(|| sum.into_iter().map(|value| value / total_weight).collect())
    }

    pub fn score(&self, user_vector: &[f32], item_position: usize) -> f32 {
        dot(user_vector, self.item_vectors.row(item_position))
    }
}

fn norm(vector: &[f32]) -> f32 {
    dot(vector, vector).sqrt()
}

/// Inner product in eight independent lanes, so the compiler vectorises it (a single
/// running sum is one long dependency chain); float rounding differs from a sequential
/// sum in the last bits only.
pub fn dot(left: &[f32], right: &[f32]) -> f32 {
    const LANES: usize = 8;
    let len = left.len().min(right.len());
    let (left, right) = (&left[..len], &right[..len]);
    let mut lanes = [0.0f32; LANES];
    let mut left_chunks = left.chunks_exact(LANES);
    let mut right_chunks = right.chunks_exact(LANES);
    for (a, b) in (&mut left_chunks).zip(&mut right_chunks) {
        for lane in 0..LANES {
            lanes[lane] += a[lane] * b[lane];
        }
    }
    let tail: f32 = left_chunks.remainder().iter().zip(right_chunks.remainder()).map(|(a, b)| a * b).sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> EmbeddingSpace {
        EmbeddingSpace::new(
            ItemIds::new(["a", "b"]),
            vec!["u".into()],
            Matrix::owned(2, 2, vec![1.0, 0.0, 0.0, 1.0]),
            Matrix::owned(1, 2, vec![0.5, 2.0]),
        )
    }

    #[test]
    fn trained_user_uses_their_own_vector() {
        assert_eq!(space().user_vector("u", &[], &[]), Some(vec![0.5, 2.0]));
    }

    #[test]
    fn events_after_training_move_a_trained_users_vector_and_earlier_ones_do_not() {
        // "u" was trained on 3 events, the latest at t = 100; the vector [0.5, 2.0] (length
        // √4.25) is the cache of those.
        let space = EmbeddingSpace { user_trained: vec![TrainedOn { latest_event: 100, events: 3 }], ..space() };
        let history = ["a".to_string(), "b".to_string()];
        assert_eq!(space.user_vector("u", &history, &[90, 80]), Some(vec![0.5, 2.0]), "nothing new since training");
        assert_eq!(space.user_vector("u", &history, &[]), Some(vec![0.5, 2.0]), "no times: nothing known to be new");

        // A click on "a" ([1, 0]) at t = 150 weighs as one of four events.
        let moved = space.user_vector("u", &history, &[150, 90]).unwrap();
        let length = 4.25f32.sqrt();
        let direction = [3.0 * 0.5 / length + 1.0, 3.0 * 2.0 / length];
        let direction_length = (direction[0] * direction[0] + direction[1] * direction[1]).sqrt();
        for (got, want) in moved.iter().zip(direction.map(|d| d / direction_length * length)) {
            assert!((got - want).abs() < 1e-5, "{moved:?}");
        }
        assert!(moved[0] / moved[1] > 0.5 / 2.0, "toward the clicked item");
        assert!((norm(&moved) - length).abs() < 1e-5, "the trained length is kept");

        // Unknown items and users with no entry leave the vector as trained.
        let unknown = ["zzz".to_string()];
        assert_eq!(space.user_vector("u", &unknown, &[150]), Some(vec![0.5, 2.0]));
        assert_eq!(self::space().user_vector("u", &history, &[150, 90]), Some(vec![0.5, 2.0]));
    }

    #[test]
    fn moments_give_the_sums_of_a_querys_scores_over_every_item() {
        let vectors = Matrix::owned(3, 2, vec![1.0, 0.0, 0.5, 2.0, -1.0, 0.25]);
        let query = [0.5f32, -2.0];
        let scores: Vec<f64> = (0..3).map(|n| f64::from(dot(&query, vectors.row(n)))).collect();
        let (sum, squares) = VectorMoments::of(&vectors).score_sums(&query);
        assert!((sum - scores.iter().sum::<f64>()).abs() < 1e-9);
        assert!((squares - scores.iter().map(|s| s * s).sum::<f64>()).abs() < 1e-9);
    }

    #[test]
    fn new_user_is_the_mean_of_their_known_history_items() {
        let history = vec!["a".to_string(), "zzz".to_string(), "b".to_string()];
        assert_eq!(space().user_vector("new", &history, &[]), Some(vec![0.5, 0.5]));
        assert_eq!(space().user_vector("new", &[], &[]), None);
    }
}
