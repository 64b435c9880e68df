//! `make bench-rerank`: rerank-svc's own latency at catalogue scale, with the shipped rules
//! and a run-time catalogue. A release feature-svc holds `--records` catalogue records
//! (sellers, promotions, publish times, retirements) for the items of each bundle; a release
//! rerank-svc follows it and serves the shipped rules file. One client in a closed loop
//! sends the window the orchestrator sends by default (50 ranked items for a top 10) with
//! a context and 20 recent impressions, first on the ML-100k bundle, then on the
//! million-item one, each over gRPC on loopback.
//!
//! Writes `target/reports/bench-rerank.json` and prints a table. The budget compared with
//! is the orchestrator's rerank stage budget (`budgets.rerank_ms`), the part of the whole
//! path's deadline rerank is given.

#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use recsys_chaos::{
    cluster::{free_port, wait_serving},
    load::quantile_ms,
    round, Rng,
};
use recsys_proto::v1::{
    catalog_admin_client::CatalogAdminClient, catalog_service_client::CatalogServiceClient,
    rerank_service_client::RerankServiceClient, Availability, CatalogChangesRequest, CatalogItem, Impression,
    RerankCandidate, RerankRequest, UpsertItemsRequest,
};
use serde_json::json;
use tokio::process::{Child, Command};

#[derive(Debug, Parser)]
#[command(name = "bench-rerank")]
struct Args {
    /// The default (ML-100k) bundle root.
    #[arg(long, default_value = "models/bundles")]
    small: PathBuf,
    /// The million-item synthetic bundle root.
    #[arg(long)]
    catalogue: PathBuf,
    #[arg(long, default_value = "deploy/rerank/rules.toml")]
    rules: PathBuf,
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Run-time catalogue records per bundle.
    #[arg(long, default_value_t = 10_000)]
    records: usize,
    /// Measured requests per bundle (a tenth more are sent first as warm-up).
    #[arg(long, default_value_t = 5_000)]
    requests: usize,
    /// Items in each request's window (top_k × rerank_window_factor by default).
    #[arg(long, default_value_t = 50)]
    window: usize,
    #[arg(long, default_value = "target/bench-rerank")]
    work: PathBuf,
    #[arg(long, default_value = "target/reports/bench-rerank.json")]
    out: PathBuf,
}

async fn start(bin_dir: &Path, binary: &str, env: &[(&str, String)], log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log)?;
    let mut command = Command::new(bin_dir.join(binary));
    command.envs(env.iter().map(|(key, value)| (*key, value.as_str())));
    command.stdout(Stdio::null()).stderr(file).kill_on_drop(true);
    command.spawn().with_context(|| format!("starting {binary}"))
}

/// Catalogue records for `count` of `ids`: every one with a seller, one in a hundred
/// promoted, one in a hundred retired, one in ten published within the last month.
fn records(ids: &[String], count: usize, rng: &mut Rng) -> Vec<CatalogItem> {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    (0..count.min(ids.len()))
        .map(|n| {
            let id = &ids[rng.below(ids.len())];
            CatalogItem {
                item_id: id.clone(),
                availability: Availability::InStock as i32,
                promoted: n % 100 == 0,
                retired: n % 100 == 1,
                publish_time_ms: if n % 10 == 2 { now_ms - (n as i64 % 30) * 86_400_000 } else { 0 },
                attributes: HashMap::from([
                    ("seller".to_string(), format!("s{}", n % 500)),
                    ("regions".to_string(), "US|CA".to_string()),
                ]),
                ..CatalogItem::default()
            }
        })
        .collect()
}

/// The bearer token this benchmark's feature-svc accepts on its admin port.
const OPERATOR_TOKEN: &str = "bench-rerank";

async fn upsert(feature_admin: SocketAddr, items: Vec<CatalogItem>) -> anyhow::Result<u64> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{feature_admin}"))?.connect().await?;
    let mut client =
        CatalogAdminClient::with_interceptor(channel, recsys_runtime::admin_auth::BearerToken::new(OPERATOR_TOKEN)?);
    let mut revision = 0;
    for chunk in items.chunks(1_000) {
        revision = client.upsert_items(UpsertItemsRequest { items: chunk.to_vec() }).await?.into_inner().revision;
    }
    Ok(revision)
}

