//! The ResNet paper's degradation experiment (§4.2, figure 6) on real data: plain and residual
//! CIFAR-style networks of several depths trained with identical settings, with curves of training
//! and test error per epoch and a report that says whether the degradation appeared.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tch::Device;

use crate::config::ModelConfig;
use crate::data::Batches;
use crate::fs::write_atomic;
use crate::models::cifar::CifarResNetConfig;
use crate::models::resnet::ShortcutKind;
use crate::train::{EpochMetrics, Outcome, RunData, RunDir, TrainOptions, Trainer};

/// One trained network of the experiment (one depth, plain or residual, one seed).
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    pub name: String,
    pub depth: i64,
    pub plain: bool,
    pub seed: u64,
    /// Iterations (batches) per epoch, for the paper's iteration axis.
    pub steps_per_epoch: u64,
    pub metrics: Vec<EpochMetrics>,
}

impl Curve {
    fn last(&self) -> Option<&EpochMetrics> {
        self.metrics.last()
    }
}

/// Mean and spread of one figure over seeds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Sample standard deviation (0 for one seed).
    pub std: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = if values.len() > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Some(Self {
            mean,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            std: var.sqrt(),
        })
    }

    fn pct(&self) -> String {
        format!(
            "{:.2}% ± {:.2} ({:.2}–{:.2})",
            100.0 * self.mean,
            100.0 * self.std,
            100.0 * self.min,
            100.0 * self.max
        )
    }
}

/// One network over all its seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Network {
    pub name: String,
    pub depth: i64,
    pub plain: bool,
    pub seeds: Vec<u64>,
    pub final_train_error: Spread,
    pub final_test_error: Option<Spread>,
    pub seconds: f64,
}

/// A comparison of final training error between two networks, as the paper makes it: `better`
/// should end lower than `worse`.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// What the paper expects, in words.
    pub claim: String,
    pub better: String,
    pub worse: String,
    /// Mean final training errors of the two.
    pub better_error: f64,
    pub worse_error: f64,
    /// The claim holds for the means.
    pub holds_for_mean: bool,
    /// Seeds (paired: the same seed for both networks) for which it holds, of how many.
    pub seeds_holding: usize,
    pub seeds: usize,
}

impl Comparison {
    fn sentence(&self) -> String {
        let verdict = if self.holds_for_mean {
            "holds"
        } else {
            "does NOT hold"
        };
        format!(
            "{}: {verdict} for the mean ({} {:.2}% vs {} {:.2}% final training error) and for {} of {} seeds",
            self.claim,
            self.better,
            100.0 * self.better_error,
            self.worse,
            100.0 * self.worse_error,
            self.seeds_holding,
            self.seeds
        )
    }
}

/// What the experiment found.
#[derive(Debug, Serialize)]
pub struct Findings {
    pub curves: Vec<Curve>,
    pub networks: Vec<Network>,
    pub comparisons: Vec<Comparison>,
    /// The deepest plain net ends with higher training error than the shallowest plain net
    /// (mean over seeds).
    pub plain_degrades: bool,
    /// The deepest residual net ends with training error no higher than the shallowest one.
    pub residual_improves: bool,
    /// At the deepest depth, the residual net ends below the plain one.
    pub residual_beats_plain: bool,
    pub summary: String,
}

/// Settings of the experiment besides the training options.
#[derive(Debug, Clone)]
pub struct Plan {
    pub depths: Vec<i64>,
    /// Each network is trained once per seed: `options.seed`, `options.seed + 1`, ...
    pub seeds: u64,
}

/// Trains every (depth, plain/residual, seed) into `out/runs/`, reusing finished runs and
/// resuming interrupted ones, then writes `report.md`, `results.json` and the two plots.
pub fn degradation(
    data: &RunData,
    plan: &Plan,
    options: &TrainOptions,
    out: &Path,
    device: Device,
    quiet: bool,
) -> Result<Option<Findings>> {
    if plan.depths.len() < 2 {
        bail!("--depths: give at least two depths to compare, e.g. 20,56");
    }
    if plan.seeds == 0 {
        bail!("--seeds: must be at least 1");
    }
    let [c, _, _] = data.train.image_shape();
    let steps_per_epoch = Batches::new(
        &data.train,
        &data.normalizer,
        options.batch_size,
        None,
        None,
    )
    .len() as u64;
    let mut curves = Vec::new();
    for seed in options.seed..options.seed + plan.seeds {
        for &depth in &plan.depths {
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
                let dir = out.join("runs").join(&name).join(format!("seed-{seed}"));
                let run = RunDir::new(&dir);
                let mut trainer = if run.latest()?.is_some() {
                    Trainer::resume(&dir, device, Some(options.epochs))?
                } else {
                    let options = TrainOptions {
                        seed,
                        ..options.clone()
                    };
                    Trainer::create(&dir, config, options, device)?
                };
                trainer.quiet = quiet;
                if trainer.state.epoch < options.epochs {
                    eprintln!(
                        "== {name} (seed {seed}): training {} epochs on {} images",
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
                    seed,
                    steps_per_epoch,
                    metrics: run.read_metrics()?,
                });
            }
        }
    }
    let findings = judge(curves);
    write_report(&findings, options, data, out, device)?;
    Ok(Some(findings))
}

