//! The store contract, checked against both backends (Redis on a `redis-server` started
//! by the test).

use std::path::Path;

use recsys_proto::v1::{Event, EventType, WindowedCounts};

use super::*;
use crate::BundleItem;
use crate::{
    counters::{HOUR_MS, MINUTE_MS},
    local_redis::{LocalRedis, LocalRedisCluster, Persistence},
    RedisConfig,
};

const T0: i64 = 1_700_000_000_000;

fn event(user: &str, item: &str, kind: EventType, timestamp_ms: i64) -> StoredEvent {
    StoredEvent::from_proto(
        0,
        &Event { user_id: user.into(), item_id: item.into(), r#type: kind as i32, timestamp_ms, ..Event::default() },
    )
    .unwrap()
}

fn click(user: &str, item: &str, timestamp_ms: i64) -> StoredEvent {
    event(user, item, EventType::Click, timestamp_ms)
}

fn with_id(mut event: StoredEvent, id: &str) -> StoredEvent {
    event.event_id = id.into();
    event
}

/// Opens a store of each backend — embedded, one Redis, a three-node Redis Cluster — over
/// the same state each time it is called.
struct Backends {
    dir: tempfile::TempDir,
    redis: LocalRedis,
    cluster: LocalRedisCluster,
}

impl Backends {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let redis = LocalRedis::start(&dir.path().join("redis"), Persistence::None).unwrap();
        let cluster = LocalRedisCluster::start(&dir.path().join("cluster"), 3).unwrap();
        Self { dir, redis, cluster }
    }

    async fn open(&self, seed: Option<&Path>, max_history: usize) -> Vec<(&'static str, Box<dyn FeatureStore>)> {
        let embedded = EmbeddedStore::open(&self.dir.path().join("store.redb"), seed, max_history).unwrap();
        let config = RedisConfig { url: self.redis.url(), ..RedisConfig::default() };
        let redis = RedisStore::open(config, seed, max_history).await.unwrap();
        let config = RedisConfig { cluster_nodes: self.cluster.urls(), ..RedisConfig::default() };
        let cluster = RedisStore::open(config, seed, max_history).await.unwrap();
        vec![("embedded", Box::new(embedded)), ("redis", Box::new(redis)), ("redis cluster", Box::new(cluster))]
    }
}

fn counts(window: &WindowedCounts) -> [[u32; 4]; 4] {
    [&window.last_hour, &window.last_day, &window.last_7_days, &window.last_30_days].map(|counts| {
        let counts = counts.as_ref().unwrap();
        [counts.impressions, counts.clicks, counts.likes, counts.purchases]
    })
}

#[tokio::test]
async fn a_retried_batch_is_stored_once_also_after_a_restart() {
    let backends = Backends::new();
    let batch = vec![with_id(click("u1", "a", T0), "e1"), with_id(click("u1", "b", T0 + 1), "e2")];
    for (name, store) in backends.open(None, 10).await {
        assert_eq!(store.append(batch.clone()).await.unwrap(), Appended { stored: 2, duplicates: 0 }, "{name}");
        assert_eq!(store.append(batch.clone()).await.unwrap(), Appended { stored: 0, duplicates: 2 }, "{name}");
        let repeated = vec![with_id(click("u1", "c", T0 + 2), "e3"), with_id(click("u1", "c", T0 + 2), "e3")];
        assert_eq!(store.append(repeated).await.unwrap(), Appended { stored: 1, duplicates: 1 }, "{name}");
    }
    for (name, store) in backends.open(None, 10).await {
        assert_eq!(store.user_features("u1", 10, T0).await.unwrap().event_count, 3, "{name}");
        assert_eq!(store.append(batch.clone()).await.unwrap(), Appended { stored: 0, duplicates: 2 }, "{name}");
        // Events without an id are never deduplicated.
        let anonymous = vec![click("u2", "d", T0), click("u2", "d", T0)];
        assert_eq!(store.append(anonymous).await.unwrap(), Appended { stored: 2, duplicates: 0 }, "{name}");
    }
}

