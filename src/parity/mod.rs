//! Parity against the PyTorch references that `python_ref/export.py` writes, shared by `tests/` and
//! `residual parity`.
//!
//! For each case the Rust model is built from the case's config, the exported state_dict is loaded
//! by name (strictly), and then compared: the TorchScript module's parameters against the Rust
//! variables (exactly), the Rust forward against the eager outputs and against the TorchScript
//! module run from Rust, the Rust gradients of the case's scalar loss against PyTorch's, for inputs
//! and every parameter, and for training-step cases the whole state after the trainer's SGD steps.
//! Each tensor is measured by max|Δ| / max|reference| against the case's tolerance for the device;
//! a NaN or infinity on either side fails the case. CUDA runs compare against the same CPU
//! references, with TF32 off.
//!
//! [`manifest`] reads the cases, [`run_case`] runs one step by step, [`CaseOutcome::pass`] says
//! what parity means, and [`report`] prints the rows of `residual parity`.

mod case;
mod diff;
pub mod manifest;
mod outcome;
pub mod report;
mod seeded;

use std::path::{Path, PathBuf};

use tch::Device;

pub use case::run_case;
pub use diff::{all_finite, max_abs_diff, tensor_diff, Diff};
pub use manifest::{
    CaseSpec, Dtype, KeyLayout, Loss, Manifest, Mode, SeededWeight, SgdSpec, TensorSpec, Tolerance,
    Tolerances, TorchScript,
};
pub use outcome::CaseOutcome;
pub use report::{format_table, ParityRow};
pub use seeded::{hashed_uniform, hashed_weight};

/// Overrides where the references are read from.
pub const ARTIFACTS_ENV: &str = "RESIDUAL_PYTHON_REF";

/// `$RESIDUAL_PYTHON_REF`, else `target/python_ref` of this source tree.
pub fn default_artifacts_dir() -> PathBuf {
    std::env::var_os(ARTIFACTS_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/python_ref"))
}

/// Runs every case (or those whose name contains `filter`) on every device; a case that cannot
/// run becomes a failing row with its error.
pub fn run_all(manifest: &Manifest, devices: &[Device], filter: Option<&str>) -> Vec<ParityRow> {
    let mut rows = Vec::new();
    for case in manifest
        .cases
        .iter()
        .filter(|c| filter.is_none_or(|f| c.name.contains(f)))
    {
        for &device in devices {
            let row = match run_case(manifest, case, device) {
                Ok(outcome) => outcome.row(),
                Err(err) => ParityRow::failed(case, device, &err),
            };
            rows.push(row);
        }
    }
    rows
}
