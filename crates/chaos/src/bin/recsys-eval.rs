//! `recsys-eval`: asks a real cluster (started from the built binaries, on the given
//! bundle and seed data) for the top-k of every listed user, over gRPC, and writes one
//! JSON line per user. The training pipeline's `eval` command scores the lines against
//! the held-out interactions (`make eval`).
//!
//! With `--ablation`, each line also holds the top-k after every step of the pipeline,
//! asked of the same running services: each recall channel alone (recall with only that
//! channel's fusion weight), the fused recall, + coarse (rank-svc's coarse order), + fine
//! (rank-svc's fine order); the orchestrator's answer is the last step, + rerank.
//!
//! Every request carries the user's latest event time as `request_time` context: the
//! replay asks as if right after the user's last known activity.

#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    io::Write,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use recsys_chaos::cluster::{Cluster, ClusterPaths, Leaf};
use recsys_proto::{
    v1::{
        feature_service_client::FeatureServiceClient, rank_service_client::RankServiceClient,
        recall_service_client::RecallServiceClient, recommender_client::RecommenderClient, ChannelWeight,
        GetUserFeaturesRequest, RankRequest, RecallRequest, RecommendRequest, RecommendResponse, UserFeatures,
    },
    REQUEST_TIME_CONTEXT_KEY,
};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

/// Evaluation measures quality, not latency: a generous deadline.
const DEADLINE: Duration = Duration::from_secs(10);

/// Top-k of every listed user from the served pipeline.
#[derive(Debug, Parser)]
#[command(name = "recsys-eval")]
struct Args {
    #[command(flatten)]
    paths: ClusterPaths,
    /// One user id per line.
    #[arg(long)]
    users: PathBuf,
    #[arg(long, default_value_t = 10)]
    top_k: u32,
    #[arg(long)]
    out: PathBuf,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Also record the top-k after every pipeline step.
    #[arg(long)]
    ablation: bool,
    /// Give every orchestrator stage this many milliseconds instead of the production
    /// budgets (a debug build of a million-item cluster is slower than the budgets assume;
    /// the evaluation measures quality, not latency).
    #[arg(long)]
    stage_budget_ms: Option<u64>,
}

#[derive(Clone)]
struct Clients {
    orchestrator: Channel,
    feature: Channel,
    recall: Channel,
    rank: Channel,
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(DEADLINE);
    request
}

async fn connect(address: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{address}"))?.connect().await?)
}

async fn user_features(clients: &Clients, user_id: &str) -> anyhow::Result<UserFeatures> {
    Ok(FeatureServiceClient::new(clients.feature.clone())
        .get_user_features(request(GetUserFeaturesRequest {
            user_id: user_id.into(),
            max_history: orchestrator::MAX_HISTORY,
            as_of_ms: 0,
        }))
        .await?
        .into_inner())
}

/// An offline replay asks each user's request right after their latest known event (the
/// time the rankers were trained to expect), not at today's date.
fn replay_time(user: &UserFeatures) -> i64 {
    user.history_timestamps.iter().max().copied().unwrap_or_default()
}

fn replay_context(user: &UserFeatures) -> HashMap<String, String> {
    HashMap::from([(REQUEST_TIME_CONTEXT_KEY.to_string(), replay_time(user).to_string())])
}

/// Attempts per user: a stage that misses its budget under a momentary CPU spike (two
/// shared cores run the client and five services) degrades one answer; the evaluation
/// measures quality, so such an answer is asked again rather than scored.
const ATTEMPTS: usize = 3;

/// The pause before asking a degraded answer again. A burst of misses opens the stage's
/// circuit breaker, and every answer asked while it is open is degraded too: asked again at
/// once, a whole run of consecutive users stayed degraded on all three attempts (a `make
/// eval` failed so). The pause outlasts the breaker's longest open period (2 s by default).
const RETRY_PAUSE: Duration = Duration::from_millis(2_500);