#[tokio::test]
async fn behaviour_is_newest_first_one_entry_per_item_capped_and_typed() {
    let backends = Backends::new();
    for (name, store) in backends.open(None, 3).await {
        let user = format!("u-{}", name.replace(' ', "-"));
        let events = vec![
            click(&user, "a", T0),
            click(&user, "b", T0 + 1_000),
            event(&user, "a", EventType::Like, T0 + 2_000),
            event(&user, "z", EventType::Impression, T0 + 2_500),
            click(&user, "c", T0 + 3_000),
            // Late (replayed out of order): placed by its time, not in front.
            click(&user, "d", T0 - 1_000),
            click(&user, "e", T0 + 4_000),
        ];
        store.append(events).await.unwrap();
        let features = store.user_features(&user, 10, T0 + 5_000).await.unwrap();
        assert!(features.known, "{name}");
        assert_eq!(features.history_item_ids, vec!["e", "c", "a"], "{name}");
        assert_eq!(
            features.history_event_types,
            vec![EventType::Click as i32, EventType::Click as i32, EventType::Like as i32],
            "{name}"
        );
        assert_eq!(features.history_timestamps, vec![(T0 + 4_000) / 1000, (T0 + 3_000) / 1000, (T0 + 2_000) / 1000]);
        assert_eq!(features.event_count, 7, "{name}");
        assert_eq!(store.user_features(&user, 2, T0).await.unwrap().history_item_ids.len(), 2, "{name}");
        assert!(!store.user_features("nobody", 10, T0).await.unwrap().known, "{name}");
    }
}

#[tokio::test]
async fn counts_are_windowed_as_of_the_asked_time_for_users_items_and_categories() {
    let backends = Backends::new();
    let seed = tempfile::tempdir().unwrap();
    std::fs::write(seed.path().join("items.csv"), "item_id,genres,release_time\nx,Drama|Comedy,1600000000\n").unwrap();
    std::fs::write(seed.path().join("interactions.csv"), "user_id,item_id,timestamp,event\n").unwrap();
    for (name, store) in backends.open(Some(seed.path()), 10).await {
        let user = format!("u-{}", name.replace(' ', "-"));
        store
            .append(vec![
                event(&user, "x", EventType::Impression, T0 - 3 * 24 * HOUR_MS),
                event(&user, "x", EventType::Impression, T0 - 2 * HOUR_MS),
                event(&user, "x", EventType::Impression, T0 - 10 * MINUTE_MS),
                click(&user, "x", T0 - 9 * MINUTE_MS),
                event(&user, "x", EventType::Purchase, T0 - 8 * MINUTE_MS),
                // After the asked time: not counted as of T0.
                click(&user, "x", T0 + 2 * HOUR_MS),
            ])
            .await
            .unwrap();
        let expected = [[1, 1, 0, 1], [2, 1, 0, 1], [3, 1, 0, 1], [3, 1, 0, 1]];
        let features = store.user_features(&user, 10, T0).await.unwrap();
        assert_eq!(counts(features.counts.as_ref().unwrap()), expected, "{name} user");
        assert_eq!(features.category_counts.len(), 1, "{name}");
        assert_eq!(features.category_counts[0].category, "Drama", "{name}");
        assert_eq!(counts(features.category_counts[0].counts.as_ref().unwrap()), expected, "{name} category");
        let items =
            store.item_features(&["x".into(), "unseen".into()], T0, ItemRead::WithBundleStats).await.unwrap().items;
        assert_eq!(items.len(), 2);
        assert_eq!(counts(items[0].counts.as_ref().unwrap()), expected, "{name} item");
        assert_eq!(items[0].category, "Drama");
        assert_eq!(items[0].first_seen_ms, 1_600_000_000_000, "{name}: the catalogue's release time");
        let ctr = items[0].counts.as_ref().unwrap().last_hour.unwrap().ctr.unwrap();
        assert!((ctr - 2.0 / 21.0).abs() < 1e-6, "{name}: {ctr}");
        assert!(!items[1].known && items[1].item_id == "unseen", "{name}");
        // Later, the click after T0 counts too.
        let later = store.item_features(&["x".into()], T0 + 2 * HOUR_MS, ItemRead::Counts).await.unwrap().items;
        assert_eq!(later[0].counts.as_ref().unwrap().last_day.unwrap().clicks, 2, "{name}");
    }
}

