//! The `residual` binary: doctor, parity report, exit codes, and how it finds libtorch.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether the binary under test is the GPU bundle's (`run.sh` sets `RESIDUAL_BIN`). Those have no
/// run path: they reach the host's libtorch only through the `LD_LIBRARY_PATH` run.sh sets.
fn bundled() -> bool {
    std::env::var_os("RESIDUAL_BIN").is_some()
}

fn residual(args: &[&str]) -> std::process::Output {
    let mut command = Command::new(common::residual_bin());
    command.args(args);
    if !bundled() {
        // cargo's binary must find libtorch through its run path alone.
        command.env_remove("LD_LIBRARY_PATH");
    }
    let out = command.output().expect("cannot run the residual binary");
    // A binary that cannot load libtorch exits 127 before main: that is never the failure a test
    // expects.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() != Some(127) && !stderr.contains("error while loading shared libraries"),
        "the residual binary did not start: {stderr}"
    );
    out
}

fn canonical(path: &Path) -> PathBuf {
    path.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `residual doctor --json`, which must succeed.
fn doctor_json() -> serde_json::Value {
    let out = residual(&["doctor", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// cargo's binary runs without `LD_LIBRARY_PATH` on the libtorch it was built against (its run
/// path); the bundled binary runs on the libtorch of the first `LD_LIBRARY_PATH` entry that has one.
#[test]
fn the_binary_finds_libtorch() {
    let report = doctor_json();
    let loaded = canonical(Path::new(report["libtorch_path"].as_str().unwrap()));
    if bundled() {
        let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
        let expected = path
            .split(':')
            .map(Path::new)
            .find(|dir| dir.join("libtorch_cpu.so").exists())
            .expect("the bundle runs with libtorch on LD_LIBRARY_PATH");
        assert_eq!(loaded, canonical(expected), "LD_LIBRARY_PATH={path}");
    } else {
        let built = Path::new(env!("RESIDUAL_LIBTORCH_LIB"));
        assert_eq!(loaded, canonical(built), "run without LD_LIBRARY_PATH");
    }
}

#[test]
fn doctor_reports_the_pinned_libtorch() {
    let report = doctor_json();
    assert_eq!(report["tch_version"], "0.24.0");
    assert!(
        report["libtorch_version"]
            .as_str()
            .unwrap()
            .starts_with("2.11."),
        "{report}"
    );
    let lib = report["libtorch_path"].as_str().unwrap();
    assert!(
        std::path::Path::new(lib).join("libtorch_cpu.so").exists(),
        "{lib}"
    );
    assert_eq!(report["cuda_available"], tch::Cuda::is_available());
    assert!(report["threads"].as_i64().unwrap() >= 1);
    // The pip wheel carries libtorch_cuda: the binary must have kept it despite --as-needed.
    if std::path::Path::new(lib).join("libtorch_cuda.so").exists() {
        assert_eq!(report["libtorch_cuda_linked"], true);
    }
    let text = residual(&["doctor"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("libtorch          2.11."));
}

#[test]
fn parity_json_has_one_passing_row_per_case() {
    // The shape grid's cheapest cases (CIFAR ResNets and a ConvSDS head: two modules); the
    // parity_* tests run every case already, the row format is the same for all.
    const FILTER: &str = "shape_c";
    let out = residual(&["parity", "--json", "--device", "all", "--filter", FILTER]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let manifest =
        residual::parity::Manifest::load(&residual::parity::default_artifacts_dir()).unwrap();
    let devices = if tch::Cuda::is_available() { 2 } else { 1 };
    let cases = manifest
        .cases
        .iter()
        .filter(|c| c.name.contains(FILTER))
        .count();
    assert!(
        cases >= 5,
        "only {cases} {FILTER} cases: re-run `make artifacts`"
    );
    assert_eq!(rows.len(), cases * devices);
    let modules: std::collections::BTreeSet<_> =
        rows.iter().filter_map(|r| r["module"].as_str()).collect();
    assert!(modules.len() >= 2, "rows of one module only: {modules:?}");
    for row in &rows {
        for key in [
            "case",
            "module",
            "device",
            "dtype",
            "max_abs_forward",
            "max_abs_grad",
            "max_rel_forward",
            "max_rel_grad",
            "tolerance_rel_forward",
            "tolerance_rel_grad",
            "non_finite",
            "pass",
        ] {
            assert!(row.get(key).is_some(), "row lacks {key}: {row}");
        }
        assert_eq!(row["pass"], true, "{row}");
        let value = |key: &str| {
            row[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} is not a number: {row}"))
        };
        assert!(
            value("max_rel_forward") <= value("tolerance_rel_forward"),
            "{row}"
        );
        assert!(
            value("max_rel_grad") <= value("tolerance_rel_grad"),
            "{row}"
        );
    }
    if devices == 1 {
        assert!(String::from_utf8_lossy(&out.stderr).contains("skipped: no CUDA device"));
    }
}

#[test]
fn parity_table_and_failures() {
    let out = residual(&["parity", "--filter", "sid_residual_block"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("sid_residual_block") && stdout.contains("PASS"),
        "{stdout}"
    );
    assert!(stdout.contains("1 of 1 rows pass"), "{stdout}");

    let missing = residual(&["parity", "--artifacts", "/nonexistent"]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot run the parity report")
            && stderr.contains("/nonexistent")
            && stderr.contains("make artifacts"),
        "{stderr}"
    );

    let bad_device = residual(&["parity", "--device", "tpu"]);
    let stderr = String::from_utf8_lossy(&bad_device.stderr);
    // clap's usage error (exit 2) names the value and the choices.
    assert_eq!(bad_device.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value 'tpu'")
            && stderr.contains("[possible values: cpu, cuda, all]"),
        "{stderr}"
    );
}

/// Library enums are read by their serde names; a wrong one is clap's usage error (exit 2) that
/// lists them.
#[test]
fn enum_options_take_their_serde_names() {
    for (args, choices) in [
        (
            &[
                "train",
                "--config",
                "c.json",
                "--out",
                "o",
                "--schedule",
                "nope",
            ][..],
            "[possible values: step, cosine]",
        ),
        (
            &["eval", "--run", "r", "--format", "Cifar10"][..],
            "[possible values: idx, cifar10, cifar100, image-folder]",
        ),
        (
            &["bench-train", "--amp", "fp32"][..],
            "[possible values: fp16, bf16]",
        ),
    ] {
        let out = residual(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("invalid value") && stderr.contains(choices),
            "{args:?}: {stderr}"
        );
    }
    // A valid name gets past parsing: this run fails on its missing folder instead.
    let out = residual(&[
        "eval",
        "--run",
        "/nonexistent-run",
        "--format",
        "cifar100",
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/nonexistent-run has no checkpoint"),
        "{stderr}"
    );
    let help = residual(&["train", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    let schedule = help
        .split("--schedule")
        .nth(1)
        .and_then(|s| s.split("\n      --").next())
        .unwrap_or_else(|| panic!("no --schedule in the help:\n{help}"));
    assert!(
        schedule.contains("[default: step]")
            && schedule.contains("[possible values: step, cosine]"),
        "{schedule}"
    );
}
