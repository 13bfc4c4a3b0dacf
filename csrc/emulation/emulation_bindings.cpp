// emulation_bindings.cpp: the emulator's knobs and probes in fused_adamw._cuda_emu
// (the rest of the module is csrc/bindings/cuda_module.cu, compiled for the
// host): block order, SM count, counters, emulated streams, the simulated
// stream capture, and self-test kernels of the emulator itself (a barrier
// exchange through __shared__ memory, a missing barrier that the shuffled
// thread order exposes, and a divergent barrier it must refuse).
// tests/test_cuda_emulation.py uses them; built by CMakeLists.txt ("_cuda_emu").
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "cuda_emulation.h"

namespace py = pybind11;

namespace fused_adamw {
namespace emu {
namespace {

void check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();
  throw std::runtime_error(std::string("fused_adamw._cuda_emu: ") + what + " failed: " + cudaGetErrorName(err) +
                           ": " + cudaGetErrorString(err));
}

cudaStream_t as_stream(uintptr_t h) { return reinterpret_cast<cudaStream_t>(h); }

// Self-test kernels (not the optimizer's: those live in csrc/cuda).
constexpr int kSelfTestThreads = 128;

// Every thread writes its slot, waits at the barrier, then reads its
// neighbour's: only a real barrier makes every read see the write.
__global__ void barrier_exchange_kernel(int* out) {
  __shared__ int slots[kSelfTestThreads];
  __shared__ unsigned int arrived;
  if (threadIdx.x == 0) arrived = 0;
  __syncthreads();
  slots[threadIdx.x] = static_cast<int>(blockIdx.x * 1000 + threadIdx.x);
  atomicAdd(&arrived, 1u);
  __syncthreads();
  const int next = (threadIdx.x + 1) % blockDim.x;
  out[blockIdx.x * blockDim.x + threadIdx.x] = slots[next] + (arrived == blockDim.x ? 0 : -1000000);
}

// A missing barrier: thread 0 publishes `token` in shared memory, the others
// read it with no __syncthreads between. In index order thread 0 would always
// go first and hide the bug; in shuffled order some threads read the stale
// value of the previous launch.
__global__ void missing_barrier_kernel(int* out, int token) {
  __shared__ int published;
  if (threadIdx.x == 0) published = token;
  out[threadIdx.x] = published;
}

// Odd threads return before the barrier the even ones wait at.
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 1) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

}  // namespace

