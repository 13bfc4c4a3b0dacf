// multi_tensor.cu: host side of the CUDA backend's multi-tensor machinery
// (declared and explained in multi_tensor.cuh): table validation, chunk-size
// choice and chunk planning (plain C++, no GPU needed), CUDA error checking,
// and the workspace that keeps a group's plan on the device, uploads it
// through kernel parameters, and gives each captured call its own copy.
//
// Built into fused_adamw._cuda (nvcc) and fused_adamw._cuda_emu (host
// compiler, csrc/emulation/cuda_emulation.h) by CMakeLists.txt.
#include "multi_tensor.cuh"

#include <algorithm>
#include <stdexcept>

namespace fused_adamw {
namespace cuda {

namespace {

// Words one upload kernel carries in its parameters. Kernel parameters may
// take 32764 bytes since CUDA 12.1 on sm_70 and newer; the blob below is
// 16 bytes of header plus 32000 of payload.
constexpr int64_t kUploadWords = 4000;

struct UploadBlob {
  unsigned long long* dst;
  int64_t words;
  unsigned long long data[kUploadWords];
};
static_assert(sizeof(UploadBlob) <= 32764, "kernel parameters are limited to 32764 bytes");

constexpr int kUploadThreads = 256;

__global__ void __launch_bounds__(kUploadThreads) upload_kernel(const __grid_constant__ UploadBlob blob) {
  for (int64_t i = threadIdx.x; i < blob.words; i += blockDim.x) blob.dst[i] = blob.data[i];
}

const char* dtype_name(int64_t code) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

int64_t table_cols(Algorithm algo) {
  return algo == Algorithm::kAdam ? static_cast<int64_t>(kAdamCols) : static_cast<int64_t>(kSgdCols);
}

bool known_dtype(int64_t code) {
  return code == static_cast<int64_t>(DType::kFloat32) || code == static_cast<int64_t>(DType::kFloat64) ||
         code == static_cast<int64_t>(DType::kFloat16) || code == static_cast<int64_t>(DType::kBFloat16);
}

[[noreturn]] void bad_row(int64_t row, const char* column, const std::string& why) {
  throw std::invalid_argument("address table row " + std::to_string(row) + ", column " + column + ": " + why);
}

// A step column: a float32 scalar, never 0.
float* step_pointer(int64_t row, int64_t addr) {
  if (addr == 0) bad_row(row, "step", "address is 0");
  if (addr % static_cast<int64_t>(sizeof(float)) != 0) bad_row(row, "step", "not 4-byte aligned");
  return reinterpret_cast<float*>(static_cast<uintptr_t>(addr));
}

// Switches the calling thread's capture mode to relaxed for its lifetime, so
// that cudaMalloc / cudaFree during a capture do not invalidate it.
class RelaxedCapture {
 public:
  RelaxedCapture() { check_cuda(cudaThreadExchangeStreamCaptureMode(&mode_), "cudaThreadExchangeStreamCaptureMode"); }
  ~RelaxedCapture() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace

// ------------------------------------------------------------------ planning

void check_dtypes(int64_t param_dtype, int64_t state_dtype) {
  if (!known_dtype(param_dtype))
    throw std::invalid_argument("param_dtype: unknown dtype code " + std::to_string(param_dtype) +
                                " (0 float32, 1 float64, 2 float16, 3 bfloat16)");
  if (!known_dtype(state_dtype))
    throw std::invalid_argument("state_dtype: unknown dtype code " + std::to_string(state_dtype) +
                                " (0 float32, 1 float64, 2 float16, 3 bfloat16)");
  const auto p = static_cast<DType>(param_dtype);
  const auto s = static_cast<DType>(state_dtype);
  const bool low = p == DType::kFloat16 || p == DType::kBFloat16;
  const bool ok = s == p || (low && s == DType::kFloat32) || (p != DType::kFloat64 && s == DType::kBFloat16);
  if (!ok)
    throw std::invalid_argument(std::string("state_dtype ") + dtype_name(state_dtype) + " is not allowed with " +
                                dtype_name(param_dtype) +
                                " params: the param dtype, float32 for float16/bfloat16 params, or bfloat16 "
                                "for any but float64 params");
}

Precision precision_mode(int32_t precision) {
  if (precision < 0 || precision > 3)
    throw std::invalid_argument("precision must be 0 (round to nearest), 1 (master weights), 2 (stochastic "
                                "rounding) or 3 (Kahan summation), got " + std::to_string(precision));
  return static_cast<Precision>(precision);
}

void check_precision(int32_t precision, int64_t seed, int64_t param_dtype) {
  static const char* const names[] = {"round to nearest", "master weights", "stochastic rounding",
                                      "Kahan summation"};
  const Precision mode = precision_mode(precision);
  const auto p = static_cast<DType>(param_dtype);
  if (mode != Precision::kNearest && p != DType::kFloat16 && p != DType::kBFloat16)
    throw std::invalid_argument("precision " + std::to_string(precision) + " (" + names[precision] +
                                ") needs float16 or bfloat16 params, got " + dtype_name(param_dtype));
  if (seed < 0) throw std::invalid_argument("seed must be in [0, 2**63), got " + std::to_string(seed));
}

PlanLayout::PlanLayout(int64_t n_tensors, int64_t total_chunks) {
  const size_t n = static_cast<size_t>(n_tensors);
  steps = sizeof(TensorRecord) * n;
  chunks = steps + sizeof(float*) * n;
  terms = (chunks + sizeof(ChunkRecord) * static_cast<size_t>(total_chunks) + 15) / 16 * 16;
  bytes = terms + sizeof(AdamStepTerms) * n;
}

std::vector<unsigned long long> plan_tail(const HostPlan& plan) {
  static_assert(sizeof(float*) == 8 && sizeof(ChunkRecord) == 8, "the tail is 8-byte words");
  std::vector<unsigned long long> tail(plan.steps.size() + plan.chunks.size());
  if (!plan.steps.empty()) std::memcpy(tail.data(), plan.steps.data(), 8 * plan.steps.size());
  if (!plan.chunks.empty()) std::memcpy(tail.data() + plan.steps.size(), plan.chunks.data(), 8 * plan.chunks.size());
  return tail;
}

DeviceTables device_tables(char* buf, int64_t n_tensors, int64_t total_chunks, int64_t chunk_elems) {
  const PlanLayout at(n_tensors, total_chunks);
  DeviceTables t;
  t.records = reinterpret_cast<const TensorRecord*>(buf);
  t.steps = reinterpret_cast<float* const*>(buf + at.steps);
  t.chunks = reinterpret_cast<const ChunkRecord*>(buf + at.chunks);
  t.terms = reinterpret_cast<AdamStepTerms*>(buf + at.terms);
  t.n_tensors = n_tensors;
  t.total_chunks = total_chunks;
  t.chunk_elems = chunk_elems;
  return t;
}

std::vector<ChunkRecord> plan_chunks(const std::vector<int64_t>& numels, int64_t chunk_elems) {
  if (chunk_elems <= 0) throw std::invalid_argument("chunk_elems must be positive, got " + std::to_string(chunk_elems));
  if (numels.size() > UINT32_MAX)
    throw std::invalid_argument("too many tensors for one call: " + std::to_string(numels.size()));
  int64_t total = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] < 0) throw std::invalid_argument("numel of tensor " + std::to_string(i) + " is negative");
    const int64_t chunks = numels[i] / chunk_elems + (numels[i] % chunk_elems != 0);
    if (chunks > static_cast<int64_t>(UINT32_MAX))
      throw std::invalid_argument("tensor " + std::to_string(i) + " has too many elements: " +
                                  std::to_string(numels[i]));
    total += chunks;
  }
  std::vector<ChunkRecord> out;
  out.reserve(static_cast<size_t>(total));
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t chunks = numels[i] / chunk_elems + (numels[i] % chunk_elems != 0);
    for (int64_t c = 0; c < chunks; ++c)
      out.push_back(ChunkRecord{static_cast<uint32_t>(i), static_cast<uint32_t>(c)});
  }
  return out;
}

