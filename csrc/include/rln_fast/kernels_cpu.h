// Entry points of the torch-free CPU kernels (csrc/cpu), shared by the torch glue and the C++ tests.
#pragma once

#include "rln_fast/conv3d.h"
#include "rln_fast/rl_ops.h"

namespace rln_fast {
namespace cpu {

// out (and preact when non-null) = act(conv(cat(inputs), w) + b) + softplus(skip).
template <typename T>
void conv3d_forward(const Conv3dParams& p, const Conv3dPtrs<T>& q);

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
