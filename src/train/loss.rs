//! The training loss and fp16 loss scaling.

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// The training loss: mean cross-entropy of `logits` `[B, K]` (computed in fp32 whatever the
/// autocast dtype) against class indices `labels` `[B]`, or against soft targets `[B, K]` (class
/// probabilities, from mixup/cutmix), with label smoothing as
/// `F.cross_entropy(..., label_smoothing=smoothing)` (soft targets become
/// `(1 - smoothing) * targets + smoothing / K`, as timm's `mixup_target` with smoothing).
pub fn logits_loss(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Tensor {
    let soft;
    let labels = if labels.dim() == 2 {
        soft = labels.to_kind(Kind::Float);
        &soft
    } else {
        labels
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_targets_give_the_mixed_hard_losses() {
        let logits = Tensor::from_slice(&[1.0f32, -0.5, 2.0, 0.3, 0.0, -1.0]).view([2, 3]);
        let y = Tensor::from_slice(&[2i64, 0]);
        let y_flipped = Tensor::from_slice(&[0i64, 2]);
        for smoothing in [0.0, 0.1] {
            let lam = 0.3f32;
            let one_hot = |t: &Tensor| t.one_hot(3).to_kind(Kind::Float);
            let soft = one_hot(&y) * f64::from(lam) + one_hot(&y_flipped) * f64::from(1.0 - lam);
            let mixed = logits_loss(&logits, &soft, smoothing).double_value(&[]);
            let want = f64::from(lam) * logits_loss(&logits, &y, smoothing).double_value(&[])
                + f64::from(1.0 - lam)
                    * logits_loss(&logits, &y_flipped, smoothing).double_value(&[]);
            assert!(
                (mixed - want).abs() < 1e-6,
                "{smoothing}: {mixed} vs {want}"
            );
            let hard = logits_loss(&logits, &y, smoothing).double_value(&[]);
            let as_soft = logits_loss(&logits, &one_hot(&y), smoothing).double_value(&[]);
            assert!((hard - as_soft).abs() < 1e-6, "{hard} vs {as_soft}");
        }
    }
}
