// Classic RL on the CPU: row loops over the per-voxel math of rl_classic.h; direct convs by rows.
#include <cmath>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "rln_fast/kernels_cpu.h"
#include "simd.h"

namespace rln_fast {
namespace cpu {
namespace {

// Rows per parallel chunk: enough work per chunk to amortise the scheduling, and a fixed
// partition (not one per thread), so that the dot products are summed in the same order on any
// thread count.
int64_t row_grain(int64_t row_len, int64_t work_per_voxel) {
  const int64_t per_row = row_len * work_per_voxel;
  const int64_t g = (int64_t(1) << 15) / (per_row > 0 ? per_row : 1);
  return g > 0 ? g : 1;
}

// parallel_chunks, without an OpenMP region for a single chunk: a small volume does not wait on
// a thread team (milliseconds on a busy machine).
template <class F>
void for_chunks(int64_t n, int64_t grain, F&& f) {
  if (n <= grain) {
    FlushSubnormals guard;  // as in the threads of parallel_chunks: same result either way
    if (n > 0) f(int64_t(0), n);
    return;
  }
  parallel_chunks(n, grain, f);
}

// Sums per-chunk partial dot products in chunk order: deterministic on any thread count.
struct ChunkDots {
  std::vector<double> v;
  ChunkDots(int64_t rows, int64_t grain) : v(2 * ((rows + grain - 1) / grain + 1), 0.0) {}
  void store(int64_t begin_row, int64_t grain, double cross, double self) {
    v[2 * (begin_row / grain)] = cross;
    v[2 * (begin_row / grain) + 1] = self;
  }
  void finish(double* dots) const {
    double a = 0.0, b = 0.0;
    for (size_t i = 0; i < v.size(); i += 2) a += v[i], b += v[i + 1];
    if (dots) dots[0] = a, dots[1] = b;
  }
};

// The x range [lo, hi) whose tap range is the whole PSF row (the weights' interior along x): one
// run, found once per call; empty when there are no weights.
struct FullX {
  int64_t lo = 0, hi = 0;
};

FullX full_x_range(const RlUpdateParams& p) {
  FullX r;
  const EdgeWeights& e = p.weights;
  if (!e.table) return r;
  auto full = [&](int64_t x) {
    int64_t x0, x1;
    tap_range(e.bounds + 2 * (p.D + p.H + x), e.px, x0, x1);
    return x0 == 0 && x1 == e.px;
  };
  int64_t x = 0;
  while (x < p.W && !full(x)) ++x;
  r.lo = x;
  while (x < p.W && full(x)) ++x;
  r.hi = x;
  for (; x < p.W; ++x)
    if (full(x)) return FullX{};  // not one run: every x takes the per-voxel path
  return r;
}

// Per-chunk row scratch of the update: the row's weights (outside the full x range) and its one
// weight inside it, its TV factors, its partial box sums of the weight table, and a row of zeros
// (the neighbour row beyond a zero-padded face).
template <typename T>
struct RowScratch {
  std::vector<double> w, a;
  double w_full = 1.0;
  int64_t taps[4] = {-1, -1, -1, -1};  // the (z, y) tap ranges that w and w_full are for
  std::vector<T> f, zero;
  RowScratch(int64_t W, int64_t px) : w(W), a(px + 1), f(W), zero(W, T(0)) {}
};

// The row's weights, bit for bit those of edge_weight_at: the z and y tap ranges are the row's,
// so the 8-term box sum is a[x1] - a[x0] with a[c] = the 4 (z, y) corner terms at column c; the
// x in fx share w_full. A row depends on (z, y) only through their tap ranges, which stay the
// same over the image's interior: the scratch keeps the last row's weights and reuses them.
template <typename T>
void row_weights(const RlUpdateParams& p, int64_t z, int64_t y, const FullX& fx,
                 RowScratch<T>& scratch) {
  const EdgeWeights& e = p.weights;
  double* a = scratch.a.data();
  int64_t lz, hz, ly, hy;
  tap_range(e.bounds + 2 * z, e.pz, lz, hz);
  tap_range(e.bounds + 2 * (p.D + y), e.py, ly, hy);
  int64_t* taps = scratch.taps;
  if (taps[0] == lz && taps[1] == hz && taps[2] == ly && taps[3] == hy) return;
  taps[0] = lz, taps[1] = hz, taps[2] = ly, taps[3] = hy;
  const int64_t sb = e.px + 1, sa = (e.py + 1) * sb;
  const int64_t z0 = lz * sa, z1 = hz * sa, y0 = ly * sb, y1 = hy * sb;
  const double* t = e.table;
  for (int64_t c = 0; c <= e.px; ++c)
    a[c] = t[z1 + y1 + c] - t[z0 + y1 + c] - t[z1 + y0 + c] + t[z0 + y0 + c];
  const bool full_zy = lz == 0 && hz == e.pz && ly == 0 && hy == e.py;
  auto weight = [&](int64_t x0, int64_t x1) {
    const double s = full_zy && x0 == 0 && x1 == e.px ? t[e.pz * sa + e.py * sb + e.px]
                                                      : a[x1] - a[x0];
    return s > e.threshold ? 1.0 / s : 0.0;
  };
  scratch.w_full = weight(0, e.px);
  for (int64_t x = 0; x < p.W; ++x) {
    if (x == fx.lo) x = fx.hi;
    if (x >= p.W) break;
    int64_t x0, x1;
    tap_range(e.bounds + 2 * (p.D + p.H + x), e.px, x0, x1);
    scratch.w[x] = weight(x0, x1);
  }
}

// Lane-wise sqrt of a Simd vector. The compiler does not vectorise std::sqrt by itself (errno).
template <typename V>
inline V vec_sqrt(V v) {
#if defined(__AVX512F__)
  // The masked forms: GCC 12's plain _mm512_sqrt_* trip -Wmaybe-uninitialized.
  if constexpr (sizeof(v[0]) == 4) return (V)_mm512_mask_sqrt_ps((__m512)v, 0xFFFF, (__m512)v);
  else return (V)_mm512_mask_sqrt_pd((__m512d)v, 0xFF, (__m512d)v);
#elif defined(__AVX__)
  if constexpr (sizeof(v[0]) == 4) return (V)_mm256_sqrt_ps((__m256)v);
  else return (V)_mm256_sqrt_pd((__m256d)v);
#else
  for (size_t k = 0; k < sizeof(V) / sizeof(v[0]); ++k) v[k] = std::sqrt(v[k]);
  return v;
#endif
}

// tv_factor_from on Simd vectors: the same operations in the same order.
template <typename T, typename V>
inline V tv_factor_vec(V u0, V zp, V zm, V yp, V ym, V xp, V xm, T tv, T eps2) {
  const V cz = T(0.5) * (zp - zm), cy = T(0.5) * (yp - ym), cx = T(0.5) * (xp - xm);
  const V cz2 = cz * cz, cy2 = cy * cy, cx2 = cx * cx;
  const V dpz = zp - u0, dmz = u0 - zm, dpy = yp - u0, dmy = u0 - ym, dpx = xp - u0, dmx = u0 - xm;
  const V tz = cy2 + cx2 + eps2, ty = cz2 + cx2 + eps2, tx = cz2 + cy2 + eps2;
  const V div = dpz / vec_sqrt(dpz * dpz + tz) - dmz / vec_sqrt(dmz * dmz + tz) +
                dpy / vec_sqrt(dpy * dpy + ty) - dmy / vec_sqrt(dmy * dmy + ty) +
                dpx / vec_sqrt(dpx * dpx + tx) - dmx / vec_sqrt(dmx * dmx + tx);
  V den = T(1) - tv * div;
  const V lo = Simd<T>::splat(T(kTvMinDenominator));
  den = den < lo ? lo : den;
  return T(1) / den;
}

// f[x] = tv_factor_at(z, y, x) for the row of volume u: the 4 neighbour rows are fixed for the row,
// so the inner loop has no branches and runs on Simd vectors; x = 0 and W - 1 take the general
// path.
template <typename T>
void row_tv(const RlUpdateParams& p, const T* u, int64_t z, int64_t y, const T* zero, T* f) {
  const int64_t sz = p.H * p.W;
  const T* r0 = u + (z * p.H + y) * p.W;
  auto nb_row = [&](int64_t c, int64_t n, int64_t stride, int dir) -> const T* {
    const int64_t c2 = c + dir;
    if (c2 >= 0 && c2 < n) return r0 + dir * stride;
    return p.tv_periodic ? r0 - dir * (n - 1) * stride : zero;
  };
  const T* zp = nb_row(z, p.D, sz, 1);
  const T* zm = nb_row(z, p.D, sz, -1);
  const T* yp = nb_row(y, p.H, p.W, 1);
  const T* ym = nb_row(y, p.H, p.W, -1);
  const T tv = T(p.tv), eps2 = T(p.tv_eps * p.tv_eps);
  using S = Simd<T>;
  int64_t x = 1;
  for (; x + S::L < p.W; x += S::L)
    S::store(f + x, tv_factor_vec(S::load(r0 + x), S::load(zp + x), S::load(zm + x),
                                  S::load(yp + x), S::load(ym + x), S::load(r0 + x + 1),
                                  S::load(r0 + x - 1), tv, eps2));
  for (; x + 1 < p.W; ++x)
    f[x] = tv_factor_from(r0[x], zp[x], zm[x], yp[x], ym[x], r0[x + 1], r0[x - 1], tv, eps2);
  f[0] = tv_factor_at(u, p.D, p.H, p.W, z, y, int64_t(0), tv, eps2, p.tv_periodic);
  if (p.W > 1) f[p.W - 1] = tv_factor_at(u, p.D, p.H, p.W, z, y, p.W - 1, tv, eps2, p.tv_periodic);
}

// out[x] = update_value(...) for x in [x0, x1), the weight w[x] or, without w, the constant wc.
template <bool HasW, bool HasTv, typename T>
void update_segment(const T* u, const T* corr, const double* w, double wc, const T* f, T cm,
                    T* out, int64_t x0, int64_t x1) {
  if (w)
    for (int64_t x = x0; x < x1; ++x)
      out[x] = update_value<HasW, HasTv>(u[x], corr[x], w[x], HasTv ? f[x] : T(1), cm);
  else
    for (int64_t x = x0; x < x1; ++x)
      out[x] = update_value<HasW, HasTv>(u[x], corr[x], wc, HasTv ? f[x] : T(1), cm);
}

// g = out - u into change, and the two dot products, on Simd vectors: per-lane partial sums in T
// over the row (a fixed order), the row totals in double.
template <typename T>
void biggs_change_row(const T* out, const T* u, T* change, int64_t W, double& cross, double& self) {
  using S = Simd<T>;
  using V = typename S::V;
  V vc = S::splat(T(0)), vs = S::splat(T(0));
  int64_t x = 0;
  for (; x + S::L <= W; x += S::L) {
    const V g = S::load(out + x) - S::load(u + x);
    vc += g * S::load(change + x);
    vs += g * g;
    S::store(change + x, g);
  }
  double c = 0.0, q = 0.0;
  for (int k = 0; k < S::L; ++k) c += double(vc[k]), q += double(vs[k]);
  for (; x < W; ++x) {
    const T g = out[x] - u[x];
    c += double(g) * double(change[x]);
    q += double(g) * double(g);
    change[x] = g;
  }
  cross += c;
  self += q;
}

// One row of the update: out = update_value(...) in up to three runs (the weights' x border,
// interior, border), then the Biggs bookkeeping of biggs_at in loops of their own, so that every
// loop vectorises. out may be corr (each x read before written).
template <bool HasW, bool HasTv, typename T>
void update_row(const RlUpdateParams& p, const T* est_n, const T* corr, int64_t z, int64_t y,
                const FullX& fx, RowScratch<T>& scratch, T* out, T* previous, T* change,
                double& cross, double& self) {
  if (HasW && !p.weights.dense) row_weights(p, z, y, fx, scratch);
  if (HasTv) row_tv(p, est_n, z, y, scratch.zero.data(), scratch.f.data());
  const T* u = est_n + (z * p.H + y) * p.W;
  const double* w = HasW ? scratch.w.data() : nullptr;
  const T* f = scratch.f.data();
  const T cm = T(p.clamp_min);
  if (HasW && p.weights.dense) {
    // The stored weights: one loop that vectorises; T(double(w)) == w, so this is what
    // update_value gives with the weight evaluated from the table.
    const T* wd = static_cast<const T*>(p.weights.dense) + (z * p.H + y) * p.W;
    for (int64_t x = 0; x < p.W; ++x) {
      T v = u[x] * corr[x];
      v *= wd[x];
      if (HasTv) v *= f[x];
      out[x] = v < cm ? cm : v;
    }
  } else if (HasW) {
    update_segment<HasW, HasTv>(u, corr, w, 0.0, f, cm, out, 0, fx.lo);
    update_segment<HasW, HasTv>(u, corr, nullptr, scratch.w_full, f, cm, out, fx.lo, fx.hi);
    update_segment<HasW, HasTv>(u, corr, w, 0.0, f, cm, out, fx.hi, p.W);
  } else {
    update_segment<HasW, HasTv>(u, corr, nullptr, 1.0, f, cm, out, 0, p.W);
  }
  if (previous)
    for (int64_t x = 0; x < p.W; ++x) previous[x] = out[x] - previous[x];
  if (change) biggs_change_row(out, u, change, p.W, cross, self);
}

template <bool HasW, bool HasTv, typename T>
void rl_update_rows(const RlUpdateParams& p, const T* est, const T* corr, T* out, T* previous,
                    T* change, double* dots) {
  const int64_t rows = p.N * p.D * p.H, grain = row_grain(p.W, HasTv ? 8 : 2);
  ChunkDots partial(rows, grain);
  const FullX fx = full_x_range(p);
  for_chunks(rows, grain, [&](int64_t b, int64_t e) {
    RowScratch<T> scratch(p.W, p.weights.px);
    double cross = 0.0, self = 0.0;
    for (int64_t r = b; r < e; ++r) {
      const int64_t y = r % p.H, z = (r / p.H) % p.D, n = r / (p.H * p.D);
      const int64_t i = r * p.W;
      update_row<HasW, HasTv>(p, est + n * p.D * p.H * p.W, corr + i, z, y, fx, scratch, out + i,
                              previous ? previous + i : nullptr, change ? change + i : nullptr,
                              cross, self);
    }
    partial.store(b, grain, cross, self);
  });
  partial.finish(dots);
}

// The estimate's row (z, y) of the correction psf^T * ratio into acc [W], by taps: each tap
// adds a shifted ratio row, a loop the compiler vectorises.
template <typename T>
void backproject_row(const PsfConvParams& c, const T* ratio_n, const T* psf, int64_t z, int64_t y,
                     T* acc) {
  for (int64_t x = 0; x < c.W; ++x) acc[x] = T(0);
  for (int64_t qz = 0; qz < c.pz; ++qz) {
    const int64_t rz = z - c.sz + qz;
    if (rz < 0 || rz >= c.d) continue;
    for (int64_t qy = 0; qy < c.py; ++qy) {
      const int64_t ry = y - c.sy + qy;
      if (ry < 0 || ry >= c.h) continue;
      const T* row = ratio_n + (rz * c.h + ry) * c.w;
      const T* k = psf + (qz * c.py + qy) * c.px;
      for (int64_t qx = 0; qx < c.px; ++qx) {
        const int64_t off = qx - c.sx;  // acc[x] += k * row[x + off], 0 <= x + off < w
        const int64_t x0 = off < 0 ? -off : 0;
        const int64_t x1 = c.w - off < c.W ? c.w - off : c.W;
        const T kv = k[qx];
        for (int64_t x = x0; x < x1; ++x) acc[x] += kv * row[x + off];
      }
    }
  }
}

template <bool HasW, bool HasTv, typename T>
void psf_conv_update_rows(const PsfConvParams& c, const RlUpdateParams& p, const T* est,
                          const T* ratio, const T* psf, T* out, T* previous, T* change,
                          double* dots) {
  const int64_t rows = p.N * p.D * p.H, grain = row_grain(p.W, c.pz * c.py * c.px);
  ChunkDots partial(rows, grain);
  const FullX fx = full_x_range(p);
  for_chunks(rows, grain, [&](int64_t b, int64_t e) {
    RowScratch<T> scratch(p.W, p.weights.px);
    std::vector<T> acc(p.W);
    double cross = 0.0, self = 0.0;
    for (int64_t r = b; r < e; ++r) {
      const int64_t y = r % p.H, z = (r / p.H) % p.D, n = r / (p.H * p.D);
      backproject_row(c, ratio + n * c.d * c.h * c.w, psf, z, y, acc.data());
      const int64_t i = r * p.W;
      update_row<HasW, HasTv>(p, est + n * p.D * p.H * p.W, acc.data(), z, y, fx, scratch, out + i,
                              previous ? previous + i : nullptr, change ? change + i : nullptr,
                              cross, self);
    }
    partial.store(b, grain, cross, self);
  });
  partial.finish(dots);
}

// Runs Rows<HasW, HasTv>::run(args...) with the switches fixed at compile time.
template <template <bool, bool> class Rows, class... A>
void update_switch(const RlUpdateParams& p, A&&... args) {
  const bool w = p.weights.table != nullptr, tv = p.tv > 0.0;
  if (w && tv) Rows<true, true>::run(args...);
  else if (w) Rows<true, false>::run(args...);
  else if (tv) Rows<false, true>::run(args...);
  else Rows<false, false>::run(args...);
}

template <bool HasW, bool HasTv>
struct RlUpdateRows {
  template <class... A>
  static void run(A&&... args) { rl_update_rows<HasW, HasTv>(args...); }
};

template <bool HasW, bool HasTv>
struct PsfConvUpdateRows {
  template <class... A>
  static void run(A&&... args) { psf_conv_update_rows<HasW, HasTv>(args...); }
};

}  // namespace

template <typename T>
void rl_ratio_forward(const RlRatioParams& p, const T* image, const T* blurred, T* out) {
  const int64_t rows = p.N * p.D * p.H;
  for_chunks(rows, row_grain(p.W, 1), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t y = r % p.H, z = (r / p.H) % p.D, n = r / (p.H * p.D);
      T* o = out + r * p.W;
      const int64_t inside = (z < p.d && y < p.h) ? p.w : 0;
      for (int64_t x = 0; x < inside; ++x) o[x] = rl_ratio_at(p, image, blurred, n, z, y, x);
      for (int64_t x = inside; x < p.W; ++x) o[x] = T(0);
    }
  });
}

