// conv3d torch glue: argument checks, allocation, device guard and stream, CPU/CUDA dispatch.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "checks.h"
#include "rln_fast/kernels_cpu.h"

#ifdef RLN_FAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "rln_fast/kernels_cuda.h"
#endif

namespace rln_fast {
namespace {

struct ConvCall {
  Conv3dParams p;
  std::vector<at::Tensor> inputs;  // contiguous
  at::Tensor w, b, skip;           // contiguous; b, skip undefined when absent
};

ConvCall check_conv3d_args(const std::vector<at::Tensor>& inputs, const at::Tensor& w,
                           const c10::optional<at::Tensor>& b, int64_t act,
                           const c10::optional<at::Tensor>& skip) {
  constexpr const char* op = "conv3d";
  RLN_CHECK(!inputs.empty() && static_cast<int>(inputs.size()) <= kMaxConvInputs, "rln_fast.",
              op, ": 'inputs' must hold 1 to ", kMaxConvInputs, " tensors, got ", inputs.size());
  ConvCall c;
  const at::Tensor& x0 = inputs[0];
  check_volume(op, "inputs[0]", x0);
  check_device_supported(op, x0);
  c.p.n_inputs = static_cast<int>(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string arg = "inputs[" + std::to_string(i) + "]";
    check_volume(op, arg.c_str(), inputs[i]);
    check_same(op, arg.c_str(), inputs[i], x0, "inputs[0]");
    check_spatial(op, arg.c_str(), inputs[i], x0, "inputs[0]");
    c.p.in_channels[i] = inputs[i].size(1);
    c.p.Cin += inputs[i].size(1);
    c.inputs.push_back(inputs[i].contiguous());
  }
  // A conv over no channels would read no input at all (the CUDA kernel has nothing to stage).
  RLN_CHECK(c.p.Cin > 0, "rln_fast.", op, ": the inputs must have at least 1 channel in all, got 0");
  RLN_CHECK(w.dim() == 5, "rln_fast.", op,
              ": 'weight' must be 5-D (Cout, Cin, 3, 3, 3), got ", w.dim(), "-D");
  check_same(op, "weight", w, x0, "inputs[0]");
  RLN_CHECK(w.size(2) == 3 && w.size(3) == 3 && w.size(4) == 3, "rln_fast.", op,
              ": 'weight' must have a 3x3x3 kernel, got ", w.size(2), "x", w.size(3), "x",
              w.size(4));
  RLN_CHECK(w.size(0) > 0, "rln_fast.", op,
              ": 'weight' must have at least 1 output channel, got 0");
  RLN_CHECK(w.size(1) == c.p.Cin, "rln_fast.", op, ": 'weight' expects ", w.size(1),
              " input channels, but the inputs have ", c.p.Cin, " channels in all");
  RLN_CHECK(act == kActNone || act == kActSoftplus, "rln_fast.", op,
              ": 'act' must be 0 (none) or 1 (softplus), got ", act);
  c.p.N = x0.size(0), c.p.Cout = w.size(0), c.p.D = x0.size(2), c.p.H = x0.size(3),
  c.p.W = x0.size(4), c.p.act = static_cast<int>(act);
  c.w = w.contiguous();
  if (b.has_value() && b->defined()) {
    check_same(op, "bias", *b, x0, "inputs[0]");
    RLN_CHECK(b->dim() == 1 && b->size(0) == c.p.Cout, "rln_fast.", op, ": 'bias' must be (",
                c.p.Cout, "), got ", shape_str(*b));
    c.b = b->contiguous();
    c.p.has_bias = true;
  }
  if (skip.has_value() && skip->defined()) {
    check_volume(op, "skip", *skip);
    check_same(op, "skip", *skip, x0, "inputs[0]");
    check_spatial(op, "skip", *skip, x0, "inputs[0]");
    RLN_CHECK(skip->size(1) == 1, "rln_fast.", op, ": 'skip' must have 1 channel, got ",
                skip->size(1));
    c.skip = skip->contiguous();
    c.p.has_skip = true;
  }
  return c;
}

template <typename T>
Conv3dPtrs<T> pointers(const ConvCall& c) {
  Conv3dPtrs<T> q;
  for (size_t i = 0; i < c.inputs.size(); ++i) q.in[i] = c.inputs[i].data_ptr<T>();
  q.w = c.w.data_ptr<T>();
  q.b = c.b.defined() ? c.b.data_ptr<T>() : nullptr;
  q.skip = c.skip.defined() ? c.skip.data_ptr<T>() : nullptr;
  return q;
}

// Launches the forward conv of `c` into out (and preact if defined), on c's device, as one call.
void launch_forward(const ConvCall& c, at::Tensor& out, at::Tensor& preact) {
  RLN_DISPATCH_FLOATING_TYPES(c.w.scalar_type(), "rln_fast.conv3d", [&] {
    Conv3dPtrs<scalar_t> q = pointers<scalar_t>(c);
    q.out = out.data_ptr<scalar_t>();
    q.preact = preact.defined() ? preact.data_ptr<scalar_t>() : nullptr;
    if (out.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
      check_launch(cuda::launch_conv3d_forward(c.p, q, at::cuda::getCurrentCUDAStream()),
                 "conv3d");
#endif
    } else {
      cpu::conv3d_forward(c.p, q);
    }
  });
}

// Shared-memory limit (bytes per block) that replaces the device's on every device when > 0, so
// the chunked path below runs, and is tested, on the CPU too (rln_fast._C._set_conv3d_smem_limit).
std::atomic<int64_t> g_smem_limit_override{0};

// Input channels one forward launch may read: the CUDA kernel stages all of its weights in
// shared memory, so past the device's opt-in limit the call is split (the CPU has no limit).
int64_t cin_per_launch(const ConvCall& c) {
  int64_t limit = g_smem_limit_override.load();
#ifdef RLN_FAST_WITH_CUDA
  if (limit <= 0 && c.w.is_cuda()) {
    int v = 0;
    const cudaError_t err =
        cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, c.w.get_device());
    RLN_CHECK(err == cudaSuccess, "rln_fast.conv3d: cannot read the device's shared memory limit: ",
              cudaGetErrorString(err));
    limit = v;
  }
#endif
  if (limit <= 0) return c.p.Cin;
  const int64_t n = conv3d_max_cin_per_launch(c.p.Cout, c.w.element_size(), static_cast<size_t>(limit));
  RLN_CHECK(n > 0, "rln_fast.conv3d: ", limit, " bytes of shared memory per block do not hold even one "
            "input channel's weights and input tiles (", c.p.Cout, " output channels)");
  return n;
}

// The part of c that reads only concatenated input channels [c0, c0 + n): no bias, act or skip.
ConvCall channel_slice(const ConvCall& c, int64_t c0, int64_t n) {
  ConvCall s;
  s.p = c.p;
  s.p.Cin = n, s.p.n_inputs = 0, s.p.act = kActNone, s.p.has_bias = false, s.p.has_skip = false;
  for (int i = 0; i < kMaxConvInputs; ++i) s.p.in_channels[i] = 0;
  int64_t off = 0;
  for (size_t i = 0; i < c.inputs.size(); ++i) {
    const int64_t ch = c.p.in_channels[i], lo = std::max(c0, off), hi = std::min(c0 + n, off + ch);
    if (lo < hi) {
      s.p.in_channels[s.p.n_inputs++] = hi - lo;
      s.inputs.push_back(c.inputs[i].narrow(1, lo - off, hi - lo).contiguous());
    }
    off += ch;
  }
  s.w = c.w.narrow(1, c0, n).contiguous();
  return s;
}

// conv + bias of c (before the activation) as the sum of launches over chunks of `per` input
// channels: the fallback for calls whose weights exceed one block's shared memory.
at::Tensor chunked_preact(const ConvCall& c, int64_t per) {
  at::Tensor pre, part, none;
  for (int64_t c0 = 0; c0 < c.p.Cin; c0 += per) {
    const ConvCall s = channel_slice(c, c0, std::min(per, c.p.Cin - c0));
    at::Tensor& dst = pre.defined() ? part : pre;
    if (!dst.defined()) dst = new_empty({c.p.N, c.p.Cout, c.p.D, c.p.H, c.p.W}, c.w.options());
    launch_forward(s, dst, none);
    if (&dst == &part) pre.add_(part);
  }
  if (c.b.defined()) pre.add_(c.b.view_symint(c10::fromIntArrayRefUnchecked({1, -1, 1, 1, 1})));
  return pre;
}

// softplus as the kernels compute it (common.h): max(x, 0) + log1p(exp(-|x|)).
at::Tensor softplus_t(const at::Tensor& x) {
  return x.clamp_min(0) + at::log1p(at::exp(-x.abs()));
}

// Runs the forward conv of `c` into out (and preact if defined), on c's device.
void run_forward(const ConvCall& c, at::Tensor& out, at::Tensor& preact) {
  const int64_t per = cin_per_launch(c);
  if (c.p.Cin <= per) return launch_forward(c, out, preact);
  const at::Tensor pre = chunked_preact(c, per);
  if (preact.defined()) preact.copy_(pre);
  at::Tensor y = c.p.act == kActSoftplus ? softplus_t(pre) : pre;
  if (c.p.has_skip) y = y + softplus_t(c.skip);
  out.copy_(y);
}

}  // namespace

