//! The gradient-flow probe: for one batch, the L2 norm of `dL/d(output)` of the stem and every
//! unit and of `dL/d(weight)` of every layer, input side first, `L` the mean cross-entropy. The
//! PyTorch twin: `torch.autograd.grad(F.cross_entropy(model(x), y), outputs + weights)` with the
//! outputs taken by forward hooks (`python_ref/probe_cases.py`).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

use super::{forward, units, Edit, Probed};

/// One measured gradient norm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Norm {
    /// `stem`, `layer2.0` (outputs) or `layer2.0.conv1.weight` (weights).
    pub name: String,
    pub norm: f64,
}

/// The probe's result for one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gradients {
    pub loss: f64,
    /// `dL/d(output)`: the stem's, then each unit's.
    pub outputs: Vec<Norm>,
    /// `dL/d(weight)`: stem, units' layers, head.
    pub weights: Vec<Norm>,
    /// `|dL/d(first unit's output)| / |dL/d(last unit's output)|`.
    pub first_to_last: f64,
}

/// Measures the gradient norms of `net` for images `x` `[B, C, H, W]` and labels `y` `[B]`; `train`
/// picks batch statistics (as during training) or running ones for the batch norms.
pub fn probe(net: &dyn Probed, x: &Tensor, y: &Tensor, train: bool) -> Result<Gradients> {
    let trace = forward(net, x, train, &Edit::default())?;
    let loss = trace
        .logits
        .to_kind(Kind::Float)
        .cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0);
    let mut output_names = vec!["stem".to_string()];
    let mut outputs = vec![trace.stem.shallow_clone()];
    let mut weight_names = Vec::new();
    let mut weights = Vec::new();
    for (name, w) in net.stem_weights() {
        weight_names.push(name);
        weights.push(w.shallow_clone());
    }
    for ((_, name, unit), out) in units(net).into_iter().zip(&trace.outputs) {
        for (layer, w) in unit.weights() {
            weight_names.push(format!("{name}.{layer}"));
            weights.push(w.shallow_clone());
        }
        output_names.push(name);
        outputs.push(out.shallow_clone());
    }
    for (name, w) in net.head_weights() {
        weight_names.push(name);
        weights.push(w.shallow_clone());
    }
    let inputs: Vec<Tensor> = outputs
        .iter()
        .chain(&weights)
        .map(|t| t.shallow_clone())
        .collect();
    let grads = Tensor::f_run_backward(&[&loss], &inputs, false, false)
        .context("the backward pass failed")?;
    let norm = |g: &Tensor| g.to_kind(Kind::Double).norm().double_value(&[]);
    let named = |names: Vec<String>, grads: &[Tensor]| -> Vec<Norm> {
        names
            .into_iter()
            .zip(grads)
            .map(|(name, g)| Norm {
                name,
                norm: norm(g),
            })
            .collect()
    };
    let (output_grads, weight_grads) = grads.split_at(outputs.len());
    let outputs = named(output_names, output_grads);
    let first = outputs.get(1).map_or(f64::NAN, |n| n.norm);
    let last = outputs.last().map_or(f64::NAN, |n| n.norm);
    Ok(Gradients {
        loss: loss.double_value(&[]),
        outputs,
        weights: named(weight_names, weight_grads),
        first_to_last: first / last,
    })
}
