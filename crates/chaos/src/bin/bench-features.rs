//! `bench-features` (run by `make bench-features`): the feature store at scale, for both
//! backends, on feature-svc release binaries and a real `redis-server` (`appendfsync
//! always`) on loopback.
//!
//! - **get**: one user's features plus 1000 items' features (the two RPCs a request makes,
//!   concurrently) — p50/p99 per backend; and the same Redis keys read by this benchmark
//!   itself in one pipelined round trip (`raw_redis_p99_ms`), the floor the Redis
//!   backend is measured against.
//! - **ingest**: concurrent clients appending batches of 100 events with durability on.
//! - **click to visible**: a click appended, then the user's features polled until it
//!   leads the recent behaviour.
//! - **kill -9**: clients append while feature-svc (and, for Redis, `redis-server`) is
//!   killed with SIGKILL and restarted; every acknowledged event is then read back.
//! - **start-up**: feature-svc opening an embedded store holding the large seed (2M
//!   users), after a clean stop and after a SIGKILL.
//!
//! Writes `target/reports/bench-features.json` with the keys the issue names.

#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use feature_svc::local_redis::{LocalRedis, Persistence};
use recsys_chaos::{
    cluster::{free_port, spawn_logged, wait_serving},
    durability::{count_lost, next_kill_delay_ms, Writers},
    load::quantile_ms,
    round, write_report, Rng,
};
use recsys_proto::v1::{
    feature_service_client::FeatureServiceClient, AppendEventsRequest, Event, EventType, GetItemFeaturesRequest,
    GetUserFeaturesRequest,
};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "bench-features")]
struct Args {
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Seed the read, ingest and durability phases use (both backends load it).
    #[arg(long)]
    seed: PathBuf,
    /// The large seed (2M users) the embedded start-up is measured with.
    #[arg(long)]
    large_seed: PathBuf,
    /// Bundle whose item statistics the stores bulk-load (the catalogue's own).
    #[arg(long, default_value = "models/synthetic-1000000")]
    bundle: PathBuf,
    /// Scratch space: stores, logs, the Redis files. The large store is kept between runs.
    #[arg(long, default_value = "target/bench-features")]
    work: PathBuf,
    #[arg(long, default_value = "target/reports/bench-features.json")]
    out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    items_per_request: usize,
    #[arg(long, default_value_t = 400)]
    requests: usize,
    #[arg(long, default_value_t = 8)]
    ingest_clients: usize,
    #[arg(long, default_value_t = 5)]
    ingest_seconds: u64,
    /// Kill cycles per backend.
    #[arg(long, default_value_t = 20)]
    kill_cycles: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Embedded,
    Redis,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Redis => "redis",
        }
    }
}

/// One feature-svc process and what it needs to be restarted the same way.
struct FeatureProcess {
    child: Child,
    address: SocketAddr,
    env: Vec<(String, String)>,
    binary: PathBuf,
    log: PathBuf,
}

impl FeatureProcess {
    async fn start(
        bin_dir: &Path,
        log: PathBuf,
        backend: Backend,
        store: &Path,
        redis_url: &str,
        seed: &Path,
        bundle: &Path,
    ) -> anyhow::Result<(Self, Duration)> {
        let address = free_port().await?;
        let env = vec![
            ("RECSYS_FEATURE__SERVER__LISTEN".to_string(), address.to_string()),
            ("RECSYS_FEATURE__SERVER__ADMIN__LISTEN".to_string(), "127.0.0.1:0".to_string()),
            ("RECSYS_FEATURE__SERVER__METRICS_LISTEN".to_string(), String::new()),
            ("RECSYS_FEATURE__SEED_DIR".to_string(), seed.display().to_string()),
            ("RECSYS_FEATURE__STORE__BACKEND".to_string(), backend.name().to_string()),
            ("RECSYS_FEATURE__STORE__PATH".to_string(), store.display().to_string()),
            ("RECSYS_FEATURE__STORE__REDIS__URL".to_string(), redis_url.to_string()),
            ("RECSYS_FEATURE__BUNDLE".to_string(), bundle.display().to_string()),
        ];
        let binary = bin_dir.join("feature-svc");
        let started = Instant::now();
        let child = spawn(&binary, &env, &log)?;
        let mut process = Self { child, address, env, binary, log };
        process.wait().await?;
        Ok((process, started.elapsed()))
    }

