//! Ranking tracks: the stable rank-svc and, optionally, a canary (another rank-svc,
//! typically serving a new model version). A configured share of users goes to the
//! canary, sticky by user hash so a user does not flip between models; operators can
//! change the share, promote the canary or roll it back at run time through the Admin
//! service. Each track keeps its own breaker and serving statistics.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use recsys_proto::v1::{RankRequest, RankResponse, TrackStats};
use recsys_runtime::{client::ResilientClient, resilience::ResilienceConfig};
use serde::{Deserialize, Serialize};

use crate::{domain::Track, experiments, OrchestratorError, Result};

/// The gRPC method a track serves.
const RANK_METHOD: &str = "/recsys.v1.RankService/Rank";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CanaryConfig {
    /// Address of the canary rank-svc; empty for none.
    pub rank: String,
    pub share_percent: f64,
    /// Hash salt of the canary split (independent of experiment layers).
    pub salt: String,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        Self { rank: String::new(), share_percent: 0.0, salt: "canary".into() }
    }
}

pub struct RankTrack {
    pub track: Track,
    pub address: String,
    /// This track's own client stack (breaker and retry budget): a bad canary must not
    /// trip the stable model, and budgets only work when they persist across calls.
    pub rank: ResilientClient<RankRequest, RankResponse>,
    pub stats: TrackCounters,
}

impl RankTrack {
    pub fn connect(
        track: Track,
        address: &str,
        connect_timeout: Duration,
        budget: Duration,
        resilience: &ResilienceConfig,
        tls: &recsys_runtime::Tls,
    ) -> Result<Self> {
        let channel = recsys_runtime::client::lazy_channel(address, connect_timeout, tls)
            .map_err(|error| OrchestratorError::Config(format!("{address}: {error}")))?;
        Ok(Self {
            track,
            address: address.to_string(),
            rank: ResilientClient::new(format!("rank/{}", track.name()), channel, RANK_METHOD, budget, resilience),
            stats: TrackCounters::default(),
        })
    }

    /// The same service under the stable name, with fresh statistics.
    fn promoted(&self) -> Self {
        Self {
            track: Track::Stable,
            address: self.address.clone(),
            rank: self.rank.clone(),
            stats: TrackCounters::default(),
        }
    }
}

/// Which track serves whom; replaced as a whole on promotion or rollback.
pub struct RankRouting {
    state: RwLock<RoutingState>,
    salt: String,
}

#[derive(Clone)]
struct RoutingState {
    stable: Arc<RankTrack>,
    canary: Option<Arc<RankTrack>>,
    share_percent: f64,
}

impl RankRouting {
    pub fn new(stable: RankTrack, canary: Option<RankTrack>, share_percent: f64, salt: String) -> Self {
        Self {
            state: RwLock::new(RoutingState { stable: Arc::new(stable), canary: canary.map(Arc::new), share_percent }),
            salt,
        }
    }

    /// The track for a user: an experiment's explicit choice, else the sticky canary split.
    /// (A variant pinned to a canary that was promoted since gets the new stable.)
    pub fn track_for(&self, user_id: &str, requested: Option<Track>) -> Arc<RankTrack> {
        let state = self.read();
        let canary = state.canary.as_ref();
        match (requested, canary) {
            (Some(Track::Canary), Some(canary)) => return Arc::clone(canary),
            (Some(Track::Stable), _) => return Arc::clone(&state.stable),
            _ => {}
        }
        match canary {
            Some(canary)
                if (experiments::bucket(&self.salt, user_id) as f64)
                    < state.share_percent * (experiments::BUCKETS as f64 / 100.0) =>
            {
                Arc::clone(canary)
            }
            _ => Arc::clone(&state.stable),
        }
    }

    pub fn set_share(&self, share_percent: f64) -> Result<()> {
        if !(0.0..=100.0).contains(&share_percent) {
            return Err(OrchestratorError::InvalidArgument(format!(
                "share_percent {share_percent} is outside 0..=100"
            )));
        }
        let mut state = self.write();
        if state.canary.is_none() && share_percent > 0.0 {
            return Err(OrchestratorError::InvalidArgument("no canary track is configured".into()));
        }
        state.share_percent = share_percent;
        tracing::info!(share_percent, "canary share changed");
        Ok(())
    }

    /// The canary becomes stable for everyone.
    pub fn promote(&self) -> Result<()> {
        let mut state = self.write();
        let canary =
            state.canary.take().ok_or_else(|| OrchestratorError::InvalidArgument("no canary to promote".into()))?;
        tracing::info!(address = %canary.address, "canary promoted to stable");
        state.stable = Arc::new(canary.promoted());
        state.share_percent = 0.0;
        Ok(())
    }

    pub fn rollback(&self) {
        self.write().share_percent = 0.0;
        tracing::info!("canary rolled back: all users on stable");
    }

