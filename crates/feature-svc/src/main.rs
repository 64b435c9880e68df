#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recsys_runtime::run_service("feature-svc", "RECSYS_FEATURE", |config, listeners| {
        feature_svc::serve(listeners, config, recsys_runtime::server::shutdown_signal())
    })
    .await
}
