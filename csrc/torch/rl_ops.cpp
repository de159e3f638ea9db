// rl_divide / rl_multiply torch glue: checks, allocation, device guard and stream, dispatch.
#include <torch/extension.h>

#include <vector>

#include "checks.h"
#include "rln_fast/kernels_cpu.h"

#ifdef RLN_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "rln_fast/kernels_cuda.h"
#endif

namespace rln_fast {
namespace {

// Checks (single [N, 1, D, H, W], multi [N, C, D, H, W]) and returns N, C, S.
void check_rl_args(const char* op, const char* a_name, const at::Tensor& a, const char* m_name,
                   const at::Tensor& m, int64_t& N, int64_t& C, int64_t& S) {
  check_volume(op, a_name, a);
  check_device_supported(op, a);
  check_volume(op, m_name, m);
  check_same(op, m_name, m, a, a_name);
  check_spatial(op, m_name, m, a, a_name);
  RLN_CHECK(a.size(1) == 1, "rln_fast.", op, ": '", a_name, "' must have 1 channel, got ",
              a.size(1));
  RLN_CHECK(m.size(1) >= 1, "rln_fast.", op, ": '", m_name,
              "' must have at least 1 channel, got 0");
  N = a.size(0), C = m.size(1), S = a.size(2) * a.size(3) * a.size(4);
}

template <typename T>
T* ptr_or_null(at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

at::Tensor rl_divide_forward(const at::Tensor& x, const at::Tensor& fp, double eps, double scale,
                             double shift) {
  RlDivideParams p;
  check_rl_args("rl_divide", "x", x, "fp", fp, p.N, p.C, p.S);
  p.eps = eps, p.scale = scale, p.shift = shift;
  RLN_FAST_DEVICE_GUARD(x);
  const at::Tensor xc = x.contiguous(), fc = fp.contiguous();
  at::Tensor out = at::empty_like(xc);
  RLN_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rln_fast.rl_divide", [&] {
    if (x.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
      check_launch(cuda::launch_rl_divide_forward(p, xc.data_ptr<scalar_t>(), fc.data_ptr<scalar_t>(),
                                                out.data_ptr<scalar_t>(),
                                                at::cuda::getCurrentCUDAStream()),
                 "rl_divide");
#endif
    } else {
      cpu::rl_divide_forward(p, xc.data_ptr<scalar_t>(), fc.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>());
    }
  });
  return out;
}

std::vector<at::Tensor> rl_divide_backward(const at::Tensor& dy, const at::Tensor& x,
                                           const at::Tensor& fp, double eps, double scale,
                                           double shift, bool paper, bool need_x, bool need_fp) {
  RlDivideParams p;
  check_rl_args("rl_divide_backward", "x", x, "fp", fp, p.N, p.C, p.S);
  check_same("rl_divide_backward", "grad_out", dy, x, "x");
  RLN_CHECK(dy.sizes() == x.sizes(), "rln_fast.rl_divide_backward: 'grad_out' must be ",
              shape_str(x), ", got ", shape_str(dy));
  p.eps = eps, p.scale = scale, p.shift = shift, p.paper = paper;
  RLN_FAST_DEVICE_GUARD(x);
  const at::Tensor g = dy.contiguous(), xc = x.contiguous(), fc = fp.contiguous();
  at::Tensor dx = need_x ? at::empty_like(xc) : at::Tensor();
  at::Tensor dfp = need_fp ? at::empty_like(fc) : at::Tensor();
  RLN_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rln_fast.rl_divide_backward", [&] {
    if (x.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
      check_launch(cuda::launch_rl_divide_backward(
                     p, g.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), fc.data_ptr<scalar_t>(),
                     ptr_or_null<scalar_t>(dx), ptr_or_null<scalar_t>(dfp),
                     at::cuda::getCurrentCUDAStream()),
                 "rl_divide_backward");
#endif
    } else {
      cpu::rl_divide_backward(p, g.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(),
                              fc.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(dx),
                              ptr_or_null<scalar_t>(dfp));
    }
  });
  const auto empty = new_empty({0}, x.options());
  return {need_x ? dx : empty, need_fp ? dfp : empty};
}

at::Tensor rl_multiply_forward(const at::Tensor& e, const at::Tensor& bp, double offset) {
  RlMultiplyParams p;
  check_rl_args("rl_multiply", "e", e, "bp", bp, p.N, p.C, p.S);
  p.offset = offset;
  RLN_FAST_DEVICE_GUARD(e);
  const at::Tensor ec = e.contiguous(), bc = bp.contiguous();
  at::Tensor out = at::empty_like(ec);
  RLN_DISPATCH_FLOATING_TYPES(e.scalar_type(), "rln_fast.rl_multiply", [&] {
    if (e.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
      check_launch(cuda::launch_rl_multiply_forward(p, ec.data_ptr<scalar_t>(),
                                                  bc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                  at::cuda::getCurrentCUDAStream()),
                 "rl_multiply");
#endif
    } else {
      cpu::rl_multiply_forward(p, ec.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>());
    }
  });
  return out;
}

std::vector<at::Tensor> rl_multiply_backward(const at::Tensor& dy, const at::Tensor& e,
                                             const at::Tensor& bp, double offset, bool paper,
                                             bool need_e, bool need_bp) {
  RlMultiplyParams p;
  check_rl_args("rl_multiply_backward", "e", e, "bp", bp, p.N, p.C, p.S);
  check_same("rl_multiply_backward", "grad_out", dy, e, "e");
  RLN_CHECK(dy.sizes() == e.sizes(), "rln_fast.rl_multiply_backward: 'grad_out' must be ",
              shape_str(e), ", got ", shape_str(dy));
  p.offset = offset, p.paper = paper;
  RLN_FAST_DEVICE_GUARD(e);
  const at::Tensor g = dy.contiguous(), ec = e.contiguous(), bc = bp.contiguous();
  at::Tensor de = need_e ? at::empty_like(ec) : at::Tensor();
  at::Tensor dbp = need_bp ? at::empty_like(bc) : at::Tensor();
  RLN_DISPATCH_FLOATING_TYPES(e.scalar_type(), "rln_fast.rl_multiply_backward", [&] {
    if (e.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
      check_launch(cuda::launch_rl_multiply_backward(
                     p, g.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(),
                     ptr_or_null<scalar_t>(de), ptr_or_null<scalar_t>(dbp),
                     at::cuda::getCurrentCUDAStream()),
                 "rl_multiply_backward");
#endif
    } else {
      cpu::rl_multiply_backward(p, g.data_ptr<scalar_t>(), ec.data_ptr<scalar_t>(),
                                bc.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(de),
                                ptr_or_null<scalar_t>(dbp));
    }
  });
  const auto empty = new_empty({0}, e.options());
  return {need_e ? de : empty, need_bp ? dbp : empty};
}

}  // namespace rln_fast
