//! Commands that talk to a running cluster.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use recsys_proto::v1::{
    admin_client::AdminClient, recommender_client::RecommenderClient, Event, EventType, GetTrafficSplitRequest,
    LogEventsRequest, PromoteCanaryRequest, RecommendRequest, RollbackCanaryRequest, SetCanaryShareRequest,
};

use crate::{access::Access, canary_analysis, CanaryCommand as CanaryAction, CatalogCommand, ModelCommand};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

pub async fn wait_ready(access: &Access, addresses: &[String], timeout_s: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    for address in addresses {
        loop {
            if serving(access, address).await {
                println!("  {address} SERVING");
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!("{address} is not SERVING after {timeout_s}s");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

async fn serving(access: &Access, address: &str) -> bool {
    let Ok(channel) = access.channel(address) else {
        return false;
    };
    let mut client = HealthClient::new(channel);
    client
        .check(HealthCheckRequest { service: String::new() })
        .await
        .is_ok_and(|response| response.into_inner().status == ServingStatus::Serving as i32)
}

pub async fn recommend(
    access: &Access,
    address: &str,
    user: &str,
    top_k: u32,
    debug: bool,
    bundle: &Path,
) -> anyhow::Result<()> {
    let titles: HashMap<String, String> = recsys_bundle::resolve_dir(bundle)
        .and_then(|dir| recsys_bundle::read_catalog(&dir))
        .map(|catalog| catalog.into_iter().map(|item| (item.id, item.title)).collect())
        .unwrap_or_default();
    let mut client = RecommenderClient::new(access.channel(address)?);
    let response = client
        .recommend(RecommendRequest { user_id: user.to_string(), top_k, debug, ..RecommendRequest::default() })
        .await?
        .into_inner();
    println!(
        "top {} for user {user} (model {}, request {}{})",
        response.items.len(),
        response.model_version,
        response.request_id,
        if response.degraded_stages.is_empty() {
            String::new()
        } else {
            format!(", degraded: {}", response.degraded_stages.join(","))
        }
    );
    println!("{:>4}  {:>7}  {:>8}  title", "rank", "item", "score");
    for item in &response.items {
        let title = titles.get(&item.item_id).map_or("?", String::as_str);
        print!("{:>4}  {:>7}  {:>8.4}  {title}", item.rank, item.item_id, item.score);
        if let Some(trace) = &item.trace {
            let rules: Vec<String> = trace
                .rules
                .iter()
                .map(|effect| match effect.position {
                    0 => format!(
                        "{} {} {:.3}→{:.3}",
                        effect.rule, effect.action, effect.score_before, effect.score_after
                    ),
                    slot => format!("{} {} @{slot}", effect.rule, effect.action),
                })
                .collect();
            print!(
                "   [{}; coarse {:.3}, fine {:.3}{}]",
                trace.recall_channels.join("+"),
                trace.coarse_score,
                trace.fine_score,
                if rules.is_empty() { String::new() } else { format!("; rules: {}", rules.join(", ")) }
            );
        }
        println!();
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub async fn log_event(
    access: &Access,
    address: &str,
    user: &str,
    item: &str,
    kind: &str,
    request_id: &str,
    value: f32,
    experiments: &[String],
) -> anyhow::Result<()> {
    let experiments = experiments
        .iter()
        .map(|pair| {
            let (layer, variant) =
                pair.split_once('=').with_context(|| format!("--experiment {pair:?} is not layer=variant"))?;
            Ok(recsys_proto::v1::ExperimentAssignment { layer: layer.to_string(), variant: variant.to_string() })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let event_type = EventType::from_name(kind).with_context(|| format!("unknown event type {kind:?}"))?;
    let timestamp_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let mut client = RecommenderClient::new(access.channel(address)?);
    let response = client
        .log_events(LogEventsRequest {
            events: vec![Event {
                user_id: user.to_string(),
                item_id: item.to_string(),
                r#type: event_type as i32,
                timestamp_ms,
                request_id: request_id.to_string(),
                value,
                experiments,
                // One id per invocation: the call may be retried by the transport, not counted twice.
                event_id: format!("recsysctl-{user}-{item}-{timestamp_ms}"),
            }],
        })
        .await?
        .into_inner();
    println!("accepted {}", response.accepted);
    for rejected in response.rejected {
        println!("rejected: {}", rejected.reason);
    }
    Ok(())
}

/// `address` is feature-svc's API port (changes), `admin_address` its admin port (writes).
pub async fn catalog(
    access: &Access,
    address: &str,
    admin_address: &str,
    command: CatalogCommand,
) -> anyhow::Result<()> {
    use recsys_proto::v1::{
        catalog_admin_client::CatalogAdminClient, catalog_service_client::CatalogServiceClient, Availability,
        CatalogChangesRequest, CatalogItem, RetireItemsRequest, UpsertItemsRequest,
    };
    let mut client = CatalogServiceClient::new(access.channel(address)?);
    let mut admin = CatalogAdminClient::with_interceptor(access.channel(admin_address)?, access.operator()?);
    match command {
        CatalogCommand::Upsert { item, availability, promoted, published, category, attributes } => {
            let availability = match availability.as_deref() {
                None => Availability::Unspecified,
                Some("in_stock") => Availability::InStock,
                Some("out_of_stock") => Availability::OutOfStock,
                Some(other) => anyhow::bail!("--availability {other:?}: in_stock or out_of_stock"),
            };
            let publish_time_ms = match published.as_deref() {
                None => 0,
                Some("now") => SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64,
                Some(ms) => ms.parse().with_context(|| format!("--published {ms:?}: Unix ms or `now`"))?,
            };
            let attributes = attributes
                .iter()
                .map(|pair| {
                    let (name, value) =
                        pair.split_once('=').with_context(|| format!("--attr {pair:?} is not name=value"))?;
                    Ok((name.to_string(), value.to_string()))
                })
                .collect::<anyhow::Result<_>>()?;
            let record = CatalogItem {
                item_id: item.clone(),
                availability: availability as i32,
                promoted,
                publish_time_ms,
                category,
                attributes,
                ..CatalogItem::default()
            };
            let revision = admin.upsert_items(UpsertItemsRequest { items: vec![record] }).await?.into_inner().revision;
            println!("upserted {item} (catalogue revision {revision})");
        }
        CatalogCommand::Retire { items } => {
            let count = items.len();
            let revision = admin.retire_items(RetireItemsRequest { item_ids: items }).await?.into_inner().revision;
            println!("retired {count} items (catalogue revision {revision})");
        }
        CatalogCommand::Changes { since } => {
            let mut since = since;
            loop {
                let page = client.catalog_changes(CatalogChangesRequest { since_revision: since, limit: 0 }).await?;
                let page = page.into_inner();
                for item in &page.items {
                    println!("{}", serde_json::to_string(&catalog_json(item))?);
                }
                since = page.revision;
                if !page.more {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// One catalogue record as a JSON line.
fn catalog_json(item: &recsys_proto::v1::CatalogItem) -> serde_json::Value {
    serde_json::json!({
        "item_id": item.item_id,
        "revision": item.revision,
        "availability": item.availability().as_str_name(),
        "promoted": item.promoted,
        "publish_time_ms": item.publish_time_ms,
        "category": item.category,
        "attributes": item.attributes,
        "retired": item.retired,
    })
}

pub async fn canary(access: &Access, address: &str, action: CanaryAction) -> anyhow::Result<()> {
    let mut client = AdminClient::with_interceptor(access.channel(address)?, access.operator()?);
    let split = match action {
        CanaryAction::Analyze {
            prometheus,
            window,
            min_requests,
            max_error_rate,
            max_p99_ratio,
            p99_floor_ms,
            step,
            max_share,
            apply,
            stable_selector,
            canary_selector,
            helm_release,
            chart,
            namespace,
        } => {
            use canary_analysis::{analyze, Sides, Steps, Thresholds, Verdict};
            let thresholds = Thresholds { window, min_requests, max_error_rate, max_p99_ratio, p99_floor_ms };
            let steps = step.map(|step_percent| Steps { step_percent, max_percent: max_share });
            let (sides, helm) = match (stable_selector, canary_selector) {
                (Some(stable), Some(canary)) => {
                    let helm = helm_release.map(|release| HelmRelease { release, chart, namespace });
                    (Sides::Selectors { stable, canary }, helm)
                }
                _ => (Sides::Tracks, None),
            };
            let share = match (&sides, &helm) {
                (Sides::Tracks, _) => {
                    client.get_traffic_split(GetTrafficSplitRequest {}).await?.into_inner().canary_share_percent
                }
                (Sides::Selectors { .. }, Some(helm)) => helm.canary_weight()?,
                (Sides::Selectors { .. }, None) => 0.0,
            };
            let analysis = analyze(&prometheus, &sides, &thresholds, share, steps).await?;
            println!("{:<8} {:>10} {:>11} {:>9}", "side", "requests", "error rate", "p99 ms");
            for (name, side) in [("stable", &analysis.stable), ("canary", &analysis.canary)] {
                let p99 = side.p99_ms.map_or("-".to_string(), |ms| format!("{ms:.1}"));
                println!("{name:<8} {:>10.0} {:>11.4} {p99:>9}", side.requests, side.error_rate);
            }
            let reason = match &analysis.verdict {
                Verdict::Hold(reason) | Verdict::Rollback(reason) => format!(": {reason}"),
                Verdict::Step(share) => format!(": canary share to {share}%"),
                Verdict::Promote => String::new(),
            };
            println!("verdict {}{reason} (canary share now {share}%)", analysis.verdict.name());
            if !apply || matches!(analysis.verdict, Verdict::Hold(_)) {
                return Ok(());
            }
            if let Sides::Selectors { .. } = sides {
                let helm = helm.context("--apply on a whole-stack canary needs --helm-release")?;
                let weight = match analysis.verdict {
                    Verdict::Step(share) => share,
                    Verdict::Promote => 100.0,
                    _ => 0.0,
                };
                return helm.set_canary_weight(weight);
            }
            match analysis.verdict {
                Verdict::Step(share) => client.set_canary_share(SetCanaryShareRequest { share_percent: share }).await?,
                Verdict::Promote => client.promote_canary(PromoteCanaryRequest {}).await?,
                _ => client.rollback_canary(RollbackCanaryRequest {}).await?,
            }
        }
        CanaryAction::Status => client.get_traffic_split(GetTrafficSplitRequest {}).await?,
        CanaryAction::SetShare { percent } => {
            client.set_canary_share(SetCanaryShareRequest { share_percent: percent }).await?
        }
        CanaryAction::Promote => client.promote_canary(PromoteCanaryRequest {}).await?,
        CanaryAction::Rollback => client.rollback_canary(RollbackCanaryRequest {}).await?,
    }
    .into_inner();
    println!("stable  {}", split.stable_address);
    if split.canary_address.is_empty() {
        println!("canary  (none)");
    } else {
        println!("canary  {} ({}% of users)", split.canary_address, split.canary_share_percent);
    }
    println!(
        "{:<8} {:<28} {:>9} {:>13} {:>8} {:>8}",
        "track", "model", "requests", "rank failures", "p50 ms", "p99 ms"
    );
    for track in split.tracks {
        println!(
            "{:<8} {:<28} {:>9} {:>13} {:>8.2} {:>8.2}",
            track.track,
            track.model_version,
            track.requests,
            track.rank_failures,
            track.latency_p50_ms,
            track.latency_p99_ms
        );
    }
    Ok(())
}

pub async fn model(access: &Access, address: &str, action: ModelCommand) -> anyhow::Result<()> {
    use recsys_proto::v1::{
        model_admin_client::ModelAdminClient, ListModelsRequest, LoadModelRequest, RetireModelRequest,
    };
    let mut client = ModelAdminClient::with_interceptor(access.channel(address)?, access.operator()?);
    let versions = match action {
        ModelCommand::List => client.list_models(ListModelsRequest {}).await,
        ModelCommand::Load { version, current, force } => {
            client
                .load_model(LoadModelRequest { version: version.unwrap_or_default(), make_current: current, force })
                .await
        }
        ModelCommand::Retire { version } => client.retire_model(RetireModelRequest { version }).await,
    }
    .map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))?
    .into_inner();
    println!("{} at {address}", versions.service);
    println!("{:<8} {:<28} {:<26} {:>9} {:>9}", "", "version", "created", "fine_auc", "coarse_auc");
    for version in versions.versions {
        let metric = |name: &str| version.metrics.get(name).map_or("-".to_string(), |value| format!("{value:.4}"));
        println!(
            "{:<8} {:<28} {:<26} {:>9} {:>9}",
            if version.current { "current" } else { "" },
            version.version,
            version.created_at,
            metric("fine_auc"),
            metric("coarse_auc")
        );
    }
    Ok(())
}

/// Writes feature-svc's event log to `out` as JSON lines (the training pipeline's
/// `merge-events` and `ab report` read them): one event per line, types by name.
pub async fn export_events(
    access: &Access,
    address: &str,
    out: &Path,
    since_ms: i64,
    until_ms: i64,
) -> anyhow::Result<()> {
    use std::io::Write;
    let mut client = recsys_proto::v1::feature_service_client::FeatureServiceClient::new(access.channel(address)?)
        .max_decoding_message_size(64 << 20);
    let mut pages =
        client.export_events(recsys_proto::v1::ExportEventsRequest { since_ms, until_ms }).await?.into_inner();
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Written to a temporary name first: a failed export never leaves a partial file
    // where training would read it.
    let partial = out.with_extension("partial");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&partial)?);
    let mut count = 0u64;
    while let Some(page) = pages.message().await? {
        for event in page.events {
            let kind = EventType::try_from(event.r#type).unwrap_or(EventType::Unspecified);
            let experiments: serde_json::Map<String, serde_json::Value> =
                event.experiments.into_iter().map(|a| (a.layer, serde_json::Value::String(a.variant))).collect();
            let line = serde_json::json!({
                "user_id": event.user_id,
                "item_id": event.item_id,
                "event": kind.name(),
                "timestamp_ms": event.timestamp_ms,
                "request_id": event.request_id,
                "value": event.value,
                "experiments": experiments,
                "event_id": event.event_id,
            });
            serde_json::to_writer(&mut file, &line)?;
            file.write_all(b"\n")?;
            count += 1;
        }
    }
    file.flush()?;
    drop(file);
    std::fs::rename(&partial, out)?;
    println!("exported {count} events to {}", out.display());
    Ok(())
}

/// The stable release of a whole-stack canary, whose GRPCRoute weight is the canary's share.
struct HelmRelease {
    release: String,
    chart: std::path::PathBuf,
    namespace: Option<String>,
}

impl HelmRelease {
    fn helm(&self) -> std::process::Command {
        let mut command = std::process::Command::new(std::env::var("RECSYS_HELM").unwrap_or_else(|_| "helm".into()));
        if let Some(namespace) = &self.namespace {
            command.args(["--namespace", namespace]);
        }
        command
    }

    /// `gateway.canaryWeight` of the release's current values.
    fn canary_weight(&self) -> anyhow::Result<f64> {
        let output = self.helm().args(["get", "values", &self.release, "--all", "-o", "json"]).output()?;
        anyhow::ensure!(output.status.success(), "helm get values: {}", String::from_utf8_lossy(&output.stderr));
        let values: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        Ok(values["gateway"]["canaryWeight"].as_f64().unwrap_or(0.0))
    }

    fn set_canary_weight(&self, weight: f64) -> anyhow::Result<()> {
        let weight = format!("gateway.canaryWeight={}", weight.round() as u32);
        println!("helm upgrade {} {} --reuse-values --set {weight}", self.release, self.chart.display());
        let status = self
            .helm()
            .args(["upgrade", &self.release])
            .arg(&self.chart)
            .args(["--reuse-values", "--set", &weight])
            .status()?;
        anyhow::ensure!(status.success(), "helm upgrade failed");
        Ok(())
    }
}
