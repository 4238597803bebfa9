//! `residual inspect`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use residual::inspect;

use super::WeightOptions;

#[derive(clap::Args)]
pub struct Args {
    weights: PathBuf,
    #[command(flatten)]
    weight_options: WeightOptions,
    /// List every key (default: the first 20).
    #[arg(long)]
    all: bool,
    #[arg(long)]
    json: bool,
    /// Confirm the architecture read off the keys by building it and comparing the checkpoint
    /// with it as a strict load does (names, shapes, dtypes; no value is read). Without it,
    /// inspect reads the checkpoint's table only.
    #[arg(long)]
    check: bool,
}

impl Args {
    pub fn run(&self) -> Result<ExitCode> {
        let summary = inspect::inspect(
            &self.weights,
            &self.weight_options.read_options(),
            self.check,
        )?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            print!("{}", inspect::format_summary(&summary, self.all));
        }
        Ok(ExitCode::SUCCESS)
    }
}
