//! `residual doctor`.

use std::process::ExitCode;

use anyhow::Result;
use residual::doctor::Report;

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl Args {
    pub fn run(&self) -> Result<ExitCode> {
        let report = Report::collect();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            for line in report.lines() {
                println!("{line}");
            }
        }
        report.check()?;
        Ok(ExitCode::SUCCESS)
    }
}
