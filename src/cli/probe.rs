//! `residual probe gradients|paths` and `residual lesion`: Veit et al.'s measurements on a
//! residual model from a config and weights, on test images or random inputs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use residual::analysis::lesion::LesionPlan;
use residual::analysis::study::{self, Subject};
use residual::analysis::{self, first_batch, paths};
use residual::data::{DataFormat, Dataset, Normalizer, FASHION_MNIST_DIR};
use residual::device::parse_device;
use residual::models::Inputs;
use residual::ModelConfig;
use tch::{Device, Tensor};

use super::serde_enum;

#[derive(Subcommand)]
pub enum Probe {
    /// Norms of dL/d(block output) and dL/d(layer weights) for one batch, input side first, at
    /// initialisation and trained, with the plain/residual twin at the same depth.
    Gradients(Gradients),
    /// Path-length distribution and the gradient each path length carries (Veit et al. fig. 6).
    Paths(PathsArgs),
}

impl Probe {
    pub fn run(&self) -> Result<ExitCode> {
        match self {
            Probe::Gradients(a) => a.run(),
            Probe::Paths(a) => a.run(),
        }
    }
}

/// The model and data every probe takes.
#[derive(clap::Args)]
pub struct Common {
    /// Model config: any residual model the crate builds (`cifar_resnet` plain or residual,
    /// torchvision's and timm's ResNets, `conv_sds_head`, `sid_classifier`).
    #[arg(long)]
    config: PathBuf,
    /// Data folder (as `residual train`; default: Fashion-MNIST where installed), read for image
    /// models whose channels and classes it fits. Other models, and image models without fitting
    /// data, run on seeded random inputs and labels.
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, value_parser = serde_enum::<DataFormat>())]
    format: Option<DataFormat>,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Seeds the model at initialisation, the random inputs and the random draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// What a probe runs on.
struct Prepared {
    config: ModelConfig,
    device: Device,
    source: Source,
}

/// The examples: a labelled test split, or random inputs.
enum Source {
    /// The test split (its first `n` images where asked), normalised on the device.
    Data {
        test: Dataset,
        normalizer: Normalizer,
    },
    /// Seeded random inputs and labels ([`residual::analysis::random_batch`]).
    Random { x: Inputs, y: Tensor },
}

impl Common {
    /// Reads the config and the data (`n` test examples, or random ones) onto the device.
    fn prepare(&self, n: i64, test_subset: Option<i64>) -> Result<Prepared> {
        let device = parse_device(&self.device)?;
        let config = ModelConfig::from_file(&self.config)?;
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        let source = match analysis::image_channels(&config) {
            Some(_) if self.data.is_none() && !Path::new(FASHION_MNIST_DIR).exists() => {
                eprintln!(
                    "note: no --data and no {FASHION_MNIST_DIR}: probing on {n} random images"
                );
                self.random(&config, n, device)?
            }
            Some(channels) => {
                let dir = self
                    .data
                    .clone()
                    .unwrap_or_else(|| FASHION_MNIST_DIR.into());
                let (train, test) = residual::data::load(&dir, self.format)?;
                let (data_channels, classes) = (train.images.size()[1], train.num_classes);
                if data_channels == channels && classes <= num_classes(&config) {
                    let normalizer = Normalizer::fit(&train, device);
                    let test = match test_subset {
                        Some(n) => test.take(n),
                        None => test,
                    }
                    .to_device(device);
                    Source::Data { test, normalizer }
                } else {
                    eprintln!(
                        "note: {} has {data_channels}-channel images of {classes} classes, the \
                         model takes {channels} channels and {} classes: probing on {n} random \
                         images",
                        dir.display(),
                        num_classes(&config)
                    );
                    self.random(&config, n, device)?
                }
            }
            None => {
                if let Some(dir) = &self.data {
                    bail!(
                        "{}: no data format for {} models; leave out --data to probe on random \
                         inputs",
                        dir.display(),
                        config.arch()
                    );
                }
                self.random(&config, n, device)?
            }
        };
        Ok(Prepared {
            config,
            device,
            source,
        })
    }

    fn random(&self, config: &ModelConfig, n: i64, device: Device) -> Result<Source> {
        let (x, y) = analysis::random_batch(config, n, self.seed, device)?;
        Ok(Source::Random { x, y })
    }
}

/// The classes of an image model's head.
fn num_classes(config: &ModelConfig) -> i64 {
    match config {
        ModelConfig::CifarResnet(c) => c.num_classes,
        ModelConfig::Resnet(c)
        | ModelConfig::Torchvision { config: c, .. }
        | ModelConfig::Timm { config: c, .. } => c.num_classes,
        _ => 0,
    }
}

