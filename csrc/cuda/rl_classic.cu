// Classic RL on CUDA: grid-stride loops over the per-voxel math of rl_classic.h, deterministic dots.
#include <algorithm>

#include "rln_fast/kernels_cuda.h"

namespace rln_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// The update kernels reduce their Biggs dot products per block into a fixed number of partials,
// summed in order by one block: the same result on every run.
constexpr int kReduceBlocks = 1024;

int grid_for(int64_t n, int64_t cap) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, cap)));
}

// Voxel i of [N, D, H, W] split into (n, z, y, x); I = uint32_t when the volume has < 2^31 voxels
// (the launchers check), which makes the divisions several times cheaper than 64-bit ones.
template <typename I>
__device__ __forceinline__ void split(I i, I D, I H, I W, int64_t& n, int64_t& z, int64_t& y,
                                      int64_t& x) {
  const I r = i / W;
  x = i - r * W;
  const I r2 = r / H;
  y = r - r2 * H;
  n = r2 / D;
  z = r2 - I(n) * D;
}

#define RLN_FAST_GRID_STRIDE(i, n)                                                         \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n);                \
       i += int64_t(gridDim.x) * blockDim.x)

// Sums a and b over the block into thread 0.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double sa[kThreads / 32], sb[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sa[warp] = a, sb[warp] = b;
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? sa[lane] : 0.0;
    b = lane < kThreads / 32 ? sb[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, o);
      b += __shfl_down_sync(0xffffffffu, b, o);
    }
  }
}

// The Biggs dot products of one block (<g_k, g_k-1>, <g_k-1, g_k-1>) into partials[2 * block].
template <typename T>
__device__ __forceinline__ void store_block_dots(T cross, T self, double* __restrict__ partials) {
  double a = cross, b = self;
  block_sum2(a, b);
  if (threadIdx.x == 0) partials[2 * blockIdx.x] = a, partials[2 * blockIdx.x + 1] = b;
}

template <typename T, typename I>
__global__ void rl_ratio_forward_kernel(const RlRatioParams p, const T* __restrict__ image,
                                        const T* blurred, T* out) {
  // blurred and out may be one buffer (in place): no __restrict__ on them.
  RLN_FAST_GRID_STRIDE(i, p.N * p.D * p.H * p.W) {
    int64_t n, z, y, x;
    split<I>(I(i), I(p.D), I(p.H), I(p.W), n, z, y, x);
    out[i] = rl_ratio_at(p, image, blurred, n, z, y, x);
  }
}

template <typename T>
__global__ void rl_predict_forward_kernel(int64_t n, const T* __restrict__ estimate,
                                          T* __restrict__ step, T a, T tiny) {
  RLN_FAST_GRID_STRIDE(i, n) step[i] = predict_value(estimate[i], step[i], a, tiny);
}

// The Biggs dots accumulate per thread in T (a few hundred voxels each: float keeps ~6 digits,
// plenty for the extrapolation weight) and per block in double. Measured on an H100 (45 M voxels):
// with FP64 accumulation per voxel and the Biggs loads after the stores, this kernel took 4.1 ms
// with the dots against 0.29 ms without; this form removes both suspects (not yet re-measured).
template <bool HasW, bool HasTv, typename T, typename I>
__global__ void rl_update_forward_kernel(const RlUpdateParams p, const T* __restrict__ est,
                                         const T* corr, T* out, T* __restrict__ previous,
                                         T* __restrict__ change, double* __restrict__ partials) {
  // corr and out may be one buffer (in place); every access below is at voxel i, and every
  // load comes before the stores, so that nothing waits on a store.
  T cross = T(0), self = T(0);
  RLN_FAST_GRID_STRIDE(i, p.N * p.D * p.H * p.W) {
    int64_t n, z, y, x;
    split<I>(I(i), I(p.D), I(p.H), I(p.W), n, z, y, x);
    const T u = est[i], c = corr[i];
    const T xk = previous ? previous[i] : T(0), g_old = change ? change[i] : T(0);
    const T v = rl_update_at<HasW, HasTv>(p, est, c, n, z, y, x);
    out[i] = v;
    biggs_at(v, u, xk, g_old, previous, change, i, cross, self);
  }
  if (change) store_block_dots(cross, self, partials);
}

