#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recsys_runtime::run_service("recall-svc", "RECSYS_RECALL", |config, listeners| {
        recall_svc::serve(listeners, config, recsys_runtime::server::shutdown_signal())
    })
    .await
}
