//! `recsys-eval`: asks a real cluster (started from the built binaries, on the given
//! bundle and seed data) for the top-k of every listed user, over gRPC, and writes one
//! JSON line per user. The training pipeline's `eval` command scores the lines against
//! the held-out interactions (`make eval`).

#![forbid(unsafe_code)]

use std::{io::Write, path::PathBuf, sync::Arc, time::Duration};

use clap::Parser;
use recsys_chaos::cluster::{Cluster, ClusterPaths};
use recsys_proto::v1::{recommender_client::RecommenderClient, RecommendRequest};
use tokio::sync::Semaphore;

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
    let settings = args.paths.settings(state.path(), "target/eval-logs")?;
    let cluster = Cluster::start(settings).await?;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.orchestrator))?.connect().await?;
    let permits = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(users.len());
    for user in users {
        let mut client = RecommenderClient::new(channel.clone());
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let top_k = args.top_k;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let mut request =
                tonic::Request::new(RecommendRequest { user_id: user.clone(), top_k, ..RecommendRequest::default() });
            // Evaluation measures quality, not latency: a generous deadline.
            request.set_timeout(Duration::from_secs(5));
            let response = client.recommend(request).await.map(tonic::Response::into_inner);
            (user, response)
        }));
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(&args.out)?);
    let (mut served, mut degraded) = (0usize, 0usize);
    for task in tasks {
        let (user, response) = task.await?;
        let response = response.map_err(|status| anyhow::anyhow!("user {user}: {status}"))?;
        served += 1;
        degraded += usize::from(!response.degraded_stages.is_empty());
        let line = serde_json::json!({
            "user_id": user,
            "items": response.items.iter().map(|i| i.item_id.as_str()).collect::<Vec<_>>(),
            "model_version": response.model_version,
            "degraded_stages": response.degraded_stages,
        });
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    cluster.shutdown().await;
    println!("served {served} users ({degraded} with a degraded stage) -> {}", args.out.display());
    if degraded > 0 {
        anyhow::bail!("{degraded} answers were degraded: the evaluation would not measure the full pipeline");
    }
    Ok(())
}
