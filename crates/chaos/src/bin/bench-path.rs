//! `make bench`: the whole request path against its own compute floor, on the synthetic
//! million-item bundle (and on ML-100k for comparison), release build, DIN as the fine
//! ranker, the prediction cache off, users drawn at random from the whole population.
//!
//! For each data set, in this order:
//! 1. **The compute floor** (`bench-path floor`, a child process so that its CPU time is
//!    its own): every stage serving runs — the user's features read from the embedded
//!    store, recall's channels (ANN, item-to-item, real-time, popular, cold start) and
//!    fusion, coarse and fine ranking, rerank's rules (with the window's item counts read
//!    from the store) and MMR — called in-process through the services' own handlers, in
//!    the orchestrator's order, with the orchestrator's defaults, for the same users as
//!    the served run. No gRPC, no network. Its p50 and CPU time per request.
//! 2. **The cluster** (five release processes on loopback, opened on the store the floor
//!    just used): one client in a closed loop (p50/p99); the peak sustainable open-loop
//!    rate (the highest whose p99 stays within the 50 ms deadline with every answer whole:
//!    nothing shed, failed or degraded); an open-loop run at half of it (p50/p99).
//! 3. **Per-hop overhead**: the cluster again with every span exported to an in-process
//!    OTLP collector; per request and leaf, the orchestrator's stage span (its client
//!    stack, encoding, HTTP/2, loopback) minus the leaf's server span (its handler).
//!
//! Writes `target/reports/bench.json` (the million-item figures, the keys),
//! `target/reports/bench-details.json` (both data sets, per-stage and per-leaf figures,
//! the peak search) and the latencies the chart script draws (`latency_chart.py`).
//!
//! `bench-path probe` is a diagnosis apart from the report: one hop's round trip and the
//! client's CPU per call, against a running feature-svc.

#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value, KeyValue},
    trace::v1::Span,
};
use recsys_chaos::{
    cluster::{Cluster, Settings},
    load::{self, Outcome, Users},
    round,
};
use recsys_proto::{
    limits::MAX_HISTORY,
    v1::{
        feature_service_client::FeatureServiceClient, feature_service_server::FeatureService,
        rank_service_server::RankService, recall_service_server::RecallService, rerank_service_server::RerankService,
        GetItemFeaturesRequest, GetItemFeaturesResponse, GetUserFeaturesRequest, RankRequest, RecallRequest,
        RerankCandidate, RerankRequest, UserFeatures,
    },
};
use recsys_runtime::{
    client::{lazy_channel, ResilientClient},
    item_features::ItemFeatureSource,
    resilience::ResilienceConfig,
    Tls,
};
use serde_json::json;
use tonic::{Request, Status};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

#[derive(Debug, Parser)]
#[command(name = "bench-path")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole benchmark.
    Run(RunArgs),
    /// The compute floor of one data set (started by `run` as a child process).
    Floor(FloorArgs),
    /// Diagnosis of one hop: closed-loop unary calls from this process to a running
    /// feature-svc — a health check (transport only) and `GetUserFeatures` through the
    /// orchestrator's client stack — with their latency and this process's CPU per call.
    Probe(ProbeArgs),
}

#[derive(Debug, clap::Args)]
struct ProbeArgs {
    /// feature-svc's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50052")]
    address: String,
    /// The user whose features are read.
    #[arg(long, default_value = "196")]
    user: String,
    /// Calls per kind (after as many again to warm up).
    #[arg(long, default_value_t = 3_000)]
    calls: usize,
    /// A bundle whose items `GetItemFeatures` reads, 50 a call drawn at random, with and
    /// without the bundle's statistics (rank's read of its fine candidates); without it,
    /// those rows are left out.
    #[arg(long)]
    bundle: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The million-item synthetic bundle root.
    #[arg(long, default_value = "models/synthetic-1000000")]
    catalogue: PathBuf,
    /// The feature store's seed for it: every user of the synthetic population.
    #[arg(long, default_value = "target/bench-features/seed-all")]
    catalogue_seed: PathBuf,
    /// The default (ML-100k) bundle root and its seed, for comparison.
    #[arg(long, default_value = "models/bundles")]
    small: PathBuf,
    #[arg(long, default_value = "data/ml-100k")]
    small_seed: PathBuf,
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Stores (kept between runs: the 2M-user seed loads once), logs and latencies.
    #[arg(long, default_value = "target/bench")]
    work: PathBuf,
    #[arg(long, default_value = "target/reports/bench.json")]
    out: PathBuf,
    /// Measured requests of the closed loop and of the floor (the same users).
    #[arg(long, default_value_t = 2_000)]
    requests: usize,
    /// The deadline every request carries, and the peak's p99 bound.
    #[arg(long, default_value_t = 50)]
    deadline_ms: u64,
    /// Seconds measured per open-loop rate (after two seconds of warm-up).
    #[arg(long, default_value_t = 8)]
    step_s: u64,
    /// Requests traced for the per-hop overhead.
    #[arg(long, default_value_t = 500)]
    traced_requests: usize,
    /// The data sets measured: `ml100k`, `1m` (the report's), or both. Without `1m` the
    /// figures are printed and no report is written.
    #[arg(long, value_delimiter = ',', default_value = "ml100k,1m")]
    sets: Vec<String>,
}