    async fn wait(&mut self) -> anyhow::Result<()> {
        wait_serving(self.address, Duration::from_secs(1800))
            .await
            .with_context(|| format!("feature-svc did not start; see {}", self.log.display()))
    }

    async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    async fn restart(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.child = spawn(&self.binary, &self.env, &self.log)?;
        self.wait().await?;
        Ok(started.elapsed())
    }

    async fn client(&self) -> anyhow::Result<FeatureServiceClient<Channel>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))?.connect().await?;
        Ok(FeatureServiceClient::new(channel).max_decoding_message_size(64 << 20))
    }
}

fn spawn(binary: &Path, env: &[(String, String)], log: &Path) -> anyhow::Result<Child> {
    let mut command = Command::new(binary);
    command.envs(env.iter().cloned()).env("RUST_LOG", "warn");
    spawn_logged(command, log)
}

/// The first column of a seed CSV (ids), and the largest `timestamp` of the interactions.
fn seed_ids(seed: &Path) -> anyhow::Result<(Vec<String>, Vec<String>, i64)> {
    let first_column = |file: &str| -> anyhow::Result<Vec<String>> {
        let mut reader = csv_reader(&seed.join(file))?;
        reader.records().map(|record| Ok(record?[0].to_string())).collect()
    };
    let users = first_column("users.csv")?;
    let items = first_column("items.csv")?;
    let mut reader = csv_reader(&seed.join("interactions.csv"))?;
    let column = reader.headers()?.iter().position(|name| name == "timestamp").context("no timestamp column")?;
    let mut latest = 0i64;
    for record in reader.records() {
        latest = latest.max(record?[column].parse()?);
    }
    Ok((users, items, latest * 1000))
}

fn csv_reader(path: &Path) -> anyhow::Result<csv::Reader<std::fs::File>> {
    csv::Reader::from_path(path).with_context(|| format!("{}", path.display()))
}

struct Latencies {
    p50_ms: f64,
    p99_ms: f64,
}

fn latencies(samples: &[Duration]) -> Latencies {
    Latencies { p50_ms: quantile_ms(samples.iter().copied(), 0.5), p99_ms: quantile_ms(samples.iter().copied(), 0.99) }
}

/// One user plus `items` item features per request, both RPCs at once.
async fn measure_gets(
    client: &FeatureServiceClient<Channel>,
    users: &[String],
    items: &[String],
    per_request: usize,
    requests: usize,
    as_of_ms: i64,
) -> anyhow::Result<Latencies> {
    let mut rng = Rng(0x5eed);
    let mut samples = Vec::with_capacity(requests);
    for round in 0..requests + requests / 10 {
        let user = users[rng.below(users.len())].clone();
        let item_ids: Vec<String> = (0..per_request).map(|_| items[rng.below(items.len())].clone()).collect();
        let (mut user_client, mut item_client) = (client.clone(), client.clone());
        let started = Instant::now();
        let (user, items) = tokio::try_join!(
            user_client.get_user_features(GetUserFeaturesRequest { user_id: user, max_history: 0, as_of_ms }),
            item_client.get_item_features(GetItemFeaturesRequest { item_ids, as_of_ms, counts_only: false }),
        )?;
        let elapsed = started.elapsed();
        anyhow::ensure!(user.into_inner().known, "a seeded user is unknown");
        anyhow::ensure!(items.into_inner().items.len() == per_request, "item features missing");
        if round >= requests / 10 {
            samples.push(elapsed); // the first tenth warms up
        }
    }
    Ok(latencies(&samples))
}

