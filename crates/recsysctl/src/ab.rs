//! `recsysctl ab report`: per-variant outcomes of the experiments, read from the feature
//! store's event log (every acknowledged event, with the variants of the response it
//! answers). For each layer: impressions, clicks and CTR per variant; against the
//! control, the relative lift with a 95% confidence interval (delta method on the log
//! ratio) and the two-proportion z-test p-value; and a sample-ratio-mismatch check
//! (chi-square of users per variant against the configured shares), which flags a broken
//! assignment or logging path before anyone reads the lift.

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
pub fn read_outcomes(log: &Path) -> anyhow::Result<BTreeMap<String, BTreeMap<String, VariantOutcome>>> {
    let file = std::fs::File::open(log).with_context(|| format!("opening event log {}", log.display()))?;
    let mut outcomes: BTreeMap<String, BTreeMap<String, VariantOutcome>> = BTreeMap::new();
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        let Ok(event) = serde_json::from_str::<LoggedEvent>(&line) else {
            // A torn last line is an unacknowledged write; anything else is worth knowing.
            eprintln!("skipping unreadable line {}", number + 1);
            continue;
        };
        for (layer, variant) in &event.experiments {
            let outcome = outcomes.entry(layer.clone()).or_default().entry(variant.clone()).or_default();
            match EventType::from_name(&event.event) {
                Some(EventType::Impression) => {
                    outcome.impressions += 1;
                    outcome.users.insert(event.user_id.clone());
                }
                Some(EventType::Click) => outcome.clicks += 1,
                _ => {}
            }
        }
    }
    Ok(outcomes)
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
    outcomes: &BTreeMap<String, BTreeMap<String, VariantOutcome>>,
    control: &str,
    shares: &HashMap<String, HashMap<String, f64>>,
) -> Vec<(String, String, f64, f64, f64)> {
    let mut rows = Vec::new();
    for (layer, variants) in outcomes {
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
                r#"{"user_id":"4","item_"#,
            ]
            .join("\n"),
        )
        .unwrap();
        let outcomes = read_outcomes(&log).unwrap();
        let rank = &outcomes["rank"];
        assert_eq!((rank["control"].impressions, rank["control"].clicks), (1, 1));
        assert_eq!((rank["new"].impressions, rank["new"].clicks), (1, 0));
    }
}
