//! `recsysctl canary analyze`: promotion gated on metrics, the way Flagger's analysis
//! works. It asks a Prometheus server (HTTP API, instant queries) for each side's request
//! count, error rate and p99 over a window and decides: roll back when the canary is worse
//! than the thresholds, hold while it has too little traffic, otherwise promote — or, with
//! steps, raise its share by one step until the maximum, then promote. The two sides are
//! either the orchestrator's ranking tracks (a model canary: errors are requests whose
//! rank stage failed and fell back, from `recsys_track_requests_total` and
//! `recsys_track_request_duration_seconds`) or two releases' orchestrators told apart by
//! label matchers (a whole-stack canary: errors are Recommend calls answered with a
//! server-side status, from `recsys_rpc_duration_seconds`).

use std::{collections::HashMap, time::Duration};

use anyhow::{bail, Context};
use http_body_util::BodyExt;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};

/// What the canary is held to.
#[derive(Debug, Clone)]
pub struct Thresholds {
    /// PromQL range of the analysis, e.g. `5m`.
    pub window: String,
    /// Requests the canary must have served in the window before any verdict but hold.
    pub min_requests: f64,
    /// Highest acceptable share of canary requests whose rank stage failed.
    pub max_error_rate: f64,
    /// Highest acceptable canary p99 as a multiple of the stable track's.
    pub max_p99_ratio: f64,
    /// A canary p99 under this is always acceptable (ratios of tiny latencies are noise).
    pub p99_floor_ms: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self { window: "5m".into(), min_requests: 100.0, max_error_rate: 0.01, max_p99_ratio: 1.5, p99_floor_ms: 20.0 }
    }
}

