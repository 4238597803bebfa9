//! The parity harness and strict loading can fail: a corrupted reference, a missing key, a wrong
//! shape are each detected and named.

mod common;

use std::path::Path;

use residual::checkpoint::{load_state_dict, StateDict};
use residual::parity::{self, Manifest};
use residual::ModelConfig;
use tch::nn::VarStore;
use tch::{Device, Tensor};

const CASE: &str = "conv_sds_head_small_eval";

/// Copies one case's references into a fresh folder with its own manifest.
fn copy_case(manifest: &Manifest, name: &str, to: &Path) -> Manifest {
    let case = manifest.case(name).unwrap();
    let from = manifest.case_dir(case);
    std::fs::create_dir_all(to.join(name)).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(name).join(entry.file_name())).unwrap();
    }
    let text = std::fs::read_to_string(manifest.dir.join("manifest.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["cases"]
        .as_array_mut()
        .unwrap()
        .retain(|c| c["name"] == name);
    std::fs::write(to.join("manifest.json"), json.to_string()).unwrap();
    Manifest::load(to).unwrap()
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("residual-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Rewrites `file` of the copied case with `f` applied to the tensor named `key`.
fn perturb(dir: &Path, file: &str, key: &str, f: impl Fn(&Tensor) -> Tensor) {
    let path = dir.join(CASE).join(file);
    let entries = StateDict::read_safetensors(&path).unwrap().entries;
    let changed: Vec<(String, Tensor)> = entries
        .into_iter()
        .map(|(k, t)| if k == key { (k, f(&t)) } else { (k, t) })
        .collect();
    Tensor::write_safetensors(&changed, &path).unwrap();
}

#[test]
fn a_perturbed_output_reference_fails_the_case() {
    let dir = temp_dir("perturbed-output");
    let manifest = copy_case(&common::manifest(), CASE, &dir);
    let clean = parity::run_case(&manifest, manifest.case(CASE).unwrap(), Device::Cpu).unwrap();
    assert!(clean.pass(), "{:?}", clean.problems());

    perturb(&dir, "outputs.safetensors", "output", |t| t + 1e-4);
    let bad = parity::run_case(&manifest, manifest.case(CASE).unwrap(), Device::Cpu).unwrap();
    assert!(!bad.pass());
    let diff = bad.forward_eager["output"];
    assert!((diff - 1e-4).abs() < 1e-6, "measured {diff}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_perturbed_gradient_reference_fails_the_case() {
    let dir = temp_dir("perturbed-grad");
    let manifest = copy_case(&common::manifest(), CASE, &dir);
    perturb(&dir, "grads.safetensors", "param.convs.1.conv2.bias", |t| {
        t * 1.01 + 1e-3
    });
    let bad = parity::run_case(&manifest, manifest.case(CASE).unwrap(), Device::Cpu).unwrap();
    assert!(!bad.pass());
    assert!(bad.grad_params >= 1e-3, "measured {}", bad.grad_params);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_references_say_how_to_make_them() {
    let err = Manifest::load(Path::new("/nonexistent/python_ref")).unwrap_err();
    assert!(format!("{err:#}").contains("make artifacts"), "{err:#}");
}

fn small_head() -> (VarStore, Box<dyn residual::Model>) {
    let vs = VarStore::new(Device::Cpu);
    let config = ModelConfig::from_json(
        r#"{"arch": "conv_sds_head", "n_layers": 3, "input_size": 64, "hidden_size": 96}"#,
    )
    .unwrap();
    let model = config.build(vs.root()).unwrap();
    (vs, model)
}

fn reference_state() -> StateDict {
    let manifest = common::manifest();
    let dir = manifest.case_dir(manifest.case(CASE).unwrap());
    StateDict::read_safetensors(&dir.join("state_dict.safetensors")).unwrap()
}

#[test]
fn strict_load_copies_every_value_by_name() {
    let (vs, _model) = small_head();
    let state = reference_state();
    let report = load_state_dict(&vs, &state, true).unwrap();
    assert!(report.is_clean());
    let vars = vs.variables();
    assert_eq!(vars.len(), state.len());
    for (key, value) in &state.entries {
        assert_eq!(&vars[key], value, "{key}");
    }
}

#[test]
fn strict_load_lists_missing_unexpected_and_mismatched_keys_at_once() {
    let (vs, _model) = small_head();
    let mut state = reference_state();
    let before = vs.variables()["classifier.weight"].copy();
    state
        .entries
        .retain(|(k, _)| k != "convs.2.layer_norm.bias");
    state.entries.push((
        "convs.3.conv1.weight".into(),
        Tensor::zeros([1], tch::kind::FLOAT_CPU),
    ));
    for (k, t) in state.entries.iter_mut() {
        if k == "classifier.weight" {
            *t = Tensor::zeros([10, 96], tch::kind::FLOAT_CPU);
        }
    }
    let msg = format!("{:#}", load_state_dict(&vs, &state, true).unwrap_err());
    assert!(
        msg.contains("missing keys (1): convs.2.layer_norm.bias"),
        "{msg}"
    );
    assert!(
        msg.contains("unexpected keys (1): convs.3.conv1.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("classifier.weight: checkpoint [10, 96], model [2, 96]"),
        "{msg}"
    );
    assert_eq!(
        vs.variables()["classifier.weight"],
        before,
        "a failed strict load copies nothing"
    );

    let report = load_state_dict(&vs, &state, false).unwrap();
    assert_eq!(report.missing, vec!["convs.2.layer_norm.bias".to_string()]);
    assert_eq!(report.unexpected, vec!["convs.3.conv1.weight".to_string()]);
    assert_eq!(report.shape_mismatches.len(), 1);
}

#[test]
fn num_batches_tracked_is_handled_as_pytorch_does() {
    let build = |json: &str| {
        let vs = VarStore::new(Device::Cpu);
        ModelConfig::from_json(json)
            .unwrap()
            .build(vs.root())
            .unwrap();
        vs
    };
    let bn = build(r#"{"arch": "resnet18", "num_classes": 10}"#);
    let frozen = build(r#"{"arch": "resnet18", "num_classes": 10, "norm": "frozen_batch_norm"}"#);
    let mut state = StateDict {
        entries: bn
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.copy()))
            .collect(),
    };
    // FrozenBatchNorm2d drops the counters of a BatchNorm checkpoint.
    load_state_dict(&frozen, &state, true).unwrap();
    // A checkpoint without counters (PyTorch < 0.4.1) loads into BatchNorm and keeps its own.
    state
        .entries
        .retain(|(k, _)| !k.ends_with("num_batches_tracked"));
    let report = load_state_dict(&bn, &state, true).unwrap();
    assert!(report.is_clean());
    // Any other unexpected key still fails.
    state.entries.push((
        "fc.num_batches_tracked".into(),
        Tensor::zeros([], (tch::Kind::Int64, Device::Cpu)),
    ));
    let msg = format!("{:#}", load_state_dict(&bn, &state, true).unwrap_err());
    assert!(
        msg.contains("unexpected keys (1): fc.num_batches_tracked"),
        "{msg}"
    );
}
