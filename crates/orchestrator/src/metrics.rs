//! The orchestrator's metric families (the shared RPC, shedding and breaker families live
//! in `recsys_runtime::metrics`).

use std::sync::LazyLock;

use prometheus::{
    exponential_buckets, register_histogram, register_histogram_vec, register_int_counter_vec, Histogram, HistogramVec,
    IntCounterVec,
};

pub static STAGE_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "recsys_stage_duration_seconds",
        "Time the orchestrator spent in each stage of a Recommend call",
        &["stage"],
        recsys_runtime::metrics::latency_buckets()
    )
    .expect("metric registers once")
});

pub static STAGE_DEGRADED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("recsys_stage_degraded_total", "Requests where a stage fell back", &["stage"])
        .expect("metric registers once")
});

pub static STAGE_CANDIDATES: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "recsys_stage_candidates",
        "Items leaving each stage of a Recommend call",
        &["stage"],
        exponential_buckets(1.0, 2.0, 13).expect("valid buckets")
    )
    .expect("metric registers once")
});

pub static SERVED_SCORE: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "recsys_served_score",
        "Scores of the items returned to callers",
        (1..=20).map(|n| n as f64 * 0.05).collect::<Vec<_>>()
    )
    .expect("metric registers once")
});

pub static TRACK_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("recsys_track_requests_total", "Recommend calls per ranking track", &["track", "rank_ok"])
        .expect("metric registers once")
});

/// Whole-request latency per ranking track: what `recsysctl canary analyze` compares.
pub static TRACK_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "recsys_track_request_duration_seconds",
        "Recommend latency per ranking track (stable or canary), as the orchestrator answered it",
        &["track"],
        recsys_runtime::metrics::latency_buckets()
    )
    .expect("metric registers once")
});

pub static EXPERIMENT_ASSIGNMENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "recsys_experiment_assignments_total",
        "Recommend calls per experiment layer and variant",
        &["layer", "variant"]
    )
    .expect("metric registers once")
});

/// Feedback per experiment variant, for online CTR (clicks ÷ impressions) per variant and
/// its alert. Only configured layers and variants are counted, so callers cannot grow the
/// label set.
pub static FEEDBACK_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "recsys_feedback_events_total",
        "Stored feedback events per experiment layer, variant and event type",
        &["layer", "variant", "event"]
    )
    .expect("metric registers once")
});
