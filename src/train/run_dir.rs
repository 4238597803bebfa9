//! The run folder: `model.json`, `run.json`, `metrics.jsonl` and `checkpoints/step-N/`
//! (`model.pth`, `optimizer.safetensors`, `state.json`) with `checkpoints/LATEST` naming the
//! newest complete one. Checkpoint files are written atomically and `LATEST` moves last, so an
//! interrupted save leaves the previous checkpoint in place.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;

use super::ema::Ema;
use super::loss::LossScaler;
use super::metrics::EpochMetrics;
use super::optimizer::Optimizer;
use super::options::TrainOptions;
use crate::checkpoint::{load_state_dict, Checkpoint, ReadOptions, StateDict};
use crate::config::ModelConfig;
use crate::fs::write_atomic;

/// The entries of a checkpoint with an EMA: the model's weights and the average's.
pub const STATE_DICT: &str = "state_dict";
pub const STATE_DICT_EMA: &str = "state_dict_ema";

/// Where a run stands, saved with each checkpoint.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct RunState {
    /// The epoch in progress (0-based) and the batches of it already trained.
    pub epoch: u64,
    pub batch: i64,
    pub global_step: u64,
    /// fp16 loss scaling (absent in checkpoints of runs without it).
    #[serde(default)]
    pub loss_scaler: LossScaler,
    /// Optimiser steps taken (batches / `accumulate`, rounded up per epoch); the EMA's warmup
    /// counts them.
    #[serde(default)]
    pub optimizer_steps: u64,
}

/// The run folder layout.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    pub fn metrics(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }

    fn checkpoints(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    /// The newest complete checkpoint folder, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>> {
        let pointer = self.checkpoints().join("LATEST");
        if !pointer.exists() {
            return Ok(None);
        }
        let name = std::fs::read_to_string(&pointer)?.trim().to_string();
        let dir = self.checkpoints().join(&name);
        if !dir.is_dir() {
            bail!("{} names {name}, which does not exist", pointer.display());
        }
        Ok(Some(dir))
    }

    /// Creates the folder for a new run and writes `model.json` and `run.json`; fails if it
    /// holds a run already.
    pub(super) fn start(&self, config: &ModelConfig, options: &TrainOptions) -> Result<()> {
        let dir = &self.path;
        if self.checkpoints().join("LATEST").exists() || self.metrics().exists() {
            bail!(
                "{} already holds a run: use --resume {} or another --out",
                dir.display(),
                dir.display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_atomic(
            &dir.join("model.json"),
            serde_json::to_string_pretty(config)?.as_bytes(),
        )?;
        write_atomic(
            &dir.join("run.json"),
            serde_json::to_string_pretty(options)?.as_bytes(),
        )
    }

    /// The model config and options written by [`RunDir::start`].
    pub(super) fn read_setup(&self) -> Result<(ModelConfig, TrainOptions)> {
        let read = |name: &str| -> Result<String> {
            std::fs::read_to_string(self.path.join(name))
                .with_context(|| format!("{} is not a run folder (no {name})", self.path.display()))
        };
        let config = ModelConfig::from_json(&read("model.json")?)?;
        let options = serde_json::from_str(&read("run.json")?).context("bad run.json")?;
        Ok((config, options))
    }

    /// Writes checkpoint `step-N` (N: `state.global_step`) of the weights in `vs`, the state of
    /// `sgd` and `state`, points `LATEST` at it and removes older ones. With an EMA, `model.pth`
    /// is `{"state_dict": ..., "state_dict_ema": ...}` (timm's layout), else the state_dict.
    pub(super) fn save_checkpoint(
        &self,
        vs: &VarStore,
        sgd: &Optimizer,
        ema: Option<&Ema>,
        state: &RunState,
    ) -> Result<PathBuf> {
        let root = self.checkpoints();
        let name = format!("step-{}", state.global_step);
        let dir = root.join(&name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let weights = StateDict::from_var_store(vs);
        match ema {
            Some(ema) => StateDict::save_torch_nested(
                &dir.join("model.pth"),
                &[(STATE_DICT, &weights), (STATE_DICT_EMA, &ema.state_dict())],
            )?,
            None => weights.save_torch(&dir.join("model.pth"))?,
        }
        sgd.state()
            .save_safetensors(&dir.join("optimizer.safetensors"))?;
        write_atomic(
            &dir.join("state.json"),
            serde_json::to_string(state)?.as_bytes(),
        )?;
        write_atomic(&root.join("LATEST"), name.as_bytes())?;
        for entry in std::fs::read_dir(&root)?.flatten() {
            let path = entry.path();
            if path.is_dir() && path != dir {
                let _ = std::fs::remove_dir_all(path);
            }
        }
        Ok(dir)
    }

    /// Loads the newest checkpoint into `vs` (strict), `sgd` and `ema`; returns where the run
    /// stood.
    pub(super) fn load_latest(
        &self,
        vs: &VarStore,
        sgd: &mut Optimizer,
        ema: Option<&mut Ema>,
    ) -> Result<RunState> {
        let ckpt = self
            .latest()?
            .with_context(|| format!("{} has no checkpoint to resume from", self.path.display()))?;
        let model = ckpt.join("model.pth");
        let key = |key: &str| ReadOptions {
            key: Some(key.to_string()),
            ..Default::default()
        };
        let weights = match ema {
            Some(ema) => {
                ema.load(&StateDict::read(&model, &key(STATE_DICT_EMA))?)?;
                Checkpoint::open(&model, &key(STATE_DICT))?
            }
            None => Checkpoint::open(&model, &ReadOptions::default())?,
        };
        load_state_dict(vs, &weights, true)?;
        sgd.load_state(&StateDict::read(
            &ckpt.join("optimizer.safetensors"),
            &ReadOptions::default(),
        )?)?;
        let state = ckpt.join("state.json");
        let text = std::fs::read_to_string(&state)
            .with_context(|| format!("cannot read {}", state.display()))?;
        serde_json::from_str(&text).with_context(|| format!("bad {}", state.display()))
    }

    /// Appends one line to `metrics.jsonl` and syncs it.
    pub(super) fn append_metrics(&self, m: &EpochMetrics) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.metrics())
            .with_context(|| format!("cannot open {}", self.metrics().display()))?;
        writeln!(f, "{}", serde_json::to_string(m)?)?;
        f.sync_data()?;
        Ok(())
    }

    /// Reads every line of `metrics.jsonl`.
    pub fn read_metrics(&self) -> Result<Vec<EpochMetrics>> {
        let text = std::fs::read_to_string(self.metrics())
            .with_context(|| format!("cannot read {}", self.metrics().display()))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).with_context(|| format!("bad line in metrics.jsonl: {l}"))
            })
            .collect()
    }
}

/// The weights of a run's newest checkpoint (for `eval --run`).
pub fn latest_weights(run: &Path) -> Result<PathBuf> {
    let dir = RunDir::new(run)
        .latest()?
        .with_context(|| format!("{} has no checkpoint", run.display()))?;
    Ok(dir.join("model.pth"))
}
