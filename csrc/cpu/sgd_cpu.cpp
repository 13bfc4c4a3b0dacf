// sgd_cpu.cpp: the fused SGD / SGDW step on the CPU, for all tensors of one
// call at once: the same plan as adam_cpu.cpp (one OpenMP region over work
// units, a SIMD loop per tile) around fused_adamw::sgd_update
// (csrc/include/fused_adamw/update.h, Algorithm 1 of Loshchilov & Hutter in
// torch's parameterisation: lr outside the momentum buffer), with the same
// precision modes.
//
// Compiled once per instruction set by CMakeLists.txt with
// -DFUSED_ADAMW_ISA=<base|avx2|avx512>; csrc/bindings/cpu_module.cpp checks
// the arguments, resolves the scalars and picks the copy at run time.
#include <algorithm>

#include "kernel_common.h"

namespace fused_adamw {
namespace cpu {
namespace FUSED_ADAMW_ISA {
namespace {

// What a tensor's loop does with the momentum buffer; a template argument so
// that the loop has no per-element branch on it.
enum class Momentum { kNone, kFirstStep, kUpdate };

template <typename M>
const SgdScalars<M>& scalars_of(const SgdWork& w);
template <>
const SgdScalars<float>& scalars_of<float>(const SgdWork& w) {
  return w.scalars_f;
}
template <>
const SgdScalars<double>& scalars_of<double>(const SgdWork& w) {
  return w.scalars_d;
}

// flatten: see adam_cpu.cpp; kMode as there.
template <typename P, typename S, Momentum kMomentum, Precision kMode>
[[gnu::flatten]] void sgd_segment(const SgdWork& w, const Segment& seg) {
  using M = math_t<P>;
  constexpr bool kHasBuffer = kMomentum != Momentum::kNone;
  const int64_t* row = w.table + seg.tensor * kSgdCols;
  P* const param = at<P>(row[kSgdParam]);
  const P* const grad = at<const P>(row[kSgdGrad]);
  S* const buffer = kHasBuffer ? at<S>(row[kSgdMomentumBuffer]) : nullptr;
  float* const master = kMode == Precision::kMaster ? at<float>(row[kSgdAux]) : nullptr;
  P* const comp = kMode == Precision::kKahan ? at<P>(row[kSgdAux]) : nullptr;
  Stream rng{};
  if (kMode == Precision::kStochastic) {
    rng = Stream{w.seed, w.rng_step[seg.tensor], static_cast<uint32_t>(row[kSgdIndex])};
  }

  SgdScalars<M> s = scalars_of<M>(w);
  s.use_momentum = kHasBuffer;
  const M grad_scale = static_cast<M>(w.grad_scale);

  Tile<P> p_tile, g_tile;
  Tile<S> b_tile;
  std::conditional_t<kMode == Precision::kKahan, KahanTile<P>, NoTile> kahan_tile;
  constexpr int kStates = kHasBuffer && kSixteenBit<S> ? 1 : 0;  // 16-bit state arrays rounded with the param
  std::conditional_t<kMode == Precision::kStochastic, StochasticTile<P, S, kStates>, NoTile> sr_tile;
  for (int64_t i0 = seg.begin; i0 < seg.end; i0 += kTile) {
    const int64_t n = std::min(kTile, seg.end - i0);
    M* __restrict__ p;
    if constexpr (kMode == Precision::kMaster) {
      p = master + i0;
    } else {
      p = p_tile.view(param + i0, n);
    }
    const M* __restrict__ g = g_tile.view(grad + i0, n);
    // On the first step the buffer is uninitialised memory: written, not read.
    M* __restrict__ b = kMomentum == Momentum::kUpdate ? b_tile.view(buffer + i0, n)
                        : kHasBuffer                   ? b_tile.target(buffer + i0)
                                                       : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      M pi = p[i];
      M bi = kMomentum == Momentum::kUpdate ? b[i] : M(0);
      sgd_update(pi, g[i], bi, kMomentum == Momentum::kFirstStep, grad_scale, s);
      p[i] = pi;
      if (kHasBuffer) b[i] = bi;
    }
    if constexpr (kMode == Precision::kStochastic) {
      // Param and a 16-bit buffer from one Philox block per element (a
      // float32 buffer is stored already).
      sr_tile.store(rng, i0, n, p, param + i0, b, kHasBuffer ? buffer + i0 : nullptr, nullptr, nullptr, nullptr,
                    nullptr);
    } else {
      if constexpr (kMode == Precision::kMaster) {
        from_math(p, param + i0, n);  // the master copy was updated in place
      } else if constexpr (kMode == Precision::kKahan) {
        kahan_tile.store(p, param + i0, comp + i0, n);
      } else {
        p_tile.store(param + i0, n);
      }
      if (kHasBuffer) b_tile.store(buffer + i0, n);
    }
  }
}

template <typename P, typename S, Precision kMode>
void sgd_units(const SgdWork& w) {
  const bool has_buffer = scalars_of<math_t<P>>(w).use_momentum;
  // The one parallel region of the call; see adam_cpu.cpp.
#pragma omp parallel for num_threads(w.num_threads) schedule(dynamic, 1) if (w.num_threads > 1)
  for (int64_t u = 0; u < w.n_units; ++u) {
    for (int64_t k = w.unit_first[u]; k < w.unit_first[u + 1]; ++k) {
      const Segment& seg = w.segments[k];
      if (!has_buffer) {
        sgd_segment<P, S, Momentum::kNone, kMode>(w, seg);
      } else if (w.table[seg.tensor * kSgdCols + kSgdFirstStep] != 0) {
        sgd_segment<P, S, Momentum::kFirstStep, kMode>(w, seg);
      } else {
        sgd_segment<P, S, Momentum::kUpdate, kMode>(w, seg);
      }
    }
  }
}

struct SgdModeRun {
  template <typename P, typename S, Precision kMode>
  static void run(const SgdWork& w) {
    sgd_units<P, S, kMode>(w);
  }
};

struct SgdRun {
  template <typename P, typename S>
  static void run(const SgdWork& w) {
    with_precision<SgdModeRun, P, S>(w.precision, w);
  }
};

}  // namespace

void sgd_step(const SgdWork& work) { with_storage_types<SgdRun>(work.param_dtype, work.state_dtype, work); }

}  // namespace FUSED_ADAMW_ISA
}  // namespace cpu
}  // namespace fused_adamw
