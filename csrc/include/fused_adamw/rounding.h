// fused_adamw/rounding.h: how the kernels store their float32 results in
// 16-bit formats (issue 12), written once for the host (csrc/cpu, the CUDA
// emulation) and the device (csrc/cuda):
//
//   * Philox-4x32-10, the counter-based generator of stochastic rounding
//     (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11;
//     Random123's philox4x32_R), and the per-element counter layout;
//   * float32 <-> bfloat16 and float16, round to nearest even;
//   * stochastic rounding to bfloat16 and float16 with 16 random bits;
//   * the param stores of the precision modes (master weights, Kahan).
//
// python/fused_adamw/reference.py is the definition (philox4x32,
// random_bits, round_bf16, stochastic_round_bf16, stochastic_round_fp16,
// adam_step_lp); /work/spec/issue12.md states the contract. Everything here
// is integer arithmetic or exact float32 arithmetic (no intrinsics, no
// library calls), so nvcc's device code and any host compiler produce the
// same bits. 16-bit values travel as their uint16_t patterns; each backend
// maps them onto its own storage type.
#pragma once

#include <cstdint>

#include <fused_adamw/update.h>  // FUSED_ADAMW_HD

namespace fused_adamw {

// The `precision` field of AdamHyper / SgdHyper (python/fused_adamw/hyper.py
// PRECISION_*).
enum class Precision : int32_t {
  kNearest = 0,     // round to nearest even
  kMaster = 1,      // float32 master copy in the aux column; param = RN(master)
  kStochastic = 2,  // param and 16-bit state stochastically rounded
  kKahan = 3,       // compensation (param dtype) in the aux column
};

// ---------------------------------------------------------------- bit casts

// A union, not memcpy: the one bit cast that nvcc device code and host
// compilers both accept without a library call (GCC documents it).
FUSED_ADAMW_HD uint32_t float_as_bits(float f) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = f;
  return v.u;
}

FUSED_ADAMW_HD float bits_as_float(uint32_t u) {
  union {
    float f;
    uint32_t u;
  } v;
  v.u = u;
  return v.f;
}

// ---------------------------------------------------------------- Philox-4x32-10

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // round multipliers (Random123's PHILOX_M4x32_0/1)
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key bumps (golden ratio, sqrt(3) - 1, times 2^32)
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// The four output words; which stored value each one rounds (the spec's
// stream layout): w0 the param, w1 exp_avg or momentum_buffer, w2
// exp_avg_sq, w3 max_exp_avg_sq. Only the low 16 bits are used.
struct PhiloxWords {
  uint32_t w0, w1, w2, w3;
};

// Philox-4x32-10 of counter (c0, c1, c2, c3) and key (k0, k1): reference.philox4x32.
// One round: hi0:lo0 = M0 * c0, hi1:lo1 = M1 * c2 (64-bit products),
// c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the key is bumped between
// rounds. Written with 64-bit products of 32-bit values so that GCC
// vectorises a loop of calls (vpmuludq) and nvcc emits mul.lo/mul.hi.
FUSED_ADAMW_HD PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                         uint32_t k1) {
  // Fully unrolled: a loop inside the caller's element loop would stop
  // GCC's vectoriser ("control flow in loop").
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 10
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;  // the bump after the last round is never used
    k1 += kPhiloxW1;
  }
  PhiloxWords out;
  out.w0 = c0;
  out.w1 = c1;
  out.w2 = c2;
  out.w3 = c3;
  return out;
}

