#[tokio::main]
async fn main() -> anyhow::Result<()> {
    recsys_runtime::run_service("rank-svc", "RECSYS_RANK", |config, listeners| {
        rank_svc::serve(listeners, config, recsys_runtime::server::shutdown_signal())
    })
    .await
}
