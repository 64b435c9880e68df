//! `recsysctl ab report`: per-variant outcomes of the experiments, read from the feature
//! store's event log (every acknowledged event, with the variants of the response it
//! answers). For each layer: impressions, clicks and CTR per variant; against the
//! control, the relative lift with a 95% confidence interval (delta method on the log
//! ratio) and the two-proportion z-test p-value; and a sample-ratio-mismatch check
//! (chi-square of users per variant against the configured shares), which flags a broken
//! assignment or logging path before anyone reads the lift; and for every two layers, an
//! interaction check (does one layer's lift depend on the other layer's variant?), since
//! layers are meant to be orthogonal and their lifts are read one layer at a time.
//!
//! `recsysctl ab plan`: the sample size and duration an experiment needs to detect a given
//! effect on a rate (two-sided two-proportion z-test).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::BufRead,
    path::Path,
};

use anyhow::Context;
use recsys_proto::v1::EventType;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct LoggedEvent {
    user_id: String,
    event: String,
    #[serde(default)]
    experiments: BTreeMap<String, String>,
}

#[derive(Debug, Default, Clone)]
pub struct VariantOutcome {
    pub users: HashSet<String>,
    pub impressions: u64,
    pub clicks: u64,
}

impl VariantOutcome {
    pub fn ctr(&self) -> f64 {
        if self.impressions == 0 {
            0.0
        } else {
            self.clicks as f64 / self.impressions as f64
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub lift: f64,
    pub lift_ci: (f64, f64),
    pub p_value: f64,
}

/// Layer → variant → outcome.
pub type LayerOutcomes = BTreeMap<String, BTreeMap<String, VariantOutcome>>;

/// (layer, other layer) → (variant, other variant) → outcome, for layers in name order.
pub type PairOutcomes = BTreeMap<(String, String), BTreeMap<(String, String), VariantOutcome>>;

#[derive(Debug, Default)]
pub struct Outcomes {
    pub layers: LayerOutcomes,
    pub pairs: PairOutcomes,
}

pub fn read_outcomes(log: &Path) -> anyhow::Result<Outcomes> {
    let file = std::fs::File::open(log).with_context(|| format!("opening event log {}", log.display()))?;
    let mut outcomes = Outcomes::default();
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        let Ok(event) = serde_json::from_str::<LoggedEvent>(&line) else {
            // A torn last line is an unacknowledged write; anything else is worth knowing.
            eprintln!("skipping unreadable line {}", number + 1);
            continue;
        };
        let event_type = EventType::from_name(&event.event);
        let count = |outcome: &mut VariantOutcome| match event_type {
            Some(EventType::Impression) => {
                outcome.impressions += 1;
                outcome.users.insert(event.user_id.clone());
            }
            Some(EventType::Click) => outcome.clicks += 1,
            _ => {}
        };
        for (layer, variant) in &event.experiments {
            count(outcomes.layers.entry(layer.clone()).or_default().entry(variant.clone()).or_default());
        }
        // The map is in name order, so each pair is seen once, first layer first.
        let assignments: Vec<(&String, &String)> = event.experiments.iter().collect();
        for (i, (layer, variant)) in assignments.iter().enumerate() {
            for (other_layer, other_variant) in &assignments[i + 1..] {
                let cell = outcomes
                    .pairs
                    .entry(((*layer).clone(), (*other_layer).clone()))
                    .or_default()
                    .entry(((*variant).clone(), (*other_variant).clone()))
                    .or_default();
                count(cell);
            }
        }
    }
    Ok(outcomes)
}

/// An interaction between two layers: how much the lift of `variant` over the control in
/// the first layer changes when the second layer serves `other_variant` instead of its
/// control (a difference in differences of CTR, absolute), with its z-test p-value.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    pub variant: String,
    pub other_variant: String,
    pub difference: f64,
    pub p_value: f64,
}

