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

// Cout must be <= 8: one block holds every output channel of its voxels.
template <typename T>
cudaError_t launch_conv3d_rl_forward(const Conv3dParams& p, const Conv3dPtrs<T>& q,
                                     const ConvRlParams& e, const T* a, cudaStream_t s);

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

// Classic RL (csrc/cuda/rl_classic.cu): the contracts of the CPU entries in kernels_cpu.h, device
// pointers, the caller's stream. rl_classic.h is included here, outside the namespaces.
#include "rln_fast/rl_classic.h"

namespace rln_fast {
namespace cuda {

// Elements of double scratch the update launchers need for their deterministic dot products.
size_t rl_update_workspace();

template <typename T>
cudaError_t launch_rl_ratio_forward(const RlRatioParams& p, const T* image, const T* blurred, T* out,
                                    cudaStream_t s);
template <typename T>
cudaError_t launch_rl_predict_forward(int64_t n, const T* estimate, T* step, double a, double tiny,
                                      cudaStream_t s);
template <typename T>
cudaError_t launch_rl_update_forward(const RlUpdateParams& p, const T* estimate, const T* correction,
                                     T* out, T* previous, T* change, double* dots,
                                     double* workspace, cudaStream_t s);
template <typename T>
cudaError_t launch_psf_conv_ratio_forward(const PsfConvParams& c, const T* image, const T* estimate,
                                          const T* psf, T* out, cudaStream_t s);
template <typename T>
cudaError_t launch_psf_conv_update_forward(const PsfConvParams& c, const RlUpdateParams& p,
                                           const T* estimate, const T* ratio, const T* psf, T* out,
                                           T* previous, T* change, double* dots, double* workspace,
                                           cudaStream_t s);

}  // namespace cuda
}  // namespace rln_fast
