//! Veit et al. 2016 on real data: a residual and a plain CIFAR-style net of the same depth are
//! trained (or their runs reused), then probed: gradient flow at initialisation and trained, the
//! lesion study (blocks deleted and swapped), and the path analysis of the residual net. Writes
//! `report.md` with the plots and a statement of what the numbers show.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use tch::Device;

use super::{cifar_config, network_name, train_network};
use crate::analysis::first_batch;
use crate::analysis::lesion::{Lesion, LesionPlan};
use crate::analysis::paths::{Paths, EFFECTIVE_SHARE};
use crate::analysis::study::{self, GradientRun, Subject};
use crate::train::{latest_weights, RunData, TrainOptions};

/// Settings of the experiment besides the training options.
#[derive(Debug, Clone)]
pub struct VeitPlan {
    pub depth: i64,
    /// Where the runs live (`DIR/runs/{plain,resnet}-{depth}/seed-{seed}`): the report folder, or
    /// a degradation experiment's folder whose runs are reused.
    pub runs: PathBuf,
    /// Random draws per `k` (lesion) and per path length (paths).
    pub draws: usize,
    /// Images in the gradient and path batch.
    pub probe_batch: i64,
}

/// What the experiment measured.
#[derive(Debug)]
pub struct VeitFindings {
    pub gradients: Vec<GradientRun>,
    pub lesion: Vec<(String, Lesion)>,
    pub paths: Paths,
    /// One paragraph, also in the report.
    pub summary: String,
}

/// Trains (or reuses) the two nets, runs every probe, writes the report into `out`; `None` when
/// Ctrl-C interrupted the training.
pub fn veit(
    data: &RunData,
    plan: &VeitPlan,
    options: &TrainOptions,
    out: &Path,
    device: Device,
    quiet: bool,
) -> Result<Option<VeitFindings>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let started = Instant::now();
    let mut trained = Vec::new();
    for plain in [false, true] {
        let Some(metrics) =
            train_network(data, &plan.runs, plan.depth, plain, options, device, quiet)?
        else {
            return Ok(None);
        };
        let dir = plan
            .runs
            .join("runs")
            .join(network_name(plan.depth, plain))
            .join(format!("seed-{}", options.seed));
        let config = cifar_config(data, plan.depth, plain)?;
        let test_error = metrics.last().and_then(|m| m.test_error);
        trained.push((config, latest_weights(&dir)?, test_error));
    }
    let train_s = started.elapsed().as_secs_f64();
    let probed = Instant::now();
    let (x, y) = first_batch(&data.test, &data.normalizer, plan.probe_batch)?;
    let mut subjects = Vec::new();
    for (config, weights, _) in &trained {
        subjects.push(Subject::new(config, None));
        subjects.push(Subject::new(config, Some(weights)));
    }
    let gradients = study::probe_gradients(&subjects, &x, &y, device, options.seed, out)?;
    let lesion_plan = LesionPlan {
        draws: plan.draws,
        seed: options.seed,
        batch_size: 500,
    };
    let trained_subjects: Vec<Subject> = subjects
        .iter()
        .filter(|s| s.weights.is_some())
        .cloned()
        .collect();
    let lesion = study::lesion_study(
        &trained_subjects,
        &data.test,
        &data.normalizer,
        &lesion_plan,
        device,
        out,
    )?;
    let paths = study::path_analysis(
        &trained_subjects[0],
        &x,
        &y,
        plan.draws,
        device,
        options.seed,
        out,
    )?;
    let probe_s = probed.elapsed().as_secs_f64();
    let summary = judge(&gradients, &lesion, &paths);
    let report = report(
        plan,
        options,
        data,
        &gradients,
        &lesion,
        &paths,
        &summary,
        [train_s, probe_s],
    );
    crate::fs::write_atomic(&out.join("report.md"), report.as_bytes())?;
    Ok(Some(VeitFindings {
        gradients,
        lesion,
        paths,
        summary,
    }))
}

/// Mean of the errors with one block deleted, minus the intact error (percentage points).
fn one_block_rise(l: &Lesion) -> (f64, f64) {
    let errors: Vec<f64> = l.deleted.iter().map(|d| d.error).collect();
    let mean = errors.iter().sum::<f64>() / errors.len().max(1) as f64;
    let worst = errors.iter().copied().fold(0.0, f64::max);
    (100.0 * (mean - l.baseline), 100.0 * (worst - l.baseline))
}

/// The largest rise of the mean error from `k - 1` to `k` deleted blocks (k = 0: intact), in
/// percentage points, and the `k` where it happens.
fn largest_step(l: &Lesion) -> (f64, usize) {
    let mut previous = l.baseline;
    let mut best = (f64::NEG_INFINITY, 0);
    for p in &l.deleted_k {
        let step = 100.0 * (p.mean - previous);
        if step > best.0 {
            best = (step, p.k);
        }
        previous = p.mean;
    }
    best
}

