//! `residual`: the command-line tool, a thin layer over the library. Each subcommand's arguments
//! and what it does are in `cli/<subcommand>.rs`.

mod cli;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use cli::{bench, convert, doctor, eval, experiment, infer, inspect, parity, probe, train};

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
    Doctor(doctor::Args),
    /// Compare every ported module with the PyTorch references (forward and gradients).
    Parity(parity::Args),
    /// Run a model on tensors or images with PyTorch weights.
    Infer(Box<infer::Args>),
    /// List a checkpoint's tensors and name the architecture it fits.
    Inspect(inspect::Args),
    /// Train a model on image data into a run folder (or continue one with --resume).
    Train(train::Args),
    /// Test error and confusion matrix of trained weights.
    Eval(eval::Args),
    /// Time the training step (images/s): the Rust half of python_ref/bench_train.py and
    /// bench_gpu.py.
    BenchTrain(bench::Args),
    /// Time eval-mode inference (ms per batch).
    BenchInfer(bench::Args),
    /// Reproduce an experiment of the ResNet paper.
    #[command(subcommand)]
    Experiment(experiment::Kind),
    /// Convert between checkpoint formats, by extension: .pth/.pt/.bin, .safetensors, .ot.
    Convert(convert::Args),
    /// Look inside a model (Veit et al. 2016): gradient flow per block, path lengths.
    #[command(subcommand)]
    Probe(probe::Probe),
    /// Test error with blocks deleted or swapped (Veit et al. 2016, figures 3-5).
    Lesion(probe::Lesion),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let skip_teardown = matches!(cli.command, Command::Infer(_));
    let code = match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    };
    if skip_teardown {
        exit_now(if code == ExitCode::SUCCESS { 0 } else { 1 });
    }
    code
}

/// Ends the process once its output is flushed, without running the C++ static destructors of
/// libtorch's CUDA libraries: on a CPU-only run they page ~50-110 MB of those libraries' files
/// back in to tear down state the kernel reclaims anyway, which made the teardown the peak of
/// `residual infer`'s resident set (README, "Inference fast path"). Used where nothing is left
/// to do at exit: every file the command writes is complete (written atomically) before it.
fn exit_now(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    extern "C" {
        fn _exit(status: i32) -> !;
    }
    // SAFETY: `_exit` ends the process; no Rust state is used after it.
    unsafe { _exit(code) }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Doctor(args) => args.run(),
        Command::Parity(args) => args.run(),
        Command::Infer(args) => args.run(),
        Command::Inspect(args) => args.run(),
        Command::Train(args) => args.run(),
        Command::Eval(args) => args.run(),
        Command::BenchTrain(args) => args.run(bench::Timed::Training),
        Command::BenchInfer(args) => args.run(bench::Timed::Inference),
        Command::Experiment(kind) => kind.run(),
        Command::Convert(args) => args.run(),
        Command::Probe(kind) => kind.run(),
        Command::Lesion(args) => args.run(),
    }
}
