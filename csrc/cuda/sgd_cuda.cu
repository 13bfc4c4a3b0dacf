// sgd_cuda.cu: the SGD / SGDW kernel of fused_adamw._cuda and its launcher.
//
// Follows Loshchilov & Hutter, Algorithm 1 (SGD with L2, line 6, or with
// decoupled weight decay, line 9) in torch.optim.SGD's parameterisation
// (lr outside the momentum buffer; first step sets buf = g); the per-element
// math is resolve_sgd() / sgd_update() of csrc/include/fused_adamw/update.h.
// This file only loads, converts, calls the shared update and stores.
//
// One launch per (device, dtype) group and step over the chunk table of
// multi_tensor.cuh. SGD keeps no step count, so there is no end-of-grid work.
//
// Built into fused_adamw._cuda (nvcc) and fused_adamw._cuda_emu (host
// compiler, csrc/emulation/cuda_emulation.h) by CMakeLists.txt.
#include "multi_tensor.cuh"

#include <stdexcept>

namespace fused_adamw {
namespace cuda {

namespace {

template <typename P, typename S, bool kMomentum, typename M>
__device__ __forceinline__ void sgd_chunk(const TensorRecord& r, int64_t begin, int64_t end, M grad_scale,
                                          const SgdScalars<M>& s) {
  P* __restrict__ param = global_ptr<P>(r.ptr[kSlotParam]);
  const P* __restrict__ grad = global_ptr<const P>(r.ptr[kSlotGrad]);
  S* __restrict__ buffer = kMomentum ? global_ptr<S>(r.ptr[kSlotState0]) : nullptr;  // null without momentum
  const bool first = (r.flags & kFirstStep) != 0;

  int64_t scalar_begin = begin;
  if (r.flags & kVectorAligned) {
    constexpr int W = kPackBytes / static_cast<int>(sizeof(P));
    const int64_t packs = (end - begin) / W;
    for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
      const int64_t at = begin + k * W;
      P p[W], g[W];
      S b[W];
      load_pack<W>(param + at, p);
      load_pack<W>(grad + at, g);
      // The first step overwrites the buffer without reading it.
      if (kMomentum && !first) load_pack<W>(buffer + at, b);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        M pm = Storage<P>::template load<M>(p[e]);
        M bm = kMomentum && !first ? Storage<S>::template load<M>(b[e]) : M(0);
        sgd_update<M>(pm, Storage<P>::template load<M>(g[e]), bm, first, grad_scale, s);
        p[e] = Storage<P>::template store<M>(pm);
        if (kMomentum) b[e] = Storage<S>::template store<M>(bm);
      }
      store_pack<W>(param + at, p);
      if (kMomentum) store_pack<W>(buffer + at, b);
    }
    scalar_begin = begin + packs * W;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += blockDim.x) {
    M pm = Storage<P>::template load<M>(param[i]);
    M bm = kMomentum && !first ? Storage<S>::template load<M>(buffer[i]) : M(0);
    sgd_update<M>(pm, Storage<P>::template load<M>(grad[i]), bm, first, grad_scale, s);
    param[i] = Storage<P>::template store<M>(pm);
    if (kMomentum) buffer[i] = Storage<S>::template store<M>(bm);
  }
}

template <typename P, typename S, bool kMomentum>
__global__ void __launch_bounds__(kBlockThreads)
    sgd_kernel(const DeviceTables t, const SgdHyper hyper, const StepScalars scalars) {
  using M = typename MathOf<P>::type;
  if (scalars.found_inf != nullptr && *scalars.found_inf != 0.f) return;
  const M grad_scale = scalars.grad_scale != nullptr ? static_cast<M>(*scalars.grad_scale) : M(1);
  const double lr = scalars.lr != nullptr ? static_cast<double>(*scalars.lr) : hyper.lr;
  SgdScalars<M> s = resolve_sgd<M>(hyper, lr);
  s.use_momentum = kMomentum;  // a compile-time constant for the update's branch
  for (int64_t c = blockIdx.x; c < t.total_chunks; c += gridDim.x) {
    const ChunkRecord chunk = t.chunks[c];
    const TensorRecord& r = t.records[chunk.tensor];
    int64_t begin, end;
    chunk_range(chunk, r.numel, t.chunk_elems, begin, end);
    sgd_chunk<P, S, kMomentum>(r, begin, end, grad_scale, s);
  }
}

template <typename P, typename S>
void launch_typed(const DeviceTables& t, const SgdHyper& h, const StepScalars& sc, cudaStream_t stream) {
  const int64_t blocks = launch_blocks(t.total_chunks);
  if (blocks == 0) return;  // every tensor is empty
  const dim3 grid(static_cast<unsigned int>(blocks));
  if (h.momentum != 0.)
    FUSED_ADAMW_LAUNCH(grid, kBlockThreads, 0, stream, sgd_kernel<P, S, true>)(t, h, sc);
  else
    FUSED_ADAMW_LAUNCH(grid, kBlockThreads, 0, stream, sgd_kernel<P, S, false>)(t, h, sc);
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
