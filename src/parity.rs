//! Parity against the PyTorch references that `python_ref/export.py` writes, shared by `tests/` and
//! `residual parity`.
//!
//! For each case the Rust model is built from the case's config, the exported state_dict is loaded
//! by name (strictly), and then compared: the TorchScript module's parameters against the Rust
//! variables (exactly), the Rust forward against the eager outputs and against the TorchScript
//! module run from Rust, the Rust gradients of the case's scalar loss against PyTorch's, for inputs
//! and every parameter, and for training-step cases the whole state after the trainer's SGD steps.
//! Each tensor is measured by max|Δ| / max|reference| against the case's tolerance for the device;
//! a NaN or infinity on either side fails the case. CUDA runs compare against the same CPU
//! references, with TF32 off.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, CModule, Device, Kind, Tensor};

use crate::checkpoint::{load_state_dict, LoadReport, StateDict};
use crate::config::ModelConfig;
use crate::device::device_name;
use crate::models::conv_sds::{span_loss, split_span_logits};
use crate::models::Inputs;
use crate::train::{logits_loss, Sgd};

/// Overrides where the references are read from.
pub const ARTIFACTS_ENV: &str = "RESIDUAL_PYTHON_REF";

/// `$RESIDUAL_PYTHON_REF`, else `target/python_ref` of this source tree.
pub fn default_artifacts_dir() -> PathBuf {
    std::env::var_os(ARTIFACTS_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/python_ref"))
}

/// Name, shape and dtype of an exported tensor.
#[derive(Debug, Clone, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub dtype: String,
}

/// Relative tolerances for one device: the largest permitted max|Δ| / max|reference| of any
/// compared tensor (see [`Diff`]).
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
    /// `"eval"` or `"train"`.
    pub mode: String,
    /// `"weighted_sum"` (`sum(output * cotangent)`) or `"qa_span"` (the span loss).
    pub loss: String,
    /// How the TorchScript module was made: `"script"` or `"trace"`; `"none"` for compact cases,
    /// which have no module.pt.
    pub torchscript: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub dtype: String,
    pub tolerance: Tolerances,
    /// `loss == "cross_entropy"`: the label smoothing of the trainer's loss.
    #[serde(default)]
    pub label_smoothing: Option<f64>,
    /// SGD steps after the backward; `after_step.safetensors` holds the state they lead to.
    #[serde(default)]
    pub sgd: Option<SgdSpec>,
    /// Compact cases: the state_dict entries not stored but regenerated with [`hashed_weight`].
    #[serde(default)]
    pub seeded_weights: BTreeMap<String, SeededWeight>,
    /// The key names of the exported state_dict, TorchScript parameters and gradients.
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

/// How export.py made a weight it did not store: `hashed_uniform(numel, seed) * std`, reshaped;
/// `sum` is the float64 sum of the values, to detect any disagreement between the two sides.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct SeededWeight {
    pub seed: i64,
    pub std: f64,
    pub sum: f64,
}

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

impl CaseSpec {
    pub fn train(&self) -> bool {
        self.mode == "train"
    }
}