/// Flagger-like progression: the share grows by `step_percent` per passing analysis up
/// to `max_percent`, and a passing analysis at the maximum promotes.
#[derive(Debug, Clone, Copy)]
pub struct Steps {
    pub step_percent: f64,
    pub max_percent: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackStats {
    pub requests: f64,
    pub error_rate: f64,
    /// `None` when the track served nothing in the window.
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Promote,
    /// Raise the canary's share to this percentage.
    Step(f64),
    Hold(String),
    Rollback(String),
}

impl Verdict {
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Promote => "promote",
            Verdict::Step(_) => "step",
            Verdict::Hold(_) => "hold",
            Verdict::Rollback(_) => "rollback",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Analysis {
    pub stable: TrackStats,
    pub canary: TrackStats,
    pub verdict: Verdict,
}

/// The verdict for `canary` against `stable` (pure; the Prometheus part is `analyze`).
/// `share_percent` and `steps` decide between a step and a promotion when it passes.
pub fn decide(
    stable: &TrackStats,
    canary: &TrackStats,
    thresholds: &Thresholds,
    share_percent: f64,
    steps: Option<Steps>,
) -> Verdict {
    // Failures already past what the error budget allows over `min_requests` decide
    // before the traffic does: 99 failures of 99 calls must not hold for ever.
    let failed = canary.requests * canary.error_rate;
    if failed > thresholds.max_error_rate * thresholds.min_requests {
        return Verdict::Rollback(format!(
            "{failed:.0} failed canary requests, more than the error budget of {} requests allows",
            thresholds.min_requests
        ));
    }
    // A canary with a share that served nothing while the stable side did is broken (its
    // metrics are gone, or it never receives traffic), as Flagger treats "no values".
    if share_percent > 0.0 && canary.requests == 0.0 && stable.requests >= thresholds.min_requests {
        return Verdict::Rollback(format!(
            "the canary served nothing in {} while the stable side served {:.0}",
            thresholds.window, stable.requests
        ));
    }
    if canary.requests < thresholds.min_requests {
        return Verdict::Hold(format!(
            "the canary served {:.0} requests in {}; {} needed",
            canary.requests, thresholds.window, thresholds.min_requests
        ));
    }
    if canary.error_rate > thresholds.max_error_rate {
        return Verdict::Rollback(format!(
            "canary error rate {:.4} is above {:.4}",
            canary.error_rate, thresholds.max_error_rate
        ));
    }
    if let (Some(canary_p99), Some(stable_p99)) = (canary.p99_ms, stable.p99_ms) {
        if canary_p99 > thresholds.p99_floor_ms && canary_p99 > stable_p99 * thresholds.max_p99_ratio {
            return Verdict::Rollback(format!(
                "canary p99 {canary_p99:.1} ms is above {:.1} × the stable {stable_p99:.1} ms",
                thresholds.max_p99_ratio
            ));
        }
    }
    match steps {
        Some(steps) if share_percent + 1e-9 < steps.max_percent => {
            Verdict::Step((share_percent + steps.step_percent).min(steps.max_percent))
        }
        _ => Verdict::Promote,
    }
}

/// Where the two sides' numbers come from.
#[derive(Debug, Clone)]
pub enum Sides {
    /// A model canary: the orchestrator's ranking tracks (the `track` label).
    Tracks,
    /// A whole-stack canary: two releases' orchestrators, each chosen by PromQL label
    /// matchers such as `job="recsys-canary-recsys-orchestrator"`.
    Selectors { stable: String, canary: String },
}

const RECOMMEND: &str = "method=\"/recsys.v1.Recommender/Recommend\"";
/// Statuses that are the caller's doing, not the service's failure.
const CALLER_CODES: &str = "Ok|InvalidArgument|NotFound";

/// Queries `prometheus` (e.g. `http://127.0.0.1:9090`) and decides.
pub async fn analyze(
    prometheus: &str,
    sides: &Sides,
    thresholds: &Thresholds,
    share_percent: f64,
    steps: Option<Steps>,
) -> anyhow::Result<Analysis> {
    let (stable, canary) = match sides {
        Sides::Tracks => {
            let by_track = track_stats(prometheus, &thresholds.window).await?;
            let side = |track: &str| by_track.get(track).cloned().unwrap_or_default();
            (side("stable"), side("canary"))
        }
        Sides::Selectors { stable, canary } => (
            selector_stats(prometheus, stable, &thresholds.window).await?,
            selector_stats(prometheus, canary, &thresholds.window).await?,
        ),
    };
    let verdict = decide(&stable, &canary, thresholds, share_percent, steps);
    Ok(Analysis { stable, canary, verdict })
}

/// One side of a whole-stack canary: its orchestrators' Recommend calls.
async fn selector_stats(prometheus: &str, selector: &str, window: &str) -> anyhow::Result<TrackStats> {
    let matchers = format!("{selector},{RECOMMEND}");
    let total = |samples: HashMap<String, f64>| samples.values().fold(0.0, |sum, value| sum + value);
    let requests = total(
        query(prometheus, &format!("sum(increase(recsys_rpc_duration_seconds_count{{{matchers}}}[{window}]))")).await?,
    );
    let failed = total(
        query(
            prometheus,
            &format!(
                "sum(increase(recsys_rpc_duration_seconds_count{{{matchers},code!~\"{CALLER_CODES}\"}}[{window}]))"
            ),
        )
        .await?,
    );
    let p99 = query(
        prometheus,
        &format!(
            "histogram_quantile(0.99, sum by (le) (rate(recsys_rpc_duration_seconds_bucket{{{matchers}}}[{window}])))"
        ),
    )
    .await?;
    Ok(TrackStats {
        requests,
        error_rate: if requests > 0.0 { failed / requests } else { 0.0 },
        p99_ms: p99.values().copied().find(|value| value.is_finite()).map(|seconds| seconds * 1000.0),
    })
}

/// Both ranking tracks of a model canary.
async fn track_stats(prometheus: &str, window: &str) -> anyhow::Result<HashMap<String, TrackStats>> {
    let requests =
        query(prometheus, &format!("sum by (track) (increase(recsys_track_requests_total[{window}]))")).await?;
    let failed = query(
        prometheus,
        &format!("sum by (track) (increase(recsys_track_requests_total{{rank_ok=\"false\"}}[{window}]))"),
    )
    .await?;
    let p99 = query(
        prometheus,
        &format!(
            "histogram_quantile(0.99, sum by (track, le) (rate(recsys_track_request_duration_seconds_bucket[{window}])))"
        ),
    )
    .await?;
    let stats = |track: &str| {
        let requests = requests.get(track).copied().unwrap_or(0.0);
        let failed = failed.get(track).copied().unwrap_or(0.0);
        TrackStats {
            requests,
            error_rate: if requests > 0.0 { failed / requests } else { 0.0 },
            p99_ms: p99.get(track).copied().filter(|value| value.is_finite()).map(|seconds| seconds * 1000.0),
        }
    };
    Ok(["stable", "canary"].into_iter().map(|track| (track.to_string(), stats(track))).collect())
}

/// One instant query; the result's samples by their `track` label.
async fn query(prometheus: &str, promql: &str) -> anyhow::Result<HashMap<String, f64>> {
    let encoded: String = percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC).collect();
    let uri: http::Uri = format!("{}/api/v1/query?query={encoded}", prometheus.trim_end_matches('/'))
        .parse()
        .with_context(|| format!("Prometheus address {prometheus}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = tokio::time::timeout(Duration::from_secs(10), client.get(uri.clone()))
        .await
        .with_context(|| format!("{uri}: no answer in 10 s"))?
        .with_context(|| format!("querying {uri}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.context("reading Prometheus' answer")?.to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("Prometheus answered {status} with no JSON: {}", String::from_utf8_lossy(&body)))?;
    if answer["status"] != "success" {
        bail!("Prometheus refused {promql:?}: {}", answer["error"]);
    }
    let mut samples = HashMap::new();
    for sample in answer["data"]["result"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let track = sample["metric"]["track"].as_str().unwrap_or_default().to_string();
        let value = sample["value"][1].as_str().and_then(|value| value.parse::<f64>().ok());
        if let Some(value) = value {
            samples.insert(track, value);
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(requests: f64, error_rate: f64, p99_ms: f64) -> TrackStats {
        TrackStats { requests, error_rate, p99_ms: Some(p99_ms) }
    }

    #[test]
    fn a_healthy_canary_steps_up_then_promotes() {
        let thresholds = Thresholds::default();
        let (stable, canary) = (track(5_000.0, 0.0, 30.0), track(500.0, 0.001, 35.0));
        let steps = Some(Steps { step_percent: 10.0, max_percent: 50.0 });
        assert_eq!(decide(&stable, &canary, &thresholds, 10.0, steps), Verdict::Step(20.0));
        assert_eq!(decide(&stable, &canary, &thresholds, 45.0, steps), Verdict::Step(50.0));
        assert_eq!(decide(&stable, &canary, &thresholds, 50.0, steps), Verdict::Promote);
        assert_eq!(decide(&stable, &canary, &thresholds, 10.0, None), Verdict::Promote);
    }

    #[test]
    fn errors_or_slowness_roll_back_and_too_little_traffic_holds() {
        let thresholds = Thresholds::default();
        let stable = track(5_000.0, 0.0, 30.0);
        assert!(matches!(decide(&stable, &track(500.0, 0.2, 30.0), &thresholds, 10.0, None), Verdict::Rollback(_)));
        assert!(matches!(decide(&stable, &track(500.0, 0.0, 90.0), &thresholds, 10.0, None), Verdict::Rollback(_)));
        // Slower in ratio but under the floor: noise, not a regression.
        let quick = track(5_000.0, 0.0, 2.0);
        assert_eq!(decide(&quick, &track(500.0, 0.0, 8.0), &thresholds, 10.0, None), Verdict::Promote);
        assert!(matches!(decide(&stable, &track(20.0, 0.0, 30.0), &thresholds, 10.0, None), Verdict::Hold(_)));
        // Few requests, but all failing: no need to wait for more.
        assert!(matches!(decide(&stable, &track(20.0, 1.0, 30.0), &thresholds, 10.0, None), Verdict::Rollback(_)));
        // A canary with a share but no traffic at all while stable serves: broken.
        let silent = TrackStats { requests: 0.0, error_rate: 0.0, p99_ms: None };
        assert!(matches!(decide(&stable, &silent, &thresholds, 10.0, None), Verdict::Rollback(_)));
        assert!(matches!(decide(&stable, &silent, &thresholds, 0.0, None), Verdict::Hold(_)));
    }
}
