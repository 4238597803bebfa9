//! AdamW (`--optimizer adamw`), `torch.optim.AdamW`'s update op for op (its single-tensor path, the CPU default), with
//! state that can be saved:
//!
//! ```text
//! t += 1
//! p *= 1 - lr * wd                          (decoupled weight decay; optional per tensor)
//! m.lerp_(g, 1 - beta1)
//! v = beta2 * v + (1 - beta2) * g * g
//! p += (-lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use tch::nn::VarStore;
use tch::Tensor;

use super::sgd::{defined_grads, trainable, zero_grads};
use crate::checkpoint::StateDict;

#[derive(Debug)]
pub struct AdamW {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// `(name, parameter, decays)`, sorted by name.
    params: Vec<(String, Tensor, bool)>,
    /// `(exp_avg, exp_avg_sq)` by parameter name, made on a parameter's first step.
    moments: BTreeMap<String, (Tensor, Tensor)>,
    /// Steps taken (torch keeps one per parameter; they move together here).
    pub steps: u64,
    /// Per-parameter factors on the rate, aligned with `params` (empty: all 1).
    lr_scale: Vec<f64>,
}

impl AdamW {
    /// Every trainable variable of `vs`; `decay_norm_and_bias: false` exempts 1-D tensors from
    /// weight decay. torch's defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    pub fn new(
        vs: &VarStore,
        betas: (f64, f64),
        eps: f64,
        weight_decay: f64,
        decay_norm_and_bias: bool,
    ) -> Self {
        let params = trainable(vs, decay_norm_and_bias);
        Self {
            betas,
            eps,
            weight_decay,
            params,
            moments: BTreeMap::new(),
            steps: 0,
            lr_scale: Vec::new(),
        }
    }

    /// Scales the rate of each parameter by `scale(name)` (torch's param groups with their own
    /// `lr`, scheduled together).
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        self.lr_scale = self.params.iter().map(|(n, _, _)| scale(n)).collect();
    }

    pub fn zero_grad(&mut self) {
        zero_grads(&mut self.params);
    }

    /// Gradients of every parameter, for inspection (fp16 loss scaling unscales them in place).
    pub fn grads(&self) -> Vec<Tensor> {
        defined_grads(&self.params)
    }

    /// One update at rate `lr`, in place.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let (beta1, beta2) = self.betas;
        let t = self.steps as f64;
        let bias_correction2_sqrt = (1.0 - beta2.powf(t)).powf(0.5);
        tch::no_grad(|| {
            for (i, (name, p, decays)) in self.params.iter().enumerate() {
                let lr = lr * self.lr_scale.get(i).copied().unwrap_or(1.0);
                // Python floats, as torch computes them.
                let step_size = lr / (1.0 - beta1.powf(t));
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                if *decays && self.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let (m, v) = self
                    .moments
                    .entry(name.clone())
                    .or_insert_with(|| (p.zeros_like(), p.zeros_like()));
                let _ = m.lerp_(&g, 1.0 - beta1);
                let _ = v.g_mul_scalar_(beta2).addcmul_(&g, &(&g * (1.0 - beta2)));
                let denom = (v.sqrt() / bias_correction2_sqrt).g_add_scalar_(self.eps);
                // addcdiv_(m, denom, value=-step_size) is `p + (value * m) / denom` in the
                // tensor's dtype; tch's addcdiv_ has no `value`, so the product comes first.
                let _ = p.addcdiv_(&(&*m * -step_size), &denom);
            }
        });
    }

    /// `name.exp_avg`, `name.exp_avg_sq` per parameter and `step` (int64).
    pub fn state(&self) -> StateDict {
        let mut entries = vec![("step".to_string(), Tensor::from(self.steps as i64))];
        for (k, (m, v)) in &self.moments {
            entries.push((format!("{k}.exp_avg"), m.shallow_clone()));
            entries.push((format!("{k}.exp_avg_sq"), v.shallow_clone()));
        }
        StateDict { entries }
    }

    /// Restores a state saved by [`AdamW::state`].
    pub fn load_state(&mut self, state: &StateDict) -> Result<()> {
        let step = state.get("step").context("AdamW state has no `step`")?;
        self.steps = step.int64_value(&[]) as u64;
        self.moments.clear();
        for (name, p, _) in &self.params {
            let get = |suffix: &str| -> Result<Option<Tensor>> {
                let Some(t) = state.get(&format!("{name}.{suffix}")) else {
                    return Ok(None);
                };
                if t.size() != p.size() {
                    bail!(
                        "AdamW {suffix} of `{name}`: {:?}, parameter {:?}",
                        t.size(),
                        p.size()
                    );
                }
                Ok(Some(t.to_device(p.device()).to_kind(p.kind())))
            };
            match (get("exp_avg")?, get("exp_avg_sq")?) {
                (Some(m), Some(v)) => {
                    self.moments.insert(name.clone(), (m, v));
                }
                (None, None) => {}
                _ => bail!("AdamW state of `{name}` has only one of its two moments"),
            }
        }
        let known = 1 + 2 * self.moments.len();
        if state.entries.len() != known {
            bail!(
                "AdamW state has {} entries, of which {known} belong to the model's parameters",
                state.entries.len()
            );
        }
        Ok(())
    }
}
