// c10d process groups for data-parallel training: a TCPStore rendezvous, then ProcessGroupGloo
// (CPU) or ProcessGroupNCCL (CUDA), with allreduce, broadcast and barrier. Gloo is compiled only
// with RESIDUAL_WITH_GLOO (gloo's headers found), NCCL only with RESIDUAL_WITH_NCCL (nccl.h and
// libtorch_cuda found); the collective code itself is libtorch's. Every entry point catches C++
// exceptions and returns them as a message, so nothing unwinds into Rust.
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
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
#include <sstream>
#include <string>

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

int residual_pg_barrier(void* pg, char* err, int errlen) {
  auto g = static_cast<Group*>(pg);
  return guarded(g, "barrier", err, errlen, [&] {
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    wait(g, g->backend->barrier(o));
  });
}

}  // extern "C"
