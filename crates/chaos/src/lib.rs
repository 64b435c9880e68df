//! Load and fault tooling shared by the chaos suite and the benchmarks: the cluster as
//! child processes, and open- and closed-loop load generators.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod durability;
pub mod load;

/// SplitMix64: deterministic benchmark inputs without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (for n far below 2^64).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

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
