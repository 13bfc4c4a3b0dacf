// kernel_common.h: the load/convert/store half of the CPU kernels: 16-bit
// float conversions, the staging tiles that give the math loop float arrays,
// the store passes of the precision modes (stochastic rounding with a
// vectorised Philox, Kahan summation; rounding.h has the per-element rules)
// and the dispatch on storage dtypes and modes. Included by
// csrc/cpu/adam_cpu.cpp and csrc/cpu/sgd_cpu.cpp only, which CMakeLists.txt
// compiles once per instruction set with -DFUSED_ADAMW_ISA=<base|avx2|avx512>.
//
// Everything here sits in fused_adamw::cpu::<isa> inside an unnamed namespace:
// internal linkage, so the AVX-512 copy of a helper can never be linked into
// the baseline path.
//
// Conversions of the math loop's results round to nearest even (what
// torch's .to() does) unless a precision mode says otherwise:
//   bfloat16: bit operations (the top half of a float32);
//   float16:  F16C / AVX-512F instructions where the copy is built with them,
//             else a software conversion for the baseline copy.
#pragma once

#if !defined(FUSED_ADAMW_ISA)
#error "kernel_common.h is for the per-ISA kernel files; CMakeLists.txt defines FUSED_ADAMW_ISA"
#endif

#include <cstdint>
#include <type_traits>

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <fused_adamw/rounding.h>

#include "cpu_common.h"

namespace fused_adamw {
namespace cpu {
namespace FUSED_ADAMW_ISA {
namespace {

// Storage types of the 16-bit dtypes: raw bits, converted explicitly.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};
static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "16-bit storage types must be 2 bytes");

template <typename T>
using math_t = typename fused_adamw::MathOf<T>::type;

template <typename T>
inline T* at(int64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

// ---------------------------------------------------------------- scalar conversions

// The portable conversions and stochastic rounding live in
// fused_adamw/rounding.h (shared with the CUDA kernels). They are inline
// functions of namespace fused_adamw, so every ISA object may emit a copy;
// the kernels call them only from [[gnu::flatten]] segment functions, which
// inline them (see cpu_common.h).
using fused_adamw::bf16_to_float;
using fused_adamw::float_to_bf16_rn;

inline float half_to_float_soft(uint16_t h) { return fused_adamw::fp16_to_float(h); }
inline uint16_t float_to_half_soft(float f) { return fused_adamw::float_to_fp16_rn(f); }

// ---------------------------------------------------------------- array conversions

inline void to_math(const BFloat16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i].bits);
}

inline void from_math(const float* src, BFloat16* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i].bits = float_to_bf16_rn(src[i]);
}

inline void to_math(const Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].bits);
#else
  for (; i < n; ++i) dst[i] = half_to_float_soft(src[i].bits);
#endif
}

inline void from_math(const float* src, Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i].bits = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  for (; i < n; ++i) dst[i].bits = float_to_half_soft(src[i]);
#endif
}

// ---------------------------------------------------------------- staging tiles

// Elements staged at a time for 16-bit storage: five float tiles of 4 KB stay
// in L1 while the math loop runs over them.
constexpr int64_t kTile = 1024;

// Tile<T>: presents n elements of T storage at src as an array of math_t<T>.
// For float32/float64 storage that is the memory itself (no copy); 16-bit
// storage is converted into a float buffer on view() and back on store().
// target() is view() for an array that is written before it is read.
template <typename T>
struct Tile {
  alignas(64) float buf[kTile];
  float* view(const T* src, int64_t n) {
    to_math(src, buf, n);
    return buf;
  }
  float* target(T*) { return buf; }
  void store(T* dst, int64_t n) const { from_math(buf, dst, n); }
};

template <>
struct Tile<float> {
  float* view(const float* src, int64_t) const { return const_cast<float*>(src); }
  float* target(float* dst) const { return dst; }
  void store(float*, int64_t) const {}
};

template <>
struct Tile<double> {
  double* view(const double* src, int64_t) const { return const_cast<double*>(src); }
  double* target(double* dst) const { return dst; }
  void store(double*, int64_t) const {}
};

// ---------------------------------------------------------------- precision modes

// The rounding.h format of a 16-bit storage type.
template <typename T>
struct FormatOf;
template <>
struct FormatOf<BFloat16> {
  using type = fused_adamw::Bf16Format;
};
template <>
struct FormatOf<Half> {
  using type = fused_adamw::Fp16Format;
};

