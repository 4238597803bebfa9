//! The experiment's `report.md` and `results.json`.

use std::path::Path;

use anyhow::Result;
use tch::Device;

use super::findings::{seeds, Curve, Findings, Network};
use super::plot::plot;
use crate::fs::write_atomic;
use crate::train::{RunData, TrainOptions};

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

/// Draws the two plots and writes `report.md` and `results.json` into `out`.
pub(super) fn write(
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
    md += &setup_paragraph(f, options, data, device);
    let verdict = f.summary.split(". ").next().unwrap_or_default();
    md += &format!("**Result:** {}\n\n", verdict.trim_end_matches('.'));
    for c in &f.comparisons {
        md += &format!("- {}\n", c.sentence());
    }
    md += &networks_table(&f.networks);
    md += &seeds_table(f);
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

/// The report's first paragraph: the paper's claim and this run's data and settings.
fn setup_paragraph(f: &Findings, options: &TrainOptions, data: &RunData, device: Device) -> String {
    let augmentation = match options.augment {
        Some(a) if a.pad > 0 && a.flip => format!("pad {} + random crop, horizontal flips", a.pad),
        Some(a) if a.pad > 0 => format!("pad {} + random crop", a.pad),
        Some(a) if a.flip => "horizontal flips".to_string(),
        _ => "none".to_string(),
    };
    let seeds: Vec<String> = seeds(&f.curves).iter().map(u64::to_string).collect();
    format!(
        "The ResNet paper (He et al. 2015, §4.2, figure 6) trains plain and residual CIFAR nets of \
         6n+2 layers with identical settings: the deeper plain net has *higher* training error than \
         the shallower one (degradation), while the deeper residual net does better. This run: \
         {} training images of shape {:?}, {} test images, {} epochs ({} iterations), batch {}, SGD \
         lr {} (schedule {:?}, linear warmup over {} epochs), momentum {}, weight decay {}, \
         augmentation: {augmentation}, shortcut option A, precision: {}, seeds {}.\n\n",
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
        precision(options, device),
        seeds.join(", ")
    )
}

/// Final errors per network over its seeds, beside the paper's, and what they can be compared on.
fn networks_table(networks: &[Network]) -> String {
    let mut md = String::new();
    md += "\nFinal errors over seeds (mean ± standard deviation, min–max):\n\n";
    md += "| network | depth | seeds | final train error | final test error | time (s) | \
           paper, CIFAR-10 test error |\n";
    md += "|---|---|---|---|---|---|---|\n";
    for n in networks {
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
    md
}

/// Final train and test error of every network for every seed.
fn seeds_table(f: &Findings) -> String {
    let mut md = "\nPer seed (final train error / final test error):\n\n| network |".to_string();
    let seeds = seeds(&f.curves);
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
    md
}
