//! `load_state_dict` for a tch `VarStore`.

use std::collections::BTreeSet;
use std::fmt;

use anyhow::{bail, Result};
use tch::nn::VarStore;

use super::StateDict;

/// What did not line up between a state_dict and a model.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    /// Keys the model has and the file lacks.
    pub missing: Vec<String>,
    /// Keys the file has and the model lacks.
    pub unexpected: Vec<String>,
    /// `(key, checkpoint shape, model shape)`.
    pub shape_mismatches: Vec<(String, Vec<i64>, Vec<i64>)>,
    /// `(key, checkpoint dtype, model dtype)` where one is floating-point and the other is not.
    pub dtype_mismatches: Vec<(String, String, String)>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.shape_mismatches.is_empty()
            && self.dtype_mismatches.is_empty()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.missing.is_empty() {
            writeln!(
                f,
                "missing keys ({}): {}",
                self.missing.len(),
                self.missing.join(", ")
            )?;
        }
        if !self.unexpected.is_empty() {
            writeln!(
                f,
                "unexpected keys ({}): {}",
                self.unexpected.len(),
                self.unexpected.join(", ")
            )?;
        }
        for (key, file, model) in &self.shape_mismatches {
            writeln!(f, "{key}: checkpoint {file:?}, model {model:?}")?;
        }
        for (key, file, model) in &self.dtype_mismatches {
            writeln!(f, "{key}: checkpoint dtype {file}, model dtype {model}")?;
        }
        Ok(())
    }
}

const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";

/// Whether PyTorch would pass over `key` silently: a BatchNorm counter the model does not keep
/// (FrozenBatchNorm2d drops it from checkpoints), or one the checkpoint lacks (checkpoints from
/// before PyTorch 0.4.1 have none; BatchNorm then keeps its own).
fn is_tolerated_counter(key: &str, has: impl Fn(&str) -> bool) -> bool {
    match key.strip_suffix(NUM_BATCHES_TRACKED) {
        Some(prefix) => has(&format!("{prefix}running_mean")),
        None => false,
    }
}

/// Copies `state` into `vs` by name. With `strict`, any missing or unexpected key or any shape or
/// dtype-class mismatch fails the whole load (nothing is copied) with one error listing them all;
/// without it, the keys that match are copied and the report lists the rest. Floating-point values
/// are converted to the variable's dtype and device. `*.num_batches_tracked` is handled as PyTorch
/// does: ignored when the model's norm layer keeps none, left as it is when the file has none.
pub fn load_state_dict(vs: &VarStore, state: &StateDict, strict: bool) -> Result<LoadReport> {
    let vars = vs.variables();
    let mut report = LoadReport::default();
    let file_keys: BTreeSet<&str> = state.keys().collect();
    let mut model_keys: Vec<&String> = vars.keys().collect();
    model_keys.sort();
    report.missing = model_keys
        .iter()
        .filter(|k| !file_keys.contains(k.as_str()))
        .filter(|k| !is_tolerated_counter(k, |p| file_keys.contains(p)))
        .map(|k| k.to_string())
        .collect();
    let mut matched = Vec::new();
    for (key, src) in &state.entries {
        let Some(dst) = vars.get(key) else {
            if !is_tolerated_counter(key, |p| vars.contains_key(p)) {
                report.unexpected.push(key.clone());
            }
            continue;
        };
        if src.size() != dst.size() {
            report
                .shape_mismatches
                .push((key.clone(), src.size(), dst.size()));
        } else if src.is_floating_point() != dst.is_floating_point() {
            report.dtype_mismatches.push((
                key.clone(),
                format!("{:?}", src.kind()),
                format!("{:?}", dst.kind()),
            ));
        } else {
            matched.push((dst, src));
        }
    }
    if strict && !report.is_clean() {
        bail!("state_dict does not match the model:\n{report}");
    }
    tch::no_grad(|| -> Result<()> {
        for (dst, src) in matched {
            let mut dst = dst.shallow_clone();
            dst.f_copy_(src)?;
        }
        Ok(())
    })?;
    Ok(report)
}
