// c10d process groups for data-parallel training: a TCPStore rendezvous, then ProcessGroupGloo
// (CPU) or ProcessGroupNCCL (CUDA), with allreduce, broadcast and barrier. Gloo is compiled only
// with RESIDUAL_WITH_GLOO (gloo's headers found), NCCL only with RESIDUAL_WITH_NCCL (nccl.h and
// libtorch_cuda found); the collective code itself is libtorch's. Every entry point catches C++
// exceptions and returns them as a message, so nothing unwinds into Rust. SyncBatchNorm is a
// custom autograd function here: its forward and backward each run one collective. The
// gradient reducer allreduces buckets from autograd hooks while the backward runs, as DDP's.
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#ifdef RESIDUAL_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef RESIDUAL_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank;
  int world;
  std::string store_addr;
  std::chrono::milliseconds timeout;
};

void write_error(char* buf, int len, const std::string& msg) {
  if (buf == nullptr || len <= 0) return;
  std::size_t n = std::min<std::size_t>(msg.size(), static_cast<std::size_t>(len - 1));
  std::memcpy(buf, msg.data(), n);
  buf[n] = '\0';
}

std::string hostname() {
  char buf[256] = {0};
  if (gethostname(buf, sizeof(buf) - 1) != 0) return "?";
  return buf;
}

// Whether process `pid` has exited: gone, or a zombie its parent has not reaped yet.
bool exited(long pid) {
  if (pid <= 0) return false;
  if (kill(static_cast<pid_t>(pid), 0) != 0) return errno == ESRCH;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z';
}

std::string pid_key(int rank) { return "residual/pid/" + std::to_string(rank); }

std::string as_string(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }

// Which peers look dead after a failed collective: rank 0 when its store no longer answers,
// else the ranks on this host whose process is gone. Every rank publishes "host pid" at start.
std::string diagnose(Group& g) {
  std::ostringstream out;
  try {
    g.store->setTimeout(std::chrono::milliseconds(2000));
    std::vector<int> dead;
    std::vector<int> remote;
    std::string here = hostname();
    for (int r = 0; r < g.world; ++r) {
      if (r == g.rank) continue;
      std::string value = as_string(g.store->get(pid_key(r)));
      std::istringstream in(value);
      std::string host;
      long pid = 0;
      in >> host >> pid;
      if (host != here) {
        remote.push_back(r);
      } else if (exited(pid)) {
        dead.push_back(r);
      }
    }
    g.store->setTimeout(g.timeout);
    if (!dead.empty()) {
      out << "; rank";
      if (dead.size() > 1) out << "s";
      for (std::size_t i = 0; i < dead.size(); ++i) out << (i ? ", " : " ") << dead[i];
      out << (dead.size() > 1 ? " have" : " has") << " exited";
    } else if (!remote.empty()) {
      out << "; no local peer exited; ranks on other hosts:";
      for (int r : remote) out << " " << r;
    }
  } catch (const std::exception&) {
    out << "; the store on rank 0 (" << g.store_addr
        << ") does not answer: rank 0 has probably exited";
  }
  return out.str();
}

template <typename F>
int guarded(Group* g, const char* what, char* err, int errlen, F f) {
  if (g == nullptr) {
    write_error(err, errlen, std::string(what) + ": no process group");
    return -1;
  }
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    std::string msg = std::string(what) + " failed on rank " + std::to_string(g->rank) + " of " +
                      std::to_string(g->world) + ": " + e.what();
    // c10 errors append a C++ stack trace after the first line; keep the message only.
    auto cut = msg.find("\nException raised from");
    if (cut != std::string::npos) msg.resize(cut);
    write_error(err, errlen, msg + diagnose(*g));
    return -1;
  } catch (...) {
    write_error(err, errlen, std::string(what) + " failed with an unknown C++ exception");
    return -1;
  }
}

void wait(Group* g, const c10::intrusive_ptr<c10d::Work>& work) {
  if (!work->wait(g->timeout)) {
    throw std::runtime_error("timed out after " + std::to_string(g->timeout.count()) + " ms");
  }
}

