// rl_divide / rl_multiply: per-voxel math of the fused RL ratio and update (channel mean inside).
#pragma once

#include "rln_fast/common.h"

namespace rln_fast {

// x, e: [N, 1, S]; fp, bp: [N, C, S]; S = D * H * W. The channel mean is taken in the kernel so
// the C-channel projection is read once and never reduced into a separate tensor.
struct RlDivideParams {
  int64_t N = 0, C = 0, S = 0;
  double eps = 1e-4, scale = 1.0, shift = 0.0;
  bool paper = false;  // the released graph's surrogate gradient
};

struct RlMultiplyParams {
  int64_t N = 0, C = 0, S = 0;
  double offset = 0.0;
  bool paper = false;
};

template <typename T>
RLN_HD T channel_mean(const T* a, int64_t C, int64_t S, int64_t n, int64_t s) {
  const T* base = a + n * C * S + s;
  T sum = T(0);
  for (int64_t c = 0; c < C; ++c) sum += base[c * S];
  return sum / T(C);
}

template <typename T>
RLN_HD T rl_divide_out_at(const RlDivideParams& p, const T* x, const T* fp, int64_t n, int64_t s) {
  const T d = channel_mean(fp, p.C, p.S, n, s) + T(p.eps);
  return T(p.scale) * x[n * p.S + s] / d + T(p.shift);
}

// Gradients at one voxel; dx and dfp may be null when not needed.
template <typename T>
RLN_HD void rl_divide_grad_at(const RlDivideParams& p, const T* dy, const T* x, const T* fp, T* dx,
                              T* dfp, int64_t n, int64_t s) {
  const int64_t i = n * p.S + s;
  const T d = channel_mean(fp, p.C, p.S, n, s) + T(p.eps);
  const T g = T(p.scale) * dy[i];
  const T m = x[i] / d;
  if (dx) dx[i] = p.paper ? g : g / d;
  if (dfp) {
    // exact: d(x/d)/dd = -m/d; paper: -m^2. The channel mean spreads it by 1/C.
    const T gd = -(p.paper ? m * m : m / d) * g / T(p.C);
    for (int64_t c = 0; c < p.C; ++c) dfp[(n * p.C + c) * p.S + s] = gd;
  }
}

template <typename T>
RLN_HD T rl_multiply_out_at(const RlMultiplyParams& p, const T* e, const T* bp, int64_t n,
                            int64_t s) {
  return e[n * p.S + s] * (channel_mean(bp, p.C, p.S, n, s) + T(p.offset));
}

template <typename T>
RLN_HD void rl_multiply_grad_at(const RlMultiplyParams& p, const T* dy, const T* e, const T* bp,
                                T* de, T* dbp, int64_t n, int64_t s) {
  const int64_t i = n * p.S + s;
  if (de) de[i] = p.paper ? dy[i] : dy[i] * (channel_mean(bp, p.C, p.S, n, s) + T(p.offset));
  if (dbp) {
    const T g = dy[i] * e[i] / T(p.C);
    for (int64_t c = 0; c < p.C; ++c) dbp[(n * p.C + c) * p.S + s] = g;
  }
}

}  // namespace rln_fast
