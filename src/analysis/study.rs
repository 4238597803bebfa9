//! The probes as runs over files: models from a config (and weights), results written as JSON,
//! PNG and Markdown tables into a folder. Shared by `residual probe`, `residual lesion` and
//! `residual experiment veit`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::gradients::{self, Gradients};
use super::lesion::{self, Lesion, LesionPlan};
use super::load;
use super::paths::{self, Paths};
use super::plot::{self, Labelled, COLORS};
use crate::data::{Dataset, Normalizer};
use crate::models::Inputs;
use crate::ModelConfig;

/// One model to probe.
#[derive(Debug, Clone)]
pub struct Subject {
    pub label: String,
    pub config: ModelConfig,
    /// Trained weights; `None`: the model at initialisation (from the seed).
    pub weights: Option<PathBuf>,
}

impl Subject {
    pub fn new(config: &ModelConfig, weights: Option<&Path>) -> Self {
        let state = if weights.is_some() { "trained" } else { "init" };
        Self {
            label: format!("{} {state}", name(config)),
            config: config.clone(),
            weights: weights.map(Path::to_path_buf),
        }
    }

    pub fn plain(&self) -> bool {
        match &self.config {
            ModelConfig::CifarResnet(c) => c.plain,
            ModelConfig::Resnet(c)
            | ModelConfig::Torchvision { config: c, .. }
            | ModelConfig::Timm { config: c, .. } => c.plain,
            _ => false,
        }
    }
}

/// `ResNet-20`, `plain-20`, `resnet18`, `plain resnet18`, `timm resnet50d`, `resnet 2-2-2-2`,
/// `ConvSDS-4`,
/// `SiD-18`: a model's name in tables and plots.
pub fn name(config: &ModelConfig) -> String {
    let plain = |c: &crate::models::resnet::ResNetConfig| if c.plain { "plain " } else { "" };
    match config {
        ModelConfig::CifarResnet(c) if c.plain => format!("plain-{}", c.depth),
        ModelConfig::CifarResnet(c) => format!("ResNet-{}", c.depth),
        ModelConfig::Torchvision {
            constructor,
            config,
        } => format!("{}{}", plain(config), constructor.name),
        ModelConfig::Timm {
            constructor,
            config,
        } => format!("{}timm {}", plain(config), constructor.name),
        ModelConfig::Resnet(c) => {
            let layers: Vec<String> = c.layers.iter().flatten().map(i64::to_string).collect();
            format!("{}resnet {}", plain(c), layers.join("-"))
        }
        ModelConfig::ConvSdsHead(c) => format!("ConvSDS-{}", c.n_layers),
        ModelConfig::SidClassifier(c) => format!("SiD-{}", c.num_hidden_layers),
        other => other.arch().to_string(),
    }
}

/// The plain net of a residual CIFAR net or ResNet config and the other way round (`None`: the
/// model has no plain form, as ConvSDS and SiD).
pub fn twin(config: &ModelConfig) -> Option<ModelConfig> {
    let mut twin = config.clone();
    match &mut twin {
        ModelConfig::CifarResnet(c) => c.plain = !c.plain,
        ModelConfig::Resnet(c)
        | ModelConfig::Torchvision { config: c, .. }
        | ModelConfig::Timm { config: c, .. } => c.plain = !c.plain,
        _ => return None,
    }
    Some(twin)
}

/// One model's gradient norms.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GradientRun {
    pub label: String,
    pub plain: bool,
    pub trained: bool,
    pub gradients: Gradients,
}

/// The gradient probe of every subject on one batch (training-mode batch norms; eval mode for a
/// model with dropout, [`super::Probed::stochastic`]); writes `gradients.json` and
/// `gradients.png` into `out`.
pub fn probe_gradients(
    subjects: &[Subject],
    x: &Inputs,
    y: &Tensor,
    device: Device,
    seed: u64,
    out: &Path,
) -> Result<Vec<GradientRun>> {
    let mut runs = Vec::with_capacity(subjects.len());
    for s in subjects {
        let model = load(&s.config, s.weights.as_deref(), device, seed)?;
        runs.push(GradientRun {
            label: s.label.clone(),
            plain: s.plain(),
            trained: s.weights.is_some(),
            gradients: gradients::probe(model.net.as_ref(), x, y, !model.net.stochastic())?,
        });
    }
    write_json(&out.join("gradients.json"), &runs)?;
    let labelled: Vec<Labelled> = runs
        .iter()
        .map(|r| Labelled {
            label: r.label.clone(),
            plain: r.plain,
            color: COLORS[usize::from(r.plain) + 2 * usize::from(!r.trained)],
            gradients: &r.gradients,
        })
        .collect();
    let title = subjects
        .first()
        .map(|s| name(&s.config))
        .unwrap_or_default();
    plot::gradients(&out.join("gradients.png"), &title, &labelled)?;
    Ok(runs)
}

