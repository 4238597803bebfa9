//! timm's and Hugging Face's ResNets against timm 1.0 and transformers 5 (python_ref/
//! timm_hf_cases.py): forward, gradients and train-mode BatchNorm of representative nets, the key
//! names and shapes of every timm constructor, and Hugging Face folders as `save_pretrained`
//! writes them.

mod common;

use std::collections::BTreeMap;

use residual::checkpoint::{load_state_dict, ReadOptions, StateDict};
use residual::models::huggingface;
use residual::models::timm::TIMM;
use residual::models::Inputs;
use residual::parity::{self, max_abs_diff, KeyLayout};
use residual::ModelConfig;
use tch::nn::VarStore;
use tch::{Device, Tensor};

/// Fails with the reason when python_ref could not import timm or transformers (the manifest's
/// `missing`), instead of a bare "no cases".
fn require_timm_and_transformers() {
    let path = parity::default_artifacts_dir().join("manifest.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return; // common::manifest() names the missing references
    };
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    if let Some(why) = json["missing"]["timm_hf_cases"].as_str() {
        panic!(
            "{} has no timm / transformers cases ({why}): install python_ref/requirements.txt \
             and re-run `make artifacts`",
            path.display()
        );
    }
}

#[test]
fn timm_resnets_match_on_cpu() {
    require_timm_and_transformers();
    let outcomes = common::check_module("timm.ResNet", Device::Cpu);
    for case in [
        "timm_resnet50d",
        "timm_resnet50s",
        "timm_resnet26t",
        "timm_resnet10t_train",
        "timm_seresnext50_32x4d",
        "timm_seresnet18_train",
        "timm_resnet14t_output_stride_8",
        "timm_resnet50_as_torchvision",
        "timm_tiny_se_tiered_train",
        "timm_tiny_basic_deep_se",
    ] {
        assert!(outcomes.iter().any(|o| o.case == case), "{case} missing");
    }
    assert!(outcomes.iter().any(|o| o.after_step.is_some()));
    assert!(outcomes.iter().any(|o| o.forward_torchscript.is_some()));
}

#[test]
fn hugging_face_resnets_match_on_cpu() {
    require_timm_and_transformers();
    let outcomes = common::check_module("transformers.ResNet", Device::Cpu);
    assert_eq!(outcomes.len(), 4, "Hugging Face cases missing");
    assert!(outcomes.iter().all(|o| o.forward_torchscript.is_some()));
}

#[test]
fn timm_and_hugging_face_resnets_match_cpu_references_on_cuda() {
    if let Some(device) = common::cuda_or_skip() {
        require_timm_and_transformers();
        for module in ["timm.ResNet", "transformers.ResNet"] {
            common::check_module(module, device);
        }
    }
}

/// Every constructor of `TIMM` builds exactly timm's state_dict: the same keys with the same
/// shapes (timm's built on the meta device by python_ref, 1000 classes).
#[test]
fn every_timm_constructor_has_timms_keys_and_shapes() {
    require_timm_and_transformers();
    let path = parity::default_artifacts_dir().join("timm_keys.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}: re-run `make artifacts`", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let models = json["models"].as_object().unwrap();
    for c in TIMM {
        let expected: BTreeMap<String, Vec<i64>> = models
            .get(c.name)
            .unwrap_or_else(|| panic!("{} missing from timm_keys.json", c.name))
            .as_array()
            .unwrap()
            .iter()
            .map(|e| serde_json::from_value(e.clone()).unwrap())
            .collect();
        let config = ModelConfig::timm(c.name, Default::default()).unwrap();
        let vs = VarStore::new(Device::Cpu);
        config.build(vs.root()).unwrap();
        let actual: BTreeMap<String, Vec<i64>> = vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.size()))
            .collect();
        assert_eq!(actual, expected, "{}", c.name);
    }
}

/// The weights of a case's folder equal its state_dict (PyTorch's values under their mapped
/// names).
fn assert_same_state(actual: &StateDict, expected: &StateDict, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}");
    for (key, value) in &expected.entries {
        let got = actual
            .get(key)
            .unwrap_or_else(|| panic!("{what}: {key} missing"));
        assert_eq!(got.kind(), value.kind(), "{what}: {key}");
        assert_eq!(max_abs_diff(got, value).unwrap(), 0.0, "{what}: {key}");
    }
}

