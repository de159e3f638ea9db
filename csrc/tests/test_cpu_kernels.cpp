// C++ unit tests of the torch-free CPU kernels against the per-voxel functions they share with CUDA.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "rln_fast/kernels_cpu.h"

using namespace rln_fast;

namespace {
int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

template <typename T>
std::vector<T> random_vec(int64_t n, std::mt19937& rng, T lo = T(-2), T hi = T(2)) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(u(rng));
  return v;
}

template <typename T>
double max_rel_err(const std::vector<T>& a, const std::vector<T>& b) {
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(double(a[i]) - double(b[i])));
    den = std::max(den, std::fabs(double(b[i])));
  }
  return num / den;
}

struct Shape {
  int64_t N, D, H, W;
  std::vector<int64_t> cins;
  int64_t Cout;
  int act;
  bool bias, skip;
};

template <typename T>
void test_conv(const Shape& s, double tol, std::mt19937& rng) {
  Conv3dParams p;
  p.N = s.N, p.D = s.D, p.H = s.H, p.W = s.W, p.Cout = s.Cout, p.act = s.act;
  p.n_inputs = static_cast<int>(s.cins.size());
  p.has_bias = s.bias, p.has_skip = s.skip;
  const int64_t S = s.D * s.H * s.W;
  std::vector<std::vector<T>> ins;
  for (size_t t = 0; t < s.cins.size(); ++t) {
    p.in_channels[t] = s.cins[t];
    p.Cin += s.cins[t];
    ins.push_back(random_vec<T>(s.N * s.cins[t] * S, rng));
  }
  auto w = random_vec<T>(s.Cout * p.Cin * 27, rng);
  auto b = random_vec<T>(s.Cout, rng);
  auto sk = random_vec<T>(s.N * S, rng, T(-30), T(30));
  std::vector<T> out(s.N * s.Cout * S), pre(out.size()), ref(out.size());
  Conv3dPtrs<T> q;
  for (size_t t = 0; t < ins.size(); ++t) q.in[t] = ins[t].data();
  q.w = w.data(), q.b = s.bias ? b.data() : nullptr, q.skip = s.skip ? sk.data() : nullptr;
  q.out = out.data(), q.preact = pre.data();
  cpu::conv3d_forward(p, q);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t co = 0; co < s.Cout; ++co)
      for (int64_t z = 0; z < s.D; ++z)
        for (int64_t y = 0; y < s.H; ++y)
          for (int64_t x = 0; x < s.W; ++x)
            ref[(((n * s.Cout + co) * s.D + z) * s.H + y) * s.W + x] =
                conv3d_out_at(p, q, n, co, z, y, x);
  const std::string tag = std::string(sizeof(T) == 4 ? "float" : "double") + " N" +
                          std::to_string(s.N) + " " + std::to_string(s.D) + "x" +
                          std::to_string(s.H) + "x" + std::to_string(s.W) + " Cin" +
                          std::to_string(p.Cin) + " Cout" + std::to_string(s.Cout);
  check(max_rel_err(out, ref) < tol, "conv3d_forward " + tag);

  // The fused RL epilogues: only the mean over channels reaches memory.
  if (s.Cout <= 8) {
    auto a = random_vec<T>(s.N * S, rng, T(0.1), T(2));
    std::vector<T> rl(s.N * S), rl_ref(s.N * S);
    for (int mode : {kEpiDivide, kEpiMultiply}) {
      if (mode == kEpiDivide && p.act != kActSoftplus) continue;  // the mean must stay positive
      ConvRlParams e;
      e.mode = mode, e.scale = 1.3, e.shift = -0.2, e.offset = 0.7;
      Conv3dPtrs<T> qr = q;
      qr.out = rl.data(), qr.preact = nullptr;
      for (const T* operand : {static_cast<const T*>(a.data()), static_cast<const T*>(nullptr)}) {
        cpu::conv3d_rl_forward(p, qr, e, operand);
        for (int64_t n = 0; n < s.N; ++n)
          for (int64_t z = 0; z < s.D; ++z)
            for (int64_t y = 0; y < s.H; ++y)
              for (int64_t x = 0; x < s.W; ++x)
                rl_ref[((n * s.D + z) * s.H + y) * s.W + x] =
                    conv3d_rl_out_at(p, q, e, operand, n, z, y, x);
        check(max_rel_err(rl, rl_ref) < tol,
              std::string(mode == kEpiDivide ? "conv3d_rl_divide " : "conv3d_rl_multiply ") +
                  (operand ? "" : "(no operand) ") + tag);
      }
    }
  }

  // Weight gradient and act backward against the per-voxel definitions.
  auto dy = random_vec<T>(out.size(), rng);
  std::vector<T> dz(out.size()), dskip(s.N * S), dw(w.size()), dw_ref(w.size());
  cpu::conv3d_act_backward(p, dy.data(), pre.data(), q.skip, dz.data(),
                           s.skip ? dskip.data() : nullptr);
  double err = 0;
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t i = 0; i < S; ++i) {
      T sum = 0;
      for (int64_t co = 0; co < s.Cout; ++co) {
        const int64_t o = (n * s.Cout + co) * S + i;
        err = std::max(err, std::fabs(double(dz[o] - dy[o] * act_grad(p.act, pre[o]))));
        sum += dy[o];
      }
      if (s.skip) err = std::max(err, std::fabs(double(dskip[n * S + i] - sigmoid(sk[n * S + i]) * sum)));
    }
  check(err < tol * 10, "conv3d_act_backward " + tag);
  cpu::conv3d_wgrad(p, q, dz.data(), dw.data());
  for (int64_t co = 0; co < s.Cout; ++co)
    for (int64_t ci = 0; ci < p.Cin; ++ci)
      for (int t = 0; t < 27; ++t)
        dw_ref[(co * p.Cin + ci) * 27 + t] = conv3d_wgrad_at(p, q, dz.data(), co, ci, t);
  check(max_rel_err(dw, dw_ref) < tol * 10, "conv3d_wgrad " + tag);
}

