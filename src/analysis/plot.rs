//! The probes' plots: panels of lines (dashed for plain nets) with optional min–max bands; log
//! scales are drawn as log10 of the value on a linear axis.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::gradients::Gradients;
use super::lesion::{Lesion, OverK};
use super::paths::Paths;
use crate::experiment::plot::register_font;

/// One line of a panel.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// `(x, low, high)` around the line.
    pub band: Vec<(f64, f64, f64)>,
    pub dashed: bool,
    pub color: RGBColor,
}

/// One chart.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub series: Vec<Series>,
}

/// Line colours: residual nets warm, plain nets cool; trained dark, at init light.
pub const COLORS: [RGBColor; 6] = [
    RGBColor(200, 30, 30),
    RGBColor(30, 60, 200),
    RGBColor(240, 140, 40),
    RGBColor(90, 170, 230),
    RGBColor(30, 150, 60),
    RGBColor(0, 0, 0),
];

/// Draws `panels` side by side into the PNG `path`, each `width x height` pixels.
pub fn draw(path: &Path, panels: &[Panel], width: u32, height: u32) -> Result<()> {
    register_font()?;
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (width * panels.len().max(1) as u32, height))
            .into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (panel, area) in panels.iter().zip(&areas) {
            draw_panel(area, panel)?;
        }
        root.present()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn draw_panel(area: &DrawingArea<BitMapBackend, plotters::coord::Shift>, p: &Panel) -> Result<()> {
    let xs = p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0));
    let ys = p.series.iter().flat_map(|s| {
        s.points
            .iter()
            .map(|q| q.1)
            .chain(s.band.iter().flat_map(|b| [b.1, b.2]))
    });
    let finite = |v: &f64| v.is_finite();
    let (x0, x1) = bounds(xs.filter(finite));
    let (y0, y1) = bounds(ys.filter(finite));
    let pad = ((y1 - y0) * 0.08).max(1e-9);
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))?;
    chart
        .configure_mesh()
        .x_desc(&p.x_desc)
        .y_desc(&p.y_desc)
        .draw()?;
    for s in &p.series {
        let color = s.color;
        if s.band.len() > 1 {
            let outline: Vec<(f64, f64)> = s
                .band
                .iter()
                .map(|b| (b.0, b.2))
                .chain(s.band.iter().rev().map(|b| (b.0, b.1)))
                .collect();
            chart.draw_series(std::iter::once(Polygon::new(
                outline,
                color.mix(0.15).filled(),
            )))?;
        }
        let style = ShapeStyle::from(&color).stroke_width(2);
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|q| q.1.is_finite())
            .collect();
        chart.draw_series(
            points
                .iter()
                .map(|&q| Circle::new(q, 3, ShapeStyle::from(&color).filled())),
        )?;
        let label = s.label.clone();
        if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(points, 7, 5, style))?
                .label(label)
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (7, 0)], style)
                        + PathElement::new(vec![(12, 0), (19, 0)], style)
                });
        } else {
            chart
                .draw_series(LineSeries::new(points, style))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// `c` halfway to white.
fn lighter(c: RGBColor) -> RGBColor {
    let half = |v: u8| v / 2 + 128;
    RGBColor(half(c.0), half(c.1), half(c.2))
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo.is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    }
}

/// A labelled gradient measurement, for [`gradients`].
pub struct Labelled<'a> {
    pub label: String,
    pub plain: bool,
    pub color: RGBColor,
    pub gradients: &'a Gradients,
}

/// Two panels: `log10 |dL/d(output)|` per unit (0 = stem) and `log10 |dL/d(weight)|` per layer.
pub fn gradients(path: &Path, depth_label: &str, runs: &[Labelled]) -> Result<()> {
    let series = |weights: bool| -> Vec<Series> {
        runs.iter()
            .map(|r| {
                let norms = if weights {
                    &r.gradients.weights
                } else {
                    &r.gradients.outputs
                };
                Series {
                    label: r.label.clone(),
                    points: norms
                        .iter()
                        .enumerate()
                        .map(|(i, n)| (i as f64, n.norm.log10()))
                        .collect(),
                    band: Vec::new(),
                    dashed: r.plain,
                    color: r.color,
                }
            })
            .collect()
    };
    let panels = [
        Panel {
            title: format!("{depth_label}: gradient at each block's output"),
            x_desc: "block (0 = stem, input side first)".into(),
            y_desc: "log10 |dL/d output|".into(),
            series: series(false),
        },
        Panel {
            title: format!("{depth_label}: gradient at each layer's weights"),
            x_desc: "layer (input side first)".into(),
            y_desc: "log10 |dL/d weight|".into(),
            series: series(true),
        },
    ];
    draw(path, &panels, 700, 500)
}

