//! An exponential moving average of the weights (`--ema-decay`), as timm's `ModelEmaV3` with its
//! defaults (`exclude_buffers=False`): after every optimiser step each floating-point entry of
//! the state_dict (parameters and BatchNorm's running statistics) moves towards the model's,
//! `ema.lerp_(model, 1 - decay)`, and integer entries (`num_batches_tracked`) are copied.
//!
//! The decay at optimiser step `t` (1-based) is `ModelEmaV3.get_decay(t)`: 0 at the first step
//! (the average starts as a copy), then `decay`, or with warmup
//! `min(decay, 1 - (1 + (t - 1))^(-2/3))` (timm's `warmup_gamma=1, warmup_power=2/3`).
//! torchvision's `ExponentialMovingAverage` averages the same way (`decay * ema + (1 - decay) *
//! model` over parameters and buffers); its reference script's `adjust` of the decay by batch
//! size and `--model-ema-steps` is not reproduced.
//!
//! The average is evaluated with the model's own modules: [`Ema::swapped_in`] puts its weights
//! into the variable store for the duration of a closure and restores the model's after.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::Tensor;

use crate::checkpoint::StateDict;

/// `--ema-decay D` and `--ema-warmup`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EmaOptions {
    pub decay: f64,
    /// timm's decay warmup (`use_warmup=True`).
    #[serde(default)]
    pub warmup: bool,
}

impl EmaOptions {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.decay) {
            bail!("ema_decay: must be in [0, 1), got {}", self.decay);
        }
        Ok(())
    }

    /// `ModelEmaV3.get_decay(step)` (update_after_step 0, min_decay 0) at optimiser step `step`
    /// (1-based).
    pub fn decay_at(&self, step: u64) -> f64 {
        let step = step.saturating_sub(1);
        if step == 0 {
            return 0.0;
        }
        if self.warmup {
            let warm = 1.0 - (1.0 + step as f64).powf(-(2.0 / 3.0));
            warm.min(self.decay).max(0.0)
        } else {
            self.decay
        }
    }
}

/// The averaged weights of every variable of a store (parameters and buffers), by name.
#[derive(Debug)]
pub struct Ema {
    pub options: EmaOptions,
    /// `(name, averaged tensor)`, sorted by name.
    shadow: Vec<(String, Tensor)>,
}

impl Ema {
    /// An average starting at the current weights of `vs`.
    pub fn new(vs: &VarStore, options: EmaOptions) -> Self {
        let shadow = tch::no_grad(|| {
            StateDict::from_var_store(vs)
                .entries
                .into_iter()
                .map(|(name, t)| (name, t.detach().copy()))
                .collect()
        });
        Self { options, shadow }
    }

    /// One update after optimiser step `step` (1-based) of the model in `vs`.
    pub fn update(&mut self, vs: &VarStore, step: u64) -> Result<()> {
        let weight = 1.0 - self.options.decay_at(step);
        let vars = vs.variables();
        tch::no_grad(|| {
            for (name, avg) in &mut self.shadow {
                let model = vars
                    .get(name.as_str())
                    .with_context(|| format!("EMA: the model has no `{name}`"))?;
                if avg.is_floating_point() {
                    let _ = avg.lerp_(model, weight);
                } else {
                    avg.copy_(model);
                }
            }
            Ok(())
        })
    }

    /// The averaged weights, as a state_dict of the model (`state_dict_ema` in checkpoints).
    pub fn state_dict(&self) -> StateDict {
        StateDict {
            entries: self
                .shadow
                .iter()
                .map(|(k, t)| (k.clone(), t.shallow_clone()))
                .collect(),
        }
    }

    /// Restores weights saved by [`Ema::state_dict`]: every entry, no other, same shapes.
    pub fn load(&mut self, state: &StateDict) -> Result<()> {
        if state.len() != self.shadow.len() {
            bail!(
                "state_dict_ema has {} entries, the model {}",
                state.len(),
                self.shadow.len()
            );
        }
        tch::no_grad(|| {
            for (name, avg) in &mut self.shadow {
                let t = state
                    .get(name)
                    .with_context(|| format!("state_dict_ema has no `{name}`"))?;
                if t.size() != avg.size() {
                    bail!(
                        "state_dict_ema `{name}`: {:?}, model {:?}",
                        t.size(),
                        avg.size()
                    );
                }
                avg.copy_(t);
            }
            Ok(())
        })
    }

    /// Runs `f` with the averaged weights in `vs` (for evaluation), then puts the model's own
    /// back, bit for bit.
    pub fn swapped_in<T>(&self, vs: &VarStore, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let vars = vs.variables();
        let pairs = self
            .shadow
            .iter()
            .map(|(name, avg)| {
                let var = vars
                    .get(name.as_str())
                    .with_context(|| format!("EMA: the model has no `{name}`"))?;
                Ok((var.shallow_clone(), avg))
            })
            .collect::<Result<Vec<_>>>()?;
        let saved: Vec<(Tensor, Tensor)> = tch::no_grad(|| {
            pairs
                .into_iter()
                .map(|(mut var, avg)| {
                    let own = var.copy();
                    var.copy_(avg);
                    (var, own)
                })
                .collect()
        });
        let result = f();
        tch::no_grad(|| {
            for (mut var, own) in saved {
                var.copy_(&own);
            }
        });
        result
    }
}
