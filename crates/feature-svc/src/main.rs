#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recsys_runtime::run_service("feature-svc", "RECSYS_FEATURE", |config, listener| {
        feature_svc::serve(listener, config, recsys_runtime::server::shutdown_signal())
    })
    .await
}
