//! rerank's business rules and the run-time catalogue on a real cluster: each rule kind
//! acting through the public API, catalogue changes reaching the list without a new
//! bundle, and a bad rules file refused while the previous rules keep serving.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use cluster_tests::{Cluster, ClusterOptions, Service};
use recsys_proto::v1::{
    catalog_admin_client::CatalogAdminClient, recommender_client::RecommenderClient, CatalogItem, Event, EventType,
    LogEventsRequest, RecommendRequest, RecommendResponse, RetireItemsRequest, UpsertItemsRequest,
};

const USER: &str = "196";

const RULES: &str = r#"
[[rule]]
name = "genre_cap"
kind = "cap"
attribute = "category"
max_per_list = 4
strict = true

[[rule]]
name = "age_rating"
kind = "filter"
when = [{ attribute = "age_rating", op = "gt", context = "user_age", context_missing = "meets" }]

[[rule]]
name = "promoted_slot"
kind = "pin"
when = [{ attribute = "promoted", op = "eq", value = true }]
positions = [2]

[[rule]]
name = "fresh"
kind = "freshness"
half_life_days = 1
weight = 3.0

[[rule]]
name = "fatigue"
kind = "exposure"
max_impressions = 2
window_hours = 24

[[rule]]
name = "trending"
kind = "boost"
when = [{ attribute = "clicks_1h", op = "ge", value = 2 }]
add = 5.0
"#;

async fn recommend(cluster: &Cluster) -> RecommendResponse {
    let mut client = RecommenderClient::new(cluster.channel(Service::Orchestrator));
    let request = RecommendRequest { user_id: USER.into(), top_k: 10, debug: true, ..RecommendRequest::default() };
    client.recommend(request).await.expect("recommend succeeds").into_inner()
}

fn ids(response: &RecommendResponse) -> Vec<String> {
    response.items.iter().map(|item| item.item_id.clone()).collect()
}

/// Asks until `check` holds (catalogue and rules changes apply within a poll interval).
async fn eventually(cluster: &Cluster, what: &str, check: impl Fn(&RecommendResponse) -> bool) -> RecommendResponse {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = recommend(cluster).await;
        if check(&response) {
            return response;
        }
        assert!(Instant::now() < deadline, "{what} did not happen within 5 s: {:?}", ids(&response));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn effects<'a>(response: &'a RecommendResponse, item_id: &str) -> Vec<(&'a str, &'a str)> {
    let item = response.items.iter().find(|item| item.item_id == item_id).expect("item is in the list");
    let trace = item.trace.as_ref().expect("debug traces");
    trace.rules.iter().map(|effect| (effect.rule.as_str(), effect.action.as_str())).collect()
}

/// Every genre appears at most `max` times among the list's items.
fn assert_capped(response: &RecommendResponse, genres: &HashMap<String, Vec<String>>, max: usize) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for item in &response.items {
        for genre in genres.get(&item.item_id).into_iter().flatten() {
            *counts.entry(genre).or_default() += 1;
        }
    }
    assert!(counts.values().all(|&count| count <= max), "genre counts {counts:?}");
}

