// parallel_for for the torch-free CPU kernels: OpenMP, sharing the thread count torch sets.
//
// Every thread of a region treats subnormal floats as zero (FTZ and DAZ on x86) and restores
// its own setting when the region ends. Softplus and sigmoid of strongly negative
// pre-activations are subnormal, and on x86 each arithmetic operation on a subnormal takes a
// microcode assist of about a hundred cycles: a trained RLN's training step on the CPU ran
// 2.4-3.4x slower with them. Values below 1.2e-38 carry nothing in an image.
#pragma once

#include <cstdint>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

namespace rln_fast {
namespace cpu {

// Scope guard: subnormal inputs read as zero and subnormal results are written as zero on
// this thread until the guard is destroyed. A no-op off x86.
class FlushSubnormals {
 public:
#if defined(__SSE2__)
  static constexpr unsigned kFtzDaz = 0x8040u;  // MXCSR bits: FTZ (15) and DAZ (6)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtzDaz); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#else
  FlushSubnormals() {}
#endif
 public:
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

template <class F>
void parallel_for(int64_t n, F&& f) {
#pragma omp parallel
  {
    FlushSubnormals guard;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) f(i);
  }
}

// Splits [0, n) into chunks of at least `grain` and calls f(begin, end) on each.
template <class F>
void parallel_chunks(int64_t n, int64_t grain, F&& f) {
  const int64_t chunks = n <= 0 ? 0 : (n + grain - 1) / grain;
#pragma omp parallel
  {
    FlushSubnormals guard;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t b = c * grain, e = b + grain < n ? b + grain : n;
      f(b, e);
    }
  }
}

}  // namespace cpu
}  // namespace rln_fast
