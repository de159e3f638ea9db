// Launchers of the torch-free CUDA kernels (csrc/cuda): raw device pointers, the caller's stream.
#pragma once

#include <cuda_runtime.h>

#include "rln_fast/conv3d.h"
#include "rln_fast/rl_ops.h"

namespace rln_fast {
namespace cuda {

// Same contracts as the CPU entries in kernels_cpu.h; every pointer is device memory.
template <typename T>
cudaError_t launch_conv3d_forward(const Conv3dParams& p, const Conv3dPtrs<T>& q, cudaStream_t s);

template <typename T>
cudaError_t launch_conv3d_act_backward(const Conv3dParams& p, const T* dy, const T* preact,
                                       const T* skip, T* dz, T* dskip, cudaStream_t s);

// workspace: at least conv3d_wgrad_workspace(p) elements of T.
template <typename T>
size_t conv3d_wgrad_workspace(const Conv3dParams& p);
template <typename T>
cudaError_t launch_conv3d_wgrad(const Conv3dParams& p, const Conv3dPtrs<T>& q, const T* dz, T* dw,
                                T* workspace, cudaStream_t s);

template <typename T>
cudaError_t launch_rl_divide_forward(const RlDivideParams& p, const T* x, const T* fp, T* out,
                                     cudaStream_t s);
template <typename T>
cudaError_t launch_rl_divide_backward(const RlDivideParams& p, const T* dy, const T* x, const T* fp,
                                      T* dx, T* dfp, cudaStream_t s);
template <typename T>
cudaError_t launch_rl_multiply_forward(const RlMultiplyParams& p, const T* e, const T* bp, T* out,
                                       cudaStream_t s);
template <typename T>
cudaError_t launch_rl_multiply_backward(const RlMultiplyParams& p, const T* dy, const T* e,
                                        const T* bp, T* de, T* dbp, cudaStream_t s);

}  // namespace cuda
}  // namespace rln_fast
