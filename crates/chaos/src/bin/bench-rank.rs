//! `make bench-rank`: rank-svc against the raw model. In one run it measures, over gRPC
//! against the release rank-svc on loopback:
//! - rank RPC p50/p99 at low load (one request at a time) for 200 and 1000 candidates
//!   with DIN and DeepFM, every candidate fine-ranked, and for the served configuration
//!   (500 candidates, coarse keeps 50);
//! - the raw model time on the same inputs: rank-svc's own feature assembly writes each
//!   request's exact model inputs, and onnxruntime's Python session runs them with the
//!   served configuration (one intra-op thread, same batches) — `raw_rank.py`;
//! - the served configuration on the million-item synthetic bundle against ML-100k;
//! - peak throughput (closed loop) with and without cross-request micro-batching, each at
//!   its best session count, and the p99 at that peak;
//! - the teacher against its INT8 copy and the distilled student (speed here, AUC from
//!   the bundle's manifest, measured by the training pipeline through onnxruntime).
//!
//! Writes `target/reports/bench-rank.json` with the keys and prints a table.

#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Parser;
use rank_svc::{onnx_environment, FineVariant, ModelOptions, Ranker};
use recsys_bundle::{read_manifest, read_user_ids, resolve_dir, RankerInputs};
use recsys_chaos::{
    cluster::{free_port, wait_serving},
    load::quantile_ms,
    round, Rng,
};
use recsys_proto::v1::{
    rank_service_client::RankServiceClient, CandidateColumns, Channel, ChannelColumn, RankRequest, UserFeatures,
};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tonic::transport::Channel as GrpcChannel;

#[derive(Debug, Parser)]
#[command(name = "bench-rank")]
struct Args {
    /// The default (ML-100k, DIN) bundle root.
    #[arg(long, default_value = "models/bundles")]
    din: PathBuf,
    /// The same data trained with DeepFM as the fine model.
    #[arg(long)]
    deepfm: PathBuf,
    /// The million-item synthetic bundle root.
    #[arg(long)]
    catalogue: PathBuf,
    /// Python with onnxruntime (the training environment).
    #[arg(long)]
    python: PathBuf,
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    #[arg(long, default_value = "target/bench-rank")]
    work: PathBuf,
    #[arg(long, default_value = "target/reports/bench-rank.json")]
    out: PathBuf,
    /// Requests timed per low-load case (after a warm-up), on both sides.
    #[arg(long, default_value_t = 400)]
    requests: usize,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 5)]
    load_s: u64,
    /// Concurrent closed-loop clients for the throughput measurements.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Diagnosis: measure only the low-load cases whose names contain this (no report).
    #[arg(long)]
    only: Option<String>,
}

/// Distinct requests per case, cycled through by both sides.
const DISTINCT_REQUESTS: usize = 32;
/// A fixed request moment (2026-01-01 UTC), so both sides build the same time features.
const REQUEST_TIME: i64 = 1_767_225_600;
/// The served configuration: the orchestrator's default candidate count and coarse cut.
const SERVED_CANDIDATES: usize = 500;
const SERVED_KEEP: usize = 50;

/// One low-load measurement: a bundle, a fine model variant, a request shape.
struct Case {
    name: String,
    bundle: PathBuf,
    variant: FineVariant,
    candidates: usize,
    coarse_keep: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Latency {
    p50: f64,
    p99: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work)?;
    let din = resolve_dir(&args.din)?;
    let deepfm = resolve_dir(&args.deepfm)?;
    let catalogue = resolve_dir(&args.catalogue)?;
    let case = |name: &str, bundle: &Path, variant, candidates, coarse_keep| Case {
        name: name.to_string(),
        bundle: bundle.to_path_buf(),
        variant,
        candidates,
        coarse_keep,
    };
    let cases = vec![
        case("served_din", &din, FineVariant::Teacher, SERVED_CANDIDATES, SERVED_KEEP),
        case("fine_200_din", &din, FineVariant::Teacher, 200, 200),
        case("fine_200_deepfm", &deepfm, FineVariant::Teacher, 200, 200),
        case("fine_1000_din", &din, FineVariant::Teacher, 1000, 1000),
        case("fine_1000_deepfm", &deepfm, FineVariant::Teacher, 1000, 1000),
        case("fine_200_din_int8", &din, FineVariant::Int8, 200, 200),
        case("fine_200_din_student", &din, FineVariant::Student, 200, 200),
        case("served_din_1m", &catalogue, FineVariant::Teacher, SERVED_CANDIDATES, SERVED_KEEP),
    ];
    let diagnosis = args.only.is_some();
    let cases: Vec<Case> =
        cases.into_iter().filter(|case| args.only.as_ref().is_none_or(|only| case.name.contains(only))).collect();