LaunchOverrides& launch_overrides() {
  static LaunchOverrides o;
  return o;
}

int64_t launch_blocks(int64_t total_chunks) {
  const int64_t cap = launch_overrides().max_blocks > 0 ? launch_overrides().max_blocks : kMaxBlocks;
  return std::min(total_chunks, cap);
}

int64_t choose_chunk_elems(const std::vector<int64_t>& numels, int sm_count) {
  if (launch_overrides().chunk_elems > 0) return launch_overrides().chunk_elems;
  int64_t total = 0, largest = 0;
  for (int64_t n : numels) {
    total += n;
    largest = std::max(largest, n);
  }
  const int64_t target_blocks = std::max<int64_t>(1, sm_count) * kTargetBlocksPerSm;
  const int64_t want = total / target_blocks + (total % target_blocks != 0);
  int64_t chunk = kMinChunkElems;
  while (chunk < want && chunk < kChunkElems) chunk *= 2;
  // ChunkRecord::index is 32 bits.
  while (largest / chunk >= static_cast<int64_t>(UINT32_MAX)) chunk *= 2;
  return chunk;
}

HostPlan plan_table(Algorithm algo, const int64_t* table, int64_t n_tensors, bool third_state,
                    int32_t precision, int64_t chunk_elems, int sm_count) {
  if (n_tensors < 0) throw std::invalid_argument("n_tensors must be >= 0, got " + std::to_string(n_tensors));
  if (n_tensors > 0 && table == nullptr) throw std::invalid_argument("table_addr is 0 with n_tensors > 0");
  const Precision mode = precision_mode(precision);
  const bool aux = mode == Precision::kMaster || mode == Precision::kKahan;
  const bool stochastic = mode == Precision::kStochastic;
  const bool adam = algo == Algorithm::kAdam;
  const int64_t cols = table_cols(algo);
  // Table column of each pointer slot, -1 where the slot is unused.
  int64_t slot_col[kSlots];
  const char* slot_name[kSlots];
  if (adam) {
    const int64_t c[kSlots] = {kAdamParam,    kAdamGrad, kAdamExpAvg, kAdamExpAvgSq, third_state ? kAdamMaxExpAvgSq : -1,
                               aux ? kAdamAux : -1};
    const char* nm[kSlots] = {"param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "aux"};
    std::copy(c, c + kSlots, slot_col);
    std::copy(nm, nm + kSlots, slot_name);
  } else {
    const int64_t c[kSlots] = {kSgdParam, kSgdGrad, third_state ? kSgdMomentumBuffer : -1, -1, -1,
                               aux ? kSgdAux : -1};
    const char* nm[kSlots] = {"param", "grad", "momentum_buffer", "", "", "aux"};
    std::copy(c, c + kSlots, slot_col);
    std::copy(nm, nm + kSlots, slot_name);
  }
  const int64_t index_col = adam ? static_cast<int64_t>(kAdamIndex) : static_cast<int64_t>(kSgdIndex);

  HostPlan plan;
  plan.records.resize(static_cast<size_t>(n_tensors));
  plan.steps.assign(static_cast<size_t>(n_tensors), nullptr);
  std::vector<int64_t> numels(static_cast<size_t>(n_tensors));
  for (int64_t i = 0; i < n_tensors; ++i) {
    const int64_t* row = table + i * cols;
    TensorRecord& r = plan.records[static_cast<size_t>(i)];
    r = TensorRecord{};
    r.numel = row[adam ? static_cast<int64_t>(kAdamNumel) : static_cast<int64_t>(kSgdNumel)];
    if (r.numel < 0) bad_row(i, "numel", "negative (" + std::to_string(r.numel) + ")");
    numels[static_cast<size_t>(i)] = r.numel;
    bool aligned = true;
    for (int s = 0; s < kSlots; ++s) {
      if (slot_col[s] < 0) continue;
      const int64_t addr = row[slot_col[s]];
      // An empty tensor may have no storage; nothing of it is touched.
      if (addr == 0 && r.numel > 0) bad_row(i, slot_name[s], "address is 0");
      aligned = aligned && addr % kPackBytes == 0;
      r.ptr[s] = reinterpret_cast<void*>(static_cast<uintptr_t>(addr));
    }
    r.flags = aligned ? kVectorAligned : 0u;
    if (adam) {
      plan.steps[static_cast<size_t>(i)] = step_pointer(i, row[kAdamStep]);
    } else {
      if (third_state && row[kSgdFirstStep] != 0) r.flags |= kFirstStep;
      // SGD counts steps for the generator only.
      if (stochastic) plan.steps[static_cast<size_t>(i)] = step_pointer(i, row[kSgdStep]);
    }
    if (stochastic) {
      const int64_t index = row[index_col];
      if (index < 0 || index > static_cast<int64_t>(UINT32_MAX))
        bad_row(i, "index", "must be in [0, 2**32), got " + std::to_string(index));
      r.index = static_cast<uint32_t>(index);
    }
  }
  plan.chunk_elems = chunk_elems > 0 ? chunk_elems : choose_chunk_elems(numels, sm_count);
  if (plan.chunk_elems % kPackAlignElems != 0)
    throw std::invalid_argument("chunk_elems must be a multiple of " + std::to_string(kPackAlignElems) + ", got " +
                                std::to_string(plan.chunk_elems));
  plan.chunks = plan_chunks(numels, plan.chunk_elems);
  return plan;
}

// ------------------------------------------------------------------ errors

void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  // Reset the runtime's last error (for errors that are not sticky), so the
  // next launch check does not report this one again.
  cudaGetLastError();
  throw std::runtime_error(std::string("fused_adamw._cuda: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

DeviceGuard::DeviceGuard(int device) {
  check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
  if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

// ------------------------------------------------------------------ workspace

Workspace::~Workspace() {
  if (buf_ == nullptr && last_use_ == nullptr && graph_buffers_.empty()) return;  // never touched the GPU
  // No throwing here: errors (a CUDA runtime already unloaded at exit) are
  // ignored, and the memory goes with the process.
  int previous = -1;
  const bool switched = cudaGetDevice(&previous) == cudaSuccess && previous != device_ &&
                        cudaSetDevice(device_) == cudaSuccess;
  if (last_use_ != nullptr) {
    cudaEventSynchronize(last_use_);
    cudaEventDestroy(last_use_);
  }
  if (buf_ != nullptr) cudaFree(buf_);
  for (char* g : graph_buffers_) cudaFree(g);
  if (side_stream_ != nullptr) cudaStreamDestroy(side_stream_);
  if (switched) cudaSetDevice(previous);
}

int Workspace::sm_count() {
  if (sm_count_ == 0)
    check_cuda(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_),
               "cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount)");
  return sm_count_;
}

DeviceTables Workspace::tables() const { return device_tables(buf_, n_tensors_, total_chunks_, chunk_elems_); }

bool Workspace::ensure_capacity(size_t bytes, cudaStream_t stream) {
  if (bytes <= capacity_ && buf_ != nullptr) return false;
  (void)stream;
  // Grow by half again, so a group that grows a little each time does not
  // reallocate every time.
  size_t want = std::max(bytes, capacity_ + capacity_ / 2);
  want = (want + 4095) / 4096 * 4096;
  char* fresh = nullptr;
  check_cuda(cudaMalloc(&fresh, want), "cudaMalloc (optimizer workspace)");
  if (buf_ != nullptr) {
    // The last launch that read the old tables must be done before they go.
    if (launched_) check_cuda(cudaEventSynchronize(last_use_), "cudaEventSynchronize");
    check_cuda(cudaFree(buf_), "cudaFree");
  }
  buf_ = fresh;
  capacity_ = want;
  return true;
}

void Workspace::upload(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  const int64_t words = static_cast<int64_t>(bytes / sizeof(unsigned long long));
  auto* out = static_cast<unsigned long long*>(dst);
  const auto* in = static_cast<const unsigned long long*>(src);
  UploadBlob blob;
  for (int64_t at = 0; at < words; at += kUploadWords) {
    blob.dst = out + at;
    blob.words = std::min(kUploadWords, words - at);
    std::memcpy(blob.data, in + at, static_cast<size_t>(blob.words) * sizeof(unsigned long long));
    FUSED_ADAMW_LAUNCH(1, kUploadThreads, 0, stream, upload_kernel)(blob);
    check_cuda(cudaGetLastError(), "upload_kernel launch");
  }
}

DeviceTables Workspace::prepare_captured(const HostPlan& plan) {
  // Everything here runs outside the graph: allocation and a synchronous copy
  // on the private stream, with this thread's capture mode relaxed.
  RelaxedCapture relaxed;
  const int64_t n = static_cast<int64_t>(plan.records.size());
  const int64_t chunks = static_cast<int64_t>(plan.chunks.size());
  const PlanLayout at(n, chunks);
  char* buf = nullptr;
  check_cuda(cudaMalloc(&buf, at.bytes), "cudaMalloc (captured tables)");
  graph_buffers_.push_back(buf);
  if (side_stream_ == nullptr)
    check_cuda(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  if (at.steps)
    check_cuda(cudaMemcpyAsync(buf, plan.records.data(), at.steps, cudaMemcpyHostToDevice, side_stream_),
               "cudaMemcpyAsync (captured tables)");
  const std::vector<unsigned long long> tail = plan_tail(plan);
  if (!tail.empty())
    check_cuda(cudaMemcpyAsync(buf + at.steps, tail.data(), 8 * tail.size(), cudaMemcpyHostToDevice, side_stream_),
               "cudaMemcpyAsync (captured tables)");
  check_cuda(cudaStreamSynchronize(side_stream_), "cudaStreamSynchronize (captured tables)");
  ++uploads_;
  return device_tables(buf, n, chunks, plan.chunk_elems);
}

DeviceTables Workspace::prepare(Algorithm algo, const int64_t* table, int64_t n_tensors, bool third_state,
                                int32_t precision, cudaStream_t stream) {
  if (stream_capturing(stream))
    return prepare_captured(plan_table(algo, table, n_tensors, third_state, precision, 0, sm_count()));
  // A launch of this workspace on another stream may still read the tables:
  // order this call after it.
  if (launched_ && stream != last_stream_)
    check_cuda(cudaStreamWaitEvent(stream, last_use_, 0), "cudaStreamWaitEvent");

  const size_t table_words = static_cast<size_t>(n_tensors * table_cols(algo));
  // The precision decides which columns are read and checked: a change
  // re-plans even an identical table.
  const bool same_shape = valid_ && algo == algo_ && third_state == third_state_ && precision == precision_ &&
                          n_tensors == n_tensors_ && chunk_override_ == launch_overrides().chunk_elems;
  if (same_shape && std::memcmp(mirror_.data(), table, table_words * sizeof(int64_t)) == 0) return tables();

  // throws before anything changes
  HostPlan plan = plan_table(algo, table, n_tensors, third_state, precision, 0, sm_count());
  const int64_t cols = table_cols(algo);
  const int64_t numel_col = algo == Algorithm::kAdam ? static_cast<int64_t>(kAdamNumel) : static_cast<int64_t>(kSgdNumel);
  const int64_t step_col = algo == Algorithm::kAdam ? static_cast<int64_t>(kAdamStep) : static_cast<int64_t>(kSgdStep);
  bool same_tail = same_shape && plan.chunk_elems == chunk_elems_;
  for (int64_t i = 0; same_tail && i < n_tensors; ++i)
    same_tail = mirror_[i * cols + numel_col] == table[i * cols + numel_col] &&
                mirror_[i * cols + step_col] == table[i * cols + step_col];

  valid_ = false;
  const int64_t total_chunks = static_cast<int64_t>(plan.chunks.size());
  const PlanLayout at(n_tensors, total_chunks);
  const bool moved = ensure_capacity(at.bytes, stream);
  if (at.steps) upload(buf_, plan.records.data(), at.steps, stream);
  // The step pointers and chunk table depend on the step addresses and the
  // sizes only, so an address change (new grads after
  // zero_grad(set_to_none=True)) uploads the records alone.
  if (moved || !same_tail) {
    const std::vector<unsigned long long> tail = plan_tail(plan);
    if (!tail.empty()) upload(buf_ + at.steps, tail.data(), 8 * tail.size(), stream);
  }
  ++uploads_;

  mirror_.assign(table, table + table_words);
  algo_ = algo;
  third_state_ = third_state;
  precision_ = precision;
  n_tensors_ = n_tensors;
  total_chunks_ = total_chunks;
  chunk_elems_ = plan.chunk_elems;
  chunk_override_ = launch_overrides().chunk_elems;
  valid_ = true;
  return tables();
}

void Workspace::finish(cudaStream_t stream) {
  if (stream_capturing(stream)) return;  // the graph owns its own tables
  if (last_use_ == nullptr)
    check_cuda(cudaEventCreateWithFlags(&last_use_, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  check_cuda(cudaEventRecord(last_use_, stream), "cudaEventRecord");
  last_stream_ = stream;
  launched_ = true;
}

}  // namespace cuda
}  // namespace fused_adamw
