// cuda_emulation.cpp: the host side of cuda_emulation.h: the grid runner
// (shuffled blocks, threads as fibers with a real barrier) and the CUDA
// runtime functions the backend calls, defined with CUDA's own signatures
// (cuda_runtime_api.h) over host memory. Only fused_adamw._cuda_emu links it;
// the module is built with hidden visibility, so these definitions never meet
// a real libcudart.
//
// Streams and capture, as simulated here:
//   * work on a stream that is not capturing runs at once, in order (every
//     stream is trivially ordered after everything before it);
//   * begin_capture(stream, mode) starts recording: launches, memsets and
//     memcpys on that stream become graph nodes, events recorded on it belong
//     to the capture; end_capture returns the graph, replay() runs its nodes;
//   * while any capture is active and the calling thread's capture mode is
//     not relaxed (cudaThreadExchangeStreamCaptureMode), the calls CUDA calls
//     "potentially unsafe" (cudaMalloc, cudaFree, cudaStreamSynchronize,
//     cudaEventSynchronize) fail with cudaErrorStreamCaptureUnsupported and
//     invalidate the capture, as they do on a GPU;
//   * synchronizing a capturing stream, waiting on it for an event recorded
//     outside the capture (cudaErrorStreamCaptureIsolation), and a memcpy into
//     a capture from memory cudaMalloc did not return (pageable host memory)
//     fail and invalidate the capture.
#include "cuda_emulation.h"

#include <sanitizer/common_interface_defs.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <stdexcept>

#if defined(__SANITIZE_ADDRESS__)
#define FA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FA_EMU_ASAN 1
#endif
#endif

namespace fused_adamw {
namespace emu {

namespace {

// ------------------------------------------------------------------ state

thread_local ThreadContext t_context;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local cudaStreamCaptureMode t_capture_mode = cudaStreamCaptureModeGlobal;
int g_device = 0;
constexpr int kDevices = 1;
uint64_t g_launch_count = 0;
cudaStream_t g_current_stream = nullptr;

struct StreamState {
  bool capturing = false;
  bool invalidated = false;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  uint64_t capture_id = 0;
  std::shared_ptr<Graph> graph;
};
struct EventState {
  uint64_t capture_id = 0;  // nonzero: recorded inside that capture
};

std::map<uintptr_t, StreamState>& streams() {
  // 0 (legacy), 1 (cudaStreamLegacy) and 2 (cudaStreamPerThread) always exist.
  static std::map<uintptr_t, StreamState> s{{0, {}}, {1, {}}, {2, {}}};
  return s;
}
std::map<uintptr_t, EventState>& events() {
  static std::map<uintptr_t, EventState> e;
  return e;
}
std::map<uintptr_t, size_t>& allocations() {
  static std::map<uintptr_t, size_t> a;
  return a;
}
uint64_t g_next_capture = 1;

cudaError_t fail(cudaError_t err) {
  t_last_error = err;
  return err;
}

StreamState* find_stream(cudaStream_t s) {
  auto it = streams().find(reinterpret_cast<uintptr_t>(s));
  return it == streams().end() ? nullptr : &it->second;
}

bool any_capture_active() {
  for (auto& kv : streams())
    if (kv.second.capturing) return true;
  return false;
}

void invalidate_captures() {
  for (auto& kv : streams())
    if (kv.second.capturing) kv.second.invalidated = true;
}

// CUDA's rule for calls that may synchronize implicitly: refused while a
// capture is active, unless this thread relaxed its capture mode.
cudaError_t unsafe_call() {
  if (t_capture_mode != cudaStreamCaptureModeRelaxed && any_capture_active()) {
    invalidate_captures();
    return fail(cudaErrorStreamCaptureUnsupported);
  }
  return cudaSuccess;
}

bool in_allocation(const void* p, size_t bytes) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  auto it = allocations().upper_bound(addr);
  if (it == allocations().begin()) return false;
  --it;
  return addr >= it->first && addr + bytes <= it->first + it->second;
}

// ------------------------------------------------------------------ fibers

enum class FiberState { kReady, kAtBarrier, kDone };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  size_t stack_bytes = 0;
  FiberState state = FiberState::kReady;
  uint3 tid{0, 0, 0};
  void* fake_stack = nullptr;
};

struct Scheduler {
  ucontext_t main_ctx;
  std::vector<Fiber> fibers;
  Fiber* running = nullptr;
  const std::function<void()>* body = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
  void* main_fake_stack = nullptr;