template <typename T>
constexpr bool kSixteenBit = std::is_same<T, Half>::value || std::is_same<T, BFloat16>::value;

// The generator's counter words of one tensor at this step (precision 2):
// element e's words are element_words(seed, step, index, e).
struct Stream {
  uint64_t seed;
  uint32_t step;   // the tensor's step after this call's increment
  uint32_t index;  // the table's INDEX column
};

// ---------------------------------------------------------------- Philox, many lanes at a time

// The words of elements e0 .. e0 + n - 1 (n <= kTile) of a tensor, into
// w[0..3] (w[k] may be null: word k is not stored). The same bits as
// rounding.h's element_words, which is the scalar tail and the baseline
// copy's loop. Why intrinsics: each round needs the high and low halves of
// two 32x32 -> 64-bit products per element, and vpmuludq multiplies the low
// halves of 64-bit lanes only. GCC's vectorisation of element_words (widening
// to 64-bit lanes and narrowing back every round) ran 4.9 ns/element on this
// machine's AVX-512 and 8.9 on AVX2; the forms below run 1.5 and 4.1 (/tmp
// micro-benchmark, 1024-element tiles, one core).
inline void philox_words(const Stream& rng, int64_t e0, int64_t n, uint32_t* const* w) {
  int64_t i = 0;
  const uint32_t key0 = static_cast<uint32_t>(rng.seed);
  const uint32_t key1 = static_cast<uint32_t>(rng.seed >> 32);
  // Counter word 1 (e >> 32) is one value across the tile, except where the
  // tile crosses a multiple of 2^32 elements (the scalar loop takes that one).
  const uint64_t e_hi = static_cast<uint64_t>(e0) >> 32;
  const bool one_hi = e_hi == (static_cast<uint64_t>(e0 + n - 1) >> 32);
#if defined(__AVX512F__)
  if (one_hi) {
    // Each counter word in the low half of a 64-bit lane, 8 elements per
    // register, two registers (a, b) for 16 elements. The high halves carry
    // junk (the products' high words) that no step reads: vpmuludq ignores
    // them and the final vpmovqd drops them. No shuffles or blends, 12% faster
    // than 16 lanes per register with them (1.54 against 1.74 ns/element).
    const __m512i m0 = _mm512_set1_epi64(fused_adamw::kPhiloxM0);
    const __m512i m1 = _mm512_set1_epi64(fused_adamw::kPhiloxM1);
    const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i eight = _mm512_set1_epi64(8);
    for (; i + 16 <= n; i += 16) {
      __m512i a0 = _mm512_add_epi64(_mm512_set1_epi64(static_cast<uint32_t>(e0 + i)), iota);
      __m512i b0 = _mm512_add_epi64(a0, eight);  // the low word of e0 + i + 15 does not wrap (one_hi)
      __m512i a1 = _mm512_set1_epi64(static_cast<int64_t>(e_hi)), b1 = a1;
      __m512i a2 = _mm512_set1_epi64(rng.index), b2 = a2;
      __m512i a3 = _mm512_set1_epi64(rng.step), b3 = a3;
      uint32_t k0 = key0, k1 = key1;
      for (int r = 0; r < fused_adamw::kPhiloxRounds; ++r) {
        const __m512i kk0 = _mm512_set1_epi64(k0), kk1 = _mm512_set1_epi64(k1);
        const __m512i pa0 = _mm512_mul_epu32(a0, m0), pa1 = _mm512_mul_epu32(a2, m1);
        const __m512i pb0 = _mm512_mul_epu32(b0, m0), pb1 = _mm512_mul_epu32(b2, m1);
        // 0x96: three-way xor
        a0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa1, 32), a1, kk0, 0x96);
        a2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa0, 32), a3, kk1, 0x96);
        b0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb1, 32), b1, kk0, 0x96);
        b2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb0, 32), b3, kk1, 0x96);
        a1 = pa1;  // the low words are the products' low halves
        a3 = pa0;
        b1 = pb1;
        b3 = pb0;
        k0 += fused_adamw::kPhiloxW0;
        k1 += fused_adamw::kPhiloxW1;
      }
      const __m512i out_a[4] = {a0, a1, a2, a3};
      const __m512i out_b[4] = {b0, b1, b2, b3};
      for (int k = 0; k < 4; ++k) {
        if (!w[k]) continue;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[k] + i), _mm512_cvtepi64_epi32(out_a[k]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[k] + i + 8), _mm512_cvtepi64_epi32(out_b[k]));
      }
    }
  }
