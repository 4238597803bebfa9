// TorchScript from Rust: load a saved module, freeze it and run torch::jit::optimize_for_inference
// on it (what PyTorch's `torch.jit.optimize_for_inference(torch.jit.freeze(m))` does), then call
// its forward. tch 0.24 loads modules but has neither pass. Every entry point catches C++
// exceptions and reports them through its return value and residual_jit_last_error.
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>
#include <c10/core/InferenceMode.h>

#include <string>
#include <vector>

namespace {
thread_local std::string jit_error;

int jit_fail(const std::exception& e) {
  jit_error = e.what();
  return -1;
}
}  // namespace

extern "C" {

const char* residual_jit_last_error() { return jit_error.c_str(); }

// Loads the TorchScript module at `path` on the CPU in eval mode; with `optimize`, frozen
// (parameters folded into the graph as constants) and optimised for inference (conv-BN folding,
// oneDNN weight prepacking and conv/linear fusions where libtorch has them). Writes a new module
// to `out`; 0 on success.
int residual_jit_load(const char* path, int optimize, void** out) {
  try {
    auto module = torch::jit::load(path, c10::Device(c10::kCPU));
    module.eval();
    if (optimize != 0) {
      auto frozen = torch::jit::freeze(module);
      module = torch::jit::optimize_for_inference(frozen);
    }
    *out = new torch::jit::Module(std::move(module));
    return 0;
  } catch (const std::exception& e) {
    return jit_fail(e);
  }
}

void residual_jit_free(void* module) { delete static_cast<torch::jit::Module*>(module); }

// `module.forward(*inputs)` under c10::InferenceMode; its output must be a tensor. Writes a new
// tensor to `out`; 0 on success.
int residual_jit_forward(void* module, const at::Tensor* const* inputs, int n, at::Tensor** out) {
  try {
    c10::InferenceMode guard;
    std::vector<c10::IValue> args;
    args.reserve(n);
    for (int i = 0; i < n; ++i) args.emplace_back(*inputs[i]);
    auto result = static_cast<torch::jit::Module*>(module)->forward(std::move(args));
    *out = new at::Tensor(result.toTensor());
    return 0;
  } catch (const std::exception& e) {
    return jit_fail(e);
  }
}

}  // extern "C"
