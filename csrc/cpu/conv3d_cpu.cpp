// conv3d on the CPU: register-blocked rows over a zero-padded input (forward, weight grad), act backward.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "parallel.h"
#include "rln_fast/kernels_cpu.h"
#include "simd.h"

namespace rln_fast {
namespace cpu {
namespace {

// Register blocking: CB output channels x NV vectors along x accumulate in registers. Measured
// on AVX-512 (16->8 channels, 64x128x128, one thread): CB=8, NV=2 gives 53 GFLOP/s, CB=4, NV=4
// 37; CB=4 keeps Cout <= 4 layers from computing zeros.
#if defined(__AVX512F__)
constexpr int kNarrowXVecs = 4, kWideXVecs = 2;  // 16 accumulators of the 32 zmm registers
#else
constexpr int kNarrowXVecs = 2, kWideXVecs = 1;  // 8 accumulators of the 16 ymm registers
#endif

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The channel-concatenated input, each row with one zero in front and zeros behind up to a whole
// number of x blocks plus one: every shifted vector load stays in bounds and x padding costs nothing.
template <typename T>
struct PaddedInput {
  int64_t Wp = 0;
  std::unique_ptr<T[]> data;  // [N, Cin, D, H, Wp]
  const T* row(const Conv3dParams& p, int64_t n, int64_t ci, int64_t z, int64_t y) const {
    return data.get() + (((n * p.Cin + ci) * p.D + z) * p.H + y) * Wp;
  }
};

template <typename T>
PaddedInput<T> pad_input(const Conv3dParams& p, const Conv3dPtrs<T>& q, int64_t xblock) {
  PaddedInput<T> pi;
  pi.Wp = round_up(p.W, xblock) + 2;
  pi.data.reset(new T[p.N * p.Cin * p.D * p.H * pi.Wp]);
  std::vector<int> tensor_of(p.Cin);
  std::vector<int64_t> channel_of(p.Cin);
  for (int64_t ci = 0, t = 0, c = 0; ci < p.Cin; ++ci, ++c) {
    while (c >= p.in_channels[t]) c -= p.in_channels[t++];
    tensor_of[ci] = static_cast<int>(t);
    channel_of[ci] = c;
  }
  const int64_t rows_per_channel = p.D * p.H;
  parallel_for(p.N * p.Cin, [&](int64_t nc) {
    const int64_t n = nc / p.Cin, ci = nc % p.Cin;
    const int t = tensor_of[ci];
    const T* src = q.in[t] + (n * p.in_channels[t] + channel_of[ci]) * rows_per_channel * p.W;
    T* dst = pi.data.get() + nc * rows_per_channel * pi.Wp;
    for (int64_t r = 0; r < rows_per_channel; ++r, src += p.W, dst += pi.Wp) {
      dst[0] = T(0);
      std::memcpy(dst + 1, src, sizeof(T) * p.W);
      std::fill(dst + 1 + p.W, dst + pi.Wp, T(0));
    }
  });
  return pi;
}

// kEpi == kEpiNone writes every channel; otherwise only the RL epilogue of their mean reaches
// q.out ([N, 1, D, H, W]), with `a` its second operand.
template <typename T, int kCoBlock, int kXVecs, int kEpi>
void conv3d_forward_blocked(const Conv3dParams& p, const Conv3dPtrs<T>& q,
                            const ConvRlParams& e = {}, const T* a = nullptr) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::L, XB = L * kXVecs;
  const PaddedInput<T> xp = pad_input(p, q, XB);
  const int64_t Wb = round_up(p.W, XB), cpad = round_up(p.Cout, kCoBlock);
  // wt[ci][tap][co]: the kCoBlock weights of one tap are adjacent; zero beyond Cout.
  std::vector<T> wt(p.Cin * kConvTaps * cpad, T(0));
  for (int64_t co = 0; co < p.Cout; ++co)
    for (int64_t ci = 0; ci < p.Cin; ++ci)
      for (int tap = 0; tap < kConvTaps; ++tap)
        wt[(ci * kConvTaps + tap) * cpad + co] = q.w[(co * p.Cin + ci) * kConvTaps + tap];

