//! Channels-last (NHWC) memory order for 4-D tensors, `torch.channels_last`'s twin.

use tch::Tensor;

/// The same values in channels-last (NHWC) memory order, still indexed `[N, C, H, W]`; libtorch
/// picks its channels-last kernels from these strides (tch has no memory-format API).
///
/// The strides are exactly those of PyTorch's `t.to(memory_format=torch.channels_last)`, also
/// for one channel, where a permuted copy would keep NCHW strides.
pub fn channels_last(t: &Tensor) -> Tensor {
    let size = t.size();
    let [_, c, h, w] = size[..] else {
        return t.shallow_clone();
    };
    let strides = [h * w * c, 1, w * c, c];
    if t.stride() == strides {
        return t.shallow_clone();
    }
    let mut out = Tensor::empty_strided(&size, strides, (t.kind(), t.device()));
    out.copy_(t);
    out
}

/// Puts the 4-D variables of `vs` (convolution weights) in channels-last order, in place.
pub(super) fn vars_channels_last(vs: &tch::nn::VarStore) {
    tch::no_grad(|| {
        for var in vs.variables().values().filter(|t| t.dim() == 4) {
            var.shallow_clone().set_data(&channels_last(var));
        }
    });
}
