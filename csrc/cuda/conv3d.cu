// conv3d on CUDA: register-tiled forward (z columns x output-channel chunks), act backward, weight grad.
#include <algorithm>

#include "rln_fast/kernels_cuda.h"

namespace rln_fast {
namespace cuda {
namespace {

constexpr int kBX = kConvBlockX, kBY = kConvBlockY, kThreads = kBX * kBY;  // 32 x 8 columns
constexpr int kTX = kBX + 2, kTY = kBY + 2;              // its input tile with a one-voxel halo

// Loads channel `src` of the input around the block's (z0, y0, x0) corner into tile[TZ][kTY][kTX],
// zero outside the volume (the conv's "same" padding).
template <typename T, int TZ>
__device__ __forceinline__ void load_tile(const Conv3dParams& p, const T* __restrict__ src,
                                          int64_t z0, int64_t y0, int64_t x0, T* tile, int tid) {
  for (int i = tid; i < TZ * kTY * kTX; i += kThreads) {
    const int lx = i % kTX, ly = (i / kTX) % kTY, lz = i / (kTX * kTY);
    const int64_t gx = x0 + lx - 1, gy = y0 + ly - 1, gz = z0 + lz - 1;
    const bool inside = gx >= 0 && gx < p.W && gy >= 0 && gy < p.H && gz >= 0 && gz < p.D;
    tile[i] = inside ? src[(gz * p.H + gy) * p.W + gx] : T(0);
  }
}

// The same tile, copied with cp.async (sm_80+) so the copy overlaps the previous channel's
// arithmetic; out-of-volume elements are zero-filled by the copy itself (source size 0).
template <typename T, int TZ>
__device__ __forceinline__ void load_tile_async(const Conv3dParams& p, const T* __restrict__ src,
                                                int64_t z0, int64_t y0, int64_t x0, T* tile,
                                                int tid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  for (int i = tid; i < TZ * kTY * kTX; i += kThreads) {
    const int lx = i % kTX, ly = (i / kTX) % kTY, lz = i / (kTX * kTY);
    const int64_t gx = x0 + lx - 1, gy = y0 + ly - 1, gz = z0 + lz - 1;
    const bool inside = gx >= 0 && gx < p.W && gy >= 0 && gy < p.H && gz >= 0 && gz < p.D;
    const T* g = inside ? src + (gz * p.H + gy) * p.W + gx : src;
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(tile + i));
    const int bytes = inside ? int(sizeof(T)) : 0;
    if constexpr (sizeof(T) == 4)
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(g), "r"(bytes));
    else
      asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(g), "r"(bytes));
  }
  asm volatile("cp.async.commit_group;\n" ::);
#else
  load_tile<T, TZ>(p, src, z0, y0, x0, tile, tid);
#endif
}

// Waits until at most `pending` cp.async groups of this thread are still in flight.
template <int pending>
__device__ __forceinline__ void wait_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
#endif
}

// Start of concatenated input channel ci of batch n.
template <typename T>
__device__ __forceinline__ const T* channel_ptr(const Conv3dParams& p, const Conv3dPtrs<T>& q,
                                                int64_t n, int64_t ci) {
  int t = 0;
  while (ci >= p.in_channels[t]) ci -= p.in_channels[t++];
  return q.in[t] + (n * p.in_channels[t] + ci) * (p.D * p.H * p.W);
}

