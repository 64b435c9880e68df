//! The prediction cache (the article's "cache the results of the last few seconds"): a
//! user who refreshes the page or turns to the next one within seconds gets the list
//! computed a moment ago instead of a new pass through four services.
//!
//! - Entries live `ttl_ms` and are per user: a `LogEvents` call through this orchestrator
//!   drops every entry of the users it names, so a click is never answered by a list
//!   computed before it. Other replicas keep theirs until the TTL: the README states that
//!   bound (or route a user's requests and events to one replica by user hash).
//! - A miss computes `prefetch_pages` times the asked `top_k` and caches it all, so the
//!   next page — the same request with the first page's items excluded — is a hit.
//! - Only what is worth repeating is cached: not degraded answers (a fallback should not
//!   outlive the fault), not debug answers (they carry traces).
//! - Bounded: at most `max_entries`; when full, expired entries are swept from the
//!   user's shard and, if that does not make room, the new list is not cached.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, Hasher},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, LazyLock, Mutex,
    },
    time::Duration,
};

use prometheus::{register_int_counter_vec, IntCounterVec};
use recsys_proto::v1::{RecommendResponse, RecommendedItem};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use recsys_proto::limits::MAX_TOP_K;

use crate::domain::RecommendQuery;

static LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "recsys_prediction_cache_lookups_total",
        "Recommend calls answered from the prediction cache (hit) or computed (miss)",
        &["result"]
    )
    .expect("metric registers once")
});

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// How long a computed list answers repeats; 0 turns the cache off.
    pub ttl_ms: u64,
    /// Cached lists across all users.
    pub max_entries: usize,
    /// A miss computes this many pages of `top_k`, so that the next page is a hit.
    pub prefetch_pages: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { ttl_ms: 3_000, max_entries: 100_000, prefetch_pages: 2 }
    }
}

const SHARDS: usize = 16;
const GENERATIONS: usize = 4096;

struct Entry {
    /// The exclusions of the request that computed the list: it only answers requests
    /// that exclude at least these (an item it left out may be wanted by another).
    excluded: std::collections::HashSet<String>,
    /// Everything of the request but the user, `top_k` and the exclusions, and the
    /// ranking track that served it.
    variant: u64,
    expires: Instant,
    response: Arc<RecommendResponse>,
}

pub struct PredictionCache {
    config: CacheConfig,
    shards: Vec<Mutex<HashMap<String, Vec<Entry>>>>,
    entries: AtomicUsize,
    hasher: std::hash::RandomState,
    /// Invalidation counts by user-hash bucket: a list computed while the user's events
    /// were arriving is not cached (see `ticket`).
    generations: Vec<AtomicU64>,
}

/// The invalidation count of a user's bucket when a computation started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

