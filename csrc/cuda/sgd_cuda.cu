// sgd_cuda.cu: the SGD / SGDW kernel of fused_adamw._cuda and its launcher.
//
// Follows Loshchilov & Hutter, Algorithm 1 (SGD with L2, line 6, or with
// decoupled weight decay, line 9) in torch.optim.SGD's parameterisation
// (lr outside the momentum buffer; first step sets buf = g); the per-element
// math is resolve_sgd() / sgd_update() of csrc/include/fused_adamw/update.h.
// This file only loads, converts, calls the shared update and stores.
//
// One launch per (device, dtype) group and step over the chunk table of
// multi_tensor.cuh. torch's SGD keeps no step count; under stochastic
// rounding (precision 2) the generator needs one, so a step kernel (one
// thread per tensor, as Adam's) first adds 1 to each tensor's float32 step,
// and the update reads the new value.
//
// Precision modes (hyper.precision; multi_tensor.cuh, /work/spec/issue12.md):
// sgd_kernel<P, S, kMomentum> is round to nearest (mode 0);
// sgd_precision_kernel<P, S, kMode, kMomentum> is master weights, stochastic
// rounding or Kahan summation, for 16-bit params. Both are sgd_body.
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

// One element, in storage types (see adam_element). The first step
// overwrites the buffer without reading it.
template <typename P, typename S, Precision kMode, bool kMomentum, typename M, typename A>
__device__ __forceinline__ void sgd_element(P& p, P g, S& b, A& aux, bool first, int64_t e, M grad_scale,
                                            const SgdScalars<M>& s, const ElementRng& rng) {
  const M old = Storage<P>::template load<M>(p);
  M x = start_value<kMode>(old, aux);
  M bm = kMomentum && !first ? Storage<S>::template load<M>(b) : M(0);
  sgd_update<M>(x, Storage<P>::template load<M>(g), bm, first, grad_scale, s);
  PhiloxWords w{0, 0, 0, 0};
  if constexpr (kMode == Precision::kStochastic) w = rng.words(e);
  if (kMomentum) b = store_state<kMode, S>(bm, w.w1);
  p = store_param<kMode, P>(x, old, aux, w.w0);
}

template <typename P, typename S, Precision kMode, bool kMomentum, typename M>
__device__ __forceinline__ void sgd_chunk(const TensorRecord& r, int64_t begin, int64_t end, M grad_scale,
                                          const SgdScalars<M>& s, const ElementRng& rng) {
  using A = typename AuxOf<P, kMode>::type;
  constexpr bool kAux = uses_aux<kMode>();
  P* __restrict__ param = global_ptr<P>(r.ptr[kSlotParam]);
  const P* __restrict__ grad = global_ptr<const P>(r.ptr[kSlotGrad]);
  S* __restrict__ buffer = kMomentum ? global_ptr<S>(r.ptr[kSlotState0]) : nullptr;  // null without momentum
  A* __restrict__ aux = kAux ? global_ptr<A>(r.ptr[kSlotAux]) : nullptr;          // null in modes 0 and 2
  const bool first = (r.flags & kFirstStep) != 0;

  int64_t scalar_begin = begin;
  if (r.flags & kVectorAligned) {
    constexpr int W = pack_width<P, S, kMode>();
    const int64_t packs = (end - begin) / W;
    for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
      const int64_t at = begin + k * W;
      P p[W], g[W];
      S b[W];
      A a[W];
      load_pack<W>(param + at, p);
      load_pack<W>(grad + at, g);
      if (kMomentum && !first) load_pack<W>(buffer + at, b);
      if (kAux) load_pack<W>(aux + at, a);
#pragma unroll
      for (int e = 0; e < W; ++e)
        sgd_element<P, S, kMode, kMomentum>(p[e], g[e], b[e], a[e], first, at + e, grad_scale, s, rng);
      store_pack<W>(param + at, p);
      if (kMomentum) store_pack<W>(buffer + at, b);
      if (kAux) store_pack<W>(aux + at, a);
    }
    scalar_begin = begin + packs * W;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += blockDim.x) {
    P p = param[i];
    S b;
    A a;
    if (kMomentum && !first) b = buffer[i];
    if (kAux) a = aux[i];
    sgd_element<P, S, kMode, kMomentum>(p, grad[i], b, a, first, i, grad_scale, s, rng);
    param[i] = p;
    if (kMomentum) buffer[i] = b;
    if (kAux) aux[i] = a;
  }
}

