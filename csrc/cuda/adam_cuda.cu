// adam_cuda.cu: the Adam / AdamW kernel of fused_adamw._cuda and its launcher.
//
// Follows Loshchilov & Hutter, Algorithm 2 (Adam with L2, line 6, or with
// decoupled weight decay, line 12) in torch.optim's parameterisation; the
// per-element math is resolve_adam() / adam_update() of
// csrc/include/fused_adamw/update.h and is not restated here. This file only
// loads, converts to the math type (fp32; fp64 for fp64 params), calls the
// shared update, converts back and stores.
//
// Two launches per (device, dtype) group and step (multi_tensor.cuh): the
// step kernel (one thread per tensor) reads each tensor's step s, writes the
// bias-correction terms of s + 1 (fp64, once per tensor) to the workspace and
// s + 1 to the step; the update kernel, one block per chunk of any tensor of
// the group, reads the terms and the learning rate (on the device when
// capturable), so a step makes no host sync.
//
// Precision modes (hyper.precision; multi_tensor.cuh, /work/spec/issue12.md):
// adam_kernel<P, S, kAmsgrad> is round to nearest (mode 0);
// adam_precision_kernel<P, S, kMode, kAmsgrad> is master weights, stochastic
// rounding or Kahan summation, for 16-bit params. Both are adam_body, with
// the mode a template argument, so mode 0 pays nothing for the others.
//
// Built into fused_adamw._cuda (nvcc) and fused_adamw._cuda_emu (host
// compiler, csrc/emulation/cuda_emulation.h) by CMakeLists.txt.
#include "multi_tensor.cuh"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace fused_adamw {
namespace cuda {

namespace {

// One element, in storage types: the update runs in M on the param (or the
// master copy) and the state, and the results are stored as kMode says. e:
// the element's index within its tensor (the generator's counter).
template <typename P, typename S, Precision kMode, bool kAmsgrad, typename M, typename A>
__device__ __forceinline__ void adam_element(P& p, P g, S& m, S& v, S& vmax, A& aux, int64_t e, M grad_scale,
                                             const AdamScalars<M>& s, const ElementRng& rng) {
  const M old = Storage<P>::template load<M>(p);
  M x = start_value<kMode>(old, aux);
  M mm = Storage<S>::template load<M>(m);
  M vm = Storage<S>::template load<M>(v);
  M xm = kAmsgrad ? Storage<S>::template load<M>(vmax) : M(0);
  adam_update<M>(x, Storage<P>::template load<M>(g), mm, vm, xm, grad_scale, s);
  PhiloxWords w{0, 0, 0, 0};
  if constexpr (kMode == Precision::kStochastic) w = rng.words(e);
  m = store_state<kMode, S>(mm, w.w1);
  v = store_state<kMode, S>(vm, w.w2);
  if (kAmsgrad) vmax = store_state<kMode, S>(xm, w.w3);
  p = store_param<kMode, P>(x, old, aux, w.w0);
}

template <typename P, typename S, Precision kMode, bool kAmsgrad, typename M>
__device__ __forceinline__ void adam_chunk(const TensorRecord& r, int64_t begin, int64_t end, M grad_scale,
                                           const AdamScalars<M>& s, const ElementRng& rng) {
  using A = typename AuxOf<P, kMode>::type;
  constexpr bool kAux = uses_aux<kMode>();
  P* __restrict__ param = global_ptr<P>(r.ptr[kSlotParam]);
  const P* __restrict__ grad = global_ptr<const P>(r.ptr[kSlotGrad]);
  S* __restrict__ exp_avg = global_ptr<S>(r.ptr[kSlotState0]);
  S* __restrict__ exp_avg_sq = global_ptr<S>(r.ptr[kSlotState1]);
  S* __restrict__ max_exp_avg_sq = kAmsgrad ? global_ptr<S>(r.ptr[kSlotState2]) : nullptr;  // null without amsgrad
  A* __restrict__ aux = kAux ? global_ptr<A>(r.ptr[kSlotAux]) : nullptr;  // null in modes 0 and 2

  int64_t scalar_begin = begin;
  if (r.flags & kVectorAligned) {
    constexpr int W = pack_width<P, S, kMode>();
    const int64_t packs = (end - begin) / W;
    for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
      const int64_t at = begin + k * W;
      P p[W], g[W];
      S m[W], v[W], vmax[W];
      A a[W];
      load_pack<W>(param + at, p);
      load_pack<W>(grad + at, g);
      load_pack<W>(exp_avg + at, m);
      load_pack<W>(exp_avg_sq + at, v);
      if (kAmsgrad) load_pack<W>(max_exp_avg_sq + at, vmax);
      if (kAux) load_pack<W>(aux + at, a);
#pragma unroll
      for (int e = 0; e < W; ++e)
        adam_element<P, S, kMode, kAmsgrad>(p[e], g[e], m[e], v[e], vmax[e], a[e], at + e, grad_scale, s, rng);
      store_pack<W>(param + at, p);
      store_pack<W>(exp_avg + at, m);
      store_pack<W>(exp_avg_sq + at, v);
      if (kAmsgrad) store_pack<W>(max_exp_avg_sq + at, vmax);
      if (kAux) store_pack<W>(aux + at, a);
    }
    scalar_begin = begin + packs * W;
  }
  // Unaligned tensors, and the tail of an aligned one.
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += blockDim.x) {
    P p = param[i];
    S m = exp_avg[i], v = exp_avg_sq[i], vmax;
    A a;
    if (kAmsgrad) vmax = max_exp_avg_sq[i];
    if (kAux) a = aux[i];
    adam_element<P, S, kMode, kAmsgrad>(p, grad[i], m, v, vmax, a, i, grad_scale, s, rng);
    param[i] = p;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (kAmsgrad) max_exp_avg_sq[i] = vmax;
    if (kAux) aux[i] = a;
  }
}