#[derive(Debug, Clone, clap::Args)]
struct FloorArgs {
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    seed: PathBuf,
    #[arg(long)]
    state: PathBuf,
    /// Number of the first measured request (users are drawn by request number).
    #[arg(long)]
    first: u64,
    #[arg(long)]
    requests: usize,
    /// Where the floor's figures go (JSON).
    #[arg(long)]
    out: PathBuf,
}

/// The numbers of the first measured request: warm-up requests come before it.
const FIRST_MEASURED: u64 = 1_000_000;
const WARM_UP_REQUESTS: usize = 200;
const TOP_K: u32 = 10;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::Floor(args) => floor(args).await,
        Command::Probe(args) => probe(args).await,
    }
}

/// Times `calls` sequential awaits of `call` (after as many to warm up): latency
/// quantiles in µs and this process's CPU time per call.
async fn probe_calls<F, Fut>(calls: usize, mut call: F) -> anyhow::Result<(f64, f64, f64, f64)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for _ in 0..calls {
        call().await?;
    }
    let cpu_before = process_cpu_time()?;
    let mut latencies = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        call().await?;
        latencies.push(started.elapsed());
    }
    let cpu_per_call = (process_cpu_time()? - cpu_before).as_secs_f64() * 1e6 / calls as f64;
    let micros = |q| load::quantile_ms(latencies.iter().copied(), q) * 1000.0;
    Ok((micros(0.5), micros(0.9), micros(0.99), cpu_per_call))
}

/// `bench-path probe`: what one hop costs, apart from any handler (README, "What a hop is
/// made of here").
async fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let channel = lazy_channel(&args.address, Duration::from_secs(1), &Tls::plaintext())?;
    let health = HealthClient::new(channel.clone());
    let features: ResilientClient<GetUserFeaturesRequest, UserFeatures> = ResilientClient::new(
        "probe",
        channel.clone(),
        "/recsys.v1.FeatureService/GetUserFeatures",
        Duration::from_secs(1),
        &ResilienceConfig::default(),
    );
    let request = Arc::new(GetUserFeaturesRequest { user_id: args.user, max_history: MAX_HISTORY, as_of_ms: 0 });
    let checked = probe_calls(args.calls, || {
        let mut health = health.clone();
        async move {
            health.check(HealthCheckRequest { service: String::new() }).await?;
            Ok(())
        }
    })
    .await?;
    let read = probe_calls(args.calls, || {
        let (features, request) = (features.clone(), Arc::clone(&request));
        async move {
            features.call(request, tokio::time::Instant::now() + Duration::from_secs(1)).await?;
            Ok(())
        }
    })
    .await?;
    let mut rows = vec![("health check", checked), ("GetUserFeatures (client stack)", read)];
    if let Some(bundle) = &args.bundle {
        let ids: Arc<Vec<String>> = Arc::new(
            recsys_bundle::read_catalog(&recsys_bundle::resolve_dir(bundle)?)?
                .into_iter()
                .map(|item| item.id)
                .collect(),
        );
        let client = FeatureServiceClient::new(channel);
        let mut drawn = 0u64;
        // Twice each, alternated, the second round reported: the store's pages warm up
        // over the calls, and neither kind should read a warmer store than the other.
        let mut measured = Vec::new();
        for counts_only in [false, true, false, true] {
            let timing = probe_calls(args.calls, || {
                let item_ids = (0..50)
                    .map(|_| {
                        drawn += 1;
                        ids[(drawn.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as usize % ids.len()].clone()
                    })
                    .collect();
                let mut client = client.clone();
                async move {
                    client.get_item_features(GetItemFeaturesRequest { item_ids, as_of_ms: 0, counts_only }).await?;
                    Ok(())
                }
            })
            .await?;
            measured.push(timing);
        }
        rows.push(("GetItemFeatures, 50 items", measured[2]));
        rows.push(("GetItemFeatures, 50 items, counts only", measured[3]));
    }
    println!("one client, closed loop, {} calls each to {}", args.calls, args.address);
    println!("{:<40} {:>8} {:>8} {:>8} {:>14}", "call", "p50 µs", "p90 µs", "p99 µs", "client CPU µs");
    for (name, (p50, p90, p99, cpu)) in rows {
        println!("{name:<40} {p50:>8.0} {p90:>8.0} {p99:>8.0} {cpu:>14.0}");
    }
    Ok(())
}