void bind_emulation(py::module_& m) {
  m.attr("EMULATED") = true;
  m.def(
      "set_options",
      [](py::object seed, py::object shuffle, py::object sm_count) {
        if (!seed.is_none()) options().seed = seed.cast<uint64_t>();
        if (!shuffle.is_none()) options().shuffle = shuffle.cast<bool>();
        if (!sm_count.is_none()) {
          const int n = sm_count.cast<int>();
          if (n <= 0) throw std::invalid_argument("sm_count must be positive");
          options().sm_count = n;
        }
      },
      py::arg("seed") = py::none(), py::arg("shuffle") = py::none(), py::arg("sm_count") = py::none(),
      "Emulator knobs: the block-order seed, whether blocks run shuffled, the emulated SM count.");
  m.def("options", [] {
    py::dict d;
    d["seed"] = options().seed;
    d["shuffle"] = options().shuffle;
    d["sm_count"] = options().sm_count;
    return d;
  });
  m.def("stats", [] {
    const Stats& s = stats();
    py::dict d;
    d["launches"] = s.launches;
    d["blocks"] = s.blocks;
    d["threads"] = s.threads;
    d["barriers"] = s.barriers;
    d["mallocs"] = s.mallocs;
    d["frees"] = s.frees;
    d["live_allocations"] = s.live_allocations;
    d["live_bytes"] = s.live_bytes;
    d["memcpys"] = s.memcpys;
    d["memsets"] = s.memsets;
    d["event_records"] = s.event_records;
    d["stream_waits"] = s.stream_waits;
    d["syncs"] = s.syncs;
    d["kernels"] = s.kernel_log;
    return d;
  }, "Counters since reset_stats(); kernels: the launched kernels' names in order.");
  m.def("reset_stats", &reset_stats);
  m.def("last_launch_failure", &last_launch_failure);
  m.def("stream_create", [] { return reinterpret_cast<uintptr_t>(create_stream()); },
        "A new emulated stream (non-blocking), as an int handle.");
  m.def("stream_destroy", [](uintptr_t s) { check(cudaStreamDestroy(as_stream(s)), "cudaStreamDestroy"); });
  m.def("current_stream", [] { return reinterpret_cast<uintptr_t>(current_stream()); },
        "The stream backend_cuda runs emulated steps on (0: the default stream).");
  m.def("set_current_stream", [](uintptr_t s) { set_current_stream(as_stream(s)); });

  py::class_<Graph, std::shared_ptr<Graph>>(m, "Graph", "A simulated CUDA graph: the work a capture recorded.")
      .def("replay", [](Graph& g) { check(g.replay(), "graph replay"); })
      .def_property_readonly("nodes", [](const Graph& g) {
        py::list out;
        for (const Node& n : g.nodes) out.append(py::make_tuple(n.kind, n.name));
        return out;
      });
  m.def(
      "begin_capture",
      [](uintptr_t s, const std::string& mode) {
        const cudaStreamCaptureMode m = mode == "global"         ? cudaStreamCaptureModeGlobal
                                        : mode == "thread_local" ? cudaStreamCaptureModeThreadLocal
                                        : mode == "relaxed"      ? cudaStreamCaptureModeRelaxed
                                                                 : throw std::invalid_argument("mode: " + mode);
        check(begin_capture(as_stream(s), m), "begin_capture");
      },
      py::arg("stream"), py::arg("mode") = "global");
  m.def("end_capture", [](uintptr_t s) {
    std::shared_ptr<Graph> g;
    check(end_capture(as_stream(s), &g), "end_capture");
    return g;
  });

  m.def("selftest_barrier_exchange", [](int blocks) {
    int* out = nullptr;
    const size_t n = static_cast<size_t>(blocks) * kSelfTestThreads;
    check(cudaMalloc(reinterpret_cast<void**>(&out), n * sizeof(int)), "cudaMalloc");
    FUSED_ADAMW_LAUNCH(static_cast<unsigned>(blocks), kSelfTestThreads, 0, nullptr, barrier_exchange_kernel)(out);
    const cudaError_t err = cudaGetLastError();
    std::vector<int> result(out, out + n);
    cudaFree(out);
    check(err, "barrier_exchange_kernel");
    return result;
  });
  m.def("selftest_missing_barrier", [](int token) {
    int* out = nullptr;
    check(cudaMalloc(reinterpret_cast<void**>(&out), kSelfTestThreads * sizeof(int)), "cudaMalloc");
    FUSED_ADAMW_LAUNCH(1, kSelfTestThreads, 0, nullptr, missing_barrier_kernel)(out, token);
    const cudaError_t err = cudaGetLastError();
    std::vector<int> result(out, out + kSelfTestThreads);
    cudaFree(out);
    check(err, "missing_barrier_kernel");
    return result;
  });
  m.def("selftest_divergent_barrier", [] {
    int* out = nullptr;
    check(cudaMalloc(reinterpret_cast<void**>(&out), kSelfTestThreads * sizeof(int)), "cudaMalloc");
    FUSED_ADAMW_LAUNCH(1, kSelfTestThreads, 0, nullptr, divergent_barrier_kernel)(out);
    const cudaError_t err = cudaGetLastError();
    cudaFree(out);
    check(err, "divergent_barrier_kernel");
  });
}

}  // namespace emu
}  // namespace fused_adamw
