//! Helpers shared by the parity tests.
#![allow(dead_code)]

use std::io::Write;

use residual::parity::{self, CaseOutcome, Manifest};
use tch::Device;

/// The references written by `make artifacts`; panics with the way to make them when missing.
pub fn manifest() -> Manifest {
    match Manifest::load(&parity::default_artifacts_dir()) {
        Ok(m) => m,
        Err(err) => panic!("{err:#}"),
    }
}

/// The first CUDA device, or `None` after printing the one permitted skip message.
pub fn cuda_or_skip() -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        // Written past the test harness's capture so that it shows in `cargo test` output.
        let _ = writeln!(std::io::stderr(), "skipped: no CUDA device");
        None
    }
}

/// Runs every case of `module` on `device`, prints the measured differences, and asserts each part
/// of the comparison separately so a failure says which one broke.
pub fn check_module(module: &str, device: Device) -> Vec<CaseOutcome> {
    let manifest = manifest();
    let cases: Vec<_> = manifest
        .cases
        .iter()
        .filter(|c| c.module == module)
        .collect();
    assert!(
        !cases.is_empty(),
        "no {module} cases in the manifest: re-run `make artifacts`"
    );
    let mut outcomes = Vec::new();
    for case in cases {
        let o = parity::run_case(&manifest, case, device)
            .unwrap_or_else(|e| panic!("case {} on {device:?}: {e:#}", case.name));
        println!(
            "{:<36} {:?}: forward eager {:?}, TorchScript {:.3e}; grad inputs {:.3e}, params {:.3e}; \
             after SGD step {:?}",
            o.case,
            device,
            o.forward_eager,
            o.forward_torchscript,
            o.grad_inputs,
            o.grad_params,
            o.after_step
        );
        assert!(
            o.load.is_clean(),
            "{}: state_dict keys differ:\n{}",
            o.case,
            o.load
        );
        assert!(
            o.torchscript_only.is_empty(),
            "{}: {:?}",
            o.case,
            o.torchscript_only
        );
        assert!(o.rust_only.is_empty(), "{}: {:?}", o.case, o.rust_only);
        assert_eq!(
            o.torchscript_params, 0.0,
            "{}: TorchScript weights differ",
            o.case
        );
        assert!(
            o.grad_missing.is_empty(),
            "{}: {:?}",
            o.case,
            o.grad_missing
        );
        for (output, diff) in &o.forward_eager {
            assert!(
                *diff <= o.forward_tolerance,
                "{} {output}: {diff:e} vs eager",
                o.case
            );
        }
        assert!(
            o.forward_torchscript <= o.forward_tolerance,
            "{}: vs TorchScript",
            o.case
        );
        assert!(
            o.grad_inputs <= o.grad_tolerance,
            "{}: input grads {:e}",
            o.case,
            o.grad_inputs
        );
        assert!(
            o.grad_params <= o.grad_tolerance,
            "{}: param grads {:e}",
            o.case,
            o.grad_params
        );
        if case.sgd.is_some() {
            let step = o
                .after_step
                .unwrap_or_else(|| panic!("{}: SGD step not compared", o.case));
            assert!(
                step <= o.grad_tolerance,
                "{}: state after SGD step {step:e}",
                o.case
            );
        }
        assert!(o.pass(), "{}: {:?}", o.case, o.problems());
        outcomes.push(o);
    }
    outcomes
}

/// The `residual` binary: `$RESIDUAL_BIN` (the GPU bundle sets it), else the one cargo built.
pub fn residual_bin() -> std::path::PathBuf {
    std::env::var_os("RESIDUAL_BIN")
        .map_or_else(|| env!("CARGO_BIN_EXE_residual").into(), Into::into)
}

/// The source tree (for python_ref scripts): `$RESIDUAL_SOURCE`, else where cargo built from.
pub fn source_dir() -> std::path::PathBuf {
    std::env::var_os("RESIDUAL_SOURCE")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
