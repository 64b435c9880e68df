//! Drift: the live distribution of fine-ranker scores (and of a few key inputs) against
//! the distribution the bundle recorded at training time, as a population stability index
//! (PSI) over the same fixed bins. PSI below 0.1 is usually read as stable, above 0.25 as
//! a real shift; the alert rule in `deploy/prometheus/alerts.yml` fires on the score gauge.

use std::sync::{LazyLock, Mutex};

use prometheus::{register_gauge, register_gauge_vec, Gauge, GaugeVec};
use recsys_bundle::ScoreDistribution;

pub static SCORE_PSI: LazyLock<Gauge> = LazyLock::new(|| {
    register_gauge!("recsys_score_psi", "Population stability index of live fine-ranker scores vs training")
        .expect("metric registers once")
});

pub static FEATURE_PSI: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "recsys_feature_psi",
        "Population stability index of live ranker inputs vs training",
        &["feature"]
    )
    .expect("metric registers once")
});

/// Live counts are halved once they hold this many scores, so the index follows recent
/// traffic rather than everything since start-up.
const DECAY_AT: f64 = 50_000.0;
/// Smoothing for empty bins (PSI is undefined at zero).
const EPSILON: f64 = 1e-4;

pub struct ScoreDrift {
    edges: Vec<f64>,
    expected: Vec<f64>,
    live: Mutex<Vec<f64>>,
    gauge: Gauge,
}

impl ScoreDrift {
    /// Drift of the fine-ranker scores (`recsys_score_psi`).
    pub fn new(reference: &ScoreDistribution) -> Option<Self> {
        Self::with_gauge(reference, SCORE_PSI.clone())
    }

    /// Drift of one ranker input (`recsys_feature_psi{feature}`).
    pub fn for_feature(feature: &str, reference: &ScoreDistribution) -> Option<Self> {
        Self::with_gauge(reference, FEATURE_PSI.with_label_values(&[feature]))
    }

    fn with_gauge(reference: &ScoreDistribution, gauge: Gauge) -> Option<Self> {
        let total: u64 = reference.counts.iter().sum();
        if total == 0 || reference.edges.len() != reference.counts.len() + 1 {
            return None;
        }
        let expected = reference.counts.iter().map(|&c| c as f64 / total as f64).collect();
        Some(Self {
            edges: reference.edges.clone(),
            expected,
            live: Mutex::new(vec![0.0; reference.counts.len()]),
            gauge,
        })
    }

    /// Adds a batch of served scores and returns the updated index.
    pub fn observe(&self, scores: &[f32]) -> f64 {
        let mut live = self.live.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for &score in scores {
            live[self.bin(f64::from(score))] += 1.0;
        }
        if live.iter().sum::<f64>() > DECAY_AT {
            live.iter_mut().for_each(|count| *count /= 2.0);
        }
        let psi = psi(&self.expected, &live);
        self.gauge.set(psi);
        psi
    }

    fn bin(&self, score: f64) -> usize {
        let bins = self.expected.len();
        self.edges[1..bins].iter().position(|&edge| score < edge).unwrap_or(bins - 1)
    }
}

/// `Σ (a − e) · ln(a / e)` over bins of two distributions (`live` as raw counts).
pub fn psi(expected: &[f64], live: &[f64]) -> f64 {
    let total: f64 = live.iter().sum();
    if total == 0.0 {
        return 0.0;
    }
    expected
        .iter()
        .zip(live)
        .map(|(&e, &count)| {
            let a = (count / total).max(EPSILON);
            let e = e.max(EPSILON);
            (a - e) * (a / e).ln()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> ScoreDistribution {
        ScoreDistribution {
            edges: (0..=10).map(|n| n as f64 / 10.0).collect(),
            counts: vec![10, 20, 30, 40, 50, 50, 40, 30, 20, 10],
        }
    }

    /// Scores spread over the bins in proportion to `counts`.
    fn scores_like(counts: &[u64], scale: usize) -> Vec<f32> {
        counts
            .iter()
            .enumerate()
            .flat_map(|(bin, &count)| std::iter::repeat_n(bin as f32 / 10.0 + 0.05, count as usize * scale))
            .collect()
    }

    #[test]
    fn the_training_distribution_itself_is_stable() {
        let drift = ScoreDrift::new(&reference()).unwrap();
        let psi = drift.observe(&scores_like(&reference().counts, 3));
        assert!(psi < 0.01, "{psi}");
    }

    #[test]
    fn a_shifted_distribution_moves_the_index_and_the_gauge() {
        // A gauge of this test's own: the process-wide one is written by other tests
        // running in parallel.
        let gauge = Gauge::new("test_score_psi", "drift of this test only").unwrap();
        let drift = ScoreDrift::with_gauge(&reference(), gauge.clone()).unwrap();
        // Everything pushed towards high scores, as after a bad model or a traffic shift.
        let shifted = scores_like(&[0, 0, 0, 5, 10, 20, 40, 60, 80, 100], 3);
        let psi = drift.observe(&shifted);
        assert!(psi > 0.25, "{psi}");
        assert_eq!(gauge.get(), psi);
    }

    #[test]
    fn out_of_range_scores_land_in_the_edge_bins() {
        let drift = ScoreDrift::new(&reference()).unwrap();
        assert_eq!(drift.bin(-1.0), 0);
        assert_eq!(drift.bin(2.0), 9);
        assert_eq!(drift.bin(0.35), 3);
    }

    #[test]
    fn malformed_references_are_refused() {
        assert!(ScoreDrift::new(&ScoreDistribution { edges: vec![0.0, 1.0], counts: vec![] }).is_none());
        assert!(ScoreDrift::new(&ScoreDistribution { edges: vec![0.0, 1.0], counts: vec![0] }).is_none());
    }
}
