//! Learning-rate schedules: step or cosine decay after an optional linear warmup, as
//! `torch.optim.lr_scheduler`'s `MultiStepLR` and `CosineAnnealingLR` evaluated per batch.

use serde::{Deserialize, Serialize};

use super::options::TrainOptions;

/// Learning-rate schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Multiply by `gamma` (0.1) at each milestone epoch (default: 50% and 75% of the run, as
    /// the paper's 32k and 48k of 64k iterations).
    Step,
    /// Cosine decay to zero over the run.
    Cosine,
}

impl TrainOptions {
    /// The learning rate at `t` epochs into the run (fractional).
    pub fn lr_at(&self, t: f64) -> f64 {
        if self.warmup > 0.0 && t < self.warmup {
            return self.lr * t / self.warmup;
        }
        let epochs = self.epochs as f64;
        match self.schedule {
            Schedule::Step => {
                let milestones = if self.milestones.is_empty() {
                    vec![self.epochs / 2, self.epochs * 3 / 4]
                } else {
                    self.milestones.clone()
                };
                let passed = milestones
                    .iter()
                    .filter(|m| **m > 0 && t >= **m as f64)
                    .count();
                self.lr * 0.1f64.powi(passed as i32)
            }
            Schedule::Cosine => 0.5 * self.lr * (1.0 + (std::f64::consts::PI * t / epochs).cos()),
        }
    }
}
