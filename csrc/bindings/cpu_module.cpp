// cpu_module.cpp: the pybind11 module fused_adamw._cpu, the C++ CPU backend's
// entry points (python/fused_adamw/backend_cpu.py is its Python side).
//
//   adam_step(table_addr, n_tensors, param_dtype, state_dtype, hyper,
//             grad_scale_addr, found_inf_addr, num_threads)
//   sgd_step(...same, with an SgdHyper and the SGD table...)
//   set_isa(name), isa(), build_info()
//   AdamHyper, SgdHyper: the structs of csrc/include/fused_adamw/update.h
//
// Tables and dtype codes follow ../shared/DESIGN.md, "Native interface" (the
// columns are in csrc/cpu/cpu_common.h). This translation unit is compiled
// once, for the baseline instruction set, with FUSED_ADAMW_HAVE_<ISA>=1 for
// each kernel copy CMakeLists.txt built; it does the per-call work that is
// independent of the instruction set (checks, found_inf, grad_scale, step
// increments, scalar resolution, the work plan) and hands the rest to the
// copy chosen at import time: the best the processor supports, or the one
// named by FUSED_ADAMW_CPU_ISA (base, avx2, avx512, auto), or by set_isa().
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include <omp.h>
#include <pybind11/pybind11.h>

#include "cpu_common.h"
#include "hyper_bindings.h"

namespace py = pybind11;