template <typename T, typename I>
__global__ void psf_conv_ratio_forward_kernel(const PsfConvParams c, const T* __restrict__ image,
                                              const T* __restrict__ est, const T* __restrict__ psf,
                                              T* __restrict__ out) {
  RLN_FAST_GRID_STRIDE(i, c.N * c.d * c.h * c.w) {
    int64_t n, z, y, x;
    split<I>(I(i), I(c.d), I(c.h), I(c.w), n, z, y, x);
    out[i] = psf_conv_ratio_at(c, image, est, psf, n, z, y, x);
  }
}

template <bool HasW, bool HasTv, typename T, typename I>
__global__ void psf_conv_update_forward_kernel(const PsfConvParams c, const RlUpdateParams p,
                                               const T* __restrict__ est,
                                               const T* __restrict__ ratio,
                                               const T* __restrict__ psf, T* __restrict__ out,
                                               T* __restrict__ previous, T* __restrict__ change,
                                               double* __restrict__ partials) {
  T cross = T(0), self = T(0);  // as in rl_update_forward_kernel
  RLN_FAST_GRID_STRIDE(i, p.N * p.D * p.H * p.W) {
    int64_t n, z, y, x;
    split<I>(I(i), I(p.D), I(p.H), I(p.W), n, z, y, x);
    const T u = est[i];
    const T xk = previous ? previous[i] : T(0), g_old = change ? change[i] : T(0);
    const T v = rl_update_at<HasW, HasTv>(p, est, psf_backproject_at(c, ratio, psf, n, z, y, x), n,
                                          z, y, x);
    out[i] = v;
    biggs_at(v, u, xk, g_old, previous, change, i, cross, self);
  }
  if (change) store_block_dots(cross, self, partials);
}

// dots[0..1] = the sums of partials[2 b], partials[2 b + 1] over b < blocks, in a fixed order.
__global__ void finish_dots_kernel(const double* __restrict__ partials, int blocks,
                                   double* __restrict__ dots) {
  double a = 0.0, b = 0.0;
  for (int k = threadIdx.x; k < blocks; k += blockDim.x) a += partials[2 * k], b += partials[2 * k + 1];
  block_sum2(a, b);
  if (threadIdx.x == 0) dots[0] = a, dots[1] = b;
}

bool fits_u32(int64_t n) { return n < (int64_t(1) << 31); }

// Launches Kernel<HasW, HasTv, T, I> with the switches and the index type fixed at compile time.
template <template <bool, bool, typename, typename> class K, typename T, class... A>
cudaError_t launch_update(const RlUpdateParams& p, int grid, cudaStream_t s, A... args) {
  const bool w = p.weights.table != nullptr, tv = p.tv > 0.0;
  const bool small = fits_u32(p.N * p.D * p.H * p.W);
#define RLN_FAST_LAUNCH(W, TV)                                                   \
  (small ? K<W, TV, T, uint32_t>::launch(grid, s, args...)                       \
         : K<W, TV, T, int64_t>::launch(grid, s, args...))
  if (w && tv) RLN_FAST_LAUNCH(true, true);
  else if (w) RLN_FAST_LAUNCH(true, false);
  else if (tv) RLN_FAST_LAUNCH(false, true);
  else RLN_FAST_LAUNCH(false, false);
#undef RLN_FAST_LAUNCH
  return cudaGetLastError();
}

template <bool HasW, bool HasTv, typename T, typename I>
struct RlUpdateLaunch {
  template <class... A>
  static void launch(int grid, cudaStream_t s, A... args) {
    rl_update_forward_kernel<HasW, HasTv, T, I><<<grid, kThreads, 0, s>>>(args...);
  }
};

template <bool HasW, bool HasTv, typename T, typename I>
struct PsfConvUpdateLaunch {
  template <class... A>
  static void launch(int grid, cudaStream_t s, A... args) {
    psf_conv_update_forward_kernel<HasW, HasTv, T, I><<<grid, kThreads, 0, s>>>(args...);
  }
};


}  // namespace

size_t rl_update_workspace() { return 2 * size_t(kReduceBlocks); }