void all_reduce_sum(Group* g, at::Tensor& t) {
  std::vector<at::Tensor> ts{t};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::SUM;
  o.timeout = g->timeout;
  wait(g, g->backend->allreduce(ts, o));
}

// The dimensions of [N, C, *] other than the channels, and the shape that broadcasts a [C]
// tensor over [N, C, *].
std::vector<int64_t> reduced_dims(const at::Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

std::vector<int64_t> channel_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = -1;
  return shape;
}

// torch.nn.SyncBatchNorm's training-mode function (torch/nn/modules/_functions.py), in ATen ops
// that run on every device: the forward gathers each rank's per-channel mean, biased variance
// and count (an allreduce of a zero table where each rank fills its own row, i.e. an
// all-gather) and normalises with the statistics of the whole global batch, combined in
// float64; the backward sums `sum(dy)` and `sum(dy * (x - mean))` over the ranks, as
// batch_norm_backward_reduce and an allreduce do there, and returns the local weight and bias
// gradients, which DDP then averages with the others.
struct SyncBatchNormFunction : public torch::autograd::Function<SyncBatchNormFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const at::Tensor& bias,
                            at::Tensor running_mean, at::Tensor running_var, double momentum,
                            double eps, int64_t group) {
    auto g = reinterpret_cast<Group*>(group);
    const int64_t channels = input.size(1);
    const int64_t count = channels > 0 ? input.numel() / channels : 0;
    auto dims = reduced_dims(input);
    auto wide = at::TensorOptions().dtype(at::kDouble).device(input.device());
    auto table = at::zeros({g->world, 2 * channels + 1}, wide);
    if (count > 0) {
      auto [var, mean] = at::var_mean(input, dims, /*correction=*/0, /*keepdim=*/false);
      auto row = table.select(0, g->rank);
      row.narrow(0, 0, channels).copy_(mean);
      row.narrow(0, channels, channels).copy_(var);
      row.narrow(0, 2 * channels, 1).fill_(static_cast<double>(count));
    }
    all_reduce_sum(g, table);
    auto counts = table.narrow(1, 2 * channels, 1);
    const double total = counts.sum().item<double>();
    if (total <= 1) {
      throw std::runtime_error("SyncBatchNorm expected more than 1 value per channel over all "
                               "ranks, got " + std::to_string(static_cast<int64_t>(total)));
    }
    auto means = table.narrow(1, 0, channels);
    auto vars = table.narrow(1, channels, channels);
    auto mean = (means * counts).sum(0) / total;
    auto var = ((vars + (means - mean).pow(2)) * counts).sum(0) / total;
    if (running_mean.defined() && running_var.defined()) {
      // Running variance takes the unbiased estimate, as F.batch_norm's.
      running_mean.mul_(1 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
      running_var.mul_(1 - momentum)
          .add_((var * (total / (total - 1))).to(running_var.scalar_type()), momentum);
    }
    auto invstd = (var + eps).rsqrt().to(input.scalar_type());
    auto mean_x = mean.to(input.scalar_type());
    ctx->save_for_backward({input, weight, mean_x, invstd});
    ctx->saved_data["group"] = group;
    ctx->saved_data["total"] = total;
    auto shape = channel_shape(input);
    auto scale = weight.defined() ? invstd * weight : invstd;
    auto out = (input - mean_x.view(shape)) * scale.view(shape);
    return bias.defined() ? out + bias.view(shape) : out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto input = saved[0], weight = saved[1], mean = saved[2], invstd = saved[3];
    auto g = reinterpret_cast<Group*>(ctx->saved_data["group"].toInt());
    const double total = ctx->saved_data["total"].toDouble();
    auto dy = grads[0];
    auto dims = reduced_dims(input);
    auto shape = channel_shape(input);
    auto xmu = input - mean.view(shape);
    auto sum_dy = dy.sum(dims);
    auto sum_dy_xmu = (dy * xmu).sum(dims);
    at::Tensor grad_weight, grad_bias;
    if (weight.defined()) grad_weight = sum_dy_xmu * invstd;
    grad_bias = sum_dy.clone();
    const int64_t channels = sum_dy.size(0);
    auto combined = at::cat({sum_dy, sum_dy_xmu}, 0).contiguous();
    try {
      all_reduce_sum(g, combined);
    } catch (const std::exception& e) {
      std::string msg = std::string("SyncBatchNorm backward: allreduce failed on rank ") +
                        std::to_string(g->rank) + " of " + std::to_string(g->world) + ": " +
                        e.what();
      auto cut = msg.find("\nException raised from");
      if (cut != std::string::npos) msg.resize(cut);
      throw std::runtime_error(msg + diagnose(*g));
    }
    auto mean_dy = combined.narrow(0, 0, channels) / total;
    auto mean_dy_xmu = combined.narrow(0, channels, channels) / total;
    auto scale = weight.defined() ? invstd * weight : invstd;
    auto grad_input = (dy - mean_dy.view(shape) -
                       xmu * (invstd * invstd * mean_dy_xmu).view(shape)) *
                      scale.view(shape);
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(),
            at::Tensor(),  at::Tensor(),  at::Tensor()};
  }
};

