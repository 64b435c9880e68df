//! Promotion gated on metrics, against a real Prometheus server (Debian's, installed by
//! bootstrap) scraping a local cluster with a stable and a canary rank-svc: with a
//! healthy canary `recsysctl canary analyze` says promote; once the canary is broken
//! (stopped: its users' rank stage fails and falls back), it says roll back. The same
//! server scrapes two stand-ins for a whole-stack canary release's orchestrator (one
//! healthy, one answering 20% UNAVAILABLE), which the selector mode tells apart.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use cluster_tests::{Cluster, ClusterOptions, Service};
use recsys_proto::v1::{recommender_client::RecommenderClient, RecommendRequest};
use recsysctl::canary_analysis::{analyze, Sides, Thresholds, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn free_port() -> SocketAddr {
    recsys_chaos::cluster::free_port().await.unwrap()
}

/// A Prometheus server scraping each `(job, target)` every 250 ms; killed when dropped.
async fn start_prometheus(targets: &[(&str, SocketAddr)], dir: &Path) -> (tokio::process::Child, String) {
    let binary = std::env::var("RECSYS_PROMETHEUS").expect("RECSYS_PROMETHEUS (source target/recsys.env)");
    let config = dir.join("prometheus.yml");
    let mut text = "global:\n  scrape_interval: 250ms\n  evaluation_interval: 1s\nscrape_configs:\n".to_string();
    for (job, target) in targets {
        text += &format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n");
    }
    std::fs::write(&config, text).unwrap();
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

/// A stand-in for another release's orchestrator: `/metrics` with Recommend calls growing
/// at 100/s, `failing_per_second` of them answered UNAVAILABLE.
async fn fake_orchestrator(failing_per_second: u64) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let started = Instant::now();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let seconds = started.elapsed().as_secs_f64();
            let ok = (seconds * (100 - failing_per_second) as f64) as u64;
            let failed = (seconds * failing_per_second as f64) as u64;
            let labels = "service=\"Recommender\",method=\"/recsys.v1.Recommender/Recommend\"";
            let body = format!(
                "recsys_rpc_duration_seconds_count{{{labels},code=\"Ok\"}} {ok}\n\
                 recsys_rpc_duration_seconds_count{{{labels},code=\"Unavailable\"}} {failed}\n\
                 recsys_rpc_duration_seconds_bucket{{{labels},code=\"Ok\",le=\"0.01\"}} {ok}\n\
                 recsys_rpc_duration_seconds_bucket{{{labels},code=\"Ok\",le=\"+Inf\"}} {ok}\n"
            );
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        }
    });
    address
}

async fn verdict(prometheus: &str, thresholds: &Thresholds) -> Verdict {
    verdict_of(prometheus, &Sides::Tracks, thresholds).await
}

async fn verdict_of(prometheus: &str, sides: &Sides, thresholds: &Thresholds) -> Verdict {
    let analysis = analyze(prometheus, sides, thresholds, 50.0, None).await.expect("Prometheus answers");
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
    let (healthy, failing) = (fake_orchestrator(0).await, fake_orchestrator(20).await);
    let targets = [("stable", metrics), ("canary_healthy", healthy), ("canary_failing", failing)];
    let (_prometheus, url) = start_prometheus(&targets, dir.path()).await;
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

    // A whole-stack canary: releases told apart by their scrape job.
    let whole_stack =
        |canary: &str| Sides::Selectors { stable: "job=\"stable\"".into(), canary: format!("job=\"{canary}\"") };
    assert_eq!(verdict_of(&url, &whole_stack("canary_healthy"), &thresholds).await, Verdict::Promote);
    let failing = verdict_of(&url, &whole_stack("canary_failing"), &thresholds).await;
    assert!(matches!(failing, Verdict::Rollback(_)), "{failing:?}");

    cluster.stop(Service::RankCanary).await.unwrap();
    traffic(&cluster, Duration::from_secs(8)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(matches!(verdict(&url, &thresholds).await, Verdict::Rollback(_)));
}