namespace fused_adamw {
namespace cpu {
namespace {

// ---------------------------------------------------------------- instruction sets

using AdamKernel = void (*)(const AdamWork&);
using SgdKernel = void (*)(const SgdWork&);

struct IsaKernels {
  const char* name;
  AdamKernel adam;
  SgdKernel sgd;
  bool (*supported)();
};

bool always() { return true; }

#if defined(__x86_64__) || defined(_M_X64)
// __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512
// register state.
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif

// The copies this build holds, slowest first.
const IsaKernels kIsas[] = {
#if FUSED_ADAMW_HAVE_BASE
    {"base", base::adam_step, base::sgd_step, always},
#endif
#if FUSED_ADAMW_HAVE_AVX2
    {"avx2", avx2::adam_step, avx2::sgd_step, has_avx2},
#endif
#if FUSED_ADAMW_HAVE_AVX512
    {"avx512", avx512::adam_step, avx512::sgd_step, has_avx512},
#endif
};

std::atomic<const IsaKernels*> g_isa{nullptr};

std::string isa_names(bool supported_only) {
  std::string out;
  for (const IsaKernels& k : kIsas) {
    if (supported_only && !k.supported()) continue;
    out += out.empty() ? "" : ", ";
    out += k.name;
  }
  return out;
}

const IsaKernels* best_isa() {
  const IsaKernels* best = nullptr;
  for (const IsaKernels& k : kIsas) {
    if (k.supported()) best = &k;
  }
  return best;
}

// The copy called `name` ("auto": the best supported), or a ValueError.
const IsaKernels* find_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  for (const IsaKernels& k : kIsas) {
    if (name != k.name) continue;
    if (!k.supported()) {
      throw py::value_error("CPU instruction set '" + name + "' was built but this processor lacks it; supported: " +
                            isa_names(true));
    }
    return &k;
  }
  throw py::value_error("unknown CPU instruction set '" + name + "'; built: " + isa_names(false) + " (or 'auto')");
}

// ---------------------------------------------------------------- argument checks

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "?";
}

DType to_dtype(int64_t code, const char* arg) {
  switch (code) {
    case static_cast<int64_t>(DType::kFloat32):
    case static_cast<int64_t>(DType::kFloat64):
    case static_cast<int64_t>(DType::kFloat16):
    case static_cast<int64_t>(DType::kBFloat16):
      return static_cast<DType>(code);
    default:
      throw py::value_error(std::string(arg) + "=" + std::to_string(code) +
                            " is not a dtype code (float32=0, float64=1, float16=2, bfloat16=3)");
  }
}

struct Common {
  const int64_t* table;
  int64_t n_tensors;
  DType param_dtype;
  DType state_dtype;
  int num_threads;
};

// The checks both optimizers share; the table rows are checked by the callers.
Common check_common(uintptr_t table_addr, int64_t n_tensors, int64_t param_code, int64_t state_code,
                    int64_t num_threads) {
  Common c;
  if (n_tensors < 0) throw py::value_error("n_tensors must be >= 0, got " + std::to_string(n_tensors));
  if (table_addr == 0 && n_tensors > 0) throw py::value_error("table_addr is 0 (a null address table)");
  c.table = reinterpret_cast<const int64_t*>(table_addr);
  c.n_tensors = n_tensors;
  c.param_dtype = to_dtype(param_code, "param_dtype");
  c.state_dtype = to_dtype(state_code, "state_dtype");
  const bool low = c.param_dtype == DType::kFloat16 || c.param_dtype == DType::kBFloat16;
  // The storage pairs of ../shared/DESIGN.md and issue 12: the param's dtype;
  // float32 for 16-bit params; bfloat16 for all but float64 params.
  const bool ok = c.state_dtype == c.param_dtype || (low && c.state_dtype == DType::kFloat32) ||
                  (c.param_dtype != DType::kFloat64 && c.state_dtype == DType::kBFloat16);
  if (!ok) {
    throw py::value_error(std::string("state_dtype=") + dtype_name(c.state_dtype) + " is not allowed for " +
                          dtype_name(c.param_dtype) +
                          " params (the param dtype, float32 for float16/bfloat16 params, or bfloat16 for "
                          "float32/float16 params)");
  }
  if (num_threads < 1) throw py::value_error("num_threads must be >= 1, got " + std::to_string(num_threads));
  c.num_threads = static_cast<int>(std::min<int64_t>(num_threads, 1 << 16));
  return c;
}

// hyper.precision and hyper.seed (rounding.h): a mode in 0..3, modes 1..3
// for 16-bit params only, a seed in [0, 2^63).
Precision check_precision(const Common& c, int32_t precision, int64_t seed) {
  if (precision < 0 || precision > 3) {
    throw py::value_error("hyper.precision must be 0 (nearest), 1 (master weights), 2 (stochastic rounding) or "
                          "3 (Kahan summation), got " + std::to_string(precision));
  }
  const bool low = c.param_dtype == DType::kFloat16 || c.param_dtype == DType::kBFloat16;
  if (precision != 0 && !low) {
    throw py::value_error("hyper.precision=" + std::to_string(precision) + " needs float16 or bfloat16 params, got " +
                          dtype_name(c.param_dtype));
  }
  if (seed < 0) throw py::value_error("hyper.seed must be in [0, 2**63), got " + std::to_string(seed));
  return static_cast<Precision>(precision);
}

[[noreturn]] void bad_row(int64_t row, const std::string& what) {
  throw py::value_error("address table row " + std::to_string(row) + ": " + what);
}

void check_address(int64_t row, int64_t value, const char* column) {
  if (value == 0) bad_row(row, std::string(column) + " address is 0");
}

// The generator's step of a tensor whose step count is `step` before this
// call's increment: a whole number below 2^32, so that the count after it
// converts to the counter's 32-bit word (float32 counts stall at 2^24 long
// before that). Checked before anything is incremented.
void check_generator_step(int64_t row, float step) {
  if (!(step >= 0.f && step < 4294967296.f) || step != static_cast<float>(static_cast<int64_t>(step))) {
    bad_row(row, "step " + std::to_string(step) +
                     " is not a whole number in [0, 2**32) (hyper.precision=2 counts steps in the "
                     "generator's 32-bit counter)");
  }
}

// The precision columns of a row: aux for master weights and Kahan, the
// generator index (a 32-bit counter word) for stochastic rounding.
void check_precision_columns(int64_t t, const int64_t* r, int64_t numel, int64_t aux_col, int64_t index_col,
                             Precision precision) {
  if (numel > 0 && (precision == Precision::kMaster || precision == Precision::kKahan)) {
    check_address(t, r[aux_col],
                  precision == Precision::kMaster ? "aux (master copy; hyper.precision=1)"
                                                  : "aux (Kahan compensation; hyper.precision=3)");
  }
  if (precision == Precision::kStochastic && (r[index_col] < 0 || r[index_col] > 0xFFFFFFFFll)) {
    bad_row(t, "tensor index " + std::to_string(r[index_col]) + " is not in [0, 2**32)");
  }
}

void check_adam_rows(const Common& c, const AdamHyper& h, Precision precision) {
  for (int64_t t = 0; t < c.n_tensors; ++t) {
    const int64_t* r = c.table + t * kAdamCols;
    if (r[kAdamNumel] < 0) bad_row(t, "numel " + std::to_string(r[kAdamNumel]) + " < 0");
    check_address(t, r[kAdamStep], "step");
    check_precision_columns(t, r, r[kAdamNumel], kAdamAux, kAdamIndex, precision);
    if (precision == Precision::kStochastic) {
      check_generator_step(t, *reinterpret_cast<const float*>(static_cast<uintptr_t>(r[kAdamStep])));
    }
    if (r[kAdamNumel] == 0) continue;
    check_address(t, r[kAdamParam], "param");
    check_address(t, r[kAdamGrad], "grad");
    check_address(t, r[kAdamExpAvg], "exp_avg");
    check_address(t, r[kAdamExpAvgSq], "exp_avg_sq");
    if (h.amsgrad) check_address(t, r[kAdamMaxExpAvgSq], "max_exp_avg_sq (hyper.amsgrad is set)");
  }
}

void check_sgd_rows(const Common& c, const SgdHyper& h, Precision precision) {
  for (int64_t t = 0; t < c.n_tensors; ++t) {
    const int64_t* r = c.table + t * kSgdCols;
    if (r[kSgdNumel] < 0) bad_row(t, "numel " + std::to_string(r[kSgdNumel]) + " < 0");
    check_precision_columns(t, r, r[kSgdNumel], kSgdAux, kSgdIndex, precision);
    if (precision == Precision::kStochastic) {
      // Incremented like Adam's step, for every tensor of the call.
      check_address(t, r[kSgdStep], "step (hyper.precision=2: the generator's step count)");
      check_generator_step(t, *reinterpret_cast<const float*>(static_cast<uintptr_t>(r[kSgdStep])));
    }
    if (r[kSgdNumel] == 0) continue;
    check_address(t, r[kSgdParam], "param");
    check_address(t, r[kSgdGrad], "grad");
    if (h.momentum != 0.) check_address(t, r[kSgdMomentumBuffer], "momentum_buffer (hyper.momentum != 0)");
  }
}

// Reads the float32 scalar at addr, or `none` when addr is 0.
float read_scalar(uintptr_t addr, float none) { return addr ? *reinterpret_cast<const float*>(addr) : none; }

// ---------------------------------------------------------------- the work plan

// Cuts the concatenation of all tensors into units of kUnitElems elements
// (the last one shorter); a unit is a list of segments, a tensor is split
// wherever a unit ends. Equal units keep the dynamic schedule balanced
// whatever the mix of tensor sizes: 20000 tensors of 1024 make 625 units,
// not 20000 tiny ones.
struct Plan {
  std::vector<Segment> segments;
  std::vector<int64_t> unit_first;
  int64_t n_units() const { return static_cast<int64_t>(unit_first.size()) - 1; }
};

Plan make_plan(const int64_t* table, int64_t cols, int64_t n_tensors) {
  Plan plan;
  int64_t total = 0;
  for (int64_t t = 0; t < n_tensors; ++t) total += table[t * cols];
  plan.segments.reserve(static_cast<size_t>(n_tensors + total / kUnitElems + 1));
  plan.unit_first.reserve(static_cast<size_t>(total / kUnitElems + 2));
  plan.unit_first.push_back(0);
  int64_t fill = 0;  // elements in the open unit
  for (int64_t t = 0; t < n_tensors; ++t) {
    const int64_t numel = table[t * cols];
    for (int64_t b = 0; b < numel;) {
      const int64_t len = std::min(kUnitElems - fill, numel - b);
      plan.segments.push_back(Segment{t, b, b + len});
      b += len;
      fill += len;
      if (fill == kUnitElems) {
        plan.unit_first.push_back(static_cast<int64_t>(plan.segments.size()));
        fill = 0;
      }
    }
  }
  if (fill > 0) plan.unit_first.push_back(static_cast<int64_t>(plan.segments.size()));
  return plan;
}

int threads_for(const Common& c, const Plan& plan) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(c.num_threads, plan.n_units())));
}