#[tokio::test]
async fn the_seed_loads_once_with_profiles_and_time_ordered_history() {
    let backends = Backends::new();
    let seed = tempfile::tempdir().unwrap();
    std::fs::write(
        seed.path().join("interactions.csv"),
        "user_id,item_id,timestamp,event,rating\n7,10,200,rating,4\n7,11,100,rating,3\n8,10,150,impression,\n",
    )
    .unwrap();
    std::fs::write(seed.path().join("users.csv"), "user_id,age,gender,occupation\n7,30,F,artist\n").unwrap();
    for _ in 0..2 {
        for (name, store) in backends.open(Some(seed.path()), 10).await {
            let features = store.user_features("7", 10, T0).await.unwrap();
            assert_eq!(features.history_item_ids, vec!["10", "11"], "{name}");
            assert_eq!(features.profile.unwrap().occupation, "artist", "{name}");
            assert_eq!(features.event_count, 2, "{name}: loaded once");
            let item = &store.item_features(&["10".into()], 200_000, ItemRead::WithBundleStats).await.unwrap().items[0];
            assert_eq!(item.first_seen_ms, 150_000, "{name}: first event");
            assert_eq!(item.counts.as_ref().unwrap().last_hour.unwrap().impressions, 1, "{name}");
        }
    }
}

#[tokio::test]
async fn malformed_seed_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("interactions.csv"), "user_id,item_id,timestamp\n7,10,notanumber\n").unwrap();
    let error = EmbeddedStore::open(&dir.path().join("s.redb"), Some(dir.path()), 10).err().unwrap();
    assert!(error.to_string().contains("interactions.csv"), "{error}");
}