/// The population requests are drawn from: the seed's `users.csv`, first column.
fn read_users(seed: &Path) -> anyhow::Result<Arc<Vec<String>>> {
    let path = seed.join("users.csv");
    let mut reader = csv::Reader::from_path(&path).with_context(|| path.display().to_string())?;
    let mut users = Vec::new();
    for record in reader.records() {
        users.push(record?.get(0).context("empty row in users.csv")?.to_string());
    }
    anyhow::ensure!(!users.is_empty(), "{} lists no users", path.display());
    Ok(Arc::new(users))
}

/// CPU time this process has used (user + system), from `/proc/self/stat`. Linux reports it
/// in USER_HZ ticks, fixed at 100 per second by its ABI.
fn process_cpu_time() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat.rsplit_once(')').context("unexpected /proc/self/stat")?.1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

/// feature-svc's handler answers rank's and rerank's item-count reads in the floor, as it does over
/// gRPC in the cluster.
struct InProcessCounts(feature_svc::FeatureGrpc);

#[tonic::async_trait]
impl ItemFeatureSource for InProcessCounts {
    async fn item_features(
        &self,
        request: GetItemFeaturesRequest,
        _timeout: Duration,
    ) -> Result<GetItemFeaturesResponse, Status> {
        Ok(self.0.get_item_features(Request::new(request)).await?.into_inner())
    }
}

/// The four leaves' handlers in one process, on the cluster's defaults.
struct Stages {
    feature: feature_svc::FeatureGrpc,
    recall: recall_svc::RecallGrpc,
    rank: rank_svc::RankGrpc,
    rerank: rerank_svc::RerankGrpc,
    orchestrator: orchestrator::Config,
}

impl Stages {
    async fn open(args: &FloorArgs) -> anyhow::Result<Self> {
        let no_catalog = recsys_runtime::catalog::CatalogConfig { feature: String::new(), ..Default::default() };
        let feature_config = feature_svc::Config {
            seed_dir: Some(args.seed.clone()),
            store: feature_svc::StoreConfig { path: args.state.join("features.redb"), ..Default::default() },
            bundle: Some(args.bundle.clone()),
            ..Default::default()
        };
        let store = feature_svc::open_store(&feature_config).await?;
        feature_svc::sync_bundle(&*store, &args.bundle).await?;
        let feature = feature_svc::FeatureGrpc::new(store, feature_config.max_history);

        let recall_config =
            recall_svc::Config { bundle: args.bundle.clone(), catalog: no_catalog.clone(), ..Default::default() };
        let catalog = recsys_runtime::catalog::Catalog::follow(&no_catalog, &Tls::plaintext());
        let recall = recall_svc::RecallGrpc::new(
            recall_svc::open_registry(&recall_config)?,
            Arc::clone(&catalog),
            recall_config,
        );

        let rank_config = rank_svc::Config { bundle: args.bundle.clone(), ..Default::default() };
        let counts: Arc<dyn ItemFeatureSource> = Arc::new(InProcessCounts(feature.clone()));
        let rank = rank_svc::RankGrpc::new(
            rank_svc::open_registry(&rank_config)?,
            rank_config.coarse_keep,
            Some(Arc::clone(&counts)),
            Duration::from_millis(rank_config.item_counts_timeout_ms),
        );

        let rerank_config =
            rerank_svc::Config { bundle: args.bundle.clone(), catalog: no_catalog, ..Default::default() };
        let rules = Arc::new(rerank_svc::LiveRules::open(rerank_config.rules.as_deref()).map_err(anyhow::Error::msg)?);
        let rerank = rerank_svc::RerankGrpc::with_item_counts(
            rerank_svc::open_registry(&rerank_config)?,
            rules,
            catalog,
            rerank_config,
            Some(counts),
        );
        Ok(Self { feature, recall, rank, rerank, orchestrator: orchestrator::Config::default() })
    }