/// The statement of the report: what the numbers show, measured against Veit et al.'s claims.
fn judge(gradients: &[GradientRun], lesion: &[(String, Lesion)], paths: &Paths) -> String {
    let mut s = String::new();
    let ratio = |label: &str| {
        gradients
            .iter()
            .find(|g| g.label == label)
            .map_or(f64::NAN, |g| g.gradients.first_to_last)
    };
    let (res, plain) = (&lesion[0], &lesion[1]);
    let (r_mean, r_worst) = one_block_rise(&res.1);
    let (p_mean, p_worst) = one_block_rise(&plain.1);
    let _ = write!(
        s,
        "Deleting one block raised the test error of the trained {} from {:.1}% by {:+.1} points \
         on average (worst {:+.1}); that of the trained {} (from {:.1}%) by {:+.1} points on \
         average (worst {:+.1}). ",
        name_of(&res.0),
        100.0 * res.1.baseline,
        r_mean,
        r_worst,
        name_of(&plain.0),
        100.0 * plain.1.baseline,
        p_mean,
        p_worst
    );
    let _ = write!(
        s,
        "{} ",
        if p_mean > 2.0 * r_mean.max(0.5) {
            "As in Veit et al.'s figure 3, the residual net tolerates the loss of a block far \
             better than the plain net."
        } else {
            "Unlike Veit et al.'s figure 3, this run shows no clear difference between the \
             residual and the plain net here."
        }
    );
    let (r_step, r_k) = largest_step(&res.1);
    let (p_step, p_k) = largest_step(&plain.1);
    let n = res.1.units;
    let half_k = (n / 2).max(1);
    let half = res
        .1
        .deleted_k
        .get(half_k - 1)
        .map_or(f64::NAN, |p| 100.0 * p.mean);
    let _ = write!(
        s,
        "With k random blocks deleted, the residual net's mean error grows by at most {r_step:.1} \
         points per extra block (at k = {r_k}; {half:.1}% with {} of {n} blocks deleted), the \
         plain net's by up to {p_step:.1} points (at k = {p_k}). ",
        half_k
    );
    if let (Some(a), Some(b)) = (res.1.swapped_k.first(), res.1.swapped_k.last()) {
        let _ = write!(
            s,
            "Swapping adjacent blocks of the residual net costs {:.1}–{:.1}% error for 1–{} \
             swaps{}. ",
            100.0 * a.mean,
            100.0 * b.mean,
            b.k,
            plain.1.swapped_k.last().map_or(String::new(), |p| format!(
                " (plain net: {:.1}% after {} swaps)",
                100.0 * p.mean,
                p.k
            ))
        );
    }
    let _ = write!(
        s,
        "The gradient norm at the first block's output is {:.2}x the last block's for {} at \
         initialisation and {:.2}x trained ({}: {:.2}x and {:.2}x). ",
        ratio(&format!("{} init", name_of(&res.0))),
        name_of(&res.0),
        ratio(&res.0),
        name_of(&plain.0),
        ratio(&format!("{} init", name_of(&plain.0))),
        ratio(&plain.0),
    );
    let (lo, hi) = paths.effective;
    let _ = write!(
        s,
        "Path analysis of the trained residual net: {}. Veit et al. found that paths through \
         5–17 of 54 blocks carry most of the gradient of their CIFAR ResNet-110, far shorter \
         than the 27 blocks of a typical path; here the {:.0}% range is {lo}–{hi} of {} blocks \
         against a typical path of {:.1}.",
        study::path_summary(paths),
        100.0 * EFFECTIVE_SHARE,
        paths.units,
        paths.mean_length,
    );
    s
}

/// `ResNet-20` from `ResNet-20 trained`.
fn name_of(label: &str) -> &str {
    label.rsplit_once(' ').map_or(label, |(n, _)| n)
}

#[allow(clippy::too_many_arguments)]
fn report(
    plan: &VeitPlan,
    options: &TrainOptions,
    data: &RunData,
    gradients: &[GradientRun],
    lesion: &[(String, Lesion)],
    paths: &Paths,
    summary: &str,
    [train_s, probe_s]: [f64; 2],
) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "# Residual networks as ensembles of shallow networks (Veit et al. 2016)\n\n\
         A residual and a plain CIFAR-style net of depth {} (shortcut option A, {} blocks) trained \
         {} epochs on {} images (batch {}, lr {}, seed {}), evaluated on {} test images. \
         Training (or reusing the runs in `{}`) took {:.0} s, the probes {:.0} s.\n\n\
         ## What the numbers show\n\n{summary}\n",
        plan.depth,
        paths.units,
        options.epochs,
        data.train.len(),
        options.batch_size,
        options.lr,
        options.seed,
        data.test.len(),
        plan.runs.join("runs").display(),
        train_s,
        probe_s,
    );
    let _ = writeln!(
        r,
        "## Gradient flow\n\n![gradients](gradients.png)\n\nNorms of dL/d(block output) and \
         dL/d(layer weights) on {} test images (training-mode batch norms, mean cross-entropy), \
         input side first; `gradients.json` has every value. Norms are over whole tensors: \
         early blocks have larger feature maps.\n\n{}",
        plan.probe_batch,
        study::gradient_table(gradients)
    );
    let _ = writeln!(
        r,
        "## Lesion study\n\n![lesion](lesion.png)\n\nA deleted block keeps its shortcut (the \
         option-A pad for a downsampling block); a deleted plain block becomes the same \
         parameter-free shortcut. {} random draws per k; `lesion.json` has every value.\n\n{}",
        plan.draws,
        study::lesion_table(lesion)
    );
    let _ = writeln!(
        r,
        "## Paths\n\n![paths](paths.png)\n\n{} of {} blocks: one path's gradient is measured by \
         letting the backward pass through k random residual branches and the other blocks' \
         shortcuts ({} draws per length, {} images, eval-mode batch norms).\n\n\
         | length | paths (%) | one path's gradient | share of the gradient (%) |\n|---:|---:|---:|---:|",
        paths.units,
        paths.units,
        paths.draws,
        paths.images
    );
    for l in &paths.lengths {
        let _ = writeln!(
            r,
            "| {} | {:.2} | {:.3e} | {:.2} |",
            l.k,
            100.0 * l.paths,
            l.gradient,
            100.0 * l.total
        );
    }
    r
}
