//! The recall channels. Each proposes item positions, best first, from one kind of
//! evidence; none knows about the others (fusion combines them).

use std::{collections::HashSet, path::Path};

use recsys_bundle::{embeddings::dot, read_catalog, read_manifest, read_popularity, EmbeddingSpace, ItemToItem};

use crate::Result;

/// The session-intent channel looks at this many of the latest items.
const REALTIME_WINDOW: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Nearest items to the user's long-term vector.
    Embedding,
    /// The item-to-item model (EASE weights) applied to the user's whole history.
    ItemCf,
    /// Nearest items to the mean of the last few items: what the user is into right now.
    Realtime,
    /// Most interacted items overall.
    Popular,
    /// Newest catalog items, which behaviour-based channels cannot yet surface.
    ColdStart,
}

impl Channel {
    pub const ALL: [Channel; 5] =
        [Channel::Embedding, Channel::ItemCf, Channel::Realtime, Channel::Popular, Channel::ColdStart];

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|channel| channel.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Channel::Embedding => "embedding",
            Channel::ItemCf => "item_cf",
            Channel::Realtime => "realtime",
            Channel::Popular => "popular",
            Channel::ColdStart => "cold_start",
        }
    }
}

/// Everything recall needs from a bundle, indexed by item position.
pub struct RecallIndex {
    pub version: String,
    pub embeddings: EmbeddingSpace,
    item_to_item: ItemToItem,
    popular: Vec<usize>,
    newest: Vec<usize>,
}

impl RecallIndex {
    pub fn load(dir: &Path) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let embeddings = EmbeddingSpace::load(dir)?;
        let catalog = read_catalog(dir)?;
        let item_to_item = ItemToItem::load(dir, &embeddings)?;
        let popular = read_popularity(dir)?.into_iter().filter_map(|(id, _)| embeddings.item_position(&id)).collect();
        let mut newest: Vec<usize> = (0..catalog.len()).collect();
        newest.sort_by_key(|&n| (std::cmp::Reverse(catalog[n].year), catalog[n].interactions, n));
        Ok(Self { version: manifest.version, embeddings, item_to_item, popular, newest })
    }

    /// One channel's proposals for a user with `history` (most recent first), skipping
    /// `excluded` so that the quota is spent on items that can be served.
    pub fn propose(
        &self,
        channel: Channel,
        user_id: &str,
        history: &[String],
        excluded: &HashSet<usize>,
        quota: usize,
    ) -> Vec<usize> {
        if quota == 0 {
            return Vec::new();
        }
        match channel {
            Channel::Embedding => match self.embeddings.user_vector(user_id, history) {
                Some(vector) => self.nearest(&vector, excluded, quota),
                None => Vec::new(),
            },
            Channel::Realtime => match self.embeddings.mean_item_vector(history.iter().take(REALTIME_WINDOW)) {
                Some(vector) => self.nearest(&vector, excluded, quota),
                None => Vec::new(),
            },
            Channel::ItemCf => self.item_cf(history, excluded, quota),
            Channel::Popular => take_allowed(&self.popular, excluded, quota),
            Channel::ColdStart => take_allowed(&self.newest, excluded, quota),
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

    fn item_cf(&self, history: &[String], excluded: &HashSet<usize>, quota: usize) -> Vec<usize> {
        // The whole history, unweighted (recency is the realtime channel's job).
        let seeds: Vec<usize> = history.iter().filter_map(|id| self.embeddings.item_position(id)).collect();
        let mut scored: Vec<(f32, usize)> = self
            .item_to_item
            .scores(&seeds)
            .into_iter()
            .enumerate()
            .filter(|&(n, score)| score > 0.0 && !excluded.contains(&n))
            .map(|(n, score)| (score as f32, n))
            .collect();
        top_by_score(&mut scored, quota)
    }
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
