// CUDA streams and CUDA graphs for inference, which tch 0.24 does not expose. Compiled with
// RESIDUAL_WITH_CUDA when libtorch_cuda and the CUDA runtime headers are there (build.rs); without
// it every entry point fails with a message, so a CPU-only build links the same symbols. Every
// entry point catches C++ exceptions and reports failure through its return value (the message in
// residual_cuda_last_error), so nothing unwinds into Rust.
#include <stdexcept>
#include <string>

namespace {
thread_local std::string cuda_last_error;

int cuda_fail(const char* what) {
  cuda_last_error = what;
  return -1;
}
}  // namespace

#ifdef RESIDUAL_WITH_CUDA
// Only libtorch's exported functions and its device-generic guards (c10::StreamGuard,
// c10::DeviceGuard, c10::Stream::synchronize) are used, never the CUDA runtime directly: the
// binaries then need no libcudart of their own, only libc10_cuda and libtorch_cuda.
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

namespace {
// A CUDA graph and, while it captures, the guard that makes its side stream current.
struct Graph {
  at::cuda::CUDAGraph graph;
  std::optional<c10::StreamGuard> capturing;
  bool autocast_cache = true;
};

int check_device(int device) {
  auto count = c10::cuda::device_count();
  if (count == 0) return cuda_fail("no CUDA device is visible");
  if (device < 0 || device >= count) return cuda_fail("no such CUDA device");
  return 0;
}

// Workers' and warm-up streams are low priority; capture streams high priority, a separate
// round-robin pool, so a capture never shares a stream a worker keeps launching on.
c10::Stream pool_stream(int device, bool high_priority = false) {
  return c10::cuda::getStreamFromPool(high_priority, static_cast<c10::DeviceIndex>(device))
      .unwrap();
}

c10::Device cuda_device(int device) {
  return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
}
}  // namespace

extern "C" {

int residual_cuda_shim_built() { return 1; }

// Makes a stream of libtorch's pool on `device` this thread's current stream until
// residual_cuda_stream_exit (same thread). Null on failure.
void* residual_cuda_stream_enter(int device) {
  try {
    if (check_device(device) != 0) return nullptr;
    return new c10::StreamGuard(pool_stream(device));
  } catch (const std::exception& e) {
    cuda_fail(e.what());
    return nullptr;
  }
}

void residual_cuda_stream_exit(void* guard) { delete static_cast<c10::StreamGuard*>(guard); }

// Waits for the work queued on the guard's stream. 0 on success.
int residual_cuda_stream_synchronize(void* guard) {
  try {
    static_cast<c10::StreamGuard*>(guard)->current_stream().synchronize();
    return 0;
  } catch (const std::exception& e) {
    return cuda_fail(e.what());
  }
}

// The id of the guard's stream (distinct streams have distinct ids).
long long residual_cuda_stream_id(void* guard) {
  return static_cast<long long>(static_cast<c10::StreamGuard*>(guard)->current_stream().id());
}

// The id of this thread's current stream on `device` (the default stream unless a guard is set).
long long residual_cuda_current_stream_id(int device) {
  try {
    if (check_device(device) != 0) return 0;
    return static_cast<long long>(
        c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).id());
  } catch (const std::exception& e) {
    cuda_fail(e.what());
    return 0;
  }
}

// Waits for all work on `device`. 0 on success.
int residual_cuda_device_synchronize(int device) {
  try {
    if (check_device(device) != 0) return -1;
    c10::DeviceGuard guard(cuda_device(device));
    c10::cuda::device_synchronize();
    return 0;
  } catch (const std::exception& e) {
    return cuda_fail(e.what());
  }
}

// Waits for the work queued on this thread's current stream on `device`. 0 on success.
int residual_cuda_current_stream_synchronize(int device) {
  try {
    if (check_device(device) != 0) return -1;
    c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).unwrap().synchronize();
    return 0;
  } catch (const std::exception& e) {
    return cuda_fail(e.what());
  }
}

// A new, empty CUDA graph. Null on failure.
void* residual_cuda_graph_new() {
  try {
    return new Graph();
  } catch (const std::exception& e) {
    cuda_fail(e.what());
    return nullptr;
  }
}

void residual_cuda_graph_free(void* graph) { delete static_cast<Graph*>(graph); }

// Starts capturing the work this thread queues on `device` into `graph`: waits for this thread's
// current stream (not the device: another thread may be capturing), makes a side stream current (capture refuses the default stream) and begins a thread-local
// capture (other threads may keep using CUDA). The autocast weight cache is off while capturing,
// as torch.cuda.graph requires. 0 on success.
int residual_cuda_graph_capture_begin(void* graph, int device) {
  auto* g = static_cast<Graph*>(graph);
  try {
    if (check_device(device) != 0) return -1;
    c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).unwrap().synchronize();
    g->capturing.emplace(pool_stream(device, true));
    g->autocast_cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    return 0;
  } catch (const std::exception& e) {
    g->capturing.reset();
    at::autocast::set_autocast_cache_enabled(g->autocast_cache);
    return cuda_fail(e.what());
  }
}

// Ends the capture begun by residual_cuda_graph_capture_begin (also after the captured work
// failed, to leave capture mode) and restores the thread's stream. 0 on success.
int residual_cuda_graph_capture_end(void* graph) {
  auto* g = static_cast<Graph*>(graph);
  int rc = 0;
  try {
    g->graph.capture_end();
  } catch (const std::exception& e) {
    rc = cuda_fail(e.what());
  }
  g->capturing.reset();
  at::autocast::set_autocast_cache_enabled(g->autocast_cache);
  return rc;
}

// Replays the captured work on this thread's current stream. 0 on success.
int residual_cuda_graph_replay(void* graph) {
  try {
    static_cast<Graph*>(graph)->graph.replay();
    return 0;
  } catch (const std::exception& e) {
    return cuda_fail(e.what());
  }
}

}  // extern "C"

#else  // no CUDA headers: the same entry points, each failing with why.

namespace {
const char* const kNoCuda =
    "residual was built without its CUDA shim (no libtorch_cuda or CUDA headers at build time)";
}

extern "C" {
int residual_cuda_shim_built() { return 0; }
void* residual_cuda_stream_enter(int) {
  cuda_fail(kNoCuda);
  return nullptr;
}
void residual_cuda_stream_exit(void*) {}
int residual_cuda_stream_synchronize(void*) { return cuda_fail(kNoCuda); }
long long residual_cuda_stream_id(void*) { return 0; }
long long residual_cuda_current_stream_id(int) {
  cuda_fail(kNoCuda);
  return 0;
}
int residual_cuda_device_synchronize(int) { return cuda_fail(kNoCuda); }
int residual_cuda_current_stream_synchronize(int) { return cuda_fail(kNoCuda); }
void* residual_cuda_graph_new() {
  cuda_fail(kNoCuda);
  return nullptr;
}
void residual_cuda_graph_free(void*) {}
int residual_cuda_graph_capture_begin(void*, int) { return cuda_fail(kNoCuda); }
int residual_cuda_graph_capture_end(void*) { return cuda_fail(kNoCuda); }
int residual_cuda_graph_replay(void*) { return cuda_fail(kNoCuda); }
}  // extern "C"

#endif

extern "C" {
// The message of the last failure of a residual_cuda_* call in this thread.
const char* residual_cuda_last_error() { return cuda_last_error.c_str(); }
}
