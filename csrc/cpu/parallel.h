// parallel_for for the torch-free CPU kernels: OpenMP, sharing the thread count torch sets.
#pragma once

#include <cstdint>

namespace rln_fast {
namespace cpu {

template <class F>
void parallel_for(int64_t n, F&& f) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) f(i);
}

// Splits [0, n) into chunks of at least `grain` and calls f(begin, end) on each.
template <class F>
void parallel_chunks(int64_t n, int64_t grain, F&& f) {
  const int64_t chunks = n <= 0 ? 0 : (n + grain - 1) / grain;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * grain, e = b + grain < n ? b + grain : n;
    f(b, e);
  }
}

}  // namespace cpu
}  // namespace rln_fast