template <typename T>
void test_rl_ops(double tol, std::mt19937& rng) {
  const int64_t N = 2, C = 3, S = 37;
  auto x = random_vec<T>(N * S, rng, T(0.1), T(2));
  auto fp = random_vec<T>(N * C * S, rng, T(0.1), T(2));
  auto dy = random_vec<T>(N * S, rng);
  std::vector<T> out(N * S), dx(N * S), dfp(N * C * S);
  for (bool paper : {false, true}) {
    RlDivideParams p;
    p.N = N, p.C = C, p.S = S, p.eps = 1e-4, p.scale = 1.7, p.shift = -0.3, p.paper = paper;
    cpu::rl_divide_forward(p, x.data(), fp.data(), out.data());
    cpu::rl_divide_backward(p, dy.data(), x.data(), fp.data(), dx.data(), dfp.data());
    double err = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        double d = 1e-4;
        for (int64_t c = 0; c < C; ++c) d += double(fp[(n * C + c) * S + s]) / C;
        const double xv = x[n * S + s], g = dy[n * S + s], m = xv / d;
        err = std::max(err, std::fabs(out[n * S + s] - (1.7 * m - 0.3)));
        err = std::max(err, std::fabs(dx[n * S + s] - (paper ? 1.7 * g : 1.7 * g / d)));
        const double gd = -(paper ? m * m : m / d) * 1.7 * g / C;
        for (int64_t c = 0; c < C; ++c) err = std::max(err, std::fabs(dfp[(n * C + c) * S + s] - gd));
      }
    check(err < tol, std::string("rl_divide ") + (paper ? "paper" : "exact"));

    RlMultiplyParams m;
    m.N = N, m.C = C, m.S = S, m.offset = 1.0, m.paper = paper;
    cpu::rl_multiply_forward(m, x.data(), fp.data(), out.data());
    cpu::rl_multiply_backward(m, dy.data(), x.data(), fp.data(), dx.data(), dfp.data());
    err = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        double g = 1.0;
        for (int64_t c = 0; c < C; ++c) g += double(fp[(n * C + c) * S + s]) / C;
        const double e = x[n * S + s], d = dy[n * S + s];
        err = std::max(err, std::fabs(out[n * S + s] - e * g));
        err = std::max(err, std::fabs(dx[n * S + s] - (paper ? d : d * g)));
        for (int64_t c = 0; c < C; ++c) err = std::max(err, std::fabs(dfp[(n * C + c) * S + s] - d * e / C));
      }
    check(err < tol, std::string("rl_multiply ") + (paper ? "paper" : "exact"));
  }
}
// Per work coordinate, the PSF taps [lo, hi) whose H^T footprint lands in [start, start + size)
// of a circular job of `length` (rln_fast.ops.rl_classic._tap_bounds).
void tap_bounds(int64_t length, int64_t taps, int64_t start, int64_t size, std::vector<int64_t>& b) {
  for (int64_t p = 0; p < length; ++p) {
    int64_t lo = taps, hi = 0;
    for (int64_t q = 0; q < taps; ++q) {
      const int64_t at = ((p + q - taps / 2) % length + length) % length;
      if (at >= start && at < start + size) lo = std::min(lo, q), hi = std::max(hi, q + 1);
    }
    b.push_back(lo < hi ? lo : 0);
    b.push_back(lo < hi ? hi : 0);
  }
}