  ~Scheduler() {
    for (Fiber& f : fibers)
      if (f.stack) munmap(f.stack, f.stack_bytes);
  }
};

thread_local Scheduler t_sched;

// Switch from the scheduler (main stack) into fiber f, and back.
void enter_fiber(Fiber& f) {
  t_sched.running = &f;
#if defined(FA_EMU_ASAN)
  __sanitizer_start_switch_fiber(&t_sched.main_fake_stack, f.stack, f.stack_bytes);
#endif
  swapcontext(&t_sched.main_ctx, &f.ctx);
#if defined(FA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(t_sched.main_fake_stack, nullptr, nullptr);
#endif
  t_sched.running = nullptr;
}

// From a fiber back to the scheduler; `leaving`: the fiber will not resume.
void leave_fiber(Fiber& f, bool leaving) {
#if defined(FA_EMU_ASAN)
  __sanitizer_start_switch_fiber(leaving ? nullptr : &f.fake_stack, t_sched.main_stack_bottom,
                                 t_sched.main_stack_size);
#endif
  swapcontext(&f.ctx, &t_sched.main_ctx);
#if defined(FA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
  (void)leaving;
}

void fiber_entry() {
  Fiber& f = *t_sched.running;
#if defined(FA_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &t_sched.main_stack_bottom, &t_sched.main_stack_size);
#endif
  (*t_sched.body)();
  f.state = FiberState::kDone;
  leave_fiber(f, true);
}

bool g_launch_failed = false;
std::string g_launch_failure;

// Runs one block: every thread a fiber, round-robin until all are done;
// a barrier releases when every thread waits at it.
void run_block(const dim3& block, const std::function<void()>& body, std::mt19937_64& rng) {
  const size_t n = static_cast<size_t>(block.x) * block.y * block.z;
  Scheduler& s = t_sched;
  const size_t stack_bytes = options().stack_bytes;
  if (s.fibers.size() < n || (n && s.fibers[0].stack_bytes != stack_bytes)) {
    for (Fiber& f : s.fibers)
      if (f.stack) munmap(f.stack, f.stack_bytes);
    s.fibers.assign(n, Fiber{});
    for (Fiber& f : s.fibers) {
      void* mem = mmap(nullptr, stack_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (mem == MAP_FAILED) throw std::runtime_error("emulator: cannot map a fiber stack");
      f.stack = static_cast<char*>(mem);
      f.stack_bytes = stack_bytes;
    }
  }
  s.body = &body;
  ucontext_t proto;
  getcontext(&proto);
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.state = FiberState::kReady;
    f.fake_stack = nullptr;
    f.tid = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>((i / block.x) % block.y),
                  static_cast<unsigned>(i / (static_cast<size_t>(block.x) * block.y))};
    f.ctx = proto;
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = f.stack_bytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  // The threads run in a shuffled order too (between barriers, a GPU gives
  // no order), so code that leans on thread 0 going first shows up.
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), size_t{0});
  if (options().shuffle) std::shuffle(order.begin(), order.end(), rng);
  size_t done = 0;
  while (done < n) {
    size_t waiting = 0;
    done = 0;
    for (size_t i : order) {
      Fiber& f = s.fibers[i];
      if (f.state == FiberState::kReady) {
        t_context.thread_idx = f.tid;
        enter_fiber(f);
      }
      if (f.state == FiberState::kDone) ++done;
      if (f.state == FiberState::kAtBarrier) ++waiting;
    }
    if (waiting == 0) break;
    if (done != 0) {
      // Some threads returned while others wait at a barrier: undefined in
      // CUDA, a hang or a wrong result on a GPU. The waiting fibers are
      // abandoned (their stacks are reused by the next block).
      g_launch_failed = true;
      g_launch_failure = "__syncthreads() reached by " + std::to_string(waiting) + " of " + std::to_string(n) +
                         " threads; the others returned";
      break;
    }
    ++stats().barriers;
    for (size_t i = 0; i < n; ++i) s.fibers[i].state = FiberState::kReady;
  }
  s.body = nullptr;
}

