//! The optimisers against PyTorch, after five steps with a changing rate: AdamW against
//! `torch.optim.AdamW` (python_ref/adamw_ref.py), SGD with and without nesterov against
//! `torch.optim.SGD`, gradient clipping against `torch.nn.utils.clip_grad_norm_` /
//! `clip_grad_value_`, the weights' EMA against timm's `ModelEmaV3` (python_ref/optim_ref.py),
//! each with a save / load of its state in between; and in the trainer: gradient accumulation
//! against one large batch, exact resume with all of them on, and the EMA in the checkpoint as
//! PyTorch loads it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use residual::checkpoint::{ReadOptions, StateDict};
use residual::data::Dataset;
use residual::train::{
    clip_grad_norm, clip_grad_value, AdamW, Clip, Ema, EmaOptions, RunData, Sgd, TrainOptions,
    Trainer,
};
use residual::ModelConfig;
use tch::nn::{Init, VarStore};
use tch::{Device, Kind, Tensor};

const NAMES: [&str; 3] = ["bn.weight", "fc.bias", "fc.weight"];

fn python() -> String {
    std::env::var("RESIDUAL_PYTHON").expect("RESIDUAL_PYTHON comes from .cargo/config.toml")
}

/// The tensors `python_ref/<script>` writes.
fn run_reference(script: &str) -> PathBuf {
    let dir = common::temp_dir(script.trim_end_matches(".py"));
    let file = dir.join("reference.safetensors");
    let out = Command::new(python())
        .arg(common::source_dir().join("python_ref").join(script))
        .arg(&file)
        .output()
        .expect("cannot run python");
    assert!(
        out.status.success(),
        "python_ref/{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    file
}

fn reference() -> StateDict {
    StateDict::read(&run_reference("adamw_ref.py"), &ReadOptions::default()).unwrap()
}

/// python_ref/optim_ref.py's tensors, written once per test process.
fn optim_reference() -> StateDict {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    let file = FILE.get_or_init(|| run_reference("optim_ref.py"));
    StateDict::read(file, &ReadOptions::default()).unwrap()
}

/// What the tests need of SGD and AdamW.
trait Stepper {
    fn zero(&mut self);
    fn step_at(&mut self, lr: f64);
}

impl Stepper for AdamW {
    fn zero(&mut self) {
        self.zero_grad();
    }
    fn step_at(&mut self, lr: f64) {
        self.step(lr);
    }
}

impl Stepper for Sgd {
    fn zero(&mut self) {
        self.zero_grad();
    }
    fn step_at(&mut self, lr: f64) {
        self.step(lr);
    }
}

/// A var store holding the reference's initial parameters under their names.
fn params(r: &StateDict) -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    for name in NAMES {
        let init = r.get(&format!("init.{name}")).unwrap();
        let (module, leaf) = name.split_once('.').unwrap();
        let v = vs
            .root()
            .sub(module)
            .var(leaf, &init.size(), Init::Const(0.0));
        tch::no_grad(|| v.shallow_clone().copy_(init));
    }
    vs
}

