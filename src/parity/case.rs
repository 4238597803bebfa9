//! One case, step by step: build the model and load the reference weights, compare them with the
//! TorchScript module, run the forward, the loss and its gradients, then the SGD steps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{nn::VarStore, CModule, Device, Tensor};

use super::diff::{all_finite, max_abs_diff, Comparer, Side};
use super::{
    hashed_weight, CaseOutcome, CaseSpec, Diff, KeyLayout, Loss, Manifest, SgdSpec, TorchScript,
};
use crate::checkpoint::{load_state_dict, LoadReport, StateDict};
use crate::config::ModelConfig;
use crate::models::conv_sds::{span_loss, split_span_logits};
use crate::models::{Inputs, Model};
use crate::train::{logits_loss, Sgd};

/// Runs one case on `device` and measures every difference.
pub fn run_case(manifest: &Manifest, case: &CaseSpec, device: Device) -> Result<CaseOutcome> {
    if device.is_cuda() {
        crate::backend::strict_fp32()?;
    }
    let dir = manifest.case_dir(case);
    let mut cmp = Comparer::default();
    let Loaded { vs, model, load } = load_model(case, &dir, device)?;
    let vars = vs.variables();
    let scripted = load_torchscript(case, &dir, device)?;
    let params = match &scripted {
        Some(scripted) => compare_parameters(scripted, case.layout, &vars, &mut cmp)?,
        None => ParameterMatch::default(),
    };

    let refs = References::read(&dir, case.layout)?;
    let inputs = leaf_inputs(model.as_ref(), &refs.inputs, device)?;
    let forward = compare_forward(
        case,
        model.as_ref(),
        &inputs,
        scripted.as_ref(),
        &refs,
        &mut cmp,
    )?;
    forward.loss.backward();
    let grads = compare_gradients(&refs.grads, &inputs, &vars, &mut cmp)?;

    let after_step = match case.sgd {
        Some(sgd) => {
            sgd_steps(&vs, sgd, || {
                let output = model.forward_named(&inputs, case.train())?;
                case_loss(case, &output, &refs.loss)?.backward();
                Ok(())
            })?;
            let expected = Reference::read(&dir, "after_step.safetensors")?
                .rename(|key| case.layout.rust_key(key))?;
            Some(state_diff(&vs, &expected, &mut cmp)?)
        }
        None => None,
    };

    Ok(CaseOutcome {
        case: case.name.clone(),
        module: case.module.clone(),
        device,
        dtype: case.dtype,
        torchscript: case.torchscript,
        sgd: case.sgd,
        tolerance: case.tolerance.on(device),
        load,
        torchscript_only: params.torchscript_only,
        rust_only: params.rust_only,
        torchscript_params: params.values,
        forward_eager: forward.eager,
        forward_torchscript: forward.torchscript,
        grad_inputs: grads.inputs,
        grad_params: grads.params,
        grad_missing: grads.missing,
        after_step,
        non_finite: cmp.non_finite,
    })
}

/// The tensors of one of a case's reference files, by name.
struct Reference {
    file: &'static str,
    tensors: BTreeMap<String, Tensor>,
}

impl Reference {
    fn read(dir: &Path, file: &'static str) -> Result<Self> {
        let entries = StateDict::read_safetensors(&dir.join(file))?.entries;
        Ok(Reference {
            file,
            tensors: entries.into_iter().collect(),
        })
    }

    /// The same tensors under the names `rename` gives.
    fn rename(self, rename: impl Fn(&str) -> Result<String>) -> Result<Self> {
        let tensors = self
            .tensors
            .into_iter()
            .map(|(key, t)| Ok((rename(&key)?, t)))
            .collect::<Result<_>>()?;
        Ok(Reference { tensors, ..self })
    }

    fn get(&self, key: &str) -> Result<&Tensor> {
        self.tensors.get(key).with_context(|| {
            format!(
                "`{key}` missing from {}: re-run `make artifacts`",
                self.file
            )
        })
    }
}

/// What the forward and backward are compared against (see python_ref/export.py).
struct References {
    inputs: Reference,
    /// `output`, the `loss`, and any named extras.
    outputs: Reference,
    /// What the loss needs besides the output (cotangent, labels, span positions).
    loss: Reference,
    grads: Reference,
}