cudaError_t run_grid(const char* name, dim3 grid, dim3 block, const std::function<void()>& body) {
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  std::iota(order.begin(), order.end(), uint64_t{0});
  ++g_launch_count;
  std::mt19937_64 rng(options().seed * 0x9E3779B97F4A7C15ull + g_launch_count);
  if (options().shuffle) std::shuffle(order.begin(), order.end(), rng);
  ++stats().launches;
  if (stats().kernel_log.size() < 100000) stats().kernel_log.emplace_back(name);
  g_launch_failed = false;
  t_context.block_dim = block;
  t_context.grid_dim = grid;
  for (uint64_t b : order) {
    t_context.block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                                static_cast<unsigned>(b / (static_cast<uint64_t>(grid.x) * grid.y))};
    ++stats().blocks;
    stats().threads += static_cast<int64_t>(block.x) * block.y * block.z;
    run_block(block, body, rng);
    if (g_launch_failed) {
      g_launch_failure = std::string(name) + ": " + g_launch_failure;
      return fail(cudaErrorLaunchFailure);
    }
  }
  t_context = ThreadContext{};
  return cudaSuccess;
}

// Runs `node` now, or records it when `stream` captures.
cudaError_t enqueue(cudaStream_t stream, Node node) {
  StreamState* st = find_stream(stream);
  if (st == nullptr) return fail(cudaErrorInvalidResourceHandle);
  if (st->capturing) {
    st->graph->nodes.push_back(std::move(node));
    return cudaSuccess;
  }
  node.run();
  return t_last_error == cudaErrorLaunchFailure && node.kind == "kernel" ? cudaErrorLaunchFailure : cudaSuccess;
}

}  // namespace

// ------------------------------------------------------------------ emu API

ThreadContext& current() { return t_context; }

void syncthreads() {
  Fiber* f = t_sched.running;
  if (f == nullptr) throw std::logic_error("__syncthreads() outside a kernel");
  f->state = FiberState::kAtBarrier;
  leave_fiber(*f, false);
}

Options& options() {
  static Options o;
  return o;
}

Stats& stats() {
  static Stats s;
  return s;
}

void reset_stats() {
  Stats& s = stats();
  const int64_t live = s.live_allocations, bytes = s.live_bytes;
  s = Stats{};
  s.live_allocations = live;
  s.live_bytes = bytes;
}

std::string last_launch_failure() { return g_launch_failure; }

cudaError_t submit(const char* name, dim3 grid, dim3 block, size_t shmem, cudaStream_t stream,
                   std::function<void()> body) {
  // The launch checks a GPU makes.
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024 || grid.y > 65535 ||
      grid.z > 65535 || block.z > 64 || shmem > 48 * 1024)
    return fail(cudaErrorInvalidConfiguration);
  Node node;
  node.kind = "kernel";
  node.name = name;
  std::string kernel_name = name;
  node.run = [kernel_name, grid, block, body = std::move(body)] {
    run_grid(kernel_name.c_str(), grid, block, body);
  };
  return enqueue(stream, std::move(node));
}

