//! The ported modules, one file per family.
//!
//! Every module builds its submodules under `nn::Path` segments equal to the PyTorch attribute
//! names, so the `VarStore` names are PyTorch's state_dict keys (`convs.0.conv1.weight`).
//! Every model runs through [`Model`]: a forward over named inputs with a train flag, which checks
//! shapes, dtypes and devices before libtorch sees a tensor.

pub mod cifar;
pub mod conv_sds;
pub mod huggingface;
mod inference;
pub mod layers;
pub mod resnet;
pub mod sid;
pub mod timm;

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

pub use inference::{for_inference, InferenceOptions, TorchScript};

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

    /// Folds the model's linear layers for inference: every batch norm into the convolution
    /// before it (ResNets), each ConvSDS layer's two convolutions into one; after that the model
    /// runs in eval mode only (a training forward is refused). With `pack`, the folded
    /// convolutions are packed for oneDNN where it runs them (CPU, float32). Models with nothing
    /// to fold (SiD) are left as they are. Used through [`for_inference`].
    fn fold_batch_norm(&mut self, _pack: bool) -> Result<()> {
        Ok(())
    }
}

/// The tensor of `inputs` named `name`, or an error listing what was given.
pub fn input<'a>(inputs: &'a Inputs, name: &str) -> Result<&'a Tensor> {
    inputs.get(name).with_context(|| {
        let given: Vec<&str> = inputs.keys().map(String::as_str).collect();
        format!("missing input `{name}` (given: {given:?})")
    })
}

/// Which dtypes an input may have, as the PyTorch twin's first ops decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// The model's own (it meets a weight in a conv, linear or einsum); under CUDA autocast also
    /// float16 and bfloat16 for a float32 model, which autocast casts.
    Model,
    /// Any that PyTorch's type promotion turns into the model's (bool, integers, narrower floats):
    /// an input only multiplied by a weight.
    PromotesToModel,
    /// Integer or bool indices.
    Index,
}

/// What an input must look like: each dimension fixed (`Some`) or free (`None`).
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub name: &'a str,
    pub dims: Vec<Option<i64>>,
    /// Names for the dimensions, used in messages (`["B", "L", "H"]`).
    pub labels: &'a [&'a str],
    /// Whether the first dimension (the batch) may be missing, as PyTorch's convolutions allow.
    pub unbatched: bool,
    pub dtype: Dtype,
    /// A weight of the model, whose dtype and device the input must fit.
    pub weight: &'a Tensor,
}

impl Expect<'_> {
    fn describe(&self) -> String {
        let dims: Vec<String> = self
            .dims
            .iter()
            .zip(self.labels)
            .map(|(d, l)| d.map_or_else(|| l.to_string(), |v| v.to_string()))
            .collect();
        let batched = format!("[{}]", dims.join(", "));
        if self.unbatched {
            format!("{batched} or [{}]", dims[1..].join(", "))
        } else {
            batched
        }
    }

    /// Checks rank, fixed sizes, dtype and device of `t`.
    pub fn check(&self, t: &Tensor) -> Result<()> {
        let shape = t.size();
        let dims = if self.unbatched && shape.len() + 1 == self.dims.len() {
            &self.dims[1..]
        } else {
            &self.dims[..]
        };
        let fits = shape.len() == dims.len()
            && shape
                .iter()
                .zip(dims)
                .all(|(s, d)| d.is_none_or(|d| d == *s));
        if !fits {
            bail!(
                "input `{}`: expected shape {}, got {:?}",
                self.name,
                self.describe(),
                shape
            );
        }
        let (kind, model) = (t.kind(), self.weight.kind());
        let fits = match self.dtype {
            Dtype::Model => {
                kind == model
                    || (model == Kind::Float
                        && matches!(kind, Kind::Half | Kind::BFloat16)
                        && t.device().is_cuda()
                        && crate::backend::autocast_enabled())
            }
            Dtype::PromotesToModel => promotes_to(kind, model),
            Dtype::Index => is_index(kind),
        };
        if !fits {
            let expected = match self.dtype {
                Dtype::Model => format!("{model:?}, the model's dtype"),
                Dtype::PromotesToModel => format!("a dtype that promotes to the model's {model:?}"),
                Dtype::Index => "an integer or bool tensor".to_string(),
            };
            bail!("input `{}`: expected {expected}, got {kind:?}", self.name);
        }
        if t.device() != self.weight.device() {
            bail!(
                "input `{}` is on {} but the model is on {}",
                self.name,
                crate::device::device_name(t.device()),
                crate::device::device_name(self.weight.device())
            );
        }
        Ok(())
    }
}

fn is_index(kind: Kind) -> bool {
    use Kind::*;
    matches!(kind, Bool | Uint8 | Int8 | Int16 | Int | Int64)
}

/// Whether PyTorch's `promote_types(kind, model)` is `model`, for a floating `model`.
fn promotes_to(kind: Kind, model: Kind) -> bool {
    use Kind::*;
    kind == model
        || is_index(kind)
        || match kind {
            Half | BFloat16 => matches!(model, Float | Double),
            Float => model == Double,
            _ => false,
        }
}
