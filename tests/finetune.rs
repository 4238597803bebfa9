//! Fine-tuning (`train --init-weights`): which tensors of torchvision, timm and Hugging Face
//! checkpoints (nested, whole-model) are loaded and which start fresh, the errors for checkpoints
//! that do not fit, a frozen backbone that stays bit-identical, per-group rates against torch's
//! param groups, exact resume, and the result loading back into PyTorch (`strict=True`) and into
//! `residual infer` with its class names.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use residual::checkpoint::{ReadOptions, StateDict};
use residual::data::Dataset;
use residual::train::{
    finetune_config, init_from, is_head, latest_weights, read_init_weights, FineTune, InitReport,
    Optimizer, OptimizerKind, RunData, TrainOptions, Trainer, INIT_REPORT_FILE,
};
use residual::ModelConfig;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    residual::parity::default_artifacts_dir().join(name)
}

fn checkpoint(name: &str) -> PathBuf {
    fixture("checkpoints").join(name)
}

/// python_ref/checkpoints.py's depth-8 CIFAR net (3 input channels).
fn cifar8(num_classes: i64) -> ModelConfig {
    ModelConfig::from_json(&format!(
        r#"{{"arch": "cifar_resnet", "depth": 8, "in_channels": 3, "num_classes": {num_classes}}}"#
    ))
    .unwrap()
}

/// Builds `config` and starts it from `weights`.
fn init(config: &ModelConfig, weights: &Path) -> anyhow::Result<(VarStore, InitReport)> {
    let vs = VarStore::new(Device::Cpu);
    let _model = config.build(vs.root())?;
    let (state, layout) = read_init_weights(weights)?;
    let report = init_from(&vs, &state, weights, &layout, false)?;
    Ok((vs, report))
}

/// Every loaded tensor equals the reference's, and the report covers every model tensor once.
fn assert_loaded(vs: &VarStore, report: &InitReport, expected: &StateDict) {
    let vars = vs.variables();
    assert_eq!(
        report.loaded.len() + report.initialised.len(),
        vars.len(),
        "{report:?}"
    );
    for name in &report.loaded {
        let want = expected.get(name).unwrap_or_else(|| panic!("{name}"));
        assert!(vars[name].equal(want), "{name} was not loaded");
    }
}

fn head() -> Vec<String> {
    vec!["fc.bias".to_string(), "fc.weight".into()]
}

