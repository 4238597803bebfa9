//! `residual`: the command-line tool, a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use residual::device::device_name;
use residual::doctor::Report;
use residual::parity::{self, Manifest};
use tch::Device;

#[derive(Parser)]
#[command(
    name = "residual",
    version,
    about = "Residual networks from PyTorch on libtorch, with parity checks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the libtorch, CUDA and cuDNN this binary runs with; fails unless libtorch is 2.11.x.
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compare every ported module with the PyTorch references (forward and gradients).
    Parity {
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
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceChoice {
    Cpu,
    Cuda,
    All,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Doctor { json } => doctor(json),
        Command::Parity {
            device,
            json,
            artifacts,
            filter,
        } => parity_report(device, json, artifacts, filter.as_deref()),
    }
}

fn doctor(json: bool) -> Result<ExitCode> {
    let report = Report::collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for line in report.lines() {
            println!("{line}");
        }
    }
    report.check()?;
    Ok(ExitCode::SUCCESS)
}

fn parity_report(
    choice: DeviceChoice,
    json: bool,
    artifacts: Option<PathBuf>,
    filter: Option<&str>,
) -> Result<ExitCode> {
    let dir = artifacts.unwrap_or_else(parity::default_artifacts_dir);
    let manifest = Manifest::load(&dir).context("cannot run the parity report")?;
    let cuda = tch::Cuda::is_available();
    let mut devices = Vec::new();
    if matches!(choice, DeviceChoice::Cpu | DeviceChoice::All) {
        devices.push(Device::Cpu);
    }
    if matches!(choice, DeviceChoice::Cuda | DeviceChoice::All) {
        if cuda {
            devices.push(Device::Cuda(0));
        } else {
            eprintln!("skipped: no CUDA device");
        }
    }
    let rows = parity::run_all(&manifest, &devices, filter);
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", parity::format_table(&rows));
        let failed = rows.iter().filter(|r| !r.pass).count();
        let on: Vec<String> = devices.iter().map(|d| device_name(*d)).collect();
        println!(
            "{} of {} rows pass on {} (references from PyTorch {})",
            rows.len() - failed,
            rows.len(),
            on.join(", "),
            manifest.torch_version
        );
    }
    Ok(if rows.iter().all(|r| r.pass) && !rows.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