/// The served answer, how many degraded answers were asked again, and how long the
/// answer kept took (`make eval`'s serving cost compares two runs' means).
async fn recommend(
    clients: &Clients,
    user: &str,
    top_k: u32,
    context: HashMap<String, String>,
) -> anyhow::Result<(RecommendResponse, usize, Duration)> {
    let mut client = RecommenderClient::new(clients.orchestrator.clone());
    let mut retried = 0;
    loop {
        let started = Instant::now();
        let response = client
            .recommend(request(RecommendRequest {
                user_id: user.to_string(),
                top_k,
                context: context.clone(),
                ..RecommendRequest::default()
            }))
            .await
            .map_err(|status| anyhow::anyhow!("user {user}: {status}"))?
            .into_inner();
        if response.degraded_stages.is_empty() || retried + 1 >= ATTEMPTS {
            return Ok((response, retried, started.elapsed()));
        }
        retried += 1;
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// The top-k after each step before rerank, from the stages themselves.
async fn ablation(clients: &Clients, user: UserFeatures, top_k: usize) -> anyhow::Result<HashMap<String, Vec<String>>> {
    let mut recall = RecallServiceClient::new(clients.recall.clone());
    let mut steps = HashMap::new();
    // Recall's own channel list, in its order (the report lists them so).
    for channel in recall_svc::Channel::ALL {
        let weights = recall_svc::Channel::ALL
            .iter()
            .map(|&c| ChannelWeight { channel: c as i32, weight: if c == channel { 1.0 } else { 0.0 } })
            .collect();
        let response = recall
            .recall(request(RecallRequest {
                user: Some(user.clone()),
                candidate_count: top_k as u32,
                channel_weights: weights,
                ..RecallRequest::default()
            }))
            .await?
            .into_inner();
        // Items other channels proposed score 0 and sort last: keep the channel's own.
        let candidates = response.candidates.unwrap_or_default();
        let own = match candidates.channel(channel) {
            Some(column) => candidates
                .item_ids
                .iter()
                .enumerate()
                .filter(|&(index, _)| column.rank(index) > 0)
                .map(|(_, item_id)| item_id.clone())
                .collect(),
            None => Vec::new(),
        };
        steps.insert(format!("recall:{}", channel.name()), own);
    }
    let fused = recall
        .recall(request(RecallRequest { user: Some(user.clone()), ..RecallRequest::default() }))
        .await?
        .into_inner()
        .candidates;
    let fused_ids = fused.as_ref().map(|candidates| candidates.item_ids.iter().take(top_k).cloned().collect());
    steps.insert("recall:fused".into(), fused_ids.unwrap_or_default());
    let ranked = RankServiceClient::new(clients.rank.clone())
        .rank(request(RankRequest {
            request_time: Some(replay_time(&user)),
            user: Some(user),
            candidates: fused,
            ..RankRequest::default()
        }))
        .await?
        .into_inner()
        .items;
    steps.insert("+fine".into(), ranked.iter().take(top_k).map(|i| i.item_id.clone()).collect());
    let mut by_coarse = ranked;
    by_coarse.sort_by(|a, b| b.coarse_score.total_cmp(&a.coarse_score));
    steps.insert("+coarse".into(), by_coarse.into_iter().take(top_k).map(|i| i.item_id).collect());
    Ok(steps)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let users: Vec<String> = std::fs::read_to_string(&args.users)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    let state = tempfile::tempdir()?;
    let mut settings = args.paths.settings(state.path(), "target/eval-logs")?;
    if let Some(budget) = args.stage_budget_ms {
        for stage in ["FEATURE", "RECALL", "RANK", "RERANK"] {
            settings.orchestrator_env.push((format!("RECSYS_ORCHESTRATOR__BUDGETS__{stage}_MS"), budget.to_string()));
        }
    }
    let cluster = Cluster::start(settings).await?;
    let clients = Clients {
        orchestrator: connect(cluster.orchestrator).await?,
        feature: connect(cluster.address(Leaf::Feature)).await?,
        recall: connect(cluster.address(Leaf::Recall)).await?,
        rank: connect(cluster.address(Leaf::Rank)).await?,
    };
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(users.len());
    for user in users {
        let clients = clients.clone();
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let (top_k, with_ablation) = (args.top_k, args.ablation);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let features = match user_features(&clients, &user).await {
                Ok(features) => features,
                Err(error) => return (user.clone(), Err(anyhow::anyhow!("user {user}: {error}")), None),
            };
            let served = recommend(&clients, &user, top_k, replay_context(&features)).await;
            let steps = if with_ablation { Some(ablation(&clients, features, top_k as usize).await) } else { None };
            (user, served, steps)
        }));
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args.out)?);
    let (mut served, mut degraded, mut retried) = (0usize, 0usize, 0usize);
    for task in tasks {
        let (user, response, steps) = task.await?;
        let (response, user_retries, latency) = response?;
        served += 1;
        retried += user_retries;
        degraded += usize::from(!response.degraded_stages.is_empty());
        let mut line = serde_json::json!({
            "user_id": user,
            "items": response.items.iter().map(|i| i.item_id.as_str()).collect::<Vec<_>>(),
            "model_version": response.model_version,
            "degraded_stages": response.degraded_stages,
            "latency_ms": latency.as_secs_f64() * 1e3,
        });
        if let Some(steps) = steps {
            line["ablation"] = serde_json::to_value(steps.map_err(|error| anyhow::anyhow!("user {user}: {error}"))?)?;
        }
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    cluster.shutdown().await;
    println!(
        "served {served} users ({degraded} with a degraded stage; {retried} degraded answers asked again) -> {}",
        args.out.display()
    );
    if degraded > 0 {
        anyhow::bail!("{degraded} answers were degraded: the evaluation would not measure the full pipeline");
    }
    Ok(())
}
