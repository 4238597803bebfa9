//! The inference path (`residual::models::for_inference`, every default option: batch norms
//! folded, convolutions packed for oneDNN with ReLU and residual additions fused, inference mode)
//! gives the eval-mode outputs of the model as built, and training is refused.

mod common;

use residual::backend::{inference_mode, AutocastDtype, InferenceMode};
use residual::models::layers::conv3x3;
use residual::models::{for_inference, InferenceOptions, Inputs, Model};
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
    let fast = for_inference(copy, &Default::default()).unwrap();
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
    // The forward ran under c10::InferenceMode: its output is an inference tensor.
    let out = tch::no_grad(|| fast.forward_named(&inputs, false).unwrap());
    assert!(
        out.is_inference(),
        "{json}: the fast path ran outside inference mode"
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
    let cases = [(
        r#"{"arch": "sid_residual_block", "hidden_size": 16, "intermediate_size": 32}"#,
        vec![3, 16],
    )];
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

/// The SiD classifier's inference form runs its linear layers through oneDNN on weights packed
/// for the first call's row count: the same outputs within 1e-4 at that and at other batch sizes,
/// and a training forward refused.
#[test]
fn sid_classifier_linears_run_packed_and_match() {
    let json = r#"{"arch": "sid_classifier", "num_categories_list": [3, 7, 5], "num_numerical_features": 4,
        "num_text_features": 2, "text_input_size": 24, "embedding_size": 16, "hidden_size": 48,
        "intermediate_size": 80, "num_hidden_layers": 3, "num_labels": 5}"#;
    let (_vs, plain, _fast_vs, fast, norms) = twins(json);
    assert_eq!(norms, 0);
    let config = ModelConfig::from_json(json).unwrap();
    for batch in [4, 1, 7] {
        let settings = residual::train::BenchSettings::one_call(batch, 1);
        let inputs = residual::train::bench_inputs(&config, &settings).unwrap();
        let diff = relative_difference(plain.as_ref(), fast.as_ref(), &inputs);
        assert!(diff <= 1e-4, "batch {batch}: changed by {diff:.2e}");
        assert!(fast.forward_named(&inputs, true).is_err());
    }
}

/// ConvSDS's inference form composes each layer's two convolutions into one (packed for oneDNN
/// with the ReLU fused, or not): the same outputs within 1e-4, batched or not, on odd sizes, and
/// a training forward refused.
#[test]
fn conv_sds_layers_fold_their_two_convolutions_into_one() {
    let cases = [
        (
            r#"{"arch": "conv_sds_layer", "input_size": 8, "hidden_dim": 6}"#,
            vec![2, 8, 6],
        ),
        (
            r#"{"arch": "conv_sds_layer", "input_size": 5, "hidden_dim": 3}"#,
            vec![5, 3],
        ),
        (
            r#"{"arch": "conv_sds_head", "n_layers": 3, "input_size": 64, "hidden_size": 97}"#,
            vec![3, 64, 97],
        ),
        (
            r#"{"arch": "conv_sds_head", "n_layers": 2, "input_size": 33, "hidden_size": 40, "num_labels": 3}"#,
            vec![33, 40],
        ),
    ];
    for (json, shape) in cases {
        tch::manual_seed(3);
        let mut inputs = Inputs::new();
        inputs.insert(
            "input".into(),
            Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)),
        );
        let (vs, plain, _fast_vs, _, _) = twins(json);
        for pack_mkldnn in [true, false] {
            let mut copy_vs = VarStore::new(Device::Cpu);
            let copy = ModelConfig::from_json(json)
                .unwrap()
                .build(copy_vs.root())
                .unwrap();
            copy_vs.copy(&vs).unwrap();
            let opts = InferenceOptions {
                pack_mkldnn,
                ..Default::default()
            };
            let fast = for_inference(copy, &opts).unwrap();
            // Twice: the first call packs the weight, the second runs on the packed copy.
            for _ in 0..2 {
                let diff = relative_difference(plain.as_ref(), fast.as_ref(), &inputs);
                println!("{json} {shape:?} pack {pack_mkldnn}: {diff:.2e}");
                assert!(diff <= 1e-4, "{json} {shape:?}: off by {diff:.2e}");
            }
            // Refused only where the convolutions were composed.
            let err = fast.forward_named(&inputs, true).unwrap_err();
            assert!(format!("{err:#}").contains("folded"), "{json}: {err:#}");
        }
    }
}

