//! The parity report: one row per case and device, as JSON or a text table.

use serde::Serialize;
use tch::Device;

use super::{CaseOutcome, CaseSpec, Dtype, Tolerance};
use crate::device::device_name;

/// One line of the parity report (`residual parity --json` prints an array of these). NaN
/// differences (non-finite values) serialise as null.
#[derive(Debug, Clone, Serialize)]
pub struct ParityRow {
    pub case: String,
    pub module: String,
    pub device: String,
    pub dtype: Dtype,
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
    /// A failing row that measured nothing.
    fn unmeasured(case: &str, module: &str, device: Device, dtype: Dtype, tol: Tolerance) -> Self {
        ParityRow {
            case: case.to_string(),
            module: module.to_string(),
            device: device_name(device),
            dtype,
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
            error: None,
        }
    }

    /// The row of a case that could not run.
    pub fn failed(case: &CaseSpec, device: Device, err: &anyhow::Error) -> Self {
        let tol = case.tolerance.on(device);
        ParityRow {
            error: Some(format!("{err:#}")),
            ..Self::unmeasured(&case.name, &case.module, device, case.dtype, tol)
        }
    }
}

impl CaseOutcome {
    pub fn row(&self) -> ParityRow {
        let (forward, grad) = (self.forward(), self.grad());
        let step = self.after_step.as_ref();
        ParityRow {
            max_abs_forward: Some(forward.abs),
            max_abs_grad: Some(grad.abs),
            max_abs_step: step.map(|d| d.abs),
            max_rel_forward: Some(forward.rel),
            max_rel_grad: Some(grad.rel),
            max_rel_step: step.map(|d| d.rel),
            non_finite: self.non_finite.clone(),
            pass: self.pass(),
            ..ParityRow::unmeasured(
                &self.case,
                &self.module,
                self.device,
                self.dtype,
                self.tolerance,
            )
        }
    }
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
