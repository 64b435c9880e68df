#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recsys_runtime::run_service("orchestrator", "RECSYS_ORCHESTRATOR", |config, listeners| {
        orchestrator::serve(listeners, config, recsys_runtime::server::shutdown_signal())
    })
    .await
}
