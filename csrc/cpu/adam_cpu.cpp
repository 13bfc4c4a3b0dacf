// adam_cpu.cpp: the fused Adam / AdamW step on the CPU, for all tensors of one
// call at once (horizontal fusion): one OpenMP parallel region whose threads
// take work units (about kUnitElems elements of one or more tensors) from a
// dynamic schedule, and a SIMD loop per tile that loads, converts to the math
// type, calls fused_adamw::adam_update (csrc/include/fused_adamw/update.h,
// Algorithm 2 of Loshchilov & Hutter in torch's parameterisation), converts
// back and stores: round to nearest, or as hyper.precision says (master
// weights, stochastic rounding, Kahan summation; issue 12, rounding.h).
//
// Compiled once per instruction set by CMakeLists.txt with
// -DFUSED_ADAMW_ISA=<base|avx2|avx512>; csrc/bindings/cpu_module.cpp checks
// the arguments, increments the steps, resolves the scalars and picks the
// copy at run time. To see what vectorised, add -fopt-info-vec-optimized.
#include <algorithm>

#include "kernel_common.h"

namespace fused_adamw {
namespace cpu {
namespace FUSED_ADAMW_ISA {
namespace {

template <typename M>
const AdamScalars<M>* scalars_of(const AdamWork& w);
template <>
const AdamScalars<float>* scalars_of<float>(const AdamWork& w) {
  return w.scalars_f;
}
template <>
const AdamScalars<double>* scalars_of<double>(const AdamWork& w) {
  return w.scalars_d;
}

// One segment. P: param/grad storage, S: state storage. kAmsgrad is a template
// argument so that the loop has no max_exp_avg_sq access at all without it;
// kMode (the precision mode, rounding.h) likewise: the kNearest code is the
// same as before the modes existed. The math loop always runs on float
// tiles; the modes differ in where the param comes from (kMaster: the
// float32 master copy, updated in place) and in the store pass after it.
// flatten: update.h's and rounding.h's functions are inlined here, never
// emitted out of line from an ISA-specific object (see cpu_common.h).
template <typename P, typename S, bool kAmsgrad, Precision kMode>
[[gnu::flatten]] void adam_segment(const AdamWork& w, const Segment& seg) {
  using M = math_t<P>;
  const int64_t* row = w.table + seg.tensor * kAdamCols;
  P* const param = at<P>(row[kAdamParam]);
  const P* const grad = at<const P>(row[kAdamGrad]);
  S* const exp_avg = at<S>(row[kAdamExpAvg]);
  S* const exp_avg_sq = at<S>(row[kAdamExpAvgSq]);
  S* const max_exp_avg_sq = kAmsgrad ? at<S>(row[kAdamMaxExpAvgSq]) : nullptr;
  float* const master = kMode == Precision::kMaster ? at<float>(row[kAdamAux]) : nullptr;
  P* const comp = kMode == Precision::kKahan ? at<P>(row[kAdamAux]) : nullptr;
  Stream rng{};
  if (kMode == Precision::kStochastic) {
    rng = Stream{w.seed, w.rng_step[seg.tensor], static_cast<uint32_t>(row[kAdamIndex])};
  }

  AdamScalars<M> s = scalars_of<M>(w)[seg.tensor];
  s.amsgrad = kAmsgrad;  // a constant the compiler sees: no branch in the loop
  const M grad_scale = static_cast<M>(w.grad_scale);

  Tile<P> p_tile, g_tile;
  Tile<S> m_tile, v_tile, vmax_tile;
  std::conditional_t<kMode == Precision::kKahan, KahanTile<P>, NoTile> kahan_tile;
  constexpr int kStates = kSixteenBit<S> ? (kAmsgrad ? 3 : 2) : 0;  // 16-bit state arrays rounded with the param
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
    M* __restrict__ m = m_tile.view(exp_avg + i0, n);
    M* __restrict__ v = v_tile.view(exp_avg_sq + i0, n);
    M* __restrict__ vmax = kAmsgrad ? vmax_tile.view(max_exp_avg_sq + i0, n) : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      M pi = p[i], mi = m[i], vi = v[i];
      M wi = kAmsgrad ? vmax[i] : M(0);
      adam_update(pi, g[i], mi, vi, wi, grad_scale, s);
      p[i] = pi;
      m[i] = mi;
      v[i] = vi;
      if (kAmsgrad) vmax[i] = wi;
    }
    if constexpr (kMode == Precision::kStochastic) {
      // Param and 16-bit state from one Philox block per element (float32
      // state is stored already).
      sr_tile.store(rng, i0, n, p, param + i0, m, exp_avg + i0, v, exp_avg_sq + i0, vmax,
                    kAmsgrad ? max_exp_avg_sq + i0 : nullptr);
    } else {
      if constexpr (kMode == Precision::kMaster) {
        from_math(p, param + i0, n);  // the master copy was updated in place
      } else if constexpr (kMode == Precision::kKahan) {
        kahan_tile.store(p, param + i0, comp + i0, n);
      } else {
        p_tile.store(param + i0, n);
      }
      m_tile.store(exp_avg + i0, n);
      v_tile.store(exp_avg_sq + i0, n);
      if (kAmsgrad) vmax_tile.store(max_exp_avg_sq + i0, n);
    }
  }
}

template <typename P, typename S, bool kAmsgrad, Precision kMode>
void adam_units(const AdamWork& w) {
  // The one parallel region of the call. Dynamic: units are equal in size but
  // threads are not equally available on a shared machine.
#pragma omp parallel for num_threads(w.num_threads) schedule(dynamic, 1) if (w.num_threads > 1)
  for (int64_t u = 0; u < w.n_units; ++u) {
    for (int64_t k = w.unit_first[u]; k < w.unit_first[u + 1]; ++k) {
      adam_segment<P, S, kAmsgrad, kMode>(w, w.segments[k]);
    }
  }
}

struct AdamModeRun {
  template <typename P, typename S, Precision kMode>
  static void run(const AdamWork& w) {
    if (w.amsgrad) {
      adam_units<P, S, true, kMode>(w);
    } else {
      adam_units<P, S, false, kMode>(w);
    }
  }
};

struct AdamRun {
  template <typename P, typename S>
  static void run(const AdamWork& w) {
    with_precision<AdamModeRun, P, S>(w.precision, w);
  }
};

}  // namespace

void adam_step(const AdamWork& work) { with_storage_types<AdamRun>(work.param_dtype, work.state_dtype, work); }

}  // namespace FUSED_ADAMW_ISA
}  // namespace cpu
}  // namespace fused_adamw
