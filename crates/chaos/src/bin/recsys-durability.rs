//! `recsys-durability` (run by `make durability`): what an operator would try on the
//! feature store's promise that nothing acknowledged is lost. Four clients append event
//! batches to feature-svc while it is killed with SIGKILL at random moments and
//! restarted, for a number of cycles; then every acknowledged batch is read back after a
//! final restart. Each batch belongs to a user of its own, so a batch whose
//! acknowledgement was lost in a kill (stored or not) can never hide a missing one.
//! Writes `target/reports/durability.json` (`cycles`, `acknowledged_events`,
//! `lost_events`).

#![forbid(unsafe_code)]

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::Parser;
use recsys_chaos::cluster::{Cluster, ClusterPaths, Leaf};
use recsys_proto::v1::{
    feature_service_client::FeatureServiceClient, AppendEventsRequest, Event, EventType, GetUserFeaturesRequest,
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

/// The acknowledged batches: (user id, item ids).
type Acknowledged = Arc<Mutex<Vec<(String, Vec<String>)>>>;

fn batch(client: usize, number: usize, size: usize) -> (String, Vec<Event>) {
    let user = format!("durability-{client}-{number}");
    let events = (0..size)
        .map(|n| Event {
            user_id: user.clone(),
            item_id: format!("item-{n}"),
            r#type: EventType::Click as i32,
            timestamp_ms: 1_700_000_000_000 + n as i64,
            ..Event::default()
        })
        .collect();
    (user, events)
}

/// Appends batches until `stop`, recording the ones feature-svc acknowledged.
async fn append_until(
    address: std::net::SocketAddr,
    client: usize,
    size: usize,
    acknowledged: Acknowledged,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("a valid address")
        .connect_timeout(Duration::from_millis(100));
    let channel = endpoint.connect_lazy();
    let mut number = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        number += 1;
        let (user, events) = batch(client, number, size);
        let items = events.iter().map(|event| event.item_id.clone()).collect();
        let mut request = tonic::Request::new(AppendEventsRequest { events });
        request.set_timeout(Duration::from_secs(2));
        match FeatureServiceClient::new(channel.clone()).append_events(request).await {
            Ok(_) => acknowledged.lock().expect("not poisoned").push((user, items)),
            // Down or killed mid-call: the batch's fate is unknown, so it is not counted.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let state = tempfile::tempdir()?;
    let settings = args.paths.settings(state.path(), "target/durability-logs")?;
    let mut cluster = Cluster::start(settings).await?;
    let address = cluster.address(Leaf::Feature);
    let acknowledged: Acknowledged = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..args.clients)
        .map(|client| {
            tokio::spawn(append_until(
                address,
                client,
                usize::from(args.batch),
                Arc::clone(&acknowledged),
                Arc::clone(&stop),
            ))
        })
        .collect();
    // A fixed sequence of delays, so runs are comparable: kills land at varied moments.
    let mut delay_ms: u64 = 137;
    for cycle in 1..=args.cycles {
        delay_ms = (delay_ms * 7 + 101) % 600 + 100;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        cluster.kill(Leaf::Feature).await?;
        cluster.restart(Leaf::Feature).await?;
        println!("    cycle {cycle}: killed after {delay_ms} ms, restarted");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await?;
    }
    // A last restart, so everything is read back from the log.
    cluster.kill(Leaf::Feature).await?;
    cluster.restart(Leaf::Feature).await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?.connect().await?;
    let mut reader = FeatureServiceClient::new(channel);
    let batches = std::mem::take(&mut *acknowledged.lock().expect("not poisoned"));
    let mut lost = 0usize;
    let mut acknowledged_events = 0usize;
    for (user, items) in &batches {
        acknowledged_events += items.len();
        let features = reader
            .get_user_features(GetUserFeaturesRequest { user_id: user.clone(), max_history: 0, as_of_ms: 0 })
            .await?
            .into_inner();
        let stored: HashSet<&String> = features.history_item_ids.iter().collect();
        let missing = items.iter().filter(|item| !stored.contains(item)).count();
        if missing > 0 || features.event_count < items.len() as u64 {
            eprintln!("    lost: {user} has {} of {} events", features.event_count, items.len());
        }
        lost += missing.max(items.len().saturating_sub(features.event_count as usize));
    }
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
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("report written to {}", args.out.display());
    anyhow::ensure!(lost == 0, "{lost} acknowledged events were lost");
    Ok(())
}
