// kernel_common.h: the load/convert/store half of the CPU kernels: 16-bit
// float conversions, the staging tiles that give the math loop float arrays,
// and the dispatch on storage dtypes. Included by csrc/cpu/adam_cpu.cpp and
// csrc/cpu/sgd_cpu.cpp only, which CMakeLists.txt compiles once per
// instruction set with -DFUSED_ADAMW_ISA=<base|avx2|avx512>.
//
// Everything here sits in fused_adamw::cpu::<isa> inside an unnamed namespace:
// internal linkage, so the AVX-512 copy of a helper can never be linked into
// the baseline path.
//
// Conversions round to nearest even (what torch's .to() does):
//   bfloat16: bit operations (the top half of a float32);
//   float16:  F16C / AVX-512F instructions where the copy is built with them,
//             else a software conversion for the baseline copy.
#pragma once

#if !defined(FUSED_ADAMW_ISA)
#error "kernel_common.h is for the per-ISA kernel files; CMakeLists.txt defines FUSED_ADAMW_ISA"
#endif

#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

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

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// ---------------------------------------------------------------- bfloat16

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  // Round to nearest even on the 16 dropped bits; a carry into the exponent
  // is the correct rounding up to the next binade (or to infinity).
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  // NaN stays NaN (rounding could carry it into infinity): keep the sign and
  // top payload bits and set the quiet bit.
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded);
}

// ---------------------------------------------------------------- float16 (software)

inline float half_to_float_soft(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;  // exponent and mantissa
  uint32_t bits;
  if (em >= 0x7C00u) {
    bits = 0x7F800000u | ((em & 0x03FFu) << 13);  // inf, NaN (payload kept)
  } else if (em >= 0x0400u) {
    bits = (em << 13) + ((127u - 15u) << 23);  // normal: rebias the exponent
  } else {
    // Zero or subnormal: em units of 2^-24, exact in float.
    bits = float_to_bits(static_cast<float>(em) * 5.9604644775390625e-8f);
  }
  return bits_to_float(bits | sign);
}

inline uint16_t float_to_half_soft(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x03FFu));
  // 65520 = 65504 + half an ulp: from there on, nearest-even is infinity.
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  if (a < 0x38800000u) {
    // Below the smallest normal half (2^-14): adding 0.5f makes the FPU round
    // to a multiple of 2^-24 (the ulp of floats in [0.5, 1)), nearest even;
    // the mantissa bits are then the subnormal half (0x400: the smallest
    // normal, also correct).
    const float t = bits_to_float(a) + 0.5f;
    return static_cast<uint16_t>(sign | (float_to_bits(t) - 0x3F000000u));
  }
  // Normal: rebias the exponent, round the 13 dropped bits to nearest even.
  const uint32_t r = a + (static_cast<uint32_t>(15 - 127) << 23) + 0x0FFFu + ((a >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

// ---------------------------------------------------------------- array conversions

inline void to_math(const BFloat16* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i].bits);
}

inline void from_math(const float* src, BFloat16* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i].bits = float_to_bf16(src[i]);
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

// Calls Fn::template run<P, S>(args...) with the storage types of the dtype
// codes; the binding has already rejected every other combination.
template <typename Fn, typename... Args>
void with_storage_types(DType param, DType state, Args&&... args) {
  const bool fp32_state = state == DType::kFloat32;
  switch (param) {
    case DType::kFloat32:
      return Fn::template run<float, float>(args...);
    case DType::kFloat64:
      return Fn::template run<double, double>(args...);
    case DType::kFloat16:
      return fp32_state ? Fn::template run<Half, float>(args...) : Fn::template run<Half, Half>(args...);
    case DType::kBFloat16:
      return fp32_state ? Fn::template run<BFloat16, float>(args...)
                        : Fn::template run<BFloat16, BFloat16>(args...);
  }
}

}  // namespace
}  // namespace FUSED_ADAMW_ISA
}  // namespace cpu
}  // namespace fused_adamw
