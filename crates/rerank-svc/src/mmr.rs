//! Maximal marginal relevance over item genres: each pick maximises
//! `λ · relevance − (1 − λ) · max similarity to the items already picked`, with
//! relevance min-max normalised over the window and similarity the cosine of genre sets.

use std::{collections::HashMap, path::Path};

use recsys_bundle::read_catalog;

use crate::Result;

/// Genres of every catalog item, as bit sets (catalogs have few genres).
pub struct GenreIndex {
    genres: HashMap<String, u64>,
}

impl GenreIndex {
    pub fn load(dir: &Path) -> Result<Self> {
        let catalog = read_catalog(dir)?;
        let mut vocabulary: Vec<&str> =
            catalog.iter().flat_map(|item| item.genres.iter().map(String::as_str)).collect();
        vocabulary.sort_unstable();
        vocabulary.dedup();
        let bit = |genre: &str| vocabulary.binary_search(&genre).map_or(0, |n| 1u64 << (n % 64));
        let genres = catalog
            .iter()
            .map(|item| (item.id.clone(), item.genres.iter().fold(0u64, |set, g| set | bit(g))))
            .collect();
        Ok(Self { genres })
    }

    pub fn from_sets(genres: HashMap<String, u64>) -> Self {
        Self { genres }
    }

    /// Cosine similarity of two items' genre sets; 0 when either is unknown or has none.
    pub fn similarity(&self, left: &str, right: &str) -> f32 {
        let (Some(&a), Some(&b)) = (self.genres.get(left), self.genres.get(right)) else {
            return 0.0;
        };
        let (na, nb) = (a.count_ones(), b.count_ones());
        if na == 0 || nb == 0 {
            return 0.0;
        }
        (a & b).count_ones() as f32 / ((na * nb) as f32).sqrt()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Picked {
    pub item_id: String,
    pub score: f32,
    pub mmr_score: f32,
}

/// Picks `top_k` of `candidates` (item, relevance; best first) by MMR.
pub fn diversify(
    candidates: &[(String, f32)],
    top_k: usize,
    relevance_weight: f32,
    genres: &GenreIndex,
) -> Vec<Picked> {
    let (min, max) =
        candidates.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), (_, s)| (lo.min(*s), hi.max(*s)));
    let span = if max > min { max - min } else { 1.0 };
    let relevance: Vec<f32> = candidates.iter().map(|(_, s)| (s - min) / span).collect();
    // Highest similarity of each remaining candidate to anything picked so far.
    let mut max_similarity = vec![0.0f32; candidates.len()];
    let mut remaining: Vec<usize> = (0..candidates.len()).collect();
    let mut picked = Vec::with_capacity(top_k.min(candidates.len()));
    while picked.len() < top_k && !remaining.is_empty() {
        let objective = |n: usize| relevance_weight * relevance[n] - (1.0 - relevance_weight) * max_similarity[n];
        let (slot, &best) = remaining
            .iter()
            .enumerate()
            .max_by(|(_, &a), (_, &b)| objective(a).total_cmp(&objective(b)).then(b.cmp(&a)))
            .expect("remaining is not empty");
        let mmr_score = objective(best);
        remaining.swap_remove(slot);
        for &n in &remaining {
            let similarity = genres.similarity(&candidates[n].0, &candidates[best].0);
            max_similarity[n] = max_similarity[n].max(similarity);
        }
        picked.push(Picked { item_id: candidates[best].0.clone(), score: candidates[best].1, mmr_score });
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn genres() -> GenreIndex {
        GenreIndex::from_sets(HashMap::from([
            ("action1".to_string(), 0b01),
            ("action2".to_string(), 0b01),
            ("comedy".to_string(), 0b10),
        ]))
    }

    fn candidates() -> Vec<(String, f32)> {
        vec![("action1".into(), 0.9), ("action2".into(), 0.85), ("comedy".into(), 0.8)]
    }

    #[test]
    fn pure_relevance_keeps_the_ranked_order() {
        let picked = diversify(&candidates(), 3, 1.0, &genres());
        let ids: Vec<&str> = picked.iter().map(|p| p.item_id.as_str()).collect();
        assert_eq!(ids, ["action1", "action2", "comedy"]);
    }

    #[test]
    fn diversity_lifts_a_different_genre_above_a_near_duplicate() {
        let picked = diversify(&candidates(), 2, 0.5, &genres());
        let ids: Vec<&str> = picked.iter().map(|p| p.item_id.as_str()).collect();
        assert_eq!(ids, ["action1", "comedy"]);
        assert_eq!(picked[1].score, 0.8, "the incoming relevance is kept");
    }

    #[test]
    fn similarity_is_cosine_of_genre_sets() {
        let index = GenreIndex::from_sets(HashMap::from([("a".to_string(), 0b11), ("b".to_string(), 0b01)]));
        assert!((index.similarity("a", "b") - 1.0 / 2f32.sqrt()).abs() < 1e-6);
        assert_eq!(index.similarity("a", "missing"), 0.0);
    }
}