void set_conv3d_smem_limit(int64_t bytes) {
  RLN_CHECK(bytes >= 0, "rln_fast._C._set_conv3d_smem_limit: 'bytes' must be >= 0, got ", bytes);
  g_smem_limit_override.store(bytes);
}

int64_t max_cin_per_launch(int64_t cout, int64_t elem_size, int64_t smem_limit) {
  RLN_CHECK(cout > 0 && (elem_size == 4 || elem_size == 8) && smem_limit >= 0,
            "rln_fast._C.conv3d_max_cin_per_launch: needs cout > 0, elem_size 4 or 8 and "
            "smem_limit >= 0, got ", cout, ", ", elem_size, ", ", smem_limit);
  return conv3d_max_cin_per_launch(cout, static_cast<size_t>(elem_size), static_cast<size_t>(smem_limit));
}

// Returns (out, preact); preact is conv + bias before the activation, saved for backward when
// asked, else an empty tensor.
std::vector<at::Tensor> conv3d_forward(const std::vector<at::Tensor>& inputs, const at::Tensor& w,
                                       const c10::optional<at::Tensor>& b, int64_t act,
                                       const c10::optional<at::Tensor>& skip, bool save_preact) {
  ConvCall c = check_conv3d_args(inputs, w, b, act, skip);
  RLN_FAST_DEVICE_GUARD(c.w);
  const auto opts = c.w.options();
  at::Tensor out = new_empty({c.p.N, c.p.Cout, c.p.D, c.p.H, c.p.W}, opts);
  at::Tensor preact = save_preact ? at::empty_like(out) : at::Tensor();
  run_forward(c, out, preact);
  return {out, save_preact ? preact : new_empty({0}, opts)};
}

