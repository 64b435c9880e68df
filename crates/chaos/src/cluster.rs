//! The cluster under test: the five service binaries as child processes on free loopback
//! ports, with rank-svc reached through a latency-injecting TCP proxy.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    process::{Child, Command},
};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leaf {
    Feature,
    Recall,
    Rank,
    Rerank,
}

impl Leaf {
    pub const ALL: [Leaf; 4] = [Leaf::Feature, Leaf::Recall, Leaf::Rank, Leaf::Rerank];

    pub fn binary(self) -> &'static str {
        match self {
            Leaf::Feature => "feature-svc",
            Leaf::Recall => "recall-svc",
            Leaf::Rank => "rank-svc",
            Leaf::Rerank => "rerank-svc",
        }
    }

    fn env_prefix(self) -> &'static str {
        match self {
            Leaf::Feature => "RECSYS_FEATURE",
            Leaf::Recall => "RECSYS_RECALL",
            Leaf::Rank => "RECSYS_RANK",
            Leaf::Rerank => "RECSYS_RERANK",
        }
    }
}

/// Where the cluster's binaries, bundle and seed data are: the flags both tools share.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterPaths {
    /// Directory with the five service binaries.
    #[arg(long, default_value = "target/debug")]
    pub bin_dir: PathBuf,
    #[arg(long, default_value = "models/bundles")]
    pub bundle: PathBuf,
    #[arg(long, default_value = "data/ml-100k")]
    pub seed: PathBuf,
}

impl ClusterPaths {
    /// Settings for a cluster with telemetry export off and the given state directory.
    pub fn settings(&self, state: &Path, logs: &str) -> anyhow::Result<Settings> {
        Ok(Settings {
            otlp_endpoint: String::new(),
            otlp_sample_ratio: None,
            metrics: false,
            bin_dir: self.bin_dir.clone(),
            bundle: std::fs::canonicalize(&self.bundle).with_context(|| format!("{}", self.bundle.display()))?,
            seed: std::fs::canonicalize(&self.seed).with_context(|| format!("{}", self.seed.display()))?,
            state: state.to_path_buf(),
            logs: PathBuf::from(logs),
            orchestrator_env: Vec::new(),
            rank_proxy: true,
        })
    }
}

pub struct Settings {
    /// OTLP collector every process exports spans to; empty for none.
    pub otlp_endpoint: String,
    /// Trace sampling ratio for every process; `None` keeps the shipped default.
    pub otlp_sample_ratio: Option<f64>,
    /// Serve `/metrics` from every process (on free ports, see `Cluster::metrics_addresses`).
    pub metrics: bool,
    pub bin_dir: PathBuf,
    pub bundle: PathBuf,
    pub seed: PathBuf,
    pub state: PathBuf,
    pub logs: PathBuf,
    pub orchestrator_env: Vec<(String, String)>,
    /// Route the orchestrator's rank calls through the latency-injecting proxy (the chaos
    /// suite's slow-rank fault); off, it calls rank-svc directly, as in production.
    pub rank_proxy: bool,
}

pub struct Cluster {
    settings: Settings,
    pub orchestrator: SocketAddr,
    addresses: HashMap<Leaf, SocketAddr>,
    children: HashMap<Leaf, Child>,
    orchestrator_child: Child,
    pub metrics_addresses: Vec<SocketAddr>,
    /// Delay added to every chunk sent towards rank-svc through the proxy.
    pub rank_delay_ms: Arc<AtomicU64>,
}

/// A loopback address no one listens on now, for a child process to bind.
///
/// It is drawn below the kernel's ephemeral range: a port the kernel handed out for
/// `127.0.0.1:0` is free again once the check's listener closes, and any outgoing
/// connection (a client, another test) may take it before the child binds it — which
/// happened, and the harness then talked to whatever held the port. No port is handed
/// out twice by one process (other processes draw from the same range at random).
pub async fn free_port() -> anyhow::Result<SocketAddr> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_low = ephemeral_range_start();
    let (low, high) = (ephemeral_low.saturating_sub(12_000).max(1_024), ephemeral_low);
    // Too few ports below the range to draw from: the kernel's choice, as before.
    if high.saturating_sub(low) >= 1_000 {
        let clock =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |t| t.as_nanos() as u64);
        // Never 0: xorshift would stay there.
        let mut state = (u64::from(std::process::id()) ^ clock) | 1;
        for _ in 0..1_000 {
            // xorshift: ports spread over the range, differently per process and start.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let port = low + (state % u64::from(high - low)) as u16;
            // Checked and reserved under one lock: two concurrent callers never get one port.
            let mut handed_out = HANDED_OUT.lock().expect("port list lock");
            if handed_out.contains(&port) {
                continue;
            }
            if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                handed_out.push(port);
                return Ok(listener.local_addr()?);
            }
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0").await?.local_addr()?)
}

