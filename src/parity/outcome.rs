//! What one case measured, and what parity means: [`CaseOutcome::pass`].

use std::collections::BTreeMap;

use tch::Device;

use super::{Diff, Dtype, SgdSpec, Tolerance, TorchScript};
use crate::checkpoint::LoadReport;

/// Everything measured for one case on one device.
#[derive(Debug)]
pub struct CaseOutcome {
    pub case: String,
    pub module: String,
    pub device: Device,
    pub dtype: Dtype,
    /// The case's TorchScript module, and its SGD steps: what must have been compared.
    pub torchscript: TorchScript,
    pub sgd: Option<SgdSpec>,
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

    /// Parity: names match everywhere, nothing is non-finite, TorchScript holds the Rust weights
    /// exactly, everything the case calls for was compared (the TorchScript forward, the state
    /// after the SGD steps), and every relative difference is within tolerance.
    pub fn pass(&self) -> bool {
        self.problems().is_empty()
    }

    /// What failed, for messages: empty exactly when the case passes.
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
        if self.torchscript != TorchScript::Absent && self.forward_torchscript.is_none() {
            out.push("TorchScript forward not compared".into());
        }
        if self.sgd.is_some() && self.after_step.is_none() {
            out.push("SGD steps not compared".into());
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
}