#elif defined(__AVX2__)
  if (one_hi) {
    // 8 lanes per register; odd lanes' products from the counter with its
    // odd lanes moved down (vpshufd), then each half blended back into its lane.
    const __m256i m0 = _mm256_set1_epi64x(fused_adamw::kPhiloxM0);
    const __m256i m1 = _mm256_set1_epi64x(fused_adamw::kPhiloxM1);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; i + 8 <= n; i += 8) {
      __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(e0 + i))), iota);
      __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(e_hi)));
      __m256i c2 = _mm256_set1_epi32(static_cast<int>(rng.index));
      __m256i c3 = _mm256_set1_epi32(static_cast<int>(rng.step));
      uint32_t k0 = key0, k1 = key1;
      for (int r = 0; r < fused_adamw::kPhiloxRounds; ++r) {
        const __m256i even0 = _mm256_mul_epu32(c0, m0);
        const __m256i odd0 = _mm256_mul_epu32(_mm256_shuffle_epi32(c0, 0xF5), m0);
        const __m256i even1 = _mm256_mul_epu32(c2, m1);
        const __m256i odd1 = _mm256_mul_epu32(_mm256_shuffle_epi32(c2, 0xF5), m1);
        const __m256i hi0 = _mm256_blend_epi32(_mm256_shuffle_epi32(even0, 0xF5), odd0, 0xAA);
        const __m256i lo0 = _mm256_blend_epi32(even0, _mm256_shuffle_epi32(odd0, 0xA0), 0xAA);
        const __m256i hi1 = _mm256_blend_epi32(_mm256_shuffle_epi32(even1, 0xF5), odd1, 0xAA);
        const __m256i lo1 = _mm256_blend_epi32(even1, _mm256_shuffle_epi32(odd1, 0xA0), 0xAA);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
        c1 = lo1;
        c3 = lo0;
        k0 += fused_adamw::kPhiloxW0;
        k1 += fused_adamw::kPhiloxW1;
      }
      if (w[0]) _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[0] + i), c0);
      if (w[1]) _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[1] + i), c1);
      if (w[2]) _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[2] + i), c2);
      if (w[3]) _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[3] + i), c3);
    }
  }
#else
  (void)one_hi;
#endif
  uint32_t* const w0 = w[0];
  uint32_t* const w1 = w[1];
  uint32_t* const w2 = w[2];
  uint32_t* const w3 = w[3];
  // The baseline copy (SSE2's pmuludq) and the tails: GCC vectorises this loop.
#pragma omp simd
  for (int64_t j = i; j < n; ++j) {
    const fused_adamw::PhiloxWords words =
        fused_adamw::element_words(rng.seed, rng.step, rng.index, static_cast<uint64_t>(e0 + j));
    if (w0) w0[j] = words.w0;
    if (w1) w1[j] = words.w1;
    if (w2) w2[j] = words.w2;
    if (w3) w3[j] = words.w3;
  }
}

// The stochastic-rounding store of one tile (precision 2): elements e0 ..
// e0 + n - 1 of the tensor. One Philox block per element rounds the param
// (word 0) and the 16-bit state arrays (words 1, 2, 3: exp_avg or
// momentum_buffer, exp_avg_sq, max_exp_avg_sq). kStates: how many state
// arrays are 16-bit and stored here (0 when the state is float32: the math
// loop wrote it in place). The words go through a 4 KB array per word (L1).
template <typename P, typename S, int kStates>
struct StochasticTile {
  alignas(64) uint32_t words[1 + kStates][kTile];
  void store(const Stream& rng, int64_t e0, int64_t n, const float* __restrict__ x, P* __restrict__ param,
             const float* __restrict__ x1, S* __restrict__ s1, const float* __restrict__ x2, S* __restrict__ s2,
             const float* __restrict__ x3, S* __restrict__ s3) {
    uint32_t* w[4] = {words[0], nullptr, nullptr, nullptr};
    for (int k = 1; k <= kStates; ++k) w[k] = words[k];
    philox_words(rng, e0, n, w);
    using FP = typename FormatOf<P>::type;
    const uint32_t* __restrict__ w0 = words[0];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) param[i].bits = FP::stochastic(x[i], w0[i]);
    if constexpr (kStates >= 1) {
      using FS = typename FormatOf<S>::type;
      const uint32_t* __restrict__ w1 = words[1];
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) s1[i].bits = FS::stochastic(x1[i], w1[i]);
      if constexpr (kStates >= 2) {
        const uint32_t* __restrict__ w2 = words[2];
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) s2[i].bits = FS::stochastic(x2[i], w2[i]);
      }
      if constexpr (kStates >= 3) {
        const uint32_t* __restrict__ w3 = words[3];
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) s3[i].bits = FS::stochastic(x3[i], w3[i]);
      }
    }
  }
};

