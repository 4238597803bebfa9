//! ResNet behaviour beyond value parity: names, initialisation, backbone access, bad input.

use residual::models::resnet::{Constructor, ResNet, ResNetConfig};
use residual::models::Inputs;
use residual::ModelConfig;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn build(json: &str) -> (VarStore, Box<dyn residual::Model>) {
    let vs = VarStore::new(Device::Cpu);
    let model = ModelConfig::from_json(json)
        .unwrap()
        .build(vs.root())
        .unwrap();
    (vs, model)
}

fn resnet(arch: &str, config: serde_json::Value) -> (VarStore, ResNet) {
    let vs = VarStore::new(Device::Cpu);
    let config: ResNetConfig = serde_json::from_value(config).unwrap();
    let constructor = Constructor::named(arch).unwrap();
    let model = ResNet::new(vs.root(), &config.resolve(Some(constructor)).unwrap());
    (vs, model)
}

fn keys(vs: &VarStore) -> Vec<String> {
    let mut k: Vec<String> = vs.variables().into_keys().collect();
    k.sort();
    k
}

fn image(b: i64, c: i64, s: i64) -> Tensor {
    Tensor::randn([b, c, s, s], (Kind::Float, Device::Cpu))
}

fn run(model: &dyn residual::Model, x: Tensor, train: bool) -> anyhow::Result<Tensor> {
    let mut inputs = Inputs::new();
    inputs.insert("input".into(), x);
    model.forward_named(&inputs, train)
}

#[test]
fn zero_init_residual_zeroes_the_last_norm_of_every_block() {
    for (arch, last) in [("resnet50", "bn3"), ("resnet18", "bn2")] {
        let (vs, _) = resnet(arch, serde_json::json!({"zero_init_residual": true}));
        let vars = vs.variables();
        let lasts: Vec<_> = vars
            .iter()
            .filter(|(k, _)| k.ends_with(&format!("{last}.weight")))
            .collect();
        assert!(!lasts.is_empty());
        for (k, v) in lasts {
            assert_eq!(v.abs().sum(Kind::Double).double_value(&[]), 0.0, "{k}");
        }
        assert_eq!(
            vars["layer1.0.bn1.weight"]
                .mean(Kind::Double)
                .double_value(&[]),
            1.0
        );
    }
}

#[test]
fn initialisation_is_torchvisions() {
    let (vs, _) = resnet("resnet50", serde_json::json!({}));
    let vars = vs.variables();
    let std = vars["conv1.weight"].std(true).double_value(&[]);
    let expected = (2.0f64 / (64.0 * 49.0)).sqrt();
    assert!(
        (std / expected - 1.0).abs() < 0.05,
        "conv1 std {std} vs {expected}"
    );
    let std = vars["layer3.0.conv2.weight"].std(true).double_value(&[]);
    let expected = (2.0f64 / (256.0 * 9.0)).sqrt();
    assert!(
        (std / expected - 1.0).abs() < 0.05,
        "layer3.0.conv2 std {std} vs {expected}"
    );
    assert_eq!(
        vars["layer2.0.downsample.1.running_var"]
            .mean(Kind::Double)
            .double_value(&[]),
        1.0
    );
    assert_eq!(vars["bn1.num_batches_tracked"].kind(), Kind::Int64);
    assert_eq!(vars["bn1.num_batches_tracked"].size(), Vec::<i64>::new());
    let bound = 1.0 / 2048f64.sqrt();
    let max = vars["fc.weight"].abs().max().double_value(&[]);
    assert!(
        max <= bound && max > 0.9 * bound,
        "fc keeps nn.Linear's init: {max} vs {bound}"
    );
}

#[test]
fn shortcut_options_decide_which_blocks_have_downsample() {
    let downsampled = |vs: &VarStore| -> Vec<String> {
        let mut v: Vec<String> = keys(vs)
            .into_iter()
            .filter(|k| k.ends_with("downsample.0.weight"))
            .map(|k| k.trim_end_matches(".downsample.0.weight").to_string())
            .collect();
        v.dedup();
        v
    };
    let (b, _) = resnet("resnet18", serde_json::json!({}));
    assert_eq!(downsampled(&b), vec!["layer2.0", "layer3.0", "layer4.0"]);
    let (c, _) = resnet("resnet18", serde_json::json!({"shortcut": "C"}));
    assert_eq!(downsampled(&c).len(), 8, "option C projects on every block");
    for config in [
        serde_json::json!({"shortcut": "A"}),
        serde_json::json!({"plain": true}),
    ] {
        let (vs, _) = resnet("resnet18", config.clone());
        assert!(downsampled(&vs).is_empty(), "{config}");
        assert_eq!(
            keys(&vs).len(),
            keys(&b).len() - 3 * 6,
            "{config}: same layers minus projections"
        );
    }
    // The option-B ImageNet ResNet-50 has torchvision's 161 parameters and 159 buffers (320 keys).
    let (vs, _) = resnet("resnet50", serde_json::json!({}));
    let vars = vs.variables();
    let params = vars.values().filter(|t| t.requires_grad()).count();
    let count: i64 = vars
        .values()
        .filter(|t| t.requires_grad())
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!((params, vars.len() - params), (161, 159));
    assert_eq!(count, 25_557_032, "torchvision resnet50 parameter count");
}

