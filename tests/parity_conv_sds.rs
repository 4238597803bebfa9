//! ConvSDSLayer / ConvSDSHead against the seed's PyTorch code (python_ref/reference.py).

mod common;

use tch::Device;

#[test]
fn conv_sds_layer_matches_pytorch_on_cpu() {
    common::check_module("ConvSDSLayer", Device::Cpu);
}

#[test]
fn conv_sds_head_matches_pytorch_on_cpu() {
    let outcomes = common::check_module("ConvSDSHead", Device::Cpu);
    common::assert_ran(
        &outcomes,
        [
            "conv_sds_head_default",
            "conv_sds_head_roberta_large",
            "conv_sds_head_small_train",
            "conv_sds_head_qa_span_loss",
        ],
    );
    let qa = outcomes
        .iter()
        .find(|o| o.case == "conv_sds_head_qa_span_loss")
        .unwrap();
    for key in ["start_logits", "end_logits", "loss"] {
        assert!(
            qa.forward_eager.contains_key(key),
            "span case did not compare {key}"
        );
    }
}

#[test]
fn conv_sds_matches_cpu_references_on_cuda() {
    if let Some(device) = common::cuda_or_skip() {
        common::check_module("ConvSDSLayer", device);
        common::check_module("ConvSDSHead", device);
    }
}
