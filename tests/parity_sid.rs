//! SiDResidualBlock and the full SiD classifier against the original PyTorch model.

mod common;

use tch::Device;

#[test]
fn sid_residual_block_matches_pytorch_on_cpu() {
    common::check_module("SiDResidualBlock", Device::Cpu);
}

#[test]
fn sid_classifier_matches_pytorch_on_cpu() {
    let outcomes = common::check_module("SiDClassifier", Device::Cpu);
    common::assert_ran(
        &outcomes,
        [
            "sid_classifier_default",
            "sid_classifier_small_train_nodrop",
        ],
    );
}

#[test]
fn sid_matches_cpu_references_on_cuda() {
    if let Some(device) = common::cuda_or_skip() {
        common::check_module("SiDResidualBlock", device);
        common::check_module("SiDClassifier", device);
    }
}