/// The gradient table: first block, last block, their ratio, per run.
pub fn gradient_table(runs: &[GradientRun]) -> String {
    let mut t = String::from(
        "| model | loss | \\|dL/d out\\| first block | last block | first / last |\n|---|---:|---:|---:|---:|\n",
    );
    for r in runs {
        let g = &r.gradients;
        let (first, last) = (&g.outputs[1], g.outputs.last().unwrap_or(&g.outputs[0]));
        let _ = writeln!(
            t,
            "| {} | {:.3} | {:.3e} ({}) | {:.3e} ({}) | {:.3} |",
            r.label, g.loss, first.norm, first.name, last.norm, last.name, g.first_to_last
        );
    }
    t
}

/// The lesion study of every subject (trained ones, normally) on `test`; writes `lesion.json`,
/// `lesion.png` and `lesion.md` into `out`.
pub fn lesion_study(
    subjects: &[Subject],
    test: &Dataset,
    normalizer: &Normalizer,
    plan: &LesionPlan,
    device: Device,
    out: &Path,
) -> Result<Vec<(String, Lesion)>> {
    lesion_runs(subjects, plan, device, out, "", |net| {
        lesion::study(net, test, normalizer, plan)
    })
}

/// The lesion study of every subject on random inputs `x` ([`lesion::study_changes`]: the
/// "errors" are shares of changed predictions); writes the same files as [`lesion_study`], the
/// table with a note saying so.
pub fn lesion_changes(
    subjects: &[Subject],
    x: &Inputs,
    plan: &LesionPlan,
    device: Device,
    out: &Path,
) -> Result<Vec<(String, Lesion)>> {
    let note = format!(
        "On {} random inputs: the \"error\" columns are the share (%) of predictions that \
         differ from the intact model's.\n\n",
        super::batch_size(x)
    );
    lesion_runs(subjects, plan, device, out, &note, |net| {
        lesion::study_changes(net, x, plan)
    })
}

fn lesion_runs(
    subjects: &[Subject],
    plan: &LesionPlan,
    device: Device,
    out: &Path,
    note: &str,
    study: impl Fn(&dyn super::Probed) -> Result<Lesion>,
) -> Result<Vec<(String, Lesion)>> {
    let mut runs = Vec::with_capacity(subjects.len());
    for s in subjects {
        let model = load(&s.config, s.weights.as_deref(), device, plan.seed)?;
        runs.push((s.label.clone(), study(model.net.as_ref())?));
    }
    write_json(&out.join("lesion.json"), &runs)?;
    let refs: Vec<(&str, &Lesion)> = runs.iter().map(|(l, r)| (l.as_str(), r)).collect();
    plot::lesion(&out.join("lesion.png"), &refs)?;
    let table = format!("{note}{}", lesion_table(&runs));
    crate::fs::write_atomic(&out.join("lesion.md"), table.as_bytes())?;
    Ok(runs)
}

/// Percent with one decimal.
fn pct(v: f64) -> String {
    format!("{:.1}", 100.0 * v)
}

