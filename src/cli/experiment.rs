//! `residual experiment`: the ResNet paper's experiments.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use residual::device::parse_device;
use residual::experiment::{self, Plan};
use residual::train::TrainOptions;

use super::train::Settings;

#[derive(Subcommand)]
pub enum Kind {
    /// Plain vs residual CIFAR-style nets at several depths (ResNet paper, figure 6).
    Degradation(Degradation),
    /// Residual vs plain net probed as Veit et al. 2016: gradient flow, lesion study, paths.
    Veit(Veit),
}

impl Kind {
    pub fn run(&self) -> Result<ExitCode> {
        match self {
            Kind::Degradation(args) => args.run(),
            Kind::Veit(args) => args.run(),
        }
    }
}

#[derive(clap::Args)]
pub struct Degradation {
    #[arg(long, value_delimiter = ',', default_value = "20,56")]
    depths: Vec<i64>,
    /// Train every network with this many seeds (--seed, --seed + 1, ...).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    #[command(flatten)]
    train: Settings,
    /// Report folder.
    #[arg(long)]
    out: PathBuf,
}

impl Degradation {
    pub fn run(&self) -> Result<ExitCode> {
        super::install_ctrl_c();
        let device = parse_device(&self.train.device)?;
        // He et al. warm up their deepest net at a tenth of the rate; a linear warmup over the
        // first epoch keeps every depth from diverging at lr 0.1.
        let options = TrainOptions {
            warmup: self.train.warmup.unwrap_or(1.0),
            ..self.train.options()
        };
        let data = self.train.data(&options, device)?;
        let plan = Plan {
            depths: self.depths.clone(),
            seeds: self.seeds,
        };
        let quiet = self.train.quiet;
        let Some(findings) =
            experiment::degradation(&data, &plan, &options, &self.out, device, quiet)?
        else {
            return Ok(ExitCode::from(130));
        };
        println!("{}", findings.summary);
        for path in experiment::outputs(&self.out) {
            println!("wrote {}", path.display());
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(clap::Args)]
pub struct Veit {
    /// Depth of both nets (6n + 2).
    #[arg(long, default_value_t = 20)]
    depth: i64,
    /// Random draws per number of deleted blocks, swaps, and path length.
    #[arg(long, default_value_t = 5)]
    draws: usize,
    /// Test images in the gradient and path batch.
    #[arg(long, default_value_t = 128)]
    probe_batch: i64,
    /// Reuse (or extend) the runs of a degradation experiment's folder (its `runs/`) instead of
    /// training into OUT/runs.
    #[arg(long)]
    runs_from: Option<PathBuf>,
    #[command(flatten)]
    train: Settings,
    /// Report folder.
    #[arg(long)]
    out: PathBuf,
}

impl Veit {
    pub fn run(&self) -> Result<ExitCode> {
        super::install_ctrl_c();
        let device = parse_device(&self.train.device)?;
        let options = TrainOptions {
            warmup: self.train.warmup.unwrap_or(1.0),
            ..self.train.options()
        };
        let data = self.train.data(&options, device)?;
        let plan = experiment::veit::VeitPlan {
            depth: self.depth,
            runs: self.runs_from.clone().unwrap_or_else(|| self.out.clone()),
            draws: self.draws,
            probe_batch: self.probe_batch,
        };
        let quiet = self.train.quiet;
        let Some(findings) =
            experiment::veit::veit(&data, &plan, &options, &self.out, device, quiet)?
        else {
            return Ok(ExitCode::from(130));
        };
        println!("{}", findings.summary);
        for f in [
            "report.md",
            "gradients.png",
            "lesion.png",
            "paths.png",
            "lesion.md",
        ] {
            println!("wrote {}", self.out.join(f).display());
        }
        Ok(ExitCode::SUCCESS)
    }
}
