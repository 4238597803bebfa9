//! The training loss and fp16 loss scaling.

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// The training loss: mean cross-entropy of `logits` `[B, K]` (computed in fp32 whatever the
/// autocast dtype) against class indices `labels` `[B]`, with label smoothing as
/// `F.cross_entropy(..., label_smoothing=smoothing)`.
pub fn logits_loss(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Tensor {
    logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        labels,
        None,
        Reduction::Mean,
        -100,
        smoothing,
    )
}

/// Dynamic loss scaling for fp16 training, as `torch.amp.GradScaler` with its defaults: the loss
/// is multiplied by `scale` before the backward; a step whose gradients hold inf or NaN is
/// skipped and halves the scale, and every `GROWTH_INTERVAL` clean steps in a row double it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub clean_steps: u64,
}

impl LossScaler {
    pub const INIT_SCALE: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u64 = 2000;

    /// Records whether the step's gradients were finite (the step is taken only if so).
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.clean_steps += 1;
            if self.clean_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.clean_steps = 0;
        }
    }
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: Self::INIT_SCALE,
            clean_steps: 0,
        }
    }
}
