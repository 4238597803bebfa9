//! SGD with momentum and weight decay, `torch.optim.SGD`'s update (dampening 0), with state that
//! can be saved: `d = g + wd * p` (decay optional per tensor), `buf = momentum * buf + d`
//! (`buf = d` on the first step), then `p -= lr * buf`, or with nesterov
//! `p -= lr * (d + momentum * buf)`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::StateDict;

#[derive(Debug)]
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    /// Nesterov momentum (`torch.optim.SGD(nesterov=True)`).
    pub nesterov: bool,
    /// `(name, parameter, decays)`.
    params: Vec<(String, Tensor, bool)>,
    buffers: BTreeMap<String, Tensor>,
    /// `weight_decay` and `-lr` as 0-d tensors on the parameters' device (for `addcmul_`), made
    /// once and refilled in place when the rate changes, so that a step never copies from the
    /// host (on CUDA such a copy synchronises the stream).
    scalars: Option<StepScalars>,
    /// Per-parameter factors on the rate, aligned with `params` (empty: all 1), and `-lr * scale`
    /// as 0-d tensors for each factor other than 1 (`(scale, lr, tensor)`), refilled in place.
    lr_scale: Vec<f64>,
    scaled_steps: Vec<(f64, f64, Tensor)>,
}

#[derive(Debug)]
struct StepScalars {
    kind: Kind,
    device: Device,
    decay: Tensor,
    momentum: Tensor,
    neg_lr: Tensor,
    lr: f64,
    /// How many times the scalars were created from host values.
    uploads: u64,
}

/// BatchNorm / GroupNorm affine parameters and biases: the tensors with one dimension.
pub fn is_norm_or_bias(name: &str, t: &Tensor) -> bool {
    t.dim() <= 1 || name.ends_with(".bias")
}

/// `(name, parameter, decays)` of every trainable variable of `vs`, sorted by name (the order
/// torch's optimisers see them in a state_dict); `decay_norm_and_bias: false` exempts 1-D
/// tensors (norm weights, biases) from weight decay. Shared by SGD and AdamW.
pub(super) fn trainable(vs: &VarStore, decay_norm_and_bias: bool) -> Vec<(String, Tensor, bool)> {
    let mut params: Vec<(String, Tensor, bool)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(name, t)| {
            let decays = decay_norm_and_bias || !is_norm_or_bias(&name, &t);
            (name, t, decays)
        })
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// Zeroes the gradients of `params` (as [`trainable`] lists them).
pub(super) fn zero_grads(params: &mut [(String, Tensor, bool)]) {
    for (_, p, _) in params {
        p.zero_grad();
    }
}

/// The defined gradients of `params`, for inspection (fp16 loss scaling unscales them in place).
pub(super) fn defined_grads(params: &[(String, Tensor, bool)]) -> Vec<Tensor> {
    params
        .iter()
        .map(|(_, p, _)| p.grad())
        .filter(|g| g.defined())
        .collect()
}

impl Sgd {
    /// Every trainable variable of `vs`; `decay_norm_and_bias: false` exempts 1-D tensors
    /// (norm weights, biases) from weight decay.
    pub fn new(vs: &VarStore, momentum: f64, weight_decay: f64, decay_norm_and_bias: bool) -> Self {
        let params = trainable(vs, decay_norm_and_bias);
        Self {
            momentum,
            weight_decay,
            nesterov: false,
            params,
            buffers: BTreeMap::new(),
            scalars: None,
            lr_scale: Vec::new(),
            scaled_steps: Vec::new(),
        }
    }