/// The lesion tables (Markdown): summary, one block deleted, `k` deleted, swaps.
pub fn lesion_table(runs: &[(String, Lesion)]) -> String {
    let mut t = String::from(
        "| model | intact error (%) | one block deleted: mean (%) | worst (%) | worst block | adjacent swap: mean (%) |\n|---|---:|---:|---:|---|---:|\n",
    );
    for (label, l) in runs {
        let mean =
            |v: &[lesion::Lesioned]| v.iter().map(|d| d.error).sum::<f64>() / v.len().max(1) as f64;
        let worst = l.deleted.iter().max_by(|a, b| a.error.total_cmp(&b.error));
        let _ = writeln!(
            t,
            "| {label} | {} | {} | {} | {} | {} |",
            pct(l.baseline),
            pct(mean(&l.deleted)),
            worst.map_or("-".into(), |w| pct(w.error)),
            worst.map_or("-", |w| w.name.as_str()),
            if l.swapped.is_empty() {
                "-".into()
            } else {
                pct(mean(&l.swapped))
            },
        );
    }
    t.push_str("\nTest error (%) with one block deleted:\n\n| block |");
    for (label, _) in runs {
        let _ = write!(t, " {label} |");
    }
    t.push_str("\n|---|");
    t.push_str(&"---:|".repeat(runs.len()));
    t.push('\n');
    let n = runs.iter().map(|(_, l)| l.deleted.len()).max().unwrap_or(0);
    for i in 0..n {
        let name = runs
            .iter()
            .find_map(|(_, l)| l.deleted.get(i))
            .map_or(String::new(), |d| d.name.clone());
        let _ = write!(t, "| {name} |");
        for (_, l) in runs {
            let _ = write!(
                t,
                " {} |",
                l.deleted.get(i).map_or("-".into(), |d| pct(d.error))
            );
        }
        t.push('\n');
    }
    t.push_str(
        "\nTest error (%) with k random blocks deleted, mean [min, max] over the draws:\n\n| k |",
    );
    for (label, _) in runs {
        let _ = write!(t, " {label} |");
    }
    t.push_str("\n|---:|");
    t.push_str(&"---|".repeat(runs.len()));
    t.push('\n');
    for i in 0..n {
        let _ = write!(t, "| {} |", i + 1);
        for (_, l) in runs {
            let cell = l.deleted_k.get(i).map_or("-".into(), |k| {
                format!("{} [{}, {}]", pct(k.mean), pct(k.min), pct(k.max))
            });
            let _ = write!(t, " {cell} |");
        }
        t.push('\n');
    }
    let swaps = runs
        .iter()
        .map(|(_, l)| l.swapped_k.len())
        .max()
        .unwrap_or(0);
    if swaps > 0 {
        t.push_str("\nTest error (%) after k random adjacent swaps, mean [min, max]:\n\n| k |");
        for (label, _) in runs {
            let _ = write!(t, " {label} |");
        }
        t.push_str("\n|---:|");
        t.push_str(&"---|".repeat(runs.len()));
        t.push('\n');
        for i in 0..swaps {
            let _ = write!(t, "| {} |", i + 1);
            for (_, l) in runs {
                let cell = l.swapped_k.get(i).map_or("-".into(), |k| {
                    format!("{} [{}, {}]", pct(k.mean), pct(k.min), pct(k.max))
                });
                let _ = write!(t, " {cell} |");
            }
            t.push('\n');
        }
    }
    t
}

/// The path analysis of `subject` on one batch; writes `paths.json` and `paths.png` into `out`.
pub fn path_analysis(
    subject: &Subject,
    x: &Inputs,
    y: &Tensor,
    draws: usize,
    device: Device,
    seed: u64,
    out: &Path,
) -> Result<Paths> {
    let model = load(&subject.config, subject.weights.as_deref(), device, seed)?;
    let p = paths::analyse(model.net.as_ref(), x, y, draws, seed)?;
    write_json(&out.join("paths.json"), &p)?;
    plot::paths(&out.join("paths.png"), &subject.label, &p)?;
    Ok(p)
}

/// One sentence on the effective paths.
pub fn path_summary(p: &Paths) -> String {
    let (lo, hi) = p.effective;
    let paths_in: f64 = p.lengths[lo..=hi].iter().map(|l| l.paths).sum();
    format!(
        "of {n} blocks, paths of length {lo}–{hi} carry at least {share:.0}% of the gradient while being \
         {paths:.1}% of all 2^{n} paths; the gradient-weighted mean path length is {g:.1} \
         (mean path length {m:.1}); one path's gradient is {g0:.2e} at length 0 and \
         {gn:.2e} at length {n}",
        n = p.units,
        share = 100.0 * paths::EFFECTIVE_SHARE,
        paths = 100.0 * paths_in,
        g = p.gradient_mean_length,
        m = p.mean_length,
        g0 = p.lengths[0].gradient,
        gn = p.lengths[p.units].gradient,
    )
}

/// `value` as pretty JSON into `path` (atomically), creating the folder.
pub fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::fs::write_atomic(path, &serde_json::to_vec_pretty(value)?)
}
