//! Model lifecycle through the real cluster: a new bundle version swapped in while
//! requests keep flowing, with no failed or degraded request, and operated with the
//! `ModelAdmin` RPCs that `recsysctl model` uses.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use cluster_tests::{workspace_root, Cluster, ClusterOptions, Service};
use recsys_proto::v1::{
    model_admin_client::ModelAdminClient, recommender_client::RecommenderClient, ListModelsRequest, LoadModelRequest,
    RecommendRequest, RetireModelRequest,
};
use tonic::Code;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Points `root/current` at `version` atomically (a new link renamed over the old one),
/// as the training pipeline publishes.
fn point_current(root: &Path, version: &str) {
    let staged = root.join(".current-next");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(version, &staged).unwrap();
    std::fs::rename(&staged, root.join("current")).unwrap();
}

/// A bundle root holding the default bundle as its first version and a second version
/// with the same models under another name (what a retraining on the same data gives).
fn two_versions(root: &Path) -> (String, String) {
    let original = recsys_bundle::resolve_dir(&workspace_root().join("models/bundles")).expect("make test bootstraps");
    let first = recsys_bundle::read_manifest(&original).unwrap().version;
    let second = format!("{first}-next");
    copy_dir(&original, &root.join(&first));
    copy_dir(&original, &root.join(&second));
    let manifest_path = root.join(&second).join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["version"] = serde_json::Value::String(second.clone());
    std::fs::write(&manifest_path, serde_json::to_string(&manifest).unwrap()).unwrap();
    point_current(root, &first);
    (first, second)
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
    degraded: AtomicUsize,
    versions: Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_bundle_swaps_in_under_steady_load_without_a_failed_request() {
    let root = tempfile::tempdir().unwrap();
    let (first, second) = two_versions(root.path());
    let options = ClusterOptions {
        bundle_root: Some(root.path().to_path_buf()),
        follow_current_ms: Some(100),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start_with(options).await.expect("cluster starts");

    // Steady load: four callers, every request a new user (no prediction-cache hits).
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..4)
        .map(|caller| {
            let (tally, stop) = (Arc::clone(&tally), Arc::clone(&stop));
            let mut client = RecommenderClient::new(cluster.channel(Service::Orchestrator));
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let request = RecommendRequest {
                        user_id: format!("swap-{caller}-{n}"),
                        top_k: 10,
                        ..RecommendRequest::default()
                    };
                    match client.recommend(request).await {
                        Ok(response) => {
                            let response = response.into_inner();
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                            if !response.degraded_stages.is_empty() {
                                tally.degraded.fetch_add(1, Ordering::Relaxed);
                            }
                            let mut versions = tally.versions.lock().unwrap();
                            if versions.last() != Some(&response.model_version) {
                                versions.push(response.model_version);
                            }
                        }
                        Err(_) => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(500)).await;
    point_current(root.path(), &second);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tally.versions.lock().unwrap().contains(&second) {
        assert!(Instant::now() < deadline, "the new version never served: {:?}", tally.versions.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }

    let (ok, failed, degraded) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
        tally.degraded.load(Ordering::Relaxed),
    );
    eprintln!("{ok} answers across the swap, versions in the order served: {:?}", tally.versions.lock().unwrap());
    assert!(ok > 20, "the load ran ({ok} answers)");
    assert_eq!((failed, degraded), (0, 0), "no request failed or degraded across the swap ({ok} answers)");
    assert_eq!(tally.versions.lock().unwrap().first(), Some(&first));

    // Every consumer now serves the new version and still holds the old one.
    for service in [Service::Recall, Service::Rank, Service::Rerank] {
        let mut admin = ModelAdminClient::with_interceptor(cluster.admin_channel(service), cluster.operator());
        let listed = admin.list_models(ListModelsRequest {}).await.unwrap().into_inner();
        let current: Vec<&str> =
            listed.versions.iter().filter(|v| v.current).map(|version| version.version.as_str()).collect();
        assert_eq!(current, [second.as_str()], "{}", listed.service);
        assert!(listed.versions.iter().any(|version| version.version == first), "{}", listed.service);
        assert!(listed.versions.iter().all(|version| version.metrics.contains_key("fine_auc")));
    }

    // The operator's controls on rank-svc: retire the old version, roll back by loading it
    // again, and be told clearly what cannot be done.
    let mut admin = ModelAdminClient::with_interceptor(cluster.admin_channel(Service::Rank), cluster.operator());
    let retired = admin.retire_model(RetireModelRequest { version: first.clone() }).await.unwrap().into_inner();
    assert_eq!(retired.versions.len(), 1);
    let refused = admin.retire_model(RetireModelRequest { version: second.clone() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    let missing = admin
        .load_model(LoadModelRequest { version: "no-such-version".into(), make_current: true, force: false })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let rolled_back = admin
        .load_model(LoadModelRequest { version: first.clone(), make_current: true, force: false })
        .await
        .unwrap()
        .into_inner();
    assert!(rolled_back.versions.iter().any(|version| version.version == first && version.current));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_new_version_is_refused_and_the_current_one_keeps_serving() {
    let root = tempfile::tempdir().unwrap();
    let (first, second) = two_versions(root.path());
    // A truncated model file: the manifest's checksum catches it before ONNX Runtime does.
    let model = root.path().join(&second).join("ranker.onnx");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let options = ClusterOptions {
        bundle_root: Some(root.path().to_path_buf()),
        follow_current_ms: Some(0),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start_with(options).await.expect("cluster starts");
    let mut admin = ModelAdminClient::with_interceptor(cluster.admin_channel(Service::Rank), cluster.operator());
    let refused = admin
        .load_model(LoadModelRequest { version: second.clone(), make_current: true, force: true })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("ranker.onnx"), "{}", refused.message());
    let listed = admin.list_models(ListModelsRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.versions.len(), 1);
    assert_eq!(listed.versions[0].version, first);
    let mut client = RecommenderClient::new(cluster.channel(Service::Orchestrator));
    let response = client
        .recommend(RecommendRequest { user_id: "196".into(), top_k: 5, ..RecommendRequest::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.model_version, first);
    assert!(response.degraded_stages.is_empty());
}