    // 1. Every case's requests, and the exact model inputs rank-svc builds for them.
    let environment = onnx_environment(None)?;
    let mut requests = Vec::new();
    let mut raw_cases = Vec::new();
    let mut in_process = Vec::new();
    for case in &cases {
        let options =
            ModelOptions { sessions: 1, intra_op_threads: 1, fine_variant: case.variant, ..ModelOptions::default() };
        let ranker = Ranker::load(&case.bundle, &environment, &options).with_context(|| case.name.clone())?;
        let users = read_user_ids(&case.bundle)?;
        let built = build_requests(&ranker, &case.bundle, &users, case.candidates, case.coarse_keep)?;
        raw_cases.push(write_model_inputs(&args.work, case, &ranker, &built)?);
        in_process.push(rank_in_process(&ranker, &built, args.requests)?);
        requests.push(built);
    }
    let raw_spec = args.work.join("raw-cases.json");
    std::fs::write(&raw_spec, serde_json::to_string_pretty(&raw_cases)?)?;

    // 2. The raw model time, through onnxruntime's Python session, on the same inputs.
    let raw_out = args.work.join("raw-times.json");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/raw_rank.py");
    let status = std::process::Command::new(&args.python)
        .arg(&script)
        .arg("--cases")
        .arg(&raw_spec)
        .arg("--requests")
        .arg(args.requests.to_string())
        .arg("--out")
        .arg(&raw_out)
        .status()
        .context("running raw_rank.py")?;
    if !status.success() {
        bail!("raw_rank.py failed: {status}");
    }
    let raw: Value = serde_json::from_str(&std::fs::read_to_string(&raw_out)?)?;
    let raw_latency = |name: &str| Latency {
        p50: raw[name]["p50_ms"].as_f64().unwrap_or(f64::NAN),
        p99: raw[name]["p99_ms"].as_f64().unwrap_or(f64::NAN),
    };

    // 3. The rank RPC at low load, one service per case (one session, one thread, as raw).
    let mut rpc = Vec::new();
    for (case, built) in cases.iter().zip(&requests) {
        let service = RankService::start(&args.bin_dir, &case.bundle, case.variant, 1, false).await?;
        let latency = low_load(&service.client().await?, built, args.requests).await?;
        service.stop().await;
        println!(
            "  {:<22} rpc p50 {:.3} ms p99 {:.3} ms (in-process rank p50 {:.3} ms)",
            case.name,
            latency.p50,
            latency.p99,
            in_process[rpc.len()].p50
        );
        rpc.push(latency);
    }
    if diagnosis {
        return Ok(());
    }
    let by_name = |name: &str| cases.iter().position(|case| case.name == name).expect("a defined case");
    let rpc_of = |name: &str| rpc[by_name(name)];

    // 4. Peak throughput of the served configuration, unbatched and micro-batched, each at
    // its best session count.
    let served = &requests[by_name("served_din")];
    let mut throughput = Vec::new();
    for batching in [false, true] {
        for sessions in [1, 2, 4] {
            let service = RankService::start(&args.bin_dir, &din, FineVariant::Teacher, sessions, batching).await?;
            let client = service.client().await?;
            let _ = low_load(&client, served, 50).await?;
            let (qps, p99) = peak(&client, served, args.clients, Duration::from_secs(args.load_s)).await;
            service.stop().await;
            println!("  throughput batching {batching:<5} sessions {sessions}: {qps:.0} req/s, p99 {p99:.2} ms");
            throughput.push((batching, sessions, qps, p99));
        }
    }
    let best = |batching: bool| {
        throughput.iter().filter(|t| t.0 == batching).max_by(|a, b| a.2.total_cmp(&b.2)).copied().expect("measured")
    };
    let (unbatched, batched) = (best(false), best(true));

    // 5. A new bundle version swapped in under the same load (the `current` link flips).
    let swap = swap_under_load(&args, &din, served).await?;
    println!(
        "  bundle swap under load: {} requests, {} failed, served {:?} (new version serving {:.0} ms after the flip)",
        swap.requests, swap.failed, swap.versions, swap.switch_ms
    );

