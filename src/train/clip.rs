//! Gradient clipping, as `torch.nn.utils.clip_grad_norm_` and `clip_grad_value_` compute it on
//! the CPU (one tensor at a time): with fp16 loss scaling the gradients are unscaled first, as
//! `torch.amp` recommends, so the limit applies to the true gradients.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// How the gradients are clipped before each optimiser step (`--clip-grad-norm`,
/// `--clip-grad-value`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum Clip {
    /// `clip_grad_norm_(max_norm, norm_type)`: norm type 2 or infinity (`f64::INFINITY`, the
    /// string "inf" in `run.json`).
    Norm {
        max_norm: f64,
        #[serde(with = "norm_type")]
        norm_type: f64,
    },
    /// `clip_grad_value_(value)`: every element into `[-value, value]`.
    Value { value: f64 },
}

/// Infinity (which JSON lacks) as the string "inf".
mod norm_type {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_infinite() {
            s.serialize_str("inf")
        } else {
            s.serialize_f64(*v)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Number(f64),
            Text(String),
        }
        match Either::deserialize(d)? {
            Either::Number(v) => Ok(v),
            Either::Text(t) if t == "inf" => Ok(f64::INFINITY),
            Either::Text(t) => Err(serde::de::Error::custom(format!(
                "norm_type: 2 or \"inf\", got {t:?}"
            ))),
        }
    }
}

impl Clip {
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Norm {
                max_norm,
                norm_type,
            } => {
                if !(max_norm > 0.0 && max_norm.is_finite()) {
                    bail!("clip_grad_norm: must be a positive number, got {max_norm}");
                }
                if norm_type != 2.0 && norm_type != f64::INFINITY {
                    bail!("clip norm type: 2 or inf, got {norm_type}");
                }
            }
            Self::Value { value } => {
                if !(value > 0.0 && value.is_finite()) {
                    bail!("clip_grad_value: must be a positive number, got {value}");
                }
            }
        }
        Ok(())
    }

    /// Clips `grads` in place; returns the total norm before clipping (a 0-d tensor on the
    /// gradients' device) for norm clipping, `None` for value clipping or without gradients.
    pub fn apply(&self, grads: &[Tensor]) -> Option<Tensor> {
        match *self {
            Self::Norm {
                max_norm,
                norm_type,
            } => clip_grad_norm(grads, max_norm, norm_type),
            Self::Value { value } => {
                clip_grad_value(grads, value);
                None
            }
        }
    }
}

/// `torch.nn.utils.clip_grad_norm_(grads, max_norm, norm_type)`: the norm of the per-tensor
/// norms, and every gradient multiplied by `min(max_norm / (total + 1e-6), 1)`. Returns the total
/// norm (0-d, before clipping), `None` without gradients.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64, norm_type: f64) -> Option<Tensor> {
    let first = grads.first()?;
    let device = first.device();
    tch::no_grad(|| {
        // torch.linalg.vector_norm of each (flattening keeps it a vector norm; `linalg_norm` of a
        // 1-D tensor is vector_norm), then of their stack.
        let norms: Vec<Tensor> = grads
            .iter()
            .map(|g| {
                g.reshape([-1])
                    .linalg_norm(norm_type, None::<&[i64]>, false, None)
                    .to_device(device)
            })
            .collect();
        let total = Tensor::stack(&norms, 0).linalg_norm(norm_type, None::<&[i64]>, false, None);
        // `max_norm / (total + 1e-6)` is Tensor.__rtruediv__: reciprocal, then the product.
        let coef = ((&total + 1e-6).reciprocal() * max_norm).clamp_max(1.0);
        for g in grads {
            let _ = g.shallow_clone().g_mul_(&coef.to_device(g.device()));
        }
        Some(total)
    })
}

/// `torch.nn.utils.clip_grad_value_(grads, value)`: every element clamped into
/// `[-value, value]`.
pub fn clip_grad_value(grads: &[Tensor], value: f64) {
    tch::no_grad(|| {
        for g in grads {
            let _ = g.shallow_clone().clamp_(-value, value);
        }
    });
}
