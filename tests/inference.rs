//! The inference path (`residual::models::for_inference`): batch norms folded into the
//! convolutions give the eval-mode outputs of the model as built, and training is refused.

use residual::models::{for_inference, Inputs, Model};
use residual::ModelConfig;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

/// Two copies of the model of `json` with the same weights: random, with every batch norm given
/// random affine values and running statistics (built fresh they are the identity, which would
/// fold to nothing), the second one [`for_inference`]; and the number of batch norms.
type Twins = (VarStore, Box<dyn Model>, VarStore, Box<dyn Model>, usize);

fn twins(json: &str) -> Twins {
    let config = ModelConfig::from_json(json).unwrap();
    tch::manual_seed(0);
    let vs = VarStore::new(Device::Cpu);
    let plain = config.build(vs.root()).unwrap();
    let variables = vs.variables();
    let norms: Vec<&str> = variables
        .keys()
        .filter_map(|name| name.strip_suffix(".running_var"))
        .collect();
    tch::no_grad(|| {
        for norm in &norms {
            for (field, lo, hi) in [
                ("weight", 0.5, 1.5),
                ("bias", -0.5, 0.5),
                ("running_mean", -0.5, 0.5),
                ("running_var", 0.5, 2.0),
            ] {
                let mut var = variables[&format!("{norm}.{field}")].shallow_clone();
                let random = Tensor::empty(var.size(), (Kind::Float, Device::Cpu)).uniform_(lo, hi);
                var.copy_(&random);
            }
        }
    });
    let mut copy_vs = VarStore::new(Device::Cpu);
    let copy = config.build(copy_vs.root()).unwrap();
    copy_vs.copy(&vs).unwrap();
    let fast = for_inference(copy).unwrap();
    (vs, plain, copy_vs, fast, norms.len())
}

/// max|fast - plain| / max|plain| over an eval-mode forward of `inputs`.
fn relative_difference(plain: &dyn Model, fast: &dyn Model, inputs: &Inputs) -> f64 {
    tch::no_grad(|| {
        let want = plain.forward_named(inputs, false).unwrap();
        let got = fast.forward_named(inputs, false).unwrap();
        assert_eq!(got.size(), want.size());
        let scale = want.abs().max().double_value(&[]);
        assert!(scale > 0.0, "the reference output is all zeros");
        (got - &want).abs().max().double_value(&[]) / scale
    })
}

fn images(shape: [i64; 4]) -> Inputs {
    tch::manual_seed(1);
    let mut inputs = Inputs::new();
    inputs.insert(
        "input".into(),
        Tensor::randn(shape, (Kind::Float, Device::Cpu)),
    );
    inputs
}

fn assert_folds(json: &str, shape: [i64; 4]) {
    let (_vs, plain, _fast_vs, fast, norms) = twins(json);
    assert!(norms > 0, "{json}: no batch norm to fold");
    let inputs = images(shape);
    let diff = relative_difference(plain.as_ref(), fast.as_ref(), &inputs);
    println!("{json}: {diff:.2e}");
    assert!(
        diff <= 1e-4,
        "{json}: folded model off by {diff:.2e} relative"
    );
    let err = fast.forward_named(&inputs, true).unwrap_err();
    assert!(
        format!("{err:#}").contains("folded"),
        "{json}: training the folded model gave {err:#}"
    );
}

#[test]
fn folded_imagenet_resnets_match_the_models_as_built() {
    for json in [
        r#"{"arch": "resnet18"}"#,
        r#"{"arch": "resnet50"}"#,
        r#"{"arch": "resnext50_32x4d", "num_classes": 10}"#,
        r#"{"arch": "wide_resnet50_2", "num_classes": 10}"#,
        r#"{"arch": "resnet50", "num_classes": 10, "replace_stride_with_dilation": [false, true, true]}"#,
        r#"{"arch": "resnet18", "norm": "frozen_batch_norm"}"#,
        r#"{"arch": "resnet18", "shortcut": "C"}"#,
        r#"{"arch": "resnet18", "plain": true}"#,
        r#"{"arch": "timm", "name": "resnet26t"}"#,
        r#"{"arch": "timm", "name": "resnet50d", "replace_stride_with_dilation": [false, false, true]}"#,
        r#"{"arch": "resnet", "block": "bottleneck", "layers": [1, 2, 1, 1], "stem_type": "deep", "stem_width": 16, "avg_down": true, "attn_layer": "se", "num_classes": 7}"#,
        r#"{"arch": "resnet", "block": "bottleneck", "layers": [1, 1, 1, 1], "stride_in_1x1": true, "downsample_in_first_stage": true}"#,
    ] {
        assert_folds(json, [2, 3, 64, 64]);
    }
}

#[test]
fn folded_cifar_resnets_match_the_models_as_built() {
    for shortcut in ["A", "B", "C"] {
        let json = format!(r#"{{"arch": "cifar_resnet", "depth": 20, "shortcut": "{shortcut}"}}"#);
        assert_folds(&json, [2, 3, 32, 32]);
    }
    assert_folds(
        r#"{"arch": "cifar_resnet", "depth": 8, "plain": true, "in_channels": 1}"#,
        [2, 1, 28, 28],
    );
}

#[test]
fn group_norm_stays_and_still_matches() {
    let json = r#"{"arch": "resnet18", "norm": {"group_norm": {"num_groups": 8}}}"#;
    let (_vs, plain, _fast_vs, fast, norms) = twins(json);
    assert_eq!(norms, 0);
    let inputs = images([2, 3, 64, 64]);
    let diff = relative_difference(plain.as_ref(), fast.as_ref(), &inputs);
    assert!(diff <= 1e-6, "group norm model changed by {diff:.2e}");
}

#[test]
fn models_without_batch_norm_pass_through_unchanged() {
    let cases = [
        (
            r#"{"arch": "conv_sds_layer", "input_size": 8, "hidden_dim": 6}"#,
            vec![2, 8, 6],
        ),
        (
            r#"{"arch": "conv_sds_head", "n_layers": 3, "input_size": 64, "hidden_size": 96}"#,
            vec![2, 64, 96],
        ),
        (
            r#"{"arch": "sid_residual_block", "hidden_size": 16, "intermediate_size": 32}"#,
            vec![3, 16],
        ),
    ];
    for (json, shape) in cases {
        let (_vs, plain, _fast_vs, fast, norms) = twins(json);
        assert_eq!(norms, 0);
        let mut inputs = Inputs::new();
        inputs.insert(
            "input".into(),
            Tensor::randn(shape, (Kind::Float, Device::Cpu)),
        );
        let diff = relative_difference(plain.as_ref(), fast.as_ref(), &inputs);
        assert_eq!(diff, 0.0, "{json}: changed by {diff:.2e}");
        // Nothing folded, so a training forward still runs.
        let _ = fast.forward_named(&inputs, true).unwrap();
    }
}
