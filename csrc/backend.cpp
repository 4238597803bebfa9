// Global libtorch switches that tch 0.24 does not expose. Every entry point catches C++ exceptions
// and reports failure through its return value, so nothing unwinds into Rust.
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <torch/headeronly/version.h>

#include <dlfcn.h>

#include <cstring>

extern "C" {

// Returns 0 on success, -1 if libtorch threw.
int residual_set_flag(int flag, int value) {
  try {
    auto& ctx = at::globalContext();
    switch (flag) {
      case 0: ctx.setAllowTF32CuDNN(value != 0); return 0;
      case 1: ctx.setAllowTF32CuBLAS(value != 0); return 0;
      case 2: ctx.setDeterministicAlgorithms(value != 0, false); return 0;
      case 3: ctx.setDeterministicCuDNN(value != 0); return 0;
      case 4: ctx.setBenchmarkCuDNN(value != 0); return 0;
      default: return -1;
    }
  } catch (...) {
    return -1;
  }
}

// Returns 0 or 1 for the flag's value, -1 on failure.
int residual_get_flag(int flag) {
  try {
    auto& ctx = at::globalContext();
    switch (flag) {
      case 0: return ctx.allowTF32CuDNN() ? 1 : 0;
      case 1: return ctx.allowTF32CuBLAS() ? 1 : 0;
      case 2: return ctx.deterministicAlgorithms() ? 1 : 0;
      case 3: return ctx.deterministicCuDNN() ? 1 : 0;
      case 4: return ctx.benchmarkCuDNN() ? 1 : 0;
      default: return -1;
    }
  } catch (...) {
    return -1;
  }
}

// The dtype CUDA autocast computes in: 0 = float16 (libtorch's default), 1 = bfloat16.
// Returns 0 on success, -1 on failure.
int residual_set_autocast_cuda_dtype(int dtype) {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, dtype == 1 ? at::kBFloat16 : at::kHalf);
    return 0;
  } catch (...) {
    return -1;
  }
}

// 0 = float16, 1 = bfloat16, 2 = other, -1 on failure.
int residual_autocast_cuda_dtype() {
  try {
    auto t = at::autocast::get_autocast_dtype(at::kCUDA);
    return t == at::kHalf ? 0 : (t == at::kBFloat16 ? 1 : 2);
  } catch (...) {
    return -1;
  }
}

// 1 when CUDA autocast is on in this thread, 0 when off, -1 on failure.
int residual_autocast_cuda_enabled() {
  try {
    return at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// The libtorch version these headers belong to, e.g. "2.11.0".
const char* residual_torch_header_version() { return TORCH_VERSION; }

// Writes the name of CUDA device `index` (driver API, loaded at run time) into `buf`. Returns 0 on
// success, -1 when the driver or the device is missing.
int residual_cuda_device_name(int index, char* buf, int len) {
  if (len <= 0) return -1;
  void* lib = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_LAZY);
  if (lib == nullptr) return -1;
  using InitFn = int (*)(unsigned int);
  using GetFn = int (*)(int*, int);
  using NameFn = int (*)(char*, int, int);
  auto init = reinterpret_cast<InitFn>(dlsym(lib, "cuInit"));
  auto get = reinterpret_cast<GetFn>(dlsym(lib, "cuDeviceGet"));
  auto name = reinterpret_cast<NameFn>(dlsym(lib, "cuDeviceGetName"));
  int device = 0;
  if (init == nullptr || get == nullptr || name == nullptr || init(0) != 0 ||
      get(&device, index) != 0 || name(buf, len, device) != 0) {
    return -1;
  }
  buf[len - 1] = '\0';
  return 0;
}

}  // extern "C"

// ---- Inference: c10::InferenceMode and oneDNN's fused convolutions ----------------------------
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>

#include <string>

namespace {
thread_local std::string last_error;

int fail(const std::exception& e) {
  last_error = e.what();
  return -1;
}
}  // namespace