/// The first port the kernel hands out for outgoing connections (Linux's default when it
/// cannot be read).
fn ephemeral_range_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

impl Cluster {
    pub async fn start(settings: Settings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&settings.logs)?;
        let mut addresses = HashMap::new();
        for leaf in Leaf::ALL {
            addresses.insert(leaf, free_port().await?);
        }
        let rank_delay_ms = Arc::new(AtomicU64::new(0));
        let rank_address = if settings.rank_proxy {
            let proxy = TcpListener::bind("127.0.0.1:0").await?;
            let proxy_address = proxy.local_addr()?;
            tokio::spawn(run_proxy(proxy, addresses[&Leaf::Rank], Arc::clone(&rank_delay_ms)));
            proxy_address
        } else {
            addresses[&Leaf::Rank]
        };
        let orchestrator = free_port().await?;

        let mut children = HashMap::new();
        let mut metrics_addresses = Vec::new();
        for leaf in Leaf::ALL {
            let metrics = if settings.metrics { Some(free_port().await?) } else { None };
            metrics_addresses.extend(metrics);
            children.insert(leaf, spawn_leaf(&settings, leaf, &addresses, metrics)?);
        }
        let metrics = if settings.metrics { Some(free_port().await?) } else { None };
        metrics_addresses.extend(metrics);
        let mut command = Command::new(settings.bin_dir.join("orchestrator"));
        command
            .env("RECSYS_ORCHESTRATOR__SERVER__LISTEN", orchestrator.to_string())
            // Admin ports on free ports too: the fixed defaults would clash with `make run`.
            .env("RECSYS_ORCHESTRATOR__SERVER__ADMIN__LISTEN", "127.0.0.1:0")
            .env("RECSYS_ORCHESTRATOR__SERVER__METRICS_LISTEN", metrics.map(|a| a.to_string()).unwrap_or_default())
            .env("RECSYS_ORCHESTRATOR__SERVER__OTLP_ENDPOINT", &settings.otlp_endpoint)
            .envs(settings.otlp_sample_ratio.map(|r| ("RECSYS_ORCHESTRATOR__SERVER__OTLP_SAMPLE_RATIO", r.to_string())))
            .env("RECSYS_ORCHESTRATOR__DOWNSTREAM__FEATURE", addresses[&Leaf::Feature].to_string())
            .env("RECSYS_ORCHESTRATOR__DOWNSTREAM__RECALL", addresses[&Leaf::Recall].to_string())
            .env("RECSYS_ORCHESTRATOR__DOWNSTREAM__RANK", rank_address.to_string())
            .env("RECSYS_ORCHESTRATOR__DOWNSTREAM__RERANK", addresses[&Leaf::Rerank].to_string())
            .env("RECSYS_ORCHESTRATOR__FALLBACK_BUNDLE", &settings.bundle)
            .envs(settings.orchestrator_env.iter().cloned());
        let orchestrator_child = spawn_logged(command, &settings.logs.join("orchestrator.log"))?;
        let cluster =
            Self { settings, orchestrator, addresses, children, orchestrator_child, metrics_addresses, rank_delay_ms };
        for leaf in Leaf::ALL {
            wait_serving(cluster.addresses[&leaf], Duration::from_secs(60)).await.context(leaf.binary())?;
        }
        wait_serving(orchestrator, Duration::from_secs(60)).await.context("orchestrator")?;
        Ok(cluster)
    }

    /// Where a leaf service listens (for tools that call a stage directly).
    pub fn address(&self, leaf: Leaf) -> SocketAddr {
        self.addresses[&leaf]
    }

    pub fn pid(&self, leaf: Leaf) -> anyhow::Result<u32> {
        self.children[&leaf].id().context("process has exited")
    }

    pub fn signal(&self, leaf: Leaf, signal: &str) -> anyhow::Result<()> {
        let status =
            std::process::Command::new("kill").arg(format!("-{signal}")).arg(self.pid(leaf)?.to_string()).status()?;
        if !status.success() {
            bail!("kill -{signal} {} failed", leaf.binary());
        }
        Ok(())
    }

    pub async fn kill(&mut self, leaf: Leaf) -> anyhow::Result<()> {
        let child = self.children.get_mut(&leaf).context("unknown leaf")?;
        child.kill().await?;
        Ok(())
    }

    /// Starts the leaf again on its old port and returns when it reports SERVING.
    pub async fn restart(&mut self, leaf: Leaf) -> anyhow::Result<Instant> {
        let child = spawn_leaf(&self.settings, leaf, &self.addresses, None)?;
        self.children.insert(leaf, child);
        wait_serving(self.addresses[&leaf], Duration::from_secs(60)).await?;
        Ok(Instant::now())
    }

    pub async fn shutdown(mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill().await;
        }
        let _ = self.orchestrator_child.kill().await;
    }
}

