//! The lesion study of Veit et al. (figures 3–5): test error (eval mode) of a trained network with
//! one unit deleted in turn, with `k` random units deleted (`k = 1..n`, several draws each), with
//! each pair of adjacent units swapped, and with `k` random adjacent swaps.

use std::collections::BTreeSet;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::{forward, swappable_pairs, unit_names, Edit, Probed, Rng};
use crate::data::{Batches, Dataset, Normalizer};
use crate::experiment::Spread;
use crate::models::Inputs;

/// What to measure.
#[derive(Debug, Clone)]
pub struct LesionPlan {
    /// Random draws per `k`.
    pub draws: usize,
    pub seed: u64,
    pub batch_size: i64,
}

/// Test error (fraction) with one edit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lesioned {
    /// The deleted unit, or the swapped pair (`layer1.2<->layer1.3`).
    pub name: String,
    pub error: f64,
}

/// Test error over random draws at one `k`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OverK {
    pub k: usize,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub std: f64,
}

/// The study's results for one network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lesion {
    pub residual: bool,
    pub units: usize,
    pub images: i64,
    pub baseline: f64,
    /// Figure 3: one unit deleted, input side first.
    pub deleted: Vec<Lesioned>,
    /// Figure 4: `k` random units deleted.
    pub deleted_k: Vec<OverK>,
    /// Figure 5 (single swaps): each adjacent swappable pair swapped.
    pub swapped: Vec<Lesioned>,
    /// Figure 5: `k` random adjacent swaps applied in turn.
    pub swapped_k: Vec<OverK>,
}

/// Test error of `net` with `edit` over `data`, in eval mode.
pub fn error(
    net: &dyn Probed,
    data: &Dataset,
    normalizer: &Normalizer,
    batch_size: i64,
    edit: &Edit,
) -> Result<f64> {
    let mut batches = Batches::new(data, normalizer, batch_size, None, None);
    let (mut wrong, mut total) = (0i64, 0i64);
    tch::no_grad(|| -> Result<()> {
        while let Some((x, y)) = batches.next_batch()? {
            let logits = forward(net, &super::image(&x), false, edit)?.logits;
            wrong += logits
                .argmax(1, false)
                .ne_tensor(&y)
                .sum(Kind::Int64)
                .int64_value(&[]);
            total += y.size()[0];
        }
        Ok(())
    })?;
    Ok(wrong as f64 / total.max(1) as f64)
}

fn over_k(k: usize, errors: &[f64]) -> OverK {
    let s = Spread::of(errors).unwrap_or(Spread {
        mean: f64::NAN,
        min: f64::NAN,
        max: f64::NAN,
        std: f64::NAN,
    });
    OverK {
        k,
        mean: s.mean,
        min: s.min,
        max: s.max,
        std: s.std,
    }
}

/// Runs the whole study on `data`.
pub fn study(
    net: &dyn Probed,
    data: &Dataset,
    normalizer: &Normalizer,
    plan: &LesionPlan,
) -> Result<Lesion> {
    let err = |edit: &Edit| error(net, data, normalizer, plan.batch_size, edit);
    study_by(net, plan, data.len(), err)
}

/// The share of `x`'s predictions (argmax over the last axis: per example, or per position for
/// ConvSDS) that differ from the intact network's, with `edit`, in eval mode.
pub fn changed(net: &dyn Probed, x: &Inputs, intact: &Tensor, edit: &Edit) -> Result<f64> {
    let logits = tch::no_grad(|| forward(net, x, false, edit))?.logits;
    Ok(logits
        .argmax(-1, false)
        .ne_tensor(intact)
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]))
}

/// The study without labelled data (random inputs `x`): each "error" is the share of predictions
/// that change ([`changed`]), so the baseline is 0.
pub fn study_changes(net: &dyn Probed, x: &Inputs, plan: &LesionPlan) -> Result<Lesion> {
    let intact = tch::no_grad(|| forward(net, x, false, &Edit::default()))?
        .logits
        .argmax(-1, false);
    let err = |edit: &Edit| changed(net, x, &intact, edit);
    study_by(net, plan, super::batch_size(x), err)
}

/// The study with `err(edit)` measuring one edited network on `images` examples.
fn study_by(
    net: &dyn Probed,
    plan: &LesionPlan,
    images: i64,
    err: impl Fn(&Edit) -> Result<f64>,
) -> Result<Lesion> {
    let names = unit_names(net);
    let n = names.len();
    let baseline = err(&Edit::default())?;
    let mut deleted = Vec::with_capacity(n);
    for (i, name) in names.iter().enumerate() {
        let edit = Edit {
            deleted: BTreeSet::from([i]),
            ..Edit::default()
        };
        deleted.push(Lesioned {
            name: name.clone(),
            error: err(&edit)?,
        });
    }
    let mut rng = Rng::new(plan.seed, 12);
    let mut deleted_k = Vec::with_capacity(n);
    for k in 1..=n {
        // All n deleted is one network; so is k = n - 1 up to n choices: fewer draws suffice.
        let draws = if k == n { 1 } else { plan.draws.max(1) };
        let mut errors = Vec::with_capacity(draws);
        for _ in 0..draws {
            let edit = Edit {
                deleted: rng.choose(n, k),
                ..Edit::default()
            };
            errors.push(err(&edit)?);
        }
        deleted_k.push(over_k(k, &errors));
    }
    let pairs = swappable_pairs(net);
    let mut swapped = Vec::with_capacity(pairs.len());
    for &i in &pairs {
        let mut order: Vec<usize> = (0..n).collect();
        order.swap(i, i + 1);
        let edit = Edit {
            order,
            ..Edit::default()
        };
        swapped.push(Lesioned {
            name: format!("{}<->{}", names[i], names[i + 1]),
            error: err(&edit)?,
        });
    }
    let mut swapped_k = Vec::with_capacity(pairs.len());
    for k in 1..=pairs.len() {
        let mut errors = Vec::with_capacity(plan.draws);
        for _ in 0..plan.draws.max(1) {
            let mut order: Vec<usize> = (0..n).collect();
            for _ in 0..k {
                let i = pairs[rng.below(pairs.len() as u64) as usize];
                order.swap(i, i + 1);
            }
            let edit = Edit {
                order,
                ..Edit::default()
            };
            errors.push(err(&edit)?);
        }
        swapped_k.push(over_k(k, &errors));
    }
    Ok(Lesion {
        residual: net.residual(),
        units: n,
        images,
        baseline,
        deleted,
        deleted_k,
        swapped,
        swapped_k,
    })
}
