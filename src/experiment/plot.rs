//! Error curves against iterations, as the paper's figure 6: one line per network (mean over
//! seeds) with a min–max band.

use std::path::Path;

use anyhow::{bail, Context, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::findings::{Curve, Network, Spread};

/// Fonts for plot labels, first one found.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

pub(crate) fn register_font() -> Result<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        FONT_PATHS
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .is_some_and(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font(
                    "sans-serif",
                    plotters::style::FontStyle::Normal,
                    bytes,
                )
                .is_ok()
            })
    });
    if !ok {
        bail!("no DejaVu Sans font found (apt-get install fonts-dejavu-core)");
    }
    Ok(())
}

/// The error (%) of one network at the end of an epoch, over its seeds.
#[derive(Debug, Clone, Copy)]
struct BandPoint {
    iteration: f64,
    mean: f64,
    min: f64,
    max: f64,
}

/// Per epoch of one network: the mean and range of the error over its seeds.
fn band(network: &Network, curves: &[Curve], test: bool) -> Vec<BandPoint> {
    let runs: Vec<&Curve> = curves.iter().filter(|c| c.name == network.name).collect();
    let epochs = runs.iter().map(|c| c.metrics.len()).min().unwrap_or(0);
    (0..epochs)
        .filter_map(|e| {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|c| {
                    let m = &c.metrics[e];
                    if test {
                        m.test_error
                    } else {
                        Some(m.train_error)
                    }
                })
                .map(|v| 100.0 * v)
                .collect();
            let s = Spread::of(&values)?;
            let iteration = (runs[0].metrics[e].epoch * runs[0].steps_per_epoch) as f64;
            Some(BandPoint {
                iteration,
                mean: s.mean,
                min: s.min,
                max: s.max,
            })
        })
        .collect()
}

/// Error (%) against iterations: the mean over seeds per network, with a min–max band.
pub(super) fn plot(
    networks: &[Network],
    curves: &[Curve],
    path: &Path,
    title: &str,
    test: bool,
) -> Result<()> {
    register_font()?;
    let series: Vec<(&Network, Vec<BandPoint>)> = networks
        .iter()
        .map(|n| (n, band(n, curves, test)))
        .collect();
    let max_x = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.iteration))
        .fold(1.0, f64::max);
    let max_err = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.max))
        .fold(1.0, f64::max);
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (900, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 26))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_x * 1.02, 0.0..max_err * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("iterations")
            .y_desc("error (%)")
            .draw()?;
        let palette = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
        let mut depths: Vec<i64> = networks.iter().map(|n| n.depth).collect();
        depths.sort();
        depths.dedup();
        for (n, points) in &series {
            let i = depths.iter().position(|d| *d == n.depth).unwrap_or(0);
            draw_network(&mut chart, n, points, palette[i % palette.len()])?;
        }
        // Errors fall from the left, so the upper right corner is where no curve goes.
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// One network's band (with two or more epochs), mean line with a dot per epoch, and legend
/// entry: dashed for plain nets, solid for residual ones.
fn draw_network<'a>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    n: &Network,
    points: &[BandPoint],
    color: RGBColor,
) -> Result<()> {
    if points.len() > 1 {
        let outline: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.iteration, p.max))
            .chain(points.iter().rev().map(|p| (p.iteration, p.min)))
            .collect();
        chart.draw_series(std::iter::once(Polygon::new(
            outline,
            color.mix(0.12).filled(),
        )))?;
    }
    let style = ShapeStyle::from(&color).stroke_width(2);
    let mean: Vec<(f64, f64)> = points.iter().map(|p| (p.iteration, p.mean)).collect();
    // A dot at the end of each epoch, so that a one-epoch run still shows.
    chart.draw_series(
        mean.iter()
            .map(|&p| Circle::new(p, 3, ShapeStyle::from(&color).filled())),
    )?;
    let label = format!("{} {}", if n.plain { "plain" } else { "ResNet" }, n.depth);
    if n.plain {
        chart
            .draw_series(DashedLineSeries::new(mean, 8, 6, style))?
            .label(label)
            .legend(move |(x, y)| {
                // A dashed sample: two short strokes.
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (7, 0)], style)
                    + PathElement::new(vec![(12, 0), (19, 0)], style)
            });
    } else {
        chart
            .draw_series(LineSeries::new(mean, style))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    Ok(())
}
