//! The ResNet family against torchvision 0.26 (ImageNet constructors) and python_ref/resnet_ref.py
//! (plain, shortcut A/C, CIFAR), forward, gradients, and one training step with BatchNorm.

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
