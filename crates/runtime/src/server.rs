//! Server bootstrap shared by every service: the same flags, configuration layering,
//! telemetry, gRPC health and reflection, and the same shutdown sequence
//! (SIGTERM → report NOT_SERVING → stop accepting → drain in-flight calls within a bound).
//! Every service listens on two ports: its API, and an admin port serving only its admin
//! services behind `admin_auth.rs`, so that a network policy can fence the admin port.

use std::{future::Future, path::PathBuf, pin::Pin, time::Duration};

use clap::Parser;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::{admin_auth::AdminConfig, connections::ConnectionConfig, tls::Tls, tls::TlsConfig};

/// Settings every server has; each service embeds this as its `[server]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// `host:port` to bind.
    pub listen: String,
    /// How long to keep answering after reporting NOT_SERVING, so that load balancers
    /// stop routing before the listener closes.
    pub not_serving_delay_ms: u64,
    /// Upper bound on waiting for in-flight calls once the listener is closed.
    pub drain_timeout_ms: u64,
    /// Largest request message accepted (bytes).
    pub max_message_bytes: usize,
    /// Requests handled at once; beyond it new requests are shed at once with
    /// RESOURCE_EXHAUSTED instead of queueing into their deadline. 0 = unlimited.
    pub max_concurrent_requests: usize,
    /// `host:port` of the Prometheus `/metrics` endpoint; empty disables it.
    pub metrics_listen: String,
    /// OTLP/gRPC collector for spans (e.g. `http://127.0.0.1:4317`); empty disables export.
    pub otlp_endpoint: String,
    /// Share of requests traced (head sampling at the root; callees follow the caller).
    /// 1% by default: at 10% the export cost about 10% of the p50 in
    /// `make bench-observability`, at 1% it is within noise.
    pub otlp_sample_ratio: f64,
    /// The admin port and who may call it.
    pub admin: AdminConfig,
    /// Mutual TLS on both ports and on every client channel.
    pub tls: TlsConfig,
    /// Limits on connections, so that idle or hostile ones cannot exhaust the server.
    pub connections: ConnectionConfig,
}

impl ServerConfig {
    /// The default of a service: its gRPC, admin and Prometheus addresses.
    pub fn with_addresses(listen: &str, admin_listen: &str, metrics_listen: &str) -> Self {
        Self {
            listen: listen.to_string(),
            metrics_listen: metrics_listen.to_string(),
            admin: AdminConfig { listen: admin_listen.to_string(), ..AdminConfig::default() },
            ..Self::default()
        }
    }

    /// `tls` is the process's loaded `[server.tls]`, shared with its client channels.
    pub fn serve_options(&self, tls: &Tls) -> ServeOptions {
        ServeOptions {
            not_serving_delay: Duration::from_millis(self.not_serving_delay_ms),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            max_concurrent_requests: self.max_concurrent_requests,
            metrics_listen: self.metrics_listen.clone(),
            tls: tls.clone(),
            connections: self.connections.clone(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".to_string(),
            not_serving_delay_ms: 500,
            drain_timeout_ms: 10_000,
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_requests: 0,
            metrics_listen: String::new(),
            otlp_endpoint: String::new(),
            otlp_sample_ratio: 0.01,
            admin: AdminConfig::default(),
            tls: TlsConfig::default(),
            connections: ConnectionConfig::default(),
        }
    }
}

/// Configuration types of the five services.
pub trait ServiceConfig: Serialize + DeserializeOwned + Default {
    fn server(&self) -> &ServerConfig;
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub not_serving_delay: Duration,
    pub drain_timeout: Duration,
    pub max_concurrent_requests: usize,
    /// Prometheus endpoint address; empty for none.
    pub metrics_listen: String,
    pub tls: Tls,
    pub connections: ConnectionConfig,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServerConfig::default().serve_options(&Tls::plaintext())
    }
}

