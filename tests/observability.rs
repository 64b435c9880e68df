//! The operators' assets stay true to the code: every metric the alert rules and the
//! Grafana dashboard query is one the services really export (read from a cluster that
//! has served requests), and the rule file has the shape Prometheus loads.

use std::collections::BTreeSet;

use cluster_tests::{workspace_root, Cluster, Service};
use recsys_proto::v1::{
    recommender_client::RecommenderClient, Event, EventType, ExperimentAssignment, LogEventsRequest, RecommendRequest,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: String,
    labels: std::collections::HashMap<String, String>,
    annotations: std::collections::HashMap<String, String>,
}

/// Metric names a PromQL expression reads (histogram suffixes map to their family).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let pattern = regex_lite::Regex::new(r"\brecsys_[a-z0-9_]+").unwrap();
    pattern.find_iter(expr).map(|m| m.as_str().to_string()).collect()
}

fn exported(metrics_text: &str, name: &str) -> bool {
    metrics_text.lines().any(|line| {
        !line.starts_with('#')
            && line.starts_with(name)
            && matches!(line.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
    })
}

async fn exercised_cluster_metrics() -> String {
    use orchestrator::experiments::{ExperimentConfig, Layer, Overrides, Variant};
    let experiments = ExperimentConfig {
        layers: vec![Layer {
            name: "l".into(),
            salt: "s".into(),
            variants: vec![Variant { name: "all".into(), share: 100.0, overrides: Overrides::default() }],
        }],
    };
    let options = cluster_tests::ClusterOptions { experiments, ..cluster_tests::ClusterOptions::default() };
    let mut cluster = Cluster::start_with(options).await.expect("cluster starts");
    let mut client = RecommenderClient::new(cluster.channel(Service::Orchestrator));
    for user in ["196", "1", "nobody"] {
        client
            .recommend(RecommendRequest { user_id: user.into(), top_k: 10, ..RecommendRequest::default() })
            .await
            .unwrap();
    }
    client
        .log_events(LogEventsRequest {
            events: [EventType::Impression, EventType::Click]
                .into_iter()
                .map(|event_type| Event {
                    user_id: "196".into(),
                    item_id: "50".into(),
                    r#type: event_type as i32,
                    timestamp_ms: 1,
                    // As a client copies them from the response: online CTR per variant.
                    experiments: vec![ExperimentAssignment { layer: "l".into(), variant: "all".into() }],
                    ..Event::default()
                })
                .collect(),
        })
        .await
        .unwrap();
    // A fallback, so the degradation series exist too.
    cluster.stop(Service::Rerank).await.unwrap();
    client
        .recommend(RecommendRequest { user_id: "196".into(), top_k: 10, ..RecommendRequest::default() })
        .await
        .unwrap();
    // All services run in this process and share its registry.
    recsys_runtime::metrics::render()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_and_dashboard_query_metrics_that_exist() {
    let metrics_text = exercised_cluster_metrics().await;

    let rules_text = std::fs::read_to_string(workspace_root().join("deploy/prometheus/alerts.yml")).unwrap();
    let rules: RuleFile = serde_yaml::from_str(&rules_text).expect("alerts.yml has the Prometheus rule-file shape");
    let mut queried = BTreeSet::new();
    let mut alerts = BTreeSet::new();
    for group in &rules.groups {
        assert!(!group.name.is_empty() && !group.rules.is_empty());
        for rule in &group.rules {
            assert!(alerts.insert(rule.alert.clone()), "duplicate alert {}", rule.alert);
            assert!(rule.for_.ends_with('m') || rule.for_.ends_with('h'), "{}: for {}", rule.alert, rule.for_);
            assert!(rule.labels.contains_key("severity"), "{} has no severity", rule.alert);
            assert!(rule.annotations.contains_key("summary"), "{} has no summary", rule.alert);
            let names = metric_names(&rule.expr);
            assert!(!names.is_empty(), "{} queries no recsys metric", rule.alert);
            queried.extend(names);
        }
    }
    for required in
        ["RecsysRecommendLatencyHigh", "RecsysErrorRateHigh", "RecsysCircuitBreakerOpen", "RecsysScoreDrift"]
    {
        assert!(alerts.contains(required), "missing alert {required}");
    }

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("deploy/grafana/recsys-dashboard.json")).unwrap(),
    )
    .expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("dashboard has panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_i64().expect("panel id")), "duplicate panel id");
        for target in panel["targets"].as_array().expect("panel has targets") {
            queried.extend(metric_names(target["expr"].as_str().expect("target has expr")));
        }
    }

    for name in &queried {
        assert!(exported(&metrics_text, name), "{name} is queried but not exported:\n{metrics_text}");
    }
    assert!(queried.len() >= 12, "{queried:?}");
}
