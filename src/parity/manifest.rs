//! `manifest.json`, as `python_ref/export.py` writes it: the cases, their configs and settings.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::Device;

/// A manifest field holding one of a fixed set of strings: the enum, its table of strings (the ones
/// export.py writes), and serde and `Display` through that table. An unknown string is an error
/// naming the field, the value and the accepted ones.
macro_rules! manifest_enum {
    (
        $(#[$meta:meta])*
        $name:ident, field $field:literal {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in the table's order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The manifest's spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = anyhow::Error;

            fn from_str(s: &str) -> Result<Self> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .with_context(|| unknown_value($field, s, Self::ALL.iter().map(|v| v.as_str())))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(e))
            }
        }
    };
}

fn unknown_value<'a>(field: &str, value: &str, known: impl Iterator<Item = &'a str>) -> String {
    let known: Vec<String> = known.map(|k| format!("`{k}`")).collect();
    format!(
        "unknown `{field}` value `{value}`: python_ref/export.py writes {}",
        known.join(" or ")
    )
}

manifest_enum! {
    /// Whether the model runs in training mode (BatchNorm batch statistics, dropout) or eval mode.
    Mode, field "mode" {
        Eval = "eval",
        Train = "train",
    }
}

manifest_enum! {
    /// The scalar loss whose gradients are compared.
    Loss, field "loss" {
        /// `sum(output * cotangent)`, a random projection that carries the output's gradient.
        WeightedSum = "weighted_sum",
        /// The span loss of a question-answering head ([`crate::models::conv_sds::span_loss`]).
        QaSpan = "qa_span",
        /// The trainer's loss, `F.cross_entropy` with the case's label smoothing.
        CrossEntropy = "cross_entropy",
    }
}

manifest_enum! {
    /// How export.py made the case's `module.pt`.
    TorchScript, field "torchscript" {
        /// `torch.jit.script`.
        Script = "script",
        /// `torch.jit.trace`, where scripting failed.
        Trace = "trace",
        /// Compact cases have no module.pt.
        Absent = "none",
    }
}

manifest_enum! {
    /// The floating-point type the case's model computes in.
    Dtype, field "dtype" {
        Float32 = "float32",
    }
}

impl Loss {
    /// Whether the loss itself is compared as an output: a training loss is, while the weighted
    /// sum only carries the gradients.
    pub fn compared(self) -> bool {
        self != Loss::WeightedSum
    }
}

/// Name, shape and dtype (`str(tensor.dtype)` without `torch.`) of an exported tensor.
#[derive(Debug, Clone, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub dtype: String,
}

/// Relative tolerances for one device: the largest permitted max|Δ| / max|reference| of any
/// compared tensor (see [`super::Diff`]).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct Tolerance {
    /// Outputs (and the loss).
    pub forward: f64,
    /// Gradients of the loss with respect to the inputs and every parameter.
    pub grad: f64,
    /// Every variable after the training-step cases' SGD steps.
    pub step: f64,
}

/// A case's tolerances by the device the Rust side runs on (always against the CPU references).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Tolerances {
    pub cpu: Tolerance,
    pub cuda: Tolerance,
}

impl Tolerances {
    pub fn on(&self, device: Device) -> Tolerance {
        if device.is_cuda() {
            self.cuda
        } else {
            self.cpu
        }
    }
}

/// One case of `manifest.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct CaseSpec {
    pub name: String,
    pub module: String,
    pub config: serde_json::Value,
    pub mode: Mode,
    pub loss: Loss,
    pub torchscript: TorchScript,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub dtype: Dtype,
    pub tolerance: Tolerances,
    /// `loss == CrossEntropy`: the label smoothing of the trainer's loss.
    #[serde(default)]
    pub label_smoothing: Option<f64>,
    /// SGD steps after the backward; `after_step.safetensors` holds the state they lead to.
    #[serde(default)]
    pub sgd: Option<SgdSpec>,
    /// Compact cases: the state_dict entries not stored but regenerated with
    /// [`super::hashed_weight`].
    #[serde(default)]
    pub seeded_weights: BTreeMap<String, SeededWeight>,
    /// Whose key names the case's state_dict, TorchScript parameters and gradients use.
    #[serde(default)]
    pub layout: KeyLayout,
}

/// Whose key names a case's references use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyLayout {
    /// The Rust model's own (PyTorch's state_dict names).
    #[default]
    Pytorch,
    /// Hugging Face's, mapped by [`crate::models::huggingface::torchvision_key`].
    Huggingface,
}