// The step kernel: found_inf leaves the steps alone (and the update kernel
// writes nothing either).
__global__ void __launch_bounds__(kStepThreads)
    adam_step_kernel(const DeviceTables t, const AdamHyper hyper, const StepScalars scalars) {
  if (scalars.found_inf != nullptr && *scalars.found_inf != 0.f) return;
  const double lr = scalars.lr != nullptr ? static_cast<double>(*scalars.lr) : hyper.lr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < t.n_tensors; i += stride) {
    float* step = t.steps[i];
    // The step after this call's increment, in float32 as torch counts it.
    const float next = *step + 1.f;
    t.terms[i] = adam_step_terms(hyper, lr, static_cast<double>(next));
    *step = next;
  }
}

// The update over every chunk of the group, in precision mode kMode.
template <typename P, typename S, Precision kMode, bool kAmsgrad>
__device__ __forceinline__ void adam_body(const DeviceTables& t, const AdamHyper& hyper, const StepScalars& scalars) {
  using M = typename MathOf<P>::type;
  // found_inf is read by every block and written by none.
  if (scalars.found_inf != nullptr && *scalars.found_inf != 0.f) return;
  const M grad_scale = scalars.grad_scale != nullptr ? static_cast<M>(*scalars.grad_scale) : M(1);
  const double lr = scalars.lr != nullptr ? static_cast<double>(*scalars.lr) : hyper.lr;
  for (int64_t c = blockIdx.x; c < t.total_chunks; c += gridDim.x) {
    const ChunkRecord chunk = t.chunks[c];
    const TensorRecord& r = t.records[chunk.tensor];
    AdamScalars<M> s = resolve_adam<M>(hyper, lr, t.terms[chunk.tensor]);
    s.amsgrad = kAmsgrad;  // a compile-time constant for the update's branch
    const ElementRng rng = chunk_rng<kMode>(t, chunk.tensor, r, hyper.seed);
    int64_t begin, end;
    chunk_range(chunk, r.numel, t.chunk_elems, begin, end);
    adam_chunk<P, S, kMode, kAmsgrad>(r, begin, end, grad_scale, s, rng);
  }
}