// DDP's Reducer (torch/csrc/distributed/c10d/reducer.cpp), cut to what training here needs:
// fixed buckets of parameters in DDP's order. Armed for a backward, a post hook on each
// parameter's gradient accumulator copies the gradient times `scale` into its bucket as soon as
// it is accumulated, and the buckets whose gradients are all in are allreduced asynchronously,
// in bucket order (as DDP launches them), while the backward goes on. `finish` waits for them
// and copies the averages back; a bucket not launched by then (a backward not armed, or a
// gradient that did not come) is reduced there, from the gradients as they are.
struct Bucket {
  std::vector<std::size_t> params;  // indices into Reducer::params
  std::vector<int64_t> offsets;     // of each parameter's gradient in `flat`
  at::Tensor flat;
  std::size_t pending = 0;  // gradients still to come in this backward
  c10::intrusive_ptr<c10d::Work> work;
};

struct Reducer {
  Group* group;
  std::vector<at::Tensor> params;
  std::vector<std::pair<std::size_t, std::size_t>> slot;  // (bucket, position) of each parameter
  std::vector<Bucket> buckets;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;
  std::vector<uintptr_t> hooks;
  double scale;
  std::mutex mu;
  bool armed = false;
  std::size_t next = 0;  // the first bucket not launched in this backward
  std::vector<bool> seen;
  std::string error;     // from a hook: thrown into the autograd engine, it would abort the step
  double hook_seconds = 0;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

c10::intrusive_ptr<c10d::Work> launch_sum(Group* g, at::Tensor& t) {
  std::vector<at::Tensor> ts{t};
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::SUM;
  o.timeout = g->timeout;
  return g->backend->allreduce(ts, o);
}

// The autograd hook of parameter `i`: its gradient is complete.
void gradient_ready(Reducer* r, std::size_t i);

// A post hook on a parameter's gradient accumulator (DDP's autograd_hook).
struct GradientReadyHook : public torch::autograd::FunctionPostHook {
  GradientReadyHook(Reducer* r, std::size_t i) : reducer(r), index(i) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list&) override {
    gradient_ready(reducer, index);
    return outputs;
  }
  Reducer* reducer;
  std::size_t index;
};

void gradient_ready(Reducer* r, std::size_t i) {
  std::lock_guard<std::mutex> lock(r->mu);
  if (!r->armed || r->seen[i] || !r->error.empty()) return;
  auto t0 = std::chrono::steady_clock::now();
  try {
    at::NoGradGuard no_grad;
    const at::Tensor& grad = r->params[i].grad();
    if (grad.defined()) {
      r->seen[i] = true;
      auto [b, pos] = r->slot[i];
      Bucket& bucket = r->buckets[b];
      // DDP divides by the world size while copying into the bucket.
      bucket.flat.narrow(0, bucket.offsets[pos], grad.numel())
          .copy_(at::mul(grad.reshape({-1}), r->scale));
      --bucket.pending;
      while (r->next < r->buckets.size() && r->buckets[r->next].pending == 0) {
        Bucket& ready = r->buckets[r->next++];
        ready.work = launch_sum(r->group, ready.flat);
      }
    }
  } catch (const std::exception& e) {
    r->error = e.what();
  }
  r->hook_seconds += seconds_since(t0);
}

}  // namespace