// The update with Bertero weights stored per voxel (what edge_weight_at gives, cast) equals the
// update that evaluates them, bit for bit, with and without TV and the Biggs bookkeeping; the
// fused prediction equals its formula.
template <typename T>
void test_rl_classic(std::mt19937& rng) {
  const int64_t pz = 3, py = 4, px = 5, N = 2, D = 7, H = 9, W = 13, d = 4, h = 5, w = 8;
  auto psf = random_vec<double>(pz * py * px, rng, 0.1, 1.0);
  std::vector<double> table((pz + 1) * (py + 1) * (px + 1), 0.0);
  for (int64_t a = 1; a <= pz; ++a)
    for (int64_t b = 1; b <= py; ++b)
      for (int64_t c = 1; c <= px; ++c)
        table[(a * (py + 1) + b) * (px + 1) + c] =
            psf[((a - 1) * py + b - 1) * px + c - 1] + table[((a - 1) * (py + 1) + b) * (px + 1) + c] +
            table[(a * (py + 1) + b - 1) * (px + 1) + c] + table[(a * (py + 1) + b) * (px + 1) + c - 1] -
            table[((a - 1) * (py + 1) + b - 1) * (px + 1) + c] -
            table[((a - 1) * (py + 1) + b) * (px + 1) + c - 1] -
            table[(a * (py + 1) + b - 1) * (px + 1) + c - 1] +
            table[((a - 1) * (py + 1) + b - 1) * (px + 1) + c - 1];
  std::vector<int64_t> bounds;
  tap_bounds(D, pz, 0, d, bounds);
  tap_bounds(H, py, 0, h, bounds);
  tap_bounds(W, px, 0, w, bounds);
  RlUpdateParams p;
  p.N = N, p.D = D, p.H = H, p.W = W, p.tv_periodic = true;
  p.weights.table = table.data(), p.weights.bounds = bounds.data();
  p.weights.pz = pz, p.weights.py = py, p.weights.px = px, p.weights.threshold = 0.05;
  std::vector<T> dense(D * H * W);
  for (int64_t z = 0; z < D; ++z)
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x)
        dense[(z * H + y) * W + x] = T(edge_weight_at(p.weights, D, H, z, y, x));
  const int64_t n = N * D * H * W;
  auto est = random_vec<T>(n, rng, T(0.1), T(2)), corr = random_vec<T>(n, rng, T(0.1), T(2));
  for (double tv : {0.0, 0.02}) {
    p.tv = tv;
    std::vector<T> out[2], prev[2], change[2];
    double dots[2][2];
    for (int k = 0; k < 2; ++k) {
      p.weights.dense = k ? dense.data() : nullptr;
      out[k].resize(n), prev[k] = est, change[k] = corr;
      for (auto& v : prev[k]) v *= T(0.5);
      cpu::rl_update_forward(p, est.data(), corr.data(), out[k].data(), prev[k].data(),
                             change[k].data(), dots[k]);
    }
    check(out[0] == out[1] && prev[0] == prev[1] && change[0] == change[1] &&
              dots[0][0] == dots[1][0] && dots[0][1] == dots[1][1],
          "rl_update with stored weights, tv " + std::to_string(tv));
  }
  auto step = random_vec<T>(n, rng, T(-1), T(1));
  std::vector<T> pred = step;
  cpu::rl_predict_forward(n, est.data(), pred.data(), 0.7, 1e-30);
  double err = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = est[i], s = step[i], want = x + 0.7 * s * x / std::max(x - s, x);
    err = std::max(err, std::fabs(pred[i] - want) / std::fabs(want));
  }
  check(err < (sizeof(T) == 4 ? 1e-6 : 1e-14), "rl_predict");
}

