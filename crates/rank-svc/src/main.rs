#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recsys_runtime::run_service("rank-svc", "RECSYS_RANK", |config, listener| {
        rank_svc::serve(listener, config, recsys_runtime::server::shutdown_signal())
    })
    .await
}
