//! A real SIGTERM to a serving process: health turns NOT_SERVING while the listener is
//! still open (so load balancers stop routing), and a call already in flight finishes.
//! Its own test binary, because the signal goes to the whole process.

use std::time::Duration;

use recsys_proto::v1::{
    rerank_service_client::RerankServiceClient,
    rerank_service_server::{RerankService, RerankServiceServer},
    RerankRequest, RerankResponse, RerankedItem,
};
use recsys_runtime::{Listeners, ServeOptions, Served};
use tonic::{transport::Channel, Request, Response, Status};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

/// Takes a while to answer, so a call is in flight when the signal arrives.
struct SlowRerank;

#[tonic::async_trait]
impl RerankService for SlowRerank {
    async fn rerank(&self, _: Request<RerankRequest>) -> Result<Response<RerankResponse>, Status> {
        tokio::time::sleep(Duration::from_millis(800)).await;
        Ok(Response::new(RerankResponse {
            items: vec![RerankedItem { item_id: "finished".into(), score: 1.0, rerank_score: 1.0, rules: Vec::new() }],
        }))
    }
}

async fn health(channel: Channel) -> Result<i32, Status> {
    let request = HealthCheckRequest { service: "recsys.v1.RerankService".into() };
    Ok(HealthClient::new(channel).check(request).await?.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reports_not_serving_and_lets_an_in_flight_call_finish() {
    let listeners = Listeners::loopback().await.unwrap();
    let address = listeners.api.local_addr().unwrap();
    let options = ServeOptions {
        not_serving_delay: Duration::from_millis(400),
        drain_timeout: Duration::from_secs(5),
        ..ServeOptions::default()
    };
    let api =
        Served::new(&["recsys.v1.RerankService"], tonic::service::Routes::new(RerankServiceServer::new(SlowRerank)));
    let admin = Served::new(&[], tonic::service::Routes::default());
    let server =
        tokio::spawn(recsys_runtime::serve(listeners, api, admin, options, recsys_runtime::server::shutdown_signal()));
    let channel = Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap();
    assert_eq!(health(channel.clone()).await.unwrap(), ServingStatus::Serving as i32);

    let in_flight = tokio::spawn({
        let channel = channel.clone();
        async move { RerankServiceClient::new(channel).rerank(RerankRequest { top_k: 1, ..Default::default() }).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = std::process::Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status().unwrap();
    assert!(sent.success());

    // Within the not-serving delay the server still answers, and says it is going away.
    let mut status = ServingStatus::Serving as i32;
    for _ in 0..30 {
        status = health(channel.clone()).await.unwrap();
        if status != ServingStatus::Serving as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, ServingStatus::NotServing as i32);

    let answer = in_flight.await.unwrap().expect("the in-flight call finishes during the drain");
    assert_eq!(answer.into_inner().items[0].item_id, "finished");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server exits after the drain")
        .unwrap()
        .unwrap();
}
