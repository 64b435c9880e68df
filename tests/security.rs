//! Security through the real cluster: every admin RPC lives on its service's admin port
//! and needs an allowed operator (a bearer token, or with TLS a client certificate); with
//! TLS on, every hop is mutual TLS, plaintext is refused, and certificates rotate
//! without a restart.

use std::time::{Duration, Instant};

use cluster_tests::{Cluster, ClusterOptions, Service};
use recsys_proto::v1::{
    admin_client::AdminClient, catalog_admin_client::CatalogAdminClient, model_admin_client::ModelAdminClient,
    recommender_client::RecommenderClient, CatalogItem, GetTrafficSplitRequest, ListModelsRequest, RecommendRequest,
    UpsertItemsRequest,
};
use recsys_runtime::{admin_auth::BearerToken, certs::DevCerts, Tls};
use tonic::{transport::Channel, Code, Status};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// Adds `authorization: Bearer <token>` when there is a token.
fn bearer(token: Option<&str>) -> BearerToken {
    token.map_or_else(BearerToken::none, |token| BearerToken::new(token).unwrap())
}

/// One harmless admin call on `service`'s admin service, as `token` (or anonymously).
async fn admin_call(channel: Channel, service: Service, token: Option<&str>) -> Result<(), Status> {
    let interceptor = bearer(token);
    match service {
        Service::Orchestrator => {
            AdminClient::with_interceptor(channel, interceptor).get_traffic_split(GetTrafficSplitRequest {}).await?;
        }
        Service::Feature => {
            let item = CatalogItem { item_id: "security-test".into(), category: "probe".into(), ..Default::default() };
            CatalogAdminClient::with_interceptor(channel, interceptor)
                .upsert_items(UpsertItemsRequest { items: vec![item] })
                .await?;
        }
        Service::Recall | Service::Rank | Service::Rerank | Service::RankCanary => {
            ModelAdminClient::with_interceptor(channel, interceptor).list_models(ListModelsRequest {}).await?;
        }
    }
    Ok(())
}