impl KeyLayout {
    /// The Rust variable a reference's `key` names.
    pub fn rust_key(self, key: &str) -> Result<String> {
        match self {
            KeyLayout::Pytorch => Ok(key.to_string()),
            KeyLayout::Huggingface => crate::models::huggingface::torchvision_key(key)
                .with_context(|| format!("`{key}` is not a Hugging Face ResNet key")),
        }
    }
}

impl CaseSpec {
    pub fn train(&self) -> bool {
        self.mode == Mode::Train
    }
}

/// How export.py made a weight it did not store: `hashed_uniform(numel, seed) * std`, reshaped;
/// `sum` is the float64 sum of the values, to detect any disagreement between the two sides.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct SeededWeight {
    pub seed: i64,
    pub std: f64,
    pub sum: f64,
}

/// Optimizer settings of a training-step case: `torch.optim.SGD` on PyTorch's side (with a
/// weight-decay-free param group for 1-D tensors and biases unless `decay_norm_and_bias`), the
/// trainer's [`crate::train::Sgd`] on Rust's.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct SgdSpec {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    #[serde(default = "default_true")]
    pub decay_norm_and_bias: bool,
    /// Forward, backward and step this many times (the first step only initialises momentum).
    #[serde(default = "default_one")]
    pub steps: usize,
}

fn default_true() -> bool {
    true
}

fn default_one() -> usize {
    1
}

/// `manifest.json`: the cases and the PyTorch that wrote them.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub torch_version: String,
    pub cases: Vec<CaseSpec>,
    pub dir: PathBuf,
}

/// The file as written; cases are read one by one so that an error names its case.
#[derive(Deserialize)]
struct ManifestFile {
    torch_version: String,
    cases: Vec<serde_json::Value>,
}

impl Manifest {
    /// Reads `dir/manifest.json`; a missing file says how to make it.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        if !path.exists() {
            bail!(
                "parity references not found ({} is missing): run `make artifacts` (or `make test`), \
                 which writes them with python_ref/export.py",
                path.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let malformed = || format!("malformed manifest {}", path.display());
        let file: ManifestFile = serde_json::from_str(&text).with_context(malformed)?;
        let cases = file
            .cases
            .into_iter()
            .enumerate()
            .map(|(i, case)| {
                let name = case["name"]
                    .as_str()
                    .map_or(format!("#{i}"), str::to_string);
                CaseSpec::deserialize(case)
                    .with_context(|| format!("case `{name}`"))
                    .with_context(malformed)
            })
            .collect::<Result<_>>()?;
        Ok(Manifest {
            torch_version: file.torch_version,
            cases,
            dir: dir.to_path_buf(),
        })
    }

    pub fn case(&self, name: &str) -> Result<&CaseSpec> {
        self.cases.iter().find(|c| c.name == name).with_context(|| {
            format!(
                "no case `{name}` in {}/manifest.json: re-run `make artifacts`",
                self.dir.display()
            )
        })
    }

    pub fn case_dir(&self, case: &CaseSpec) -> PathBuf {
        self.dir.join(&case.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_reads_back_from_its_spelling() {
        fn round_trip<T>(all: &[T])
        where
            T: Serialize + for<'de> Deserialize<'de> + PartialEq + fmt::Debug + fmt::Display,
        {
            for v in all {
                let json = serde_json::to_value(v).unwrap();
                assert_eq!(json, serde_json::Value::String(v.to_string()));
                assert_eq!(&serde_json::from_value::<T>(json).unwrap(), v);
            }
        }
        round_trip(Mode::ALL);
        round_trip(Loss::ALL);
        round_trip(TorchScript::ALL);
        round_trip(Dtype::ALL);
        assert_eq!(TorchScript::Absent.as_str(), "none");
        assert_eq!(format!("[{:<9}]", Dtype::Float32), "[float32  ]");
    }

    #[test]
    fn an_unknown_value_names_the_field_and_the_known_ones() {
        let err = serde_json::from_str::<Loss>(r#""mse""#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "unknown `loss` value `mse`: python_ref/export.py writes `weighted_sum` or `qa_span` \
             or `cross_entropy`"
        );
        let err = "script ".parse::<TorchScript>().unwrap_err().to_string();
        assert!(
            err.starts_with("unknown `torchscript` value `script `"),
            "{err}"
        );
    }
}