extern "C" {

// Bit 0: Gloo compiled in; bit 1: NCCL compiled in.
int residual_dist_backends() {
  int bits = 0;
#ifdef RESIDUAL_WITH_GLOO
  bits |= 1;
#endif
#ifdef RESIDUAL_WITH_NCCL
  bits |= 2;
#endif
  return bits;
}

// A process group of `world` ranks. The store at `store_host:store_port` is served by rank 0
// when `serve_store` is 1 (else it exists already: torchrun's agent store), and keys are put
// under `prefix`. `backend`: 0 = Gloo, 1 = NCCL. `gloo_device`: "host:ADDR", "iface:NAME" or
// "default". Returns null and writes `err` on failure.
void* residual_pg_new(const char* store_host, int store_port, int serve_store, const char* prefix,
                      int rank, int world, int backend, const char* gloo_device,
                      int timeout_ms, char* err, int errlen) {
  try {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(store_port);
    opts.isServer = serve_store != 0 && rank == 0;
    opts.numWorkers = serve_store != 0 ? std::optional<std::size_t>(world) : std::nullopt;
    opts.waitWorkers = serve_store != 0;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(store_host), opts);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    store->set(pid_key(rank), hostname() + " " + std::to_string(getpid()));

    auto g = std::make_unique<Group>();
    g->store = store;
    g->rank = rank;
    g->world = world;
    g->timeout = timeout;
    g->store_addr = std::string(store_host) + ":" + std::to_string(store_port);
    if (backend == 0) {
#ifdef RESIDUAL_WITH_GLOO
      auto o = c10d::ProcessGroupGloo::Options::create(timeout);
      std::string dev(gloo_device);
      if (dev.rfind("host:", 0) == 0) {
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(dev.substr(5)));
      } else if (dev.rfind("iface:", 0) == 0) {
        o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(dev.substr(6)));
      } else {
        o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, o);
#else
      write_error(err, errlen,
                  "this build has no Gloo backend (gloo's headers were missing at build time: "
                  "install libgloo-dev and rebuild)");
      return nullptr;
#endif
    } else if (backend == 1) {
#ifdef RESIDUAL_WITH_NCCL
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = timeout;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, o);
#else
      write_error(err, errlen,
                  "this build has no NCCL backend (it needs libtorch_cuda and nccl.h at build "
                  "time)");
      return nullptr;
#endif
    } else {
      write_error(err, errlen, "unknown backend code " + std::to_string(backend));
      return nullptr;
    }
    return g.release();
  } catch (const std::exception& e) {
    std::string msg = std::string("rank ") + std::to_string(rank) + " of " +
                      std::to_string(world) + " could not join the process group at " +
                      store_host + ":" + std::to_string(store_port) + ": " + e.what();
    auto cut = msg.find("\nException raised from");
    if (cut != std::string::npos) msg.resize(cut);
    write_error(err, errlen, msg);
    return nullptr;
  } catch (...) {
    write_error(err, errlen, "process group set-up failed with an unknown C++ exception");
    return nullptr;
  }
}

void residual_pg_free(void* pg) {
  try {
    delete static_cast<Group*>(pg);
  } catch (...) {
  }
}

// Sums `tensor` (an at::Tensor*, contiguous) over all ranks, in place.
int residual_pg_allreduce_sum(void* pg, void* tensor, char* err, int errlen) {
  auto g = static_cast<Group*>(pg);
  return guarded(g, "allreduce", err, errlen, [&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.timeout = g->timeout;
    wait(g, g->backend->allreduce(ts, o));
  });
}

