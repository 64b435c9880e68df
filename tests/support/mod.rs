//! Starts the whole cluster in-process: five real gRPC servers on ephemeral loopback
//! ports, wired to each other, over the default bundle and seed data that
//! `deploy/local/bootstrap.sh` prepares (as `make test` does first).

pub mod reflection;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use recsys_runtime::ServerConfig;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Orchestrator,
    Feature,
    Recall,
    Rank,
    Rerank,
    /// A second rank-svc, started only when the options ask for a canary.
    RankCanary,
}

impl Service {
    pub const ALL: [Service; 5] =
        [Service::Feature, Service::Recall, Service::Rank, Service::Rerank, Service::Orchestrator];
}

/// What a test changes about the default cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Start a canary rank-svc and send this share of users to it.
    pub canary_share_percent: Option<f64>,
    pub experiments: orchestrator::ExperimentConfig,
    pub scenes: std::collections::BTreeMap<String, orchestrator::Overrides>,
    /// A bundle root (version directories and `current`) instead of the default bundle.
    pub bundle_root: Option<PathBuf>,
    /// How often the bundle consumers check `current` (their default when unset).
    pub follow_current_ms: Option<u64>,
    /// rerank-svc's rules file instead of the shipped `deploy/rerank/rules.toml`.
    pub rules: Option<PathBuf>,
}

struct Running {
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

pub struct Cluster {
    services: HashMap<Service, Running>,
    /// The bundle directory every service loaded.
    bundle: PathBuf,
    _state: tempfile::TempDir,
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn server_config(listener: &TcpListener) -> ServerConfig {
    ServerConfig {
        listen: listener.local_addr().expect("bound").to_string(),
        not_serving_delay_ms: 0,
        drain_timeout_ms: 2_000,
        ..ServerConfig::default()
    }
}

impl Cluster {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(ClusterOptions::default()).await
    }

    pub async fn start_with(options: ClusterOptions) -> anyhow::Result<Self> {
        let root = workspace_root();
        let bundle = options.bundle_root.clone().unwrap_or_else(|| {
            std::env::var_os("RECSYS_TEST_BUNDLE").map_or_else(|| root.join("models/bundles"), PathBuf::from)
        });
        let follow_current_ms = options.follow_current_ms.unwrap_or(rank_svc::Config::default().follow_current_ms);
        let seed = root.join("data/ml-100k");
        if recsys_bundle_missing(&bundle) || !seed.join("interactions.csv").is_file() {
            bail!(
                "no bundle under {} or no data under {}: run `make test` (it bootstraps both)",
                bundle.display(),
                seed.display()
            );
        }
        let bundle_dir = recsys_bundle::resolve_dir(&bundle)?;
        let state = tempfile::tempdir()?;
        let mut listeners = HashMap::new();
        let mut started: Vec<Service> = Service::ALL.to_vec();
        if options.canary_share_percent.is_some() {
            started.push(Service::RankCanary);
        }
        for &service in &started {
            listeners.insert(service, TcpListener::bind("127.0.0.1:0").await?);
        }
        let address = |service: Service| listeners[&service].local_addr().expect("bound").to_string();

        let orchestrator_config = orchestrator::Config {
            server: server_config(&listeners[&Service::Orchestrator]),
            downstream: orchestrator::DownstreamConfig {
                feature: address(Service::Feature),
                recall: address(Service::Recall),
                rank: address(Service::Rank),
                rerank: address(Service::Rerank),
                ..orchestrator::DownstreamConfig::default()
            },
            fallback_refresh_ms: 500,
            // Tests check behaviour, not latency: several clusters share two cores here,
            // so stage budgets are generous to keep slow scheduling from degrading answers.
            budgets: orchestrator::StageBudgets {
                default_deadline_ms: 10_000,
                feature_ms: 2_000,
                recall_ms: 2_000,
                rank_ms: 2_000,
                rerank_ms: 2_000,
            },
            fallback_bundle: Some(bundle.clone()),
            catalog_poll_ms: 50,
            experiments: options.experiments.clone(),
            scenes: options.scenes.clone(),
            canary: orchestrator::CanaryConfig {
                rank: listeners
                    .get(&Service::RankCanary)
                    .map(|l| l.local_addr().expect("bound").to_string())
                    .unwrap_or_default(),
                share_percent: options.canary_share_percent.unwrap_or(0.0),
                ..orchestrator::CanaryConfig::default()
            },
            ..orchestrator::Config::default()
        };
        let feature_config = feature_svc::Config {
            server: server_config(&listeners[&Service::Feature]),
            seed_dir: Some(seed),
            store: feature_svc::StoreConfig { path: state.path().join("features.redb"), ..Default::default() },
            bundle: Some(bundle.clone()),
            ..feature_svc::Config::default()
        };
        // Catalogue changes reach recall and rerank quickly, so tests need not wait long.
        let catalog = recsys_runtime::catalog::CatalogConfig {
            feature: address(Service::Feature),
            poll_ms: 50,
            startup_wait_ms: 30_000,
        };
        let recall_config = recall_svc::Config {
            server: server_config(&listeners[&Service::Recall]),
            catalog: catalog.clone(),
            bundle: bundle.clone(),
            // Generous, like the stage budgets above: answers must not depend on scheduling.
            channels: generous_channel_budgets(recall_svc::Config::default().channels),
            follow_current_ms,
            ..recall_svc::Config::default()
        };
        let rank_config = rank_svc::Config {
            server: server_config(&listeners[&Service::Rank]),
            bundle: bundle.clone(),
            follow_current_ms,
            ..rank_svc::Config::default()
        };
        let rerank_config = rerank_svc::Config {
            server: server_config(&listeners[&Service::Rerank]),
            bundle,
            follow_current_ms,
            rules: Some(options.rules.clone().unwrap_or_else(|| root.join("deploy/rerank/rules.toml"))),
            rules_reload_ms: 100,
            catalog,
            ..rerank_svc::Config::default()
        };

        let mut services = HashMap::new();
        for (service, listener) in listeners {
            let (stop, stopped) = oneshot::channel::<()>();
            let address = listener.local_addr()?;
            let shutdown = async move {
                let _ = stopped.await;
            };
            let task = match service {
                Service::Feature => tokio::spawn(feature_svc::serve(listener, feature_config.clone(), shutdown)),
                Service::Recall => tokio::spawn(recall_svc::serve(listener, recall_config.clone(), shutdown)),
                Service::Rank | Service::RankCanary => {
                    let config = rank_svc::Config { server: server_config(&listener), ..rank_config.clone() };
                    tokio::spawn(rank_svc::serve(listener, config, shutdown))
                }
                Service::Rerank => tokio::spawn(rerank_svc::serve(listener, rerank_config.clone(), shutdown)),
                Service::Orchestrator => {
                    tokio::spawn(orchestrator::serve(listener, orchestrator_config.clone(), shutdown))
                }
            };
            services.insert(service, Running { address, stop: Some(stop), task });
        }
        let mut cluster = Self { services, bundle: bundle_dir, _state: state };
        for service in started {
            cluster.wait_serving(service, Duration::from_secs(60)).await?;
        }
        Ok(cluster)
    }

