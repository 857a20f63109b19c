//! The latency-versus-offered-rate plot, latency on a log scale (SVG: plotters' SVG backend writes text as SVG text, so no
//! system fonts are needed).

use std::path::Path;

use plotters::prelude::*;

use crate::report::Curve;

/// A plot that could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing {path}: {why}")]
pub struct PlotError {
    path: String,
    why: String,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// Draws p50 (solid) and p99 (dashed-looking, with points) latency against offered rate.
pub fn latency_vs_rate(curves: &[Curve], path: &Path) -> Result<(), PlotError> {
    let err = |why: String| PlotError {
        path: path.display().to_string(),
        why,
    };
    let max_x = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.offered))
        .fold(1.0f64, f64::max);
    let ys = || {
        curves
            .iter()
            .flat_map(|c| c.points.iter())
            .flat_map(|p| [p.p50_us, p.p99_us])
            .map(|us| us.max(1) as f64 / 1000.0)
    };
    // Log scale: on a shared machine a few overloaded points are seconds, the rest sub-millisecond.
    let max_y = ys().fold(0.1f64, f64::max);
    let min_y = ys().fold(max_y, f64::min).min(0.1);
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "latency vs offered rate (1 KiB, keep-alive, open loop)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x * 1.05, (min_y / 1.5..max_y * 1.5).log_scale())
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("offered requests/s")
        .y_desc("latency, ms (log scale)")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, c) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let p50: Vec<(f64, f64)> = c
            .points
            .iter()
            .map(|p| (p.offered, p.p50_us.max(1) as f64 / 1000.0))
            .collect();
        let p99: Vec<(f64, f64)> = c
            .points
            .iter()
            .map(|p| (p.offered, p.p99_us.max(1) as f64 / 1000.0))
            .collect();
        chart
            .draw_series(LineSeries::new(p50.clone(), color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(format!("{} p50", c.system))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(p99.clone(), color.stroke_width(1)))
            .map_err(|e| err(e.to_string()))?
            .label(format!("{} p99", c.system))
            .legend(move |(x, y)| Circle::new((x + 10, y), 3, color.filled()));
        chart
            .draw_series(p99.iter().map(|&xy| Circle::new(xy, 3, color.filled())))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(p50.iter().map(|&xy| Circle::new(xy, 2, color)))
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::CurvePoint;

    #[test]
    fn writes_an_svg_with_every_series() {
        let point = |offered: f64, p50: u64| CurvePoint {
            offered,
            achieved: offered,
            p50_us: p50,
            p99_us: p50 * 4,
            errors: 0,
        };
        let curves = vec![
            Curve {
                system: "nginx http".into(),
                points: vec![point(1000.0, 200), point(2000.0, 300)],
            },
            Curve {
                system: "scm-proxy http".into(),
                points: vec![point(1000.0, 250), point(2000.0, 500)],
            },
        ];
        let dir = std::env::temp_dir().join(format!("scm-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("latency.svg");
        latency_vs_rate(&curves, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("scm-proxy http p99"));
        assert!(svg.contains("offered requests/s"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
