//! How far a tensor is from its reference, and the bookkeeping of non-finite values.

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// How far a tensor, or the worst of several, is from its reference: `abs` = max |actual - ref|,
/// `rel` = `abs` / max |ref| (`abs` itself where the reference is all zeros), both the largest over
/// the tensors merged. A non-finite value on either side makes both NaN, which no tolerance admits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diff {
    pub abs: f64,
    pub rel: f64,
    /// The tensor with the largest `rel` (empty when nothing was compared).
    pub worst: String,
}

/// `a.max(b)`, but NaN wins (`f64::max` drops it).
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

impl Diff {
    /// Folds `other` in: the largest `abs`, and the largest `rel` with its tensor's name.
    pub fn merge(&mut self, other: &Diff) {
        let worse = other.rel.is_nan() && !self.rel.is_nan()
            || other.rel > self.rel
            || self.worst.is_empty();
        self.abs = nan_max(self.abs, other.abs);
        if worse {
            self.rel = other.rel;
            self.worst = other.worst.clone();
        }
    }

    /// `rel <= tolerance` (false for NaN).
    pub fn within(&self, tolerance: f64) -> bool {
        self.rel <= tolerance
    }

    pub(crate) fn merged<'a>(diffs: impl IntoIterator<Item = &'a Diff>) -> Diff {
        let mut out = Diff::default();
        for d in diffs {
            out.merge(d);
        }
        out
    }
}

/// Whether every element of a floating-point tensor is finite (integer tensors always are).
pub fn all_finite(t: &Tensor) -> bool {
    !t.is_floating_point() || t.numel() == 0 || t.isfinite().all().int64_value(&[]) != 0
}

/// Max |a - b| over all elements, computed in f64 on the CPU; shapes must agree. NaN when either
/// holds NaN.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.size() != b.size() {
        bail!("shape mismatch: {:?} vs {:?}", a.size(), b.size());
    }
    if a.numel() == 0 {
        return Ok(0.0);
    }
    let a = a.detach().to_device(Device::Cpu).to_kind(Kind::Double);
    let b = b.detach().to_device(Device::Cpu).to_kind(Kind::Double);
    Ok((a - b).abs().max().double_value(&[]))
}

/// [`Diff`] of `actual` against `expected` for the tensor called `name`, in f64 on the CPU; shapes
/// must agree.
pub fn tensor_diff(name: &str, actual: &Tensor, expected: &Tensor) -> Result<Diff> {
    let abs = max_abs_diff(actual, expected).with_context(|| format!("`{name}`"))?;
    let finite = all_finite(actual) && all_finite(expected);
    let scale = if expected.numel() == 0 {
        0.0
    } else {
        expected
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Double)
            .abs()
            .max()
            .double_value(&[])
    };
    let (abs, rel) = match (finite, scale > 0.0) {
        (false, _) => (f64::NAN, f64::NAN),
        (true, true) => (abs, abs / scale),
        (true, false) => (abs, abs),
    };
    Ok(Diff {
        abs,
        rel,
        worst: name.to_string(),
    })
}

/// Which side of a comparison a tensor comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Rust,
    Reference,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Rust => "Rust",
            Side::Reference => "reference",
        }
    }
}

/// Compares tensors, remembering every one that holds a non-finite value as `name (side)`.
#[derive(Default)]
pub(crate) struct Comparer {
    pub(crate) non_finite: Vec<String>,
}

impl Comparer {
    pub(crate) fn finite(&mut self, name: &str, side: Side, t: &Tensor) {
        if !all_finite(t) {
            self.non_finite.push(format!("{name} ({})", side.as_str()));
        }
    }

    pub(crate) fn diff(&mut self, name: &str, actual: &Tensor, expected: &Tensor) -> Result<Diff> {
        self.finite(name, Side::Rust, actual);
        self.finite(name, Side::Reference, expected);
        tensor_diff(name, actual, expected)
    }
}
