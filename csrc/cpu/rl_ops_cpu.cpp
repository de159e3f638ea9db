// rl_divide / rl_multiply on the CPU: chunked parallel loops over the shared per-voxel functions.
#include <algorithm>

#include "parallel.h"
#include "rln_fast/kernels_cpu.h"

namespace rln_fast {
namespace cpu {
namespace {
constexpr int64_t kGrain = 16384;

// f(n, s) over every voxel of N volumes of S voxels.
template <class F>
void for_each_voxel(int64_t N, int64_t S, F&& f) {
  parallel_chunks(N * S, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i / S, i % S);
  });
}
}  // namespace

template <typename T>
void rl_divide_forward(const RlDivideParams& p, const T* x, const T* fp, T* out) {
  for_each_voxel(p.N, p.S, [&](int64_t n, int64_t s) {
    out[n * p.S + s] = rl_divide_out_at(p, x, fp, n, s);
  });
}

template <typename T>
void rl_divide_backward(const RlDivideParams& p, const T* dy, const T* x, const T* fp, T* dx,
                        T* dfp) {
  for_each_voxel(p.N, p.S, [&](int64_t n, int64_t s) {
    rl_divide_grad_at(p, dy, x, fp, dx, dfp, n, s);
  });
}

template <typename T>
void rl_multiply_forward(const RlMultiplyParams& p, const T* e, const T* bp, T* out) {
  for_each_voxel(p.N, p.S, [&](int64_t n, int64_t s) {
    out[n * p.S + s] = rl_multiply_out_at(p, e, bp, n, s);
  });
}

template <typename T>
void rl_multiply_backward(const RlMultiplyParams& p, const T* dy, const T* e, const T* bp, T* de,
                          T* dbp) {
  for_each_voxel(p.N, p.S, [&](int64_t n, int64_t s) {
    rl_multiply_grad_at(p, dy, e, bp, de, dbp, n, s);
  });
}

#define RLN_FAST_INSTANTIATE(T)                                                                   \
  template void rl_divide_forward<T>(const RlDivideParams&, const T*, const T*, T*);             \
  template void rl_divide_backward<T>(const RlDivideParams&, const T*, const T*, const T*, T*,   \
                                      T*);                                                        \
  template void rl_multiply_forward<T>(const RlMultiplyParams&, const T*, const T*, T*);         \
  template void rl_multiply_backward<T>(const RlMultiplyParams&, const T*, const T*, const T*,   \
                                        T*, T*);
RLN_FAST_INSTANTIATE(float)
RLN_FAST_INSTANTIATE(double)
#undef RLN_FAST_INSTANTIATE

}  // namespace cpu
}  // namespace rln_fast
