//! Whole-cluster behaviour through the public API, with every service real and in-process.

use std::collections::HashSet;

use cluster_tests::{Cluster, Service};
use recsys_proto::v1::{
    feature_service_client::FeatureServiceClient, recommender_client::RecommenderClient, Event, EventType,
    ExportEventsRequest, GetItemFeaturesRequest, GetUserFeaturesRequest, LogEventsRequest, RecommendRequest,
    RecommendResponse,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn recommend_request(user_id: &str, top_k: u32) -> RecommendRequest {
    RecommendRequest { user_id: user_id.to_string(), top_k, ..RecommendRequest::default() }
}

async fn recommend(cluster: &Cluster, request: RecommendRequest) -> Result<RecommendResponse, tonic::Status> {
    let mut client = RecommenderClient::new(cluster.channel(Service::Orchestrator));
    client.recommend(request).await.map(tonic::Response::into_inner)
}

async fn history(cluster: &Cluster, user_id: &str) -> Vec<String> {
    let mut client = FeatureServiceClient::new(cluster.channel(Service::Feature));
    client
        .get_user_features(GetUserFeaturesRequest { user_id: user_id.to_string(), max_history: 0, as_of_ms: 0 })
        .await
        .expect("feature-svc answers")
        .into_inner()
        .history_item_ids
}

fn assert_well_formed(response: &RecommendResponse, top_k: usize) {
    assert_eq!(response.items.len(), top_k, "{response:?}");
    let unique: HashSet<&str> = response.items.iter().map(|item| item.item_id.as_str()).collect();
    assert_eq!(unique.len(), top_k, "items are unique");
    for (position, item) in response.items.iter().enumerate() {
        assert_eq!(item.rank as usize, position + 1);
        assert!(item.score.is_finite());
    }
    assert!(!response.request_id.is_empty());
    assert!(!response.model_version.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommend_serves_known_and_unknown_users_and_learns_from_events() {
    let cluster = Cluster::start().await.expect("cluster starts");

    // A real MovieLens user: ten unseen items, every stage healthy, traces on request.
    let seen: HashSet<String> = history(&cluster, "196").await.into_iter().collect();
    assert!(seen.len() >= 20, "user 196 has MovieLens history");
    let response = recommend(&cluster, RecommendRequest { debug: true, ..recommend_request("196", 10) })
        .await
        .expect("recommend succeeds");
    assert_well_formed(&response, 10);
    assert!(response.degraded_stages.is_empty(), "{:?}", response.degraded_stages);
    for item in &response.items {
        assert!(!seen.contains(&item.item_id), "item {} was already seen", item.item_id);
        let trace = item.trace.as_ref().expect("debug requests carry traces");
        assert!(!trace.recall_channels.is_empty());
        assert_eq!(trace.fine_score, item.score, "the served score is the fine ranker's");
    }
    let without_debug = recommend(&cluster, recommend_request("196", 10)).await.unwrap();
    assert!(without_debug.items.iter().all(|item| item.trace.is_none()));
    assert!(!response.from_cache && !without_debug.from_cache, "debug answers are never cached");

    // A refresh within seconds is answered from the prediction cache, with its own request id.
    let refresh = recommend(&cluster, recommend_request("196", 10)).await.unwrap();
    assert!(refresh.from_cache);
    assert_ne!(refresh.request_id, without_debug.request_id);
    assert_eq!(refresh.items, without_debug.items);
    // So is the next page: the first page excluded, the cached list's next ten.
    let first_page: Vec<String> = without_debug.items.iter().map(|item| item.item_id.clone()).collect();
    let next_page =
        recommend(&cluster, RecommendRequest { exclude_item_ids: first_page.clone(), ..recommend_request("196", 10) })
            .await
            .unwrap();
    assert!(next_page.from_cache);
    assert_well_formed(&next_page, 10);
    assert!(next_page.items.iter().all(|item| !first_page.contains(&item.item_id)));

    // Excluded items never come back.
    let excluded: Vec<String> = response.items.iter().take(3).map(|item| item.item_id.clone()).collect();
    let response =
        recommend(&cluster, RecommendRequest { exclude_item_ids: excluded.clone(), ..recommend_request("196", 10) })
            .await
            .unwrap();
    assert!(response.items.iter().all(|item| !excluded.contains(&item.item_id)));

    // A user nobody has seen is served, not rejected.
    let response = recommend(&cluster, recommend_request("no-such-user-42", 10)).await.expect("unknown user served");
    assert_well_formed(&response, 10);
    assert!(response.degraded_stages.is_empty());

    // Feedback is acknowledged, stored, and what a user clicked is not recommended again.
    let first = recommend(&cluster, recommend_request("new-user-7", 5)).await.unwrap();
    let clicked = first.items[0].item_id.clone();
    let mut client = RecommenderClient::new(cluster.channel(Service::Orchestrator));
    let accepted = client
        .log_events(LogEventsRequest {
            events: vec![Event {
                user_id: "new-user-7".into(),
                item_id: clicked.clone(),
                r#type: EventType::Click as i32,
                timestamp_ms: 1_700_000_000_000,
                request_id: first.request_id.clone(),
                value: 0.0,
                experiments: first.experiments.clone(),
                event_id: format!("{}-click", first.request_id),
            }],
        })
        .await
        .expect("events accepted")
        .into_inner()
        .accepted;
    assert_eq!(accepted, 1);
    assert_eq!(history(&cluster, "new-user-7").await, vec![clicked.clone()]);

    // A batch with an invalid event: the valid rest is stored, the bad one is named; a
    // retry of the same event ids is acknowledged without counting them twice.
    let event = |item: &str, event_id: &str| Event {
        user_id: "new-user-8".into(),
        item_id: item.into(),
        r#type: EventType::Click as i32,
        timestamp_ms: 1_700_000_000_000,
        event_id: event_id.into(),
        ..Event::default()
    };
    let batch = vec![event("50", "evt-1"), event("", "evt-2"), event("181", "evt-3")];
    let first_try = client.log_events(LogEventsRequest { events: batch.clone() }).await.unwrap().into_inner();
    assert_eq!((first_try.accepted, first_try.duplicates), (2, 0));
    assert_eq!(first_try.rejected.len(), 1);
    assert_eq!(first_try.rejected[0].index, 1);
    assert!(first_try.rejected[0].reason.contains("item_id is empty"), "{:?}", first_try.rejected);
    let retry = client.log_events(LogEventsRequest { events: batch }).await.unwrap().into_inner();
    assert_eq!((retry.accepted, retry.duplicates), (2, 2));
    let mut client_features = FeatureServiceClient::new(cluster.channel(Service::Feature));
    let stored = client_features
        .get_user_features(GetUserFeaturesRequest { user_id: "new-user-8".into(), max_history: 0, as_of_ms: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.event_count, 2, "the retried events were not counted again");
    // The bundle's item statistics are bulk-loaded into the store and served with the
    // item's counts (loaded in the background at start-up).
    let mut response = recsys_proto::v1::GetItemFeaturesResponse::default();
    for _ in 0..100 {
        response = client_features
            .get_item_features(GetItemFeaturesRequest {
                item_ids: vec![clicked.clone()],
                as_of_ms: 0,
                counts_only: false,
            })
            .await
            .unwrap()
            .into_inner();
        if !response.items[0].bundle_version.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let item = &response.items[0];
    assert!(!item.bundle_version.is_empty(), "{response:?}");
    assert!(response.bundle_stat_names.iter().any(|name| name == "interactions"), "{response:?}");
    assert_eq!(item.bundle_stats.len(), response.bundle_stat_names.len());
    assert!(item.counts.unwrap().last_hour.is_some());
    // The event log leaves the store as training data: every stored event, once, in order.
    let mut pages =
        client_features.export_events(ExportEventsRequest { since_ms: 0, until_ms: 0 }).await.unwrap().into_inner();
    let mut exported = Vec::new();
    while let Some(page) = pages.message().await.unwrap() {
        exported.extend(page.events);
    }
    let ids: Vec<&str> = exported.iter().map(|event| event.event_id.as_str()).collect();
    assert_eq!(ids, vec![format!("{}-click", first.request_id).as_str(), "evt-1", "evt-3"]);
    assert_eq!(exported[0].experiments, first.experiments, "assignments are kept for the A/B analysis");
    // The response names its ranking track among its assignments, so CTR is counted per track.
    assert!(first
        .experiments
        .iter()
        .any(|assignment| assignment.layer == "rank_track" && assignment.variant == first.track));
    assert!(recsys_runtime::metrics::render()
        .contains("recsys_feedback_events_total{event=\"click\",layer=\"rank_track\",variant=\"stable\"}"));
    // The click dropped the user's cached lists: the next answer is computed, and knows it.
    let after = recommend(&cluster, recommend_request("new-user-7", 5)).await.unwrap();
    assert!(!after.from_cache);
    assert!(after.items.iter().all(|item| item.item_id != clicked));
    let hits = recsys_runtime::metrics::render();
    assert!(hits.contains("recsys_prediction_cache_lookups_total{result=\"hit\"}"), "hit rate is exported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_rejected_with_invalid_argument() {
    let cluster = Cluster::start().await.expect("cluster starts");
    let cases = [
        ("top_k 0", recommend_request("196", 0), "top_k"),
        ("top_k absurd", recommend_request("196", 1_000_000), "top_k"),
        ("empty user_id", recommend_request("", 10), "user_id is empty"),
        ("long user_id", recommend_request(&"u".repeat(100_000), 10), "user_id is 100000 bytes"),
        (
            "huge exclusion list",
            RecommendRequest { exclude_item_ids: vec!["1".into(); 50_000], ..recommend_request("196", 10) },
            "exclude_item_ids",
        ),
        (
            "message over the transport limit",
            RecommendRequest { scene: "s".repeat(5 * 1024 * 1024), ..recommend_request("196", 10) },
            "request message too large",
        ),
    ];
    for (name, request, expected) in cases {
        let status = recommend(&cluster, request).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().contains(expected), "{name}: {:?}", status.message());
    }

    let mut client = RecommenderClient::new(cluster.channel(Service::Orchestrator));
    let status = client.log_events(LogEventsRequest { events: vec![] }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client
        .log_events(LogEventsRequest {
            events: vec![Event {
                user_id: "u".into(),
                item_id: String::new(),
                r#type: EventType::Click as i32,
                timestamp_ms: 1,
                ..Event::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "events[0].item_id is empty");

    // The cluster is still healthy after all of that.
    assert_well_formed(&recommend(&cluster, recommend_request("196", 10)).await.unwrap(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_reports_health_and_lists_itself_by_reflection() {
    let cluster = Cluster::start().await.expect("cluster starts");
    // (service, what its API port serves, what its admin port serves)
    let expected: [(Service, &[&str], &[&str]); 5] = [
        (Service::Orchestrator, &["recsys.v1.Recommender"], &["recsys.v1.Admin"]),
        (Service::Feature, &["recsys.v1.FeatureService", "recsys.v1.CatalogService"], &["recsys.v1.CatalogAdmin"]),
        (Service::Recall, &["recsys.v1.RecallService"], &["recsys.v1.ModelAdmin"]),
        (Service::Rank, &["recsys.v1.RankService"], &["recsys.v1.ModelAdmin"]),
        (Service::Rerank, &["recsys.v1.RerankService"], &["recsys.v1.ModelAdmin"]),
    ];
    for (service, api, admin) in expected {
        assert_eq!(cluster.health(service).await, Some(ServingStatus::Serving), "{service:?}");
        for (channel, names) in [(cluster.channel(service), api), (cluster.admin_channel(service), admin)] {
            let v1 = cluster_tests::reflection::list_services_v1(channel.clone()).await.unwrap();
            let v1alpha = cluster_tests::reflection::list_services_v1alpha(channel).await.unwrap();
            for listed in [&v1, &v1alpha] {
                for name in names {
                    assert!(listed.contains(&name.to_string()), "{service:?} lists {listed:?}");
                }
                assert!(listed.contains(&"grpc.health.v1.Health".to_string()));
                assert!(
                    !listed.iter().any(|other| other.starts_with("recsys.") && !names.contains(&other.as_str())),
                    "{service:?} advertises only the port's own services: {listed:?}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leaf_degrades_the_answer_instead_of_failing_it() {
    let mut cluster = Cluster::start().await.expect("cluster starts");
    cluster.stop(Service::Rerank).await.unwrap();
    let response = recommend(&cluster, recommend_request("196", 10)).await.expect("served without rerank");
    assert_well_formed(&response, 10);
    assert_eq!(response.degraded_stages, vec!["rerank"]);

    cluster.stop(Service::Rank).await.unwrap();
    let response = recommend(&cluster, recommend_request("196", 10)).await.expect("served without rank");
    assert_well_formed(&response, 10);
    assert_eq!(response.degraded_stages, vec!["rank", "rerank"]);

    cluster.stop(Service::Feature).await.unwrap();
    let response = recommend(&cluster, recommend_request("196", 10)).await.expect("served without features");
    assert_eq!(response.items.len(), 10);
    assert_eq!(response.degraded_stages, vec!["feature", "rank", "rerank"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experiments_and_the_rank_canary_are_applied_and_operable_at_run_time() {
    use cluster_tests::ClusterOptions;
    use orchestrator::{
        domain::ChannelName,
        experiments::{ExperimentConfig, Layer, Overrides, Variant},
    };
    use recsys_proto::v1::Channel;
    use recsys_proto::v1::{admin_client::AdminClient, PromoteCanaryRequest, SetCanaryShareRequest};

    let layer = Layer {
        name: "diversity".into(),
        salt: "diversity-1".into(),
        variants: vec![
            Variant { name: "control".into(), share: 50.0, overrides: Overrides::default() },
            Variant {
                name: "relevance_only".into(),
                share: 50.0,
                overrides: Overrides {
                    relevance_weight: Some(1.0),
                    channel_weights: [(ChannelName(Channel::ItemCf), 2.0)].into(),
                    ..Overrides::default()
                },
            },
        ],
    };
    // A scene that recalls only the ten most popular unseen items.
    let popular_only = Overrides {
        candidate_count: Some(10),
        channel_weights: Channel::ALL.map(|c| (ChannelName(c), if c == Channel::Popular { 1.0 } else { 0.0 })).into(),
        ..Overrides::default()
    };
    let options = ClusterOptions {
        canary_share_percent: Some(50.0),
        experiments: ExperimentConfig { layers: vec![layer.clone()] },
        scenes: [("popular_only".to_string(), popular_only)].into(),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start_with(options).await.expect("cluster starts");

    let mut variants = HashSet::new();
    let mut tracks = HashSet::new();
    for user in 1..=40 {
        let user_id = user.to_string();
        let first = recommend(&cluster, recommend_request(&user_id, 10)).await.unwrap();
        let again = recommend(&cluster, recommend_request(&user_id, 10)).await.unwrap();
        assert_well_formed(&first, 10);
        assert!(first.degraded_stages.is_empty(), "{:?}", first.degraded_stages);
        assert_eq!(first.experiments.len(), 2, "the layer's variant and the ranking track");
        assert_eq!(first.experiments[1].variant, first.track);
        assert_eq!(first.experiments, again.experiments, "assignment is sticky");
        assert_eq!(first.track, again.track, "canary routing is sticky");
        variants.insert(first.experiments[0].variant.clone());
        tracks.insert(first.track.clone());
    }
    assert_eq!(variants, HashSet::from(["control".to_string(), "relevance_only".to_string()]));
    assert_eq!(tracks, HashSet::from(["stable".to_string(), "canary".to_string()]));

    let mut admin = AdminClient::with_interceptor(cluster.admin_channel(Service::Orchestrator), cluster.operator());
    let split = admin.set_canary_share(SetCanaryShareRequest { share_percent: 0.0 }).await.unwrap().into_inner();
    assert_eq!(split.canary_share_percent, 0.0);
    for user in 1..=10 {
        assert_eq!(recommend(&cluster, recommend_request(&user.to_string(), 5)).await.unwrap().track, "stable");
    }
    let bad = admin.set_canary_share(SetCanaryShareRequest { share_percent: 150.0 }).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    let split = admin.get_traffic_split(recsys_proto::v1::GetTrafficSplitRequest {}).await.unwrap().into_inner();
    assert_eq!(split.tracks.len(), 2);
    assert!(split.tracks.iter().all(|track| track.requests > 0 && !track.model_version.is_empty()), "{split:?}");

    // A configured scene selects its own serving configuration; an unknown one is refused.
    let control_user = (1..=40)
        .map(|user| user.to_string())
        .find(|user| layer.variant_of(user).is_some_and(|variant| variant.name == "control"))
        .expect("some user is in the control variant");
    let request =
        RecommendRequest { scene: "popular_only".into(), debug: true, ..recommend_request(&control_user, 10) };
    let response = recommend(&cluster, request).await.unwrap();
    assert_well_formed(&response, 10);
    // Recall kept exactly the ten most popular items the user has not seen.
    let seen: HashSet<String> = history(&cluster, &control_user).await.into_iter().collect();
    let expected: HashSet<String> = recsys_bundle::most_popular(cluster.bundle(), usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(item_id, _)| item_id)
        .filter(|item_id| !seen.contains(item_id))
        .take(10)
        .collect();
    let served: HashSet<String> = response.items.iter().map(|item| item.item_id.clone()).collect();
    assert_eq!(served, expected);
    let default = recommend(&cluster, recommend_request(&control_user, 10)).await.unwrap();
    assert_ne!(default.items.iter().map(|item| item.item_id.clone()).collect::<HashSet<_>>(), expected);
    let unknown = recommend(&cluster, RecommendRequest { scene: "nowhere".into(), ..recommend_request("1", 10) })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert!(unknown.message().contains("\"nowhere\"") && unknown.message().contains("popular_only"), "{unknown:?}");

    let canary_address = cluster.address(Service::RankCanary).to_string();
    let promoted = admin.promote_canary(PromoteCanaryRequest {}).await.unwrap().into_inner();
    assert_eq!(promoted.stable_address, canary_address);
    assert!(promoted.canary_address.is_empty());
    for user in 1..=10 {
        let response = recommend(&cluster, recommend_request(&user.to_string(), 5)).await.unwrap();
        assert_eq!(response.track, "stable");
        assert!(response.degraded_stages.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_carry_every_channels_work_and_requests_stay_on_one_bundle() {
    use recsys_proto::v1::{
        rank_service_client::RankServiceClient, recall_service_client::RecallServiceClient,
        rerank_service_client::RerankServiceClient, Channel, RankRequest, RecallRequest, RerankCandidate,
        RerankRequest,
    };

    let cluster = Cluster::start().await.expect("cluster starts");
    let mut features = FeatureServiceClient::new(cluster.channel(Service::Feature));
    let user = features
        .get_user_features(GetUserFeaturesRequest { user_id: "196".into(), max_history: 0, as_of_ms: 0 })
        .await
        .unwrap()
        .into_inner();
    let recalled = RecallServiceClient::new(cluster.channel(Service::Recall))
        .recall(RecallRequest { user: Some(user.clone()), candidate_count: 200, ..RecallRequest::default() })
        .await
        .unwrap()
        .into_inner();
    let candidates = recalled.candidates.clone().expect("recall answers with candidates");
    assert_eq!(candidates.len(), 200);
    assert_eq!(candidates.check_aligned(), Ok(()));
    assert!(!recalled.bundle_version.is_empty());
    // A known user with history: every channel can score every candidate — but the
    // cold-start one, which has nothing to say where every item of the bundle has
    // interactions (MovieLens's).
    let scoring: Vec<Channel> = Channel::ALL.into_iter().filter(|&channel| channel != Channel::ColdStart).collect();
    let channels: Vec<Channel> = candidates.channels.iter().map(|column| column.channel()).collect();
    assert_eq!(channels, scoring);
    for column in &candidates.channels {
        assert_eq!((column.scores.len(), column.ranks.len()), (200, 200), "{:?}", column.channel());
        assert!(column.scores.iter().all(|score| score.is_finite()));
    }
    for (index, item_id) in candidates.item_ids.iter().enumerate() {
        assert!(candidates.channels.iter().any(|column| column.rank(index) > 0), "some channel proposed {item_id}");
    }
    // The ranks are the channels' own orders: rank 1 of item-to-item is its best score.
    let item_cf = candidates.channel(Channel::ItemCf).unwrap();
    let first = item_cf.ranks.iter().position(|&rank| rank == 1).expect("item_cf's first proposal is fused");
    let best = item_cf.scores.iter().copied().fold(f32::MIN, f32::max);
    assert_eq!(item_cf.scores[first], best);
    // Event times must be aligned with the history (the real-time channel's session).
    let mut misaligned = user.clone();
    misaligned.history_timestamps.pop();
    let refused = RecallServiceClient::new(cluster.channel(Service::Recall))
        .recall(RecallRequest { user: Some(misaligned), ..RecallRequest::default() })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("history_timestamps"), "{}", refused.message());

    // rank and rerank refuse a request pinned to a bundle they do not serve.
    let pinned_elsewhere = "some-other-bundle".to_string();
    let rank = RankServiceClient::new(cluster.channel(Service::Rank))
        .rank(RankRequest {
            user: Some(user.clone()),
            candidates: Some(candidates.clone()),
            bundle_version: pinned_elsewhere.clone(),
            ..RankRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(rank.code(), Code::FailedPrecondition);
    assert!(rank.message().contains(&pinned_elsewhere) && rank.message().contains(&recalled.bundle_version));
    let rerank_request = |bundle_version: String| RerankRequest {
        candidates: vec![RerankCandidate { item_id: "50".into(), score: 1.0, counts: None, cold_start: false }],
        top_k: 1,
        bundle_version,
        ..RerankRequest::default()
    };
    let mut rerank = RerankServiceClient::new(cluster.channel(Service::Rerank));
    let refused = rerank.rerank(rerank_request(pinned_elsewhere)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(rerank.rerank(rerank_request(recalled.bundle_version.clone())).await.is_ok());

    // Pinned to recall's bundle, rank accepts the candidates as recall sent them.
    let mut rank = RankServiceClient::new(cluster.channel(Service::Rank));
    let request = |candidates: recsys_proto::v1::CandidateColumns| RankRequest {
        user: Some(user.clone()),
        candidates: Some(candidates),
        bundle_version: recalled.bundle_version.clone(),
        fine_keep: 20,
        ..RankRequest::default()
    };
    let ranked = rank.rank(request(candidates.clone())).await.unwrap().into_inner();
    assert_eq!(ranked.items.len(), 20);
    assert_eq!(ranked.model_version, recalled.bundle_version);

    // Recall's embedding scores are rank's features as they are: the same candidates without
    // them (rank computes the inner products itself) rank identically.
    let bare = recsys_proto::v1::CandidateColumns { channels: Vec::new(), ..candidates.clone() };
    let recomputed = rank.rank(request(bare)).await.unwrap().into_inner();
    assert_eq!(
        ranked.items.iter().map(|item| &item.item_id).collect::<Vec<_>>(),
        recomputed.items.iter().map(|item| &item.item_id).collect::<Vec<_>>()
    );
    for (used, computed) in ranked.items.iter().zip(&recomputed.items) {
        assert!((used.fine_score - computed.fine_score).abs() < 1e-6, "{used:?} vs {computed:?}");
    }
    // A score that is not a number is refused, naming the candidate.
    let mut poisoned = candidates.clone();
    let embedding = poisoned.channels.iter().position(|column| column.channel() == Channel::Embedding).unwrap();
    poisoned.channels[embedding].scores[3] = f32::NAN;
    let refused = rank.rank(request(poisoned)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains(&format!("candidates.channels[{embedding}].scores[3]")),
        "{}",
        refused.message()
    );
    // A column that does not line up with the item ids is refused, naming it.
    let mut short = candidates.clone();
    short.channels[1].ranks.pop();
    let refused = rank.rank(request(short)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("candidates.channels[1].ranks has 199 entries"), "{}", refused.message());
    // Recall's positions are read, not looked up — and checked against the ids.
    assert!(candidates.positions.iter().all(|&position| position > 0));
    let mut misplaced = candidates.clone();
    misplaced.positions[5] = misplaced.positions[6];
    let refused = rank.rank(request(misplaced)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("candidates.positions[5]"), "{}", refused.message());
}
