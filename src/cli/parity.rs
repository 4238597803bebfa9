//! `residual parity`: the parity cases as a table or JSON rows.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use residual::device::device_name;
use residual::parity::{self, Manifest};
use tch::Device;

#[derive(clap::Args)]
pub struct Args {
    /// Where to run: cpu, cuda or all (cuda is skipped, with a note, when there is no GPU).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceChoice,
    /// Print one JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// Folder written by python_ref/export.py (default: target/python_ref).
    #[arg(long)]
    artifacts: Option<PathBuf>,
    /// Run only the cases whose name contains this text.
    #[arg(long)]
    filter: Option<String>,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum DeviceChoice {
    Cpu,
    Cuda,
    All,
}

impl Args {
    /// The devices asked for that exist (a note on stderr for a missing GPU).
    fn devices(&self) -> Vec<Device> {
        let mut devices = Vec::new();
        if self.device != DeviceChoice::Cuda {
            devices.push(Device::Cpu);
        }
        if self.device != DeviceChoice::Cpu {
            if tch::Cuda::is_available() {
                devices.push(Device::Cuda(0));
            } else {
                eprintln!("skipped: no CUDA device");
            }
        }
        devices
    }

    pub fn run(&self) -> Result<ExitCode> {
        let dir = self
            .artifacts
            .clone()
            .unwrap_or_else(parity::default_artifacts_dir);
        let manifest = Manifest::load(&dir).context("cannot run the parity report")?;
        let devices = self.devices();
        let rows = parity::run_all(&manifest, &devices, self.filter.as_deref());
        let passed = rows.iter().filter(|r| r.pass).count();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print!("{}", parity::format_table(&rows));
            let on: Vec<String> = devices.iter().map(|d| device_name(*d)).collect();
            println!(
                "{passed} of {} rows pass on {} (references from PyTorch {})",
                rows.len(),
                on.join(", "),
                manifest.torch_version
            );
        }
        Ok(if passed == rows.len() && !rows.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}