// The words of element e of a tensor (reference.random_bits): counter
// (e lo, e hi, tensor_index, step), key (seed lo, seed hi). step: the
// tensor's step count after this call's increment (1 on the first step).
FUSED_ADAMW_HD PhiloxWords element_words(uint64_t seed, uint32_t step, uint32_t tensor_index, uint64_t e) {
  return philox4x32_10(static_cast<uint32_t>(e), static_cast<uint32_t>(e >> 32), tensor_index, step,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// ---------------------------------------------------------------- bfloat16

FUSED_ADAMW_HD float bf16_to_float(uint16_t h) { return bits_as_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even on the 16 dropped bits; a carry into the exponent is
// the correct rounding up to the next binade (or to infinity). NaN stays NaN
// with its sign and top payload bits, quiet bit set (the carry could turn
// it into infinity).
FUSED_ADAMW_HD uint16_t float_to_bf16_rn(float f) {
  const uint32_t u = float_as_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded);
}

// Stochastic rounding (reference.stochastic_round_bf16): bits = (u + r) >> 16
// with r the low 16 bits of word: |f| goes up one bfloat16 spacing with
// probability (u & 0xffff) / 2^16. Exact values, zeros and infinities stay;
// NaN becomes 0x7fc0.
FUSED_ADAMW_HD uint16_t float_to_bf16_sr(float f, uint32_t word) {
  const uint32_t u = float_as_bits(f);
  const uint32_t rounded = (u + (word & 0xFFFFu)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
}

// ---------------------------------------------------------------- float16

FUSED_ADAMW_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;  // exponent and mantissa
  uint32_t bits;
  if (em >= 0x7C00u) {
    bits = 0x7F800000u | ((em & 0x03FFu) << 13);  // inf, NaN (payload kept)
  } else if (em >= 0x0400u) {
    bits = (em << 13) + ((127u - 15u) << 23);  // normal: rebias the exponent
  } else {
    // Zero or subnormal: em units of 2^-24, exact in float.
    bits = float_as_bits(static_cast<float>(em) * 5.9604644775390625e-8f);
  }
  return bits_as_float(bits | sign);
}

// Round to nearest even (IEEE: 65520 and above become inf; subnormals down
// to 2^-24). The same bits as F16C's vcvtps2ph and CUDA's __float2half_rn
// for every non-NaN input; NaN keeps its sign and top payload, quiet bit set.
FUSED_ADAMW_HD uint16_t float_to_fp16_rn(float f) {
  const uint32_t u = float_as_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x03FFu));
  // 65520 = 65504 + half an ulp: from there on, nearest-even is infinity.
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  if (a < 0x38800000u) {
    // Below the smallest normal half (2^-14): adding 0.5f rounds to a
    // multiple of 2^-24 (the ulp of floats in [0.5, 1)), nearest even; the
    // mantissa bits are then the subnormal half (0x400: the smallest normal,
    // also correct).
    const float t = bits_as_float(a) + 0.5f;
    return static_cast<uint16_t>(sign | (float_as_bits(t) - 0x3F000000u));
  }
  // Normal: rebias the exponent, round the 13 dropped bits to nearest even.
  const uint32_t r = a + (static_cast<uint32_t>(15 - 127) << 23) + 0x0FFFu + ((a >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

// Stochastic rounding (reference.stochastic_round_fp16, the spec's rule):
// a = |f|; lo = a truncated to a float16 value, ulp its spacing (2^-24 below
// 2^-14); f16 = floor((a - lo) / ulp * 2^16); the result is lo + ulp when
// f16 + (word & 0xffff) >= 2^16, else lo, with f's sign. a >= 65536 and inf
// give inf (lo = 65504 rounds up to inf too); NaN stays NaN.
// With q = lo's float16 pattern * 2^16 + f16, the result is (q + r) >> 16:
// the carry out of f16 + r is the rounding up, into the exponent if need be.
//   normal float16 range (a >= 2^-14): q = the rebiased float32 pattern << 3
//     (the 13 dropped mantissa bits become f16's top bits);
//   below: with a = M * 2^(e - 150) (M the 24-bit significand, e the float32
//     exponent field, 1 for float32 subnormals), q = floor(a * 2^40) =
//     floor(M * 2^(e - 110)) = (M << 8) >> (118 - e), zero for shifts of
//     32 and more (a < 2^-40).
// Integer selects only: GCC if-converts and vectorises a loop of it (a
// float-to-int conversion would stay behind a branch, as it may trap).
FUSED_ADAMW_HD uint16_t float_to_fp16_sr(float f, uint32_t word) {
  const uint32_t u = float_as_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const uint32_t q_normal = (a - (static_cast<uint32_t>(127 - 15) << 23)) << 3;
  const uint32_t e = a >> 23;
  const uint32_t significand = (a & 0x007FFFFFu) | (e != 0u ? 0x00800000u : 0u);
  const uint32_t e_sub = e == 0u ? 1u : (e > 112u ? 112u : e);  // in [1, 112]: a shift in [6, 117]
  const uint32_t shift = 118u - e_sub;
  const uint32_t q_sub = shift >= 32u ? 0u : (significand << 8) >> shift;
  const uint32_t q = a < 0x38800000u ? q_sub : q_normal;  // below 2^-14: float16 subnormals
  uint32_t h = (q + (word & 0xFFFFu)) >> 16;
  h = a >= 0x47800000u ? 0x7C00u : h;                            // >= 65536 and inf
  h = a > 0x7F800000u ? (0x7E00u | ((a >> 13) & 0x03FFu)) : h;  // NaN
  return static_cast<uint16_t>(sign | h);
}

// ---------------------------------------------------------------- formats

// The two 16-bit formats behind one interface, for code templated on the
// param's format (tags, no storage).
struct Bf16Format {
  static FUSED_ADAMW_HD float to_float(uint16_t h) { return bf16_to_float(h); }
  static FUSED_ADAMW_HD uint16_t nearest(float f) { return float_to_bf16_rn(f); }
  static FUSED_ADAMW_HD uint16_t stochastic(float f, uint32_t word) { return float_to_bf16_sr(f, word); }
};

struct Fp16Format {
  static FUSED_ADAMW_HD float to_float(uint16_t h) { return fp16_to_float(h); }
  static FUSED_ADAMW_HD uint16_t nearest(float f) { return float_to_fp16_rn(f); }
  static FUSED_ADAMW_HD uint16_t stochastic(float f, uint32_t word) { return float_to_fp16_sr(f, word); }
};

// ---------------------------------------------------------------- param stores

// Kahan summation (precision 3; reference.adam_step_lp, optimi's update), in
// float32: old = the param before the step, x = the updated value, comp =
// the stored compensation. Returns u = comp + (x - old), the update the
// param should take; the caller stores pn = RN(old + u) and
// kahan_compensation(u, M(pn), old) rounded to the param's format.
FUSED_ADAMW_HD float kahan_update(float old, float x, float comp) { return comp + (x - old); }

FUSED_ADAMW_HD float kahan_compensation(float u, float new_param, float old) { return u - (new_param - old); }

// One param element of a 16-bit format F under `precision` (the spec's
// "Param store"), for backends that store element by element:
//   x      the updated param in float32 (from the master copy when kMaster)
//   old    the param before the step (read only by kKahan)
//   word   the element's Philox word w0 (read only by kStochastic)
//   master kMaster: the float32 master copy, set to x; else unused (may be null)
//   comp   kKahan: the compensation's pattern in F, read and updated; else
//          unused (may be null)
// Returns the param's new pattern.
template <typename F>
FUSED_ADAMW_HD uint16_t store_param16(Precision precision, float x, float old, uint32_t word, float* master,
                                      uint16_t* comp) {
  switch (precision) {
    case Precision::kMaster:
      *master = x;
      return F::nearest(x);
    case Precision::kStochastic:
      return F::stochastic(x, word);
    case Precision::kKahan: {
      const float u = kahan_update(old, x, F::to_float(*comp));
      const uint16_t pn = F::nearest(old + u);
      *comp = F::nearest(kahan_compensation(u, F::to_float(pn), old));
      return pn;
    }
    default:
      return F::nearest(x);
  }
}

}  // namespace fused_adamw
