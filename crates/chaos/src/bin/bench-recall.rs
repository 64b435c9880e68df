//! `make bench-recall`: recall at catalogue scale. On a retrieval bundle of the synthetic
//! data (a million items by default) it measures, in one run:
//! - our HNSW search (the bundle's graph, called in-process, one query at a time on one thread)
//!   against hnswlib and faiss-cpu (`crates/chaos/scripts/ann_baselines.py`, run first,
//!   which also writes the queries and their exact top-100): each at the lowest ef whose
//!   recall@100 against exact search reaches the target, and the ratio of queries/s;
//! - recall-svc itself: time from process start to SERVING (bundle load, checksums
//!   included), recall RPC latency at low load (every channel, fusion, 1000 candidates,
//!   one request at a time over gRPC) and resident memory after the queries against the
//!   bytes of vectors and index on disk.
//!
//!
//! Writes `target/reports/bench-recall.json` (the keys of the issue, nothing else) and
//! prints a table with the details. (Whether the served models learn at this scale is
//! `make eval-scale`'s question.)

#![forbid(unsafe_code)]

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Parser;
use recall_svc::{nearest::NearestItems, ExcludedItems};
use recsys_bundle::{read_item_columns, read_manifest, resolve_dir, TensorFile, ANN_INDEX_FILE, EMBEDDINGS_FILE};
use recsys_chaos::{
    cluster::{free_port, wait_serving},
    round,
};
use recsys_proto::v1::{recall_service_client::RecallServiceClient, RecallRequest, UserFeatures};
use serde_json::{json, Value};
use tokio::process::Command;

#[derive(Debug, Parser)]
#[command(name = "bench-recall")]
struct Args {
    /// Retrieval bundle (a directory with a manifest, or a root holding `current`).
    #[arg(long)]
    bundle: PathBuf,
    /// Where ann_baselines.py wrote queries, truth, histories and baselines.json.
    #[arg(long, default_value = "target/bench-recall")]
    work: PathBuf,
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    #[arg(long, default_value = "target/reports/bench-recall.json")]
    out: PathBuf,
    #[arg(long, default_value_t = 0.99)]
    target_recall: f64,
    #[arg(long, default_value = "100,128,160,200,256,320,400,512,640,800,1024")]
    efs: String,
    /// Recall RPCs measured (one at a time, after a warm-up).
    #[arg(long, default_value_t = 2000)]
    rpc_requests: usize,
    #[arg(long, default_value_t = 1000)]
    candidates: u32,
}

const K: usize = 100;

struct SweepPoint {
    ef: usize,
    recall: f64,
    qps: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = resolve_dir(&args.bundle)?;
    let manifest = read_manifest(&dir)?;
    let baselines: Value = serde_json::from_str(&std::fs::read_to_string(args.work.join("baselines.json"))?)?;
    if baselines["version"] != json!(manifest.version) {
        bail!("{} holds baselines of bundle {}, not {}", args.work.display(), baselines["version"], manifest.version);
    }
    let dim = manifest.embedding_dim;
    let queries = read_f32(&args.work.join("queries.f32"))?;
    let truth = read_u32(&args.work.join("truth.u32"))?;
    let histories: Vec<Vec<String>> =
        serde_json::from_str(&std::fs::read_to_string(args.work.join("histories.json"))?)?;
    let count = queries.len() / dim;
    anyhow::ensure!(truth.len() == count * K && histories.len() == count, "queries, truth and histories disagree");