/// Error (%) over `k`, starting at the intact network's (`k = 0`).
fn over_k_series(
    label: &str,
    baseline: f64,
    points: &[OverK],
    plain: bool,
    color: RGBColor,
) -> Series {
    let b = 100.0 * baseline;
    Series {
        label: label.into(),
        points: std::iter::once((0.0, b))
            .chain(points.iter().map(|p| (p.k as f64, 100.0 * p.mean)))
            .collect(),
        band: std::iter::once((0.0, b, b))
            .chain(
                points
                    .iter()
                    .map(|p| (p.k as f64, 100.0 * p.min, 100.0 * p.max)),
            )
            .collect(),
        dashed: plain,
        color,
    }
}

/// Veit et al.'s figures 3–5 side by side: error with each block deleted, with `k` random
/// blocks deleted, with `k` random adjacent swaps; residual (solid) vs plain (dashed).
pub fn lesion(path: &Path, runs: &[(&str, &Lesion)]) -> Result<()> {
    let color = |l: &Lesion, i: usize| {
        if l.residual {
            COLORS[0]
        } else {
            COLORS[1 + 2 * (i % 2)]
        }
    };
    let mut single = Vec::new();
    let mut deleted = Vec::new();
    let mut swapped = Vec::new();
    for (i, (label, l)) in runs.iter().enumerate() {
        let c = color(l, i);
        single.push(Series {
            label: format!("{label}, one block deleted"),
            points: l
                .deleted
                .iter()
                .enumerate()
                .map(|(j, d)| ((j + 1) as f64, 100.0 * d.error))
                .collect(),
            band: Vec::new(),
            dashed: !l.residual,
            color: c,
        });
        single.push(Series {
            label: format!("{label}, intact"),
            points: vec![
                (1.0, 100.0 * l.baseline),
                (l.units as f64, 100.0 * l.baseline),
            ],
            band: Vec::new(),
            dashed: true,
            color: lighter(c),
        });
        deleted.push(over_k_series(
            label,
            l.baseline,
            &l.deleted_k,
            !l.residual,
            c,
        ));
        if !l.swapped_k.is_empty() {
            swapped.push(over_k_series(
                label,
                l.baseline,
                &l.swapped_k,
                !l.residual,
                c,
            ));
        }
    }
    let mut panels = vec![
        Panel {
            title: "one block deleted (Veit fig. 3)".into(),
            x_desc: "deleted block (input side first)".into(),
            y_desc: "test error (%)".into(),
            series: single,
        },
        Panel {
            title: "k random blocks deleted (fig. 4)".into(),
            x_desc: "blocks deleted".into(),
            y_desc: "test error (%), mean and range".into(),
            series: deleted,
        },
    ];
    // Stages of one block each have no pair to swap.
    if !swapped.is_empty() {
        panels.push(Panel {
            title: "k random adjacent swaps (fig. 5)".into(),
            x_desc: "swaps".into(),
            y_desc: "test error (%), mean and range".into(),
            series: swapped,
        });
    }
    draw(path, &panels, 600, 480)
}

/// Veit et al.'s figure 6: the distribution of path lengths with the share of the gradient each
/// length carries, and the gradient magnitude of one path per length (log scale).
pub fn paths(path: &Path, label: &str, p: &Paths) -> Result<()> {
    let line = |name: &str, points: Vec<(f64, f64)>, color, dashed| Series {
        label: name.into(),
        points,
        band: Vec::new(),
        dashed,
        color,
    };
    let share = vec![
        line(
            "paths of this length (%)",
            p.lengths
                .iter()
                .map(|l| (l.k as f64, 100.0 * l.paths))
                .collect(),
            COLORS[1],
            true,
        ),
        line(
            "share of the total gradient (%)",
            p.lengths
                .iter()
                .map(|l| (l.k as f64, 100.0 * l.total))
                .collect(),
            COLORS[0],
            false,
        ),
    ];
    let magnitude = vec![Series {
        label: "one path's gradient (mean, range)".into(),
        points: p
            .lengths
            .iter()
            .map(|l| (l.k as f64, l.gradient.log10()))
            .collect(),
        band: p
            .lengths
            .iter()
            .map(|l| (l.k as f64, l.gradient_min.log10(), l.gradient_max.log10()))
            .collect(),
        dashed: false,
        color: COLORS[0],
    }];
    let panels = [
        Panel {
            title: format!("{label}: path lengths (Veit fig. 6a/c)"),
            x_desc: "path length (residual branches passed)".into(),
            y_desc: "%".into(),
            series: share,
        },
        Panel {
            title: format!("{label}: gradient per path (fig. 6b)"),
            x_desc: "path length".into(),
            y_desc: "log10 |dL/d input| through one path".into(),
            series: magnitude,
        },
    ];
    draw(path, &panels, 650, 480)
}
