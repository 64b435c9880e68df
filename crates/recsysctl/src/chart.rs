//! PNG bar charts with error bars (plotters, text drawn with a system TrueType font).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

const FONT_CANDIDATES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> anyhow::Result<()> {
    let path = FONT_CANDIDATES
        .iter()
        .find(|path| Path::new(path).is_file())
        .context("no TrueType font found for chart labels (install fonts-dejavu-core)")?;
    // plotters keeps fonts for the life of the process; a CLI run is short.
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

/// One bar: label, value, and the interval drawn as an error bar.
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

pub fn bar_chart(path: &Path, title: &str, y_label: &str, bars: &[Bar]) -> anyhow::Result<()> {
    register_font()?;
    let top = bars.iter().map(|b| b.high.max(b.value)).fold(0.0f64, f64::max).max(1e-6) * 1.15;
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let count = bars.len() as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        // A segmented range over 0..n has n + 1 segments: one per bar needs 0..n-1.
        .build_cartesian_2d((0..(count - 1).max(0)).into_segmented(), 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len().max(1))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(n) => bars.get(*n as usize).map(|b| b.label.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    chart.draw_series(bars.iter().zip(0..).map(|(bar, n)| {
        let mut rectangle = Rectangle::new(
            [(SegmentValue::Exact(n), 0.0), (SegmentValue::Exact(n + 1), bar.value)],
            BLUE.mix(0.6).filled(),
        );
        rectangle.set_margin(0, 0, 30, 30);
        rectangle
    }))?;
    chart.draw_series(bars.iter().zip(0..).map(|(bar, n)| {
        ErrorBar::new_vertical(SegmentValue::CenterOf(n), bar.low, bar.value, bar.high, BLACK.filled(), 12)
    }))?;
    chart.draw_series(bars.iter().zip(0..).map(|(bar, n)| {
        Text::new(
            format!("{:.4}", bar.value),
            (SegmentValue::Exact(n), bar.high.max(bar.value) + top * 0.02),
            ("sans-serif", 14),
        )
    }))?;
    root.present().with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
