//! The parity harness and strict loading can fail: a corrupted reference, a missing key, a wrong
//! shape are each detected and named.

mod common;

use std::path::Path;

use residual::checkpoint::{load_state_dict, StateDict};
use residual::parity::{self, Manifest, TorchScript};
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

/// Rewrites `file` of the copied case `case` with `f` applied to the tensor named `key`.
fn perturb(dir: &Path, case: &str, file: &str, key: &str, f: impl Fn(&Tensor) -> Tensor) {
    let path = dir.join(case).join(file);
    let entries = StateDict::read_safetensors(&path).unwrap().entries;
    assert!(
        entries.iter().any(|(k, _)| k == key),
        "{key} not in {}",
        path.display()
    );
    let changed: Vec<(String, Tensor)> = entries
        .into_iter()
        .map(|(k, t)| if k == key { (k, f(&t)) } else { (k, t) })
        .collect();
    Tensor::write_safetensors(&changed, &path).unwrap();
}

/// `t` with its first element replaced by `value`.
fn with_first(t: &Tensor, value: f64) -> Tensor {
    let out = t.copy();
    let _ = out.view([-1]).get(0).fill_(value);
    out
}

#[test]
fn a_perturbed_output_reference_fails_the_case() {
    let dir = temp_dir("perturbed-output");
    let manifest = copy_case(&common::manifest(), CASE, &dir);
    let clean = parity::run_case(&manifest, manifest.case(CASE).unwrap(), Device::Cpu).unwrap();
    assert!(clean.pass(), "{:?}", clean.problems());
    assert_eq!(clean.forward().abs, 0.0);
    // A case with a module.pt passes only with its TorchScript forward compared.
    let mut unscripted = clean;
    unscripted.forward_torchscript = None;
    assert_eq!(unscripted.problems(), ["TorchScript forward not compared"]);

    let reference = StateDict::read_safetensors(&dir.join(CASE).join("outputs.safetensors"))
        .unwrap()
        .entries
        .into_iter()
        .find(|(k, _)| k == "output")
        .unwrap()
        .1;
    let scale = reference.abs().max().double_value(&[]);
    perturb(&dir, CASE, "outputs.safetensors", "output", |t| t + 1e-4);
    let bad = parity::run_case(&manifest, manifest.case(CASE).unwrap(), Device::Cpu).unwrap();
    assert!(!bad.pass());
    let diff = &bad.forward_eager["output"];
    assert!((diff.abs - 1e-4).abs() < 1e-6, "measured {diff:?}");
    // Relative to the reference's largest magnitude (the reference now includes the shift).
    let expected_rel = diff.abs / (scale + 1e-4);
    assert!(
        (diff.rel - expected_rel).abs() < 1e-3 * expected_rel,
        "measured {diff:?}, expected relative {expected_rel:e}"
    );
    assert_eq!(bad.forward().worst, "output");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_perturbed_gradient_reference_fails_the_case() {
    let dir = temp_dir("perturbed-grad");
    let manifest = copy_case(&common::manifest(), CASE, &dir);
    perturb(
        &dir,
        CASE,
        "grads.safetensors",
        "param.convs.1.conv2.bias",
        |t| t * 1.01 + 1e-3,
    );
    let bad = parity::run_case(&manifest, manifest.case(CASE).unwrap(), Device::Cpu).unwrap();
    assert!(!bad.pass());
    assert!(
        bad.grad_params.abs >= 1e-3,
        "measured {:?}",
        bad.grad_params
    );
    assert_eq!(bad.grad_params.worst, "grad param.convs.1.conv2.bias");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The smallest case that ends in SGD steps.
const STEP_CASE: &str = "cifar_resnet20_a";

#[test]
fn nan_and_infinity_fail_every_kind_of_comparison_and_are_named() {
    // (case, file, key, the name the outcome must report)
    let targets = [
        (CASE, "outputs.safetensors", "output", "output (reference)"),
        (
            CASE,
            "grads.safetensors",
            "input.input",
            "grad input.input (reference)",
        ),
        (
            CASE,
            "grads.safetensors",
            "param.convs.1.conv2.bias",
            "grad param.convs.1.conv2.bias (reference)",
        ),
        (
            STEP_CASE,
            "after_step.safetensors",
            "fc.weight",
            "after step fc.weight (reference)",
        ),
        // Loaded into the Rust model: its parameter no longer matches TorchScript's, and every
        // output it reaches is non-finite on the Rust side.
        (
            CASE,
            "state_dict.safetensors",
            "classifier.weight",
            "parameter classifier.weight (Rust)",
        ),
        (CASE, "inputs.safetensors", "input", "output (Rust)"),
    ];
    let source = common::manifest();
    for (case, file, key, name) in targets {
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let dir = temp_dir(&format!("nonfinite-{}", file.replace('.', "-")));
            let manifest = copy_case(&source, case, &dir);
            perturb(&dir, case, file, key, |t| with_first(t, value));
            let o = parity::run_case(&manifest, manifest.case(case).unwrap(), Device::Cpu)
                .unwrap_or_else(|e| panic!("{case} {file} {key} = {value}: {e:#}"));
            assert!(!o.pass(), "{case}: {key} = {value} in {file} passed");
            assert!(
                o.non_finite.iter().any(|n| n == name),
                "{case}: {key} = {value} in {file}: {:?}",
                o.non_finite
            );
            let problems = o.problems().join("; ");
            assert!(problems.contains(name), "{problems}");
            let row = o.row();
            assert!(!row.pass);
            assert!(row.non_finite.iter().any(|n| n == name));
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

#[test]
fn diffs_are_relative_to_the_reference_and_nan_is_never_dropped() {
    let reference = Tensor::from_slice(&[1000.0f32, -2000.0, 10.0]);
    let actual = Tensor::from_slice(&[1000.0f32, -2000.5, 10.0]);
    let d = parity::tensor_diff("t", &actual, &reference).unwrap();
    assert_eq!(d.abs, 0.5);
    assert_eq!(d.rel, 0.5 / 2000.0);
    // An all-zero reference: the absolute difference is the measure.
    let zeros = Tensor::zeros([3], tch::kind::FLOAT_CPU);
    let d = parity::tensor_diff("z", &(&zeros + 0.25), &zeros).unwrap();
    assert_eq!((d.abs, d.rel), (0.25, 0.25));

    let nan = parity::tensor_diff("n", &with_first(&actual, f64::NAN), &reference).unwrap();
    assert!(nan.abs.is_nan() && nan.rel.is_nan());
    let inf = parity::tensor_diff("i", &actual, &with_first(&reference, f64::INFINITY)).unwrap();
    assert!(inf.rel.is_nan() && !inf.within(1e300));
    // Whichever order they are merged in, the NaN survives and is named.
    for order in [[&d, &nan], [&nan, &d]] {
        let mut all = parity::Diff::default();
        for x in order {
            all.merge(x);
        }
        assert!(all.rel.is_nan() && all.abs.is_nan(), "{all:?}");
        assert_eq!(all.worst, "n");
        assert!(!all.within(f64::INFINITY));
    }
}

#[test]
fn an_unknown_manifest_value_names_its_case_field_and_value() {
    let source = common::manifest();
    let dir = temp_dir("unknown-value");
    copy_case(&source, CASE, &dir);
    for field in ["mode", "loss", "torchscript", "dtype"] {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["cases"][0][field] = "bogus".into();
        std::fs::write(&path, json.to_string()).unwrap();
        let err = format!("{:#}", Manifest::load(&dir).unwrap_err());
        assert!(
            err.contains(&format!("case `{CASE}`: unknown `{field}` value `bogus`")),
            "{err}"
        );
        std::fs::write(&path, text).unwrap();
    }
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

/// Rewrites the copied manifest's only case with `f`.
fn edit_case(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) -> Manifest {
    let path = dir.join("manifest.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut json["cases"][0]);
    std::fs::write(&path, json.to_string()).unwrap();
    Manifest::load(dir).unwrap()
}

/// The training-step comparison runs the trainer's optimizer and loss with the case's settings:
/// changing any one of them on the Rust side breaks the match.
#[test]
fn sgd_and_loss_settings_each_change_the_result() {
    let source = common::manifest();
    let case = source.case(STEP_CASE).unwrap();
    let sgd = case.sgd.expect("cifar_resnet20_a ends in SGD steps");
    assert!(sgd.steps >= 2 && sgd.momentum > 0.0 && !sgd.decay_norm_and_bias);
    assert!(case.label_smoothing.unwrap() > 0.0);

    let dir = temp_dir("sgd-settings");
    let manifest = copy_case(&source, STEP_CASE, &dir);
    let clean =
        parity::run_case(&manifest, manifest.case(STEP_CASE).unwrap(), Device::Cpu).unwrap();
    assert!(clean.pass(), "{:?}", clean.problems());
    assert_eq!(clean.after_step.as_ref().unwrap().abs, 0.0);
    // A case with SGD steps passes only with the state after them compared.
    let mut unstepped = clean;
    unstepped.after_step = None;
    assert_eq!(unstepped.problems(), ["SGD steps not compared"]);

    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 4] = [
        ("decay for norms and biases", |c| {
            c["sgd"]["decay_norm_and_bias"] = true.into()
        }),
        ("one step", |c| c["sgd"]["steps"] = 1.into()),
        ("no momentum", |c| c["sgd"]["momentum"] = 0.0.into()),
        ("no label smoothing", |c| c["label_smoothing"] = 0.0.into()),
    ];
    for (what, edit) in edits {
        copy_case(&source, STEP_CASE, &dir);
        let manifest = edit_case(&dir, edit);
        let o =
            parity::run_case(&manifest, manifest.case(STEP_CASE).unwrap(), Device::Cpu).unwrap();
        let step = o.after_step.as_ref().unwrap();
        assert!(!o.pass(), "{what}: still passes");
        assert!(
            step.rel > o.tolerance.step,
            "{what}: state after the steps differs by only {step:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A compact case (weights regenerated, gradients of weights by their first rows, no TorchScript).
const COMPACT_CASE: &str = "resnet18_shortcut_a";

#[test]
fn compact_cases_regenerate_their_weights_and_compare_gradient_rows() {
    let source = common::manifest();
    let case = source.case(COMPACT_CASE).unwrap();
    assert_eq!(case.torchscript, TorchScript::Absent);
    assert!(case.seeded_weights.contains_key("layer1.0.conv1.weight"));
    let key = "param_rows.layer1.0.conv1.weight";

    let dir = temp_dir("compact");
    let manifest = copy_case(&source, COMPACT_CASE, &dir);
    assert!(!dir.join(COMPACT_CASE).join("module.pt").exists());
    let clean =
        parity::run_case(&manifest, manifest.case(COMPACT_CASE).unwrap(), Device::Cpu).unwrap();
    assert!(clean.pass(), "{:?}", clean.problems());
    assert!(clean.forward_torchscript.is_none());

    perturb(&dir, COMPACT_CASE, "grads.safetensors", key, |t| t * 1.01);
    let bad =
        parity::run_case(&manifest, manifest.case(COMPACT_CASE).unwrap(), Device::Cpu).unwrap();
    assert!(!bad.pass());
    assert_eq!(bad.grad_params.worst, format!("grad {key}"));
    assert!(bad.grad_params.rel > 1e-3, "{:?}", bad.grad_params);

    copy_case(&source, COMPACT_CASE, &dir);
    perturb(&dir, COMPACT_CASE, "grads.safetensors", key, |t| {
        with_first(t, f64::NAN)
    });
    let bad =
        parity::run_case(&manifest, manifest.case(COMPACT_CASE).unwrap(), Device::Cpu).unwrap();
    assert!(!bad.pass());
    assert!(
        bad.non_finite.contains(&format!("grad {key} (reference)")),
        "{:?}",
        bad.non_finite
    );

    // A recipe the Rust side cannot reproduce is an error that names the weight.
    type Edit = fn(&mut serde_json::Value);
    let edits: [Edit; 2] = [
        |c| {
            let std = c["seeded_weights"]["layer1.0.conv1.weight"]["std"]
                .as_f64()
                .unwrap();
            c["seeded_weights"]["layer1.0.conv1.weight"]["std"] = (std * 1.001).into();
        },
        |c| {
            let seed = c["seeded_weights"]["layer1.0.conv1.weight"]["seed"]
                .as_i64()
                .unwrap();
            c["seeded_weights"]["layer1.0.conv1.weight"]["seed"] = (seed + 1).into();
        },
    ];
    for edit in edits {
        copy_case(&source, COMPACT_CASE, &dir);
        let manifest = edit_case(&dir, edit);
        let err = parity::run_case(&manifest, manifest.case(COMPACT_CASE).unwrap(), Device::Cpu)
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("regenerated weight `layer1.0.conv1.weight`"),
            "{err:#}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