// Reduces `tensor` (an at::Tensor*, contiguous) over all ranks with `op` (0 sum, 1 product,
// 2 min, 3 max), in place.
int residual_pg_allreduce(void* pg, void* tensor, int op, char* err, int errlen) {
  auto g = static_cast<Group*>(pg);
  return guarded(g, "allreduce", err, errlen, [&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions o;
    switch (op) {
      case 0: o.reduceOp = c10d::ReduceOp::SUM; break;
      case 1: o.reduceOp = c10d::ReduceOp::PRODUCT; break;
      case 2: o.reduceOp = c10d::ReduceOp::MIN; break;
      case 3: o.reduceOp = c10d::ReduceOp::MAX; break;
      default: throw std::runtime_error("unknown reduce op " + std::to_string(op));
    }
    o.timeout = g->timeout;
    wait(g, g->backend->allreduce(ts, o));
  });
}

// Gathers every rank's `input` into `output` (contiguous, [world, *input.shape]): row r is rank
// r's input.
int residual_pg_allgather(void* pg, void* input, void* output, char* err, int errlen) {
  auto g = static_cast<Group*>(pg);
  return guarded(g, "allgather", err, errlen, [&] {
    auto& out = *static_cast<at::Tensor*>(output);
    std::vector<std::vector<at::Tensor>> outs(1);
    for (int r = 0; r < g->world; ++r) outs[0].push_back(out.select(0, r));
    std::vector<at::Tensor> ins{*static_cast<at::Tensor*>(input)};
    c10d::AllgatherOptions o;
    o.timeout = g->timeout;
    wait(g, g->backend->allgather(outs, ins, o));
  });
}

// Copies rank `root`'s `tensor` into every rank's, in place.
int residual_pg_broadcast(void* pg, void* tensor, int root, char* err, int errlen) {
  auto g = static_cast<Group*>(pg);
  return guarded(g, "broadcast", err, errlen, [&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = g->timeout;
    wait(g, g->backend->broadcast(ts, o));
  });
}

// torch.nn.SyncBatchNorm's training-mode forward of `input` ([N, C, *]) with `weight` and `bias`
// (either may be null), updating `running_mean` / `running_var` (both or neither null) with the
// global batch's statistics; differentiable, its backward reduces over the group as well.
// Writes a new at::Tensor* to `out`.
int residual_pg_sync_batch_norm(void* pg, void* input, void* weight, void* bias,
                                void* running_mean, void* running_var, double momentum,
                                double eps, void** out, char* err, int errlen) {
  auto g = static_cast<Group*>(pg);
  auto opt = [](void* p) { return p ? *static_cast<at::Tensor*>(p) : at::Tensor(); };
  return guarded(g, "SyncBatchNorm", err, errlen, [&] {
    at::Tensor result = SyncBatchNormFunction::apply(
        *static_cast<at::Tensor*>(input), opt(weight), opt(bias), opt(running_mean),
        opt(running_var), momentum, eps, reinterpret_cast<int64_t>(g));
    *out = new at::Tensor(std::move(result));
  });
}

int residual_pg_barrier(void* pg, char* err, int errlen) {
  auto g = static_cast<Group*>(pg);
  return guarded(g, "barrier", err, errlen, [&] {
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    wait(g, g->backend->barrier(o));
  });
}

// A gradient reducer over `n` parameters (at::Tensor*, in DDP's bucket order) in `n_buckets`
// buckets: bucket k holds parameters bucket_ends[k - 1] .. bucket_ends[k] (of one dtype and
// device), whose gradients are multiplied by `scale` and summed over the group. Hooks the
// parameters' gradient accumulators; returns null and writes `err` on failure.
void* residual_reducer_new(void* pg, void** params, int n, const int64_t* bucket_ends,
                           int n_buckets, double scale, char* err, int errlen) {
  auto g = static_cast<Group*>(pg);
  void* out = nullptr;
  guarded(g, "the gradient reducer", err, errlen, [&] {
    auto r = std::make_unique<Reducer>();
    r->group = g;
    r->scale = scale;
    for (int i = 0; i < n; ++i) r->params.push_back(*static_cast<at::Tensor*>(params[i]));
    r->slot.resize(n);
    r->seen.assign(n, false);
    int64_t start = 0;
    for (int k = 0; k < n_buckets; ++k) {
      Bucket b;
      int64_t numel = 0;
      for (int64_t i = start; i < bucket_ends[k]; ++i) {
        r->slot[i] = {static_cast<std::size_t>(k), b.params.size()};
        b.params.push_back(static_cast<std::size_t>(i));
        b.offsets.push_back(numel);
        numel += r->params[i].numel();
      }
      if (b.params.empty()) throw std::runtime_error("an empty gradient bucket");
      b.flat = at::empty({numel}, r->params[start].options().requires_grad(false));
      r->buckets.push_back(std::move(b));
      start = bucket_ends[k];
    }
    if (start != n) throw std::runtime_error("the buckets do not cover the parameters");
    Reducer* raw = r.get();
    for (int i = 0; i < n; ++i) {
      auto acc = torch::autograd::impl::grad_accumulator(r->params[i]);
      if (!acc) throw std::runtime_error("parameter " + std::to_string(i) + " is not a leaf "
                                         "that requires grad");
      auto index = static_cast<std::size_t>(i);
      r->hooks.push_back(acc->add_post_hook(std::make_unique<GradientReadyHook>(raw, index)));
      // The variable holds its accumulator weakly: kept here, the hook stays with it.
      r->accumulators.push_back(std::move(acc));
    }
    out = r.release();
  });
  return out;
}