impl References {
    fn read(dir: &Path, layout: KeyLayout) -> Result<Self> {
        Ok(References {
            inputs: Reference::read(dir, "inputs.safetensors")?,
            outputs: Reference::read(dir, "outputs.safetensors")?,
            loss: Reference::read(dir, "loss.safetensors")?,
            grads: Reference::read(dir, "grads.safetensors")?.rename(|key| {
                Ok(match key.split_once('.') {
                    Some((kind @ ("param" | "param_rows"), name)) => {
                        format!("{kind}.{}", layout.rust_key(name)?)
                    }
                    _ => key.to_string(),
                })
            })?,
        })
    }
}

/// The Rust model of a case with the reference weights in place.
struct Loaded {
    vs: VarStore,
    model: Box<dyn Model>,
    /// Key mismatches: reported, not fatal.
    load: LoadReport,
}

/// The case's model on `device` with the exported state_dict (and the regenerated weights of a
/// compact case) loaded by name.
fn load_model(case: &CaseSpec, dir: &Path, device: Device) -> Result<Loaded> {
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
    Ok(Loaded { vs, model, load })
}

/// The case's module.pt in the case's mode, or `None` for compact cases.
fn load_torchscript(case: &CaseSpec, dir: &Path, device: Device) -> Result<Option<CModule>> {
    if case.torchscript == TorchScript::Absent {
        return Ok(None);
    }
    let mut m = CModule::load_on_device(dir.join("module.pt"), device)
        .with_context(|| format!("cannot load TorchScript module of case {}", case.name))?;
    if case.train() {
        m.f_set_train()?;
    } else {
        m.f_set_eval()?;
    }
    Ok(Some(m))
}

/// TorchScript's parameters against the Rust variables, by name.
#[derive(Default)]
struct ParameterMatch {
    torchscript_only: Vec<String>,
    rust_only: Vec<String>,
    values: Diff,
}

fn compare_parameters(
    scripted: &CModule,
    layout: KeyLayout,
    vars: &HashMap<String, Tensor>,
    cmp: &mut Comparer,
) -> Result<ParameterMatch> {
    let mut out = ParameterMatch::default();
    let ts_params = scripted
        .named_parameters()?
        .into_iter()
        .map(|(name, t)| Ok((layout.rust_key(&name)?, t)))
        .collect::<Result<Vec<_>>>()?;
    for (name, value) in &ts_params {
        match vars.get(name) {
            Some(var) => {
                let d = cmp.diff(&format!("parameter {name}"), var, value)?;
                out.values.merge(&d);
            }
            None => out.torchscript_only.push(name.clone()),
        }
    }
    out.rust_only = vars
        .iter()
        .filter(|(name, t)| t.requires_grad() && !ts_params.iter().any(|(n, _)| n == *name))
        .map(|(name, _)| name.clone())
        .collect();
    out.rust_only.sort();
    Ok(out)
}

/// The model's inputs on `device`, floating-point ones as leaves that collect gradients.
fn leaf_inputs(model: &dyn Model, reference: &Reference, device: Device) -> Result<Inputs> {
    let mut inputs = Inputs::new();
    for name in model.input_names() {
        let t = reference.get(name)?.to_device(device);
        let t = if t.is_floating_point() {
            t.set_requires_grad(true)
        } else {
            t
        };
        inputs.insert(name.to_string(), t);
    }
    Ok(inputs)
}

/// The Rust forward's loss and its comparisons.
struct Forward {
    /// The case's scalar loss, for the backward.
    loss: Tensor,
    /// By output name: `output`, a span head's `start_logits` and `end_logits`, and the `loss`
    /// where [`Loss::compared`].
    eager: BTreeMap<String, Diff>,
    torchscript: Option<Diff>,
}