/// Every treatment × treatment cell of two layers against the control × control cell,
/// with the two one-treatment cells: `(p_tt − p_tc) − (p_ct − p_cc)`. Layers assigned
/// independently have none; one whose effect depends on the other's shows here. Cells
/// without impressions are skipped.
pub fn interactions(cells: &BTreeMap<(String, String), VariantOutcome>, control: &str) -> Vec<Interaction> {
    let cell = |a: &str, b: &str| cells.get(&(a.to_string(), b.to_string())).filter(|o| o.impressions > 0);
    let mut found = Vec::new();
    for (variant, other_variant) in cells.keys() {
        if variant == control || other_variant == control {
            continue;
        }
        let (Some(tt), Some(tc), Some(ct), Some(cc)) = (
            cell(variant, other_variant),
            cell(variant, control),
            cell(control, other_variant),
            cell(control, control),
        ) else {
            continue;
        };
        let difference = (tt.ctr() - tc.ctr()) - (ct.ctr() - cc.ctr());
        let variance: f64 = [tt, tc, ct, cc].iter().map(|o| o.ctr() * (1.0 - o.ctr()) / o.impressions as f64).sum();
        let p_value =
            if variance > 0.0 { erfc((difference / variance.sqrt()).abs() / std::f64::consts::SQRT_2) } else { 1.0 };
        found.push(Interaction { variant: variant.clone(), other_variant: other_variant.clone(), difference, p_value });
    }
    found
}

/// What `ab plan` is asked.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput {
    /// The control's rate (e.g. CTR: clicks per impression).
    pub baseline: f64,
    /// The smallest effect worth detecting, relative to the baseline (0.05: +5%) unless
    /// `absolute`, then in rate points.
    pub minimum_effect: f64,
    pub absolute: bool,
    /// Two-sided significance level.
    pub alpha: f64,
    pub power: f64,
    /// Share of all traffic the experiment's layer receives (0–1), split evenly over its
    /// variants.
    pub traffic_share: f64,
    pub variants: u32,
    /// Units (of the rate's denominator: impressions for CTR) per day on the surface.
    pub daily_units: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub treatment_rate: f64,
    pub per_variant: u64,
    pub total: u64,
    pub days: f64,
}

/// Sample size per variant for a two-sided two-proportion z-test (pooled variance under
/// the null, unpooled under the alternative), and the days the traffic share needs.
pub fn plan(input: &PlanInput) -> anyhow::Result<Plan> {
    let PlanInput { baseline, minimum_effect, absolute, alpha, power, traffic_share, variants, daily_units } = *input;
    anyhow::ensure!(baseline > 0.0 && baseline < 1.0, "baseline rate {baseline} must be in (0, 1)");
    anyhow::ensure!(minimum_effect > 0.0, "minimum detectable effect {minimum_effect} must be positive");
    anyhow::ensure!(alpha > 0.0 && alpha < 1.0, "alpha {alpha} must be in (0, 1)");
    anyhow::ensure!(power > 0.0 && power < 1.0, "power {power} must be in (0, 1)");
    anyhow::ensure!(traffic_share > 0.0 && traffic_share <= 1.0, "traffic share {traffic_share} must be in (0, 1]");
    anyhow::ensure!(variants >= 2, "an experiment needs at least two variants (control included)");
    anyhow::ensure!(daily_units > 0.0, "daily traffic {daily_units} must be positive");
    let treatment_rate = if absolute { baseline + minimum_effect } else { baseline * (1.0 + minimum_effect) };
    anyhow::ensure!(treatment_rate < 1.0, "baseline plus the effect ({treatment_rate}) is not a rate below 1");
    let (p1, p2) = (baseline, treatment_rate);
    let pooled = (p1 + p2) / 2.0;
    let z_alpha = normal_quantile(1.0 - alpha / 2.0);
    let z_power = normal_quantile(power);
    let numerator =
        z_alpha * (2.0 * pooled * (1.0 - pooled)).sqrt() + z_power * (p1 * (1.0 - p1) + p2 * (1.0 - p2)).sqrt();
    let per_variant = (numerator * numerator / (p2 - p1).powi(2)).ceil() as u64;
    let total = per_variant * u64::from(variants);
    let days = total as f64 / (daily_units * traffic_share);
    Ok(Plan { treatment_rate, per_variant, total, days })
}

/// The standard normal quantile Φ⁻¹(p), by bisection on `erfc` (accurate to its 1e-7).
pub fn normal_quantile(p: f64) -> f64 {
    let upper_tail = |z: f64| 0.5 * erfc(z / std::f64::consts::SQRT_2);
    let (mut low, mut high) = (-10.0, 10.0);
    for _ in 0..200 {
        let middle = (low + high) / 2.0;
        if 1.0 - upper_tail(middle) < p {
            low = middle;
        } else {
            high = middle;
        }
    }
    (low + high) / 2.0
}