fn rule_actions(rule: &str, action: &str) -> u64 {
    recsys_runtime::metrics::render()
        .lines()
        .filter(|line| line.starts_with("recsys_rerank_rule_actions_total{"))
        .filter(|line| line.contains(&format!("rule=\"{rule}\"")) && line.contains(&format!("action=\"{action}\"")))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_kind_acts_on_the_served_list_and_a_bad_rules_file_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("rules.toml");
    std::fs::write(&rules_path, RULES).unwrap();
    let options = ClusterOptions { rules: Some(rules_path.clone()), ..ClusterOptions::default() };
    let cluster = Cluster::start_with(options).await.expect("cluster starts");
    let genres = bundle_genres(cluster.bundle());
    let mut catalog = CatalogAdminClient::with_interceptor(cluster.admin_channel(Service::Feature), cluster.operator());

    // A cap holds: no genre more than four times in the top 10.
    let first = recommend(&cluster).await;
    assert_eq!(first.items.len(), 10, "{:?}", ids(&first));
    assert_capped(&first, &genres, 4);
    assert!(rule_actions("genre_cap", "cap") > 0, "the cap refused items and was counted");

    // A retired item disappears from the next response, whatever proposed it.
    let retired = first.items[0].item_id.clone();
    catalog.retire_items(RetireItemsRequest { item_ids: vec![retired.clone()] }).await.expect("retire");
    let after_retire = eventually(&cluster, "the retired item leaving", |r| !ids(r).contains(&retired)).await;
    assert_capped(&after_retire, &genres, 4);

    // A hard filter on a catalogue attribute: an age-rated item leaves a list whose request
    // does not say the user's age (the filter fails closed).
    let rated = after_retire.items[3].item_id.clone();
    let upsert = CatalogItem {
        item_id: rated.clone(),
        attributes: [("age_rating".to_string(), "18".to_string())].into(),
        ..CatalogItem::default()
    };
    catalog.upsert_items(UpsertItemsRequest { items: vec![upsert] }).await.expect("upsert");
    let after_filter = eventually(&cluster, "the age filter", |r| !ids(r).contains(&rated)).await;
    assert!(rule_actions("age_rating", "filter") > 0);

    // A promoted item lands in its pinned slot.
    let promoted = after_filter.items[6].item_id.clone();
    let upsert = CatalogItem { item_id: promoted.clone(), promoted: true, ..CatalogItem::default() };
    catalog.upsert_items(UpsertItemsRequest { items: vec![upsert] }).await.expect("upsert");
    let pinned = eventually(&cluster, "the pin", |r| r.items.get(1).is_some_and(|item| item.item_id == promoted)).await;
    assert!(effects(&pinned, &promoted).contains(&("promoted_slot", "pin")));

    // Freshness lifts an item published now above everything else.
    let fresh = pinned.items[9].item_id.clone();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let upsert = CatalogItem { item_id: fresh.clone(), publish_time_ms: now_ms, ..CatalogItem::default() };
    catalog.upsert_items(UpsertItemsRequest { items: vec![upsert] }).await.expect("upsert");
    let lifted = eventually(&cluster, "the freshness lift", |r| r.items[0].item_id == fresh).await;
    assert!(effects(&lifted, &fresh).contains(&("fresh", "freshness")));
    assert_eq!(lifted.items[1].item_id, promoted, "the pin keeps its slot");

    // An item shown twice stops appearing (impressions logged through the public API).
    let shown = lifted.items[0].item_id.clone();
    let impression = |n: i64| Event {
        user_id: USER.into(),
        item_id: shown.clone(),
        r#type: EventType::Impression as i32,
        timestamp_ms: now_ms + n,
        event_id: format!("rules-test-impression-{n}"),
        ..Event::default()
    };
    let mut recommender = RecommenderClient::new(cluster.channel(Service::Orchestrator));
    let logged = recommender.log_events(LogEventsRequest { events: vec![impression(1)] }).await.expect("logged");
    assert_eq!(logged.into_inner().accepted, 1);
    assert!(ids(&recommend(&cluster).await).contains(&shown), "shown once: still served");
    recommender.log_events(LogEventsRequest { events: vec![impression(2)] }).await.expect("logged");
    assert!(!ids(&recommend(&cluster).await).contains(&shown), "shown twice within a day: filtered");

    // A new item no bundle knows is served at once: recall's cold-start channel proposes
    // it from the run-time catalogue, rank passes it on unscored, freshness lifts it.
    let new_item = CatalogItem {
        item_id: "new-item-1".into(),
        publish_time_ms: now_ms,
        category: "Drama".into(),
        ..CatalogItem::default()
    };
    catalog.upsert_items(UpsertItemsRequest { items: vec![new_item] }).await.expect("upsert");
    // Recall and rerank follow the catalogue each on its own, so recall may propose the
    // item a poll before rerank knows its publish time: wait for both.
    let served_new = eventually(&cluster, "the new item, lifted by freshness", |r| {
        ids(r).contains(&"new-item-1".to_string()) && effects(r, "new-item-1").contains(&("fresh", "freshness"))
    })
    .await;
    let trace = served_new.items.iter().find(|item| item.item_id == "new-item-1").unwrap().trace.clone().unwrap();
    assert_eq!(trace.recall_channels, ["cold_start"]);

    // Item counts reach the rules: an item other users clicked twice in the last hour is
    // trending (feature-svc's item-feature RPC, called by rerank for its window).
    let trending = served_new.items.last().unwrap().item_id.clone();
    let click = |n: i64| Event {
        user_id: format!("rules-test-clicker-{n}"),
        item_id: trending.clone(),
        r#type: EventType::Click as i32,
        timestamp_ms: now_ms + n,
        ..Event::default()
    };
    recommender.log_events(LogEventsRequest { events: vec![click(1), click(2)] }).await.expect("logged");
    let lifted = eventually(&cluster, "the trending lift", |r| r.items[0].item_id == trending).await;
    assert!(effects(&lifted, &trending).contains(&("trending", "boost")));

    // A rules file that fails the checks is refused; the previous rules keep serving.
    replace(&rules_path, &RULES.replace("max_per_list = 4", "max_per_list = 0"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = recommend(&cluster).await;
    assert_eq!(still.items[1].item_id, promoted, "the pin still serves");
    assert_capped(&still, &genres, 4);
    // A good one replaces them: without the pin the promoted item leaves slot 2.
    let without_pin = RULES.replace("kind = \"pin\"", "enabled = false\nkind = \"pin\"");
    replace(&rules_path, &without_pin);
    eventually(&cluster, "the reloaded rules", |r| r.items.get(1).is_none_or(|item| item.item_id != promoted)).await;
}

/// Replaces a rules file the way an operator (or Kubernetes) should: write, then rename.
fn replace(path: &Path, text: &str) {
    let staged = path.with_extension("toml.new");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

fn bundle_genres(dir: &Path) -> HashMap<String, Vec<String>> {
    recsys_bundle::read_catalog(dir).expect("bundle catalog").into_iter().map(|item| (item.id, item.genres)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_follow_the_requests_scene_and_experiment_arm() {
    use orchestrator::experiments::{ExperimentConfig, Layer, Overrides, Variant};

    let rules = r#"
[[rule]]
name = "slot"
kind = "pin"
when = [{ attribute = "promoted", op = "eq", value = true }]
positions = [1]

[[rule]]
name = "slot"
variants = ["rules_arm/no_pin"]
enabled = false
kind = "pin"
when = [{ attribute = "promoted", op = "eq", value = true }]
positions = [1]

[[rule]]
name = "seller_ban"
scenes = ["home"]
kind = "filter"
when = [{ attribute = "seller", op = "eq", value = "s9" }]
"#;
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("rules.toml");
    std::fs::write(&rules_path, rules).unwrap();
    let arm = |name: &str| Variant { name: name.into(), share: 50.0, overrides: Overrides::default() };
    let options = ClusterOptions {
        rules: Some(rules_path),
        experiments: ExperimentConfig {
            layers: vec![Layer {
                name: "rules_arm".into(),
                salt: "rules-1".into(),
                variants: vec![arm("pin"), arm("no_pin")],
            }],
        },
        scenes: [("home".to_string(), Overrides::default())].into(),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start_with(options).await.expect("cluster starts");
    let mut client = RecommenderClient::new(cluster.channel(Service::Orchestrator));
    let ask = |user: String, scene: &str| RecommendRequest {
        user_id: user,
        top_k: 10,
        scene: scene.into(),
        debug: true,
        ..RecommendRequest::default()
    };
    // One user in each arm.
    let mut arms: HashMap<String, (String, RecommendResponse)> = HashMap::new();
    for n in 1..200 {
        let response = client.recommend(ask(n.to_string(), "")).await.unwrap().into_inner();
        let variant = response.experiments.iter().find(|a| a.layer == "rules_arm").unwrap().variant.clone();
        arms.entry(variant).or_insert((n.to_string(), response));
        if arms.len() == 2 {
            break;
        }
    }
    let (pinned_user, pinned_first) = arms["pin"].clone();
    let (free_user, free_first) = arms["no_pin"].clone();
    let mut catalog = CatalogAdminClient::with_interceptor(cluster.admin_channel(Service::Feature), cluster.operator());
    let promote = |id: &str| CatalogItem { item_id: id.into(), promoted: true, ..CatalogItem::default() };
    let items = vec![promote(&pinned_first.items[5].item_id), promote(&free_first.items[5].item_id)];
    catalog.upsert_items(UpsertItemsRequest { items }).await.expect("upsert");

    // The "pin" arm gets a promoted item in slot 1; the "no_pin" arm switched the rule off.
    let deadline = Instant::now() + Duration::from_secs(5);
    let pin_effect = |response: &RecommendResponse| {
        response.items[0].trace.as_ref().unwrap().rules.iter().any(|effect| effect.rule == "slot")
    };
    loop {
        let response = client.recommend(ask(pinned_user.clone(), "")).await.unwrap().into_inner();
        if pin_effect(&response) {
            break;
        }
        assert!(Instant::now() < deadline, "no pin for the pin arm: {:?}", ids(&response));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let free = client.recommend(ask(free_user.clone(), "")).await.unwrap().into_inner();
    assert!(!pin_effect(&free), "the no_pin arm overrides the rule: {:?}", ids(&free));
    assert_eq!(free.items[5].item_id, free_first.items[5].item_id, "its promoted item keeps its place");

    // A rule scoped to a scene acts only on requests for that scene.
    let sold = free.items[7].item_id.clone();
    let upsert = CatalogItem {
        item_id: sold.clone(),
        attributes: [("seller".to_string(), "s9".to_string())].into(),
        ..CatalogItem::default()
    };
    catalog.upsert_items(UpsertItemsRequest { items: vec![upsert] }).await.expect("upsert");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let home = client.recommend(ask(free_user.clone(), "home")).await.unwrap().into_inner();
    assert!(!ids(&home).contains(&sold), "filtered in the home scene");
    let default_scene = client.recommend(ask(free_user, "")).await.unwrap().into_inner();
    assert!(ids(&default_scene).contains(&sold), "kept elsewhere");
}