#[test]
fn init_weights_load_torchvision_timm_and_hugging_face_checkpoints() {
    // torchvision's train.py checkpoint (weights under `model`), a new 4-class head.
    let tv = StateDict::read(
        &checkpoint("tv_train.expected.pth"),
        &ReadOptions::default(),
    )
    .unwrap();
    let (vs, report) = init(&cifar8(4), &checkpoint("tv_train.pth")).unwrap();
    println!("{report}");
    assert_eq!(report.initialised, head());
    assert!(report.layout.contains("`model`"), "{}", report.layout);
    assert_eq!(report.loaded.len(), tv.len() - 2);
    assert_loaded(&vs, &report, &tv);
    assert_eq!(
        report.unused,
        ["fc.weight [10, 64]".to_string(), "fc.bias [10]".into()]
    );

    // timm's train.py checkpoint (`state_dict`), same number of classes: the head is loaded too.
    let timm = StateDict::read(
        &checkpoint("timm_train.expected.pth"),
        &ReadOptions::default(),
    )
    .unwrap();
    let (vs, report) = init(&cifar8(10), &checkpoint("timm_train.pth.tar")).unwrap();
    assert!(report.initialised.is_empty(), "{report:?}");
    assert_eq!(report.loaded.len(), timm.len());
    assert_loaded(&vs, &report, &timm);
    // --fresh-head: the same checkpoint for a new 10-class task, the head left as initialised.
    let vs = VarStore::new(Device::Cpu);
    let _model = cifar8(10).build(vs.root()).unwrap();
    let fresh = vs.variables()["fc.weight"].copy();
    let (state, layout) = read_init_weights(&checkpoint("timm_train.pth.tar")).unwrap();
    let report = init_from(&vs, &state, Path::new("timm"), &layout, true).unwrap();
    assert_eq!(report.initialised, head());
    assert_eq!(report.loaded.len(), timm.len() - 2);
    assert_eq!(vs.variables()["fc.weight"], fresh);
    assert!(vs.variables()["fc.weight"] != *timm.get("fc.weight").unwrap());

    // A Hugging Face model folder, and its safetensors file alone (keys renamed).
    let hf = fixture("hf_basic/hf");
    let folder = residual::models::huggingface::read_folder(&hf).unwrap();
    let config = finetune_config(&folder.config, Some(5), false).unwrap();
    for weights in [hf.clone(), hf.join("model.safetensors")] {
        let (vs, report) = init(&config, &weights).unwrap();
        assert_eq!(report.initialised, head(), "{weights:?}");
        assert!(report.layout.contains("Hugging Face"), "{}", report.layout);
        assert_loaded(&vs, &report, &folder.state);
    }

    // `torch.save(model)` of a torchvision resnet18, into a 2-class resnet18 with FrozenBatchNorm2d
    // (the checkpoint's num_batches_tracked counters are not used).
    let tv18 = StateDict::read(
        &checkpoint("resnet18_module.expected.pth"),
        &ReadOptions::default(),
    )
    .unwrap();
    let config = ModelConfig::from_json(r#"{"arch": "resnet18"}"#).unwrap();
    let config = finetune_config(&config, Some(2), true).unwrap();
    let (vs, report) = init(&config, &checkpoint("resnet18_module.pth")).unwrap();
    assert_eq!(report.initialised, head());
    assert_loaded(&vs, &report, &tv18);
    assert_eq!(report.unused.len(), 2 + 20, "fc and 20 BatchNorm counters");
}

#[test]
fn checkpoints_that_do_not_fit_outside_the_head_are_refused_by_name() {
    // A backbone tensor of another shape: one input channel instead of three.
    let config =
        ModelConfig::from_json(r#"{"arch": "cifar_resnet", "depth": 8, "in_channels": 1}"#)
            .unwrap();
    let err = format!(
        "{:#}",
        init(&config, &checkpoint("tv_train.pth")).unwrap_err()
    );
    assert!(
        err.contains("conv1.weight: checkpoint [16, 3, 3, 3], model [16, 1, 3, 3]")
            && err.contains("1 tensor(s)"),
        "{err}"
    );
    // Another architecture: a CIFAR net's checkpoint for a resnet18.
    let config = ModelConfig::from_json(r#"{"arch": "resnet18", "num_classes": 3}"#).unwrap();
    let err = format!(
        "{:#}",
        init(&config, &checkpoint("tv_train.pth")).unwrap_err()
    );
    assert!(
        err.contains("layer4.1.conv2.weight: in the model, not in the checkpoint")
            && err.contains(
                "layer3.0.conv1.weight: checkpoint [64, 32, 3, 3], model [256, 128, 3, 3]"
            ),
        "{err}"
    );
    // --freeze-bn needs BatchNorm to freeze; --lr-backbone and --freeze-backbone exclude each other.
    let err = finetune_config(&cifar8(3), None, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--freeze-bn"), "{err}");
    let ft = FineTune {
        freeze_backbone: true,
        lr_backbone: Some(0.01),
        ..Default::default()
    };
    assert!(ft.validate().is_err());
}

/// 48 random 3x16x16 images of 4 classes (the test set: 16 more).
fn toy_data(options: &TrainOptions) -> RunData {
    tch::manual_seed(5);
    let set = |n: i64| {
        Dataset::new(
            Tensor::randint(256, [n, 3, 16, 16], (Kind::Uint8, Device::Cpu)),
            Tensor::randint(4, [n], (Kind::Int64, Device::Cpu)),
            4,
        )
        .unwrap()
    };
    RunData::prepare(set(48), set(16), options, Device::Cpu).unwrap()
}

fn finetune_options(epochs: u64, finetune: FineTune) -> TrainOptions {
    TrainOptions {
        epochs,
        batch_size: 16,
        lr: 0.05,
        seed: 3,
        finetune: Some(FineTune {
            init_weights: Some(checkpoint("tv_train.pth")),
            ..finetune
        }),
        ..Default::default()
    }
}

fn run(dir: &Path, options: TrainOptions, epochs: Option<u64>) -> StateDict {
    let data = toy_data(&options);
    let mut trainer = if dir.exists() {
        Trainer::resume(dir, Device::Cpu, epochs).unwrap()
    } else {
        Trainer::create(dir, cifar8(4), options, Device::Cpu).unwrap()
    };
    trainer.quiet = true;
    trainer.run(&data).unwrap();
    StateDict::read(&latest_weights(dir).unwrap(), &ReadOptions::default()).unwrap()
}

#[test]
fn a_frozen_backbone_stays_bit_identical_and_runs_resume_exactly() {
    let dir = common::temp_dir("finetune-frozen");
    let tv = StateDict::read(
        &checkpoint("tv_train.expected.pth"),
        &ReadOptions::default(),
    )
    .unwrap();
    let frozen = FineTune {
        freeze_backbone: true,
        ..Default::default()
    };
    let trained = run(&dir.join("frozen"), finetune_options(2, frozen), None);
    let report: InitReport = serde_json::from_str(
        &std::fs::read_to_string(dir.join("frozen").join(INIT_REPORT_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(report.initialised, head());
    let stats = |k: &str| k.ends_with("running_mean") || k.ends_with("running_var");
    for (name, t) in &trained.entries {
        if is_head(name) {
            continue;
        }
        let before = tv.get(name).unwrap();
        if stats(name) || name.ends_with("num_batches_tracked") {
            // BatchNorm in training mode still updates its statistics (as in PyTorch).
            assert!(!t.equal(before), "{name}");
        } else {
            assert!(t.equal(before), "{name} moved");
        }
    }

    // The backbone at a tenth of the rate, with AdamW: 2 epochs straight = 1 + 1 resumed.
    let grouped = FineTune {
        lr_backbone: Some(0.005),
        ..Default::default()
    };
    let options = TrainOptions {
        optimizer: OptimizerKind::adamw(),
        ..finetune_options(2, grouped)
    };
    let straight = run(&dir.join("straight"), options.clone(), None);
    let first = TrainOptions {
        epochs: 1,
        ..options
    };
    run(&dir.join("resumed"), first, None);
    let resumed = run(&dir.join("resumed"), TrainOptions::default(), Some(2));
    for (name, t) in &straight.entries {
        assert!(resumed.get(name).unwrap().equal(t), "{name} differs");
        if !stats(name) && !name.ends_with("num_batches_tracked") && !is_head(name) {
            assert!(!t.equal(tv.get(name).unwrap()), "{name} did not train");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `k` steps of SGD (momentum, weight decay) and AdamW on two parameters, `body.weight` at rate
/// 0.01 and the head `fc.weight` at 0.1, against torch's param groups.
#[test]
fn per_group_rates_match_torch_param_groups() {
    let dir = common::temp_dir("finetune-groups");
    let steps = 4;
    for (optimizer, name) in [
        (OptimizerKind::Sgd, "sgd"),
        (OptimizerKind::adamw(), "adamw"),
    ] {
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        let body = vs.root().sub("body").randn_standard("weight", &[3, 4]);
        let fc = vs.root().sub("fc").randn_standard("weight", &[2, 3]);
        let x = Tensor::randn([5, 4], (Kind::Float, Device::Cpu));
        let start = StateDict {
            entries: vec![
                ("body.weight".into(), body.detach().copy()),
                ("fc.weight".into(), fc.detach().copy()),
                ("x".into(), x.copy()),
            ],
        };
        start
            .save_safetensors(&dir.join("start.safetensors"))
            .unwrap();
        let options = TrainOptions {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.05,
            optimizer,
            finetune: Some(FineTune {
                lr_backbone: Some(0.01),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut opt = Optimizer::new(&vs, &options);
        for _ in 0..steps {
            opt.zero_grad();
            let loss = x
                .matmul(&body.tr())
                .relu()
                .matmul(&fc.tr())
                .pow_tensor_scalar(2)
                .mean(Kind::Float);
            loss.backward();
            opt.step(0.1);
        }
        let script = r#"
import sys, torch
from safetensors.torch import load_file, save_file
s = load_file(sys.argv[1])
body, fc, x = (torch.nn.Parameter(s[k]) for k in ("body.weight", "fc.weight", "x"))
x = x.detach()
groups = [{"params": [body], "lr": 0.01}, {"params": [fc], "lr": 0.1}]
if sys.argv[3] == "sgd":
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.05)
else:
    opt = torch.optim.AdamW(groups, lr=0.1, weight_decay=0.05)
for _ in range(int(sys.argv[4])):
    opt.zero_grad()
    (x @ body.T).relu().matmul(fc.T).pow(2).mean().backward()
    opt.step()
save_file({"body.weight": body.detach(), "fc.weight": fc.detach()}, sys.argv[2])
"#;
        let out_path = dir.join(format!("{name}.safetensors"));
        let python = std::env::var("RESIDUAL_PYTHON")
            .expect("RESIDUAL_PYTHON comes from .cargo/config.toml");
        let out = Command::new(python)
            .args(["-c", script])
            .arg(dir.join("start.safetensors"))
            .arg(&out_path)
            .args([name, &steps.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let torch = StateDict::read_safetensors(&out_path).unwrap();
        for (key, ours) in [("body.weight", &body), ("fc.weight", &fc)] {
            let theirs = torch.get(key).unwrap();
            let diff = (ours - theirs).abs().max().double_value(&[]);
            let moved = (ours - start.get(key).unwrap())
                .abs()
                .max()
                .double_value(&[]);
            println!("{name} {key}: max |delta| vs torch {diff:.3e} after {steps} steps (moved {moved:.3e})");
            assert!(
                diff < 1e-6 && moved > 1e-3,
                "{name} {key}: {diff} (moved {moved})"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn residual_bin(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_residual"));
    cmd.args(args);
    cmd
}

/// Two classes of 16x16 PNGs (a light and a dark square), 6 per class in train/, 2 in val/.
fn write_folder(dir: &Path) {
    for (split, n) in [("train", 6), ("val", 2)] {
        for (class, base) in [("dark", 40u8), ("light", 200u8)] {
            let d = dir.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(16, 16, |x, y| {
                    let v = base.wrapping_add(((x * 7 + y * 3 + i * 11) % 30) as u8);
                    image::Rgb([v, v / 2, 255 - v])
                });
                img.save(d.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

#[test]
fn a_finetuned_resnet18_loads_into_pytorch_strictly_and_infer_names_its_classes() {
    let dir = common::temp_dir("finetune-cli");
    let data = dir.join("data");
    write_folder(&data);
    let config = dir.join("resnet18.json");
    std::fs::write(&config, r#"{"arch": "resnet18"}"#).unwrap();
    let run = dir.join("run");
    // A torchvision resnet18 as its train.py saves it (weights under `model`).
    let weights = dir.join("resnet18.pth");
    let python =
        std::env::var("RESIDUAL_PYTHON").expect("RESIDUAL_PYTHON comes from .cargo/config.toml");
    let save = "import sys, torch, torchvision; torch.manual_seed(0); \
                torch.save({'model': torchvision.models.resnet18().state_dict(), 'epoch': 90}, sys.argv[1])";
    let py = Command::new(&python)
        .args(["-c", save])
        .arg(&weights)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let out = residual_bin(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--init-weights",
        weights.to_str().unwrap(),
        "--num-classes",
        "2",
        "--freeze-backbone",
        "--freeze-bn",
        "--data",
        data.to_str().unwrap(),
        "--image-size",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--device",
        "cpu",
        "--quiet",
        "--workers",
        "1",
        "--out",
        run.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("loaded 100 tensors, initialised fresh 2: fc.bias, fc.weight"),
        "{stderr}"
    );
    let trained = latest_weights(&run).unwrap();

    // PyTorch: torchvision's resnet18 with a 2-class head, strict=True.
    let script = r#"
import sys, torch, torchvision
m = torchvision.models.resnet18(num_classes=2)
sd = torch.load(sys.argv[1], weights_only=True)
print(m.load_state_dict(sd, strict=True))
ref = torch.load(sys.argv[2], weights_only=True)["model"]
print(all(torch.equal(sd[k], ref[k]) for k in sd if not k.startswith("fc.")))
"#;
    let py = Command::new(python)
        .args(["-c", script])
        .arg(&trained)
        .arg(&weights)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&py.stdout);
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(stdout.trim(), "<All keys matched successfully>\nTrue");

    // residual infer names the classes of the folder.
    let image = data.join("val/light/0.png");
    let out = residual_bin(&[
        "infer",
        "--config",
        run.join("model.json").to_str().unwrap(),
        "--weights",
        trained.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--device",
        "cpu",
    ])
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("light") && stdout.contains("dark"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