/// `manifest.json`: the cases and the PyTorch that wrote them.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub torch_version: String,
    pub cases: Vec<CaseSpec>,
    #[serde(skip)]
    pub dir: PathBuf,
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
        let mut manifest: Manifest = serde_json::from_str(&text)
            .with_context(|| format!("malformed manifest {}", path.display()))?;
        manifest.dir = dir.to_path_buf();
        Ok(manifest)
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

    fn merged<'a>(diffs: impl IntoIterator<Item = &'a Diff>) -> Diff {
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

/// Compares tensors, remembering every one that holds a non-finite value.
#[derive(Default)]
struct Comparer {
    non_finite: Vec<String>,
}

impl Comparer {
    fn finite(&mut self, name: &str, side: &str, t: &Tensor) {
        if !all_finite(t) {
            self.non_finite.push(format!("{name} ({side})"));
        }
    }

    fn diff(&mut self, name: &str, actual: &Tensor, expected: &Tensor) -> Result<Diff> {
        self.finite(name, "Rust", actual);
        self.finite(name, "reference", expected);
        tensor_diff(name, actual, expected)
    }
}

/// Everything measured for one case on one device.
#[derive(Debug)]
pub struct CaseOutcome {
    pub case: String,
    pub module: String,
    pub device: Device,
    pub dtype: String,
    /// The case's tolerances on this device.
    pub tolerance: Tolerance,
    /// Key mismatches between the exported state_dict and the Rust model.
    pub load: LoadReport,
    /// TorchScript parameters the Rust model lacks, and Rust parameters TorchScript lacks.
    pub torchscript_only: Vec<String>,
    pub rust_only: Vec<String>,
    /// TorchScript's parameter values against the Rust variables (must be identical).
    pub torchscript_params: Diff,
    /// Every output (and the loss) against the eager PyTorch outputs, by output name.
    pub forward_eager: BTreeMap<String, Diff>,
    /// The output against the TorchScript module run from Rust (None for compact cases, which
    /// have no module.pt).
    pub forward_torchscript: Option<Diff>,
    /// The input gradients, and the parameter gradients.
    pub grad_inputs: Diff,
    pub grad_params: Diff,
    /// Gradients PyTorch exported that Rust did not produce, or the reverse.
    pub grad_missing: Vec<String>,
    /// For training-step cases: every variable (weights, running statistics,
    /// `num_batches_tracked`) after the SGD steps, against PyTorch's state.
    pub after_step: Option<Diff>,
    /// Compared tensors holding NaN or infinity, with the side (`Rust` or `reference`): each fails
    /// the case.
    pub non_finite: Vec<String>,
}

impl CaseOutcome {
    /// Every output against eager PyTorch and TorchScript.
    pub fn forward(&self) -> Diff {
        Diff::merged(self.forward_eager.values().chain(&self.forward_torchscript))
    }

    /// Input and parameter gradients.
    pub fn grad(&self) -> Diff {
        Diff::merged([&self.grad_inputs, &self.grad_params])
    }

    /// Names match everywhere, nothing is non-finite, TorchScript holds the Rust weights exactly,
    /// and every relative difference is within tolerance.
    pub fn pass(&self) -> bool {
        self.problems().is_empty()
    }

    /// What failed, for messages.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.non_finite.is_empty() {
            out.push(format!(
                "non-finite values in {}",
                self.non_finite.join(", ")
            ));
        }
        if !self.load.is_clean() {
            out.push(format!("state_dict: {}", self.load.to_string().trim()));
        }
        if !self.torchscript_only.is_empty() {
            out.push(format!(
                "TorchScript parameters missing in Rust: {:?}",
                self.torchscript_only
            ));
        }
        if !self.rust_only.is_empty() {
            out.push(format!(
                "Rust parameters missing in TorchScript: {:?}",
                self.rust_only
            ));
        }
        if !self.grad_missing.is_empty() {
            out.push(format!("gradients missing: {:?}", self.grad_missing));
        }
        if self.torchscript_params.abs != 0.0 {
            out.push(format!(
                "TorchScript parameter values differ by {:e} ({})",
                self.torchscript_params.abs, self.torchscript_params.worst
            ));
        }
        let tol = self.tolerance;
        let mut check = |what: &str, d: &Diff, limit: f64| {
            if !d.within(limit) {
                out.push(format!(
                    "{what}: relative {:e} > {limit:e} at {} (max |Δ| {:e})",
                    d.rel, d.worst, d.abs
                ));
            }
        };
        check("forward", &self.forward(), tol.forward);
        check("gradients", &self.grad(), tol.grad);
        if let Some(d) = &self.after_step {
            check("state after the SGD steps", d, tol.step);
        }
        out
    }

    pub fn row(&self) -> ParityRow {
        let (forward, grad) = (self.forward(), self.grad());
        ParityRow {
            case: self.case.clone(),
            module: self.module.clone(),
            device: device_name(self.device),
            dtype: self.dtype.clone(),
            max_abs_forward: Some(forward.abs),
            max_abs_grad: Some(grad.abs),
            max_abs_step: self.after_step.as_ref().map(|d| d.abs),
            max_rel_forward: Some(forward.rel),
            max_rel_grad: Some(grad.rel),
            max_rel_step: self.after_step.as_ref().map(|d| d.rel),
            tolerance: self.tolerance.forward,
            tolerance_rel_forward: self.tolerance.forward,
            tolerance_rel_grad: self.tolerance.grad,
            tolerance_rel_step: self.tolerance.step,
            non_finite: self.non_finite.clone(),
            pass: self.pass(),
            error: None,
        }
    }
}

