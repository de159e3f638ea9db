// conv3d: parameters and per-voxel math of the fused 3x3x3 conv (multi-input, bias, softplus, skip).
#pragma once

#include <cstddef>

#include "rln_fast/common.h"

namespace rln_fast {

constexpr int kMaxConvInputs = 4;  // RLN concatenates at most 3 tensors
constexpr int kConvK = 3;          // kernel side
constexpr int kConvTaps = 27;      // kConvK^3
constexpr int kConvBlockX = 32, kConvBlockY = 8;  // CUDA forward block: 32 x 8 (y, x) columns

// Geometry of one conv3d call. Inputs are several NCDHW tensors read as one channel-concatenated
// tensor, so RLN's torch.cat never happens.
struct Conv3dParams {
  int64_t N = 0, Cin = 0, Cout = 0, D = 0, H = 0, W = 0;
  int n_inputs = 0;
  int64_t in_channels[kMaxConvInputs] = {0, 0, 0, 0};  // channels of each input; they sum to Cin
  int act = kActNone;
  bool has_bias = false;
  bool has_skip = false;
};

template <typename T>
struct Conv3dPtrs {
  const T* in[kMaxConvInputs] = {nullptr, nullptr, nullptr, nullptr};  // each [N, Ci, D, H, W]
  const T* w = nullptr;       // [Cout, Cin, 3, 3, 3]
  const T* b = nullptr;       // [Cout] or null
  const T* skip = nullptr;    // [N, 1, D, H, W] or null
  T* out = nullptr;           // [N, Cout, D, H, W]
  T* preact = nullptr;        // [N, Cout, D, H, W] conv + bias before act, or null (not saved)
};

// The CUDA forward's register tile: each thread computes `zt` voxels along z for `cot` output
// channels. float64 takes half the z-depth of float32 so its accumulators fit the 128 registers
// that two resident 256-thread blocks leave each thread (no spills).
struct ConvTile {
  int cot, zt;
};

constexpr ConvTile conv3d_forward_tile(int64_t cout, size_t elem_size) {
  return elem_size > 4 ? (cout <= 4 ? ConvTile{4, 8} : ConvTile{8, 4})
                       : (cout <= 4 ? ConvTile{4, 16} : ConvTile{8, 8});
}

// Shared memory of one CUDA forward block: the weights [cin][27][cot] and two input tiles
// (32 x 8 columns plus a one-voxel halo, zt + 2 planes deep).
constexpr size_t conv3d_forward_smem_bytes(int64_t cin, ConvTile t, size_t elem_size) {
  return elem_size * (static_cast<size_t>(cin) * kConvTaps * static_cast<size_t>(t.cot) +
                      2 * static_cast<size_t>(t.zt + 2) * (kConvBlockY + 2) * (kConvBlockX + 2));
}

// The most input channels one forward launch may read within smem_limit bytes per block (0 when
// not even one fits). Calls with more run as several launches over chunks of input channels
// whose pre-activations are summed (the host-side fallback in csrc/torch/conv3d.cpp).
constexpr int64_t conv3d_max_cin_per_launch(int64_t cout, size_t elem_size, size_t smem_limit) {
  const ConvTile t = conv3d_forward_tile(cout, elem_size);
  const size_t fixed = conv3d_forward_smem_bytes(0, t, elem_size);
  const size_t per_channel = conv3d_forward_smem_bytes(1, t, elem_size) - fixed;
  return smem_limit < fixed ? 0 : static_cast<int64_t>((smem_limit - fixed) / per_channel);
}

// Value of concatenated input channel ci at (n, z, y, x), zero outside the volume.
template <typename T>
RLN_HD T conv3d_input_at(const Conv3dParams& p, const Conv3dPtrs<T>& q, int64_t n, int64_t ci,
                         int64_t z, int64_t y, int64_t x) {
  if (z < 0 || z >= p.D || y < 0 || y >= p.H || x < 0 || x >= p.W) return T(0);
  int t = 0;
  while (ci >= p.in_channels[t]) ci -= p.in_channels[t++];
  return q.in[t][(((n * p.in_channels[t] + ci) * p.D + z) * p.H + y) * p.W + x];
}

// conv + bias at one output voxel (before the activation).
template <typename T>
RLN_HD T conv3d_preact_at(const Conv3dParams& p, const Conv3dPtrs<T>& q, int64_t n, int64_t co,
                          int64_t z, int64_t y, int64_t x) {
  T acc = p.has_bias ? q.b[co] : T(0);
  for (int64_t ci = 0; ci < p.Cin; ++ci) {
    const T* w = q.w + (co * p.Cin + ci) * kConvTaps;
    for (int kz = 0; kz < kConvK; ++kz)
      for (int ky = 0; ky < kConvK; ++ky)
        for (int kx = 0; kx < kConvK; ++kx)
          acc += w[(kz * kConvK + ky) * kConvK + kx] *
                 conv3d_input_at(p, q, n, ci, z + kz - 1, y + ky - 1, x + kx - 1);
  }
  return acc;
}

// The full output: act(conv + bias) + softplus(skip).
template <typename T>
RLN_HD T conv3d_out_from_preact(const Conv3dParams& p, const Conv3dPtrs<T>& q, T pre, int64_t n,
                                int64_t z, int64_t y, int64_t x) {
  T v = apply_act(p.act, pre);
  if (p.has_skip) v += softplus(q.skip[((n * p.D + z) * p.H + y) * p.W + x]);
  return v;
}

template <typename T>
RLN_HD T conv3d_out_at(const Conv3dParams& p, const Conv3dPtrs<T>& q, int64_t n, int64_t co,
                       int64_t z, int64_t y, int64_t x) {
  return conv3d_out_from_preact(p, q, conv3d_preact_at(p, q, n, co, z, y, x), n, z, y, x);
}

// RL steps fused behind the conv (eval only): its channels reach only their mean, in registers.
enum RlEpilogue : int { kEpiNone = 0, kEpiDivide = 1, kEpiMultiply = 2 };

struct ConvRlParams {
  int mode = kEpiNone;
  double eps = 1e-4, scale = 1.0, shift = 0.0;  // divide: scale * a / (mean + eps) + shift
  double offset = 0.0;                           // multiply: a * (mean + offset)
};

template <typename T>
RLN_HD T rl_epilogue(const ConvRlParams& e, T mean, T a) {
  return e.mode == kEpiDivide ? T(e.scale) * a / (mean + T(e.eps)) + T(e.shift)
                              : a * (mean + T(e.offset));
}

// conv3d_rl_divide / conv3d_rl_multiply at one voxel: a is the [N, 1, D, H, W] operand; a null
// `a` reads as 1 (multiply then gives the plain channel mean + offset, RLN's output layer).
template <typename T>
RLN_HD T conv3d_rl_out_at(const Conv3dParams& p, const Conv3dPtrs<T>& q, const ConvRlParams& e,
                          const T* a, int64_t n, int64_t z, int64_t y, int64_t x) {
  T sum = T(0);
  for (int64_t co = 0; co < p.Cout; ++co) sum += conv3d_out_at(p, q, n, co, z, y, x);
  return rl_epilogue(e, sum / T(p.Cout), a ? a[((n * p.D + z) * p.H + y) * p.W + x] : T(1));
}

// Weight gradient at one tap: sum over n and voxels of dz[n, co] * x[n, ci] shifted by the tap.
template <typename T>
RLN_HD T conv3d_wgrad_at(const Conv3dParams& p, const Conv3dPtrs<T>& q, const T* dz, int64_t co,
                         int64_t ci, int tap) {
  const int kz = tap / 9, ky = (tap / 3) % 3, kx = tap % 3;
  T acc = T(0);
  for (int64_t n = 0; n < p.N; ++n)
    for (int64_t z = 0; z < p.D; ++z)
      for (int64_t y = 0; y < p.H; ++y)
        for (int64_t x = 0; x < p.W; ++x)
          acc += dz[(((n * p.Cout + co) * p.D + z) * p.H + y) * p.W + x] *
                 conv3d_input_at(p, q, n, ci, z + kz - 1, y + ky - 1, x + kx - 1);
  return acc;
}

}  // namespace rln_fast
