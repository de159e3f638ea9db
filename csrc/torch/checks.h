// Argument checks shared by the CPU and CUDA entries: every message names op, argument, expected, got.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <type_traits>

#ifdef RLN_FAST_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace rln_fast {
namespace detail {

// Messages are built with std::string and std::to_string, never with iostreams: on the GPU
// machine (gcc 13.3, torch 2.11+cu130) TORCH_CHECK's c10::str stream formatting compiled into
// this extension segfaulted (std::ostream::_M_insert<long>), so the checks avoid it entirely.
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void append(std::string& s, const c10::Device& d) { s += d.str(); }
template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
inline void append(std::string& s, I v) {
  s += std::to_string(v);
}

template <class... A>
[[noreturn]] void fail(const char* func, const char* file, uint32_t line, const A&... parts) {
  std::string msg;
  (append(msg, parts), ...);
  throw c10::Error({func, file, line}, msg);
}

}  // namespace detail

// TORCH_CHECK without stream formatting; the message parts are concatenated.
#define RLN_CHECK(cond, ...)                                                                  \
  do {                                                                                        \
    if (C10_UNLIKELY(!(cond)))                                                                \
      ::rln_fast::detail::fail(__func__, __FILE__, static_cast<uint32_t>(__LINE__), __VA_ARGS__); \
  } while (0)

// AT_DISPATCH_FLOATING_TYPES without its stream-formatted "not implemented" check: scalar_t is
// float or double inside the lambda; any other dtype (already refused by the op's checks) fails
// with an RLN_CHECK message.
#define RLN_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...)                                         \
  [&] {                                                                                      \
    const at::ScalarType rln_fast_st = (TYPE);                                               \
    if (rln_fast_st == at::kDouble) {                                                        \
      using scalar_t = double;                                                               \
      return __VA_ARGS__();                                                                  \
    }                                                                                        \
    RLN_CHECK(rln_fast_st == at::kFloat, NAME, ": not implemented for ", rln_fast_st);       \
    using scalar_t = float;                                                                  \
    return __VA_ARGS__();                                                                    \
  }()

// New tensors of the given sizes. at::empty(IntArrayRef) converts through
// c10::fromIntArrayRefSlow, whose range check formats with iostreams; these sizes come from
// checked tensors, so they are passed on unchecked.
inline at::Tensor new_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::empty_symint(c10::fromIntArrayRefUnchecked(sizes), opts);
}
inline at::Tensor new_zeros(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::zeros_symint(c10::fromIntArrayRefUnchecked(sizes), opts);
}

// "(a, b, c)" for sizes or strides.
inline std::string dims_str(at::IntArrayRef dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

inline std::string shape_str(const at::Tensor& t) { return dims_str(t.sizes()); }

#ifdef RLN_FAST_WITH_CUDA
inline void check_launch(cudaError_t err, const char* op) {
  RLN_CHECK(err == cudaSuccess, "rln_fast.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}
// Makes t's GPU current for the kernels and the current-stream lookup and restores the previous
// device on exit (nothing for CPU tensors). Hand-rolled instead of c10::cuda::OptionalCUDAGuard,
// whose inlined device-index checks format their messages with iostreams.
class DeviceGuard {
 public:
  explicit DeviceGuard(const at::Tensor& t) {
    if (!t.is_cuda()) return;
    int current = 0;
    const int want = static_cast<int>(t.get_device());
    cudaError_t err = cudaGetDevice(&current);
    if (err == cudaSuccess && current != want) {
      err = cudaSetDevice(want);
      if (err == cudaSuccess) previous_ = current;
    }
    RLN_CHECK(err == cudaSuccess, "rln_fast: cannot make CUDA device ", want, " current: ",
              cudaGetErrorString(err));
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};
#define RLN_FAST_DEVICE_GUARD(t) const ::rln_fast::DeviceGuard rln_fast_device_guard(t)
#else
#define RLN_FAST_DEVICE_GUARD(t)
#endif

inline void check_volume(const char* op, const char* arg, const at::Tensor& t) {
  RLN_CHECK(t.dim() == 5, "rln_fast.", op, ": '", arg, "' must be 5-D (N, C, D, H, W), got ",
              t.dim(), "-D");
  RLN_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "rln_fast.", op,
              ": '", arg, "' must be float32 or float64, got ", t.scalar_type());
}

inline void check_same(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_arg) {
  RLN_CHECK(t.scalar_type() == ref.scalar_type(), "rln_fast.", op, ": '", arg,
              "' must have the dtype of '", ref_arg, "' (", ref.scalar_type(), "), got ",
              t.scalar_type());
  RLN_CHECK(t.device() == ref.device(), "rln_fast.", op, ": '", arg,
              "' must be on the device of '", ref_arg, "' (", ref.device(), "), got ", t.device());
}

inline void check_spatial(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                          const char* ref_arg) {
  const bool same = t.size(0) == ref.size(0) && t.size(2) == ref.size(2) &&
                    t.size(3) == ref.size(3) && t.size(4) == ref.size(4);
  RLN_CHECK(same, "rln_fast.", op, ": '", arg, "' must have the batch and spatial size of '",
              ref_arg, "' ", shape_str(ref), ", got ", shape_str(t));
}

// The CUDA path exists only when compiled in; say which switch builds it.
inline void check_device_supported(const char* op, const at::Tensor& t) {
#ifndef RLN_FAST_WITH_CUDA
  RLN_CHECK(!t.is_cuda(), "rln_fast.", op,
              ": got a CUDA tensor, but rln_fast._C was built without CUDA kernels (rebuild with a "
              "CUDA build of torch and nvcc, or RLN_FAST_FORCE_CUDA=1)");
#endif
  RLN_CHECK(t.is_cpu() || t.is_cuda(), "rln_fast.", op, ": tensors must be on CPU or CUDA, got ",
              t.device());
}

}  // namespace rln_fast
