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
// Built into fused_adamw._cuda (nvcc) and fused_adamw._cuda_emu (host
// compiler, csrc/emulation/cuda_emulation.h) by CMakeLists.txt.
#include "multi_tensor.cuh"

#include <algorithm>
#include <stdexcept>

namespace fused_adamw {
namespace cuda {

namespace {

template <typename P, typename S, bool kAmsgrad, typename M>
__device__ __forceinline__ void adam_chunk(const TensorRecord& r, int64_t begin, int64_t end, M grad_scale,
                                           const AdamScalars<M>& s) {
  P* __restrict__ param = global_ptr<P>(r.ptr[kSlotParam]);
  const P* __restrict__ grad = global_ptr<const P>(r.ptr[kSlotGrad]);
  S* __restrict__ exp_avg = global_ptr<S>(r.ptr[kSlotState0]);
  S* __restrict__ exp_avg_sq = global_ptr<S>(r.ptr[kSlotState1]);
  S* __restrict__ max_exp_avg_sq = kAmsgrad ? global_ptr<S>(r.ptr[kSlotState2]) : nullptr;  // null without amsgrad

  int64_t scalar_begin = begin;
  if (r.flags & kVectorAligned) {
    constexpr int W = kPackBytes / static_cast<int>(sizeof(P));
    const int64_t packs = (end - begin) / W;
    for (int64_t k = threadIdx.x; k < packs; k += blockDim.x) {
      const int64_t at = begin + k * W;
      P p[W], g[W];
      S m[W], v[W], vmax[W];
      load_pack<W>(param + at, p);
      load_pack<W>(grad + at, g);
      load_pack<W>(exp_avg + at, m);
      load_pack<W>(exp_avg_sq + at, v);
      if (kAmsgrad) load_pack<W>(max_exp_avg_sq + at, vmax);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        M pm = Storage<P>::template load<M>(p[e]);
        M mm = Storage<S>::template load<M>(m[e]);
        M vm = Storage<S>::template load<M>(v[e]);
        M xm = kAmsgrad ? Storage<S>::template load<M>(vmax[e]) : M(0);
        adam_update<M>(pm, Storage<P>::template load<M>(g[e]), mm, vm, xm, grad_scale, s);
        p[e] = Storage<P>::template store<M>(pm);
        m[e] = Storage<S>::template store<M>(mm);
        v[e] = Storage<S>::template store<M>(vm);
        if (kAmsgrad) vmax[e] = Storage<S>::template store<M>(xm);
      }
      store_pack<W>(param + at, p);
      store_pack<W>(exp_avg + at, m);
      store_pack<W>(exp_avg_sq + at, v);
      if (kAmsgrad) store_pack<W>(max_exp_avg_sq + at, vmax);
    }
    scalar_begin = begin + packs * W;
  }
  // Unaligned tensors, and the tail of an aligned one.
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += blockDim.x) {
    M pm = Storage<P>::template load<M>(param[i]);
    M mm = Storage<S>::template load<M>(exp_avg[i]);
    M vm = Storage<S>::template load<M>(exp_avg_sq[i]);
    M xm = kAmsgrad ? Storage<S>::template load<M>(max_exp_avg_sq[i]) : M(0);
    adam_update<M>(pm, Storage<P>::template load<M>(grad[i]), mm, vm, xm, grad_scale, s);
    param[i] = Storage<P>::template store<M>(pm);
    exp_avg[i] = Storage<S>::template store<M>(mm);
    exp_avg_sq[i] = Storage<S>::template store<M>(vm);
    if (kAmsgrad) max_exp_avg_sq[i] = Storage<S>::template store<M>(xm);
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
    float* step = t.records[i].step;
    // The step after this call's increment, in float32 as torch counts it.
    const float next = *step + 1.f;
    t.terms[i] = adam_step_terms(hyper, lr, static_cast<double>(next));
    *step = next;
  }
}

template <typename P, typename S, bool kAmsgrad>
__global__ void __launch_bounds__(kBlockThreads)
    adam_kernel(const DeviceTables t, const AdamHyper hyper, const StepScalars scalars) {
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
    int64_t begin, end;
    chunk_range(chunk, r.numel, t.chunk_elems, begin, end);
    adam_chunk<P, S, kAmsgrad>(r, begin, end, grad_scale, s);
  }
}

template <typename P, typename S>
void launch_typed(const DeviceTables& t, const AdamHyper& h, const StepScalars& sc, cudaStream_t stream) {
  const int64_t step_blocks = std::min<int64_t>((t.n_tensors + kStepThreads - 1) / kStepThreads, 65535);
  if (step_blocks > 0) {
    FUSED_ADAMW_LAUNCH(static_cast<unsigned int>(step_blocks), kStepThreads, 0, stream, adam_step_kernel)(t, h, sc);
    check_cuda(cudaGetLastError(), "adam_step_kernel launch");
  }
  const int64_t blocks = launch_blocks(t.total_chunks);
  if (blocks == 0) return;  // every tensor is empty
  const dim3 grid(static_cast<unsigned int>(blocks));
  if (h.amsgrad)
    FUSED_ADAMW_LAUNCH(grid, kBlockThreads, 0, stream, adam_kernel<P, S, true>)(t, h, sc);
  else
    FUSED_ADAMW_LAUNCH(grid, kBlockThreads, 0, stream, adam_kernel<P, S, false>)(t, h, sc);
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