/// Closed-loop latencies of rerank requests over `ids`.
async fn measure(address: SocketAddr, ids: &[String], args: &Args, rng: &mut Rng) -> anyhow::Result<Vec<Duration>> {
    let mut client = RerankServiceClient::connect(format!("http://{address}")).await?;
    let context = HashMap::from([("region".to_string(), "US".to_string()), ("user_age".to_string(), "30".to_string())]);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let mut samples = Vec::with_capacity(args.requests);
    for round in 0..args.requests + args.requests / 10 {
        let candidates: Vec<RerankCandidate> = (0..args.window)
            .map(|n| RerankCandidate {
                item_id: ids[rng.below(ids.len())].clone(),
                score: 1.0 - n as f32 * 0.01,
                counts: None,
                cold_start: false,
            })
            .collect();
        let recent_impressions = (0..20)
            .map(|n| Impression {
                item_id: candidates[rng.below(candidates.len())].item_id.clone(),
                timestamp_ms: now_ms - n * 60_000,
            })
            .collect();
        let request = RerankRequest {
            candidates,
            top_k: 10,
            context: context.clone(),
            recent_impressions,
            ..RerankRequest::default()
        };
        let started = Instant::now();
        let response = client.rerank(request).await?.into_inner();
        let elapsed = started.elapsed();
        anyhow::ensure!(!response.items.is_empty(), "rerank answered an empty list");
        if round >= args.requests / 10 {
            samples.push(elapsed);
        }
    }
    Ok(samples)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work)?;
    let mut rng = Rng(0x7e7a_4b00);
    let bundles = [("ml100k", args.small.clone()), ("1m", args.catalogue.clone())];
    let mut item_ids = HashMap::new();
    for (name, root) in &bundles {
        let dir = recsys_bundle::resolve_dir(root)?;
        let ids: Vec<String> = recsys_bundle::read_catalog(&dir)?.into_iter().map(|item| item.id).collect();
        item_ids.insert(*name, ids);
    }

    let feature = free_port().await?;
    let feature_admin = free_port().await?;
    let state = tempfile::tempdir()?;
    let token_file = state.path().join("admin-tokens");
    std::fs::write(&token_file, format!("operator:{OPERATOR_TOKEN}\n"))?;
    let _feature = start(
        &args.bin_dir,
        "feature-svc",
        &[
            ("RECSYS_FEATURE__SERVER__LISTEN", feature.to_string()),
            ("RECSYS_FEATURE__SERVER__ADMIN__LISTEN", feature_admin.to_string()),
            ("RECSYS_FEATURE__SERVER__ADMIN__TOKEN_FILE", token_file.display().to_string()),
            ("RECSYS_FEATURE__SERVER__METRICS_LISTEN", String::new()),
            ("RECSYS_FEATURE__STORE__PATH", state.path().join("features.redb").display().to_string()),
            ("RECSYS_FEATURE__BUNDLE", args.small.display().to_string()),
        ],
        &args.work.join("feature-svc.log"),
    )
    .await?;
    wait_serving(feature, Duration::from_secs(120)).await.context("feature-svc")?;
    let mut revision = 0;
    for (name, _) in &bundles {
        revision = upsert(feature_admin, records(&item_ids[name], args.records, &mut rng)).await?;
    }
    // The records the store holds (an item drawn twice is one record).
    let mut stored = 0usize;
    let mut catalog = CatalogServiceClient::connect(format!("http://{feature}")).await?;
    let mut since = 0;
    loop {
        let page =
            catalog.catalog_changes(CatalogChangesRequest { since_revision: since, limit: 0 }).await?.into_inner();
        stored += page.items.len();
        since = page.revision;
        if !page.more {
            break;
        }
    }

    let mut rows = Vec::new();
    for (name, root) in &bundles {
        let address = free_port().await?;
        let started = Instant::now();
        let _rerank = start(
            &args.bin_dir,
            "rerank-svc",
            &[
                ("RECSYS_RERANK__SERVER__LISTEN", address.to_string()),
                ("RECSYS_RERANK__SERVER__ADMIN__LISTEN", "127.0.0.1:0".to_string()),
                ("RECSYS_RERANK__SERVER__METRICS_LISTEN", String::new()),
                ("RECSYS_RERANK__BUNDLE", root.display().to_string()),
                ("RECSYS_RERANK__RULES", args.rules.display().to_string()),
                ("RECSYS_RERANK__CATALOG__FEATURE", feature.to_string()),
            ],
            &args.work.join(format!("rerank-svc-{name}.log")),
        )
        .await?;
        wait_serving(address, Duration::from_secs(600)).await.context("rerank-svc")?;
        let startup_s = started.elapsed().as_secs_f64();
        // The follower polls every 250 ms and pages 1000 records at a time.
        tokio::time::sleep(Duration::from_millis(250 + 300 * (stored as u64 / 1_000 + 1))).await;
        let samples = measure(address, &item_ids[name], &args, &mut rng).await?;
        let p50 = quantile_ms(samples.iter().copied(), 0.5);
        let p99 = quantile_ms(samples.iter().copied(), 0.99);
        rows.push((*name, item_ids[name].len(), p50, p99, startup_s));
    }

    let budget_ms = orchestrator::StageBudgets::default().rerank_ms as f64;
    let (small, large) = (&rows[0], &rows[1]);
    println!("\nrerank-svc, shipped rules, {} catalogue records (revision {revision}), window {} → top 10, one client over gRPC", stored, args.window);
    println!("{:<10} {:>10} {:>9} {:>9} {:>11}", "bundle", "items", "p50 ms", "p99 ms", "start s");
    for (name, items, p50, p99, startup) in &rows {
        println!("{name:<10} {items:>10} {p50:>9.3} {p99:>9.3} {startup:>11.1}");
    }
    println!(
        "1M over ML-100k p99: {:.3}; 1M p99 over the orchestrator's rerank budget ({budget_ms} ms): {:.3}",
        large.3 / small.3,
        large.3 / budget_ms
    );
    let report = json!({
        "items": large.1,
        "catalogue_records": stored,
        "window": args.window,
        "rerank_p50_ms_1m": round(large.2, 3),
        "rerank_p99_ms_1m": round(large.3, 3),
        "rerank_p50_ms_ml100k": round(small.2, 3),
        "rerank_p99_ms_ml100k": round(small.3, 3),
        "p99_1m_over_ml100k": round(large.3 / small.3, 3),
        "rerank_budget_ms": budget_ms,
        "p99_1m_over_budget": round(large.3 / budget_ms, 3),
        "startup_s_1m": round(large.4, 2),
    });
    recsys_chaos::write_report(&args.out, &report)?;
    Ok(())
}
