//! `recsys-durability` (run by `make durability`): what an operator would try on the
//! feature store's promise that nothing acknowledged is lost. Four clients append event
//! batches to feature-svc while it is killed with SIGKILL at random moments and
//! restarted, for a number of cycles; then every acknowledged batch is read back after a
//! final restart (`recsys_chaos::durability`). Writes `target/reports/durability.json`
//! (`cycles`, `acknowledged_events`, `lost_events`).

#![forbid(unsafe_code)]

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use recsys_chaos::{
    cluster::{Cluster, ClusterPaths, Leaf},
    durability::{count_lost, next_kill_delay_ms, Writers},
};

#[derive(Debug, Parser)]
#[command(name = "recsys-durability")]
struct Args {
    #[command(flatten)]
    paths: ClusterPaths,
    #[arg(long, default_value = "target/reports/durability.json")]
    out: PathBuf,
    /// Kill-and-restart cycles.
    #[arg(long, default_value_t = 20)]
    cycles: usize,
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Events per batch; at most the store's history length, so a batch reads back whole.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    batch: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let state = tempfile::tempdir()?;
    let settings = args.paths.settings(state.path(), "target/durability-logs")?;
    let mut cluster = Cluster::start(settings).await?;
    let address = cluster.address(Leaf::Feature);
    let writers = Writers::start(address, "durability", args.clients, usize::from(args.batch));
    let mut delay_ms: u64 = 137;
    for cycle in 1..=args.cycles {
        delay_ms = next_kill_delay_ms(delay_ms);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        cluster.kill(Leaf::Feature).await?;
        cluster.restart(Leaf::Feature).await?;
        println!("    cycle {cycle}: killed after {delay_ms} ms, restarted");
    }
    let batches = writers.stop().await?;
    // A last restart, so everything is read back from the store.
    cluster.kill(Leaf::Feature).await?;
    cluster.restart(Leaf::Feature).await?;
    let (acknowledged_events, lost) = count_lost(address, &batches).await?;
    cluster.shutdown().await;
    let report = serde_json::json!({
        "cycles": args.cycles,
        "acknowledged_events": acknowledged_events,
        "lost_events": lost,
    });
    println!();
    println!("  {:<22} {:>10}", "cycles", args.cycles);
    println!("  {:<22} {:>10}", "acknowledged_events", acknowledged_events);
    println!("  {:<22} {:>10}", "lost_events", lost);
    recsys_chaos::write_report(&args.out, &report)?;
    anyhow::ensure!(lost == 0, "{lost} acknowledged events were lost");
    Ok(())
}