fn networks(curves: &[Curve]) -> Vec<Network> {
    let mut keys: Vec<(i64, bool)> = curves.iter().map(|c| (c.depth, !c.plain)).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|(depth, residual)| {
            let runs: Vec<&Curve> = curves
                .iter()
                .filter(|c| c.depth == depth && c.plain != residual)
                .collect();
            let last: Vec<&EpochMetrics> = runs.iter().filter_map(|c| c.last()).collect();
            let train: Vec<f64> = last.iter().map(|m| m.train_error).collect();
            let test: Vec<f64> = last.iter().filter_map(|m| m.test_error).collect();
            Some(Network {
                name: runs.first()?.name.clone(),
                depth,
                plain: !residual,
                seeds: runs.iter().map(|c| c.seed).collect(),
                final_train_error: Spread::of(&train)?,
                final_test_error: Spread::of(&test),
                seconds: runs
                    .iter()
                    .flat_map(|c| c.metrics.iter().map(|m| m.seconds))
                    .sum(),
            })
        })
        .collect()
}

/// `better` should end with lower training error than `worse`, over the seeds both have.
fn compare(
    curves: &[Curve],
    claim: &str,
    better: (i64, bool),
    worse: (i64, bool),
) -> Option<Comparison> {
    let error = |(depth, plain): (i64, bool), seed: u64| {
        curves
            .iter()
            .find(|c| c.depth == depth && c.plain == plain && c.seed == seed)
            .and_then(|c| c.last())
            .map(|m| m.train_error)
    };
    let mut seeds: Vec<u64> = curves.iter().map(|c| c.seed).collect();
    seeds.sort();
    seeds.dedup();
    let pairs: Vec<(f64, f64)> = seeds
        .iter()
        .filter_map(|&s| Some((error(better, s)?, error(worse, s)?)))
        .collect();
    if pairs.is_empty() {
        return None;
    }
    let n = pairs.len() as f64;
    let better_error = pairs.iter().map(|p| p.0).sum::<f64>() / n;
    let worse_error = pairs.iter().map(|p| p.1).sum::<f64>() / n;
    let name =
        |(depth, plain): (i64, bool)| format!("{}-{depth}", if plain { "plain" } else { "resnet" });
    Some(Comparison {
        claim: claim.to_string(),
        better: name(better),
        worse: name(worse),
        better_error,
        worse_error,
        holds_for_mean: better_error < worse_error,
        seeds_holding: pairs.iter().filter(|(b, w)| b < w).count(),
        seeds: pairs.len(),
    })
}

fn judge(curves: Vec<Curve>) -> Findings {
    let depths: Vec<i64> = curves.iter().map(|c| c.depth).collect();
    let (shallow, deep) = (
        *depths.iter().min().unwrap_or(&0),
        *depths.iter().max().unwrap_or(&0),
    );
    let plain = compare(
        &curves,
        &format!("degradation: plain-{deep} trains worse than plain-{shallow}"),
        (shallow, true),
        (deep, true),
    );
    let residual = compare(
        &curves,
        &format!("with shortcuts depth helps: resnet-{deep} trains better than resnet-{shallow}"),
        (deep, false),
        (shallow, false),
    );
    let versus = compare(
        &curves,
        &format!("shortcuts fix the deep net: resnet-{deep} trains better than plain-{deep}"),
        (deep, false),
        (deep, true),
    );
    let holds = |c: &Option<Comparison>| c.as_ref().is_some_and(|c| c.holds_for_mean);
    let (plain_degrades, residual_improves, residual_beats_plain) =
        (holds(&plain), holds(&residual), holds(&versus));
    let comparisons: Vec<Comparison> = [plain, residual, versus].into_iter().flatten().collect();
    let all_seeds = comparisons
        .iter()
        .all(|c| c.holds_for_mean && c.seeds_holding == c.seeds);
    let verdict = if comparisons.len() < 3 {
        "Networks are missing, so the comparisons are incomplete.".to_string()
    } else if all_seeds {
        "All three comparisons go the paper's way, for the mean and for every seed.".to_string()
    } else if plain_degrades && residual_improves && residual_beats_plain {
        "All three comparisons go the paper's way for the mean, but not for every seed.".to_string()
    } else {
        "This run does NOT reproduce the paper: at least one comparison went the other way."
            .to_string()
    };
    let sentences: Vec<String> = comparisons.iter().map(Comparison::sentence).collect();
    Findings {
        networks: networks(&curves),
        curves,
        comparisons,
        plain_degrades,
        residual_improves,
        residual_beats_plain,
        summary: format!("{verdict} {}.", sentences.join("; ")),
    }
}

