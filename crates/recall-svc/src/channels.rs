//! The recall channels (`recsys_proto::v1::Channel`). Each proposes item positions, best
//! first, from one kind of evidence; none knows about the others (fusion combines them).
//! Each can also score any item for the user, so every candidate leaves recall with every
//! channel's score (the recall → rank contract).

use std::path::Path;

use recsys_bundle::{
    by_popularity, embeddings::dot, read_item_columns, read_manifest, read_popularity, year_of_ms, BundleError,
    ColdStartScore, Column, ContentMap, EmbeddingSpace, ItemColumns, ItemScores, ItemToItem,
};
use recsys_proto::v1::{CatalogItem, Channel};

use crate::{
    nearest::{top_by_score, NearestItems},
    sequence::SequenceEncoder,
    ExcludedItems, Result,
};

/// Requests whose sequence encoder run failed (the channel sat them out).
static SEQUENCE_FAILURES: std::sync::LazyLock<prometheus::IntCounter> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter!(
        "recsys_recall_sequence_encoder_failures_total",
        "Requests whose sequence encoder run failed, so the sequence channel sat them out"
    )
    .expect("metric registers once")
});
/// The cold-start channel scans its pool on every request: the newest this many items
/// without interactions bound that scan (about 0.3 ms at 64 dimensions).
const NEW_ITEM_POOL: usize = 10_000;
/// A new-item pool up to this size is scanned inline (tens of microseconds, less than a
/// hand-off to the blocking pool costs under load).
const INLINE_NEW_ITEMS: usize = 2_000;

/// Everything recall needs from a bundle, indexed by item position.
pub struct RecallIndex {
    pub version: String,
    pub embeddings: EmbeddingSpace,
    nearest: NearestItems,
    item_to_item: ItemToItem,
    /// Item positions, most popular first, and each position's popularity score.
    popular: Vec<usize>,
    popularity: Column<f32>,
    /// Items without interactions when the bundle was trained (their vectors come from
    /// their attributes: training's content.py), newest first; empty when the bundle has
    /// no cold-start section.
    new_items: Vec<usize>,
    /// Attributes → vector (`Manifest::cold_start`), for run-time catalogue items no
    /// bundle knows.
    content: Option<ContentMap>,
    /// How the cold-start channel scores (the bundle's threshold is on this score).
    cold_start_score: ColdStartScore,
    /// The sequence channel's encoder, when the bundle ships one.
    sequence: Option<SequenceEncoder>,
}

/// What one user gives the channels, computed once per request and shared by every
/// channel's proposals and by the per-candidate channel scores.
pub struct UserSignals {
    /// The long-term vector (trained, or the mean of the history for a new user).
    vector: Option<Vec<f32>>,
    /// The session's items' vectors, weighted by recency and kind (`SessionConfig`).
    recent: Option<Vec<f32>>,
    /// The item-to-item model's scores given the whole history, for the items it has a
    /// weight towards (the rest score 0); `None` without a known history item.
    item_cf: Option<ItemScores>,
    /// The cold-start channel's query: `vector`, scaled to unit length when the bundle's
    /// threshold is on u·v / |u| (`ColdStartScore`); `None` for a zero vector.
    cold_start_query: Option<Vec<f32>>,
    /// The sequence encoder's query from the latest items in their order; `None` without
    /// an encoder or a known history item.
    sequence: Option<Vec<f32>>,
}