// Each thread computes ZT voxels along z at one (y, x) for COT output channels, so every input
// value read from shared memory feeds up to 3 * COT FMAs and every weight ZT FMAs.
// EPI != kEpiNone: the block holds every output channel (n_chunks == 1) and writes only the RL
// epilogue of their mean to q.out [N, 1, D, H, W], with `a` its second operand.
template <typename T, int COT, int ZT, int EPI>
__global__ void __launch_bounds__(kThreads, 2)
    conv3d_forward_kernel(const Conv3dParams p, const Conv3dPtrs<T> q, int64_t n_chunks,
                          int64_t n_ztiles, const ConvRlParams e, const T* __restrict__ a) {
  constexpr int TZ = ZT + 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* w_s = reinterpret_cast<T*>(smem_raw);   // [Cin][27][COT]
  T* in_s = w_s + p.Cin * kConvTaps * COT;   // [2][TZ][kTY][kTX]
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kBX + tx;
  int64_t bz = blockIdx.z;
  const int64_t zt = bz % n_ztiles;
  bz /= n_ztiles;
  const int64_t co0 = (bz % n_chunks) * COT, n = bz / n_chunks;
  const int64_t x0 = int64_t(blockIdx.x) * kBX, y0 = int64_t(blockIdx.y) * kBY, z0 = zt * ZT;

  for (int64_t i = tid; i < p.Cin * kConvTaps * COT; i += kThreads) {
    const int64_t c = i % COT, tap = (i / COT) % kConvTaps, ci = i / (kConvTaps * COT);
    w_s[i] = co0 + c < p.Cout ? q.w[((co0 + c) * p.Cin + ci) * kConvTaps + tap] : T(0);
  }
  T acc[ZT][COT];
#pragma unroll
  for (int c = 0; c < COT; ++c) {
    const T b = (p.has_bias && co0 + c < p.Cout) ? q.b[co0 + c] : T(0);
#pragma unroll
    for (int zo = 0; zo < ZT; ++zo) acc[zo][c] = b;
  }

  // Two input tiles: channel ci + 1 streams in (cp.async) while channel ci is computed.
  constexpr int kTile = TZ * kTY * kTX;
  load_tile_async<T, TZ>(p, channel_ptr(p, q, n, 0), z0, y0, x0, in_s, tid);
  for (int64_t ci = 0; ci < p.Cin; ++ci) {
    T* cur = in_s + (ci & 1) * kTile;
    if (ci + 1 < p.Cin) {
      load_tile_async<T, TZ>(p, channel_ptr(p, q, n, ci + 1), z0, y0, x0,
                             in_s + ((ci + 1) & 1) * kTile, tid);
      wait_async<1>();
    } else {
      wait_async<0>();
    }
    __syncthreads();  // channel ci (and the weights) are visible to the whole block
    const T* wc = w_s + ci * kConvTaps * COT;
#pragma unroll
    for (int ky = 0; ky < 3; ++ky) {
#pragma unroll
      for (int kx = 0; kx < 3; ++kx) {
        T col[TZ];
#pragma unroll
        for (int zz = 0; zz < TZ; ++zz) col[zz] = cur[(zz * kTY + ty + ky) * kTX + tx + kx];
#pragma unroll
        for (int kz = 0; kz < 3; ++kz) {
          T wv[COT];
#pragma unroll
          for (int c = 0; c < COT; ++c) wv[c] = wc[(kz * 9 + ky * 3 + kx) * COT + c];
#pragma unroll
          for (int zo = 0; zo < ZT; ++zo)
#pragma unroll
            for (int c = 0; c < COT; ++c) acc[zo][c] += col[zo + kz] * wv[c];
        }
      }
    }
    __syncthreads();  // everyone is done with `cur` before it is refilled with channel ci + 2
  }

  const int64_t S = p.D * p.H * p.W;
  const int64_t x = x0 + tx, y = y0 + ty;
  if (x >= p.W || y >= p.H) return;
#pragma unroll
  for (int zo = 0; zo < ZT; ++zo) {
    const int64_t z = z0 + zo;
    if (z >= p.D) break;
    const int64_t v = (z * p.H + y) * p.W + x;
    const T sk = p.has_skip ? softplus(q.skip[n * S + v]) : T(0);
    if constexpr (EPI == kEpiNone) {
#pragma unroll
      for (int c = 0; c < COT; ++c) {
        if (co0 + c >= p.Cout) break;
        const int64_t o = (n * p.Cout + co0 + c) * S + v;
        if (q.preact) q.preact[o] = acc[zo][c];
        q.out[o] = apply_act(p.act, acc[zo][c]) + sk;
      }
    } else {
      T m = T(0);
#pragma unroll
      for (int c = 0; c < COT; ++c)
        if (c < p.Cout) m += apply_act(p.act, acc[zo][c]);
      q.out[n * S + v] = rl_epilogue(e, m / T(p.Cout) + sk, a ? a[n * S + v] : T(1));
    }
  }
}

