// Classic RL torch glue (rl_ratio, rl_update, psf_conv_ratio, psf_conv_update): checks, dispatch.
#include <torch/extension.h>

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "checks.h"
#include "rln_fast/kernels_cpu.h"

#ifdef RLN_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "rln_fast/kernels_cuda.h"
#endif

namespace rln_fast {
namespace {

using OptTensor = c10::optional<at::Tensor>;

// RLN_CHECK takes strings and integers only (see checks.h): doubles and strides are formatted here.
std::string num_str(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}


// A [N, 1, D, H, W] volume of a floating dtype on a supported device.
void check_single(const char* op, const char* arg, const at::Tensor& t) {
  check_volume(op, arg, t);
  check_device_supported(op, t);
  RLN_CHECK(t.size(1) == 1, "rln_fast.", op, ": '", arg, "' must have 1 channel, got ", t.size(1));
}

// Like check_single, with the dtype, device and shape of ref.
void check_like(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                const char* ref_arg) {
  check_volume(op, arg, t);
  check_same(op, arg, t, ref, ref_arg);
  RLN_CHECK(t.sizes() == ref.sizes(), "rln_fast.", op, ": '", arg, "' must have the shape of '",
              ref_arg, "' ", shape_str(ref), ", got ", shape_str(t));
}

// A tensor the op writes into: the shape of ref, contiguous (written in place).
void check_output(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                  const char* ref_arg) {
  check_like(op, arg, t, ref, ref_arg);
  RLN_CHECK(t.is_contiguous(), "rln_fast.", op, ": '", arg,
              "' must be contiguous (it is written in place), got strides ", dims_str(t.strides()));
}

// Written tensors must not overlap tensors read elsewhere than at the same voxel.
void check_no_overlap(const char* op, const char* a_name, const at::Tensor& a, const char* b_name,
                      const at::Tensor& b) {
  RLN_CHECK(at::get_overlap_status(a, b) == at::MemOverlapStatus::No, "rln_fast.", op, ": '",
              a_name, "' and '", b_name, "' must not share memory");
}

// Same memory or none at all (a kernel may read and write one voxel in place).
void check_same_or_disjoint(const char* op, const char* a_name, const at::Tensor& a,
                            const char* b_name, const at::Tensor& b) {
  const auto s = at::get_overlap_status(a, b);
  RLN_CHECK(s == at::MemOverlapStatus::No || (s == at::MemOverlapStatus::Full && a.is_same(b)),
              "rln_fast.", op, ": '", a_name, "' must be '", b_name,
              "' itself or share no memory with it");
}

void check_finite(const char* op, const char* arg, double v) {
  RLN_CHECK(std::isfinite(v), "rln_fast.", op, ": '", arg, "' must be finite, got ", num_str(v));
}

void check_positive(const char* op, const char* arg, double v) {
  RLN_CHECK(std::isfinite(v) && v > 0, "rln_fast.", op, ": '", arg,
              "' must be a finite number > 0, got ", num_str(v));
}

// Weight table [pz + 1, py + 1, px + 1] float64 and bounds [D + H + W, 2] int64, both or neither.
// dense: optional w per voxel [D, H, W] of the estimate's dtype and device (with the table).
EdgeWeights check_weights(const char* op, const OptTensor& table, const OptTensor& bounds,
                          double threshold, const OptTensor& dense, const at::Tensor& est,
                          at::Tensor& table_c, at::Tensor& bounds_c, at::Tensor& dense_c) {
  EdgeWeights w;
  RLN_CHECK(table.has_value() == bounds.has_value(), "rln_fast.", op,
              ": 'weight_table' and 'weight_bounds' must be given together, got ",
              table.has_value() ? "only 'weight_table'" : "only 'weight_bounds'");
  RLN_CHECK(!dense.has_value() || table.has_value(), "rln_fast.", op,
            ": 'weight_dense' needs the 'weight_table' and 'weight_bounds' it was computed from");
  if (!table.has_value()) return w;
  const at::Tensor& t = *table;
  const at::Tensor& b = *bounds;
  RLN_CHECK(t.dim() == 3 && t.size(0) >= 2 && t.size(1) >= 2 && t.size(2) >= 2, "rln_fast.", op,
              ": 'weight_table' must be 3-D (pz + 1, py + 1, px + 1) with every side >= 2, got ",
              shape_str(t));
  RLN_CHECK(t.scalar_type() == at::kDouble, "rln_fast.", op,
              ": 'weight_table' must be float64, got ", t.scalar_type());
  RLN_CHECK(b.scalar_type() == at::kLong, "rln_fast.", op,
              ": 'weight_bounds' must be int64, got ", b.scalar_type());
  RLN_CHECK(t.device() == est.device() && b.device() == est.device(), "rln_fast.", op,
              ": 'weight_table' and 'weight_bounds' must be on the device of 'estimate' (",
              est.device(), "), got ", t.device(), " and ", b.device());
  const int64_t rows = est.size(2) + est.size(3) + est.size(4);
  RLN_CHECK(b.dim() == 2 && b.size(0) == rows && b.size(1) == 2, "rln_fast.", op,
              ": 'weight_bounds' must be (D + H + W, 2) = (", rows, ", 2), got ", shape_str(b));
  RLN_CHECK(std::isfinite(threshold) && threshold >= 0, "rln_fast.", op,
              ": 'weight_threshold' must be a finite number >= 0, got ", num_str(threshold));
  table_c = t.contiguous();
  bounds_c = b.contiguous();
  w.table = table_c.data_ptr<double>();
  w.bounds = bounds_c.data_ptr<int64_t>();
  w.pz = t.size(0) - 1, w.py = t.size(1) - 1, w.px = t.size(2) - 1;
  w.threshold = threshold;
  if (dense.has_value()) {
    const at::Tensor& d = *dense;
    RLN_CHECK(d.dim() == 3 && d.size(0) == est.size(2) && d.size(1) == est.size(3) &&
                  d.size(2) == est.size(4),
              "rln_fast.", op, ": 'weight_dense' must be (D, H, W) = (", est.size(2), ", ",
              est.size(3), ", ", est.size(4), "), got ", shape_str(d));
    check_same(op, "weight_dense", d, est, "estimate");
    dense_c = d.contiguous();
    w.dense = dense_c.data_ptr();
  }
  return w;
}

void check_tv(const char* op, double tv, double tv_eps, double clamp_min) {
  RLN_CHECK(std::isfinite(tv) && tv >= 0, "rln_fast.", op,
            ": 'tv' must be a finite number >= 0, got ", num_str(tv));
  check_positive(op, "tv_eps", tv_eps);
  check_finite(op, "clamp_min", clamp_min);
}

// The optional in-place outputs of an update: out (new estimate), previous, change. None of them
// may share memory with the estimate (read at 6 neighbours with TV) or with each other; out may be
// the correction itself (FFT path, each voxel read before it is written).
void check_update_outputs(const char* op, const at::Tensor& est, const OptTensor& out,
                          const OptTensor& previous, const OptTensor& change,
                          const at::Tensor* correction) {
  const char* names[3] = {"out", "previous", "change"};
  const OptTensor* ts[3] = {&out, &previous, &change};
  for (int k = 0; k < 3; ++k) {
    if (!ts[k]->has_value()) continue;
    const at::Tensor& t = **ts[k];
    check_output(op, names[k], t, est, "estimate");
    check_no_overlap(op, names[k], t, "estimate", est);
    for (int j = 0; j < k; ++j)
      if (ts[j]->has_value()) check_no_overlap(op, names[k], t, names[j], **ts[j]);
    if (correction) {
      if (k == 0) check_same_or_disjoint(op, "out", t, "correction", *correction);
      else check_no_overlap(op, names[k], t, "correction", *correction);
    }
  }
}

template <typename T>
T* opt_ptr(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace

// image [N, 1, d, h, w], blurred [N, 1, D, H, W] (d <= D, h <= H, w <= W) -> ratio like blurred;
// written into out when given (out may be blurred itself), else into a new tensor.
at::Tensor rl_ratio_forward(const at::Tensor& image, const at::Tensor& blurred, double background,
                            double eps, const OptTensor& out) {
  const char* op = "rl_ratio";
  check_single(op, "blurred", blurred);
  check_volume(op, "image", image);
  check_same(op, "image", image, blurred, "blurred");
  RLN_CHECK(image.size(1) == 1 && image.size(0) == blurred.size(0) &&
                  image.size(2) <= blurred.size(2) && image.size(3) <= blurred.size(3) &&
                  image.size(4) <= blurred.size(4),
              "rln_fast.", op, ": 'image' must be (N, 1, d, h, w) with N and d, h, w <= those of "
              "'blurred' ", shape_str(blurred), ", got ", shape_str(image));
  check_finite(op, "background", background);
  check_positive(op, "eps", eps);
  at::Tensor o;
  if (out.has_value()) {
    check_output(op, "out", *out, blurred, "blurred");
    check_same_or_disjoint(op, "out", *out, "blurred", blurred);
    check_no_overlap(op, "out", *out, "image", image);
    o = *out;
  }
  RLN_FAST_DEVICE_GUARD(blurred);
  const at::Tensor ic = image.contiguous();
  const at::Tensor bc = out.has_value() && out->is_same(blurred) ? blurred : blurred.contiguous();
  if (!o.defined()) o = at::empty_like(bc, at::MemoryFormat::Contiguous);
  RlRatioParams p;
  p.N = blurred.size(0), p.D = blurred.size(2), p.H = blurred.size(3), p.W = blurred.size(4);
  p.d = image.size(2), p.h = image.size(3), p.w = image.size(4);
  p.background = background, p.eps = eps;
  if (o.numel() == 0) return o;
  RLN_DISPATCH_FLOATING_TYPES(blurred.scalar_type(), "rln_fast.rl_ratio", [&] {
    if (blurred.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
      check_launch(cuda::launch_rl_ratio_forward(p, ic.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(),
                                                 o.data_ptr<scalar_t>(),
                                                 at::cuda::getCurrentCUDAStream()),
                   op);
#endif
    } else {
      cpu::rl_ratio_forward(p, ic.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(),
                            o.data_ptr<scalar_t>());
    }
  });
  return o;
}

// step <- the accelerated prediction from estimate and step (both [N, 1, D, H, W]), in place.
void rl_predict_forward(const at::Tensor& estimate, const at::Tensor& step, double a, double tiny) {
  const char* op = "rl_predict";
  check_single(op, "estimate", estimate);
  check_output(op, "step", step, estimate, "estimate");
  check_no_overlap(op, "step", step, "estimate", estimate);
  check_finite(op, "a", a);
  check_positive(op, "tiny", tiny);
  RLN_FAST_DEVICE_GUARD(estimate);
  const at::Tensor ec = estimate.contiguous();
  const int64_t n = ec.numel();
  if (n == 0) return;
  RLN_DISPATCH_FLOATING_TYPES(estimate.scalar_type(), "rln_fast.rl_predict", [&] {
    if (estimate.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
      check_launch(cuda::launch_rl_predict_forward(n, ec.data_ptr<scalar_t>(),
                                                   step.data_ptr<scalar_t>(), a, tiny,
                                                   at::cuda::getCurrentCUDAStream()),
                   op);
#endif
    } else {
      cpu::rl_predict_forward(n, ec.data_ptr<scalar_t>(), step.data_ptr<scalar_t>(), a, tiny);
    }
  });
}

// estimate, correction [N, 1, D, H, W] -> {new estimate (out, or a new tensor), dots [2] float64}.
// tv_periodic: the TV neighbours wrap around (the FFT job is circular), else they are 0 outside.
std::vector<at::Tensor> rl_update_forward(const at::Tensor& estimate, const at::Tensor& correction,
                                          const OptTensor& out, const OptTensor& previous,
                                          const OptTensor& change, const OptTensor& weight_table,
                                          const OptTensor& weight_bounds, double weight_threshold,
                                          double tv, double tv_eps, double clamp_min,
                                          bool tv_periodic, const OptTensor& weight_dense) {
  const char* op = "rl_update";
  check_single(op, "estimate", estimate);
  check_like(op, "correction", correction, estimate, "estimate");
  check_tv(op, tv, tv_eps, clamp_min);
  check_update_outputs(op, estimate, out, previous, change, &correction);
  RLN_FAST_DEVICE_GUARD(estimate);
  at::Tensor table_c, bounds_c, dense_c;
  RlUpdateParams p;
  p.weights = check_weights(op, weight_table, weight_bounds, weight_threshold, weight_dense,
                            estimate, table_c, bounds_c, dense_c);
  p.N = estimate.size(0), p.D = estimate.size(2), p.H = estimate.size(3), p.W = estimate.size(4);
  p.tv = tv, p.tv_eps = tv_eps, p.clamp_min = clamp_min, p.tv_periodic = tv_periodic;
  const at::Tensor ec = estimate.contiguous();
  const bool in_place = out.has_value() && out->is_same(correction);
  const at::Tensor cc = in_place ? correction : correction.contiguous();
  at::Tensor o = out.has_value() ? *out : at::empty_like(ec, at::MemoryFormat::Contiguous);
  at::Tensor dots = new_zeros({2}, estimate.options().dtype(at::kDouble));
  if (o.numel() == 0) return {o, dots};
  RLN_DISPATCH_FLOATING_TYPES(estimate.scalar_type(), "rln_fast.rl_update", [&] {
    if (estimate.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
      at::Tensor ws = new_empty({int64_t(cuda::rl_update_workspace())}, dots.options());
      check_launch(cuda::launch_rl_update_forward(
                       p, ec.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                       opt_ptr<scalar_t>(previous), opt_ptr<scalar_t>(change),
                       dots.data_ptr<double>(), ws.data_ptr<double>(),
                       at::cuda::getCurrentCUDAStream()),
                   op);
#endif
    } else {
      cpu::rl_update_forward(p, ec.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(),
                             o.data_ptr<scalar_t>(), opt_ptr<scalar_t>(previous),
                             opt_ptr<scalar_t>(change), dots.data_ptr<double>());
    }
  });
  return {o, dots};
}

namespace {

// psf [pz, py, px] with odd sides, of the estimate's dtype and device.
void check_psf(const char* op, const at::Tensor& psf, const at::Tensor& est) {
  RLN_CHECK(psf.dim() == 3, "rln_fast.", op, ": 'psf' must be 3-D (pz, py, px), got ", psf.dim(),
              "-D");
  check_same(op, "psf", psf, est, "estimate");
  RLN_CHECK(psf.size(0) % 2 == 1 && psf.size(1) % 2 == 1 && psf.size(2) % 2 == 1, "rln_fast.",
              op, ": 'psf' must have odd sides (centre voxel p // 2), got ", shape_str(psf));
}

// image-sized [N, 1, d, h, w] centred in the estimate [N, 1, D, H, W]: D - d even and >= 0.
PsfConvParams psf_conv_params(const char* op, const char* img_arg, const at::Tensor& img,
                              const at::Tensor& est, const at::Tensor& psf) {
  check_volume(op, img_arg, img);
  check_same(op, img_arg, img, est, "estimate");
  bool ok = img.size(0) == est.size(0) && img.size(1) == 1;
  for (int a = 2; a < 5; ++a) {
    const int64_t diff = est.size(a) - img.size(a);
    ok = ok && diff >= 0 && diff % 2 == 0;
  }
  RLN_CHECK(ok, "rln_fast.", op, ": '", img_arg,
              "' must be (N, 1, d, h, w) centred in 'estimate' ", shape_str(est),
              " (each of D - d, H - h, W - w even and >= 0), got ", shape_str(img));
  PsfConvParams c;
  c.N = est.size(0), c.D = est.size(2), c.H = est.size(3), c.W = est.size(4);
  c.d = img.size(2), c.h = img.size(3), c.w = img.size(4);
  c.pz = psf.size(0), c.py = psf.size(1), c.px = psf.size(2);
  c.sz = (c.D - c.d) / 2 + c.pz / 2, c.sy = (c.H - c.h) / 2 + c.py / 2, c.sx = (c.W - c.w) / 2 + c.px / 2;
  return c;
}

}  // namespace

// image [N, 1, d, h, w], estimate [N, 1, D, H, W], psf [pz, py, px] -> ratio [N, 1, d, h, w].
at::Tensor psf_conv_ratio_forward(const at::Tensor& image, const at::Tensor& estimate,
                                  const at::Tensor& psf, double background, double eps) {
  const char* op = "psf_conv_ratio";
  check_single(op, "estimate", estimate);
  check_psf(op, psf, estimate);
  PsfConvParams c = psf_conv_params(op, "image", image, estimate, psf);
  check_finite(op, "background", background);
  check_positive(op, "eps", eps);
  c.background = background, c.eps = eps;
  RLN_FAST_DEVICE_GUARD(estimate);
  const at::Tensor ic = image.contiguous(), ec = estimate.contiguous(), kc = psf.contiguous();
  at::Tensor o = at::empty_like(ic, at::MemoryFormat::Contiguous);
  if (o.numel() == 0) return o;
  RLN_DISPATCH_FLOATING_TYPES(estimate.scalar_type(), "rln_fast.psf_conv_ratio", [&] {
    if (estimate.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
      check_launch(cuda::launch_psf_conv_ratio_forward(
                       c, ic.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                       o.data_ptr<scalar_t>(), at::cuda::getCurrentCUDAStream()),
                   op);
#endif
    } else {
      cpu::psf_conv_ratio_forward(c, ic.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(),
                                  kc.data_ptr<scalar_t>(), o.data_ptr<scalar_t>());
    }
  });
  return o;
}

// estimate [N, 1, D, H, W], ratio [N, 1, d, h, w], psf -> {new estimate, dots [2] float64}. The TV
// neighbours are 0 beyond the estimate, as everything else in the zero-padded direct job.
std::vector<at::Tensor> psf_conv_update_forward(const at::Tensor& estimate, const at::Tensor& ratio,
                                                const at::Tensor& psf, const OptTensor& out,
                                                const OptTensor& previous, const OptTensor& change,
                                                const OptTensor& weight_table,
                                                const OptTensor& weight_bounds,
                                                double weight_threshold, double tv, double tv_eps,
                                                double clamp_min, const OptTensor& weight_dense) {
  const char* op = "psf_conv_update";
  check_single(op, "estimate", estimate);
  check_psf(op, psf, estimate);
  const PsfConvParams c = psf_conv_params(op, "ratio", ratio, estimate, psf);
  check_tv(op, tv, tv_eps, clamp_min);
  check_update_outputs(op, estimate, out, previous, change, nullptr);
  if (out.has_value()) check_no_overlap(op, "out", *out, "ratio", ratio);
  if (previous.has_value()) check_no_overlap(op, "previous", *previous, "ratio", ratio);
  if (change.has_value()) check_no_overlap(op, "change", *change, "ratio", ratio);
  RLN_FAST_DEVICE_GUARD(estimate);
  at::Tensor table_c, bounds_c, dense_c;
  RlUpdateParams p;
  p.weights = check_weights(op, weight_table, weight_bounds, weight_threshold, weight_dense,
                            estimate, table_c, bounds_c, dense_c);
  p.N = c.N, p.D = c.D, p.H = c.H, p.W = c.W;
  p.tv = tv, p.tv_eps = tv_eps, p.clamp_min = clamp_min;
  const at::Tensor ec = estimate.contiguous(), rc = ratio.contiguous(), kc = psf.contiguous();
  at::Tensor o = out.has_value() ? *out : at::empty_like(ec, at::MemoryFormat::Contiguous);
  at::Tensor dots = new_zeros({2}, estimate.options().dtype(at::kDouble));
  if (o.numel() == 0) return {o, dots};
  RLN_DISPATCH_FLOATING_TYPES(estimate.scalar_type(), "rln_fast.psf_conv_update", [&] {
    if (estimate.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
      at::Tensor ws = new_empty({int64_t(cuda::rl_update_workspace())}, dots.options());
      check_launch(cuda::launch_psf_conv_update_forward(
                       c, p, ec.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(),
                       kc.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), opt_ptr<scalar_t>(previous),
                       opt_ptr<scalar_t>(change), dots.data_ptr<double>(), ws.data_ptr<double>(),
                       at::cuda::getCurrentCUDAStream()),
                   op);
#endif
    } else {
      cpu::psf_conv_update_forward(c, p, ec.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(),
                                   kc.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                                   opt_ptr<scalar_t>(previous), opt_ptr<scalar_t>(change),
                                   dots.data_ptr<double>());
    }
  });
  return {o, dots};
}

}  // namespace rln_fast