  parallel_for(p.N * p.D * p.H, [&](int64_t r) {
    const int64_t y = r % p.H, z = (r / p.H) % p.D, n = r / (p.H * p.D);
    alignas(64) T tmp[kCoBlock][XB];
    const int64_t row_off = ((n * p.D + z) * p.H + y) * p.W;  // voxel offset of this row
    std::vector<T> sk(p.has_skip ? p.W : 0);
    if (p.has_skip) softplus_n(q.skip + row_off, sk.data(), p.W);
    std::vector<T> msum(kEpi != kEpiNone ? p.W : 0, T(0)), act(kEpi != kEpiNone ? XB : 0);
    for (int64_t cg = 0; cg < cpad; cg += kCoBlock) {
      for (int64_t xb = 0; xb < Wb; xb += XB) {
        V acc[kCoBlock][kXVecs];
        for (int c = 0; c < kCoBlock; ++c) {
          const T b = (p.has_bias && cg + c < p.Cout) ? q.b[cg + c] : T(0);
          for (int j = 0; j < kXVecs; ++j) acc[c][j] = S::splat(b);
        }
        for (int64_t ci = 0; ci < p.Cin; ++ci) {
          for (int kz = 0; kz < kConvK; ++kz) {
            const int64_t zz = z + kz - 1;
            if (zz < 0 || zz >= p.D) continue;
            for (int ky = 0; ky < kConvK; ++ky) {
              const int64_t yy = y + ky - 1;
              if (yy < 0 || yy >= p.H) continue;
              const T* row = xp.row(p, n, ci, zz, yy) + xb;
              const T* wr = wt.data() + (ci * kConvTaps + kz * 9 + ky * 3) * cpad + cg;
              for (int kx = 0; kx < kConvK; ++kx) {
                V v[kXVecs];
                for (int j = 0; j < kXVecs; ++j) v[j] = S::load(row + kx + j * L);
                for (int c = 0; c < kCoBlock; ++c) {
                  const V wv = S::splat(wr[kx * cpad + c]);
                  for (int j = 0; j < kXVecs; ++j) acc[c][j] += wv * v[j];
                }
              }
            }
          }
        }
        for (int c = 0; c < kCoBlock; ++c)
          for (int j = 0; j < kXVecs; ++j) S::store(&tmp[c][j * L], acc[c][j]);
        const int64_t xn = std::min<int64_t>(XB, p.W - xb);
        if constexpr (kEpi != kEpiNone) {
          for (int c = 0; c < kCoBlock && cg + c < p.Cout; ++c) {
            if (p.act == kActSoftplus)
              softplus_n(tmp[c], act.data(), xn);
            else
              std::memcpy(act.data(), tmp[c], sizeof(T) * xn);
            for (int64_t x = 0; x < xn; ++x) msum[xb + x] += act[x];
          }
        } else {
          for (int c = 0; c < kCoBlock && cg + c < p.Cout; ++c) {
            const int64_t o = (((n * p.Cout + cg + c) * p.D + z) * p.H + y) * p.W + xb;
            if (q.preact) std::memcpy(q.preact + o, tmp[c], sizeof(T) * xn);
            T* dst = q.out + o;
            if (p.act == kActSoftplus)
              softplus_n(tmp[c], dst, xn);
            else
              std::memcpy(dst, tmp[c], sizeof(T) * xn);
            if (p.has_skip)
              for (int64_t x = 0; x < xn; ++x) dst[x] += sk[xb + x];
          }
        }
      }
    }
    if constexpr (kEpi != kEpiNone) {
      for (int64_t x = 0; x < p.W; ++x) {
        const T m = msum[x] / T(p.Cout) + (p.has_skip ? sk[x] : T(0));
        q.out[row_off + x] = rl_epilogue(e, m, a ? a[row_off + x] : T(1));
      }
    }
  });
}

}  // namespace

template <typename T>
void conv3d_forward(const Conv3dParams& p, const Conv3dPtrs<T>& q) {
  if (p.N * p.Cout * p.D * p.H * p.W == 0) return;
  if (p.Cout <= 4)
    conv3d_forward_blocked<T, 4, kNarrowXVecs, kEpiNone>(p, q);
  else
    conv3d_forward_blocked<T, 8, kWideXVecs, kEpiNone>(p, q);
}

template <typename T>
void conv3d_rl_forward(const Conv3dParams& p, const Conv3dPtrs<T>& q, const ConvRlParams& e,
                       const T* a) {
  if (p.N * p.D * p.H * p.W == 0) return;
  const bool narrow = p.Cout <= 4;
  if (e.mode == kEpiDivide) {
    if (narrow)
      conv3d_forward_blocked<T, 4, kNarrowXVecs, kEpiDivide>(p, q, e, a);
    else
      conv3d_forward_blocked<T, 8, kWideXVecs, kEpiDivide>(p, q, e, a);
  } else {
    if (narrow)
      conv3d_forward_blocked<T, 4, kNarrowXVecs, kEpiMultiply>(p, q, e, a);
    else
      conv3d_forward_blocked<T, 8, kWideXVecs, kEpiMultiply>(p, q, e, a);
  }
}

template <typename T>
void conv3d_act_backward(const Conv3dParams& p, const T* dy, const T* preact, const T* skip, T* dz,
                         T* dskip) {
  constexpr int64_t kChunk = 4096;
  const int64_t S = p.D * p.H * p.W, chunks = (S + kChunk - 1) / kChunk;
  parallel_for(p.N * chunks, [&](int64_t task) {
    const int64_t n = task / chunks, b = (task % chunks) * kChunk, len = std::min(kChunk, S - b);
    std::vector<T> g(len), sum(dskip ? len : 0, T(0));
    for (int64_t co = 0; co < p.Cout; ++co) {
      const int64_t o = (n * p.Cout + co) * S + b;
      if (p.act == kActSoftplus) {
        sigmoid_n(preact + o, g.data(), len);
        for (int64_t i = 0; i < len; ++i) dz[o + i] = dy[o + i] * g[i];
      } else {
        std::memcpy(dz + o, dy + o, sizeof(T) * len);
      }
      if (dskip)
        for (int64_t i = 0; i < len; ++i) sum[i] += dy[o + i];
    }
    if (dskip) {
      sigmoid_n(skip + n * S + b, g.data(), len);
      for (int64_t i = 0; i < len; ++i) dskip[n * S + b + i] = g[i] * sum[i];
    }
  });
}

// Weight gradient. A task owns one input channel, kWgCo output channels and a range of z planes;
// per row and (kz, ky) it keeps kWgCo x 3 (kx) accumulators in registers, so each shifted input
// vector feeds kWgCo FMAs and each dz vector 3. Sums go to double once per plane; tasks are
// summed in a fixed order, so the result does not depend on the thread count.
template <typename T>
void conv3d_wgrad(const Conv3dParams& p, const Conv3dPtrs<T>& q, const T* dz, T* dw) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = S::L, kWgCo = 4;
  const int64_t total = p.Cout * p.Cin * kConvTaps;
  if (p.N * p.D * p.H * p.W == 0) {
    std::fill(dw, dw + total, T(0));
    return;
  }
  const PaddedInput<T> xp = pad_input(p, q, L);
  const int64_t Wv = p.W / L * L, groups = (p.Cout + kWgCo - 1) / kWgCo;
  const int64_t planes = p.N * p.D;
  const int64_t chunks = std::min<int64_t>(planes, std::max<int64_t>(1, 16 / (p.Cin * groups) + 1));
  const int64_t tasks = p.Cin * groups * chunks;
  std::vector<double> part(tasks * kWgCo * kConvTaps, 0.0);
  parallel_for(tasks, [&](int64_t task) {
    const int64_t chunk = task % chunks, cg = (task / chunks) % groups, ci = task / (chunks * groups);
    const int nco = static_cast<int>(std::min<int64_t>(kWgCo, p.Cout - cg * kWgCo));
    double* acc = part.data() + task * kWgCo * kConvTaps;  // [kWgCo][27]
    const int64_t pb = planes * chunk / chunks, pe = planes * (chunk + 1) / chunks;
    for (int64_t plane = pb; plane < pe; ++plane) {
      const int64_t n = plane / p.D, z = plane % p.D;
      // Vector sums over one plane (in T), folded into double once per plane.
      V pv[kWgCo][kConvTaps] = {};
      T pt[kWgCo][kConvTaps] = {};
      for (int64_t y = 0; y < p.H; ++y) {
        const T* d[kWgCo];
        for (int c = 0; c < kWgCo; ++c)  // rows past Cout repeat the last one; never summed
          d[c] = dz + (((n * p.Cout + cg * kWgCo + std::min(c, nco - 1)) * p.D + z) * p.H + y) * p.W;
        for (int kz = 0; kz < kConvK; ++kz) {
          const int64_t zz = z + kz - 1;
          if (zz < 0 || zz >= p.D) continue;
          for (int ky = 0; ky < kConvK; ++ky) {
            const int64_t yy = y + ky - 1;
            if (yy < 0 || yy >= p.H) continue;
            const T* row = xp.row(p, n, ci, zz, yy);
            V a[kWgCo][kConvK] = {};
            T tail[kWgCo][kConvK] = {};
            for (int64_t x = 0; x < Wv; x += L) {
              V dv[kWgCo];
              for (int c = 0; c < kWgCo; ++c) dv[c] = S::load(d[c] + x);
              for (int kx = 0; kx < kConvK; ++kx) {
                const V xv = S::load(row + x + kx);
                for (int c = 0; c < kWgCo; ++c) a[c][kx] += dv[c] * xv;
              }
            }
            for (int64_t x = Wv; x < p.W; ++x)
              for (int kx = 0; kx < kConvK; ++kx)
                for (int c = 0; c < kWgCo; ++c) tail[c][kx] += d[c][x] * row[x + kx];
            for (int c = 0; c < kWgCo; ++c)
              for (int kx = 0; kx < kConvK; ++kx) {
                pv[c][kz * 9 + ky * 3 + kx] += a[c][kx];
                pt[c][kz * 9 + ky * 3 + kx] += tail[c][kx];
              }
          }
        }
      }
      for (int c = 0; c < nco; ++c)
        for (int t = 0; t < kConvTaps; ++t) {
          double sum = pt[c][t];
          for (int l = 0; l < L; ++l) sum += pv[c][t][l];
          acc[c * kConvTaps + t] += sum;
        }
    }
  });
  for (int64_t co = 0; co < p.Cout; ++co)
    for (int64_t ci = 0; ci < p.Cin; ++ci)
      for (int t = 0; t < kConvTaps; ++t) {
        const int64_t cg = co / kWgCo, c = co % kWgCo;
        double sum = 0.0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk)
          sum += part[((ci * groups + cg) * chunks + chunk) * kWgCo * kConvTaps + c * kConvTaps + t];
        dw[(co * p.Cin + ci) * kConvTaps + t] = static_cast<T>(sum);
      }
}

#define RLN_FAST_INSTANTIATE(T)                                                                    \
  template void conv3d_forward<T>(const Conv3dParams&, const Conv3dPtrs<T>&);                     \
  template void conv3d_rl_forward<T>(const Conv3dParams&, const Conv3dPtrs<T>&,                   \
                                     const ConvRlParams&, const T*);                              \
  template void conv3d_act_backward<T>(const Conv3dParams&, const T*, const T*, const T*, T*, T*); \
  template void conv3d_wgrad<T>(const Conv3dParams&, const Conv3dPtrs<T>&, const T*, T*);
RLN_FAST_INSTANTIATE(float)
RLN_FAST_INSTANTIATE(double)
#undef RLN_FAST_INSTANTIATE

}  // namespace cpu
}  // namespace rln_fast