/// He et al. 2015, table 6: CIFAR-10 test error (%) of their residual nets.
pub fn paper_cifar10_test_error(depth: i64, plain: bool) -> Option<f64> {
    if plain {
        return None;
    }
    match depth {
        20 => Some(8.75),
        32 => Some(7.51),
        44 => Some(7.17),
        56 => Some(6.97),
        110 => Some(6.43),
        _ => None,
    }
}

fn seed_list(curves: &[Curve]) -> String {
    let mut seeds: Vec<u64> = curves.iter().map(|c| c.seed).collect();
    seeds.sort();
    seeds.dedup();
    let list: Vec<String> = seeds.iter().map(u64::to_string).collect();
    list.join(", ")
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
        if let Err(e) = plot(&f.networks, &f.curves, &out.join(file), title, test) {
            plot_notes.push(format!("{file} could not be drawn: {e:#}"));
        }
    }
    let mut md = String::new();
    md += "# Degradation experiment: plain vs residual networks\n\n";
    md += &format!(
        "The ResNet paper (He et al. 2015, §4.2, figure 6) trains plain and residual CIFAR nets of \
         6n+2 layers with identical settings: the deeper plain net has *higher* training error than \
         the shallower one (degradation), while the deeper residual net does better. This run: \
         {} training images of shape {:?}, {} test images, {} epochs ({} iterations), batch {}, SGD \
         lr {} (schedule {:?}, linear warmup over {} epochs), momentum {}, weight decay {}, \
         augmentation: {}, shortcut option A, precision: {}, seeds {}.\n\n",
        data.train.len(),
        data.train.image_shape(),
        data.test.len(),
        options.epochs,
        options.epochs * f.curves.first().map_or(0, |c| c.steps_per_epoch),
        options.batch_size,
        options.lr,
        options.schedule,
        options.warmup,
        options.momentum,
        options.weight_decay,
        match options.augment {
            Some(a) if a.pad > 0 && a.flip => format!("pad {} + random crop, horizontal flips", a.pad),
            Some(a) if a.pad > 0 => format!("pad {} + random crop", a.pad),
            Some(a) if a.flip => "horizontal flips".to_string(),
            _ => "none".to_string(),
        },
        precision(options, device),
        seed_list(&f.curves)
    );
    let verdict = f.summary.split(". ").next().unwrap_or_default();
    md += &format!("**Result:** {}\n\n", verdict.trim_end_matches('.'));
    for c in &f.comparisons {
        md += &format!("- {}\n", c.sentence());
    }
    md += "\nFinal errors over seeds (mean ± standard deviation, min–max):\n\n";
    md += "| network | depth | seeds | final train error | final test error | time (s) | \
           paper, CIFAR-10 test error |\n";
    md += "|---|---|---|---|---|---|---|\n";
    for n in &f.networks {
        md += &format!(
            "| {} | {} | {} | {} | {} | {:.0} | {} |\n",
            if n.plain { "plain" } else { "residual" },
            n.depth,
            n.seeds.len(),
            n.final_train_error.pct(),
            n.final_test_error
                .map_or_else(|| "-".to_string(), |s| s.pct()),
            n.seconds,
            paper_cifar10_test_error(n.depth, n.plain)
                .map_or_else(|| "-".to_string(), |e| format!("{e:.2}%"))
        );
    }
    md += "\nThe paper's figures (table 6) are for CIFAR-10 (50k 32x32 colour images, 64k \
           iterations at batch 128, 4-pixel padding, crops and flips); these runs use the data, \
           images and iterations stated above, so only the direction of the comparisons carries \
           over, not the error levels.\n";
    md += "\nPer seed (final train error / final test error):\n\n| network |";
    let mut seeds: Vec<u64> = f.curves.iter().map(|c| c.seed).collect();
    seeds.sort();
    seeds.dedup();
    for s in &seeds {
        md += &format!(" seed {s} |");
    }
    md += &format!("\n|---|{}\n", "---|".repeat(seeds.len()));
    let pct = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{:.2}%", 100.0 * v));
    for n in &f.networks {
        md += &format!("| {} |", n.name);
        for s in &seeds {
            let last = f
                .curves
                .iter()
                .find(|c| c.name == n.name && c.seed == *s)
                .and_then(Curve::last);
            md += &format!(
                " {} / {} |",
                pct(last.map(|m| m.train_error)),
                pct(last.and_then(|m| m.test_error))
            );
        }
        md += "\n";
    }
    md += "\n![training error](train_error.png)\n![test error](test_error.png)\n\n";
    md +=
        "Plain networks are dashed, residual ones solid; one colour per depth; lines are the mean \
           over seeds and the shaded bands span the lowest to the highest seed. The x axis counts \
           iterations (batches), as the paper's figure 6. Training error is measured on the \
           augmented batches during each epoch, as in the paper's figure.\n";
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
fn plot(
    networks: &[Network],
    curves: &[Curve],
    path: &Path,
    title: &str,
    test: bool,
) -> Result<()> {
    use plotters::prelude::*;
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
            let color = palette[i % palette.len()];
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
