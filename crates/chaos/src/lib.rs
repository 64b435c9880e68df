//! Load and fault tooling shared by the chaos suite and the benchmarks: the cluster as
//! child processes, and open- and closed-loop load generators.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod load;

/// `value` rounded to `digits` decimals, for reports.
pub fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

/// Prints a benchmark's JSON report and writes it to `out` (creating its directory).
pub fn write_report(out: &std::path::Path, report: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    println!("{text}");
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, text)?;
    println!("report written to {}", out.display());
    Ok(())
}
