//! `residual eval`: test error and confusion matrix of trained weights.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use residual::data::DataFormat;
use residual::device::parse_device;
use residual::ModelConfig;

use super::serde_enum;

#[derive(clap::Args)]
pub struct Args {
    /// Model config; or take config and weights from a run folder with --run.
    #[arg(long, required_unless_present = "run")]
    config: Option<PathBuf>,
    #[arg(long, required_unless_present = "run")]
    weights: Option<PathBuf>,
    #[arg(long)]
    run: Option<PathBuf>,
    #[arg(long, default_value = residual::data::FASHION_MNIST_DIR)]
    data: PathBuf,
    /// Data format (default: detected from the files; see `residual train --help`).
    #[arg(long, value_parser = serde_enum::<DataFormat>())]
    format: Option<DataFormat>,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value_t = 512)]
    batch_size: i64,
    #[arg(long)]
    json: bool,
    /// Evaluate the weights' moving average (`state_dict_ema`, runs trained with --ema-decay).
    #[arg(long)]
    ema: bool,
}

impl Args {
    /// The config and weights files: given, or those of the run folder.
    fn files(&self) -> Result<(PathBuf, PathBuf)> {
        match &self.run {
            Some(run) => Ok((
                self.config
                    .clone()
                    .unwrap_or_else(|| run.join("model.json")),
                match &self.weights {
                    Some(weights) => weights.clone(),
                    None => residual::train::latest_weights(run)?,
                },
            )),
            None => Ok((
                self.config.clone().context("--config is required")?,
                self.weights.clone().context("--weights is required")?,
            )),
        }
    }

    pub fn run(&self) -> Result<ExitCode> {
        let device = parse_device(&self.device)?;
        let (config, weights) = self.files()?;
        let config = ModelConfig::from_file(&config)?;
        let (train, test) = residual::data::load(&self.data, self.format)?;
        let normalizer = residual::data::Normalizer::fit(&train, device);
        let test = test.to_device(device);
        let (_vs, model) = residual::train::load_model(&config, &weights, device, self.ema)?;
        let (error, matrix) =
            residual::train::confusion(model.as_ref(), &test, &normalizer, self.batch_size)?;
        if self.json {
            println!(
                "{}",
                serde_json::json!({"test_error": error, "confusion": matrix, "images": test.len()})
            );
        } else {
            println!("test error {:.2}% on {} images", 100.0 * error, test.len());
            println!("confusion matrix (rows: true class, columns: predicted):");
            for (i, row) in matrix.iter().enumerate() {
                let cells: Vec<String> = row.iter().map(|c| format!("{c:5}")).collect();
                println!("{i:>3} {}", cells.join(""));
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