// The Kahan-summation store of one tile (precision 3; rounding.h
// kahan_update): param still holds the old values, x the updated ones (it
// is overwritten), comp the stored compensation. Whole-tile passes, so the
// float16 conversions use F16C where the copy has it.
template <typename P>
struct KahanTile {
  alignas(64) float old[kTile];
  alignas(64) float u[kTile];
  void store(float* __restrict__ x, P* __restrict__ param, P* __restrict__ comp, int64_t n) {
    if constexpr (std::is_same<P, BFloat16>::value) {
      // bfloat16's conversions are integer operations: one loop, no passes
      // (the whole bf16 Adam step with Kahan: 1.65 -> 1.52 ns/element, in
      // cache, one core).
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const float o = bf16_to_float(param[i].bits);
        const float u_i = fused_adamw::kahan_update(o, x[i], bf16_to_float(comp[i].bits));
        const uint16_t pn = float_to_bf16_rn(o + u_i);
        param[i].bits = pn;
        comp[i].bits = float_to_bf16_rn(fused_adamw::kahan_compensation(u_i, bf16_to_float(pn), o));
      }
      return;
    }
    to_math(param, old, n);
    to_math(comp, u, n);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      u[i] = fused_adamw::kahan_update(old[i], x[i], u[i]);
      x[i] = old[i] + u[i];
    }
    from_math(x, param, n);  // the new param: RN(old + u)
    to_math(param, x, n);    // ... and its value
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) u[i] = fused_adamw::kahan_compensation(u[i], x[i], old[i]);
    from_math(u, comp, n);
  }
};

// Stands in for a tile a mode does not use.
struct NoTile {};

// Calls Fn::template run<P, S>(args...) with the storage types of the dtype
// codes; the binding has already rejected every other combination.
template <typename Fn, typename... Args>
void with_storage_types(DType param, DType state, Args&&... args) {
  switch (param) {
    case DType::kFloat32:
      return state == DType::kBFloat16 ? Fn::template run<float, BFloat16>(args...)
                                       : Fn::template run<float, float>(args...);
    case DType::kFloat64:
      return Fn::template run<double, double>(args...);
    case DType::kFloat16:
      return state == DType::kFloat32    ? Fn::template run<Half, float>(args...)
             : state == DType::kBFloat16 ? Fn::template run<Half, BFloat16>(args...)
                                         : Fn::template run<Half, Half>(args...);
    case DType::kBFloat16:
      return state == DType::kFloat32 ? Fn::template run<BFloat16, float>(args...)
                                      : Fn::template run<BFloat16, BFloat16>(args...);
  }
}

// Calls Fn::template run<P, S, kMode>(args...) for the call's precision
// mode; only 16-bit params have modes other than round to nearest (the
// binding checked), so float32/float64 code is compiled once.
template <typename Fn, typename P, typename S, typename... Args>
void with_precision(fused_adamw::Precision precision, Args&&... args) {
  using fused_adamw::Precision;
  if constexpr (kSixteenBit<P>) {
    switch (precision) {
      case Precision::kMaster:
        return Fn::template run<P, S, Precision::kMaster>(args...);
      case Precision::kStochastic:
        return Fn::template run<P, S, Precision::kStochastic>(args...);
      case Precision::kKahan:
        return Fn::template run<P, S, Precision::kKahan>(args...);
      case Precision::kNearest:
        break;
    }
  }
  return Fn::template run<P, S, Precision::kNearest>(args...);
}

}  // namespace
}  // namespace FUSED_ADAMW_ISA
}  // namespace cpu
}  // namespace fused_adamw