#[tokio::test]
async fn the_event_log_exports_in_order_across_pages() {
    let backends = Backends::new();
    for (name, store) in backends.open(None, 10).await {
        let events: Vec<StoredEvent> =
            (0..25).map(|n| with_id(click("u", &format!("i{n}"), T0 + n), &format!("id{n}"))).collect();
        for chunk in events.chunks(7) {
            store.append(chunk.to_vec()).await.unwrap();
        }
        store.append(events[..3].to_vec()).await.unwrap(); // retries are not logged twice
        let mut exported = Vec::new();
        let mut cursor = None;
        loop {
            let page = store.export(cursor, 10).await.unwrap();
            exported.extend(page.events);
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(exported, events, "{name}");
    }
}

#[tokio::test]
async fn concurrent_batches_share_commits_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(EmbeddedStore::open(&dir.path().join("s.redb"), None, 10).unwrap());
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let store = std::sync::Arc::clone(&store);
            tokio::spawn(async move {
                for batch in 0..20 {
                    let events = (0..5).map(|n| click(&format!("w{writer}"), &format!("{batch}-{n}"), T0)).collect();
                    store.append(events).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    for writer in 0..8 {
        assert_eq!(store.user_features(&format!("w{writer}"), 10, T0).await.unwrap().event_count, 100);
    }
}

#[tokio::test]
async fn a_new_bundles_statistics_replace_the_old_ones() {
    let backends = Backends::new();
    let item = |id: &str, stats: &[f32]| BundleItem { item_id: id.into(), stats: stats.to_vec() };
    let names = |names: &[&str]| names.iter().map(|name| name.to_string()).collect::<Vec<_>>();
    for (name, store) in backends.open(None, 10).await {
        assert_eq!(store.bundle_version().await.unwrap(), None, "{name}");
        store.load_bundle("v1", names(&["like_rate"]), vec![item("a", &[0.5]), item("b", &[0.25])]).await.unwrap();
        store.load_bundle("v2", names(&["interactions", "like_rate"]), vec![item("a", &[3.0, 0.75])]).await.unwrap();
        assert_eq!(store.bundle_version().await.unwrap().as_deref(), Some("v2"), "{name}");
        let batch = store.item_features(&["a".into(), "b".into()], T0, ItemRead::WithBundleStats).await.unwrap();
        assert_eq!(batch.stat_names, names(&["interactions", "like_rate"]), "{name}");
        let items = batch.items;
        assert!(items[0].known, "{name}");
        assert_eq!(items[0].bundle_version, "v2", "{name}");
        assert_eq!(items[0].bundle_stats, vec![3.0, 0.75], "{name}");
        assert!(items[1].bundle_stats.is_empty() && !items[1].known, "{name}: b is not in v2");
        // Counts only (rank's and rerank's reads): no statistics, and an item the store has
        // no record or event of is not known to it.
        let batch = store.item_features(&["a".into()], T0, ItemRead::Counts).await.unwrap();
        assert!(batch.stat_names.is_empty(), "{name}");
        assert!(batch.items[0].bundle_stats.is_empty() && batch.items[0].bundle_version.is_empty(), "{name}");
        assert!(!batch.items[0].known, "{name}");
    }
}

#[tokio::test]
async fn impressions_are_kept_newest_first_and_capped() {
    let backends = Backends::new();
    let shown = |item: &str, at: i64| event("u1", item, EventType::Impression, at);
    for (name, store) in backends.open(None, 10).await {
        let mut batch: Vec<StoredEvent> =
            (0..crate::state::RECENT_IMPRESSIONS as i64 + 5).map(|n| shown(&format!("i{n}"), T0 + n)).collect();
        batch.push(shown("i3", T0 + 10_000));
        batch.push(click("u1", "c", T0 + 10_001));
        store.append(batch).await.unwrap();
        let user = store.user_features("u1", 10, T0 + 20_000).await.unwrap();
        let impressions = &user.recent_impressions;
        assert_eq!(impressions.len(), crate::state::RECENT_IMPRESSIONS, "{name}");
        assert_eq!((impressions[0].item_id.as_str(), impressions[0].timestamp_ms), ("i3", T0 + 10_000), "{name}");
        assert_eq!(impressions[1].item_id, format!("i{}", crate::state::RECENT_IMPRESSIONS + 4), "{name}");
        assert!(impressions.windows(2).all(|pair| pair[0].timestamp_ms >= pair[1].timestamp_ms), "{name}");
        assert!(!user.history_item_ids.contains(&"i3".to_string()), "{name}: an impression is not behaviour");
    }
}

#[tokio::test]
async fn catalogue_changes_are_durable_ordered_and_one_per_item() {
    use recsys_proto::v1::{Availability, CatalogItem};
    let backends = Backends::new();
    let record = |id: &str, promoted: bool| CatalogItem {
        item_id: id.into(),
        availability: Availability::InStock as i32,
        promoted,
        publish_time_ms: T0,
        attributes: [("seller".to_string(), "s1".to_string())].into(),
        ..CatalogItem::default()
    };
    for (name, store) in backends.open(None, 10).await {
        assert_eq!(store.catalog_changes(0, 10).await.unwrap(), (Vec::new(), 0), "{name}");
        assert_eq!(store.upsert_catalog(vec![record("a", false), record("b", false)]).await.unwrap(), 2, "{name}");
        assert_eq!(store.upsert_catalog(vec![record("a", true)]).await.unwrap(), 3, "{name}");
    }
    // Reopened: what was written is there, each item once at its latest revision.
    for (name, store) in backends.open(None, 10).await {
        let (changes, head) = store.catalog_changes(0, 10).await.unwrap();
        assert_eq!(head, 3, "{name}");
        let seen: Vec<(&str, u64, bool)> =
            changes.iter().map(|item| (item.item_id.as_str(), item.revision, item.promoted)).collect();
        assert_eq!(seen, [("b", 2, false), ("a", 3, true)], "{name}");
        assert_eq!(changes[1].attributes["seller"], "s1", "{name}");
        assert_eq!(store.catalog_changes(2, 10).await.unwrap().0.len(), 1, "{name}");
        assert_eq!(store.catalog_changes(0, 1).await.unwrap().0[0].item_id, "b", "{name}: pages by revision");
        assert_eq!(store.catalog_changes(3, 10).await.unwrap(), (Vec::new(), 3), "{name}");
    }
}
