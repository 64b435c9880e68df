//! Server bootstrap shared by every service: the same flags, configuration layering,
//! telemetry, gRPC health and reflection, and the same shutdown sequence
//! (SIGTERM → report NOT_SERVING → stop accepting → drain in-flight calls within a bound).

use std::{future::Future, path::PathBuf, time::Duration};

use clap::Parser;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::ServingStatus;

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
}

impl ServerConfig {
    /// The default of a service: its gRPC and Prometheus addresses.
    pub fn with_addresses(listen: &str, metrics_listen: &str) -> Self {
        Self { listen: listen.to_string(), metrics_listen: metrics_listen.to_string(), ..Self::default() }
    }

    pub fn serve_options(&self) -> ServeOptions {
        ServeOptions {
            not_serving_delay: Duration::from_millis(self.not_serving_delay_ms),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            max_concurrent_requests: self.max_concurrent_requests,
            metrics_listen: self.metrics_listen.clone(),
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
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServerConfig::default().serve_options()
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
    F: FnOnce(C, TcpListener) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let args = ServiceArgs::parse();
    let config: C = crate::load_config(args.config.as_deref(), env_prefix)?;
    if args.print_config {
        println!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let _telemetry = crate::telemetry::init(service, &config.server().otlp_endpoint, config.server().otlp_sample_ratio);
    let listen = config.server().listen.clone();
    let listener =
        TcpListener::bind(&listen).await.map_err(|error| anyhow::anyhow!("cannot bind {listen}: {error}"))?;
    tracing::info!(service, address = %listener.local_addr()?, "listening");
    let result = start(config, listener).await;
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

/// Serves `routes` plus `grpc.health.v1` and reflection (v1 and v1alpha, since grpcurl 1.8
/// speaks only v1alpha) on `listener` until `shutdown` resolves, then drains.
///
/// `service_names` are the fully qualified names reported as SERVING by health checks.
pub async fn serve(
    listener: TcpListener,
    service_names: &[&str],
    routes: Routes,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    if let Err(error) = crate::metrics::spawn_metrics_endpoint(&options.metrics_listen).await {
        tracing::error!(%error, address = %options.metrics_listen, "metrics endpoint not started");
    }
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let mut reported: Vec<String> = vec![String::new()];
    reported.extend(service_names.iter().map(|name| name.to_string()));
    for name in &reported {
        health_reporter.set_service_status(name, ServingStatus::Serving).await;
    }
    let reflection_v1 =
        reflection_builder(service_names).build_v1().expect("the compiled-in descriptor sets are valid");
    let reflection_v1alpha =
        reflection_builder(service_names).build_v1alpha().expect("the compiled-in descriptor sets are valid");
    let routes = routes.add_service(health_service).add_service(reflection_v1).add_service(reflection_v1alpha);

    let (stop_accepting, stop_accepting_rx) = tokio::sync::oneshot::channel::<()>();
    // Layers, outermost first: the span and metrics of each call (outermost, so it sees
    // shed requests and rewritten statuses), the oversized-status rewrite, then load
    // shedding with the concurrency limit (`shed.rs`: refused at once rather than queued,
    // and never a health or reflection call).
    let limit = match options.max_concurrent_requests {
        0 => tokio::sync::Semaphore::MAX_PERMITS,
        limit => limit,
    };
    let label: &'static str = service_label(service_names);
    // Series exist from the start (at zero), so alerts and rates see them before any shed.
    crate::metrics::LOAD_SHED.with_label_values(&[label]).inc_by(0);
    let server = tonic::transport::Server::builder()
        .layer(crate::observe::ObserveLayer::new(label))
        .layer(tower::util::MapResponseLayer::new(crate::oversized::rewrite_oversized_status))
        .layer(crate::shed::ShedLayer::new(limit))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming(listener), async move {
            let _ = stop_accepting_rx.await;
        });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        () = shutdown => {}
    }
    tracing::info!("shutdown requested: reporting NOT_SERVING");
    for name in &reported {
        health_reporter.set_service_status(name, ServingStatus::NotServing).await;
    }
    tokio::time::sleep(options.not_serving_delay).await;
    let _ = stop_accepting.send(());
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

/// The metrics label of a server: the short name of its first service
/// (`recsys.v1.RankService` → `RankService`), leaked once per server start.
fn service_label(service_names: &[&str]) -> &'static str {
    let name = service_names.first().map_or("unknown", |name| name.rsplit('.').next().unwrap_or(name));
    Box::leak(name.to_string().into_boxed_str())
}

/// Accepted connections with Nagle's algorithm off: gRPC writes small frames, and Nagle
/// plus delayed ACKs would add tens of milliseconds to a call.
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Reflection over every recsys proto, advertising only what this server serves
/// (the descriptor set holds all five services' definitions).
fn reflection_builder<'a>(service_names: &[&str]) -> tonic_reflection::server::Builder<'a> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(recsys_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health");
    for name in service_names {
        builder = builder.with_service_name(*name);
    }
    builder
}
