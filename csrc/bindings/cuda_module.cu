// cuda_module.cu: the pybind11 module fused_adamw._cuda, and, compiled by the
// host compiler with -DFUSED_ADAMW_CUDA_EMULATION, fused_adamw._cuda_emu: the
// same module over csrc/emulation/cuda_emulation.h (kernels on host memory),
// plus the emulator's knobs (csrc/emulation/emulation_bindings.cpp).
//
// The native interface of ../shared/DESIGN.md: raw addresses (Python ints) of
// a HOST int64 address table, dtype codes, a hyperparameter struct, a device
// index and a stream handle; no torch. python/fused_adamw/backend_cuda.py is
// its caller. Module contents:
//   AdamHyper, SgdHyper       the structs of csrc/include/fused_adamw/update.h
//   Workspace(device_index)   device memory holding a group's plan across steps
//   adam_step(...), sgd_step(...)
//   plan_chunks, plan_table   the host-side planning, for tests without a GPU
//   set_launch_overrides(chunk_elems, max_blocks), launch_overrides()
//                             test knobs: a forced chunk size, a capped grid
//   adam_step_chunks(...)     test hook: one Adam step over a hand-made chunk list
//   build_info(), device_count()
//
// Argument errors raise ValueError (std::invalid_argument) naming the
// argument (dtypes, precision and seed, sizes; table rows and columns),
// before any CUDA call; CUDA errors raise RuntimeError with CUDA's message. cudart is linked statically (CMakeLists.txt), so the module imports
// where there is no GPU or CUDA runtime library.
//
// Built by CMakeLists.txt ("_cuda", "_cuda_emu").
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "multi_tensor.cuh"
#include "hyper_bindings.h"

#if defined(FUSED_ADAMW_CUDA_EMULATION)
namespace fused_adamw {
namespace emu {
void bind_emulation(pybind11::module_& m);  // emulation_bindings.cpp
}  // namespace emu
}  // namespace fused_adamw
#endif

namespace py = pybind11;

