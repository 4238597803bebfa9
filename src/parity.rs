//! Parity against the PyTorch references that `python_ref/export.py` writes, shared by `tests/` and
//! `residual parity`.
//!
//! For each case the Rust model is built from the case's config, the exported state_dict is loaded
//! by name (strictly), and then compared: the TorchScript module's parameters against the Rust
//! variables, the Rust forward against the eager outputs and against the TorchScript module run from
//! Rust, and the Rust gradients of the case's scalar loss against PyTorch's, for inputs and every
//! parameter. CUDA runs compare against the same CPU references, with TF32 off.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::OptimizerConfig;
use tch::{nn::VarStore, CModule, Device, Kind, Tensor};

use crate::checkpoint::{load_state_dict, LoadReport, StateDict};
use crate::config::ModelConfig;
use crate::device::device_name;
use crate::models::conv_sds::{span_loss, split_span_logits};
use crate::models::Inputs;

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

/// Max-abs tolerances: fp32 forward and gradients on CPU, and everything on CUDA.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Tolerance {
    pub forward: f64,
    pub grad: f64,
    pub cuda: f64,
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
    /// How the TorchScript module was made: `"script"` or `"trace"`.
    pub torchscript: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub dtype: String,
    pub tolerance: Tolerance,
    /// One SGD step after the backward; `after_step.safetensors` holds the state it leads to.
    #[serde(default)]
    pub sgd: Option<SgdSpec>,
}

/// `torch.optim.SGD` settings of a training-step case.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct SgdSpec {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
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

/// Everything measured for one case on one device.
#[derive(Debug)]
pub struct CaseOutcome {
    pub case: String,
    pub module: String,
    pub device: Device,
    pub dtype: String,
    pub forward_tolerance: f64,
    pub grad_tolerance: f64,
    /// Key mismatches between the exported state_dict and the Rust model.
    pub load: LoadReport,
    /// TorchScript parameters the Rust model lacks, and Rust parameters TorchScript lacks.
    pub torchscript_only: Vec<String>,
    pub rust_only: Vec<String>,
    /// Max |Δ| between TorchScript's parameter values and the Rust variables.
    pub torchscript_params: f64,
    /// Max |Δ| of every output against the eager PyTorch outputs.
    pub forward_eager: BTreeMap<String, f64>,
    /// Max |Δ| of the output against the TorchScript module run from Rust.
    pub forward_torchscript: f64,
    /// Max |Δ| of the input gradients and of the parameter gradients.
    pub grad_inputs: f64,
    pub grad_params: f64,
    /// Gradients PyTorch exported that Rust did not produce, or the reverse.
    pub grad_missing: Vec<String>,
    /// For training-step cases: max |Δ| of every variable (weights, running statistics,
    /// `num_batches_tracked`) after the forward and one SGD step, against PyTorch's state.
    pub after_step: Option<f64>,
}

impl CaseOutcome {
    pub fn max_abs_forward(&self) -> f64 {
        self.forward_eager
            .values()
            .copied()
            .fold(self.forward_torchscript, f64::max)
    }

    pub fn max_abs_grad(&self) -> f64 {
        self.grad_inputs.max(self.grad_params)
    }

    /// Names match everywhere and every difference is within tolerance.
    pub fn pass(&self) -> bool {
        self.load.is_clean()
            && self.torchscript_only.is_empty()
            && self.rust_only.is_empty()
            && self.grad_missing.is_empty()
            && self.torchscript_params == 0.0
            && self.max_abs_forward() <= self.forward_tolerance
            && self.max_abs_grad() <= self.grad_tolerance
            && self.after_step.is_none_or(|d| d <= self.grad_tolerance)
    }

