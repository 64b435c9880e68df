#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recsys_runtime::run_service("orchestrator", "RECSYS_ORCHESTRATOR", |config, listener| {
        orchestrator::serve(listener, config, recsys_runtime::server::shutdown_signal())
    })
    .await
}
