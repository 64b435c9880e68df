//! Starts the whole cluster in-process: five real gRPC servers on ephemeral loopback
//! ports, wired to each other, over the default bundle and seed data that
//! `deploy/local/bootstrap.sh` prepares (as `make test` does first).

pub mod fuzz;
pub mod reflection;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use recsys_runtime::{admin_auth::BearerToken, certs::DevCerts, Listeners, ServerConfig, Tls};
use tokio::{sync::oneshot, task::JoinHandle};
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

    /// The binary's name: its certificate's name in `recsysctl certs`.
    pub fn binary(self) -> &'static str {
        match self {
            Service::Orchestrator => "orchestrator",
            Service::Feature => "feature-svc",
            Service::Recall => "recall-svc",
            Service::Rank | Service::RankCanary => "rank-svc",
            Service::Rerank => "rerank-svc",
        }
    }
}

/// The operator every test cluster allows, and its bearer token.
pub const OPERATOR: &str = "operator";
pub const OPERATOR_TOKEN: &str = "test-operator-token";

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
    /// Where the orchestrator serves `/metrics` (the process's registry: every service
    /// of the test process reports there).
    pub orchestrator_metrics: Option<SocketAddr>,
    /// Serve and call over mutual TLS with these certificates (`recsysctl certs`); the
    /// test's own channels present the operator's certificate.
    pub tls: Option<DevCerts>,
}

struct Running {
    address: SocketAddr,
    admin_address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

pub struct Cluster {
    services: HashMap<Service, Running>,
    /// What the test's channels use: plaintext, or TLS with the operator's certificate.
    client_tls: Tls,
    /// The bundle directory every service loaded.
    bundle: PathBuf,
    _state: tempfile::TempDir,
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The server section of `service` on `listeners`: the admin port takes the test
/// operator's token from `token_file`; TLS with the service's own certificate when on.
fn server_config(
    service: Service,
    listeners: &Listeners,
    token_file: &std::path::Path,
    tls: Option<&DevCerts>,
) -> ServerConfig {
    let mut config = ServerConfig { not_serving_delay_ms: 0, drain_timeout_ms: 2_000, ..ServerConfig::default() };
    listeners.configure(&mut config);
    config.admin.token_file = token_file.display().to_string();
    config.admin.allowed_operators = vec![OPERATOR.to_string()];
    if let Some(certs) = tls {
        config.tls = certs.tls_config(service.binary(), 100);
    }
    config
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
        let token_file = state.path().join("admin-tokens");
        std::fs::write(&token_file, format!("{OPERATOR}:{OPERATOR_TOKEN}\n"))?;
        let tls = options.tls.as_ref();
        let client_tls = match tls {
            Some(certs) => Tls::load(&certs.tls_config(OPERATOR, 100))?,
            None => Tls::plaintext(),
        };
        let server_config =
            |service: Service, listeners: &Listeners| server_config(service, listeners, &token_file, tls);
        let mut listeners = HashMap::new();
        let mut started: Vec<Service> = Service::ALL.to_vec();
        if options.canary_share_percent.is_some() {
            started.push(Service::RankCanary);
        }
        for &service in &started {
            listeners.insert(service, Listeners::loopback().await?);
        }
        let address = |service: Service| listeners[&service].api.local_addr().expect("bound").to_string();

        let orchestrator_config = orchestrator::Config {
            server: ServerConfig {
                metrics_listen: options.orchestrator_metrics.map(|address| address.to_string()).unwrap_or_default(),
                ..server_config(Service::Orchestrator, &listeners[&Service::Orchestrator])
            },
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
                    .map(|l| l.api.local_addr().expect("bound").to_string())
                    .unwrap_or_default(),
                share_percent: options.canary_share_percent.unwrap_or(0.0),
                ..orchestrator::CanaryConfig::default()
            },
            ..orchestrator::Config::default()
        };
        let feature_config = feature_svc::Config {
            server: server_config(Service::Feature, &listeners[&Service::Feature]),
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
            server: server_config(Service::Recall, &listeners[&Service::Recall]),
            catalog: catalog.clone(),
            bundle: bundle.clone(),
            // Generous, like the stage budgets above: answers must not depend on scheduling.
            channels: generous_channel_budgets(recall_svc::Config::default().channels),
            follow_current_ms,
            ..recall_svc::Config::default()
        };
        let rank_config = rank_svc::Config {
            server: server_config(Service::Rank, &listeners[&Service::Rank]),
            bundle: bundle.clone(),
            follow_current_ms,
            feature: address(Service::Feature),
            ..rank_svc::Config::default()
        };
        let rerank_config = rerank_svc::Config {
            server: server_config(Service::Rerank, &listeners[&Service::Rerank]),
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
            let address = listener.api.local_addr()?;
            let admin_address = listener.admin.local_addr()?;
            let shutdown = async move {
                let _ = stopped.await;
            };
            let task = match service {
                Service::Feature => tokio::spawn(feature_svc::serve(listener, feature_config.clone(), shutdown)),
                Service::Recall => tokio::spawn(recall_svc::serve(listener, recall_config.clone(), shutdown)),
                Service::Rank | Service::RankCanary => {
                    let config = rank_svc::Config { server: server_config(service, &listener), ..rank_config.clone() };
                    tokio::spawn(rank_svc::serve(listener, config, shutdown))
                }
                Service::Rerank => tokio::spawn(rerank_svc::serve(listener, rerank_config.clone(), shutdown)),
                Service::Orchestrator => {
                    tokio::spawn(orchestrator::serve(listener, orchestrator_config.clone(), shutdown))
                }
            };
            services.insert(service, Running { address, admin_address, stop: Some(stop), task });
        }
        let mut cluster = Self { services, client_tls, bundle: bundle_dir, _state: state };
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

    pub fn admin_address(&self, service: Service) -> SocketAddr {
        self.services[&service].admin_address
    }

    /// A channel to the service's API port, over TLS when the cluster runs with it.
    pub fn channel(&self, service: Service) -> Channel {
        self.channel_to(self.address(service))
    }

    /// A channel to the service's admin port; calls need `operator()` (or, with TLS, the
    /// operator's certificate, which these channels present).
    pub fn admin_channel(&self, service: Service) -> Channel {
        self.channel_to(self.admin_address(service))
    }

    fn channel_to(&self, address: SocketAddr) -> Channel {
        recsys_runtime::client::lazy_channel(&address.to_string(), Duration::from_secs(1), &self.client_tls)
            .expect("loopback address is a valid endpoint")
    }

    /// Adds a line to the admin ports' token file (read on every admin call).
    pub fn add_token(&self, name: &str, token: &str) -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().append(true).open(self._state.path().join("admin-tokens"))?;
        writeln!(file, "{name}:{token}")
    }

    /// An interceptor adding the test operator's bearer token to admin calls.
    pub fn operator(&self) -> BearerToken {
        BearerToken::new(OPERATOR_TOKEN).expect("an ASCII token")
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
    for channel in recall_svc::Channel::ALL {
        if let Some(quota) = channels.quota_mut(channel) {
            quota.budget_ms = 2_000;
        }
    }
    channels
}

fn recsys_bundle_missing(root: &std::path::Path) -> bool {
    !root.join("manifest.json").is_file() && !root.join("current/manifest.json").is_file()
}
