//! The gradient-flow probe: for one batch, the L2 norm of `dL/d(output)` of the stem and every
//! unit and of `dL/d(weight)` of every layer, input side first, `L` the mean cross-entropy
//! ([`super::loss`]). The PyTorch twin:
//! `torch.autograd.grad(F.cross_entropy(logits.flatten(0, -2), y.flatten()), outputs + weights)`
//! with the outputs taken by forward hooks (`python_ref/probe_cases.py`).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{forward, loss, unit_names, Edit, Probed};
use crate::models::Inputs;

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

/// Measures the gradient norms of `net` for inputs `x` (images `[B, C, H, W]` as `input`; see
/// [`super::random_batch`] for the other models) and labels `y` (`[B]`, ConvSDS `[B, L]`);
/// `train` picks batch statistics (as during training) or running ones for the batch norms, and
/// dropout where the model has it.
pub fn probe(net: &dyn Probed, x: &Inputs, y: &Tensor, train: bool) -> Result<Gradients> {
    let trace = forward(net, x, train, &Edit::default())?;
    let loss = loss(&trace.logits, y);
    let mut output_names = vec!["stem".to_string()];
    let mut outputs = vec![trace.stem.shallow_clone()];
    for (name, out) in unit_names(net).into_iter().zip(&trace.outputs) {
        output_names.push(name);
        outputs.push(out.shallow_clone());
    }
    let (weight_names, weights): (Vec<String>, Vec<Tensor>) = net
        .weights()
        .into_iter()
        .map(|(name, w)| (name, w.shallow_clone()))
        .unzip();
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