    // 1. Our index in-process, one query at a time on this thread.
    let vectors = TensorFile::open(&dir, EMBEDDINGS_FILE, &manifest)?.matrix("item_vectors", dim)?;
    let nearest = NearestItems::load(&dir, &manifest, &vectors, 64)?;
    anyhow::ensure!(nearest.is_approximate(), "bundle {} has no ANN index", manifest.version);
    println!("==> our index (hnswlib's graph walked from Rust with int8 vectors), one query at a time");
    let no_exclusions = ExcludedItems::default();
    let measure = |ef: usize| -> SweepPoint {
        nearest.set_expansion(ef);
        let search = |n: usize| nearest.search(&vectors, &queries[n * dim..(n + 1) * dim], &no_exclusions, K);
        (0..20.min(count)).for_each(|n| drop(search(n)));
        let started = Instant::now();
        let results: Vec<Vec<usize>> = (0..count).map(search).collect();
        let qps = count as f64 / started.elapsed().as_secs_f64();
        let recall = recall_at_k(&results, &truth);
        println!("    ef {ef:4}: recall@{K} {recall:.4}, {qps:8.1} queries/s");
        SweepPoint { ef, recall, qps }
    };
    // The lowest ef reaching the target: the grid until a point reaches it, then
    // bisection down to within 5% (the procedure ann_baselines.py applies to the others).
    let mut low = 0;
    let mut best: Option<SweepPoint> = None;
    let mut last = None;
    for ef in args.efs.split(',').map(str::parse::<usize>) {
        let point = measure(ef?);
        if point.recall >= args.target_recall {
            best = Some(point);
            break;
        }
        low = point.ef;
        last = Some(point);
    }
    while let Some(found) = best.as_ref().filter(|b| b.ef - low > (b.ef / 20).max(2)) {
        let point = measure((low + found.ef) / 2);
        if point.recall >= args.target_recall {
            best = Some(point);
        } else {
            low = point.ef;
        }
    }
    let mut ours = best.or(last).context("no ef measured")?;
    // Best of three passes at the chosen ef, as ann_baselines.py does for the others (the
    // machines are shared; one neighbour's burst should not decide the ratio).
    for _ in 0..2 {
        ours.qps = ours.qps.max(measure(ours.ef).qps);
    }
    // The same searches with the query's own history excluded inside the graph search
    // (what the channels do), for the table.
    let ids = read_item_columns(&dir)?.ids;
    let exclusions: Vec<ExcludedItems> =
        histories.iter().map(|history| history.iter().filter_map(|id| ids.position(id)).collect()).collect();
    drop(ids);
    nearest.set_expansion(ours.ef);
    let started = Instant::now();
    for (n, excluded) in exclusions.iter().enumerate() {
        let found = nearest.search(&vectors, &queries[n * dim..(n + 1) * dim], excluded, K);
        anyhow::ensure!(found.iter().all(|item| !excluded.contains(item)), "an excluded item came back");
    }
    let filtered_qps = count as f64 / started.elapsed().as_secs_f64();
    drop(nearest);

    // 2. recall-svc: load time, RPC latency, memory.
    let address = free_port().await?;
    let started = Instant::now();
    let mut child = Command::new(args.bin_dir.join("recall-svc"))
        .env("RECSYS_RECALL__SERVER__LISTEN", address.to_string())
        .env("RECSYS_RECALL__SERVER__ADMIN__LISTEN", "127.0.0.1:0")
        .env("RECSYS_RECALL__SERVER__METRICS_LISTEN", "")
        .env("RECSYS_RECALL__BUNDLE", &dir)
        .env("RECSYS_RECALL__ANN_EXPANSION", ours.ef.to_string())
        // recall-svc runs alone, on the bundle only: no feature-svc whose run-time
        // catalogue start-up would wait for (30 s, then serving anyway).
        .env("RECSYS_RECALL__CATALOG__FEATURE", "")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting recall-svc")?;
    wait_serving(address, Duration::from_secs(120)).await.context("recall-svc")?;
    let bundle_load_s = started.elapsed().as_secs_f64();
    let pid = child.id().context("recall-svc exited")?;
    let mut client = RecallServiceClient::connect(format!("http://{address}")).await?;
    // Users the bundle has no vector for (a retrieval bundle has none): their query
    // vector is pooled from the history at request time, as in serving.
    let request = |n: usize| RecallRequest {
        user: Some(UserFeatures {
            user_id: format!("bench-user-{n}"),
            known: true,
            history_item_ids: histories[n % histories.len()].clone(),
            ..Default::default()
        }),
        candidate_count: args.candidates,
        ..Default::default()
    };
    for n in 0..100 {
        client.recall(request(n)).await?;
    }
    let mut latencies = Vec::with_capacity(args.rpc_requests);
    let mut returned = 0usize;
    for n in 0..args.rpc_requests {
        let started = Instant::now();
        let response = client.recall(request(n)).await?.into_inner();
        latencies.push(started.elapsed());
        returned += response.candidates.map_or(0, |candidates| candidates.len());
    }
    latencies.sort();
    let quantile = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    let (p50, p99) = (quantile(0.5), quantile(0.99));
    let rss = resident_bytes(pid)?;
    child.kill().await.ok();
    let disk = (manifest.num_items * dim * 4) as u64 + std::fs::metadata(dir.join(ANN_INDEX_FILE))?.len();

