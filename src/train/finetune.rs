//! Fine-tuning (`residual train --init-weights W`): a model starts from the weights of any
//! checkpoint the reader handles (torchvision, timm or Hugging Face; nested, whole-model or
//! TorchScript), with a fresh classification head when the checkpoint's does not fit; then
//! optionally trains the head alone (`--freeze-backbone`), the backbone at its own rate
//! (`--lr-backbone`, the two param groups of a torch optimiser, scheduled together), or with
//! BatchNorm frozen (`--freeze-bn`, torchvision's `FrozenBatchNorm2d`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;

use crate::checkpoint::{compare_state_dict, ReadOptions, StateDict, Weights};
use crate::config::ModelConfig;
use crate::fs::write_atomic;
use crate::models::huggingface;
use crate::models::layers::NormKind;

/// The prefix of the classification head's tensors (`fc.weight`, `fc.bias`) in every ResNet of
/// the crate (torchvision, timm, Hugging Face mapped to torchvision names, the CIFAR nets).
pub const HEAD_PREFIX: &str = "fc.";

/// What a fine-tuning run loaded and what it initialised fresh, written into the run folder.
pub const INIT_REPORT_FILE: &str = "init_weights.json";

/// The fine-tuning settings of a run (`run.json`'s `finetune`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FineTune {
    /// The checkpoint the run started from (read once, at the start; a resumed run continues
    /// from its own checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_weights: Option<PathBuf>,
    /// Only the head trains: the backbone's parameters get no gradient and no optimiser state.
    #[serde(default)]
    pub freeze_backbone: bool,
    /// The backbone's learning rate (the head keeps `lr`); both follow the run's schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_backbone: Option<f64>,
    /// BatchNorm layers as `FrozenBatchNorm2d`: running statistics and affine values fixed.
    #[serde(default)]
    pub freeze_bn: bool,
    /// The head starts fresh even when the checkpoint's has the same shape (a new task with as
    /// many classes as the old one, as timm's `reset_classifier`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh_head: bool,
}

/// Whether `name` is a tensor of the classification head.
pub fn is_head(name: &str) -> bool {
    name.starts_with(HEAD_PREFIX)
}

impl FineTune {
    pub fn validate(&self) -> Result<()> {
        if let Some(lr) = self.lr_backbone {
            if !(lr.is_finite() && lr >= 0.0) {
                bail!("lr_backbone: must be a number >= 0, got {lr}");
            }
            if self.freeze_backbone {
                bail!("--lr-backbone and --freeze-backbone exclude each other (a frozen backbone has no rate)");
            }
        }
        Ok(())
    }

    /// The factor on the run's rate for parameter `name` at base rate `lr`: `lr_backbone / lr`
    /// for the backbone, 1 for the head.
    pub fn lr_scale(&self, name: &str, lr: f64) -> f64 {
        match self.lr_backbone {
            Some(b) if !is_head(name) => b / lr,
            _ => 1.0,
        }
    }

    /// Freezes the backbone of the model in `vs` when asked: its variables stop requiring a
    /// gradient, so autograd computes none and the optimisers (which take the variables that
    /// require one) keep no state for them.
    pub fn apply(&self, vs: &VarStore) -> Result<()> {
        if !self.freeze_backbone {
            return Ok(());
        }
        let vars = vs.variables();
        if !vars.keys().any(|k| is_head(k)) {
            bail!("--freeze-backbone: the model has no classification head (`{HEAD_PREFIX}*`) to train");
        }
        for (name, t) in vars {
            if !is_head(&name) && t.requires_grad() {
                let _ = t.set_requires_grad(false);
            }
        }
        Ok(())
    }
}

/// `config` with `num_classes` outputs (when given) and, with `freeze_bn`, FrozenBatchNorm2d
/// instead of BatchNorm2d.
pub fn finetune_config(
    config: &ModelConfig,
    num_classes: Option<i64>,
    freeze_bn: bool,
) -> Result<ModelConfig> {
    let mut value = serde_json::to_value(config)?;
    let fields = value
        .as_object_mut()
        .context("a model config is a JSON object")?;
    if let Some(n) = num_classes {
        if !fields.contains_key("num_classes") {
            bail!("--num-classes: a {} has no num_classes", config.arch());
        }
        fields.insert("num_classes".into(), n.into());
    }
    if freeze_bn {
        match fields.get("norm") {
            Some(v) if v == &serde_json::to_value(NormKind::BatchNorm)? => {
                fields.insert(
                    "norm".into(),
                    serde_json::to_value(NormKind::FrozenBatchNorm)?,
                );
            }
            Some(v) if v == &serde_json::to_value(NormKind::FrozenBatchNorm)? => {}
            other => bail!(
                "--freeze-bn: a {} has {} normalisation, not BatchNorm",
                config.arch(),
                other.map_or("no configurable".to_string(), |v| v.to_string())
            ),
        }
    }
    let config = ModelConfig::from_value(value)?;
    config.validate()?;
    Ok(config)
}

/// Where the weights of a fine-tuning run came from and how they met the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitReport {
    pub source: PathBuf,
    /// Where in the file the weights were (nested key, pickled module, Hugging Face names).
    pub layout: String,
    /// Model tensors copied from the checkpoint, in the model's name order.
    pub loaded: Vec<String>,
    /// Model tensors left as the model initialised them (the head, when its shape differs or the
    /// checkpoint has none).
    pub initialised: Vec<String>,
    /// Checkpoint tensors not used: the head of another shape, or BatchNorm counters the model
    /// does not keep.
    pub unused: Vec<String>,
}

