// rl_divide / rl_multiply on CUDA: grid-stride loops over the per-voxel functions shared with the CPU.
#include <algorithm>

#include "rln_fast/kernels_cuda.h"

namespace rln_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65536)));
}

#define RLN_FAST_GRID_STRIDE(i, n)                                                         \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n);                \
       i += int64_t(gridDim.x) * blockDim.x)

template <typename T>
__global__ void rl_divide_forward_kernel(const RlDivideParams p, const T* __restrict__ x,
                                         const T* __restrict__ fp, T* __restrict__ out) {
  RLN_FAST_GRID_STRIDE(i, p.N * p.S) { out[i] = rl_divide_out_at(p, x, fp, i / p.S, i % p.S); }
}

template <typename T>
__global__ void rl_divide_backward_kernel(const RlDivideParams p, const T* __restrict__ dy,
                                          const T* __restrict__ x, const T* __restrict__ fp,
                                          T* __restrict__ dx, T* __restrict__ dfp) {
  RLN_FAST_GRID_STRIDE(i, p.N * p.S) { rl_divide_grad_at(p, dy, x, fp, dx, dfp, i / p.S, i % p.S); }
}

template <typename T>
__global__ void rl_multiply_forward_kernel(const RlMultiplyParams p, const T* __restrict__ e,
                                           const T* __restrict__ bp, T* __restrict__ out) {
  RLN_FAST_GRID_STRIDE(i, p.N * p.S) { out[i] = rl_multiply_out_at(p, e, bp, i / p.S, i % p.S); }
}

template <typename T>
__global__ void rl_multiply_backward_kernel(const RlMultiplyParams p, const T* __restrict__ dy,
                                            const T* __restrict__ e, const T* __restrict__ bp,
                                            T* __restrict__ de, T* __restrict__ dbp) {
  RLN_FAST_GRID_STRIDE(i, p.N * p.S) { rl_multiply_grad_at(p, dy, e, bp, de, dbp, i / p.S, i % p.S); }
}

#undef RLN_FAST_GRID_STRIDE

}  // namespace

template <typename T>
cudaError_t launch_rl_divide_forward(const RlDivideParams& p, const T* x, const T* fp, T* out,
                                     cudaStream_t s) {
  if (p.N * p.S == 0) return cudaSuccess;
  rl_divide_forward_kernel<T><<<grid_for(p.N * p.S), kThreads, 0, s>>>(p, x, fp, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_rl_divide_backward(const RlDivideParams& p, const T* dy, const T* x, const T* fp,
                                      T* dx, T* dfp, cudaStream_t s) {
  if (p.N * p.S == 0) return cudaSuccess;
  rl_divide_backward_kernel<T><<<grid_for(p.N * p.S), kThreads, 0, s>>>(p, dy, x, fp, dx, dfp);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_rl_multiply_forward(const RlMultiplyParams& p, const T* e, const T* bp, T* out,
                                       cudaStream_t s) {
  if (p.N * p.S == 0) return cudaSuccess;
  rl_multiply_forward_kernel<T><<<grid_for(p.N * p.S), kThreads, 0, s>>>(p, e, bp, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_rl_multiply_backward(const RlMultiplyParams& p, const T* dy, const T* e,
                                        const T* bp, T* de, T* dbp, cudaStream_t s) {
  if (p.N * p.S == 0) return cudaSuccess;
  rl_multiply_backward_kernel<T><<<grid_for(p.N * p.S), kThreads, 0, s>>>(p, dy, e, bp, de, dbp);
  return cudaGetLastError();
}

#define RLN_FAST_INSTANTIATE(T)                                                                   \
  template cudaError_t launch_rl_divide_forward<T>(const RlDivideParams&, const T*, const T*, T*, \
                                                   cudaStream_t);                                 \
  template cudaError_t launch_rl_divide_backward<T>(const RlDivideParams&, const T*, const T*,    \
                                                    const T*, T*, T*, cudaStream_t);              \
  template cudaError_t launch_rl_multiply_forward<T>(const RlMultiplyParams&, const T*, const T*, \
                                                     T*, cudaStream_t);                           \
  template cudaError_t launch_rl_multiply_backward<T>(const RlMultiplyParams&, const T*,          \
                                                      const T*, const T*, T*, T*, cudaStream_t);
RLN_FAST_INSTANTIATE(float)
RLN_FAST_INSTANTIATE(double)
#undef RLN_FAST_INSTANTIATE

}  // namespace cuda
}  // namespace rln_fast