/// The same keys the Redis backend reads for a request, in one pipelined round trip.
async fn measure_raw_redis(
    url: &str,
    users: &[String],
    items: &[String],
    per_request: usize,
    requests: usize,
) -> anyhow::Result<Latencies> {
    use std::collections::HashMap;
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let prefix = feature_svc::RedisConfig::default().key_prefix;
    let mut rng = Rng(0x5eed);
    let mut samples = Vec::with_capacity(requests);
    for round in 0..requests + requests / 10 {
        let user = &users[rng.below(users.len())];
        let item_ids: Vec<&String> = (0..per_request).map(|_| &items[rng.below(items.len())]).collect();
        let started = Instant::now();
        let mut pipe = redis::pipe();
        let [user_key, behaviour_key, counters_key, categories_key, impressions_key] =
            feature_svc::redis_user_keys(&prefix, user);
        pipe.hget(format!("{prefix}meta"), "bundle")
            .hgetall(user_key)
            .zrevrange_withscores(behaviour_key, 0, 999)
            .hgetall(counters_key)
            .hgetall(categories_key)
            .lrange(impressions_key, 0, -1);
        for id in item_ids {
            let [item_key, item_counters_key, item_stats_key] = feature_svc::redis_item_keys(&prefix, id);
            pipe.hgetall(item_key).hgetall(item_counters_key).get(item_stats_key);
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut connection).await?;
        let elapsed = started.elapsed();
        anyhow::ensure!(replies.len() == 6 + 3 * per_request, "pipeline answered {} replies", replies.len());
        // Decoded like the service decodes them: the version, then every hash.
        let _: Option<String> = redis::from_redis_value(replies[0].clone())?;
        let _: Vec<(String, f64)> = redis::from_redis_value(replies[2].clone())?;
        let _: Vec<String> = redis::from_redis_value(replies[5].clone())?;
        for (position, reply) in
            replies.iter().enumerate().skip(1).filter(|&(position, _)| position != 2 && position != 5)
        {
            // After the user's five replies, every third is an item's statistics string.
            if position >= 6 && (position - 6) % 3 == 2 {
                let _: Option<Vec<u8>> = redis::from_redis_value(reply.clone())?;
            } else {
                let _: HashMap<String, String> =
                    redis::from_redis_value(reply.clone()).with_context(|| format!("reply {position}"))?;
            }
        }
        if round >= requests / 10 {
            samples.push(elapsed);
        }
    }
    Ok(latencies(&samples))
}