/// Treatment against control.
pub fn compare(control: &VariantOutcome, treatment: &VariantOutcome) -> Comparison {
    let (p1, n1) = (control.ctr(), control.impressions as f64);
    let (p2, n2) = (treatment.ctr(), treatment.impressions as f64);
    let lift = if p1 > 0.0 { p2 / p1 - 1.0 } else { f64::NAN };
    let lift_ci = if p1 > 0.0 && p2 > 0.0 {
        let se = ((1.0 - p1) / (n1 * p1) + (1.0 - p2) / (n2 * p2)).sqrt();
        let log_ratio = (p2 / p1).ln();
        ((log_ratio - 1.96 * se).exp() - 1.0, (log_ratio + 1.96 * se).exp() - 1.0)
    } else {
        (f64::NAN, f64::NAN)
    };
    let pooled = (control.clicks + treatment.clicks) as f64 / (n1 + n2);
    let se = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
    let p_value = if se > 0.0 { erfc(((p2 - p1) / se).abs() / std::f64::consts::SQRT_2) } else { 1.0 };
    Comparison { lift, lift_ci, p_value }
}

/// p-value of a chi-square goodness-of-fit test of `observed` against `expected_shares`.
pub fn sample_ratio_mismatch(observed: &[u64], expected_shares: &[f64]) -> f64 {
    let total: u64 = observed.iter().sum();
    let share_total: f64 = expected_shares.iter().sum();
    if total == 0 || observed.len() < 2 || share_total <= 0.0 {
        return 1.0;
    }
    let statistic: f64 = observed
        .iter()
        .zip(expected_shares)
        .map(|(&o, &share)| {
            let expected = total as f64 * share / share_total;
            (o as f64 - expected).powi(2) / expected
        })
        .sum();
    chi_square_survival(statistic, (observed.len() - 1) as f64)
}