#[test]
fn backbone_access_stages_features_and_no_classifier() {
    let (_, model) = resnet("resnet50", serde_json::json!({}));
    let x = image(2, 3, 64);
    let stages: Vec<Vec<i64>> = model
        .forward_stages(&x, false)
        .unwrap()
        .iter()
        .map(|t| t.size())
        .collect();
    assert_eq!(
        stages,
        vec![
            vec![2, 256, 16, 16],
            vec![2, 512, 8, 8],
            vec![2, 1024, 4, 4],
            vec![2, 2048, 2, 2]
        ]
    );
    assert_eq!(
        model.forward_features(&x, false).unwrap().size(),
        vec![2, 2048]
    );

    let (_, dilated) = resnet(
        "resnet50",
        serde_json::json!({"replace_stride_with_dilation": [false, true, true]}),
    );
    let last = dilated.forward_stages(&x, false).unwrap().pop().unwrap();
    assert_eq!(last.size(), vec![2, 2048, 8, 8], "output stride 8");

    let (vs, headless) = build(r#"{"arch": "resnet18", "include_fc": false}"#);
    assert!(!keys(&vs).iter().any(|k| k.starts_with("fc.")));
    assert_eq!(
        run(headless.as_ref(), image(1, 3, 32), false)
            .unwrap()
            .size(),
        vec![1, 512]
    );
}

#[test]
fn batch_norm_counts_training_batches_only() {
    let (vs, model) = build(r#"{"arch": "cifar_resnet", "depth": 20, "in_channels": 1}"#);
    let vars = vs.variables();
    let mean_before = vars["bn1.running_mean"].copy();
    let _ = run(model.as_ref(), image(4, 1, 28), false).unwrap();
    assert_eq!(vars["bn1.num_batches_tracked"].int64_value(&[]), 0);
    assert_eq!(vars["bn1.running_mean"], mean_before);
    let _ = run(model.as_ref(), image(4, 1, 28), true).unwrap();
    let _ = run(model.as_ref(), image(4, 1, 28), true).unwrap();
    assert_eq!(vars["layer3.2.bn2.num_batches_tracked"].int64_value(&[]), 2);
    assert_ne!(vars["bn1.running_mean"], mean_before);
}

/// Every H, W >= 1 and every batch size PyTorch accepts runs (parity of the numbers:
/// python_ref/shape_cases.py); strides round up, as in PyTorch.
#[test]
fn any_image_size_pytorch_accepts_runs() {
    let dilated = r#"{"arch": "resnet50", "replace_stride_with_dilation": [false, true, true]}"#;
    let cifar = r#"{"arch": "cifar_resnet", "depth": 8, "num_classes": 7}"#;
    for (json, classes) in [
        (r#"{"arch": "resnet18"}"#, 1000),
        (dilated, 1000),
        (cifar, 7),
    ] {
        let (_, model) = build(json);
        for [b, h, w] in [
            [1, 1, 1],
            [1, 2, 2],
            [2, 5, 5],
            [1, 1, 7],
            [3, 28, 28],
            [0, 8, 8],
        ] {
            let x = Tensor::randn([b, 3, h, w], (Kind::Float, Device::Cpu));
            let y = run(model.as_ref(), x, false).unwrap();
            assert_eq!(y.size(), vec![b, classes], "{json} at {b}x{h}x{w}");
            assert!(
                y.isfinite().all().int64_value(&[]) == 1,
                "{json} at {b}x{h}x{w}"
            );
        }
        // Training mode needs two values per channel at every BatchNorm: a batch of 2 suffices.
        let y = run(model.as_ref(), image(2, 3, 1), true).unwrap();
        assert_eq!(y.size(), vec![2, classes], "{json}");
    }
    let (_, model) = resnet(
        "resnet18",
        serde_json::json!({"num_classes": 10, "in_channels": 1}),
    );
    let stages: Vec<Vec<i64>> = model
        .forward_stages(&image(1, 1, 28), false)
        .unwrap()
        .iter()
        .map(|t| t.size())
        .collect();
    assert_eq!(
        stages,
        vec![
            vec![1, 64, 7, 7],
            vec![1, 128, 4, 4],
            vec![1, 256, 2, 2],
            vec![1, 512, 1, 1]
        ]
    );
}

/// What PyTorch refuses is an error naming the problem, never a libtorch abort.
#[test]
fn inputs_pytorch_refuses_are_clear_errors() {
    let (_, model) = build(r#"{"arch": "resnet18"}"#);
    let error =
        |x: Tensor, train: bool| format!("{:#}", run(model.as_ref(), x, train).unwrap_err());
    let msg = error(image(1, 1, 64), false);
    assert!(
        msg.contains("expected shape [B, 3, H, W]") && msg.contains("[1, 1, 64, 64]"),
        "{msg}"
    );
    let msg = error(
        Tensor::zeros([3, 64, 64], (Kind::Float, Device::Cpu)),
        false,
    );
    assert!(msg.contains("expected shape [B, 3, H, W]"), "{msg}");
    let msg = error(
        Tensor::zeros([2, 3, 0, 5], (Kind::Float, Device::Cpu)),
        false,
    );
    assert!(
        msg.contains("H, W >= 1") && msg.contains("[2, 3, 0, 5]"),
        "{msg}"
    );
    for kind in [Kind::Double, Kind::Half, Kind::Int64] {
        let msg = error(image(1, 3, 8).to_kind(kind), false);
        assert!(
            msg.contains("expected Float, the model's dtype") && msg.contains(&format!("{kind:?}")),
            "{msg}"
        );
    }
    // One value per channel in training mode: at the stem for 1x1, at layer2 for 5x5, at layer4
    // for 32x32 (torchvision's messages: input size [1, 64, 1, 1], [1, 128, 1, 1], [1, 512, 1, 1]).
    for (size, layer, shape) in [
        (1, "bn1", "[1, 64, 1, 1]"),
        (5, "layer2.0", "[1, 128, 1, 1]"),
        (32, "layer4.0", "[1, 512, 1, 1]"),
    ] {
        let msg = error(image(1, 3, size), true);
        assert!(
            msg.starts_with(&format!(
                "{layer}: BatchNorm2d in training mode needs more than 1 value per channel"
            )) && msg.contains(shape),
            "{msg}"
        );
    }
    // GroupNorm refuses one value per group in any mode (64 groups of the stem's 64 channels).
    let (_, grouped) = build(r#"{"arch": "resnet50", "norm": {"group_norm": {"num_groups": 64}}}"#);
    let msg = format!(
        "{:#}",
        run(grouped.as_ref(), image(1, 3, 2), false).unwrap_err()
    );
    assert!(
        msg.contains("GroupNorm needs more than 1 value per group"),
        "{msg}"
    );
    assert_eq!(
        run(grouped.as_ref(), image(2, 3, 2), false).unwrap().size(),
        vec![2, 1000]
    );

    let (_, cifar) = build(r#"{"arch": "cifar_resnet", "depth": 20, "in_channels": 1}"#);
    let msg = format!(
        "{:#}",
        run(cifar.as_ref(), image(2, 3, 28), false).unwrap_err()
    );
    assert!(msg.contains("expected shape [B, 1, H, W]"), "{msg}");
    let msg = format!(
        "{:#}",
        run(cifar.as_ref(), image(1, 1, 1), true).unwrap_err()
    );
    assert!(msg.contains("bn1: BatchNorm2d in training mode"), "{msg}");
}

#[test]
fn impossible_configs_name_the_field() {
    let cases = [
        (
            r#"{"arch": "cifar_resnet", "depth": 21}"#,
            "depth: must be 6n + 2",
        ),
        (
            r#"{"arch": "cifar_resnet", "depth": 2}"#,
            "depth: must be 6n + 2",
        ),
        (
            r#"{"arch": "cifar_resnet", "depth": 20, "shortcut": "D"}"#,
            "unknown variant `D`",
        ),
        (
            r#"{"arch": "resnet18", "groups": 32}"#,
            "groups: resnet18 fixes it to 1",
        ),
        (
            r#"{"arch": "resnet", "block": "basic", "layers": [2, 2, 2, 2], "groups": 2}"#,
            "BasicBlock only supports",
        ),
        (
            r#"{"arch": "resnet", "block": "bottleneck", "layers": [2, 2, 2]}"#,
            "layers: needs 4 stage depths",
        ),
        (
            r#"{"arch": "resnet", "layers": [2, 2, 2, 2]}"#,
            "block: required",
        ),
        (
            r#"{"arch": "resnet18", "replace_stride_with_dilation": [false, false, true]}"#,
            "dilation > 1 is not supported",
        ),
        (
            r#"{"arch": "resnet50", "norm": {"group_norm": {"num_groups": 48}}}"#,
            "num_groups: 48 does not divide",
        ),
        (
            r#"{"arch": "resnet50", "num_classes": 0}"#,
            "num_classes: must be at least 1",
        ),
        (
            r#"{"arch": "resnet50", "zero_init_residuals": true}"#,
            "zero_init_residuals",
        ),
    ];
    for (json, expected) in cases {
        let msg = format!("{:#}", ModelConfig::from_json(json).unwrap_err());
        assert!(msg.contains(expected), "{json}: {msg}");
    }
    let generic = ModelConfig::from_json(
        r#"{"arch": "resnet", "block": "bottleneck", "layers": [3, 4, 6, 3], "groups": 32, "width_per_group": 4}"#,
    )
    .unwrap();
    let named = ModelConfig::from_json(r#"{"arch": "resnext50_32x4d"}"#).unwrap();
    let (a, b) = (VarStore::new(Device::Cpu), VarStore::new(Device::Cpu));
    generic.build(a.root()).unwrap();
    named.build(b.root()).unwrap();
    assert_eq!(keys(&a), keys(&b));
    assert_eq!(
        a.variables()["layer1.0.conv2.weight"].size(),
        vec![128, 4, 3, 3]
    );
}
