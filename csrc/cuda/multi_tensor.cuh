// multi_tensor.cuh: the multi-tensor machinery of the CUDA backend
// (fused_adamw._cuda): the address-table columns, the host-side plan (per-tensor
// records and a chunk table over every tensor of a (device, dtype) group), the
// device-resident workspace that holds the plan across steps, the launch macro
// and the device helpers (dtype conversion, 16-byte packs, chunk ranges) that
// adam_cuda.cu and sgd_cuda.cu share.
//
// Follows ../shared/DESIGN.md, "Native interface" and "Multi-tensor plan". The
// per-element math is not here: the kernels call resolve_*() and *_update()
// of csrc/include/fused_adamw/update.h.
//
// Built by CMakeLists.txt twice from the same sources: "_cuda" with nvcc, and
// "_cuda_emu" with the host compiler and -DFUSED_ADAMW_CUDA_EMULATION, which
// swaps <cuda_runtime.h> for csrc/emulation/cuda_emulation.h (kernels run on
// host memory; tests/test_cuda_emulation.py). Planning is plain C++ that
// tests/test_cuda_host.py checks through _cuda.plan_chunks / _cuda.plan_table.
//
// One update launch per group and step, whatever the number of tensors:
//   * metadata scheme: a device-resident table, not kernel-parameter metadata.
//     32 KB of parameters hold about 500 tensors (64 bytes each) and no chunk
//     table, so big models would need several launches or an in-kernel
//     search; the device table has no size limit, and the kernel reads one
//     8-byte chunk record and one 64-byte tensor record per chunk. It is
//     rebuilt only when an address, size or flag in the host table changes
//     (the host compares the whole table, a memcmp, each step).
//   * eager upload: the changed table travels to the device as the parameters
//     of small copy kernels (32 KB each, CUDA 12.1+ on sm_70+), not through a
//     pinned buffer and cudaMemcpyAsync: kernel parameters are copied at
//     launch, so there is no host buffer whose reuse must wait for an earlier
//     copy and no host sync.
//   * capture: a call under stream capture copies its tables, outside the
//     graph, into a buffer of their own that the graph keeps (allocated and
//     filled with the capture relaxed, on the workspace's private stream), so
//     the captured step is the step kernel and the update kernel, nothing
//     else, and replays upload nothing. Eager calls keep their own buffer.
//   * steps (Adam): a small first kernel, one thread per tensor, reads the
//     step s, computes the bias-correction terms of s + 1 in fp64 once per
//     tensor (two pow) into the workspace, and writes s + 1; the update kernel
//     reads the terms. Instead of a last-block atomic ticket that every block
//     paid for, with a counter a graph had to keep consistent: the increment
//     happens exactly once per tensor, in stream order, and found_inf skips
//     both kernels' writes. SGD under stochastic rounding gets the same kind
//     of step kernel (the generator's step count, nothing else).
//   * precision modes (issue 12, /work/spec/issue12.md; hyper.precision):
//     round to nearest (0), master weights (1), stochastic rounding (2),
//     Kahan summation (3). The mode is a template argument: mode 0 keeps its
//     kernels (adam_kernel / sgd_kernel, the same code as before the modes
//     existed), modes 1-3 are *_precision_kernel, built for 16-bit params
//     only. Stochastic rounding draws the Philox-4x32-10 words of
//     csrc/include/fused_adamw/rounding.h, counter (element index within the
//     tensor, tensor index, step after the increment), key the seed; the
//     update kernel reads the step through the step pointer, after the step
//     kernel wrote it.
//   * grid shape: the chunk size is chosen per call from the group's element
//     count and the device's SM count (choose_chunk_elems), so a 2**20-element
//     group fills an H100 instead of running 16 blocks.
#pragma once

#if defined(FUSED_ADAMW_CUDA_EMULATION)
#include "cuda_emulation.h"  // defines FUSED_ADAMW_LAUNCH as a host launcher
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// The one launch syntax of the kernels' sources (a host launcher under emulation).
#define FUSED_ADAMW_LAUNCH(grid, block, shmem, stream, ...) __VA_ARGS__<<<grid, block, shmem, stream>>>
#endif

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <fused_adamw/rounding.h>
#include <fused_adamw/table.h>
#include <fused_adamw/update.h>