/// A server's two bound ports.
#[derive(Debug)]
pub struct Listeners {
    pub api: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &ServerConfig) -> anyhow::Result<Self> {
        let bind = |address: String| async move {
            TcpListener::bind(&address).await.map_err(|error| anyhow::anyhow!("cannot bind {address}: {error}"))
        };
        Ok(Self { api: bind(config.listen.clone()).await?, admin: bind(config.admin.listen.clone()).await? })
    }

    /// Both on ephemeral loopback ports (tests).
    pub async fn loopback() -> std::io::Result<Self> {
        Ok(Self { api: TcpListener::bind("127.0.0.1:0").await?, admin: TcpListener::bind("127.0.0.1:0").await? })
    }

    /// `config` with `listen` and `admin.listen` set to these ports.
    pub fn configure(&self, config: &mut ServerConfig) {
        config.listen = self.api.local_addr().expect("bound").to_string();
        config.admin.listen = self.admin.local_addr().expect("bound").to_string();
    }
}

/// The services of one port: their fully qualified names (reported SERVING by health
/// checks and listed by reflection) and their routes.
pub struct Served {
    pub names: Vec<&'static str>,
    pub routes: Routes,
}

impl Served {
    pub fn new(names: &[&'static str], routes: Routes) -> Self {
        Self { names: names.to_vec(), routes }
    }
}

#[derive(Debug, Parser)]
struct ServiceArgs {
    /// TOML configuration file; environment variables `<PREFIX>__SECTION__KEY` override it.
    #[arg(long, env = "RECSYS_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

/// The `main` of every service: flags, configuration, telemetry, bind, then `start`
/// with the bound listener and a future that resolves on SIGTERM or Ctrl-C.
pub async fn run_service<C, F, Fut>(service: &'static str, env_prefix: &str, start: F) -> anyhow::Result<()>
where
    C: ServiceConfig,
    F: FnOnce(C, Listeners) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let args = ServiceArgs::parse();
    let config: C = crate::load_config(args.config.as_deref(), env_prefix)?;
    if args.print_config {
        println!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let _telemetry = crate::telemetry::init(service, &config.server().otlp_endpoint, config.server().otlp_sample_ratio);
    let listeners = Listeners::bind(config.server()).await?;
    tracing::info!(
        service,
        address = %listeners.api.local_addr()?,
        admin = %listeners.admin.local_addr()?,
        tls = config.server().tls.enabled,
        "listening"
    );
    let result = start(config, listeners).await;
    match &result {
        Ok(()) => tracing::info!(service, "stopped"),
        Err(error) => tracing::error!(service, error = %error, "failed"),
    }
    result
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C (a terminal).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on unix");
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Serves `api` on the API port and `admin` on the admin port, each with
/// `grpc.health.v1` and reflection (v1 and v1alpha, since grpcurl 1.8 speaks only
/// v1alpha), until `shutdown` resolves, then drains both.
pub async fn serve(
    listeners: Listeners,
    api: Served,
    admin: Served,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    if let Err(error) = crate::metrics::spawn_metrics_endpoint(&options.metrics_listen).await {
        tracing::error!(%error, address = %options.metrics_listen, "metrics endpoint not started");
    }
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let mut reported: Vec<String> = vec![String::new()];
    reported.extend(api.names.iter().chain(&admin.names).map(|name| name.to_string()));
    set_health(&health_reporter, &reported, ServingStatus::Serving).await;

    let stop_accepting = CancellationToken::new();
    let limit = match options.max_concurrent_requests {
        0 => tokio::sync::Semaphore::MAX_PERMITS,
        limit => limit,
    };
    let api_server = port_server(listeners.api, api, health_service.clone(), limit, &options, stop_accepting.clone());
    // Admin calls are few and must get through an overload: no concurrency limit there.
    let admin_server = port_server(
        listeners.admin,
        admin,
        health_service,
        tokio::sync::Semaphore::MAX_PERMITS,
        &options,
        stop_accepting.clone(),
    );
    let server = async move { tokio::try_join!(api_server, admin_server).map(|_| ()) };
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        () = shutdown => {}
    }
    tracing::info!("shutdown requested: reporting NOT_SERVING");
    set_health(&health_reporter, &reported, ServingStatus::NotServing).await;
    tokio::time::sleep(options.not_serving_delay).await;
    stop_accepting.cancel();
    match tokio::time::timeout(options.drain_timeout, server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                timeout_ms = options.drain_timeout.as_millis() as u64,
                "drain timed out; exiting with calls in flight"
            );
            Ok(())
        }
    }
}

async fn set_health(reporter: &HealthReporter, names: &[String], status: ServingStatus) {
    for name in names {
        reporter.set_service_status(name, status).await;
    }
}

type ServerFuture = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// One port's server: its routes plus health and reflection, behind the shared layers,
/// over plaintext or TLS connections (`connections.rs`), until `stop_accepting`.
fn port_server(
    listener: TcpListener,
    served: Served,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    limit: usize,
    options: &ServeOptions,
    stop_accepting: CancellationToken,
) -> ServerFuture {
    let reflection_v1 =
        reflection_builder(&served.names).build_v1().expect("the compiled-in descriptor sets are valid");
    let reflection_v1alpha =
        reflection_builder(&served.names).build_v1alpha().expect("the compiled-in descriptor sets are valid");
    let routes = served.routes.add_service(health).add_service(reflection_v1).add_service(reflection_v1alpha);
    let label: &'static str = service_label(&served.names);
    // Series exist from the start (at zero), so alerts and rates see them before any shed.
    crate::metrics::LOAD_SHED.with_label_values(&[label]).inc_by(0);
    let connections = &options.connections;
    let millis = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(connections.max_concurrent_streams)
        .http2_max_header_list_size(connections.max_header_list_bytes)
        .http2_keepalive_interval(millis(connections.keepalive_interval_ms))
        .http2_keepalive_timeout(millis(connections.keepalive_timeout_ms));
    if let Some(age) = millis(connections.max_connection_age_ms) {
        // GOAWAY after the age; in-flight calls finish. (No `max_connection_age_grace`:
        // with it tonic skips the GOAWAY and cuts the connection at age + grace.)
        builder = builder.max_connection_age(age);
    }
    // Layers, outermost first: the span and metrics of each call (outermost, so it sees
    // shed requests and rewritten statuses), the oversized-status rewrite, then load
    // shedding with the concurrency limit (`shed.rs`: refused at once rather than queued,
    // and never a health or reflection call).
    let router = builder
        .layer(crate::observe::ObserveLayer::new(label))
        .layer(tower::util::MapResponseLayer::new(crate::oversized::rewrite_oversized_status))
        .layer(crate::shed::ShedLayer::new(limit))
        .add_routes(routes);
    let stopped = stop_accepting.cancelled_owned();
    match options.tls.clone() {
        tls if tls.is_enabled() => {
            let incoming = crate::connections::incoming(listener, label, connections, move |stream| {
                let acceptor = tls.acceptor();
                async move {
                    let acceptor = acceptor.ok_or_else(|| std::io::Error::other("TLS is off"))?;
                    crate::connections::http2_preface_in(acceptor.accept(stream).await?).await
                }
            });
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        _ => {
            let incoming =
                crate::connections::incoming(listener, label, connections, crate::connections::http2_preface);
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    }
}

/// The metrics label of a server: the short name of its first service
/// (`recsys.v1.RankService` → `RankService`), leaked once per server start.
fn service_label(service_names: &[&str]) -> &'static str {
    let name = service_names.first().map_or("unknown", |name| name.rsplit('.').next().unwrap_or(name));
    Box::leak(name.to_string().into_boxed_str())
}

/// Reflection over every recsys proto, advertising only what this server serves
/// (the descriptor set holds all five services' definitions).
fn reflection_builder<'a>(service_names: &[&'static str]) -> tonic_reflection::server::Builder<'a> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(recsys_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health");
    for name in service_names {
        builder = builder.with_service_name(*name);
    }
    builder
}