template <typename T, int COT, int ZT, int EPI = kEpiNone>
cudaError_t launch_forward_tiled(const Conv3dParams& p, const Conv3dPtrs<T>& q, cudaStream_t s,
                                 const ConvRlParams& e = {}, const T* a = nullptr) {
  static_assert(conv3d_forward_tile(COT, sizeof(T)).cot == COT &&
                    conv3d_forward_tile(COT, sizeof(T)).zt == ZT,
                "the launch must use the tile conv3d_forward_smem_bytes describes");
  const int64_t n_chunks = (p.Cout + COT - 1) / COT, n_ztiles = (p.D + ZT - 1) / ZT;
  const int64_t gz = p.N * n_chunks * n_ztiles, gy = (p.H + kBY - 1) / kBY;
  if (gz > 65535 || gy > 65535) return cudaErrorInvalidConfiguration;
  const size_t smem = conv3d_forward_smem_bytes(p.Cin, ConvTile{COT, ZT}, sizeof(T));
  auto kernel = conv3d_forward_kernel<T, COT, ZT, EPI>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.W + kBX - 1) / kBX), static_cast<unsigned>(gy),
                  static_cast<unsigned>(gz));
  kernel<<<grid, dim3(kBX, kBY), smem, s>>>(p, q, n_chunks, n_ztiles, e, a);
  return cudaGetLastError();
}

// The tile of conv3d_forward_tile: <4, 16> / <8, 8> for float, <4, 8> / <8, 4> for double.
template <typename T, int EPI>
cudaError_t launch_forward(const Conv3dParams& p, const Conv3dPtrs<T>& q, cudaStream_t s,
                           const ConvRlParams& e = {}, const T* a = nullptr) {
  constexpr int kZ4 = conv3d_forward_tile(4, sizeof(T)).zt, kZ8 = conv3d_forward_tile(8, sizeof(T)).zt;
  return p.Cout <= 4 ? launch_forward_tiled<T, 4, kZ4, EPI>(p, q, s, e, a)
                     : launch_forward_tiled<T, 8, kZ8, EPI>(p, q, s, e, a);
}

template <typename T>
__global__ void conv3d_act_backward_kernel(const Conv3dParams p, const T* __restrict__ dy,
                                           const T* __restrict__ preact, const T* __restrict__ skip,
                                           T* __restrict__ dz, T* __restrict__ dskip) {
  const int64_t S = p.D * p.H * p.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.N * S;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / S, v = i % S;
    T sum = T(0);
    for (int64_t co = 0; co < p.Cout; ++co) {
      const int64_t o = (n * p.Cout + co) * S + v;
      dz[o] = p.act == kActSoftplus ? dy[o] * sigmoid(preact[o]) : dy[o];
      sum += dy[o];
    }
    if (dskip) dskip[i] = sigmoid(skip[i]) * sum;
  }
}