    /// One request through the four stages as the orchestrator composes them (pipeline.rs):
    /// each stage's time, in order.
    async fn recommend(&self, user_id: String) -> anyhow::Result<[Duration; 4]> {
        let config = &self.orchestrator;
        let started = Instant::now();
        let request = GetUserFeaturesRequest { user_id, max_history: MAX_HISTORY, as_of_ms: 0 };
        let mut user = self.feature.get_user_features(Request::new(request)).await?.into_inner();
        let impressions = std::mem::take(&mut user.recent_impressions);
        let featured = started.elapsed();

        // The orchestrator gets the user back from its request once recall has answered;
        // a handler consumes its request, so the floor copies it, and leaves the copy out.
        let copy_started = Instant::now();
        let user_for_rank = user.clone();
        let copying = copy_started.elapsed();
        let request = RecallRequest {
            user: Some(user),
            candidate_count: config.candidate_count,
            exclude_item_ids: Vec::new(),
            channel_weights: Vec::new(),
        };
        let recalled = self.recall.recall(Request::new(request)).await?.into_inner();
        let recalled_at = started.elapsed() - copying;

        let window = TOP_K as usize * config.rerank_window_factor.max(1) as usize;
        let request = RankRequest {
            user: Some(user_for_rank),
            candidates: recalled.candidates,
            coarse_keep: config.coarse_keep,
            fine_keep: window as u32,
            request_time: None,
            bundle_version: recalled.bundle_version.clone(),
        };
        let ranked = self.rank.rank(Request::new(request)).await?.into_inner();
        let ranked_at = started.elapsed() - copying;

        let request = RerankRequest {
            candidates: ranked
                .items
                .into_iter()
                .map(|item| RerankCandidate {
                    item_id: item.item_id,
                    score: item.fine_score,
                    counts: item.counts,
                    cold_start: item.cold_start,
                })
                .collect(),
            top_k: TOP_K,
            bundle_version: recalled.bundle_version,
            recent_impressions: impressions,
            ..RerankRequest::default()
        };
        let reranked = self.rerank.rerank(Request::new(request)).await?.into_inner();
        let done = started.elapsed() - copying;
        anyhow::ensure!(!reranked.items.is_empty(), "the floor served an empty list");
        Ok([featured, recalled_at - featured, ranked_at - recalled_at, done - ranked_at])
    }
}

