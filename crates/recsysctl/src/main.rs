//! `recsysctl`: the operator's command line for a running cluster and its bundles.

#![forbid(unsafe_code)]

mod ab;
mod access;
mod bundle;
use recsysctl::canary_analysis;
mod chart;
mod cluster;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "recsysctl", about = "Operate a recsys cluster")]
struct Cli {
    #[command(flatten)]
    access: access::Access,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Wait until every address reports SERVING on grpc.health.v1.
    WaitReady {
        /// host:port of each service.
        #[arg(required = true)]
        addresses: Vec<String>,
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Ask the orchestrator for a user's top-k and print it with titles.
    Recommend {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 10)]
        top_k: u32,
        #[arg(long)]
        debug: bool,
        /// Bundle (or bundle root) whose catalog gives titles.
        #[arg(long, default_value = "models/bundles")]
        bundle: PathBuf,
    },
    /// Send one feedback event through the orchestrator.
    LogEvent {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: String,
        #[arg(long)]
        user: String,
        #[arg(long)]
        item: String,
        /// impression, click, like, rating or purchase.
        #[arg(long, default_value = "click")]
        r#type: String,
        #[arg(long, default_value = "")]
        request_id: String,
        #[arg(long, default_value_t = 0.0)]
        value: f32,
        /// Experiment assignment of the response the event answers, as layer=variant (repeatable).
        #[arg(long = "experiment")]
        experiments: Vec<String>,
    },
    /// Model bundle operations.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Write feature-svc's event log as JSON lines: training data for `python -m
    /// recsys_training merge-events` and the input of `ab report`.
    ExportEvents {
        /// feature-svc's address.
        #[arg(long, default_value = "127.0.0.1:50052")]
        addr: String,
        #[arg(long, default_value = "data/state/exported-events.jsonl")]
        out: PathBuf,
        /// Only events at or after this Unix millisecond (0: from the start).
        #[arg(long, default_value_t = 0)]
        since_ms: i64,
        /// Only events before this Unix millisecond (0: to the end).
        #[arg(long, default_value_t = 0)]
        until_ms: i64,
    },
    /// A/B experiment analysis.
    Ab {
        #[command(subcommand)]
        command: AbCommand,
    },
    /// Draw the ablation of an offline evaluation report (`make eval`) as a PNG bar chart
    /// of nDCG@10 per pipeline step with its 95% interval.
    EvalChart {
        #[arg(long, default_value = "target/reports/eval-ml100k.json")]
        report: PathBuf,
        #[arg(long, default_value = "target/reports/eval-ml100k-ablation.png")]
        out: PathBuf,
    },
    /// Bundle versions loaded by a bundle consumer (recall-svc, rank-svc or rerank-svc,
    /// addressed on its admin port): list them, load one (and make it current), retire one.
    Model {
        /// host:port of the service's admin port (rank-svc's by default).
        #[arg(long, default_value = "127.0.0.1:50064")]
        addr: String,
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Canary traffic split of the rank stage (orchestrator Admin service, on its admin port).
    Canary {
        #[arg(long, default_value = "127.0.0.1:50061")]
        addr: String,
        #[command(subcommand)]
        command: CanaryCommand,
    },
    /// The run-time catalogue (feature-svc's CatalogService): item metadata that recall
    /// and rerank apply within a second, without a new bundle.
    Catalog {
        /// host:port of feature-svc (reading changes).
        #[arg(long, default_value = "127.0.0.1:50052")]
        addr: String,
        /// host:port of feature-svc's admin port (upserts and retirements).
        #[arg(long, default_value = "127.0.0.1:50062")]
        admin_addr: String,
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Write a development CA and certificates for the five services and the operators
    /// (`ca.pem`, `<name>.pem`, `<name>-key.pem`), for `make run TLS=1` and grpcurl.
    Certs {
        #[arg(long, default_value = "target/dev/certs")]
        out: PathBuf,
        /// Further DNS names every service certificate holds (e.g. Kubernetes Service names).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Operator identities to issue client certificates for (the certificate's DNS
        /// name, which the admin ports' `allowed_operators` lists).
        #[arg(long = "client", default_value = "operator")]
        operators: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CatalogCommand {
    /// Replace one item's metadata record (whole).
    Upsert {
        item: String,
        /// in_stock or out_of_stock (unset: not tracked).
        #[arg(long)]
        availability: Option<String>,
        #[arg(long)]
        promoted: bool,
        /// Unix milliseconds; `now` for the current time.
        #[arg(long)]
        published: Option<String>,
        #[arg(long, default_value = "")]
        category: String,
        /// `name=value`, repeatable.
        #[arg(long = "attr")]
        attributes: Vec<String>,
    },
    /// Retire items: never served again (until upserted).
    Retire { items: Vec<String> },
    /// The records changed after a revision, oldest change first.
    Changes {
        #[arg(long, default_value_t = 0)]
        since: u64,
    },
}

#[derive(Debug, Subcommand)]
enum AbCommand {
    /// Per-variant impressions, clicks, CTR, lift with a 95% CI, z-test p-value and a
    /// sample-ratio-mismatch check, from the feature store's event log.
    Report {
        /// Events exported by `recsysctl export-events`.
        #[arg(long, default_value = "data/state/exported-events.jsonl")]
        events: PathBuf,
        /// Variant every other variant is compared with.
        #[arg(long, default_value = "control")]
        control: String,
        /// Orchestrator configuration with the experiment layers (for the expected shares).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Also write a PNG chart of CTR per variant with confidence intervals.
        #[arg(long)]
        chart: Option<PathBuf>,
    },
    /// The sample size and duration an experiment needs to detect an effect on a rate
    /// (two-sided two-proportion z-test).
    Plan {
        /// The control's rate, e.g. today's CTR (clicks per impression).
        #[arg(long)]
        baseline: f64,
        /// The smallest effect worth detecting, relative to the baseline (0.05 = +5%).
        #[arg(long)]
        mde: f64,
        /// `--mde` is in rate points (0.002 = +0.2 points of CTR), not relative.
        #[arg(long)]
        absolute: bool,
        #[arg(long, default_value_t = 0.05)]
        alpha: f64,
        #[arg(long, default_value_t = 0.8)]
        power: f64,
        /// Percent of all traffic the experiment's layer gets, split evenly over its variants.
        #[arg(long, default_value_t = 100.0)]
        traffic_percent: f64,
        /// Variants, control included.
        #[arg(long, default_value_t = 2)]
        variants: u32,
        /// Units of the rate's denominator per day on the surface (impressions for CTR).
        #[arg(long)]
        daily: f64,
    },
}

// Parsed once per process: the size of the analysis variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum CanaryCommand {
    /// Current split and per-track statistics.
    Status,
    /// Send this percentage of users to the canary.
    SetShare { percent: f64 },
    /// Make the canary the stable track.
    Promote,
    /// Send every user back to the stable track.
    Rollback,
    /// Decide from Prometheus whether the canary is promoted, stepped up, held or rolled
    /// back (each track's error rate and p99 over a window); `--apply` carries it out.
    Analyze {
        /// Prometheus server scraping the orchestrators, e.g. http://prometheus:9090.
        #[arg(long)]
        prometheus: String,
        #[arg(long, default_value = "5m")]
        window: String,
        #[arg(long, default_value_t = 100.0)]
        min_requests: f64,
        #[arg(long, default_value_t = 0.01)]
        max_error_rate: f64,
        #[arg(long, default_value_t = 1.5)]
        max_p99_ratio: f64,
        #[arg(long, default_value_t = 20.0)]
        p99_floor_ms: f64,
        /// Raise the share by this many percentage points per passing analysis (Flagger's
        /// step weight); without it a passing analysis promotes at once.
        #[arg(long)]
        step: Option<f64>,
        /// The share at which a passing analysis promotes instead of stepping.
        #[arg(long, default_value_t = 50.0)]
        max_share: f64,
        /// Carry the verdict out: through the orchestrator's Admin service (a model
        /// canary), or with `helm upgrade` of `--helm-release` (a whole-stack canary).
        #[arg(long)]
        apply: bool,
        /// A whole-stack canary: PromQL label matchers of the stable release's
        /// orchestrators, e.g. `job="recsys-recsys-orchestrator"` (with --canary-selector).
        #[arg(long, requires = "canary_selector")]
        stable_selector: Option<String>,
        #[arg(long, requires = "stable_selector")]
        canary_selector: Option<String>,
        /// The stable release whose GRPCRoute weight (`gateway.canaryWeight`) is read and,
        /// with --apply, changed.
        #[arg(long, requires = "stable_selector")]
        helm_release: Option<String>,
        #[arg(long, default_value = "helm/recsys")]
        chart: PathBuf,
        #[arg(long)]
        namespace: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Loaded versions, the current one marked, with their offline metrics.
    List,
    /// Load a version (a directory under the service's bundle root; none: what `current`
    /// names), checked; with --current it serves requests that name no version, after the
    /// quality gate unless --force.
    Load {
        version: Option<String>,
        #[arg(long)]
        current: bool,
        #[arg(long)]
        force: bool,
    },
    /// Unload a version that is not current.
    Retire { version: String },
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// Check a bundle's files against the checksums in its manifest.
    Verify { path: PathBuf },
}

/// The services `recsysctl certs` issues certificates for: their binaries' names.
const SERVICES: [&str; 5] = ["orchestrator", "feature-svc", "recall-svc", "rank-svc", "rerank-svc"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { access, command } = Cli::parse();
    let access = &access;
    match command {
        Command::WaitReady { addresses, timeout_s } => cluster::wait_ready(access, &addresses, timeout_s).await,
        Command::Recommend { addr, user, top_k, debug, bundle } => {
            cluster::recommend(access, &addr, &user, top_k, debug, &bundle).await
        }
        Command::LogEvent { addr, user, item, r#type, request_id, value, experiments } => {
            cluster::log_event(access, &addr, &user, &item, &r#type, &request_id, value, &experiments).await
        }
        Command::ExportEvents { addr, out, since_ms, until_ms } => {
            cluster::export_events(access, &addr, &out, since_ms, until_ms).await
        }
        Command::Bundle { command: BundleCommand::Verify { path } } => bundle::verify(&path),
        Command::Ab { command: AbCommand::Report { events, control, config, chart } } => {
            ab_report(&events, &control, config.as_deref(), chart.as_deref())
        }
        Command::Ab {
            command: AbCommand::Plan { baseline, mde, absolute, alpha, power, traffic_percent, variants, daily },
        } => {
            let input = ab::PlanInput {
                baseline,
                minimum_effect: mde,
                absolute,
                alpha,
                power,
                traffic_share: traffic_percent / 100.0,
                variants,
                daily_units: daily,
            };
            let plan = ab::plan(&input)?;
            println!(
                "baseline {baseline:.4} → {:.4} ({}), α {alpha} two-sided, power {power}",
                plan.treatment_rate,
                if absolute { format!("{mde:+} points") } else { format!("{:+}%", mde * 100.0) }
            );
            println!("sample per variant: {}", plan.per_variant);
            println!("sample in all ({variants} variants): {}", plan.total);
            println!(
                "duration at {daily} a day with {traffic_percent}% of traffic: {:.1} days ({} whole days; run whole \
                 weeks, at least one, so weekday effects cancel)",
                plan.days,
                plan.days.ceil().max(1.0)
            );
            Ok(())
        }
        Command::EvalChart { report, out } => eval_chart(&report, &out),
        Command::Canary { addr, command } => cluster::canary(access, &addr, command).await,
        Command::Model { addr, command } => cluster::model(access, &addr, command).await,
        Command::Catalog { addr, admin_addr, command } => cluster::catalog(access, &addr, &admin_addr, command).await,
        Command::Certs { out, names, operators } => {
            let operators: Vec<&str> = operators.iter().map(String::as_str).collect();
            let certs = recsys_runtime::certs::write_dev_certs(&out, &SERVICES, &names, &operators)?;
            println!(
                "wrote a development CA and certificates for {SERVICES:?} and {operators:?} to {}",
                certs.dir.display()
            );
            Ok(())
        }
    }
}

/// One bar per ablation step, in the report's (pipeline) order.
fn ablation_bars(report: &serde_json::Value) -> anyhow::Result<Vec<chart::Bar>> {
    let steps =
        report["ablation"].as_object().ok_or_else(|| anyhow::anyhow!("the report has no \"ablation\" object"))?;
    steps
        .iter()
        .map(|(step, metrics)| {
            let value = metrics["ndcg@10"].as_f64().ok_or_else(|| anyhow::anyhow!("{step}: no ndcg@10"))?;
            let interval = &metrics["ndcg@10_ci95"];
            Ok(chart::Bar {
                label: step.trim_start_matches("recall:").to_string(),
                value,
                low: interval[0].as_f64().unwrap_or(value),
                high: interval[1].as_f64().unwrap_or(value),
            })
        })
        .collect()
}

fn eval_chart(report_path: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(report_path)
        .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", report_path.display()))?;
    let report: serde_json::Value = serde_json::from_str(&text)?;
    chart::bar_chart(
        out,
        "Served pipeline ablation, MovieLens-100k (nDCG@10, 95% CI)",
        "nDCG@10",
        &ablation_bars(&report)?,
    )?;
    println!("chart written to {}", out.display());
    Ok(())
}

fn ab_report(
    events: &std::path::Path,
    control: &str,
    config: Option<&std::path::Path>,
    chart_path: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let shares = match config {
        Some(path) => {
            let config: orchestrator::Config = recsys_runtime::load_config(Some(path), "RECSYS_ORCHESTRATOR")?;
            config
                .experiments
                .layers
                .into_iter()
                .map(|layer| (layer.name, layer.variants.into_iter().map(|v| (v.name, v.share)).collect()))
                .collect()
        }
        None => std::collections::HashMap::new(),
    };
    let outcomes = ab::read_outcomes(events)?;
    if outcomes.layers.is_empty() {
        anyhow::bail!("no experiment-tagged events in {}", events.display());
    }
    let rows = ab::report(&outcomes, control, &shares);
    if let Some(path) = chart_path {
        let bars: Vec<chart::Bar> = rows
            .into_iter()
            .map(|(layer, variant, ctr, low, high)| chart::Bar {
                label: format!("{layer}/{variant}"),
                value: ctr,
                low,
                high,
            })
            .collect();
        chart::bar_chart(path, "CTR per variant (95% CI)", "CTR", &bars)?;
        println!("chart written to {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ab_report_reads_a_log_and_draws_the_chart() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("events.jsonl");
        let mut lines = Vec::new();
        for n in 0..400 {
            let variant = if n % 2 == 0 { "control" } else { "treatment" };
            lines.push(format!(
                r#"{{"user_id":"u{n}","item_id":"i","event":"EVENT_TYPE_IMPRESSION","timestamp_ms":1,"experiments":{{"rank":"{variant}"}}}}"#
            ));
            // Treatment users click twice as often.
            if n % 10 == 0 || (variant == "treatment" && n % 10 == 1) || (variant == "treatment" && n % 10 == 3) {
                lines.push(format!(
                    r#"{{"user_id":"u{n}","item_id":"i","event":"EVENT_TYPE_CLICK","timestamp_ms":2,"experiments":{{"rank":"{variant}"}}}}"#
                ));
            }
        }
        std::fs::write(&log, lines.join("\n")).unwrap();
        let chart = dir.path().join("ab.png");
        super::ab_report(&log, "control", None, Some(&chart)).unwrap();
        let png = std::fs::read(&chart).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(png.len() > 5_000, "a real chart, not an empty image");
    }

    #[test]
    fn ab_report_refuses_a_log_without_experiments() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("events.jsonl");
        std::fs::write(&log, r#"{"user_id":"u","item_id":"i","event":"EVENT_TYPE_CLICK","timestamp_ms":1}"#).unwrap();
        let error = super::ab_report(&log, "control", None, None).unwrap_err();
        assert!(error.to_string().contains("no experiment-tagged events"), "{error}");
    }

    #[test]
    fn eval_chart_keeps_the_pipeline_order_and_draws_every_step() {
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("eval.json");
        std::fs::write(
            &report,
            r#"{"ablation": {"recall:item_cf": {"ndcg@10": 0.48, "ndcg@10_ci95": [0.46, 0.50]},
                "recall:fused": {"ndcg@10": 0.40, "ndcg@10_ci95": [0.38, 0.42]},
                "+coarse": {"ndcg@10": 0.47, "ndcg@10_ci95": [0.45, 0.49]}}}"#,
        )
        .unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let labels: Vec<String> = super::ablation_bars(&parsed).unwrap().into_iter().map(|bar| bar.label).collect();
        assert_eq!(labels, ["item_cf", "fused", "+coarse"]);
        let chart = dir.path().join("ablation.png");
        super::eval_chart(&report, &chart).unwrap();
        assert_eq!(&std::fs::read(&chart).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::write(&report, "{}").unwrap();
        assert!(super::eval_chart(&report, &chart).unwrap_err().to_string().contains("ablation"));
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
