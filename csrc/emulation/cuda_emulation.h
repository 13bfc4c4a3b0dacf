// cuda_emulation.h: what the CUDA backend's sources (csrc/cuda/*.cu, *.cuh,
// csrc/bindings/cuda_module.cu) need to compile with the host C++ compiler
// and run on host memory: the emulated module fused_adamw._cuda_emu.
//
// The kernels keep one source. CMakeLists.txt compiles csrc/cuda/*.cu a
// second time with g++ and -DFUSED_ADAMW_CUDA_EMULATION; multi_tensor.cuh then
// includes this header instead of <cuda_runtime.h>. Provided here:
//
//   * types and declarations from CUDA's own headers (cuda_runtime_api.h,
//     cuda_fp16.h, cuda_bf16.h: their conversions run on the host), so the
//     runtime functions the backend calls keep CUDA's signatures; their
//     definitions (cuda_emulation.cpp) work on host memory: malloc/free,
//     memset, memcpy, events, stream waits, capture queries and a simulated
//     stream capture that records launches into a replayable graph;
//   * FUSED_ADAMW_LAUNCH(grid, block, shmem, stream, kernel)(args...): the one
//     launch macro. nvcc: kernel<<<grid, block, shmem, stream>>>(args...);
//     here: a host launcher that copies the arguments (as kernel parameters
//     are copied) and runs, or records under capture, the grid;
//   * threadIdx / blockIdx / blockDim / gridDim, __syncthreads(), __shared__,
//     atomics and fences.
//
// Execution: the blocks of a grid run one after another, in a shuffled order
// (seeded, set_options(seed=)). The threads of a block run as fibers
// (ucontext, one stack each) on the calling thread, also in a shuffled order:
// a thread runs until it returns or reaches __syncthreads(), and the barrier
// releases only when every thread of the block has reached it. Why fibers and not an OS thread per
// CUDA thread: a barrier keeps its meaning, a run is deterministic for a seed
// (a failure replays), 512-thread blocks cost microseconds instead of 512
// thread wake-ups, and AddressSanitizer follows the stack switches through its
// fiber annotations. A barrier reached by some threads after others returned
// is reported as a launch failure (CUDA leaves that undefined).
//
// What this cannot show: the GPU memory model (one thread at a time is
// sequentially consistent; a missing fence is invisible), occupancy, register
// use and spills, real timing, or the real capture rules beyond those
// simulated in cuda_emulation.cpp. Not thread-safe: calls hold the GIL.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulation.h is for host compilers; nvcc compiles the real kernels"
#endif

#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// CUDA's host_defines.h turns the execution-space keywords into nothing for
// host compilers; these it leaves undefined or wrong for a host build.
#undef __launch_bounds__
#define __launch_bounds__(...)
// One copy per block: blocks run one at a time on a host thread, and the
// threads of a block are fibers of that thread.
#undef __shared__
#define __shared__ static thread_local

