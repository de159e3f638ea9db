// Entry points of the torch-free CPU kernels (csrc/cpu), shared by the torch glue and the C++ tests.
#pragma once

#include "rln_fast/conv3d.h"
#include "rln_fast/rl_ops.h"

namespace rln_fast {
namespace cpu {

// out (and preact when non-null) = act(conv(cat(inputs), w) + b) + softplus(skip).
template <typename T>
void conv3d_forward(const Conv3dParams& p, const Conv3dPtrs<T>& q);

// out [N, 1, D, H, W] = rl_epilogue(e, mean_c(act(conv + b) + softplus(skip)), a [N, 1, D, H, W]).
template <typename T>
void conv3d_rl_forward(const Conv3dParams& p, const Conv3dPtrs<T>& q, const ConvRlParams& e,
                       const T* a);

// dz [N, Cout, D, H, W] = dy * act'(preact); dskip [N, 1, D, H, W] = sigmoid(skip) * sum_co dy.
// preact may be null when act is none; dskip may be null when not needed.
template <typename T>
void conv3d_act_backward(const Conv3dParams& p, const T* dy, const T* preact, const T* skip, T* dz,
                         T* dskip);

// dw [Cout, Cin, 3, 3, 3] = sum over n and voxels of dz * shifted inputs (inputs from q.in).
template <typename T>
void conv3d_wgrad(const Conv3dParams& p, const Conv3dPtrs<T>& q, const T* dz, T* dw);

template <typename T>
void rl_divide_forward(const RlDivideParams& p, const T* x, const T* fp, T* out);
template <typename T>
void rl_divide_backward(const RlDivideParams& p, const T* dy, const T* x, const T* fp, T* dx, T* dfp);
template <typename T>
void rl_multiply_forward(const RlMultiplyParams& p, const T* e, const T* bp, T* out);
template <typename T>
void rl_multiply_backward(const RlMultiplyParams& p, const T* dy, const T* e, const T* bp, T* de,
                          T* dbp);

}  // namespace cpu
}  // namespace rln_fast

// Classic RL (csrc/cpu/rl_classic_cpu.cpp). rl_classic.h is included here, outside the
// namespaces, to keep this an append.
#include "rln_fast/rl_classic.h"

namespace rln_fast {
namespace cpu {

// out [N, 1, D, H, W] = image [N, 1, d, h, w] / max(blurred + background, eps), 0 outside the
// image's corner box; out may be blurred itself.
template <typename T>
void rl_ratio_forward(const RlRatioParams& p, const T* image, const T* blurred, T* out);

// step[i] = predict_value(estimate[i], step[i], a, tiny) for the n voxels: the accelerated
// prediction, written over the step.
template <typename T>
void rl_predict_forward(int64_t n, const T* estimate, T* step, double a, double tiny);

// out [N, 1, D, H, W] = max(estimate * correction * w * tv_factor, clamp_min); out may be
// correction itself. previous / change (or null): Biggs bookkeeping in place (see biggs_at);
// dots[2] = {<g_k, g_k-1>, <g_k, g_k>} over the batch, zeros without change.
template <typename T>
void rl_update_forward(const RlUpdateParams& p, const T* estimate, const T* correction, T* out,
                       T* previous, T* change, double* dots);

// out [N, 1, d, h, w] = image / max(psf * estimate + background, eps); estimate [N, 1, D, H, W].
template <typename T>
void psf_conv_ratio_forward(const PsfConvParams& c, const T* image, const T* estimate, const T* psf,
                            T* out);

// out [N, 1, D, H, W] = the rl_update of estimate with correction psf^T * ratio, never stored;
// previous / change / dots as in rl_update_forward. out must not be estimate or ratio.
template <typename T>
void psf_conv_update_forward(const PsfConvParams& c, const RlUpdateParams& p, const T* estimate,
                             const T* ratio, const T* psf, T* out, T* previous, T* change,
                             double* dots);

}  // namespace cpu
}  // namespace rln_fast