    let faiss_qps = baselines["faiss"]["qps"].as_f64().context("faiss qps")?;
    let hnswlib_qps = baselines["hnswlib"]["qps"].as_f64().context("hnswlib qps")?;
    let faiss_query_ms = 1e3 / faiss_qps;
    let report = json!({
        "items": manifest.num_items,
        "recall_at_100": round(ours.recall, 4),
        "qps_ratio_vs_faiss": round(ours.qps / faiss_qps, 3),
        "qps_ratio_vs_hnswlib": round(ours.qps / hnswlib_qps, 3),
        "recall_rpc_p50_ms": round(p50, 3),
        "recall_rpc_p99_ms": round(p99, 3),
        "faiss_query_ms": round(faiss_query_ms, 4),
        "recall_rpc_p99_over_faiss_query": round(p99 / faiss_query_ms, 2),
        "rss_ratio": round(rss as f64 / disk as f64, 3),
        "bundle_load_s": round(bundle_load_s, 3),
    });

    println!();
    println!(
        "recall at {} items x {dim} ({} queries, k = {K}, target recall {})",
        manifest.num_items, count, args.target_recall
    );
    println!("  {:<28} {:>6} {:>10} {:>12} {:>14}", "index", "ef", "recall@100", "queries/s", "call overhead");
    println!(
        "  {:<28} {:>6} {:>10.4} {:>12.1} {:>14}",
        "ours (Rust, int8 walk)", ours.ef, ours.recall, ours.qps, "in-process"
    );
    println!(
        "  {:<28} {:>6} {:>10} {:>12.1} {:>14}",
        "ours, history excluded", ours.ef, "", filtered_qps, "in-process"
    );
    for name in ["hnswlib", "faiss"] {
        let b = &baselines[name];
        println!(
            "  {:<28} {:>6} {:>10.4} {:>12.1} {:>11.1} us",
            format!("{name} (Python)"),
            b["ef"],
            b["recall_at_100"].as_f64().unwrap_or(0.0),
            b["qps"].as_f64().unwrap_or(0.0),
            b["call_overhead_us"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "  recall RPC ({} candidates asked, {:.0} returned on average): p50 {p50:.3} ms, p99 {p99:.3} ms",
        args.candidates,
        returned as f64 / latencies.len() as f64
    );
    println!(
        "  recall-svc resident {:.0} MiB for {:.0} MiB of vectors + index on disk",
        rss as f64 / 1048576.0,
        disk as f64 / 1048576.0
    );
    println!("  bundle load (process start to SERVING): {bundle_load_s:.2} s");
    recsys_chaos::write_report(&args.out, &report)
}

fn recall_at_k(results: &[Vec<usize>], truth: &[u32]) -> f64 {
    let found: usize = results
        .iter()
        .enumerate()
        .map(|(n, result)| {
            let expected: HashSet<usize> = truth[n * K..(n + 1) * K].iter().map(|&p| p as usize).collect();
            result.iter().filter(|p| expected.contains(p)).count()
        })
        .sum();
    found as f64 / (results.len() * K) as f64
}

fn read_f32(path: &Path) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn read_u32(path: &Path) -> anyhow::Result<Vec<u32>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// VmRSS of a process, in bytes.
fn resident_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).context("no VmRSS")?;
    let kib: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
    Ok(kib * 1024)
}