/// The compute floor of one data set, written to `args.out`.
async fn floor(args: FloorArgs) -> anyhow::Result<()> {
    let users = Users::Drawn(read_users(&args.seed)?);
    let stages = Stages::open(&args).await?;
    for n in 0..WARM_UP_REQUESTS as u64 {
        stages.recommend(users.user(n)).await?;
    }
    let mut totals = Vec::with_capacity(args.requests);
    let mut per_stage: [Vec<Duration>; 4] = Default::default();
    let cpu_before = process_cpu_time()?;
    let started = Instant::now();
    for n in args.first..args.first + args.requests as u64 {
        let times = stages.recommend(users.user(n)).await?;
        totals.push(times.iter().sum::<Duration>());
        for (stage, time) in per_stage.iter_mut().zip(times) {
            stage.push(time);
        }
    }
    let wall = started.elapsed();
    let cpu = process_cpu_time()? - cpu_before;
    let stage_names = ["feature", "recall", "rank", "rerank"];
    let report = json!({
        "requests": args.requests,
        "p50_ms": load::quantile_ms(totals.iter().copied(), 0.5),
        "p99_ms": load::quantile_ms(totals.iter().copied(), 0.99),
        "cpu_ms_per_request": cpu.as_secs_f64() * 1000.0 / args.requests as f64,
        "wall_ms_per_request": wall.as_secs_f64() * 1000.0 / args.requests as f64,
        "stage_p50_ms": stage_names.iter().zip(&per_stage)
            .map(|(name, times)| (name.to_string(), json!(load::quantile_ms(times.iter().copied(), 0.5))))
            .collect::<serde_json::Map<_, _>>(),
        "latencies_ms": totals.iter().map(|t| t.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
    });
    std::fs::write(&args.out, serde_json::to_string(&report)?)?;
    Ok(())
}

/// One data set's paths.
struct DataSet {
    name: &'static str,
    bundle: PathBuf,
    seed: PathBuf,
}

/// What one open-loop rate gave.
#[derive(Debug, Clone)]
struct Step {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    sent: usize,
    whole: usize,
    passed: bool,
    latencies_ms: Vec<f64>,
}

async fn open_loop(cluster: &Cluster, rate: f64, args: &RunArgs, users: &Users) -> Step {
    let deadline = Duration::from_millis(args.deadline_ms);
    let warm_up = Duration::from_secs(2);
    let run = load::OpenLoop::start(cluster.orchestrator, rate, deadline, Instant::now(), users.clone());
    tokio::time::sleep(warm_up + Duration::from_secs(args.step_s)).await;
    let samples = run.stop().await;
    let measured: Vec<_> = samples.iter().filter(|s| s.started >= warm_up).collect();
    let whole = measured.iter().filter(|s| matches!(s.outcome, Outcome::Ok { degraded: false })).count();
    let p50_ms = load::quantile_ms(measured.iter().map(|s| s.latency), 0.5);
    let p99_ms = load::quantile_ms(measured.iter().map(|s| s.latency), 0.99);
    // The generator must have kept the schedule too (a late generator hides overload).
    let expected = rate * args.step_s as f64;
    let passed =
        whole == measured.len() && p99_ms <= args.deadline_ms as f64 && measured.len() as f64 >= 0.95 * expected;
    Step {
        rate,
        p50_ms,
        p99_ms,
        sent: measured.len(),
        whole,
        passed,
        latencies_ms: measured.iter().map(|s| s.latency.as_secs_f64() * 1000.0).collect(),
    }
}

/// The highest open-loop rate that passes: multiplied up from the closed loop's rate
/// until one fails, then bisected to within 5%.
async fn peak_search(cluster: &Cluster, start: f64, args: &RunArgs, users: &Users) -> (f64, Vec<Step>) {
    let (mut passing, mut failing): (f64, Option<f64>) = (0.0, None);
    let mut rate = start.max(10.0);
    let mut steps = Vec::new();
    for _ in 0..12 {
        let step = open_loop(cluster, rate, args, users).await;
        println!(
            "  open loop {:>7.1}/s: p50 {:>7.2} ms, p99 {:>7.2} ms, whole {}/{} {}",
            step.rate,
            step.p50_ms,
            step.p99_ms,
            step.whole,
            step.sent,
            if step.passed { "pass" } else { "FAIL" }
        );
        if step.passed {
            passing = rate;
        } else {
            failing = Some(rate);
        }
        steps.push(step);
        rate = match failing {
            None => rate * 1.4,
            Some(failing) if passing == 0.0 => failing / 2.0,
            Some(failing) => (passing + failing) / 2.0,
        };
        if failing.is_some_and(|failing| passing > 0.0 && failing - passing <= 0.05 * passing) {
            break;
        }
        // Let a failed step's queues drain before the next.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    (passing, steps)
}

/// Collects every exported span, with the name of the service that exported it.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("span lock");
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .as_ref()
                .and_then(|resource| string_attribute(&resource.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    string_attribute(&span.attributes, key)
}

/// The string value of `key` among a span's or a resource's attributes.
fn string_attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(value) => Some(value.clone()),
        _ => None,
    })
}

/// Each leaf's stage, and the server span of the RPC the orchestrator makes for it.
const HOPS: [(&str, &str); 4] = [
    ("feature", "recsys.v1.FeatureService/GetUserFeatures"),
    ("recall", "recsys.v1.RecallService/Recall"),
    ("rank", "recsys.v1.RankService/Rank"),
    ("rerank", "recsys.v1.RerankService/Rerank"),
];

/// What the traces tell, per leaf: its hop overhead (the orchestrator's stage span minus
/// the leaf's server span) and its server span; and the orchestrator's own time (its
/// `Recommend` server span minus its four stage spans).
#[derive(Default)]
struct Traced {
    hops: HashMap<&'static str, Vec<Duration>>,
    leaf_handling: HashMap<&'static str, Vec<Duration>>,
    orchestrator_own: Vec<Duration>,
    /// Every span's duration by "service/span name": where a server's own time goes
    /// (nested reads, blocking hand-offs, model runs).
    by_name: BTreeMap<String, Vec<Duration>>,
}