namespace {

// The RL operand of a fused conv3d_rl_* call: [N, 1, D, H, W] like the conv's inputs.
at::Tensor check_rl_operand(const char* op, const char* arg, const at::Tensor& a, const ConvCall& c) {
  check_volume(op, arg, a);
  check_same(op, arg, a, c.inputs[0], "inputs[0]");
  check_spatial(op, arg, a, c.inputs[0], "inputs[0]");
  RLN_CHECK(a.size(1) == 1, "rln_fast.", op, ": '", arg, "' must have 1 channel, got ", a.size(1));
  return a.contiguous();
}

// One CUDA block holds every output channel of its voxels, so their mean never leaves registers.
void check_rl_cout(const char* op, const ConvCall& c) {
  RLN_CHECK(c.p.Cout <= 8, "rln_fast.", op, ": 'weight' may have at most 8 output channels, got ",
            c.p.Cout);
}

at::Tensor run_conv3d_rl(const char* op, ConvCall& c, const at::Tensor& a, const ConvRlParams& e) {
  RLN_FAST_DEVICE_GUARD(c.w);
  const int64_t per = cin_per_launch(c);
  if (c.p.Cin > per) {  // the same epilogue on the channel-chunked conv (see run_forward)
    const at::Tensor pre = chunked_preact(c, per);
    at::Tensor m = (c.p.act == kActSoftplus ? softplus_t(pre) : pre).mean(1, true);
    if (c.p.has_skip) m = m + softplus_t(c.skip);
    if (e.mode == kEpiDivide) return a * e.scale / (m + e.eps) + e.shift;
    return a.defined() ? a * (m + e.offset) : m + e.offset;
  }
  at::Tensor out = new_empty({c.p.N, 1, c.p.D, c.p.H, c.p.W}, c.w.options());
  RLN_DISPATCH_FLOATING_TYPES(c.w.scalar_type(), "rln_fast.conv3d_rl", [&] {
    Conv3dPtrs<scalar_t> q = pointers<scalar_t>(c);
    q.out = out.data_ptr<scalar_t>();
    if (out.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
      check_launch(cuda::launch_conv3d_rl_forward(c.p, q, e, a.defined() ? a.data_ptr<scalar_t>() : nullptr,
                                                at::cuda::getCurrentCUDAStream()),
                 op);
#endif
    } else {
      cpu::conv3d_rl_forward(c.p, q, e, a.defined() ? a.data_ptr<scalar_t>() : nullptr);
    }
  });
  return out;
}

}  // namespace

