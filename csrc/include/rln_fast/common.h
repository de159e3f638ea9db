// Host/device helpers shared by the CPU and CUDA kernels: RLN_HD, activations, limits. No torch here.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define RLN_HD __host__ __device__ __forceinline__
#else
#define RLN_HD inline
#endif

namespace rln_fast {

// Activation applied after the conv's bias; values match the Python-side names.
enum Act : int { kActNone = 0, kActSoftplus = 1 };

// Overloads so one template serves float and double on host and device.
RLN_HD float rf_exp(float x) { return expf(x); }
RLN_HD double rf_exp(double x) { return exp(x); }
RLN_HD float rf_log1p(float x) { return log1pf(x); }
RLN_HD double rf_log1p(double x) { return log1p(x); }

// log(1 + exp(x)) without overflow for any x.
template <typename T>
RLN_HD T softplus(T x) {
  const T ax = x < T(0) ? -x : x;
  return (x > T(0) ? x : T(0)) + rf_log1p(rf_exp(-ax));
}

// d softplus / dx = 1 / (1 + exp(-x)), evaluated without overflow.
template <typename T>
RLN_HD T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + rf_exp(-x));
  const T e = rf_exp(x);
  return e / (T(1) + e);
}

template <typename T>
RLN_HD T apply_act(int act, T z) {
  return act == kActSoftplus ? softplus(z) : z;
}

template <typename T>
RLN_HD T act_grad(int act, T z) {
  return act == kActSoftplus ? sigmoid(z) : T(1);
}

}  // namespace rln_fast