/// Events per second acknowledged by `clients` appending batches of 100 for `seconds`.
async fn measure_ingest(
    client: &FeatureServiceClient<Channel>,
    users: &[String],
    items: &[String],
    clients: usize,
    seconds: u64,
    tag: &str,
) -> anyhow::Result<f64> {
    let acknowledged = Arc::new(AtomicU64::new(0));
    let users = Arc::new(users.to_vec());
    let items = Arc::new(items.to_vec());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|writer| {
            let (mut client, acknowledged) = (client.clone(), Arc::clone(&acknowledged));
            let (users, items, tag) = (Arc::clone(&users), Arc::clone(&items), tag.to_string());
            tokio::spawn(async move {
                let mut rng = Rng(0x1234 + writer as u64);
                let mut batch_number = 0u64;
                while Instant::now() < deadline {
                    batch_number += 1;
                    let now_ms =
                        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
                    let events: Vec<Event> = (0..100)
                        .map(|n| {
                            let kind = match rng.below(100) {
                                0..80 => EventType::Impression,
                                80..95 => EventType::Click,
                                _ => EventType::Like,
                            };
                            Event {
                                user_id: users[rng.below(users.len())].clone(),
                                item_id: items[rng.below(items.len())].clone(),
                                r#type: kind as i32,
                                timestamp_ms: now_ms,
                                event_id: format!("{tag}-{writer}-{batch_number}-{n}"),
                                ..Event::default()
                            }
                        })
                        .collect();
                    let response = client.append_events(AppendEventsRequest { events }).await?.into_inner();
                    acknowledged.fetch_add(u64::from(response.accepted), Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(acknowledged.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// p99 of the time from sending a click to reading it back first in the user's behaviour.
async fn measure_click_to_visible(
    client: &FeatureServiceClient<Channel>,
    users: &[String],
    trials: usize,
) -> anyhow::Result<f64> {
    let mut client = client.clone();
    let mut samples = Vec::with_capacity(trials);
    for trial in 0..trials {
        let user = users[trial % users.len()].clone();
        let item = format!("visible-{trial}");
        let started = Instant::now();
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
        let click = Event {
            user_id: user.clone(),
            item_id: item.clone(),
            r#type: EventType::Click as i32,
            timestamp_ms: now_ms,
            event_id: format!("visible-{trial}-{now_ms}"),
            ..Event::default()
        };
        client.append_events(AppendEventsRequest { events: vec![click] }).await?;
        loop {
            let features = client
                .get_user_features(GetUserFeaturesRequest { user_id: user.clone(), max_history: 1, as_of_ms: 0 })
                .await?
                .into_inner();
            if features.history_item_ids.first() == Some(&item) {
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(10), "a click never became visible");
        }
        samples.push(started.elapsed());
    }
    Ok(quantile_ms(samples.into_iter(), 0.99))
}

/// Kill cycles against one backend; returns (acknowledged events, lost events).
async fn kill_cycles(
    feature: &mut FeatureProcess,
    mut redis: Option<&mut LocalRedis>,
    cycles: usize,
    clients: usize,
    tag: &str,
) -> anyhow::Result<(usize, usize)> {
    let writers = Writers::start(feature.address, tag, clients, 50);
    let mut delay_ms: u64 = 137;
    for cycle in 1..=cycles {
        delay_ms = next_kill_delay_ms(delay_ms);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        feature.kill().await?;
        if let Some(redis) = redis.as_deref_mut() {
            redis.kill_and_restart()?;
        }
        feature.restart().await?;
        println!("    {tag} cycle {cycle}: killed after {delay_ms} ms, restarted");
    }
    let batches = writers.stop().await?;
    feature.kill().await?;
    if let Some(redis) = redis {
        redis.kill_and_restart()?;
    }
    feature.restart().await?;
    count_lost(feature.address, &batches).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let work = std::path::absolute(&args.work)?;
    std::fs::create_dir_all(work.join("logs"))?;
    let (users, items, as_of_ms) = seed_ids(&args.seed)?;
    println!("==> seed {}: {} users, {} items", args.seed.display(), users.len(), items.len());

    // Fresh stores for the read, ingest and durability phases.
    let embedded_store = work.join("embedded.redb");
    let _ = std::fs::remove_file(&embedded_store);
    let redis_dir = work.join("redis");
    let _ = std::fs::remove_dir_all(&redis_dir);
    let mut redis = LocalRedis::start(&redis_dir, Persistence::AppendFsyncAlways)?;

    let mut rows: Vec<(String, String)> = Vec::new();
    let mut results = std::collections::HashMap::new();
    let mut raw = None;
    for backend in [Backend::Embedded, Backend::Redis] {
        let name = backend.name();
        println!("==> {name}: loading the seed");
        let (mut feature, load) = FeatureProcess::start(
            &args.bin_dir,
            work.join(format!("logs/feature-{name}.log")),
            backend,
            &embedded_store,
            &redis.url(),
            &args.seed,
            &args.bundle,
        )
        .await?;
        rows.push((format!("{name}: seed load + start"), format!("{:.1} s", load.as_secs_f64())));
        let client = feature.client().await?;
        // The bundle's statistics load in the background: measure once they are in.
        let loading = Instant::now();
        wait_for_bundle(&client, &items[0]).await?;
        rows.push((format!("{name}: bundle statistics load"), format!("{:.1} s", loading.elapsed().as_secs_f64())));
        println!("==> {name}: reads");
        let gets = measure_gets(&client, &users, &items, args.items_per_request, args.requests, as_of_ms).await?;
        if backend == Backend::Redis {
            // Right after the service's reads, on the same data and the same quiet server.
            println!("==> raw Redis reads of the same keys");
            raw = Some(measure_raw_redis(&redis.url(), &users, &items, args.items_per_request, args.requests).await?);
        }
        println!("==> {name}: ingestion");
        let ingest_tag = format!("ingest-{name}");
        let ingest =
            measure_ingest(&client, &users, &items, args.ingest_clients, args.ingest_seconds, &ingest_tag).await?;
        println!("==> {name}: click to visible");
        let visible = measure_click_to_visible(&client, &users, 200).await?;
        println!("==> {name}: kill -9 cycles");
        let redis_to_kill = (backend == Backend::Redis).then_some(&mut redis);
        // Event ids are unique across phases: a clash would be (rightly) deduplicated.
        let kill_tag = format!("kill-{name}");
        let (acknowledged, lost) = kill_cycles(&mut feature, redis_to_kill, args.kill_cycles, 4, &kill_tag).await?;
        feature.kill().await?;
        rows.push((format!("{name}: get p50 / p99"), format!("{:.2} / {:.2} ms", gets.p50_ms, gets.p99_ms)));
        rows.push((format!("{name}: ingest"), format!("{ingest:.0} events/s")));
        rows.push((format!("{name}: click to visible p99"), format!("{visible:.1} ms")));
        rows.push((
            format!("{name}: kill -9"),
            format!("{} cycles, {lost} of {acknowledged} acked lost", args.kill_cycles),
        ));
        results.insert(name, (gets, ingest, visible, lost));
    }
    let raw = raw.context("the Redis phase measures the raw reads")?;
    rows.push(("raw Redis pipeline p50 / p99".into(), format!("{:.2} / {:.2} ms", raw.p50_ms, raw.p99_ms)));
    drop(redis);

    println!("==> start-up with the large seed ({})", args.large_seed.display());
    let large_store = work.join("large.redb");
    let (mut large, first) = FeatureProcess::start(
        &args.bin_dir,
        work.join("logs/feature-large.log"),
        Backend::Embedded,
        &large_store,
        "",
        &args.large_seed,
        &args.bundle,
    )
    .await?;
    rows.push(("large store: first start (loads the seed if new)".into(), format!("{:.1} s", first.as_secs_f64())));
    let large_users = large
        .client()
        .await?
        .get_user_features(GetUserFeaturesRequest {
            user_id: last_user(&args.large_seed)?,
            max_history: 1,
            as_of_ms: 0,
        })
        .await?
        .into_inner()
        .known;
    large.child.kill().await?; // not a clean stop: SIGKILL
    let after_kill = large.restart().await?;
    let user_count = count_users(&args.large_seed)?;
    rows.push((
        format!("start-up with {user_count} users after SIGKILL"),
        format!("{:.2} s", after_kill.as_secs_f64()),
    ));
    large.kill().await?;
    anyhow::ensure!(large_users, "the large store does not know its last user");

    let (embedded, redis_results) = (&results["embedded"], &results["redis"]);
    let report = serde_json::json!({
        "users": user_count,
        "get_p99_ms_embedded": round(embedded.0.p99_ms, 3),
        "get_p99_ms_redis": round(redis_results.0.p99_ms, 3),
        "raw_redis_p99_ms": round(raw.p99_ms, 3),
        "redis_over_raw_p99": round(redis_results.0.p99_ms / raw.p99_ms, 3),
        "embedded_over_redis_p99": round(embedded.0.p99_ms / redis_results.0.p99_ms, 3),
        "ingest_events_per_s_embedded": round(embedded.1, 0),
        "ingest_events_per_s_redis": round(redis_results.1, 0),
        "startup_s_embedded": round(after_kill.as_secs_f64(), 3),
        "lost_acked_events": embedded.3 + redis_results.3,
        "kill_cycles": 2 * args.kill_cycles,
        "click_to_visible_ms": round(embedded.2.max(redis_results.2), 3),
    });
    println!();
    for (what, value) in &rows {
        println!("  {what:<50} {value:>28}");
    }
    write_report(&args.out, &report)?;
    Ok(())
}

async fn wait_for_bundle(client: &FeatureServiceClient<Channel>, item: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let response = client
            .clone()
            .get_item_features(GetItemFeaturesRequest {
                item_ids: vec![item.to_string()],
                as_of_ms: 0,
                counts_only: false,
            })
            .await?
            .into_inner();
        if response.items.first().is_some_and(|features| !features.bundle_version.is_empty()) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the bundle's item statistics were not loaded in 15 minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn last_user(seed: &Path) -> anyhow::Result<String> {
    let mut reader = csv_reader(&seed.join("users.csv"))?;
    Ok(reader.records().last().context("no users")??[0].to_string())
}

fn count_users(seed: &Path) -> anyhow::Result<usize> {
    let mut reader = csv_reader(&seed.join("users.csv"))?;
    Ok(reader.records().count())
}