// scale * x / (mean_c(act(conv(inputs) + b) + softplus(skip)) + eps) + shift -> [N, 1, D, H, W].
at::Tensor conv3d_rl_divide_forward(const std::vector<at::Tensor>& inputs, const at::Tensor& w,
                                    const c10::optional<at::Tensor>& b, int64_t act,
                                    const c10::optional<at::Tensor>& skip, const at::Tensor& x,
                                    double eps, double scale, double shift) {
  ConvCall c = check_conv3d_args(inputs, w, b, act, skip);
  check_rl_cout("conv3d_rl_divide", c);
  const at::Tensor xc = check_rl_operand("conv3d_rl_divide", "x", x, c);
  ConvRlParams e;
  e.mode = kEpiDivide, e.eps = eps, e.scale = scale, e.shift = shift;
  return run_conv3d_rl("conv3d_rl_divide", c, xc, e);
}

// e * (mean_c(act(conv(inputs) + b)) + offset) -> [N, 1, D, H, W]; e absent reads as 1.
at::Tensor conv3d_rl_multiply_forward(const std::vector<at::Tensor>& inputs, const at::Tensor& w,
                                      const c10::optional<at::Tensor>& b, int64_t act,
                                      const c10::optional<at::Tensor>& e, double offset) {
  ConvCall c = check_conv3d_args(inputs, w, b, act, c10::nullopt);
  check_rl_cout("conv3d_rl_multiply", c);
  const bool has_e = e.has_value() && e->defined();
  const at::Tensor ec = has_e ? check_rl_operand("conv3d_rl_multiply", "e", *e, c) : at::Tensor();
  ConvRlParams ep;
  ep.mode = kEpiMultiply, ep.offset = offset;
  return run_conv3d_rl("conv3d_rl_multiply", c, ec, ep);
}