    /// Scales the rate of each parameter by `scale(name)` (torch's param groups with their own
    /// `lr`, scheduled together).
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        self.lr_scale = self.params.iter().map(|(n, _, _)| scale(n)).collect();
    }

    /// Makes `scaled_steps` hold `-lr * s` for every scale `s` other than 1, on `first`'s device.
    fn refresh_scaled_steps(&mut self, lr: f64, first: &Tensor) {
        for &s in &self.lr_scale {
            if s == 1.0 {
                continue;
            }
            match self
                .scaled_steps
                .iter_mut()
                .find(|(scale, _, _)| *scale == s)
            {
                Some((_, old, t)) if *old == lr && t.device() == first.device() => {}
                Some((_, old, t)) if t.device() == first.device() && t.kind() == first.kind() => {
                    let _ = t.fill_(-lr * s);
                    *old = lr;
                }
                _ => {
                    let t = Tensor::from(-lr * s)
                        .to_kind(first.kind())
                        .to_device(first.device());
                    self.scaled_steps.retain(|(scale, _, _)| *scale != s);
                    self.scaled_steps.push((s, lr, t));
                }
            }
        }
    }

    pub fn zero_grad(&mut self) {
        zero_grads(&mut self.params);
    }

    /// Gradients of every parameter, for inspection (fp16 loss scaling unscales them in place).
    pub fn grads(&self) -> Vec<Tensor> {
        defined_grads(&self.params)
    }

    /// One update, in place: no tensor is allocated after the first step (the gradient itself
    /// receives the weight-decay term; it is zeroed before the next backward anyway).
    pub fn step(&mut self, lr: f64) {
        let Some((_, first, _)) = self.params.first() else {
            return;
        };
        let (kind, device) = (first.kind(), first.device());
        let first = first.shallow_clone();
        self.refresh_scaled_steps(lr, &first);
        let uploads = self.scalar_uploads();
        let scalars = match self.scalars.take() {
            Some(mut s) if s.kind == kind && s.device == device => {
                if s.lr != lr {
                    let _ = s.neg_lr.fill_(-lr);
                    s.lr = lr;
                }
                s
            }
            _ => {
                let scalar = |v: f64| Tensor::from(v).to_kind(kind).to_device(device);
                StepScalars {
                    kind,
                    device,
                    decay: scalar(self.weight_decay),
                    momentum: scalar(self.momentum),
                    neg_lr: scalar(-lr),
                    lr,
                    uploads: uploads + 1,
                }
            }
        };
        let (decay, momentum, step) = (&scalars.decay, &scalars.momentum, &scalars.neg_lr);
        tch::no_grad(|| {
            for (i, (name, p, decays)) in self.params.iter().enumerate() {
                let step = match self.lr_scale.get(i) {
                    Some(&s) if s != 1.0 => self
                        .scaled_steps
                        .iter()
                        .find(|(scale, _, _)| *scale == s)
                        .map_or(step, |(_, _, t)| t),
                    _ => step,
                };
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                if *decays && self.weight_decay != 0.0 {
                    let _ = g.addcmul_(p, decay);
                }
                let update = if self.momentum != 0.0 {
                    let buf = match self.buffers.get_mut(name) {
                        Some(buf) => {
                            let _ = buf.g_mul_scalar_(self.momentum).g_add_(&g);
                            buf.shallow_clone()
                        }
                        None => {
                            let buf = g.copy();
                            self.buffers.insert(name.clone(), buf.shallow_clone());
                            buf
                        }
                    };
                    if self.nesterov {
                        let _ = g.addcmul_(&buf, momentum);
                        g
                    } else {
                        buf
                    }
                } else {
                    g
                };
                let _ = p.shallow_clone().addcmul_(&update, step);
            }
        });
        self.scalars = Some(scalars);
    }

    /// How many times a step built its scalars from host values (once per run on one device;
    /// a changing learning rate is refilled on the device).
    pub fn scalar_uploads(&self) -> u64 {
        self.scalars.as_ref().map_or(0, |s| s.uploads)
    }

    /// The momentum buffers, by parameter name.
    pub fn state(&self) -> StateDict {
        StateDict {
            entries: self
                .buffers
                .iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect(),
        }
    }

    /// Restores momentum buffers saved by [`Sgd::state`].
    pub fn load_state(&mut self, state: &StateDict) -> Result<()> {
        self.buffers.clear();
        for (name, buf) in &state.entries {
            let Some((_, p, _)) = self.params.iter().find(|(n, _, _)| n == name) else {
                bail!("optimizer state has a buffer for `{name}`, which the model lacks");
            };
            if p.size() != buf.size() {
                bail!(
                    "optimizer buffer `{name}`: {:?}, parameter {:?}",
                    buf.size(),
                    p.size()
                );
            }
            self.buffers
                .insert(name.clone(), buf.to_device(p.device()).to_kind(p.kind()));
        }
        Ok(())
    }
}
