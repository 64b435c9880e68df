//! `make bench-observability`: what tracing export and metrics cost end to end. The same
//! cluster runs alternately with telemetry export off (no OTLP exporter, no metrics
//! endpoints) and on (every process exporting spans to an in-process OTLP collector and
//! serving `/metrics`, scraped every second), under the same open-loop load; the p50
//! latencies of the two modes, pooled over the rounds, give `overhead_p50_ratio`
//! (on ÷ off). Writes `target/reports/bench-observability.json`.

#![forbid(unsafe_code)]

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use recsys_chaos::{
    cluster::{Cluster, ClusterPaths},
    load::{self, Outcome},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Telemetry overhead: the cluster with export off and on, alternately, under one load.
#[derive(Debug, Parser)]
#[command(name = "bench-observability")]
struct Args {
    #[command(flatten)]
    paths: ClusterPaths,
    #[arg(long, default_value = "target/reports/bench-observability.json")]
    out: PathBuf,
    /// Requests per second (open loop) in every round.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds measured per round (after a warm-up).
    #[arg(long, default_value_t = 8)]
    round_s: u64,
    /// Rounds per mode; modes alternate so drift in machine load hits both.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// What "on" turns on: both (the measured configuration), or one part for diagnosis.
    #[arg(long, value_enum, default_value_t = OnMode::Both)]
    on: OnMode,
    /// Trace sampling ratio with export on; unset measures the shipped default.
    #[arg(long)]
    sample_ratio: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnMode {
    Both,
    Traces,
    Metrics,
}

/// Counts what the services export.
#[derive(Clone, Default)]
struct SpanSink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for SpanSink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let count: usize =
            request.into_inner().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.spans.fetch_add(count as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

async fn scrape(address: std::net::SocketAddr) -> usize {
    let Ok(mut stream) = tokio::net::TcpStream::connect(address).await else {
        return 0;
    };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return 0;
    }
    let mut body = Vec::new();
    let _ = stream.read_to_end(&mut body).await;
    body.len()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sink = SpanSink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let deadline = Duration::from_millis(300);
    let mut latencies: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut failures = [0usize; 2];
    let mut scraped_bytes = 0usize;
    for round in 0..args.rounds {
        for (mode, on) in [(0usize, false), (1usize, true)] {
            let state = tempfile::tempdir()?;
            let mut settings = args.paths.settings(state.path(), "target/bench-logs")?;
            if on && args.on != OnMode::Metrics {
                settings.otlp_endpoint = endpoint.clone();
                settings.otlp_sample_ratio = args.sample_ratio;
            }
            settings.metrics = on && args.on != OnMode::Traces;
            let cluster = Cluster::start(settings).await?;
            let warm_up = load::OpenLoop::start(
                cluster.orchestrator,
                args.rate,
                deadline,
                Instant::now(),
                load::Users::MovieLens,
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
            warm_up.stop().await;
            let scraper = on.then(|| {
                let addresses = cluster.metrics_addresses.clone();
                tokio::spawn(async move {
                    let mut total = 0usize;
                    let mut ticker = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        ticker.tick().await;
                        for address in &addresses {
                            total += scrape(*address).await;
                        }
                        if total == usize::MAX {
                            return total;
                        }
                    }
                })
            });
            let run = load::OpenLoop::start(
                cluster.orchestrator,
                args.rate,
                deadline,
                Instant::now(),
                load::Users::MovieLens,
            );
            tokio::time::sleep(Duration::from_secs(args.round_s)).await;
            let samples = run.stop().await;
            if let Some(scraper) = scraper {
                scraper.abort();
                for address in &cluster.metrics_addresses {
                    scraped_bytes += scrape(*address).await;
                }
            }
            cluster.shutdown().await;
            for sample in samples {
                match sample.outcome {
                    Outcome::Ok { .. } => latencies[mode].push(sample.latency),
                    _ => failures[mode] += 1,
                }
            }
            println!(
                "round {} export {:<3}: {} requests, p50 {:.3} ms",
                round + 1,
                if on { "on" } else { "off" },
                latencies[mode].len(),
                load::quantile_ms(latencies[mode].iter().copied(), 0.5)
            );
        }
    }
    let p50_off = load::quantile_ms(latencies[0].iter().copied(), 0.5);
    let p50_on = load::quantile_ms(latencies[1].iter().copied(), 0.5);
    let report = serde_json::json!({
        "overhead_p50_ratio": p50_on / p50_off,
        "p50_off_ms": p50_off,
        "p50_on_ms": p50_on,
        "p99_off_ms": load::quantile_ms(latencies[0].iter().copied(), 0.99),
        "p99_on_ms": load::quantile_ms(latencies[1].iter().copied(), 0.99),
        "requests_off": latencies[0].len(),
        "requests_on": latencies[1].len(),
        "failures_off": failures[0],
        "failures_on": failures[1],
        "spans_exported": sink.spans.load(Ordering::Relaxed),
        "metrics_bytes_scraped_last": scraped_bytes,
        "rate_rps": args.rate,
        "rounds": args.rounds,
        "on": format!("{:?}", args.on).to_lowercase(),
        "sample_ratio": args.sample_ratio.map_or_else(|| serde_json::json!("default"), |r| serde_json::json!(r)),
        "round_s": args.round_s,
    });
    println!();
    println!("{:<24} {:>10} {:>10}", "", "export off", "export on");
    println!("{:<24} {:>10.3} {:>10.3}", "p50 ms", p50_off, p50_on);
    println!(
        "{:<24} {:>10.3} {:>10.3}",
        "p99 ms",
        report["p99_off_ms"].as_f64().unwrap_or(0.0),
        report["p99_on_ms"].as_f64().unwrap_or(0.0)
    );
    println!("{:<24} {:>10} {:>10}", "requests", latencies[0].len(), latencies[1].len());
    println!("{:<24} {:>10} {:>10}", "failures", failures[0], failures[1]);
    println!("spans exported: {}", report["spans_exported"]);
    println!("overhead_p50_ratio (on / off): {:.4}", p50_on / p50_off);
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("report written to {}", args.out.display());
    Ok(())
}