    pub fn snapshot(&self) -> recsys_proto::v1::TrafficSplit {
        let state = self.read();
        let mut tracks = vec![state.stable.stats.snapshot(Track::Stable)];
        if let Some(canary) = &state.canary {
            tracks.push(canary.stats.snapshot(Track::Canary));
        }
        recsys_proto::v1::TrafficSplit {
            stable_address: state.stable.address.clone(),
            canary_address: state.canary.as_ref().map(|c| c.address.clone()).unwrap_or_default(),
            canary_share_percent: state.share_percent,
            tracks,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, RoutingState> {
        self.state.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RoutingState> {
        self.state.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Per-track request counters and a latency histogram (log-spaced buckets).
#[derive(Default)]
pub struct TrackCounters {
    requests: AtomicU64,
    rank_failures: AtomicU64,
    model_version: Mutex<String>,
    latency: LatencyHistogram,
}

impl TrackCounters {
    pub fn record(&self, latency: Duration, rank_failed: bool, model_version: &str) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if rank_failed {
            self.rank_failures.fetch_add(1, Ordering::Relaxed);
        } else if !model_version.is_empty() {
            let mut version = self.model_version.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if *version != model_version {
                *version = model_version.to_string();
            }
        }
        self.latency.record(latency);
    }

    fn snapshot(&self, track: Track) -> TrackStats {
        TrackStats {
            track: track.name().to_string(),
            model_version: self.model_version.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone(),
            requests: self.requests.load(Ordering::Relaxed),
            rank_failures: self.rank_failures.load(Ordering::Relaxed),
            latency_p50_ms: self.latency.quantile_ms(0.5),
            latency_p99_ms: self.latency.quantile_ms(0.99),
        }
    }
}

const LATENCY_BUCKETS: usize = 64;
/// Bucket `n` holds latencies below `FIRST_BUCKET_US × GROWTH^n`.
const FIRST_BUCKET_US: f64 = 50.0;
const GROWTH: f64 = 1.25;

pub struct LatencyHistogram {
    counts: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self { counts: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        let micros = latency.as_secs_f64() * 1e6;
        let bucket =
            if micros <= FIRST_BUCKET_US { 0 } else { ((micros / FIRST_BUCKET_US).ln() / GROWTH.ln()).ceil() as usize };
        self.counts[bucket.min(LATENCY_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// Upper bound of the bucket holding the quantile (within 25%), in milliseconds.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let target = (quantile * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (n, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= target {
                return FIRST_BUCKET_US * GROWTH.powi(n as i32) / 1000.0;
            }
        }
        FIRST_BUCKET_US * GROWTH.powi(LATENCY_BUCKETS as i32 - 1) / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(track: Track, address: &str) -> RankTrack {
        let (connect, budget) = (Duration::from_millis(10), Duration::from_millis(10));
        RankTrack::connect(
            track,
            address,
            connect,
            budget,
            &ResilienceConfig::default(),
            &recsys_runtime::Tls::plaintext(),
        )
        .unwrap()
    }

    fn routing(share_percent: f64) -> RankRouting {
        let (stable, canary) = (track(Track::Stable, "127.0.0.1:1"), track(Track::Canary, "127.0.0.1:2"));
        RankRouting::new(stable, Some(canary), share_percent, "c".into())
    }

    #[tokio::test]
    async fn canary_share_is_sticky_across_replicas_and_close_to_configuration() {
        let (replica, other_replica) = (routing(20.0), routing(20.0));
        let mut on_canary = 0;
        for user in (0..20_000).map(|u| u.to_string()) {
            let track = replica.track_for(&user, None).track;
            // Another replica (or a restart) routes the user the same way, and the way
            // the hash of the salted user id says.
            assert_eq!(track, other_replica.track_for(&user, None).track);
            let by_hash = if experiments::bucket("c", &user) < 2_000 { Track::Canary } else { Track::Stable };
            assert_eq!(track, by_hash, "user {user}");
            on_canary += usize::from(track == Track::Canary);
        }
        assert!((on_canary as f64 / 20_000.0 - 0.20).abs() < 0.01, "{on_canary}");
    }

    #[tokio::test]
    async fn promotion_and_rollback_change_routing_without_restart() {
        let routing = routing(100.0);
        assert_eq!(routing.track_for("u", None).address, "127.0.0.1:2");
        routing.rollback();
        assert_eq!(routing.track_for("u", None).address, "127.0.0.1:1");
        routing.set_share(100.0).unwrap();
        routing.promote().unwrap();
        assert_eq!(routing.track_for("u", None).address, "127.0.0.1:2");
        assert_eq!(routing.track_for("u", None).track, Track::Stable);
        assert_eq!(routing.snapshot().canary_address, "");
        assert!(routing.set_share(10.0).is_err(), "no canary left after promotion");
        assert!(routing.promote().is_err());
    }

    #[tokio::test]
    async fn experiments_can_pin_a_track() {
        let routing = routing(0.0);
        assert_eq!(routing.track_for("u", Some(Track::Canary)).track, Track::Canary);
        assert_eq!(routing.track_for("u", Some(Track::Stable)).track, Track::Stable);
        assert_eq!(routing.track_for("u", None).track, Track::Stable);
    }

    #[test]
    fn histogram_quantiles_land_in_the_right_bucket() {
        let histogram = LatencyHistogram::default();
        for _ in 0..99 {
            histogram.record(Duration::from_millis(2));
        }
        histogram.record(Duration::from_millis(80));
        let p50 = histogram.quantile_ms(0.5);
        assert!((2.0..2.5).contains(&p50), "{p50}");
        let p99 = histogram.quantile_ms(0.99);
        assert!((2.0..2.5).contains(&p99), "{p99}");
        let max = histogram.quantile_ms(1.0);
        assert!((80.0..100.0).contains(&max), "{max}");
    }
}
