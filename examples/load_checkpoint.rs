//! Reads a checkpoint into tensors and prints how long it took (peak memory: run it under
//! `/usr/bin/time -v`). Used by scripts/bench-load.sh.

use std::time::Instant;

use residual::checkpoint::{ReadOptions, StateDict};

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: load_checkpoint FILE"))?;
    let start = Instant::now();
    let state = StateDict::read(path.as_ref(), &ReadOptions::default())?;
    let elapsed = start.elapsed();
    let bytes: usize = state
        .entries
        .iter()
        .map(|(_, t)| t.numel() * t.kind().elt_size_in_bytes())
        .sum();
    println!(
        "{path}: {} tensors, {:.1} MB in {:.3} s",
        state.len(),
        bytes as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    Ok(())
}