// Gradients of conv3d_forward. need: [each input..., weight, bias, skip]. Returns a flat list in
// the same order; entries not needed are empty tensors.
std::vector<at::Tensor> conv3d_backward(const at::Tensor& dy, const std::vector<at::Tensor>& inputs,
                                        const at::Tensor& w, const c10::optional<at::Tensor>& b,
                                        int64_t act, const c10::optional<at::Tensor>& skip,
                                        const at::Tensor& preact, const std::vector<bool>& need) {
  ConvCall c = check_conv3d_args(inputs, w, b, act, skip);
  const size_t n_in = inputs.size();
  RLN_CHECK(need.size() == n_in + 3, "rln_fast.conv3d_backward: 'need' must have ", n_in + 3,
              " entries, got ", need.size());
  check_volume("conv3d_backward", "grad_out", dy);
  check_same("conv3d_backward", "grad_out", dy, c.w, "weight");
  RLN_CHECK(dy.size(0) == c.p.N && dy.size(1) == c.p.Cout && dy.size(2) == c.p.D &&
                  dy.size(3) == c.p.H && dy.size(4) == c.p.W,
              "rln_fast.conv3d_backward: 'grad_out' must be (", c.p.N, ", ", c.p.Cout, ", ",
              c.p.D, ", ", c.p.H, ", ", c.p.W, "), got ", shape_str(dy));
  if (act == kActSoftplus)
    RLN_CHECK(preact.sizes() == dy.sizes(),
                "rln_fast.conv3d_backward: the softplus gradient needs the saved pre-activation; "
                "call conv3d with save_preact=True when gradients are required");
  RLN_FAST_DEVICE_GUARD(c.w);
  const auto opts = c.w.options();
  const at::Tensor g = dy.contiguous();
  const at::Tensor pre = act == kActSoftplus ? preact.contiguous() : at::Tensor();
  const bool need_skip = need[n_in + 2] && c.p.has_skip;
  at::Tensor dz = at::empty_like(g);
  at::Tensor dskip = need_skip ? at::empty_like(c.skip) : at::Tensor();
  RLN_DISPATCH_FLOATING_TYPES(c.w.scalar_type(), "rln_fast.conv3d_backward", [&] {
    const scalar_t* pp = pre.defined() ? pre.data_ptr<scalar_t>() : nullptr;
    const scalar_t* sk = c.skip.defined() ? c.skip.data_ptr<scalar_t>() : nullptr;
    scalar_t* ds = need_skip ? dskip.data_ptr<scalar_t>() : nullptr;
    if (g.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
      check_launch(cuda::launch_conv3d_act_backward(c.p, g.data_ptr<scalar_t>(), pp, sk,
                                                  dz.data_ptr<scalar_t>(), ds,
                                                  at::cuda::getCurrentCUDAStream()),
                 "conv3d_backward");
#endif
    } else {
      cpu::conv3d_act_backward(c.p, g.data_ptr<scalar_t>(), pp, sk, dz.data_ptr<scalar_t>(), ds);
    }
  });

  std::vector<at::Tensor> grads(n_in + 3);
  bool any_input = false;
  for (size_t i = 0; i < n_in; ++i) any_input = any_input || need[i];
  if (any_input) {
    // The input gradient is the same conv on dz with channel-swapped, flipped weights.
    ConvCall t;
    t.p = c.p;
    t.p.Cin = c.p.Cout, t.p.Cout = c.p.Cin, t.p.n_inputs = 1, t.p.in_channels[0] = c.p.Cout;
    for (int i = 1; i < kMaxConvInputs; ++i) t.p.in_channels[i] = 0;
    t.p.act = kActNone, t.p.has_bias = false, t.p.has_skip = false;
    t.inputs = {dz};
    t.w = c.w.transpose(0, 1).flip({2, 3, 4}).contiguous();
    at::Tensor dx = new_empty({c.p.N, c.p.Cin, c.p.D, c.p.H, c.p.W}, opts), none;
    run_forward(t, dx, none);
    int64_t off = 0;
    for (size_t i = 0; i < n_in; ++i) {
      const int64_t ch = c.p.in_channels[i];
      // A clone, not a view: outputs of a custom op must not alias each other.
      if (need[i]) grads[i] = n_in == 1 ? dx : dx.narrow(1, off, ch).clone();
      off += ch;
    }
  }
  if (need[n_in]) {
    at::Tensor dw = at::empty_like(c.w);
    RLN_DISPATCH_FLOATING_TYPES(c.w.scalar_type(), "rln_fast.conv3d_wgrad", [&] {
      const Conv3dPtrs<scalar_t> q = pointers<scalar_t>(c);
      if (dz.is_cuda()) {
#ifdef RLN_FAST_WITH_CUDA
        at::Tensor ws = new_empty({static_cast<int64_t>(cuda::conv3d_wgrad_workspace<scalar_t>(c.p))},
                                  opts);
        check_launch(cuda::launch_conv3d_wgrad(c.p, q, dz.data_ptr<scalar_t>(),
                                             dw.data_ptr<scalar_t>(), ws.data_ptr<scalar_t>(),
                                             at::cuda::getCurrentCUDAStream()),
                   "conv3d_backward");
#endif
      } else {
        cpu::conv3d_wgrad(c.p, q, dz.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>());
      }
    });
    grads[n_in] = dw;
  }
  if (need[n_in + 1] && c.p.has_bias) grads[n_in + 1] = dz.sum({0, 2, 3, 4});
  if (need_skip) grads[n_in + 2] = dskip;
  for (auto& t : grads)
    if (!t.defined()) t = new_empty({0}, opts);
  return grads;
}

}  // namespace rln_fast
