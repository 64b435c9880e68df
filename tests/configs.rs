//! The example configuration files under `deploy/config/` stay loadable: every service
//! rejects unknown keys, so a renamed field shows up here rather than in production.

use cluster_tests::workspace_root;

fn load<T: serde::Serialize + serde::de::DeserializeOwned + Default>(file: &str) -> T {
    let path = workspace_root().join("deploy/config").join(file);
    recsys_runtime::load_config(Some(&path), "RECSYS_TEST_UNUSED").unwrap_or_else(|error| panic!("{file}: {error}"))
}

#[test]
fn example_configs_load_and_keep_the_documented_ports() {
    let orchestrator: orchestrator::Config = load("orchestrator.toml");
    let feature: feature_svc::Config = load("feature-svc.toml");
    let recall: recall_svc::Config = load("recall-svc.toml");
    let rank: rank_svc::Config = load("rank-svc.toml");
    let rerank: rerank_svc::Config = load("rerank-svc.toml");
    assert_eq!(orchestrator.server.listen, "127.0.0.1:50051");
    assert_eq!(feature.server.listen, "127.0.0.1:50052");
    assert_eq!(recall.server.listen, "127.0.0.1:50053");
    assert_eq!(rank.server.listen, "127.0.0.1:50054");
    assert_eq!(rerank.server.listen, "127.0.0.1:50055");
    assert_eq!(orchestrator.downstream.rerank, "127.0.0.1:50055");
}
