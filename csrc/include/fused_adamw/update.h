// fused_adamw/update.h: the per-element update of every optimizer in this
// project, written once and compiled for the host (csrc/cpu) and the device
// (csrc/cuda). Backends load, convert to the math type, call these functions
// and convert back; they never restate the math.
//
// Follows Loshchilov & Hutter, "Decoupled Weight Decay Regularization":
// Algorithm 2 (Adam with L2 / AdamW) and Algorithm 1 (SGD with L2 / SGDW), in
// torch.optim's parameterisation (lr outside the momentum buffer, eps added to
// sqrt(v) / sqrt(1 - beta2^t)). ../shared/DESIGN.md spells the rule out.
//
// Two layers:
//   *Hyper   the optimizer's hyperparameters for one call, in doubles, as the
//            Python side passes them (one plain struct per algorithm).
//   *Scalars the step-resolved scalars for one tensor (bias corrections, the
//            decay multiplier), in the math type T. resolve_*() builds them from
//            a Hyper, the learning rate and the tensor's step count; the host
//            calls it once per tensor and step, a capturable kernel calls it
//            once per block with lr and step read from device memory.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_ADAMW_HD __host__ __device__ __forceinline__
#else
#define FUSED_ADAMW_HD inline
#endif

namespace fused_adamw {

// Storage dtype codes shared with python/fused_adamw/_native.py.
enum class DType : int32_t {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
};

// The math type of a storage type: float for float32, float16 and bfloat16
// storage, double for float64. (A type alias only: no code to emit.)
template <typename T>
struct MathOf {
  using type = float;
};
template <>
struct MathOf<double> {
  using type = double;
};

// The hyperparameter fields, each written once: X(type, name, default).
// The structs below and their Python bindings (csrc/bindings/hyper_bindings.h)
// are generated from these lists; python/fused_adamw/hyper.py holds the same
// names, and tests/test_optim_api.py fails when the two lists differ.
//
// Adam / AdamW, one step() call:
//   lr            the group's learning rate (alpha * eta_t)
//   beta1, beta2  first- and second-moment decay
//   eps           added to the bias-corrected sqrt(v)
//   weight_decay  lambda (the L2 coefficient when not decoupled)
//   decay_coeff   decoupled decay multiplies p by (1 - lr * decay_coeff): the
//                 host sets weight_decay for decay_scaling="lr" (torch) and
//                 weight_decay / initial_lr for "schedule" (the paper's eta_t * lambda)
//   decoupled     true: AdamW (Alg. 2 line 12); false: L2 (line 6)
//   amsgrad       keep max(v) and divide by its root
//   maximize      ascend: use -grad
//   precision     how results are stored (both algorithms; rounding.h):
//                 0 round to nearest; 1 master weights (float32 copy in the
//                 table's aux column, the param its rounding); 2 stochastic
//                 rounding of the param and 16-bit state; 3 Kahan summation
//                 (compensation in the aux column)
//   seed          the generator's key (precision 2), in [0, 2^63)
#define FUSED_ADAMW_ADAM_FIELDS(X) \
  X(double, lr, 1e-3)              \
  X(double, beta1, 0.9)            \
  X(double, beta2, 0.999)          \
  X(double, eps, 1e-8)             \
  X(double, weight_decay, 0.)      \
  X(double, decay_coeff, 0.)       \
  X(bool, decoupled, true)         \
  X(bool, amsgrad, false)          \
  X(bool, maximize, false)         \
  X(int32_t, precision, 0)         \
  X(int64_t, seed, 0)

// SGD / SGDW, one step() call; decoupled: SGDW (Alg. 1 line 9), else L2 (line 6).
#define FUSED_ADAMW_SGD_FIELDS(X) \
  X(double, lr, 1e-3)             \
  X(double, momentum, 0.)         \
  X(double, dampening, 0.)        \
  X(double, weight_decay, 0.)     \
  X(double, decay_coeff, 0.)      \
  X(bool, decoupled, false)       \
  X(bool, nesterov, false)        \
  X(bool, maximize, false)        \
  X(int32_t, precision, 0)        \
  X(int64_t, seed, 0)

#define FUSED_ADAMW_DECLARE_FIELD(type, name, init) type name = init;
struct AdamHyper {
  FUSED_ADAMW_ADAM_FIELDS(FUSED_ADAMW_DECLARE_FIELD)
};
struct SgdHyper {
  FUSED_ADAMW_SGD_FIELDS(FUSED_ADAMW_DECLARE_FIELD)
};
#undef FUSED_ADAMW_DECLARE_FIELD

// Step-resolved scalars for one tensor, in the math type T.
template <typename T>
struct AdamScalars {
  T beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
  T l2;          // weight_decay for L2, 0 for decoupled
  T keep;        // 1 - lr * decay_coeff for decoupled, 1 for L2
  T step_size;   // lr / (1 - beta1^t)
  T bc2_sqrt;    // sqrt(1 - beta2^t)
  bool amsgrad, maximize, use_l2, use_decay;
};

template <typename T>
struct SgdScalars {
  T lr, momentum, one_minus_dampening;
  T l2;          // weight_decay for L2, 0 for decoupled
  T keep;        // 1 - lr * decay_coeff for decoupled, 1 for L2
  bool nesterov, maximize, use_l2, use_decay, use_momentum;
};

// The step-dependent terms of resolve_adam (its two pow), in double: the
// CUDA backend computes them once per tensor in its step kernel.
struct AdamStepTerms {
  double step_size;  // lr / (1 - beta1^t)
  double bc2_sqrt;   // sqrt(1 - beta2^t)
};

// step: the tensor's step count after this step's increment (t >= 1).
FUSED_ADAMW_HD AdamStepTerms adam_step_terms(const AdamHyper& h, double lr, double step) {
  AdamStepTerms terms;
  terms.step_size = lr / (1. - pow(h.beta1, step));
  terms.bc2_sqrt = sqrt(1. - pow(h.beta2, step));
  return terms;
}

// resolve_adam with the step terms computed already (the same values).
template <typename T>
FUSED_ADAMW_HD AdamScalars<T> resolve_adam(const AdamHyper& h, double lr, const AdamStepTerms& terms) {
  AdamScalars<T> s;
  s.beta1 = static_cast<T>(h.beta1);
  s.beta2 = static_cast<T>(h.beta2);
  s.one_minus_beta1 = static_cast<T>(1. - h.beta1);
  s.one_minus_beta2 = static_cast<T>(1. - h.beta2);
  s.eps = static_cast<T>(h.eps);
  s.use_l2 = !h.decoupled && h.weight_decay != 0.;
  s.use_decay = h.decoupled && h.decay_coeff != 0.;
  s.l2 = static_cast<T>(s.use_l2 ? h.weight_decay : 0.);
  s.keep = static_cast<T>(s.use_decay ? 1. - lr * h.decay_coeff : 1.);
  s.step_size = static_cast<T>(terms.step_size);
  s.bc2_sqrt = static_cast<T>(terms.bc2_sqrt);
  s.amsgrad = h.amsgrad;
  s.maximize = h.maximize;
  return s;
}

// step: the tensor's step count after this step's increment (t >= 1).
template <typename T>
FUSED_ADAMW_HD AdamScalars<T> resolve_adam(const AdamHyper& h, double lr, double step) {
  return resolve_adam<T>(h, lr, adam_step_terms(h, lr, step));
}

template <typename T>
FUSED_ADAMW_HD SgdScalars<T> resolve_sgd(const SgdHyper& h, double lr) {
  SgdScalars<T> s;
  s.lr = static_cast<T>(lr);
  s.momentum = static_cast<T>(h.momentum);
  s.one_minus_dampening = static_cast<T>(1. - h.dampening);
  s.use_l2 = !h.decoupled && h.weight_decay != 0.;
  s.use_decay = h.decoupled && h.decay_coeff != 0.;
  s.l2 = static_cast<T>(s.use_l2 ? h.weight_decay : 0.);
  s.keep = static_cast<T>(s.use_decay ? 1. - lr * h.decay_coeff : 1.);
  s.nesterov = h.nesterov;
  s.maximize = h.maximize;
  s.use_momentum = h.momentum != 0.;
  return s;
}

// sqrt in the math type: std::sqrt keeps float in float on the host (the
// unqualified C sqrt would widen to double and stop vectorisation).
template <typename T>
FUSED_ADAMW_HD T root(T x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// The gradient as the update sees it: unscaled (AMP), sign-flipped for
// maximize, L2 term added. The caller passes the grad scale itself (1 when
// there is none); dividing by it matches torch's fused optimizers.
template <typename T>
FUSED_ADAMW_HD T effective_grad(T g, T p, T grad_scale, bool maximize, bool use_l2, T l2) {
  g = g / grad_scale;
  if (maximize) g = -g;
  if (use_l2) g = g + l2 * p;
  return g;
}

// One Adam / AdamW element. vmax is read and written only when s.amsgrad.
template <typename T>
FUSED_ADAMW_HD void adam_update(T& p, T grad, T& m, T& v, T& vmax, T grad_scale,
                                const AdamScalars<T>& s) {
  const T g = effective_grad(grad, p, grad_scale, s.maximize, s.use_l2, s.l2);
  if (s.use_decay) p = p * s.keep;
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  T denom_v = v;
  if (s.amsgrad) {
    vmax = vmax > v ? vmax : v;
    denom_v = vmax;
  }
  p = p - s.step_size * m / (root(denom_v) / s.bc2_sqrt + s.eps);
}

// One SGD / SGDW element. first: the momentum buffer has no history yet
// (torch's first step sets buf = g, undamped). buf is untouched when
// momentum == 0.
template <typename T>
FUSED_ADAMW_HD void sgd_update(T& p, T grad, T& buf, bool first, T grad_scale,
                               const SgdScalars<T>& s) {
  T g = effective_grad(grad, p, grad_scale, s.maximize, s.use_l2, s.l2);
  if (s.use_decay) p = p * s.keep;
  if (s.use_momentum) {
    buf = first ? g : s.momentum * buf + s.one_minus_dampening * g;
    g = s.nesterov ? g + s.momentum * buf : buf;
  }
  p = p - s.lr * g;
}

}  // namespace fused_adamw
