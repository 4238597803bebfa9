//! The ResNet paper's degradation experiment (§4.2, figure 6) on real data: plain and residual
//! CIFAR-style networks of several depths trained with identical settings, with curves of training
//! and test error per epoch and a report that says whether the degradation appeared.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tch::Device;

use crate::checkpoint::formats::write_atomic;
use crate::config::ModelConfig;
use crate::models::cifar::CifarResNetConfig;
use crate::models::resnet::ShortcutKind;
use crate::train::{EpochMetrics, Outcome, RunData, RunDir, TrainOptions, Trainer};

/// One trained network of the experiment.
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    pub name: String,
    pub depth: i64,
    pub plain: bool,
    pub metrics: Vec<EpochMetrics>,
}

impl Curve {
    fn last(&self) -> Option<&EpochMetrics> {
        self.metrics.last()
    }
}

/// What the experiment found.
#[derive(Debug, Serialize)]
pub struct Findings {
    pub curves: Vec<Curve>,
    /// The deepest plain net ends with higher training error than the shallowest plain net.
    pub plain_degrades: bool,
    /// The deepest residual net ends with training error no higher than the shallowest one.
    pub residual_improves: bool,
    pub summary: String,
}

/// Trains every (depth, plain/residual) pair into `out/runs/`, reusing finished runs and resuming
/// interrupted ones, then writes `report.md`, `results.json` and the two plots.
pub fn degradation(
    data: &RunData,
    depths: &[i64],
    options: &TrainOptions,
    out: &Path,
    device: Device,
    quiet: bool,
) -> Result<Option<Findings>> {
    if depths.len() < 2 {
        bail!("--depths: give at least two depths to compare, e.g. 20,56");
    }
    let [c, _, _] = data.train.image_shape();
    let mut curves = Vec::new();
    for &depth in depths {
        for plain in [true, false] {
            let name = format!("{}-{depth}", if plain { "plain" } else { "resnet" });
            let config = ModelConfig::CifarResnet(CifarResNetConfig {
                depth,
                num_classes: data.train.num_classes,
                shortcut: ShortcutKind::A,
                plain,
                in_channels: c,
            });
            config.validate()?;
            let dir = out.join("runs").join(&name);
            let run = RunDir::new(&dir);
            let mut trainer = if run.latest()?.is_some() {
                Trainer::resume(&dir, device, Some(options.epochs))?
            } else {
                Trainer::create(&dir, config, options.clone(), device)?
            };
            trainer.quiet = quiet;
            if trainer.state.epoch < options.epochs {
                eprintln!(
                    "== {name}: training {} epochs on {} images",
                    options.epochs,
                    data.train.len()
                );
            }
            if trainer.run(data)? == Outcome::Interrupted {
                return Ok(None);
            }
            curves.push(Curve {
                name,
                depth,
                plain,
                metrics: run.read_metrics()?,
            });
        }
    }
    let findings = judge(curves);
    write_report(&findings, options, data, out, device)?;
    Ok(Some(findings))
}

fn final_train_error(curves: &[Curve], plain: bool, depth: i64) -> Option<f64> {
    curves
        .iter()
        .find(|c| c.plain == plain && c.depth == depth)?
        .last()
        .map(|m| m.train_error)
}

fn judge(curves: Vec<Curve>) -> Findings {
    let depths: Vec<i64> = curves.iter().map(|c| c.depth).collect();
    let (shallow, deep) = (
        *depths.iter().min().unwrap_or(&0),
        *depths.iter().max().unwrap_or(&0),
    );
    let get = |plain| {
        (
            final_train_error(&curves, plain, shallow),
            final_train_error(&curves, plain, deep),
        )
    };
    let pct = |v: f64| format!("{:.2}%", 100.0 * v);
    let (plain_degrades, plain_text) = match get(true) {
        (Some(s), Some(d)) => (
            d > s,
            if d > s {
                format!("the degradation appeared: plain-{deep} ends with higher training error ({}) than plain-{shallow} ({})", pct(d), pct(s))
            } else {
                format!("the degradation did not appear in this run: plain-{deep} ends with training error {} against {} for plain-{shallow}", pct(d), pct(s))
            },
        ),
        _ => (false, "plain networks missing".into()),
    };
    let (residual_improves, residual_text) = match get(false) {
        (Some(s), Some(d)) => (
            d <= s,
            if d <= s {
                format!("with shortcuts the deeper net trains at least as well: resnet-{deep} {} vs resnet-{shallow} {}", pct(d), pct(s))
            } else {
                format!("with shortcuts the deeper net did not yet train better: resnet-{deep} {} vs resnet-{shallow} {}", pct(d), pct(s))
            },
        ),
        _ => (false, "residual networks missing".into()),
    };
    Findings {
        curves,
        plain_degrades,
        residual_improves,
        summary: format!("{plain_text}; {residual_text}."),
    }
}

/// The arithmetic the runs used, in words: TF32 is libtorch's default for cuDNN convolutions, so
/// "fp32" on a GPU says whether it was on.
pub fn precision(options: &TrainOptions, device: Device) -> String {
    let fp32 = match (device.is_cuda(), options.tf32) {
        (false, _) => "fp32",
        (true, false) => "fp32 (TF32 off: IEEE fp32 convolutions and matmuls)",
        (true, true) => "fp32 with TF32 convolutions and matmuls",
    };
    match options.amp {
        Some(dtype) => format!(
            "{} autocast, the rest {fp32}",
            format!("{dtype:?}").to_lowercase()
        ),
        None => fp32.to_string(),
    }
}