/// The Rust forward and loss against the eager outputs, and the output against the TorchScript
/// module run from Rust.
fn compare_forward(
    case: &CaseSpec,
    model: &dyn Model,
    inputs: &Inputs,
    scripted: Option<&CModule>,
    refs: &References,
    cmp: &mut Comparer,
) -> Result<Forward> {
    let output = model.forward_named(inputs, case.train())?;
    let mut eager = BTreeMap::new();
    let expected = refs.outputs.get("output")?;
    eager.insert("output".to_string(), cmp.diff("output", &output, expected)?);
    let torchscript = match scripted {
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
    if case.loss == Loss::QaSpan {
        let (start, end) = split_span_logits(&output)?;
        for (key, actual) in [("start_logits", &start), ("end_logits", &end)] {
            eager.insert(key.into(), cmp.diff(key, actual, refs.outputs.get(key)?)?);
        }
    }
    let loss = case_loss(case, &output, &refs.loss)?;
    if case.loss.compared() {
        let expected = refs.outputs.get("loss")?;
        eager.insert("loss".into(), cmp.diff("loss", &loss, expected)?);
    }
    Ok(Forward {
        loss,
        eager,
        torchscript,
    })
}

/// The case's scalar loss of `output`, as export.py computes it.
fn case_loss(case: &CaseSpec, output: &Tensor, loss_inputs: &Reference) -> Result<Tensor> {
    let get =
        |key: &str| -> Result<Tensor> { Ok(loss_inputs.get(key)?.to_device(output.device())) };
    match case.loss {
        Loss::WeightedSum => Ok((output * get("cotangent")?).sum(output.kind())),
        Loss::QaSpan => {
            let (start, end) = split_span_logits(output)?;
            span_loss(
                &start,
                &end,
                &get("start_positions")?,
                &get("end_positions")?,
            )
        }
        Loss::CrossEntropy => {
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
    }
}

/// An entry of grads.safetensors: the gradient of an input, of a parameter, or (compact cases) of
/// a parameter's first rows.
enum GradKey<'a> {
    Input(&'a str),
    Param(&'a str),
    ParamRows(&'a str),
}

impl<'a> GradKey<'a> {
    fn parse(key: &'a str) -> Result<Self> {
        if let Some(name) = key.strip_prefix("input.") {
            Ok(GradKey::Input(name))
        } else if let Some(name) = key.strip_prefix("param.") {
            Ok(GradKey::Param(name))
        } else if let Some(name) = key.strip_prefix("param_rows.") {
            Ok(GradKey::ParamRows(name))
        } else {
            bail!("unexpected entry `{key}` in grads.safetensors");
        }
    }
}

/// The gradient comparisons.
struct Gradients {
    inputs: Diff,
    params: Diff,
    missing: Vec<String>,
}

/// Every exported gradient against the Rust one, after the backward. A gradient Rust did not
/// produce passes only where PyTorch's is all zeros; a parameter whose gradient was not exported is
/// missing.
fn compare_gradients(
    grads: &Reference,
    inputs: &Inputs,
    vars: &HashMap<String, Tensor>,
    cmp: &mut Comparer,
) -> Result<Gradients> {
    let mut out = Gradients {
        inputs: Diff::default(),
        params: Diff::default(),
        missing: Vec::new(),
    };
    let mut exported = BTreeSet::new();
    for (key, expected) in &grads.tensors {
        let (actual, slot) = match GradKey::parse(key)? {
            GradKey::Input(name) => (inputs.get(name).map(Tensor::grad), &mut out.inputs),
            GradKey::Param(name) => {
                exported.insert(name);
                (vars.get(name).map(Tensor::grad), &mut out.params)
            }
            GradKey::ParamRows(name) => {
                exported.insert(name);
                let rows = expected.size().first().copied().unwrap_or(0);
                let grad = vars.get(name).map(Tensor::grad);
                let grad = grad.map(|g| if g.defined() { g.narrow(0, 0, rows) } else { g });
                (grad, &mut out.params)
            }
        };
        match actual {
            Some(g) if g.defined() => {
                slot.merge(&cmp.diff(&format!("grad {key}"), &g, expected)?)
            }
            Some(_)
                if all_finite(expected)
                    && max_abs_diff(expected, &expected.zeros_like())? == 0.0 => {}
            _ => {
                cmp.finite(&format!("grad {key}"), Side::Reference, expected);
                out.missing.push(key.clone());
            }
        }
    }
    for (name, var) in vars {
        if var.requires_grad() && !exported.contains(name.as_str()) {
            out.missing.push(format!("param.{name} (not exported)"));
        }
    }
    Ok(out)
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
fn state_diff(vs: &VarStore, expected: &Reference, cmp: &mut Comparer) -> Result<Diff> {
    let vars = vs.variables();
    if vars.len() != expected.tensors.len() {
        bail!(
            "{} has {} entries, the model {}",
            expected.file,
            expected.tensors.len(),
            vars.len()
        );
    }
    let mut diff = Diff::default();
    for (key, value) in &expected.tensors {
        let var = vars
            .get(key)
            .with_context(|| format!("after_step: `{key}` missing in the model"))?;
        diff.merge(&cmp.diff(&format!("after step {key}"), var, value)?);
    }
    Ok(diff)
}