impl RecallIndex {
    /// `ann_expansion`: the HNSW search's candidate list size when the bundle has an index;
    /// `onnx_library`: ONNX Runtime (else `ORT_DYLIB_PATH`), loaded only for a bundle with a
    /// sequence encoder.
    pub fn load(dir: &Path, ann_expansion: usize, onnx_library: Option<&Path>) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let ItemColumns { ids, years, interactions } = read_item_columns(dir)?;
        let embeddings = EmbeddingSpace::load_with(dir, &manifest, ids)?;
        let nearest = NearestItems::load(dir, &manifest, &embeddings.item_vectors, ann_expansion)?;
        let item_to_item = ItemToItem::load(dir, &manifest)?;
        let popularity = read_popularity(dir, &manifest)?;
        let popular = by_popularity(popularity.as_slice());
        let new_items = match manifest.cold_start {
            Some(_) => newest_without_interactions(&years, &interactions, NEW_ITEM_POOL),
            None => Vec::new(),
        };
        let content = match manifest.cold_start.as_ref().and_then(|policy| policy.content.as_ref()) {
            Some(file) => Some(
                ContentMap::new(file, embeddings.item_vectors.cols)
                    .map_err(|reason| BundleError::Malformed { path: dir.join("manifest.json"), reason })?,
            ),
            None => None,
        };
        let cold_start_score = manifest.cold_start.as_ref().map(|policy| policy.score).unwrap_or_default();
        let sequence = match &manifest.sequence {
            Some(spec) => {
                let environment = recsys_bundle::onnx::environment(onnx_library).map_err(|reason| {
                    BundleError::Malformed { path: dir.join(&spec.file), reason: format!("cannot be run: {reason}") }
                })?;
                let encoder = SequenceEncoder::load(dir, &manifest, spec, &environment)?;
                // The failure count is exported from the first encoder on, at zero.
                std::sync::LazyLock::force(&SEQUENCE_FAILURES);
                Some(encoder)
            }
            None => None,
        };
        Ok(Self {
            version: manifest.version,
            embeddings,
            nearest,
            item_to_item,
            popular,
            popularity,
            new_items,
            content,
            cold_start_score,
            sequence,
        })
    }

    /// Runs every channel for a few users made of the most popular items, before the
    /// service reports SERVING: at a million items the first searches otherwise pay for
    /// cold caches and first allocations, and miss the orchestrator's recall budget.
    pub fn warm_up(&self, quota: usize) {
        const USERS: usize = 16;
        const HISTORY: usize = 10;
        let ids: Vec<String> =
            self.popular.iter().take(USERS * HISTORY).map(|&n| self.embeddings.item_ids.get(n).to_string()).collect();
        for history in ids.chunks(HISTORY) {
            let signals = self.signals("", history, &[], &[1.0; HISTORY]);
            for channel in Channel::ALL {
                self.propose(channel, &signals, &ExcludedItems::default(), quota);
            }
        }
    }

    /// The user's signals from `history` (most recent first, with its `timestamps`);
    /// `session` weighs the history's first entries for the real-time channel
    /// (`SessionConfig::weights`).
    pub fn signals(&self, user_id: &str, history: &[String], timestamps: &[i64], session: &[f32]) -> UserSignals {
        self.signals_with(user_id, history, timestamps, session, true)
    }

    /// [`Self::signals`], running the sequence encoder only when `sequence` says its
    /// channel is on (given a quota and a weight): a request that will not use its query
    /// does not pay for it.
    pub fn signals_with(
        &self,
        user_id: &str,
        history: &[String],
        timestamps: &[i64],
        session: &[f32],
        sequence: bool,
    ) -> UserSignals {
        let seeds: Vec<usize> = history.iter().filter_map(|id| self.embeddings.item_position(id)).collect();
        let vector = self.embeddings.user_vector(user_id, history, timestamps);
        UserSignals {
            cold_start_query: vector.as_deref().and_then(|vector| cold_start_query(vector, self.cold_start_score)),
            vector,
            recent: self.embeddings.weighted_mean_item_vector(history.iter().zip(session.iter().copied())),
            item_cf: (!seeds.is_empty()).then(|| self.item_to_item.sparse_scores(&seeds)),
            sequence: if sequence { self.sequence_query(&seeds) } else { None },
        }
    }

    /// The sequence encoder's query for the known history items (`seeds`, newest first);
    /// a failing run leaves the channel out of this request — counted, and logged at the
    /// 1st, 2nd, 4th, 8th … failure so that a broken encoder cannot flood the log.
    fn sequence_query(&self, seeds: &[usize]) -> Option<Vec<f32>> {
        let encoder = self.sequence.as_ref()?;
        let vectors = seeds.iter().map(|&n| self.embeddings.item_vectors.row(n));
        encoder.query(vectors).unwrap_or_else(|error| {
            SEQUENCE_FAILURES.inc();
            let failures = SEQUENCE_FAILURES.get();
            if failures.is_power_of_two() {
                tracing::warn!(%error, failures, "sequence encoder failed: the sequence channel sits this request out");
            }
            None
        })
    }

    /// Whether a channel's proposals cost enough to run on the blocking pool under a
    /// budget. The popular list is precomputed and a small new-item pool is scanned
    /// quickly: either costs less than handing the work to another thread.
    pub fn is_costly(&self, channel: Channel) -> bool {
        match channel {
            Channel::Embedding | Channel::Realtime | Channel::ItemCf | Channel::Sequence => true,
            Channel::ColdStart => self.new_items.len() > INLINE_NEW_ITEMS,
            Channel::Popular | Channel::Unspecified => false,
        }
    }

    /// One channel's proposals, best first, skipping `excluded` so that the quota is
    /// spent on items that can be served.
    pub fn propose(
        &self,
        channel: Channel,
        signals: &UserSignals,
        excluded: &ExcludedItems,
        quota: usize,
    ) -> Vec<usize> {
        if quota == 0 {
            return Vec::new();
        }
        match channel {
            Channel::Embedding => signals.vector.as_ref().map(|v| self.nearest(v, excluded, quota)).unwrap_or_default(),
            Channel::Realtime => signals.recent.as_ref().map(|v| self.nearest(v, excluded, quota)).unwrap_or_default(),
            Channel::Sequence => {
                signals.sequence.as_ref().map(|v| self.nearest(v, excluded, quota)).unwrap_or_default()
            }
            Channel::ItemCf => signals.item_cf.as_ref().map(|s| item_cf_top(s, excluded, quota)).unwrap_or_default(),
            Channel::Popular => take_allowed(&self.popular, excluded, quota),
            Channel::ColdStart => {
                signals.cold_start_query.as_ref().map(|v| self.best_new_items(v, excluded, quota)).unwrap_or_default()
            }
            Channel::Unspecified => Vec::new(),
        }
    }

    /// The channel's own score of `item` for this user, whether or not it proposed the
    /// item; `None` when the channel has nothing to say about this user (or, for the
    /// cold-start channel, about this bundle: it has no items without interactions).
    pub fn score(&self, channel: Channel, signals: &UserSignals, item: usize) -> Option<f32> {
        match channel {
            Channel::Embedding => signals.vector.as_ref().map(|v| self.embeddings.score(v, item)),
            Channel::Realtime => signals.recent.as_ref().map(|v| self.embeddings.score(v, item)),
            Channel::Sequence => signals.sequence.as_ref().map(|v| self.embeddings.score(v, item)),
            Channel::ItemCf => signals.item_cf.as_ref().map(|scores| scores.get(item) as f32),
            Channel::Popular => Some(self.popularity.as_slice()[item]),
            // Nothing to say without new items (a bundle without a cold-start section).
            Channel::ColdStart if self.new_items.is_empty() => None,
            Channel::ColdStart => signals.cold_start_query.as_ref().map(|v| self.embeddings.score(v, item)),
            Channel::Unspecified => None,
        }
    }

    /// The content-based cold-start channel: the bundle's items without interactions
    /// whose (attribute-mapped) vectors are nearest the user's, by a scan of that pool.
    fn best_new_items(&self, query: &[f32], excluded: &ExcludedItems, quota: usize) -> Vec<usize> {
        let mut scored: Vec<(f32, usize)> = self
            .new_items
            .iter()
            .filter(|n| !excluded.contains(n))
            .map(|&n| (self.embeddings.score(query, n), n))
            .collect();
        top_by_score(&mut scored, quota)
    }

    /// Run-time catalogue items no bundle knows (newest first), as the cold-start channel
    /// proposes them: the best `count` for the user by the score of the vector their
    /// attributes map to (`category` genres, publish year), with that score; without a
    /// content map or a user vector, the newest `count`, each scored 1.
    pub fn order_runtime_items(
        &self,
        signals: &UserSignals,
        items: &[std::sync::Arc<CatalogItem>],
        count: usize,
    ) -> Vec<(String, f32)> {
        let (Some(content), Some(query)) = (&self.content, &signals.cold_start_query) else {
            return items.iter().take(count).map(|item| (item.item_id.clone(), 1.0)).collect();
        };
        let mut scored: Vec<(String, f32)> = items
            .iter()
            .map(|item| {
                let genres = item.category.split('|').filter(|genre| !genre.is_empty());
                let vector = content.vector(genres, year_of_ms(item.publish_time_ms));
                (item.item_id.clone(), dot(&vector, query))
            })
            .collect();
        // Stable: equal scores keep the newest first.
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        scored.truncate(count);
        scored
    }

    /// How many items the cold-start channel chooses from.
    pub fn new_item_count(&self) -> usize {
        self.new_items.len()
    }

    fn nearest(&self, vector: &[f32], excluded: &ExcludedItems, quota: usize) -> Vec<usize> {
        self.nearest.search(&self.embeddings.item_vectors, vector, excluded, quota)
    }

    /// Whether the embedding channels search an approximate index (else they scan).
    pub fn is_approximate(&self) -> bool {
        self.nearest.is_approximate()
    }
}