fn recommend_request() -> RecommendRequest {
    RecommendRequest { user_id: "196".into(), top_k: 10, ..RecommendRequest::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rpcs_need_an_allowed_operator_on_the_admin_port() {
    let cluster = Cluster::start().await.expect("cluster starts");
    cluster.add_token("intruder", "known-but-not-allowed").unwrap();
    for service in Service::ALL {
        let admin = || cluster.admin_channel(service);
        let refused = admin_call(admin(), service, None).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{service:?} without identity: {refused:?}");
        let refused = admin_call(admin(), service, Some("guessed")).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{service:?} with an unknown token: {refused:?}");
        let refused = admin_call(admin(), service, Some("known-but-not-allowed")).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{service:?} as a disallowed operator: {refused:?}");
        admin_call(admin(), service, Some(cluster_tests::OPERATOR_TOKEN))
            .await
            .unwrap_or_else(|status| panic!("{service:?} as the operator: {status:?}"));

        // The API port does not serve admin services, whoever asks.
        let on_api_port = admin_call(cluster.channel(service), service, Some(cluster_tests::OPERATOR_TOKEN)).await;
        assert_eq!(on_api_port.unwrap_err().code(), Code::Unimplemented, "{service:?} admin on the API port");
        // Probes on the admin port need no identity.
        let health = HealthClient::new(admin()).check(HealthCheckRequest { service: String::new() }).await;
        assert!(health.is_ok(), "{service:?} admin-port health: {health:?}");
    }
}

async fn recommend(channel: Channel) -> Result<usize, Status> {
    let response = RecommenderClient::new(channel).recommend(recommend_request()).await?.into_inner();
    Ok(response.items.len())
}

fn plaintext_channel(address: std::net::SocketAddr) -> Channel {
    recsys_runtime::client::lazy_channel(&address.to_string(), Duration::from_secs(1), &Tls::plaintext()).unwrap()
}

fn tls_channel(address: std::net::SocketAddr, tls: &Tls) -> Channel {
    recsys_runtime::client::lazy_channel(&address.to_string(), Duration::from_secs(1), tls).unwrap()
}

/// Copies the certificate files as they are now (the "old" certificates of a rotation).
fn snapshot(certs: &DevCerts, to: &std::path::Path) -> DevCerts {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(&certs.dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    DevCerts { dir: to.to_path_buf() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_every_hop_is_mutual_tls_plaintext_is_refused_and_certificates_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["orchestrator", "feature-svc", "recall-svc", "rank-svc", "rerank-svc"];
    let certs = recsys_runtime::certs::write_dev_certs(&dir.path().join("certs"), &names, &[], &["operator"]).unwrap();
    let options = ClusterOptions { tls: Some(certs.clone()), ..ClusterOptions::default() };
    let cluster = Cluster::start_with(options).await.expect("cluster starts over TLS");
    let orchestrator = cluster.address(Service::Orchestrator);

    // End to end: the orchestrator reaches all four leaves over mTLS (a failed hop would
    // degrade the answer to the fallback list, which the debug flag would show).
    let served = recommend(cluster.channel(Service::Orchestrator)).await.expect("served over mTLS");
    assert_eq!(served, 10);
    let debug = RecommenderClient::new(cluster.channel(Service::Orchestrator))
        .recommend(RecommendRequest { debug: true, ..recommend_request() })
        .await
        .unwrap()
        .into_inner();
    assert!(debug.degraded_stages.is_empty(), "every stage answered over mTLS: {:?}", debug.degraded_stages);

    // Plaintext is refused, on the API port and on the admin port.
    for address in [orchestrator, cluster.admin_address(Service::Orchestrator), cluster.address(Service::Feature)] {
        // The client reads the TLS alert as a broken HTTP/2 frame, or finds the connection
        // closed (INTERNAL, UNKNOWN or UNAVAILABLE): either way nothing is served.
        let refused = recommend(plaintext_channel(address)).await;
        assert!(refused.is_err(), "plaintext to {address} was served: {refused:?}");
    }

    // The operator's certificate is an identity on the admin port; a service's is not.
    admin_call(cluster.admin_channel(Service::Orchestrator), Service::Orchestrator, None)
        .await
        .expect("the operator's certificate is allowed");
    let as_recall = Tls::load(&certs.tls_config("recall-svc", 100)).unwrap();
    let refused = admin_call(tls_channel(cluster.admin_address(Service::Rank), &as_recall), Service::Rank, None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // Rotation: a new CA and new certificates written over the old files. Within the
    // reload interval, new connections use them: a client holding only the old ones is
    // refused, one holding the new ones is served end to end — no restart.
    let old = snapshot(&certs, &dir.path().join("old"));
    let old_client = Tls::load(&old.tls_config("operator", 60_000)).unwrap();
    recsys_runtime::certs::write_dev_certs(&certs.dir, &names, &[], &["operator"]).unwrap();
    let new_client = Tls::load(&certs.tls_config("operator", 60_000)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let old_refused = recommend(tls_channel(orchestrator, &old_client)).await.is_err();
        let new_served = recommend(tls_channel(orchestrator, &new_client)).await;
        if old_refused && new_served.as_ref().is_ok_and(|&served| served == 10) {
            break;
        }
        assert!(Instant::now() < deadline, "certificates not rotated: old refused {old_refused}, new {new_served:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The hops between services still answer whole after the rotation.
    let debug = RecommenderClient::new(tls_channel(orchestrator, &new_client))
        .recommend(RecommendRequest { debug: true, user_id: "7".into(), ..recommend_request() })
        .await
        .unwrap()
        .into_inner();
    assert!(debug.degraded_stages.is_empty(), "{:?}", debug.degraded_stages);
}