impl Traced {
    /// A trace whose stage was retried (two server spans) is left out for that leaf.
    fn from_spans(spans: &[(String, Span)]) -> Self {
        let duration =
            |span: &Span| Duration::from_nanos(span.end_time_unix_nano.saturating_sub(span.start_time_unix_nano));
        let mut by_trace: HashMap<&[u8], Vec<&Span>> = HashMap::new();
        let mut traced = Traced::default();
        for (service, span) in spans {
            by_trace.entry(span.trace_id.as_slice()).or_default().push(span);
            // The orchestrator's four `stage` spans are told apart by their attribute.
            let name = match attribute(span, "stage") {
                Some(stage) => format!("{}:{stage}", span.name),
                None => span.name.clone(),
            };
            let service = if service.is_empty() { "unknown" } else { service };
            traced.by_name.entry(format!("{service}/{name}")).or_default().push(duration(span));
        }
        for spans in by_trace.values() {
            let mut stages_total = Duration::ZERO;
            let mut whole = true;
            for (stage, rpc) in HOPS {
                let stage_spans: Vec<_> = spans
                    .iter()
                    .filter(|s| s.name == "stage" && attribute(s, "stage").as_deref() == Some(stage))
                    .collect();
                let servers: Vec<_> = spans.iter().filter(|s| s.name == rpc).collect();
                if let ([client], [server]) = (stage_spans.as_slice(), servers.as_slice()) {
                    traced.hops.entry(stage).or_default().push(duration(client).saturating_sub(duration(server)));
                    traced.leaf_handling.entry(stage).or_default().push(duration(server));
                    stages_total += duration(client);
                } else {
                    whole = false;
                }
            }
            let recommend: Vec<_> = spans.iter().filter(|s| s.name == "recsys.v1.Recommender/Recommend").collect();
            if let (true, [recommend]) = (whole, recommend.as_slice()) {
                traced.orchestrator_own.push(duration(recommend).saturating_sub(stages_total));
            }
        }
        traced
    }
}

fn settings(args: &RunArgs, data: &DataSet, otlp_endpoint: String) -> anyhow::Result<Settings> {
    let work = args.work.join(data.name);
    Ok(Settings {
        otlp_sample_ratio: (!otlp_endpoint.is_empty()).then_some(1.0),
        otlp_endpoint,
        metrics: false,
        bin_dir: args.bin_dir.clone(),
        bundle: std::fs::canonicalize(&data.bundle).with_context(|| data.bundle.display().to_string())?,
        seed: std::fs::canonicalize(&data.seed).with_context(|| data.seed.display().to_string())?,
        state: work.join("state"),
        logs: work.join("logs"),
        // The cache would answer a repeated user without computing: measured is the path.
        orchestrator_env: vec![("RECSYS_ORCHESTRATOR__PREDICTION_CACHE__TTL_MS".into(), "0".into())],
        rank_proxy: false,
    })
}

/// Everything measured on one data set.
struct Measured {
    items: usize,
    floor: serde_json::Value,
    closed: Vec<f64>,
    closed_failed: usize,
    peak_rps: f64,
    steps: Vec<Step>,
    half_peak: Step,
    traced: Traced,
}

