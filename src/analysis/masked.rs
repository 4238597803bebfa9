//! Lesions of the seed's other residual models, the SiD classifier and the ConvSDS head, on random
//! inputs. A residual unit is deleted by zeroing the last layer of its branch, which makes the
//! branch's output exactly zero, so the unit passes its shortcut alone: SiD's residual blocks
//! (`h + dropout(a * sigmoid(g))` with `[a, g] = feedforward.2(...)`) become `h`, a ConvSDS layer
//! (`layer_norm(x + relu(conv2(...)))`) becomes `layer_norm(x)`. The forward is the model's own,
//! so nothing is re-implemented. Without labels, the "error" is the share of inputs whose
//! predicted class (SiD) or per-position label (ConvSDS) differs from the intact model's.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::lesion::{Lesion, Lesioned, OverK};
use super::Rng;
use crate::experiment::Spread;
use crate::models::conv_sds::ConvSdsHead;
use crate::models::sid::SidClassifier;
use crate::models::{Inputs, Model};
use crate::ModelConfig;

/// A unit and the tensors whose zeroing deletes it.
pub struct MaskedUnit {
    /// Its state_dict prefix (`model.layers.1.transform.0`, `convs.2`).
    pub name: String,
    tensors: Vec<Tensor>,
}

/// The SiD classifier's residual blocks (attention blocks, then transform blocks, per layer).
pub fn sid_units(m: &SidClassifier) -> Vec<MaskedUnit> {
    let mut units = Vec::new();
    for (i, layer) in m.model.layers.iter().enumerate() {
        let attention = layer.attention.iter().flat_map(|a| a.blocks.iter());
        let blocks = attention
            .enumerate()
            .map(|(j, b)| (format!("model.layers.{i}.attention.{j}"), b))
            .chain(
                layer
                    .transform
                    .iter()
                    .enumerate()
                    .map(|(j, b)| (format!("model.layers.{i}.transform.{j}"), b)),
            );
        for (name, b) in blocks {
            let last = &b.feedforward.1;
            let mut tensors = vec![last.ws.shallow_clone()];
            tensors.extend(last.bs.iter().map(Tensor::shallow_clone));
            units.push(MaskedUnit { name, tensors });
        }
    }
    units
}

/// The ConvSDS head's layers.
pub fn conv_sds_units(m: &ConvSdsHead) -> Vec<MaskedUnit> {
    m.convs
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut tensors = vec![l.conv2.ws.shallow_clone()];
            tensors.extend(l.conv2.bs.iter().map(Tensor::shallow_clone));
            MaskedUnit {
                name: format!("convs.{i}"),
                tensors,
            }
        })
        .collect()
}

/// Runs `f` with `units` deleted, then restores their weights.
pub fn with_deleted<T>(units: &[&MaskedUnit], f: impl FnOnce() -> T) -> T {
    let saved: Vec<Vec<Tensor>> = tch::no_grad(|| {
        units
            .iter()
            .map(|u| {
                u.tensors
                    .iter()
                    .map(|t| {
                        let copy = t.copy();
                        let _ = t.shallow_clone().zero_();
                        copy
                    })
                    .collect()
            })
            .collect()
    });
    let result = f();
    tch::no_grad(|| {
        for (u, saved) in units.iter().zip(&saved) {
            for (t, s) in u.tensors.iter().zip(saved) {
                t.shallow_clone().copy_(s);
            }
        }
    });
    result
}

/// Seeded random inputs for `config`'s model: SiD's categories within each feature's range,
/// standard normal numbers and text vectors; ConvSDS `[n, L, H]` normal.
pub fn random_inputs(config: &ModelConfig, n: i64, seed: u64, device: Device) -> Result<Inputs> {
    tch::manual_seed(seed as i64);
    let opts = (Kind::Float, device);
    let mut inputs = Inputs::new();
    match config {
        ModelConfig::SidClassifier(c) => {
            let columns: Vec<Tensor> = c
                .num_categories_list
                .iter()
                .map(|&k| Tensor::randint(k.max(1), [n, 1], (Kind::Int64, device)))
                .collect();
            let categorical = if columns.is_empty() {
                Tensor::zeros([n, 0], (Kind::Int64, device))
            } else {
                Tensor::cat(&columns, 1)
            };
            inputs.insert("categorical".into(), categorical);
            inputs.insert(
                "numerical".into(),
                Tensor::randn([n, c.num_numerical_features], opts),
            );
            inputs.insert(
                "text".into(),
                Tensor::randn([n, c.num_text_features, c.text_input_size], opts),
            );
        }
        ModelConfig::ConvSdsHead(c) => {
            inputs.insert(
                "input".into(),
                Tensor::randn([n, c.input_size, c.hidden_size], opts),
            );
        }
        other => bail!(
            "weight-masking lesions take sid_classifier and conv_sds_head, not {}",
            other.arch()
        ),
    }
    Ok(inputs)
}

/// The share of predictions (argmax over the last axis) that differ from `intact`'s.
fn changed(model: &dyn Model, inputs: &Inputs, intact: &Tensor) -> Result<f64> {
    let pred = tch::no_grad(|| model.forward_named(inputs, false))?.argmax(-1, false);
    Ok(pred
        .ne_tensor(intact)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]))
}

/// The lesion study by weight masking: each unit deleted, and `k` random units for `k = 1..n`
/// (`draws` each); reported as a [`Lesion`] whose errors are prediction changes (baseline 0).
pub fn study(
    model: &dyn Model,
    units: &[MaskedUnit],
    inputs: &Inputs,
    draws: usize,
    seed: u64,
) -> Result<Lesion> {
    let n = units.len();
    if n == 0 {
        bail!("the model has no residual units to delete");
    }
    let intact = tch::no_grad(|| model.forward_named(inputs, false))?.argmax(-1, false);
    let mut deleted = Vec::with_capacity(n);
    for u in units {
        deleted.push(Lesioned {
            name: u.name.clone(),
            error: with_deleted(&[u], || changed(model, inputs, &intact))?,
        });
    }
    let mut rng = Rng::new(seed, 13);
    let mut deleted_k = Vec::with_capacity(n);
    for k in 1..=n {
        let draws_k = if k == n { 1 } else { draws.max(1) };
        let mut values = Vec::with_capacity(draws_k);
        for _ in 0..draws_k {
            let chosen: Vec<&MaskedUnit> =
                rng.choose(n, k).into_iter().map(|i| &units[i]).collect();
            values.push(with_deleted(&chosen, || changed(model, inputs, &intact))?);
        }
        let s = Spread::of(&values).unwrap_or(Spread {
            mean: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
            std: f64::NAN,
        });
        deleted_k.push(OverK {
            k,
            mean: s.mean,
            min: s.min,
            max: s.max,
            std: s.std,
        });
    }
    Ok(Lesion {
        residual: true,
        units: n,
        images: inputs.values().next().map_or(0, |t| t.size()[0]),
        baseline: 0.0,
        deleted,
        deleted_k,
        swapped: Vec::new(),
        swapped_k: Vec::new(),
    })
}
