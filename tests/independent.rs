//! The references checked against sources their author did not write: torchvision (where the
//! hand-written ResNet coincides with it), the ResNet paper's parameter counts, and the original SiD
//! code (vendored in python_ref/original/). The Python half is python_ref/independent_checks.py.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use residual::ModelConfig;
use tch::nn::VarStore;
use tch::Device;

/// Every check the script must report, by name prefix.
const EXPECTED: &[&str] = &[
    "torchvision/resnet18: state_dict keys and shapes",
    "torchvision/resnet18: eval outputs identical",
    "torchvision/resnet18: train outputs and gradients identical",
    "torchvision/resnet50: state_dict keys and shapes",
    "torchvision/resnet50: eval outputs identical",
    "torchvision/resnet50: train outputs and gradients identical",
    "paper/cifar_resnet20 (option A): 0.27M parameters",
    "paper/cifar_resnet32 (option A): 0.46M parameters",
    "paper/cifar_resnet44 (option A): 0.66M parameters",
    "paper/cifar_resnet56 (option A): 0.85M parameters",
    "paper/cifar_resnet110 (option A): 1.7M parameters",
    "sid/original: SiDConfig fields and defaults",
    "sid/original default: state_dict keys, shapes and initial weights (same seed)",
    "sid/original default: eval outputs identical",
    "sid/original small: train mode (dropout, drop-path) outputs and gradients identical",
    "sid/seed: the seed document's SiDResidualBlock is the original's",
];

/// `path` under `$RESIDUAL_SOURCE` where it exists there, else under the tree cargo built from (a
/// GPU bundle ships python_ref/*.py but not the oracle or the seed document). The seed document's
/// folder can also be given as `$RESIDUAL_SEED_DIR`.
fn in_source_tree(path: &str) -> PathBuf {
    let bundled = common::source_dir().join(path);
    if bundled.exists() {
        bundled
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    }
}

#[test]
fn references_agree_with_torchvision_the_paper_and_the_original_sid() {
    let python =
        std::env::var("RESIDUAL_PYTHON").expect("RESIDUAL_PYTHON comes from .cargo/config.toml");
    let source = common::source_dir();
    let out = Command::new(&python)
        .arg(source.join("python_ref/independent_checks.py"))
        .arg("--json")
        .arg("--original")
        .arg(in_source_tree("python_ref/original/modeling.py"))
        .arg("--seed-dir")
        .arg(
            std::env::var_os("RESIDUAL_SEED_DIR")
                .map_or_else(|| in_source_tree("../shared/seed"), PathBuf::from),
        )
        .output()
        .expect("cannot run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "independent_checks.py printed no JSON ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r["pass"] != true)
        .map(|r| format!("{}: {}", r["check"], r["detail"]))
        .collect();
    for r in &rows {
        println!("{} {}", r["pass"], r["check"]);
    }
    assert!(
        failed.is_empty(),
        "failed checks:\n  {}",
        failed.join("\n  ")
    );
    assert!(out.status.success(), "exit status {}", out.status);
    for name in EXPECTED {
        assert!(
            rows.iter()
                .any(|r| r["check"].as_str().is_some_and(|c| c.starts_with(name))),
            "check `{name}` was not run"
        );
    }
}

/// ResNet paper, Table 6: parameters of the CIFAR-10 ResNets (option A), at the paper's precision.
#[test]
fn rust_cifar_resnets_have_the_papers_parameter_counts() {
    for (depth, paper) in [
        (20, "0.27"),
        (32, "0.46"),
        (44, "0.66"),
        (56, "0.85"),
        (110, "1.7"),
    ] {
        let vs = VarStore::new(Device::Cpu);
        ModelConfig::from_json(&format!(
            r#"{{"arch": "cifar_resnet", "depth": {depth}, "num_classes": 10, "shortcut": "A"}}"#
        ))
        .unwrap()
        .build(vs.root())
        .unwrap();
        let count: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        let decimals = paper.len() - paper.find('.').unwrap() - 1;
        let millions = format!("{:.*}", decimals, count as f64 / 1e6);
        assert_eq!(millions, paper, "cifar_resnet{depth}: {count} parameters");
    }
}