    /// What failed, for messages.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
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
        if self.torchscript_params != 0.0 {
            out.push(format!(
                "TorchScript parameter values differ by {:e}",
                self.torchscript_params
            ));
        }
        if self.max_abs_forward() > self.forward_tolerance {
            out.push(format!(
                "forward {:e} > {:e} (eager {:?}, TorchScript {:e})",
                self.max_abs_forward(),
                self.forward_tolerance,
                self.forward_eager,
                self.forward_torchscript
            ));
        }
        if self.max_abs_grad() > self.grad_tolerance {
            out.push(format!(
                "gradients {:e} > {:e} (inputs {:e}, parameters {:e})",
                self.max_abs_grad(),
                self.grad_tolerance,
                self.grad_inputs,
                self.grad_params
            ));
        }
        if let Some(d) = self.after_step.filter(|d| *d > self.grad_tolerance) {
            out.push(format!("state after the SGD step differs by {d:e}"));
        }
        out
    }

    pub fn row(&self) -> ParityRow {
        ParityRow {
            case: self.case.clone(),
            module: self.module.clone(),
            device: device_name(self.device),
            dtype: self.dtype.clone(),
            max_abs_forward: Some(self.max_abs_forward()),
            max_abs_grad: Some(self.max_abs_grad()),
            max_abs_step: self.after_step,
            tolerance: self.forward_tolerance,
            tolerance_grad: self.grad_tolerance,
            pass: self.pass(),
            error: None,
        }
    }
}

/// One line of the parity report (`residual parity --json` prints an array of these).
#[derive(Debug, Clone, Serialize)]
pub struct ParityRow {
    pub case: String,
    pub module: String,
    pub device: String,
    pub dtype: String,
    pub max_abs_forward: Option<f64>,
    pub max_abs_grad: Option<f64>,
    /// Training-step cases: the state after one SGD step (null otherwise).
    pub max_abs_step: Option<f64>,
    /// Forward tolerance (max abs).
    pub tolerance: f64,
    /// Gradient tolerance (max abs).
    pub tolerance_grad: f64,
    pub pass: bool,
    /// Why the case could not run, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Max |a - b| over all elements, computed in f64 on the CPU; shapes must agree.
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
    let state = StateDict::read_safetensors(&dir.join("state_dict.safetensors"))?;
    let load = load_state_dict(&vs, &state, false)?;
    let vars = vs.variables();

    // TorchScript: same parameter names and values as the Rust model.
    let mut scripted = CModule::load_on_device(dir.join("module.pt"), device)
        .with_context(|| format!("cannot load TorchScript module of case {}", case.name))?;
    if case.train() {
        scripted.f_set_train()?;
    } else {
        scripted.f_set_eval()?;
    }
    let ts_params = scripted.named_parameters()?;
    let mut torchscript_only = Vec::new();
    let mut torchscript_params = 0.0f64;
    for (name, value) in &ts_params {
        match vars.get(name) {
            Some(var) => torchscript_params = torchscript_params.max(max_abs_diff(var, value)?),
            None => torchscript_only.push(name.clone()),
        }
    }
    let mut rust_only: Vec<String> = vars
        .iter()
        .filter(|(name, t)| t.requires_grad() && !ts_params.iter().any(|(n, _)| n == *name))
        .map(|(name, _)| name.clone())
        .collect();
    rust_only.sort();