// ---------------------------------------------------------------- steps

// Adds 1 to every tensor's step and resolves its scalars from the new count.
// Tensors usually share a count, so a run of equal steps resolves once.
template <typename M>
std::vector<AdamScalars<M>> step_and_resolve(const Common& c, const AdamHyper& h) {
  std::vector<AdamScalars<M>> out(static_cast<size_t>(c.n_tensors));
  bool have = false;
  float last_step = 0.f;
  AdamScalars<M> last{};
  for (int64_t t = 0; t < c.n_tensors; ++t) {
    float* step = reinterpret_cast<float*>(static_cast<uintptr_t>(c.table[t * kAdamCols + kAdamStep]));
    *step += 1.f;  // float32 arithmetic, as torch keeps the step
    if (!have || *step != last_step) {
      last = resolve_adam<M>(h, h.lr, static_cast<double>(*step));
      last_step = *step;
      have = true;
    }
    out[static_cast<size_t>(t)] = last;
  }
  return out;
}

// The generator's step of every tensor (precision 2): the float32 count in
// column step_col, already incremented, as the counter's 32-bit word.
std::vector<uint32_t> generator_steps(const Common& c, int64_t cols, int64_t step_col) {
  std::vector<uint32_t> out(static_cast<size_t>(c.n_tensors));
  for (int64_t t = 0; t < c.n_tensors; ++t) {
    const float step = *reinterpret_cast<const float*>(static_cast<uintptr_t>(c.table[t * cols + step_col]));
    out[static_cast<size_t>(t)] = static_cast<uint32_t>(step);  // checked: a whole number below 2^32
  }
  return out;
}

