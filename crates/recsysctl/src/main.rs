//! `recsysctl`: the operator's command line for a running cluster and its bundles.

#![forbid(unsafe_code)]

mod bundle;
mod cluster;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "recsysctl", about = "Operate a recsys cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Wait until every address reports SERVING on grpc.health.v1.
    WaitReady {
        /// host:port of each service.
        #[arg(required = true)]
        addresses: Vec<String>,
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Ask the orchestrator for a user's top-k and print it with titles.
    Recommend {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 10)]
        top_k: u32,
        #[arg(long)]
        debug: bool,
        /// Bundle (or bundle root) whose catalog gives titles.
        #[arg(long, default_value = "models/bundles")]
        bundle: PathBuf,
    },
    /// Send one feedback event through the orchestrator.
    LogEvent {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        #[arg(long)]
        user: String,
        #[arg(long)]
        item: String,
        /// impression, click, like, rating or purchase.
        #[arg(long, default_value = "click")]
        r#type: String,
        #[arg(long, default_value = "")]
        request_id: String,
        #[arg(long, default_value_t = 0.0)]
        value: f32,
    },
    /// Model bundle operations.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// Check a bundle's files against the checksums in its manifest.
    Verify { path: PathBuf },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::WaitReady { addresses, timeout_s } => cluster::wait_ready(&addresses, timeout_s).await,
        Command::Recommend { addr, user, top_k, debug, bundle } => {
            cluster::recommend(&addr, &user, top_k, debug, &bundle).await
        }
        Command::LogEvent { addr, user, item, r#type, request_id, value } => {
            cluster::log_event(&addr, &user, &item, &r#type, &request_id, value).await
        }
        Command::Bundle { command: BundleCommand::Verify { path } } => bundle::verify(&path),
    }
}
