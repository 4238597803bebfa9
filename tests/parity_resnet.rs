//! The ResNet family against torchvision 0.26 (ImageNet constructors) and python_ref/resnet_ref.py
//! (plain, shortcut A/C, CIFAR), forward, gradients, and one training step with BatchNorm; on
//! images of any size PyTorch accepts (python_ref/shape_cases.py).

mod common;

use residual::models::resnet::TORCHVISION;
use residual::parity::{CaseSpec, Loss, SgdSpec};
use tch::Device;

#[test]
fn torchvision_resnets_match_on_cpu() {
    let outcomes = common::check_module("torchvision.ResNet", Device::Cpu);
    common::assert_ran(
        &outcomes,
        TORCHVISION
            .iter()
            .map(|c| format!("tv_{}_224_eval", c.name)),
    );
    let steps = outcomes.iter().filter(|o| o.after_step.is_some()).count();
    assert!(steps >= 2, "training-step cases missing");
    assert!(
        outcomes.iter().any(|o| o.forward_torchscript.is_some()),
        "no torchvision case compared against TorchScript"
    );
    // A Fashion-MNIST-style net (resnet18(num_classes=10), 1-channel stem, 28x28 images): the very
    // logits PyTorch computes, on the same kernels.
    let case = "shape_tv_resnet18_1ch_28x28_b4_eval";
    let fashion = outcomes.iter().find(|o| o.case == case);
    let fashion = fashion.unwrap_or_else(|| panic!("{case} missing from the manifest"));
    assert_eq!(fashion.forward().abs, 0.0, "{case}: logits differ");
}

/// The shape grid of python_ref/shape_cases.py: each ResNet family runs (and is compared above) on
/// images of 1x1, 2x2, 7x7, 28x28 and odd non-square sizes, batch 1 and more, eval and train.
#[test]
fn shape_grid_covers_every_resnet_family() {
    let manifest = common::manifest();
    let dilated = |c: &CaseSpec| {
        let d = &c.config["replace_stride_with_dilation"];
        d.as_array().is_some_and(|d| d.contains(&true.into()))
    };
    let bottleneck = |c: &CaseSpec| c.config["block"] == "bottleneck";
    type Member<'a> = &'a dyn Fn(&CaseSpec) -> bool;
    let families: [(&str, Member); 4] = [
        ("basic", &|c| c.config["arch"] == "resnet18"),
        ("bottleneck", &|c| bottleneck(c) && !dilated(c)),
        ("dilated", &|c| bottleneck(c) && dilated(c)),
        ("cifar", &|c| c.module == "CifarResNet"),
    ];
    for (family, member) in families {
        let cases: Vec<&CaseSpec> = manifest.cases.iter().filter(|c| member(c)).collect();
        let has = |what: &str, f: &dyn Fn(&[i64], bool) -> bool| {
            let found = cases.iter().any(|c| f(&c.inputs[0].shape, c.train()));
            assert!(found, "{family}: no case with {what}");
        };
        has("batch 1", &|s, _| s[0] == 1);
        has("batch > 1 in training mode", &|s, train| s[0] > 1 && train);
        has("an odd, non-square image", &|s, _| {
            s[2] != s[3] && s[2] % 2 == 1
        });
        has("a side under 8", &|s, _| s[2] < 8 || s[3] < 8);
        match family {
            "dilated" => has("2x2", &|s, _| s[2..] == [2, 2]),
            _ => has("1x1", &|s, _| s[2..] == [1, 1]),
        }
        if family != "dilated" && family != "bottleneck" {
            has("7x7", &|s, _| s[2..] == [7, 7]);
            has("28x28", &|s, _| s[2..] == [28, 28]);
        }
    }
}

#[test]
fn plain_and_shortcut_variants_match_on_cpu() {
    let outcomes = common::check_module("ResNetVariant", Device::Cpu);
    common::assert_ran(
        &outcomes,
        [
            "resnet18_plain",
            "resnet34_plain",
            "resnet18_shortcut_a",
            "resnet50_shortcut_c",
        ],
    );
}

#[test]
fn cifar_resnets_match_on_cpu() {
    let outcomes = common::check_module("CifarResNet", Device::Cpu);
    for depth in [20, 32, 44, 56, 110] {
        let resnets = ["a", "b", "c"].map(|v| format!("cifar_resnet{depth}_{v}"));
        common::assert_ran(&outcomes, resnets);
        common::assert_ran(&outcomes, [format!("cifar_plain{depth}")]);
    }
}

#[test]
fn resnets_match_cpu_references_on_cuda() {
    if let Some(device) = common::cuda_or_skip() {
        for module in ["torchvision.ResNet", "ResNetVariant", "CifarResNet"] {
            common::check_module(module, device);
        }
    }
}

/// The training-step cases exercise every setting of the trainer's optimizer and loss.
#[test]
fn training_step_cases_cover_the_trainers_optimizer_and_loss() {
    let manifest = common::manifest();
    let steps: Vec<_> = manifest
        .cases
        .iter()
        .filter_map(|c| c.sgd.map(|s| (c, s)))
        .collect();
    assert!(steps.len() >= 4, "{} training-step cases", steps.len());
    assert!(
        steps.iter().all(|(_, s)| s.steps >= 2),
        "momentum buffers unused"
    );
    let with = |f: &dyn Fn(&CaseSpec, &SgdSpec) -> bool| steps.iter().any(|(c, s)| f(c, s));
    assert!(with(&|_, s| s.momentum > 0.0
        && s.weight_decay > 0.0
        && s.decay_norm_and_bias));
    assert!(with(&|_, s| s.momentum > 0.0
        && s.weight_decay > 0.0
        && !s.decay_norm_and_bias));
    assert!(with(&|_, s| s.momentum == 0.0 && s.weight_decay > 0.0));
    assert!(with(&|c, _| c.loss == Loss::WeightedSum));
    assert!(with(
        &|c, _| c.loss == Loss::CrossEntropy && c.label_smoothing.unwrap_or(0.0) > 0.0
    ));
    assert!(with(
        &|c, _| c.loss == Loss::CrossEntropy && c.label_smoothing == Some(0.0)
    ));
}