// Weight gradient: a block owns one input channel and kWgCo output channels, walks a strided
// share of the volume's tiles accumulating 27 taps per channel in registers, reduces across the
// block once, and writes one partial per block; a second kernel sums partials in fixed order, so
// the result is deterministic.
constexpr int kWgCo = 2, kWgZ = 8;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    conv3d_wgrad_kernel(const Conv3dParams p, const Conv3dPtrs<T> q, const T* __restrict__ dz,
                        T* __restrict__ partial) {
  constexpr int TZ = kWgZ + 2, NACC = kWgCo * kConvTaps;
  __shared__ T in_s[TZ * kTY * kTX];
  __shared__ T red[kThreads / 32][NACC];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * kBX + tx;
  const int64_t ci = blockIdx.y, co0 = int64_t(blockIdx.z) * kWgCo;
  const int64_t S = p.D * p.H * p.W;
  const int64_t nx = (p.W + kBX - 1) / kBX, ny = (p.H + kBY - 1) / kBY, nz = (p.D + kWgZ - 1) / kWgZ;
  const int64_t tiles = p.N * nz * ny * nx;

  T acc[kWgCo][kConvTaps];
#pragma unroll
  for (int c = 0; c < kWgCo; ++c)
#pragma unroll
    for (int k = 0; k < kConvTaps; ++k) acc[c][k] = T(0);

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t xt = tile % nx, yt = (tile / nx) % ny, zt = (tile / (nx * ny)) % nz;
    const int64_t n = tile / (nx * ny * nz);
    const int64_t x0 = xt * kBX, y0 = yt * kBY, z0 = zt * kWgZ;
    const T* src = channel_ptr(p, q, n, ci);
    __syncthreads();
    load_tile<T, TZ>(p, src, z0, y0, x0, in_s, tid);
    __syncthreads();
    const int64_t x = x0 + tx, y = y0 + ty;
    const bool xy_in = x < p.W && y < p.H;
    T d[kWgCo][kWgZ];
#pragma unroll
    for (int c = 0; c < kWgCo; ++c)
#pragma unroll
      for (int zo = 0; zo < kWgZ; ++zo) {
        const bool in = xy_in && z0 + zo < p.D && co0 + c < p.Cout;
        d[c][zo] = in ? dz[(n * p.Cout + co0 + c) * S + ((z0 + zo) * p.H + y) * p.W + x] : T(0);
      }
#pragma unroll
    for (int ky = 0; ky < 3; ++ky)
#pragma unroll
      for (int kx = 0; kx < 3; ++kx) {
        T col[TZ];
#pragma unroll
        for (int zz = 0; zz < TZ; ++zz) col[zz] = in_s[(zz * kTY + ty + ky) * kTX + tx + kx];
#pragma unroll
        for (int kz = 0; kz < 3; ++kz)
#pragma unroll
          for (int c = 0; c < kWgCo; ++c)
#pragma unroll
            for (int zo = 0; zo < kWgZ; ++zo) acc[c][kz * 9 + ky * 3 + kx] += d[c][zo] * col[zo + kz];
      }
  }

  const int warp = tid / 32, lane = tid % 32;
#pragma unroll
  for (int c = 0; c < kWgCo; ++c)
#pragma unroll
    for (int k = 0; k < kConvTaps; ++k) {
      const T v = warp_sum(acc[c][k]);
      if (lane == 0) red[warp][c * kConvTaps + k] = v;
    }
  __syncthreads();
  const int64_t total = p.Cout * p.Cin * kConvTaps;
  for (int i = tid; i < NACC; i += kThreads) {
    const int c = i / kConvTaps, k = i % kConvTaps;
    if (co0 + c >= p.Cout) continue;
    T s = T(0);
    for (int w = 0; w < kThreads / 32; ++w) s += red[w][i];
    partial[blockIdx.x * total + ((co0 + c) * p.Cin + ci) * kConvTaps + k] = s;
  }
}

template <typename T>
__global__ void sum_partials_kernel(const T* __restrict__ partial, int64_t parts, int64_t total,
                                    T* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t k = 0; k < parts; ++k) s += static_cast<double>(partial[k * total + i]);
    out[i] = static_cast<T>(s);
  }
}

// Blocks along the volume per (ci, co pair): about 8 resident blocks per SM in all.
int64_t wgrad_parts(const Conv3dParams& p) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess)
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t pairs = p.Cin * ((p.Cout + kWgCo - 1) / kWgCo);
  const int64_t tiles = p.N * ((p.D + kWgZ - 1) / kWgZ) * ((p.H + kBY - 1) / kBY) *
                        ((p.W + kBX - 1) / kBX);
  return std::max<int64_t>(1, std::min<int64_t>(tiles, (int64_t(sms) * 8 + pairs - 1) / pairs));
}

