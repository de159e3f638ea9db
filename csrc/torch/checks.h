// Argument checks shared by the CPU and CUDA entries: every message names op, argument, expected, got.
#pragma once

#include <torch/extension.h>

#include <sstream>
#include <string>

namespace rln_fast {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << "(";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << ")";
  return s.str();
}

inline void check_volume(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 5, "rln_fast.", op, ": '", arg, "' must be 5-D (N, C, D, H, W), got ",
              t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "rln_fast.", op,
              ": '", arg, "' must be float32 or float64, got ", t.scalar_type());
}

inline void check_same(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_arg) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "rln_fast.", op, ": '", arg,
              "' must have the dtype of '", ref_arg, "' (", ref.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "rln_fast.", op, ": '", arg,
              "' must be on the device of '", ref_arg, "' (", ref.device(), "), got ", t.device());
}

inline void check_spatial(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                          const char* ref_arg) {
  const bool same = t.size(0) == ref.size(0) && t.size(2) == ref.size(2) &&
                    t.size(3) == ref.size(3) && t.size(4) == ref.size(4);
  TORCH_CHECK(same, "rln_fast.", op, ": '", arg, "' must have the batch and spatial size of '",
              ref_arg, "' ", shape_str(ref), ", got ", shape_str(t));
}

// The CUDA path exists only when compiled in; say which switch builds it.
inline void check_device_supported(const char* op, const at::Tensor& t) {
#ifndef RLN_FAST_WITH_CUDA
  TORCH_CHECK(!t.is_cuda(), "rln_fast.", op,
              ": got a CUDA tensor, but rln_fast._C was built without CUDA kernels (rebuild with a "
              "CUDA build of torch and nvcc, or RLN_FAST_FORCE_CUDA=1)");
#endif
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), "rln_fast.", op, ": tensors must be on CPU or CUDA, got ",
              t.device());
}

}  // namespace rln_fast