namespace fused_adamw {
namespace cuda {
namespace {

// The workspace of calls that pass none: one per device, for the life of the
// process (leaked on purpose: freeing it after the CUDA runtime has unloaded
// at exit would fail). Correct for any caller, but it re-uploads whenever
// calls alternate between tables; the backend passes its own.
Workspace& default_workspace(int device) {
  static std::map<int, Workspace*> spaces;
  auto it = spaces.find(device);
  if (it == spaces.end()) it = spaces.emplace(device, new Workspace(device)).first;
  return *it->second;
}

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

template <typename T>
const T* as_device_scalar(int64_t addr) {
  return reinterpret_cast<const T*>(static_cast<uintptr_t>(addr));
}

struct CallArgs {
  const int64_t* table;
  Workspace* workspace;
};

// Checks the arguments every call shares; nullptr table when there is
// nothing to do. The table's rows (aux, index and step columns as the
// precision needs them) are checked by plan_table.
template <typename Hyper>
CallArgs check_call(int64_t table_addr, int64_t n_tensors, int64_t param_dtype, int64_t state_dtype,
                    const Hyper& hyper, int64_t device_index, Workspace* workspace) {
  check_dtypes(param_dtype, state_dtype);
  check_precision(hyper.precision, hyper.seed, param_dtype);
  if (n_tensors < 0) throw std::invalid_argument("n_tensors must be >= 0, got " + std::to_string(n_tensors));
  if (n_tensors > 0 && table_addr == 0) throw std::invalid_argument("table_addr is 0 with n_tensors > 0");
  if (device_index < 0 || device_index > INT32_MAX)
    throw std::invalid_argument("device_index must be a CUDA device index, got " + std::to_string(device_index));
  if (workspace != nullptr && workspace->device() != device_index)
    throw std::invalid_argument("workspace belongs to device " + std::to_string(workspace->device()) +
                                ", the call is for device " + std::to_string(device_index));
  CallArgs out;
  out.table = n_tensors > 0 ? reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(table_addr)) : nullptr;
  out.workspace = workspace != nullptr ? workspace : &default_workspace(static_cast<int>(device_index));
  return out;
}

template <typename Hyper>
void run_step(Algorithm algo, int64_t table_addr, int64_t n_tensors, int64_t param_dtype, int64_t state_dtype,
              const Hyper& hyper, bool third_state, int64_t grad_scale_addr, int64_t found_inf_addr,
              int64_t lr_addr, int64_t device_index, uintptr_t stream_handle, Workspace* workspace) {
  const CallArgs call = check_call(table_addr, n_tensors, param_dtype, state_dtype, hyper, device_index, workspace);
  if (call.table == nullptr) return;
  const StepScalars scalars{as_device_scalar<float>(lr_addr), as_device_scalar<float>(grad_scale_addr),
                            as_device_scalar<float>(found_inf_addr)};
  const cudaStream_t stream = as_stream(stream_handle);
  DeviceGuard guard(static_cast<int>(device_index));
  Workspace& ws = *call.workspace;
  const DeviceTables tables = ws.prepare(algo, call.table, n_tensors, third_state, hyper.precision, stream);
  try {
    if constexpr (std::is_same_v<Hyper, AdamHyper>)
      launch_adam(static_cast<DType>(param_dtype), static_cast<DType>(state_dtype), tables, hyper, scalars, stream);
    else
      launch_sgd(static_cast<DType>(param_dtype), static_cast<DType>(state_dtype), tables, hyper, scalars, stream);
  } catch (...) {
    ws.finish(stream);  // the upload was enqueued: later calls must still order after it
    throw;
  }
  ws.finish(stream);
}

void adam_step(int64_t table_addr, int64_t n_tensors, int64_t param_dtype, int64_t state_dtype,
               const AdamHyper& hyper, int64_t grad_scale_addr, int64_t found_inf_addr, int64_t lr_addr,
               int64_t device_index, uintptr_t stream, Workspace* workspace) {
  run_step(Algorithm::kAdam, table_addr, n_tensors, param_dtype, state_dtype, hyper, hyper.amsgrad,
           grad_scale_addr, found_inf_addr, lr_addr, device_index, stream, workspace);
}

void sgd_step(int64_t table_addr, int64_t n_tensors, int64_t param_dtype, int64_t state_dtype,
              const SgdHyper& hyper, int64_t grad_scale_addr, int64_t found_inf_addr, int64_t lr_addr,
              int64_t device_index, uintptr_t stream, Workspace* workspace) {
  run_step(Algorithm::kSgd, table_addr, n_tensors, param_dtype, state_dtype, hyper, hyper.momentum != 0.,
           grad_scale_addr, found_inf_addr, lr_addr, device_index, stream, workspace);
}

// The chunk plan as Python lists: tensor index, first and one-past-last
// element of every chunk, and the launch's block count.
py::dict chunks_dict(const std::vector<ChunkRecord>& chunks, const std::vector<int64_t>& numels,
                     int64_t chunk_elems) {
  py::list tensor, start, end;
  for (const ChunkRecord& c : chunks) {
    const int64_t b = static_cast<int64_t>(c.index) * chunk_elems;
    const int64_t n = numels[c.tensor];
    tensor.append(static_cast<int64_t>(c.tensor));
    start.append(b);
    end.append(b + chunk_elems < n ? b + chunk_elems : n);
  }
  py::dict out;
  out["tensor"] = tensor;
  out["start"] = start;
  out["end"] = end;
  out["blocks"] = launch_blocks(static_cast<int64_t>(chunks.size()));
  out["chunk_elems"] = chunk_elems;
  return out;
}

py::dict plan_chunks_py(const std::vector<int64_t>& numels, int64_t chunk_elems) {
  return chunks_dict(plan_chunks(numels, chunk_elems), numels, chunk_elems);
}

py::dict plan_table_py(Algorithm algo, int64_t table_addr, int64_t n_tensors, bool third_state, int32_t precision,
                       int64_t sm_count) {
  const auto* table = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(table_addr));
  // sm_count 0: the fixed kChunkElems; else the chunk size a step on a device
  // with that many SMs would choose.
  const HostPlan plan = plan_table(algo, table, n_tensors, third_state, precision, sm_count > 0 ? 0 : kChunkElems,
                                   static_cast<int>(sm_count));
  std::vector<int64_t> numels;
  py::list vector, first_step, index, step;
  for (size_t i = 0; i < plan.records.size(); ++i) {
    const TensorRecord& r = plan.records[i];
    numels.push_back(r.numel);
    vector.append((r.flags & kVectorAligned) != 0);
    first_step.append((r.flags & kFirstStep) != 0);
    index.append(static_cast<int64_t>(r.index));
    step.append(static_cast<int64_t>(reinterpret_cast<uintptr_t>(plan.steps[i])));
  }
  py::dict out = chunks_dict(plan.chunks, numels, plan.chunk_elems);
  out["vector"] = vector;
  out["first_step"] = first_step;
  out["index"] = index;
  out["step"] = step;
  return out;
}

int device_count() {
  int n = 0;
  // No driver or no GPU: zero devices, not an error. Clear the error the
  // runtime keeps so that it does not surface from a later call.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

py::dict build_info() {
  py::dict d;
#if defined(FUSED_ADAMW_CUDA_EMULATION)
  d["archs"] = std::string("emulated");
  d["nvcc"] = std::string("none (host compiler, csrc/emulation/cuda_emulation.h)");
  d["emulated"] = true;
  d["cudart_static"] = false;
#else
  d["archs"] = std::string(FUSED_ADAMW_CUDA_ARCHS);
  d["nvcc"] = std::string(FUSED_ADAMW_CUDA_VERSION);
  d["emulated"] = false;
  d["cudart_static"] = true;
#endif
  d["cudart"] = CUDART_VERSION;
  d["metadata"] = std::string(
      "device-resident table (64-byte tensor records + 8-byte step pointers and chunk records), cached per "
      "workspace, uploaded through 32 KB kernel-parameter blobs when the host table changes; a captured call gets "
      "its own copy, filled outside the graph");
  d["step_increment"] = std::string(
      "step kernel before the update (one thread per tensor, fp64 terms once per tensor; SGD: precision 2 only)");
  d["precision_modes"] = std::string(
      "0 round to nearest (adam_kernel, sgd_kernel); 1 master weights, 2 stochastic rounding (Philox-4x32-10), "
      "3 Kahan summation (adam_precision_kernel, sgd_precision_kernel; float16/bfloat16 params)");
  d["chunk_elems"] = kChunkElems;
  d["min_chunk_elems"] = kMinChunkElems;
  d["block_threads"] = kBlockThreads;
  d["pack_bytes"] = kPackBytes;
  return d;
}

void set_launch_overrides(int64_t chunk_elems, int64_t max_blocks) {
  if (chunk_elems < 0 || chunk_elems % kPackAlignElems != 0)
    throw std::invalid_argument("chunk_elems must be 0 or a positive multiple of " + std::to_string(kPackAlignElems) +
                                ", got " + std::to_string(chunk_elems));
  if (max_blocks < 0 || max_blocks > kMaxBlocks)
    throw std::invalid_argument("max_blocks must be in [0, 2**31 - 1], got " + std::to_string(max_blocks));
  launch_overrides() = LaunchOverrides{chunk_elems, max_blocks};
}

// One Adam step over the given chunks (tensor, index) of a table, with this
// chunk size, through a buffer of its own (no workspace): lets a test put a
// chunk index whose element offset passes 2**31 on a small buffer (the
// table's pointers shifted back by that offset). Synchronizes the stream.
void adam_step_chunks(int64_t table_addr, int64_t n_tensors, int64_t param_dtype, int64_t state_dtype,
                      const AdamHyper& hyper, const std::vector<std::pair<int64_t, int64_t>>& chunks,
                      int64_t chunk_elems, int64_t device_index, uintptr_t stream_handle) {
  const CallArgs call = check_call(table_addr, n_tensors, param_dtype, state_dtype, hyper, device_index, nullptr);
  if (call.table == nullptr) return;
  HostPlan plan = plan_table(Algorithm::kAdam, call.table, n_tensors, hyper.amsgrad, hyper.precision, chunk_elems);
  plan.chunks.clear();
  for (const auto& c : chunks) {
    if (c.first < 0 || c.first >= n_tensors || c.second < 0 || c.second > UINT32_MAX ||
        c.second * chunk_elems >= plan.records[static_cast<size_t>(c.first)].numel)
      throw std::invalid_argument("chunk (" + std::to_string(c.first) + ", " + std::to_string(c.second) +
                                  ") is outside its tensor");
    plan.chunks.push_back(ChunkRecord{static_cast<uint32_t>(c.first), static_cast<uint32_t>(c.second)});
  }
  const cudaStream_t stream = as_stream(stream_handle);
  DeviceGuard guard(static_cast<int>(device_index));
  const int64_t total_chunks = static_cast<int64_t>(plan.chunks.size());
  const PlanLayout at(n_tensors, total_chunks);
  const std::vector<unsigned long long> tail = plan_tail(plan);
  char* buf = nullptr;
  check_cuda(cudaMalloc(&buf, at.bytes), "cudaMalloc");
  try {
    check_cuda(cudaMemcpyAsync(buf, plan.records.data(), at.steps, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    check_cuda(cudaMemcpyAsync(buf + at.steps, tail.data(), 8 * tail.size(), cudaMemcpyHostToDevice, stream),
               "cudaMemcpyAsync");
    const DeviceTables t = device_tables(buf, n_tensors, total_chunks, chunk_elems);
    launch_adam(static_cast<DType>(param_dtype), static_cast<DType>(state_dtype), t, hyper, StepScalars{}, stream);
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  } catch (...) {
    cudaFree(buf);
    throw;
  }
  check_cuda(cudaFree(buf), "cudaFree");
}

}  // namespace
}  // namespace cuda
}  // namespace fused_adamw

#if defined(FUSED_ADAMW_CUDA_EMULATION)
PYBIND11_MODULE(_cuda_emu, m) {
#else
PYBIND11_MODULE(_cuda, m) {
#endif
  namespace fc = fused_adamw::cuda;
  using fused_adamw::AdamHyper;
  using fused_adamw::SgdHyper;
  m.doc() = "fused_adamw CUDA kernels (see python/fused_adamw/backend_cuda.py)";

  fused_adamw::bind_hyper_structs(m);

  // module_local: _cuda and _cuda_emu bind the same C++ type.
  py::class_<fc::Workspace>(m, "Workspace", py::module_local(),
                            "Device memory holding one (device, dtype) group's tables across steps. Creating one "
                            "touches no GPU; its memory is allocated by the first step and freed with it.")
      .def(py::init<int>(), py::arg("device_index"))
      .def_property_readonly("device", &fc::Workspace::device)
      .def_property_readonly("uploads", &fc::Workspace::uploads, "how many times the tables were uploaded")
      .def_property_readonly("capacity_bytes", &fc::Workspace::capacity_bytes)
      .def_property_readonly("graph_owned", &fc::Workspace::graph_owned,
                             "True once a step ran under CUDA-graph capture")
      .def_property_readonly("graph_buffers", &fc::Workspace::graph_buffers,
                             "table buffers kept for captured graphs (one per captured call)")
      .def_property_readonly("chunk_elems", &fc::Workspace::chunk_elems, "the chunk size of the last eager call");

  // pybind11 keeps the docstring pointers: the strings must outlive the module's init.
  static const std::string common_args =
      " grad_scale_addr / found_inf_addr / lr_addr: the device address of a float32 scalar, or 0 for none "
      "(lr_addr 0: hyper.lr is used); found_inf != 0 writes nothing. Runs on `stream` (a cudaStream_t as an "
      "int) on device `device_index`; no host sync. workspace: a Workspace of that device kept across steps "
      "(None: a per-device default).";
  static const std::string precision_args =
      " hyper.precision: 0 round to nearest, 1 master weights (the aux column: float32 copies), 2 stochastic "
      "rounding (Philox words of (element, index column, step after the increment) keyed on hyper.seed), "
      "3 Kahan summation (the aux column: compensations in the param dtype); 1-3 for float16/bfloat16 params.";
  static const std::string adam_doc =
      "One Adam/AdamW step over every tensor of a host int64 [n_tensors, 9] address table (numel, param, grad, "
      "exp_avg, exp_avg_sq, max_exp_avg_sq, step, aux, index) in one launch. Adds 1 to each float32 step on the "
      "device and uses the new value for that tensor's bias corrections (and generator)." + precision_args +
      common_args;
  static const std::string sgd_doc =
      "One SGD/SGDW step over every tensor of a host int64 [n_tensors, 8] address table (numel, param, grad, "
      "momentum_buffer, first_step, aux, step, index) in one launch. Under precision 2 adds 1 to each float32 "
      "step (the generator's step) first." + precision_args + common_args;
  m.def("adam_step", &fc::adam_step, py::arg("table_addr"), py::arg("n_tensors"), py::arg("param_dtype"),
        py::arg("state_dtype"), py::arg("hyper"), py::arg("grad_scale_addr"), py::arg("found_inf_addr"),
        py::arg("lr_addr"), py::arg("device_index"), py::arg("stream"), py::arg("workspace") = nullptr,
        adam_doc.c_str());
  m.def("sgd_step", &fc::sgd_step, py::arg("table_addr"), py::arg("n_tensors"), py::arg("param_dtype"),
        py::arg("state_dtype"), py::arg("hyper"), py::arg("grad_scale_addr"), py::arg("found_inf_addr"),
        py::arg("lr_addr"), py::arg("device_index"), py::arg("stream"), py::arg("workspace") = nullptr,
        sgd_doc.c_str());

  m.def("plan_chunks", &fc::plan_chunks_py, py::arg("numels"), py::arg("chunk_elems") = fc::kChunkElems,
        "The chunk plan of tensors of these sizes: dict of lists tensor/start/end per chunk, and blocks.");
  m.def(
      "plan_table",
      [](int64_t table_addr, int64_t n_tensors, const AdamHyper& h, int64_t sm_count) {
        return fc::plan_table_py(fc::Algorithm::kAdam, table_addr, n_tensors, h.amsgrad, h.precision, sm_count);
      },
      py::arg("table_addr"), py::arg("n_tensors"), py::arg("hyper"), py::arg("sm_count") = 0);
  m.def(
      "plan_table",
      [](int64_t table_addr, int64_t n_tensors, const SgdHyper& h, int64_t sm_count) {
        return fc::plan_table_py(fc::Algorithm::kSgd, table_addr, n_tensors, h.momentum != 0., h.precision,
                                 sm_count);
      },
      py::arg("table_addr"), py::arg("n_tensors"), py::arg("hyper"), py::arg("sm_count") = 0,
      "What a step would launch for a host address table, without touching the GPU: the chunk plan "
      "(tensor/start/end, blocks, chunk_elems) and per tensor whether the 16-byte path is taken (vector), "
      "first_step, the generator index and the step address (0 where unused). Validates the table as a step does. sm_count 0: 64K-element chunks; else the chunk size a "
      "step chooses on a device with that many SMs (and the overrides).");
  m.def("build_info", &fc::build_info, "archs, nvcc version, metadata scheme, chunk and block sizes.");
  m.def("set_launch_overrides", &fc::set_launch_overrides, py::arg("chunk_elems") = 0, py::arg("max_blocks") = 0,
        "Test knobs for later steps: force the chunk size (a multiple of 8) and cap the update kernel's grid "
        "(blocks then loop over chunks); 0 restores the choice.");
  m.def("launch_overrides", [] {
    return py::make_tuple(fc::launch_overrides().chunk_elems, fc::launch_overrides().max_blocks);
  });
  m.def("adam_step_chunks", &fc::adam_step_chunks, py::arg("table_addr"), py::arg("n_tensors"),
        py::arg("param_dtype"), py::arg("state_dtype"), py::arg("hyper"), py::arg("chunks"),
        py::arg("chunk_elems"), py::arg("device_index"), py::arg("stream"),
        "Test hook: one Adam step over the chunks (tensor, index) given, with this chunk size; synchronizes.");
  m.def("device_count", &fc::device_count, "CUDA devices visible (0 without a driver or GPU).");
  m.attr("CHUNK_ELEMS") = fc::kChunkElems;
#if defined(FUSED_ADAMW_CUDA_EMULATION)
  fused_adamw::emu::bind_emulation(m);
#endif
}
