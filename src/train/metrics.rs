//! What an epoch measured: running sums and the line each epoch adds to `metrics.jsonl`.

use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: u64,
    pub train_loss: f64,
    pub train_error: f64,
    pub val_loss: Option<f64>,
    pub val_error: Option<f64>,
    pub test_loss: Option<f64>,
    pub test_error: Option<f64>,
    /// The same four of the weights' EMA (runs with `--ema-decay`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_val_error: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_test_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema_test_error: Option<f64>,
    pub lr: f64,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// Sums over an epoch or an evaluation.
#[derive(Debug, Default)]
pub(super) struct Tally {
    loss: f64,
    wrong: i64,
    pub seen: i64,
}

impl Tally {
    pub fn add(&mut self, loss_sum: f64, wrong: i64, n: i64) {
        self.loss += loss_sum;
        self.wrong += wrong;
        self.seen += n;
    }

    /// `[loss sum, wrong, seen]`, to be summed over data-parallel ranks.
    pub fn sums(&self) -> [f64; 3] {
        [self.loss, self.wrong as f64, self.seen as f64]
    }

    /// The tally of [`Tally::sums`] summed over ranks.
    pub fn from_sums(sums: &[f64]) -> Self {
        let get = |i: usize| sums.get(i).copied().unwrap_or(0.0);
        Self {
            loss: get(0),
            wrong: get(1).round() as i64,
            seen: get(2).round() as i64,
        }
    }

    pub fn mean_loss(&self) -> f64 {
        self.loss / self.seen.max(1) as f64
    }

    pub fn error(&self) -> f64 {
        self.wrong as f64 / self.seen.max(1) as f64
    }
}
