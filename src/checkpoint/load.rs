//! `load_state_dict` for a tch `VarStore`, from a state_dict in memory or a checkpoint not yet
//! read: names, shapes and dtypes are compared first, values are read only when they fit.

use std::collections::BTreeSet;
use std::fmt;

use anyhow::{bail, Result};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use super::StateDict;

/// One tensor's name, shape and dtype, known before its values.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta<'a> {
    pub name: &'a str,
    pub shape: Vec<i64>,
    pub kind: Kind,
}

impl TensorMeta<'_> {
    pub fn is_floating_point(&self) -> bool {
        matches!(
            self.kind,
            Kind::Half | Kind::Float | Kind::Double | Kind::BFloat16
        )
    }
}

/// Named tensors whose names, shapes and dtypes are known before their values: a [`StateDict`]
/// in memory, or a [`Checkpoint`](super::Checkpoint) whose storages are read only when asked.
pub trait Weights {
    /// Every tensor's name, shape and dtype, in file order.
    fn metadata(&self) -> Vec<TensorMeta<'_>>;
    /// Copies tensor `i` (an index into [`metadata`](Self::metadata)) into `dst`, for each
    /// `(i, dst)`; shapes match, dtypes are converted, `dst` may be on any device.
    fn copy_into(&self, pairs: Vec<(usize, Tensor)>) -> Result<()>;
    /// The values of tensor `i`, on the CPU.
    fn value(&self, i: usize) -> Result<Tensor>;
}

impl Weights for StateDict {
    fn metadata(&self) -> Vec<TensorMeta<'_>> {
        self.entries
            .iter()
            .map(|(name, t)| TensorMeta {
                name,
                shape: t.size(),
                kind: t.kind(),
            })
            .collect()
    }

    fn copy_into(&self, pairs: Vec<(usize, Tensor)>) -> Result<()> {
        tch::no_grad(|| {
            for (i, mut dst) in pairs {
                dst.f_copy_(&self.entries[i].1)?;
            }
            Ok(())
        })
    }

    fn value(&self, i: usize) -> Result<Tensor> {
        Ok(self.entries[i].1.shallow_clone())
    }
}

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

/// Compares `state` with `vs` by name, shape and dtype class, reading no values: the report, and
/// the `(index in state, variable)` pairs that match.
pub fn compare_state_dict<W: Weights + ?Sized>(
    vs: &VarStore,
    state: &W,
) -> (LoadReport, Vec<(usize, Tensor)>) {
    let vars = vs.variables();
    let meta = state.metadata();
    let mut report = LoadReport::default();
    let file_keys: BTreeSet<&str> = meta.iter().map(|m| m.name).collect();
    let mut model_keys: Vec<&String> = vars.keys().collect();
    model_keys.sort();
    report.missing = model_keys
        .iter()
        .filter(|k| !file_keys.contains(k.as_str()))
        .filter(|k| !is_tolerated_counter(k, |p| file_keys.contains(p)))
        .map(|k| k.to_string())
        .collect();
    let mut matched = Vec::new();
    for (i, src) in meta.iter().enumerate() {
        let key = src.name;
        let Some(dst) = vars.get(key) else {
            if !is_tolerated_counter(key, |p| vars.contains_key(p)) {
                report.unexpected.push(key.to_string());
            }
            continue;
        };
        if src.shape != dst.size() {
            report
                .shape_mismatches
                .push((key.to_string(), src.shape.clone(), dst.size()));
        } else if src.is_floating_point() != dst.is_floating_point() {
            report.dtype_mismatches.push((
                key.to_string(),
                format!("{:?}", src.kind),
                format!("{:?}", dst.kind()),
            ));
        } else {
            matched.push((i, dst.shallow_clone()));
        }
    }
    (report, matched)
}

/// Copies `state` into `vs` by name. With `strict`, any missing or unexpected key or any shape or
/// dtype-class mismatch fails the whole load (nothing is copied) with one error listing them all;
/// without it, the keys that match are copied and the report lists the rest. Names, shapes and
/// dtypes are compared before any value is read, so a checkpoint that does not fit is refused
/// without reading (or inflating) its storages. Floating-point values are converted to the
/// variable's dtype and device. `*.num_batches_tracked` is handled as PyTorch does: ignored when
/// the model's norm layer keeps none, left as it is when the file has none.
pub fn load_state_dict<W: Weights + ?Sized>(
    vs: &VarStore,
    state: &W,
    strict: bool,
) -> Result<LoadReport> {
    let (report, matched) = compare_state_dict(vs, state);
    if strict && !report.is_clean() {
        bail!("state_dict does not match the model:\n{report}");
    }
    state.copy_into(matched)?;
    Ok(report)
}