template <typename T>
cudaError_t launch_rl_ratio_forward(const RlRatioParams& p, const T* image, const T* blurred, T* out,
                                    cudaStream_t s) {
  const int64_t n = p.N * p.D * p.H * p.W;
  if (n == 0) return cudaSuccess;
  if (fits_u32(n))
    rl_ratio_forward_kernel<T, uint32_t><<<grid_for(n, 65536), kThreads, 0, s>>>(p, image, blurred, out);
  else
    rl_ratio_forward_kernel<T, int64_t><<<grid_for(n, 65536), kThreads, 0, s>>>(p, image, blurred, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_rl_predict_forward(int64_t n, const T* estimate, T* step, double a, double tiny,
                                      cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  rl_predict_forward_kernel<T><<<grid_for(n, 65536), kThreads, 0, s>>>(n, estimate, step, T(a),
                                                                          T(tiny));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_rl_update_forward(const RlUpdateParams& p, const T* estimate, const T* correction,
                                     T* out, T* previous, T* change, double* dots,
                                     double* workspace, cudaStream_t s) {
  const int64_t n = p.N * p.D * p.H * p.W;
  if (n > 0) {
    const int grid = grid_for(n, kReduceBlocks);
    const cudaError_t err = launch_update<RlUpdateLaunch, T>(p, grid, s, p, estimate, correction,
                                                             out, previous, change, workspace);
    if (err != cudaSuccess) return err;
    if (change) {
      finish_dots_kernel<<<1, kThreads, 0, s>>>(workspace, grid, dots);
      return cudaGetLastError();
    }
  }
  return dots ? cudaMemsetAsync(dots, 0, 2 * sizeof(double), s) : cudaSuccess;
}

template <typename T>
cudaError_t launch_psf_conv_ratio_forward(const PsfConvParams& c, const T* image, const T* estimate,
                                          const T* psf, T* out, cudaStream_t s) {
  const int64_t n = c.N * c.d * c.h * c.w;
  if (n == 0) return cudaSuccess;
  if (fits_u32(n))
    psf_conv_ratio_forward_kernel<T, uint32_t>
        <<<grid_for(n, 65536), kThreads, 0, s>>>(c, image, estimate, psf, out);
  else
    psf_conv_ratio_forward_kernel<T, int64_t>
        <<<grid_for(n, 65536), kThreads, 0, s>>>(c, image, estimate, psf, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_psf_conv_update_forward(const PsfConvParams& c, const RlUpdateParams& p,
                                           const T* estimate, const T* ratio, const T* psf, T* out,
                                           T* previous, T* change, double* dots, double* workspace,
                                           cudaStream_t s) {
  const int64_t n = p.N * p.D * p.H * p.W;
  if (n > 0) {
    const int grid = grid_for(n, kReduceBlocks);
    const cudaError_t err = launch_update<PsfConvUpdateLaunch, T>(
        p, grid, s, c, p, estimate, ratio, psf, out, previous, change, workspace);
    if (err != cudaSuccess) return err;
    if (change) {
      finish_dots_kernel<<<1, kThreads, 0, s>>>(workspace, grid, dots);
      return cudaGetLastError();
    }
  }
  return dots ? cudaMemsetAsync(dots, 0, 2 * sizeof(double), s) : cudaSuccess;
}

#undef RLN_FAST_GRID_STRIDE

#define RLN_FAST_INSTANTIATE(T)                                                                   \
  template cudaError_t launch_rl_ratio_forward<T>(const RlRatioParams&, const T*, const T*, T*,   \
                                                  cudaStream_t);                                  \
  template cudaError_t launch_rl_predict_forward<T>(int64_t, const T*, T*, double, double,       \
                                                    cudaStream_t);                                \
  template cudaError_t launch_rl_update_forward<T>(const RlUpdateParams&, const T*, const T*, T*, \
                                                   T*, T*, double*, double*, cudaStream_t);       \
  template cudaError_t launch_psf_conv_ratio_forward<T>(const PsfConvParams&, const T*, const T*, \
                                                        const T*, T*, cudaStream_t);              \
  template cudaError_t launch_psf_conv_update_forward<T>(const PsfConvParams&,                    \
                                                         const RlUpdateParams&, const T*,         \
                                                         const T*, const T*, T*, T*, T*, double*, \
                                                         double*, cudaStream_t);
RLN_FAST_INSTANTIATE(float)
RLN_FAST_INSTANTIATE(double)
#undef RLN_FAST_INSTANTIATE

}  // namespace cuda
}  // namespace rln_fast