    let metrics = read_manifest(&din)?.metrics;
    let metric = |name: &str| metrics.get(name).and_then(Value::as_f64);
    let report = json!({
        "rank_over_raw_p50_ratio": round(rpc_of("served_din").p50 / raw_latency("served_din").p50, 3),
        "fine_200_deepfm_p99_ms": round(rpc_of("fine_200_deepfm").p99, 3),
        "fine_200_din_p99_ms": round(rpc_of("fine_200_din").p99, 3),
        "fine_200_deepfm_p99_over_raw": round(rpc_of("fine_200_deepfm").p99 / raw_latency("fine_200_deepfm").p99, 3),
        "fine_200_din_p99_over_raw": round(rpc_of("fine_200_din").p99 / raw_latency("fine_200_din").p99, 3),
        "catalogue_1m_over_100k_ratio": round(rpc_of("served_din_1m").p50 / rpc_of("served_din").p50, 3),
        "batching_throughput_gain": round(batched.2 / unbatched.2, 3),
        "batching_p99_ratio": round(batched.3 / unbatched.3, 3),
        "int8_speedup": round(rpc_of("fine_200_din").p50 / rpc_of("fine_200_din_int8").p50, 3),
        "int8_auc_delta": metric("int8_auc_delta"),
        "student_speedup": round(rpc_of("fine_200_din").p50 / rpc_of("fine_200_din_student").p50, 3),
        "student_auc_delta": metric("student_auc_delta"),
        "swap_failed_requests": swap.failed,
    });

    println!();
    println!("rank-svc (release, loopback gRPC, 1 session x 1 intra-op thread) against onnxruntime's Python session");
    println!(
        "  {:<22} {:>6} {:>5} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "case", "cands", "fine", "rpc p50", "rpc p99", "raw p50", "raw p99", "p50 x", "p99 x"
    );
    for ((case, latency), _) in cases.iter().zip(&rpc).zip(&requests) {
        let raw = raw_latency(&case.name);
        println!(
            "  {:<22} {:>6} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8.2} {:>8.2}",
            case.name,
            case.candidates,
            case.coarse_keep.min(case.candidates),
            latency.p50,
            latency.p99,
            raw.p50,
            raw.p99,
            latency.p50 / raw.p50,
            latency.p99 / raw.p99
        );
    }
    println!(
        "  peak throughput, served configuration, {} clients: unbatched {:.0} req/s (p99 {:.2} ms, {} sessions), \
         micro-batched {:.0} req/s (p99 {:.2} ms, {} sessions)",
        args.clients, unbatched.2, unbatched.3, unbatched.1, batched.2, batched.3, batched.1
    );
    println!(
        "  fine model AUC (manifest): teacher {:?}, int8 {:?}, student {:?} ({:?} of {:?} parameters)",
        metric("teacher_onnx_auc"),
        metric("int8_auc"),
        metric("student_auc"),
        metric("student_parameters"),
        metric("teacher_parameters")
    );
    recsys_chaos::write_report(&args.out, &report)
}