/// The items the history gives positive item-to-item evidence for, strongest first.
fn item_cf_top(scores: &ItemScores, excluded: &ExcludedItems, quota: usize) -> Vec<usize> {
    let mut scored: Vec<(f32, usize)> = scores
        .positive()
        .into_iter()
        .filter(|(n, _)| !excluded.contains(n))
        .map(|(n, score)| (score as f32, n))
        .collect();
    top_by_score(&mut scored, quota)
}

fn take_allowed(ranked: &[usize], excluded: &ExcludedItems, quota: usize) -> Vec<usize> {
    ranked.iter().copied().filter(|n| !excluded.contains(n)).take(quota).collect()
}

/// Positions of the items without interactions, newest release first (ties by position),
/// at most `limit`.
fn newest_without_interactions(years: &[u32], interactions: &[u64], limit: usize) -> Vec<usize> {
    let mut items: Vec<usize> = (0..years.len()).filter(|&n| interactions[n] == 0).collect();
    items.sort_by_key(|&n| (std::cmp::Reverse(years[n]), n));
    items.truncate(limit);
    items
}

/// The cold-start channel's query from the user's vector, as the bundle scores
/// (`ColdStartScore`); `None` for a zero (or not finite) vector, which finds nothing.
fn cold_start_query(vector: &[f32], score: ColdStartScore) -> Option<Vec<f32>> {
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    (norm > 0.0 && norm.is_finite()).then(|| match score {
        ColdStartScore::UnitUser => vector.iter().map(|v| v / norm).collect(),
        ColdStartScore::InnerProduct => vector.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_allowed_skips_excluded_before_counting() {
        assert_eq!(take_allowed(&[4, 5, 6], &ExcludedItems::from_iter([4]), 2), vec![5, 6]);
    }

    #[test]
    fn the_new_item_pool_holds_items_without_interactions_newest_first() {
        let years = [1990, 1998, 1995, 1998, 2001];
        let interactions = [0, 0, 3, 0, 7];
        assert_eq!(newest_without_interactions(&years, &interactions, 10), vec![1, 3, 0]);
        assert_eq!(newest_without_interactions(&years, &interactions, 2), vec![1, 3]);
    }

    #[test]
    fn the_cold_start_query_is_the_users_vector_or_its_unit_length_as_the_bundle_scores() {
        assert_eq!(cold_start_query(&[3.0, 4.0], ColdStartScore::InnerProduct), Some(vec![3.0, 4.0]));
        assert_eq!(cold_start_query(&[3.0, 4.0], ColdStartScore::UnitUser), Some(vec![0.6, 0.8]));
        for score in [ColdStartScore::InnerProduct, ColdStartScore::UnitUser] {
            assert_eq!(cold_start_query(&[0.0, 0.0], score), None);
            assert_eq!(cold_start_query(&[f32::NAN, 1.0], score), None);
        }
    }
}
