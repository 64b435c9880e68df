//! Maximal marginal relevance over item genres: each pick maximises
//! `λ · relevance − (1 − λ) · max similarity to the items already picked`, with
//! similarity the cosine of genre sets — and, for per-list caps, never an item that would
//! put more than a cap's limit of one attribute value in the list.

use std::{collections::HashMap, path::Path};

use recsys_bundle::read_catalog;

use crate::Result;

/// What rerank knows of each bundle item: its genres as a bit set (catalogues have few
/// genres) for similarity, its category (genres, `|`-separated) and its release year.
pub struct BundleItems {
    items: HashMap<String, BundleItem>,
}

#[derive(Debug, Clone, Default)]
pub struct BundleItem {
    pub genre_bits: u64,
    pub category: String,
    /// 0 when unknown.
    pub year: u32,
}

impl BundleItems {
    pub fn load(dir: &Path) -> Result<Self> {
        let catalog = read_catalog(dir)?;
        let mut vocabulary: Vec<&str> =
            catalog.iter().flat_map(|item| item.genres.iter().map(String::as_str)).collect();
        vocabulary.sort_unstable();
        vocabulary.dedup();
        let bit = |genre: &str| vocabulary.binary_search(&genre).map_or(0, |n| 1u64 << (n % 64));
        let items = catalog
            .iter()
            .map(|item| {
                let details = BundleItem {
                    genre_bits: item.genres.iter().fold(0u64, |set, g| set | bit(g)),
                    category: item.genres.join("|"),
                    year: item.year,
                };
                (item.id.clone(), details)
            })
            .collect();
        Ok(Self { items })
    }

    pub fn from_items(items: HashMap<String, BundleItem>) -> Self {
        Self { items }
    }

    pub fn get(&self, item_id: &str) -> Option<&BundleItem> {
        self.items.get(item_id)
    }

    /// Cosine similarity of two items' genre sets; 0 when either is unknown or has none.
    pub fn similarity(&self, left: &str, right: &str) -> f32 {
        let (Some(a), Some(b)) = (self.items.get(left), self.items.get(right)) else {
            return 0.0;
        };
        let (a, b) = (a.genre_bits, b.genre_bits);
        let (na, nb) = (a.count_ones(), b.count_ones());
        if na == 0 || nb == 0 {
            return 0.0;
        }
        (a & b).count_ones() as f32 / ((na * nb) as f32).sqrt()
    }
}

/// Per-list caps: for each cap, each candidate's values of the capped attribute, and how
/// many of each value the list holds so far.
#[derive(Debug, Default)]
pub struct Caps {
    /// Per cap: its limit, then per candidate the values it counts for.
    caps: Vec<(u32, Vec<Vec<String>>)>,
    counts: Vec<HashMap<String, u32>>,
    /// Per cap: whether it is strict (a refused item is never served).
    strict: Vec<bool>,
    /// Per cap, the candidates it refused.
    pub refused: Vec<u64>,
}

impl Caps {
    pub fn add(&mut self, max_per_list: u32, strict: bool, values: Vec<Vec<String>>) {
        self.caps.push((max_per_list, values));
        self.counts.push(HashMap::new());
        self.strict.push(strict);
        self.refused.push(0);
    }

    /// Whether candidate `n` would break cap `cap`.
    fn breaks(&self, cap: usize, n: usize) -> bool {
        let (max, values) = &self.caps[cap];
        values[n].iter().any(|value| self.counts[cap].get(value).copied().unwrap_or(0) >= *max)
    }

    /// The first cap candidate `n` would break, if any.
    pub fn broken_by(&self, n: usize) -> Option<usize> {
        (0..self.caps.len()).find(|&cap| self.breaks(cap, n))
    }

    /// Whether candidate `n` would break a strict cap.
    pub fn breaks_strict(&self, n: usize) -> bool {
        (0..self.caps.len()).any(|cap| self.strict[cap] && self.breaks(cap, n))
    }

    pub fn count(&mut self, n: usize) {
        for ((_, values), counts) in self.caps.iter().zip(&mut self.counts) {
            for value in &values[n] {
                *counts.entry(value.clone()).or_default() += 1;
            }
        }
    }
}

/// A pick: the candidate's index and its MMR objective when picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub index: usize,
    pub mmr_score: f32,
    /// Served past a non-strict cap, because nothing else was left.
    pub backfill: bool,
}