impl std::fmt::Display for InitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "init weights {} ({}): loaded {} tensors, initialised fresh {}",
            self.source.display(),
            self.layout,
            self.loaded.len(),
            self.initialised.len(),
        )?;
        if self.initialised.is_empty() {
            writeln!(f)?;
        } else {
            writeln!(f, ": {}", self.initialised.join(", "))?;
        }
        if !self.unused.is_empty() {
            writeln!(
                f,
                "  not used from the checkpoint: {}",
                self.unused.join(", ")
            )?;
        }
        Ok(())
    }
}

/// The state_dict of `path` under torchvision's names: a Hugging Face model folder, or any file
/// the reader handles (a file whose every key is a Hugging Face ResNet's is renamed too); and a
/// description of where the weights were.
pub fn read_init_weights(path: &Path) -> Result<(StateDict, String)> {
    if huggingface::is_folder(path) {
        let folder = huggingface::read_folder(path)?;
        let files: Vec<String> = folder
            .weights
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        return Ok((
            folder.state,
            format!(
                "Hugging Face model folder ({}), keys renamed to torchvision's",
                files.join(", ")
            ),
        ));
    }
    let (state, layout) = StateDict::read_described(path, &ReadOptions::default())
        .with_context(|| format!("cannot read --init-weights {}", path.display()))?;
    let hf = !state.is_empty()
        && state
            .keys()
            .all(|k| huggingface::torchvision_key(k).is_some());
    if hf {
        let state = huggingface::to_torchvision(state)?;
        return Ok((
            state,
            format!("{layout}; Hugging Face keys renamed to torchvision's"),
        ));
    }
    Ok((state, layout.to_string()))
}

/// Copies every tensor of `state` whose name and shape match the model in `vs`; the head
/// (`fc.*`) keeps its fresh initialisation when the checkpoint's has another shape or is absent,
/// or always with `fresh_head`.
/// Anything else that does not fit (a backbone tensor missing, of another shape or dtype, or a
/// tensor the model lacks) fails the whole load, naming the tensors, before anything is copied.
pub fn init_from(
    vs: &VarStore,
    state: &StateDict,
    source: &Path,
    layout: &str,
    fresh_head: bool,
) -> Result<InitReport> {
    let (report, mut matched) = compare_state_dict(vs, state);
    let mut problems = Vec::new();
    let mut initialised: Vec<String> = Vec::new();
    let mut unused = Vec::new();
    if fresh_head {
        let meta = state.metadata();
        matched.retain(|(i, _)| {
            let name = meta[*i].name;
            if is_head(name) {
                initialised.push(name.to_string());
                unused.push(format!("{name} {:?}", meta[*i].shape));
            }
            !is_head(name)
        });
    }
    for key in &report.missing {
        if is_head(key) {
            initialised.push(key.clone());
        } else {
            problems.push(format!("{key}: in the model, not in the checkpoint"));
        }
    }
    for key in &report.unexpected {
        problems.push(format!("{key}: in the checkpoint, not in the model"));
    }
    for (key, file, model) in &report.shape_mismatches {
        if is_head(key) {
            initialised.push(key.clone());
            unused.push(format!("{key} {file:?}"));
        } else {
            problems.push(format!("{key}: checkpoint {file:?}, model {model:?}"));
        }
    }
    for (key, file, model) in &report.dtype_mismatches {
        problems.push(format!(
            "{key}: checkpoint dtype {file}, model dtype {model}"
        ));
    }
    if !problems.is_empty() {
        bail!(
            "{} does not fit the model outside its head ({HEAD_PREFIX}*), {} tensor(s):\n  {}",
            source.display(),
            problems.len(),
            problems.join("\n  ")
        );
    }
    let meta = state.metadata();
    let mut loaded: Vec<String> = matched
        .iter()
        .map(|(i, _)| meta[*i].name.to_string())
        .collect();
    let used: std::collections::BTreeSet<&str> = loaded.iter().map(String::as_str).collect();
    // BatchNorm counters the model lacks (FrozenBatchNorm2d keeps none).
    unused.extend(
        meta.iter()
            .map(|m| m.name)
            .filter(|k| !used.contains(k) && !is_head(k))
            .map(str::to_string),
    );
    state.copy_into(matched)?;
    let mut all: Vec<String> = vs.variables().into_keys().collect();
    all.sort();
    let fresh: Vec<String> = all
        .into_iter()
        .filter(|k| !used.contains(k.as_str()) && !initialised.contains(k))
        .collect();
    initialised.extend(fresh);
    initialised.sort();
    loaded.sort();
    Ok(InitReport {
        source: source.to_path_buf(),
        layout: layout.to_string(),
        loaded,
        initialised,
        unused,
    })
}

/// Loads `weights` into `vs` ([`init_from`]) and writes the report into the run folder `run`.
pub fn init_run(vs: &VarStore, weights: &Path, fresh_head: bool, run: &Path) -> Result<InitReport> {
    let (state, layout) = read_init_weights(weights)?;
    let report = init_from(vs, &state, weights, &layout, fresh_head)?;
    write_atomic(
        &run.join(INIT_REPORT_FILE),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    Ok(report)
}
