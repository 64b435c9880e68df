//! `recsys-chaos` (run by `make chaos`): starts the cluster from built binaries, puts it
//! under a steady open-loop load, and meanwhile stops (SIGSTOP), kills and restarts each
//! leaf service in turn and slows rank-svc through a proxy. It records failed requests,
//! deadline misses, degraded answers and how long answers stay degraded after each
//! service returns. Then it measures the sustainable throughput, drives three times that
//! rate, and reports the latency of accepted and of shed requests. Writes
//! `target/reports/chaos.json`.

#![forbid(unsafe_code)]

use std::{
    path::PathBuf,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use clap::Parser;
use recsys_chaos::{
    cluster::{Cluster, ClusterPaths, Leaf},
    load::{self, Outcome, Sample},
};

/// Faults under steady load, then overload, against the cluster's real binaries.
#[derive(Debug, Parser)]
#[command(name = "recsys-chaos")]
struct Args {
    #[command(flatten)]
    paths: ClusterPaths,
    #[arg(long, default_value = "target/reports/chaos.json")]
    out: PathBuf,
    /// Steady load during the fault phase, requests per second (open loop).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Deadline each client request carries.
    #[arg(long, default_value_t = 300)]
    deadline_ms: u64,
    /// How long each fault lasts.
    #[arg(long, default_value_t = 4)]
    fault_s: u64,
    /// The orchestrator's concurrency limit during the run, sized for this 2-core machine
    /// (the shipped default, 64, is for a pod of its own). It must cover the requests that
    /// pile up while a stopped leaf is being detected (rate × stage budget).
    #[arg(long, default_value_t = 8)]
    max_concurrent: usize,
}

/// A fault window: when it started and when the service was back.
struct Fault {
    name: String,
    started: Duration,
    returned: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let state = tempfile::tempdir()?;
    let mut settings = args.paths.settings(state.path(), "target/chaos-logs")?;
    settings.orchestrator_env = vec![
        ("RECSYS_ORCHESTRATOR__SERVER__MAX_CONCURRENT_REQUESTS".into(), args.max_concurrent.to_string()),
        // Everything else (stage budgets, breakers, retry budget) is the shipped default.
    ];
    println!("==> starting the cluster from {}", args.paths.bin_dir.display());
    let mut cluster = Cluster::start(settings).await?;
    let deadline = Duration::from_millis(args.deadline_ms);
    let target = cluster.orchestrator;

    // The sustainable rate is what the concurrency limit lets through back to back; the
    // steady phase runs below it, the overload phase at three times it.
    println!("==> measuring sustainable throughput ({} back-to-back clients)", args.max_concurrent);
    let _warm_up = load::closed_loop_throughput(
        target,
        args.max_concurrent,
        deadline,
        Duration::from_secs(2),
        load::Users::MovieLens,
    )
    .await;
    let capacity = load::closed_loop_throughput(
        target,
        args.max_concurrent,
        deadline,
        Duration::from_secs(5),
        load::Users::MovieLens,
    )
    .await;
    let steady_rate = args.rate;
    println!("    sustainable ≈ {capacity:.0} req/s");
    println!("==> steady load at {steady_rate:.0} req/s, deadline {} ms", args.deadline_ms);
    let t0 = Instant::now();
    let steady = load::OpenLoop::start(target, steady_rate, deadline, t0, load::Users::MovieLens);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fault = Duration::from_secs(args.fault_s);
    let settle = Duration::from_secs(6);
    let mut faults = Vec::new();
    for leaf in Leaf::ALL {
        println!("    SIGSTOP {} for {}s", leaf.binary(), args.fault_s);
        let started = t0.elapsed();
        cluster.signal(leaf, "STOP")?;
        tokio::time::sleep(fault).await;
        cluster.signal(leaf, "CONT")?;
        faults.push(Fault { name: format!("stop {}", leaf.binary()), started, returned: t0.elapsed() });
        tokio::time::sleep(settle).await;

        println!("    SIGKILL {}, restart after {}s", leaf.binary(), args.fault_s);
        let started = t0.elapsed();
        cluster.kill(leaf).await?;
        tokio::time::sleep(fault).await;
        let back = cluster.restart(leaf).await?;
        faults.push(Fault { name: format!("kill {}", leaf.binary()), started, returned: back - t0 });
        tokio::time::sleep(settle).await;
    }
    println!("    +300 ms latency in front of rank-svc for {}s", args.fault_s);
    let started = t0.elapsed();
    cluster.rank_delay_ms.store(300, Ordering::Relaxed);
    tokio::time::sleep(fault).await;
    cluster.rank_delay_ms.store(0, Ordering::Relaxed);
    faults.push(Fault { name: "slow rank-svc".into(), started, returned: t0.elapsed() });
    tokio::time::sleep(settle).await;
    let steady_samples = steady.stop().await;

    let overload_rate = capacity * 3.0;
    println!("==> overload: offering {overload_rate:.0} req/s (3x sustainable)");
    let overload = load::OpenLoop::start(target, overload_rate, deadline, Instant::now(), load::Users::MovieLens);
    let probes = tokio::spawn(probe_health(target, Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let overload_samples = overload.stop().await;
    let (probes_sent, probes_failed) = probes.await?;
    cluster.shutdown().await;

    let mut report = build_report(&steady_samples, &overload_samples, &faults, deadline, capacity, overload_rate);
    report["steady_rps"] = serde_json::json!(steady_rate);
    report["overload_probes"] = serde_json::json!(probes_sent);
    report["overload_probes_failed"] = serde_json::json!(probes_failed);
    print_report(&report, &faults, &steady_samples);
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("report written to {}", args.out.display());
    Ok(())
}

/// Health checks as a Kubernetes probe makes them (one second to answer SERVING), every
/// 50 ms for `duration`: (sent, failed). Under overload none may fail, or the orchestrator
/// would be restarted for being busy.
async fn probe_health(target: std::net::SocketAddr, duration: Duration) -> (usize, usize) {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{target}")) else {
        return (0, 0);
    };
    let channel = endpoint.connect_lazy();
    let (mut sent, mut failed) = (0, 0);
    let until = Instant::now() + duration;
    while Instant::now() < until {
        sent += 1;
        let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
        request.set_timeout(Duration::from_secs(1));
        let answer =
            tokio::time::timeout(Duration::from_secs(1), HealthClient::new(channel.clone()).check(request)).await;
        if !matches!(answer, Ok(Ok(ref response)) if response.get_ref().status == ServingStatus::Serving as i32) {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (sent, failed)
}

fn recovery_seconds(samples: &[Sample], fault: &Fault, window: Duration) -> f64 {
    samples
        .iter()
        .filter(|s| s.started >= fault.returned && s.started < fault.returned + window)
        .filter(|s| !matches!(s.outcome, Outcome::Ok { degraded: false }))
        .map(|s| (s.started + s.latency - fault.returned).as_secs_f64())
        .fold(0.0, f64::max)
}

fn build_report(
    steady: &[Sample],
    overload: &[Sample],
    faults: &[Fault],
    deadline: Duration,
    capacity: f64,
    overload_rate: f64,
) -> serde_json::Value {
    let failed = steady.iter().filter(|s| !matches!(s.outcome, Outcome::Ok { .. })).count();
    let deadline_misses =
        steady.iter().filter(|s| s.latency > deadline || matches!(s.outcome, Outcome::DeadlineExceeded)).count();
    let degraded = steady.iter().filter(|s| matches!(s.outcome, Outcome::Ok { degraded: true })).count();
    let recoveries: Vec<f64> = faults.iter().map(|f| recovery_seconds(steady, f, Duration::from_secs(5))).collect();
    let accepted: Vec<Duration> =
        overload.iter().filter(|s| matches!(s.outcome, Outcome::Ok { .. })).map(|s| s.latency).collect();
    let shed: Vec<Duration> =
        overload.iter().filter(|s| matches!(s.outcome, Outcome::Shed)).map(|s| s.latency).collect();
    let overload_failed =
        overload.iter().filter(|s| matches!(s.outcome, Outcome::Failed(_) | Outcome::DeadlineExceeded)).count();
    let mut failures_by_code = serde_json::Map::new();
    for sample in steady.iter().chain(overload) {
        if let Outcome::Failed(code) = sample.outcome {
            let entry = failures_by_code.entry(format!("{code:?}")).or_insert(serde_json::json!(0));
            *entry = serde_json::json!(entry.as_u64().unwrap_or(0) + 1);
        }
    }
    // When the failures happened (seconds into the steady phase), for diagnosis.
    let failed_at_s: Vec<serde_json::Value> = steady
        .iter()
        .filter(|s| !matches!(s.outcome, Outcome::Ok { .. }))
        .take(100)
        .map(|s| {
            serde_json::json!({
                "at_s": (s.started.as_secs_f64() * 1000.0).round() / 1000.0,
                "latency_ms": s.latency.as_secs_f64() * 1000.0,
                "outcome": format!("{:?}", s.outcome),
            })
        })
        .collect();
    serde_json::json!({
        "failures_by_code": failures_by_code,
        "failed_at_s": failed_at_s,
        "faults": faults.iter().map(|f| serde_json::json!({"name": f.name, "started_s": f.started.as_secs_f64(), "returned_s": f.returned.as_secs_f64()})).collect::<Vec<_>>(),
        "requests": steady.len(),
        "failed_requests": failed,
        "deadline_misses": deadline_misses,
        "degraded_responses": degraded,
        "steady_p99_ms": load::quantile_ms(steady.iter().map(|s| s.latency), 0.99),
        "max_recovery_s": recoveries.iter().copied().fold(0.0, f64::max),
        "recovery_s": faults.iter().zip(&recoveries).map(|(f, r)| (f.name.clone(), serde_json::json!(r))).collect::<serde_json::Map<_, _>>(),
        "deadline_ms": deadline.as_millis() as u64,
        "sustainable_rps": capacity,
        "overload_offered_rps": overload_rate,
        "overload_requests": overload.len(),
        "overload_accepted": accepted.len(),
        "overload_shed": shed.len(),
        "overload_other_failures": overload_failed,
        "overload_accepted_p99_ms": load::quantile_ms(accepted.iter().copied(), 0.99),
        "overload_accepted_p50_ms": load::quantile_ms(accepted.iter().copied(), 0.5),
        "shed_p99_ms": load::quantile_ms(shed.iter().copied(), 0.99),
        // What refusing costs next to serving, in the same run (noise on a shared machine
        // moves both): a shed must be far cheaper than an answer to protect capacity.
        "shed_p99_over_accepted_p50": shed_over_accepted(&shed, &accepted),
        "assignment_share_max_error": assignment_share_max_error(),
    })
}

/// p99 of a refused request ÷ p50 of an accepted one; null when either set is empty.
fn shed_over_accepted(shed: &[Duration], accepted: &[Duration]) -> Option<f64> {
    if shed.is_empty() || accepted.is_empty() {
        return None;
    }
    let accepted_p50 = load::quantile_ms(accepted.iter().copied(), 0.5);
    (accepted_p50 > 0.0).then(|| load::quantile_ms(shed.iter().copied(), 0.99) / accepted_p50)
}

/// Largest difference between a variant's configured and observed share (as a
/// fraction) over 100 000 synthetic users, for a 50/30/20 layer and a 5% canary split.
fn assignment_share_max_error() -> f64 {
    use orchestrator::experiments::{ExperimentConfig, Layer, Overrides, Variant};
    let shares = [("control", 50.0), ("a", 30.0), ("b", 20.0)];
    let layer = Layer {
        name: "chaos".into(),
        salt: "chaos-layer".into(),
        variants: shares
            .iter()
            .map(|(name, share)| Variant { name: (*name).into(), share: *share, overrides: Overrides::default() })
            .collect(),
    };
    let config = ExperimentConfig { layers: vec![layer] };
    let users = 100_000;
    let mut counts = std::collections::HashMap::new();
    let mut canary = 0usize;
    for n in 0..users {
        let user = format!("user-{n}");
        let (assignments, _) = config.assign(&user);
        for assignment in assignments {
            *counts.entry(assignment.variant).or_insert(0usize) += 1;
        }
        if orchestrator::experiments::bucket("canary", &user) < 500 {
            canary += 1;
        }
    }
    let variant_errors = shares.iter().map(|(name, share)| {
        let observed = counts.get(*name).copied().unwrap_or(0) as f64 / users as f64;
        (observed - share / 100.0).abs()
    });
    let canary_error = (canary as f64 / users as f64 - 0.05).abs();
    variant_errors.chain(std::iter::once(canary_error)).fold(0.0, f64::max)
}

fn print_report(report: &serde_json::Value, faults: &[Fault], steady: &[Sample]) {
    println!();
    println!("{:<28} {:>10}", "steady phase", "");
    for key in
        ["requests", "failed_requests", "deadline_misses", "degraded_responses", "steady_p99_ms", "max_recovery_s"]
    {
        println!("  {key:<26} {:>10}", format_number(&report[key]));
    }
    println!("  {:<26} {:>10} {:>10} {:>12}", "fault", "degraded", "failed", "recovery s");
    for fault in faults {
        let during: Vec<&Sample> =
            steady.iter().filter(|s| s.started >= fault.started && s.started < fault.returned).collect();
        let degraded = during.iter().filter(|s| matches!(s.outcome, Outcome::Ok { degraded: true })).count();
        let failed = during.iter().filter(|s| !matches!(s.outcome, Outcome::Ok { .. })).count();
        println!(
            "  {:<26} {:>10} {:>10} {:>12}",
            fault.name,
            degraded,
            failed,
            format_number(&report["recovery_s"][&fault.name])
        );
    }
    println!("overload phase");
    for key in [
        "sustainable_rps",
        "overload_offered_rps",
        "overload_requests",
        "overload_accepted",
        "overload_shed",
        "overload_other_failures",
        "overload_accepted_p50_ms",
        "overload_accepted_p99_ms",
        "shed_p99_ms",
        "shed_p99_over_accepted_p50",
        "overload_probes",
        "overload_probes_failed",
    ] {
        println!("  {key:<26} {:>10}", format_number(&report[key]));
    }
    println!("assignment");
    println!("  {:<26} {:>10}", "assignment_share_max_error", format_number(&report["assignment_share_max_error"]));
}

fn format_number(value: &serde_json::Value) -> String {
    match value.as_f64() {
        Some(number) if number.fract() == 0.0 => format!("{number:.0}"),
        Some(number) => format!("{number:.4}"),
        None => value.to_string(),
    }
}