    pub fn bundle(&self) -> &std::path::Path {
        &self.bundle
    }

    pub fn address(&self, service: Service) -> SocketAddr {
        self.services[&service].address
    }

    pub fn channel(&self, service: Service) -> Channel {
        recsys_runtime::client::lazy_channel(&self.address(service).to_string(), Duration::from_secs(1))
            .expect("loopback address is a valid endpoint")
    }

    /// Shuts one service down the way SIGTERM would and waits until it has exited.
    pub async fn stop(&mut self, service: Service) -> anyhow::Result<()> {
        let running = self.services.get_mut(&service).context("unknown service")?;
        if let Some(stop) = running.stop.take() {
            let _ = stop.send(());
        }
        (&mut running.task).await??;
        Ok(())
    }

    async fn wait_serving(&mut self, service: Service, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.health(service).await {
                if status == ServingStatus::Serving {
                    return Ok(());
                }
            }
            if self.services[&service].task.is_finished() {
                let task = &mut self.services.get_mut(&service).expect("started").task;
                let outcome = task.await;
                bail!("{service:?} exited during start-up: {outcome:?}");
            }
            if Instant::now() > deadline {
                bail!("{service:?} not SERVING after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The service's overall health status, `None` when it cannot be reached.
    pub async fn health(&self, service: Service) -> Option<ServingStatus> {
        let mut client = HealthClient::new(self.channel(service));
        let response = client.check(HealthCheckRequest { service: String::new() }).await.ok()?;
        ServingStatus::try_from(response.into_inner().status).ok()
    }
}

fn generous_channel_budgets(mut channels: recall_svc::ChannelSettings) -> recall_svc::ChannelSettings {
    for quota in [
        &mut channels.embedding,
        &mut channels.item_cf,
        &mut channels.realtime,
        &mut channels.popular,
        &mut channels.cold_start,
    ] {
        quota.budget_ms = 2_000;
    }
    channels
}

fn recsys_bundle_missing(root: &std::path::Path) -> bool {
    !root.join("manifest.json").is_file() && !root.join("current/manifest.json").is_file()
}