// The host-side plan of the CUDA forward: the channels per launch are the most that fit.
void test_cin_per_launch() {
  for (size_t elem : {size_t(4), size_t(8)})
    for (int64_t cout : {1, 4, 5, 8, 16})
      for (size_t limit : {size_t(0), size_t(30000), size_t(60000), size_t(232448)}) {
        const ConvTile t = conv3d_forward_tile(cout, elem);
        const int64_t n = conv3d_max_cin_per_launch(cout, elem, limit);
        const bool fits = n == 0 || conv3d_forward_smem_bytes(n, t, elem) <= limit;
        check(fits && conv3d_forward_smem_bytes(n + 1, t, elem) > limit,
              "conv3d_max_cin_per_launch cout " + std::to_string(cout) + " elem " +
                  std::to_string(elem) + " limit " + std::to_string(limit));
      }
  // 227 KiB (H100/H200 opt-in) hold 237 float32 input channels at 8 output channels.
  check(conv3d_max_cin_per_launch(8, 4, 232448) == 237, "conv3d_max_cin_per_launch 237");
  check(conv3d_forward_tile(8, 8).zt < conv3d_forward_tile(8, 4).zt, "float64 tile is shallower");
}

// Inside the kernels subnormals read as zero (x86: FTZ/DAZ per thread of each parallel region);
// the caller's floating-point mode is left as it was.
void test_subnormals() {
  Conv3dParams p;
  p.N = 1, p.D = 4, p.H = 4, p.W = 20, p.Cout = 4, p.Cin = 1, p.act = kActNone;
  p.n_inputs = 1, p.in_channels[0] = 1;
  const float tiny = 1e-39f;  // subnormal
  std::vector<float> in(p.D * p.H * p.W, tiny), w(p.Cout * 27, 1.0f), out(p.Cout * in.size(), -1.0f);
  Conv3dPtrs<float> q;
  q.in[0] = in.data(), q.w = w.data(), q.out = out.data();
  cpu::conv3d_forward(p, q);
#if defined(__SSE2__)
  const bool all_zero = std::all_of(out.begin(), out.end(), [](float v) { return v == 0.0f; });
  check(all_zero, "conv3d_forward reads subnormal inputs as zero");
#else
  check(std::all_of(out.begin(), out.end(), [](float v) { return v > 0.0f; }),
        "conv3d_forward keeps subnormals where the guard is a no-op");
#endif
  volatile float a = 1e-38f, b = 0.01f;
  check(a * b != 0.0f, "the caller still computes subnormals after a kernel");
}
}  // namespace

int main() {
  std::mt19937 rng(1234);
  const std::vector<Shape> shapes = {
      {1, 5, 6, 7, {1}, 4, kActSoftplus, false, false},
      {2, 3, 4, 37, {4}, 4, kActSoftplus, true, true},
      {1, 4, 5, 70, {4, 4}, 4, kActSoftplus, true, true},
      {1, 2, 3, 2, {8, 8}, 8, kActNone, true, false},
      {1, 6, 5, 19, {8, 1, 1}, 8, kActSoftplus, false, false},
      {1, 3, 3, 3, {3}, 10, kActNone, false, true},
      {2, 1, 1, 1, {2}, 3, kActSoftplus, true, true},
  };
  for (const auto& s : shapes) {
    test_conv<double>(s, 1e-12, rng);
    test_conv<float>(s, 2e-5, rng);
  }
  test_rl_ops<double>(1e-12, rng);
  test_rl_ops<float>(1e-5, rng);
  test_rl_classic<double>(rng);
  test_rl_classic<float>(rng);
  test_cin_per_launch();
  test_subnormals();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