int grid_for(int64_t n, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, 65536)));
}

}  // namespace

template <typename T>
cudaError_t launch_conv3d_forward(const Conv3dParams& p, const Conv3dPtrs<T>& q, cudaStream_t s) {
  if (p.N * p.Cout * p.D * p.H * p.W == 0) return cudaSuccess;
  if (p.Cin <= 0) return cudaErrorInvalidValue;  // the torch glue rejects it first
  return launch_forward<T, kEpiNone>(p, q, s);
}

template <typename T>
cudaError_t launch_conv3d_rl_forward(const Conv3dParams& p, const Conv3dPtrs<T>& q,
                                     const ConvRlParams& e, const T* a, cudaStream_t s) {
  if (p.N * p.D * p.H * p.W == 0) return cudaSuccess;
  if (p.Cout > 8 || p.Cout <= 0 || p.Cin <= 0) return cudaErrorInvalidValue;
  return e.mode == kEpiDivide ? launch_forward<T, kEpiDivide>(p, q, s, e, a)
                              : launch_forward<T, kEpiMultiply>(p, q, s, e, a);
}

template <typename T>
cudaError_t launch_conv3d_act_backward(const Conv3dParams& p, const T* dy, const T* preact,
                                       const T* skip, T* dz, T* dskip, cudaStream_t s) {
  const int64_t n = p.N * p.D * p.H * p.W;
  if (n == 0 || p.Cout == 0) return cudaSuccess;
  conv3d_act_backward_kernel<T><<<grid_for(n, 256), 256, 0, s>>>(p, dy, preact, skip, dz, dskip);
  return cudaGetLastError();
}

template <typename T>
size_t conv3d_wgrad_workspace(const Conv3dParams& p) {
  return static_cast<size_t>(wgrad_parts(p) * p.Cout * p.Cin * kConvTaps);
}

template <typename T>
cudaError_t launch_conv3d_wgrad(const Conv3dParams& p, const Conv3dPtrs<T>& q, const T* dz, T* dw,
                                T* workspace, cudaStream_t s) {
  const int64_t total = p.Cout * p.Cin * kConvTaps;
  if (total == 0) return cudaSuccess;
  if (p.N * p.D * p.H * p.W == 0) return cudaMemsetAsync(dw, 0, sizeof(T) * total, s);
  const int64_t parts = wgrad_parts(p), co_pairs = (p.Cout + kWgCo - 1) / kWgCo;
  if (p.Cin > 65535 || co_pairs > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(parts), static_cast<unsigned>(p.Cin),
                  static_cast<unsigned>(co_pairs));
  conv3d_wgrad_kernel<T><<<grid, dim3(kBX, kBY), 0, s>>>(p, q, dz, workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  sum_partials_kernel<T><<<grid_for(total, 256), 256, 0, s>>>(workspace, parts, total, dw);
  return cudaGetLastError();
}

#define RLN_FAST_INSTANTIATE(T)                                                                  \
  template cudaError_t launch_conv3d_forward<T>(const Conv3dParams&, const Conv3dPtrs<T>&,      \
                                                cudaStream_t);                                  \
  template cudaError_t launch_conv3d_rl_forward<T>(const Conv3dParams&, const Conv3dPtrs<T>&,   \
                                                   const ConvRlParams&, const T*, cudaStream_t); \
  template cudaError_t launch_conv3d_act_backward<T>(const Conv3dParams&, const T*, const T*,   \
                                                     const T*, T*, T*, cudaStream_t);           \
  template size_t conv3d_wgrad_workspace<T>(const Conv3dParams&);                                \
  template cudaError_t launch_conv3d_wgrad<T>(const Conv3dParams&, const Conv3dPtrs<T>&,        \
                                              const T*, T*, T*, cudaStream_t);
RLN_FAST_INSTANTIATE(float)
RLN_FAST_INSTANTIATE(double)
#undef RLN_FAST_INSTANTIATE

}  // namespace cuda
}  // namespace rln_fast