/// Known users with a full behaviour sequence and `candidates` distinct catalogue items,
/// as the orchestrator sends them: pinned to the bundle version, each candidate with the
/// item-to-item and embedding scores recall computed (taken from rank-svc's own cross
/// features, which are the same definitions).
fn build_requests(
    ranker: &Ranker,
    bundle: &Path,
    users: &[String],
    candidates: usize,
    coarse_keep: usize,
) -> anyhow::Result<Vec<RankRequest>> {
    let mut rng = Rng(candidates as u64 * 7919 + coarse_keep as u64);
    let items = ranker.item_count();
    let cross = read_manifest(bundle)?.feature_config.cross;
    let column = |name: &str| cross.iter().position(|source| source == name);
    let recalled = [(Channel::ItemCf, column("item_cf_score")), (Channel::Embedding, column("embedding_score"))];
    let mut requests: Vec<RankRequest> = (0..DISTINCT_REQUESTS)
        .map(|_| {
            let mut chosen = std::collections::HashSet::new();
            while chosen.len() < candidates.min(items) {
                chosen.insert(rng.below(items));
            }
            let history: Vec<String> = (0..50).map(|_| ranker.item_id(rng.below(items)).to_string()).collect();
            RankRequest {
                user: Some(UserFeatures {
                    // Catalogue-scale bundles learn no per-user ids: any id is a new user there.
                    user_id: if users.is_empty() {
                        format!("user-{}", rng.below(1 << 20))
                    } else {
                        users[rng.below(users.len())].clone()
                    },
                    known: true,
                    event_count: history.len() as u64,
                    history_timestamps: (0..history.len() as i64).map(|n| REQUEST_TIME - 3_600 * (n + 1)).collect(),
                    history_item_ids: history,
                    ..UserFeatures::default()
                }),
                candidates: Some(CandidateColumns {
                    item_ids: chosen.iter().map(|&item| ranker.item_id(item).to_string()).collect(),
                    positions: chosen.iter().map(|&item| item as u32 + 1).collect(),
                    ..CandidateColumns::default()
                }),
                coarse_keep: coarse_keep as u32,
                fine_keep: 0,
                request_time: Some(REQUEST_TIME),
                bundle_version: ranker.version().to_string(),
            }
        })
        .collect();
    for request in &mut requests {
        let user = request.user.clone().unwrap_or_default();
        let Some(candidates) = request.candidates.as_mut() else { continue };
        let positions = ranker.resolve_items(candidates.item_ids.iter().map(String::as_str));
        let features = ranker.fine_inputs(&user, &positions, REQUEST_TIME).cross_features;
        let rows: Vec<&[f32]> = features.chunks_exact(cross.len().max(1)).collect();
        candidates.channels = recalled
            .iter()
            .filter_map(|&(channel, column)| {
                let column = column?;
                let scores = rows.iter().map(|row| row[column]).collect();
                Some(ChannelColumn { channel: channel as i32, scores, ranks: Vec::new() })
            })
            .collect();
    }
    Ok(requests)
}

/// The request's candidate ids.
fn item_ids(request: &RankRequest) -> impl Iterator<Item = &str> {
    request.candidates.iter().flat_map(|candidates| candidates.item_ids.iter().map(String::as_str))
}

/// `Ranker::rank` called directly (no gRPC, no thread hand-off), for the table: what of
/// the RPC time is ranking and what is transport and scheduling.
fn rank_in_process(ranker: &Ranker, requests: &[RankRequest], count: usize) -> anyhow::Result<Latency> {
    let resolved: Vec<(UserFeatures, Vec<usize>)> = requests
        .iter()
        .map(|request| {
            let items = ranker.resolve_items(item_ids(request));
            (request.user.clone().unwrap_or_default(), items)
        })
        .collect();
    let mut latencies = Vec::with_capacity(count);
    for n in 0..count + resolved.len() {
        let (user, items) = &resolved[n % resolved.len()];
        let started = Instant::now();
        ranker.rank(user, items, requests[0].coarse_keep as usize, REQUEST_TIME)?;
        if n >= resolved.len() {
            latencies.push(started.elapsed());
        }
    }
    Ok(Latency { p50: quantile_ms(latencies.iter().copied(), 0.5), p99: quantile_ms(latencies.into_iter(), 0.99) })
}

/// Writes, for each request, the coarse model's input (every candidate's cross features)
/// and the fine model's inputs (the coarse survivors) exactly as rank-svc builds them;
/// returns the case's entry for raw_rank.py.
fn write_model_inputs(work: &Path, case: &Case, ranker: &Ranker, requests: &[RankRequest]) -> anyhow::Result<Value> {
    let data_path = work.join(format!("{}.bin", case.name));
    let mut data: Vec<u8> = Vec::new();
    let mut entries = Vec::new();
    let tensor = |data: &mut Vec<u8>, bytes: &[u8], dtype: &str, rows: usize, len: usize| {
        let offset = data.len();
        data.extend_from_slice(bytes);
        let shape = if len == rows { json!([rows]) } else { json!([rows, len / rows.max(1)]) };
        json!({"dtype": dtype, "offset": offset, "shape": shape})
    };
    for request in requests {
        let user = request.user.clone().unwrap_or_default();
        let items = ranker.resolve_items(item_ids(request));
        let all = ranker.fine_inputs(&user, &items, REQUEST_TIME);
        let candidates = rank_svc::Candidates { items: items.clone(), ..rank_svc::Candidates::default() };
        let rank_svc::CoarseOutcome::Fine(stage) =
            ranker.coarse_stage(&user, &candidates, case.coarse_keep, REQUEST_TIME)?
        else {
            bail!("the coarse stage decided without the fine model: the benchmark's users have behaviour");
        };
        let coarse = tensor(&mut data, &f32_bytes(&all.cross_features), "float32", all.len(), all.cross_features.len());
        let fine = fine_tensors(&stage.inputs, &mut |bytes, dtype, len| {
            tensor(&mut data, bytes, dtype, stage.inputs.len(), len)
        });
        entries.push(json!({"coarse": {"cross_features": coarse}, "fine": fine}));
    }
    std::fs::write(&data_path, &data)?;
    Ok(json!({
        "name": case.name,
        "data": data_path,
        "coarse_model": case.bundle.join("coarse.onnx"),
        "fine_model": case.bundle.join(case.variant.file()),
        "requests": entries,
    }))
}

