//! The weights of compact cases, which export.py does not store but regenerates from a seed; both
//! sides compute them op for op alike.

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::SeededWeight;

/// `n` float32 values in [-√3, √3) from a hash of (index, seed), op for op as export.py's
/// `hashed_uniform` computes them (float64 libtorch element-wise kernels, so both sides agree).
pub fn hashed_uniform(n: i64, seed: i64) -> Tensor {
    let idx = Tensor::arange(n, (Kind::Double, Device::Cpu));
    let x = ((idx * 12.9898) + seed as f64 * 78.233).sin() * 43758.5453;
    let u = &x - x.floor();
    ((u - 0.5) * 12f64.sqrt()).to_kind(Kind::Float)
}

/// The weight `spec` describes, of `shape`, checked against its checksum.
pub fn hashed_weight(key: &str, shape: &[i64], spec: &SeededWeight) -> Result<Tensor> {
    let n = shape.iter().product::<i64>();
    let value = hashed_uniform(n, spec.seed).reshape(shape) * spec.std;
    let sum = value
        .to_kind(Kind::Double)
        .sum(Kind::Double)
        .double_value(&[]);
    if (sum - spec.sum).abs() > 1e-9 * spec.sum.abs().max(1.0) {
        bail!(
            "regenerated weight `{key}` sums to {sum}, the reference's to {}: the two sides \
             disagree on hashed_uniform",
            spec.sum
        );
    }
    Ok(value)
}
