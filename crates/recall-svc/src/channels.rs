//! The recall channels (`recsys_proto::v1::Channel`). Each proposes item positions, best
//! first, from one kind of evidence; none knows about the others (fusion combines them).
//! Each can also score any item for the user, so every candidate leaves recall with every
//! channel's score (the recall → rank contract).

use std::{collections::HashSet, path::Path};

use recsys_bundle::{
    embeddings::dot, read_catalog, read_manifest, read_popularity, EmbeddingSpace, ItemScores, ItemToItem,
};
use recsys_proto::v1::Channel;

use crate::Result;

/// The session-intent channel looks at this many of the latest items.
const REALTIME_WINDOW: usize = 5;

/// Everything recall needs from a bundle, indexed by item position.
pub struct RecallIndex {
    pub version: String,
    pub embeddings: EmbeddingSpace,
    item_to_item: ItemToItem,
    /// Item positions, most popular first, and each position's popularity score.
    popular: Vec<usize>,
    popularity: Vec<f32>,
    /// Item positions, newest first, and each position's release year.
    newest: Vec<usize>,
    years: Vec<f32>,
}

/// What one user gives the channels, computed once per request and shared by every
/// channel's proposals and by the per-candidate channel scores.
pub struct UserSignals {
    /// The long-term vector (trained, or the mean of the history for a new user).
    vector: Option<Vec<f32>>,
    /// The mean vector of the latest few items.
    recent: Option<Vec<f32>>,
    /// The item-to-item model's scores given the whole history, for the items it has a
    /// weight towards (the rest score 0); `None` without a known history item.
    item_cf: Option<ItemScores>,
}

impl RecallIndex {
    pub fn load(dir: &Path) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let embeddings = EmbeddingSpace::load(dir)?;
        let catalog = read_catalog(dir)?;
        let item_to_item = ItemToItem::load(dir, &embeddings)?;
        let mut popularity = vec![0.0f32; catalog.len()];
        let mut popular = Vec::new();
        for (id, score) in read_popularity(dir)? {
            if let Some(position) = embeddings.item_position(&id) {
                popularity[position] = score;
                popular.push(position);
            }
        }
        let mut newest: Vec<usize> = (0..catalog.len()).collect();
        newest.sort_by_key(|&n| (std::cmp::Reverse(catalog[n].year), catalog[n].interactions, n));
        let years = catalog.iter().map(|item| item.year as f32).collect();
        Ok(Self { version: manifest.version, embeddings, item_to_item, popular, popularity, newest, years })
    }

    /// The user's signals from `history` (most recent first).
    pub fn signals(&self, user_id: &str, history: &[String]) -> UserSignals {
        let seeds: Vec<usize> = history.iter().filter_map(|id| self.embeddings.item_position(id)).collect();
        UserSignals {
            vector: self.embeddings.user_vector(user_id, history),
            recent: self.embeddings.mean_item_vector(history.iter().take(REALTIME_WINDOW)),
            item_cf: (!seeds.is_empty()).then(|| self.item_to_item.sparse_scores(&seeds)),
        }
    }

    /// Whether a channel's proposals cost enough to run on the blocking pool under a
    /// budget: the popular and cold-start lists are precomputed, so taking the first
    /// `quota` allowed items costs less than handing the work to another thread.
    pub fn is_costly(channel: Channel) -> bool {
        matches!(channel, Channel::Embedding | Channel::Realtime | Channel::ItemCf)
    }

    /// One channel's proposals, best first, skipping `excluded` so that the quota is
    /// spent on items that can be served.
    pub fn propose(
        &self,
        channel: Channel,
        signals: &UserSignals,
        excluded: &HashSet<usize>,
        quota: usize,
    ) -> Vec<usize> {
        if quota == 0 {
            return Vec::new();
        }
        match channel {
            Channel::Embedding => signals.vector.as_ref().map(|v| self.nearest(v, excluded, quota)).unwrap_or_default(),
            Channel::Realtime => signals.recent.as_ref().map(|v| self.nearest(v, excluded, quota)).unwrap_or_default(),
            Channel::ItemCf => signals.item_cf.as_ref().map(|s| item_cf_top(s, excluded, quota)).unwrap_or_default(),
            Channel::Popular => take_allowed(&self.popular, excluded, quota),
            Channel::ColdStart => take_allowed(&self.newest, excluded, quota),
            Channel::Unspecified => Vec::new(),
        }
    }

    /// The channel's own score of `item` for this user, whether or not it proposed the
    /// item; `None` when the channel has nothing to say about this user.
    pub fn score(&self, channel: Channel, signals: &UserSignals, item: usize) -> Option<f32> {
        match channel {
            Channel::Embedding => signals.vector.as_ref().map(|v| self.embeddings.score(v, item)),
            Channel::Realtime => signals.recent.as_ref().map(|v| self.embeddings.score(v, item)),
            Channel::ItemCf => signals.item_cf.as_ref().map(|scores| scores.get(item) as f32),
            Channel::Popular => Some(self.popularity[item]),
            Channel::ColdStart => Some(self.years[item]),
            Channel::Unspecified => None,
        }
    }

    /// Exact top-`quota` by inner product. The catalog is small enough (thousands) that
    /// a scan beats an approximate index; a larger catalog would swap in HNSW here.
    fn nearest(&self, vector: &[f32], excluded: &HashSet<usize>, quota: usize) -> Vec<usize> {
        let vectors = &self.embeddings.item_vectors;
        let mut scored: Vec<(f32, usize)> =
            (0..vectors.rows).filter(|n| !excluded.contains(n)).map(|n| (dot(vector, vectors.row(n)), n)).collect();
        top_by_score(&mut scored, quota)
    }
}

/// The items the history gives positive item-to-item evidence for, strongest first.
fn item_cf_top(scores: &ItemScores, excluded: &HashSet<usize>, quota: usize) -> Vec<usize> {
    let mut scored: Vec<(f32, usize)> = scores
        .positive()
        .into_iter()
        .filter(|(n, _)| !excluded.contains(n))
        .map(|(n, score)| (score as f32, n))
        .collect();
    top_by_score(&mut scored, quota)
}

fn take_allowed(ranked: &[usize], excluded: &HashSet<usize>, quota: usize) -> Vec<usize> {
    ranked.iter().copied().filter(|n| !excluded.contains(n)).take(quota).collect()
}

fn top_by_score(scored: &mut Vec<(f32, usize)>, quota: usize) -> Vec<usize> {
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
    fn top_by_score_keeps_the_best_in_order() {
        let mut scored = vec![(0.1, 0), (0.9, 1), (0.5, 2), (0.7, 3)];
        assert_eq!(top_by_score(&mut scored, 2), vec![1, 3]);
    }

    #[test]
    fn take_allowed_skips_excluded_before_counting() {
        assert_eq!(take_allowed(&[4, 5, 6], &HashSet::from([4]), 2), vec![5, 6]);
    }
}
