//! `make fuzz`: every fuzz target of `support/fuzz` at volume against an in-process
//! cluster, then the security checks (plaintext refused by a TLS cluster, an anonymous
//! admin call refused, ordinary requests served while 1,000 idle connections are held).
//! Prints a table, saves each crash's input under `target/fuzz/crashes/` (copy it to
//! `tests/fuzz-regressions/<target>/` once fixed, where `tests/fuzz.rs` replays it) and
//! writes `target/reports/fuzz.json`.

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Parser;
use cluster_tests::{
    fuzz::{
        run::{run_target, Budget, TargetReport},
        Fuzzer, Target,
    },
    Cluster, ClusterOptions, Service,
};
use recsys_proto::v1::{admin_client::AdminClient, recommender_client::RecommenderClient, GetTrafficSplitRequest};
use sha2::Digest;

#[derive(Debug, Parser)]
#[command(name = "recsys-fuzz")]
struct Args {
    /// Cases per target.
    #[arg(long, default_value_t = 100_000)]
    cases: u64,
    /// Upper bound on one target's run.
    #[arg(long, default_value_t = 240)]
    seconds_per_target: u64,
    /// Concurrent workers per target.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    #[arg(long, default_value_t = 0x5eed_f022)]
    seed: u64,
    /// Only these targets (names as in the table); all by default.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Connections held open during the idle-flood check.
    #[arg(long, default_value_t = 1_000)]
    idle_connections: usize,
    /// Ordinary requests sent during the idle flood, and their deadline.
    #[arg(long, default_value_t = 400)]
    flood_requests: usize,
    #[arg(long, default_value_t = 500)]
    flood_deadline_ms: u64,
    #[arg(long, default_value = "target/fuzz/crashes")]
    crashes: PathBuf,
    #[arg(long, default_value = "target/reports/fuzz.json")]
    report: PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let targets: Vec<Target> = if args.targets.is_empty() {
        Target::ALL.to_vec()
    } else {
        args.targets
            .iter()
            .map(|name| Target::from_name(name).ok_or_else(|| anyhow::anyhow!("unknown target {name}")))
            .collect::<anyhow::Result<_>>()?
    };
    let fuzzer = Arc::new(Fuzzer::start().await?);

    let unauthenticated_admin_refused = anonymous_admin_call_refused(&fuzzer.cluster).await;

    let budget = Budget {
        cases: args.cases,
        time: Duration::from_secs(args.seconds_per_target),
        workers: args.workers,
        seed: args.seed,
    };
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9}",
        "target", "cases", "accepted", "refused", "crashes", "seconds", "cases/s"
    );
    let mut reports: Vec<TargetReport> = Vec::new();
    for target in targets {
        let report = run_target(Arc::clone(&fuzzer), target, budget).await;
        println!(
            "{:<26} {:>9} {:>9} {:>9} {:>8} {:>8.1} {:>9.0}",
            target.name(),
            report.cases,
            report.accepted,
            report.refused,
            report.crashed,
            report.seconds,
            report.cases as f64 / report.seconds.max(1e-9)
        );
        for crash in &report.crashes {
            let digest = format!("{:x}", sha2::Sha256::digest(&crash.input));
            let dir = args.crashes.join(target.name());
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join(format!("{}.bin", &digest[..16])), &crash.input)?;
            std::fs::write(dir.join(format!("{}.txt", &digest[..16])), &crash.what)?;
            println!("    crash: {}", crash.what);
        }
        reports.push(report);
    }
    let serving_after = fuzzer.still_serving().await;
    if let Err(what) = &serving_after {
        println!("after fuzzing: {what}");
    }

    let served_during_idle_flood = cluster_tests::fuzz::served_during_idle_flood(
        &fuzzer.cluster,
        args.idle_connections,
        args.flood_requests,
        Duration::from_millis(args.flood_deadline_ms),
    )
    .await?;
    let plaintext_refused = plaintext_refused_by_tls_cluster().await?;

    let cases: u64 = reports.iter().map(|report| report.cases).sum();
    let min_cases = reports.iter().map(|report| report.cases).min().unwrap_or(0);
    let crashes = reports.iter().map(|report| report.crashed).sum::<u64>() + u64::from(serving_after.is_err());
    println!();
    println!("targets {}  cases {cases}  min per target {min_cases}  crashes {crashes}", reports.len());
    println!(
        "plaintext refused {plaintext_refused}  anonymous admin refused {unauthenticated_admin_refused}  \
         served during idle flood {served_during_idle_flood:.3} ({} connections, {} ms deadline)",
        args.idle_connections, args.flood_deadline_ms
    );
    let report = serde_json::json!({
        "targets": reports.len(),
        "cases": cases,
        "min_cases_per_target": min_cases,
        "crashes": crashes,
        "plaintext_refused": plaintext_refused,
        "unauthenticated_admin_refused": unauthenticated_admin_refused,
        "served_during_idle_flood": served_during_idle_flood,
    });
    if let Some(parent) = args.report.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.report, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", args.report.display());
    Ok(())
}

/// 1 when an admin call with no identity is refused with UNAUTHENTICATED.
async fn anonymous_admin_call_refused(cluster: &Cluster) -> u8 {
    let mut admin = AdminClient::new(cluster.admin_channel(Service::Orchestrator));
    match admin.get_traffic_split(GetTrafficSplitRequest {}).await {
        Err(status) if status.code() == tonic::Code::Unauthenticated => 1,
        _ => 0,
    }
}

/// 1 when a cluster with TLS on serves a client with the CA and a certificate, and refuses
/// the same request in plaintext.
async fn plaintext_refused_by_tls_cluster() -> anyhow::Result<u8> {
    let dir = tempfile::tempdir()?;
    let names = ["orchestrator", "feature-svc", "recall-svc", "rank-svc", "rerank-svc"];
    let certs = recsys_runtime::certs::write_dev_certs(dir.path(), &names, &[], &["operator"])?;
    let cluster = Cluster::start_with(ClusterOptions { tls: Some(certs), ..ClusterOptions::default() }).await?;
    let request = || recsys_proto::v1::RecommendRequest { user_id: "196".into(), top_k: 10, ..Default::default() };
    let over_tls = RecommenderClient::new(cluster.channel(Service::Orchestrator)).recommend(request()).await;
    let plaintext = recsys_runtime::client::lazy_channel(
        &cluster.address(Service::Orchestrator).to_string(),
        Duration::from_secs(1),
        &recsys_runtime::Tls::plaintext(),
    )?;
    let in_plaintext = RecommenderClient::new(plaintext).recommend(request()).await;
    Ok(u8::from(over_tls.is_ok() && in_plaintext.is_err()))
}