    // Forward, against eager PyTorch and against TorchScript.
    let inputs_cpu = read_named(&dir.join("inputs.safetensors"))?;
    let outputs = read_named(&dir.join("outputs.safetensors"))?;
    let loss_inputs = read_named(&dir.join("loss.safetensors"))?;
    let grads = read_named(&dir.join("grads.safetensors"))?;
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
        max_abs_diff(&output, named(&outputs, "output", "outputs.safetensors")?)?,
    );

    let ordered: Vec<Tensor> = model
        .input_names()
        .iter()
        .map(|n| inputs[*n].detach())
        .collect();
    let ts_out = tch::no_grad(|| scripted.forward_ts(&ordered))?;
    let forward_torchscript = max_abs_diff(&output, &ts_out)?;

    // The scalar loss and its gradients.
    let loss = match case.loss.as_str() {
        "weighted_sum" => {
            let cotangent = named(&loss_inputs, "cotangent", "loss.safetensors")?.to_device(device);
            (&output * cotangent).sum(output.kind())
        }
        "qa_span" => {
            let (start, end) = split_span_logits(&output)?;
            for (key, actual) in [("start_logits", &start), ("end_logits", &end)] {
                let expected = named(&outputs, key, "outputs.safetensors")?;
                forward_eager.insert(key.into(), max_abs_diff(actual, expected)?);
            }
            span_loss(
                &start,
                &end,
                named(&loss_inputs, "start_positions", "loss.safetensors")?,
                named(&loss_inputs, "end_positions", "loss.safetensors")?,
            )?
        }
        other => bail!("case {}: unknown loss `{other}`", case.name),
    };
    if case.loss != "weighted_sum" {
        forward_eager.insert(
            "loss".into(),
            max_abs_diff(&loss, named(&outputs, "loss", "outputs.safetensors")?)?,
        );
    }
    loss.backward();

    let mut grad_missing = Vec::new();
    let mut grad_inputs = 0.0f64;
    let mut grad_params = 0.0f64;
    for (key, expected) in &grads {
        let (actual, slot) = if let Some(name) = key.strip_prefix("input.") {
            (inputs.get(name).map(Tensor::grad), &mut grad_inputs)
        } else if let Some(name) = key.strip_prefix("param.") {
            (vars.get(name).map(Tensor::grad), &mut grad_params)
        } else {
            bail!("unexpected entry `{key}` in grads.safetensors");
        };
        match actual {
            Some(g) if g.defined() => *slot = slot.max(max_abs_diff(&g, expected)?),
            Some(_) if max_abs_diff(expected, &expected.zeros_like())? == 0.0 => {}
            _ => grad_missing.push(key.clone()),
        }
    }
    for (name, var) in &vars {
        if var.requires_grad() && !grads.contains_key(&format!("param.{name}")) {
            grad_missing.push(format!("param.{name} (not exported)"));
        }
    }

    let after_step = match case.sgd {
        Some(sgd) => Some(sgd_step_diff(
            &vs,
            sgd,
            &dir.join("after_step.safetensors"),
        )?),
        None => None,
    };

    let cuda = device.is_cuda();
    Ok(CaseOutcome {
        case: case.name.clone(),
        module: case.module.clone(),
        device,
        dtype: case.dtype.clone(),
        forward_tolerance: if cuda {
            case.tolerance.cuda
        } else {
            case.tolerance.forward
        },
        grad_tolerance: if cuda {
            case.tolerance.cuda
        } else {
            case.tolerance.grad
        },
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
    })
}

/// Takes one SGD step with libtorch's optimizer (the gradients are in place) and returns the max
/// |Δ| of every variable against the state PyTorch exported after its step.
fn sgd_step_diff(vs: &VarStore, sgd: SgdSpec, expected: &Path) -> Result<f64> {
    let mut opt = tch::nn::Sgd {
        momentum: sgd.momentum,
        dampening: 0.0,
        wd: sgd.weight_decay,
        nesterov: false,
    }
    .build(vs, sgd.lr)?;
    opt.step();
    let expected = read_named(expected)?;
    let vars = vs.variables();
    if vars.len() != expected.len() {
        bail!(
            "after_step.safetensors has {} entries, the model {}",
            expected.len(),
            vars.len()
        );
    }
    let mut diff = 0.0f64;
    for (key, value) in &expected {
        let var = vars
            .get(key)
            .with_context(|| format!("after_step: `{key}` missing in the model"))?;
        diff = diff.max(max_abs_diff(var, value)?);
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
                Err(err) => ParityRow {
                    case: case.name.clone(),
                    module: case.module.clone(),
                    device: device_name(device),
                    dtype: case.dtype.clone(),
                    max_abs_forward: None,
                    max_abs_grad: None,
                    max_abs_step: None,
                    tolerance: case.tolerance.forward,
                    tolerance_grad: case.tolerance.grad,
                    pass: false,
                    error: Some(format!("{err:#}")),
                },
            };
            rows.push(row);
        }
    }
    rows
}

/// The report as a text table.
pub fn format_table(rows: &[ParityRow]) -> String {
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.2e}"));
    let grad = |r: &ParityRow| match (r.max_abs_grad, r.max_abs_step) {
        (Some(g), Some(s)) => Some(g.max(s)),
        (g, _) => g,
    };
    let mut out = format!(
        "{:<36} {:<19} {:<7} {:<7} {:>11} {:>11} {:>13} {}\n",
        "case", "module", "device", "dtype", "max|Δ| fwd", "max|Δ| grad", "tol fwd/grad", "result"
    );
    for r in rows {
        out += &format!(
            "{:<36} {:<19} {:<7} {:<7} {:>11} {:>11} {:>13} {}\n",
            r.case,
            r.module,
            r.device,
            r.dtype,
            fmt(r.max_abs_forward),
            fmt(grad(r)),
            format!("{:.0e}/{:.0e}", r.tolerance, r.tolerance_grad),
            if r.pass { "PASS" } else { "FAIL" }
        );
        if let Some(err) = &r.error {
            out += &format!("    error: {err}\n");
        }
    }
    out
}