impl Prepared {
    /// The first `n` examples with their labels.
    fn batch(&self, n: i64) -> Result<(Inputs, Tensor)> {
        match &self.source {
            Source::Data { test, normalizer } => first_batch(test, normalizer, n),
            Source::Random { x, y } => Ok((
                x.iter()
                    .map(|(k, t)| (k.clone(), t.shallow_clone()))
                    .collect(),
                y.shallow_clone(),
            )),
        }
    }
}

fn print_written(out: &Path, files: &[&str]) {
    for f in files {
        println!("wrote {}", out.join(f).display());
    }
}

#[derive(clap::Args)]
pub struct Gradients {
    #[command(flatten)]
    common: Common,
    /// Trained weights of the model (without: at initialisation only).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Trained weights of the plain/residual twin of a CIFAR or ResNet config.
    #[arg(long)]
    twin_weights: Option<PathBuf>,
    /// Images in the batch (the first ones of the test split).
    #[arg(long, default_value_t = 128)]
    batch_size: i64,
}

impl Gradients {
    pub fn run(&self) -> Result<ExitCode> {
        let p = self
            .common
            .prepare(self.batch_size, Some(self.batch_size))?;
        let (x, y) = p.batch(self.batch_size)?;
        let mut subjects = vec![Subject::new(&p.config, None)];
        if let Some(w) = &self.weights {
            subjects.push(Subject::new(&p.config, Some(w)));
        }
        if let Some(twin) = study::twin(&p.config) {
            subjects.push(Subject::new(&twin, None));
            if let Some(w) = &self.twin_weights {
                subjects.push(Subject::new(&twin, Some(w)));
            }
        }
        let out = &self.common.out;
        let runs = study::probe_gradients(&subjects, &x, &y, p.device, self.common.seed, out)?;
        print!("{}", study::gradient_table(&runs));
        print_written(out, &["gradients.json", "gradients.png"]);
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(clap::Args)]
pub struct PathsArgs {
    #[command(flatten)]
    common: Common,
    /// Weights of a trained residual net (without: at initialisation).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Images in the batch.
    #[arg(long, default_value_t = 128)]
    batch_size: i64,
    /// Random block sets per path length.
    #[arg(long, default_value_t = 8)]
    draws: usize,
}

impl PathsArgs {
    pub fn run(&self) -> Result<ExitCode> {
        let p = self
            .common
            .prepare(self.batch_size, Some(self.batch_size))?;
        let (x, y) = p.batch(self.batch_size)?;
        let subject = Subject::new(&p.config, self.weights.as_deref());
        let out = &self.common.out;
        let result = study::path_analysis(
            &subject,
            &x,
            &y,
            self.draws,
            p.device,
            self.common.seed,
            out,
        )?;
        println!("{}: {}", subject.label, study::path_summary(&result));
        println!(
            "effective path lengths (>= {:.0}% of the gradient): {}..={}",
            100.0 * paths::EFFECTIVE_SHARE,
            result.effective.0,
            result.effective.1
        );
        print_written(out, &["paths.json", "paths.png"]);
        Ok(ExitCode::SUCCESS)
    }
}

/// `residual lesion`.
#[derive(clap::Args)]
pub struct Lesion {
    #[command(flatten)]
    common: Common,
    /// Trained weights (without: the model at initialisation).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// The control: trained weights of the plain/residual twin of a CIFAR or ResNet config.
    #[arg(long)]
    twin_weights: Option<PathBuf>,
    /// Random draws per number of deleted blocks or swaps.
    #[arg(long, default_value_t = 5)]
    draws: usize,
    /// Evaluate on the first N test images.
    #[arg(long)]
    test_subset: Option<i64>,
    #[arg(long, default_value_t = 500)]
    batch_size: i64,
}

impl Lesion {
    pub fn run(&self) -> Result<ExitCode> {
        let p = self
            .common
            .prepare(self.test_subset.unwrap_or(512), self.test_subset)?;
        let mut subjects = vec![Subject::new(&p.config, self.weights.as_deref())];
        if let (Some(twin), Some(w)) = (study::twin(&p.config), &self.twin_weights) {
            subjects.push(Subject::new(&twin, Some(w)));
        }
        let plan = LesionPlan {
            draws: self.draws,
            seed: self.common.seed,
            batch_size: self.batch_size,
        };
        let out = &self.common.out;
        let runs = match &p.source {
            Source::Data { test, normalizer } => {
                study::lesion_study(&subjects, test, normalizer, &plan, p.device, out)?
            }
            Source::Random { x, .. } => {
                println!(
                    "on {} random inputs: \"error\" is the share of predictions that change",
                    analysis::batch_size(x)
                );
                study::lesion_changes(&subjects, x, &plan, p.device, out)?
            }
        };
        print!(
            "{}",
            study::lesion_table(&runs[..runs.len().min(2)])
                .split("\n\n")
                .next()
                .unwrap_or("")
        );
        println!();
        print_written(out, &["lesion.json", "lesion.png", "lesion.md"]);
        Ok(ExitCode::SUCCESS)
    }
}