#[test]
fn inference_mode_guard_makes_inference_tensors_that_autograd_refuses() {
    assert!(!InferenceMode::is_enabled());
    let t = {
        let _guard = InferenceMode::new().unwrap();
        assert!(InferenceMode::is_enabled());
        Tensor::ones([3], (Kind::Float, Device::Cpu)) * 2.0
    };
    assert!(
        !InferenceMode::is_enabled(),
        "the guard did not end inference mode"
    );
    assert!(t.is_inference());
    assert!(!Tensor::ones([3], (Kind::Float, Device::Cpu)).is_inference());
    // Autograd would save `t` to differentiate the product with respect to `w`; libtorch refuses.
    let w = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let err = w.f_mul(&t).unwrap_err().to_string();
    assert!(err.contains("Inference tensors"), "{err}");
    // The closure form.
    let u =
        inference_mode(|| tch::no_grad(|| Tensor::ones([1], (Kind::Float, Device::Cpu)))).unwrap();
    assert!(u.is_inference());
}

/// max|got - want| / max|want|.
fn relative(got: &Tensor, want: &Tensor) -> f64 {
    (got - want).abs().max().double_value(&[]) / want.abs().max().double_value(&[])
}

#[test]
fn packed_convolution_fuses_bias_addition_and_relu() {
    tch::manual_seed(2);
    let vs = VarStore::new(Device::Cpu);
    let mut conv = conv3x3(vs.root() / "conv", 8, 16, 2, 1, 1);
    conv.bs = Some(Tensor::randn([16], (Kind::Float, Device::Cpu)));
    // 9x9 maps, and 1x1 ones, where oneDNN cannot fuse the addition and it runs after the conv.
    for side in [9, 1] {
        let x = Tensor::randn([2, 8, side, side], (Kind::Float, Device::Cpu));
        let out_side = (side - 1) / 2 + 1;
        let other = Tensor::randn([2, 16, out_side, out_side], (Kind::Float, Device::Cpu));
        let plain = tch::no_grad(|| (x.apply(&*conv) + &other).relu());
        let mut packed = conv3x3(vs.root() / "packed", 8, 16, 2, 1, 1);
        packed.ws = conv.ws.shallow_clone();
        packed.bs = conv.bs.as_ref().map(Tensor::shallow_clone);
        assert!(!packed.is_packed());
        packed.pack();
        assert!(packed.is_packed(), "no oneDNN in this libtorch?");
        let got = tch::no_grad(|| packed.forward_fused(&x, true, Some(&other)).unwrap());
        let diff = relative(&got, &plain);
        println!("{side}x{side}: fused {diff:.2e}");
        assert!(diff <= 1e-5, "{side}x{side}: fused conv off by {diff:.2e}");
        let unfused = tch::no_grad(|| x.apply(&packed));
        let diff = relative(&unfused, &tch::no_grad(|| x.apply(&*conv)));
        assert!(diff <= 1e-5, "{side}x{side}: packed conv off by {diff:.2e}");
    }
}

#[test]
fn packed_convolution_adds_into_an_unshared_shortcut_and_leaves_a_shared_one() {
    tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let mut conv = conv3x3(vs.root() / "conv", 8, 16, 1, 1, 1);
    conv.bs = Some(Tensor::randn([16], (Kind::Float, Device::Cpu)));
    // Channels-last (NHWC) memory of its own (not a view), as the packed convolutions write.
    let nhwc = |c: i64| {
        let opts = (Kind::Float, Device::Cpu);
        let mut t = Tensor::empty_strided([2, c, 6, 6], [36 * c, 1, 6 * c, c], opts);
        t.copy_(&Tensor::randn([2, c, 6, 6], opts));
        t
    };
    let x = nhwc(8);
    let shortcut = || nhwc(16);
    let mut packed = conv3x3(vs.root() / "packed", 8, 16, 1, 1, 1);
    packed.ws = conv.ws.shallow_clone();
    packed.bs = conv.bs.as_ref().map(Tensor::shallow_clone);
    packed.pack();
    tch::no_grad(|| {
        // The only handle: the sum lands in the shortcut's own memory.
        let other = shortcut();
        let want = (x.apply(&*conv) + &other).relu();
        let at = other.data_ptr();
        let got = packed.forward_fused_into(&x, true, other).unwrap();
        assert_eq!(got.data_ptr(), at, "not computed in place");
        let diff = relative(&got, &want);
        assert!(diff <= 1e-5, "in place: off by {diff:.2e}");
        // Shared (a second handle, or a view): a new tensor, the shortcut unchanged.
        for view in [false, true] {
            let other = shortcut();
            let kept = if view {
                other.narrow(0, 0, 2)
            } else {
                other.shallow_clone()
            };
            let before = other.copy();
            let want = (x.apply(&*conv) + &other).relu();
            let got = packed.forward_fused_into(&x, true, other).unwrap();
            assert_ne!(
                got.data_ptr(),
                kept.data_ptr(),
                "view {view}: wrote into a shared one"
            );
            assert!(
                kept.equal(&before),
                "view {view}: the shared shortcut changed"
            );
            let diff = relative(&got, &want);
            assert!(diff <= 1e-5, "view {view}: off by {diff:.2e}");
        }
    });
}