// ---------------------------------------------------------------- entry points

void adam_step(uintptr_t table_addr, int64_t n_tensors, int64_t param_dtype, int64_t state_dtype,
               const AdamHyper& hyper, uintptr_t grad_scale_addr, uintptr_t found_inf_addr, int64_t num_threads) {
  const Common c = check_common(table_addr, n_tensors, param_dtype, state_dtype, num_threads);
  const Precision precision = check_precision(c, hyper.precision, hyper.seed);
  check_adam_rows(c, hyper, precision);
  const IsaKernels* isa = g_isa.load();
  py::gil_scoped_release nogil;
  if (read_scalar(found_inf_addr, 0.f) != 0.f) return;  // nothing is written, not even the steps
  const Plan plan = make_plan(c.table, kAdamCols, c.n_tensors);
  std::vector<AdamScalars<float>> scalars_f;
  std::vector<AdamScalars<double>> scalars_d;
  if (c.param_dtype == DType::kFloat64) {
    scalars_d = step_and_resolve<double>(c, hyper);
  } else {
    scalars_f = step_and_resolve<float>(c, hyper);
  }
  if (plan.n_units() == 0) return;
  const std::vector<uint32_t> rng_step =
      precision == Precision::kStochastic ? generator_steps(c, kAdamCols, kAdamStep) : std::vector<uint32_t>();
  AdamWork w;
  w.table = c.table;
  w.param_dtype = c.param_dtype;
  w.state_dtype = c.state_dtype;
  w.amsgrad = hyper.amsgrad;
  w.segments = plan.segments.data();
  w.unit_first = plan.unit_first.data();
  w.n_units = plan.n_units();
  w.scalars_f = scalars_f.data();
  w.scalars_d = scalars_d.data();
  w.grad_scale = read_scalar(grad_scale_addr, 1.f);
  w.num_threads = threads_for(c, plan);
  w.precision = precision;
  w.seed = static_cast<uint64_t>(hyper.seed);
  w.rng_step = rng_step.data();
  isa->adam(w);
}

