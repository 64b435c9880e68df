#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recsys_runtime::run_service("recall-svc", "RECSYS_RECALL", |config, listener| {
        recall_svc::serve(listener, config, recsys_runtime::server::shutdown_signal())
    })
    .await
}
