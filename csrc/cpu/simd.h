// Portable SIMD for the CPU kernels: GCC/Clang vector extensions sized to the build's widest ISA.
#pragma once

#include <cstdint>
#include <cstring>

#include "rln_fast/common.h"

namespace rln_fast {
namespace cpu {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#else
constexpr int kVecBytes = 32;  // AVX2; split into halves by the compiler on older targets
#endif

template <typename T>
struct Simd {
  static constexpr int L = kVecBytes / sizeof(T);
  typedef T V __attribute__((vector_size(kVecBytes)));
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static V splat(T s) { return V{} + s; }
};

typedef int32_t VI32 __attribute__((vector_size(kVecBytes)));
typedef Simd<float>::V VF;

// exp(a) for a in [-87, 0]: Cody-Waite reduction by ln 2 and a degree-7 polynomial (< 2 ulp).
inline VF exp_nonpos(VF a) {
  a = a < -87.0f ? Simd<float>::splat(-87.0f) : a;
  const VI32 n = __builtin_convertvector(a * 1.44269504088896341f - 0.5f, VI32);
  const VF nf = __builtin_convertvector(n, VF);
  const VF r = a - nf * 0.693145751953125f - nf * 1.428606765330187e-06f;
  VF p = 1.0f / 5040.0f + r * (1.0f / 40320.0f);
  p = 1.0f / 720.0f + r * p;
  p = 1.0f / 120.0f + r * p;
  p = 1.0f / 24.0f + r * p;
  p = 1.0f / 6.0f + r * p;
  p = 0.5f + r * p;
  p = 1.0f + r * p;
  p = 1.0f + r * p;
  return p * (VF)((n + 127) << 23);
}

inline VF abs_vec(VF x) { return (VF)((VI32)x & 0x7fffffff); }

// log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), the log1p by an atanh series (< 4 ulp).
inline VF softplus_vec(VF x) {
  const VF e = exp_nonpos(-abs_vec(x));  // (0, 1]
  const VF u = 1.0f + e;
  const VF corr = (e - (u - 1.0f)) / u;   // rounding lost in 1 + e
  const VI32 big = u > 1.41421356f;
  const VF m = big ? u * 0.5f : u;
  const VF k = big ? Simd<float>::splat(0.693147180559945f) : VF{};
  const VF f = m - 1.0f;
  const VF s = f / (2.0f + f);
  const VF s2 = s * s;
  VF q = 1.0f / 7.0f + s2 * (1.0f / 9.0f);
  q = 1.0f / 5.0f + s2 * q;
  q = 1.0f / 3.0f + s2 * q;
  q = 1.0f + s2 * q;
  const VF pos = x > 0.0f ? x : VF{};
  return pos + (k + 2.0f * s * q + corr);
}

// 1 / (1 + exp(-x)) without overflow.
inline VF sigmoid_vec(VF x) {
  const VF e = exp_nonpos(-abs_vec(x));
  const VF r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

// Elementwise softplus / sigmoid over n values: vectorised for float, exact libm for double.
inline void softplus_n(const float* x, float* y, int64_t n) {
  constexpr int L = Simd<float>::L;
  int64_t i = 0;
  for (; i + L <= n; i += L) Simd<float>::store(y + i, softplus_vec(Simd<float>::load(x + i)));
  for (; i < n; ++i) y[i] = softplus(x[i]);
}
inline void softplus_n(const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = softplus(x[i]);
}
inline void sigmoid_n(const float* x, float* y, int64_t n) {
  constexpr int L = Simd<float>::L;
  int64_t i = 0;
  for (; i + L <= n; i += L) Simd<float>::store(y + i, sigmoid_vec(Simd<float>::load(x + i)));
  for (; i < n; ++i) y[i] = sigmoid(x[i]);
}
inline void sigmoid_n(const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = sigmoid(x[i]);
}

}  // namespace cpu
}  // namespace rln_fast
