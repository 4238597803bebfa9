//! The ResNet paper's degradation experiment (§4.2, figure 6) on real data: plain and residual
//! CIFAR-style networks of several depths trained with identical settings, with curves of training
//! and test error per epoch and a report that says whether the degradation appeared.
//!
//! This file trains the networks; `findings` compares them, `report` writes `report.md` and
//! `results.json`, `plot` draws the error curves.

mod findings;
pub(crate) mod plot;
mod report;
pub mod veit;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use tch::Device;

pub use findings::{Comparison, Curve, Findings, Network, Spread};
pub use report::{paper_cifar10_test_error, precision};

use crate::config::ModelConfig;
use crate::data::Batches;
use crate::models::cifar::CifarResNetConfig;
use crate::models::resnet::ShortcutKind;
use crate::train::{EpochMetrics, Outcome, RunData, RunDir, TrainOptions, Trainer};

/// Settings of the experiment besides the training options.
#[derive(Debug, Clone)]
pub struct Plan {
    pub depths: Vec<i64>,
    /// Each network is trained once per seed: `options.seed`, `options.seed + 1`, ...
    pub seeds: u64,
}

impl Plan {
    fn validate(&self) -> Result<()> {
        if self.depths.len() < 2 {
            bail!("--depths: give at least two depths to compare, e.g. 20,56");
        }
        if self.seeds == 0 {
            bail!("--seeds: must be at least 1");
        }
        Ok(())
    }
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
    plan.validate()?;
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
                let options = TrainOptions {
                    seed,
                    ..options.clone()
                };
                let Some(metrics) =
                    train_network(data, out, depth, plain, &options, device, quiet)?
                else {
                    return Ok(None);
                };
                curves.push(Curve {
                    name: network_name(depth, plain),
                    depth,
                    plain,
                    seed,
                    steps_per_epoch,
                    metrics,
                });
            }
        }
    }
    let findings = findings::judge(curves);
    report::write(&findings, options, data, out, device)?;
    Ok(Some(findings))
}

/// `plain-20`, `resnet-56`: a network's name in runs, reports and plots.
fn network_name(depth: i64, plain: bool) -> String {
    format!("{}-{depth}", if plain { "plain" } else { "resnet" })
}

/// The paper's CIFAR net of `depth` layers (shortcut option A) for `data`'s images and classes.
pub(crate) fn cifar_config(data: &RunData, depth: i64, plain: bool) -> Result<ModelConfig> {
    let [c, _, _] = data.train.image_shape();
    let config = ModelConfig::CifarResnet(CifarResNetConfig {
        depth,
        num_classes: data.train.num_classes,
        shortcut: ShortcutKind::A,
        plain,
        in_channels: c,
    });
    config.validate()?;
    Ok(config)
}

/// Trains one network to `options.epochs` in `out/runs/{name}/seed-{seed}`, resuming the run
/// there if it has a checkpoint, and returns its metrics; `None` when Ctrl-C interrupted it.
pub(crate) fn train_network(
    data: &RunData,
    out: &Path,
    depth: i64,
    plain: bool,
    options: &TrainOptions,
    device: Device,
    quiet: bool,
) -> Result<Option<Vec<EpochMetrics>>> {
    let name = network_name(depth, plain);
    let config = cifar_config(data, depth, plain)?;
    let dir = out
        .join("runs")
        .join(&name)
        .join(format!("seed-{}", options.seed));
    let run = RunDir::new(&dir);
    let mut trainer = if run.latest()?.is_some() {
        Trainer::resume(&dir, device, Some(options.epochs))?
    } else {
        Trainer::create(&dir, config, options.clone(), device)?
    };
    trainer.quiet = quiet;
    if trainer.state.epoch < options.epochs {
        eprintln!(
            "== {name} (seed {}): training {} epochs on {} images",
            options.seed,
            options.epochs,
            data.train.len()
        );
    }
    if trainer.run(data)? == Outcome::Interrupted {
        return Ok(None);
    }
    Ok(Some(run.read_metrics()?))
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