async fn measure(args: &RunArgs, data: &DataSet) -> anyhow::Result<Measured> {
    let work = args.work.join(data.name);
    std::fs::create_dir_all(work.join("state"))?;
    let population = read_users(&data.seed)?;
    let items = recsys_bundle::read_catalog(&recsys_bundle::resolve_dir(&data.bundle)?)?.len();
    println!("\n== {}: {items} items, {} users", data.name, population.len());
    let users = Users::Drawn(population);

    println!("compute floor (in-process, {} requests)...", args.requests);
    let floor_out = work.join("floor.json");
    let status = tokio::process::Command::new(std::env::current_exe()?)
        .arg("floor")
        .arg("--bundle")
        .arg(&data.bundle)
        .arg("--seed")
        .arg(&data.seed)
        .arg("--state")
        .arg(work.join("state"))
        .args(["--first", &FIRST_MEASURED.to_string(), "--requests", &args.requests.to_string()])
        .arg("--out")
        .arg(&floor_out)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(work.join("floor.log"))?)
        .status()
        .await?;
    if !status.success() {
        bail!("the floor failed ({status}); see {}", work.join("floor.log").display());
    }
    let floor: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&floor_out)?)?;

    println!("cluster: closed loop, one client...");
    let deadline = Duration::from_millis(args.deadline_ms);
    let cluster = Cluster::start(settings(args, data, String::new())?).await?;
    load::closed_loop(cluster.orchestrator, 0, WARM_UP_REQUESTS, deadline, &users).await;
    let started = Instant::now();
    let samples = load::closed_loop(cluster.orchestrator, FIRST_MEASURED, args.requests, deadline, &users).await;
    let closed_rps = args.requests as f64 / started.elapsed().as_secs_f64();
    let closed_failed =
        samples.iter().filter(|(_, outcome)| !matches!(outcome, Outcome::Ok { degraded: false })).count();
    let closed: Vec<f64> = samples.iter().map(|(latency, _)| latency.as_secs_f64() * 1000.0).collect();

    println!("cluster: peak sustainable open-loop rate (p99 ≤ {} ms, every answer whole)...", args.deadline_ms);
    let (peak_rps, steps) = peak_search(&cluster, closed_rps, args, &users).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("cluster: open loop at half the peak...");
    let half_peak = open_loop(&cluster, (peak_rps / 2.0).max(1.0), args, &users).await;
    cluster.shutdown().await;

    println!("cluster with every span exported: per-hop overhead ({} requests)...", args.traced_requests);
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let cluster = Cluster::start(settings(args, data, endpoint)?).await?;
    load::closed_loop(cluster.orchestrator, 0, WARM_UP_REQUESTS, deadline, &users).await;
    // The services export in batches, every few seconds: the warm-up's spans are let in
    // and dropped before the measured requests.
    let export_interval = Duration::from_secs(7);
    tokio::time::sleep(export_interval).await;
    collector.spans.lock().expect("span lock").clear();
    load::closed_loop(cluster.orchestrator, FIRST_MEASURED, args.traced_requests, deadline, &users).await;
    tokio::time::sleep(export_interval).await;
    cluster.shutdown().await;
    server.abort();
    let traced = Traced::from_spans(&collector.spans.lock().expect("span lock"));

    Ok(Measured { items, floor, closed, closed_failed, peak_rps, steps, half_peak, traced })
}

fn quantile(values: &[f64], q: f64) -> f64 {
    load::quantile_ms(values.iter().map(|ms| Duration::from_secs_f64(ms / 1000.0)), q)
}

/// The keys for one data set.
fn summary(measured: &Measured, cores: usize) -> serde_json::Value {
    let floor_p50 = measured.floor["p50_ms"].as_f64().unwrap_or(f64::NAN);
    let floor_cpu = measured.floor["cpu_ms_per_request"].as_f64().unwrap_or(f64::NAN);
    let p50 = quantile(&measured.closed, 0.5);
    let p99 = quantile(&measured.closed, 0.99);
    let all_hops: Vec<Duration> = measured.traced.hops.values().flatten().copied().collect();
    json!({
        "items": measured.items,
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "floor_p50_ms": round(floor_p50, 3),
        "p50_over_floor": round(p50 / floor_p50, 3),
        "peak_rps": round(measured.peak_rps, 1),
        "half_peak_p99_ms": round(measured.half_peak.p99_ms, 3),
        "half_peak_p99_over_floor": round(measured.half_peak.p99_ms / floor_p50, 3),
        "hop_overhead_p50_ms": round(load::quantile_ms(all_hops.into_iter(), 0.5), 3),
        "cpu_efficiency": round(floor_cpu * measured.peak_rps / (1000.0 * cores as f64), 3),
    })
}