template <typename T>
void rl_predict_forward(int64_t n, const T* estimate, T* step, double a, double tiny) {
  const T ta = T(a), tt = T(tiny);
  for_chunks(n, int64_t(1) << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) step[i] = predict_value(estimate[i], step[i], ta, tt);
  });
}

template <typename T>
void rl_update_forward(const RlUpdateParams& p, const T* estimate, const T* correction, T* out,
                       T* previous, T* change, double* dots) {
  update_switch<RlUpdateRows>(p, p, estimate, correction, out, previous, change, dots);
  if (dots && !change) dots[0] = dots[1] = 0.0;
}

template <typename T>
void psf_conv_ratio_forward(const PsfConvParams& c, const T* image, const T* estimate, const T* psf,
                            T* out) {
  const int64_t rows = c.N * c.d * c.h;
  for_chunks(rows, row_grain(c.w, c.pz * c.py * c.px), [&](int64_t b, int64_t e) {
    std::vector<T> acc(c.w);
    for (int64_t r = b; r < e; ++r) {
      const int64_t y = r % c.h, z = (r / c.h) % c.d, n = r / (c.h * c.d);
      const T* en = estimate + n * c.D * c.H * c.W;
      for (int64_t x = 0; x < c.w; ++x) acc[x] = T(0);
      // The same sum as psf_blur_at, tap by tap over the row: acc[x] += k * est[x + s - q].
      for (int64_t qz = 0; qz < c.pz; ++qz) {
        const int64_t ez = z + c.sz - qz;
        if (ez < 0 || ez >= c.D) continue;
        for (int64_t qy = 0; qy < c.py; ++qy) {
          const int64_t ey = y + c.sy - qy;
          if (ey < 0 || ey >= c.H) continue;
          const T* row = en + (ez * c.H + ey) * c.W;
          const T* k = psf + (qz * c.py + qy) * c.px;
          for (int64_t qx = 0; qx < c.px; ++qx) {
            const int64_t off = c.sx - qx;
            const int64_t x0 = off < 0 ? -off : 0;
            const int64_t x1 = c.W - off < c.w ? c.W - off : c.w;
            const T kv = k[qx];
            for (int64_t x = x0; x < x1; ++x) acc[x] += kv * row[x + off];
          }
        }
      }
      const T* im = image + r * c.w;
      T* o = out + r * c.w;
      for (int64_t x = 0; x < c.w; ++x) {
        T den = acc[x] + T(c.background);
        if (den < T(c.eps)) den = T(c.eps);
        o[x] = im[x] / den;
      }
    }
  });
}

