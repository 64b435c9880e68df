//! One `Recommend` is one trace: spans from all five services, linked parent to child,
//! received by an in-process OTLP collector. (Its own test binary: the tracer provider
//! and subscriber are process-wide.)

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use cluster_tests::{Cluster, Service};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use recsys_proto::v1::{recommender_client::RecommenderClient, RecommendRequest};

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(value) => Some(value.clone()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_recommend_is_one_trace_across_all_five_services() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let telemetry = recsys_runtime::telemetry::init("cluster-test", &endpoint, 1.0);

    let cluster = Cluster::start().await.expect("cluster starts");
    let mut client = RecommenderClient::new(cluster.channel(Service::Orchestrator));
    let response = client
        .recommend(RecommendRequest { user_id: "196".into(), top_k: 10, ..RecommendRequest::default() })
        .await
        .expect("recommend succeeds")
        .into_inner();
    assert!(response.degraded_stages.is_empty());

    let mut spans = Vec::new();
    for _ in 0..50 {
        telemetry.flush();
        spans = collector.spans.lock().unwrap().clone();
        if spans.iter().any(|s| s.name == "recsys.v1.Recommender/Recommend") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let root =
        spans.iter().find(|s| s.name == "recsys.v1.Recommender/Recommend").expect("the Recommend span was exported");
    assert!(root.parent_span_id.is_empty(), "the orchestrator's server span is the root");
    let trace: Vec<&Span> = spans.iter().filter(|s| s.trace_id == root.trace_id).collect();
    let by_id: HashMap<&[u8], &Span> = trace.iter().map(|s| (s.span_id.as_slice(), *s)).collect();

    let services: HashSet<String> = trace.iter().filter_map(|s| attribute(s, "rpc.service")).collect();
    for expected in [
        "recsys.v1.Recommender",
        "recsys.v1.FeatureService",
        "recsys.v1.RecallService",
        "recsys.v1.RankService",
        "recsys.v1.RerankService",
    ] {
        assert!(services.contains(expected), "no {expected} span in the trace: {services:?}");
    }
    // Every span but the root has its parent in the same trace, and every leaf server span
    // hangs under the orchestrator's stage span for it — but the window's item counts,
    // which rerank reads from feature-svc under its `item_counts` span.
    for span in &trace {
        if span.span_id == root.span_id {
            continue;
        }
        let parent = by_id
            .get(span.parent_span_id.as_slice())
            .unwrap_or_else(|| panic!("{} has no parent in the trace", span.name));
        if let Some(service) = attribute(span, "rpc.service").filter(|s| s != "recsys.v1.Recommender") {
            let expected = if parent.name == "item_counts" { "item_counts" } else { "stage" };
            assert_eq!(parent.name, expected, "{service} server span's parent is {}", parent.name);
        }
    }
    for stage in
        ["coarse", "fine", "rules_and_mmr", "item_counts", "item_feature_read", "feature_read", "recall_channel"]
    {
        assert!(trace.iter().any(|s| s.name == stage), "no {stage} span in the trace");
    }
}