// Round to nearest (precision 0).
template <typename P, typename S, bool kAmsgrad>
__global__ void __launch_bounds__(kBlockThreads)
    adam_kernel(const DeviceTables t, const AdamHyper hyper, const StepScalars scalars) {
  adam_body<P, S, Precision::kNearest, kAmsgrad>(t, hyper, scalars);
}

// Master weights, stochastic rounding, Kahan summation (16-bit params).
template <typename P, typename S, Precision kMode, bool kAmsgrad>
__global__ void __launch_bounds__(kBlockThreads, kPrecisionMinBlocks)
    adam_precision_kernel(const DeviceTables t, const AdamHyper hyper, const StepScalars scalars) {
  adam_body<P, S, kMode, kAmsgrad>(t, hyper, scalars);
}

template <typename P, typename S, Precision kMode>
void launch_precision(const dim3 grid, const DeviceTables& t, const AdamHyper& h, const StepScalars& sc,
                      cudaStream_t stream) {
  if (h.amsgrad)
    FUSED_ADAMW_LAUNCH(grid, kBlockThreads, 0, stream, adam_precision_kernel<P, S, kMode, true>)(t, h, sc);
  else
    FUSED_ADAMW_LAUNCH(grid, kBlockThreads, 0, stream, adam_precision_kernel<P, S, kMode, false>)(t, h, sc);
}

template <typename P, typename S>
void launch_typed(const DeviceTables& t, const AdamHyper& h, const StepScalars& sc, cudaStream_t stream) {
  // Checked before any launch: a bad mode must not leave the steps counted.
  const Precision mode = precision_mode(h.precision);
  if (mode != Precision::kNearest && !Storage<P>::kSixteenBit)
    throw std::invalid_argument("precision " + std::to_string(h.precision) + " needs float16 or bfloat16 params");
  const int64_t step_blocks = std::min<int64_t>((t.n_tensors + kStepThreads - 1) / kStepThreads, 65535);
  if (step_blocks > 0) {
    FUSED_ADAMW_LAUNCH(static_cast<unsigned int>(step_blocks), kStepThreads, 0, stream, adam_step_kernel)(t, h, sc);
    check_cuda(cudaGetLastError(), "adam_step_kernel launch");
  }
  const int64_t blocks = launch_blocks(t.total_chunks);
  if (blocks == 0) return;  // every tensor is empty
  const dim3 grid(static_cast<unsigned int>(blocks));
  if constexpr (Storage<P>::kSixteenBit) {
    switch (mode) {
      case Precision::kMaster:
        launch_precision<P, S, Precision::kMaster>(grid, t, h, sc, stream);
        break;
      case Precision::kStochastic:
        launch_precision<P, S, Precision::kStochastic>(grid, t, h, sc, stream);
        break;
      case Precision::kKahan:
        launch_precision<P, S, Precision::kKahan>(grid, t, h, sc, stream);
        break;
      case Precision::kNearest:
        break;
    }
  }
  if (mode == Precision::kNearest) {
    if (h.amsgrad)
      FUSED_ADAMW_LAUNCH(grid, kBlockThreads, 0, stream, adam_kernel<P, S, true>)(t, h, sc);
    else
      FUSED_ADAMW_LAUNCH(grid, kBlockThreads, 0, stream, adam_kernel<P, S, false>)(t, h, sc);
  }
  check_cuda(cudaGetLastError(), "adam_kernel launch");
}

}  // namespace

void launch_adam(DType param, DType state, const DeviceTables& t, const AdamHyper& h, const StepScalars& sc,
                 cudaStream_t stream) {
  with_storage_types(param, state, [&](auto p, auto s) {
    launch_typed<typename decltype(p)::type, typename decltype(s)::type>(t, h, sc, stream);
  });
}

}  // namespace cuda
}  // namespace fused_adamw
