//! The ResNet family against torchvision 0.26 (ImageNet constructors) and python_ref/resnet_ref.py
//! (plain, shortcut A/C, CIFAR), forward, gradients, and one training step with BatchNorm.

mod common;

use residual::models::resnet::TORCHVISION_ARCHS;
use tch::Device;

#[test]
fn torchvision_resnets_match_on_cpu() {
    let outcomes = common::check_module("torchvision.ResNet", Device::Cpu);
    for arch in TORCHVISION_ARCHS {
        let case = format!("tv_{arch}_224_eval");
        assert!(
            outcomes.iter().any(|o| o.case == case),
            "{case} missing from the manifest"
        );
    }
    let steps = outcomes.iter().filter(|o| o.after_step.is_some()).count();
    assert!(steps >= 2, "training-step cases missing");
}

#[test]
fn plain_and_shortcut_variants_match_on_cpu() {
    let outcomes = common::check_module("ResNetVariant", Device::Cpu);
    for case in [
        "resnet18_plain",
        "resnet34_plain",
        "resnet18_shortcut_a",
        "resnet50_shortcut_c",
    ] {
        assert!(outcomes.iter().any(|o| o.case == case), "{case} missing");
    }
}

#[test]
fn cifar_resnets_match_on_cpu() {
    let outcomes = common::check_module("CifarResNet", Device::Cpu);
    for depth in [20, 32, 44, 56, 110] {
        for variant in ["a", "b", "c"] {
            let case = format!("cifar_resnet{depth}_{variant}");
            assert!(outcomes.iter().any(|o| o.case == case), "{case} missing");
        }
        assert!(outcomes
            .iter()
            .any(|o| o.case == format!("cifar_plain{depth}")));
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