/// Complementary error function (Numerical Recipes' Chebyshev fit, |error| < 1.2e-7).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// P(X > x) for X ~ chi-square with `df` degrees of freedom: the regularised upper
/// incomplete gamma function Q(df/2, x/2), by series or continued fraction.
pub fn chi_square_survival(x: f64, df: f64) -> f64 {
    let (a, x) = (df / 2.0, x / 2.0);
    if x <= 0.0 {
        return 1.0;
    }
    let log_prefix = -x + a * x.ln() - ln_gamma(a);
    if x < a + 1.0 {
        let (mut sum, mut term, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..500 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * log_prefix.exp()
    } else {
        // Lentz's method for the continued fraction.
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..500 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        log_prefix.exp() * h
    }
}

/// Lanczos approximation of ln Γ(x) for x > 0.
fn ln_gamma(x: f64) -> f64 {
    const COEFFICIENTS: [f64; 6] = [
        76.180_091_729_471_46,
        -86.505_320_329_416_77,
        24.014_098_240_830_91,
        -1.231_739_572_450_155,
        0.001_208_650_973_866_179,
        -0.000_005_395_239_384_953,
    ];
    let mut y = x;
    let tmp = x + 5.5 - (x + 0.5) * (x + 5.5).ln();
    let mut series = 1.000_000_000_190_015;
    for coefficient in COEFFICIENTS {
        y += 1.0;
        series += coefficient / y;
    }
    -tmp + (2.506_628_274_631_000_5 * series / x).ln()
}

/// Prints the report; `shares` gives each layer's configured variant shares (percent) for
/// the SRM check, equal shares when absent. Returns the rows for the chart.
pub fn report(
    outcomes: &Outcomes,
    control: &str,
    shares: &HashMap<String, HashMap<String, f64>>,
) -> Vec<(String, String, f64, f64, f64)> {
    let mut rows = Vec::new();
    for (layer, variants) in &outcomes.layers {
        println!("layer {layer}");
        println!(
            "  {:<16} {:>8} {:>12} {:>8} {:>8} {:>9} {:>22} {:>9}",
            "variant", "users", "impressions", "clicks", "ctr", "lift", "95% ci", "p-value"
        );
        let control_outcome = variants.get(control);
        for (name, outcome) in variants {
            let (lift, ci, p) = match control_outcome {
                Some(c) if name != control => {
                    let comparison = compare(c, outcome);
                    (
                        format!("{:+.2}%", comparison.lift * 100.0),
                        format!("[{:+.2}%, {:+.2}%]", comparison.lift_ci.0 * 100.0, comparison.lift_ci.1 * 100.0),
                        format!("{:.4}", comparison.p_value),
                    )
                }
                _ => ("control".to_string(), String::new(), String::new()),
            };
            println!(
                "  {:<16} {:>8} {:>12} {:>8} {:>8.4} {:>9} {:>22} {:>9}",
                name,
                outcome.users.len(),
                outcome.impressions,
                outcome.clicks,
                outcome.ctr(),
                lift,
                ci,
                p
            );
            let (low, high) = match control_outcome {
                Some(c) if name != control => {
                    let comparison = compare(c, outcome);
                    (c.ctr() * (1.0 + comparison.lift_ci.0), c.ctr() * (1.0 + comparison.lift_ci.1))
                }
                _ => (outcome.ctr(), outcome.ctr()),
            };
            rows.push((layer.clone(), name.clone(), outcome.ctr(), low, high));
        }
        let names: Vec<&String> = variants.keys().collect();
        let observed: Vec<u64> = variants.values().map(|v| v.users.len() as u64).collect();
        let expected: Vec<f64> =
            names.iter().map(|n| shares.get(layer).and_then(|s| s.get(*n)).copied().unwrap_or(1.0)).collect();
        let srm = sample_ratio_mismatch(&observed, &expected);
        let verdict = if srm < 0.001 { "MISMATCH: do not trust this layer's lift" } else { "ok" };
        println!("  sample ratio check: chi-square p = {srm:.4} ({verdict})");
        if control_outcome.is_none() {
            println!("  (no variant named {control:?}: pass --control to compare)");
        }
        println!();
    }
    for ((layer, other_layer), cells) in &outcomes.pairs {
        let found = interactions(cells, control);
        if found.is_empty() {
            continue;
        }
        println!("interaction of layers {layer} × {other_layer} (CTR difference in differences)");
        for interaction in found {
            // Bonferroni over the cells tested, so many variants do not flag by chance.
            let threshold = 0.05 / cells.len().max(1) as f64;
            let verdict = if interaction.p_value < threshold {
                "INTERACTION: the layers are not independent; read their lifts together"
            } else {
                "none detected"
            };
            println!(
                "  {}/{} × {}/{}: {:+.4} (p = {:.4}) {verdict}",
                layer,
                interaction.variant,
                other_layer,
                interaction.other_variant,
                interaction.difference,
                interaction.p_value
            );
        }
        println!();
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(impressions: u64, clicks: u64) -> VariantOutcome {
        VariantOutcome { impressions, clicks, ..VariantOutcome::default() }
    }

    #[test]
    fn erfc_matches_known_values() {
        assert!((erfc(0.0) - 1.0).abs() < 1e-7);
        assert!((erfc(1.959_964 / std::f64::consts::SQRT_2) - 0.05).abs() < 1e-6);
        assert!((erfc(-1.0) - 1.842_700_79).abs() < 1e-6);
    }

    #[test]
    fn chi_square_survival_matches_tables() {
        // Critical values: df 1 at 3.841 → 0.05; df 2 at 5.991 → 0.05; df 3 at 11.345 → 0.01.
        assert!((chi_square_survival(3.841, 1.0) - 0.05).abs() < 1e-3);
        assert!((chi_square_survival(5.991, 2.0) - 0.05).abs() < 1e-3);
        assert!((chi_square_survival(11.345, 3.0) - 0.01).abs() < 1e-3);
        assert!((chi_square_survival(0.5, 4.0) - 0.973_7).abs() < 1e-3);
    }

    #[test]
    fn z_test_and_lift_on_a_textbook_example() {
        // 10% vs 12% CTR on 10 000 impressions each: z ≈ 4.5, clearly significant.
        let comparison = compare(&outcome(10_000, 1_000), &outcome(10_000, 1_200));
        assert!((comparison.lift - 0.2).abs() < 1e-9);
        assert!(comparison.p_value < 1e-4);
        assert!(comparison.lift_ci.0 > 0.0 && comparison.lift_ci.1 > comparison.lift);
        let same = compare(&outcome(10_000, 1_000), &outcome(10_000, 1_000));
        assert!((same.p_value - 1.0).abs() < 1e-6);
    }

    #[test]
    fn sample_ratio_mismatch_flags_a_skewed_split() {
        assert!(sample_ratio_mismatch(&[5_000, 5_050], &[50.0, 50.0]) > 0.1);
        assert!(sample_ratio_mismatch(&[5_000, 5_600], &[50.0, 50.0]) < 0.001);
        assert!(sample_ratio_mismatch(&[1_000, 9_000], &[10.0, 90.0]) > 0.1);
    }

    #[test]
    fn sample_size_matches_the_textbook_formula() {
        // 10% → 12% (absolute +2 points), α 0.05 two-sided, power 0.8: 3,841 per group.
        let input = PlanInput {
            baseline: 0.10,
            minimum_effect: 0.02,
            absolute: true,
            alpha: 0.05,
            power: 0.8,
            traffic_share: 0.1,
            variants: 2,
            daily_units: 10_000.0,
        };
        let planned = plan(&input).unwrap();
        assert_eq!(planned.per_variant, 3_841);
        assert_eq!(planned.total, 7_682);
        assert!((planned.days - 7.682).abs() < 1e-9);
        // The same effect stated relatively (+20%) is the same plan.
        let relative = plan(&PlanInput { minimum_effect: 0.2, absolute: false, ..input }).unwrap();
        assert_eq!(relative.per_variant, 3_841);
        // Halving the effect needs about four times the sample; more power needs more.
        let smaller = plan(&PlanInput { minimum_effect: 0.01, ..input }).unwrap();
        assert!((smaller.per_variant as f64 / 3_841.0 - 4.0).abs() < 0.2, "{smaller:?}");
        assert!(plan(&PlanInput { power: 0.9, ..input }).unwrap().per_variant > 3_841);
        assert!(plan(&PlanInput { baseline: 0.0, ..input }).unwrap_err().to_string().contains("baseline"));
        assert!(plan(&PlanInput { variants: 1, ..input }).is_err());
        assert!(plan(&PlanInput { minimum_effect: 0.95, ..input }).is_err());
    }

    #[test]
    fn normal_quantiles_match_tables() {
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-5);
        assert!((normal_quantile(0.8) - 0.841_621).abs() < 1e-5);
        assert!(normal_quantile(0.5).abs() < 1e-6);
    }

    fn cells(rates: [(&str, &str, u64, u64); 4]) -> BTreeMap<(String, String), VariantOutcome> {
        rates
            .into_iter()
            .map(|(a, b, impressions, clicks)| ((a.into(), b.into()), outcome(impressions, clicks)))
            .collect()
    }

    #[test]
    fn interaction_is_flagged_only_when_one_layers_lift_depends_on_the_other() {
        // Additive: the ranking treatment adds two points whatever rerank serves.
        let additive = cells([
            ("control", "control", 20_000, 2_000),
            ("control", "mmr", 20_000, 2_200),
            ("new", "control", 20_000, 2_400),
            ("new", "mmr", 20_000, 2_600),
        ]);
        let found = interactions(&additive, "control");
        assert_eq!(found.len(), 1);
        assert!(found[0].difference.abs() < 1e-12 && found[0].p_value > 0.5, "{found:?}");
        // The ranking treatment helps only under the old rerank: flagged.
        let interacting = cells([
            ("control", "control", 20_000, 2_000),
            ("control", "mmr", 20_000, 2_200),
            ("new", "control", 20_000, 2_400),
            ("new", "mmr", 20_000, 2_200),
        ]);
        let found = interactions(&interacting, "control");
        assert!((found[0].difference + 0.02).abs() < 1e-12, "{found:?}");
        assert!(found[0].p_value < 1e-4, "{found:?}");
    }

    #[test]
    fn outcomes_are_grouped_by_layer_and_variant() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("events.jsonl");
        std::fs::write(
            &log,
            [
                r#"{"user_id":"1","item_id":"a","event":"EVENT_TYPE_IMPRESSION","timestamp_ms":1,"experiments":{"rank":"control"}}"#,
                r#"{"user_id":"1","item_id":"a","event":"click","timestamp_ms":2,"experiments":{"rank":"control"}}"#,
                r#"{"user_id":"2","item_id":"b","event":"EVENT_TYPE_IMPRESSION","timestamp_ms":3,"experiments":{"rank":"new"}}"#,
                r#"{"user_id":"3","item_id":"b","event":"EVENT_TYPE_CLICK","timestamp_ms":4}"#,
                r#"{"user_id":"5","item_id":"c","event":"impression","timestamp_ms":5,"experiments":{"rerank":"mmr","rank":"new"}}"#,
                r#"{"user_id":"4","item_"#,
            ]
            .join("\n"),
        )
        .unwrap();
        let outcomes = read_outcomes(&log).unwrap();
        let rank = &outcomes.layers["rank"];
        assert_eq!((rank["control"].impressions, rank["control"].clicks), (1, 1));
        assert_eq!((rank["new"].impressions, rank["new"].clicks), (2, 0));
        // An event in two layers counts in their pair's cell, layers in name order.
        let pair = &outcomes.pairs[&("rank".to_string(), "rerank".to_string())];
        assert_eq!(pair.len(), 1);
        assert_eq!(pair[&("new".to_string(), "mmr".to_string())].impressions, 1);
    }
}
