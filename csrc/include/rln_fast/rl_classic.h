// Classic RL (rl_ratio, rl_update, psf_conv_ratio, psf_conv_update): POD params and per-voxel math.
#pragma once

#include "rln_fast/common.h"

namespace rln_fast {

// Lower bound of the RL-TV denominator 1 - tv * div(grad u / |grad u|): the factor stays <= 10
// even for a tv so large that the plain formula would change sign (Dey et al. use tv ~ 0.002,
// where |tv * div| <= 6 tv stays far from it).
constexpr double kTvMinDenominator = 0.1;

RLN_HD float rlc_sqrt(float x) { return sqrtf(x); }
RLN_HD double rlc_sqrt(double x) { return sqrt(x); }

// Bertero-Boccacci weights w = 1 / (H^T 1_M), M the observed box, computed per voxel from the PSF's
// summed-volume table instead of being stored as a volume. For work voxel (z, y, x) the PSF taps q
// with H^T's footprint inside M form a box [lo, hi) per axis (the caller derives them from the
// geometry: circular FFT job or zero-padded direct job), so H^T 1_M is an 8-term box sum.
// table == nullptr means no weights (w = 1).
struct EdgeWeights {
  const double* table = nullptr;    // [pz + 1, py + 1, px + 1]: sum of psf[<a, <b, <c]
  const int64_t* bounds = nullptr;  // [D + H + W, 2]: tap range [lo, hi) per z, then y, then x
  int64_t pz = 0, py = 0, px = 0;
  double threshold = 0.0;  // H^T 1_M <= threshold: the voxel sees too little of M; w = 0
  // Optional: w itself per voxel of the work volume [D, H, W], in the volume's dtype (what the
  // table gives there, cast), which the update reads instead of evaluating the box sums.
  const void* dense = nullptr;
};

// Elementwise ratio and update of the FFT path. image [N, 1, d, h, w] lies in the corner
// [0, d) x [0, h) x [0, w) of the work volume [N, 1, D, H, W]; outside it the ratio is 0.
struct RlRatioParams {
  int64_t N = 0, D = 0, H = 0, W = 0;
  int64_t d = 0, h = 0, w = 0;
  double background = 0.0, eps = 1e-12;
};

// The multiplicative update (both paths): new = max(u * c * w * 1/(1 - tv div), clamp_min), and
// the Biggs-Andrews bookkeeping when asked.
struct RlUpdateParams {
  int64_t N = 0, D = 0, H = 0, W = 0;
  double tv = 0.0, tv_eps = 1e-12, clamp_min = 0.0;
  bool tv_periodic = false;  // TV neighbours beyond a face: wrap around (true) or 0 (false)
  EdgeWeights weights;
};

// Direct (small-PSF) path. estimate [N, 1, D, H, W]; image and ratio [N, 1, d, h, w], centred in
// the estimate's volume (D - d even): image voxel p sits at estimate voxel p + o, o = (D - d) / 2.
// psf [pz, py, px], odd sizes, centre c = p / 2; s = o + c. Zero outside every volume.
struct PsfConvParams {
  int64_t N = 0, D = 0, H = 0, W = 0;
  int64_t d = 0, h = 0, w = 0;
  int64_t pz = 0, py = 0, px = 0;
  int64_t sz = 0, sy = 0, sx = 0;
  double background = 0.0, eps = 1e-12;
};

RLN_HD int64_t vox(int64_t D, int64_t H, int64_t W, int64_t n, int64_t z, int64_t y, int64_t x) {
  return ((n * D + z) * H + y) * W + x;
}

// --- weights -----------------------------------------------------------------------------------

// A tap range [b[0], b[1]) clamped to [0, n]: malformed bounds cannot read outside the table.
RLN_HD void tap_range(const int64_t* b, int64_t n, int64_t& lo, int64_t& hi) {
  lo = b[0] < 0 ? 0 : (b[0] > n ? n : b[0]);
  hi = b[1] < lo ? lo : (b[1] > n ? n : b[1]);
}

RLN_HD double edge_weight_at(const EdgeWeights& e, int64_t D, int64_t H, int64_t z, int64_t y,
                             int64_t x) {
  int64_t lz, hz, ly, hy, x0, x1;
  tap_range(e.bounds + 2 * z, e.pz, lz, hz);
  tap_range(e.bounds + 2 * (D + y), e.py, ly, hy);
  tap_range(e.bounds + 2 * (D + H + x), e.px, x0, x1);
  const int64_t sb = e.px + 1, sa = (e.py + 1) * sb;
  const double* t = e.table;
  double s;
  if (lz == 0 && hz == e.pz && ly == 0 && hy == e.py && x0 == 0 && x1 == e.px) {
    s = t[e.pz * sa + e.py * sb + e.px];  // the whole PSF: what the 8-term sum gives, exactly
  } else {
    const int64_t z0 = lz * sa, z1 = hz * sa, y0 = ly * sb, y1 = hy * sb;
    // Inclusion-exclusion over the 8 corners of the tap box.
    s = (t[z1 + y1 + x1] - t[z0 + y1 + x1] - t[z1 + y0 + x1] + t[z0 + y0 + x1]) -
        (t[z1 + y1 + x0] - t[z0 + y1 + x0] - t[z1 + y0 + x0] + t[z0 + y0 + x0]);
  }
  return s > e.threshold ? 1.0 / s : 0.0;
}

// --- RL-TV (Dey et al. 2006) -------------------------------------------------------------------

// 1 / max(1 - tv * div(grad u / |grad u|), kTvMinDenominator) at (z, y, x) of one volume u
// [D, H, W] (tv_factor_at), from u there and at its 6 face neighbours (tv_factor_from). Beyond
// a face the neighbour wraps around (periodic: the FFT job, which is circular) or is 0 (the
// zero-padded direct job). Each face term is the one-sided difference over a gradient norm whose
// transverse components are the central differences at the voxel:
//   div = sum_a  D+a / sqrt(D+a^2 + sum_{b!=a} C_b^2 + eps^2)  -  D-a / sqrt(D-a^2 + sum_{b!=a} C_b^2 + eps^2)
template <typename T>
RLN_HD T tv_factor_from(T u0, T zp, T zm, T yp, T ym, T xp, T xm, T tv, T eps2) {
  const T cz = T(0.5) * (zp - zm), cy = T(0.5) * (yp - ym), cx = T(0.5) * (xp - xm);
  const T cz2 = cz * cz, cy2 = cy * cy, cx2 = cx * cx;
  const T dpz = zp - u0, dmz = u0 - zm, dpy = yp - u0, dmy = u0 - ym, dpx = xp - u0, dmx = u0 - xm;
  const T tz = cy2 + cx2 + eps2, ty = cz2 + cx2 + eps2, tx = cz2 + cy2 + eps2;
  const T div = dpz / rlc_sqrt(dpz * dpz + tz) - dmz / rlc_sqrt(dmz * dmz + tz) +
                dpy / rlc_sqrt(dpy * dpy + ty) - dmy / rlc_sqrt(dmy * dmy + ty) +
                dpx / rlc_sqrt(dpx * dpx + tx) - dmx / rlc_sqrt(dmx * dmx + tx);
  T den = T(1) - tv * div;
  // NaN stays NaN (the comparison is false), so a broken estimate is not hidden.
  den = den < T(kTvMinDenominator) ? T(kTvMinDenominator) : den;
  return T(1) / den;
}

// Neighbour of voxel i at offset dir (+-1) along an axis of n voxels, at position c, stride
// `stride`: wrapped around (periodic) or 0 beyond the volume.
template <typename T>
RLN_HD T tv_neighbour(const T* u, int64_t i, int64_t c, int64_t n, int64_t stride, int dir,
                      bool periodic) {
  const int64_t c2 = c + dir;
  if (c2 >= 0 && c2 < n) return u[i + dir * stride];
  return periodic ? u[i - dir * (n - 1) * stride] : T(0);
}

template <typename T>
RLN_HD T tv_factor_at(const T* u, int64_t D, int64_t H, int64_t W, int64_t z, int64_t y, int64_t x,
                      T tv, T eps2, bool periodic) {
  const int64_t i = (z * H + y) * W + x, sz = H * W;
  return tv_factor_from(u[i], tv_neighbour(u, i, z, D, sz, 1, periodic),
                        tv_neighbour(u, i, z, D, sz, -1, periodic),
                        tv_neighbour(u, i, y, H, W, 1, periodic),
                        tv_neighbour(u, i, y, H, W, -1, periodic),
                        tv_neighbour(u, i, x, W, int64_t(1), 1, periodic),
                        tv_neighbour(u, i, x, W, int64_t(1), -1, periodic), tv, eps2);
}

// --- FFT path ----------------------------------------------------------------------------------

// image / max(blurred + background, eps) inside the image's box, 0 outside.
template <typename T>
RLN_HD T rl_ratio_at(const RlRatioParams& p, const T* image, const T* blurred, int64_t n, int64_t z,
                     int64_t y, int64_t x) {
  if (z >= p.d || y >= p.h || x >= p.w) return T(0);
  T den = blurred[vox(p.D, p.H, p.W, n, z, y, x)] + T(p.background);
  if (den < T(p.eps)) den = T(p.eps);  // NaN passes through
  return image[vox(p.d, p.h, p.w, n, z, y, x)] / den;
}

// The new estimate from u, its correction c, the weight w and the TV factor f. HasW / HasTv are
// the kernels' compile-time switches.
template <bool HasW, bool HasTv, typename T>
RLN_HD T update_value(T u, T c, double w, T f, T clamp_min) {
  T v = u * c;
  if (HasW) v *= T(w);
  if (HasTv) v *= f;
  return v < clamp_min ? clamp_min : v;  // NaN passes through
}

// The new estimate at one voxel from its correction c (H^T ratio there); u is the estimate, read
// at the 6 neighbours for TV.
template <bool HasW, bool HasTv, typename T>
RLN_HD T rl_update_at(const RlUpdateParams& p, const T* u, T c, int64_t n, int64_t z, int64_t y,
                      int64_t x) {
  const T* un = u + n * p.D * p.H * p.W;
  const double w = !HasW ? 1.0
                   : p.weights.dense
                       ? double(static_cast<const T*>(p.weights.dense)[(z * p.H + y) * p.W + x])
                       : edge_weight_at(p.weights, p.D, p.H, z, y, x);
  const T f = HasTv ? tv_factor_at(un, p.D, p.H, p.W, z, y, x, T(p.tv), T(p.tv_eps * p.tv_eps),
                                   p.tv_periodic)
                    : T(1);
  return update_value<HasW, HasTv>(un[(z * p.H + y) * p.W + x], c, w, f, T(p.clamp_min));
}

// The accelerated prediction at one voxel from the estimate x = x_k and the last step
// s = x_k - x_{k-1}: max(x + a s, x (1 - a + a min(x / x_{k-1}, 1))), which is
// x + a s x / max(x_{k-1}, x) (rln_fast.rl._predict explains the floor); the divisor is kept
// >= tiny.
template <typename T>
RLN_HD T predict_value(T x, T s, T a, T tiny) {
  const T prev = x - s;
  T d = prev > x ? prev : x;
  if (d < tiny) d = tiny;
  return x + a * s * (x / d);
}

// Biggs-Andrews bookkeeping at voxel i once the new estimate v is known, u being the estimate
// that was updated (the prediction), x = previous[i] (x_k) and g_old = change[i] (g_{k-1}) as read
// before anything was written at i: previous[i] becomes the step v - x_k, change[i] becomes
// g_k = v - u, and the dot products <g_k, g_{k-1}>, <g_k, g_k> accumulate in A. Either pointer
// may be null. Every access is at voxel i, so all of it runs in place.
template <typename T, typename A>
RLN_HD void biggs_at(T v, T u, T x, T g_old, T* previous, T* change, int64_t i, A& cross, A& self) {
  if (previous) previous[i] = v - x;
  if (change) {
    const T g = v - u;
    cross += A(g) * A(g_old);
    self += A(g) * A(g);
    change[i] = g;
  }
}

// --- direct path -------------------------------------------------------------------------------

// (psf * estimate)(p) at image voxel (z, y, x): sum_q psf[q] estimate[p + s - q].
template <typename T>
RLN_HD T psf_blur_at(const PsfConvParams& p, const T* est, const T* psf, int64_t n, int64_t z,
                     int64_t y, int64_t x) {
  const T* en = est + n * p.D * p.H * p.W;
  T acc = T(0);
  for (int64_t qz = 0; qz < p.pz; ++qz) {
    const int64_t ez = z + p.sz - qz;
    if (ez < 0 || ez >= p.D) continue;
    for (int64_t qy = 0; qy < p.py; ++qy) {
      const int64_t ey = y + p.sy - qy;
      if (ey < 0 || ey >= p.H) continue;
      const T* row = en + (ez * p.H + ey) * p.W;
      const T* k = psf + (qz * p.py + qy) * p.px;
      for (int64_t qx = 0; qx < p.px; ++qx) {
        const int64_t ex = x + p.sx - qx;
        if (ex >= 0 && ex < p.W) acc += k[qx] * row[ex];
      }
    }
  }
  return acc;
}

template <typename T>
RLN_HD T psf_conv_ratio_at(const PsfConvParams& p, const T* image, const T* est, const T* psf,
                           int64_t n, int64_t z, int64_t y, int64_t x) {
  T den = psf_blur_at(p, est, psf, n, z, y, x) + T(p.background);
  if (den < T(p.eps)) den = T(p.eps);
  return image[vox(p.d, p.h, p.w, n, z, y, x)] / den;
}

// (psf^T * ratio)(e) at estimate voxel (z, y, x): sum_q psf[q] ratio[e - s + q].
template <typename T>
RLN_HD T psf_backproject_at(const PsfConvParams& p, const T* ratio, const T* psf, int64_t n,
                            int64_t z, int64_t y, int64_t x) {
  const T* rn = ratio + n * p.d * p.h * p.w;
  T acc = T(0);
  for (int64_t qz = 0; qz < p.pz; ++qz) {
    const int64_t rz = z - p.sz + qz;
    if (rz < 0 || rz >= p.d) continue;
    for (int64_t qy = 0; qy < p.py; ++qy) {
      const int64_t ry = y - p.sy + qy;
      if (ry < 0 || ry >= p.h) continue;
      const T* row = rn + (rz * p.h + ry) * p.w;
      const T* k = psf + (qz * p.py + qy) * p.px;
      for (int64_t qx = 0; qx < p.px; ++qx) {
        const int64_t rx = x - p.sx + qx;
        if (rx >= 0 && rx < p.w) acc += k[qx] * row[rx];
      }
    }
  }
  return acc;
}

}  // namespace rln_fast
