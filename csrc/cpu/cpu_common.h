// cpu_common.h: what the CPU kernels (csrc/cpu/*_cpu.cpp, compiled once per
// instruction set) and the binding (csrc/bindings/cpu_module.cpp, compiled
// once) share: the work plan, and the description
// of one call that the binding hands to a kernel.
//
// Only plain data and declarations live here. The kernels are compiled with
// different -m flags (CMakeLists.txt, "_cpu"); an inline function defined here
// and used by both sides could be emitted by an AVX-512 object and picked by
// the linker for the baseline path too. The per-element math (update.h) is
// used by the kernels only inside [[gnu::flatten]] functions for the same
// reason, so no out-of-line copy of it is ever emitted from a kernel object;
// the same holds for rounding.h's conversions and generator.
//
// Follows ../shared/DESIGN.md, "Native interface" and "Multi-tensor plan".
#pragma once

#include <cstdint>

#include <fused_adamw/rounding.h>
#include <fused_adamw/table.h>
#include <fused_adamw/update.h>

namespace fused_adamw {
namespace cpu {

// Elements per work unit. A unit is what one OpenMP thread takes at a time:
// big enough that the dynamic schedule's atomic and the per-segment setup
// vanish (32K fp32 Adam elements move 512 KB), small enough that 2-16 threads
// get many units each for a 1M-element step.
constexpr int64_t kUnitElems = int64_t{1} << 15;

// A contiguous range [begin, end) of one tensor's elements.
struct Segment {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Everything an Adam kernel needs for one call. The binding has already
// checked the table, read found_inf and grad_scale, incremented the steps
// and resolved each tensor's scalars.
struct AdamWork {
  const int64_t* table;
  DType param_dtype;
  DType state_dtype;
  bool amsgrad;
  // Horizontal fusion: all tensors' segments, grouped into units; unit u
  // covers segments [unit_first[u], unit_first[u + 1]).
  const Segment* segments;
  const int64_t* unit_first;
  int64_t n_units;
  // Per-tensor scalars in the math type (float; double for float64 params).
  const AdamScalars<float>* scalars_f;
  const AdamScalars<double>* scalars_d;
  double grad_scale;  // 1 when there is none
  int num_threads;    // already capped at n_units
  // How results are stored (rounding.h; modes other than kNearest only for
  // 16-bit params). kStochastic: the generator's key and each tensor's step
  // after this call's increment (the table's INDEX column is the counter's
  // tensor word); rng_step is null otherwise.
  Precision precision;
  uint64_t seed;
  const uint32_t* rng_step;
};

// The same for SGD; its scalars do not depend on the step, so one set serves
// every tensor.
struct SgdWork {
  const int64_t* table;
  DType param_dtype;
  DType state_dtype;
  const Segment* segments;
  const int64_t* unit_first;
  int64_t n_units;
  SgdScalars<float> scalars_f;
  SgdScalars<double> scalars_d;
  double grad_scale;
  int num_threads;
  Precision precision;      // as AdamWork's
  uint64_t seed;
  const uint32_t* rng_step; // kStochastic: from the table's STEP column, after the increment
};

// Each instruction-set copy of the kernels (namespace fused_adamw::cpu::<isa>)
// defines these two entry points.
#define FUSED_ADAMW_DECLARE_CPU_KERNELS(isa) \
  namespace isa {                            \
  void adam_step(const AdamWork& work);      \
  void sgd_step(const SgdWork& work);        \
  }

FUSED_ADAMW_DECLARE_CPU_KERNELS(base)
FUSED_ADAMW_DECLARE_CPU_KERNELS(avx2)
FUSED_ADAMW_DECLARE_CPU_KERNELS(avx512)

#undef FUSED_ADAMW_DECLARE_CPU_KERNELS

}  // namespace cpu
}  // namespace fused_adamw
