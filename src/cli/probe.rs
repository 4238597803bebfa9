//! `residual probe gradients|paths` and `residual lesion`: Veit et al.'s measurements on a CIFAR
//! net from a config and weights.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use residual::analysis::lesion::LesionPlan;
use residual::analysis::study::{self, Subject};
use residual::analysis::{first_batch, paths};
use residual::data::{DataFormat, Dataset, Normalizer};
use residual::device::parse_device;
use residual::ModelConfig;
use tch::Device;

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
    /// Model config (`cifar_resnet`, plain or residual; `lesion` also takes `sid_classifier` and
    /// `conv_sds_head`, on random inputs).
    #[arg(long)]
    config: PathBuf,
    /// Data folder (as `residual train`).
    #[arg(long, default_value = residual::data::FASHION_MNIST_DIR)]
    data: PathBuf,
    #[arg(long, value_parser = serde_enum::<DataFormat>())]
    format: Option<DataFormat>,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Seeds the model at initialisation and the random draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// What a probe runs on: the test split, normalised, on the device.
struct Prepared {
    config: ModelConfig,
    device: Device,
    test: Dataset,
    normalizer: Normalizer,
}

impl Common {
    fn prepare(&self, test_subset: Option<i64>) -> Result<Prepared> {
        let device = parse_device(&self.device)?;
        let config = ModelConfig::from_file(&self.config)?;
        std::fs::create_dir_all(&self.out)
            .with_context(|| format!("cannot create {}", self.out.display()))?;
        if !matches!(config, ModelConfig::CifarResnet(_)) {
            bail!(
                "{}: the data-driven probes take cifar_resnet configs (plain or residual), not {}",
                self.config.display(),
                config.arch()
            );
        }
        let (train, test) = residual::data::load(&self.data, self.format)?;
        let normalizer = Normalizer::fit(&train, device);
        let test = match test_subset {
            Some(n) => test.take(n),
            None => test,
        }
        .to_device(device);
        Ok(Prepared {
            config,
            device,
            test,
            normalizer,
        })
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
    /// Trained weights of the plain/residual twin of a CIFAR config.
    #[arg(long)]
    twin_weights: Option<PathBuf>,
    /// Images in the batch (the first ones of the test split).
    #[arg(long, default_value_t = 128)]
    batch_size: i64,
}

impl Gradients {
    pub fn run(&self) -> Result<ExitCode> {
        let p = self.common.prepare(Some(self.batch_size))?;
        let (x, y) = first_batch(&p.test, &p.normalizer, self.batch_size)?;
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
        let p = self.common.prepare(Some(self.batch_size))?;
        let (x, y) = first_batch(&p.test, &p.normalizer, self.batch_size)?;
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
    /// The control: trained weights of the plain/residual twin of a CIFAR config.
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
        let config = ModelConfig::from_file(&self.common.config)?;
        if matches!(
            config,
            ModelConfig::SidClassifier(_) | ModelConfig::ConvSdsHead(_)
        ) {
            return self.run_masked(&config);
        }
        let p = self.common.prepare(self.test_subset)?;
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
        let runs = study::lesion_study(&subjects, &p.test, &p.normalizer, &plan, p.device, out)?;
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

impl Lesion {
    /// SiD and ConvSDS: units deleted by weight masking, on random inputs, measured as the share
    /// of predictions that change (`residual::analysis::masked`).
    fn run_masked(&self, config: &ModelConfig) -> Result<ExitCode> {
        use residual::analysis::masked;
        let device = parse_device(&self.common.device)?;
        let out = &self.common.out;
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let vs = tch::nn::VarStore::new(device);
        let (model, units): (Box<dyn residual::Model>, _) = match config {
            ModelConfig::SidClassifier(c) => {
                let m = residual::models::sid::SidClassifier::new(vs.root(), c)?;
                let units = masked::sid_units(&m);
                (Box::new(m), units)
            }
            ModelConfig::ConvSdsHead(c) => {
                let m = residual::models::conv_sds::ConvSdsHead::new(vs.root(), c);
                let units = masked::conv_sds_units(&m);
                (Box::new(m), units)
            }
            _ => bail!("not a SiD or ConvSDS config"),
        };
        if let Some(w) = &self.weights {
            let state = residual::checkpoint::Checkpoint::open(w, &Default::default())?;
            residual::checkpoint::load_state_dict(&vs, &state, true)?;
        }
        let n = self.test_subset.unwrap_or(512);
        let inputs = masked::random_inputs(config, n, self.common.seed, device)?;
        let lesion = masked::study(
            model.as_ref(),
            &units,
            &inputs,
            self.draws,
            self.common.seed,
        )?;
        let label = format!(
            "{} {}",
            study::name(config),
            if self.weights.is_some() {
                "trained"
            } else {
                "init"
            }
        );
        let runs = vec![(label, lesion)];
        study::write_json(&out.join("lesion.json"), &runs)?;
        let note = format!(
            "Units deleted by zeroing the last layer of their branch, on {n} random inputs; the \
             \"error\" columns are the share (%) of predictions that differ from the intact \
             model's.\n\n"
        );
        let table = note + &study::lesion_table(&runs);
        residual::fs::write_atomic(&out.join("lesion.md"), table.as_bytes())?;
        print!("{table}");
        print_written(out, &["lesion.json", "lesion.md"]);
        Ok(ExitCode::SUCCESS)
    }
}