#[test]
fn options_read_from_json_with_defaults() {
    let opts: InferenceOptions = serde_json::from_str("{}").unwrap();
    assert_eq!(opts, InferenceOptions::default());
    assert!(opts.pack_mkldnn && opts.inference_mode && opts.cudnn_benchmark);
    let opts: InferenceOptions =
        serde_json::from_str(r#"{"threads": 1, "cuda_dtype": "bf16", "channels_last": true}"#)
            .unwrap();
    assert_eq!(opts.threads, Some(1));
    assert_eq!(opts.cuda_dtype, Some(AutocastDtype::Bf16));
    assert!(serde_json::from_str::<InferenceOptions>(r#"{"thread": 1}"#).is_err());
}

/// Every option off but inference mode gives the folded model, unpacked; channels-last inputs
/// the same numbers.
#[test]
fn unpacked_and_channels_last_forms_match_too() {
    let json = r#"{"arch": "resnet18", "num_classes": 10}"#;
    let (vs, plain, _fast_vs, _fast, _) = twins(json);
    let inputs = images([1, 3, 32, 32]);
    for opts in [
        InferenceOptions {
            pack_mkldnn: false,
            ..Default::default()
        },
        InferenceOptions {
            channels_last: true,
            ..Default::default()
        },
    ] {
        let mut copy_vs = VarStore::new(Device::Cpu);
        let copy = ModelConfig::from_json(json)
            .unwrap()
            .build(copy_vs.root())
            .unwrap();
        copy_vs.copy(&vs).unwrap();
        let fast = for_inference(copy, &opts).unwrap();
        let diff = relative_difference(plain.as_ref(), fast.as_ref(), &inputs);
        assert!(diff <= 1e-4, "{opts:?}: off by {diff:.2e}");
    }
}

/// On CUDA: fp32 with every default matches the CPU model; fp16 and bf16 stay close and come
/// back as float32.
#[test]
fn cuda_fast_path_matches_in_fp32_and_stays_close_in_half() {
    let Some(device) = common::cuda_or_skip() else {
        return;
    };
    let json = r#"{"arch": "resnet18", "num_classes": 10}"#;
    let (vs, plain, _fast_vs, _fast, _) = twins(json);
    let inputs = images([2, 3, 64, 64]);
    let want = tch::no_grad(|| plain.forward_named(&inputs, false).unwrap());
    residual::backend::strict_fp32().unwrap();
    for (dtype, tol) in [
        (None, 1e-4),
        (Some(AutocastDtype::Fp16), 2e-2),
        (Some(AutocastDtype::Bf16), 1e-1),
    ] {
        let mut cuda_vs = VarStore::new(device);
        let model = ModelConfig::from_json(json)
            .unwrap()
            .build(cuda_vs.root())
            .unwrap();
        cuda_vs.copy(&vs).unwrap();
        let opts = InferenceOptions {
            cuda_dtype: dtype,
            channels_last: true,
            ..Default::default()
        };
        let fast = for_inference(model, &opts).unwrap();
        let on_device: Inputs = inputs
            .iter()
            .map(|(k, t)| (k.clone(), t.to_device(device)))
            .collect();
        let got = fast.forward_named(&on_device, false).unwrap();
        assert_eq!(got.kind(), Kind::Float);
        let diff = relative(&got.to_device(Device::Cpu), &want);
        println!("cuda {dtype:?}: {diff:.2e}");
        assert!(diff <= tol, "cuda {dtype:?}: off by {diff:.2e}");
    }
    residual::backend::set_flag(residual::backend::Flag::BenchmarkCudnn, false).unwrap();
}

/// A TorchScript file that is not there is an error naming it, frozen or not, not a crash.
#[test]
fn torch_script_load_reports_a_missing_file() {
    let path = std::path::Path::new("target/no-such-script.pt");
    for optimize in [true, false] {
        let err = residual::models::TorchScript::load(path, optimize).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("no-such-script.pt"), "{text}");
    }
}
