//! Merges the channels' ranked lists into one candidate list by weighted reciprocal rank
//! fusion: an item scores `Σ weight / (k + rank)` over the channels that proposed it, so
//! items several channels agree on rise, and no channel's raw score scale dominates.

use std::collections::HashMap;

use crate::{Channel, ExcludedItems};

/// One channel's proposals (item positions, best first) and its fusion weight.
pub struct ChannelList {
    pub channel: Channel,
    pub weight: f32,
    pub items: Vec<usize>,
    /// The first proposal stays in the fused list whatever its fused score (the
    /// cold-start channel's: rank-svc's new-item pick is the best of its proposals, and
    /// the bundle's threshold is set on that best one).
    pub keeps_first: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FusedCandidate {
    pub item: usize,
    pub score: f32,
    /// The channels that proposed the item, with its 1-based rank in each (counted after
    /// exclusions, as fusion scores it).
    pub channels: Vec<(Channel, u32)>,
}

/// Fuses `lists`, skipping `excluded` items, and keeps the best `limit`.
pub fn fuse_channels(lists: &[ChannelList], excluded: &ExcludedItems, rrf_k: f32, limit: usize) -> Vec<FusedCandidate> {
    let mut fused: HashMap<usize, FusedCandidate> = HashMap::new();
    for list in lists {
        let mut rank = 0usize;
        for &item in &list.items {
            if excluded.contains(&item) {
                continue;
            }
            rank += 1;
            let candidate =
                fused.entry(item).or_insert_with(|| FusedCandidate { item, score: 0.0, channels: Vec::new() });
            if !candidate.channels.iter().any(|&(channel, _)| channel == list.channel) {
                candidate.score += list.weight / (rrf_k + rank as f32);
                candidate.channels.push((list.channel, rank as u32));
            }
        }
    }
    let mut candidates: Vec<FusedCandidate> = fused.into_values().collect();
    // Ties broken by item position so the output is deterministic.
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.item.cmp(&b.item)));
    for list in lists.iter().filter(|list| list.keeps_first) {
        let Some(first) = list.items.iter().find(|item| !excluded.contains(item)) else { continue };
        let kept = limit.saturating_sub(1);
        if let Some(at) = candidates.iter().position(|c| c.item == *first).filter(|&at| at > kept) {
            let candidate = candidates.remove(at);
            candidates.insert(kept, candidate);
        }
    }
    candidates.truncate(limit);
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(channel: Channel, weight: f32, items: &[usize]) -> ChannelList {
        ChannelList { channel, weight, items: items.to_vec(), keeps_first: false }
    }

    #[test]
    fn items_proposed_by_several_channels_rank_first() {
        let lists = [list(Channel::Embedding, 1.0, &[1, 2, 3]), list(Channel::ItemCf, 1.0, &[3, 4])];
        let fused = fuse_channels(&lists, &ExcludedItems::default(), 60.0, 10);
        assert_eq!(fused[0].item, 3);
        assert_eq!(fused[0].channels, vec![(Channel::Embedding, 3), (Channel::ItemCf, 1)]);
        assert_eq!(fused.len(), 4);
    }

    #[test]
    fn excluded_items_never_appear_and_do_not_use_up_ranks() {
        let lists = [list(Channel::Popular, 1.0, &[7, 8]), list(Channel::Embedding, 1.0, &[9, 8])];
        let fused = fuse_channels(&lists, &ExcludedItems::from_iter([7]), 60.0, 10);
        assert!(fused.iter().all(|c| c.item != 7));
        // 8 is rank 1 in popular (after the exclusion) and rank 2 in embedding.
        let eight = fused.iter().find(|c| c.item == 8).unwrap();
        assert!((eight.score - (1.0 / 61.0 + 1.0 / 62.0)).abs() < 1e-6);
        assert_eq!(eight.channels, vec![(Channel::Popular, 1), (Channel::Embedding, 2)]);
    }

    #[test]
    fn a_channel_that_keeps_its_first_proposal_keeps_it_in_the_last_place() {
        let mut cold = list(Channel::ColdStart, 0.01, &[5, 9, 6]);
        cold.keeps_first = true;
        let lists = [list(Channel::Embedding, 1.0, &[1, 2, 3, 4]), cold];
        let fused = fuse_channels(&lists, &ExcludedItems::from_iter([5]), 60.0, 3);
        let items: Vec<usize> = fused.iter().map(|c| c.item).collect();
        assert_eq!(items, [1, 2, 9], "the first proposal not excluded takes the last place");
        assert_eq!(fused[2].channels, vec![(Channel::ColdStart, 1)]);
        // Already inside the limit: left where it is.
        let fused = fuse_channels(&lists, &ExcludedItems::from_iter([5]), 60.0, 10);
        assert_eq!(fused.iter().map(|c| c.item).collect::<Vec<_>>(), [1, 2, 3, 4, 9, 6]);
    }

    #[test]
    fn weights_scale_a_channel_and_limit_truncates() {
        let lists = [list(Channel::Popular, 0.1, &[1]), list(Channel::Embedding, 1.0, &[2])];
        let fused = fuse_channels(&lists, &ExcludedItems::default(), 60.0, 1);
        assert_eq!(fused.len(), 1);
        assert_eq!(fused[0].item, 2);
    }
}
