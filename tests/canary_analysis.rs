//! Promotion gated on metrics, against a real Prometheus server (Debian's, installed by
//! bootstrap) scraping a local cluster with a stable and a canary rank-svc: with a
//! healthy canary `recsysctl canary analyze` says promote; once the canary is broken
//! (stopped: its users' rank stage fails and falls back), it says roll back.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use cluster_tests::{Cluster, ClusterOptions, Service};
use recsys_proto::v1::{recommender_client::RecommenderClient, RecommendRequest};
use recsysctl::canary_analysis::{analyze, Thresholds, Verdict};

async fn free_port() -> SocketAddr {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
}

/// A Prometheus server scraping `target` every 250 ms; killed when dropped.
async fn start_prometheus(target: SocketAddr, dir: &Path) -> (tokio::process::Child, String) {
    let binary = std::env::var("RECSYS_PROMETHEUS").expect("RECSYS_PROMETHEUS (source target/recsys.env)");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 250ms\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: recsys\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let listen = free_port().await;
    let child = tokio::process::Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus starts");
    let url = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        assert!(Instant::now() < deadline, "Prometheus did not listen on {listen}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, url)
}

/// Ordinary requests from many users (so both tracks get traffic) for `length`.
async fn traffic(cluster: &Cluster, length: Duration) {
    let mut client = RecommenderClient::new(cluster.channel(Service::Orchestrator));
    let until = Instant::now() + length;
    let mut user = 0;
    while Instant::now() < until {
        user += 1;
        let request = RecommendRequest { user_id: (1 + user % 900).to_string(), top_k: 10, ..Default::default() };
        client.recommend(request).await.expect("answered, with a fallback if need be");
    }
}

async fn verdict(prometheus: &str, thresholds: &Thresholds) -> Verdict {
    let analysis = analyze(prometheus, thresholds, 50.0, None).await.expect("Prometheus answers");
    println!("stable {:?}\ncanary {:?}\nverdict {:?}", analysis.stable, analysis.canary, analysis.verdict);
    analysis.verdict
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_gates_the_canary_promote_when_healthy_roll_back_when_broken() {
    let metrics = free_port().await;
    let options = ClusterOptions {
        canary_share_percent: Some(50.0),
        orchestrator_metrics: Some(metrics),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start_with(options).await.expect("cluster starts");
    let dir = tempfile::tempdir().unwrap();
    let (_prometheus, url) = start_prometheus(metrics, dir.path()).await;
    // Latency is not what this test varies (the unit tests cover the p99 rule): a high
    // floor keeps a slow shared machine from deciding it.
    let thresholds = Thresholds {
        window: "6s".into(),
        min_requests: 20.0,
        max_error_rate: 0.05,
        max_p99_ratio: 1.5,
        p99_floor_ms: 5_000.0,
    };

    traffic(&cluster, Duration::from_secs(8)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(verdict(&url, &thresholds).await, Verdict::Promote);

    cluster.stop(Service::RankCanary).await.unwrap();
    traffic(&cluster, Duration::from_secs(8)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(matches!(verdict(&url, &thresholds).await, Verdict::Rollback(_)));
}