cudaError_t Graph::replay() {
  for (Node& n : nodes) {
    n.run();
    if (t_last_error == cudaErrorLaunchFailure) return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

cudaError_t begin_capture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  StreamState* st = find_stream(stream);
  if (st == nullptr) return fail(cudaErrorInvalidResourceHandle);
  if (reinterpret_cast<uintptr_t>(stream) <= 2) return fail(cudaErrorStreamCaptureUnsupported);  // legacy streams
  if (st->capturing) return fail(cudaErrorIllegalState);
  st->capturing = true;
  st->invalidated = false;
  st->mode = mode;
  st->capture_id = g_next_capture++;
  st->graph = std::make_shared<Graph>();
  return cudaSuccess;
}

cudaError_t end_capture(cudaStream_t stream, std::shared_ptr<Graph>* graph) {
  StreamState* st = find_stream(stream);
  if (st == nullptr) return fail(cudaErrorInvalidResourceHandle);
  if (!st->capturing) return fail(cudaErrorIllegalState);
  st->capturing = false;
  std::shared_ptr<Graph> g = std::move(st->graph);
  st->graph.reset();
  if (st->invalidated) return fail(cudaErrorStreamCaptureInvalidated);
  *graph = std::move(g);
  return cudaSuccess;
}

cudaStream_t create_stream() {
  cudaStream_t s = nullptr;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  return s;
}

void destroy_stream(cudaStream_t stream) { cudaStreamDestroy(stream); }

cudaStream_t current_stream() { return g_current_stream; }
void set_current_stream(cudaStream_t stream) {
  if (find_stream(stream) == nullptr) throw std::invalid_argument("emulator: unknown stream");
  g_current_stream = stream;
}

}  // namespace emu
}  // namespace fused_adamw

// ------------------------------------------------------------------ the CUDA runtime, on the host

namespace fe = fused_adamw::emu;

extern "C" {

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureIsolation: return "cudaErrorStreamCaptureIsolation";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated; see _cuda_emu.last_launch_failure())";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureIsolation: return "operation would make the legacy stream depend on a capturing "
                                                 "blocking stream, or a wait on an event outside the capture";
    default: return cudaGetErrorName(error);
  }
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = fe::t_last_error;
  fe::t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return fe::t_last_error; }

