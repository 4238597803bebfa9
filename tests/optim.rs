//! AdamW against `torch.optim.AdamW` (python_ref/adamw_ref.py): the parameters and moments after
//! five steps with a changing rate, bit for bit, and a save / load of the state in between.

mod common;

use std::process::Command;

use residual::checkpoint::{ReadOptions, StateDict};
use residual::train::AdamW;
use tch::nn::{Init, VarStore};
use tch::{Device, Kind, Tensor};

const NAMES: [&str; 3] = ["bn.weight", "fc.bias", "fc.weight"];

fn reference() -> StateDict {
    let dir = common::temp_dir("adamw");
    let file = dir.join("adamw.safetensors");
    let python =
        std::env::var("RESIDUAL_PYTHON").expect("RESIDUAL_PYTHON comes from .cargo/config.toml");
    let out = Command::new(python)
        .arg(common::source_dir().join("python_ref/adamw_ref.py"))
        .arg(&file)
        .output()
        .expect("cannot run python");
    assert!(
        out.status.success(),
        "python_ref/adamw_ref.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    StateDict::read(&file, &ReadOptions::default()).unwrap()
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
fn run_steps(opt: &mut AdamW, vs: &VarStore, r: &StateDict, range: std::ops::Range<usize>) {
    let lrs: Vec<f64> = Vec::try_from(r.get("lr").unwrap()).unwrap();
    let vars = vs.variables();
    for k in range {
        opt.zero_grad();
        let loss = NAMES
            .iter()
            .map(|n| (&vars[*n] * r.get(&format!("grad.{k}.{n}")).unwrap()).sum(Kind::Float))
            .reduce(|a, b| a + b)
            .unwrap();
        loss.backward();
        opt.step(lrs[k]);
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
