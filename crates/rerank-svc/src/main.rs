#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recsys_runtime::run_service("rerank-svc", "RECSYS_RERANK", |config, listeners| {
        rerank_svc::serve(listeners, config, recsys_runtime::server::shutdown_signal())
    })
    .await
}
