//! Line charts as SVG (plotters' SVG backend: no fonts or C libraries needed).

use plotters::prelude::*;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {message}")]
pub struct PlotError {
    path: String,
    message: String,
}

/// One named series of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), PlotError> {
    let fail = |error: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        message: error.to_string(),
    };
    let points = series.iter().flat_map(|(_, points)| points.iter());
    let (mut x_max, mut y_max) = (0.0f64, 0.0f64);
    let mut x_min = f64::INFINITY;
    for &(x, y) in points {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_max = y_max.max(y);
    }
    if !x_min.is_finite() {
        return Err(fail(&"no points"));
    }
    let x_span = (x_max - x_min).max(1e-9);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|error| fail(&error))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x_min - 0.02 * x_span)..(x_max + 0.02 * x_span),
            0.0..(y_max * 1.1).max(1e-9),
        )
        .map_err(|error| fail(&error))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|error| fail(&error))?;
    let palette = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for (index, (name, points)) in series.iter().enumerate() {
        let color = palette[index % palette.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|error| fail(&error))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&point| Circle::new(point, 3, color.filled())),
            )
            .map_err(|error| fail(&error))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|error| fail(&error))?;
    root.present().map_err(|error| fail(&error))?;
    Ok(())
}