/// One line of the parity report (`residual parity --json` prints an array of these). NaN
/// differences (non-finite values) serialise as null.
#[derive(Debug, Clone, Serialize)]
pub struct ParityRow {
    pub case: String,
    pub module: String,
    pub device: String,
    pub dtype: String,
    /// Max |Δ| of any output, of any gradient, of any variable after the SGD steps (null where not
    /// measured).
    pub max_abs_forward: Option<f64>,
    pub max_abs_grad: Option<f64>,
    pub max_abs_step: Option<f64>,
    /// The same as max|Δ| / max|reference| per tensor, the largest over the tensors: what the
    /// tolerances bound.
    pub max_rel_forward: Option<f64>,
    pub max_rel_grad: Option<f64>,
    pub max_rel_step: Option<f64>,
    /// The forward tolerance (relative), the same as `tolerance_rel_forward`.
    pub tolerance: f64,
    pub tolerance_rel_forward: f64,
    pub tolerance_rel_grad: f64,
    pub tolerance_rel_step: f64,
    /// Compared tensors holding NaN or infinity.
    pub non_finite: Vec<String>,
    pub pass: bool,
    /// Why the case could not run, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ParityRow {
    /// The row of a case that could not run.
    pub fn failed(case: &CaseSpec, device: Device, err: &anyhow::Error) -> Self {
        let tol = case.tolerance.on(device);
        ParityRow {
            case: case.name.clone(),
            module: case.module.clone(),
            device: device_name(device),
            dtype: case.dtype.clone(),
            max_abs_forward: None,
            max_abs_grad: None,
            max_abs_step: None,
            max_rel_forward: None,
            max_rel_grad: None,
            max_rel_step: None,
            tolerance: tol.forward,
            tolerance_rel_forward: tol.forward,
            tolerance_rel_grad: tol.grad,
            tolerance_rel_step: tol.step,
            non_finite: Vec::new(),
            pass: false,
            error: Some(format!("{err:#}")),
        }
    }
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

fn read_named(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    Ok(StateDict::read_safetensors(path)?
        .entries
        .into_iter()
        .collect())
}

fn named<'a>(map: &'a BTreeMap<String, Tensor>, key: &str, file: &str) -> Result<&'a Tensor> {
    map.get(key)
        .with_context(|| format!("`{key}` missing from {file}: re-run `make artifacts`"))
}

