// adam_math.cpp: the cost of the Adam update's arithmetic alone, per element
// and core, with every operand in L1: fused_adamw::adam_update (update.h)
// over 1024-element float32 arrays, again and again, on one thread. The
// whole CPU step from memory can be no faster than this; README.md
// ("Speed of the options") compares the two.
//
//   g++ -O3 -fno-math-errno -fopenmp-simd -std=c++17 -mavx512f -mfma \
//       -I csrc/include benchmarks/micro/adam_math.cpp -o /tmp/adam_math && /tmp/adam_math
//
// (-mavx2 -mfma for the AVX2 copy; CMakeLists.txt gives the kernels these
// flags and a few more.) Not built by the package or CI. Prints ns per element with the grad-scale division
// (g / grad_scale, a run-time value as in the kernels) and without it.
#include <fused_adamw/update.h>

#include <chrono>
#include <cstdio>

namespace {

constexpr int kN = 1024;
constexpr int kRepeats = 200000;

template <bool kDivide>
__attribute__((noinline)) void update(const fused_adamw::AdamScalars<float>& s0, float grad_scale,
                                      float* __restrict__ p, const float* __restrict__ g,
                                      float* __restrict__ m, float* __restrict__ v) {
  const fused_adamw::AdamScalars<float> s = s0;
#pragma omp simd
  for (int i = 0; i < kN; ++i) {
    float pi = p[i], mi = m[i], vi = v[i], unused = 0.f;
    fused_adamw::adam_update(pi, g[i], mi, vi, unused, kDivide ? grad_scale : 1.f, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

template <bool kDivide>
double ns_per_element(const fused_adamw::AdamScalars<float>& s, float grad_scale) {
  alignas(64) static float p[kN], g[kN], m[kN], v[kN];
  for (int i = 0; i < kN; ++i) {
    // No zero grads: the moments of a zero grad decay into subnormals,
    // which would time the subnormal path instead.
    p[i] = 0.5f + 1e-3f * i;
    g[i] = 0.01f * (1 + i % 7);
    m[i] = 1e-3f;
    v[i] = 1e-4f;
  }
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < kRepeats; ++r) update<kDivide>(s, grad_scale, p, g, m, v);
  const auto t1 = std::chrono::steady_clock::now();
  std::printf("  (checksum %g)\n", p[kN / 2] + m[1] + v[2]);
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / (double(kRepeats) * kN);
}

}  // namespace

int main() {
  fused_adamw::AdamHyper h;
  h.beta1 = 0.9;
  h.beta2 = 0.999;
  h.eps = 1e-8;
  h.weight_decay = 0.01;
  h.decay_coeff = 0.01;
  h.decoupled = true;
  const auto s = fused_adamw::resolve_adam<float>(h, 1e-3, 10.0);
  volatile float one = 1.f;  // a value the compiler cannot see, as in the kernels
  const double with_division = ns_per_element<true>(s, one);
  const double without = ns_per_element<false>(s, one);
  std::printf("adam_update, float32, L1, one core: %.3f ns/element with g / grad_scale, %.3f without\n",
              with_division, without);
  return 0;
}