cudaError_t cudaGetDeviceCount(int* count) {
  *count = fe::kDevices;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = fe::g_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= fe::kDevices) return fe::fail(cudaErrorInvalidDevice);
  fe::g_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= fe::kDevices) return fe::fail(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = fe::options().sm_count; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxGridDimX: *value = 2147483647; return cudaSuccess;
    default: return fe::fail(cudaErrorInvalidValue);
  }
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
  if (cudaError_t e = fe::unsafe_call()) return e;
  // 256-byte aligned, as cudaMalloc's memory is.
  void* p = std::aligned_alloc(256, (std::max<size_t>(size, 1) + 255) / 256 * 256);
  if (p == nullptr) return fe::fail(cudaErrorMemoryAllocation);
  fe::allocations()[reinterpret_cast<uintptr_t>(p)] = size;
  ++fe::stats().mallocs;
  ++fe::stats().live_allocations;
  fe::stats().live_bytes += static_cast<int64_t>(size);
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (ptr == nullptr) return cudaSuccess;
  if (cudaError_t e = fe::unsafe_call()) return e;
  auto it = fe::allocations().find(reinterpret_cast<uintptr_t>(ptr));
  if (it == fe::allocations().end()) return fe::fail(cudaErrorInvalidValue);
  ++fe::stats().frees;
  --fe::stats().live_allocations;
  fe::stats().live_bytes -= static_cast<int64_t>(it->second);
  fe::allocations().erase(it);
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream) {
  if (!fe::in_allocation(ptr, count)) return fe::fail(cudaErrorInvalidValue);
  fe::Node n;
  n.kind = "memset";
  n.run = [ptr, value, count] {
    ++fe::stats().memsets;
    std::memset(ptr, value, count);
  };
  return fe::enqueue(stream, std::move(n));
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind kind, cudaStream_t stream) {
  fe::StreamState* st = fe::find_stream(stream);
  if (st == nullptr) return fe::fail(cudaErrorInvalidResourceHandle);
  if (st->capturing && !fe::in_allocation(src, count)) {
    // A copy from pageable host memory cannot be captured.
    st->invalidated = true;
    return fe::fail(cudaErrorStreamCaptureUnsupported);
  }
  (void)kind;
  fe::Node n;
  n.kind = "memcpy";
  n.run = [dst, src, count] {
    ++fe::stats().memcpys;
    std::memcpy(dst, src, count);
  };
  return fe::enqueue(stream, std::move(n));
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  (void)flags;
  auto* handle = new char;  // a unique address for the handle
  fe::streams()[reinterpret_cast<uintptr_t>(handle)] = fe::StreamState{};
  *stream = reinterpret_cast<cudaStream_t>(handle);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  const auto key = reinterpret_cast<uintptr_t>(stream);
  if (key <= 2 || fe::streams().erase(key) == 0) return fe::fail(cudaErrorInvalidResourceHandle);
  if (fe::g_current_stream == stream) fe::g_current_stream = nullptr;
  delete reinterpret_cast<char*>(stream);
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  fe::StreamState* st = fe::find_stream(stream);
  if (st == nullptr) return fe::fail(cudaErrorInvalidResourceHandle);
  if (st->capturing) {
    st->invalidated = true;
    return fe::fail(cudaErrorStreamCaptureUnsupported);
  }
  if (cudaError_t e = fe::unsafe_call()) return e;
  ++fe::stats().syncs;
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, enum cudaStreamCaptureStatus* status) {
  fe::StreamState* st = fe::find_stream(stream);
  if (st == nullptr) return fe::fail(cudaErrorInvalidResourceHandle);
  *status = !st->capturing ? cudaStreamCaptureStatusNone
                           : st->invalidated ? cudaStreamCaptureStatusInvalidated : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}

cudaError_t cudaThreadExchangeStreamCaptureMode(enum cudaStreamCaptureMode* mode) {
  std::swap(*mode, fe::t_capture_mode);
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  (void)flags;
  auto* handle = new char;
  fe::events()[reinterpret_cast<uintptr_t>(handle)] = fe::EventState{};
  *event = reinterpret_cast<cudaEvent_t>(handle);
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (fe::events().erase(reinterpret_cast<uintptr_t>(event)) == 0) return fe::fail(cudaErrorInvalidResourceHandle);
  delete reinterpret_cast<char*>(event);
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  auto it = fe::events().find(reinterpret_cast<uintptr_t>(event));
  fe::StreamState* st = fe::find_stream(stream);
  if (it == fe::events().end() || st == nullptr) return fe::fail(cudaErrorInvalidResourceHandle);
  it->second.capture_id = st->capturing ? st->capture_id : 0;
  ++fe::stats().event_records;
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  auto it = fe::events().find(reinterpret_cast<uintptr_t>(event));
  if (it == fe::events().end()) return fe::fail(cudaErrorInvalidResourceHandle);
  if (it->second.capture_id != 0) return fe::fail(cudaErrorStreamCaptureUnsupported);
  if (cudaError_t e = fe::unsafe_call()) return e;
  ++fe::stats().syncs;
  return cudaSuccess;
}

cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
  (void)flags;
  auto it = fe::events().find(reinterpret_cast<uintptr_t>(event));
  fe::StreamState* st = fe::find_stream(stream);
  if (it == fe::events().end() || st == nullptr) return fe::fail(cudaErrorInvalidResourceHandle);
  const uint64_t cap = st->capturing ? st->capture_id : 0;
  if (it->second.capture_id != cap) {
    // A wait that crosses the capture's boundary.
    fe::invalidate_captures();
    return fe::fail(cudaErrorStreamCaptureIsolation);
  }
  ++fe::stats().stream_waits;
  return cudaSuccess;
}

}  // extern "C"