fn write_report(
    f: &Findings,
    options: &TrainOptions,
    data: &RunData,
    out: &Path,
    device: Device,
) -> Result<()> {
    let plots = [
        ("train_error.png", "Training error (%)", false),
        ("test_error.png", "Test error (%)", true),
    ];
    let mut plot_notes = Vec::new();
    for (file, title, test) in plots {
        if let Err(e) = plot(&f.curves, &out.join(file), title, test) {
            plot_notes.push(format!("{file} could not be drawn: {e:#}"));
        }
    }
    let mut md = String::new();
    md += "# Degradation experiment: plain vs residual networks\n\n";
    md += &format!(
        "The ResNet paper (He et al. 2015, §4.2, figure 6) trains plain and residual CIFAR nets of \
         6n+2 layers with identical settings: the deeper plain net has *higher* training error than \
         the shallower one (degradation), while the deeper residual net does better. This run: \
         {} training images of shape {:?}, {} test images, {} epochs, batch {}, SGD lr {} (schedule \
         {:?}), momentum {}, weight decay {}, augmentation: {}, shortcut option A, precision: {}.\n\n",
        data.train.len(),
        data.train.image_shape(),
        data.test.len(),
        options.epochs,
        options.batch_size,
        options.lr,
        options.schedule,
        options.momentum,
        options.weight_decay,
        match options.augment {
            Some(a) if a.pad > 0 && a.flip => format!("pad {} + random crop, horizontal flips", a.pad),
            Some(a) if a.pad > 0 => format!("pad {} + random crop", a.pad),
            Some(a) if a.flip => "horizontal flips".to_string(),
            _ => "none".to_string(),
        },
        precision(options, device)
    );
    md += &format!("**Result:** {}\n\n", f.summary);
    md +=
        "| network | depth | final train error | final test error | best test error | time (s) |\n";
    md += "|---|---|---|---|---|---|\n";
    for c in &f.curves {
        let last = c.last();
        let pct =
            |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{:.2}%", 100.0 * v));
        let best = c
            .metrics
            .iter()
            .filter_map(|m| m.test_error)
            .fold(None, |a: Option<f64>, e| Some(a.map_or(e, |a| a.min(e))));
        let seconds: f64 = c.metrics.iter().map(|m| m.seconds).sum();
        md += &format!(
            "| {} | {} | {} | {} | {} | {:.0} |\n",
            if c.plain { "plain" } else { "residual" },
            c.depth,
            pct(last.map(|m| m.train_error)),
            pct(last.and_then(|m| m.test_error)),
            pct(best),
            seconds
        );
    }
    md += "\n![training error](train_error.png)\n![test error](test_error.png)\n\n";
    md +=
        "Plain networks are dashed, residual ones solid; one colour per depth. Training error is \
           measured on the augmented batches during each epoch, as in the paper's figure.\n";
    for note in plot_notes {
        md += &format!("\nNote: {note}\n");
    }
    write_atomic(&out.join("report.md"), md.as_bytes())?;
    write_atomic(
        &out.join("results.json"),
        serde_json::to_string_pretty(f)?.as_bytes(),
    )?;
    Ok(())
}

/// Fonts for plot labels, first one found.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> Result<()> {
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

/// Error (%) per epoch, one line per network.
fn plot(curves: &[Curve], path: &Path, title: &str, test: bool) -> Result<()> {
    use plotters::prelude::*;
    register_font()?;
    let series: Vec<(&Curve, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|c| {
            let points = c
                .metrics
                .iter()
                .filter_map(|m| {
                    let e = if test {
                        m.test_error
                    } else {
                        Some(m.train_error)
                    };
                    e.map(|e| (m.epoch as f64, 100.0 * e))
                })
                .collect();
            (c, points)
        })
        .collect();
    let max_epoch = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(1.0, f64::max);
    let max_err = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
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
            .build_cartesian_2d(1.0..max_epoch.max(1.5), 0.0..max_err * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("error (%)")
            .draw()?;
        let palette = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
        let mut depths: Vec<i64> = curves.iter().map(|c| c.depth).collect();
        depths.sort();
        depths.dedup();
        for (c, points) in &series {
            let i = depths.iter().position(|d| *d == c.depth).unwrap_or(0);
            let color = palette[i % palette.len()];
            let style = ShapeStyle::from(&color).stroke_width(2);
            let label = if c.plain {
                format!("plain {} (dashed)", c.depth)
            } else {
                format!("ResNet {}", c.depth)
            };
            if c.plain {
                chart
                    .draw_series(DashedLineSeries::new(points.clone(), 8, 6, style))?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 10, y), (x + 20, y)], style)
                    });
            } else {
                chart
                    .draw_series(LineSeries::new(points.clone(), style))?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The report folder's files, for printing.
pub fn outputs(out: &Path) -> Vec<PathBuf> {
    [
        "report.md",
        "train_error.png",
        "test_error.png",
        "results.json",
    ]
    .iter()
    .map(|f| out.join(f))
    .collect()
}