/// Picks up to `top_k` of `pool` (candidate indices into `ids` / `relevance`) by MMR,
/// skipping candidates a cap refuses (counted in `caps.refused`). When the pool runs out
/// before the list is full, candidates only non-strict caps refused fill the rest, in the
/// order they were refused (`Pick::backfill`): a short list is worse than a broken soft cap.
pub fn diversify(
    ids: &[&str],
    relevance: &[f32],
    pool: Vec<usize>,
    top_k: usize,
    relevance_weight: f32,
    genres: &BundleItems,
    caps: &mut Caps,
) -> Vec<Pick> {
    // Highest similarity of each remaining candidate to anything picked so far.
    let mut max_similarity = vec![0.0f32; ids.len()];
    let mut remaining = pool;
    let mut picked = Vec::with_capacity(top_k.min(remaining.len()));
    let mut parked = Vec::new();
    while picked.len() < top_k && !remaining.is_empty() {
        let objective = |n: usize| relevance_weight * relevance[n] - (1.0 - relevance_weight) * max_similarity[n];
        let (slot, &best) = remaining
            .iter()
            .enumerate()
            .max_by(|(_, &a), (_, &b)| objective(a).total_cmp(&objective(b)).then(b.cmp(&a)))
            .expect("remaining is not empty");
        remaining.swap_remove(slot);
        // Counts only grow, so a candidate a cap refuses now is refused for good.
        if let Some(cap) = caps.broken_by(best) {
            caps.refused[cap] += 1;
            if !caps.breaks_strict(best) {
                parked.push(Pick { index: best, mmr_score: objective(best), backfill: true });
            }
            continue;
        }
        caps.count(best);
        picked.push(Pick { index: best, mmr_score: objective(best), backfill: false });
        for &n in &remaining {
            max_similarity[n] = max_similarity[n].max(genres.similarity(ids[n], ids[best]));
        }
    }
    // Backfilled items still count, and a strict cap still holds: the counts grew since
    // an item was parked.
    for pick in parked {
        if picked.len() >= top_k {
            break;
        }
        if !caps.breaks_strict(pick.index) {
            caps.count(pick.index);
            picked.push(pick);
        }
    }
    picked
}

/// Scores min-max normalised over the window to [0, 1] (all equal: all 0).
pub fn normalise(scores: &[f32]) -> Vec<f32> {
    let (min, max) = scores.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &s| (lo.min(s), hi.max(s)));
    let span = if max > min { max - min } else { 1.0 };
    scores.iter().map(|s| (s - min) / span).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(genre_bits: u64) -> BundleItem {
        BundleItem { genre_bits, ..BundleItem::default() }
    }

    fn genres() -> BundleItems {
        BundleItems::from_items(HashMap::from([
            ("action1".to_string(), item(0b01)),
            ("action2".to_string(), item(0b01)),
            ("comedy".to_string(), item(0b10)),
        ]))
    }

    const IDS: [&str; 3] = ["action1", "action2", "comedy"];

    fn picked(weight: f32, top_k: usize, caps: &mut Caps) -> Vec<&'static str> {
        let relevance = normalise(&[0.9, 0.85, 0.8]);
        diversify(&IDS, &relevance, vec![0, 1, 2], top_k, weight, &genres(), caps)
            .into_iter()
            .map(|pick| IDS[pick.index])
            .collect()
    }

    #[test]
    fn pure_relevance_keeps_the_ranked_order() {
        assert_eq!(picked(1.0, 3, &mut Caps::default()), ["action1", "action2", "comedy"]);
    }

    #[test]
    fn diversity_lifts_a_different_genre_above_a_near_duplicate() {
        assert_eq!(picked(0.5, 2, &mut Caps::default()), ["action1", "comedy"]);
    }

    fn genre_values() -> Vec<Vec<String>> {
        vec![vec!["action".into()], vec!["action".into()], vec!["comedy".into()]]
    }

    #[test]
    fn a_strict_cap_refuses_what_would_exceed_it_even_if_the_list_ends_short() {
        let mut caps = Caps::default();
        caps.add(1, true, genre_values());
        assert_eq!(picked(1.0, 3, &mut caps), ["action1", "comedy"]);
        assert_eq!(caps.refused, [1]);
    }

    #[test]
    fn a_backfill_never_breaks_a_strict_cap() {
        let mut caps = Caps::default();
        caps.add(1, false, genre_values());
        // All three from one seller, at most two of them.
        caps.add(2, true, vec![vec!["s1".into()]; 3]);
        assert_eq!(picked(1.0, 3, &mut caps), ["action1", "comedy"], "action2 would be the seller's third");
    }

    #[test]
    fn a_soft_cap_yields_only_when_nothing_else_is_left() {
        let mut caps = Caps::default();
        caps.add(1, false, genre_values());
        assert_eq!(picked(1.0, 2, &mut caps), ["action1", "comedy"], "held while others remain");
        let mut caps = Caps::default();
        caps.add(1, false, genre_values());
        assert_eq!(picked(1.0, 3, &mut caps), ["action1", "comedy", "action2"], "backfilled last");
    }

    #[test]
    fn similarity_is_cosine_of_genre_sets() {
        let index =
            BundleItems::from_items(HashMap::from([("a".to_string(), item(0b11)), ("b".to_string(), item(0b01))]));
        assert!((index.similarity("a", "b") - 1.0 / 2f32.sqrt()).abs() < 1e-6);
        assert_eq!(index.similarity("a", "missing"), 0.0);
    }
}
