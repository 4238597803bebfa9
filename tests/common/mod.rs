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

/// Runs every case of `module` on `device`, prints the measured differences of each, and then
/// fails with the list of every case that failed or could not run (not just the first).
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
    let mut failures = Vec::new();
    for case in cases {
        let o = match parity::run_case(&manifest, case, device) {
            Ok(o) => o,
            Err(e) => {
                println!("{:<36} {device:?}: ERROR {e:#}", case.name);
                failures.push(format!("{}: cannot run: {e:#}", case.name));
                continue;
            }
        };
        let (f, g) = (o.forward(), o.grad());
        let step = o.after_step.as_ref().map_or("-".to_string(), |d| {
            format!("{:.3e} ({:.3e})", d.rel, d.abs)
        });
        println!(
            "{:<36} {device:?}: relative (absolute) forward {:.3e} ({:.3e}), grad {:.3e} ({:.3e}), \
             after SGD steps {step}",
            o.case, f.rel, f.abs, g.rel, g.abs
        );
        if !o.pass() {
            failures.push(format!("{}: {}", o.case, o.problems().join("; ")));
        }
        outcomes.push(o);
    }
    assert!(
        failures.is_empty(),
        "{} {module} case(s) fail on {device:?}:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    outcomes
}

/// Fails unless every case of `names` is among `outcomes`, naming those that are not.
pub fn assert_ran<S: AsRef<str>>(outcomes: &[CaseOutcome], names: impl IntoIterator<Item = S>) {
    let missing: Vec<String> = names
        .into_iter()
        .map(|n| n.as_ref().to_string())
        .filter(|n| !outcomes.iter().any(|o| &o.case == n))
        .collect();
    assert!(
        missing.is_empty(),
        "case(s) missing from the manifest: {missing:?}"
    );
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

/// A fresh, empty folder for one test (`tag`) of this test process.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("residual-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The reference folder `sub` (e.g. `checkpoints`), checked by a file it must hold; panics with
/// how to make it when missing.
pub fn reference_dir(sub: &str, marker: &str) -> std::path::PathBuf {
    let dir = parity::default_artifacts_dir().join(sub);
    assert!(
        dir.join(marker).exists(),
        "{} missing: run `make artifacts`",
        dir.display()
    );
    dir
}

/// Keeps transparent huge pages away from this process (`prctl(PR_SET_THP_DISABLE)`) for tests
/// that measure resident memory: with THP set to `always`, a fault or khugepaged can make a whole
/// 2 MB range of a sparsely used heap resident at any moment, which has nothing to do with what
/// the code under test holds.
pub fn disable_transparent_huge_pages() {
    const PR_SET_THP_DISABLE: i32 = 41;
    extern "C" {
        fn prctl(option: i32, ...) -> i32;
    }
    // SAFETY: PR_SET_THP_DISABLE only sets a flag of this process's memory map.
    let rc = unsafe { prctl(PR_SET_THP_DISABLE, 1u64, 0u64, 0u64, 0u64) };
    assert_eq!(rc, 0, "prctl(PR_SET_THP_DISABLE) failed");
}