fn details(measured: &Measured) -> serde_json::Value {
    let mut floor = measured.floor.clone();
    floor.as_object_mut().map(|floor| floor.remove("latencies_ms"));
    json!({
        "floor": floor,
        "closed_loop_requests_not_whole": measured.closed_failed,
        "half_peak": {"rate": round(measured.half_peak.rate, 1), "p50_ms": round(measured.half_peak.p50_ms, 3),
            "p99_ms": round(measured.half_peak.p99_ms, 3), "whole": measured.half_peak.whole, "sent": measured.half_peak.sent},
        "peak_search": measured.steps.iter().map(|s| json!({"rate": round(s.rate, 1), "p50_ms": round(s.p50_ms, 3),
            "p99_ms": round(s.p99_ms, 3), "whole": s.whole, "sent": s.sent, "passed": s.passed})).collect::<Vec<_>>(),
        "traced": HOPS.iter().map(|(leaf, _)| {
            let p50 = |times: Option<&Vec<Duration>>| round(load::quantile_ms(times.into_iter().flatten().copied(), 0.5), 3);
            (leaf.to_string(), json!({
                "hop_overhead_p50_ms": p50(measured.traced.hops.get(leaf)),
                "server_p50_ms": p50(measured.traced.leaf_handling.get(leaf)),
                "traces": measured.traced.hops.get(leaf).map_or(0, Vec::len),
            }))
        }).chain([("orchestrator_own".to_string(), json!({
            "p50_ms": round(load::quantile_ms(measured.traced.orchestrator_own.iter().copied(), 0.5), 3),
            "traces": measured.traced.orchestrator_own.len(),
        }))]).collect::<serde_json::Map<_, _>>(),
        "spans_p50_ms": measured.traced.by_name.iter()
            .map(|(name, times)| (name.clone(), json!(round(load::quantile_ms(times.iter().copied(), 0.5), 3))))
            .collect::<serde_json::Map<_, _>>(),
    })
}

/// The latencies the chart draws.
fn latencies(measured: &Measured) -> serde_json::Value {
    json!({
        "floor": measured.floor["latencies_ms"],
        "closed_loop": measured.closed,
        "half_peak": measured.half_peak.latencies_ms,
        "peak_search": measured.steps.iter().map(|s| json!({"rate": s.rate, "p99_ms": s.p99_ms, "passed": s.passed})).collect::<Vec<_>>(),
        "peak_rps": measured.peak_rps,
    })
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let sets: Vec<DataSet> = [
        DataSet { name: "ml100k", bundle: args.small.clone(), seed: args.small_seed.clone() },
        DataSet { name: "1m", bundle: args.catalogue.clone(), seed: args.catalogue_seed.clone() },
    ]
    .into_iter()
    .filter(|data| args.sets.iter().any(|name| name == data.name))
    .collect();
    anyhow::ensure!(!sets.is_empty(), "--sets names no known data set (ml100k, 1m)");
    let mut results = Vec::new();
    for data in &sets {
        results.push((data.name, measure(&args, data).await?));
    }

    println!(
        "\nwhole path, release, DIN fine ranker, prediction cache off, {cores} cores, deadline {} ms",
        args.deadline_ms
    );
    println!(
        "{:<8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>11} {:>10} {:>8}",
        "data", "items", "p50 ms", "p99 ms", "floor ms", "p50/flr", "peak/s", "½peak p99", "hop p50", "cpu eff"
    );
    let mut summaries = HashMap::new();
    let mut all = serde_json::Map::new();
    for (name, measured) in &results {
        let s = summary(measured, cores);
        let details = details(measured);
        println!(
            "{:<8} {:>8} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>9.1} {:>11.2} {:>10.3} {:>8.3}",
            name,
            s["items"],
            s["p50_ms"].as_f64().unwrap_or_default(),
            s["p99_ms"].as_f64().unwrap_or_default(),
            s["floor_p50_ms"].as_f64().unwrap_or_default(),
            s["p50_over_floor"].as_f64().unwrap_or_default(),
            s["peak_rps"].as_f64().unwrap_or_default(),
            s["half_peak_p99_ms"].as_f64().unwrap_or_default(),
            s["hop_overhead_p50_ms"].as_f64().unwrap_or_default(),
            s["cpu_efficiency"].as_f64().unwrap_or_default(),
        );
        println!("         floor per stage p50 (ms): {}", measured.floor["stage_p50_ms"]);
        println!("         traced (hop overhead, leaf server p50): {}", details["traced"]);
        all.insert(name.to_string(), json!({"summary": s, "details": details}));
        summaries.insert(*name, s);
    }

    let details_out = args.out.with_file_name("bench-details.json");
    if let Some(reports) = details_out.parent() {
        std::fs::create_dir_all(reports)?;
    }
    std::fs::write(&details_out, serde_json::to_string_pretty(&all)?)?;
    let chart: serde_json::Map<_, _> =
        results.iter().map(|(name, measured)| (name.to_string(), latencies(measured))).collect();
    std::fs::write(args.work.join("latencies.json"), serde_json::to_string(&chart)?)?;
    println!("details written to {}", details_out.display());
    match summaries.get("1m") {
        Some(report) => recsys_chaos::write_report(&args.out, report)?,
        None => println!("no million-item figures: {} not written", args.out.display()),
    }
    Ok(())
}