namespace fused_adamw {
namespace emu {

// The CUDA thread the calling fiber is.
struct ThreadContext {
  uint3 thread_idx{0, 0, 0};
  uint3 block_idx{0, 0, 0};
  dim3 block_dim{1, 1, 1};
  dim3 grid_dim{1, 1, 1};
};
ThreadContext& current();
void syncthreads();

// Knobs of the emulator (module functions set_options / options).
struct Options {
  uint64_t seed = 1;          // block and thread order: permutations drawn from this seed and the launch count
  bool shuffle = true;        // false: blocks and threads in index order
  int sm_count = 4;           // cudaDevAttrMultiProcessorCount of the emulated device
  size_t stack_bytes = 256 * 1024;  // per emulated thread (a 32 KB kernel parameter is copied onto it)
};
Options& options();

// Counters the tests read (module function stats()).
struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, barriers = 0;
  int64_t mallocs = 0, frees = 0, live_allocations = 0, live_bytes = 0;
  int64_t memcpys = 0, memsets = 0, event_records = 0, stream_waits = 0, syncs = 0;
  std::vector<std::string> kernel_log;  // kernel names in launch order (cleared by reset_stats)
};
Stats& stats();
void reset_stats();

// One recorded or executed piece of stream work.
struct Node {
  std::string kind;  // "kernel", "memset", "memcpy"
  std::string name;  // kernel name
  std::function<void()> run;
};

// A captured graph: the nodes recorded between begin_capture and end_capture.
struct Graph {
  std::vector<Node> nodes;
  cudaError_t replay();
};

// Simulated capture (what torch.cuda.graph does with cudaStreamBeginCapture
// and cudaStreamEndCapture, on an emulated stream).
cudaError_t begin_capture(cudaStream_t stream, cudaStreamCaptureMode mode);
cudaError_t end_capture(cudaStream_t stream, std::shared_ptr<Graph>* graph);
cudaStream_t create_stream();
void destroy_stream(cudaStream_t stream);
cudaStream_t current_stream();
// Why the last failed launch failed (a divergent barrier), for the error message.
std::string last_launch_failure();
void set_current_stream(cudaStream_t stream);

// Runs `body` for every thread of every block, or records it on a capturing stream.
cudaError_t submit(const char* name, dim3 grid, dim3 block, size_t shmem, cudaStream_t stream,
                   std::function<void()> body);

// The host launcher behind FUSED_ADAMW_LAUNCH.
template <typename... Params>
class Launcher {
 public:
  Launcher(const char* name, dim3 grid, dim3 block, size_t shmem, cudaStream_t stream, void (*kernel)(Params...))
      : name_(name), grid_(grid), block_(block), shmem_(shmem), stream_(stream), kernel_(kernel) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    // Kernel parameters are copied at launch (and into a graph at capture).
    auto params = std::make_shared<std::tuple<std::decay_t<Params>...>>(std::forward<Args>(args)...);
    auto kernel = kernel_;
    submit(name_, grid_, block_, shmem_, stream_, [params, kernel] { std::apply(kernel, *params); });
  }

 private:
  const char* name_;
  dim3 grid_, block_;
  size_t shmem_;
  cudaStream_t stream_;
  void (*kernel_)(Params...);
};

template <typename... Params>
Launcher<Params...> make_launcher(const char* name, dim3 grid, dim3 block, size_t shmem, cudaStream_t stream,
                                  void (*kernel)(Params...)) {
  return Launcher<Params...>(name, grid, block, shmem, stream, kernel);
}

// Atomics: the emulated threads of a grid run on one host thread, but the
// operations are real atomics all the same.
template <typename T>
T atomic_add(T* address, T value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}

}  // namespace emu
}  // namespace fused_adamw

#define FUSED_ADAMW_LAUNCH(grid, block, shmem, stream, ...) \
  ::fused_adamw::emu::make_launcher(#__VA_ARGS__, grid, block, shmem, stream, __VA_ARGS__)

#define threadIdx (::fused_adamw::emu::current().thread_idx)
#define blockIdx (::fused_adamw::emu::current().block_idx)
#define blockDim (::fused_adamw::emu::current().block_dim)
#define gridDim (::fused_adamw::emu::current().grid_dim)

inline void __syncthreads() { ::fused_adamw::emu::syncthreads(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return ::fused_adamw::emu::atomic_add(a, v); }
inline int atomicAdd(int* a, int v) { return ::fused_adamw::emu::atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return ::fused_adamw::emu::atomic_add(a, v);
}
inline float atomicAdd(float* a, float v) {
  float old = *a, want;
  do {
    want = old + v;
  } while (!__atomic_compare_exchange(a, &old, &want, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
inline unsigned int atomicCAS(unsigned int* a, unsigned int compare, unsigned int value) {
  __atomic_compare_exchange_n(a, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
inline unsigned int atomicExch(unsigned int* a, unsigned int v) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); }

// The C++ overload <cuda_runtime.h> adds to cudaMalloc.
template <class T>
inline cudaError_t cudaMalloc(T** ptr, size_t size) {
  return ::cudaMalloc(reinterpret_cast<void**>(ptr), size);
}

// Every pointer the kernels see is "global" memory here: host memory.
inline bool __isGlobal(const void*) { return true; }
#if !defined(__clang__)
#define __builtin_assume(x) static_cast<void>(sizeof(x))
#endif