template <typename T>
void psf_conv_update_forward(const PsfConvParams& c, const RlUpdateParams& p, const T* estimate,
                             const T* ratio, const T* psf, T* out, T* previous, T* change,
                             double* dots) {
  update_switch<PsfConvUpdateRows>(p, c, p, estimate, ratio, psf, out, previous, change, dots);
  if (dots && !change) dots[0] = dots[1] = 0.0;
}

#define RLN_FAST_INSTANTIATE(T)                                                                  \
  template void rl_ratio_forward<T>(const RlRatioParams&, const T*, const T*, T*);             \
  template void rl_predict_forward<T>(int64_t, const T*, T*, double, double);                  \
  template void rl_update_forward<T>(const RlUpdateParams&, const T*, const T*, T*, T*, T*,    \
                                     double*);                                                  \
  template void psf_conv_ratio_forward<T>(const PsfConvParams&, const T*, const T*, const T*,  \
                                          T*);                                                  \
  template void psf_conv_update_forward<T>(const PsfConvParams&, const RlUpdateParams&,        \
                                           const T*, const T*, const T*, T*, T*, T*, double*);
RLN_FAST_INSTANTIATE(float)
RLN_FAST_INSTANTIATE(double)
#undef RLN_FAST_INSTANTIATE

}  // namespace cpu
}  // namespace rln_fast