/// The case's scalar loss of `output`, as export.py computes it.
fn case_loss(
    case: &CaseSpec,
    output: &Tensor,
    loss_inputs: &BTreeMap<String, Tensor>,
) -> Result<Tensor> {
    let device = output.device();
    let get = |key: &str| -> Result<Tensor> {
        Ok(named(loss_inputs, key, "loss.safetensors")?.to_device(device))
    };
    match case.loss.as_str() {
        "weighted_sum" => Ok((output * get("cotangent")?).sum(output.kind())),
        "qa_span" => {
            let (start, end) = split_span_logits(output)?;
            span_loss(
                &start,
                &end,
                &get("start_positions")?,
                &get("end_positions")?,
            )
        }
        "cross_entropy" => {
            let size = output.size();
            if size.len() != 2 {
                bail!(
                    "case {}: cross_entropy needs [B, C] logits, got {size:?}",
                    case.name
                );
            }
            let smoothing = case.label_smoothing.unwrap_or(0.0);
            Ok(logits_loss(output, &get("labels")?, smoothing))
        }
        other => bail!("case {}: unknown loss `{other}`", case.name),
    }
}

/// Runs one case on `device` and measures every difference.
pub fn run_case(manifest: &Manifest, case: &CaseSpec, device: Device) -> Result<CaseOutcome> {
    if device.is_cuda() {
        crate::backend::strict_fp32()?;
    }
    let dir = manifest.case_dir(case);
    let config = ModelConfig::from_value(case.config.clone())
        .with_context(|| format!("case {}: config", case.name))?;
    let vs = VarStore::new(device);
    let model = config.build(vs.root())?;
    let mut state = StateDict::read_safetensors(&dir.join("state_dict.safetensors"))?;
    for (key, _) in state.entries.iter_mut() {
        *key = case.layout.rust_key(key)?;
    }
    let vars = vs.variables();
    for (key, spec) in &case.seeded_weights {
        let var = vars.get(key).with_context(|| {
            format!(
                "case {}: seeded weight `{key}` is not in the model",
                case.name
            )
        })?;
        state
            .entries
            .push((key.clone(), hashed_weight(key, &var.size(), spec)?));
    }
    let load = load_state_dict(&vs, &state, false)?;
    let mut cmp = Comparer::default();

    // TorchScript: same parameter names and values as the Rust model.
    let scripted = if case.torchscript == "none" {
        None
    } else {
        let mut m = CModule::load_on_device(dir.join("module.pt"), device)
            .with_context(|| format!("cannot load TorchScript module of case {}", case.name))?;
        if case.train() {
            m.f_set_train()?;
        } else {
            m.f_set_eval()?;
        }
        Some(m)
    };
    let mut torchscript_only = Vec::new();
    let mut torchscript_params = Diff::default();
    let mut rust_only = Vec::new();
    if let Some(scripted) = &scripted {
        let ts_params = scripted
            .named_parameters()?
            .into_iter()
            .map(|(name, t)| Ok((case.layout.rust_key(&name)?, t)))
            .collect::<Result<Vec<_>>>()?;
        for (name, value) in &ts_params {
            match vars.get(name) {
                Some(var) => {
                    let d = cmp.diff(&format!("parameter {name}"), var, value)?;
                    torchscript_params.merge(&d);
                }
                None => torchscript_only.push(name.clone()),
            }
        }
        rust_only = vars
            .iter()
            .filter(|(name, t)| t.requires_grad() && !ts_params.iter().any(|(n, _)| n == *name))
            .map(|(name, _)| name.clone())
            .collect();
        rust_only.sort();
    }

    // Forward, against eager PyTorch and against TorchScript.
    let inputs_cpu = read_named(&dir.join("inputs.safetensors"))?;
    let outputs = read_named(&dir.join("outputs.safetensors"))?;
    let loss_inputs = read_named(&dir.join("loss.safetensors"))?;
    let grads = read_named(&dir.join("grads.safetensors"))?
        .into_iter()
        .map(|(key, t)| {
            let key = match key.split_once('.') {
                Some((kind @ ("param" | "param_rows"), name)) => {
                    format!("{kind}.{}", case.layout.rust_key(name)?)
                }
                _ => key,
            };
            Ok((key, t))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    let mut inputs = Inputs::new();
    for name in model.input_names() {
        let t = named(&inputs_cpu, name, "inputs.safetensors")?.to_device(device);
        let t = if t.is_floating_point() {
            t.set_requires_grad(true)
        } else {
            t
        };
        inputs.insert(name.to_string(), t);
    }
    let output = model.forward_named(&inputs, case.train())?;
    let mut forward_eager = BTreeMap::new();
    forward_eager.insert(
        "output".to_string(),
        cmp.diff(
            "output",
            &output,
            named(&outputs, "output", "outputs.safetensors")?,
        )?,
    );

    let forward_torchscript = match &scripted {
        Some(scripted) => {
            let ordered: Vec<Tensor> = model
                .input_names()
                .iter()
                .map(|n| inputs[*n].detach())
                .collect();
            let ts_out = tch::no_grad(|| scripted.forward_ts(&ordered))?;
            Some(cmp.diff("output (TorchScript)", &output, &ts_out)?)
        }
        None => None,
    };

    // The scalar loss and its gradients.
    if case.loss == "qa_span" {
        let (start, end) = split_span_logits(&output)?;
        for (key, actual) in [("start_logits", &start), ("end_logits", &end)] {
            let expected = named(&outputs, key, "outputs.safetensors")?;
            forward_eager.insert(key.into(), cmp.diff(key, actual, expected)?);
        }
    }
    let loss = case_loss(case, &output, &loss_inputs)?;
    if case.loss != "weighted_sum" {
        let expected = named(&outputs, "loss", "outputs.safetensors")?;
        forward_eager.insert("loss".into(), cmp.diff("loss", &loss, expected)?);
    }
    loss.backward();

    let mut grad_missing = Vec::new();
    let mut grad_inputs = Diff::default();
    let mut grad_params = Diff::default();
    for (key, expected) in &grads {
        let (actual, slot) = if let Some(name) = key.strip_prefix("input.") {
            (inputs.get(name).map(Tensor::grad), &mut grad_inputs)
        } else if let Some(name) = key.strip_prefix("param.") {
            (vars.get(name).map(Tensor::grad), &mut grad_params)
        } else if let Some(name) = key.strip_prefix("param_rows.") {
            let rows = expected.size().first().copied().unwrap_or(0);
            let grad = vars.get(name).map(Tensor::grad);
            let grad = grad.map(|g| if g.defined() { g.narrow(0, 0, rows) } else { g });
            (grad, &mut grad_params)
        } else {
            bail!("unexpected entry `{key}` in grads.safetensors");
        };
        match actual {
            Some(g) if g.defined() => {
                slot.merge(&cmp.diff(&format!("grad {key}"), &g, expected)?)
            }
            Some(_)
                if all_finite(expected)
                    && max_abs_diff(expected, &expected.zeros_like())? == 0.0 => {}
            _ => {
                cmp.finite(&format!("grad {key}"), "reference", expected);
                grad_missing.push(key.clone());
            }
        }
    }
    for (name, var) in &vars {
        let exported = grads.contains_key(&format!("param.{name}"))
            || grads.contains_key(&format!("param_rows.{name}"));
        if var.requires_grad() && !exported {
            grad_missing.push(format!("param.{name} (not exported)"));
        }
    }

    let after_step = match case.sgd {
        Some(sgd) => {
            let again = || -> Result<()> {
                let output = model.forward_named(&inputs, case.train())?;
                case_loss(case, &output, &loss_inputs)?.backward();
                Ok(())
            };
            sgd_steps(&vs, sgd, again)?;
            let expected = read_named(&dir.join("after_step.safetensors"))?
                .into_iter()
                .map(|(key, t)| Ok((case.layout.rust_key(&key)?, t)))
                .collect::<Result<BTreeMap<_, _>>>()?;
            Some(state_diff(&vs, &expected, &mut cmp)?)
        }
        None => None,
    };

    Ok(CaseOutcome {
        case: case.name.clone(),
        module: case.module.clone(),
        device,
        dtype: case.dtype.clone(),
        tolerance: case.tolerance.on(device),
        load,
        torchscript_only,
        rust_only,
        torchscript_params,
        forward_eager,
        forward_torchscript,
        grad_inputs,
        grad_params,
        grad_missing,
        after_step,
        non_finite: cmp.non_finite,
    })
}

/// Takes `sgd.steps` steps with the trainer's optimizer: the first with the gradients in place,
/// each further one after `again` (forward and backward) on zeroed gradients.
fn sgd_steps(vs: &VarStore, sgd: SgdSpec, mut again: impl FnMut() -> Result<()>) -> Result<()> {
    if sgd.steps == 0 {
        bail!("an SGD case needs at least one step");
    }
    let mut opt = Sgd::new(vs, sgd.momentum, sgd.weight_decay, sgd.decay_norm_and_bias);
    opt.step(sgd.lr);
    for _ in 1..sgd.steps {
        opt.zero_grad();
        again()?;
        opt.step(sgd.lr);
    }
    Ok(())
}

/// Every variable of `vs` against the state PyTorch exported after its steps.
fn state_diff(
    vs: &VarStore,
    expected: &BTreeMap<String, Tensor>,
    cmp: &mut Comparer,
) -> Result<Diff> {
    let vars = vs.variables();
    if vars.len() != expected.len() {
        bail!(
            "after_step.safetensors has {} entries, the model {}",
            expected.len(),
            vars.len()
        );
    }
    let mut diff = Diff::default();
    for (key, value) in expected {
        let var = vars
            .get(key)
            .with_context(|| format!("after_step: `{key}` missing in the model"))?;
        diff.merge(&cmp.diff(&format!("after step {key}"), var, value)?);
    }
    Ok(diff)
}

/// Runs every case (or those whose name contains `filter`) on every device; a case that cannot
/// run becomes a failing row with its error.
pub fn run_all(manifest: &Manifest, devices: &[Device], filter: Option<&str>) -> Vec<ParityRow> {
    let mut rows = Vec::new();
    for case in manifest
        .cases
        .iter()
        .filter(|c| filter.is_none_or(|f| c.name.contains(f)))
    {
        for &device in devices {
            let row = match run_case(manifest, case, device) {
                Ok(outcome) => outcome.row(),
                Err(err) => ParityRow::failed(case, device, &err),
            };
            rows.push(row);
        }
    }
    rows
}

/// The report as a text table: relative differences (what the tolerances bound), then the
/// absolute ones.
pub fn format_table(rows: &[ParityRow]) -> String {
    let fmt = |v: Option<f64>| match v {
        Some(v) if v.is_nan() => "NaN".to_string(),
        Some(v) => format!("{v:.2e}"),
        None => "-".to_string(),
    };
    let mut out = format!(
        "{:<36} {:<19} {:<7} {:<7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>17} {}\n",
        "case",
        "module",
        "device",
        "dtype",
        "rel fwd",
        "rel grad",
        "rel step",
        "|Δ| fwd",
        "|Δ| grad",
        "tol fwd/grad/step",
        "result"
    );
    for r in rows {
        out += &format!(
            "{:<36} {:<19} {:<7} {:<7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>17} {}\n",
            r.case,
            r.module,
            r.device,
            r.dtype,
            fmt(r.max_rel_forward),
            fmt(r.max_rel_grad),
            fmt(r.max_rel_step),
            fmt(r.max_abs_forward),
            fmt(r.max_abs_grad),
            format!(
                "{:.0e}/{:.0e}/{:.0e}",
                r.tolerance_rel_forward, r.tolerance_rel_grad, r.tolerance_rel_step
            ),
            if r.pass { "PASS" } else { "FAIL" }
        );
        if !r.non_finite.is_empty() {
            out += &format!("    non-finite: {}\n", r.non_finite.join(", "));
        }
        if let Some(err) = &r.error {
            out += &format!("    error: {err}\n");
        }
    }
    out
}
