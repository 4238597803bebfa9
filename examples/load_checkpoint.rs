//! Times reading checkpoints, with the peak resident memory the reading adds (VmHWM after
//! resetting it through /proc/self/clear_refs, minus VmRSS before). Used by scripts/bench-load.sh.
//!
//!     load_checkpoint FILE                      read into a state_dict (StateDict::read)
//!     load_checkpoint FILE --arch CONFIG [--device cpu|cuda] [--eager] [--repeat N]
//!                                               build CONFIG (an arch name or JSON), then load
//!                                               FILE into it strictly: lazily (Checkpoint), or
//!                                               with --eager through a StateDict; N times, the
//!                                               best time and the largest peak
//!     load_checkpoint FILE --inspect            `residual inspect`'s work: the table alone,
//!                                               then the whole summary
//!     load_checkpoint --write-bomb FILE         writes a 4 MB torch.save file whose one storage
//!                                               is a deflated entry inflating to 4 GiB of zeros

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use residual::checkpoint::{load_state_dict, Checkpoint, ReadOptions, StateDict};
use residual::ModelConfig;
use tch::nn::VarStore;
use tch::Device;

#[path = "../tests/bomb/mod.rs"]
mod bomb;

/// A field of /proc/self/status, in KB.
fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resets the peak (VmHWM) to the current resident size and returns that size, in KB.
fn reset_peak() -> u64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_kb("VmRSS:")
}

/// MB added to the resident size since `base` (KB) at its peak.
fn peak_mb(base: u64) -> f64 {
    status_kb("VmHWM:").saturating_sub(base) as f64 / 1024.0
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().any(|a| a == name);
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(path) = value("--write-bomb") {
        return write_bomb(path.as_ref());
    }
    let path = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .context("usage: load_checkpoint FILE [--arch CONFIG [--device D] [--eager] | --inspect] | --write-bomb FILE")?
        .clone();
    let options = ReadOptions::default();
    if flag("--inspect") {
        let base = reset_peak();
        let start = Instant::now();
        let checkpoint = Checkpoint::open(path.as_ref(), &options)?;
        let table = start.elapsed();
        let tensors = checkpoint.table().tensors.len();
        drop(checkpoint);
        let start = Instant::now();
        let summary = residual::inspect::inspect(path.as_ref(), &options, false)?;
        let whole = start.elapsed();
        println!(
            "{path}: table of {tensors} tensors ({:.1} MB) read in {:.4} s; whole inspect ({}) in {:.3} s; peak RSS +{:.0} MB",
            summary.bytes as f64 / 1e6,
            table.as_secs_f64(),
            summary.architecture.as_deref().unwrap_or("no match"),
            whole.as_secs_f64(),
            peak_mb(base)
        );
        return Ok(());
    }
    let Some(arch) = value("--arch") else {
        let base = reset_peak();
        let start = Instant::now();
        let state = StateDict::read(path.as_ref(), &options)?;
        let elapsed = start.elapsed();
        let bytes: usize = state
            .entries
            .iter()
            .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
            .sum();
        println!(
            "{path}: {} tensors, {:.1} MB in {:.3} s, peak RSS +{:.0} MB",
            state.len(),
            bytes as f64 / 1e6,
            elapsed.as_secs_f64(),
            peak_mb(base)
        );
        return Ok(());
    };
    let config = if arch.starts_with('{') {
        arch.clone()
    } else {
        format!(r#"{{"arch": "{arch}"}}"#)
    };
    let device = match value("--device").as_deref() {
        None | Some("cpu") => Device::Cpu,
        Some("cuda") => Device::Cuda(0),
        Some(other) => bail!("unknown device {other}"),
    };
    let vs = VarStore::new(device);
    ModelConfig::from_json(&config)?.build(vs.root())?;
    let weights: usize = vs
        .variables()
        .values()
        .map(|t| t.numel() * t.kind().elt_size_in_bytes())
        .sum();
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let repeat: usize = value("--repeat").map_or(Ok(1), |r| r.parse())?;
    let (mut best, mut peak) = (f64::INFINITY, 0f64);
    let mut outcome = String::new();
    for _ in 0..repeat {
        let base = reset_peak();
        let start = Instant::now();
        let loaded = if flag("--eager") {
            StateDict::read(path.as_ref(), &options).and_then(|s| load_state_dict(&vs, &s, true))
        } else {
            Checkpoint::open(path.as_ref(), &options).and_then(|c| load_state_dict(&vs, &c, true))
        };
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        best = best.min(start.elapsed().as_secs_f64());
        peak = peak.max(peak_mb(base));
        outcome = match loaded {
            Ok(_) => "model ready".to_string(),
            Err(e) => format!(
                "refused ({})",
                format!("{e:#}").lines().next().unwrap_or("")
            ),
        };
    }
    println!(
        "{path} -> {arch}: residual ({}): {outcome} in {best:.3} s, peak RSS +{peak:.0} MB (weights {:.0} MB)",
        if flag("--eager") { "eager" } else { "lazy" },
        weights as f64 / 1e6
    );
    Ok(())
}

/// Writes the 4 MB -> 4 GiB bomb.
fn write_bomb(path: &std::path::Path) -> Result<()> {
    let numel: i64 = (1 << 30) - 1024;
    let bytes = bomb::torch_zip_bomb("conv1.weight", numel);
    std::fs::File::create(path)?.write_all(&bytes)?;
    println!(
        "{}: {:.1} MB, one storage inflating to {:.2} GiB",
        path.display(),
        bytes.len() as f64 / 1e6,
        (numel * 4) as f64 / (1u64 << 30) as f64
    );
    Ok(())
}
