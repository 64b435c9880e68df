#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recsys_runtime::run_service("rerank-svc", "RECSYS_RERANK", |config, listener| {
        rerank_svc::serve(listener, config, recsys_runtime::server::shutdown_signal())
    })
    .await
}