impl PredictionCache {
    pub fn new(config: CacheConfig) -> Self {
        Self {
            config,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            entries: AtomicUsize::new(0),
            hasher: std::hash::RandomState::new(),
            generations: (0..GENERATIONS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.ttl_ms > 0
    }

    /// The `top_k` to compute for `query` on a miss.
    pub fn compute_top_k(&self, query: &RecommendQuery) -> u32 {
        if self.enabled() && !query.debug {
            query.top_k.saturating_mul(self.config.prefetch_pages.max(1)).min(MAX_TOP_K)
        } else {
            query.top_k
        }
    }

    /// A cached answer to `query` on ranking track `route`: the cached list without the
    /// excluded items, cut to `top_k` and renumbered — when enough of it is left.
    pub fn get(&self, query: &RecommendQuery, top_k: u32, route: &str) -> Option<RecommendResponse> {
        if !self.enabled() || query.debug {
            return None;
        }
        let answer = self.lookup(query, top_k as usize, route);
        LOOKUPS.with_label_values(&[if answer.is_some() { "hit" } else { "miss" }]).inc();
        answer
    }

    fn lookup(&self, query: &RecommendQuery, top_k: usize, route: &str) -> Option<RecommendResponse> {
        let variant = self.variant(query, route);
        let excluded: std::collections::HashSet<&str> =
            query.exclude_item_ids.iter().map(|item| item.as_str()).collect();
        let response = {
            let shard = self.shard(query.user_id.as_str()).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let now = Instant::now();
            let entry = shard.get(query.user_id.as_str())?.iter().find(|e| {
                e.variant == variant
                    && e.expires > now
                    && e.excluded.iter().all(|item| excluded.contains(item.as_str()))
            })?;
            Arc::clone(&entry.response)
        };
        let items: Vec<RecommendedItem> = response
            .items
            .iter()
            .filter(|item| !excluded.contains(item.item_id.as_str()))
            .take(top_k)
            .enumerate()
            .map(|(position, item)| RecommendedItem { rank: position as u32 + 1, ..item.clone() })
            .collect();
        if items.len() < top_k {
            return None;
        }
        Some(RecommendResponse { items, ..(*response).clone() })
    }

    /// Take before computing an answer for `user_id`, give to `put`: if the user's events
    /// arrived meanwhile (an invalidation), the answer may predate them and is not cached.
    pub fn ticket(&self, user_id: &str) -> Ticket {
        Ticket(self.generation(user_id).load(Ordering::Acquire))
    }

    /// Caches a computed answer to `query` (asked with `compute_top_k`) on track `route`,
    /// unless the user's entries were invalidated since `ticket` was taken.
    pub fn put(&self, query: &RecommendQuery, route: &str, response: &RecommendResponse, ticket: Ticket) {
        if !self.enabled() || query.debug || !response.degraded_stages.is_empty() {
            return;
        }
        let now = Instant::now();
        let variant = self.variant(query, route);
        let mut shard = self.shard(query.user_id.as_str()).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.generation(query.user_id.as_str()).load(Ordering::Acquire) != ticket.0 {
            return;
        }
        if self.entries.load(Ordering::Relaxed) >= self.config.max_entries {
            let mut swept = 0;
            shard.retain(|_, entries| {
                let before = entries.len();
                entries.retain(|entry| entry.expires > now);
                swept += before - entries.len();
                !entries.is_empty()
            });
            self.entries.fetch_sub(swept, Ordering::Relaxed);
            if self.entries.load(Ordering::Relaxed) >= self.config.max_entries {
                return;
            }
        }
        let entries = shard.entry(query.user_id.as_str().to_string()).or_default();
        let before = entries.len();
        entries.retain(|entry| entry.variant != variant && entry.expires > now);
        entries.push(Entry {
            excluded: query.exclude_item_ids.iter().map(|item| item.as_str().to_string()).collect(),
            variant,
            expires: now + Duration::from_millis(self.config.ttl_ms),
            response: Arc::new(response.clone()),
        });
        let after = entries.len();
        if after > before {
            self.entries.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.entries.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Drops every cached list of `user_id` (called when the user's events arrive).
    pub fn invalidate(&self, user_id: &str) {
        if !self.enabled() {
            return;
        }
        let mut shard = self.shard(user_id).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Under the shard lock, like `put`'s check: a put either lands before this (and is
        // removed below) or sees the new generation (and stores nothing).
        self.generation(user_id).fetch_add(1, Ordering::AcqRel);
        if let Some(entries) = shard.remove(user_id) {
            self.entries.fetch_sub(entries.len(), Ordering::Relaxed);
        }
    }

    fn generation(&self, user_id: &str) -> &AtomicU64 {
        &self.generations[(self.hasher.hash_one(user_id) >> 16) as usize % GENERATIONS]
    }

    fn shard(&self, user_id: &str) -> &Mutex<HashMap<String, Vec<Entry>>> {
        &self.shards[self.hasher.hash_one(user_id) as usize % SHARDS]
    }

    fn variant(&self, query: &RecommendQuery, route: &str) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        route.hash(&mut hasher);
        query.scene.hash(&mut hasher);
        query.request_time.map(|time| time.0).hash(&mut hasher);
        // Rules compare with the context (region, age), so it is part of the answer.
        query.context.hash(&mut hasher);
        hasher.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ItemId, UserId};

    fn query(user: &str, top_k: u32, excluded: &[&str]) -> RecommendQuery {
        RecommendQuery {
            user_id: UserId::parse("user_id", user.to_string()).unwrap(),
            top_k,
            scene: None,
            request_time: None,
            exclude_item_ids: excluded.iter().map(|id| ItemId::parse("item", id.to_string()).unwrap()).collect(),
            debug: false,
            context: Default::default(),
        }
    }

    fn response(items: usize) -> RecommendResponse {
        RecommendResponse {
            items: (0..items)
                .map(|n| RecommendedItem {
                    item_id: format!("item-{n}"),
                    score: 1.0 - n as f32 * 0.01,
                    rank: n as u32 + 1,
                    trace: None,
                })
                .collect(),
            request_id: "first".into(),
            model_version: "v1".into(),
            ..RecommendResponse::default()
        }
    }

    fn get(cache: &PredictionCache, query: &RecommendQuery) -> Option<RecommendResponse> {
        cache.get(query, query.top_k, "stable")
    }

    fn ids(response: &RecommendResponse) -> Vec<&str> {
        response.items.iter().map(|item| item.item_id.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeat_within_the_ttl_is_a_hit_and_the_next_page_too() {
        let cache = PredictionCache::new(CacheConfig { ttl_ms: 3_000, max_entries: 10, prefetch_pages: 2 });
        assert_eq!(cache.compute_top_k(&query("u1", 3, &[])), 6);
        cache.put(&query("u1", 3, &[]), "stable", &response(6), Ticket(0));
        let first = get(&cache, &query("u1", 3, &[])).expect("a hit");
        assert_eq!(ids(&first), ["item-0", "item-1", "item-2"]);
        let second = get(&cache, &query("u1", 3, &["item-0", "item-1", "item-2"])).expect("page two is a hit");
        assert_eq!(ids(&second), ["item-3", "item-4", "item-5"]);
        assert_eq!(second.items.iter().map(|item| item.rank).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(get(&cache, &query("u1", 4, &["item-0", "item-1", "item-2"])).is_none(), "not enough left");
        assert!(get(&cache, &query("u2", 3, &[])).is_none(), "another user");
        // A list computed without an item answers only requests that exclude it too.
        cache.put(&query("u3", 1, &["item-9"]), "stable", &response(4), Ticket(0));
        assert!(get(&cache, &query("u3", 1, &[])).is_none());
        assert!(get(&cache, &query("u3", 1, &["item-9", "item-0"])).is_some());
        tokio::time::advance(Duration::from_millis(3_001)).await;
        assert!(get(&cache, &query("u1", 3, &[])).is_none(), "expired");
    }

    #[tokio::test(start_paused = true)]
    async fn events_invalidate_the_users_entries_only() {
        let cache = PredictionCache::new(CacheConfig::default());
        cache.put(&query("u1", 2, &[]), "stable", &response(4), Ticket(0));
        cache.put(&query("u2", 2, &[]), "stable", &response(4), Ticket(0));
        cache.invalidate("u1");
        assert!(get(&cache, &query("u1", 2, &[])).is_none());
        assert!(get(&cache, &query("u2", 2, &[])).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn degraded_and_debug_answers_are_not_cached_and_a_scene_is_its_own_entry() {
        let cache = PredictionCache::new(CacheConfig::default());
        let degraded = RecommendResponse { degraded_stages: vec!["rank".into()], ..response(4) };
        cache.put(&query("u1", 2, &[]), "stable", &degraded, Ticket(0));
        assert!(get(&cache, &query("u1", 2, &[])).is_none());
        let debug = RecommendQuery { debug: true, ..query("u1", 2, &[]) };
        cache.put(&debug, "stable", &response(4), Ticket(0));
        assert!(get(&cache, &debug).is_none());
        cache.put(&query("u1", 2, &[]), "stable", &response(4), Ticket(0));
        let home = RecommendQuery { scene: Some("home".into()), ..query("u1", 2, &[]) };
        assert!(get(&cache, &home).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_is_bounded_and_sweeps_expired_entries_when_full() {
        let cache = PredictionCache::new(CacheConfig { ttl_ms: 1_000, max_entries: 2, prefetch_pages: 1 });
        cache.put(&query("u1", 1, &[]), "stable", &response(1), Ticket(0));
        cache.put(&query("u2", 1, &[]), "stable", &response(1), Ticket(0));
        cache.put(&query("u3", 1, &[]), "stable", &response(1), Ticket(0));
        assert!(get(&cache, &query("u3", 1, &[])).is_none(), "full: not cached");
        assert!(cache.get(&query("u1", 1, &[]), 1, "canary").is_none(), "another track is another entry");
        tokio::time::advance(Duration::from_millis(1_001)).await;
        // Expired entries are swept from the shards being written, which makes room again
        // (enough users that every shard is written, whatever the hasher's seed).
        for user in 0..4096 {
            cache.put(&query(&format!("v{user}"), 1, &[]), "stable", &response(1), Ticket(0));
        }
        let cached = (0..4096).filter(|user| get(&cache, &query(&format!("v{user}"), 1, &[])).is_some()).count();
        assert_eq!(cached, 2);
        assert_eq!(cache.entries.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_computed_while_the_users_events_arrived_is_not_cached() {
        let cache = PredictionCache::new(CacheConfig::default());
        let ticket = cache.ticket("u1");
        cache.invalidate("u1"); // a click arrives while the list is being computed
        cache.put(&query("u1", 2, &[]), "stable", &response(4), ticket);
        assert!(get(&cache, &query("u1", 2, &[])).is_none());
        cache.put(&query("u1", 2, &[]), "stable", &response(4), cache.ticket("u1"));
        assert!(get(&cache, &query("u1", 2, &[])).is_some());
    }

    #[test]
    fn ttl_zero_turns_the_cache_off() {
        let cache = PredictionCache::new(CacheConfig { ttl_ms: 0, ..CacheConfig::default() });
        assert_eq!(cache.compute_top_k(&query("u1", 10, &[])), 10);
        cache.put(&query("u1", 1, &[]), "stable", &response(1), Ticket(0));
        assert!(get(&cache, &query("u1", 1, &[])).is_none());
    }
}