fn fine_tensors(inputs: &RankerInputs, tensor: &mut dyn FnMut(&[u8], &str, usize) -> Value) -> Value {
    let i64s = |values: &[i64]| values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    json!({
        "user_index": tensor(&i64s(&inputs.user_index), "int64", inputs.user_index.len()),
        "item_index": tensor(&i64s(&inputs.item_index), "int64", inputs.item_index.len()),
        "history": tensor(&i64s(&inputs.history), "int64", inputs.history.len()),
        "user_features": tensor(&f32_bytes(&inputs.user_features), "float32", inputs.user_features.len()),
        "item_features": tensor(&f32_bytes(&inputs.item_features), "float32", inputs.item_features.len()),
        "cross_features": tensor(&f32_bytes(&inputs.cross_features), "float32", inputs.cross_features.len()),
    })
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A release rank-svc child process on a free loopback port.
struct RankService {
    child: Child,
    address: SocketAddr,
}

impl RankService {
    async fn start(
        bin_dir: &Path,
        bundle: &Path,
        variant: FineVariant,
        sessions: usize,
        batching: bool,
    ) -> anyhow::Result<Self> {
        let variant = serde_json::to_value(variant)?.as_str().unwrap_or("teacher").to_string();
        let sessions = sessions.to_string();
        let batching = batching.to_string();
        let env = [
            ("RECSYS_RANK__MODELS__SESSIONS", sessions.as_str()),
            ("RECSYS_RANK__MODELS__FINE_VARIANT", variant.as_str()),
            ("RECSYS_RANK__BATCHING__ENABLED", batching.as_str()),
        ];
        Self::start_with(bin_dir, bundle, &env).await
    }

    /// rank-svc on `bundle` with one intra-op thread, and `env` on top.
    async fn start_with(bin_dir: &Path, bundle: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let address = free_port().await?;
        let child = Command::new(bin_dir.join("rank-svc"))
            .env("RECSYS_RANK__SERVER__LISTEN", address.to_string())
            .env("RECSYS_RANK__SERVER__ADMIN__LISTEN", "127.0.0.1:0")
            .env("RECSYS_RANK__SERVER__METRICS_LISTEN", "")
            .env("RECSYS_RANK__BUNDLE", bundle)
            .env("RECSYS_RANK__MODELS__INTRA_OP_THREADS", "1")
            // rank-svc alone: a bundle with live item features gets zeros for them (and
            // counts it) instead of reading whatever feature-svc runs at the default address.
            .env("RECSYS_RANK__FEATURE", "")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting rank-svc")?;
        wait_serving(address, Duration::from_secs(180)).await.context("rank-svc")?;
        Ok(Self { child, address })
    }

    async fn client(&self) -> anyhow::Result<RankServiceClient<GrpcChannel>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))?.connect().await?;
        Ok(RankServiceClient::new(channel).max_decoding_message_size(64 << 20))
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

struct Swap {
    requests: usize,
    failed: usize,
    versions: Vec<String>,
    switch_ms: f64,
}