// Prepares for a backward whose gradients are the step's: the hooks reduce them as they come.
void residual_reducer_arm(void* reducer) {
  auto r = static_cast<Reducer*>(reducer);
  std::lock_guard<std::mutex> lock(r->mu);
  for (auto& b : r->buckets) {
    b.pending = b.params.size();
    // A work never waited for (a failed step) may still write its buffer.
    if (b.work) b.flat = at::empty_like(b.flat);
    b.work.reset();
  }
  std::fill(r->seen.begin(), r->seen.end(), false);
  r->next = 0;
  r->error.clear();
  r->armed = true;
}

// Waits for the buckets launched during the backward, reduces the others, and writes the
// averaged gradients back; `hook_seconds` gets the time spent in the hooks since the last call,
// `launched` the number of buckets the backward launched, `buckets` the number of buckets.
int residual_reducer_finish(void* reducer, double* hook_seconds, int* launched, int* buckets,
                            char* err, int errlen) {
  auto r = static_cast<Reducer*>(reducer);
  std::lock_guard<std::mutex> lock(r->mu);
  r->armed = false;
  *hook_seconds = r->hook_seconds;
  r->hook_seconds = 0;
  *launched = static_cast<int>(r->next);
  *buckets = static_cast<int>(r->buckets.size());
  return guarded(r->group, "allreduce", err, errlen, [&] {
    if (!r->error.empty()) {
      throw std::runtime_error("launching a gradient bucket during the backward: " + r->error);
    }
    at::NoGradGuard no_grad;
    for (auto& b : r->buckets) {
      std::vector<at::Tensor> grads;
      for (auto i : b.params) grads.push_back(r->params[i].grad());
      if (b.work) {
        auto work = std::move(b.work);
        b.work.reset();
        wait(r->group, work);
        for (std::size_t p = 0; p < grads.size(); ++p) {
          grads[p].copy_(b.flat.narrow(0, b.offsets[p], grads[p].numel()).view_as(grads[p]));
        }
        continue;
      }
      // Not launched: the defined gradients as they are, as DDP's reducer after no_sync.
      std::vector<at::Tensor> parts;
      for (auto& grad : grads) {
        if (grad.defined()) parts.push_back(at::mul(grad.reshape({-1}), r->scale));
      }
      if (parts.empty()) continue;
      auto flat = at::cat(parts, 0);
      wait(r->group, launch_sum(r->group, flat));
      int64_t offset = 0;
      for (auto& grad : grads) {
        if (!grad.defined()) continue;
        grad.copy_(flat.narrow(0, offset, grad.numel()).view_as(grad));
        offset += grad.numel();
      }
    }
  });
}

// Unhooks the parameters and frees the reducer (before its process group).
void residual_reducer_free(void* reducer) {
  auto r = static_cast<Reducer*>(reducer);
  if (r == nullptr) return;
  try {
    for (std::size_t i = 0; i < r->accumulators.size(); ++i) {
      r->accumulators[i]->del_post_hook(r->hooks[i]);
    }
    delete r;
  } catch (...) {
  }
}

}  // extern "C"