/// Each case's `save_pretrained` folder (and the pytorch_model.bin copy) reads into the case's
/// config, its weights and labels, and runs to transformers' outputs.
#[test]
fn hugging_face_folders_read_into_their_config_weights_and_labels() {
    require_timm_and_transformers();
    let manifest = common::manifest();
    let cases: Vec<_> = manifest
        .cases
        .iter()
        .filter(|c| c.module == "transformers.ResNet")
        .collect();
    assert!(
        !cases.is_empty(),
        "no Hugging Face cases: re-run `make artifacts`"
    );
    let mut bin_folders = 0;
    for case in cases {
        assert_eq!(case.layout, KeyLayout::Huggingface);
        let dir = manifest.case_dir(case);
        let mut expected =
            StateDict::read_safetensors(&dir.join("state_dict.safetensors")).unwrap();
        for (key, _) in expected.entries.iter_mut() {
            *key = case.layout.rust_key(key).unwrap();
        }
        let config = ModelConfig::from_value(case.config.clone()).unwrap();
        for folder in ["hf", "hf_bin"] {
            let path = dir.join(folder);
            if !path.exists() {
                continue;
            }
            bin_folders += usize::from(folder == "hf_bin");
            assert!(huggingface::is_folder(&path));
            let what = format!("{}/{folder}", case.name);
            let read = huggingface::read_folder(&path).unwrap();
            assert_eq!(read.config, config, "{what}");
            assert_same_state(&read.state, &expected, &what);
            let head = config.resnet().unwrap().include_fc;
            let labels = head.then(|| vec!["tench", "goldfish", "great white shark"]);
            assert_eq!(
                read.labels,
                labels.map(|l| l.into_iter().map(String::from).collect())
            );

            if !case.train() {
                let vs = VarStore::new(Device::Cpu);
                let model = read.config.build(vs.root()).unwrap();
                let report = load_state_dict(&vs, &read.state, false).unwrap();
                assert!(report.is_clean(), "{what}: {report}");
                let inputs = StateDict::read_safetensors(&dir.join("inputs.safetensors")).unwrap();
                let outputs =
                    StateDict::read_safetensors(&dir.join("outputs.safetensors")).unwrap();
                let mut named = Inputs::new();
                named.insert("input".into(), inputs.get("input").unwrap().shallow_clone());
                let out = tch::no_grad(|| model.forward_named(&named, false)).unwrap();
                let diff = max_abs_diff(&out, outputs.get("output").unwrap()).unwrap();
                assert!(diff <= 1e-6, "{what}: max |Δ| {diff}");
            }
        }
    }
    assert_eq!(bin_folders, 1, "the pytorch_model.bin folder is missing");
}