namespace fused_adamw {
namespace cuda {

// ------------------------------------------------------------------ tables

enum class Algorithm : int32_t { kAdam = 0, kSgd = 1 };

// Pointer slots of a TensorRecord.
enum Slot : int32_t {
  kSlotParam = 0,
  kSlotGrad = 1,
  kSlotState0 = 2,  // exp_avg | momentum_buffer
  kSlotState1 = 3,  // exp_avg_sq
  kSlotState2 = 4,  // max_exp_avg_sq
  kSlotAux = 5,     // precision 1: the float32 master copy; 3: the Kahan compensation (param dtype)
  kSlots = 6,
};

enum RecordFlag : uint32_t {
  kVectorAligned = 1u << 0,  // every pointer of the tensor is 16-byte aligned
  kFirstStep = 1u << 1,      // SGD: the momentum buffer has no history yet
};

// Elements per chunk; one block per chunk (blocks loop when the grid is
// capped). The chunk size is chosen per call (choose_chunk_elems) between
// kMinChunkElems and kChunkElems: a 64K-element chunk of fp32 AdamW moves
// 1.75 MB, so the per-chunk setup (two record loads) vanishes for big groups,
// while smaller chunks give small groups enough blocks for every SM. Any
// multiple of kPackAlignElems works (packs never straddle a chunk).
constexpr int64_t kChunkElems = int64_t{1} << 16;  // the largest chosen (and plan_chunks' default)
constexpr int64_t kMinChunkElems = int64_t{1} << 12;
constexpr int64_t kPackAlignElems = 8;  // the widest pack: 8 elements (16 bytes of the narrowest type)
constexpr int kBlockThreads = 512;
// Blocks per SM the chunk choice aims for. The update kernels use 28-62
// registers on sm_90 (-Xptxas -v; tests/test_cuda_host.py keeps them <= 64),
// so 2 to 4 512-thread blocks are resident per SM (65536 registers): 8 is 2
// to 4 waves. Unmeasured on a GPU yet (benchmarks/gpu_check.sh, grid_shape).
constexpr int64_t kTargetBlocksPerSm = 8;
// __launch_bounds__ minimum of resident blocks for the precision-mode kernels
// (adam_precision_kernel, sgd_precision_kernel): 2 blocks of 512 threads
// caps them at 64 registers, as the round-to-nearest kernels are kept
// (tests/test_cuda_host.py). Without it, ptxas gave the Adam ones 70-96
// registers (8-byte packs, sm_90).
constexpr int kPrecisionMinBlocks = 2;
constexpr int64_t kMaxBlocks = 2147483647;  // gridDim.x limit; the kernels loop past it
constexpr int kPackBytes = 16;
constexpr int kStepThreads = 256;  // the step kernel's block (one thread per tensor)

// Test knobs (module function set_launch_overrides): 0 keeps the choice.
struct LaunchOverrides {
  int64_t chunk_elems = 0;  // force this chunk size (a multiple of kPackAlignElems)
  int64_t max_blocks = 0;   // cap the update kernel's grid, so blocks loop over chunks
};
LaunchOverrides& launch_overrides();

// One tensor, as the update kernel sees it (64 bytes, so a record is two
// sectors and 500 of them fit one 32 KB upload). The step pointers live in
// an array of their own beside the chunk records (HostPlan::steps): the step
// kernels read them, and the update kernel only under stochastic rounding.
struct TensorRecord {
  void* ptr[kSlots];  // kSlotAux: null unless precision 1 or 3
  int64_t numel;
  uint32_t flags;
  uint32_t index;  // the generator's tensor index (precision 2), else 0
};
static_assert(sizeof(TensorRecord) == 64, "TensorRecord must stay 64 bytes");

// One chunk: elements [index * chunk_elems, min((index + 1) * chunk_elems, numel))
// of tensor `tensor` (64-bit products: index * chunk_elems passes 2**31).
struct ChunkRecord {
  uint32_t tensor;
  uint32_t index;
};
static_assert(sizeof(ChunkRecord) == 8, "ChunkRecord must stay 8 bytes");

// The host plan of one call: what the workspace uploads.
struct HostPlan {
  std::vector<TensorRecord> records;
  std::vector<float*> steps;  // per tensor: Adam's step, SGD's under precision 2, else null
  std::vector<ChunkRecord> chunks;
  int64_t chunk_elems = kChunkElems;
};

// Device layout of a plan, from offset 0 of a buffer: the tensor records
// (64 B each), the step pointers (8 B each), the chunk records (8 B each),
// then the Adam step terms (16 B each) at the next 16-byte boundary. The
// step pointers and chunk records are one contiguous "tail", uploaded
// together, and only when one of them changed.
struct PlanLayout {
  size_t steps, chunks, terms, bytes;  // offsets and the total size
  PlanLayout(int64_t n_tensors, int64_t total_chunks);
};

// The tail of a plan as 8-byte words: the step pointers, then the chunk records.
std::vector<unsigned long long> plan_tail(const HostPlan& plan);

// Chunks of tensors with these sizes, in tensor order (tensor i's chunks
// ascending); throws std::invalid_argument (ValueError) for a negative size or
// counts the records cannot hold.
std::vector<ChunkRecord> plan_chunks(const std::vector<int64_t>& numels, int64_t chunk_elems);

// The chunk size of a call: about kTargetBlocksPerSm blocks per SM for the
// group's elements, a power of two in [kMinChunkElems, kChunkElems] (larger
// only when a tensor would need more than 2**32 chunks); the override wins.
int64_t choose_chunk_elems(const std::vector<int64_t>& numels, int sm_count);

// Validates a host address table (row by row, naming the row and column) and
// builds its records and chunks. `third_state`: amsgrad (Adam) or momentum != 0
// (SGD), i.e. whether max_exp_avg_sq / momentum_buffer is used. `precision`
// (hyper.precision) says which of the aux, index and (SGD) step columns are
// read: aux for 1 and 3, index and SGD's step for 2; the others are ignored.
// chunk_elems 0: choose_chunk_elems for `sm_count` SMs.
HostPlan plan_table(Algorithm algo, const int64_t* table, int64_t n_tensors, bool third_state,
                    int32_t precision, int64_t chunk_elems = kChunkElems, int sm_count = 0);

// Blocks of the update launch for this many chunks (0: no launch), capped by
// the max_blocks override.
int64_t launch_blocks(int64_t total_chunks);

// The storage types of a (param, state) dtype pair, as tags for a generic
// lambda: f(StorageTag<P>{}, StorageTag<S>{}). The one switch over the pairs
// the kernels are built for (check_dtypes lists them).
template <typename T>
struct StorageTag {
  using type = T;
};

template <typename F>
void with_storage_types(DType param, DType state, F&& f) {
  switch (param) {
    case DType::kFloat32:
      if (state == DType::kBFloat16) return f(StorageTag<float>{}, StorageTag<__nv_bfloat16>{});
      return f(StorageTag<float>{}, StorageTag<float>{});
    case DType::kFloat64:
      return f(StorageTag<double>{}, StorageTag<double>{});
    case DType::kFloat16:
      if (state == DType::kFloat32) return f(StorageTag<__half>{}, StorageTag<float>{});
      if (state == DType::kBFloat16) return f(StorageTag<__half>{}, StorageTag<__nv_bfloat16>{});
      return f(StorageTag<__half>{}, StorageTag<__half>{});
    case DType::kBFloat16:
      if (state == DType::kFloat32) return f(StorageTag<__nv_bfloat16>{}, StorageTag<float>{});
      return f(StorageTag<__nv_bfloat16>{}, StorageTag<__nv_bfloat16>{});
  }
  throw std::invalid_argument("param_dtype: unknown dtype");
}

// Throws std::invalid_argument (ValueError) unless the codes name known dtypes
// and a pair the kernels are built for (param: state):
//   float32: float32, bfloat16     float64: float64
//   float16: float16, float32, bfloat16     bfloat16: bfloat16, float32
void check_dtypes(int64_t param_dtype, int64_t state_dtype);

// hyper.precision as the mode; std::invalid_argument naming `precision`
// unless it is 0..3.
Precision precision_mode(int32_t precision);

// Throws std::invalid_argument (ValueError) naming the argument unless
// precision is 0..3, modes 1..3 come with float16/bfloat16 params, and seed
// is in [0, 2^63).
void check_precision(int32_t precision, int64_t seed, int64_t param_dtype);

// ------------------------------------------------------------------ errors

// Throws std::runtime_error (RuntimeError in Python) with CUDA's message.
void check_cuda(cudaError_t err, const char* what);

// Makes `device` current for its lifetime and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// ------------------------------------------------------------------ workspace

// Device pointers of an uploaded plan, passed to the kernels by value.
struct DeviceTables {
  const TensorRecord* records;
  float* const* steps;  // per tensor (HostPlan::steps)
  const ChunkRecord* chunks;
  AdamStepTerms* terms;  // Adam: per tensor, written by the step kernel, read by the update
  int64_t n_tensors;
  int64_t total_chunks;
  int64_t chunk_elems;
};

// Device addresses of the per-call scalars, nullptr when absent.
struct StepScalars {
  const float* lr;          // capturable: the learning rate, else hyper.lr is used
  const float* grad_scale;  // AMP: grads are divided by it
  const float* found_inf;   // AMP: nonzero means write nothing at all
};

// The tables of a plan laid out (PlanLayout) in the device buffer `buf`.
DeviceTables device_tables(char* buf, int64_t n_tensors, int64_t total_chunks, int64_t chunk_elems);

// Device memory holding one group's plan across steps: the backend keeps one
// per (device, dtype) bucket in its cache, so the memory lives as long as the
// optimizer's bucket. Not thread-safe: calls hold the GIL.
//
// CUDA graphs: a call under stream capture allocates a buffer of its own
// (with the capture relaxed; the memory belongs to the workspace, as torch's
// allocator does it), fills it outside the graph through the workspace's
// private stream, and keeps it until the workspace dies: replays find their
// tables where the capture left them, and eager calls go on with their own
// buffer and cache.
class Workspace {
 public:
  explicit Workspace(int device) : device_(device) {}
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  int device() const { return device_; }
  int64_t uploads() const { return uploads_; }
  int64_t capacity_bytes() const { return static_cast<int64_t>(capacity_); }
  bool graph_owned() const { return !graph_buffers_.empty(); }
  int64_t graph_buffers() const { return static_cast<int64_t>(graph_buffers_.size()); }
  int64_t chunk_elems() const { return chunk_elems_; }