/// Steps `range` of the reference: gradients set exactly (the backward of `sum(p * G)`).
fn run_steps(opt: &mut impl Stepper, vs: &VarStore, r: &StateDict, range: std::ops::Range<usize>) {
    let lrs: Vec<f64> = Vec::try_from(r.get("lr").unwrap()).unwrap();
    let vars = vs.variables();
    for k in range {
        opt.zero();
        let loss = NAMES
            .iter()
            .map(|n| (&vars[*n] * r.get(&format!("grad.{k}.{n}")).unwrap()).sum(Kind::Float))
            .reduce(|a, b| a + b)
            .unwrap();
        loss.backward();
        opt.step_at(lrs[k]);
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn adamw_matches_torch_step_for_step_and_resumes_exactly() {
    let r = reference();
    let new = |vs: &VarStore| AdamW::new(vs, (0.9, 0.99), 1e-8, 0.05, true);
    let vs = params(&r);
    let mut opt = new(&vs);
    run_steps(&mut opt, &vs, &r, 0..5);
    let vars = vs.variables();
    let state = opt.state();
    let mut worst: f64 = 0.0;
    for name in NAMES {
        for (have, key) in [
            (&vars[name], format!("final.{name}")),
            (
                state.get(&format!("{name}.exp_avg")).unwrap(),
                format!("exp_avg.{name}"),
            ),
            (
                state.get(&format!("{name}.exp_avg_sq")).unwrap(),
                format!("exp_avg_sq.{name}"),
            ),
        ] {
            let want = r.get(&key).unwrap();
            worst = worst.max(max_abs_diff(have, want));
        }
    }
    println!("AdamW after 5 steps: max |torch - residual| = {worst:e}");
    assert_eq!(worst, 0.0, "AdamW differs from torch.optim.AdamW");

    // Three steps, the state through a file, two more: the same as five in a row.
    let vs2 = params(&r);
    let mut first = new(&vs2);
    run_steps(&mut first, &vs2, &r, 0..3);
    let file = common::temp_dir("adamw-state").join("adamw.safetensors");
    first.state().save_safetensors(&file).unwrap();
    let mut second = new(&vs2);
    second
        .load_state(&StateDict::read(&file, &ReadOptions::default()).unwrap())
        .unwrap();
    assert_eq!(second.steps, 3);
    run_steps(&mut second, &vs2, &r, 3..5);
    for name in NAMES {
        assert!(
            vs2.variables()[name].equal(&vars[name]),
            "{name} after resume"
        );
    }
}

#[test]
fn sgd_and_nesterov_match_torch_step_for_step_and_resume_exactly() {
    let r = optim_reference();
    for (case, nesterov) in [("sgd", false), ("nesterov", true)] {
        let new = |vs: &VarStore| {
            let mut sgd = Sgd::new(vs, 0.9, 0.01, true);
            sgd.nesterov = nesterov;
            sgd
        };
        let vs = params(&r);
        let mut opt = new(&vs);
        run_steps(&mut opt, &vs, &r, 0..5);
        let vars = vs.variables();
        let state = opt.state();
        let mut worst: f64 = 0.0;
        for name in NAMES {
            worst = worst.max(max_abs_diff(
                &vars[name],
                r.get(&format!("{case}.final.{name}")).unwrap(),
            ));
            worst = worst.max(max_abs_diff(
                state.get(name).unwrap(),
                r.get(&format!("{case}.buf.{name}")).unwrap(),
            ));
        }
        println!("SGD ({case}) after 5 steps: max |torch - residual| = {worst:e}");
        assert_eq!(worst, 0.0, "{case} differs from torch.optim.SGD");

        let vs2 = params(&r);
        let mut first = new(&vs2);
        run_steps(&mut first, &vs2, &r, 0..2);
        let file = common::temp_dir(&format!("sgd-state-{case}")).join("sgd.safetensors");
        first.state().save_safetensors(&file).unwrap();
        let mut second = new(&vs2);
        second
            .load_state(&StateDict::read(&file, &ReadOptions::default()).unwrap())
            .unwrap();
        run_steps(&mut second, &vs2, &r, 2..5);
        for name in NAMES {
            assert!(
                vs2.variables()[name].equal(&vars[name]),
                "{case}: {name} after resume"
            );
        }
    }
}

#[test]
fn gradient_clipping_matches_torch() {
    let r = optim_reference();
    // torch's parameter order in the reference (the norm of the norms depends on it).
    let order = ["fc.weight", "fc.bias", "bn.weight"];
    let grads = |k: usize| -> Vec<Tensor> {
        order
            .iter()
            .map(|n| r.get(&format!("grad.{k}.{n}")).unwrap().copy())
            .collect()
    };
    let mut worst: f64 = 0.0;
    for k in [0, 4] {
        for (label, norm_type) in [("2", 2.0), ("inf", f64::INFINITY)] {
            let case = format!("norm{label}_step{k}");
            let g = grads(k);
            let before = g[0].copy();
            let total = clip_grad_norm(&g, 1.0, norm_type).unwrap();
            worst = worst.max(max_abs_diff(
                &total,
                r.get(&format!("clip.{case}.total")).unwrap(),
            ));
            for (name, t) in order.iter().zip(&g) {
                worst = worst.max(max_abs_diff(
                    t,
                    r.get(&format!("clip.{case}.{name}")).unwrap(),
                ));
            }
            // Step 0's gradients are below the limit and stay as they are; step 4's shrink.
            assert_eq!(g[0].equal(&before), k == 0, "{case}");
        }
    }
    let g = grads(4);
    clip_grad_value(&g, 0.5);
    for (name, t) in order.iter().zip(&g) {
        worst = worst.max(max_abs_diff(
            t,
            r.get(&format!("clip.value.{name}")).unwrap(),
        ));
    }
    println!("clip_grad_norm_ (2, inf) and clip_grad_value_: max |torch - residual| = {worst:e}");
    assert_eq!(worst, 0.0, "clipping differs from torch.nn.utils");
    let bad = Clip::Norm {
        max_norm: 1.0,
        norm_type: 1.0,
    };
    assert!(bad.validate().is_err());
    assert!(Clip::Value { value: -1.0 }.validate().is_err());
}

/// The conv + BatchNorm + linear net of optim_ref.py as variables named like its state_dict.
fn ema_net() -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    let root = vs.root();
    let float = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
    let (bn, fc) = (root.sub("bn"), root.sub("fc"));
    let int = Tensor::zeros([], (Kind::Int64, Device::Cpu));
    for (path, name, t, trainable) in [
        (root.sub("conv"), "weight", float(&[2, 1, 3, 3]), true),
        (bn.clone(), "weight", float(&[2]), true),
        (bn.clone(), "bias", float(&[2]), true),
        (bn.clone(), "running_mean", float(&[2]), false),
        (bn.clone(), "running_var", float(&[2]), false),
        (bn, "num_batches_tracked", int, false),
        (fc.clone(), "weight", float(&[3, 2]), true),
        (fc, "bias", float(&[3]), true),
    ] {
        let _ = path.add(name, t, trainable);
    }
    vs
}

fn set_weights(vs: &VarStore, r: &StateDict, prefix: &str) {
    tch::no_grad(|| {
        for (name, mut v) in vs.variables() {
            v.copy_(r.get(&format!("{prefix}{name}")).unwrap());
        }
    });
}

#[test]
fn ema_matches_timm_model_ema_v3_and_swaps_in_and_out() {
    let r = optim_reference();
    let mut worst: f64 = 0.0;
    for (label, options) in [
        (
            "ema",
            EmaOptions {
                decay: 0.9,
                warmup: false,
            },
        ),
        (
            "ema_warmup",
            EmaOptions {
                decay: 0.999,
                warmup: true,
            },
        ),
    ] {
        let vs = ema_net();
        let mut ema = Ema::new(&vs, options);
        for k in 0..4 {
            set_weights(&vs, &r, &format!("ema_in.{k}."));
            ema.update(&vs, k + 1).unwrap();
        }
        let averaged = ema.state_dict();
        assert_eq!(averaged.len(), 8);
        for (name, t) in &averaged.entries {
            let want = r.get(&format!("{label}.{name}")).unwrap();
            assert_eq!(t.kind(), want.kind(), "{name}");
            worst = worst.max(max_abs_diff(
                &t.to_kind(Kind::Double),
                &want.to_kind(Kind::Double),
            ));
        }
        // The average differs from the model, which gets its own weights back after evaluation.
        let model = StateDict::from_var_store(&vs);
        let seen = ema
            .swapped_in(&vs, || Ok(vs.variables()["fc.weight"].copy()))
            .unwrap();
        assert!(seen.equal(averaged.get("fc.weight").unwrap()));
        assert!(!seen.equal(model.get("fc.weight").unwrap()));
        for (name, t) in StateDict::from_var_store(&vs).entries {
            assert!(t.equal(model.get(&name).unwrap()), "{name} after the swap");
        }
    }
    println!("EMA (decay 0.9; 0.999 with warmup) after 4 steps: max |timm - residual| = {worst:e}");
    assert_eq!(worst, 0.0, "the EMA differs from timm's ModelEmaV3");
    let warm = EmaOptions {
        decay: 0.999,
        warmup: true,
    };
    assert_eq!(warm.decay_at(1), 0.0);
    assert!((warm.decay_at(2) - (1.0 - 2f64.powf(-2.0 / 3.0))).abs() < 1e-15);
    assert_eq!(warm.decay_at(1 << 40), 0.999);
    assert!(EmaOptions {
        decay: 1.0,
        warmup: false
    }
    .validate()
    .is_err());
}

/// `n` 12x12 one-channel images of 4 classes: the class is where a bright patch sits.
fn patch_dataset(n: i64, seed: i64) -> Dataset {
    tch::manual_seed(seed);
    let labels = Tensor::randint(4, [n], (Kind::Int64, Device::Cpu));
    let noise = Tensor::randint(60, [n, 1, 12, 12], (Kind::Int64, Device::Cpu));
    let images = noise.to_kind(Kind::Uint8);
    let labels_vec: Vec<i64> = Vec::try_from(&labels).unwrap();
    for (i, l) in labels_vec.iter().enumerate() {
        let (r, c) = ((l / 2) * 6 + 1, (l % 2) * 6 + 1);
        let _ = images
            .get(i as i64)
            .narrow(1, r, 4)
            .narrow(2, c, 4)
            .fill_(220);
    }
    Dataset::new(images, labels, 4).unwrap()
}

fn tiny_data(options: &TrainOptions) -> RunData {
    RunData::prepare(
        patch_dataset(64, 3),
        patch_dataset(32, 4),
        options,
        Device::Cpu,
    )
    .unwrap()
}

fn train_quietly(
    config: ModelConfig,
    dir: &Path,
    options: TrainOptions,
    data: &RunData,
) -> Trainer {
    let mut trainer = Trainer::create(dir, config, options, Device::Cpu).unwrap();
    trainer.quiet = true;
    trainer.run(data).unwrap();
    trainer
}

fn max_weight_diff(a: &VarStore, b: &VarStore) -> f64 {
    let (a, b) = (a.variables(), b.variables());
    a.iter()
        .filter(|(_, t)| t.is_floating_point())
        .map(|(k, t)| max_abs_diff(t, &b[k]))
        .fold(0.0, f64::max)
}

#[test]
fn accumulating_micro_batches_equals_one_large_batch_without_batch_norm() {
    // GroupNorm normalises each image on its own, so 2 micro-batches of 8 see what one batch
    // of 16 sees; BatchNorm's statistics would be those of 8 images (not reproducible that way).
    let config = ModelConfig::from_json(
        r#"{"arch": "resnet", "block": "basic", "layers": [1, 1, 1, 1], "channels": [4, 4, 8, 8],
            "stem_width": 4, "num_classes": 4, "in_channels": 1,
            "norm": {"group_norm": {"num_groups": 2}}}"#,
    )
    .unwrap();
    let dir = common::temp_dir("accumulate");
    let options = TrainOptions {
        epochs: 1,
        batch_size: 16,
        lr: 0.05,
        seed: 5,
        augment: None,
        eval_test: false,
        subset: Some(32),
        ..Default::default()
    };
    let data = tiny_data(&options);
    let large = train_quietly(config.clone(), &dir.join("large"), options.clone(), &data);
    let micro = TrainOptions {
        batch_size: 8,
        accumulate: 2,
        ..options.clone()
    };
    let accumulated = train_quietly(
        config.clone(),
        &dir.join("accumulated"),
        micro.clone(),
        &data,
    );
    let small = TrainOptions {
        accumulate: 1,
        ..micro
    };
    let small_steps = train_quietly(config, &dir.join("small"), small, &data);
    assert_eq!(large.state.optimizer_steps, 2);
    assert_eq!(accumulated.state.optimizer_steps, 2);
    assert_eq!(small_steps.state.optimizer_steps, 4);
    let same = max_weight_diff(&large.vs, &accumulated.vs);
    let other = max_weight_diff(&large.vs, &small_steps.vs);
    println!(
        "2 steps of 16 images vs 2 x 2 micro-batches of 8: max |dw| = {same:e} (4 steps of 8: {other:e})"
    );
    assert!(
        same < 1e-6,
        "accumulation differs from the large batch by {same:e}"
    );
    assert!(
        other > 1e3 * same.max(1e-9),
        "4 small steps should differ: {other:e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn nesterov_clipping_accumulation_and_ema_resume_bit_exactly_and_load_in_pytorch() {
    let config = ModelConfig::from_json(
        r#"{"arch": "cifar_resnet", "depth": 8, "in_channels": 1, "num_classes": 4}"#,
    )
    .unwrap();
    let dir = common::temp_dir("optim-resume");
    let options = TrainOptions {
        epochs: 2,
        batch_size: 8,
        lr: 0.05,
        seed: 7,
        subset: Some(40),
        validation: Some(8),
        nesterov: true,
        accumulate: 3,
        clip: Some(Clip::Norm {
            max_norm: 0.5,
            norm_type: 2.0,
        }),
        ema: Some(EmaOptions {
            decay: 0.8,
            warmup: true,
        }),
        ..Default::default()
    };
    let data = tiny_data(&options);
    let straight = train_quietly(
        config.clone(),
        &dir.join("straight"),
        options.clone(),
        &data,
    );
    // 32 training images in batches of 8: 4 micro-batches, 2 steps (3 + 1) per epoch.
    assert_eq!(straight.state.optimizer_steps, 4);
    let first = TrainOptions {
        epochs: 1,
        ..options.clone()
    };
    drop(train_quietly(config, &dir.join("resumed"), first, &data));
    let mut rest = Trainer::resume(&dir.join("resumed"), Device::Cpu, Some(2)).unwrap();
    rest.quiet = true;
    assert_eq!(rest.state.optimizer_steps, 2);
    rest.run(&data).unwrap();
    let (a, b) = (
        StateDict::from_var_store(&straight.vs),
        StateDict::from_var_store(&rest.vs),
    );
    for (name, t) in &a.entries {
        assert!(t.equal(b.get(name).unwrap()), "{name} differs after resume");
    }
    let (ea, eb) = (
        straight.ema.as_ref().unwrap().state_dict(),
        rest.ema.as_ref().unwrap().state_dict(),
    );
    for (name, t) in &ea.entries {
        assert!(
            t.equal(eb.get(name).unwrap()),
            "EMA {name} differs after resume"
        );
        if name == "fc.weight" {
            assert!(!t.equal(a.get(name).unwrap()), "the EMA equals the model");
        }
    }
    let metrics = rest.run.read_metrics().unwrap();
    assert_eq!(metrics.len(), 2);
    assert!(metrics
        .iter()
        .all(|m| m.ema_val_error.is_some() && m.ema_test_error.is_some()));

    // PyTorch reads both from the checkpoint and loads the EMA into the reference model.
    let weights = residual::train::latest_weights(&dir.join("straight")).unwrap();
    let script = "import sys; sys.path.insert(0, sys.argv[2]); import torch\n\
        from resnet_ref import CifarResNet\n\
        ckpt = torch.load(sys.argv[1], weights_only=True)\n\
        model = CifarResNet(8, num_classes=4, in_channels=1)\n\
        model.load_state_dict(ckpt['state_dict_ema'])\n\
        print(sorted(ckpt), float(model.fc.weight.sum()), float(ckpt['state_dict']['fc.weight'].sum()))";
    let out = Command::new(python())
        .args(["-c", script])
        .arg(&weights)
        .arg(common::source_dir().join("python_ref"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum = |sd: &StateDict| {
        sd.get("fc.weight")
            .unwrap()
            .sum(Kind::Double)
            .double_value(&[])
    };
    let fields: Vec<&str> = stdout.trim().rsplitn(3, ' ').collect();
    assert!(
        stdout.starts_with("['state_dict', 'state_dict_ema']"),
        "{stdout}"
    );
    let (ema_sum, model_sum): (f64, f64) = (fields[1].parse().unwrap(), fields[0].parse().unwrap());
    assert!((ema_sum - sum(&ea)).abs() < 1e-5, "{stdout}");
    assert!((model_sum - sum(&a)).abs() < 1e-5, "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}