/// Two versions of `bundle` under a scratch root (the second a copy under a new name),
/// rank-svc following its `current` link, closed-loop load, and the link flipped halfway.
async fn swap_under_load(args: &Args, bundle: &Path, requests: &[RankRequest]) -> anyhow::Result<Swap> {
    let root = args.work.join("swap-root");
    let _ = std::fs::remove_dir_all(&root);
    let first = read_manifest(bundle)?.version;
    let second = format!("{first}-swapped");
    for version in [&first, &second] {
        std::fs::create_dir_all(root.join(version))?;
        for entry in std::fs::read_dir(bundle)? {
            let entry = entry?;
            std::fs::copy(entry.path(), root.join(version).join(entry.file_name()))?;
        }
    }
    let manifest_path = root.join(&second).join("manifest.json");
    let mut manifest: Value = serde_json::from_str(&std::fs::read_to_string(&manifest_path)?)?;
    manifest["version"] = Value::String(second.clone());
    std::fs::write(&manifest_path, serde_json::to_string(&manifest)?)?;
    let point_current = |version: &str| -> std::io::Result<()> {
        let staged = root.join(".current-next");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(version, &staged)?;
        std::fs::rename(&staged, root.join("current"))
    };
    point_current(&first)?;
    let service = RankService::start_with(&args.bin_dir, &root, &[("RECSYS_RANK__FOLLOW_CURRENT_MS", "100")]).await?;
    let client = service.client().await?;
    // Unpinned, so that each request takes whatever version is current when it arrives.
    let requests: Vec<RankRequest> =
        requests.iter().map(|request| RankRequest { bundle_version: String::new(), ..request.clone() }).collect();
    let requests = Arc::new(requests);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.clients)
        .map(|worker| {
            let (mut client, requests, stop) = (client.clone(), Arc::clone(&requests), Arc::clone(&stop));
            tokio::spawn(async move {
                let (mut answered, mut failed, mut versions) = (0usize, 0usize, Vec::<(Duration, String)>::new());
                let mut n = worker;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    match client.rank(requests[n % requests.len()].clone()).await {
                        Ok(response) => {
                            answered += 1;
                            let version = response.into_inner().model_version;
                            if versions.last().map(|(_, v)| v) != Some(&version) {
                                versions.push((started.elapsed(), version));
                            }
                        }
                        Err(_) => failed += 1,
                    }
                }
                (answered, failed, versions)
            })
        })
        .collect();
    let half = Duration::from_secs(args.load_s.max(2));
    tokio::time::sleep(half).await;
    let flipped = started.elapsed();
    point_current(&second)?;
    tokio::time::sleep(half).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut swap = Swap { requests: 0, failed: 0, versions: Vec::new(), switch_ms: f64::NAN };
    let mut first_new: Option<Duration> = None;
    for worker in workers {
        let (answered, failed, versions) = worker.await?;
        swap.requests += answered + failed;
        swap.failed += failed;
        for (at, version) in versions {
            if version == second {
                first_new = Some(first_new.map_or(at, |earliest| earliest.min(at)));
            }
            if !swap.versions.contains(&version) {
                swap.versions.push(version);
            }
        }
    }
    service.stop().await;
    swap.switch_ms = first_new.map_or(f64::NAN, |at| at.saturating_sub(flipped).as_secs_f64() * 1000.0);
    if !swap.versions.contains(&second) {
        bail!("rank-svc never served the swapped-in version {second}");
    }
    Ok(swap)
}

/// One request at a time: `count` timed after a warm-up of one pass over the requests.
async fn low_load(
    client: &RankServiceClient<GrpcChannel>,
    requests: &[RankRequest],
    count: usize,
) -> anyhow::Result<Latency> {
    let mut client = client.clone();
    for request in requests {
        client.rank(request.clone()).await?;
    }
    let mut latencies = Vec::with_capacity(count);
    for n in 0..count {
        let request = requests[n % requests.len()].clone();
        let started = Instant::now();
        let response = client.rank(request).await?.into_inner();
        latencies.push(started.elapsed());
        if response.items.is_empty() {
            bail!("rank-svc ranked nothing");
        }
    }
    Ok(Latency { p50: quantile_ms(latencies.iter().copied(), 0.5), p99: quantile_ms(latencies.into_iter(), 0.99) })
}

/// Closed loop: `clients` concurrent callers for `duration`; (requests/s, p99 ms).
async fn peak(
    client: &RankServiceClient<GrpcChannel>,
    requests: &[RankRequest],
    clients: usize,
    duration: Duration,
) -> (f64, f64) {
    let requests = Arc::new(requests.to_vec());
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|worker| {
            let mut client = client.clone();
            let requests = Arc::clone(&requests);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = worker;
                while started.elapsed() < duration {
                    let request = requests[n % requests.len()].clone();
                    n += clients;
                    let sent = Instant::now();
                    if client.rank(request).await.is_ok() {
                        latencies.push(sent.elapsed());
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap_or_default());
    }
    let elapsed = started.elapsed().as_secs_f64();
    (latencies.len() as f64 / elapsed, quantile_ms(latencies.into_iter(), 0.99))
}