void sgd_step(uintptr_t table_addr, int64_t n_tensors, int64_t param_dtype, int64_t state_dtype,
              const SgdHyper& hyper, uintptr_t grad_scale_addr, uintptr_t found_inf_addr, int64_t num_threads) {
  const Common c = check_common(table_addr, n_tensors, param_dtype, state_dtype, num_threads);
  const Precision precision = check_precision(c, hyper.precision, hyper.seed);
  check_sgd_rows(c, hyper, precision);
  const IsaKernels* isa = g_isa.load();
  py::gil_scoped_release nogil;
  if (read_scalar(found_inf_addr, 0.f) != 0.f) return;  // nothing is written, not even the steps
  const Plan plan = make_plan(c.table, kSgdCols, c.n_tensors);
  std::vector<uint32_t> rng_step;
  if (precision == Precision::kStochastic) {
    // SGD counts steps only for the generator (torch's SGD keeps none).
    for (int64_t t = 0; t < c.n_tensors; ++t) {
      *reinterpret_cast<float*>(static_cast<uintptr_t>(c.table[t * kSgdCols + kSgdStep])) += 1.f;
    }
    rng_step = generator_steps(c, kSgdCols, kSgdStep);
  }
  if (plan.n_units() == 0) return;
  SgdWork w;
  w.table = c.table;
  w.param_dtype = c.param_dtype;
  w.state_dtype = c.state_dtype;
  w.segments = plan.segments.data();
  w.unit_first = plan.unit_first.data();
  w.n_units = plan.n_units();
  w.scalars_f = resolve_sgd<float>(hyper, hyper.lr);
  w.scalars_d = resolve_sgd<double>(hyper, hyper.lr);
  w.grad_scale = read_scalar(grad_scale_addr, 1.f);
  w.num_threads = threads_for(c, plan);
  w.precision = precision;
  w.seed = static_cast<uint64_t>(hyper.seed);
  w.rng_step = rng_step.data();
  isa->sgd(w);
}

py::dict build_info() {
  py::dict d;
  d["isa"] = g_isa.load()->name;
  py::list built, supported;
  for (const IsaKernels& k : kIsas) {
    built.append(k.name);
    if (k.supported()) supported.append(k.name);
  }
  d["isas_built"] = built;
  d["isas_supported"] = supported;
#if defined(_OPENMP)
  d["openmp"] = _OPENMP;
#else
  d["openmp"] = py::none();
#endif
  d["omp_max_threads"] = omp_get_max_threads();
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  d["unit_elems"] = kUnitElems;
  return d;
}

}  // namespace
}  // namespace cpu
}  // namespace fused_adamw

PYBIND11_MODULE(_cpu, m) {
  using namespace fused_adamw;
  namespace fc = fused_adamw::cpu;
  m.doc() = "fused_adamw C++ CPU kernels (OpenMP over all tensors of a call, SIMD inner loop)";

  const char* env = std::getenv("FUSED_ADAMW_CPU_ISA");
  try {
    fc::g_isa.store(fc::find_isa(env && *env ? env : "auto"));
  } catch (const py::value_error& e) {
    throw py::import_error(std::string("FUSED_ADAMW_CPU_ISA: ") + e.what());
  }

  fused_adamw::bind_hyper_structs(m);

  m.def("adam_step", &fc::adam_step, py::arg("table_addr"), py::arg("n_tensors"), py::arg("param_dtype"),
        py::arg("state_dtype"), py::arg("hyper"), py::arg("grad_scale_addr"), py::arg("found_inf_addr"),
        py::arg("num_threads"),
        "One Adam/AdamW step over every tensor of an int64 [n_tensors, 9] address table "
        "(numel, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, aux, index). Increments each "
        "float32 step and uses its new value for that tensor's bias corrections (and, with "
        "hyper.precision=2, as the generator's step). hyper.precision 1/3: aux is the float32 master copy / "
        "the Kahan compensation. grad_scale_addr / found_inf_addr: a float32 scalar or 0; found_inf != 0 "
        "writes nothing. Releases the GIL.");
  m.def("sgd_step", &fc::sgd_step, py::arg("table_addr"), py::arg("n_tensors"), py::arg("param_dtype"),
        py::arg("state_dtype"), py::arg("hyper"), py::arg("grad_scale_addr"), py::arg("found_inf_addr"),
        py::arg("num_threads"),
        "One SGD/SGDW step over every tensor of an int64 [n_tensors, 8] address table "
        "(numel, param, grad, momentum_buffer, first_step, aux, step, index). step: with "
        "hyper.precision=2, a float32 count incremented by each call (the generator's step), else 0. "
        "Releases the GIL.");
  m.def(
      "set_isa", [](const std::string& name) { fc::g_isa.store(fc::find_isa(name)); }, py::arg("name"),
      "Use the kernel copy for instruction set `name` (base, avx2, avx512; auto: the best supported).");
  m.def(
      "isa", [] { return std::string(fc::g_isa.load()->name); }, "The instruction set of the kernels in use.");
  m.def("build_info", &fc::build_info,
        "isa in use, isas built and supported here, OpenMP version, compiler, work-unit size.");
}
