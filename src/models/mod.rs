//! The ported modules, one file per family.
//!
//! Every module builds its submodules under `nn::Path` segments equal to the PyTorch attribute
//! names, so the `VarStore` names are PyTorch's state_dict keys (`convs.0.conv1.weight`).
//! Every model runs through [`Model`]: a forward over named inputs with a train flag, which checks
//! shapes, dtypes and devices before libtorch sees a tensor.

pub mod cifar;
pub mod conv_sds;
pub mod huggingface;
pub mod layers;
pub mod resnet;
pub mod sid;
pub mod timm;

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

/// Named input tensors (`input`; SiD: `categorical`, `numerical`, `text`).
pub type Inputs = BTreeMap<String, Tensor>;

/// One way to run any model.
pub trait Model: std::fmt::Debug {
    /// The names of the tensors `forward_named` takes, in the order of the PyTorch forward's
    /// positional arguments.
    fn input_names(&self) -> &'static [&'static str];

    /// Runs the model; `train` selects training behaviour (dropout, stochastic depth).
    fn forward_named(&self, inputs: &Inputs, train: bool) -> Result<Tensor>;

    /// The representation the classifier reads (ResNets: the pooled features).
    fn forward_features(&self, _inputs: &Inputs, _train: bool) -> Result<Tensor> {
        bail!("this model has no separate classifier, so no features to return")
    }
}

/// The tensor of `inputs` named `name`, or an error listing what was given.
pub fn input<'a>(inputs: &'a Inputs, name: &str) -> Result<&'a Tensor> {
    inputs.get(name).with_context(|| {
        let given: Vec<&str> = inputs.keys().map(String::as_str).collect();
        format!("missing input `{name}` (given: {given:?})")
    })
}

/// What an input must look like: each dimension fixed (`Some`) or free (`None`).
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub name: &'a str,
    pub dims: Vec<Option<i64>>,
    /// Names for the dimensions, used in messages (`["B", "L", "H"]`).
    pub labels: &'a [&'a str],
    pub floating: bool,
    pub device: Device,
}

impl Expect<'_> {
    fn describe(&self) -> String {
        let dims: Vec<String> = self
            .dims
            .iter()
            .zip(self.labels)
            .map(|(d, l)| d.map_or_else(|| l.to_string(), |v| v.to_string()))
            .collect();
        format!("[{}]", dims.join(", "))
    }

    /// Checks rank, fixed sizes, dtype class and device of `t`.
    pub fn check(&self, t: &Tensor) -> Result<()> {
        let shape = t.size();
        let fits = shape.len() == self.dims.len()
            && shape
                .iter()
                .zip(&self.dims)
                .all(|(s, d)| d.is_none_or(|d| d == *s));
        if !fits {
            bail!(
                "input `{}`: expected shape {}, got {:?}",
                self.name,
                self.describe(),
                shape
            );
        }
        let kind = t.kind();
        if self.floating && !t.is_floating_point() {
            bail!(
                "input `{}`: expected a floating-point tensor, got {kind:?}",
                self.name
            );
        }
        if !self.floating && kind != Kind::Int64 {
            bail!(
                "input `{}`: expected an int64 tensor, got {kind:?}",
                self.name
            );
        }
        if t.device() != self.device {
            bail!(
                "input `{}` is on {} but the model is on {}",
                self.name,
                crate::device::device_name(t.device()),
                crate::device::device_name(self.device)
            );
        }
        Ok(())
    }
}