extern "C" {

// The message of the last failure of a residual_* call in this thread.
const char* residual_last_error() { return last_error.c_str(); }

// Enters c10::InferenceMode (no autograd recording, no version counters) in this thread; the guard
// is released by residual_inference_mode_exit, in the same thread. Null on failure.
void* residual_inference_mode_enter() {
  try {
    return new c10::InferenceMode(true);
  } catch (const std::exception& e) {
    fail(e);
    return nullptr;
  }
}

void residual_inference_mode_exit(void* guard) { delete static_cast<c10::InferenceMode*>(guard); }

// 1 when this thread is in inference mode, 0 when not.
int residual_inference_mode_enabled() { return c10::InferenceMode::is_enabled() ? 1 : 0; }

// `relu?(conv2d(x, w, b) [+ other])` as one oneDNN op: mkldnn::_convolution_pointwise (its binary
// form when `other` is given). `geometry` holds padding, stride and dilation, two each. `w` may be
// a weight reordered by mkldnn_reorder_conv2d_weight. Writes a new tensor to `out`; 0 on success.
int residual_conv_pointwise(const at::Tensor* x, const at::Tensor* w, const at::Tensor* b,
                            const int64_t* geometry, int64_t groups, int relu,
                            const at::Tensor* other, at::Tensor** out) {
  try {
    std::vector<int64_t> padding{geometry[0], geometry[1]};
    std::vector<int64_t> stride{geometry[2], geometry[3]};
    std::vector<int64_t> dilation{geometry[4], geometry[5]};
    c10::IValue bias = b == nullptr ? c10::IValue() : c10::IValue(*b);
    c10::IValue unary_scalars(c10::impl::GenericList(c10::OptionalType::create(c10::NumberType::get())));
    torch::jit::Stack stack;
    if (other == nullptr) {
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
          "mkldnn::_convolution_pointwise", "");
      stack = {*x, *w, bias, padding, stride, dilation, groups,
               std::string(relu ? "relu" : "none"), unary_scalars, c10::IValue()};
      op.callBoxed(&stack);
    } else {
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
          "mkldnn::_convolution_pointwise", "binary");
      stack = {*x, *other, *w, bias, padding, stride, dilation, groups, std::string("add"),
               c10::IValue(at::Scalar(1.0)),
               relu ? c10::IValue(std::string("relu")) : c10::IValue(), unary_scalars,
               c10::IValue()};
      op.callBoxed(&stack);
    }
    *out = new at::Tensor(stack.at(0).toTensor());
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

}  // extern "C"

// ---- Inference: the residual addition written into the shortcut's memory ----------------------
extern "C" {

// `relu?(conv2d(x, w, b) + other)` computed into `other`'s own memory by oneDNN's sum post-op
// (mkldnn::_convolution_pointwise_.binary), where nothing else can see that memory: `other` is the
// only handle on its tensor and on its storage, channels-last, with more than one pixel, `w` packed
// and `groups` 1. The out-of-place form (residual_conv_pointwise with `other`) allocates its output
// and, in libtorch 2.11, copies that uninitialised buffer into channels-last order first: ~9% of a
// batch-32 resnet50. Returns 1 and writes `other` (the same tensor) to `out` when done in place, 0
// when it does not apply (nothing written, `other` untouched), -1 on failure.
int residual_conv_pointwise_add_(const at::Tensor* x, const at::Tensor* w, const at::Tensor* b,
                                 const int64_t* geometry, int64_t groups, int relu,
                                 const at::Tensor* other, at::Tensor** out) {
  try {
    if (groups != 1 || !w->is_mkldnn() || other->dim() != 4 || other->use_count() != 1 ||
        !other->has_storage() || other->storage().use_count() != 1 ||
        other->size(2) * other->size(3) < 2 ||
        !other->is_contiguous(at::MemoryFormat::ChannelsLast) ||
        other->scalar_type() != x->scalar_type()) {
      return 0;
    }
    std::vector<int64_t> padding{geometry[0], geometry[1]};
    std::vector<int64_t> stride{geometry[2], geometry[3]};
    std::vector<int64_t> dilation{geometry[4], geometry[5]};
    c10::IValue bias = b == nullptr ? c10::IValue() : c10::IValue(*b);
    c10::IValue unary_scalars(c10::impl::GenericList(c10::OptionalType::create(c10::NumberType::get())));
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(
        "mkldnn::_convolution_pointwise_", "binary");
    torch::jit::Stack stack{*other, *x, *w, bias, padding, stride, dilation, groups,
                            std::string("add"), c10::IValue(at::Scalar(1.0)),
                            relu ? c10::IValue(std::string("relu")) : c10::IValue(), unary_scalars,
                            c10::IValue()};
    op.callBoxed(&stack);
    stack.clear();
    *out = new at::Tensor(*other);
    return 1;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

// `x @ w.T + b` as oneDNN's linear (mkldnn::_linear_pointwise, what Inductor emits on the CPU) on a
// weight reordered once by residual_reorder_linear_weight. At the small batches of tabular
// models, MKL's sgemm spends most of its time copying (packing) the weight on every call; the
// reordered weight is packed once. Writes a new tensor to `out`; 0 on success.
int residual_linear_pointwise(const at::Tensor* x, const at::Tensor* w, const at::Tensor* b,
                              at::Tensor** out) {
  try {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
    c10::IValue bias = b == nullptr ? c10::IValue() : c10::IValue(*b);
    c10::IValue scalars(c10::impl::GenericList(c10::OptionalType::create(c10::NumberType::get())));
    torch::jit::Stack stack{*x, *w, bias, std::string("none"), scalars, std::string("")};
    op.callBoxed(&stack);
    *out = new at::Tensor(stack.at(0).toTensor());
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

// A dense float32 `[out, in]` weight in oneDNN's layout for inputs of `batch` rows
// (mkldnn::_reorder_linear_weight). Writes a new tensor to `out`; 0 on success.
int residual_reorder_linear_weight(const at::Tensor* w, int64_t batch, at::Tensor** out) {
  try {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_reorder_linear_weight", "");
    torch::jit::Stack stack{*w, c10::IValue(batch)};
    op.callBoxed(&stack);
    *out = new at::Tensor(stack.at(0).toTensor());
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

}  // extern "C"
