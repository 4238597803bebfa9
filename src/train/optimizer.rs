//! The optimiser a run uses: SGD (the default) or AdamW, behind one interface for the trainer
//! and the run folder (whose `optimizer.safetensors` holds the chosen one's state).

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::Tensor;

use super::adamw::AdamW;
use super::options::TrainOptions;
use super::sgd::Sgd;
use crate::checkpoint::StateDict;

/// Which optimiser, with the settings only it has (`lr`, `weight_decay` and
/// `decay_norm_and_bias` are the run's; `momentum` is SGD's).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "name")]
pub enum OptimizerKind {
    #[default]
    Sgd,
    /// `torch.optim.AdamW(betas, eps)` with the run's decoupled weight decay.
    Adamw { betas: [f64; 2], eps: f64 },
}

impl OptimizerKind {
    /// torch's AdamW defaults: betas (0.9, 0.999), eps 1e-8.
    pub fn adamw() -> Self {
        Self::Adamw {
            betas: [0.9, 0.999],
            eps: 1e-8,
        }
    }

    pub fn is_sgd(&self) -> bool {
        *self == Self::Sgd
    }
}

#[derive(Debug)]
pub enum Optimizer {
    Sgd(Sgd),
    AdamW(AdamW),
}

impl Optimizer {
    /// The optimiser `options` ask for, over every trainable variable of `vs` (frozen ones
    /// require no gradient and are left out), the backbone at `lr_backbone` when fine-tuning.
    pub fn new(vs: &VarStore, options: &TrainOptions) -> Self {
        let (wd, all) = (options.weight_decay, options.decay_norm_and_bias);
        let mut optimizer = match options.optimizer {
            OptimizerKind::Sgd => {
                let mut sgd = Sgd::new(vs, options.momentum, wd, all);
                sgd.nesterov = options.nesterov;
                Self::Sgd(sgd)
            }
            OptimizerKind::Adamw { betas, eps } => {
                Self::AdamW(AdamW::new(vs, (betas[0], betas[1]), eps, wd, all))
            }
        };
        if let Some(ft) = options
            .finetune
            .as_ref()
            .filter(|f| f.lr_backbone.is_some())
        {
            let scale = |name: &str| ft.lr_scale(name, options.lr);
            match &mut optimizer {
                Self::Sgd(o) => o.set_lr_scales(scale),
                Self::AdamW(o) => o.set_lr_scales(scale),
            }
        }
        optimizer
    }

    pub fn zero_grad(&mut self) {
        match self {
            Self::Sgd(o) => o.zero_grad(),
            Self::AdamW(o) => o.zero_grad(),
        }
    }

    /// Gradients of every parameter (fp16 loss scaling unscales them in place).
    pub fn grads(&self) -> Vec<Tensor> {
        match self {
            Self::Sgd(o) => o.grads(),
            Self::AdamW(o) => o.grads(),
        }
    }

    pub fn step(&mut self, lr: f64) {
        match self {
            Self::Sgd(o) => o.step(lr),
            Self::AdamW(o) => o.step(lr),
        }
    }

    pub fn state(&self) -> StateDict {
        match self {
            Self::Sgd(o) => o.state(),
            Self::AdamW(o) => o.state(),
        }
    }

    pub fn load_state(&mut self, state: &StateDict) -> Result<()> {
        match self {
            Self::Sgd(o) => o.load_state(state),
            Self::AdamW(o) => o.load_state(state),
        }
    }
}