/// A folder without weights, or with a key no Hugging Face ResNet has, is refused by name.
#[test]
fn broken_hugging_face_folders_are_named() {
    require_timm_and_transformers();
    let manifest = common::manifest();
    let case = manifest.case("hf_basic").unwrap();
    let dir = std::env::temp_dir().join(format!("residual-hf-broken-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        manifest.case_dir(case).join("hf/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let msg = format!("{:#}", huggingface::read_folder(&dir).unwrap_err());
    assert!(
        msg.contains("no model.safetensors or pytorch_model.bin"),
        "{msg}"
    );

    let t = Tensor::zeros([2], (tch::Kind::Float, Device::Cpu));
    Tensor::write_safetensors(
        &[(
            "resnet.encoder.stages.0.layers.0.layer.0.attention.weight",
            &t,
        )],
        dir.join("model.safetensors"),
    )
    .unwrap();
    let msg = format!("{:#}", huggingface::read_folder(&dir).unwrap_err());
    assert!(
        msg.contains("`resnet.encoder.stages.0.layers.0.layer.0.attention.weight` is not a key"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// timm's train-script checkpoint (CheckpointSaver: `state_dict`, `state_dict_ema`, `optimizer`,
/// `args` as an argparse.Namespace, `saver`) holds the case's weights, found without `--key`, and
/// under `state_dict_ema` the EMA copy (python_ref halves its floating-point entries).
#[test]
fn timm_checkpoint_saver_files_hold_the_case_weights() {
    require_timm_and_transformers();
    let manifest = common::manifest();
    let case = manifest.case("timm_tiny_se_tiered_train").unwrap();
    let dir = manifest.case_dir(case);
    let expected = StateDict::read_safetensors(&dir.join("state_dict.safetensors")).unwrap();
    let halved = StateDict {
        entries: expected
            .entries
            .iter()
            .map(|(k, t)| {
                let t = if t.is_floating_point() {
                    t * 0.5
                } else {
                    t.copy()
                };
                (k.clone(), t)
            })
            .collect(),
    };
    for file in ["last.pth.tar", "checkpoint-2.pth.tar"] {
        for (key, weights) in [
            (None, &expected),
            (Some("state_dict"), &expected),
            (Some("state_dict_ema"), &halved),
        ] {
            let options = ReadOptions {
                key: key.map(String::from),
                ..Default::default()
            };
            let read = StateDict::read(&dir.join(file), &options).unwrap();
            assert_same_state(&read, weights, &format!("{file} {key:?}"));
        }
    }
}

/// `residual inspect` on a Hugging Face folder and on timm's train-script checkpoint: where the
/// weights are, and the config that loads them (for a v1 bottleneck, the folder's config.json
/// says what the weights cannot: the stride on the 1x1).
#[test]
fn inspect_names_hugging_face_folders_and_timm_checkpoints() {
    require_timm_and_transformers();
    let manifest = common::manifest();
    let dir = parity::default_artifacts_dir();
    let inspect = |path: &std::path::Path| {
        let out = std::process::Command::new(common::residual_bin())
            .args(["inspect", "--json"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    for name in [
        "hf_bottleneck_v1_train",
        "hf_basic",
        "hf_model_bottleneck_no_head",
    ] {
        let case = manifest.case(name).unwrap();
        let summary = inspect(&dir.join(name).join("hf"));
        let layout = summary["layout"].as_str().unwrap();
        assert!(
            layout.starts_with("Hugging Face model folder: config.json + model.safetensors"),
            "{name}: {layout}"
        );
        let found = ModelConfig::from_value(summary["config"].clone()).unwrap();
        assert_eq!(
            found,
            ModelConfig::from_value(case.config.clone()).unwrap(),
            "{name}"
        );
    }
    // With a preprocessor_config.json beside the weights, inspect shows what `infer` applies.
    let folder = common::temp_dir("hf-inspect");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join("hf_basic/hf").join(file), folder.join(file)).unwrap();
    }
    let processor = dir.join("preprocess/hf_convnext_defaults/preprocessor_config.json");
    std::fs::copy(&processor, folder.join("preprocessor_config.json")).unwrap();
    let summary = inspect(&folder);
    let expected =
        residual::preprocess::Preprocess::from_hf_preprocessor_config(&processor).unwrap();
    assert_eq!(
        summary["preprocess"],
        serde_json::to_value(expected).unwrap()
    );

    let case = manifest.case("timm_tiny_se_tiered_train").unwrap();
    let summary = inspect(&dir.join(&case.name).join("last.pth.tar"));
    let layout = summary["layout"].as_str().unwrap();
    assert!(
        layout.contains("weights under `state_dict`")
            && layout.contains("args (argparse.Namespace)"),
        "{layout}"
    );
    let found = ModelConfig::from_value(summary["config"].clone()).unwrap();
    assert_eq!(found, ModelConfig::from_value(case.config.clone()).unwrap());
}

/// `residual infer --weights FOLDER` needs no `--config`: the folder's config.json builds the
/// model, its logits are transformers', and `--image` names the classes from `id2label`.
#[test]
fn infer_runs_a_hugging_face_folder_without_a_config() {
    require_timm_and_transformers();
    let dir = parity::default_artifacts_dir().join("hf_basic");
    let output = common::temp_dir("hf-infer").join("out.safetensors");
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(common::residual_bin())
            .arg("infer")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&[
        "--weights".as_ref(),
        dir.join("hf").as_os_str(),
        "--input".as_ref(),
        dir.join("inputs.safetensors").as_os_str(),
        "--output".as_ref(),
        output.as_os_str(),
        // The model as built: the folded default is held to 1e-4 by tests/inference.rs.
        "--plain".as_ref(),
    ]);
    let ours = StateDict::read_safetensors(&output).unwrap();
    let theirs = StateDict::read_safetensors(&dir.join("outputs.safetensors")).unwrap();
    let diff = max_abs_diff(ours.get("output").unwrap(), theirs.get("output").unwrap()).unwrap();
    assert!(diff <= 1e-6, "max |Δ| {diff}");

    let image = parity::default_artifacts_dir().join("checkpoints/image.png");
    let stdout = run(&[
        "--weights".as_ref(),
        dir.join("hf").as_os_str(),
        "--image".as_ref(),
        image.as_os_str(),
        "--topk".as_ref(),
        "3".as_ref(),
        "--json".as_ref(),
    ]);
    for label in ["tench", "goldfish", "great white shark"] {
        assert!(stdout.contains(label), "{stdout}");
    }

    let refused = std::process::Command::new(common::residual_bin())
        .args(["infer", "--weights"])
        .arg(dir.join("state_dict.safetensors"))
        .arg("--input")
        .arg(dir.join("inputs.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("give --config"),
        "{stderr}"
    );
}