// The generator's step (precision 2 only): found_inf leaves the steps alone
// (and the update kernel writes nothing either).
__global__ void __launch_bounds__(kStepThreads) sgd_step_kernel(const DeviceTables t, const StepScalars scalars) {
  if (scalars.found_inf != nullptr && *scalars.found_inf != 0.f) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < t.n_tensors; i += stride)
    *t.steps[i] += 1.f;
}

// The update over every chunk of the group, in precision mode kMode.
template <typename P, typename S, Precision kMode, bool kMomentum>
__device__ __forceinline__ void sgd_body(const DeviceTables& t, const SgdHyper& hyper, const StepScalars& scalars) {
  using M = typename MathOf<P>::type;
  if (scalars.found_inf != nullptr && *scalars.found_inf != 0.f) return;
  const M grad_scale = scalars.grad_scale != nullptr ? static_cast<M>(*scalars.grad_scale) : M(1);
  const double lr = scalars.lr != nullptr ? static_cast<double>(*scalars.lr) : hyper.lr;
  SgdScalars<M> s = resolve_sgd<M>(hyper, lr);
  s.use_momentum = kMomentum;  // a compile-time constant for the update's branch
  for (int64_t c = blockIdx.x; c < t.total_chunks; c += gridDim.x) {
    const ChunkRecord chunk = t.chunks[c];
    const TensorRecord& r = t.records[chunk.tensor];
    const ElementRng rng = chunk_rng<kMode>(t, chunk.tensor, r, hyper.seed);
    int64_t begin, end;
    chunk_range(chunk, r.numel, t.chunk_elems, begin, end);
    sgd_chunk<P, S, kMode, kMomentum>(r, begin, end, grad_scale, s, rng);
  }
}

// Round to nearest (precision 0).
template <typename P, typename S, bool kMomentum>
__global__ void __launch_bounds__(kBlockThreads)
    sgd_kernel(const DeviceTables t, const SgdHyper hyper, const StepScalars scalars) {
  sgd_body<P, S, Precision::kNearest, kMomentum>(t, hyper, scalars);
}

// Master weights, stochastic rounding, Kahan summation (16-bit params).
template <typename P, typename S, Precision kMode, bool kMomentum>
__global__ void __launch_bounds__(kBlockThreads, kPrecisionMinBlocks)
    sgd_precision_kernel(const DeviceTables t, const SgdHyper hyper, const StepScalars scalars) {
  sgd_body<P, S, kMode, kMomentum>(t, hyper, scalars);
}

template <typename P, typename S, Precision kMode>
void launch_precision(const dim3 grid, const DeviceTables& t, const SgdHyper& h, const StepScalars& sc,
                      cudaStream_t stream) {
  if (h.momentum != 0.)
    FUSED_ADAMW_LAUNCH(grid, kBlockThreads, 0, stream, sgd_precision_kernel<P, S, kMode, true>)(t, h, sc);
  else
    FUSED_ADAMW_LAUNCH(grid, kBlockThreads, 0, stream, sgd_precision_kernel<P, S, kMode, false>)(t, h, sc);
}

template <typename P, typename S>
void launch_typed(const DeviceTables& t, const SgdHyper& h, const StepScalars& sc, cudaStream_t stream) {
  // Checked before any launch: a bad mode must not leave the steps counted.
  const Precision mode = precision_mode(h.precision);
  if (mode != Precision::kNearest && !Storage<P>::kSixteenBit)
    throw std::invalid_argument("precision " + std::to_string(h.precision) + " needs float16 or bfloat16 params");
  if (mode == Precision::kStochastic) {
    const int64_t step_blocks = std::min<int64_t>((t.n_tensors + kStepThreads - 1) / kStepThreads, 65535);
    if (step_blocks > 0) {
      FUSED_ADAMW_LAUNCH(static_cast<unsigned int>(step_blocks), kStepThreads, 0, stream, sgd_step_kernel)(t, sc);
      check_cuda(cudaGetLastError(), "sgd_step_kernel launch");
    }
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
    if (h.momentum != 0.)
      FUSED_ADAMW_LAUNCH(grid, kBlockThreads, 0, stream, sgd_kernel<P, S, true>)(t, h, sc);
    else
      FUSED_ADAMW_LAUNCH(grid, kBlockThreads, 0, stream, sgd_kernel<P, S, false>)(t, h, sc);
  }
  check_cuda(cudaGetLastError(), "sgd_kernel launch");
}

}  // namespace

void launch_sgd(DType param, DType state, const DeviceTables& t, const SgdHyper& h, const StepScalars& sc,
                 cudaStream_t stream) {
  with_storage_types(param, state, [&](auto p, auto s) {
    launch_typed<typename decltype(p)::type, typename decltype(s)::type>(t, h, sc, stream);
  });
}

}  // namespace cuda
}  // namespace fused_adamw