fn spawn_leaf(
    settings: &Settings,
    leaf: Leaf,
    addresses: &HashMap<Leaf, SocketAddr>,
    metrics: Option<SocketAddr>,
) -> anyhow::Result<Child> {
    let address = addresses[&leaf];
    let prefix = leaf.env_prefix();
    let mut command = Command::new(settings.bin_dir.join(leaf.binary()));
    // Metrics only on free ports: the fixed defaults would clash with a running `make run`.
    command
        .env(format!("{prefix}__SERVER__LISTEN"), address.to_string())
        .env(format!("{prefix}__SERVER__ADMIN__LISTEN"), "127.0.0.1:0")
        .env(format!("{prefix}__SERVER__METRICS_LISTEN"), metrics.map(|a| a.to_string()).unwrap_or_default())
        .env(format!("{prefix}__SERVER__OTLP_ENDPOINT"), &settings.otlp_endpoint);
    if let Some(ratio) = settings.otlp_sample_ratio {
        command.env(format!("{prefix}__SERVER__OTLP_SAMPLE_RATIO"), ratio.to_string());
    }
    match leaf {
        Leaf::Feature => {
            command
                .env(format!("{prefix}__SEED_DIR"), &settings.seed)
                .env(format!("{prefix}__STORE__PATH"), settings.state.join("features.redb"))
                .env(format!("{prefix}__BUNDLE"), &settings.bundle);
        }
        Leaf::Rank => {
            // The fine stage's item counts come from this cluster's feature-svc.
            command
                .env(format!("{prefix}__BUNDLE"), &settings.bundle)
                .env(format!("{prefix}__FEATURE"), addresses[&Leaf::Feature].to_string());
        }
        Leaf::Recall | Leaf::Rerank => {
            // They follow this cluster's catalogue, not one at the default address.
            command
                .env(format!("{prefix}__BUNDLE"), &settings.bundle)
                .env(format!("{prefix}__CATALOG__FEATURE"), addresses[&Leaf::Feature].to_string());
        }
    }
    spawn_logged(command, &settings.logs.join(format!("{}.log", leaf.binary())))
}

pub fn spawn_logged(mut command: Command, log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    command.stdout(Stdio::null()).stderr(file).kill_on_drop(true);
    command.spawn().with_context(|| format!("starting {command:?}"))
}

pub async fn wait_serving(address: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{address}")) {
            if let Ok(channel) = endpoint.connect_timeout(Duration::from_millis(200)).connect().await {
                let status = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await;
                if status.is_ok_and(|s| s.into_inner().status == ServingStatus::Serving as i32) {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{address} not SERVING after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Forwards connections to `target`, delaying each chunk towards it by the current delay.
async fn run_proxy(listener: TcpListener, target: SocketAddr, delay_ms: Arc<AtomicU64>) {
    while let Ok((inbound, _)) = listener.accept().await {
        let delay_ms = Arc::clone(&delay_ms);
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (mut in_read, mut in_write) = inbound.into_split();
            let (mut out_read, mut out_write) = outbound.into_split();
            let upstream = async move {
                let mut buffer = vec![0u8; 64 * 1024];
                loop {
                    let read = in_read.read(&mut buffer).await?;
                    if read == 0 {
                        return out_write.shutdown().await;
                    }
                    let delay = delay_ms.load(Ordering::Relaxed);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    out_write.write_all(&buffer[..read]).await?;
                }
            };
            let downstream = async move {
                tokio::io::copy(&mut out_read, &mut in_write).await?;
                in_write.shutdown().await
            };
            let _: (std::io::Result<()>, std::io::Result<()>) = tokio::join!(upstream, downstream);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ephemeral_low = ephemeral_range_start();
        let mut ports = Vec::new();
        for _ in 0..50 {
            let address = free_port().await.unwrap();
            assert!(address.port() < ephemeral_low, "{address} is in the ephemeral range");
            assert!(!ports.contains(&address.port()), "{address} handed out twice");
            ports.push(address.port());
            // Bindable by whoever it is handed to.
            drop(TcpListener::bind(address).await.unwrap());
        }
    }
}
