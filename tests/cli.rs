//! The `residual` binary: doctor, parity report, exit codes.

mod common;

use std::process::Command;

fn residual(args: &[&str]) -> std::process::Output {
    Command::new(common::residual_bin())
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("cannot run the residual binary")
}

#[test]
fn doctor_reports_the_pinned_libtorch() {
    let out = residual(&["doctor", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
    let out = residual(&["parity", "--json", "--device", "all"]);
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
    assert_eq!(rows.len(), manifest.cases.len() * devices);
    for row in &rows {
        for key in [
            "case",
            "module",
            "device",
            "dtype",
            "max_abs_forward",
            "max_abs_grad",
            "tolerance",
            "pass",
        ] {
            assert!(row.get(key).is_some(), "row lacks {key}: {row}");
        }
        assert_eq!(row["pass"], true, "{row}");
        assert!(row["max_abs_forward"].as_f64().unwrap() <= row["tolerance"].as_f64().unwrap());
    }
    if devices == 1 {
        assert!(String::from_utf8_lossy(&out.stderr).contains("skipped: no CUDA device"));
    }
}

#[test]
fn parity_table_and_failures() {
    let out = residual(&["parity", "--filter", "sid_residual_block"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains("sid_residual_block") && stdout.contains("PASS"),
        "{stdout}"
    );
    assert!(stdout.contains("1 of 1 rows pass"), "{stdout}");

    let missing = residual(&["parity", "--artifacts", "/nonexistent"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("make artifacts"));

    let bad_device = residual(&["parity", "--device", "tpu"]);
    assert!(!bad_device.status.success());
}