  // With device() current: the device tables for this host table on stream,
  // validated, planned and uploaded only when it differs from the last one.
  DeviceTables prepare(Algorithm algo, const int64_t* table, int64_t n_tensors, bool third_state,
                       int32_t precision, cudaStream_t stream);
  // After the launch on stream.
  void finish(cudaStream_t stream);

 private:
  bool ensure_capacity(size_t bytes, cudaStream_t stream);
  void upload(void* dst, const void* src, size_t bytes, cudaStream_t stream);
  DeviceTables prepare_captured(const HostPlan& plan);
  DeviceTables tables() const;
  int sm_count();

  int device_;
  char* buf_ = nullptr;
  size_t capacity_ = 0;
  std::vector<char*> graph_buffers_;  // one per captured call, kept for the graphs' replays
  cudaStream_t side_stream_ = nullptr;  // fills graph buffers outside the capture
  cudaEvent_t last_use_ = nullptr;
  cudaStream_t last_stream_ = nullptr;
  bool launched_ = false;
  bool valid_ = false;
  int sm_count_ = 0;
  int64_t chunk_elems_ = 0;
  int64_t chunk_override_ = 0;
  Algorithm algo_ = Algorithm::kAdam;
  bool third_state_ = false;
  int32_t precision_ = 0;  // the columns read depend on it: part of the cache key
  int64_t n_tensors_ = -1;
  int64_t total_chunks_ = 0;
  std::vector<int64_t> mirror_;  // the host table the device tables describe
  int64_t uploads_ = 0;
};

// ------------------------------------------------------------------ launchers

void launch_adam(DType param, DType state, const DeviceTables& tables, const AdamHyper& hyper,
                 const StepScalars& scalars, cudaStream_t stream);
void launch_sgd(DType param, DType state, const DeviceTables& tables, const SgdHyper& hyper,
                const StepScalars& scalars, cudaStream_t stream);

// ------------------------------------------------------------------ device helpers

#if defined(__CUDACC__) || defined(FUSED_ADAMW_CUDA_EMULATION)

// Storage <-> math conversions: load, store (round to nearest even, CUDA's
// conversions), and for the 16-bit types stochastic(x, word) (rounding.h's
// rule on the low 16 bits of a Philox word; the same bits on every backend).
template <typename T>
struct Storage {
  static constexpr bool kSixteenBit = false;
  template <typename M>
  static __device__ __forceinline__ M load(T x) { return static_cast<M>(x); }
  template <typename M>
  static __device__ __forceinline__ T store(M x) { return static_cast<T>(x); }
};
// Stochastic rounding to float16 (rounding.h's float_to_fp16_sr, the same
// bits): the normal float16 range, where nearly every value lies, is three
// integer operations on a branch; the rest (subnormals, 65536 and above, inf,
// NaN) goes to float_to_fp16_sr. Why: that function computes both ranges and
// selects (branch-free for GCC's vectoriser), and four of them per element
// (param and three fp16 states) spilled
// adam_precision_kernel<__half, __half, kStochastic, true> under its
// 64-register bound (16 bytes, sm_90); with the branch it needs 64 and no
// stack. The normal-range arithmetic is float_to_fp16_sr's lo_normal /
// f16_normal: lo = a rebiased with the 13 dropped bits cleared, f16 = those
// bits << 3, and lo + 1 carries into the exponent (65504 up to inf).
__device__ __forceinline__ uint16_t fp16_stochastic_bits(float x, uint32_t word) {
  const uint32_t u = float_as_bits(x);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a < 0x38800000u || a >= 0x47800000u) return float_to_fp16_sr(x, word);  // not in [2^-14, 65536)
  const uint32_t lo = (a - (static_cast<uint32_t>(127 - 15) << 23)) >> 13;
  const uint32_t f16 = (a & 0x1FFFu) << 3;
  return static_cast<uint16_t>(((u >> 16) & 0x8000u) | (lo + (f16 + (word & 0xFFFFu) >= 0x10000u ? 1u : 0u)));
}

template <>
struct Storage<__half> {
  static constexpr bool kSixteenBit = true;
  template <typename M>
  static __device__ __forceinline__ M load(__half x) { return static_cast<M>(__half2float(x)); }
  template <typename M>
  static __device__ __forceinline__ __half store(M x) { return __float2half_rn(static_cast<float>(x)); }
  static __device__ __forceinline__ __half stochastic(float x, uint32_t word) {
    __half_raw raw;
    raw.x = fp16_stochastic_bits(x, word);
    return __half(raw);
  }
};
template <>
struct Storage<__nv_bfloat16> {
  static constexpr bool kSixteenBit = true;
  template <typename M>
  static __device__ __forceinline__ M load(__nv_bfloat16 x) { return static_cast<M>(__bfloat162float(x)); }
  template <typename M>
  static __device__ __forceinline__ __nv_bfloat16 store(M x) {
    return __float2bfloat16_rn(static_cast<float>(x));
  }
  static __device__ __forceinline__ __nv_bfloat16 stochastic(float x, uint32_t word) {
    __nv_bfloat16_raw raw;
    raw.x = float_to_bf16_sr(x, word);
    return __nv_bfloat16(raw);
  }
};

// Elements per pack of a kernel: 16 bytes of the narrowest of its storage
// types, so every tensor's pack is whole 16-byte words (fp32 params with bf16
// state: 8 elements, two words of param, one of state). The precision-mode
// kernels pack 8 bytes of the narrowest type (8-byte words, or 16 for their
// fp32 tensors): with 16-byte packs, eight unrolled elements (a Philox-4x32-10
// each under stochastic rounding) took the Adam ones to 122 registers on
// sm_90 and spilled under kPrecisionMinBlocks' 64; with four (and
// fp16_stochastic_bits below), none spills.
template <typename P, typename S, Precision kMode = Precision::kNearest>
constexpr int pack_width() {
  constexpr int kBytes = kMode == Precision::kNearest ? kPackBytes : kPackBytes / 2;
  return kBytes / static_cast<int>(sizeof(P) < sizeof(S) ? sizeof(P) : sizeof(S));
}

// The aux tensor's storage type: the float32 master copy (precision 1), the
// compensation in the param dtype (precision 3; unused by modes 0 and 2).
template <typename P, Precision kMode>
struct AuxOf {
  using type = P;
};
template <typename P>
struct AuxOf<P, Precision::kMaster> {
  using type = float;
};

template <Precision kMode>
constexpr bool uses_aux() {
  return kMode == Precision::kMaster || kMode == Precision::kKahan;
}

// The generator of one tensor at one step (precision 2): words(e) are the
// Philox words of element e (its index within the tensor).
struct ElementRng {
  uint64_t seed;
  uint32_t step;   // the tensor's step after this call's increment
  uint32_t index;  // the tensor's generator index
  __device__ __forceinline__ PhiloxWords words(int64_t e) const {
    return element_words(seed, step, index, static_cast<uint64_t>(e));
  }
};

// The generator of the chunk's tensor; reads the step (written by the step
// kernel earlier in the stream) only under stochastic rounding.
template <Precision kMode>
__device__ __forceinline__ ElementRng chunk_rng(const DeviceTables& t, uint32_t tensor, const TensorRecord& r,
                                                int64_t seed) {
  ElementRng rng{0, 0, 0};
  if constexpr (kMode == Precision::kStochastic)
    rng = ElementRng{static_cast<uint64_t>(seed), static_cast<uint32_t>(*t.steps[tensor]), r.index};
  return rng;
}

// The value the update starts from: the master copy under precision 1, else the param.
template <Precision kMode, typename M, typename A>
__device__ __forceinline__ M start_value(M old, const A& aux) {
  if constexpr (kMode == Precision::kMaster) return static_cast<M>(aux);
  return old;
}

// A state value (exp_avg, exp_avg_sq, max_exp_avg_sq, momentum_buffer):
// stochastically rounded with `word` when 16-bit under precision 2, else
// rounded to nearest (a plain store for float32 / float64).
template <Precision kMode, typename S, typename M>
__device__ __forceinline__ S store_state(M x, uint32_t word) {
  if constexpr (kMode == Precision::kStochastic && Storage<S>::kSixteenBit)
    return Storage<S>::stochastic(static_cast<float>(x), word);
  else
    return Storage<S>::template store<M>(x);
}

// The param's new storage value (the spec's "Param store"; reference
// adam_step_lp step 3): x the updated value, old the param before the step,
// aux the element's master copy (1, set to x) or compensation (3, read and
// updated), word the Philox word w0 (2). Modes 1-3 exist for 16-bit params
// only, where M is float.
template <Precision kMode, typename P, typename M, typename A>
__device__ __forceinline__ P store_param(M x, M old, A& aux, uint32_t word) {
  if constexpr (kMode == Precision::kMaster) {
    aux = static_cast<float>(x);
    return Storage<P>::template store<M>(x);
  } else if constexpr (kMode == Precision::kStochastic) {
    return Storage<P>::stochastic(x, word);
  } else if constexpr (kMode == Precision::kKahan) {
    const float u = kahan_update(old, x, Storage<P>::template load<float>(aux));
    const P pn = Storage<P>::template store<float>(old + u);
    aux = Storage<P>::template store<float>(kahan_compensation(u, Storage<P>::template load<float>(pn), old));
    return pn;
  } else {
    return Storage<P>::template store<M>(x);
  }
}

// The tensors are device memory: telling the compiler lets it emit global
// loads and stores (LDG/STG) instead of generic ones for pointers it reads
// from the records. Only for pointers that are used (never null).
template <typename T>
__device__ __forceinline__ T* global_ptr(void* p) {
  __builtin_assume(__isGlobal(p));
  return static_cast<T*>(p);
}

// The access word of a pack of `bytes`: 16-byte words (LDG/STG.E.128), or
// 8-byte words for the 8-byte packs of the stochastic-rounding kernels.
template <int kBytes>
struct PackWord {
  static_assert(kBytes % 8 == 0, "a pack is whole 8-byte words");
  using type = typename std::conditional<kBytes % kPackBytes == 0, int4, int2>::type;
};

// W elements of T through 16-byte accesses (W * sizeof(T) a multiple of 16:
// one access for the param type, two for fp32 state beside 16-bit params),
// or 8-byte ones where W * sizeof(T) is 8 or 24.
template <int W, typename T>
__device__ __forceinline__ void load_pack(const T* src, T (&dst)[W]) {
  using Word = typename PackWord<W * sizeof(T)>::type;
  constexpr int kWords = static_cast<int>(W * sizeof(T) / sizeof(Word));
  Word raw[kWords];
#pragma unroll
  for (int k = 0; k < kWords; ++k) raw[k] = reinterpret_cast<const Word*>(src)[k];
  memcpy(dst, raw, sizeof(raw));
}

template <int W, typename T>
__device__ __forceinline__ void store_pack(T* dst, const T (&src)[W]) {
  using Word = typename PackWord<W * sizeof(T)>::type;
  constexpr int kWords = static_cast<int>(W * sizeof(T) / sizeof(Word));
  Word raw[kWords];
  memcpy(raw, src, sizeof(raw));
#pragma unroll
  for (int k = 0; k < kWords; ++k) reinterpret_cast<Word*>(dst)[k] = raw[k];
}

// The chunk's element range.
__device__ __forceinline__ void chunk_range(const ChunkRecord& c, int64_t numel, int64_t chunk_elems,
                                            int64_t& begin, int64_t& end) {
  begin = static_cast<int64_t>(c.index) * chunk_elems;
  end = begin + chunk_elems < numel ? begin + chunk_elems : numel;
}

#endif  // __CUDACC__ || FUSED_ADAMW_CUDA_EMULATION

}  // namespace cuda
}  // namespace fused_adamw
