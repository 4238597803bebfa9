//! The options of a training run, saved in the run folder's `run.json`.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::clip::Clip;
use super::ema::EmaOptions;
use super::finetune::FineTune;
use super::optimizer::OptimizerKind;
use super::schedule::Schedule;
use crate::backend::AutocastDtype;
use crate::data::{Augment, FolderOptions};
use crate::validate::{at_least, probability};

/// Everything that shapes a training run; saved in `run.json` so a resumed run continues alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub epochs: u64,
    pub batch_size: i64,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Apply weight decay to norm weights and biases too (the paper does).
    pub decay_norm_and_bias: bool,
    pub schedule: Schedule,
    /// Epochs at which the step schedule divides the rate by 10 (empty: 50% and 75%).
    pub milestones: Vec<u64>,
    /// Linear warmup from 0, in epochs (fractions allowed).
    pub warmup: f64,
    pub label_smoothing: f64,
    pub seed: u64,
    /// Train on the first N training examples only.
    pub subset: Option<i64>,
    /// Evaluate on the first N test examples only.
    #[serde(default)]
    pub test_subset: Option<i64>,
    /// Hold out the last N training examples as a validation set.
    pub validation: Option<i64>,
    pub augment: Option<Augment>,
    /// CUDA mixed precision.
    pub amp: Option<AutocastDtype>,
    /// Let cuDNN convolutions and cuBLAS matmuls use TF32 on CUDA. Off: fp32 means IEEE fp32
    /// (PyTorch's own default lets convolutions use TF32).
    #[serde(default)]
    pub tf32: bool,
    pub channels_last: bool,
    pub cudnn_benchmark: bool,
    /// Deterministic algorithms (libtorch's and cuDNN's), for reproducible GPU runs.
    #[serde(default)]
    pub deterministic: bool,
    /// Evaluate the test set every epoch (the experiment's curves need it).
    pub eval_test: bool,
    /// Image-folder datasets: input size, evaluation transform, normalisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_folder: Option<FolderOptions>,
    /// SGD (absent from `run.json`) or AdamW.
    #[serde(default, skip_serializing_if = "OptimizerKind::is_sgd")]
    pub optimizer: OptimizerKind,
    /// Nesterov momentum for SGD.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nesterov: bool,
    /// Gradient clipping before each optimiser step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<Clip>,
    /// Micro-batches per optimiser step (gradient accumulation; 1: none).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub accumulate: u64,
    /// An exponential moving average of the weights, evaluated beside the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<EmaOptions>,
    /// Fine-tuning: the checkpoint the run started from, frozen parts, the backbone's rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finetune: Option<FineTune>,
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 128,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            decay_norm_and_bias: true,
            schedule: Schedule::Step,
            milestones: Vec::new(),
            warmup: 0.0,
            label_smoothing: 0.0,
            seed: 0,
            subset: None,
            test_subset: None,
            validation: None,
            augment: Some(Augment { pad: 4, flip: true }),
            amp: None,
            tf32: false,
            channels_last: false,
            cudnn_benchmark: false,
            deterministic: false,
            eval_test: true,
            image_folder: None,
            optimizer: OptimizerKind::Sgd,
            nesterov: false,
            clip: None,
            accumulate: 1,
            ema: None,
            finetune: None,
        }
    }
}

impl TrainOptions {
    pub fn validate(&self) -> Result<()> {
        let epochs = i64::try_from(self.epochs).unwrap_or(i64::MAX);
        at_least(1, [("epochs", epochs), ("batch_size", self.batch_size)])?;
        at_least(1, self.subset.map(|n| ("subset", n)))?;
        at_least(1, self.test_subset.map(|n| ("test_subset", n)))?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lr: must be a positive number, got {}", self.lr);
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!("weight_decay: must be >= 0, got {}", self.weight_decay);
        }
        probability(
            false,
            [
                ("momentum", self.momentum),
                ("label_smoothing", self.label_smoothing),
            ],
        )?;
        if let OptimizerKind::Adamw { betas, eps } = self.optimizer {
            probability(false, [("beta1", betas[0]), ("beta2", betas[1])])?;
            if !(eps > 0.0 && eps.is_finite()) {
                bail!("eps: must be a positive number, got {eps}");
            }
        }
        if self.nesterov && (self.momentum == 0.0 || !self.optimizer.is_sgd()) {
            bail!("nesterov: needs SGD with a momentum above 0 (torch.optim.SGD refuses it too)");
        }
        if self.accumulate == 0 {
            bail!("accumulate: must be at least 1");
        }
        if let Some(clip) = &self.clip {
            clip.validate()?;
        }
        if let Some(ema) = &self.ema {
            ema.validate()?;
        }
        if let Some(ft) = &self.finetune {
            ft.validate()?;
        }
        if !(self.warmup >= 0.0 && self.warmup.is_finite()) {
            bail!("warmup: must be >= 0 epochs, got {}", self.warmup);
        }
        Ok(())
    }
}
