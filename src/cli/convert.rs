//! `residual convert`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use residual::checkpoint::StateDict;

use super::WeightOptions;

#[derive(clap::Args)]
pub struct Args {
    from: PathBuf,
    to: PathBuf,
    #[command(flatten)]
    weight_options: WeightOptions,
}

impl Args {
    pub fn run(&self) -> Result<ExitCode> {
        let state = StateDict::read(&self.from, &self.weight_options.read_options())?;
        state.save(&self.to)?;
        println!("wrote {} tensors to {}", state.len(), self.to.display());
        Ok(ExitCode::SUCCESS)
    }
}
